/**
 * One batch of the write path: claim queued plaintexts, encrypt them, write envelopes
 * and blind-index terms into the base rows, empty the queue entries, count and audit,
 * commit — one transaction. A batch that fails on its data is rolled back and its rows
 * retried one at a time, so one poison row cannot hold back the others; a row that
 * keeps failing on its own is quarantined after MAX_ATTEMPTS (never a hot loop).
 */
import type pg from 'pg';
import { blindIndexTerm, parseNormalization, sealValue, type IvPool } from '../src/crypto/index.js';
import { describeError, isRetryable } from '../src/db/errors.js';
import type { Db } from '../src/db/pool.js';
import { auditAppend } from '../src/db/queries/audit-append.js';
import { claimPending, claimPendingById, fetchValues, type PendingRow } from '../src/db/queries/claim-pending.js';
import { recordFailure, quarantinePending } from '../src/db/queries/fail-pending.js';
import { addEncryptions, deletePending } from '../src/db/queries/finish-batch.js';
import { lockIndexVersion } from '../src/db/queries/reindex-rows.js';
import { selectColumns, type ColumnRow } from '../src/db/queries/select-columns.js';
import { updateBaseRows, type BaseRowUpdate, type BaseTable } from '../src/db/queries/update-base-rows.js';
import { scopeOf, type DataKeyCache, type KeyDemand } from '../src/keys/data-keys.js';
import { KeyUnavailableError } from '../src/keys/errors.js';
import type { IndexKeyCache } from '../src/keys/index-keys.js';
import type { Logger } from '../src/log.js';
import type { SidecarMetrics } from './metrics.js';

/** Attempts before a value that fails on its own is quarantined. */
export const MAX_ATTEMPTS = 5;

export interface BatchContext {
  readonly db: Db;
  readonly dataKeys: DataKeyCache;
  readonly indexKeys: IndexKeyCache;
  readonly ivPool: IvPool;
  readonly instanceId: string;
  readonly logger: Logger;
  readonly metrics: SidecarMetrics;
  /** Test-only pause inside the transaction (crash tests); 0 in production. */
  readonly testDelayMs: number;
  /** Plaintext bytes per batch at most (KEYRING_BATCH_BYTES); one larger value goes alone. */
  readonly batchBytes: number;
}

