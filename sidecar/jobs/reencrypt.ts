/**
 * Re-encryption (DESIGN.md "Key hierarchy"): every value of a column decrypted and sealed
 * again under a new data key of the active encrypt root version. The blind index is left
 * as it is (the value, and so its term, did not change).
 *
 * runBatch holds the job row only to carve the next primary-key range (keyset
 * pagination) and advance the cursor; work() then does one range in its own
 * transaction, the range row locked (SKIP LOCKED: sidecars share a job, never a range),
 * and records its counts and closes the range in that same transaction, so a kill -9
 * rolls back the range in hand only and finished rows are never rewritten.
 *
 * Per row, an application write always wins: a row with a queued write holds the
 * placeholder and is left to the write path, and the UPDATE writes only where the column
 * still holds the bytes read (compare-and-swap), so a write that lands after the read wins.
 * Rows already under a data key of the new generation are skipped (idempotent); a
 * shredded data key's value stays as it is (erased); a value that does not decrypt, or
 * decrypts to another envelope (case C02: one layer only), is quarantined and reported;
 * a value whose root version no live sidecar holds is left untouched and counted as
 * unavailable (KEY_UNAVAILABLE is retried while another live sidecar holds it).
 */
import type pg from 'pg';
import {
  DecryptError, FORMAT_V1, OVERHEAD, looksLikeEnvelope, openValue, readDataKeyId, sealValue, type IvPool,
} from '../../src/crypto/index.js';
import type { Db } from '../../src/db/pool.js';
import { auditAppend } from '../../src/db/queries/audit-append.js';
import type { JobRow } from '../../src/db/queries/claim-job.js';
import { addEncryptions } from '../../src/db/queries/finish-batch.js';
import {
  carveChunk, claimChunk, countClaim, finishChunk, heldByLiveSidecar, quarantineValues, selectChunkRows,
  selectKeyMeta, type ChunkCounts, type KeyMeta,
} from '../../src/db/queries/reencrypt-chunks.js';
import { selectColumns, type ColumnRow } from '../../src/db/queries/select-columns.js';
import { updateBaseRows, type BaseTable } from '../../src/db/queries/update-base-rows.js';
import { scopeOf, type DataKey, type DataKeyCache, type KeyDemand } from '../../src/keys/data-keys.js';
import { DataKeyShreddedError, KeyUnavailableError } from '../../src/keys/errors.js';
import type { RootKeyStore } from '../../src/keys/root-keys.js';
import { auditDecryption, type AuditedValue, type DecryptFailureClass } from '../../src/lib/decrypt-audit.js';
import type { Logger } from '../../src/log.js';
import type { SidecarMetrics } from '../metrics.js';
import { JobFailure, type JobHandler } from './runner.js';

export interface ReencryptContext {
  readonly db: Db;
  readonly dataKeys: DataKeyCache;
  readonly rootKeys: () => RootKeyStore;
  readonly ivPool: IvPool;
  readonly instanceId: string;
  readonly logger: Logger;
  readonly metrics: SidecarMetrics;
  /** Test-only pause inside each range transaction (crash tests); 0 in production. */
  readonly testDelayMs: number;
}

type Col = ColumnRow & { readonly subject_column: string | null };

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
/**
 * Rows sealed per UPDATE within a range: the next part is decrypted and sealed while the
 * server writes the previous one (Node and the server each take about half of a range's
 * time, so overlapping them is what shortens it; the bench's rotation section measures it).
 */
const SEAL_PART = 1000;
const MAX_DATA_KEY_ID = (1n << 63n) - 1n;

function safeKeyId(b: Buffer): bigint | null {
  try {
    const id = readDataKeyId(b);
    return id <= MAX_DATA_KEY_ID ? id : null;
  } catch {
    return null;
  }
}

/**
 * safeKeyId with a one-entry memory: the rows of a range share a few data keys, and a
 * BigInt built from the header (then hashed for a Map lookup) on every row showed in
 * the sidecar's CPU profile. Same answers as safeKeyId.
 */
class KeyIds {
  #hi = -1;
  #lo = -1;
  #id: bigint | null = null;

  of(b: Buffer): bigint | null {
    if (b.length < OVERHEAD || b[0] !== FORMAT_V1) return null;
    const hi = b.readUInt32BE(1);
    const lo = b.readUInt32BE(5);
    if (hi !== this.#hi || lo !== this.#lo) {
      this.#hi = hi;
      this.#lo = lo;
      this.#id = hi > 0x7fffffff ? null : (BigInt(hi) << 32n) | BigInt(lo); // ids above 2^63-1 are not bigint ids
    }
    return this.#id;
  }
}

