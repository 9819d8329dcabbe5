import type pg from 'pg';
import type { KeyPurpose } from '../../crypto/index.js';

export interface AuditEntry {
  readonly action: string;
  /** Sidecar instance or named person; undefined: the database role alone identifies the writer. */
  readonly actor: string | undefined;
  readonly keyPurpose?: KeyPurpose;
  readonly keyVersion?: number;
  readonly columnId?: number;
  /** Canonical row key of the value concerned (decryption failures, reveals). */
  readonly rowKey?: string;
  readonly reason?: string;
  /** Identifiers and counts only: never a value, a key or a ciphertext. */
  readonly detail?: Record<string, unknown>;
}

/** Appends one row to the hash-chained audit log (serialised by an advisory lock until commit). */
export async function auditAppend(client: pg.ClientBase, e: AuditEntry): Promise<void> {
  await client.query(
    `SELECT keyring.audit_append($1, p_actor => $2, p_key_purpose => $3::keyring.key_purpose, p_key_version => $4,
                                 p_column_id => $5, p_reason => $6, p_detail => $7::jsonb, p_row_key => $8)`,
    [e.action, e.actor ?? null, e.keyPurpose ?? null, e.keyVersion ?? null, e.columnId ?? null, e.reason ?? null,
      JSON.stringify(e.detail ?? {}), e.rowKey ?? null],
  );
}
