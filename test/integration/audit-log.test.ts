/**
 * The tamper-evident audit log (DESIGN.md "Database objects": append-only, hash-chained,
 * UPDATE/DELETE/TRUNCATE refused for every role). What a row records, that no role can
 * change it, that concurrent writers from many connections keep one linear chain, and that
 * verify_audit_chain() / `keyring audit verify` name the first tampered or missing row.
 */
import pg from 'pg';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { auditRows, runCli } from '../helpers/audit.js';
import { createTestDb, type TestDb } from '../helpers/db.js';
import { connect, appRoleUrl, DBA_ROLE, loginRoleUrl } from '../helpers/roles.js';
import { createSidecarRole, dropRole, fingerprintOf, newKeyHex, registerKey } from '../helpers/sidecar.js';
import { pgError } from '../helpers/sql.js';

let db: TestDb;
const sidecarRole = `kr_sc_audit_${process.pid}`;
const AUDITOR_ROLE = 'keyring_test_auditor';

async function q<T extends pg.QueryResultRow = Record<string, unknown>>(sql: string, params: unknown[] = [], pool = db.pool): Promise<T[]> {
  return (await pool.query<T>(sql, params)).rows;
}

const verify = (pool = db.pool) => q<{ id: string | null; problem: string }>('SELECT id::text, problem FROM keyring.verify_audit_chain()', [], pool);

/** A fresh database with `n` appended rows, for one tampering scenario. */
async function scenario(n: number): Promise<TestDb> {
  const t = await createTestDb();
  for (let i = 1; i <= n; i++) await t.pool.query(`SELECT keyring.audit_append('test.event', 'tester', p_detail => jsonb_build_object('i', $1::int))`, [i]);
  return t;
}

beforeAll(async () => {
  db = await createTestDb();
});
afterAll(async () => {
  await db?.drop();
  await dropRole(sidecarRole);
});

describe('what an audit row records', () => {
  it('time from the database, the database role, the actor, the key with its fingerprint', async () => {
    const hex = newKeyHex();
    const v = await registerKey(db.pool, 'encrypt', hex);
    await q(`SELECT keyring.audit_append('test.event', p_actor => 'sidecar-7', p_reason => 'why', p_row_key => '17',
                                         p_key_purpose => 'encrypt', p_key_version => $1, p_detail => '{"n": 3}')`, [v]);
    const [registered, event] = await auditRows(db.pool, 'key.registered', 'test.event');
    const { who, now } = (await q<{ who: string; now: Date }>('SELECT session_user::text AS who, now()'))[0]!;
    expect(registered).toMatchObject({ action: 'key.registered', db_role: who, actor: null, key_purpose: 'encrypt', key_version: v,
      key_fingerprint: fingerprintOf(hex, 'encrypt') });
    expect(event).toMatchObject({ db_role: who, actor: 'sidecar-7', reason: 'why', row_key: '17', key_version: v,
      key_fingerprint: fingerprintOf(hex, 'encrypt'), detail: { n: 3 } });
    expect(event!.at).toBeInstanceOf(Date);
    expect(Math.abs(event!.at.getTime() - now.getTime())).toBeLessThan(60_000);
    const types = await q<{ column_name: string; data_type: string }>(
      `SELECT column_name, data_type FROM information_schema.columns
        WHERE table_schema = 'keyring' AND table_name = 'audit_log' AND column_name IN ('at', 'db_role') ORDER BY 1`);
    expect(types).toEqual([{ column_name: 'at', data_type: 'timestamp with time zone' }, { column_name: 'db_role', data_type: 'name' }]);
  });

  it('the readable view shows the key as "encrypt v1" and the column as schema.table.column', async () => {
    await q('CREATE TABLE people (id int PRIMARY KEY, ssn text)');
    const col = (await q<{ id: number }>(`SELECT keyring.protect('people', 'ssn') AS id`))[0]!.id;
    await q(`SELECT keyring.audit_append('test.column', p_column_id => $1, p_key_purpose => 'encrypt', p_key_version => 1)`, [col]);
    await q(`SELECT keyring.unprotect('people', 'ssn')`);
    const rows = await q(`SELECT action, key, "column", row_key FROM keyring.audit WHERE action IN ('test.column', 'column.unprotected') ORDER BY id`);
    // After unprotect the registry row is gone; the name comes from the column.protected audit row.
    expect(rows).toEqual([
      { action: 'test.column', key: 'encrypt v1', column: 'public.people.ssn', row_key: null },
      { action: 'column.unprotected', key: null, column: 'public.people.ssn', row_key: null },
    ]);
  });
});

