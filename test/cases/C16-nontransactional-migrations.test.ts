/**
 * C16 — Migrations that cannot run in a transaction (CREATE INDEX CONCURRENTLY,
 * ALTER TYPE ... ADD VALUE).
 *
 * 00003 builds keyring.quarantine_open_uq CONCURRENTLY, 00004 adds 'disabled' to
 * keyring.key_state; both are files with the disable-transaction header and one
 * statement. migrate() is the one path the sidecar start-up and `keyring migrate` share.
 *
 * Stated limit (step 2): while the migrations re-run, an application keeps inserting
 * through a staging view; no single insert may take more than 2 s, and inserts must keep
 * completing during the run.
 */
import { copyFileSync, mkdtempSync, readFileSync, readdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, inject, it } from 'vitest';
import pg from 'pg';
import { MIGRATIONS_DIR, knownSchemaVersion, migrate } from '../../src/db/migrate.js';
import { createTestDb, withDatabase, type TestDb } from '../helpers/db.js';
import { connectAsApp } from '../helpers/roles.js';
import { pgError, splitStatements } from '../helpers/sql.js';

const HEADER = '-- postgres-migrations disable-transaction';
const MAX_INSERT_WAIT_MS = 2000;

const files = readdirSync(MIGRATIONS_DIR).filter((f) => f.endsWith('.sql')).sort();
const read = (f: string) => readFileSync(join(MIGRATIONS_DIR, f), 'utf8');

/** An empty database created from template1 (not the migrated test template). */
const created: string[] = [];
async function emptyDatabase(tag: string): Promise<string> {
  const adminUrl = inject('adminUrl');
  const run = /^keyring_tpl_(\d+)_/.exec(inject('templateDb'))?.[1] ?? '0';
  const name = `kt_${run}_${process.pid}_${Date.now()}_c16_${tag}`; // kt_<run>_*: dropped by teardown too
  const admin = new pg.Client({ connectionString: adminUrl });
  await admin.connect();
  try {
    await admin.query(`CREATE DATABASE ${name}`);
  } finally {
    await admin.end();
  }
  created.push(name);
  return withDatabase(adminUrl, name);
}

async function query<T extends Record<string, unknown>>(url: string, sql: string, params: unknown[] = []): Promise<T[]> {
  const c = new pg.Client({ connectionString: url });
  await c.connect();
  try {
    return (await c.query<T>(sql, params)).rows;
  } finally {
    await c.end();
  }
}

const ourMigrations = files.map((f) => f.replace(/^\d+_/, '').replace(/\.sql$/, ''));

afterAll(async () => {
  const admin = new pg.Client({ connectionString: inject('adminUrl') });
  await admin.connect();
  for (const name of created) await admin.query(`DROP DATABASE IF EXISTS ${name} WITH (FORCE)`).catch(() => undefined);
  await admin.end();
});

describe('C16 step 4: lint of the migration files', () => {
  it('the splitter sees statements as the server does', () => {
    expect(splitStatements(`-- a; comment\nSELECT ';'; /* x; /* nested; */ */ SELECT $f$ a; b $f$;\nSELECT E'\\';'`))
      .toEqual([`SELECT ';'`, 'SELECT $f$ a; b $f$', `SELECT E'\\';'`]);
    expect(splitStatements(read(files.find((f) => f.startsWith('00002'))!)).length).toBeGreaterThan(20);
  });

  it('every file with the disable-transaction header holds exactly one statement, the header first', () => {
    const nonTransactional = files.filter((f) => read(f).includes(HEADER));
    expect(nonTransactional).toEqual(['00003_quarantine_open_unique.sql', '00004_key_state_disabled.sql']);
    for (const f of nonTransactional) {
      const sql = read(f);
      expect(sql.split('\n')[0], f).toBe(HEADER);
      expect(splitStatements(sql), f).toHaveLength(1);
    }
  });

  it('statements that cannot run in a transaction live only in such files', () => {
    for (const f of files.filter((x) => !read(x).includes(HEADER))) {
      for (const stmt of splitStatements(read(f))) {
        expect(stmt, f).not.toMatch(/\bCONCURRENTLY\b/i);
        expect(stmt, f).not.toMatch(/\bADD\s+VALUE\b/i);
      }
    }
  });

  it("the enum value 'disabled' is used neither before nor in the migration that adds it", () => {
    const adding = files.findIndex((f) => /ADD\s+VALUE\s+IF\s+NOT\s+EXISTS\s+'disabled'/i.test(read(f)));
    expect(files[adding]).toBe('00004_key_state_disabled.sql');
    expect(splitStatements(read(files[adding]!))).toEqual([
      `ALTER TYPE keyring.key_state ADD VALUE IF NOT EXISTS 'disabled' AFTER 'active'`]);
    for (const f of files.slice(0, adding)) {
      for (const stmt of splitStatements(read(f))) expect(stmt, f).not.toMatch(/'disabled'/);
    }
  });
});

