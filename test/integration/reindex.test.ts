/**
 * Index root rotation (keyring.rotate('index') / keyring.reindex, sidecar/jobs/reindex.ts):
 * every blind-index term recomputed under the active index version, online. While the job
 * runs with application writes, every lookup (Keyring.lookupTerms, `bidx = ANY($terms)`)
 * finds its row; afterwards no row keeps an old-version term, the old version retires and
 * is destroyed. Also: tenant-scoped terms, two sidecars sharing a job, SIGKILL mid-job and
 * resume without redoing finished ranges, refusals, a superseded job, a quarantined value.
 */
import { randomBytes } from 'node:crypto';
import pg from 'pg';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { processBatch } from '../../sidecar/claim.js';
import { SidecarMetrics } from '../../sidecar/metrics.js';
import { blindIndexTerm, deriveIndexKey, IvPool, parseKeyHex, parseNormalization } from '../../src/crypto/index.js';
import { Db } from '../../src/db/pool.js';
import { DataKeyCache, IndexKeyCache, matchRootKeys, RootKeyStore } from '../../src/keys/index.js';
import { silentLogger } from '../../src/log.js';
import type { Keyring } from '../../src/lib/keyring.js';
import type { Sidecar } from '../../sidecar/sidecar.js';
import { auditRows, openLibrary, runCli } from '../helpers/audit.js';
import { createTestDb, type TestDb } from '../helpers/db.js';
import {
  activateKeys, createPeopleTable, createSidecarRole, dropRole, fingerprintOf, killSpawned, newKeyHex, newKeys, registerKey,
  sidecarConfig, sidecarEnv, spawnReadySidecar, startSidecar, waitFor, type SpawnedSidecar, type TestKeys,
} from '../helpers/sidecar.js';
import { pgError } from '../helpers/sql.js';

const q = async <T extends Record<string, unknown> = Record<string, unknown>>(pool: pg.Pool, sql: string, params: unknown[] = []) =>
  (await pool.query<T>(sql, params)).rows;

interface Job { state: string; done: number; skipped: number; quarantined: number; erased: number; unavailable: number; total: number; passes: number; error: string | null }
const job = async (pool: pg.Pool, id: string): Promise<Job> =>
  (await q<Job & Record<string, unknown>>(pool,
    `SELECT state, done::int, skipped::int, quarantined::int, erased::int, unavailable::int, total::int, passes, error
       FROM keyring.jobs WHERE id = $1`, [id]))[0]!;
const finished = (pool: pg.Pool, id: string, timeoutMs = 90_000) =>
  waitFor(async () => { const j = await job(pool, id); return j.state === 'done' || j.state === 'failed' ? j : undefined; },
    { timeoutMs, intervalMs: 25, what: `job ${id} to end` });
const reindex = async (pool: pg.Pool, batch = 200): Promise<string[]> =>
  (await q<{ ids: string[] }>(pool, 'SELECT keyring.reindex($1)::text[] AS ids', [batch]))[0]!.ids;
/** Terms of `table.col` per index version (the uint16 prefix). */
const termVersions = (pool: pg.Pool, table: string, col: string) => q<{ v: number; n: number }>(pool,
  `SELECT (get_byte(${col}, 0) << 8 | get_byte(${col}, 1)) AS v, count(*)::int AS n FROM ${table} WHERE ${col} IS NOT NULL GROUP BY 1 ORDER BY 1`);

