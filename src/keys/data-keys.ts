/**
 * Data keys: created on demand under the active encrypt root, unwrapped only in this
 * process, cached in a bounded LRU and zeroed on eviction.
 */
import type pg from 'pg';
import { DecryptError, generateKey, unwrapDataKey, wrapDataKey, type IvPool, type SecretBytes } from '../crypto/index.js';
import { selectActiveDataKeys, type DataKeyRow } from '../db/queries/active-data-keys.js';
import { insertDataKey, nextDataKeyId, retireDataKey } from '../db/queries/insert-data-key.js';
import { selectDataKeys } from '../db/queries/select-data-keys.js';
import { DataKeyShreddedError, KeyUnavailableError } from './errors.js';
import { SecretLru } from './lru.js';
import type { RootKeyStore } from './root-keys.js';

/** 2^32: NIST SP 800-38D bound for random 96-bit IVs under one key (keyring.settings overrides). */
export const DEFAULT_MAX_ENCRYPTIONS = 2n ** 32n;

export interface DataKey {
  readonly id: bigint;
  readonly rootVersion: number;
  readonly key: SecretBytes;
}

/** A (column, subject) scope and how many values a batch will encrypt under it. */
export interface KeyDemand {
  readonly columnId: number;
  readonly subject: string | null;
  readonly count: number;
}

export const scopeOf = (columnId: number, subject: string | null): string =>
  subject === null ? `${columnId}` : `${columnId}:${subject}`;

export interface DataKeyCacheOptions {
  readonly capacity: number;
  readonly rootKeys: () => RootKeyStore;
  /** Runs `fn` on its own connection in autocommit, so a created key is committed at once. */
  readonly autocommit: <T>(fn: (client: pg.ClientBase) => Promise<T>) => Promise<T>;
  readonly ivPool: IvPool;
  readonly maxEncryptions?: () => bigint;
  /** A data key row did not unwrap under its (matching) root key: the row was altered. For the audit log. */
  readonly onUnwrapFailure?: (f: { readonly dataKeyId: bigint; readonly columnId: number; readonly rootVersion: number }) => void;
}

export class DataKeyCache {
  readonly #lru: SecretLru<DataKey>;
  readonly #o: DataKeyCacheOptions;

  constructor(o: DataKeyCacheOptions) {
    this.#o = o;
    this.#lru = new SecretLru<DataKey>(o.capacity, (k) => k.key.dispose());
  }

