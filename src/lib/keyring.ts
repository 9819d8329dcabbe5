/**
 * The keyring library for applications and tools that hold keys:
 *  - `lookupTerms(column, value)`: blind-index terms for an equality lookup,
 *    `WHERE national_id_bidx = ANY($terms)`, one term per live index key version so a
 *    lookup never misses a row during an index rotation;
 *  - `decrypt…`: the internal decrypt path used by tests, the demo and `keyring verify`.
 *    It never writes plaintext anywhere; an audited reveal for people comes later.
 */
import pg from 'pg';
import {
  blindIndexTerm, IvPool, looksLikeEnvelope, openValue, parseNormalization, readDataKeyId,
  DecryptError, KeyringError,
} from '../crypto/index.js';
import {
  DataKeyCache, IndexKeyCache, KeyUnavailableError, resolveRootKeys, type RootKeyMaterial, type RootKeyStore,
} from '../keys/index.js';
import { isTextType, loadColumn, qualified, quoteIdent, rowKeySql, type ProtectedColumn } from './columns.js';

/** Index versions whose terms may still be stored in rows: every lookup must try them all. */
const LIVE_INDEX_STATES = new Set(['active', 'decrypt_only', 'disabled']);

/** Session settings of the staging triggers: canonical text does not depend on the caller. */
const CANONICAL_SESSION = '-c TimeZone=UTC -c DateStyle=ISO,YMD -c IntervalStyle=postgres -c extra_float_digits=3';

export interface DecryptedValue {
  readonly rowKey: string;
  /** string for text-like types (canonical text, e.g. '2024-03-31 05:30:00+00'), Buffer for bytea, null for NULL. */
  readonly value: string | Buffer | null;
  /** Set when this one value failed: the generic decrypt error, a missing key, or 'pending'. */
  readonly error?: string;
  readonly dataKeyId?: bigint;
}

export interface KeyringOptions {
  readonly databaseUrl: string;
  readonly keys: RootKeyMaterial;
}

export class Keyring {
  readonly #pool: pg.Pool;
  readonly #roots: RootKeyStore;
  readonly #dataKeys: DataKeyCache;
  readonly #indexKeys: IndexKeyCache;

