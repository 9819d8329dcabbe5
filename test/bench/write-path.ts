/**
 * Write-path section: keyring's staging view → sidecar → ciphertext, beside its peers,
 * in one run on one database (DESIGN.md, "Performance targets").
 *
 *   plain INSERT       the rows as plaintext into a plain table
 *   app-side           the application encrypts with the crypto core (sealValue with an
 *                      IvPool and a data key, blindIndexTerm with an HKDF-derived index key)
 *                      and inserts ciphertext and term
 *   keyring            the application inserts plaintext into <table>_staging while a
 *                      sidecar process encrypts; the clock runs from the first insert until
 *                      no placeholder and no queue entry is left
 *   latency            paced inserts at half the keyring rate (or --latency-rate); insert→encrypted per row in
 *                      database time (inserted_at default vs. a BEFORE UPDATE trigger)
 *
 * Every peer inserts the same rows with the same statement shape: batches of 1,000 rows,
 * `INSERT ... SELECT * FROM unnest($1::bigint[], ...)`, a prepared statement, one
 * connection, autocommit. Tables of the app-side and keyring peers end up identical
 * (bytea ciphertext, bytea term with a btree index on it).
 */
import pg from 'pg';
import {
  IvPool, blindIndexTerm, deriveIndexKey, generateKey, parseNormalization, sealValue,
} from '../../src/crypto/index.js';
import type { BenchContext } from './context.js';
import { connect } from './env.js';
import { formatCpu, startCpu, type CpuReport } from './cpu.js';
import { smallBatches, type Batch } from './data.js';
import { metricValue, startSidecarProcess, type SidecarProcess } from './sidecar-process.js';
import { fmtInt, fmtMs, fmtRatio, passMiss, rate, summarize, table, type Summary } from './stats.js';

/** DESIGN.md targets. */
export const TARGET_RATIO = 0.5;
export const TARGET_P99_MS = 50;

const PROTECT_ARGS = `p_blind_index => true, p_normalize => ARRAY['digits']`;
const NORMALIZE = parseNormalization(['digits']);
const INDEX_BYTES = 16;

export interface PeerResult {
  readonly rows: number;
  readonly ms: number;
  readonly rate: number;
  readonly cpu: CpuReport | undefined;
}

export interface KeyringResult extends PeerResult {
  /** Until the application's last INSERT returned (the rate the application saw). */
  readonly insertMs: number;
  readonly insertRate: number;
  /** Values still queued when the application's last INSERT returned. */
  readonly backlogAtInsertEnd: number;
  /** From the sidecar's /metrics: batches and the seconds they took (claim → commit). */
  readonly sidecarBatches: number;
  readonly sidecarBatchSeconds: number;
}

export interface LatencyResult {
  readonly targetRate: number;
  /** True when the rate was given (--latency-rate), not half the keyring rate. */
  readonly fixedRate: boolean;
  readonly achievedRate: number;
  readonly batchRows: number;
  readonly intervalMs: number;
  readonly seconds: number;
  readonly lateBatches: number;
  readonly latency: Summary;
}

