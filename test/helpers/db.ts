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

/** Creates database `name` from `template` and returns it with a superuser pool. */
async function createFrom(name: string, template: string, poolSize: number): Promise<TestDb> {
  const adminUrl = inject('adminUrl');
  const admin = new pg.Client({ connectionString: adminUrl });
  await admin.connect();
  try {
    await admin.query(`CREATE DATABASE ${name} TEMPLATE ${template}`);
  } finally {
    await admin.end();
  }
  const url = withDatabase(adminUrl, name);
  const pool = new pg.Pool({ connectionString: url, max: poolSize });
  pool.on('error', () => undefined);
  return {
    url,
    name,
    pool,
    async drop() {
      await pool.end();
      await dropDatabase(name);
    },
  };
}

/** Creates a fresh, migrated database for one test file (or one test). */
export async function createTestDb(): Promise<TestDb> {
  return createFrom(`kt_${runId()}_${process.pid}_${Date.now()}_${counter++}`, inject('templateDb'), 8);
}

/**
 * A database name the global teardown removes if the test that made it crashes
 * (`kt_<run>_...`), for databases a test creates itself (an empty one, the demo's).
 */
export function testDbName(tag: string): string {
  if (!/^[a-z0-9_]+$/.test(tag)) throw new Error(`not a plain name tag: ${tag}`);
  return `kt_${runId()}_${process.pid}_${Date.now()}_${counter++}_${tag}`;
}

/** A fresh database WITHOUT the keyring schema (cloned from template0), e.g. for `keyring migrate`. */
export async function createEmptyTestDb(tag = 'empty'): Promise<TestDb> {
  return createFrom(testDbName(tag), `template0 ENCODING 'UTF8'`, 4);
}

/** Drops a database by name on the test server (no error when it is gone). */
export async function dropDatabase(name: string): Promise<void> {
  const c = new pg.Client({ connectionString: inject('adminUrl') });
  await c.connect();
  try {
    await c.query(`DROP DATABASE IF EXISTS ${name} WITH (FORCE)`).catch(() => undefined);
  } finally {
    await c.end();
  }
}
