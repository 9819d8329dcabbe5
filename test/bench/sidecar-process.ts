/**
 * The sidecar as a separate process, as deployed: `node --import tsx sidecar/bin.ts`
 * with keys generated at run time and passed in the environment only (never written to
 * disk). Its health port is 0 (the OS picks one); with the log level at warn the port is
 * not logged, so it is read from /proc: the listening socket owned by the child.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { readdirSync, readFileSync, readlinkSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import type pg from 'pg';
import { fingerprint, generateKey, parseKeyHex, type KeyPurpose } from '../../src/crypto/index.js';

const ROOT = fileURLToPath(new URL('../..', import.meta.url));

export interface BenchKeys {
  /** 64 hex digits each, from the CSPRNG; held in memory only. */
  readonly encrypt: string;
  readonly index: string;
}

export function newBenchKeys(): BenchKeys {
  const hex = (): string => generateKey().use((b) => b.toString('hex'));
  return { encrypt: hex(), index: hex() };
}

function fingerprintOf(hex: string, purpose: KeyPurpose): string {
  const k = parseKeyHex(hex, `bench ${purpose} key`);
  try {
    return fingerprint(k, purpose);
  } finally {
    k.dispose();
  }
}

/** keyring.register_key + keyring.activate_key for both purposes (bootstrap: nothing was active yet). */
export async function activateKeys(db: pg.ClientBase, keys: BenchKeys): Promise<void> {
  for (const purpose of ['encrypt', 'index'] as const) {
    const { rows } = await db.query<{ v: number }>('SELECT keyring.register_key($1, $2) AS v', [purpose, fingerprintOf(keys[purpose], purpose)]);
    await db.query('SELECT keyring.activate_key($1, $2)', [purpose, rows[0]!.v]);
  }
}

export interface SidecarOptions {
  readonly databaseUrl: string;
  readonly keys: BenchKeys;
  readonly batchSize: number;
  readonly logLevel?: string;
  readonly instanceId?: string;
  /** Server settings for the sidecar's sessions (libpq `options`, e.g. "-c enable_hashjoin=off"): experiments only. */
  readonly pgOptions?: string;
  /** Extra node flags (e.g. --cpu-prof): profiling only. */
  readonly nodeArgs?: readonly string[];
}

/** The URL with libpq `options` (server settings applied at connection start). */
function withOptions(url: string, options: string | undefined): string {
  if (!options) return url;
  const u = new URL(url);
  u.searchParams.set('options', options);
  return u.toString();
}

