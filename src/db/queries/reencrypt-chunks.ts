/**
 * Queries of a re-encryption job (sql/migrations/00007_reencrypt.sql): carving the next
 * primary-key range under the job row lock, claiming a range in its own transaction,
 * reading its rows, and recording the outcome with the chunk (cursor and counters move
 * with the writes).
 */
import type pg from 'pg';
import { KeyringError } from '../../crypto/index.js';
import type { ColumnRow } from './select-columns.js';

export const id = (s: string): string => `"${s.replace(/"/g, '""')}"`;
const TYPE_RE = /^[A-Za-z0-9_ ."(),[\]]+$/;

export function checkTypes(c: ColumnRow): void {
  for (const ty of c.pk_types) {
    if (!TYPE_RE.test(ty)) throw new KeyringError('BAD_REGISTRY', `keyring: primary key type ${JSON.stringify(ty)} of ${c.table_schema}.${c.table_name} is not a type name`);
  }
}

/** The canonical row key of `t`'s row (as the staging triggers render it). */
export function rowKeyExpr(c: ColumnRow): string {
  if (c.pk_columns.length === 1) return `t.${id(c.pk_columns[0]!)}::text`;
  return `json_build_array(${c.pk_columns.map((p) => `t.${id(p)}::text`).join(', ')})::text`;
}

/** `(pk) > key($n)` and `(pk) <= key($n)` on the primary key, for a canonical row key parameter. */
export function pkCompare(c: ColumnRow, op: '>' | '<=', param: string): string {
  if (c.pk_columns.length === 1) return `t.${id(c.pk_columns[0]!)} ${op} ${param}::${c.pk_types[0]}`;
  const left = c.pk_columns.map((p) => `t.${id(p)}`).join(', ');
  const right = c.pk_types.map((ty, i) => `(${param}::jsonb->>${i})::${ty}`).join(', ');
  return `(${left}) ${op} (${right})`;
}

export const orderBy = (c: ColumnRow): string => c.pk_columns.map((p) => `t.${id(p)}`).join(', ');
export const table = (c: ColumnRow): string => `ONLY ${id(c.table_schema)}.${id(c.table_name)}`;

/** Open ranges per job at most (a few per sidecar is plenty). */
export const MAX_OPEN_CHUNKS = 16;

export interface ChunkRow {
  readonly id: string;
  readonly after_key: string | null;
  readonly last_key: string | null;
  readonly not_before: Date | null;
}

/**
 * Carves the next range of `batchSize` rows after the job's cursor (the job row is locked
 * by the caller) and advances the cursor; at the end, marks the pass done. Returns the
 * new chunk, or undefined when the pass was already done or MAX_OPEN_CHUNKS are open.
 */
export async function carveChunk(client: pg.ClientBase, jobId: string, c: ColumnRow, batchSize: number, instanceId: string): Promise<ChunkRow | undefined> {
  checkTypes(c);
  const { rows: [j] } = await client.query<{ cursor: string | null; pass_done: boolean; rows_per_second: number | null; next_chunk_at: Date | null }>(
    'SELECT cursor, pass_done, rows_per_second, next_chunk_at FROM keyring.jobs WHERE id = $1', [jobId]);
  if (!j || j.pass_done) return undefined;
  // Ranges carved but not done (sidecars that keep failing on a range retry and carve
  // again) stay few: the rest of the table waits behind the cursor.
  const { rows: [open] } = await client.query<{ n: number }>('SELECT count(*)::int AS n FROM keyring.job_chunks WHERE job_id = $1', [jobId]);
  if (open!.n >= MAX_OPEN_CHUNKS) return undefined;
  const where = j.cursor === null ? '' : `WHERE ${pkCompare(c, '>', '$1')}`;
  const { rows } = await client.query<{ k: string }>(
    `SELECT ${rowKeyExpr(c)} AS k FROM ${table(c)} t ${where} ORDER BY ${orderBy(c)} OFFSET ${batchSize - 1} LIMIT 1`,
    j.cursor === null ? [] : [j.cursor]);
  const last = rows[0]?.k ?? null;
  // Rate limit across every sidecar: this chunk may start at next_chunk_at, the next one
  // batchSize / rate seconds later.
  const { rows: [chunk] } = await client.query<ChunkRow>(
    `WITH j AS (
       UPDATE keyring.jobs SET cursor = coalesce($3, cursor), pass_done = ($3 IS NULL), claims = claims + 1,
              state = 'running', started_at = coalesce(started_at, clock_timestamp()), updated_at = clock_timestamp(),
              next_chunk_at = CASE WHEN rows_per_second IS NULL THEN NULL
                                   ELSE greatest(coalesce(next_chunk_at, clock_timestamp()), clock_timestamp())
                                        + make_interval(secs => $4::float8 / rows_per_second) END
        WHERE id = $1
       RETURNING next_chunk_at, rows_per_second)
     INSERT INTO keyring.job_chunks (job_id, id, after_key, last_key, not_before, carved_by)
     SELECT $1, coalesce((SELECT max(x.id) FROM keyring.job_chunks x WHERE x.job_id = $1), 0) + 1, $2, $3,
            CASE WHEN j.rows_per_second IS NULL THEN NULL ELSE j.next_chunk_at - make_interval(secs => $4::float8 / j.rows_per_second) END, $5
       FROM j
     RETURNING id::text, after_key, last_key, not_before`,
    [jobId, j.cursor, last, batchSize, instanceId]);
  return chunk;
}

/** Counts a claim that found nothing to carve (the pass is done, chunks may remain). */
export async function countClaim(client: pg.ClientBase, jobId: string): Promise<void> {
  await client.query('UPDATE keyring.jobs SET claims = claims + 1 WHERE id = $1', [jobId]);
}

/** Any open chunk of the job no other transaction holds (the lock is the claim). */
export async function claimChunk(client: pg.ClientBase, jobId: string): Promise<ChunkRow | undefined> {
  const { rows } = await client.query<ChunkRow>(
    `SELECT id::text, after_key, last_key, not_before FROM keyring.job_chunks
      WHERE job_id = $1 ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED`, [jobId]);
  return rows[0];
}

export interface StoredValue {
  readonly row_key: string;
  readonly ct: Buffer;
  readonly subject: string | null;
}

/** The stored envelopes of a chunk's rows (NULLs left out; queued placeholders '\\x00' included, to be counted). */
export async function selectChunkRows(client: pg.ClientBase, c: ColumnRow & { readonly subject_column: string | null }, chunk: ChunkRow): Promise<StoredValue[]> {
  checkTypes(c);
  const conds = [`t.${id(c.column_name)} IS NOT NULL`];
  const params: string[] = [];
  if (chunk.after_key !== null) { params.push(chunk.after_key); conds.push(pkCompare(c, '>', `$${params.length}`)); }
  if (chunk.last_key !== null) { params.push(chunk.last_key); conds.push(pkCompare(c, '<=', `$${params.length}`)); }
  const subject = c.subject_column === null ? 'NULL::text' : `t.${id(c.subject_column)}::text`;
  const { rows } = await client.query<StoredValue>(
    `SELECT ${rowKeyExpr(c)} AS row_key, t.${id(c.column_name)} AS ct, ${subject} AS subject
       FROM ${table(c)} t WHERE ${conds.join(' AND ')} ORDER BY ${orderBy(c)}`, params);
  return rows;
}

/**
 * Locks the queue entries of these rows, if any, and returns their row keys: an
 * application write in flight (its new value is encrypted under a new key by the write
 * path), so the batch leaves the row alone. Queue before base row: the write path's order.
 */
export async function lockQueued(client: pg.ClientBase, columnId: number, rowKeys: readonly string[]): Promise<Set<string>> {
  if (rowKeys.length === 0) return new Set();
  const { rows } = await client.query<{ row_key: string }>(
    'SELECT row_key FROM keyring.pending WHERE column_id = $1 AND row_key = ANY($2::text[]) FOR UPDATE', [columnId, rowKeys]);
  return new Set(rows.map((r) => r.row_key));
}

export interface KeyMeta {
  readonly id: string;
  readonly root_version: number;
  readonly state: string;
}

export async function selectKeyMeta(client: pg.ClientBase, ids: readonly bigint[]): Promise<Map<bigint, KeyMeta>> {
  if (ids.length === 0) return new Map();
  const { rows } = await client.query<KeyMeta>(
    'SELECT id::text, root_version, state FROM keyring.data_keys WHERE id = ANY($1::bigint[])', [ids.map(String)]);
  return new Map(rows.map((r) => [BigInt(r.id), r]));
}

/** Whether a live sidecar (fresh heartbeat) holds the encrypt root version `version`. */
export async function heldByLiveSidecar(client: pg.ClientBase, version: number): Promise<boolean> {
  const { rows } = await client.query(
    `SELECT 1 FROM keyring.sidecars s JOIN keyring.root_keys r ON r.purpose = 'encrypt' AND r.version = $1
      WHERE s.stopped_at IS NULL AND s.heartbeat_at >= now() - make_interval(secs => keyring.setting('heartbeat_fresh_seconds')::float8)
        AND r.fingerprint = ANY (s.fingerprints) LIMIT 1`, [version]);
  return rows.length > 0;
}

/** Opens quarantine entries (identifiers and the reason only, never bytes). */
export async function quarantineValues(client: pg.ClientBase, columnId: number, items: readonly { rowKey: string; detail: string }[]): Promise<void> {
  if (items.length === 0) return;
  await client.query(
    `INSERT INTO keyring.quarantine (column_id, row_key, reason, detail)
     SELECT $1, u.k, 'decrypt_failed', u.d FROM unnest($2::text[], $3::text[]) AS u(k, d)
     ON CONFLICT (column_id, row_key) WHERE resolved_at IS NULL DO NOTHING`,
    [columnId, items.map((i) => i.rowKey), items.map((i) => i.detail)]);
}

export interface ChunkCounts {
  readonly done: number;
  readonly skipped: number;
  readonly quarantined: number;
  readonly erased: number;
  readonly unavailable: number;
}

export interface JobTotals extends ChunkCounts {
  readonly finished: boolean;
  readonly seconds: number;
}

/**
 * Closes a chunk and adds its counts to the job, in the chunk's transaction. The job is
 * finished when its pass is done and no other chunk is open: decided under the job row
 * lock, so by exactly one transaction.
 */
export async function finishChunk(client: pg.ClientBase, jobId: string, chunkId: string, n: ChunkCounts, instanceId: string): Promise<JobTotals> {
  await client.query('DELETE FROM keyring.job_chunks WHERE job_id = $1 AND id = $2', [jobId, chunkId]);
  // Lock first, then read in a new statement: its snapshot sees the chunks other sidecars
  // closed while this one waited (an UPDATE's subquery would keep its older snapshot).
  await client.query('SELECT 1 FROM keyring.jobs WHERE id = $1 FOR UPDATE', [jobId]);
  const { rows: [r] } = await client.query<{ done: string; skipped: string; quarantined: string; erased: string; unavailable: string; finished: boolean; seconds: number }>(
    `UPDATE keyring.jobs j
        SET done = done + $2, skipped = skipped + $3, quarantined = quarantined + $4, erased = erased + $5,
            unavailable = unavailable + $6, claimed_by = $7, updated_at = clock_timestamp(),
            state = CASE WHEN j.pass_done AND NOT EXISTS (SELECT 1 FROM keyring.job_chunks x WHERE x.job_id = j.id) THEN 'done' ELSE j.state END,
            finished_at = CASE WHEN j.pass_done AND NOT EXISTS (SELECT 1 FROM keyring.job_chunks x WHERE x.job_id = j.id) THEN clock_timestamp() END,
            error = CASE WHEN j.unavailable + $6 > 0
                         THEN format('%s value(s) need an encrypt root version no live sidecar holds; left untouched: start a sidecar with it and run keyring.reencrypt again', j.unavailable + $6)
                         ELSE j.error END
      WHERE j.id = $1 AND j.state IN ('queued', 'running')
      RETURNING done::text, skipped::text, quarantined::text, erased::text, unavailable::text, state = 'done' AS finished,
                extract(epoch FROM coalesce(finished_at, clock_timestamp()) - started_at)::float8 AS seconds`,
    [jobId, n.done, n.skipped, n.quarantined, n.erased, n.unavailable, instanceId]);
  if (!r) throw new KeyringError('JOB_GONE', `keyring: re-encryption job ${jobId} ended meanwhile (superseded or failed)`);
  return {
    done: Number(r.done), skipped: Number(r.skipped), quarantined: Number(r.quarantined), erased: Number(r.erased),
    unavailable: Number(r.unavailable), finished: r.finished, seconds: r.seconds,
  };
}
