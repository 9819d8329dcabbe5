// Ciphertext format 1 (DESIGN.md "Ciphertext (bytea), format 1"):
//
//   offset 0     1 byte   format = 0x01
//   offset 1     8 bytes  data key id, uint64 big-endian
//   offset 9     12 bytes IV
//   offset 21    n bytes  AES-256-GCM ciphertext
//   offset 21+n  16 bytes tag
//   AAD = bytes 0..8 || uint32 BE column id || canonical row key (UTF-8)
//
// The header is in the AAD, so changing the key id or format byte fails
// authentication; the column id and row key bind a value to its place, so a
// ciphertext copied to another row or column fails too.

import { GCM_IV_BYTES, GCM_TAG_BYTES, gcmOpen, gcmSeal, type IvPool } from './aead.js';
import { DecryptError, requireUint } from './errors.js';
import type { SecretBytes } from './secret.js';

export const FORMAT_V1 = 0x01;
export const HEADER_BYTES = 9;
const IV_OFFSET = HEADER_BYTES;
const BODY_OFFSET = IV_OFFSET + GCM_IV_BYTES; // 21
/** Envelope bytes added to the plaintext: 1 + 8 + 12 + 16. */
export const OVERHEAD = BODY_OFFSET + GCM_TAG_BYTES; // 37

/**
 * AAD of a format-1 value. The row key is the only variable-length field and
 * comes last, so the concatenation is unambiguous without a length prefix.
 */
export function buildAad(dataKeyId: bigint, columnId: number, rowKey: string): Buffer {
  requireUint(dataKeyId, 64, 'data key id');
  requireUint(columnId, 32, 'column id');
  const aad = Buffer.allocUnsafe(HEADER_BYTES + 4 + Buffer.byteLength(rowKey, 'utf8'));
  aad[0] = FORMAT_V1;
  aad.writeBigUInt64BE(dataKeyId, 1);
  aad.writeUInt32BE(columnId, HEADER_BYTES);
  aad.write(rowKey, HEADER_BYTES + 4, 'utf8');
  return aad;
}

/** Encrypts one field value into a format-1 envelope of exactly OVERHEAD + plaintext.length bytes. */
export function sealValue(
  dataKey: SecretBytes,
  dataKeyId: bigint,
  columnId: number,
  rowKey: string,
  plaintext: Buffer,
  ivPool: IvPool,
): Buffer {
  const aad = buildAad(dataKeyId, columnId, rowKey);
  const iv = ivPool.next();
  const { ciphertext, tag } = gcmSeal(dataKey, iv, plaintext, aad);
  // allocUnsafe is safe here: every byte is written below (header, IV, body, tag).
  const envelope = Buffer.allocUnsafe(OVERHEAD + plaintext.length);
  aad.copy(envelope, 0, 0, HEADER_BYTES);
  iv.copy(envelope, IV_OFFSET);
  ciphertext.copy(envelope, BODY_OFFSET);
  tag.copy(envelope, BODY_OFFSET + ciphertext.length);
  return envelope;
}

/**
 * The data key id in the header, read without any key (the TS twin of SQL
 * `keyring.data_key_id(bytea)`). Unauthenticated until openValue succeeds.
 */
export function readDataKeyId(envelope: Buffer): bigint {
  if (envelope.length < OVERHEAD || envelope[0] !== FORMAT_V1) {
    throw new DecryptError('format');
  }
  return envelope.readBigUInt64BE(1);
}

/**
 * Decrypts a format-1 envelope stored at (columnId, rowKey). Any problem
 * (not an envelope, wrong key, tampered bytes, value moved from another row or
 * column) throws the same DecryptError; never returns unauthenticated bytes.
 */
export function openValue(dataKey: SecretBytes, columnId: number, rowKey: string, envelope: Buffer): Buffer {
  const aad = buildAad(readDataKeyId(envelope), columnId, rowKey);
  const tagOffset = envelope.length - GCM_TAG_BYTES;
  return gcmOpen(
    dataKey,
    envelope.subarray(IV_OFFSET, BODY_OFFSET),
    envelope.subarray(BODY_OFFSET, tagOffset),
    envelope.subarray(tagOffset),
    aad,
  );
}

/**
 * True when `plaintext` could itself be a format-1 envelope. Callers assert
 * this is false for every decrypted value: encryption is exactly one layer,
 * so a value that still looks like an envelope means a nested or
 * passed-through ciphertext (case C02).
 */
export function looksLikeEnvelope(plaintext: Buffer): boolean {
  return plaintext.length >= OVERHEAD && plaintext[0] === FORMAT_V1;
}
