import type pg from 'pg';

/**
 * Folds keyring.value_counts (the status counters' delta rows) into one row per column and
 * bucket, so that keyring.status reads a few rows. Returns the delta rows folded: 0 when
 * there was nothing to fold or another session holds the compaction lock.
 */
export async function compactValueCounts(client: pg.ClientBase): Promise<number> {
  const { rows } = await client.query<{ n: string }>('SELECT keyring.compact_value_counts() AS n');
  return Number(rows[0]!.n);
}
