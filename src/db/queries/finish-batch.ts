import type pg from 'pg';

/**
 * Removes encrypted values from the queue (it holds nothing once a value is encrypted).
 * By ctid: the rows are locked by this transaction, so their addresses cannot change,
 * and a TID scan costs the same whatever the planner believes about the queue's size
 * (`id = ANY(...)` went to a sequential scan on stale statistics).
 */
export async function deletePending(client: pg.ClientBase, ctids: readonly string[]): Promise<void> {
  await client.query('DELETE FROM keyring.pending WHERE ctid = ANY($1::tid[])', [ctids]);
}

/** Adds this batch's encryptions to each data key's counter, in one statement. */
export async function addEncryptions(client: pg.ClientBase, counts: ReadonlyMap<bigint, number>): Promise<void> {
  if (counts.size === 0) return;
  await client.query(
    `UPDATE keyring.data_keys d SET encryptions = d.encryptions + u.n
       FROM unnest($1::bigint[], $2::bigint[]) AS u(id, n) WHERE d.id = u.id`,
    [[...counts.keys()].map(String), [...counts.values()]],
  );
}
