// Ciphertext format 1 (DESIGN.md "Ciphertext (bytea), format 1"); cases C02, C18.
import { createDecipheriv, createHash, randomBytes } from 'node:crypto';
import { describe, expect, it } from 'vitest';
import {
  DecryptError,
  FORMAT_V1,
  HEADER_BYTES,
  IvPool,
  OVERHEAD,
  SecretBytes,
  UnsupportedParameterError,
  buildAad,
  generateKey,
  looksLikeEnvelope,
  openValue,
  readDataKeyId,
  sealValue,
} from '../../src/crypto/index.js';

const DECRYPT_MESSAGE = 'keyring: value could not be decrypted (wrong key, tampered, or moved ciphertext)';
const pool = new IvPool();
const dataKey = SecretBytes.random(32);
const DATA_KEY_ID = 0x0102_0304_0506_0708n;
const COLUMN = 7;
const ROW = 'row-0001';

const seal = (plaintext: Buffer): Buffer => sealValue(dataKey, DATA_KEY_ID, COLUMN, ROW, plaintext, pool);

function decryptFailure(fn: () => unknown): DecryptError {
  try {
    fn();
  } catch (err) {
    expect(err).toBeInstanceOf(DecryptError);
    return err as DecryptError;
  }
  throw new Error('expected a DecryptError, but the call succeeded');
}

