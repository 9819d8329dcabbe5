/**
 * Vitest global setup: one PostgreSQL for the whole run and a migrated template
 * database that every test file clones (graphile-worker's pattern).
 *
 * KEYRING_TEST_DATABASE_URL set: use that server (CI runs the suite against PG 15).
 * Otherwise: start the embedded PostgreSQL in a fresh temp dir.
 */
import { mkdtempSync, rmSync, chmodSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import pg from 'pg';
import type { TestProject } from 'vitest/node';
import { startEmbedded, type EmbeddedServer } from '../../src/db/embedded.js';
import { migrate } from '../../src/db/migrate.js';

declare module 'vitest' {
  export interface ProvidedContext {
    adminUrl: string;
    templateDb: string;
  }
}

function withDatabase(url: string, db: string): string {
  const u = new URL(url);
  u.pathname = `/${db}`;
  return u.toString();
}

export default async function setup(project: TestProject): Promise<() => Promise<void>> {
  let server: EmbeddedServer | undefined;
  let tmp: string | undefined;
  let adminUrl = process.env.KEYRING_TEST_DATABASE_URL;
  if (!adminUrl) {
    tmp = mkdtempSync(join(tmpdir(), 'keyring-test-'));
    chmodSync(tmp, 0o755); // the postgres OS user must reach the data dir below it
    server = await startEmbedded({ dataDir: join(tmp, 'data') });
    adminUrl = server.url;
  }
  const templateDb = `keyring_tpl_${process.pid}_${Date.now()}`;
  const admin = new pg.Client({ connectionString: adminUrl });
  await admin.connect();
  await admin.query(`CREATE DATABASE ${templateDb}`);
  await admin.end();
  await migrate(withDatabase(adminUrl, templateDb));

  project.provide('adminUrl', adminUrl);
  project.provide('templateDb', templateDb);

  return async () => {
    const c = new pg.Client({ connectionString: adminUrl });
    await c.connect();
    const { rows } = await c.query<{ datname: string }>(
      `SELECT datname FROM pg_database WHERE datname LIKE $1 OR datname = $2`,
      [`kt_${process.pid}_%`, templateDb],
    );
    for (const { datname } of rows) {
      await c.query(`DROP DATABASE IF EXISTS ${datname} WITH (FORCE)`).catch(() => undefined);
    }
    await c.end();
    if (server) await server.stop();
    if (tmp) rmSync(tmp, { recursive: true, force: true });
  };
}
