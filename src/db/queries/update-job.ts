import type pg from 'pg';

export interface JobAdvance {
  readonly cursor: string;
  /** Items done and failed in this batch (added to the job's counters). */
  readonly done: number;
  readonly failed: number;
  /** The batch found the end: the job is done. */
  readonly finished: boolean;
  readonly instanceId: string;
}

/**
 * Records one batch in the job row, in the batch's transaction (the row is locked by
 * claimJob): cursor and counters move together with the work, so a crash loses nothing
 * and repeats nothing. Returns the job's totals after the batch and its running time.
 */
export async function advanceJob(client: pg.ClientBase, id: string, a: JobAdvance): Promise<{ done: string; failed: string; seconds: number }> {
  const { rows } = await client.query<{ done: string; failed: string; seconds: number }>(
    `UPDATE keyring.jobs
        SET cursor = $2, done = done + $3, failed = failed + $4, claimed_by = $6,
            state = CASE WHEN $5 THEN 'done' ELSE 'running' END,
            started_at = coalesce(started_at, now()), updated_at = clock_timestamp(),
            finished_at = CASE WHEN $5 THEN clock_timestamp() END
      WHERE id = $1
      RETURNING done, failed, extract(epoch FROM coalesce(finished_at, clock_timestamp()) - started_at)::float8 AS seconds`,
    [id, a.cursor, a.done, a.failed, a.finished, a.instanceId],
  );
  return rows[0]!;
}

/**
 * Ends a job that cannot go on (superseded target, unsupported kind, a bug): it must not be
 * retried forever. False when the job had already ended (another sidecar failed it first).
 */
export async function failJob(client: pg.ClientBase, id: string, error: string, instanceId: string): Promise<boolean> {
  const r = await client.query(
    `UPDATE keyring.jobs SET state = 'failed', error = $2, claimed_by = $3, updated_at = clock_timestamp(),
            finished_at = clock_timestamp()
      WHERE id = $1 AND state IN ('queued', 'running')`,
    [id, error, instanceId],
  );
  return (r.rowCount ?? 0) > 0;
}
