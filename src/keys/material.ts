import type { KeyPurpose, SecretBytes } from '../crypto/index.js';

/** One root key as configured, with the label that names it in messages (never its bytes). */
export interface LabeledKey {
  /** Where the key came from, e.g. `KEYRING_ENCRYPT_KEYS[2]` or `KEYRING_KEY_FILE encrypt[0]`. */
  readonly label: string;
  readonly key: SecretBytes;
}

/**
 * Root key material handed to the sidecar, per purpose, in any order: the version of
 * each key is found by its fingerprint in keyring.root_keys, never by position.
 */
export interface RootKeyMaterial {
  readonly source: 'env' | 'file';
  readonly encrypt: readonly LabeledKey[];
  readonly index: readonly LabeledKey[];
}

export const KEY_PURPOSES: readonly KeyPurpose[] = ['encrypt', 'index'];

/** Zeroes every key of `material` (on shutdown, or when a start is refused). */
export function disposeMaterial(material: RootKeyMaterial): void {
  for (const p of KEY_PURPOSES) for (const k of material[p]) k.key.dispose();
}
