/**
 * Encrypt root rotation by rewrap (keyring.rotate, sidecar/jobs/rewrap.ts): every data
 * key under an older version is rewrapped under the active one, values untouched;
 * resumable after SIGKILL with no key rewrapped twice; idempotent; a key that does not
 * unwrap is left as it is and counted (case C03's rewrap side); 100k data keys timed.
 * Sidecars run as a login role that is only a member of keyring_sidecar.
 */
import type pg from 'pg';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { generateKey, IvPool, parseKeyHex, unwrapDataKey, wrapDataKey } from '../../src/crypto/index.js';
import type { Sidecar } from '../../sidecar/sidecar.js';
import { createTestDb, type TestDb } from '../helpers/db.js';
import {
  activateKeys, createSidecarRole, dropRole, fingerprintOf, newKeyHex, newKeys, openKeyring, registerKey, sidecarEnv,
  spawnReadySidecar, startSidecar, waitFor, type TestKeys, createPeopleTable,
} from '../helpers/sidecar.js';
import { pgError } from '../helpers/sql.js';

const q = async <T extends Record<string, unknown> = Record<string, unknown>>(pool: pg.Pool, sql: string, params: unknown[] = []) =>
  (await pool.query<T>(sql, params)).rows;

interface JobRow { state: string; done: number; failed: number; total: number; cursor: string; error: string | null }
const job = async (pool: pg.Pool, id: string): Promise<JobRow> =>
  (await q<JobRow & Record<string, unknown>>(pool,
    `SELECT state, done::int, failed::int, total::int, cursor, error FROM keyring.jobs WHERE id = $1`, [id]))[0]!;
const rotate = async (pool: pg.Pool, batchSize?: number): Promise<string> =>
  (await q<{ id: string }>(pool, batchSize ? `SELECT keyring.rotate('encrypt', batch_size => $1) AS id` : `SELECT keyring.rotate('encrypt') AS id`,
    batchSize ? [batchSize] : []))[0]!.id;
const finished = (pool: pg.Pool, id: string, timeoutMs = 60_000) =>
  waitFor(async () => { const j = await job(pool, id); return j.state === 'done' || j.state === 'failed' ? j : undefined; },
    { timeoutMs, intervalMs: 20, what: `job ${id} to end` });

/**
 * `n` per-subject data keys of column `columnId`, wrapped under encrypt root `rootHex`
 * (version `version`) in TS and inserted with unnest in big batches, the way a long-lived
 * deployment accumulates them. Returns their ids and (for checks) the plain keys as hex.
 */
async function makeDataKeys(pool: pg.Pool, rootHex: string, version: number, columnId: number, n: number): Promise<{ ids: string[]; plain: Map<string, string> }> {
  const root = parseKeyHex(rootHex, 'test root');
  const ivs = new IvPool();
  const ids = (await q<{ id: string }>(pool, `SELECT nextval('keyring.data_keys_id_seq')::text AS id FROM generate_series(1, $1)`, [n])).map((r) => r.id);
  const plain = new Map<string, string>();
  const wrapped = ids.map((id) => {
    const dk = generateKey();
    try {
      if (plain.size < 200) plain.set(id, dk.use((b) => b.toString('hex')));
      return wrapDataKey(root, version, BigInt(id), dk, ivs);
    } finally {
      dk.dispose();
    }
  });
  root.dispose();
  for (let i = 0; i < n; i += 20_000) {
    const slice = ids.slice(i, i + 20_000);
    await pool.query(
      `INSERT INTO keyring.data_keys (id, column_id, subject, root_version, wrapped)
       SELECT u.id, $1, 'subject-' || u.id, $2, u.w FROM unnest($3::bigint[], $4::bytea[]) AS u(id, w)`,
      [columnId, version, slice, wrapped.slice(i, i + 20_000)]);
  }
  return { ids, plain };
}

