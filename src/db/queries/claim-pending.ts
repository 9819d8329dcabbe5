import type pg from 'pg';

export interface PendingRow {
  readonly id: string; // bigint as text
  /** Plaintext bytes (octet_length reads the stored length; nothing is decompressed). */
  readonly size: number;
  /** Physical row address, stable while this transaction holds the row lock (TID-scan delete). */
  readonly ctid: string;
  readonly column_id: number;
  readonly row_key: string;
  /** Inline when at most INLINE_BYTES; larger values are fetched by fetchValues once budgeted. */
  readonly value: Buffer | null;
  readonly subject: string | null;
  readonly tenant: string | null;
  readonly attempts: number;
}

/**
 * Claims up to `limit` queued values, oldest first, skipping rows another sidecar has
 * locked. Run inside a transaction: the row locks are the claim (no lease column), so a
 * crashed sidecar's claim ends with its session (case C15a) and two sidecars never
 * claim the same row. Locks queue entries before base rows, the order the staging
 * triggers use too.
 *
 * One ordered index scan under LIMIT, not `WITH c AS (... FOR UPDATE SKIP LOCKED)
 * SELECT p.* FROM pending p JOIN c`: the same claim, but the self-join let the planner
 * hash-join the whole queue on a queue table's stale statistics (measured 21-45 ms per
 * claim on a 100k backlog, against 2 ms).
 *
 * `afterId` is the drain's keyset cursor: deleted entries stay in the index until
 * vacuum, and a scan from the start steps over every one of them on each claim. A drain
 * ends only after a short claim from id 0, so rows left behind the cursor (another
 * sidecar's rolled-back batch, a retried row) are never missed.
 */
export async function claimPending(client: pg.ClientBase, limit: number, afterId = '0'): Promise<PendingRow[]> {
  const { rows } = await client.query<PendingRow>(
    `SELECT id, ctid::text AS ctid, column_id, row_key, octet_length(value) AS size,
            CASE WHEN octet_length(value) <= ${INLINE_BYTES} THEN value END AS value, subject, tenant, attempts
       FROM keyring.pending
      WHERE id > $2
      ORDER BY id
      LIMIT $1
        FOR UPDATE SKIP LOCKED`,
    [limit, afterId],
  );
  return rows;
}

/**
 * Values larger than this are not sent with the claim: the batch first decides how many
 * of them fit its byte budget, so a backlog of 8 MiB values never lands in memory at once.
 */
export const INLINE_BYTES = 65_536;

/** The values of claimed rows that came without one (large values), by row address. */
export async function fetchValues(client: pg.ClientBase, ctids: readonly string[]): Promise<Map<string, Buffer>> {
  const out = new Map<string, Buffer>();
  for (const ctid of ctids) {
    // One value at a time: each arrives as hex text twice its size before it is parsed.
    // (node-postgres decodes every result field as UTF-8 text even when binary results
    // are requested per query, which would corrupt binary values, so text it is.)
    const { rows } = await client.query<{ value: Buffer }>('SELECT value FROM keyring.pending WHERE ctid = $1::tid', [ctid]);
    if (rows[0]) out.set(ctid, rows[0].value);
  }
  return out;
}

/** Claims one queued value by id (the one-at-a-time retry after a failed batch). */
export async function claimPendingById(client: pg.ClientBase, id: string): Promise<PendingRow | undefined> {
  const { rows } = await client.query<PendingRow>(
    `SELECT id, ctid::text AS ctid, column_id, row_key, octet_length(value) AS size, value, subject, tenant, attempts
       FROM keyring.pending WHERE id = $1 FOR UPDATE SKIP LOCKED`,
    [id],
  );
  return rows[0];
}
