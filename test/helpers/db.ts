import { inject } from 'vitest';
import pg from 'pg';

export interface TestDb {
  /** Connection string of a fresh database cloned from the migrated template. */
  readonly url: string;
  readonly name: string;
  /** A pool connected as the superuser, for setup and assertions. */
  readonly pool: pg.Pool;
  /** Drops the database (closing the pool first). */
  drop(): Promise<void>;
}

let counter = 0;

export function withDatabase(url: string, db: string): string {
  const u = new URL(url);
  u.pathname = `/${db}`;
  return u.toString();
}

/** The test server's parent process id, to name databases that teardown removes. */
function runId(): string {
  const tpl = inject('templateDb');
  return /^keyring_tpl_(\d+)_/.exec(tpl)?.[1] ?? '0';
}

/** Creates a fresh, migrated database for one test file (or one test). */
export async function createTestDb(): Promise<TestDb> {
  const adminUrl = inject('adminUrl');
  const name = `kt_${runId()}_${process.pid}_${Date.now()}_${counter++}`;
  const admin = new pg.Client({ connectionString: adminUrl });
  await admin.connect();
  try {
    await admin.query(`CREATE DATABASE ${name} TEMPLATE ${inject('templateDb')}`);
  } finally {
    await admin.end();
  }
  const url = withDatabase(adminUrl, name);
  const pool = new pg.Pool({ connectionString: url, max: 8 });
  pool.on('error', () => undefined);
  return {
    url,
    name,
    pool,
    async drop() {
      await pool.end();
      const c = new pg.Client({ connectionString: adminUrl });
      await c.connect();
      await c.query(`DROP DATABASE IF EXISTS ${name} WITH (FORCE)`).catch(() => undefined);
      await c.end();
    },
  };
}
