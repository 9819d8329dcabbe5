/**
 * Rewrap (encrypt root rotation, DESIGN.md "Key hierarchy"): every data key wrapped by
 * an older encrypt root version is unwrapped and wrapped again under the job's target,
 * the active version. Values are untouched and no key leaves this process unwrapped.
 *
 * One batch per transaction, in the runner's transaction that holds the job row:
 * keyset pagination by data key id, an UPDATE per chunk of keys, cursor and counters
 * advanced in the same transaction. A crash rolls back the batch in hand only; a key
 * already on the target is never selected again (idempotent). A key that does not
 * unwrap is left as it is, counted as failed and passed by the cursor (never a loop).
 */
import type pg from 'pg';
import { DecryptError, unwrapDataKey, wrapDataKey, type IvPool } from '../../src/crypto/index.js';
import { auditAppend } from '../../src/db/queries/audit-append.js';
import type { JobRow } from '../../src/db/queries/claim-job.js';
import { rewrapDataKeys, selectNotOnVersion, selectRewrapBatch, type WrappedKeyRow } from '../../src/db/queries/rewrap-data-keys.js';
import { advanceJob } from '../../src/db/queries/update-job.js';
import { KeyUnavailableError } from '../../src/keys/errors.js';
import type { HeldKey, RootKeyStore } from '../../src/keys/root-keys.js';
import type { Logger } from '../../src/log.js';
import { JobFailure, type JobHandler } from './runner.js';

/** Failed data key ids named in the audit row of a finished rotation (the rest: counted). */
const AUDIT_FAILED_IDS = 100;
/**
 * Keys per UPDATE within a batch: the next chunk is unwrapped and wrapped while the
 * server writes the previous one. Node and the server each spend about 2 s of CPU per
 * 100k keys on the 2-core dev machine, so overlapping them is what shortens a batch
 * (measured 25-38 % less wall time than one UPDATE per 5,000-key batch).
 */
const CHUNK = 1000;

export interface RewrapContext {
  readonly rootKeys: () => RootKeyStore;
  readonly ivPool: IvPool;
  readonly instanceId: string;
  readonly logger: Logger;
  /** Test-only pause inside each batch transaction (crash tests); 0 in production. */
  readonly testDelayMs: number;
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

export function rewrapHandler(ctx: RewrapContext): JobHandler {
  return {
    kind: 'rewrap',
    failedAction: 'rotation.failed',

    /** Runs here only with the target's material (every older live version is held, or the sidecar is paused). */
    canRun(job: JobRow): boolean {
      return job.purpose === 'encrypt' && job.target_version !== null && ctx.rootKeys().get('encrypt', job.target_version) !== undefined;
    },

    async runBatch(client: pg.ClientBase, job: JobRow): Promise<boolean> {
      if (job.purpose !== 'encrypt' || job.target_version === null) throw new JobFailure('a rewrap job needs purpose encrypt and a target version');
      if (job.target_state !== 'active') {
        throw new JobFailure(`superseded: encrypt key version ${job.target_version} is ${job.target_state ?? 'not registered'}, ` +
          "no longer active; run SELECT keyring.rotate('encrypt') again");
      }
      const keys = ctx.rootKeys();
      const target = keys.require('encrypt', job.target_version);
      const rows = await selectRewrapBatch(client, target.version, job.cursor ?? '0', job.batch_size);
      const failed: string[] = [];
      let rewrapped = 0;
      let written = 0;
      let inFlight: Promise<number> | undefined;
      try {
        for (let i = 0; i < rows.length; i += CHUNK) {
          const part = rewrap(rows.slice(i, i + CHUNK), keys, target, ctx.ivPool, failed);
          rewrapped += part.ids.length;
          if (inFlight) written += await inFlight;
          inFlight = rewrapDataKeys(client, target.version, part.ids, part.wrapped);
        }
        if (inFlight) written += await inFlight;
      } catch (err) {
        await inFlight?.catch(() => undefined); // the session is rolled back by the runner
        throw err;
      }
      if (written !== rewrapped) {
        throw new KeyUnavailableError(`encrypt key version ${target.version} stopped being active during a rewrap batch; retrying`);
      }
      if (failed.length > 0) {
        ctx.logger.warn({ job: job.id, dataKeyIds: failed }, 'data keys that do not unwrap were left under their old version');
      }
      if (ctx.testDelayMs > 0) await sleep(ctx.testDelayMs);
      const finished = rows.length < job.batch_size;
      const totals = await advanceJob(client, job.id, {
        cursor: rows.at(-1)?.id ?? job.cursor ?? '0', done: written, failed: failed.length, finished, instanceId: ctx.instanceId,
      });
      if (finished) {
        const seconds = totals.seconds;
        // Last statement before COMMIT: audit_append holds the chain's lock until commit.
        await auditAppend(client, {
          action: 'rotation.finished', actor: ctx.instanceId, keyPurpose: 'encrypt', keyVersion: target.version,
          detail: {
            job: Number(job.id), kind: 'rewrap', done: Number(totals.done), failed: Number(totals.failed), seconds,
            // What is left on older versions at the end is what failed (or a key a stale sidecar added meanwhile).
            ...(Number(totals.failed) > 0 ? { failed_data_key_ids_first: await selectNotOnVersion(client, target.version, AUDIT_FAILED_IDS) } : {}),
          },
        });
        ctx.logger.info({ job: job.id, done: Number(totals.done), failed: Number(totals.failed), seconds }, 'rewrap finished');
      }
      return finished;
    },
  };
}

/** Unwraps each key with its old root and wraps it under `target`; keys that do not unwrap go to `failed`. */
function rewrap(rows: readonly WrappedKeyRow[], keys: RootKeyStore, target: HeldKey, ivPool: IvPool, failed: string[]): { ids: string[]; wrapped: Buffer[] } {
  const ids: string[] = [];
  const wrapped: Buffer[] = [];
  for (const row of rows) {
    // Not held here: retryable (KEY_UNAVAILABLE rolls the batch back), never a failed key.
    const old = keys.require('encrypt', row.root_version);
    const id = BigInt(row.id);
    let dk;
    try {
      dk = unwrapDataKey(old.key, row.root_version, id, row.wrapped);
    } catch (err) {
      if (!(err instanceof DecryptError)) throw err;
      failed.push(row.id); // altered bytes, id or version: left as it is, reported
      continue;
    }
    try {
      wrapped.push(wrapDataKey(target.key, target.version, id, dk, ivPool));
      ids.push(row.id);
    } finally {
      dk.dispose();
    }
  }
  return { ids, wrapped };
}
