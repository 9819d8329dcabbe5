import { createHmac, randomFillSync } from 'node:crypto';
import { WeakKeyError } from './errors.js';
import { SecretBytes } from './secret.js';

export type KeyPurpose = 'encrypt' | 'index';

/** Root keys are AES-256 / HMAC-SHA-256 keys: 32 bytes. */
export const KEY_BYTES = 32;

// A uniformly random 32-byte key has on average 30.1 distinct byte values
// (256 * (1 - (255/256)^32)); fewer than 16 happens with probability
// 3.2e-17 (about 2^-55, exact count via Stirling numbers). Below that bound the
// material was not drawn from a CSPRNG.
const MIN_DISTINCT_BYTES = 16;

// Longest period checked for repetition: half the key. Any longer period
// would not repeat within 32 bytes.
const MAX_PATTERN_PERIOD = KEY_BYTES / 2;

const HEX_RE = /^[0-9a-fA-F]*$/;

/**
 * Refuses material that cannot be 32 CSPRNG bytes: wrong length, all zero,
 * printable text (a pasted passphrase; (95/256)^32 = 2^-45.8 for random
 * bytes), a repeated pattern of period 1..16, or fewer than 16 distinct
 * bytes. Throws WeakKeyError naming `label`; the key is never quoted.
 */
export function validateKeyMaterial(buf: Buffer, label: string): void {
  if (buf.length !== KEY_BYTES) {
    throw new WeakKeyError('KEY_WRONG_LENGTH', label, `got ${buf.length} bytes`);
  }
  if (buf.every((b) => b === 0)) {
    throw new WeakKeyError('KEY_ALL_ZERO', label);
  }
  if (buf.every((b) => b >= 0x20 && b <= 0x7e)) {
    throw new WeakKeyError('KEY_PRINTABLE', label);
  }
  const period = repetitionPeriod(buf);
  if (period !== undefined) {
    throw new WeakKeyError('KEY_REPEATED_PATTERN', label, `repeats every ${period} bytes`);
  }
  if (new Set(buf).size < MIN_DISTINCT_BYTES) {
    throw new WeakKeyError('KEY_LOW_ENTROPY', label);
  }
}

/** The smallest p in 1..16 with buf[i] === buf[i + p] for every i, if any. */
function repetitionPeriod(buf: Buffer): number | undefined {
  for (let p = 1; p <= MAX_PATTERN_PERIOD; p++) {
    let repeats = true;
    for (let i = p; i < buf.length && repeats; i++) {
      repeats = buf[i] === buf[i - p];
    }
    if (repeats) return p;
  }
  return undefined;
}

/**
 * Parses a 64-character hex key (surrounding whitespace ignored, either case)
 * and validates it. The decoded bytes are moved into a SecretBytes; the hex
 * string itself is a JS string and cannot be zeroed, so callers should drop it.
 */
export function parseKeyHex(hex: string, label: string): SecretBytes {
  const text = hex.trim();
  if (!HEX_RE.test(text)) {
    throw new WeakKeyError('KEY_NOT_HEX', label);
  }
  if (text.length !== KEY_BYTES * 2) {
    throw new WeakKeyError('KEY_WRONG_LENGTH', label, `got ${text.length} hex characters`);
  }
  const bytes = Buffer.from(text, 'hex');
  try {
    validateKeyMaterial(bytes, label);
    return SecretBytes.from(bytes);
  } finally {
    bytes.fill(0);
  }
}

/** 32 bytes from the CSPRNG; re-drawn in the (< 2^-45) case that validation refuses them. */
export function generateKey(): SecretBytes {
  const bytes = Buffer.alloc(KEY_BYTES);
  for (;;) {
    randomFillSync(bytes);
    try {
      validateKeyMaterial(bytes, 'generated key');
      return SecretBytes.from(bytes);
    } catch (err) {
      if (!(err instanceof WeakKeyError)) throw err;
    }
  }
}

/**
 * Key check value stored in `keyring.root_keys.fingerprint`, so a sidecar can
 * tell which version a key is (and that material matches) without trial
 * decryption of user data (case C01).
 *
 * HMAC-SHA-256(key, "keyring/kcv/1/" + purpose), first 16 bytes, lowercase hex.
 * HMAC is a PRF: the value reveals nothing about the key beyond allowing a
 * guess to be checked; 128 bits put accidental matches between distinct keys
 * at the birthday bound of 2^64 keys. The purpose is in the label so the
 * same bytes loaded as an encrypt key and as an index key give unlinkable
 * fingerprints.
 */
export function fingerprint(key: SecretBytes, purpose: KeyPurpose): string {
  return createHmac('sha256', key.keyObject())
    .update(`keyring/kcv/1/${purpose}`, 'ascii')
    .digest()
    .subarray(0, 16)
    .toString('hex');
}