async function loadColumn(client: pg.ClientBase, columnId: number): Promise<Col> {
  const [c] = await selectColumns(client, [columnId]);
  if (!c) throw new JobFailure(`column ${columnId} is no longer protected`);
  const { rows } = await client.query<{ subject_column: string | null }>('SELECT subject_column FROM keyring.columns WHERE id = $1', [columnId]);
  return { ...c, subject_column: rows[0]?.subject_column ?? null };
}

export function reencryptHandler(ctx: ReencryptContext): JobHandler {
  // The column as read by the last claim of each job (read again at every claim, under
  // the job row lock): the range transaction that follows needs no second look-up.
  const columns = new Map<string, Col>();
  return {
    kind: 'reencrypt',
    failedAction: 'reencrypt.failed',

    canRun(job: JobRow): boolean {
      return job.target_version !== null && ctx.rootKeys().get('encrypt', job.target_version) !== undefined;
    },

    async runBatch(client: pg.ClientBase, job: JobRow): Promise<boolean> {
      if (job.column_id === null || job.target_version === null) throw new JobFailure('a reencrypt job needs a column and a target version');
      if (job.target_state !== 'active') {
        throw new JobFailure(`superseded: encrypt key version ${job.target_version} is ${job.target_state ?? 'not registered'}, ` +
          "no longer active; run SELECT keyring.reencrypt() again");
      }
      const col = await loadColumn(client, job.column_id);
      if (columns.size >= 64) columns.clear(); // jobs that ended elsewhere
      columns.set(job.id, col);
      const chunk = await carveChunk(client, job.id, col, job.batch_size, ctx.instanceId);
      if (!chunk) await countClaim(client, job.id);
      return false;
    },

    async work(job: JobRow): Promise<boolean> {
      return ctx.db.with(async (client) => {
        await client.query('BEGIN');
        try {
          const did = await runChunk(ctx, client, job, columns.get(job.id));
          await client.query('COMMIT');
          return did;
        } catch (err) {
          await client.query('ROLLBACK').catch(() => undefined);
          throw err;
        } finally {
          ctx.dataKeys.trim();
        }
      });
    },
  };
}

interface Failure extends AuditedValue {
  readonly problem: DecryptFailureClass;
}

