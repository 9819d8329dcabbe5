import { createCipheriv, createDecipheriv, randomFillSync } from 'node:crypto';
import { DecryptError, UnsupportedParameterError } from './errors.js';
import type { SecretBytes } from './secret.js';

// AES-256-GCM with the only parameters format 1 allows. 96-bit IVs are used
// as the counter block directly (NIST SP 800-38D §7.1); any other length goes
// through GHASH and is where implementations break (Wycheproof CounterWrap,
// LongIv, ZeroLengthIv). A full 128-bit tag: shorter tags lose forgery
// resistance (SP 800-38D Appendix C).
const ALGORITHM = 'aes-256-gcm';
export const GCM_KEY_BYTES = 32;
export const GCM_IV_BYTES = 12;
export const GCM_TAG_BYTES = 16;

function checkKeyAndIv(key: SecretBytes, iv: Buffer): void {
  if (key.length !== GCM_KEY_BYTES) {
    throw new UnsupportedParameterError(`AES-GCM key must be ${GCM_KEY_BYTES} bytes, got ${key.length}`);
  }
  if (iv.length !== GCM_IV_BYTES) {
    throw new UnsupportedParameterError(`AES-GCM IV must be ${GCM_IV_BYTES} bytes, got ${iv.length}`);
  }
}

/**
 * Encrypts and authenticates `plaintext` and `aad`. The caller guarantees the
 * IV is never reused under the same key (use IvPool: random 96-bit IVs are
 * safe for 2^32 encryptions per key, NIST SP 800-38D §8.3).
 */
export function gcmSeal(
  key: SecretBytes,
  iv: Buffer,
  plaintext: Buffer,
  aad: Buffer,
): { ciphertext: Buffer; tag: Buffer } {
  checkKeyAndIv(key, iv);
  const cipher = createCipheriv(ALGORITHM, key.keyObject(), iv, { authTagLength: GCM_TAG_BYTES });
  cipher.setAAD(aad);
  const ciphertext = cipher.update(plaintext);
  cipher.final(); // GCM is a stream mode: final() emits no bytes
  return { ciphertext, tag: cipher.getAuthTag() };
}

/**
 * Returns the plaintext only if the tag authenticates ciphertext and aad under
 * key and iv; otherwise throws DecryptError, whatever the cause. Unsupported
 * sizes throw UnsupportedParameterError: Node accepts 4..16-byte tags in
 * setAuthTag unless authTagLength is fixed, which would let a truncated tag
 * be forged with 2^32 tries.
 */
export function gcmOpen(key: SecretBytes, iv: Buffer, ciphertext: Buffer, tag: Buffer, aad: Buffer): Buffer {
  checkKeyAndIv(key, iv);
  if (tag.length !== GCM_TAG_BYTES) {
    throw new UnsupportedParameterError(`AES-GCM tag must be ${GCM_TAG_BYTES} bytes, got ${tag.length}`);
  }
  let plaintext: Buffer | undefined;
  try {
    const decipher = createDecipheriv(ALGORITHM, key.keyObject(), iv, { authTagLength: GCM_TAG_BYTES });
    decipher.setAAD(aad);
    decipher.setAuthTag(tag);
    plaintext = decipher.update(ciphertext);
    decipher.final(); // throws when the tag does not verify
    return plaintext;
  } catch {
    // update() already produced unauthenticated plaintext: never let it escape.
    plaintext?.fill(0);
    throw new DecryptError('auth');
  }
}

// 5461 IVs per refill: one randomFillSync call per 64 KiB instead of one
// randomBytes call per value (DESIGN.md: ~250k vs ~110k encryptions/s/core).
const POOL_BYTES = Math.floor((64 * 1024) / GCM_IV_BYTES) * GCM_IV_BYTES;

/**
 * Hands out random 12-byte IVs from a pooled CSPRNG buffer. IVs are public, so
 * drawing them ahead of use exposes nothing. Each IV is a subarray of the pool
 * (no copy) and is handed out once: a refill allocates a new pool rather than
 * overwriting the old one, which IVs already handed out still point into.
 */
export class IvPool {
  readonly #poolBytes: number;
  #pool: Buffer;
  #offset: number;

  constructor(poolBytes: number = POOL_BYTES) {
    if (!Number.isInteger(poolBytes) || poolBytes < GCM_IV_BYTES) {
      throw new UnsupportedParameterError(`IV pool must hold at least one IV, got ${poolBytes} bytes`);
    }
    this.#poolBytes = poolBytes - (poolBytes % GCM_IV_BYTES);
    this.#pool = Buffer.alloc(0);
    this.#offset = 0;
  }

  next(): Buffer {
    if (this.#offset + GCM_IV_BYTES > this.#pool.length) {
      this.#pool = randomFillSync(Buffer.allocUnsafeSlow(this.#poolBytes));
      this.#offset = 0;
    }
    const iv = this.#pool.subarray(this.#offset, this.#offset + GCM_IV_BYTES);
    this.#offset += GCM_IV_BYTES;
    return iv;
  }
}