describe('append-only for every role', () => {
  it('refuses UPDATE, DELETE and TRUNCATE to the superuser (trigger) and every keyring role (privilege)', async () => {
    await q(`SELECT keyring.audit_append('test.keep')`);
    const attempts = ['UPDATE keyring.audit_log SET reason = \'rewritten\'', 'DELETE FROM keyring.audit_log', 'TRUNCATE keyring.audit_log'];
    for (const sql of attempts) {
      const e = await pgError(q(sql));
      expect(e.code).toBe('42501');
      expect(e.message).toMatch(/append-only/);
    }
    const urls = {
      admin: await loginRoleUrl(db.url, DBA_ROLE, 'keyring_admin'),
      auditor: await loginRoleUrl(db.url, AUDITOR_ROLE, 'keyring_auditor'),
      writer: await appRoleUrl(db.url),
      sidecar: await createSidecarRole(db.pool, db.url, sidecarRole),
    };
    for (const [who, url] of Object.entries(urls)) {
      const c = await connect(url);
      try {
        for (const sql of [...attempts, `INSERT INTO keyring.audit_log (action, prev_hash, hash) VALUES ('forged', '\\x', '\\x')`,
          `UPDATE keyring.audit_head SET id = 0`, `DELETE FROM keyring.audit_head`]) {
          expect([who, sql, (await pgError(c.query(sql))).code]).toEqual([who, sql, '42501']);
        }
      } finally {
        await c.end();
      }
    }
    expect(await verify()).toEqual([]);
  });

  it('keeps the chain head for the owner too (no DELETE, INSERT or TRUNCATE of keyring.audit_head)', async () => {
    for (const sql of ['DELETE FROM keyring.audit_head', `INSERT INTO keyring.audit_head VALUES (false, 0, '\\x')`, 'TRUNCATE keyring.audit_head']) {
      expect((await pgError(q(sql))).code).toMatch(/^(42501|23514)$/);
    }
  });
});

describe('concurrent writers', () => {
  it('keep one linear chain: 8 connections, single and multi-row transactions, rollbacks, REPEATABLE READ retries', async () => {
    const before = (await q<{ n: number }>('SELECT count(*)::int AS n FROM keyring.audit_log'))[0]!.n;
    const clients = await Promise.all(Array.from({ length: 8 }, () => connect(db.url)));
    let committed = 0;
    try {
      await Promise.all(clients.map(async (c, w) => {
        for (let i = 0; i < 40; i++) {
          const mode = (w + i) % 4;
          if (mode === 0) {
            await c.query(`SELECT keyring.audit_append('test.concurrent', $1)`, [`w${w}`]);
            committed++;
          } else if (mode === 1) {
            await c.query('BEGIN');
            for (let k = 0; k < 3; k++) await c.query(`SELECT keyring.audit_append('test.concurrent', $1)`, [`w${w}`]);
            await c.query('COMMIT');
            committed += 3;
          } else if (mode === 2) {
            await c.query('BEGIN');
            await c.query(`SELECT keyring.audit_append('test.rolled-back', $1)`, [`w${w}`]);
            await c.query('ROLLBACK');
          } else {
            // REPEATABLE READ: a snapshot older than the last append must not fork the chain.
            for (;;) {
              await c.query('BEGIN ISOLATION LEVEL REPEATABLE READ');
              try {
                await c.query('SELECT count(*) FROM keyring.audit_log');
                await c.query(`SELECT keyring.audit_append('test.concurrent', $1)`, [`w${w}`]);
                await c.query('COMMIT');
                committed++;
                break;
              } catch (err) {
                await c.query('ROLLBACK');
                if ((err as { code?: string }).code !== '40001') throw err;
              }
            }
          }
        }
      }));
    } finally {
      await Promise.all(clients.map((c) => c.end()));
    }
    expect(await verify()).toEqual([]);
    const rows = await q<{ n: number; rolled: number }>(
      `SELECT count(*)::int AS n, count(*) FILTER (WHERE action = 'test.rolled-back')::int AS rolled FROM keyring.audit_log`);
    expect(rows[0]).toEqual({ n: before + committed, rolled: 0 });
    // Every row links to the row before it by id order: no fork, no reordering.
    const links = await q<{ bad: number }>(
      `SELECT count(*)::int AS bad FROM (SELECT prev_hash, lag(hash) OVER (ORDER BY id) AS prev FROM keyring.audit_log) x
        WHERE prev IS NOT NULL AND prev_hash <> prev`);
    expect(links).toEqual([{ bad: 0 }]);
  });

  it('a REPEATABLE READ append whose snapshot predates another append fails with 40001 instead of forking', async () => {
    const a = await connect(db.url);
    const b = await connect(db.url);
    try {
      await a.query('BEGIN ISOLATION LEVEL REPEATABLE READ');
      await a.query('SELECT 1');
      await b.query(`SELECT keyring.audit_append('test.other')`);
      expect((await pgError(a.query(`SELECT keyring.audit_append('test.stale')`))).code).toBe('40001');
      await a.query('ROLLBACK');
    } finally {
      await a.end();
      await b.end();
    }
    expect(await verify()).toEqual([]);
  });
});

