import type pg from 'pg';
import type { DataKeyRow } from './active-data-keys.js';

/** Data keys by id (any state), for unwrapping. */
export async function selectDataKeys(client: pg.ClientBase, ids: readonly bigint[]): Promise<DataKeyRow[]> {
  const { rows } = await client.query<DataKeyRow>(
    `SELECT id, column_id, subject, root_version, wrapped, encryptions, state
       FROM keyring.data_keys WHERE id = ANY($1::bigint[])`,
    [ids.map(String)],
  );
  return rows;
}