/** One range in the caller's transaction; false when no range was open for this sidecar. */
async function runChunk(ctx: ReencryptContext, client: pg.ClientBase, job: JobRow, known: Col | undefined): Promise<boolean> {
  const chunk = await claimChunk(client, job.id);
  if (!chunk) return false;
  if (chunk.not_before) {
    const wait = chunk.not_before.getTime() - Date.now();
    if (wait > 0) await sleep(wait); // rate limit (rows per second, across sidecars)
  }
  const target = job.target_version!;
  const floor = BigInt(job.key_floor ?? '0');
  const col = known ?? (await loadColumn(client, job.column_id!));
  const rows = await selectChunkRows(client, col, chunk);
  const ids = new KeyIds();
  const meta = await selectKeyMeta(client, [...new Set(rows.map((r) => ids.of(r.ct)).filter((x): x is bigint => x !== null))]);
  const keys = ctx.rootKeys();
  const n = { done: 0, skipped: 0, quarantined: 0, erased: 0, unavailable: 0 };
  const failures: Failure[] = [];
  const candidates: Todo[] = [];
  const missingRoots = new Set<number>();
  let lastId: bigint | null = null;
  let lastMeta: KeyMeta | undefined;
  for (const r of rows) {
    // A queued write's placeholder: the write path seals the new value under a new key.
    if (r.ct.length === 1 && r.ct[0] === 0) { n.skipped++; continue; }
    const keyId = ids.of(r.ct);
    if (keyId !== lastId) {
      lastId = keyId;
      lastMeta = keyId === null ? undefined : meta.get(keyId);
    }
    const m = lastMeta;
    if (keyId === null || !m) {
      failures.push({ rowKey: r.row_key, value: null, problem: keyId === null ? (r.ct.length < 37 ? 'length' : 'format') : 'key_unavailable', ...(keyId === null ? {} : { dataKeyId: keyId }) });
      continue;
    }
    if (m.state === 'shredded') { n.erased++; continue; }
    if (keyId > floor && m.root_version === target) { n.skipped++; continue; }
    if (!keys.get('encrypt', m.root_version)) {
      if (!missingRoots.has(m.root_version) && (await heldByLiveSidecar(client, m.root_version))) {
        throw new KeyUnavailableError(`encrypt key version ${m.root_version} is not held here; leaving the range to a sidecar that holds it`);
      }
      missingRoots.add(m.root_version);
      n.unavailable++;
      continue;
    }
    candidates.push({ row_key: r.row_key, ct: r.ct, subject: r.subject, keyId, rootVersion: m.root_version });
  }
  if (missingRoots.size > 0) {
    ctx.logger.warn({ job: job.id, columnId: col.id, versions: [...missingRoots], rows: n.unavailable },
      'values under an encrypt root version no live sidecar holds were left untouched (not quarantined)');
  }
  // No look at the queue: a row with a queued write holds the placeholder (the staging
  // trigger sets it in the write's own transaction, and the write path writes only over
  // it), which was skipped above or fails the compare-and-swap below.
  const todo = candidates;

  // Old data keys: disabled roots allowed (a re-encryption is what moves values off them).
  const dks = new Map<bigint, DataKey>();
  const keyProblems = new Map<bigint, 'erased' | 'data_key_unwrap'>();
  for (const [keyId, k] of await ctx.dataKeys.byIdsSettled(client, todo.map((t) => t.keyId))) {
    if (k instanceof DataKeyShreddedError) keyProblems.set(keyId, 'erased');
    else if (k instanceof KeyUnavailableError) keyProblems.set(keyId, 'data_key_unwrap'); // root held: the key row was altered
    else dks.set(keyId, k);
  }
  const fresh = todo.length === 0 ? new Map<string, DataKey>() : await ctx.dataKeys.activeKeys(client, demandsOf(col.id, todo));
  const table: BaseTable = {
    schema: col.table_schema, table: col.table_name, pkColumns: col.pk_columns, pkTypes: col.pk_types,
    // No blind-index column: the value did not change, so its term stays byte-identical.
    columns: [{ column: col.column_name, bidxColumn: null }],
    compareAndSwap: true,
  };
  // Pipelined: part i+1 is decrypted and sealed while the server writes part i (the
  // client queues the statements; one transaction, so the range is still all or nothing).
  let written = 0;
  let sealed = 0;
  const perKey = new Map<bigint, number>();
  let inFlight: Promise<number> | undefined;
  // The new data key of the previous row's scope, and the rows sealed with it since.
  let dk: DataKey | undefined;
  let dkSubject: string | null = null;
  let dkCount = 0;
  const countDk = (): void => {
    if (dk && dkCount > 0) perKey.set(dk.id, (perKey.get(dk.id) ?? 0) + dkCount);
    dkCount = 0;
  };
  try {
    for (let i = 0; i < todo.length; i += SEAL_PART) {
      const opened = await openPart(ctx, client, col, todo.slice(i, i + SEAL_PART), dks, keyProblems, n, failures);
      let updates;
      try {
        updates = opened.map((o) => {
          if (!dk || o.subject !== dkSubject) {
            countDk();
            dk = fresh.get(scopeOf(col.id, o.subject))!;
            dkSubject = o.subject;
            if (dk.rootVersion !== target) throw new KeyUnavailableError(`encrypt key version ${target} stopped being active during a re-encryption range; retrying`);
          }
          dkCount++;
          const ciphertext = sealValue(dk.key, dk.id, col.id, o.row_key, o.plain, ctx.ivPool);
          return { rowKey: o.row_key, values: [{ ciphertext, term: null, expected: o.ct }] };
        });
      } finally {
        for (const o of opened) o.plain.fill(0); // sealed or not (a seal that threw): no plaintext outlives the part
      }
      countDk();
      sealed += updates.length;
      if (inFlight) written += await inFlight;
      inFlight = updates.length > 0 ? updateBaseRows(client, table, updates) : undefined;
    }
    if (inFlight) written += await inFlight;
  } catch (err) {
    await inFlight?.catch(() => undefined); // the transaction is rolled back by the caller
    throw err;
  }
  if (perKey.size > 0) await addEncryptions(client, perKey, ctx.dataKeys.maxEncryptions);
  n.done += written;
  n.skipped += sealed - written; // an application write won the race
  n.quarantined += failures.length;
  await quarantineValues(client, col.id, failures.map((f) => ({ rowKey: f.rowKey, detail: `re-encryption job ${job.id}: ${f.problem}` })));
  if (ctx.testDelayMs > 0) await sleep(ctx.testDelayMs);
  const totals = await finishChunk(client, job.id, chunk.id, n as ChunkCounts, ctx.instanceId);
  // Audit last: audit_append holds the chain's lock until commit.
  if (failures.length > 0) {
    await auditDecryption(client, ctx.instanceId, col.id, failures, { via: 'reencrypt', job: Number(job.id) });
    ctx.metrics.quarantined.inc(failures.length);
    for (const f of failures) {
      ctx.logger.error({ job: job.id, columnId: col.id, rowKey: f.rowKey, reason: f.problem }, 'value did not decrypt during re-encryption; quarantined and left as it is');
    }
  }
  for (const [, c] of perKey) ctx.metrics.encryptions.inc({ root_version: String(target) }, c);
  if (totals.finished) {
    await auditAppend(client, {
      action: 'reencrypt.finished', actor: ctx.instanceId, keyPurpose: 'encrypt', keyVersion: target, columnId: col.id,
      detail: {
        job: Number(job.id), done: totals.done, skipped: totals.skipped, quarantined: totals.quarantined,
        erased: totals.erased, unavailable: totals.unavailable, seconds: totals.seconds,
      },
    });
    ctx.logger.info({ job: job.id, columnId: col.id, ...totals }, 're-encryption finished');
  }
  return true;
}

