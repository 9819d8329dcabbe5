/**
 * Re-encryption (keyring.reencrypt, sidecar/jobs/reencrypt.ts): new data keys under the
 * active encrypt version and every value rewritten, online. Application writes racing
 * the job win and nothing is lost; two sidecars share one job without rewriting a row
 * twice; the rate limit holds; a shredded subject stays unreadable after rotate and
 * re-encryption; `keyring verify` finds a tampered value and a value on a disabled version.
 */
import type pg from 'pg';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { Sidecar } from '../../sidecar/sidecar.js';
import { runCli } from '../helpers/audit.js';
import { createTestDb, type TestDb } from '../helpers/db.js';
import {
  activateKeys, createSidecarRole, dropRole, newKeyHex, newKeys, openKeyring, registerKey, sidecarEnv, startSidecar, waitFor,
  type TestKeys, createPeopleTable,
} from '../helpers/sidecar.js';

const q = async <T extends Record<string, unknown> = Record<string, unknown>>(pool: pg.Pool, sql: string, params: unknown[] = []) =>
  (await pool.query<T>(sql, params)).rows;

interface Job { state: string; done: number; skipped: number; quarantined: number; erased: number; unavailable: number; total: number; claims: number; error: string | null }
const job = async (pool: pg.Pool, id: string): Promise<Job> =>
  (await q<Job & Record<string, unknown>>(pool,
    `SELECT state, done::int, skipped::int, quarantined::int, erased::int, unavailable::int, total::int, claims::int, error
       FROM keyring.jobs WHERE id = $1`, [id]))[0]!;
const finished = (pool: pg.Pool, id: string, timeoutMs = 60_000) =>
  waitFor(async () => { const j = await job(pool, id); return j.state === 'done' || j.state === 'failed' ? j : undefined; },
    { timeoutMs, intervalMs: 25, what: `job ${id} to end` });
const reencrypt = async (pool: pg.Pool, column: string, batch = 500, rate: number | null = null): Promise<string[]> =>
  (await q<{ ids: string[] }>(pool, 'SELECT keyring.reencrypt($1, $2, $3)::text[] AS ids', [column, batch, rate]))[0]!.ids;