export interface BatchResult {
  /** Rows the claim returned (a short claim means the queue is drained). */
  readonly claimed: number;
  /** Highest queue id claimed (the drain's cursor), or the cursor given when none. */
  readonly lastId: string;
  readonly encrypted: number;
  readonly failed: number;
  readonly quarantined: number;
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

async function inTransaction<T>(client: pg.ClientBase, fn: () => Promise<T>): Promise<T> {
  await client.query('BEGIN');
  try {
    const out = await fn();
    await client.query('COMMIT');
    return out;
  } catch (err) {
    await client.query('ROLLBACK').catch(() => undefined);
    throw err;
  }
}

/**
 * Claims and processes up to `limit` rows. Throws only retryable errors (link lost,
 * keys unavailable, serialization): the caller backs off and nothing was changed.
 */
export async function processBatch(ctx: BatchContext, limit: number, afterId = '0'): Promise<BatchResult> {
  let claimed: PendingRow[] = [];
  let taken = 0;
  try {
    const encrypted = await ctx.db.with((client) =>
      inTransaction(client, async () => {
        const all = await claimPending(client, limit, afterId);
        taken = all.length;
        claimed = await withinBudget(client, all, ctx.batchBytes);
        if (claimed.length === 0) return 0;
        return encryptRows(ctx, client, claimed);
      }),
    );
    // `claimed` counts every row the claim returned, so a batch cut short by the byte
    // budget is not mistaken for a drained queue; the cursor stops at the last row done.
    return { claimed: taken, lastId: lastIdOf(claimed, afterId), encrypted, failed: 0, quarantined: 0 };
  } catch (err) {
    // Another batch used up the data key meanwhile: nothing was written; claim the same
    // rows again at once (the next look at the key retires it and creates a new one).
    if ((err as { code?: unknown }).code === 'DATA_KEY_WORN') {
      return { claimed: taken, lastId: afterId, encrypted: 0, failed: 0, quarantined: 0 };
    }
    if (isRetryable(err) || claimed.length === 0) throw err;
    ctx.metrics.errors.inc({ kind: 'batch' });
    ctx.logger.warn({ err: { message: describeError(err) }, rows: claimed.length }, 'batch failed; retrying its rows one at a time');
  }
  let encrypted = 0;
  let failed = 0;
  let quarantined = 0;
  for (const row of claimed) {
    const r = await processOne(ctx, row.id);
    if (r === 'encrypted') encrypted++;
    else if (r === 'failed') failed++;
    else if (r === 'quarantined') quarantined++;
  }
  return { claimed: taken, lastId: lastIdOf(claimed, afterId), encrypted, failed, quarantined };
}

/**
 * The longest prefix of the claim whose plaintexts fit `budget` bytes (at least one
 * row), with the large values fetched. The rows left out stay locked until this
 * transaction ends and are claimed again by the next batch. Each value costs several
 * times its size while in flight (bytea travels as hex text), so this bound, not the row
 * count, is what keeps memory flat with a backlog of multi-MiB values.
 */
async function withinBudget(client: pg.ClientBase, rows: readonly PendingRow[], budget: number): Promise<PendingRow[]> {
  let bytes = 0;
  let n = 0;
  while (n < rows.length && (n === 0 || bytes + rows[n]!.size <= budget)) bytes += rows[n++]!.size;
  const kept = rows.slice(0, n);
  const missing = kept.filter((r) => r.value === null).map((r) => r.ctid);
  if (missing.length === 0) return kept;
  const values = await fetchValues(client, missing);
  return kept.map((r) => (r.value === null ? { ...r, value: values.get(r.ctid) ?? null } : r));
}

const lastIdOf = (rows: readonly PendingRow[], fallback: string): string => rows.at(-1)?.id ?? fallback;

/** One row in its own transaction; a failure of its own is counted against it, never retried in a loop here. */
async function processOne(ctx: BatchContext, id: string): Promise<'encrypted' | 'gone' | 'failed' | 'quarantined'> {
  try {
    return await ctx.db.with((client) =>
      inTransaction(client, async () => {
        const row = await claimPendingById(client, id);
        if (!row) return 'gone' as const; // replaced, deleted, or claimed by another sidecar
        await encryptRows(ctx, client, [row]);
        return 'encrypted' as const;
      }),
    );
  } catch (err) {
    if (isRetryable(err)) throw err;
    const message = describeError(err);
    ctx.metrics.errors.inc({ kind: 'row' });
    const attempts = await ctx.db.with((c) => recordFailure(c, id, message));
    if (attempts === undefined || attempts < MAX_ATTEMPTS) {
      ctx.logger.warn({ pendingId: id, attempts, err: { message } }, 'queued value failed; it will be retried');
      return 'failed';
    }
    const moved = await ctx.db.with((c) =>
      inTransaction(c, async () => {
        const q = await quarantinePending(c, id, 'encrypt_failed', message);
        if (q) {
          await auditAppend(c, {
            action: 'encrypt.quarantined', actor: ctx.instanceId, columnId: q.column_id,
            reason: 'encrypt_failed', detail: { attempts, error: message },
          });
        }
        return q;
      }),
    );
    if (!moved) return 'gone';
    ctx.metrics.quarantined.inc();
    ctx.logger.error({ columnId: moved.column_id, rowKey: moved.row_key, attempts, err: { message } }, 'queued value quarantined after repeated failures');
    return 'quarantined';
  }
}

interface Sealed {
  readonly row: PendingRow;
  readonly col: ColumnRow;
  readonly dataKeyId: bigint;
  readonly rootVersion: number;
  readonly ciphertext: Buffer;
  readonly term: Buffer | null;
  readonly indexVersion: number | null;
}

/** Encrypts `rows` (already locked by the caller's transaction) and writes everything. Returns rows encrypted. */
async function encryptRows(ctx: BatchContext, client: pg.ClientBase, rows: readonly PendingRow[]): Promise<number> {
  try {
    const columns = new Map((await selectColumns(client, [...new Set(rows.map((r) => r.column_id))])).map((c) => [c.id, c]));
    const demands = new Map<string, KeyDemand>();
    for (const r of rows) {
      const scope = scopeOf(r.column_id, r.subject);
      const d = demands.get(scope);
      demands.set(scope, { columnId: r.column_id, subject: r.subject, count: (d?.count ?? 0) + 1 });
    }
    const keys = await ctx.dataKeys.activeKeys(client, [...demands.values()]);
    const specs = new Map([...columns.values()].map((c) => [c.id, parseNormalization(c.normalize)]));
    const sealed: Sealed[] = rows.map((row) => {
      const col = columns.get(row.column_id);
      if (!col) throw new Error(`column ${row.column_id} is not registered`);
      const dk = keys.get(scopeOf(row.column_id, row.subject))!;
      const value = row.value;
      if (value === null) throw new Error(`queued value ${row.id} could not be read`);
      const ciphertext = sealValue(dk.key, dk.id, col.id, row.row_key, value, ctx.ivPool);
      let term: Buffer | null = null;
      let indexVersion: number | null = null;
      if (col.bidx_column !== null) {
        const ik = ctx.indexKeys.active(col.id, row.tenant);
        term = blindIndexTerm(ik.key, ik.version, value, specs.get(col.id)!, col.index_bytes, col.data_type !== 'bytea');
        indexVersion = ik.version;
      }
      return { row, col, dataKeyId: dk.id, rootVersion: dk.rootVersion, ciphertext, term, indexVersion };
    });
    // A term is written only under an index version that is active now, share-locked
    // until commit (activate_key waits for it): a sidecar whose registry is a moment stale
    // cannot leave an old-version term behind an index rotation (the reindex migration).
    for (const v of new Set(sealed.map((s) => s.indexVersion).filter((x) => x !== null))) {
      if (!(await lockIndexVersion(client, v))) {
        throw new KeyUnavailableError(`index key version ${v} is no longer active; the batch is retried with the reloaded registry`);
      }
    }
    for (const [t, updates] of groupByTable(sealed)) await updateBaseRows(client, t, updates);
    if (ctx.testDelayMs > 0) await sleep(ctx.testDelayMs);
    await deletePending(client, rows.map((r) => r.ctid));
    const perKey = new Map<bigint, number>();
    for (const s of sealed) perKey.set(s.dataKeyId, (perKey.get(s.dataKeyId) ?? 0) + 1);
    await addEncryptions(client, perKey, ctx.dataKeys.maxEncryptions);
    // Last statement before COMMIT: audit_append holds the chain's lock until commit.
    await auditBatch(ctx, client, sealed);
    const perRoot = new Map<number, number>();
    for (const s of sealed) perRoot.set(s.rootVersion, (perRoot.get(s.rootVersion) ?? 0) + 1);
    for (const [v, n] of perRoot) ctx.metrics.encryptions.inc({ root_version: String(v) }, n);
    return sealed.length;
  } finally {
    ctx.dataKeys.trim();
    ctx.indexKeys.trim();
  }
}

/** Merges the values of each base row (one UPDATE per table, one row version per row). */
function groupByTable(sealed: readonly Sealed[]): Map<BaseTable, BaseRowUpdate[]> {
  const tables = new Map<string, { cols: ColumnRow[]; rows: Map<string, Map<number, Sealed>> }>();
  for (const s of sealed) {
    const name = JSON.stringify([s.col.table_schema, s.col.table_name]);
    let t = tables.get(name);
    if (!t) tables.set(name, (t = { cols: [], rows: new Map() }));
    if (!t.cols.includes(s.col)) t.cols.push(s.col);
    let r = t.rows.get(s.row.row_key);
    if (!r) t.rows.set(s.row.row_key, (r = new Map()));
    r.set(s.col.id, s);
  }
  const out = new Map<BaseTable, BaseRowUpdate[]>();
  for (const { cols, rows } of tables.values()) {
    cols.sort((a, b) => a.id - b.id);
    const c0 = cols[0]!;
    const table: BaseTable = {
      schema: c0.table_schema, table: c0.table_name, pkColumns: c0.pk_columns, pkTypes: c0.pk_types,
      columns: cols.map((c) => ({ column: c.column_name, bidxColumn: c.bidx_column })),
    };
    out.set(table, [...rows].map(([rowKey, byCol]) => ({
      rowKey,
      values: cols.map((c) => {
        const s = byCol.get(c.id);
        return s && { ciphertext: s.ciphertext, term: s.term };
      }),
    })));
  }
  return out;
}

/** One audit row per column per batch: counts and key ids, never values. */
async function auditBatch(ctx: BatchContext, client: pg.ClientBase, sealed: readonly Sealed[]): Promise<void> {
  const byCol = new Map<number, Sealed[]>();
  for (const s of sealed) {
    const list = byCol.get(s.col.id);
    if (list) list.push(s);
    else byCol.set(s.col.id, [s]);
  }
  for (const [columnId, list] of byCol) {
    const keys = new Map<bigint, { root_version: number; count: number }>();
    for (const s of list) {
      const k = keys.get(s.dataKeyId) ?? { root_version: s.rootVersion, count: 0 };
      keys.set(s.dataKeyId, { ...k, count: k.count + 1 });
    }
    const roots = new Set(list.map((s) => s.rootVersion));
    const idx = [...new Set(list.map((s) => s.indexVersion).filter((v) => v !== null))];
    const [only] = keys.keys();
    await auditAppend(client, {
      action: 'encrypt.batch',
      actor: ctx.instanceId,
      keyPurpose: 'encrypt',
      ...(roots.size === 1 ? { keyVersion: [...roots][0]! } : {}),
      columnId,
      detail: {
        count: list.length,
        ...(keys.size === 1 ? { data_key_id: String(only) } : {}),
        data_keys: [...keys].map(([id, v]) => ({ id: String(id), ...v })),
        ...(idx.length > 0 ? { index_versions: idx } : {}),
      },
    });
  }
}
