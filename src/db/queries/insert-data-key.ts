import type pg from 'pg';

/** A fresh id from the data key sequence: the id is bound into the wrapping AAD, so it is drawn first. */
export async function nextDataKeyId(client: pg.ClientBase): Promise<bigint> {
  const { rows } = await client.query<{ id: string }>(`SELECT nextval('keyring.data_keys_id_seq') AS id`);
  return BigInt(rows[0]!.id);
}

/**
 * Inserts a new active data key unless another process created the active key of this
 * (column, subject) first (partial unique index data_keys_one_active), or the root
 * version is no longer active (a sidecar whose registry is a moment stale must not wrap
 * a key under a version that retire_key may be about to retire). Returns true when this
 * row was inserted; on false the caller re-reads the winner.
 */
export async function insertDataKey(
  client: pg.ClientBase,
  k: { id: bigint; columnId: number; subject: string | null; rootVersion: number; wrapped: Buffer },
): Promise<boolean> {
  const { rowCount } = await client.query(
    `INSERT INTO keyring.data_keys (id, column_id, subject, root_version, wrapped, generation)
     SELECT $1::bigint, $2::integer, $3::text, $4::integer, $5::bytea, 1 + coalesce((SELECT max(generation) FROM keyring.data_keys
                                             WHERE column_id = $2 AND coalesce(subject, '') = coalesce($3, '')), 0)
      WHERE EXISTS (SELECT 1 FROM keyring.root_keys WHERE purpose = 'encrypt' AND version = $4 AND state = 'active')
     ON CONFLICT (column_id, coalesce(subject, '')) WHERE state = 'active' DO NOTHING`,
    [k.id.toString(), k.columnId, k.subject, k.rootVersion, k.wrapped],
  );
  return rowCount === 1;
}

/**
 * Retires an active data key that reached its encryption bound, so that the next
 * lookup creates a new one (2^32: NIST SP 800-38D bound for random 96-bit IVs).
 */
export async function retireDataKey(client: pg.ClientBase, id: bigint): Promise<void> {
  await client.query(`UPDATE keyring.data_keys SET state = 'retired' WHERE id = $1 AND state = 'active'`, [id.toString()]);
}
