/**
 * The audit rows of a decryption: what was decrypted (counts per encrypt root version,
 * never values) and every value that failed, with its column, row key and reason class
 * (never bytes). Written by the library's decrypt path (Keyring.decryptColumn, reveal);
 * the caller commits them before any value is handed out.
 */
import type pg from 'pg';
import type { DecryptFailureReason } from '../crypto/index.js';
import { auditAppend, type AuditEntry } from '../db/queries/audit-append.js';

/**
 * Why a value could not be decrypted, as recorded in decrypt.failed's reason:
 * format / length / auth (the crypto core's classes: not an envelope, too short, failed
 * authentication: wrong key, tampered or moved), key_unavailable (the data key is missing
 * or its root version is not held), data_key_unwrap (the data key row itself was altered),
 * nested (ciphertext encrypted twice, case C02).
 */
export type DecryptFailureClass = DecryptFailureReason | 'key_unavailable' | 'data_key_unwrap' | 'nested';

/** Why a value is not returned: still queued, erased by crypto-shredding, or a failure. */
export type ValueProblem = 'pending' | 'erased' | DecryptFailureClass;

/** Failures audited one row each per call; more are summed up in one row (a bulk read of a tampered table must not flood the log). */
export const FAILURES_AUDITED = 100;
/** Data key ids listed in a decrypt.batch row; beyond this only their number. */
const KEY_IDS_LISTED = 100;

export interface AuditedValue {
  readonly rowKey: string;
  readonly value: unknown;
  readonly problem?: ValueProblem;
  readonly dataKeyId?: bigint;
  readonly rootVersion?: number;
}

const isFailure = (p: ValueProblem | undefined): p is DecryptFailureClass => p !== undefined && p !== 'pending' && p !== 'erased';

/** The audit entries of one decryption call over `values` of column `columnId`. */
export function decryptionEntries(
  actor: string | undefined, columnId: number, values: readonly AuditedValue[], extra: Record<string, unknown> = {},
): AuditEntry[] {
  const groups = new Map<number | null, { count: number; erased: number; keys: Set<string> }>();
  const failures: AuditedValue[] = [];
  for (const v of values) {
    if (isFailure(v.problem)) {
      failures.push(v);
      continue;
    }
    const decrypted = v.problem === undefined && v.value !== null;
    if (!decrypted && v.problem !== 'erased') continue;
    const version = v.rootVersion ?? null;
    const g = groups.get(version) ?? { count: 0, erased: 0, keys: new Set<string>() };
    if (decrypted) g.count++;
    else g.erased++;
    if (v.dataKeyId !== undefined) g.keys.add(String(v.dataKeyId));
    groups.set(version, g);
  }
  const entries: AuditEntry[] = [];
  for (const [version, g] of groups) {
    entries.push({
      action: 'decrypt.batch', actor, columnId,
      ...(version === null ? {} : { keyPurpose: 'encrypt' as const, keyVersion: version }),
      detail: {
        ...extra, count: g.count, ...(g.erased > 0 ? { erased: g.erased } : {}),
        ...(g.keys.size <= KEY_IDS_LISTED ? { data_key_ids: [...g.keys] } : { data_keys: g.keys.size }),
      },
    });
  }
  for (const f of failures.slice(0, FAILURES_AUDITED)) {
    entries.push({
      action: 'decrypt.failed', actor, columnId, rowKey: f.rowKey, reason: f.problem!,
      ...(f.rootVersion === undefined ? {} : { keyPurpose: 'encrypt' as const, keyVersion: f.rootVersion }),
      detail: { ...extra, ...(f.dataKeyId === undefined ? {} : { data_key_id: String(f.dataKeyId) }) },
    });
  }
  if (failures.length > FAILURES_AUDITED) {
    const classes: Record<string, number> = {};
    for (const f of failures.slice(FAILURES_AUDITED)) classes[f.problem!] = (classes[f.problem!] ?? 0) + 1;
    entries.push({
      action: 'decrypt.failed', actor, columnId, reason: 'many',
      detail: { ...extra, omitted: failures.length - FAILURES_AUDITED, classes },
    });
  }
  return entries;
}

/** Appends the entries of one decryption call through `client` (the caller's transaction). */
export async function auditDecryption(
  client: pg.ClientBase, actor: string | undefined, columnId: number, values: readonly AuditedValue[],
  extra: Record<string, unknown> = {},
): Promise<void> {
  for (const e of decryptionEntries(actor, columnId, values, extra)) await auditAppend(client, e);
}
