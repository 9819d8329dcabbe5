import type pg from 'pg';

/** Why a value is not revealed although the actor may reveal (keyring.audit_reveal p_refusal). */
export type RevealRefusal = 'erased' | 'pending' | 'no_row';

export interface RevealAudit {
  readonly actor: string | undefined;
  readonly columnId: number;
  readonly rowKey: string;
  readonly purpose: string;
  /** Encrypt root version of the value's data key, when known. */
  readonly keyVersion?: number;
  readonly refusal?: RevealRefusal;
  /** Identifiers only (data key id): never the value. */
  readonly detail?: Record<string, unknown>;
}

/** Whether `actor` (or, without one, the session's role) is on the allow list (setting reveal_actors). */
export async function revealAllowed(client: pg.ClientBase, actor: string | undefined): Promise<boolean> {
  const { rows } = await client.query<{ ok: boolean }>('SELECT keyring.reveal_allowed($1) AS ok', [actor ?? null]);
  return rows[0]?.ok === true;
}

/**
 * Writes the reveal's audit row: 'reveal' (returns true) or 'reveal.refused' (false, when
 * the actor is not allowed or `refusal` is set). The caller commits before acting on it.
 */
export async function auditReveal(client: pg.ClientBase, r: RevealAudit): Promise<boolean> {
  const { rows } = await client.query<{ ok: boolean }>(
    `SELECT keyring.audit_reveal($1, $2, $3, $4, p_key_version => $5, p_refusal => $6, p_detail => $7::jsonb) AS ok`,
    [r.actor ?? null, r.columnId, r.rowKey, r.purpose, r.keyVersion ?? null, r.refusal ?? null, JSON.stringify(r.detail ?? {})],
  );
  return rows[0]?.ok === true;
}
