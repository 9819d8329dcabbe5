/**
 * Test helpers for the sidecar: keys generated at test time (never committed), a
 * Config for a test database, in-process and child-process sidecars, and reading
 * values back with the crypto core.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import pg from 'pg';
import { inject } from 'vitest';
import { loadConfig, type Config } from '../../src/config.js';
import {
  fingerprint, generateKey, openValue, parseKeyHex, readDataKeyId, unwrapDataKey, type KeyPurpose,
} from '../../src/crypto/index.js';
import { Keyring } from '../../src/lib/keyring.js';
import { silentLogger, type Logger } from '../../src/log.js';
import { Sidecar } from '../../sidecar/sidecar.js';

const PgClient = pg.Client;

const ROOT = fileURLToPath(new URL('../..', import.meta.url));

export interface TestKeys {
  readonly encrypt: readonly string[];
  readonly index: readonly string[];
}

/** A fresh 64-hex-digit root key from the CSPRNG. */
export function newKeyHex(): string {
  return generateKey().use((b) => b.toString('hex'));
}

export function newKeys(nEncrypt = 1, nIndex = 1): TestKeys {
  return {
    encrypt: Array.from({ length: nEncrypt }, newKeyHex),
    index: Array.from({ length: nIndex }, newKeyHex),
  };
}

export function fingerprintOf(hex: string, purpose: KeyPurpose): string {
  const k = parseKeyHex(hex, 'test key');
  try {
    return fingerprint(k, purpose);
  } finally {
    k.dispose();
  }
}

/** Registers a key (keyring.register_key) and optionally activates it; returns its version. */
export async function registerKey(pool: pg.Pool, purpose: KeyPurpose, hex: string, activate = false): Promise<number> {
  const { rows } = await pool.query<{ v: number }>('SELECT keyring.register_key($1, $2) AS v', [purpose, fingerprintOf(hex, purpose)]);
  const v = Number(rows[0]!.v);
  if (activate) await pool.query('SELECT keyring.activate_key($1, $2)', [purpose, v]);
  return v;
}

/** Registers and activates the first encrypt and index key (bootstrap: no version was ever active). */
export async function activateKeys(pool: pg.Pool, keys: TestKeys): Promise<void> {
  if (keys.encrypt[0]) await registerKey(pool, 'encrypt', keys.encrypt[0], true);
  if (keys.index[0]) await registerKey(pool, 'index', keys.index[0], true);
}

export function sidecarEnv(url: string, keys: TestKeys, extra: Record<string, string> = {}): NodeJS.ProcessEnv {
  return {
    DATABASE_URL: url,
    KEYRING_ENCRYPT_KEYS: keys.encrypt.join(','),
    KEYRING_INDEX_KEYS: keys.index.join(','),
    KEYRING_HEALTH_PORT: '0',
    KEYRING_LOG_LEVEL: 'silent',
    KEYRING_LISTEN_TIMEOUT_MS: '2000',
    KEYRING_SHUTDOWN_TIMEOUT_MS: '5000',
    NODE_ENV: 'test',
    ...extra,
  };
}

export function sidecarConfig(url: string, keys: TestKeys, extra: Record<string, string> = {}): Config {
  return loadConfig(sidecarEnv(url, keys, extra));
}

export async function startSidecar(
  url: string,
  keys: TestKeys,
  extra: Record<string, string> = {},
  logger: Logger = silentLogger(),
): Promise<Sidecar> {
  return Sidecar.start(sidecarConfig(url, keys, extra), { logger });
}

export async function getHealth(port: number): Promise<{ status: number; body: Record<string, unknown> }> {
  const res = await fetch(`http://127.0.0.1:${port}/healthz`);
  return { status: res.status, body: (await res.json()) as Record<string, unknown> };
}

