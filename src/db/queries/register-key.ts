import type pg from 'pg';
import type { KeyPurpose } from '../../crypto/index.js';

/** Registers a fingerprint as a new `pending` version (idempotent); returns its version. */
export async function registerKey(client: pg.ClientBase, purpose: KeyPurpose, fingerprint: string): Promise<number> {
  const { rows } = await client.query<{ v: number }>('SELECT keyring.register_key($1, $2) AS v', [purpose, fingerprint]);
  return Number(rows[0]!.v);
}
