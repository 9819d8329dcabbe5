/**
 * The `keyring` command line as a user runs it: `node bin/keyring.js <command> ...` as a
 * child process, configured through the environment only. Every command answers --help;
 * a failure is one line on stderr and a non-zero exit code; migrate and init are
 * idempotent; protect, status and sidecar work against a database the CLI itself migrated.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { createInterface } from 'node:readline';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { COMMANDS } from '../../src/cli/main.js';
import { parseKeyHex } from '../../src/crypto/index.js';
import { createEmptyTestDb, type TestDb } from '../helpers/db.js';
import { fingerprintOf, newKeys, pendingCount, waitFor, type TestKeys } from '../helpers/sidecar.js';

const ROOT = fileURLToPath(new URL('../..', import.meta.url));
const BIN = join(ROOT, 'bin/keyring.js');

interface Result { code: number | null; signal: NodeJS.Signals | null; stdout: string; stderr: string }

function start(args: readonly string[], env: NodeJS.ProcessEnv = {}): ChildProcess {
  // Only what is given: no DATABASE_URL or KEYRING_* leaks in from the outer environment.
  return spawn(process.execPath, [BIN, ...args], { cwd: ROOT, env: { PATH: process.env.PATH, ...env }, stdio: ['ignore', 'pipe', 'pipe'] });
}

function run(args: readonly string[], env: NodeJS.ProcessEnv = {}): Promise<Result> {
  return new Promise((resolve, reject) => {
    const child = start(args, env);
    let stdout = '';
    let stderr = '';
    child.stdout!.on('data', (d: Buffer) => { stdout += d.toString(); });
    child.stderr!.on('data', (d: Buffer) => { stderr += d.toString(); });
    child.on('error', reject);
    child.on('close', (code, signal) => resolve({ code, signal, stdout, stderr }));
  });
}

/** Runs `jobs` with at most `n` child processes at a time (2-core machines). */
async function limited<T>(n: number, jobs: (() => Promise<T>)[]): Promise<T[]> {
  const out: T[] = new Array(jobs.length);
  let next = 0;
  await Promise.all(Array.from({ length: n }, async () => {
    while (next < jobs.length) {
      const i = next++;
      out[i] = await jobs[i]!();
    }
  }));
  return out;
}

/** The failure contract: non-zero exit, nothing on stdout, exactly one non-empty line on stderr. */
function expectOneLineFailure(r: Result, what: string): string {
  expect(r.code, `${what}: exit code (stderr: ${r.stderr})`).not.toBe(0);
  expect(r.code, `${what}: exit code`).not.toBeNull();
  const lines = r.stderr.split('\n').filter((l) => l !== '');
  expect(lines, `${what}: stderr ${JSON.stringify(r.stderr)}`).toHaveLength(1);
  expect(r.stderr.endsWith('\n'), what).toBe(true);
  expect(lines[0]!.startsWith('keyring'), `${what}: ${lines[0]}`).toBe(true);
  return lines[0]!;
}

let db: TestDb;
let keys: TestKeys;
let env: NodeJS.ProcessEnv;

beforeAll(async () => {
  db = await createEmptyTestDb('cli');
  keys = newKeys();
  env = { DATABASE_URL: db.url, KEYRING_ENCRYPT_KEYS: keys.encrypt[0]!, KEYRING_INDEX_KEYS: keys.index[0]! };
});

afterAll(async () => {
  await db?.drop();
});

describe('keyring CLI: help and usage errors', () => {
  it('--help of every command exits 0 and prints its usage', async () => {
    const results = await limited(4, [
      () => run(['--help']),
      ...COMMANDS.map((c) => () => run([c.name, '--help'])),
    ]);
    const [top, ...each] = results;
    expect(top!.code).toBe(0);
    expect(top!.stdout).toMatch(/^Usage: keyring <command>/);
    for (const c of COMMANDS) expect(top!.stdout).toContain(`  ${c.name} `);
    each.forEach((r, i) => {
      const name = COMMANDS[i]!.name;
      expect(r.code, name).toBe(0);
      expect(r.stdout, name).toMatch(new RegExp(`^Usage: keyring ${name}\\b`));
      expect(r.stderr, name).toBe('');
    });
  });

  it('an unknown command or a bad flag exits non-zero with one line on stderr', async () => {
    const cases: [string[], string][] = [
      [['bogus'], 'unknown command'],
      [['status', '--bogus'], "Unknown option '--bogus'"],
      [['protect'], 'schema.table.column'],
      [['demo', '--rows', 'many'], '--rows'],
    ];
    const results = await limited(4, cases.map(([args]) => () => run(args, env)));
    results.forEach((r, i) => {
      const [args, text] = cases[i]!;
      const line = expectOneLineFailure(r, args.join(' '));
      expect(r.code, args.join(' ')).toBe(2);
      expect(line).toContain(text);
      expect(r.stdout, args.join(' ')).toBe('');
    });
  });

  it('keygen prints 64 hex digits from the CSPRNG; two runs differ', async () => {
    const [a, b] = await Promise.all([run(['keygen']), run(['keygen'])]);
    for (const r of [a!, b!]) {
      expect(r.code).toBe(0);
      expect(r.stdout).toMatch(/^[0-9a-f]{64}\n$/);
      expect(r.stderr).toBe('');
      parseKeyHex(r.stdout.trim(), 'generated').dispose(); // a usable key, not a weak one
    }
    expect(a!.stdout).not.toBe(b!.stdout);
  });

  it('without DATABASE_URL every database command fails with one line naming it', async () => {
    const noDb = { KEYRING_ENCRYPT_KEYS: env.KEYRING_ENCRYPT_KEYS, KEYRING_INDEX_KEYS: env.KEYRING_INDEX_KEYS };
    const commands = [['migrate'], ['init'], ['protect', 'public.t.c'], ['status'], ['sidecar']];
    const results = await limited(4, commands.map((args) => () => run(args, noDb)));
    results.forEach((r, i) => {
      const line = expectOneLineFailure(r, commands[i]!.join(' '));
      expect(line).toContain('DATABASE_URL');
    });
  });
});

