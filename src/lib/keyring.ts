/**
 * The keyring library for applications and tools that hold keys:
 *  - `lookupTerms(column, value)`: blind-index terms for an equality lookup,
 *    `WHERE national_id_bidx = ANY($terms)`, one term per live index key version so a
 *    lookup never misses a row during an index rotation;
 *  - `decrypt…`: the decrypt path of tools that hold keys (tests, the demo); audited
 *    (counts per key version, each failure with its reason class), never writes plaintext;
 *  - `reveal(...)`: one value for a person with a stated purpose, on the allow list,
 *    audited and committed before the value is returned (src/lib/reveal.ts).
 */
import pg from 'pg';
import {
  blindIndexTerm, IvPool, looksLikeEnvelope, openValue, parseNormalization, readDataKeyId,
  DecryptError, KeyringError,
} from '../crypto/index.js';
import type { SecretBytes } from '../crypto/index.js';
import { describeError } from '../db/errors.js';
import { auditReveal, revealAllowed } from '../db/queries/audit-reveal.js';
import {
  DataKeyCache, DataKeyShreddedError, IndexKeyCache, KeyUnavailableError, matchRootKeys, resolveRootKeys, type RootKeyMaterial, type RootKeyStore,
} from '../keys/index.js';
import { selectRootKeys, type RootKeyRow } from '../db/queries/select-root-keys.js';
import { isTextType, loadColumn, qualified, quoteIdent, rowKeySql, type ProtectedColumn } from './columns.js';
import { auditDecryption, type ValueProblem } from './decrypt-audit.js';
import { AuditWriteError, checkRevealRequest, ErasedError, RevealRefusedError, type RevealRequest } from './reveal.js';

export type { ValueProblem } from './decrypt-audit.js';
export type { RevealRequest } from './reveal.js';

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
  /** Why there is no value: queued, erased (shredded subject), or a decryption failure's class. */
  readonly problem?: ValueProblem;
  readonly dataKeyId?: bigint;
  /** Encrypt root version of the data key, when the key is registered. */
  readonly rootVersion?: number;
}

export interface KeyringOptions {
  readonly databaseUrl: string;
  readonly keys: RootKeyMaterial;
  /** Recorded as the actor of this process's decryptions (audit log); default: none, the database role. */
  readonly actor?: string;
}

export class Keyring {
  readonly #pool: pg.Pool;
  #roots: RootKeyStore;
  readonly #material: RootKeyMaterial;
  readonly #dataKeys: DataKeyCache;
  readonly #indexKeys: IndexKeyCache;
  readonly #actor: string | undefined;
  /** Data keys whose wrapped bytes did not unwrap (an altered keyring.data_keys row). */
  readonly #unwrapFailed = new Set<bigint>();