describe('verify_audit_chain() and keyring audit verify', () => {
  it('finds a row changed by a superuser with the triggers disabled, by its id', async () => {
    const t = await scenario(6);
    try {
      const id = (await q<{ id: string }>(`SELECT id::text FROM keyring.audit_log ORDER BY id OFFSET 3 LIMIT 1`, [], t.pool))[0]!.id;
      const c = await t.pool.connect();
      try {
        await c.query('BEGIN');
        await c.query('SET LOCAL session_replication_role = replica');
        await c.query(`UPDATE keyring.audit_log SET actor = 'someone else' WHERE id = $1`, [id]);
        await c.query('COMMIT');
      } finally {
        c.release();
      }
      expect(await verify(t.pool)).toEqual([{ id, problem: 'row content does not match its hash' }]);
      const cli = await runCli(['audit', 'verify'], { DATABASE_URL: t.url });
      expect(cli.code).toBe(1);
      expect(cli.stderr).toBe(`audit chain broken at row ${id}: row content does not match its hash`);
    } finally {
      await t.drop();
    }
  });

  it('finds a deleted row as a missing link (middle, start and end of the log)', async () => {
    const t = await scenario(6);
    try {
      const ids = (await q<{ id: string }>('SELECT id::text FROM keyring.audit_log ORDER BY id', [], t.pool)).map((r) => r.id);
      await t.pool.query('ALTER TABLE keyring.audit_log DISABLE TRIGGER USER');
      await t.pool.query('DELETE FROM keyring.audit_log WHERE id = $1', [ids[2]]);
      expect(await verify(t.pool)).toEqual([{ id: ids[3], problem: `rows ${ids[2]}..${ids[2]} are missing` }]);
      await t.pool.query('DELETE FROM keyring.audit_log WHERE id <= $1', [ids[3]]);
      expect(await verify(t.pool)).toEqual([{ id: ids[4], problem: `rows before ${ids[4]} are missing: the first row does not start the chain` }]);
      // Deleting the last rows leaves a chain that is whole in itself: the head notices.
      const t2 = await scenario(4);
      try {
        const last = (await q<{ id: string }>('SELECT max(id)::text AS id FROM keyring.audit_log', [], t2.pool))[0]!.id;
        await t2.pool.query('ALTER TABLE keyring.audit_log DISABLE TRIGGER USER');
        await t2.pool.query('DELETE FROM keyring.audit_log WHERE id = $1', [last]);
        expect(await verify(t2.pool)).toEqual([{ id: last, problem: `rows ${last}..${last} are missing: the chain ends at ${Number(last) - 1} but its head is row ${last}` }]);
        const cli = await runCli(['audit', 'verify'], { DATABASE_URL: t2.url });
        expect([cli.code, cli.stderr]).toEqual([1, `audit chain broken at row ${last}: rows ${last}..${last} are missing: the chain ends at ${Number(last) - 1} but its head is row ${last}`]);
      } finally {
        await t2.drop();
      }
    } finally {
      await t.drop();
    }
  });

  it('a chain rewritten by a superuser (hashes and head recomputed) passes; an anchor kept outside catches it', async () => {
    const t = await scenario(5);
    try {
      const head = await runCli(['audit', 'head'], { DATABASE_URL: t.url });
      expect(head.stdout).toMatch(/^\d+:[0-9a-f]{64}$/);
      expect((await runCli(['audit', 'verify', '--anchor', head.stdout], { DATABASE_URL: t.url })).code).toBe(0);
      // Rewrite from the second row on: every hash recomputed, the head moved along.
      await t.pool.query('ALTER TABLE keyring.audit_log DISABLE TRIGGER USER');
      await t.pool.query(`DO $$
        DECLARE r keyring.audit_log; prev bytea;
        BEGIN
          FOR r IN SELECT * FROM keyring.audit_log ORDER BY id LOOP
            IF prev IS NOT NULL THEN
              r.prev_hash := prev;
              IF r.detail ->> 'i' = '2' THEN r.actor := 'nobody'; END IF;
              r.hash := keyring.audit_row_hash(r);
              UPDATE keyring.audit_log SET actor = r.actor, prev_hash = r.prev_hash, hash = r.hash WHERE id = r.id;
            END IF;
            prev := r.hash;
          END LOOP;
          UPDATE keyring.audit_head SET hash = prev;
        END $$`);
      expect(await verify(t.pool)).toEqual([]);
      const cli = await runCli(['audit', 'verify', '--anchor', head.stdout], { DATABASE_URL: t.url });
      expect(cli.code).toBe(1);
      expect(cli.stderr).toContain(`audit chain broken at row ${head.stdout.split(':')[0]}: the row no longer holds the anchored hash`);
    } finally {
      await t.drop();
    }
  });

  it('keyring audit verify exits 0 on a whole chain, 2 on bad usage', async () => {
    const ok = await runCli(['audit', 'verify'], { DATABASE_URL: db.url });
    expect(ok.code).toBe(0);
    expect(ok.stdout).toMatch(/^audit chain intact: \d+ rows, head row \d+ \(sha256 [0-9a-f]{64}\)$/);
    expect((await runCli(['audit'], { DATABASE_URL: db.url })).code).toBe(2);
    expect((await runCli(['audit', 'verify', '--anchor', 'nonsense'], { DATABASE_URL: db.url })).code).toBe(2);
  });
});