describe('C16 step 1: all migrations on an empty database', () => {
  it('apply in order, and leave a valid unique index and the new enum value', async () => {
    const url = await emptyDatabase('empty');
    const result = await migrate(url);
    expect(result.applied.filter((n) => n !== 'create-migrations-table')).toEqual(ourMigrations);
    expect(result.version).toBe(knownSchemaVersion());
    const [idx] = await query(url, `SELECT i.indisvalid, i.indisunique, pg_get_expr(i.indpred, i.indrelid) AS pred
                                       FROM pg_index i WHERE i.indexrelid = 'keyring.quarantine_open_uq'::regclass`);
    expect(idx).toEqual({ indisvalid: true, indisunique: true, pred: '(resolved_at IS NULL)' });
    const [e] = await query<{ labels: string[] }>(url, `SELECT enum_range(NULL::keyring.key_state)::text[] AS labels`);
    expect(e!.labels).toEqual(['pending', 'active', 'disabled', 'decrypt_only', 'retired', 'destroyed']);
    expect((await migrate(url)).applied).toEqual([]);
  });

  // KNOWN BUG, outside this file's reach: src/db/migrate.ts waits for its advisory lock with
  // a blocking pg_advisory_lock(). A session blocked that way holds a snapshot, and
  // CREATE INDEX CONCURRENTLY (00003) waits for every older snapshot to end: the second
  // migrator waits for the first's lock, the first's index build waits for the second's
  // snapshot -> "deadlock detected". Polling pg_try_advisory_lock() (each try a short
  // statement) fixes it. Turn this back into it() once migrate.ts polls.
  it('three concurrent runs all succeed; exactly one applies the migrations', async () => {
    const url = await emptyDatabase('concurrent');
    const results = await Promise.all([migrate(url), migrate(url), migrate(url)]);
    expect(results.map((r) => r.version)).toEqual(Array(3).fill(knownSchemaVersion()));
    const applied = results.map((r) => r.applied.length).sort();
    expect(applied).toEqual([0, 0, ourMigrations.length + 1]);
    const rows = await query<{ n: number; d: number }>(url,
      `SELECT count(*)::int AS n, count(DISTINCT name)::int AS d FROM keyring.migrations`);
    expect(rows).toEqual([{ n: ourMigrations.length + 1, d: ourMigrations.length + 1 }]);
  });

  it('concurrent runs on an up-to-date database all succeed and apply nothing', async () => {
    const url = await emptyDatabase('uptodate');
    await migrate(url);
    const results = await Promise.all([migrate(url), migrate(url), migrate(url)]);
    expect(results.map((r) => r.applied)).toEqual([[], [], []]);
  });
});

