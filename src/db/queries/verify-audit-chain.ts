import type pg from 'pg';

export interface ChainProblem {
  /** The first row found broken, or the row the chain head names; null when the head row itself is gone. */
  readonly id: string | null;
  readonly problem: string;
}

export interface ChainHead {
  readonly id: string;
  /** Hex SHA-256 of the last row ('' while the log is empty). */
  readonly hash: string;
  readonly rows: string;
}

/** keyring.verify_audit_chain(): the first broken or missing link, or undefined when the chain is whole. */
export async function verifyAuditChain(client: pg.ClientBase): Promise<ChainProblem | undefined> {
  const { rows } = await client.query<{ id: string | null; problem: string }>(
    'SELECT id::text, problem FROM keyring.verify_audit_chain()');
  return rows[0];
}

/** The head of the chain: anchor it outside the database to detect a rewritten log later. */
export async function auditHead(client: pg.ClientBase): Promise<ChainHead> {
  const { rows } = await client.query<ChainHead>(
    `SELECT h.id::text, encode(h.hash, 'hex') AS hash, (SELECT count(*) FROM keyring.audit_log)::text AS rows
       FROM keyring.audit_head h`);
  return rows[0] ?? { id: '0', hash: '', rows: '0' };
}

/** Whether row `id` still holds `hashHex` (an anchor taken earlier with auditHead). */
export async function anchorHolds(client: pg.ClientBase, id: string, hashHex: string): Promise<boolean> {
  const { rows } = await client.query<{ ok: boolean }>(
    `SELECT EXISTS (SELECT 1 FROM keyring.audit_log WHERE id = $1::bigint AND hash = decode($2, 'hex')) AS ok`, [id, hashHex]);
  return rows[0]?.ok === true;
}