describe('index root rotation under application writes', () => {
  let db: TestDb;
  let url: string;
  let kr: Keyring;
  const role = `kr_sidecar_ri_${process.pid}`;
  const running: Sidecar[] = [];
  const e1 = newKeyHex();
  const [i1, i2] = [newKeyHex(), newKeyHex()];
  const keys: TestKeys = { encrypt: [e1], index: [i1, i2] };
  const ORG = ['00000000-0000-4000-8000-00000000000a', '00000000-0000-4000-8000-00000000000b'];
  const start = async (k: TestKeys, extra: Record<string, string> = {}): Promise<Sidecar> => {
    const s = await startSidecar(url, k, { KEYRING_POLL_INTERVAL_MS: '100', ...extra });
    running.push(s);
    return s;
  };
  const stopAll = () => Promise.all(running.splice(0).map((s) => s.stop()));

  beforeAll(async () => {
    db = await createTestDb();
    await activateKeys(db.pool, { encrypt: [e1], index: [i1] });
    url = await createSidecarRole(db.pool, db.url, role);
    await createPeopleTable(db.pool);
    await db.pool.query(`CREATE TABLE accounts (id int PRIMARY KEY, org_id uuid NOT NULL, email text)`);
    await db.pool.query(`SELECT keyring.protect('public.accounts', 'email', p_blind_index => true,
      p_normalize => ARRAY['trim', 'lower'], p_tenant_column => 'org_id', p_classification => 'L4 Restricted', p_priority => 10)`);
    const s = await start({ encrypt: [e1], index: [i1] });
    await db.pool.query(`INSERT INTO people_staging SELECT g, 'subject-' || (g % 10), 'p' || g || '@example.test', 'nid-' || g
                           FROM generate_series(1, 4000) g`);
    // Equal addresses in both tenants: their terms must differ, before and after.
    await db.pool.query(`INSERT INTO accounts_staging SELECT g, (ARRAY[$1, $2]::uuid[])[1 + g % 2], 'User' || (g / 2) || '@Example.test'
                           FROM generate_series(1, 1000) g`, ORG);
    await s.drain();
    // The application's library, opened before index version 2 exists in the registry.
    kr = await openLibrary(db.url, keys);
  }, 60_000);
  afterAll(async () => {
    await kr?.close();
    await stopAll();
    await db?.drop();
    await dropRole(role);
  });

  it('refuses to retire the old version while terms use it, naming the count', async () => {
    await stopAll();
    await start(keys); // registers index version 2 (pending)
    await db.pool.query(`SELECT keyring.activate_key('index', 2)`);
    const e = await pgError(db.pool.query(`SELECT keyring.retire_key('index', 1)`));
    expect([e.code, e.message]).toEqual(['55006',
      'keyring: cannot retire index key version 1: 5000 blind-index terms still use it (public.people.email_bidx: 4000, public.accounts.email_bidx: 1000)']);
  });

  it('recomputes every term under version 2 while the application writes; no lookup ever misses', async () => {
    // Slow ranges (a pause in each) so that lookups and writes overlap the job for a while.
    await stopAll();
    const [a, b] = [await start(keys, { KEYRING_TEST_BATCH_DELAY_MS: '20' }), await start(keys, { KEYRING_TEST_BATCH_DELAY_MS: '20' })];
    expect(a && b).toBeTruthy();
    const app = new pg.Pool({ connectionString: db.url, max: 2 });
    const expected = new Map<number, string>();
    for (let g = 1; g <= 4000; g++) expected.set(g, `p${g}@example.test`);
    let stop = false;
    let writes = 0;
    let lookups = 0;
    const misses: string[] = [];
    let nextId = 4001;
    // The application: updates rows 201.. and inserts new ones through the staging view.
    const writer = (async () => {
      while (!stop) {
        if (writes % 3 === 0) {
          const id = nextId++;
          await app.query(`INSERT INTO people_staging VALUES ($1, 'subject-1', $2, 'n')`, [id, `new${id}@example.test`]);
          expected.set(id, `new${id}@example.test`);
        } else {
          const id = 201 + Math.floor(Math.random() * 3800);
          await app.query('UPDATE people_staging SET email = $2 WHERE id = $1', [id, `upd${writes}-${id}@example.test`]);
          expected.set(id, `upd${writes}-${id}@example.test`);
        }
        writes++;
      }
    })();
    // Lookups of rows 1..200 (the writer never changes them) and of both tenants' rows.
    const looker = (async () => {
      while (!stop) {
        const id = 1 + (lookups % 200);
        const terms = await kr.lookupTerms('public.people.email', `p${id}@example.test`);
        const found = await app.query('SELECT id FROM people WHERE email_bidx = ANY($1)', [terms]);
        if (!found.rows.some((r) => r.id === id)) misses.push(`people ${id} (${terms.length} terms)`);
        const acc = 2 + 2 * (lookups % 100); // even ids: tenant b
        const t2 = await kr.lookupTerms('public.accounts.email', ` user${acc / 2}@example.TEST`, { tenant: ORG[0]!.toUpperCase() });
        const byTenant = await app.query<{ id: number }>('SELECT id FROM accounts WHERE email_bidx = ANY($1) ORDER BY id', [t2]);
        // ORG[0] holds the even ids (1 + g % 2 = 1 for even g).
        if (!byTenant.rows.some((r) => r.id === acc)) misses.push(`accounts ${acc}`);
        if (byTenant.rows.some((r) => r.id % 2 === 1)) misses.push(`accounts ${acc}: the other tenant's row matched`);
        lookups++;
      }
    })();
    let ids: string[];
    try {
      await waitFor(() => writes > 20 && lookups > 5, { timeoutMs: 20_000 });
      const first = (await q<{ id: string }>(db.pool, `SELECT keyring.rotate('index', batch_size => 200)::text AS id`))[0]!.id;
      ids = (await q<{ id: string }>(db.pool, `SELECT id::text FROM keyring.jobs WHERE kind = 'reindex' ORDER BY id`)).map((r) => r.id);
      expect(ids).toHaveLength(2);
      expect(first).toBe(ids[0]); // restricted class first: accounts.email
      expect(await reindex(db.pool)).toEqual(ids); // running again follows the same jobs
      const lookupsAtStart = lookups;
      for (const id of ids) expect(await finished(db.pool, id)).toMatchObject({ state: 'done', quarantined: 0, unavailable: 0, error: null });
      expect(lookups - lookupsAtStart, 'lookups made while the jobs ran').toBeGreaterThan(10);
    } finally {
      stop = true;
      await Promise.all([writer, looker]);
    }
    expect(misses).toEqual([]);
    await waitFor(async () => (await q(db.pool, 'SELECT 1 FROM keyring.pending LIMIT 1')).length === 0, { timeoutMs: 30_000 });
    await app.end();
    console.log(`re-index with ${writes} application writes and ${lookups} lookups meanwhile, no miss`);

    // No row keeps a version-1 term; every term is the right one for its value.
    expect(await termVersions(db.pool, 'people', 'email_bidx')).toEqual([{ v: 2, n: expected.size }]);
    expect(await termVersions(db.pool, 'accounts', 'email_bidx')).toEqual([{ v: 2, n: 1000 }]);
    const root = parseKeyHex(i2, 'i2');
    try {
      const col = (await q<{ id: number; normalize: string[] }>(db.pool, `SELECT id, normalize FROM keyring.columns WHERE table_name = 'people' AND column_name = 'email'`))[0]!;
      const key = deriveIndexKey(root, col.id, null);
      const rows = await q<{ id: number; b: Buffer }>(db.pool, 'SELECT id, email_bidx AS b FROM people');
      let wrong = 0;
      for (const r of rows) {
        const want = blindIndexTerm(key, 2, Buffer.from(expected.get(r.id)!, 'utf8'), parseNormalization(col.normalize), 16, true);
        if (!want.equals(r.b)) wrong++;
      }
      expect(wrong).toBe(0);
      key.dispose();
    } finally {
      root.dispose();
    }
    const progress = await q(db.pool, `SELECT kind, purpose::text, state, percent::float8 AS percent, column_name FROM keyring.rotation_progress WHERE kind = 'reindex' ORDER BY job`);
    expect(progress).toEqual([
      { kind: 'reindex', purpose: 'index', state: 'done', percent: 100, column_name: 'public.accounts.email' },
      { kind: 'reindex', purpose: 'index', state: 'done', percent: 100, column_name: 'public.people.email' },
    ]);
    const started = await auditRows(db.pool, 'rotation.started');
    expect(started.map((r) => [r.key_purpose, r.key_version, r.detail.kind, String(r.detail.job)])).toEqual(ids!.map((id) => ['index', 2, 'reindex', id]));
    expect(started[0]!.detail.from_versions).toEqual({ 1: 1000 });
    const fin = await auditRows(db.pool, 'rotation.finished');
    expect(fin.map((r) => [r.key_purpose, r.key_version, r.detail.left])).toEqual([['index', 2, 0], ['index', 2, 0]]);

    // The old version retires and is destroyed; lookups still find every row.
    await db.pool.query(`SELECT keyring.retire_key('index', 1)`);
    await db.pool.query(`SELECT keyring.destroy_key('index', 1)`);
    for (const id of [1, 77, 4000, 4001]) {
      const terms = await kr.lookupTerms('public.people.email', expected.get(id)!);
      expect(terms).toHaveLength(1);
      expect((await q<{ id: number }>(db.pool, 'SELECT id FROM people WHERE email_bidx = ANY($1)', [terms])).map((r) => r.id)).toEqual([id]);
    }
    const tenantB = await q<{ id: number }>(db.pool, 'SELECT id FROM accounts WHERE email_bidx = ANY($1)',
      [await kr.lookupTerms('public.accounts.email', 'user7@example.test', { tenant: ORG[1]! })]);
    expect(tenantB.map((r) => r.id)).toEqual([15]); // g = 15: odd, tenant b, 'User7@...'
  }, 180_000);

  it('two sidecars share a job: each term is written once, by either', async () => {
    await stopAll();
    const nv = newKeyHex();
    const all: TestKeys = { encrypt: [e1], index: [i2, nv] };
    await Promise.all([start(all, { KEYRING_TEST_BATCH_DELAY_MS: '20' }), start(all, { KEYRING_TEST_BATCH_DELAY_MS: '20' })]);
    await db.pool.query(`SELECT keyring.activate_key('index', 3)`);
    await db.pool.query(`CREATE TABLE term_log (id int, app text)`);
    await db.pool.query(`CREATE FUNCTION public.log_term() RETURNS trigger LANGUAGE plpgsql AS $$
                           BEGIN INSERT INTO public.term_log VALUES (NEW.id, current_setting('application_name')); RETURN NEW; END $$`);
    await db.pool.query(`CREATE TRIGGER log_term AFTER UPDATE OF email_bidx ON people FOR EACH ROW
                           WHEN (OLD.email_bidx IS DISTINCT FROM NEW.email_bidx) EXECUTE FUNCTION public.log_term()`);
    await db.pool.query(`GRANT INSERT ON term_log TO ${role}`);
    const ids = await reindex(db.pool, 100);
    const people = ids[1]!;
    const n = (await job(db.pool, people)).total;
    expect(await finished(db.pool, people)).toMatchObject({ state: 'done', done: n, skipped: 0 });
    await finished(db.pool, ids[0]!);
    const log = await q<{ writes: number; rows: number; apps: number }>(db.pool,
      'SELECT count(*)::int AS writes, count(DISTINCT id)::int AS rows, count(DISTINCT app)::int AS apps FROM term_log');
    expect(log).toEqual([{ writes: n, rows: n, apps: 2 }]);
    expect(await termVersions(db.pool, 'people', 'email_bidx')).toEqual([{ v: 3, n }]);
    await db.pool.query('DROP TRIGGER log_term ON people');
  }, 120_000);
});

