import { hkdfSync } from 'node:crypto';
import { UnsupportedParameterError } from './errors.js';
import { SecretBytes } from './secret.js';

const SHA256_BYTES = 32;
// RFC 5869 §2.3: L <= 255 * HashLen. Longer output would repeat the counter
// byte and give colliding output blocks (Wycheproof SizeTooLarge).
export const HKDF_SHA256_MAX_BYTES = 255 * SHA256_BYTES;
// Node's hkdfSync refuses info longer than 1024 bytes (an OpenSSL limit);
// checked here so the error says so in our words.
export const HKDF_MAX_INFO_BYTES = 1024;

/** HKDF-SHA-256 (RFC 5869) extract-and-expand to `length` bytes. */
export function hkdfSha256(ikm: Buffer | SecretBytes, salt: Buffer, info: Buffer, length: number): Buffer {
  if (!Number.isInteger(length) || length < 1 || length > HKDF_SHA256_MAX_BYTES) {
    throw new UnsupportedParameterError(
      `HKDF-SHA-256 output must be 1..${HKDF_SHA256_MAX_BYTES} bytes, got ${length}`,
    );
  }
  if (info.length > HKDF_MAX_INFO_BYTES) {
    throw new UnsupportedParameterError(
      `HKDF info must be at most ${HKDF_MAX_INFO_BYTES} bytes, got ${info.length}`,
    );
  }
  const derive = (key: Buffer): Buffer => Buffer.from(hkdfSync('sha256', key, salt, info, length));
  return ikm instanceof SecretBytes ? ikm.use(derive) : derive(ikm);
}
