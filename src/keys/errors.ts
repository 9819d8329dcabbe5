import { KeyringError } from '../crypto/index.js';

/** One registered root key version that no configured key matches. */
export interface MissingKey {
  readonly purpose: 'encrypt' | 'index';
  readonly version: number;
  readonly state: string;
  readonly fingerprint: string;
}

/**
 * The database registers a root key version that a value may depend on (state active,
 * decrypt_only or disabled), and the configured material has no key with its
 * fingerprint: the key was lost, or different bytes were supplied under the same name
 * (case C01). Starting would strand or corrupt data, so the start is refused.
 */
export class KeyMissingError extends KeyringError {
  readonly missing: readonly MissingKey[];

  constructor(missing: readonly MissingKey[], unknownLabels: readonly string[]) {
    const list = missing
      .map((m) => `${m.purpose} root key version ${m.version} (${m.state}, fingerprint ${m.fingerprint})`)
      .join(', ');
    const unknown = unknownLabels.length === 0
      ? 'no configured key has an unregistered fingerprint'
      : `configured keys with unregistered fingerprints (wrong material if meant as these versions): ${unknownLabels.join(', ')}`;
    super(
      'KEY_MISSING',
      `keyring: key material missing for ${list}; ${unknown}. ` +
        'Supply the original key (KEYRING_ENCRYPT_KEYS / KEYRING_INDEX_KEYS or KEYRING_KEY_FILE) and restart; ' +
        'nothing was registered or encrypted.',
    );
    this.name = 'KeyMissingError';
    this.missing = missing;
  }
}

/** The sidecar holds no usable encrypt root key at all: it could never encrypt anything. */
export class NoKeysError extends KeyringError {
  constructor(message: string) {
    super('KEY_NONE', `keyring: ${message}`);
    this.name = 'NoKeysError';
  }
}

/**
 * A data key (or root key version) is needed that this process cannot use right now:
 * the root version's material is not held here, or no version is active. Retryable —
 * another sidecar, or this one after a key reload, can do the work. Never a
 * DecryptError: the value is not known to be bad.
 */
export class KeyUnavailableError extends KeyringError {
  constructor(message: string) {
    super('KEY_UNAVAILABLE', `keyring: ${message}`);
    this.name = 'KeyUnavailableError';
  }
}

/** The data key was shredded (crypto-shredding): the values it protected are gone for good. */
export class DataKeyShreddedError extends KeyringError {
  readonly dataKeyId: bigint;

  constructor(dataKeyId: bigint) {
    super('DATA_KEY_SHREDDED', `keyring: data key ${dataKeyId} was shredded; its values cannot be decrypted`);
    this.name = 'DataKeyShreddedError';
    this.dataKeyId = dataKeyId;
  }
}