interface Todo {
  readonly row_key: string;
  readonly ct: Buffer;
  readonly subject: string | null;
  readonly keyId: bigint;
  readonly rootVersion: number;
}

interface Opened {
  readonly row_key: string;
  readonly subject: string | null;
  readonly plain: Buffer;
  readonly ct: Buffer;
}

/** One active data key per scope of the rows (the counts bound the encryptions: failures only lower them). */
function demandsOf(columnId: number, rows: readonly Todo[]): KeyDemand[] {
  const demands = new Map<string, KeyDemand>();
  for (const r of rows) {
    const scope = scopeOf(columnId, r.subject);
    demands.set(scope, { columnId, subject: r.subject, count: (demands.get(scope)?.count ?? 0) + 1 });
  }
  return [...demands.values()];
}

/**
 * Decrypts a part of the range. Values that do not decrypt, or whose data key is gone,
 * are counted (`n`) or reported (`failures`); the rest is returned, plaintext in hand.
 */
async function openPart(
  ctx: ReencryptContext, client: pg.ClientBase, col: Col, part: readonly Todo[], dks: ReadonlyMap<bigint, DataKey>,
  keyProblems: ReadonlyMap<bigint, 'erased' | 'data_key_unwrap'>, n: { erased: number }, failures: Failure[],
): Promise<Opened[]> {
  const opened: (Opened & { readonly rootVersion: number })[] = [];
  const nestedSuspects = new Map<number, bigint>();
  try {
    let lastId: bigint | undefined;
    let kp: 'erased' | 'data_key_unwrap' | undefined;
    let dk: DataKey | undefined;
    for (const t of part) {
      if (t.keyId !== lastId) {
        lastId = t.keyId;
        kp = keyProblems.get(t.keyId);
        dk = dks.get(t.keyId);
      }
      if (kp === 'erased') { n.erased++; continue; }
      const known = { dataKeyId: t.keyId, rootVersion: t.rootVersion };
      if (kp) { failures.push({ rowKey: t.row_key, value: null, problem: kp, ...known }); continue; }
      try {
        const plain = openValue(dk!.key, col.id, t.row_key, t.ct);
        if (looksLikeEnvelope(plain)) {
          const inner = safeKeyId(plain);
          if (inner !== null) nestedSuspects.set(opened.length, inner);
        }
        opened.push({ row_key: t.row_key, subject: t.subject, plain, ct: t.ct, rootVersion: t.rootVersion });
      } catch (err) {
        if (!(err instanceof DecryptError)) throw err;
        failures.push({ rowKey: t.row_key, value: null, problem: err.reason ?? 'auth', ...known });
      }
    }
    if (nestedSuspects.size === 0) return opened;
    // Case C02 invariant: a plaintext that is itself an envelope naming an existing data key
    // is ciphertext encrypted twice; it is reported, never sealed once more.
    const existing = await selectKeyMeta(client, [...new Set(nestedSuspects.values())]);
    const nested = new Set<number>();
    for (const [i, inner] of nestedSuspects) {
      if (!existing.has(inner)) continue;
      const o = opened[i]!;
      failures.push({ rowKey: o.row_key, value: null, problem: 'nested', dataKeyId: safeKeyId(o.ct)!, rootVersion: o.rootVersion });
      o.plain.fill(0);
      nested.add(i);
    }
    return opened.filter((_, i) => !nested.has(i));
  } catch (err) {
    for (const o of opened) o.plain.fill(0); // nothing decrypted outlives a failed part
    throw err;
  }
}
