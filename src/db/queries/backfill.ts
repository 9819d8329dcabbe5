/**
 * Queries of an adoption's backfill job (sql/migrations, the adopt migration): the
 * column and its plaintext column, the job's total, one range moved into the queue by
 * keyring.backfill_range, the range closed with its counts, and the last step
 * (keyring.adopt_finish). Ranges are carved and claimed with the re-encryption's chunk
 * queries (reencrypt-chunks.ts).
 */
import type pg from 'pg';
import { KeyringError } from '../../crypto/index.js';
import type { ColumnRow } from './select-columns.js';

export type AdoptingColumn = ColumnRow & { readonly plain_column: string | null };

export async function selectAdoptingColumn(client: pg.ClientBase, columnId: number): Promise<AdoptingColumn | undefined> {
  const { rows } = await client.query<AdoptingColumn>(
    `SELECT id, table_schema, table_name, column_name, data_type, pk_columns::text[] AS pk_columns,
            pk_types, bidx_column, normalize, index_bytes, plain_column
       FROM keyring.columns WHERE id = $1`, [columnId]);
  return rows[0];
}

/**
 * Sets the job's total once, to the values still in plaintext, counted into the status
 * counters at the same time (keyring.backfill_count: one scan, outside any DDL lock).
 */
export async function setBackfillTotal(client: pg.ClientBase, jobId: string, columnId: number): Promise<void> {
  await client.query(
    `UPDATE keyring.jobs SET total = keyring.backfill_count($2), started_at = coalesce(started_at, clock_timestamp()),
            state = 'running', updated_at = clock_timestamp()
      WHERE id = $1 AND total IS NULL`, [jobId, columnId]);
}

/** Whether every range was carved and none is open (the job row is locked by the caller). */
export async function passComplete(client: pg.ClientBase, jobId: string): Promise<boolean> {
  const { rows: [r] } = await client.query<{ complete: boolean }>(
    `SELECT j.pass_done AND NOT EXISTS (SELECT 1 FROM keyring.job_chunks x WHERE x.job_id = j.id) AS complete
       FROM keyring.jobs j WHERE j.id = $1`, [jobId]);
  return r?.complete ?? false;
}

export interface RangeCounts {
  readonly moved: number;
  readonly skipped: number;
  readonly oversized: number;
}

/** Moves one range's plaintext into the queue (keyring.backfill_range, in the caller's transaction). */
export async function backfillRange(client: pg.ClientBase, columnId: number, afterKey: string | null, lastKey: string | null): Promise<RangeCounts> {
  const { rows: [r] } = await client.query<{ moved: string; skipped: string; oversized: string }>(
    'SELECT moved, skipped, oversized FROM keyring.backfill_range($1, $2, $3)', [columnId, afterKey, lastKey]);
  return { moved: Number(r!.moved), skipped: Number(r!.skipped), oversized: Number(r!.oversized) };
}

/**
 * Closes a range and adds its counts to the job, in the range's transaction (so a kill
 * -9 loses the range in hand only and a closed range is never done again). The job
 * itself ends in adoptFinish, not here.
 */
export async function finishRange(client: pg.ClientBase, jobId: string, chunkId: string, n: RangeCounts, instanceId: string): Promise<void> {
  await client.query('DELETE FROM keyring.job_chunks WHERE job_id = $1 AND id = $2', [jobId, chunkId]);
  const { rowCount } = await client.query(
    `UPDATE keyring.jobs SET done = done + $2, skipped = skipped + $3, quarantined = quarantined + $4,
            claimed_by = $5, updated_at = clock_timestamp()
      WHERE id = $1 AND state IN ('queued', 'running')`,
    [jobId, n.moved, n.skipped, n.oversized, instanceId]);
  if (rowCount === 0) throw new KeyringError('JOB_GONE', `keyring: backfill job ${jobId} ended meanwhile`);
}

/**
 * The last step (keyring.adopt_finish): drops the plaintext column when none is left and
 * ends the job. Returns the values still in plaintext (0: adopted).
 */
export async function adoptFinish(client: pg.ClientBase, jobId: string): Promise<number> {
  const { rows: [r] } = await client.query<{ left: string }>('SELECT keyring.adopt_finish($1) AS left', [jobId]);
  return Number(r!.left);
}