  /**
   * The active data key of every demanded scope, read through `client` (the batch's
   * transaction). Missing keys are created, and keys that would pass the encryption
   * bound or are wrapped by a disabled root version are retired and replaced, each in
   * its own committed transaction: a key that sealed a value must exist even if the
   * batch rolls back and is retried. (A disabled root is suspected leaked, and with it
   * every data key it wrapped: no new value is sealed under one.)
   */
  async activeKeys(client: pg.ClientBase, demands: readonly KeyDemand[]): Promise<Map<string, DataKey>> {
    const rows = await selectActiveDataKeys(client, demands.map((d) => d.columnId), demands.map((d) => d.subject));
    const byScope = new Map(rows.map((r) => [scopeOf(r.column_id, r.subject), r]));
    const max = this.#o.maxEncryptions?.() ?? DEFAULT_MAX_ENCRYPTIONS;
    const out = new Map<string, DataKey>();
    for (const d of demands) {
      const scope = scopeOf(d.columnId, d.subject);
      let row = byScope.get(scope);
      if (row && (BigInt(row.encryptions) + BigInt(d.count) > max || this.#rootDisabled(row.root_version))) {
        const full = row;
        await this.#o.autocommit((c) => retireDataKey(c, BigInt(full.id)));
        row = undefined;
      }
      out.set(scope, row ? this.#fromRow(row) : await this.#create(d.columnId, d.subject));
    }
    return out;
  }

  /**
   * Data keys by id, for decryption. The rows are always read (one query), so a key
   * shredded by another process is refused even when this cache still holds it.
   * KEY_UNAVAILABLE when the root version is not held here, or is disabled (its data
   * keys serve re-encryption jobs only: pass `allowDisabledRoot`), DATA_KEY_SHREDDED
   * when gone.
   */
  async byIds(client: pg.ClientBase, ids: readonly bigint[], opts: { allowDisabledRoot?: boolean } = {}): Promise<Map<bigint, DataKey>> {
    const out = new Map<bigint, DataKey>();
    const unique = [...new Set(ids)];
    for (const row of await selectDataKeys(client, unique)) {
      if (!opts.allowDisabledRoot && this.#rootDisabled(row.root_version)) {
        throw new KeyUnavailableError(`data key ${row.id} is wrapped by encrypt root key version ${row.root_version}, which is disabled; ` +
          'its values are decrypted only by re-encryption jobs');
      }
      out.set(BigInt(row.id), this.#fromRow(row));
    }
    for (const id of unique) {
      if (!out.has(id)) throw new KeyUnavailableError(`data key ${id} does not exist`);
    }
    return out;
  }

  /**
   * byIds for a re-encryption range: one query for every id, and per id the key or why it
   * is refused (DataKeyShreddedError, KeyUnavailableError) instead of one throw for all.
   * Disabled roots are allowed (re-encryption is what moves values off them).
   */
  async byIdsSettled(client: pg.ClientBase, ids: readonly bigint[]): Promise<Map<bigint, DataKey | DataKeyShreddedError | KeyUnavailableError>> {
    const out = new Map<bigint, DataKey | DataKeyShreddedError | KeyUnavailableError>();
    const unique = [...new Set(ids)];
    if (unique.length === 0) return out;
    for (const row of await selectDataKeys(client, unique)) {
      try {
        out.set(BigInt(row.id), this.#fromRow(row));
      } catch (err) {
        if (!(err instanceof DataKeyShreddedError || err instanceof KeyUnavailableError)) throw err;
        out.set(BigInt(row.id), err);
      }
    }
    for (const id of unique) {
      if (!out.has(id)) out.set(id, new KeyUnavailableError(`data key ${id} does not exist`));
    }
    return out;
  }

  /** The per-key encryption bound in force (keyring.settings data_key_max_encryptions). */
  get maxEncryptions(): bigint {
    return this.#o.maxEncryptions?.() ?? DEFAULT_MAX_ENCRYPTIONS;
  }

  /** Zeroes evicted keys; called between batches (see SecretLru). */
  trim(): void {
    this.#lru.trim();
  }

  /** Zeroes every cached key (shutdown, or after the root key set changed). */
  clear(): void {
    this.#lru.clear();
  }

  get size(): number {
    return this.#lru.size;
  }

  #rootDisabled(version: number): boolean {
    return this.#o.rootKeys().stateOf('encrypt', version) === 'disabled';
  }

  #fromRow(row: DataKeyRow): DataKey {
    const id = BigInt(row.id);
    if (row.wrapped === null || row.state === 'shredded') {
      this.#lru.delete(row.id);
      throw new DataKeyShreddedError(id);
    }
    const cached = this.#lru.get(row.id);
    // A rewrap changes root_version but not the key bytes: the cached key stays valid.
    if (cached) return cached;
    const root = this.#o.rootKeys().require('encrypt', row.root_version);
    let key: SecretBytes;
    try {
      key = unwrapDataKey(root.key, row.root_version, id, row.wrapped);
    } catch (err) {
      if (!(err instanceof DecryptError)) throw err;
      this.#o.onUnwrapFailure?.({ dataKeyId: id, columnId: row.column_id, rootVersion: row.root_version });
      // The root material matched its fingerprint, so the data_keys row itself is wrong
      // (altered bytes or id). Retryable, not a value failure: the queued plaintexts
      // must not be quarantined (and lost) because a key row is bad.
      throw new KeyUnavailableError(`data key ${id} does not unwrap under ${root.label}'s version ${row.root_version}: the keyring.data_keys row was altered`);
    }
    const dk = { id, rootVersion: row.root_version, key };
    this.#lru.set(row.id, dk);
    return dk;
  }

  async #create(columnId: number, subject: string | null): Promise<DataKey> {
    const root = this.#o.rootKeys().active('encrypt');
    return this.#o.autocommit(async (c) => {
      const id = await nextDataKeyId(c);
      const key = generateKey();
      const wrapped = wrapDataKey(root.key, root.version, id, key, this.#o.ivPool);
      if (await insertDataKey(c, { id, columnId, subject, rootVersion: root.version, wrapped })) {
        const dk = { id, rootVersion: root.version, key };
        this.#lru.set(id.toString(), dk);
        return dk;
      }
      // Another sidecar created this scope's key first: use the winner, drop ours.
      key.dispose();
      const [winner] = await selectActiveDataKeys(c, [columnId], [subject]);
      // Or the insert was refused: the registry changed and root.version is no longer active.
      if (!winner) throw new KeyUnavailableError(`no active data key for column ${columnId} after creating one (encrypt root key version ${root.version} may no longer be active); retrying`);
      return this.#fromRow(winner);
    });
  }
}