describe('rewrap of real values', () => {
  let db: TestDb;
  let keys: TestKeys;
  let url: string;
  const role = `kr_sidecar_rw_${process.pid}`;
  const running: Sidecar[] = [];
  const v2 = newKeyHex();
  let before: { id: number; email: Buffer; email_bidx: Buffer; nid: Buffer }[];
  const expected = new Map<string, { email: string; nid: string }>();

  const start = async (k: TestKeys): Promise<Sidecar> => {
    const s = await startSidecar(url, k, { KEYRING_POLL_INTERVAL_MS: '100' });
    running.push(s);
    return s;
  };
  const stopAll = () => Promise.all(running.splice(0).map((s) => s.stop()));
  const rows = () => q<{ id: number; email: Buffer; email_bidx: Buffer; nid: Buffer }>(db.pool,
    'SELECT id, email, email_bidx, nid FROM people ORDER BY id');
  const versions = async () => (await q<{ v: number; n: number }>(db.pool,
    'SELECT root_version AS v, count(*)::int AS n FROM keyring.data_keys GROUP BY 1 ORDER BY 1'));

  async function expectAllDecrypt(k: TestKeys): Promise<void> {
    const kr = await openKeyring(db.url, k);
    try {
      const email = await kr.decryptColumn('public.people.email');
      const nid = await kr.decryptColumn('public.people.nid');
      expect(email.length).toBe(expected.size);
      for (const r of [...email, ...nid]) expect(r.error, `row ${r.rowKey}`).toBeUndefined();
      for (const r of email) expect(r.value).toBe(expected.get(r.rowKey)!.email);
      for (const r of nid) expect(r.value).toBe(expected.get(r.rowKey)!.nid);
    } finally {
      await kr.close();
    }
  }

  beforeAll(async () => {
    db = await createTestDb();
    keys = newKeys();
    await activateKeys(db.pool, keys);
    url = await createSidecarRole(db.pool, db.url, role);
    await createPeopleTable(db.pool);
  });
  afterAll(async () => {
    await stopAll();
    await db?.drop();
    await dropRole(role);
  });

  it('rewraps every data key under the active version; ciphertexts and terms stay byte-identical and decrypt', async () => {
    const s1 = await start(keys);
    await db.pool.query(`INSERT INTO people_staging SELECT g, 'subject-' || (g % 12), 'p' || g || '@example.test', 'nid-' || g
                           FROM generate_series(1, 60) g`);
    for (let g = 1; g <= 60; g++) expected.set(String(g), { email: `p${g}@example.test`, nid: `nid-${g}` });
    await s1.drain();
    before = await rows();
    expect(await versions()).toEqual([{ v: 1, n: 13 }]); // 12 subject keys + 1 column key

    await stopAll();
    await start({ encrypt: [...keys.encrypt, v2], index: keys.index });
    await db.pool.query(`SELECT keyring.activate_key('encrypt', 2)`);
    const id = await rotate(db.pool);
    const j = await finished(db.pool, id);
    expect(j).toMatchObject({ state: 'done', done: 13, failed: 0, total: 13, error: null });
    expect(await versions()).toEqual([{ v: 2, n: 13 }]);
    expect(await rows()).toEqual(before); // values untouched
    await expectAllDecrypt({ encrypt: [...keys.encrypt, v2], index: keys.index });

    const progress = (await q(db.pool, `SELECT job::text, kind, state, done::int, total::int, failed::int, percent::float8,
                                                rows_per_second IS NOT NULL AS rate, eta, sidecar IS NOT NULL AS ran
                                           FROM keyring.rotation_progress WHERE job = $1`, [id]))[0];
    expect(progress).toEqual({ job: id, kind: 'rewrap', state: 'done', done: 13, total: 13, failed: 0, percent: 100, rate: true, eta: null, ran: true });
    const audit = await q(db.pool, `SELECT action, actor IS NOT NULL AS by_sidecar, key_version, detail FROM keyring.audit_log
                                     WHERE action LIKE 'rotation.%' ORDER BY id`);
    expect(audit).toMatchObject([
      { action: 'rotation.started', by_sidecar: false, key_version: 2,
        detail: { job: Number(id), kind: 'rewrap', total: 13, from_versions: { 1: 13 }, batch_size: 5000 } },
      { action: 'rotation.finished', by_sidecar: true, key_version: 2, detail: { job: Number(id), kind: 'rewrap', done: 13, failed: 0 } },
    ]);
  });

  it('is idempotent: a second rotation finds nothing to do and touches nothing', async () => {
    const wrapped = await q(db.pool, 'SELECT id, wrapped, root_version FROM keyring.data_keys ORDER BY id');
    const id = await rotate(db.pool);
    expect(await job(db.pool, id)).toMatchObject({ state: 'done', done: 0, failed: 0, total: 0 });
    expect(await q(db.pool, 'SELECT id, wrapped, root_version FROM keyring.data_keys ORDER BY id')).toEqual(wrapped);
    expect((await q(db.pool, `SELECT detail FROM keyring.audit_log WHERE action = 'rotation.finished' ORDER BY id DESC LIMIT 1`))[0])
      .toEqual({ detail: { job: Number(id), kind: 'rewrap', done: 0, failed: 0 } });
  });

  it('after retire + destroy of the old version, a sidecar without it starts and every value still decrypts', async () => {
    await db.pool.query(`SELECT keyring.retire_key('encrypt', 1)`);
    await db.pool.query(`SELECT keyring.destroy_key('encrypt', 1)`);
    await stopAll();
    const only = { encrypt: [v2], index: keys.index };
    const s = await start(only);
    await db.pool.query(`INSERT INTO people_staging VALUES (61, 'subject-new', 'new@example.test', 'nid-61')`);
    expected.set('61', { email: 'new@example.test', nid: 'nid-61' });
    await s.drain();
    await expectAllDecrypt(only);
  });

  it('returns the unfinished job while it runs, and supersedes it when another version becomes active', async () => {
    await stopAll(); // nobody runs jobs now
    const [v3, v4] = [newKeyHex(), newKeyHex()];
    const vouch = async (hex: string) => q(db.pool, `INSERT INTO keyring.sidecars (instance_id, fingerprints) VALUES ($1, $2)
        ON CONFLICT (instance_id) DO UPDATE SET fingerprints = EXCLUDED.fingerprints, heartbeat_at = now(), stopped_at = NULL`,
    ['vouching', [fingerprintOf(hex, 'encrypt')]]);
    expect(await registerKey(db.pool, 'encrypt', v3)).toBe(3);
    await vouch(v3);
    await db.pool.query(`SELECT keyring.activate_key('encrypt', 3)`);
    const j1 = await rotate(db.pool);
    expect(await rotate(db.pool)).toBe(j1);
    expect(await job(db.pool, j1)).toMatchObject({ state: 'queued', done: 0, total: 14 });

    expect(await registerKey(db.pool, 'encrypt', v4)).toBe(4);
    await vouch(v4);
    await db.pool.query(`SELECT keyring.activate_key('encrypt', 4)`);
    await db.pool.query(`UPDATE keyring.sidecars SET stopped_at = now() WHERE instance_id = 'vouching'`);
    const j2 = await rotate(db.pool);
    expect(j2).not.toBe(j1);
    expect(await job(db.pool, j1)).toMatchObject({ state: 'failed', error: 'superseded: encrypt key version 4 is active now' });
    expect((await q(db.pool, `SELECT detail FROM keyring.audit_log WHERE action = 'rotation.failed'`))[0])
      .toMatchObject({ detail: { job: Number(j1), error: 'superseded', superseded_by_version: 4 } });

    const all = { encrypt: [v2, v3, v4], index: keys.index };
    await start(all);
    expect(await finished(db.pool, j2)).toMatchObject({ state: 'done', done: 14, failed: 0, total: 14 });
    expect(await versions()).toEqual([{ v: 4, n: 14 }]);
    expect(await job(db.pool, j1)).toMatchObject({ state: 'failed' }); // never picked up again
    await expectAllDecrypt(all);
  });

  it('refuses bad batch sizes (rotate(\'index\') is a re-index: test/integration/reindex.test.ts)', async () => {
    expect((await pgError(db.pool.query(`SELECT keyring.rotate('index', batch_size => 0)`))).code).toBe('22023');
    expect((await pgError(db.pool.query(`SELECT keyring.rotate('encrypt', batch_size => 0)`))).code).toBe('22023');
  });
});