  private constructor(pool: pg.Pool, roots: RootKeyStore, material: RootKeyMaterial, actor: string | undefined) {
    this.#pool = pool;
    this.#roots = roots;
    this.#material = material;
    this.#actor = actor;
    this.#dataKeys = new DataKeyCache({
      capacity: 256,
      rootKeys: () => this.#roots,
      autocommit: async (fn) => {
        const c = await this.#pool.connect();
        try { return await fn(c); } finally { c.release(); }
      },
      ivPool: new IvPool(),
      onUnwrapFailure: (f) => this.#unwrapFailed.add(f.dataKeyId),
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
        return new Keyring(pool, await resolveRootKeys(client, opts.keys, { register: false }), opts.keys, opts.actor?.trim() || undefined);
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
    // Registry and column read side by side: the registry read adds no round trip.
    const [col, roots] = await Promise.all([loadColumn(this.#pool, columnRef), this.#freshRoots()]);
    if (!col.bidxColumn) {
      throw new KeyringError('NO_BLIND_INDEX', `keyring: ${columnRef} has no blind index; protect it with --blind-index`);
    }
    if (col.tenantColumn && (opts.tenant === undefined || opts.tenant === null)) {
      throw new KeyringError('TENANT_REQUIRED', `keyring: ${columnRef} has tenant-scoped terms; pass { tenant }`);
    }
    const tenant = col.tenantColumn ? await this.#canonicalTenant(col, opts.tenant!) : null;
    const bytes = await this.#canonicalBytes(col, value);
    const spec = parseNormalization(col.normalize);
    const versions = roots.registry
      .filter((r) => r.purpose === 'index' && LIVE_INDEX_STATES.has(r.state))
      .map((r) => r.version);
    if (versions.length === 0) throw new KeyUnavailableError('no index root key version is live');
    const missing = versions.filter((v) => roots.get('index', v) === undefined);
    if (missing.length > 0) {
      throw new KeyUnavailableError(`index key version(s) ${missing.join(', ')} may hold terms but this process was not given their material; ` +
        'open the Keyring with every live index key (KEYRING_INDEX_KEYS or the key file), or a lookup could miss rows');
    }
    return versions.map((v) => {
      const k = this.#indexKeys.forVersion(v, col.id, tenant);
      return blindIndexTerm(k.key, v, bytes, spec, col.indexBytes, isTextType(col.dataType));
    });
  }

  /**
   * The registry as it is now. Read on every lookup, not cached with a TTL: after
   * activate_key commits, sidecars write terms of the new version at once, so a registry
   * even a second old would let lookups miss those rows. The read is one query on a table
   * of a few rows, sent alongside the column's (the pool holds 4 connections), so it adds
   * no round trip; the key material is matched again only when the registry changed.
   */
  async #freshRoots(): Promise<RootKeyStore> {
    const registry = await this.#pool.connect().then(async (c) => {
      try { return await selectRootKeys(c); } finally { c.release(); }
    });
    const sig = (rs: readonly RootKeyRow[]) => rs.map((r) => `${r.purpose}:${r.version}:${r.state}:${r.fingerprint}`).join(',');
    if (sig(registry) !== sig(this.#roots.registry)) this.#roots = matchRootKeys(this.#material, registry);
    return this.#roots;
  }

  /**
   * The tenant as the staging triggers record it, `tenant_column::text` under the canonical
   * settings: a uuid given in upper case, or a number given as '007', still finds its rows.
   */
  async #canonicalTenant(col: ProtectedColumn, tenant: string): Promise<string> {
    const { rows } = await this.#pool.query<{ t: string | null }>(
      `SELECT format_type(a.atttypid, a.atttypmod) AS t FROM pg_attribute a
        WHERE a.attrelid = $1::regclass AND a.attname = $2 AND NOT a.attisdropped`,
      [qualified(col), col.tenantColumn]);
    const type = rows[0]?.t;
    if (!type) throw new KeyringError('BAD_REGISTRY', `keyring: the tenant column ${col.tenantColumn} of ${col.schema}.${col.table} does not exist`);
    try {
      const canon = await this.#pool.query<{ t: string }>(`SELECT ($1::${type})::text AS t`, [tenant]);
      return canon.rows[0]!.t;
    } catch (err) {
      throw new KeyringError('BAD_TENANT', `keyring: the tenant is not a value of ${col.tenantColumn}'s type ${type} (${describeError(err)})`);
    }
  }

