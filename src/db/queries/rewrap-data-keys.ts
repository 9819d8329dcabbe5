import type pg from 'pg';
import { encodeByteaArray } from '../binary-array.js';

export interface WrappedKeyRow {
  readonly id: string; // bigint as text
  readonly root_version: number;
  readonly wrapped: Buffer;
}

/**
 * The next `limit` data keys after `afterId` still wrapped by another version than
 * `target` (keyset pagination on the primary key; shredded keys have nothing to rewrap),
 * locked until the batch commits. FOR UPDATE, not SKIP LOCKED: a key locked by a write
 * batch (its encryption counter) must be waited for, not passed over by the cursor.
 */
export async function selectRewrapBatch(client: pg.ClientBase, target: number, afterId: string, limit: number): Promise<WrappedKeyRow[]> {
  const { rows } = await client.query<WrappedKeyRow>(
    `SELECT id, root_version, wrapped FROM keyring.data_keys
      WHERE id > $2 AND root_version <> $1 AND wrapped IS NOT NULL
      ORDER BY id
      LIMIT $3
        FOR UPDATE`,
    [target, afterId, limit],
  );
  return rows;
}

/**
 * Stores data keys rewrapped under `target`, in one statement, only while `target` is
 * still the active encrypt version (else nothing is written and the caller retries,
 * then finds the job superseded). Returns the number of keys written.
 */
export async function rewrapDataKeys(client: pg.ClientBase, target: number, ids: readonly string[], wrapped: readonly Buffer[]): Promise<number> {
  if (ids.length === 0) return 0;
  const { rowCount } = await client.query(
    `UPDATE keyring.data_keys d SET wrapped = u.wrapped, root_version = $1
       FROM unnest($2::bigint[], $3::bytea[]) AS u(id, wrapped)
      WHERE d.id = u.id
        AND EXISTS (SELECT 1 FROM keyring.root_keys r WHERE r.purpose = 'encrypt' AND r.version = $1 AND r.state = 'active')`,
    [target, ids, encodeByteaArray(wrapped)], // binary: no hex text of 60 bytes per key either way
  );
  return rowCount ?? 0;
}

/** Ids of data keys still wrapped by another version than `target`, lowest first (reports). */
export async function selectNotOnVersion(client: pg.ClientBase, target: number, limit: number): Promise<string[]> {
  const { rows } = await client.query<{ id: string }>(
    `SELECT id FROM keyring.data_keys WHERE root_version <> $1 AND wrapped IS NOT NULL ORDER BY id LIMIT $2`,
    [target, limit]);
  return rows.map((r) => r.id);
}