describe('rewrap after a crash (SIGKILL mid-job) and with keys that do not unwrap', () => {
  let db: TestDb;
  let keys: TestKeys;
  let url: string;
  const role = `kr_sidecar_rwk_${process.pid}`;
  let sidecar: Sidecar | undefined;

  beforeAll(async () => {
    db = await createTestDb();
    keys = newKeys();
    await activateKeys(db.pool, keys);
    url = await createSidecarRole(db.pool, db.url, role);
    // One row per rewrap of a key: shows that no key is rewrapped twice, and that a
    // rolled-back batch leaves nothing behind.
    await db.pool.query(`CREATE TABLE rewrap_log (id bigint NOT NULL, from_version int, to_version int)`);
    await db.pool.query(`CREATE FUNCTION log_rewrap() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER AS $$
      BEGIN INSERT INTO public.rewrap_log VALUES (NEW.id, OLD.root_version, NEW.root_version); RETURN NEW; END $$`);
    await db.pool.query(`CREATE TRIGGER log_rewrap AFTER UPDATE OF root_version ON keyring.data_keys FOR EACH ROW
      WHEN (OLD.root_version IS DISTINCT FROM NEW.root_version) EXECUTE FUNCTION log_rewrap()`);
  });
  afterAll(async () => {
    await sidecar?.stop();
    await db?.drop();
    await dropRole(role);
  });

  it('resumes from the committed cursor, rewraps each key exactly once, and leaves undecryptable keys counted', async () => {
    await db.pool.query(`CREATE TABLE accounts (id int PRIMARY KEY, iban text)`);
    const col = (await q<{ id: number }>(db.pool, `SELECT keyring.protect('accounts', 'iban') AS id`))[0]!.id;
    const { ids, plain } = await makeDataKeys(db.pool, keys.encrypt[0]!, 1, col, 3000);
    // Two keys that cannot unwrap: a flipped tag byte, and another key's wrapping (the AAD binds the id).
    const [bad1, bad2, donor] = [ids[100]!, ids[2500]!, ids[2501]!];
    await db.pool.query(`UPDATE keyring.data_keys SET wrapped = overlay(wrapped PLACING '\\xff'::bytea FROM 60 FOR 1) WHERE id = $1`, [bad1]);
    await db.pool.query(`UPDATE keyring.data_keys SET wrapped = (SELECT wrapped FROM keyring.data_keys WHERE id = $2) WHERE id = $1`, [bad2, donor]);
    await db.pool.query('TRUNCATE rewrap_log');
    const badBefore = await q(db.pool, 'SELECT id, wrapped FROM keyring.data_keys WHERE id = ANY($1) ORDER BY id', [[bad1, bad2]]);

    const v2 = newKeyHex();
    const both = { encrypt: [...keys.encrypt, v2], index: keys.index };
    const child = await spawnReadySidecar(sidecarEnv(url, both, { KEYRING_TEST_BATCH_DELAY_MS: '300', KEYRING_POLL_INTERVAL_MS: '100' }));
    let id: string;
    try {
      await db.pool.query(`SELECT keyring.activate_key('encrypt', 2)`);
      id = await rotate(db.pool, 300);
      await waitFor(async () => (await job(db.pool, id)).done >= 600, { timeoutMs: 30_000, intervalMs: 10, what: 'two committed batches' });
    } finally {
      child.child.kill('SIGKILL');
      await child.exited;
    }
    const mid = await job(db.pool, id);
    expect(mid.state).toBe('running');
    expect(mid.done + mid.failed).toBeLessThan(3000);
    expect((mid.done + mid.failed) % 300).toBe(0); // whole batches only: the one in hand rolled back
    expect(mid.failed).toBe(1); // bad1 was in the first batch
    expect(mid.cursor).toBe(ids[mid.done + mid.failed - 1]);
    const logged = (await q<{ n: number }>(db.pool, 'SELECT count(*)::int AS n FROM rewrap_log'))[0]!.n;
    expect(logged).toBe(mid.done);

    // Another sidecar (in-process this time) continues from the cursor.
    sidecar = await startSidecar(url, both, { KEYRING_POLL_INTERVAL_MS: '100' });
    const end = await finished(db.pool, id);
    expect(end).toMatchObject({ state: 'done', done: 2998, failed: 2, total: 3000, error: null });
    expect(await q(db.pool, `SELECT count(*)::int AS n, count(DISTINCT id)::int AS keys, min(from_version) AS f, max(to_version) AS t
                               FROM rewrap_log`)).toEqual([{ n: 2998, keys: 2998, f: 1, t: 2 }]);
    // The two bad keys are left exactly as they were, and are what stays on v1.
    expect(await q(db.pool, 'SELECT id, wrapped FROM keyring.data_keys WHERE root_version = 1 ORDER BY id')).toEqual(badBefore);
    // The rewrapped keys are the same keys, now under v2.
    const root2 = parseKeyHex(v2, 'v2');
    const sample = await q<{ id: string; wrapped: Buffer }>(db.pool, 'SELECT id::text, wrapped FROM keyring.data_keys WHERE id = ANY($1)', [[...plain.keys()]]);
    for (const r of sample) {
      if (r.id === bad1) continue;
      const dk = unwrapDataKey(root2, 2, BigInt(r.id), r.wrapped);
      expect(dk.use((b) => b.toString('hex'))).toBe(plain.get(r.id));
      dk.dispose();
    }
    root2.dispose();
    const fin = (await q<{ detail: Record<string, unknown> }>(db.pool,
      `SELECT detail FROM keyring.audit_log WHERE action = 'rotation.finished' ORDER BY id DESC LIMIT 1`))[0]!.detail;
    expect(fin).toMatchObject({ job: Number(id), done: 2998, failed: 2, failed_data_key_ids_first: [bad1, bad2] });

    // Retiring v1 is refused while the two keys depend on it, naming them by column.
    const e = await pgError(db.pool.query(`SELECT keyring.retire_key('encrypt', 1)`));
    expect(e.message).toBe("keyring: cannot retire encrypt key version 1: it still wraps 2 data keys (public.accounts.iban: 2); " +
      "run SELECT keyring.rotate('encrypt') first");

    // Rotating again tries just those two again: counted as failed again, and the job ends.
    const again = await rotate(db.pool, 300);
    expect(await finished(db.pool, again)).toMatchObject({ state: 'done', done: 0, failed: 2, total: 2 });
    expect((await q<{ n: number }>(db.pool, 'SELECT count(*)::int AS n FROM rewrap_log'))[0]!.n).toBe(2998);
  });
});

