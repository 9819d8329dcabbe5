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
  close(): Promise<void>;
}

function withDatabase(url: string, db: string): string {
  const u = new URL(url);
  u.pathname = `/${db}`;
  return u.toString();
}

export async function openBenchDb(env: NodeJS.ProcessEnv): Promise<BenchDb> {
  let server: EmbeddedServer | undefined;
  let tmp: string | undefined;
  let adminUrl = env.DATABASE_URL;
  if (!adminUrl) {
    tmp = mkdtempSync(join(tmpdir(), 'keyring-bench-'));
    chmodSync(tmp, 0o755);
    server = await startEmbedded({ dataDir: join(tmp, 'data') });
    adminUrl = server.url;
  }
  const name = `keyring_bench_${Date.now()}`;
  const admin = new pg.Client({ connectionString: adminUrl });
  await admin.connect();
  await admin.query(`CREATE DATABASE ${name}`);
  const { rows } = await admin.query<{ v: string }>('SHOW server_version');
  await admin.end();
  const url = withDatabase(adminUrl, name);
  await migrate(url);
  return {
    url,
    serverVersion: rows[0]?.v ?? '?',
    async close() {
      const c = new pg.Client({ connectionString: adminUrl });
      await c.connect();
      await c.query(`DROP DATABASE IF EXISTS ${name} WITH (FORCE)`).catch(() => undefined);
      await c.end();
      if (server) await server.stop();
      if (tmp) rmSync(tmp, { recursive: true, force: true });
    },
  };
}