export async function waitFor<T>(
  fn: () => Promise<T | undefined | false | null> | T | undefined | false | null,
  { timeoutMs = 10_000, intervalMs = 50, what = 'condition' } = {},
): Promise<T> {
  const end = Date.now() + timeoutMs;
  let last: unknown;
  for (;;) {
    try {
      const v = await fn();
      if (v !== undefined && v !== false && v !== null) return v;
    } catch (err) {
      last = err;
    }
    if (Date.now() > end) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}${last ? `: ${String(last)}` : ''}`);
    await new Promise((r) => setTimeout(r, intervalMs));
  }
}

export interface SpawnedSidecar {
  readonly child: ChildProcess;
  /** Parsed JSON log lines so far. */
  readonly logs: Record<string, unknown>[];
  readonly stderr: () => string;
  readonly exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  waitForLog(pred: (l: Record<string, unknown>) => boolean, timeoutMs?: number): Promise<Record<string, unknown>>;
}

/** Runs `sidecar/bin.ts` as a real process (node --import tsx: one process, so signals reach it). */
export function spawnSidecar(env: NodeJS.ProcessEnv): SpawnedSidecar {
  const child = spawn(process.execPath, ['--import', 'tsx', 'sidecar/bin.ts'], {
    cwd: ROOT,
    env: { PATH: process.env.PATH, ...env, KEYRING_LOG_LEVEL: 'info' },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  const logs: Record<string, unknown>[] = [];
  let err = '';
  createInterface({ input: child.stdout! }).on('line', (line) => {
    try {
      logs.push(JSON.parse(line) as Record<string, unknown>);
    } catch {
      logs.push({ raw: line });
    }
  });
  child.stderr!.on('data', (d: Buffer) => { err += d.toString(); });
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) => {
    child.on('exit', (code, signal) => resolve({ code, signal }));
  });
  return {
    child,
    logs,
    stderr: () => err,
    exited,
    waitForLog: (pred, timeoutMs = 20_000) => waitFor(() => logs.find(pred), { timeoutMs, what: 'a sidecar log line' }),
  };
}

/** Reads one protected value back with the crypto core (root key hex → data key → openValue). */
export async function decryptStored(
  pool: pg.Pool,
  encryptKeys: readonly string[],
  columnId: number,
  rowKey: string,
  envelope: Buffer,
): Promise<Buffer> {
  const id = readDataKeyId(envelope);
  const { rows } = await pool.query<{ root_version: number; wrapped: Buffer }>(
    'SELECT root_version, wrapped FROM keyring.data_keys WHERE id = $1', [id.toString()]);
  const dk = rows[0]!;
  const fps = await pool.query<{ fingerprint: string }>(
    `SELECT fingerprint FROM keyring.root_keys WHERE purpose = 'encrypt' AND version = $1`, [dk.root_version]);
  const hex = encryptKeys.find((h) => fingerprintOf(h, 'encrypt') === fps.rows[0]!.fingerprint);
  if (!hex) throw new Error(`no test key for encrypt root version ${dk.root_version}`);
  const root = parseKeyHex(hex, 'test root');
  const dataKey = unwrapDataKey(root, dk.root_version, id, dk.wrapped);
  try {
    return openValue(dataKey, columnId, rowKey, envelope);
  } finally {
    root.dispose();
    dataKey.dispose();
  }
}

/** The registry id of a protected column. */
export async function columnIdOf(pool: pg.Pool, table: string, column: string): Promise<number> {
  const { rows } = await pool.query<{ id: number }>(
    'SELECT id FROM keyring.columns WHERE table_name = $1 AND column_name = $2', [table, column]);
  if (!rows[0]) throw new Error(`${table}.${column} is not protected`);
  return rows[0].id;
}

export async function pendingCount(pool: pg.Pool): Promise<number> {
  const { rows } = await pool.query<{ n: number }>('SELECT count(*)::int AS n FROM keyring.pending');
  return rows[0]!.n;
}

/**
 * A login role that is a member of keyring_sidecar only, so tests run the sidecar with
 * the privileges a deployment gives it (not as superuser). Returns its connection URL.
 */
export async function createSidecarRole(pool: pg.Pool, dbUrl: string, name: string): Promise<string> {
  const password = newKeyHex().slice(0, 24);
  await pool.query(`DROP ROLE IF EXISTS ${name}`).catch(() => undefined);
  await pool.query(`CREATE ROLE ${name} LOGIN PASSWORD '${password}' IN ROLE keyring_sidecar`);
  const u = new URL(dbUrl);
  u.username = name;
  u.password = password;
  return u.toString();
}

/** Drops a role made by createSidecarRole (after the test database is dropped). */
export async function dropRole(name: string): Promise<void> {
  const c = new PgClient({ connectionString: inject('adminUrl') });
  await c.connect();
  try {
    await c.query(`DROP ROLE IF EXISTS ${name}`).catch(() => undefined);
  } finally {
    await c.end();
  }
}

/** Resident memory of a process from /proc/<pid>/status: current (VmRSS) and peak (VmHWM), in bytes. */
export function processMemory(pid: number): { rss: number; peak: number } {
  const status = readFileSync(`/proc/${pid}/status`, 'utf8');
  const kib = (field: string): number => {
    const m = new RegExp(`^${field}:\\s+(\\d+) kB`, 'm').exec(status);
    if (!m) throw new Error(`no ${field} in /proc/${pid}/status`);
    return Number(m[1]) * 1024;
  };
  return { rss: kib('VmRSS'), peak: kib('VmHWM') };
}

/**
 * Spawns a sidecar process (see spawnSidecar) and waits until it logs "sidecar ready";
 * returns it with its health port.
 */
export async function spawnReadySidecar(env: NodeJS.ProcessEnv): Promise<SpawnedSidecar & { healthPort: number }> {
  const s = spawnSidecar(env);
  const readyLog = s.waitForLog((l) => l.msg === 'sidecar ready', 30_000);
  const exitedFirst = s.exited.then(({ code }) => {
    throw new Error(`sidecar exited with ${code} before it was ready: ${s.stderr().trim()}`);
  });
  // Whichever loses the race settles later: keep that from becoming an unhandled rejection.
  readyLog.catch(() => undefined);
  exitedFirst.catch(() => undefined);
  const ready = await Promise.race([readyLog, exitedFirst]);
  return Object.assign(s, { healthPort: Number(ready.healthPort) });
}

/** SIGTERM to a spawned sidecar; resolves to its exit code. */
export async function stopSpawned(s: SpawnedSidecar): Promise<number | null> {
  if (s.child.exitCode === null && s.child.signalCode === null) s.child.kill('SIGTERM');
  return (await s.exited).code;
}

/** The `people` table of the rotation tests: email (blind index, per-subject keys) and nid protected. */
export async function createPeopleTable(pool: pg.Pool): Promise<void> {
  await pool.query(`CREATE TABLE people (id int PRIMARY KEY, subject text NOT NULL, email text, nid text)`);
  await pool.query(`SELECT keyring.protect('people', 'email', p_blind_index => true, p_subject_column => 'subject')`);
  await pool.query(`SELECT keyring.protect('people', 'nid')`);
}

/** afterAll cleanup: SIGKILLs every spawned sidecar still running and waits for all to exit. */
export async function killSpawned(children: readonly SpawnedSidecar[]): Promise<void> {
  for (const c of children) if (c.child.exitCode === null && c.child.signalCode === null) c.child.kill('SIGKILL');
  await Promise.all(children.map((c) => c.exited));
}

/** Opens the keyring library (the system decrypt and lookup path) with the test keys. */
export async function openKeyring(url: string, keys: TestKeys): Promise<Keyring> {
  const config = loadConfig({
    DATABASE_URL: url, KEYRING_ENCRYPT_KEYS: keys.encrypt.join(','), KEYRING_INDEX_KEYS: keys.index.join(','),
  });
  return Keyring.open({ databaseUrl: url, keys: config.keys });
}