  private constructor(pool: pg.Pool, roots: RootKeyStore) {
    this.#pool = pool;
    this.#roots = roots;
    this.#dataKeys = new DataKeyCache({
      capacity: 256,
      rootKeys: () => this.#roots,
      autocommit: async (fn) => {
        const c = await this.#pool.connect();
        try { return await fn(c); } finally { c.release(); }
      },
      ivPool: new IvPool(),
    });
    this.#indexKeys = new IndexKeyCache(256, () => this.#roots);
  }

  /** Connects and matches the given key material to registered versions (registers nothing). */
  static async open(opts: KeyringOptions): Promise<Keyring> {
    const pool = new pg.Pool({ connectionString: opts.databaseUrl, max: 4, options: CANONICAL_SESSION,
      application_name: 'keyring library' });
    pool.on('error', () => undefined);
    try {
      const client = await pool.connect();
      try {
        return new Keyring(pool, await resolveRootKeys(client, opts.keys, { register: false }));
      } finally {
        client.release();
      }
    } catch (err) {
      await pool.end();
      throw err;
    }
  }

  async close(): Promise<void> {
    this.#dataKeys.clear();
    this.#indexKeys.clear();
    await this.#pool.end();
  }

  /**
   * Blind-index terms of `value` for `column` ('schema.table.column'), one per live index
   * root version: `SELECT … WHERE national_id_bidx = ANY($1)`. Non-text values (dates,
   * numbers) may be given as text; they are cast to the column's type and back to
   * canonical text first, so a lookup matches whatever TZ or format the caller uses.
   */
  async lookupTerms(columnRef: string, value: string | Buffer, opts: { tenant?: string | null } = {}): Promise<Buffer[]> {
    const col = await loadColumn(this.#pool, columnRef);
    if (!col.bidxColumn) {
      throw new KeyringError('NO_BLIND_INDEX', `keyring: ${columnRef} has no blind index; protect it with --blind-index`);
    }
    if (col.tenantColumn && (opts.tenant === undefined || opts.tenant === null)) {
      throw new KeyringError('TENANT_REQUIRED', `keyring: ${columnRef} has tenant-scoped terms; pass { tenant }`);
    }
    const bytes = await this.#canonicalBytes(col, value);
    const spec = parseNormalization(col.normalize);
    const versions = this.#roots.registry
      .filter((r) => r.purpose === 'index' && LIVE_INDEX_STATES.has(r.state))
      .map((r) => r.version);
    if (versions.length === 0) throw new KeyUnavailableError('no index root key version is live');
    return versions.map((v) => {
      const k = this.#indexKeys.forVersion(v, col.id, opts.tenant ?? null);
      return blindIndexTerm(k.key, v, bytes, spec, col.indexBytes, isTextType(col.dataType));
    });
  }

  async #canonicalBytes(col: ProtectedColumn, value: string | Buffer): Promise<Buffer> {
    if (Buffer.isBuffer(value)) return value;
    if (col.dataType === 'text' || col.dataType.startsWith('character varying')) return Buffer.from(value, 'utf8');
    const { rows } = await this.#pool.query<{ t: string }>(`SELECT ($1::${col.dataType})::text AS t`, [value]);
    return Buffer.from(rows[0]!.t, 'utf8');
  }

  /**
   * Decrypts every value of a column (optionally only `rowKeys`), one result per row.
   * One bad value never fails the whole read: it carries `error` instead (case C04).
   */
  async decryptColumn(columnRef: string, opts: { rowKeys?: readonly string[] } = {}): Promise<DecryptedValue[]> {
    const col = await loadColumn(this.#pool, columnRef);
    const rk = rowKeySql(col, 't');
    const where = opts.rowKeys ? `WHERE ${rk} = ANY($1::text[])` : '';
    const { rows } = await this.#pool.query<{ row_key: string; ct: Buffer | null }>(
      `SELECT ${rk} AS row_key, t.${quoteIdent(col.column)} AS ct FROM ${qualified(col)} t ${where} ORDER BY 1`,
      opts.rowKeys ? [opts.rowKeys] : [],
    );
    const ids = rows.flatMap((r) => (r.ct && r.ct.length >= 37 ? [safeKeyId(r.ct)] : [])).filter((x): x is bigint => x !== null);
    const keys = new Map<bigint, Awaited<ReturnType<DataKeyCache['byIds']>> extends Map<bigint, infer V> ? V : never>();
    const client = await this.#pool.connect();
    try {
      for (const id of new Set(ids)) {
        try {
          const one = await this.#dataKeys.byIds(client, [id]);
          for (const [k, v] of one) keys.set(k, v);
        } catch { /* a missing or shredded key is reported per value below */ }
      }
    } finally {
      client.release();
    }
    const results = rows.map((r) => this.#openOne(col, r.row_key, r.ct, keys));
    return this.#refuseNested(results);
  }

  /**
   * Case C02 invariant: one layer only. A plaintext that is itself a format-1 envelope
   * naming an existing data key means ciphertext was encrypted again; it is reported as
   * a failure, never returned as the value. (An envelope-shaped value naming no data key
   * is ordinary data: binary values may start with 0x01.)
   */
  async #refuseNested(results: DecryptedValue[]): Promise<DecryptedValue[]> {
    const suspects = new Map<number, bigint>();
    results.forEach((r, i) => {
      const bytes = typeof r.value === 'string' ? Buffer.from(r.value, 'utf8') : r.value;
      if (bytes && looksLikeEnvelope(bytes)) {
        const id = safeKeyId(bytes);
        if (id !== null) suspects.set(i, id);
      }
    });
    if (suspects.size === 0) return results;
    const { rows } = await this.#pool.query<{ id: string }>(
      'SELECT id::text FROM keyring.data_keys WHERE id = ANY($1::bigint[])', [[...suspects.values()].map(String)]);
    const existing = new Set(rows.map((r) => BigInt(r.id)));
    const generic = new DecryptError().message;
    return results.map((r, i) => {
      const id = suspects.get(i);
      return id !== undefined && existing.has(id) ? { rowKey: r.rowKey, value: null, error: generic, dataKeyId: r.dataKeyId } : r;
    });
  }

  /** Decrypts one value by its canonical row key; throws the generic DecryptError on failure. */
  async decrypt(columnRef: string, rowKey: string): Promise<string | Buffer | null> {
    const [res] = await this.decryptColumn(columnRef, { rowKeys: [rowKey] });
    if (!res) throw new KeyringError('NO_ROW', `keyring: no row with key ${rowKey} in ${columnRef}`);
    if (res.error === 'pending') throw new KeyringError('PENDING', 'keyring: the value is queued and not encrypted yet');
    if (res.error) {
      if (res.error === new DecryptError().message) throw new DecryptError();
      throw new KeyUnavailableError(res.error);
    }
    return res.value;
  }

  #openOne(col: ProtectedColumn, rowKey: string, ct: Buffer | null,
    keys: Map<bigint, { key: import('../crypto/index.js').SecretBytes }>): DecryptedValue {
    if (ct === null) return { rowKey, value: null };
    if (ct.length === 1 && ct[0] === 0) return { rowKey, value: null, error: 'pending' };
    const generic = new DecryptError().message;
    const id = safeKeyId(ct);
    if (id === null) return { rowKey, value: null, error: generic };
    const dk = keys.get(id);
    if (!dk) return { rowKey, value: null, error: `data key ${id} is not available to this process`, dataKeyId: id };
    try {
      const plain = openValue(dk.key, col.id, rowKey, ct);
      return { rowKey, value: isTextType(col.dataType) ? plain.toString('utf8') : plain, dataKeyId: id };
    } catch (err) {
      if (err instanceof DecryptError) return { rowKey, value: null, error: generic, dataKeyId: id };
      throw err;
    }
  }
}

function safeKeyId(ct: Buffer): bigint | null {
  try {
    return readDataKeyId(ct);
  } catch {
    return null;
  }
}
