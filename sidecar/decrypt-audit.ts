/**
 * Decryption failures the sidecar meets, into the audit log: a data key row that does not
 * unwrap under its (fingerprint-matched) root key was altered in the database. Audited as
 * `decrypt.failed` (reason class data_key_unwrap, data key id; never bytes) once per data
 * key per process: the batch that needs the key is retried with backoff, and each retry
 * would otherwise add a row. Fire and forget: the audit write must not fail the batch
 * (the batch fails anyway, retryably).
 */
import { describeError } from '../src/db/errors.js';
import type { Db } from '../src/db/pool.js';
import { auditAppend } from '../src/db/queries/audit-append.js';
import type { Logger } from '../src/log.js';

export interface UnwrapFailure {
  readonly dataKeyId: bigint;
  readonly columnId: number;
  readonly rootVersion: number;
}

export function unwrapFailureReporter(db: () => Db, instanceId: string, log: Logger): (f: UnwrapFailure) => void {
  const reported = new Set<bigint>();
  return (f) => {
    if (reported.has(f.dataKeyId)) return;
    reported.add(f.dataKeyId);
    db().with((c) => auditAppend(c, {
      action: 'decrypt.failed', actor: instanceId, keyPurpose: 'encrypt', keyVersion: f.rootVersion,
      columnId: f.columnId, reason: 'data_key_unwrap', detail: { data_key_id: String(f.dataKeyId) },
    })).catch((err: unknown) => {
      reported.delete(f.dataKeyId); // try again at the next failure
      log.warn({ err: { message: describeError(err) }, dataKeyId: String(f.dataKeyId) }, 'could not audit a data key unwrap failure');
    });
  };
}