export interface SidecarProcess {
  readonly pid: number;
  readonly healthPort: number;
  /** The last lines the process wrote (stdout and stderr), for error reports. */
  output(): string;
  /** Prometheus text from /metrics. */
  metrics(): Promise<string>;
  /** SIGTERM, then SIGKILL after `graceMs`; resolves when the process has exited. Idempotent. */
  stop(graceMs?: number): Promise<void>;
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** Sidecar processes still running, for a forced exit. */
const live = new Set<ChildProcess>();

/** SIGKILL to every sidecar process still running (a forced exit that cannot wait). */
export function killSidecarsNow(): void {
  for (const c of live) c.kill('SIGKILL');
}

/** Starts a sidecar process and resolves once its /healthz answers 200. */
export async function startSidecarProcess(o: SidecarOptions, timeoutMs = 60_000): Promise<SidecarProcess> {
  const env: NodeJS.ProcessEnv = {
    PATH: process.env.PATH,
    HOME: process.env.HOME,
    TMPDIR: process.env.TMPDIR,
    DATABASE_URL: withOptions(o.databaseUrl, o.pgOptions),
    KEYRING_ENCRYPT_KEYS: o.keys.encrypt,
    KEYRING_INDEX_KEYS: o.keys.index,
    KEYRING_HEALTH_PORT: '0',
    KEYRING_LOG_LEVEL: o.logLevel ?? 'warn',
    KEYRING_BATCH_SIZE: String(o.batchSize),
    KEYRING_SHUTDOWN_TIMEOUT_MS: '10000',
    ...(o.instanceId ? { KEYRING_INSTANCE_ID: o.instanceId } : {}),
  };
  for (const k of Object.keys(env)) if (env[k] === undefined) delete env[k];
  // One process (no tsx CLI wrapper), so that signals and /proc reach the sidecar itself.
  const child = spawn(process.execPath, [...(o.nodeArgs ?? []), '--import', 'tsx', 'sidecar/bin.ts'], { cwd: ROOT, env, stdio: ['ignore', 'pipe', 'pipe'] });
  const tail: string[] = [];
  const keep = (d: Buffer): void => {
    tail.push(...d.toString().split('\n').filter((l) => l.trim() !== ''));
    if (tail.length > 50) tail.splice(0, tail.length - 50);
  };
  child.stdout!.on('data', keep);
  child.stderr!.on('data', keep);
  live.add(child);
  const exited = new Promise<void>((resolve) => child.once('exit', () => { live.delete(child); resolve(); }));
  let gone = false;
  void exited.then(() => { gone = true; });
  const pid = child.pid;
  if (pid === undefined) throw new Error('could not spawn the sidecar process');

  let stopping: Promise<void> | undefined;
  const stop = (graceMs = 15_000): Promise<void> => {
    stopping ??= (async () => {
      if (gone) return;
      child.kill('SIGTERM');
      const timer = setTimeout(() => child.kill('SIGKILL'), graceMs);
      await exited;
      clearTimeout(timer);
    })();
    return stopping;
  };

  try {
    const port = await waitForHealth(child, () => gone, timeoutMs);
    return {
      pid,
      healthPort: port,
      output: () => tail.join('\n'),
      metrics: async () => (await fetch(`http://127.0.0.1:${port}/metrics`)).text(),
      stop,
    };
  } catch (err) {
    await stop(2_000);
    const out = tail.join('\n');
    throw new Error(`${(err as Error).message}${out ? `\nsidecar output:\n${out}` : ''}`);
  }
}

async function waitForHealth(child: ChildProcess, gone: () => boolean, timeoutMs: number): Promise<number> {
  const end = Date.now() + timeoutMs;
  let port: number | undefined;
  let last = 'no listening socket yet';
  while (Date.now() < end) {
    if (gone()) throw new Error(`the sidecar exited during start (code ${child.exitCode ?? child.signalCode})`);
    port ??= listeningPort(child.pid!);
    if (port !== undefined) {
      try {
        const res = await fetch(`http://127.0.0.1:${port}/healthz`);
        const body = await res.text();
        if (res.status === 200) return port;
        last = `/healthz ${res.status} ${body}`;
      } catch (err) {
        last = String(err);
      }
    }
    await sleep(50);
  }
  throw new Error(`the sidecar was not healthy within ${timeoutMs} ms (${last})`);
}

/** The TCP port a process listens on (its only listening socket: the health server), from /proc. */
export function listeningPort(pid: number): number | undefined {
  const inodes = new Set<string>();
  try {
    for (const fd of readdirSync(`/proc/${pid}/fd`)) {
      try {
        const m = /^socket:\[(\d+)\]$/.exec(readlinkSync(`/proc/${pid}/fd/${fd}`));
        if (m) inodes.add(m[1]!);
      } catch {
        // fd closed meanwhile
      }
    }
  } catch {
    return undefined;
  }
  for (const file of ['/proc/net/tcp6', '/proc/net/tcp']) {
    let text: string;
    try {
      text = readFileSync(file, 'utf8');
    } catch {
      continue;
    }
    for (const line of text.split('\n').slice(1)) {
      const f = line.trim().split(/\s+/);
      // sl local_address rem_address st ... inode (field 9)
      if (f[3] === '0A' && f[9] !== undefined && inodes.has(f[9])) {
        return parseInt(f[1]!.split(':')[1]!, 16);
      }
    }
  }
  return undefined;
}

/** Sum and count of a Prometheus histogram, and the value of counters, from /metrics text. */
export function metricValue(text: string, name: string): number {
  let sum = 0;
  let found = false;
  for (const line of text.split('\n')) {
    if (line.startsWith('#')) continue;
    const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)/.exec(line);
    if (m && m[1] === name) {
      sum += Number(m[3]);
      found = true;
    }
  }
  return found ? sum : Number.NaN;
}