describe('rewrap of 100,000 data keys', () => {
  let db: TestDb;
  let url: string;
  const role = `kr_sidecar_rwb_${process.pid}`;
  let sidecar: Sidecar | undefined;

  beforeAll(async () => {
    db = await createTestDb();
    url = await createSidecarRole(db.pool, db.url, role);
  });
  afterAll(async () => {
    await sidecar?.stop();
    await db?.drop();
    await dropRole(role);
  });

  it('finishes (the time is printed, not asserted: timing claims belong in npm run bench, whose rotation section measures it)', async () => {
    const keys = newKeys();
    await activateKeys(db.pool, keys);
    const n = 100_000;
    const t = Date.now();
    await makeDataKeys(db.pool, keys.encrypt[0]!, 1, 1, n);
    await db.pool.query('ANALYZE keyring.data_keys');
    const setup = Date.now() - t;
    const v2 = newKeyHex();
    sidecar = await startSidecar(url, { encrypt: [...keys.encrypt, v2], index: keys.index });
    await db.pool.query(`SELECT keyring.activate_key('encrypt', 2)`);

    const t0 = performance.now();
    const id = await rotate(db.pool);
    const end = await finished(db.pool, id, 120_000);
    const wall = (performance.now() - t0) / 1000;
    expect(end).toMatchObject({ state: 'done', done: n, failed: 0, total: n });
    expect(await q(db.pool, 'SELECT root_version AS v, count(*)::int AS n FROM keyring.data_keys GROUP BY 1')).toEqual([{ v: 2, n }]);
    const { seconds } = (await q<{ seconds: number }>(db.pool,
      'SELECT extract(epoch FROM finished_at - started_at)::float8 AS seconds FROM keyring.jobs WHERE id = $1', [id]))[0]!;
    console.log(`rewrap of ${n.toLocaleString('en-US')} data keys: ${wall.toFixed(2)} s from rotate() to done ` +
      `(job ${seconds.toFixed(2)} s, ${Math.round(n / seconds).toLocaleString('en-US')} keys/s; setup ${(setup / 1000).toFixed(1)} s)`);
  });
});
