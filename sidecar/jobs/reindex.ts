/**
 * Re-index (index root rotation, docs/key-lifecycle.md "Index root rotation"): every
 * blind-index term of a column recomputed under the active index root version. The
 * ciphertext is left as it is; each value is decrypted in memory only to compute its term.
 *
 * Ranges, claims, counters and resumption are the re-encryption job's
 * (reencrypt-chunks.ts): runBatch carves a primary-key range under the job row lock;
 * work() does one range in its own transaction (SKIP LOCKED: sidecars share a job, never
 * a range) and closes it with its counts in that same transaction, so a kill -9 rolls
 * back the range in hand only.
 *
 * Per range: the target version's registry row is share-locked and must be active (a
 * term of a version is written only while it is active: the invariant of the reindex
 * migration); rows already on the target version are not read; a row with a queued
 * application write is left to the write path (its new term is on the active version);
 * the UPDATE writes only where the ciphertext and the term are still those read
 * (compare-and-swap). A value that does not decrypt is quarantined and reported; a value
 * whose encrypt root no live sidecar holds is left as it is and counted unavailable.
 *
 * When the last range closes, the terms still on another version are counted: if any
 * (a concurrent re-encryption rewrote a ciphertext between read and compare-and-swap),
 * another pass starts over them (at most MAX_PASSES); the job is done, and audited, only
 * when none is left but quarantined or unavailable values.
 */
import type pg from 'pg';
import { blindIndexTerm, DecryptError, KeyringError, openValue, parseNormalization, readDataKeyId } from '../../src/crypto/index.js';
import type { Db } from '../../src/db/pool.js';
import { auditAppend } from '../../src/db/queries/audit-append.js';
import type { JobRow } from '../../src/db/queries/claim-job.js';
import {
  carveChunk, claimChunk, countClaim, finishChunk, heldByLiveSidecar, lockQueued, quarantineValues, selectKeyMeta,
  type ChunkCounts,
} from '../../src/db/queries/reencrypt-chunks.js';
import {
  countStaleTerms, lockIndexVersion, selectStaleTerms, updateTerms, type ReindexColumn, type TermUpdate,
} from '../../src/db/queries/reindex-rows.js';
import { selectColumns } from '../../src/db/queries/select-columns.js';
import type { DataKeyCache } from '../../src/keys/data-keys.js';
import { DataKeyShreddedError, KeyUnavailableError } from '../../src/keys/errors.js';
import type { IndexKeyCache } from '../../src/keys/index-keys.js';
import type { RootKeyStore } from '../../src/keys/root-keys.js';
import { auditDecryption, type AuditedValue, type DecryptFailureClass } from '../../src/lib/decrypt-audit.js';
import type { Logger } from '../../src/log.js';
import type { SidecarMetrics } from '../metrics.js';
import { JobFailure, type JobHandler } from './runner.js';

export interface ReindexContext {
  readonly db: Db;
  readonly dataKeys: DataKeyCache;
  readonly indexKeys: IndexKeyCache;
  readonly rootKeys: () => RootKeyStore;
  readonly instanceId: string;
  readonly logger: Logger;
  readonly metrics: SidecarMetrics;
  /** Test-only pause inside each range transaction (crash tests); 0 in production. */
  readonly testDelayMs: number;
}

/** Passes over a table at most: the first, and the final checks' passes over what was left. */
export const MAX_PASSES = 3;

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const MAX_DATA_KEY_ID = (1n << 63n) - 1n;

function safeKeyId(b: Buffer): bigint | null {
  try {
    const id = readDataKeyId(b);
    return id <= MAX_DATA_KEY_ID ? id : null;
  } catch {
    return null;
  }
}

async function loadColumn(client: pg.ClientBase, columnId: number): Promise<ReindexColumn> {
  const [c] = await selectColumns(client, [columnId]);
  if (!c) throw new JobFailure(`column ${columnId} is no longer protected`);
  if (c.bidx_column === null) throw new JobFailure(`column ${columnId} has no blind index any more`);
  const { rows } = await client.query<{ subject_column: string | null; tenant_column: string | null }>(
    'SELECT subject_column, tenant_column FROM keyring.columns WHERE id = $1', [columnId]);
  return { ...c, subject_column: rows[0]?.subject_column ?? null, tenant_column: rows[0]?.tenant_column ?? null };
}

const superseded = (v: number, state: string | null | undefined) =>
  new JobFailure(`superseded: index key version ${v} is ${state ?? 'not registered'}, no longer active; run SELECT keyring.rotate('index') again`);

