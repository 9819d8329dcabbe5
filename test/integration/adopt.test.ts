/**
 * Adopting a populated column online (docs/write-path.md "Adopting a populated column";
 * the adopt migration, sidecar/jobs/backfill.ts). 100,000 populated rows: protect()
 * returns at once and the table stays writable; the backfill job, shared by two sidecars
 * and resumed after a kill -9, moves every value to the write path while the application
 * inserts, updates and deletes through the staging view; keyring.status counts the
 * plaintext down to 0; the plaintext column is dropped at the end and every value
 * decrypts to the newest write (or its original value). A value over the size limit is
 * quarantined, never lost, and holds the adoption open until it is fixed.
 */
import type pg from 'pg';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { Sidecar } from '../../sidecar/sidecar.js';
import { auditRows, runCli } from '../helpers/audit.js';
import { createTestDb, type TestDb } from '../helpers/db.js';
import { connectAsApp } from '../helpers/roles.js';
import {
  activateKeys, createSidecarRole, dropRole, killSpawned, newKeys, openKeyring, sidecarEnv, spawnReadySidecar, startSidecar,
  waitFor, type SpawnedSidecar, type TestKeys,
} from '../helpers/sidecar.js';
import { pgError } from '../helpers/sql.js';

const ROWS = 100_000;

const q = async <T extends Record<string, unknown> = Record<string, unknown>>(pool: pg.Pool | pg.Client, sql: string, params: unknown[] = []) =>
  (await pool.query<T>(sql, params)).rows;

interface Job { id: string; state: string; done: number; skipped: number; quarantined: number; total: number | null; error: string | null; seconds: number | null }
const backfillJobs = async (pool: pg.Pool, table: string): Promise<Map<string, Job>> => new Map((await q<Job & { column_name: string } & Record<string, unknown>>(pool,
  `SELECT k.column_name, j.id::text, j.state, j.done::int, j.skipped::int, j.quarantined::int, j.total::int, j.error,
          extract(epoch FROM j.finished_at - j.started_at)::float8 AS seconds
     FROM keyring.jobs j JOIN keyring.columns k ON k.id = j.column_id
    WHERE j.kind = 'backfill' AND k.table_name = $1 ORDER BY j.id`, [table])).map((r) => [r.column_name, r]));
const plaintextLeft = async (pool: pg.Pool, table: string): Promise<Record<string, number>> => Object.fromEntries(
  (await q<{ column_name: string; plaintext: number }>(pool,
    `SELECT DISTINCT column_name, plaintext::int FROM keyring.status WHERE table_name = $1`, [`public.${table}`]))
    .map((r) => [r.column_name, r.plaintext]));
const columnsOf = async (pool: pg.Pool, rel: string): Promise<string[]> => (await q<{ c: string }>(pool,
  `SELECT attname AS c FROM pg_attribute WHERE attrelid = $1::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum`, [rel])).map((r) => r.c);

type Expected = { note: string | null; amount: string } | 'deleted';