describe('keyring CLI against a fresh database', () => {
  it('migrate applies the schema, then is idempotent', async () => {
    const first = await run(['migrate'], { DATABASE_URL: db.url });
    expect(first.code, first.stderr).toBe(0);
    expect(first.stdout).toMatch(/^applied (\d+) migration\(s\): .* \(now version (\d+)\)\n$/);
    const applied = (await db.pool.query<{ n: number; v: number }>('SELECT count(*) FILTER (WHERE id > 0)::int AS n, max(id) AS v FROM keyring.migrations')).rows[0]!;
    expect(first.stdout).toContain(`applied ${applied.n} migration(s)`);
    expect(first.stdout).toContain(`(now version ${applied.v})`);
    const second = await run(['migrate'], { DATABASE_URL: db.url });
    expect(second.code, second.stderr).toBe(0);
    expect(second.stdout).toBe(`keyring schema is up to date (version ${applied.v})\n`);
    expect((await db.pool.query('SELECT count(*) FILTER (WHERE id > 0)::int AS n FROM keyring.migrations')).rows[0].n).toBe(applied.n);
  });

  it('init activates version 1 of both purposes with the given keys, and is idempotent', async () => {
    const fps = { encrypt: fingerprintOf(keys.encrypt[0]!, 'encrypt'), index: fingerprintOf(keys.index[0]!, 'index') };
    const registry = async () => (await db.pool.query(
      `SELECT purpose::text, version, fingerprint, state::text FROM keyring.root_keys ORDER BY 1, 2`)).rows;
    const first = await run(['init'], env);
    expect(first.code, first.stderr).toBe(0);
    expect(first.stdout).toBe(
      `encrypt key version 1 (fingerprint ${fps.encrypt}): activated\nindex key version 1 (fingerprint ${fps.index}): activated\n`);
    const after = await registry();
    expect(after).toEqual([
      { purpose: 'encrypt', version: 1, fingerprint: fps.encrypt, state: 'active' },
      { purpose: 'index', version: 1, fingerprint: fps.index, state: 'active' },
    ]);
    const again = await run(['init'], env);
    expect(again.code, again.stderr).toBe(0);
    expect(again.stdout).toBe(
      `encrypt key version 1 (fingerprint ${fps.encrypt}): already active\nindex key version 1 (fingerprint ${fps.index}): already active\n`);
    expect(await registry()).toEqual(after);
    // Other keys against an initialised registry: refused, one line, nothing changed.
    const other = newKeys();
    const refused = await run(['init'], { ...env, KEYRING_ENCRYPT_KEYS: other.encrypt[0]!, KEYRING_INDEX_KEYS: other.index[0]! });
    expect(expectOneLineFailure(refused, 'init with other keys')).toContain('encrypt key version 1 is already active with another key');
    expect(refused.code).toBe(1);
    expect(await registry()).toEqual(after);
  });

  it('protect turns a column into ciphertext storage with a normalised blind index; a table without a primary key is refused', async () => {
    await db.pool.query('CREATE TABLE t (id int PRIMARY KEY, c text, note text)');
    await db.pool.query('CREATE TABLE nopk (c text)');
    const r = await run(['protect', 'public.t.c', '--blind-index', '--normalize', 'trim,lower'], { DATABASE_URL: db.url });
    expect(r.code, r.stderr).toBe(0);
    const col = (await db.pool.query(
      `SELECT id, bidx_column, normalize, data_type FROM keyring.columns WHERE table_schema = 'public' AND table_name = 't' AND column_name = 'c'`)).rows[0];
    expect(col).toMatchObject({ bidx_column: 'c_bidx', normalize: ['trim', 'lower'], data_type: 'text' });
    expect(r.stdout).toBe(`protected public.t.c (column id ${col.id}); write plaintext into public.t_staging\n`);
    const types = await db.pool.query(
      `SELECT column_name, data_type FROM information_schema.columns WHERE table_name = 't' AND column_name IN ('c', 'c_bidx') ORDER BY 1`);
    expect(types.rows).toEqual([{ column_name: 'c', data_type: 'bytea' }, { column_name: 'c_bidx', data_type: 'bytea' }]);
    expect((await db.pool.query(`SELECT to_regclass('public.t_staging') IS NOT NULL AS ok`)).rows[0].ok).toBe(true);

    const noPk = await run(['protect', 'public.nopk.c'], { DATABASE_URL: db.url });
    expect(expectOneLineFailure(noPk, 'protect without a primary key')).toMatch(/primary key/i);
    expect(noPk.code).toBe(1);
    expect((await db.pool.query(`SELECT count(*)::int AS n FROM keyring.columns WHERE table_name = 'nopk'`)).rows[0].n).toBe(0);
  });

  it('status prints a table', async () => {
    await db.pool.query(`INSERT INTO t_staging (id, c) VALUES (1, ' Alpha@Example.TEST ')`);
    const r = await run(['status'], { DATABASE_URL: db.url });
    expect(r.code, r.stderr).toBe(0);
    const lines = r.stdout.trimEnd().split('\n');
    expect(lines[0]).toMatch(/^column_id +\| table_name +\| column_name +\| /);
    expect(lines[1]).toMatch(/^-+(-\+-+)+$/);
    expect(lines.slice(2, -1).some((l) => /\| public\.t +\| c +\|/.test(l)), r.stdout).toBe(true);
    expect(lines.at(-1)).toMatch(/^\(\d+ rows?\)$/);
    const json = await run(['status', '--json'], { DATABASE_URL: db.url });
    expect(json.code).toBe(0);
    const rows = JSON.parse(json.stdout) as { table_name: string; pending: number | string }[];
    expect(rows.find((x) => x.table_name === 'public.t')).toMatchObject({ pending: expect.anything() });
  });

  it('sidecar with a missing key exits 1 with one line naming the version', async () => {
    const r = await run(['sidecar'], {
      DATABASE_URL: db.url, KEYRING_INDEX_KEYS: env.KEYRING_INDEX_KEYS, KEYRING_HEALTH_PORT: '0', KEYRING_LOG_LEVEL: 'silent',
    });
    const line = expectOneLineFailure(r, 'sidecar without its encrypt key');
    expect(r.code).toBe(1);
    expect(line).toContain(`encrypt root key version 1 (active, fingerprint ${fingerprintOf(keys.encrypt[0]!, 'encrypt')})`);
    expect(line).not.toContain('index root key version');
    expect(line).not.toContain(keys.index[0]!);
  });

  it('sidecar runs, encrypts what is queued, and stops cleanly (exit 0) on SIGTERM', async () => {
    const child = start(['sidecar'], { ...env, KEYRING_HEALTH_PORT: '0', KEYRING_LOG_LEVEL: 'info', KEYRING_POLL_INTERVAL_MS: '200' });
    const logs: Record<string, unknown>[] = [];
    let stderr = '';
    createInterface({ input: child.stdout! }).on('line', (l) => { try { logs.push(JSON.parse(l) as Record<string, unknown>); } catch { logs.push({ raw: l }); } });
    child.stderr!.on('data', (d: Buffer) => { stderr += d.toString(); });
    const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) => child.on('close', (code, signal) => resolve({ code, signal })));
    try {
      await waitFor(() => logs.find((l) => l.msg === 'sidecar ready'), { timeoutMs: 30_000, what: 'sidecar ready' });
      await waitFor(async () => (await pendingCount(db.pool)) === 0, { timeoutMs: 15_000, what: 'the queued value' });
      const { rows } = await db.pool.query(`SELECT get_byte(c, 0) AS fmt, c_bidx IS NOT NULL AS indexed FROM t WHERE id = 1`);
      expect(rows[0]).toEqual({ fmt: 1, indexed: true });
      child.kill('SIGTERM');
      const { code, signal } = await exited;
      expect(signal).toBeNull();
      expect(code).toBe(0);
      expect(logs.some((l) => l.msg === 'signal received; shutting down')).toBe(true);
      expect(stderr).toBe('');
      const sc = await db.pool.query(`SELECT count(*)::int AS n FROM keyring.sidecars WHERE stopped_at IS NULL`);
      expect(sc.rows[0].n).toBe(0); // it marked itself stopped: a graceful shutdown, not an abrupt exit
    } finally {
      if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
    }
  });
});