describe('index rotation: refusals, superseded jobs, quarantine, SIGKILL', () => {
  let db: TestDb;
  let url: string;
  const role = `kr_sidecar_rik_${process.pid}`;
  const children: SpawnedSidecar[] = [];
  let sidecar: Sidecar | undefined;
  const keys = newKeys();
  const [i2, i3] = [newKeyHex(), newKeyHex()];
  const vouch = (hex: string) => q(db.pool, `INSERT INTO keyring.sidecars (instance_id, fingerprints) VALUES ('vouching', $1)
      ON CONFLICT (instance_id) DO UPDATE SET fingerprints = EXCLUDED.fingerprints, heartbeat_at = now(), stopped_at = NULL`,
    [[fingerprintOf(hex, 'index')]]);

  beforeAll(async () => {
    db = await createTestDb();
    url = await createSidecarRole(db.pool, db.url, role);
  });
  afterAll(async () => {
    await sidecar?.stop();
    await killSpawned(children);
    await db?.drop();
    await dropRole(role);
  });

  it('refuses with no active index version, and bad batch sizes', async () => {
    await registerKey(db.pool, 'encrypt', keys.encrypt[0]!, true);
    const e = await pgError(db.pool.query(`SELECT keyring.rotate('index')`));
    expect([e.code, e.message]).toEqual(['55000', 'keyring: no index key version is active; nothing to re-index to']);
    expect(e.hint).toMatch(/activate_key\('index', <version>\)/);
    expect((await pgError(db.pool.query(`SELECT keyring.reindex(0)`))).code).toBe('22023');
    await registerKey(db.pool, 'index', keys.index[0]!, true);
    // No blind-indexed column: nothing to do, said so.
    expect((await q(db.pool, `SELECT keyring.rotate('index') AS id`))[0]).toEqual({ id: null });
    const cli = await runCli(['rotate', 'index'], sidecarEnv(db.url, keys));
    expect([cli.code, cli.stdout]).toEqual([0, 'no protected column has a blind index: nothing to re-index']);
  });

  it('resumes after SIGKILL without redoing finished ranges; quarantines an undecryptable value and finishes the rest', async () => {
    await db.pool.query(`CREATE TABLE cards (id int PRIMARY KEY, pan text)`);
    await db.pool.query(`SELECT keyring.protect('cards', 'pan', p_blind_index => true, p_normalize => ARRAY['digits'])`);
    await db.pool.query(`INSERT INTO cards_staging SELECT g, '4111 ' || lpad(g::text, 12, '0') FROM generate_series(1, 3000) g`);
    sidecar = await startSidecar(url, keys);
    await sidecar.drain();
    await sidecar.stop();
    sidecar = undefined;
    // One value that no longer decrypts (a flipped tag byte): quarantined, the job goes on.
    await db.pool.query(`UPDATE cards SET pan = set_byte(pan, octet_length(pan) - 1, get_byte(pan, octet_length(pan) - 1) # 255) WHERE id = 1500`);
    await db.pool.query(`CREATE TABLE term_log (id int)`);
    await db.pool.query(`CREATE FUNCTION public.log_term() RETURNS trigger LANGUAGE plpgsql AS $$
                           BEGIN INSERT INTO public.term_log VALUES (NEW.id); RETURN NEW; END $$`);
    await db.pool.query(`CREATE TRIGGER log_term AFTER UPDATE OF pan_bidx ON cards FOR EACH ROW
                           WHEN (OLD.pan_bidx IS DISTINCT FROM NEW.pan_bidx) EXECUTE FUNCTION public.log_term()`);
    await db.pool.query(`GRANT INSERT ON term_log TO ${role}`);

    const both: TestKeys = { encrypt: keys.encrypt, index: [...keys.index, i2] };
    const child = await spawnReadySidecar(sidecarEnv(url, both, { KEYRING_TEST_BATCH_DELAY_MS: '300', KEYRING_POLL_INTERVAL_MS: '100' }));
    children.push(child);
    let id: string;
    try {
      await db.pool.query(`SELECT keyring.activate_key('index', 2)`);
      id = (await q<{ id: string }>(db.pool, `SELECT keyring.rotate('index', batch_size => 300)::text AS id`))[0]!.id;
      await waitFor(async () => (await job(db.pool, id)).done >= 600, { timeoutMs: 30_000, intervalMs: 10, what: 'two committed ranges' });
    } finally {
      child.child.kill('SIGKILL');
      await child.exited;
    }
    const mid = await job(db.pool, id);
    expect(mid.state).toBe('running');
    expect((mid.done + mid.quarantined) % 300).toBe(0); // whole ranges only: the one in hand rolled back
    expect(mid.done).toBeLessThan(3000);
    expect((await q<{ n: number }>(db.pool, 'SELECT count(*)::int AS n FROM term_log'))[0]!.n).toBe(mid.done);

    // Retiring version 1 names what still depends on it.
    const e = await pgError(db.pool.query(`SELECT keyring.retire_key('index', 1)`));
    expect(e.message).toBe(`keyring: cannot retire index key version 1: ${3000 - mid.done} blind-index terms still use it (public.cards.pan_bidx: ${3000 - mid.done})`);

    sidecar = await startSidecar(url, both, { KEYRING_POLL_INTERVAL_MS: '100' });
    expect(await finished(db.pool, id)).toMatchObject({ state: 'done', done: 2999, quarantined: 1, total: 3000, passes: 1, error: null });
    // Each term written exactly once over both sidecars' lives.
    expect(await q(db.pool, 'SELECT count(*)::int AS n, count(DISTINCT id)::int AS rows FROM term_log')).toEqual([{ n: 2999, rows: 2999 }]);
    expect(await termVersions(db.pool, 'cards', 'pan_bidx')).toEqual([{ v: 1, n: 1 }, { v: 2, n: 2999 }]);
    expect(await q(db.pool, `SELECT row_key, reason, detail FROM keyring.quarantine WHERE resolved_at IS NULL`))
      .toEqual([{ row_key: '1500', reason: 'decrypt_failed', detail: `re-index job ${id}: auth` }]);
    const fin = (await auditRows(db.pool, 'rotation.finished')).at(-1)!;
    expect(fin.detail).toMatchObject({ job: Number(id), kind: 'reindex', done: 2999, quarantined: 1, left: 0, left_quarantined: 1 });
    // The quarantined value keeps version 1 alive: retire is refused, naming it.
    expect((await pgError(db.pool.query(`SELECT keyring.retire_key('index', 1)`))).message)
      .toBe('keyring: cannot retire index key version 1: 1 blind-index term still uses it (public.cards.pan_bidx: 1)');
    // Lookups find every other row with the new version's term (digits normalisation).
    const kr = await openLibrary(db.url, both);
    try {
      for (const g of [1, 600, 2999]) {
        const terms = await kr.lookupTerms('public.cards.pan', `4111-${String(g).padStart(12, '0')}`);
        expect((await q<{ id: number }>(db.pool, 'SELECT id FROM cards WHERE pan_bidx = ANY($1)', [terms])).map((r) => r.id)).toEqual([g]);
      }
    } finally {
      await kr.close();
    }
  }, 120_000);

  it('a job towards a version that is no longer active is superseded by the next rotate', async () => {
    await sidecar?.stop();
    sidecar = undefined;
    await db.pool.query(`DELETE FROM cards WHERE id = 1500`);
    await registerKey(db.pool, 'index', i3);
    await vouch(i3);
    // A job towards version 2 that no sidecar runs yet... (version 2 active: make a stale term)
    await db.pool.query(`UPDATE cards SET pan_bidx = '\\x0001'::bytea || substring(pan_bidx FROM 3) WHERE id <= 10`);
    const [j2] = await reindex(db.pool, 100);
    expect(await job(db.pool, j2!)).toMatchObject({ state: 'queued', total: 10 });
    await db.pool.query(`SELECT keyring.activate_key('index', 3)`);
    await db.pool.query(`UPDATE keyring.sidecars SET stopped_at = now() WHERE instance_id = 'vouching'`);
    const [j3] = await reindex(db.pool, 100);
    expect(j3).not.toBe(j2);
    expect(await job(db.pool, j2!)).toMatchObject({ state: 'failed', error: 'superseded: index key version 3 is active now' });
    const failed = (await auditRows(db.pool, 'rotation.failed')).at(-1)!;
    expect([failed.key_purpose, failed.key_version, failed.detail]).toEqual(['index', 2,
      { job: Number(j2), kind: 'reindex', done: 0, error: 'superseded', superseded_by_version: 3 }]);
    expect(await job(db.pool, j3!)).toMatchObject({ state: 'queued', total: 2999 });
    sidecar = await startSidecar(url, { encrypt: keys.encrypt, index: [...keys.index, i2, i3] }, { KEYRING_POLL_INTERVAL_MS: '100' });
    expect(await finished(db.pool, j3!)).toMatchObject({ state: 'done', done: 2999, quarantined: 0 });
    expect(await job(db.pool, j2!)).toMatchObject({ state: 'failed' }); // never picked up again
    expect(await termVersions(db.pool, 'cards', 'pan_bidx')).toEqual([{ v: 3, n: 2999 }]);
    for (const v of [1, 2]) await db.pool.query(`SELECT keyring.retire_key('index', $1)`, [v]);
  }, 120_000);

  it('a term left on another version behind the pass (a lost compare-and-swap) is caught by the final check: another pass', async () => {
    await sidecar?.stop();
    sidecar = await startSidecar(url, { encrypt: keys.encrypt, index: [i3] }, { KEYRING_POLL_INTERVAL_MS: '100', KEYRING_TEST_BATCH_DELAY_MS: '150' });
    const good = (await q<{ b: Buffer }>(db.pool, 'SELECT pan_bidx AS b FROM cards WHERE id = 1'))[0]!.b;
    // Terms of rows 1..1000 put on another version (as a stale sidecar or a restored backup would).
    const stale = `'\\x0002'::bytea || substring(pan_bidx FROM 3)`;
    await db.pool.query(`UPDATE cards SET pan_bidx = ${stale} WHERE id <= 1000`);
    const [id] = await reindex(db.pool, 100);
    await waitFor(async () => (await job(db.pool, id!)).done >= 300, { timeoutMs: 30_000, intervalMs: 10, what: 'three ranges' });
    // Row 1 was done in the first range; its term goes stale again behind the pass.
    await db.pool.query(`UPDATE cards SET pan_bidx = ${stale} WHERE id = 1`);
    expect(await finished(db.pool, id!)).toMatchObject({ state: 'done', done: 1001, passes: 2, error: null });
    expect((await q<{ b: Buffer }>(db.pool, 'SELECT pan_bidx AS b FROM cards WHERE id = 1'))[0]!.b).toEqual(good);
    expect(await termVersions(db.pool, 'cards', 'pan_bidx')).toEqual([{ v: 3, n: 2999 }]);
    expect((await auditRows(db.pool, 'rotation.finished')).at(-1)!.detail).toMatchObject({ job: Number(id), passes: 2, left: 0 });
  }, 120_000);

  it('a value under an encrypt version no live sidecar holds keeps its old term, counted unavailable; the job still ends', async () => {
    const ev = (await q<{ v: number }>(db.pool, `SELECT keyring.register_key('encrypt', $1) AS v`, [fingerprintOf(newKeyHex(), 'encrypt')]))[0]!.v;
    const orphan = (await q<{ id: string }>(db.pool,
      `INSERT INTO keyring.data_keys (column_id, subject, root_version, wrapped, state)
       SELECT id, 'nobody', $1, $2, 'retired' FROM keyring.columns WHERE table_name = 'cards' RETURNING id::text`, [ev, randomBytes(60)]))[0]!.id;
    await db.pool.query(`UPDATE cards SET pan = overlay(pan PLACING int8send($1::bigint) FROM 2 FOR 8),
                                          pan_bidx = '\\x0002'::bytea || substring(pan_bidx FROM 3) WHERE id = 2`, [orphan]);
    const [id] = await reindex(db.pool, 100);
    expect(await finished(db.pool, id!)).toMatchObject({ state: 'done', done: 0, unavailable: 1, total: 1, passes: 1,
      error: '1 term(s) are still on another index version (1 need an encrypt root no live sidecar holds); 0 more belong to quarantined values (SELECT * FROM keyring.quarantine WHERE resolved_at IS NULL)' });
    expect(await q(db.pool, `SELECT location, n::int FROM keyring.key_dependents('index', 2)`)).toEqual([{ location: 'public.cards.pan_bidx', n: 1 }]);
    const cli = await runCli(['rotate', 'index', '--batch-size', '100'], sidecarEnv(db.url, keys));
    expect(cli.code).toBe(1);
    expect(cli.stderr).toContain('1 left for a missing key version; their terms stay on the old index version, which cannot be retired yet');
  }, 60_000);
});