export interface WritePathResult {
  readonly plain: PeerResult;
  readonly app: PeerResult;
  readonly keyring: KeyringResult;
  readonly latency: LatencyResult;
  readonly sidecarBatchSize: number;
  readonly sidecars: number;
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

const insertSql = (table: string, types: readonly string[]): string =>
  `INSERT INTO ${table} SELECT * FROM unnest(${types.map((t, i) => `$${i + 1}::${t}[]`).join(', ')})`;

async function createTables(db: pg.ClientBase): Promise<void> {
  await db.query(`CREATE TABLE bench_plain (id bigint PRIMARY KEY, name text, national_id text)`);
  await db.query(`CREATE TABLE bench_app (id bigint PRIMARY KEY, name text, national_id bytea, national_id_bidx bytea)`);
  // The same index protect() puts on the term column of the keyring table.
  await db.query(`CREATE INDEX ON bench_app (national_id_bidx)`);
  await db.query(`CREATE TABLE bench_keyring (id bigint PRIMARY KEY, name text, national_id text)`);
  await db.query(`SELECT keyring.protect('public.bench_keyring', 'national_id', ${PROTECT_ARGS})`);
  await db.query(`CREATE TABLE bench_latency (id bigint PRIMARY KEY, name text, national_id text,
      inserted_at timestamptz NOT NULL DEFAULT clock_timestamp(), encrypted_at timestamptz)`);
  await db.query(`SELECT keyring.protect('public.bench_latency', 'national_id', ${PROTECT_ARGS})`);
  // Stamps the moment the sidecar's UPDATE replaces the placeholder (its commit follows).
  await db.query(`CREATE FUNCTION bench_mark_encrypted() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN NEW.encrypted_at := clock_timestamp(); RETURN NEW; END $$`);
  await db.query(`CREATE TRIGGER bench_mark_encrypted BEFORE UPDATE OF national_id ON bench_latency FOR EACH ROW
    WHEN (OLD.national_id = '\\x00'::bytea AND NEW.national_id IS DISTINCT FROM '\\x00'::bytea)
    EXECUTE FUNCTION bench_mark_encrypted()`);
}

/** Lets the server settle between peers: dirty pages written, statistics current. */
export async function settle(db: pg.ClientBase): Promise<void> {
  // CHECKPOINT needs superuser or pg_checkpoint: without them the peers just run unsettled.
  await db.query('CHECKPOINT').catch(() => undefined);
  await sleep(200);
}

async function runPlain(ctx: BenchContext, app: pg.Client, admin: pg.ClientBase): Promise<PeerResult> {
  const sql = insertSql('bench_plain', ['bigint', 'text', 'text']);
  const stop = await startCpu(admin, { backends: new Map([[await backendPid(app), 'app backend']]), processes: new Map(), appNames: [] });
  const t0 = performance.now();
  for (const b of ctx.data.batches) await app.query({ name: 'bench_plain', text: sql, values: [b.ids, b.names, b.nationalIds] });
  const ms = performance.now() - t0;
  return { rows: ctx.rows, ms, rate: rate(ctx.rows, ms), cpu: await stop() };
}

async function runAppSide(ctx: BenchContext, app: pg.Client, admin: pg.ClientBase): Promise<PeerResult> {
  const { rows } = await admin.query<{ id: number }>(`SELECT id FROM keyring.columns WHERE table_name = 'bench_keyring'`);
  const columnId = rows[0]!.id;
  // What an application doing its own encryption holds: a data key and a derived index key.
  const dataKey = generateKey();
  const dataKeyId = 1n;
  const indexRoot = generateKey();
  const indexKey = deriveIndexKey(indexRoot, columnId, null);
  indexRoot.dispose();
  const ivPool = new IvPool();
  const sql = insertSql('bench_app', ['bigint', 'text', 'bytea', 'bytea']);
  try {
    const stop = await startCpu(admin, { backends: new Map([[await backendPid(app), 'app backend']]), processes: new Map(), appNames: [] });
    const t0 = performance.now();
    for (const b of ctx.data.batches) {
      const cts: Buffer[] = new Array(b.ids.length);
      const terms: Buffer[] = new Array(b.ids.length);
      for (let i = 0; i < b.ids.length; i++) {
        const value = Buffer.from(b.nationalIds[i]!, 'utf8');
        cts[i] = sealValue(dataKey, dataKeyId, columnId, b.ids[i]!, value, ivPool);
        terms[i] = blindIndexTerm(indexKey, 1, value, NORMALIZE, INDEX_BYTES, true);
      }
      await app.query({ name: 'bench_app', text: sql, values: [b.ids, b.names, cts, terms] });
    }
    const ms = performance.now() - t0;
    return { rows: ctx.rows, ms, rate: rate(ctx.rows, ms), cpu: await stop() };
  } finally {
    dataKey.dispose();
    indexKey.dispose();
  }
}

async function backendPid(c: pg.ClientBase): Promise<number> {
  return (await c.query<{ pid: number }>('SELECT pg_backend_pid() AS pid')).rows[0]!.pid;
}

/**
 * Waits until the queue is empty and `table` holds no placeholder; returns
 * performance.now() when that was first seen. Call it once every insert has committed:
 * the queue is then probed from the lowest id seen so far (the sidecar drains in id
 * order and no smaller id can appear), so a probe does not walk the deleted entries at
 * the head of the queue's index again and again (that cost ~2 ms per probe, stolen
 * from the sidecar on a 2-core machine). Emptiness is confirmed by a probe from id 0.
 */
export async function waitEncrypted(db: pg.ClientBase, table: string, timeoutMs = 600_000, pollMs = 10): Promise<number> {
  const end = performance.now() + timeoutMs;
  let from = '0';
  for (;;) {
    const { rows: head } = await db.query<{ id: string }>('SELECT id FROM keyring.pending WHERE id >= $1 ORDER BY id LIMIT 1', [from]);
    let seen = performance.now();
    let rows = head;
    if (head.length > 0) from = head[0]!.id;
    else {
      rows = (await db.query<{ id: string }>('SELECT id FROM keyring.pending ORDER BY id LIMIT 1')).rows;
      if (rows.length > 0) from = rows[0]!.id; // a retried value behind the cursor
      seen = performance.now();
    }
    if (rows.length === 0) {
      const r = await db.query<{ n: string }>(`SELECT count(*) AS n FROM ${table} WHERE national_id = '\\x00'::bytea`);
      if (r.rows[0]!.n === '0') return seen;
      const q = await db.query<{ n: string }>('SELECT count(*) AS n FROM keyring.quarantine WHERE resolved_at IS NULL');
      if (q.rows[0]!.n !== '0') throw new Error(`${q.rows[0]!.n} value(s) were quarantined by the sidecar; see keyring.quarantine`);
    }
    if (performance.now() > end) throw new Error(`values of ${table} were not all encrypted within ${timeoutMs} ms`);
    await sleep(pollMs);
  }
}

/** Every row of `table` holds a format-1 envelope of the expected length and a term. */
async function verifyEncrypted(db: pg.ClientBase, table: string, rows: number): Promise<void> {
  const { rows: r } = await db.query<{ n: string; ok: string }>(`SELECT count(*) AS n,
      count(*) FILTER (WHERE get_byte(national_id, 0) = 1 AND octet_length(national_id) > 37
                         AND octet_length(national_id_bidx) = 2 + ${INDEX_BYTES}) AS ok
    FROM ${table}`);
  if (Number(r[0]!.n) !== rows || r[0]!.ok !== r[0]!.n) {
    throw new Error(`${table}: expected ${rows} encrypted rows, found ${r[0]!.n} rows of which ${r[0]!.ok} are envelopes with a term`);
  }
}

async function runKeyring(ctx: BenchContext, app: pg.Client, admin: pg.Client, sidecars: readonly SidecarProcess[]): Promise<KeyringResult> {
  const sql = insertSql('bench_keyring_staging (id, name, national_id)', ['bigint', 'text', 'text']);
  const m0 = await batchMetrics(sidecars);
  const stop = await startCpu(admin, {
    backends: new Map([[await backendPid(app), 'app backend']]),
    processes: new Map(sidecars.map((s) => [s.pid, 'sidecar (node)'])),
    appNames: [['keyring sidecar', 'sidecar backends']],
  });
  const t0 = performance.now();
  for (const b of ctx.data.batches) await app.query({ name: 'bench_keyring', text: sql, values: [b.ids, b.names, b.nationalIds] });
  const tIns = performance.now();
  const backlog = Number((await admin.query<{ n: string }>('SELECT count(*) AS n FROM keyring.pending')).rows[0]!.n);
  const tEnd = await waitEncrypted(admin, 'bench_keyring');
  const cpu = await stop();
  const m1 = await batchMetrics(sidecars);
  await verifyEncrypted(admin, 'bench_keyring', ctx.rows);
  return {
    rows: ctx.rows,
    ms: tEnd - t0,
    rate: rate(ctx.rows, tEnd - t0),
    insertMs: tIns - t0,
    insertRate: rate(ctx.rows, tIns - t0),
    backlogAtInsertEnd: backlog,
    sidecarBatches: m1.count - m0.count,
    sidecarBatchSeconds: m1.sum - m0.sum,
    cpu,
  };
}

/** Batches and their seconds, summed over the sidecars' /metrics. */
async function batchMetrics(sidecars: readonly SidecarProcess[]): Promise<{ count: number; sum: number }> {
  let count = 0;
  let sum = 0;
  for (const s of sidecars) {
    const text = await s.metrics();
    count += metricValue(text, 'keyring_batch_duration_seconds_count');
    sum += metricValue(text, 'keyring_batch_duration_seconds_sum');
  }
  return { count, sum };
}

/**
 * Paced inserts at `targetRate` rows/s for `seconds`: small batches on a fixed schedule
 * (a batch that starts late does not make the next ones burst to catch up).
 */
async function runLatency(ctx: BenchContext, app: pg.Client, admin: pg.Client, targetRate: number): Promise<LatencyResult> {
  // 50 rows per INSERT, or more when that would need more than one INSERT every 5 ms.
  const batchRows = Math.max(50, Math.ceil((targetRate * 5) / 1000));
  const intervalMs = (batchRows * 1000) / targetRate;
  const sql = insertSql('bench_latency_staging (id, name, national_id)', ['bigint', 'text', 'text']);
  const source = smallBatches(ctx.data, batchRows, 1);
  let sent = 0;
  let late = 0;
  const t0 = performance.now();
  const endAt = t0 + ctx.latencySeconds * 1000;
  let next = t0;
  while (next < endAt) {
    const now = performance.now();
    if (next > now) await sleep(next - now);
    else if (now - next > intervalMs) {
      late++;
      next = now; // behind schedule: drop the missed slots instead of bursting
    }
    const b: Batch = source.next().value as Batch;
    await app.query({ name: 'bench_latency', text: sql, values: [b.ids, b.names, b.nationalIds] });
    sent += b.ids.length;
    next += intervalMs;
  }
  const wall = performance.now() - t0;
  await waitEncrypted(admin, 'bench_latency');
  const { rows } = await admin.query<{ ms: number | null }>(
    `SELECT (extract(epoch FROM encrypted_at - inserted_at) * 1000)::float8 AS ms FROM bench_latency`);
  const missing = rows.filter((r) => r.ms === null).length;
  if (missing > 0 || rows.length !== sent) throw new Error(`latency table: ${rows.length} rows (${sent} sent), ${missing} without encrypted_at`);
  return {
    targetRate,
    fixedRate: ctx.latencyRate !== undefined,
    achievedRate: rate(sent, wall),
    batchRows,
    intervalMs,
    seconds: wall / 1000,
    lateBatches: late,
    latency: summarize(rows.map((r) => r.ms!)),
  };
}

export async function runWritePath(ctx: BenchContext): Promise<WritePathResult> {
  const admin = await connect(ctx.url, 'bench admin');
  const app = await connect(ctx.url, 'bench app');
  ctx.defer(async () => {
    await app.end().catch(() => undefined);
    await admin.end().catch(() => undefined);
  });
  await createTables(admin);

  await settle(admin);
  ctx.progress(`plain INSERT of ${fmtInt(ctx.rows)} rows ...`);
  const plain = await runPlain(ctx, app, admin);

  await settle(admin);
  ctx.progress(`app-side AES-GCM + HMAC + INSERT of ${fmtInt(ctx.rows)} rows ...`);
  const appSide = await runAppSide(ctx, app, admin);

  const n = ctx.sidecars;
  ctx.progress(`starting ${n === 1 ? 'a sidecar process' : `${n} sidecar processes`} (KEYRING_BATCH_SIZE=${ctx.sidecarBatchSize}) ...`);
  const sidecars: SidecarProcess[] = [];
  const stopAll = async (): Promise<void> => { await Promise.all(sidecars.map((s) => s.stop())); };
  ctx.defer(stopAll);
  try {
    for (let i = 1; i <= n; i++) {
      sidecars.push(await startSidecarProcess({
        databaseUrl: ctx.url, keys: ctx.keys, batchSize: ctx.sidecarBatchSize, pgOptions: ctx.sidecarPgOptions,
        instanceId: n === 1 ? 'bench-sidecar' : `bench-sidecar-${i}`,
      }));
    }
    await settle(admin);
    ctx.progress(`keyring: ${fmtInt(ctx.rows)} rows into bench_keyring_staging, sidecar encrypting ...`);
    const keyring = await runKeyring(ctx, app, admin, sidecars);

    await settle(admin);
    const target = ctx.latencyRate ?? keyring.rate / 2;
    ctx.progress(`latency: paced inserts at ${fmtInt(target)} rows/s for ${ctx.latencySeconds} s ...`);
    const latency = await runLatency(ctx, app, admin, target);
    return { plain, app: appSide, keyring, latency, sidecarBatchSize: ctx.sidecarBatchSize, sidecars: n };
  } finally {
    await stopAll();
  }
}

const CPU_ORDER = ['app backend', 'bench (node)', 'sidecar (node)', 'sidecar backends', 'server background', 'other backends'];

export function formatWritePath(r: WritePathResult, rows: number): string {
  const base = r.app.rate;
  const ratio = r.keyring.rate / base;
  const lines: string[] = [];
  lines.push(table([
    ['', 'rows/s', 'vs app-side'],
    ['plain INSERT', fmtInt(r.plain.rate), fmtRatio(r.plain.rate / base)],
    ['app-side AES-GCM + HMAC + INSERT', fmtInt(r.app.rate), fmtRatio(1)],
    ['keyring staging view → encrypted', fmtInt(r.keyring.rate),
      `${fmtRatio(ratio)}   (target ≥ ${TARGET_RATIO.toFixed(2)}x: ${passMiss(ratio >= TARGET_RATIO)})`],
    ['  keyring insert phase alone', fmtInt(r.keyring.insertRate), `${fmtRatio(r.keyring.insertRate / base)}   (rate the application's INSERTs completed)`],
  ], [34, 10, 12]));
  const l = r.latency;
  lines.push(`insert→encrypted latency at ${fmtInt(l.achievedRate)} rows/s: p50 ${fmtMs(l.latency.p50)} ms, p99 ${fmtMs(l.latency.p99)} ms, ` +
    `max ${fmtMs(l.latency.max)} ms (target p99 < ${TARGET_P99_MS} ms: ${passMiss(l.latency.p99 < TARGET_P99_MS)})`);
  lines.push(`  (${l.fixedRate ? `--latency-rate ${fmtInt(l.targetRate)}` : 'half the keyring rate'}: ${l.batchRows} rows every ${fmtMs(l.intervalMs)} ms for ${l.seconds.toFixed(1)} s, ${fmtInt(l.latency.n)} rows` +
    `${l.lateBatches > 0 ? `; ${l.lateBatches} INSERTs started late, the application could not keep the pace` : ''})`);
  lines.push('');
  lines.push(`notes: keyring time runs from the first INSERT until no queue entry and no placeholder is left; ` +
    `${fmtInt(r.keyring.backlogAtInsertEnd)} values were still queued when the last INSERT returned ` +
    `(inserts ${(r.keyring.insertMs / 1000).toFixed(2)} s, end to end ${(r.keyring.ms / 1000).toFixed(2)} s).`);
  if (r.keyring.sidecarBatches > 0) {
    const busy = ((r.keyring.sidecarBatchSeconds * 1000) / r.keyring.ms / r.sidecars) * 100;
    lines.push(`       ${r.sidecars === 1 ? 'sidecar' : `${r.sidecars} sidecars`} (KEYRING_BATCH_SIZE=${r.sidecarBatchSize}): ${fmtInt(r.keyring.sidecarBatches)} batches, ` +
      `${fmtMs((r.keyring.sidecarBatchSeconds * 1000) / r.keyring.sidecarBatches)} ms each on average (claim to commit), ` +
      `busy ${busy.toFixed(0)} % of the end-to-end time${r.sidecars === 1 ? '' : ' each'}.`);
  }
  lines.push(`       latency is database time: inserted_at (clock_timestamp() in the app's INSERT) to the sidecar's UPDATE ` +
    `(BEFORE UPDATE trigger); the sidecar's COMMIT follows a moment later and is not included.`);
  const cpu: [string, PeerResult][] = [['plain', r.plain], ['app-side', r.app], ['keyring', r.keyring]];
  if (cpu.some(([, p]) => p.cpu)) {
    lines.push('', 'CPU per process group (from /proc; µs per row of the measurement):');
    for (const [name, p] of cpu) if (p.cpu) lines.push(`${name.padEnd(9)} ${formatCpu(p.cpu, rows, CPU_ORDER)}`);
  }
  return lines.join('\n');
}