export function reindexHandler(ctx: ReindexContext): JobHandler {
  return {
    kind: 'reindex',
    failedAction: 'rotation.failed',

    canRun(job: JobRow): boolean {
      return job.target_version !== null && ctx.rootKeys().get('index', job.target_version) !== undefined;
    },

    async runBatch(client: pg.ClientBase, job: JobRow): Promise<boolean> {
      if (job.column_id === null || job.target_version === null) throw new JobFailure('a reindex job needs a column and a target version');
      if (job.target_state !== 'active') throw superseded(job.target_version, job.target_state);
      const col = await loadColumn(client, job.column_id);
      const chunk = await carveChunk(client, job.id, col, job.batch_size, ctx.instanceId);
      if (!chunk) await countClaim(client, job.id);
      return false;
    },

    async work(job: JobRow): Promise<boolean> {
      return ctx.db.with(async (client) => {
        await client.query('BEGIN');
        try {
          const did = await runRange(ctx, client, job);
          await client.query('COMMIT');
          return did;
        } catch (err) {
          await client.query('ROLLBACK').catch(() => undefined);
          throw err;
        } finally {
          ctx.dataKeys.trim();
          ctx.indexKeys.trim();
        }
      });
    },
  };
}

interface Failure extends AuditedValue {
  readonly problem: DecryptFailureClass;
}

/** One range in the caller's transaction; false when no range was open for this sidecar. */
async function runRange(ctx: ReindexContext, client: pg.ClientBase, job: JobRow): Promise<boolean> {
  const chunk = await claimChunk(client, job.id);
  if (!chunk) return false;
  const target = job.target_version!;
  if (!(await lockIndexVersion(client, target))) {
    const { rows } = await client.query<{ state: string }>(`SELECT state::text FROM keyring.root_keys WHERE purpose = 'index' AND version = $1`, [target]);
    throw superseded(target, rows[0]?.state);
  }
  const col = await loadColumn(client, job.column_id!);
  const { rows: [j] } = await client.query<{ passes: number }>('SELECT passes FROM keyring.jobs WHERE id = $1', [job.id]);
  const rows = await selectStaleTerms(client, col, chunk, target, (j?.passes ?? 1) > 1);
  const meta = await selectKeyMeta(client, [...new Set(rows.map((r) => safeKeyId(r.ct)).filter((x): x is bigint => x !== null))]);
  const keys = ctx.rootKeys();
  const n = { done: 0, skipped: 0, quarantined: 0, erased: 0, unavailable: 0 };
  const failures: Failure[] = [];
  const candidates: (typeof rows[number] & { keyId: bigint; rootVersion: number; shredded: boolean })[] = [];
  const missingRoots = new Set<number>();
  for (const r of rows) {
    const keyId = safeKeyId(r.ct);
    const m = keyId === null ? undefined : meta.get(keyId);
    if (keyId === null || !m) {
      failures.push({ rowKey: r.row_key, value: null, problem: keyId === null ? (r.ct.length < 37 ? 'length' : 'format') : 'key_unavailable', ...(keyId === null ? {} : { dataKeyId: keyId }) });
      continue;
    }
    if (m.state !== 'shredded' && !keys.get('encrypt', m.root_version)) {
      if (!missingRoots.has(m.root_version) && (await heldByLiveSidecar(client, m.root_version))) {
        throw new KeyUnavailableError(`encrypt key version ${m.root_version} is not held here; leaving the range to a sidecar that holds it`);
      }
      missingRoots.add(m.root_version);
      n.unavailable++;
      continue;
    }
    candidates.push({ ...r, keyId, rootVersion: m.root_version, shredded: m.state === 'shredded' });
  }
  if (missingRoots.size > 0) {
    ctx.logger.warn({ job: job.id, columnId: col.id, versions: [...missingRoots], rows: n.unavailable },
      'values under an encrypt root version no live sidecar holds keep their old term (not quarantined)');
  }
  const queued = await lockQueued(client, col.id, candidates.map((c) => c.row_key));
  const todo = candidates.filter((c) => !queued.has(c.row_key));
  n.skipped += candidates.length - todo.length;

  const dks = new Map<bigint, Awaited<ReturnType<DataKeyCache['byIds']>> extends Map<bigint, infer V> ? V : never>();
  const keyProblems = new Map<bigint, 'erased' | 'data_key_unwrap'>();
  for (const keyId of new Set(todo.filter((t) => !t.shredded).map((t) => t.keyId))) {
    try {
      for (const [k, v] of await ctx.dataKeys.byIds(client, [keyId], { allowDisabledRoot: true })) dks.set(k, v);
    } catch (err) {
      if (err instanceof DataKeyShreddedError) keyProblems.set(keyId, 'erased');
      else if (err instanceof KeyUnavailableError) keyProblems.set(keyId, 'data_key_unwrap'); // root held: the key row was altered
      else throw err;
    }
  }
  const spec = parseNormalization(col.normalize);
  const isText = col.data_type !== 'bytea';
  const updates: TermUpdate[] = [];
  for (const t of todo) {
    const kp = t.shredded ? 'erased' : keyProblems.get(t.keyId);
    if (kp === 'erased') {
      // The value is gone for good: its term goes too (as keyring.shred does), so that
      // nothing keeps the old index version alive.
      n.erased++;
      updates.push({ rowKey: t.row_key, term: null, ct: t.ct, old: t.term });
      continue;
    }
    const known = { dataKeyId: t.keyId, rootVersion: t.rootVersion };
    if (kp) { failures.push({ rowKey: t.row_key, value: null, problem: kp, ...known }); continue; }
    let plain: Buffer | undefined;
    try {
      plain = openValue(dks.get(t.keyId)!.key, col.id, t.row_key, t.ct);
      const ik = ctx.indexKeys.forVersion(target, col.id, t.tenant);
      updates.push({ rowKey: t.row_key, term: blindIndexTerm(ik.key, target, plain, spec, col.index_bytes, isText), ct: t.ct, old: t.term });
    } catch (err) {
      if (err instanceof DecryptError) failures.push({ rowKey: t.row_key, value: null, problem: err.reason ?? 'auth', ...known });
      // A stored value the write path could index can be indexed again; anything else
      // (invalid UTF-8 under a normalisation) is reported, never a wedged job.
      else if (err instanceof KeyringError && (err.code === 'INVALID_UTF8' || err.code === 'BAD_NORMALIZATION')) failures.push({ rowKey: t.row_key, value: null, problem: 'format', ...known });
      else throw err;
    } finally {
      plain?.fill(0);
    }
  }
  const written = await updateTerms(client, col, updates);
  const erasedWritten = updates.filter((u) => u.term === null).length;
  n.done += written - Math.min(written, erasedWritten);
  n.skipped += updates.length - written; // an application write (or a re-encryption) won the race
  n.quarantined += failures.length;
  await quarantineValues(client, col.id, failures.map((f) => ({ rowKey: f.rowKey, detail: `re-index job ${job.id}: ${f.problem}` })));
  if (ctx.testDelayMs > 0) await sleep(ctx.testDelayMs);
  const totals = await finishChunk(client, job.id, chunk.id, n as ChunkCounts, ctx.instanceId);
  if (totals.finished) await finishPass(ctx, client, job, col, totals);
  else if (totals.unavailable > 0) await setUnavailableError(client, job.id); // finishChunk words it for a re-encryption
  // Audit last: audit_append holds the chain's lock until commit.
  if (failures.length > 0) {
    await auditDecryption(client, ctx.instanceId, col.id, failures, { via: 'reindex', job: Number(job.id) });
    ctx.metrics.quarantined.inc(failures.length);
    for (const f of failures) {
      ctx.logger.error({ job: job.id, columnId: col.id, rowKey: f.rowKey, reason: f.problem }, 'value did not decrypt during re-index; quarantined, its term left as it is');
    }
  }
  return true;
}