describe('no term of a version that is no longer active is written (the reindex migration invariant)', () => {
  let db: TestDb;
  let url: string;
  const role = `kr_sidecar_ril_${process.pid}`;
  const keys = newKeys(1, 2);
  const v2vouch = (pool: pg.Pool) => q(pool, `INSERT INTO keyring.sidecars (instance_id, fingerprints) VALUES ('vouching', $1)`,
    [[fingerprintOf(keys.index[1]!, 'index')]]);

  beforeAll(async () => {
    db = await createTestDb();
    await activateKeys(db.pool, keys);
    url = await createSidecarRole(db.pool, db.url, role);
    await db.pool.query(`CREATE TABLE users (id int PRIMARY KEY, email text)`);
    await db.pool.query(`SELECT keyring.protect('users', 'email', p_blind_index => true)`);
  });
  afterAll(async () => {
    await db?.drop();
    await dropRole(role);
  });

  it('activate_key waits for a transaction that holds the old version; afterwards the lock says "not active"', async () => {
    await registerKey(db.pool, 'index', keys.index[1]!);
    await v2vouch(db.pool);
    const holder = new pg.Client({ connectionString: url });
    await holder.connect();
    try {
      await holder.query('BEGIN');
      expect((await holder.query('SELECT keyring.lock_index_version(1) AS ok')).rows).toEqual([{ ok: true }]);
      const dba = await db.pool.connect();
      try {
        await dba.query('BEGIN');
        await dba.query(`SET LOCAL lock_timeout = '300ms'`);
        expect((await pgError(dba.query(`SELECT keyring.activate_key('index', 2)`))).code).toBe('55P03');
        await dba.query('ROLLBACK');
      } finally {
        dba.release();
      }
      await holder.query('COMMIT');
      await db.pool.query(`SELECT keyring.activate_key('index', 2)`);
      expect((await holder.query('SELECT keyring.lock_index_version(1) AS ok, keyring.lock_index_version(2) AS ok2')).rows)
        .toEqual([{ ok: false, ok2: true }]);
    } finally {
      await holder.end();
    }
  });

  it('a sidecar whose registry is stale cannot write an old-version term: the batch is retried, the row stays queued', async () => {
    const material = sidecarConfig(url, keys).keys;
    // The registry as a sidecar saw it before index version 2 was activated.
    const fresh = matchRootKeys(material, (await q<{ purpose: 'encrypt' | 'index'; version: number; fingerprint: string; state: string }>(db.pool,
      `SELECT purpose::text AS purpose, version, fingerprint, state::text AS state FROM keyring.root_keys ORDER BY purpose, version`)));
    const stale = new RootKeyStore(fresh.held.map((h) => (h.purpose === 'index' ? { ...h, state: h.version === 1 ? 'active' : 'pending' } : h)),
      fresh.registry.map((r) => (r.purpose === 'index' ? { ...r, state: r.version === 1 ? 'active' : 'pending' } : r)), fresh.fingerprints);
    expect(stale.activeVersion('index')).toBe(1);
    const logger = silentLogger();
    const pool = new Db({ connectionString: url, applicationName: 'stale sidecar', connectTimeoutMs: 5000, logger });
    const ivPool = new IvPool();
    const ctx = (store: RootKeyStore) => ({
      db: pool, ivPool, instanceId: 'stale', logger, metrics: new SidecarMetrics('stale'), testDelayMs: 0, batchBytes: 1 << 20,
      dataKeys: new DataKeyCache({ capacity: 16, rootKeys: () => store, autocommit: (fn) => pool.with(fn), ivPool }),
      indexKeys: new IndexKeyCache(16, () => store),
    });
    try {
      await db.pool.query(`INSERT INTO users_staging VALUES (1, 'a@example.test')`);
      const e = await processBatch(ctx(stale), 100).then(() => undefined, (err: unknown) => err as { code?: string; message: string });
      expect(e?.code).toBe('KEY_UNAVAILABLE');
      expect(e?.message).toMatch(/index key version 1 is no longer active/);
      expect(await q(db.pool, 'SELECT email, email_bidx FROM users')).toEqual([{ email: Buffer.from([0]), email_bidx: null }]);
      expect((await q(db.pool, 'SELECT count(*)::int AS n FROM keyring.pending'))[0]).toEqual({ n: 1 });
      // With the registry reloaded, the same row gets a version-2 term.
      expect(await processBatch(ctx(fresh), 100)).toMatchObject({ encrypted: 1 });
      expect(await termVersions(db.pool, 'users', 'email_bidx')).toEqual([{ v: 2, n: 1 }]);
    } finally {
      await pool.close();
    }
  });
});
