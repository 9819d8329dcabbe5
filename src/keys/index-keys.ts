/**
 * Blind-index keys, one per (index root version, column, tenant scope), derived with
 * HKDF from the index root and cached in a bounded LRU (zeroed on eviction).
 */
import { deriveIndexKey, type SecretBytes } from '../crypto/index.js';
import { SecretLru } from './lru.js';
import type { RootKeyStore } from './root-keys.js';

export interface IndexKey {
  readonly version: number;
  readonly key: SecretBytes;
}

export class IndexKeyCache {
  readonly #lru: SecretLru<SecretBytes>;
  readonly #rootKeys: () => RootKeyStore;

  constructor(capacity: number, rootKeys: () => RootKeyStore) {
    this.#lru = new SecretLru<SecretBytes>(capacity, (k) => k.dispose());
    this.#rootKeys = rootKeys;
  }

  /** The key of the ACTIVE index root version; KEY_UNAVAILABLE when none is active or held. */
  active(columnId: number, tenant: string | null): IndexKey {
    return this.forVersion(this.#rootKeys().active('index').version, columnId, tenant);
  }

  /** The key of one index root version (lookups compute a term for every live version). */
  forVersion(version: number, columnId: number, tenant: string | null): IndexKey {
    // '\0' cannot occur in a Postgres text value, so the id cannot collide across tenants.
    const id = `${version}\0${columnId}\0${tenant === null ? '\0' : `t${tenant}`}`;
    let key = this.#lru.get(id);
    if (key === undefined) {
      key = deriveIndexKey(this.#rootKeys().require('index', version).key, columnId, tenant);
      this.#lru.set(id, key);
    }
    return { version, key };
  }

  trim(): void {
    this.#lru.trim();
  }

  clear(): void {
    this.#lru.clear();
  }
}