describe('re-encryption', () => {
  let db: TestDb;
  let keys: TestKeys;
  let url: string;
  const role = `kr_sidecar_re_${process.pid}`;
  const running: Sidecar[] = [];
  const v2 = newKeyHex();
  const both = (): TestKeys => ({ encrypt: [...keys.encrypt, v2], index: keys.index });
  const start = async (k: TestKeys, extra: Record<string, string> = {}): Promise<Sidecar> => {
    const s = await startSidecar(url, k, { KEYRING_POLL_INTERVAL_MS: '100', ...extra });
    running.push(s);
    return s;
  };
  const stopAll = () => Promise.all(running.splice(0).map((s) => s.stop()));
  const onVersion = async (table: string, column: string) => q<{ v: number; n: number }>(db.pool,
    `SELECT d.root_version AS v, count(*)::int AS n FROM ${table} t JOIN keyring.data_keys d ON d.id = keyring.data_key_id(t.${column})
      GROUP BY 1 ORDER BY 1`);

  beforeAll(async () => {
    db = await createTestDb();
    keys = newKeys();
    await activateKeys(db.pool, keys);
    url = await createSidecarRole(db.pool, db.url, role);
    await createPeopleTable(db.pool);
    await db.pool.query(`UPDATE keyring.columns SET priority = 10, classification = 'L4 Restricted' WHERE column_name = 'nid'`);
  });
  afterAll(async () => {
    await stopAll();
    await db?.drop();
    await dropRole(role);
  });

  it('rewrites every value under new data keys of the active version while the application writes; newest write wins', async () => {
    const s = await start(both());
    await db.pool.query(`INSERT INTO people_staging SELECT g, 'subject-' || (g % 10), 'p' || g || '@example.test', 'nid-' || g
                           FROM generate_series(1, 3000) g`);
    await s.drain();
    const bidxBefore = await q<{ id: number; b: Buffer }>(db.pool, 'SELECT id, email_bidx AS b FROM people ORDER BY id');
    const oldKeys = (await q<{ id: string }>(db.pool, 'SELECT id::text FROM keyring.data_keys')).map((r) => r.id);
    await registerKey(db.pool, 'encrypt', v2);
    await db.pool.query(`SELECT keyring.activate_key('encrypt', 2)`);

    const expected = new Map<number, { email: string; nid: string }>();
    for (let g = 1; g <= 3000; g++) expected.set(g, { email: `p${g}@example.test`, nid: `nid-${g}` });
    const t0 = Date.now();
    const ids = await reencrypt(db.pool, 'all', 200);
    expect(ids).toHaveLength(2);
    // Restricted class first: nid's job has the lower id.
    const cols = await q<{ id: string; column_name: string }>(db.pool,
      `SELECT job::text AS id, column_name FROM keyring.rotation_progress WHERE job = ANY($1::bigint[]) ORDER BY job`, [ids]);
    expect(cols.map((c) => c.column_name)).toEqual(['public.people.nid', 'public.people.email']);
    // The application keeps writing meanwhile.
    let writes = 0;
    let stop = false;
    const writer = (async () => {
      while (!stop) {
        const id = 1 + Math.floor(Math.random() * 3000);
        const email = `new-${writes}-${id}@example.test`;
        await db.pool.query('UPDATE people_staging SET email = $2 WHERE id = $1', [id, email]);
        expected.get(id)!.email = email;
        writes++;
      }
    })();
    const results = await Promise.all(ids.map((id) => finished(db.pool, id)));
    stop = true;
    await writer;
    await s.drain();
    const seconds = (Date.now() - t0) / 1000;
    console.log(`re-encryption: 6000 values (2 columns) with ${writes} concurrent writes in ${seconds.toFixed(2)} s = ${Math.round(6000 / seconds)} values/s`);
    for (const j of results) {
      expect(j.state).toBe('done');
      expect(j.quarantined + j.unavailable + j.erased).toBe(0);
      expect(j.done + j.skipped).toBe(3000);
    }
    expect(await onVersion('people', 'email')).toEqual([{ v: 2, n: 3000 }]);
    expect(await onVersion('people', 'nid')).toEqual([{ v: 2, n: 3000 }]);
    // No value is under a data key that existed before the job.
    const stale = await q(db.pool, `SELECT id FROM people WHERE keyring.data_key_id(email)::text = ANY($1) OR keyring.data_key_id(nid)::text = ANY($1)`, [oldKeys]);
    expect(stale).toEqual([]);
    // Blind-index terms stay as they were for rows the application did not rewrite.
    const bidxAfter = new Map((await q<{ id: number; b: Buffer }>(db.pool, 'SELECT id, email_bidx AS b FROM people')).map((r) => [r.id, r.b]));
    for (const r of bidxBefore) if (expected.get(r.id)!.email === `p${r.id}@example.test`) expect(bidxAfter.get(r.id)).toEqual(r.b);
    const kr = await openKeyring(db.url, both());
    try {
      for (const r of await kr.decryptColumn('public.people.email')) expect(r.value, r.rowKey).toBe(expected.get(Number(r.rowKey))!.email);
      for (const r of await kr.decryptColumn('public.people.nid')) expect(r.value, r.rowKey).toBe(expected.get(Number(r.rowKey))!.nid);
    } finally {
      await kr.close();
    }
    const audit = await q<{ action: string; detail: Record<string, unknown> }>(db.pool,
      `SELECT action, detail FROM keyring.audit_log WHERE action LIKE 'reencrypt.%' ORDER BY id`);
    expect(audit.map((a) => a.action).sort()).toEqual(['reencrypt.finished', 'reencrypt.finished', 'reencrypt.started', 'reencrypt.started']);
  });

  it("a second call while a column's job runs returns that job; other columns are untouched", async () => {
    const before = await q(db.pool, 'SELECT id, email, nid FROM people ORDER BY id');
    const [a] = await reencrypt(db.pool, 'public.people.nid', 500);
    const [b] = await reencrypt(db.pool, 'public.people.nid', 500);
    expect(b).toBe(a);
    await finished(db.pool, a!);
    const after = await q<{ id: number; email: Buffer; nid: Buffer }>(db.pool, 'SELECT id, email, nid FROM people ORDER BY id');
    expect(after.map((r) => r.email)).toEqual(before.map((r) => r.email));
  });

  it('two sidecars share one job; no row is rewritten twice; the job ends once', async () => {
    // Each range pauses 20 ms inside its transaction, so that one sidecar cannot finish the
    // 40 ranges before the other's next poll (100 ms); on a fast machine one alone did.
    await stopAll();
    await start(both(), { KEYRING_TEST_BATCH_DELAY_MS: '20' });
    await start(both(), { KEYRING_TEST_BATCH_DELAY_MS: '20' });
    try {
      await shareOneJob();
    } finally {
      await stopAll();
      await start(both());
      await start(both());
    }
  });

  async function shareOneJob(): Promise<void> {
    await db.pool.query(`CREATE TABLE ledger (id bigint PRIMARY KEY, note text)`);
    await db.pool.query(`SELECT keyring.protect('ledger', 'note')`);
    await db.pool.query(`INSERT INTO ledger_staging SELECT g, 'note ' || g FROM generate_series(1, 4000) g`);
    await running[0]!.drain();
    // A row-version counter per row: every base UPDATE bumps it.
    await db.pool.query(`ALTER TABLE ledger ADD COLUMN writes int NOT NULL DEFAULT 0`);
    await db.pool.query(`CREATE FUNCTION public.count_writes() RETURNS trigger LANGUAGE plpgsql AS $$
                           BEGIN NEW.writes := OLD.writes + 1; RETURN NEW; END $$`);
    await db.pool.query(`CREATE TRIGGER count_writes BEFORE UPDATE ON ledger FOR EACH ROW EXECUTE FUNCTION public.count_writes()`);
    const v2Count = async (sc: Sidecar) => {
      const m = /root_version="2"[^}]*\} (\d+)/.exec(await sc.metrics.registry.getSingleMetricAsString('keyring_encryptions_total'));
      return m ? Number(m[1]) : 0;
    };
    const before = await Promise.all(running.map(v2Count));
    const [id] = await reencrypt(db.pool, 'public.ledger.note', 100);
    const j = await finished(db.pool, id!);
    expect(j).toMatchObject({ state: 'done', done: 4000, skipped: 0 });
    const counts = await q<{ writes: number; n: number }>(db.pool, 'SELECT writes, count(*)::int AS n FROM ledger GROUP BY 1');
    expect(counts).toEqual([{ writes: 1, n: 4000 }]);
    const by = await q<{ n: number }>(db.pool, `SELECT count(DISTINCT carved_by)::int AS n FROM keyring.job_chunks`);
    expect(by[0]!.n).toBe(0); // every range closed
    expect((await q(db.pool, `SELECT 1 FROM keyring.audit_log WHERE action = 'reencrypt.finished' AND (detail->>'job')::bigint = $1`, [id])).length).toBe(1);
    // Both sidecars took ranges (metrics: encryptions under v2 on each).
    const after = await Promise.all(running.map(v2Count));
    const per = after.map((a, i) => a - before[i]!);
    expect(per).toHaveLength(2);
    expect(per.every((n) => n > 0), `per sidecar: ${per.join(', ')}`).toBe(true);
    expect(per.reduce((a, b) => a + b, 0)).toBe(4000);
  }

  it('respects the rate limit roughly', async () => {
    const t0 = Date.now();
    const [id] = await reencrypt(db.pool, 'public.ledger.note', 100, 1000);
    const j = await finished(db.pool, id!);
    const seconds = (Date.now() - t0) / 1000;
    expect(j.done).toBe(4000);
    // 4000 rows at 1000 rows/s: about 3-4 s (the first range starts at once).
    expect(seconds).toBeGreaterThan(2.8);
    expect(seconds).toBeLessThan(15);
  });

  it('a shredded subject stays unreadable after rotate and re-encryption', async () => {
    await db.pool.query(`SELECT * FROM keyring.shred(subject => 'subject-3', reason => 'test')`);
    const before = await q<{ id: number; email: Buffer }>(db.pool, `SELECT id, email FROM people WHERE subject = 'subject-3' ORDER BY id`);
    const rot = (await q<{ id: string }>(db.pool, `SELECT keyring.rotate('encrypt')::text AS id`))[0]!.id;
    await waitFor(async () => (await q<{ state: string }>(db.pool, 'SELECT state FROM keyring.jobs WHERE id = $1', [rot]))[0]!.state === 'done');
    const [id] = await reencrypt(db.pool, 'public.people.email', 500);
    const j = await finished(db.pool, id!);
    expect(j.erased).toBe(before.length);
    const after = await q<{ id: number; email: Buffer }>(db.pool, `SELECT id, email FROM people WHERE subject = 'subject-3' ORDER BY id`);
    expect(after).toEqual(before);
    expect((await q(db.pool, `SELECT 1 FROM keyring.data_keys WHERE subject = 'subject-3' AND state <> 'shredded'`))).toEqual([]);
    const kr = await openKeyring(db.url, both());
    try {
      const vals = await kr.decryptColumn('public.people.email', { rowKeys: before.map((r) => String(r.id)) });
      for (const v of vals) expect(v.problem).toBe('erased');
    } finally {
      await kr.close();
    }
  });

  it('keyring verify finds a tampered value and a value on a disabled version', async () => {
    const env = sidecarEnv(db.url, both());
    const ok = await runCli(['verify'], env);
    expect(ok.stderr).toBe('');
    expect(ok.code).toBe(0);
    // Tamper one byte of a stored tag (as superuser: the guard lets no application do it).
    await db.pool.query(`ALTER TABLE people DISABLE TRIGGER USER`);
    await db.pool.query(`UPDATE people SET nid = set_byte(nid, octet_length(nid) - 1, get_byte(nid, octet_length(nid) - 1) # 1) WHERE id = 7`);
    await db.pool.query(`ALTER TABLE people ENABLE TRIGGER USER`);
    const bad = await runCli(['verify', '--column', 'public.people.nid'], env);
    expect(bad.code).toBe(1);
    expect(bad.stdout).toMatch(/7 \(auth\)/);
    // keyring reencrypt: the tampered value is quarantined, the rest re-encrypted; exit 1 with a one-line summary.
    const re = await runCli(['reencrypt', 'public.people.nid', '--batch-size', '700'], env);
    expect(re.code).toBe(1);
    expect(re.stdout).toMatch(/public\.people\.nid: 2,999 re-encrypted, 0 skipped, 0 erased, 1 quarantined, 0 key unavailable \(done\)/);
    expect(re.stderr.split('\n')).toHaveLength(1);
    expect(re.stderr).toMatch(/^keyring reencrypt: 1 value\(s\) quarantined/);
    expect((await q(db.pool, `SELECT row_key FROM keyring.quarantine WHERE resolved_at IS NULL`))).toEqual([{ row_key: '7' }]);
    // A value on a disabled version: activate v3, disable v2 (its data keys stay under v2).
    const v3 = newKeyHex();
    await stopAll();
    const k3: TestKeys = { encrypt: [...both().encrypt, v3], index: keys.index };
    await start(k3);
    await db.pool.query(`SELECT keyring.disable_key('encrypt', 2, reason => 'test', successor => 3)`);
    const dis = await runCli(['verify', '--sample', '50', '--column', 'public.ledger.note'], sidecarEnv(db.url, k3));
    expect(dis.code).toBe(1);
    expect(dis.stdout).toMatch(/2 disabled/);
    const row = dis.stdout.split('\n').find((l) => l.startsWith('public.ledger.note'))!;
    expect(row).toMatch(/\| 50 +\|/);
    // A retired version must not wrap a data key created after it was retired.
    await db.pool.query(`SELECT keyring.register_key('encrypt', $1)`, ['ab'.repeat(16)]);
    await db.pool.query(`SELECT keyring.retire_key('encrypt', 4)`);
    await db.pool.query(`INSERT INTO keyring.data_keys (column_id, subject, root_version, wrapped, state)
                         SELECT id, 'late', 4, '\\x00'::bytea, 'retired' FROM keyring.columns WHERE column_name = 'note'`);
    const late = await runCli(['verify', '--sample', '5', '--column', 'public.ledger.note'], sidecarEnv(db.url, k3));
    expect(late.code).toBe(1);
    expect(late.stdout).toMatch(/encrypt key version 4 is retired but wraps 1 data key\(s\) created after it was retired/);
  });
});
