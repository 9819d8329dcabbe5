// Root key material checks and key check values (DESIGN.md "Key hierarchy"; case C01).
// Keys are generated at test time or built programmatically: no key literals.
import { createHmac, randomBytes } from 'node:crypto';
import { describe, expect, it } from 'vitest';
import {
  SecretBytes,
  WeakKeyError,
  fingerprint,
  generateKey,
  parseKeyHex,
  validateKeyMaterial,
} from '../../src/crypto/index.js';

const LABEL = 'KEYRING_ENCRYPT_KEYS[1]';

function weakKeyError(fn: () => unknown): WeakKeyError {
  try {
    fn();
  } catch (err) {
    expect(err).toBeInstanceOf(WeakKeyError);
    return err as WeakKeyError;
  }
  throw new Error('expected a WeakKeyError, but the key was accepted');
}

// 15 distinct non-printable bytes in an order with no period <= 16.
function fifteenDistinctBytes(): Buffer {
  const ramp = Array.from({ length: 15 }, (_, i) => i);
  return Buffer.from([...ramp, ...ramp.reverse(), 0, 1].map((b) => 0x80 + b));
}

function repeated(unit: Buffer): Buffer {
  return Buffer.alloc(32, unit);
}

describe('validateKeyMaterial', () => {
  const weak: [string, Buffer, string][] = [
    ['31 bytes', randomBytes(31), 'KEY_WRONG_LENGTH'],
    ['33 bytes', randomBytes(33), 'KEY_WRONG_LENGTH'],
    ['all zero', Buffer.alloc(32), 'KEY_ALL_ZERO'],
    ['one letter repeated', Buffer.from('a'.repeat(32)), 'KEY_PRINTABLE'],
    ['a passphrase', Buffer.from('correct horse battery staple 123'), 'KEY_PRINTABLE'],
    ['one byte repeated', Buffer.alloc(32, 0xff), 'KEY_REPEATED_PATTERN'],
    ['01020304 repeated', repeated(Buffer.from([1, 2, 3, 4])), 'KEY_REPEATED_PATTERN'],
    ['16 random bytes twice', repeated(Buffer.concat([Buffer.from([0xff]), randomBytes(15)])), 'KEY_REPEATED_PATTERN'],
    ['15 distinct byte values', fifteenDistinctBytes(), 'KEY_LOW_ENTROPY'],
  ];

  it.each(weak)('refuses %s with its code, naming the label but not the key', (_, material, code) => {
    const keyHex = material.toString('hex');
    const err = weakKeyError(() => validateKeyMaterial(material, LABEL));
    expect(err.code).toBe(code);
    expect(err.label).toBe(LABEL);
    expect(err.message).toContain(LABEL);
    expect(err.message).toContain('keyring keygen');
    expect(err.message.toLowerCase()).not.toContain(keyHex);
    expect(err.message).not.toContain(material.toString('latin1'));
  });

  it('accepts 32 random bytes', () => {
    expect(() => validateKeyMaterial(randomBytes(32), LABEL)).not.toThrow();
  });
});

describe('parseKeyHex', () => {
  it('accepts either case and surrounding whitespace', () => {
    const bytes = randomBytes(32);
    const parsed = parseKeyHex(`  ${bytes.toString('hex').toUpperCase()}\n`, LABEL);
    expect(parsed.equals(SecretBytes.from(Buffer.from(bytes)))).toBe(true);
  });

  it('refuses non-hex and wrong-length input without quoting it', () => {
    const notHex = `${randomBytes(31).toString('hex')}zz`;
    const notHexErr = weakKeyError(() => parseKeyHex(notHex, LABEL));
    expect(notHexErr.code).toBe('KEY_NOT_HEX');
    expect(notHexErr.message).not.toContain(notHex);

    const short = randomBytes(31).toString('hex');
    const shortErr = weakKeyError(() => parseKeyHex(short, LABEL));
    expect(shortErr.code).toBe('KEY_WRONG_LENGTH');
    expect(shortErr.message).toContain(LABEL);
    expect(shortErr.message).not.toContain(short);
  });

  it('applies the weak-material checks to decoded bytes', () => {
    expect(weakKeyError(() => parseKeyHex(Buffer.alloc(32).toString('hex'), LABEL)).code).toBe('KEY_ALL_ZERO');
    const printable = Buffer.from('p'.repeat(32)).toString('hex');
    expect(weakKeyError(() => parseKeyHex(printable, LABEL)).code).toBe('KEY_PRINTABLE');
  });
});

describe('generateKey', () => {
  it('draws 32 bytes that pass validation, different each time', () => {
    const a = generateKey();
    const b = generateKey();
    expect(a.length).toBe(32);
    a.use((bytes) => expect(() => validateKeyMaterial(bytes, 'a')).not.toThrow());
    expect(a.equals(b)).toBe(false);
  });
});

describe('fingerprint (key check value)', () => {
  it('is 32 lowercase hex chars, stable, purpose-separated and key-specific', () => {
    const bytes = randomBytes(32);
    const key = SecretBytes.from(Buffer.from(bytes));
    const same = SecretBytes.from(Buffer.from(bytes));
    const encrypt = fingerprint(key, 'encrypt');
    expect(encrypt).toMatch(/^[0-9a-f]{32}$/);
    expect(fingerprint(same, 'encrypt')).toBe(encrypt);
    expect(fingerprint(key, 'index')).not.toBe(encrypt);
    expect(fingerprint(generateKey(), 'encrypt')).not.toBe(encrypt);
    expect(encrypt).not.toBe(bytes.subarray(0, 16).toString('hex'));
  });

  it('is HMAC-SHA-256(key, "keyring/kcv/1/" + purpose) truncated to 16 bytes', () => {
    const bytes = randomBytes(32);
    const expected = createHmac('sha256', bytes).update('keyring/kcv/1/index').digest().subarray(0, 16);
    expect(fingerprint(SecretBytes.from(bytes), 'index')).toBe(expected.toString('hex'));
  });
});