async function setUnavailableError(client: pg.ClientBase, jobId: string): Promise<void> {
  await client.query(
    `UPDATE keyring.jobs SET error = format('%s value(s) need an encrypt root version no live sidecar holds; their terms were left on the old index version: '
                                           || 'start a sidecar with it and run SELECT keyring.rotate(''index'') again', unavailable)
      WHERE id = $1 AND unavailable > 0`, [jobId]);
}

/**
 * The last range of a pass closed (finishChunk marked the job done, under the job row
 * lock, in this transaction): count the terms still on another version. Any that a new
 * pass could move (neither quarantined nor unavailable here) start one; otherwise the
 * job stays done and is audited.
 */
async function finishPass(ctx: ReindexContext, client: pg.ClientBase, job: JobRow, col: ReindexColumn, totals: Awaited<ReturnType<typeof finishChunk>>): Promise<void> {
  const target = job.target_version!;
  const left = await countStaleTerms(client, col, target);
  const { rows: [j] } = await client.query<{ passes: number }>('SELECT passes FROM keyring.jobs WHERE id = $1', [job.id]);
  const passes = j!.passes;
  if (left.stale > totals.unavailable && passes < MAX_PASSES) {
    // A new pass from the start; only stale, unquarantined terms are read, so it costs a
    // scan of the primary key plus the rows left. `unavailable` is per pass.
    await client.query(
      `UPDATE keyring.jobs SET state = 'running', finished_at = NULL, pass_done = false, cursor = NULL, passes = passes + 1,
                               unavailable = 0, error = NULL WHERE id = $1`, [job.id]);
    ctx.logger.info({ job: job.id, columnId: col.id, stale: left.stale, pass: passes + 1 }, 're-index pass done; terms still on another index version: one more pass');
    return;
  }
  if (left.stale > 0) {
    await client.query(
      `UPDATE keyring.jobs SET error = $2 WHERE id = $1`,
      [job.id, `${left.stale} term(s) are still on another index version (${totals.unavailable} need an encrypt root no live sidecar holds); ` +
        `${left.quarantined} more belong to quarantined values (SELECT * FROM keyring.quarantine WHERE resolved_at IS NULL)`]);
  } else if (totals.unavailable > 0) {
    await setUnavailableError(client, job.id);
  }
  await auditAppend(client, {
    action: 'rotation.finished', actor: ctx.instanceId, keyPurpose: 'index', keyVersion: target, columnId: col.id,
    detail: {
      job: Number(job.id), kind: 'reindex', done: totals.done, skipped: totals.skipped, quarantined: totals.quarantined,
      erased: totals.erased, unavailable: totals.unavailable, passes, left: left.stale, left_quarantined: left.quarantined,
      seconds: totals.seconds,
    },
  });
  ctx.logger.info({ job: job.id, columnId: col.id, ...totals, passes, left: left.stale }, 're-index finished');
}