describe('format 1 envelope', () => {
  it('round-trips text, emoji, control characters and binary values', () => {
    const values = [
      Buffer.from('alpha@example.test'),
      Buffer.from('👩🏽‍💻 קפה Cafe\u0301 \u0001 𝄞'),
      randomBytes(4096),
      Buffer.alloc(0),
    ];
    for (const value of values) {
      expect(openValue(dataKey, COLUMN, ROW, seal(value)).equals(value)).toBe(true);
    }
  });

  it.each([0, 1, 1000])('octet_length is exactly 37 + n for n = %i', (n) => {
    expect(OVERHEAD).toBe(37);
    expect(seal(randomBytes(n)).length).toBe(37 + n);
  });

  it('lays out the header: format byte, big-endian data key id, then the IV', () => {
    const envelope = seal(Buffer.from('value-1'));
    expect(envelope[0]).toBe(FORMAT_V1);
    expect(envelope.subarray(1, HEADER_BYTES).toString('hex')).toBe('0102030405060708');
    expect(readDataKeyId(envelope)).toBe(DATA_KEY_ID);
    expect(buildAad(DATA_KEY_ID, COLUMN, ROW).subarray(0, HEADER_BYTES).equals(envelope.subarray(0, HEADER_BYTES))).toBe(
      true,
    );
  });

  it('refuses ids that do not fit their header and AAD fields', () => {
    for (const columnId of [-1, 2 ** 32, 1.5]) {
      expect(() => buildAad(DATA_KEY_ID, columnId, ROW)).toThrow(UnsupportedParameterError);
    }
    for (const dataKeyId of [-1n, 1n << 64n]) {
      expect(() => buildAad(dataKeyId, COLUMN, ROW)).toThrow(UnsupportedParameterError);
    }
    expect(buildAad((1n << 64n) - 1n, 2 ** 32 - 1, '').length).toBe(13);
  });

  it('uses a fresh IV for each encryption of the same value', () => {
    const a = seal(Buffer.from('same'));
    const b = seal(Buffer.from('same'));
    expect(a.subarray(9, 21).equals(b.subarray(9, 21))).toBe(false);
    expect(a.equals(b)).toBe(false);
  });

  it('fails with the one generic error when any single byte is flipped', () => {
    const plaintext = Buffer.from('marker-tamper-value');
    const envelope = seal(plaintext);
    const n = plaintext.length;
    // format byte, key id (first/last), IV (first/last), body (first/middle/last), tag (first/last)
    const positions = [0, 1, 8, 9, 20, 21, 21 + (n >> 1), 20 + n, 21 + n, 36 + n];
    for (const position of positions) {
      const tampered = Buffer.from(envelope);
      tampered[position] = tampered[position]! ^ 0x01;
      const err = decryptFailure(() => openValue(dataKey, COLUMN, ROW, tampered));
      expect(err.message, `byte ${position}`).toBe(DECRYPT_MESSAGE);
      expect(err.code).toBe('DECRYPT_FAILED');
      expect(err.message).not.toContain(plaintext.toString());
    }
  });

  it('fails when the value is moved to another column or row (AAD binding)', () => {
    const envelope = seal(Buffer.from('value-1'));
    expect(decryptFailure(() => openValue(dataKey, COLUMN + 1, ROW, envelope)).reason).toBe('auth');
    expect(decryptFailure(() => openValue(dataKey, COLUMN, 'row-0002', envelope)).reason).toBe('auth');
  });

  it('fails under a different data key', () => {
    const envelope = seal(Buffer.from('value-1'));
    expect(decryptFailure(() => openValue(generateKey(), COLUMN, ROW, envelope)).message).toBe(DECRYPT_MESSAGE);
  });

  it('refuses garbage, short and plain-text input instead of passing it through (C02)', () => {
    const inputs = [
      Buffer.alloc(0),
      Buffer.from([FORMAT_V1]),
      Buffer.alloc(36, FORMAT_V1),
      Buffer.from('plain text stored by a privileged session, long enough to pass 37 bytes'),
      Buffer.concat([Buffer.from([0x02]), randomBytes(60)]),
    ];
    for (const input of inputs) {
      expect(decryptFailure(() => readDataKeyId(input)).reason).toBe('format');
      expect(decryptFailure(() => openValue(dataKey, COLUMN, ROW, input)).message).toBe(DECRYPT_MESSAGE);
    }
    // Right shape, random content: the tag cannot verify.
    const forged = Buffer.concat([Buffer.from([FORMAT_V1]), randomBytes(60)]);
    expect(decryptFailure(() => openValue(dataKey, COLUMN, ROW, forged)).reason).toBe('auth');
  });

  it('flags decrypted values that still look like an envelope (C02 one-layer invariant)', () => {
    const inner = seal(Buffer.from('value-1'));
    const nested = seal(inner);
    expect(looksLikeEnvelope(openValue(dataKey, COLUMN, ROW, nested))).toBe(true);
    expect(looksLikeEnvelope(openValue(dataKey, COLUMN, ROW, inner))).toBe(false);
    expect(looksLikeEnvelope(Buffer.alloc(36, FORMAT_V1))).toBe(false);
  });

  it('decrypts with an independent implementation of the documented layout (C18 reference)', () => {
    const plaintext = Buffer.from('👩🏽‍💻 reference value \u0001 מימין לשמאל'.repeat(50));
    const envelope = seal(plaintext);
    // Reference: only node:crypto and the layout in DESIGN.md, not openValue.
    const n = envelope.length - 37;
    const aad = Buffer.alloc(9 + 4 + Buffer.byteLength(ROW));
    envelope.copy(aad, 0, 0, 9);
    aad.writeUInt32BE(COLUMN, 9);
    aad.write(ROW, 13, 'utf8');
    const decipher = dataKey.use((key) =>
      createDecipheriv('aes-256-gcm', key, envelope.subarray(9, 21), { authTagLength: 16 }),
    );
    decipher.setAAD(aad);
    decipher.setAuthTag(envelope.subarray(21 + n));
    const reference = Buffer.concat([decipher.update(envelope.subarray(21, 21 + n)), decipher.final()]);
    const sha = (b: Buffer): string => createHash('sha256').update(b).digest('hex');
    expect(sha(reference)).toBe(sha(plaintext));
  });
});

describe('IvPool', () => {
  it('never hands out the same IV twice, across refills', () => {
    const small = new IvPool(12 * 4);
    const seen = new Set<string>();
    const handedOut: Buffer[] = [];
    for (let i = 0; i < 100; i++) {
      const iv = small.next();
      expect(iv.length).toBe(12);
      handedOut.push(iv);
      seen.add(iv.toString('hex'));
    }
    expect(seen.size).toBe(100);
    // A refill allocates a new pool: IVs already handed out keep their bytes.
    expect(new Set(handedOut.map((iv) => iv.toString('hex'))).size).toBe(100);
  });
});
