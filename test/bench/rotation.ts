/**
 * Rotation section (DESIGN.md, "Performance targets"): keyring's re-encryption of a
 * column and rewrap of data keys beside the peers, in one run on one database.
 *
 *   setup         <rows> rows written through rot_keyring's staging view and encrypted by
 *                 the sidecar processes under encrypt version 1 (real data keys and
 *                 envelopes); then rot_bare, rot_naive and rot_naive_load, byte-identical
 *                 copies; every table rewritten compactly (VACUUM FULL) so none starts
 *                 with free space
 *   peers         bare UPDATE, naive client-side loop, pgcrypto (rotation-peers.ts)
 *   idle          single-row INSERTs through rot_app's staging view at --app-rate for
 *                 --app-seconds, round trips timed; the sidecars encrypt them meanwhile
 *   naive load    the naive loop again, on rot_naive_load, with the INSERT load of
 *                 `idle` running: what rewriting the table by hand costs the application
 *                 (a reference for keyring's figure, not a target)
 *   keyring       encrypt version 2 activated, keyring.reencrypt(column) called with its
 *                 defaults, nothing else running (as the peers); from the call until the
 *                 job is done (the sidecar processes share the job)
 *   under load    the same again to encrypt version 3 with the INSERT load of `idle`
 *                 running: its round trips against idle's, and the rate with the load
 *   throttled     the same again to encrypt version 4 with p_rows_per_second (by default
 *                 half the rate under load): what the rate limit buys the application
 *   rewrap        data keys under version 1 topped up to --data-keys (per-subject keys
 *                 of a column protected with a subject column, wrapped in Node and inserted
 *                 in bulk, as a long-lived deployment accumulates them), then
 *                 keyring.rotate('encrypt'); from the call until the job is done
 */
import { randomBytes } from 'node:crypto';
import type pg from 'pg';
import { IvPool, fingerprint, generateKey, parseKeyHex, wrapDataKey } from '../../src/crypto/index.js';
import type { BenchContext } from './context.js';
import { formatCpu, startCpu, type CpuReport } from './cpu.js';
import { smallBatches } from './data.js';
import { connect } from './env.js';
import { createPgpTable, runBareUpdate, runNaiveLoop, runPgcrypto, type PeerRun } from './rotation-peers.js';
import { runInsertLoad, startInsertLoad, type InsertLoad, type LoadResult } from './rotation-load.js';
import { newBenchKeys, startSidecarProcess, type SidecarProcess } from './sidecar-process.js';
import { fmtInt, fmtMs, fmtRatio, passMiss, rate, table } from './stats.js';
import { settle, waitEncrypted } from './write-path.js';

/** DESIGN.md targets. */
export const TARGET_VS_NAIVE = 2;
export const TARGET_VS_BARE = 0.25;
export const TARGET_P99_RATIO = 2;
export const TARGET_REWRAP_S = 5;

export interface RotationOptions {
  readonly rows: number;
  /** Rows of the pgcrypto subset. */
  readonly pgpRows: number;
  readonly sidecars: number;
  /** INSERTs per second of the application load. */
  readonly appRate: number;
  /** Seconds of the idle latency measurement. */
  readonly appSeconds: number;
  readonly dataKeys: number;
  /** p_batch_size of keyring.reencrypt, or undefined for its default. */
  readonly reencryptBatch: number | undefined;
  /** Rows per batch of the naive loop. */
  readonly naiveBatch: number;
  /** p_rows_per_second of the throttled run; undefined: half the loaded run's rate. */
  readonly throttledRate: number | 'off' | undefined;
}

export type KeyringRun = PeerRun & { readonly jobSeconds: number; readonly batchSize: number };