  async #canonicalBytes(col: ProtectedColumn, value: string | Buffer): Promise<Buffer> {
    if (Buffer.isBuffer(value)) return value;
    if (col.dataType === 'text' || col.dataType.startsWith('character varying')) return Buffer.from(value, 'utf8');
    const { rows } = await this.#pool.query<{ t: string }>(`SELECT ($1::${col.dataType})::text AS t`, [value]);
    return Buffer.from(rows[0]!.t, 'utf8');
  }

  /**
   * Decrypts every value of a column (optionally only `rowKeys`), one result per row.
   * One bad value never fails the whole read: it carries `error` and `problem` instead
   * (case C04). Audited before anything is returned, in one committed transaction: one
   * `decrypt.batch` row per encrypt root version (counts, never values) and one
   * `decrypt.failed` row per failed value (column, row key, reason class; at most
   * FAILURES_AUDITED, then one summary row). Throws AuditWriteError, returning nothing,
   * when the audit cannot be written.
   */
  async decryptColumn(columnRef: string, opts: { rowKeys?: readonly string[] } = {}): Promise<DecryptedValue[]> {
    const col = await loadColumn(this.#pool, columnRef);
    const values = await this.#open(col, opts.rowKeys);
    await this.#commitAudit((c) => auditDecryption(c, this.#actor, col.id, values));
    return values;
  }

  /** Decrypts one value by its canonical row key (audited as decryptColumn); throws on failure. */
  async decrypt(columnRef: string, rowKey: string): Promise<string | Buffer | null> {
    const [res] = await this.decryptColumn(columnRef, { rowKeys: [rowKey] });
    if (!res) throw new KeyringError('NO_ROW', `keyring: no row with key ${rowKey} in ${columnRef}`);
    throwProblem(res, columnRef);
    return res.value;
  }

  /**
   * Audited reveal of one value for a stated purpose (src/lib/reveal.ts). The actor must
   * be on the allow list (keyring.settings reveal_actors), else the refusal is audited and
   * REVEAL_REFUSED thrown. The `reveal` audit row (actor, key version, column, row key,
   * purpose) is committed before the value is returned; if it cannot be, AUDIT_FAILED and
   * nothing is revealed. A shredded subject's value throws ERASED.
   */
  async reveal(req: RevealRequest): Promise<string | Buffer | null> {
    const { purpose, actor } = checkRevealRequest(req);
    const col = await loadColumn(this.#pool, req.column);
    const label = `${col.schema}.${col.table}.${col.column}`;
    const base = { actor, columnId: col.id, rowKey: req.rowKey, purpose };
    const allowed = await this.#pool.connect().then(async (c) => {
      try { return await revealAllowed(c, actor); } finally { c.release(); }
    });
    if (!allowed) {
      await this.#commitAudit((c) => auditReveal(c, base));
      throw new RevealRefusedError(actor ?? 'this database role');
    }
    const [v] = await this.#open(col, [req.rowKey]);
    const refusal = !v ? 'no_row' : v.problem === 'pending' || v.problem === 'erased' ? v.problem : undefined;
    if (refusal) {
      await this.#commitAudit((c) => auditReveal(c, { ...base, refusal, keyVersion: v?.rootVersion, detail: keyDetail(v) }));
      if (!v) throw new KeyringError('NO_ROW', `keyring: no row with key ${req.rowKey} in ${label}`);
      throwProblem(v, label);
    }
    if (v!.problem) {
      await this.#commitAudit((c) => auditDecryption(c, actor, col.id, [v!], { purpose, via: 'reveal' }));
      throwProblem(v!, label);
    }
    let ok = false;
    try {
      ok = await this.#commitAudit((c) => auditReveal(c, { ...base, keyVersion: v!.rootVersion, detail: keyDetail(v) }));
    } finally {
      if (!ok && Buffer.isBuffer(v!.value)) v!.value.fill(0);
    }
    if (!ok) throw new RevealRefusedError(actor ?? 'this database role');
    return v!.value;
  }

  /** Runs `fn` in a transaction and commits it; any failure is AUDIT_FAILED (rolled back). */
  async #commitAudit<T>(fn: (client: pg.ClientBase) => Promise<T>): Promise<T> {
    let client: pg.PoolClient;
    try {
      client = await this.#pool.connect();
    } catch (err) {
      throw new AuditWriteError(describeError(err));
    }
    try {
      await client.query('BEGIN');
      const out = await fn(client);
      await client.query('COMMIT');
      return out;
    } catch (err) {
      await client.query('ROLLBACK').catch(() => undefined);
      throw new AuditWriteError(describeError(err));
    } finally {
      client.release();
    }
  }

  /** Reads and decrypts values of `col` (all, or `rowKeys`); writes nothing. */
  async #open(col: ProtectedColumn, rowKeys?: readonly string[]): Promise<DecryptedValue[]> {
    const rk = rowKeySql(col, 't');
    const where = rowKeys ? `WHERE ${rk} = ANY($1::text[])` : '';
    const { rows } = await this.#pool.query<{ row_key: string; ct: Buffer | null }>(
      `SELECT ${rk} AS row_key, t.${quoteIdent(col.column)} AS ct FROM ${qualified(col)} t ${where} ORDER BY 1`,
      rowKeys ? [rowKeys] : [],
    );
    const ids = [...new Set(rows.flatMap((r) => (r.ct && r.ct.length >= 37 ? [safeKeyId(r.ct)] : [])).filter((x): x is bigint => x !== null))];
    const keys = new Map<bigint, SecretBytes>();
    const problems = new Map<bigint, { problem: ValueProblem; message: string }>();
    const versions = new Map<bigint, number>();
    const client = await this.#pool.connect();
    try {
      const meta = await client.query<{ id: string; root_version: number }>(
        'SELECT id::text, root_version FROM keyring.data_keys WHERE id = ANY($1::bigint[])', [ids.map(String)]);
      for (const m of meta.rows) versions.set(BigInt(m.id), m.root_version);
      for (const id of ids) {
        try {
          for (const [k, v] of await this.#dataKeys.byIds(client, [id])) keys.set(k, v.key);
        } catch (err) {
          if (err instanceof DataKeyShreddedError) problems.set(id, { problem: 'erased', message: err.message });
          else if (err instanceof KeyringError) {
            problems.set(id, { problem: this.#unwrapFailed.has(id) ? 'data_key_unwrap' : 'key_unavailable', message: err.message });
          } else throw err;
        }
      }
    } finally {
      client.release();
    }
    const results = rows.map((r) => openOne(col, r.row_key, r.ct, keys, problems, versions));
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
      if (id === undefined || !existing.has(id)) return r;
      if (Buffer.isBuffer(r.value)) r.value.fill(0);
      return { rowKey: r.rowKey, value: null, error: generic, problem: 'nested', dataKeyId: r.dataKeyId, rootVersion: r.rootVersion };
    });
  }
}