describe('adopting a populated column', () => {
  let db: TestDb;
  let keys: TestKeys;
  let url: string;
  const role = `kr_sidecar_adopt_${process.pid}`;
  const running: Sidecar[] = [];
  const spawned: SpawnedSidecar[] = [];
  const expected = new Map<number, Expected>();
  /** The sidecars of the earlier tests, or one of its own when a test runs alone. */
  const sidecars = async (): Promise<Sidecar[]> => {
    if (running.length === 0) running.push(await startSidecar(url, keys, { KEYRING_POLL_INTERVAL_MS: '100' }));
    return running;
  };

  beforeAll(async () => {
    db = await createTestDb();
    keys = newKeys();
    await activateKeys(db.pool, keys);
    url = await createSidecarRole(db.pool, db.url, role);
    // Several types, NULLs and '' values; a default on the text column, NOT NULL on numeric.
    await db.pool.query(`CREATE TABLE acct (id bigint PRIMARY KEY, note text DEFAULT 'n/a', amount numeric(12,2) NOT NULL,
                                            touched int NOT NULL DEFAULT 0)`);
    await db.pool.query(`INSERT INTO acct (id, note, amount)
      SELECT g, CASE WHEN g % 10 = 0 THEN NULL WHEN g % 10 = 1 THEN '' ELSE 'note-' || g || ' ünï' END, g * 0.37
        FROM generate_series(1, ${ROWS}) g`);
    for (const r of await q<{ id: string; note: string | null; amount: string }>(db.pool, 'SELECT id, note, amount::text AS amount FROM acct')) {
      expected.set(Number(r.id), { note: r.note, amount: r.amount });
    }
  }, 120_000);
  afterAll(async () => {
    await Promise.all(running.splice(0).map((s) => s.stop()));
    await killSpawned(spawned);
    await db?.drop();
    await dropRole(role);
  });

  it('protect() returns at once on 100,000 rows; concurrent writers wait only briefly; nothing is rewritten', async () => {
    const size = async () => Number((await q<{ n: string }>(db.pool, `SELECT pg_relation_size('acct')::text AS n`))[0]!.n);
    const before = await size();
    // A writer updating rows of the table the whole time protect() runs.
    let stop = false;
    let worst = 0;
    let writes = 0;
    const writer = (async () => {
      while (!stop) {
        const t0 = performance.now();
        await db.pool.query('UPDATE acct SET touched = touched + 1 WHERE id = $1', [1 + Math.floor(Math.random() * ROWS)]);
        worst = Math.max(worst, performance.now() - t0);
        writes++;
      }
    })();
    await new Promise((r) => setTimeout(r, 200));
    const t0 = performance.now();
    await db.pool.query(`SELECT keyring.protect('acct', 'note', p_blind_index => true, p_normalize => ARRAY['trim', 'lower'])`);
    const noteMs = performance.now() - t0;
    const t1 = performance.now();
    await db.pool.query(`SELECT keyring.protect('acct', 'amount')`);
    const amountMs = performance.now() - t1;
    await new Promise((r) => setTimeout(r, 200));
    stop = true;
    await writer;
    console.log(`protect() on ${ROWS} rows: note (with blind index) ${noteMs.toFixed(1)} ms, amount ${amountMs.toFixed(1)} ms; ` +
      `longest concurrent write ${worst.toFixed(1)} ms over ${writes} writes`);
    expect(writes).toBeGreaterThan(10);
    // Bounds loose for a shared 2-core machine: a rewrite of 100k rows under the lock takes
    // several times this; the writer waits at most for protect()'s own transaction.
    expect(noteMs).toBeLessThan(1500);
    expect(amountMs).toBeLessThan(1500);
    expect(worst).toBeLessThan(1500);
    // No rewrite: the heap did not double (an ALTER COLUMN TYPE writes a new copy).
    expect(await size()).toBeLessThan(before * 1.5);

    expect(await columnsOf(db.pool, 'acct')).toEqual(['id', 'note_keyring_plain', 'amount_keyring_plain', 'touched', 'note', 'note_bidx', 'amount']);
    const jobs = await backfillJobs(db.pool, 'acct');
    expect([...jobs.keys()]).toEqual(['note', 'amount']);
    expect([...jobs.values()].map((j) => j.state)).toEqual(['queued', 'queued']);
    expect(await plaintextLeft(db.pool, 'acct')).toEqual({ note: ROWS - ROWS / 10, amount: ROWS });
    expect(Number((await q<{ n: string }>(db.pool, 'SELECT count(*) AS n FROM keyring.pending'))[0]!.n)).toBe(0);
  });

  it('the view never shows the plaintext and the application cannot read it; rows holding one read as the mask', async () => {
    // An adopted column comes after the table's other columns (it is a new column): write by name.
    expect(await columnsOf(db.pool, 'acct_staging')).toEqual(['id', 'touched', 'note', 'amount']);
    const app = await connectAsApp(db.url);
    try {
      expect(await q(app, 'SELECT id, note, amount FROM acct_staging WHERE id IN (10, 11, 12) ORDER BY id')).toEqual([
        { id: '10', note: null, amount: '-Infinity' },
        { id: '11', note: '********', amount: '-Infinity' },
        { id: '12', note: '********', amount: '-Infinity' },
      ]);
      expect((await pgError(app.query('SELECT note_keyring_plain FROM acct LIMIT 1'))).code).toBe('42501');
      expect(await q(app, 'SELECT id, touched FROM acct WHERE id = 12')).toHaveLength(1); // the other columns stay readable
    } finally {
      await app.end();
    }
    // The plaintext column is guarded like the ciphertext: no direct write.
    const dba = `kr_adopt_dba_${process.pid}`;
    await db.pool.query(`CREATE ROLE ${dba}; GRANT SELECT, UPDATE ON acct TO ${dba}; GRANT USAGE ON SCHEMA keyring TO ${dba}`);
    const c = await db.pool.connect();
    try {
      await c.query(`SET ROLE ${dba}`);
      const e = await pgError(c.query(`UPDATE acct SET note_keyring_plain = 'x' WHERE id = 12`));
      expect(e.code).toBe('42501');
      expect(e.message).toMatch(/may not write the protected columns/);
    } finally {
      await c.query('RESET ROLE');
      c.release();
      await db.pool.query(`REVOKE ALL ON acct FROM ${dba}; REVOKE USAGE ON SCHEMA keyring FROM ${dba}; DROP ROLE ${dba}`);
    }
  });

  it('refuses a second protect(), unprotect() and a backfill of a column not under adoption, with clear errors', async () => {
    const again = await pgError(db.pool.query(`SELECT keyring.protect('acct', 'note')`));
    expect(again.code).toBe('42710');
    const un = await pgError(db.pool.query(`SELECT keyring.unprotect('acct', 'note', p_force => true)`));
    expect(un.code).toBe('55000');
    expect(un.message).toMatch(/is being adopted \(backfill job \d+\)/);
    expect(un.hint).toMatch(/rotation_progress/);
    const notProtected = await pgError(db.pool.query(`SELECT keyring.backfill('public.acct.touched')`));
    expect(notProtected.code).toBe('42704');
    // backfill() of a column under adoption returns its running job, no second one.
    const jobs = await backfillJobs(db.pool, 'acct');
    expect((await q<{ j: string }>(db.pool, `SELECT keyring.backfill('public.acct.note')::text AS j`))[0]!.j).toBe(jobs.get('note')!.id);
  });

  it('protect() gives up after ddl_lock_timeout_ms behind a long transaction, changing nothing', async () => {
    await db.pool.query(`CREATE TABLE busy (id int PRIMARY KEY, secret text); INSERT INTO busy VALUES (1, 's')`);
    await db.pool.query(`UPDATE keyring.settings SET value = '300' WHERE name = 'ddl_lock_timeout_ms'`);
    const holder = await db.pool.connect();
    try {
      await holder.query('BEGIN');
      await holder.query('SELECT * FROM busy');
      const t0 = Date.now();
      const e = await pgError(db.pool.query(`SELECT keyring.protect('busy', 'secret')`));
      expect(Date.now() - t0).toBeLessThan(3000);
      expect(e.code).toBe('55P03');
      expect(e.message).toMatch(/could not lock public\.busy within 300 ms/);
      expect(e.hint).toMatch(/Nothing was changed/);
    } finally {
      await holder.query('ROLLBACK');
      holder.release();
      await db.pool.query(`UPDATE keyring.settings SET value = '2000' WHERE name = 'ddl_lock_timeout_ms'`);
    }
    expect(await columnsOf(db.pool, 'busy')).toEqual(['id', 'secret']);
    expect(await q(db.pool, `SELECT 1 FROM keyring.columns WHERE table_name = 'busy'`)).toEqual([]);
  });

  it('a sidecar killed with SIGKILL mid-range loses only that range; nothing is half moved', async () => {
    const victim = await spawnReadySidecar(sidecarEnv(url, keys, {
      KEYRING_TEST_BATCH_DELAY_MS: '400', KEYRING_POLL_INTERVAL_MS: '100', KEYRING_INSTANCE_ID: 'victim',
    }));
    spawned.push(victim);
    await waitFor(async () => ((await backfillJobs(db.pool, 'acct')).get('note')?.done ?? 0) >= 1000,
      { timeoutMs: 60_000, what: 'a first range of note done' });
    // A range in hand: its chunk row is locked by the victim's open transaction.
    await waitFor(async () => Number((await q<{ n: string }>(db.pool,
      `SELECT (SELECT count(*) FROM keyring.job_chunks) - (SELECT count(*) FROM (SELECT 1 FROM keyring.job_chunks FOR UPDATE SKIP LOCKED) x) AS n`))[0]!.n) > 0,
    { timeoutMs: 10_000, intervalMs: 20, what: 'a range in hand' });
    victim.child.kill('SIGKILL');
    expect((await victim.exited).signal).toBe('SIGKILL');
    await waitFor(async () => (await q(db.pool, `SELECT 1 FROM pg_stat_activity WHERE application_name LIKE 'keyring sidecar victim%'`)).length === 0,
      { timeoutMs: 10_000, what: 'the victim sessions to end' });
    const jobs = await backfillJobs(db.pool, 'acct');
    const left = await plaintextLeft(db.pool, 'acct');
    // Every value counted done is out of the plaintext column, every other one still in it.
    expect(left.note).toBe(jobs.get('note')!.total! - jobs.get('note')!.done);
    const amount = jobs.get('amount')!;
    expect(left.amount).toBe(amount.total === null ? ROWS : amount.total - amount.done);
    expect(jobs.get('note')!.total).toBe(ROWS - ROWS / 10);
    expect(jobs.get('note')!.state).toBe('running');
  }, 120_000);

  it('two sidecars finish the job while the application writes through the view; nothing is lost', async () => {
    // Concurrent application writes: inserts, updates of the value (new value, NULL, ''),
    // updates of another column only, deletes. `expected` follows what committed.
    const app = await connectAsApp(db.url);
    let stop = false;
    let nextId = ROWS + 1;
    let ops = 0;
    const touchedOriginal = new Set<number>();
    let writerError: unknown;
    const writer = (async () => {
      while (!stop && writerError === undefined) {
        const r = Math.random();
        const id = 1 + Math.floor(Math.random() * ROWS);
        const cur = expected.get(id)!;
        if (r < 0.3) {
          const note = `new-${ops}`;
          const n = (await app.query('UPDATE acct_staging SET note = $2 WHERE id = $1', [id, note])).rowCount;
          if (n === 1 && cur !== 'deleted') expected.set(id, { ...cur, note });
        } else if (r < 0.4) {
          const n = (await app.query('UPDATE acct_staging SET note = NULL WHERE id = $1', [id])).rowCount;
          if (n === 1 && cur !== 'deleted') expected.set(id, { ...cur, note: null });
        } else if (r < 0.45) {
          const n = (await app.query(`UPDATE acct_staging SET note = '', amount = 1.005 WHERE id = $1`, [id])).rowCount;
          if (n === 1 && cur !== 'deleted') expected.set(id, { note: '', amount: '1.01' });
        } else if (r < 0.6) {
          await app.query('UPDATE acct_staging SET touched = touched + 1 WHERE id = $1', [id]); // value kept
        } else if (r < 0.7) {
          await app.query('DELETE FROM acct_staging WHERE id = $1', [id]);
          expected.set(id, 'deleted');
        } else {
          const nid = nextId++;
          await app.query('INSERT INTO acct_staging (id, amount) VALUES ($1, $2)', [nid, nid % 1000]);
          expected.set(nid, { note: 'n/a', amount: `${nid % 1000}.00` });
        }
        if (id <= ROWS && r < 0.7) touchedOriginal.add(id);
        ops++;
      }
    })().catch((err: unknown) => { writerError = err; });
    const samples: number[] = [];
    let sampling = true;
    const sampler = (async () => {
      while (sampling) {
        samples.push((await plaintextLeft(db.pool, 'acct')).note!);
        await new Promise((r) => setTimeout(r, 250));
      }
    })();
    try {
      const t0 = Date.now();
      running.push(await startSidecar(url, keys, { KEYRING_POLL_INTERVAL_MS: '100', KEYRING_INSTANCE_ID: 'one' }));
      running.push(await startSidecar(url, keys, { KEYRING_POLL_INTERVAL_MS: '100', KEYRING_INSTANCE_ID: 'two' }));
      const claimedBy = new Set<string>();
      await waitFor(async () => {
        for (const r of await q<{ c: string | null }>(db.pool, `SELECT claimed_by AS c FROM keyring.jobs WHERE kind = 'backfill'`)) if (r.c) claimedBy.add(r.c);
        const js = [...(await backfillJobs(db.pool, 'acct')).values()];
        return writerError !== undefined || js.every((j) => j.state === 'done' || j.state === 'failed');
      }, { timeoutMs: 180_000, intervalMs: 50, what: 'both backfill jobs to end' });
      stop = true;
      await writer;
      expect(writerError).toBeUndefined(); // no application write failed (no deadlock, no refusal)
      await Promise.all(running.map((s) => s.drain()));
      const jobs = await backfillJobs(db.pool, 'acct');
      const note = jobs.get('note')!;
      console.log(`backfill of ${ROWS} rows x 2 columns with 2 sidecars and ${ops} concurrent application writes: ` +
        `note ${note.done} moved in ${note.seconds?.toFixed(1)} s (${Math.round(note.done / note.seconds!)} rows/s), ` +
        `amount ${jobs.get('amount')!.done} in ${jobs.get('amount')!.seconds?.toFixed(1)} s; ` +
        `everything encrypted ${((Date.now() - t0) / 1000).toFixed(1)} s after the sidecars started`);
      expect([...jobs.values()].map((j) => [j.state, j.error])).toEqual([['done', null], ['done', null]]);
      expect(claimedBy.has('one') && claimedBy.has('two')).toBe(true);
      for (const j of jobs.values()) {
        // Each value once: moved by a range, or left to an application write that replaced it.
        expect(j.done + j.skipped).toBeLessThanOrEqual(j.total!);
        expect(j.done).toBeGreaterThanOrEqual(j.total! - touchedOriginal.size);
        expect(j.quarantined).toBe(0);
      }
    } finally {
      stop = true;
      sampling = false;
      await sampler;
      await writer.catch(() => undefined);
      await app.end();
    }
    expect(ops).toBeGreaterThan(50);
    // Status counted the plaintext down, never up, to 0.
    expect(samples.length).toBeGreaterThan(2);
    for (let i = 1; i < samples.length; i++) expect(samples[i]).toBeLessThanOrEqual(samples[i - 1]!);
    expect(samples.some((s) => s > 0 && s < ROWS - ROWS / 10)).toBe(true);
    expect(await plaintextLeft(db.pool, 'acct')).toEqual({ note: 0, amount: 0 });

    // The plaintext columns are gone, the view is the ordinary one, nothing is queued.
    expect(await columnsOf(db.pool, 'acct')).toEqual(['id', 'touched', 'note', 'note_bidx', 'amount']);
    expect(await q(db.pool, `SELECT column_name, plain_column FROM keyring.columns WHERE table_name = 'acct' ORDER BY id`))
      .toEqual([{ column_name: 'note', plain_column: null }, { column_name: 'amount', plain_column: null }]);
    expect(Number((await q<{ n: string }>(db.pool, 'SELECT count(*) AS n FROM keyring.pending'))[0]!.n)).toBe(0);
    expect(Number((await q<{ n: string }>(db.pool, `SELECT count(*) AS n FROM acct WHERE note = '\\x00'::bytea OR amount = '\\x00'::bytea`))[0]!.n)).toBe(0);
    const app2 = await connectAsApp(db.url);
    try {
      await app2.query('SELECT * FROM acct LIMIT 1'); // the table-level grant is back
      // NOT NULL of amount holds as a check.
      expect((await pgError(app2.query('UPDATE acct_staging SET amount = NULL WHERE id = 12'))).code).toBe('23514');
    } finally {
      await app2.end();
    }

    // Every row decrypts to the newest committed write, or to its original value.
    const kr = await openKeyring(db.url, keys);
    try {
      for (const column of ['note', 'amount'] as const) {
        const got = new Map((await kr.decryptColumn(`public.acct.${column}`)).map((v) => [Number(v.rowKey), v]));
        const problems: string[] = [];
        for (const [id, e] of expected) {
          const v = got.get(id);
          if (e === 'deleted') {
            if (v) problems.push(`${id} should be deleted`);
            continue;
          }
          if (!v) { problems.push(`${id} missing`); continue; }
          if (v.error || v.value !== e[column]) problems.push(`${id}: ${v.error ?? String(v.value)} <> ${e[column]}`);
        }
        expect(problems.slice(0, 5)).toEqual([]);
        expect(got.size).toBe([...expected.values()].filter((e) => e !== 'deleted').length);
      }
      // The blind index answers for an adopted value, normalised.
      const untouched = [...expected].find(([id, e]) => id < ROWS && e !== 'deleted' && e.note?.startsWith('note-') && !touchedOriginal.has(id))!;
      const terms = await kr.lookupTerms('public.acct.note', `  ${(untouched[1] as { note: string }).note.toUpperCase()} `);
      expect(await q(db.pool, 'SELECT id::int FROM acct WHERE note_bidx = ANY($1)', [terms])).toEqual([{ id: untouched[0] }]);
    } finally {
      await kr.close();
    }

    const adopted = await auditRows(db.pool, 'column.adopted');
    expect(adopted).toHaveLength(2);
    expect(JSON.stringify(adopted)).not.toMatch(/note-\d|ünï/);
    expect(await q(db.pool, 'SELECT * FROM keyring.verify_audit_chain()')).toEqual([]); // no broken link
  }, 300_000);

  it('a value over max_value_bytes is quarantined and kept; the job fails saying what to do; fixed, backfill() finishes', async () => {
    await db.pool.query(`CREATE TABLE big (id int PRIMARY KEY, body text)`);
    await db.pool.query(`INSERT INTO big SELECT g, 'body-' || g FROM generate_series(1, 50) g`);
    await db.pool.query(`INSERT INTO big VALUES (51, repeat('x', 5000))`);
    await db.pool.query(`UPDATE keyring.settings SET value = '4096' WHERE name = 'max_value_bytes'`);
    await sidecars();
    try {
      await db.pool.query(`SELECT keyring.protect('big', 'body')`);
      const failed = await waitFor(async () => {
        const j = (await backfillJobs(db.pool, 'big')).get('body');
        return j && (j.state === 'done' || j.state === 'failed') ? j : undefined;
      }, { timeoutMs: 30_000, what: 'the big backfill to end' });
      expect(failed.state).toBe('failed');
      expect(failed.error).toMatch(/1 value\(s\) of public\.big\.body are still in plaintext .*keyring\.backfill\('public\.big\.body'\)/);
      expect(failed.error).not.toMatch(/xxxx/);
      expect(failed.done).toBe(50);
      expect(failed.quarantined).toBe(1);
      expect(await q(db.pool, `SELECT row_key, reason FROM keyring.quarantine WHERE resolved_at IS NULL AND row_key = '51'`))
        .toEqual([{ row_key: '51', reason: 'oversized' }]);
      expect(await plaintextLeft(db.pool, 'big')).toEqual({ body: 1 });
      expect(await q(db.pool, `SELECT length(body_keyring_plain) AS n FROM big WHERE id = 51`)).toEqual([{ n: 5000 }]);
      expect((await auditRows(db.pool, 'backfill.failed')).length).toBe(1);

      // Shortened through the view: the plaintext goes, the value is queued; backfill() ends it.
      await db.pool.query(`UPDATE big_staging SET body = 'short now' WHERE id = 51`);
      expect(await plaintextLeft(db.pool, 'big')).toEqual({ body: 0 });
      await db.pool.query(`SELECT keyring.backfill('public.big.body')`);
      await waitFor(async () => [...(await backfillJobs(db.pool, 'big')).values()].at(-1)!.state === 'done',
        { timeoutMs: 30_000, what: 'the second backfill to finish' });
      await Promise.all(running.map((s) => s.drain()));
      expect(await columnsOf(db.pool, 'big')).toEqual(['id', 'body']);
      const kr = await openKeyring(db.url, keys);
      try {
        expect(await kr.decrypt('public.big.body', '51')).toBe('short now');
        expect(await kr.decrypt('public.big.body', '7')).toBe('body-7');
      } finally {
        await kr.close();
      }
    } finally {
      await db.pool.query(`UPDATE keyring.settings SET value = '8388608' WHERE name = 'max_value_bytes'`);
    }
  }, 60_000);

  it('keyring protect follows the backfill until the plaintext column is gone; --detach returns at once', async () => {
    await db.pool.query(`CREATE TABLE cli_t (id int PRIMARY KEY, a text, b text)`);
    await db.pool.query(`INSERT INTO cli_t SELECT g, 'a-' || g, 'b-' || g FROM generate_series(1, 3000) g`);
    await sidecars();
    const env = sidecarEnv(db.url, keys);
    const run = await runCli(['protect', 'public.cli_t.a'], env);
    expect(run.code).toBe(0);
    expect(run.stdout).toMatch(/adopted 3,000 value\(s\) of public\.cli_t\.a into the queue/);
    expect(await columnsOf(db.pool, 'cli_t')).toEqual(['id', 'b', 'a']);
    const detached = await runCli(['protect', 'public.cli_t.b', '--detach'], env);
    expect(detached.code).toBe(0);
    expect(detached.stdout).toMatch(/backfill job \d+; follow with SELECT \* FROM keyring\.rotation_progress WHERE job = \d+/);
    expect(run.stdout + run.stderr + detached.stdout).not.toMatch(/a-\d|b-\d/);
  }, 60_000);

  it('the write path writes a ciphertext only over the placeholder: a queue entry whose row was cleared meanwhile is dropped', async () => {
    await db.pool.query(`CREATE TABLE race (id int PRIMARY KEY, secret text)`);
    await db.pool.query(`SELECT keyring.protect('race', 'secret')`);
    await sidecars();
    const c = await db.pool.connect();
    try {
      // What a staging write of NULL leaves behind when it could not see a queue entry
      // still uncommitted (a backfill range's): the entry, and a row that is NULL now.
      await c.query('BEGIN');
      await c.query(`INSERT INTO race_staging VALUES (1, 'stale'), (2, 'kept')`);
      await c.query('UPDATE race SET secret = NULL WHERE id = 1');
      await c.query('COMMIT');
    } finally {
      c.release();
    }
    await Promise.all(running.map((s) => s.drain()));
    expect(await q(db.pool, `SELECT count(*)::int AS n FROM keyring.pending p JOIN keyring.columns k ON k.id = p.column_id
                               WHERE k.table_name = 'race'`)).toEqual([{ n: 0 }]);
    expect(await q(db.pool, `SELECT id, secret IS NULL AS empty FROM race ORDER BY id`)).toEqual([{ id: 1, empty: true }, { id: 2, empty: false }]);
    const kr = await openKeyring(db.url, keys);
    try {
      expect(await kr.decrypt('public.race.secret', '2')).toBe('kept');
    } finally {
      await kr.close();
    }
  });

  it('an empty column is converted at once, with no job', async () => {
    await db.pool.query(`CREATE TABLE fresh (id int PRIMARY KEY, secret text); INSERT INTO fresh VALUES (1, NULL)`);
    await db.pool.query(`SELECT keyring.protect('fresh', 'secret')`);
    expect(await columnsOf(db.pool, 'fresh')).toEqual(['id', 'secret']);
    expect((await backfillJobs(db.pool, 'fresh')).size).toBe(0);
    expect(await plaintextLeft(db.pool, 'fresh')).toEqual({ secret: 0 });
  });
});