describe('C16 steps 2 and 3: re-running on a busy database; a failed concurrent build', () => {
  let db: TestDb;
  let columnId: number;

  /**
   * The migrations up to 00004 only: steps 2 and 3 re-run 00003 and 00004, and the later,
   * ordinary migrations (already applied by the template) must not run a second time.
   */
  const upTo00004 = (() => {
    const dir = mkdtempSync(join(tmpdir(), 'keyring-c16-'));
    for (const f of files.filter((name) => /^0000[1-4]_/.test(name))) copyFileSync(join(MIGRATIONS_DIR, f), join(dir, f));
    return dir;
  })();

  /** Takes the database back to before 00003 (and everything after it). */
  async function rollBackTo00002(): Promise<void> {
    await db.pool.query(`DROP INDEX IF EXISTS keyring.quarantine_open_uq`);
    await db.pool.query(`DELETE FROM keyring.migrations WHERE id >= 3`);
  }

  afterAll(async () => {
    await db?.drop();
    rmSync(upTo00004, { recursive: true, force: true });
  });

  it('step 2: with 100k rows in a protected table, inserts through the staging view keep flowing', async () => {
    db = await createTestDb();
    await db.pool.query(`CREATE TABLE busy (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, name text, secret text)`);
    await db.pool.query(`INSERT INTO busy (name, secret) SELECT 'row-' || g, 'secret-' || g FROM generate_series(1, 100000) g`);
    columnId = (await db.pool.query(`SELECT keyring.protect('busy', 'secret', true) AS id`)).rows[0].id;
    // 100k open quarantine entries: the concurrent build has real work to do
    await db.pool.query(`INSERT INTO keyring.quarantine (column_id, row_key, reason)
                         SELECT $1, g::text, 'seed' FROM generate_series(1, 100000) g`, [columnId]);
    await rollBackTo00002();

    const app = await connectAsApp(db.url);
    const latencies: Array<{ at: number; ms: number }> = [];
    let stop = false;
    const writer = (async () => {
      for (let i = 0; !stop && i < 100_000; i++) {
        const t0 = performance.now();
        await app.query(`INSERT INTO busy_staging (name, secret) VALUES ($1, $2)`, [`live-${i}`, `live-secret-${i}`]);
        latencies.push({ at: t0, ms: performance.now() - t0 });
      }
    })();
    try {
      while (latencies.length < 20) await new Promise((r) => setTimeout(r, 10));
      const start = performance.now();
      const result = await migrate(db.url, upTo00004);
      const end = performance.now();
      await new Promise((r) => setTimeout(r, 100));
      stop = true;
      await writer;

      expect(result.applied).toEqual(['quarantine_open_unique', 'key_state_disabled']);
      const during = latencies.filter((l) => l.at >= start && l.at <= end);
      const worst = Math.max(...latencies.map((l) => l.ms));
      console.info(`C16 step 2: migrate ran ${Math.round(end - start)} ms; ${during.length} inserts completed meanwhile; `
        + `slowest insert ${worst.toFixed(1)} ms (limit ${MAX_INSERT_WAIT_MS} ms)`);
      expect(during.length, `inserts during a ${Math.round(end - start)} ms run`).toBeGreaterThan(0);
      expect(worst, 'slowest insert (ms)').toBeLessThan(MAX_INSERT_WAIT_MS);
    } finally {
      stop = true;
      await writer.catch(() => undefined);
      await app.end();
    }
    const rows = await db.pool.query(`SELECT count(*)::int AS n FROM busy WHERE name LIKE 'live-%'`);
    expect(rows.rows[0].n).toBe(latencies.length);
  });

  it('step 3: a failing concurrent build is not recorded; after fixing the data a re-run succeeds', async () => {
    await rollBackTo00002();
    // two open entries for one value: the unique index cannot be built
    await db.pool.query(`INSERT INTO keyring.quarantine (column_id, row_key, reason) VALUES ($1, 'dup', 'a'), ($1, 'dup', 'b')`,
      [columnId]);
    const e = await pgError(migrate(db.url, upTo00004));
    expect(e.message).toMatch(/quarantine_open_unique/);
    expect(e.message).toMatch(/could not create unique index "quarantine_open_uq"/);
    const recorded = await db.pool.query<{ id: number }>(`SELECT id FROM keyring.migrations WHERE id >= 3`);
    expect(recorded.rows).toEqual([]); // never records a migration that did not fully apply
    const leftover = await db.pool.query(`SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass('keyring.quarantine_open_uq')`);
    expect(leftover.rows).toEqual([{ indisvalid: false }]); // what a failed CONCURRENTLY leaves behind

    // fix the data, re-run: no manual cleanup of the invalid index
    await db.pool.query(`UPDATE keyring.quarantine SET resolved_at = now()
                          WHERE id = (SELECT max(id) FROM keyring.quarantine WHERE row_key = 'dup')`);
    const again = await migrate(db.url, upTo00004);
    expect(again.applied).toEqual(['quarantine_open_unique', 'key_state_disabled']);
    const invalid = await db.pool.query(
      `SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
        WHERE c.relnamespace = 'keyring'::regnamespace AND NOT (i.indisvalid AND i.indisready)`);
    expect(invalid.rows).toEqual([]);
    const valid = await db.pool.query(`SELECT indisvalid FROM pg_index WHERE indexrelid = 'keyring.quarantine_open_uq'::regclass`);
    expect(valid.rows).toEqual([{ indisvalid: true }]);
    const dup = await pgError(db.pool.query(
      `INSERT INTO keyring.quarantine (column_id, row_key, reason) VALUES ($1, 'dup', 'again')`, [columnId]));
    expect(dup.code).toBe('23505');
    const labels = await db.pool.query(`SELECT 'disabled'::keyring.key_state::text AS s`);
    expect(labels.rows).toEqual([{ s: 'disabled' }]);
  });
});
