import type pg from 'pg';

export interface JobRow {
  readonly id: string; // bigint as text
  readonly kind: string;
  readonly purpose: 'encrypt' | 'index' | null;
  readonly target_version: number | null;
  readonly state: 'queued' | 'running';
  readonly cursor: string | null;
  readonly done: string; // bigint as text
  readonly failed: string; // bigint as text
  readonly total: string | null;
  readonly batch_size: number;
  readonly started_at: Date | null;
  /** The protected column of a re-encryption job (NULL for other kinds). */
  readonly column_id: number | null;
  readonly key_floor: string | null;
  /** Registry state of the job's target version now (NULL when the job has none). */
  readonly target_state: string | null;
}

/** Whether any job waits (a cheap check before opening a claim transaction on every poll). */
export async function openJobExists(client: pg.ClientBase | pg.Pool, kinds: readonly string[]): Promise<boolean> {
  const { rows } = await client.query(
    `SELECT 1 FROM keyring.jobs WHERE state IN ('queued', 'running') AND kind = ANY($1::text[]) LIMIT 1`, [kinds]);
  return rows.length > 0;
}

/**
 * Claims the oldest unfinished job of the given kinds for one batch. Run inside the
 * batch's transaction: the row lock is the claim (no lease), so a crashed sidecar's
 * claim ends with its session and another sidecar continues from the committed cursor.
 * `skip` leaves out jobs this sidecar cannot run (it lacks a key another sidecar holds).
 */
export async function claimJob(client: pg.ClientBase, kinds: readonly string[], skip: readonly string[] = []): Promise<JobRow | undefined> {
  const { rows } = await client.query<JobRow>(
    `SELECT j.id, j.kind, j.purpose::text AS purpose, j.target_version, j.state, j.cursor, j.done, j.failed, j.total,
            j.batch_size, j.started_at, j.column_id, j.key_floor, r.state::text AS target_state
       FROM keyring.jobs j
       LEFT JOIN keyring.root_keys r ON r.purpose = j.purpose AND r.version = j.target_version
      WHERE j.state IN ('queued', 'running') AND j.kind = ANY($1::text[]) AND NOT (j.id = ANY($2::bigint[]))
      ORDER BY j.id
      LIMIT 1
        FOR UPDATE OF j SKIP LOCKED`,
    [kinds, skip],
  );
  return rows[0];
}