export interface RotationResult {
  readonly o: RotationOptions;
  readonly loadSeconds: number;
  readonly bare: PeerRun;
  readonly naive: PeerRun;
  readonly pgp: PeerRun;
  /** keyring.reencrypt alone (the figure compared with the peers). */
  readonly keyring: KeyringRun;
  /** keyring.reencrypt again, to the next version, with the INSERT load running. */
  readonly loaded: KeyringRun;
  readonly idle: LoadResult;
  readonly during: LoadResult;
  /** The naive loop on a copy with the INSERT load running, and that load's round trips. */
  readonly naiveLoaded: { readonly run: PeerRun; readonly during: LoadResult };
  /** keyring.reencrypt with p_rows_per_second, the INSERT load running. */
  readonly throttled?: { readonly run: KeyringRun; readonly during: LoadResult; readonly limit: number };
  readonly rewrap: { readonly keys: number; readonly ms: number; readonly jobSeconds: number };
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

interface JobState { state: string; done: string; total: string; error: string | null; seconds: number | null; batch_size: number }

/** Polls keyring.jobs until the job ends; returns performance.now() when it was seen done. */
async function waitJob(db: pg.ClientBase, id: string, timeoutMs = 600_000): Promise<{ at: number; job: JobState }> {
  const end = performance.now() + timeoutMs;
  for (;;) {
    const { rows: [j] } = await db.query<JobState>(
      `SELECT state, done::text, total::text, error, batch_size,
              extract(epoch FROM finished_at - coalesce(started_at, created_at))::float8 AS seconds
         FROM keyring.jobs WHERE id = $1`, [id]);
    const at = performance.now();
    if (!j) throw new Error(`job ${id} vanished`);
    if (j.state === 'done') return { at, job: j };
    if (j.state === 'failed') throw new Error(`job ${id} failed: ${j.error}`);
    if (at > end) throw new Error(`job ${id} did not finish within ${timeoutMs} ms (${j.done}/${j.total})`);
    await sleep(20);
  }
}

async function createTables(db: pg.ClientBase): Promise<number> {
  await db.query('CREATE EXTENSION IF NOT EXISTS pgcrypto');
  for (const t of ['rot_keyring', 'rot_app']) {
    await db.query(`CREATE TABLE ${t} (id bigint PRIMARY KEY, name text, national_id text)`);
    await db.query(`SELECT keyring.protect('public.${t}', 'national_id')`);
  }
  await db.query(`CREATE TABLE rot_subjects (id bigint PRIMARY KEY, customer text NOT NULL, national_id text)`);
  await db.query(`SELECT keyring.protect('public.rot_subjects', 'national_id', p_subject_column => 'customer')`);
  const { rows } = await db.query<{ id: number }>(`SELECT id FROM keyring.columns WHERE table_name = 'rot_keyring'`);
  return rows[0]!.id;
}

/** <rows> rows through the staging view, encrypted by the running sidecars; then compact copies. */
async function load(ctx: BenchContext, app: pg.Client, admin: pg.ClientBase, rows: number): Promise<number> {
  const sql = `INSERT INTO rot_keyring_staging (id, name, national_id) SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[])`;
  const source = smallBatches(ctx.data, 5000, 1);
  const t0 = performance.now();
  for (let sent = 0; sent < rows; sent += 5000) {
    const b = source.next().value!;
    const n = Math.min(5000, rows - sent);
    await app.query({ name: 'rot_load', text: sql, values: [b.ids.slice(0, n), b.names.slice(0, n), b.nationalIds.slice(0, n)] });
  }
  await waitEncrypted(admin, 'rot_keyring');
  const ms = performance.now() - t0;
  for (const t of ['rot_bare', 'rot_naive', 'rot_naive_load']) {
    await admin.query(`CREATE TABLE ${t} (id bigint PRIMARY KEY, name text, national_id bytea)`);
    await admin.query(`INSERT INTO ${t} SELECT id, name, national_id FROM rot_keyring ORDER BY id`);
  }
  // The staging path wrote every row twice: compact it so that every table starts alike.
  await admin.query('VACUUM FULL rot_keyring');
  for (const t of ['rot_keyring', 'rot_bare', 'rot_naive', 'rot_naive_load']) await admin.query(`VACUUM ANALYZE ${t}`);
  return ms;
}

/** Per-subject data keys under `version`, inserted in bulk, until `total` keys are not on `target`. */
async function topUpDataKeys(db: pg.ClientBase, rootHex: string, version: number, target: number, total: number): Promise<number> {
  const { rows: [c] } = await db.query<{ id: number; n: number }>(
    `SELECT (SELECT id FROM keyring.columns WHERE table_name = 'rot_subjects') AS id,
            (SELECT count(*)::int FROM keyring.data_keys WHERE root_version <> $1 AND wrapped IS NOT NULL) AS n`, [target]);
  const need = total - c!.n;
  if (need <= 0) return c!.n;
  const root = parseKeyHex(rootHex, 'bench encrypt root');
  const ivs = new IvPool();
  try {
    const { rows: ids } = await db.query<{ id: string }>(
      `SELECT nextval('keyring.data_keys_id_seq')::text AS id FROM generate_series(1, $1)`, [need]);
    for (let i = 0; i < ids.length; i += 10_000) {
      const part = ids.slice(i, i + 10_000).map((r) => r.id);
      const wrapped = part.map((id) => {
        const dk = generateKey();
        try {
          return wrapDataKey(root, version, BigInt(id), dk, ivs);
        } finally {
          dk.dispose();
        }
      });
      await db.query(
        `INSERT INTO keyring.data_keys (id, column_id, subject, root_version, wrapped)
         SELECT u.id, $1, 'customer-' || u.id, $2, u.w FROM unnest($3::bigint[], $4::bytea[]) AS u(id, w)`,
        [c!.id, version, part, wrapped]);
    }
  } finally {
    root.dispose();
  }
  await db.query('ANALYZE keyring.data_keys');
  return total;
}

async function versionOf(db: pg.ClientBase, hex: string): Promise<number> {
  const k = parseKeyHex(hex, 'bench encrypt root');
  try {
    const { rows } = await db.query<{ version: number }>(
      `SELECT version FROM keyring.root_keys WHERE purpose = 'encrypt' AND fingerprint = $1`, [fingerprint(k, 'encrypt')]);
    if (!rows[0]) throw new Error('the bench encrypt key is not registered');
    return rows[0].version;
  } finally {
    k.dispose();
  }
}

export async function runRotation(ctx: BenchContext, o: RotationOptions): Promise<RotationResult> {
  const admin = await connect(ctx.url, 'bench admin');
  const app = await connect(ctx.url, 'bench app');
  const peer = await connect(ctx.url, 'bench peer');
  ctx.defer(async () => {
    for (const c of [peer, app, admin]) await c.end().catch(() => undefined);
  });
  const columnId = await createTables(admin);
  const v2Hex = newBenchKeys().encrypt;
  const v3Hex = newBenchKeys().encrypt;
  const v4Hex = newBenchKeys().encrypt;
  const sidecars: SidecarProcess[] = [];
  const stopAll = async (): Promise<void> => { await Promise.all(sidecars.map((s) => s.stop())); };
  ctx.defer(stopAll);
  try {
    ctx.progress(`rotation: starting ${o.sidecars} sidecar process${o.sidecars === 1 ? '' : 'es'} (encrypt versions 1 to 4, 2 to 4 pending) ...`);
    for (let i = 1; i <= o.sidecars; i++) {
      sidecars.push(await startSidecarProcess({
        databaseUrl: ctx.url, keys: { encrypt: `${ctx.keys.encrypt},${v2Hex},${v3Hex},${v4Hex}`, index: ctx.keys.index },
        batchSize: ctx.sidecarBatchSize, instanceId: `bench-rotation-${i}`,
      }));
    }
    const v1 = await versionOf(admin, ctx.keys.encrypt);
    const v2 = await versionOf(admin, v2Hex);
    const v3 = await versionOf(admin, v3Hex);
    const v4 = await versionOf(admin, v4Hex);

    ctx.progress(`rotation: ${fmtInt(o.rows)} rows through rot_keyring_staging, encrypted under version ${v1}; copies ...`);
    const loadMs = await load(ctx, app, admin, o.rows);

    await settle(admin);
    ctx.progress(`rotation: bare UPDATE of ${fmtInt(o.rows)} rows ...`);
    const bare = await runBareUpdate(peer, admin, 'rot_bare', 'national_id', o.rows);

    await settle(admin);
    ctx.progress(`rotation: naive client-side loop over ${fmtInt(o.rows)} rows ...`);
    const naive = await runNaiveLoop(peer, admin, {
      tableName: 'rot_naive', columnId, rootHex: ctx.keys.encrypt, rootVersion: v1, rows: o.rows, batch: o.naiveBatch,
    });

    const pw1 = randomBytes(16).toString('base64');
    const pw2 = randomBytes(16).toString('base64');
    const names = ctx.data.batches.flatMap((b) => b.nationalIds);
    const pgpIds = Array.from({ length: o.pgpRows }, (_, i) => String(i + 1));
    ctx.progress(`rotation: pgcrypto copy of ${fmtInt(o.pgpRows)} rows ...`);
    await createPgpTable(admin, 'rot_pgp', pgpIds, pgpIds.map((_, i) => names[i % names.length]!), pw1);
    await admin.query('VACUUM ANALYZE rot_pgp');
    await settle(admin);
    ctx.progress(`rotation: pgcrypto re-encryption of ${fmtInt(o.pgpRows)} rows ...`);
    const pgp = await runPgcrypto(peer, admin, 'rot_pgp', o.pgpRows, pw1, pw2);

    await settle(admin);
    ctx.progress(`rotation: idle INSERT latency, ${o.appRate}/s for ${o.appSeconds} s ...`);
    const idle = await runInsertLoad(app, 'rot_app_staging', ctx.data, o.appRate, 1, o.appSeconds);
    await waitEncrypted(admin, 'rot_app');

    // The INSERT load of `idle` around `run`: `startLoad` starts it (then 200 ms for it to
    // reach its pace), called by `run` where its timing begins; its round trips are returned.
    const withLoad = async <T>(firstId: number, run: (startLoad: () => Promise<void>) => Promise<T>): Promise<[T, LoadResult]> => {
      let load: InsertLoad | undefined;
      const startLoad = async (): Promise<void> => {
        load = startInsertLoad(app, 'rot_app_staging', ctx.data, o.appRate, firstId);
        await sleep(200);
      };
      let out: T;
      try {
        out = await run(startLoad);
      } catch (err) {
        await load?.stop().catch(() => undefined);
        throw err;
      }
      const during = await load!.stop();
      await waitEncrypted(admin, 'rot_app');
      return [out, during];
    };

    await settle(admin);
    ctx.progress(`rotation: naive client-side loop over a copy, INSERT load running ...`);
    const [naiveRun, naiveDuring] = await withLoad(5_000_001, async (startLoad) => {
      await startLoad();
      return runNaiveLoop(peer, admin, {
        tableName: 'rot_naive_load', columnId, rootHex: ctx.keys.encrypt, rootVersion: v1, rows: o.rows, batch: o.naiveBatch,
      });
    });
    const naiveLoaded = { run: naiveRun, during: naiveDuring };

    ctx.progress(`rotation: keyring.reencrypt of ${fmtInt(o.rows)} rows under version ${v2}, alone ...`);
    const keyring = await runReencrypt(admin, sidecars, o, v2);

    ctx.progress(`rotation: keyring.reencrypt of ${fmtInt(o.rows)} rows under version ${v3}, INSERT load running ...`);
    const underLoad = (version: number, firstId: number, limit?: number): Promise<[KeyringRun, LoadResult]> =>
      withLoad(firstId, (startLoad) => runReencrypt(admin, sidecars, o, version, startLoad, limit));
    const [loaded, during] = await underLoad(v3, 10_000_001);
    let throttled: RotationResult['throttled'];
    let last = v3;
    if (o.throttledRate !== 'off') {
      const limit = o.throttledRate ?? Math.max(1000, Math.floor(loaded.rate / 2 / 1000) * 1000);
      ctx.progress(`rotation: keyring.reencrypt under version ${v4}, p_rows_per_second => ${limit}, INSERT load running ...`);
      const [run, d] = await underLoad(v4, 20_000_001, limit);
      throttled = { run, during: d, limit };
      last = v4;
    }

    ctx.progress(`rotation: ${fmtInt(o.dataKeys)} data keys under version ${v1}; rewrap ...`);
    const keys = await topUpDataKeys(admin, ctx.keys.encrypt, v1, last, o.dataKeys);
    await settle(admin);
    const r0 = performance.now();
    const { rows: [rot] } = await admin.query<{ id: string }>(`SELECT keyring.rotate('encrypt')::text AS id`);
    const rw = await waitJob(admin, rot!.id);
    if (Number(rw.job.done) !== keys) throw new Error(`rewrap job: ${rw.job.done} keys rewrapped, expected ${keys}`);
    return {
      o, loadSeconds: loadMs / 1000, bare, naive, pgp, idle, during, naiveLoaded, keyring, loaded, ...(throttled ? { throttled } : {}),
      rewrap: { keys, ms: rw.at - r0, jobSeconds: rw.job.seconds ?? Number.NaN },
    };
  } finally {
    await stopAll();
  }
}

/**
 * Compacts rot_keyring (as the peers' tables were), activates `version` and re-encrypts
 * the column under it: from the reencrypt() call until the job is seen done, with the CPU
 * of the sidecars and of every backend. Checks that every row moved.
 */
async function runReencrypt(admin: pg.ClientBase, sidecars: readonly SidecarProcess[], o: RotationOptions, version: number,
  beforeStart?: () => Promise<void>, rowsPerSecond?: number): Promise<KeyringRun> {
  await admin.query('VACUUM FULL rot_keyring');
  await admin.query('VACUUM ANALYZE rot_keyring');
  await settle(admin);
  await admin.query('SELECT keyring.activate_key($1, $2)', ['encrypt', version]);
  await beforeStart?.();
  const stop = await startCpu(admin, {
    backends: new Map(), processes: new Map(sidecars.map((s) => [s.pid, 'sidecar (node)'])),
    appNames: [['keyring sidecar', 'sidecar backends'], ['bench app', 'app backend']],
  });
  const t0 = performance.now();
  const args = [
    ...(o.reencryptBatch === undefined ? [] : [`p_batch_size => ${o.reencryptBatch}`]),
    ...(rowsPerSecond === undefined ? [] : [`p_rows_per_second => ${rowsPerSecond}`]),
  ];
  const { rows: [call] } = await admin.query<{ ids: string[] }>(
    `SELECT keyring.reencrypt(${['\'public.rot_keyring.national_id\'', ...args].join(', ')}) AS ids`);
  const { at, job } = await waitJob(admin, String(call!.ids[0]));
  const cpu = await stop();
  if (Number(job.done) !== o.rows) throw new Error(`reencrypt job: ${job.done} rows re-encrypted, expected ${o.rows}`);
  const { rows: [moved] } = await admin.query<{ n: string }>(
    `SELECT count(*) AS n FROM rot_keyring t JOIN keyring.data_keys d ON d.id = keyring.data_key_id(t.national_id) WHERE d.root_version = $1`, [version]);
  if (Number(moved!.n) !== o.rows) throw new Error(`after the job ${moved!.n} rows are under version ${version}, expected ${o.rows}`);
  const ms = at - t0;
  return { rows: o.rows, ms, rate: rate(o.rows, ms), cpu, jobSeconds: job.seconds ?? Number.NaN, batchSize: job.batch_size };
}

const CPU_ORDER = ['peer backend', 'bench (node)', 'app backend', 'sidecar (node)', 'sidecar backends', 'server background', 'other backends'];

export function formatRotation(r: RotationResult): string {
  const k = r.keyring.rate;
  const vsBare = k / r.bare.rate;
  const vsNaive = k / r.naive.rate;
  const p99 = r.during.latency.p99 / r.idle.latency.p99;
  const lines: string[] = [];
  lines.push(`rotation: ${fmtInt(r.o.rows)} rows, one protected column (bytea envelopes of ~48 bytes), ` +
    `${r.o.sidecars} sidecar process${r.o.sidecars === 1 ? '' : 'es'}`);
  lines.push(table([
    ['', 'rows/s', 'keyring vs', 'target'],
    ["bare UPDATE t SET c = c || ''", fmtInt(r.bare.rate), fmtRatio(vsBare), `≥ ${TARGET_VS_BARE.toFixed(2)}x: ${passMiss(vsBare >= TARGET_VS_BARE)}`],
    [`naive client-side loop (${fmtInt(r.o.naiveBatch)}/batch)`, fmtInt(r.naive.rate), fmtRatio(vsNaive), `≥ ${TARGET_VS_NAIVE.toFixed(2)}x: ${passMiss(vsNaive >= TARGET_VS_NAIVE)}`],
    [`pgcrypto PGP in SQL (${fmtInt(r.o.pgpRows)}-row subset)`, fmtInt(r.pgp.rate), fmtRatio(k / r.pgp.rate), '(none)'],
    [`keyring.reencrypt (${r.o.sidecars} sidecar${r.o.sidecars === 1 ? '' : 's'}, batch ${r.keyring.batchSize})`, fmtInt(k), '', ''],
    [`  the same with the INSERT load (${r.o.appRate}/s)`, fmtInt(r.loaded.rate),
      `${fmtRatio(r.loaded.rate / r.bare.rate)} ${fmtRatio(r.loaded.rate / r.naive.rate)}`, '(bare, naive)'],
  ], [44, 10, 11, 16]));
  const l = (x: LoadResult): string => `p50 ${fmtMs(x.latency.p50)} ms, p99 ${fmtMs(x.latency.p99)} ms, max ${fmtMs(x.latency.max)} ms (${fmtInt(x.inserts)} INSERTs` +
    `${x.late > 0 ? `, ${x.late} late` : ''})`;
  lines.push(`application INSERT round trip (1 row through rot_app_staging, ${r.o.appRate}/s, one connection):`);
  lines.push(`  idle             ${l(r.idle)}`);
  lines.push(`  during rotation  ${l(r.during)}`);
  lines.push(`  p99 ratio ${fmtRatio(p99)} (target < ${TARGET_P99_RATIO.toFixed(2)}x: ${passMiss(p99 < TARGET_P99_RATIO)})`);
  const nl = r.naiveLoaded;
  lines.push(`  naive loop       ${l(nl.during)}`);
  lines.push(`    the naive loop rewriting a copy meanwhile (${fmtInt(nl.run.rate)} rows/s): p99 ratio ` +
    `${fmtRatio(nl.during.latency.p99 / r.idle.latency.p99)} (a reference, no target)`);
  if (r.throttled) {
    const t = r.throttled;
    const tp99 = t.during.latency.p99 / r.idle.latency.p99;
    lines.push(`  rate-limited     ${l(t.during)}`);
    lines.push(`    keyring.reencrypt with p_rows_per_second => ${fmtInt(t.limit)}: ${fmtInt(t.run.rate)} rows/s, ` +
      `p99 ratio ${fmtRatio(tp99)} (${passMiss(tp99 < TARGET_P99_RATIO)} with the limit)`);
  }
  const rs = r.rewrap.ms / 1000;
  lines.push(`rewrap of ${fmtInt(r.rewrap.keys)} data keys (keyring.rotate('encrypt')): ${rs.toFixed(2)} s, ` +
    `${fmtInt(rate(r.rewrap.keys, r.rewrap.ms))} keys/s (target < ${TARGET_REWRAP_S} s: ${passMiss(rs < TARGET_REWRAP_S)})`);
  lines.push('');
  lines.push(`notes: keyring time runs from the reencrypt() call until the job is seen done (${(r.keyring.ms / 1000).toFixed(2)} s; ` +
    `the job's own started→finished ${r.keyring.jobSeconds.toFixed(2)} s); it ran alone, as the peers did.`);
  lines.push(`       "with the INSERT load": a second re-encryption of the same rows (to the next version) while the application`);
  lines.push(`       INSERTs of "during rotation" run (${(r.loaded.ms / 1000).toFixed(2)} s).`);
  if (r.throttled) {
    lines.push(`       "rate-limited": a third one (to the next version) with p_rows_per_second => ${fmtInt(r.throttled.limit)} and the same INSERTs`);
    lines.push(`       running (${(r.throttled.run.ms / 1000).toFixed(2)} s); its CPU below includes the sidecars' work on those INSERTs, over a longer time.`);
  }
  lines.push(`       "naive loop": the naive loop again, on a copy of the table, while the same INSERTs run (${(nl.run.ms / 1000).toFixed(2)} s).`);
  lines.push(`       pgcrypto is measured on ${fmtInt(r.o.pgpRows)} rows only (it would take minutes on ${fmtInt(r.o.rows)}); its rate does not depend on the table size.`);
  lines.push(`       setup: ${fmtInt(r.o.rows)} rows through the staging view and encrypted by the sidecars in ${r.loadSeconds.toFixed(1)} s.`);
  const cpu: [string, PeerRun][] = [['bare', r.bare], ['naive', r.naive], ['naive+ld', nl.run], ['pgcrypto', r.pgp], ['keyring', r.keyring], ['+ load', r.loaded],
    ...(r.throttled ? [['+ limit', r.throttled.run] as [string, PeerRun]] : [])];
  if (cpu.some(([, p]) => p.cpu)) {
    lines.push('', 'CPU per process group (from /proc; µs per row of the measurement):');
    for (const [name, p] of cpu) if (p.cpu) lines.push(`${name.padEnd(9)} ${formatCpu(p.cpu as CpuReport, p.rows, CPU_ORDER)}`);
  }
  return lines.join('\n');
}