/** The value of one stored ciphertext, or why there is none. */
function openOne(
  col: ProtectedColumn, rowKey: string, ct: Buffer | null, keys: ReadonlyMap<bigint, SecretBytes>,
  problems: ReadonlyMap<bigint, { problem: ValueProblem; message: string }>, versions: ReadonlyMap<bigint, number>,
): DecryptedValue {
  if (ct === null) return { rowKey, value: null };
  if (ct.length === 1 && ct[0] === 0) return { rowKey, value: null, error: 'pending', problem: 'pending' };
  const generic = new DecryptError().message;
  const id = safeKeyId(ct);
  if (id === null) return { rowKey, value: null, error: generic, problem: ct.length < 37 ? 'length' : 'format' };
  const rootVersion = versions.get(id);
  const known = rootVersion === undefined ? { dataKeyId: id } : { dataKeyId: id, rootVersion };
  const dk = keys.get(id);
  if (!dk) {
    const p = problems.get(id) ?? { problem: 'key_unavailable' as const, message: `data key ${id} does not exist` };
    return { rowKey, value: null, error: p.message, problem: p.problem, ...known };
  }
  try {
    const plain = openValue(dk, col.id, rowKey, ct);
    return { rowKey, value: isTextType(col.dataType) ? plain.toString('utf8') : plain, ...known };
  } catch (err) {
    if (err instanceof DecryptError) return { rowKey, value: null, error: generic, problem: err.reason ?? 'auth', ...known };
    throw err;
  }
}

/** Throws the error a caller of decrypt()/reveal() gets for a value with a problem (none: returns). */
function throwProblem(v: DecryptedValue, label: string): void {
  switch (v.problem) {
    case undefined: return;
    case 'pending': throw new KeyringError('PENDING', 'keyring: the value is queued and not encrypted yet');
    case 'erased': throw new ErasedError(label, v.rowKey);
    case 'key_unavailable': case 'data_key_unwrap': throw new KeyUnavailableError(v.error ?? 'data key unavailable');
    default: throw new DecryptError();
  }
}

const keyDetail = (v: DecryptedValue | undefined): Record<string, unknown> =>
  v?.dataKeyId === undefined ? {} : { data_key_id: String(v.dataKeyId) };

/** keyring.data_keys.id is a bigint (int8): the largest id a header can name. */
const MAX_DATA_KEY_ID = (1n << 63n) - 1n;

/**
 * The data key id a format-1 header names, or null. A header above the bigint range names
 * no data key (a stored value that is not a real envelope, or a plaintext that only looks
 * like one): passed to `id = ANY($1::bigint[])` it would fail the read of every value.
 */
function safeKeyId(ct: Buffer): bigint | null {
  try {
    const id = readDataKeyId(ct);
    return id <= MAX_DATA_KEY_ID ? id : null;
  } catch {
    return null;
  }
}
