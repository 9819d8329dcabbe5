// Errors of the crypto core. Every class carries a stable `code` that callers
// (CLI, sidecar, metrics) switch on; messages are for humans and never contain
// key material, plaintext or ciphertext bytes.

export class KeyringError extends Error {
  readonly code: string;

  constructor(code: string, message: string) {
    super(message);
    this.name = 'KeyringError';
    this.code = code;
  }
}

/** Why a decryption failed. Internal classification for audit and metrics; never shown to a caller. */
export type DecryptFailureReason = 'format' | 'auth' | 'length';

const DECRYPT_MESSAGE =
  'keyring: value could not be decrypted (wrong key, tampered, or moved ciphertext)';

/**
 * Every failed decryption is this one error with this one message, whatever
 * went wrong (bad header, wrong key, flipped bit, value moved to another row):
 * a distinguishable failure would be an oracle for an attacker who can write
 * ciphertext. `reason` is for the audit log only.
 */
export class DecryptError extends KeyringError {
  readonly reason: DecryptFailureReason | undefined;

  constructor(reason?: DecryptFailureReason) {
    super('DECRYPT_FAILED', DECRYPT_MESSAGE);
    this.name = 'DecryptError';
    this.reason = reason;
  }
}

export type WeakKeyCode =
  | 'KEY_WRONG_LENGTH'
  | 'KEY_ALL_ZERO'
  | 'KEY_PRINTABLE'
  | 'KEY_REPEATED_PATTERN'
  | 'KEY_LOW_ENTROPY'
  | 'KEY_NOT_HEX';

const WEAK_KEY_PROBLEM: Record<WeakKeyCode, string> = {
  KEY_WRONG_LENGTH: 'is not 32 bytes (64 hex characters)',
  KEY_ALL_ZERO: 'is all zero bytes',
  KEY_PRINTABLE: 'consists only of printable characters (a passphrase or text, not random bytes)',
  KEY_REPEATED_PATTERN: 'is a short repeated pattern, not random bytes',
  KEY_LOW_ENTROPY: 'uses too few distinct byte values to be random',
  KEY_NOT_HEX: 'is not hexadecimal (expected 64 characters 0-9, a-f)',
};

/**
 * Key material that is not 32 random bytes. The message names the key by its
 * label (e.g. "KEYRING_ENCRYPT_KEYS[1]") and says what to do; it never quotes
 * the key. `detail` may add a measurement such as a length, never key bytes.
 */
export class WeakKeyError extends KeyringError {
  readonly label: string;

  constructor(code: WeakKeyCode, label: string, detail?: string) {
    const suffix = detail === undefined ? '' : `: ${detail}`;
    super(
      code,
      `keyring: key ${label} ${WEAK_KEY_PROBLEM[code]}${suffix}; ` +
        'generate one with `keyring keygen`',
    );
    this.name = 'WeakKeyError';
    this.label = label;
  }
}

/** A size or numeric parameter outside what format 1 supports (key, IV, tag, ids, versions). */
export class UnsupportedParameterError extends KeyringError {
  constructor(message: string) {
    super('UNSUPPORTED_PARAMETER', `keyring: ${message}`);
    this.name = 'UnsupportedParameterError';
  }
}

const BIGINT_LIMITS = { 16: 1n << 16n, 32: 1n << 32n, 64: 1n << 64n } as const;

/**
 * Checks that an id, version or size fits the unsigned big-endian field of
 * `bits` bits it is written to; Buffer's own RangeError would not say which.
 */
export function requireUint(value: number | bigint, bits: 16 | 32 | 64, what: string): void {
  const fits =
    typeof value === 'bigint'
      ? value >= 0n && value < BIGINT_LIMITS[bits]
      : Number.isSafeInteger(value) && value >= 0 && value < 2 ** bits;
  if (!fits) {
    throw new UnsupportedParameterError(`${what} must be an integer in 0..2^${bits}-1`);
  }
}
