import type pg from 'pg';

/** Counts a failed attempt on one queued value; returns the attempts so far (undefined if gone). */
export async function recordFailure(client: pg.ClientBase, id: string, message: string): Promise<number | undefined> {
  const { rows } = await client.query<{ attempts: number }>(
    `UPDATE keyring.pending SET attempts = attempts + 1, last_error = $2 WHERE id = $1 RETURNING attempts`,
    [id, message],
  );
  return rows[0]?.attempts;
}

/**
 * Moves a queued value that keeps failing to keyring.quarantine (identifiers and the
 * reason only, never its bytes) and removes it from the queue, so it cannot wedge it.
 */
export async function quarantinePending(client: pg.ClientBase, id: string, reason: string, detail: string): Promise<{ column_id: number; row_key: string } | undefined> {
  const { rows } = await client.query<{ column_id: number; row_key: string }>(
    `WITH d AS (DELETE FROM keyring.pending WHERE id = $1 RETURNING column_id, row_key),
          q AS (INSERT INTO keyring.quarantine (column_id, row_key, reason, detail)
                SELECT column_id, row_key, $2, $3 FROM d
                -- One open entry per value (quarantine_open_uq): the first report stands.
                ON CONFLICT (column_id, row_key) WHERE resolved_at IS NULL DO NOTHING)
     SELECT column_id, row_key FROM d`,
    [id, reason, detail],
  );
  return rows[0];
}
