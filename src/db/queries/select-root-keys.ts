import type pg from 'pg';
import type { KeyPurpose } from '../../crypto/index.js';

export interface RootKeyRow {
  readonly purpose: KeyPurpose;
  readonly version: number;
  readonly fingerprint: string;
  readonly state: string;
}

/** The key version registry (fingerprints and states only: material never enters the database). */
export async function selectRootKeys(client: pg.ClientBase): Promise<RootKeyRow[]> {
  const { rows } = await client.query<RootKeyRow>(
    `SELECT purpose::text AS purpose, version, fingerprint, state::text AS state
       FROM keyring.root_keys ORDER BY purpose, version`,
  );
  return rows;
}
