import { KeyringError } from '../../crypto/index.js';
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

/**
 * Adds this batch's encryptions to each data key's counter, in one statement, only while
 * the total stays within `max` (2^32: NIST SP 800-38D bound for random 96-bit IVs). The
 * check reads the counter under the row lock the UPDATE takes, so concurrent batches (of
 * one sidecar or several) can never push a key past the bound together: the batch that
 * would is refused with DATA_KEY_WORN, rolls back, and is redone under a new key.
 */
export async function addEncryptions(client: pg.ClientBase, counts: ReadonlyMap<bigint, number>, max: bigint): Promise<void> {
  if (counts.size === 0) return;
  // Lock the key rows in id order first: batches of two lanes or two sidecars that share
  // several keys would otherwise lock them in plan order and could deadlock.
  await client.query('SELECT 1 FROM keyring.data_keys WHERE id = ANY($1::bigint[]) ORDER BY id FOR UPDATE',
    [[...counts.keys()].map(String)]);
  const { rowCount } = await client.query(
    `UPDATE keyring.data_keys d SET encryptions = d.encryptions + u.n
       FROM unnest($1::bigint[], $2::bigint[]) AS u(id, n) WHERE d.id = u.id AND d.encryptions + u.n <= $3::bigint`,
    [[...counts.keys()].map(String), [...counts.values()], max.toString()],
  );
  if ((rowCount ?? 0) < counts.size) {
    throw new KeyringError('DATA_KEY_WORN', 'keyring: a data key reached its encryption bound during this batch; the batch is redone under a new key');
  }
}
