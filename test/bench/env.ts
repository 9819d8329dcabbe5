/**
 * Bench database: a fresh database on DATABASE_URL's server when it is set, else the
 * embedded PostgreSQL in a temp dir. Everything is dropped at the end.
 */
import { mkdtempSync, rmSync, chmodSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import pg from 'pg';
import { startEmbedded, type EmbeddedServer } from '../../src/db/embedded.js';
import { migrate } from '../../src/db/migrate.js';

export interface BenchDb {
  readonly url: string;
  readonly serverVersion: string;
  /** True when the server is the embedded one started for this run. */
  readonly embedded: boolean;
  /** Drops the database, stops the embedded server, removes its files. Never throws; idempotent. */
  close(): Promise<void>;
}

/**
 * A connected client whose connection-level errors (the server shutting down on Ctrl-C,
 * a terminated backend) do not crash the process: a query in flight still rejects.
 */
export async function connect(url: string, applicationName = 'keyring bench'): Promise<pg.Client> {
  const c = new pg.Client({ connectionString: url, application_name: applicationName, connectionTimeoutMillis: 10_000 });
  c.on('error', () => undefined);
  await c.connect();
  return c;
}

function withDatabase(url: string, db: string): string {
  const u = new URL(url);
  u.pathname = `/${db}`;
  return u.toString();
}

/** Resolves with fn's result, or undefined after `ms` (a step of the cleanup must not hang it). */
async function within<T>(ms: number, fn: () => Promise<T>): Promise<T | undefined> {
  let timer: NodeJS.Timeout | undefined;
  try {
    return await Promise.race([
      fn().catch(() => undefined),
      new Promise<undefined>((r) => { timer = setTimeout(() => r(undefined), ms); }),
    ]);
  } finally {
    clearTimeout(timer);
  }
}

/**
 * `register` receives close() before anything is started, so that a Ctrl-C during the
 * start (initdb, migrations) still cleans up.
 */
export async function openBenchDb(env: NodeJS.ProcessEnv, register?: (close: () => Promise<void>) => void): Promise<BenchDb> {
  let server: EmbeddedServer | undefined;
  let tmp: string | undefined;
  let adminUrl = env.DATABASE_URL;
  let name: string | undefined;
  const close = async (): Promise<void> => {
    if (name && adminUrl) {
      const url = adminUrl;
      const db = name;
      await within(15_000, async () => {
        const c = await connect(url, 'keyring bench cleanup');
        try {
          await c.query(`DROP DATABASE IF EXISTS ${db} WITH (FORCE)`);
        } finally {
          await c.end().catch(() => undefined);
        }
      });
      name = undefined;
    }
    // stop() waits for the server's exit event: bounded, in case Ctrl-C already stopped it.
    if (server) await within(10_000, () => server!.stop());
    server = undefined;
    if (tmp) {
      try {
        rmSync(tmp, { recursive: true, force: true });
      } catch {
        // removed again by the exit handler
      }
    }
    tmp = undefined;
  };
  register?.(close);
  try {
    if (!adminUrl) {
      const dir = mkdtempSync(join(tmpdir(), 'keyring-bench-'));
      tmp = dir;
      // Last resort when the process exits before close() finished (a forced exit).
      process.once('exit', () => rmSync(dir, { recursive: true, force: true }));
      chmodSync(tmp, 0o755); // the embedded server runs as the postgres OS user when we are root
      server = await startEmbedded({ dataDir: join(tmp, 'data') });
      adminUrl = server.url;
    }
    const admin = await connect(adminUrl, 'keyring bench setup');
    try {
      const db = `keyring_bench_${Date.now()}`;
      await admin.query(`CREATE DATABASE ${db}`);
      name = db;
      const { rows } = await admin.query<{ v: string }>("SELECT current_setting('server_version') AS v");
      const url = withDatabase(adminUrl, db);
      await migrate(url);
      return { url, serverVersion: rows[0]?.v ?? '?', embedded: server !== undefined, close };
    } finally {
      await admin.end().catch(() => undefined);
    }
  } catch (err) {
    await close();
    throw err;
  }
}
