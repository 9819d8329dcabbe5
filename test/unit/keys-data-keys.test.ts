import type pg from 'pg';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { deriveIndexKey, fingerprint, generateKey, IvPool, unwrapDataKey, type SecretBytes } from '../../src/crypto/index.js';
import { DataKeyCache } from '../../src/keys/data-keys.js';
import { IndexKeyCache } from '../../src/keys/index-keys.js';
import { resolveRootKeys, RootKeyStore } from '../../src/keys/root-keys.js';
import { createTestDb, type TestDb } from '../helpers/db.js';

let db: TestDb;
let root: SecretBytes;
let indexRoot: SecretBytes;
let store: RootKeyStore;
let columnId: number;

beforeAll(async () => {
  db = await createTestDb();
  root = generateKey();
  indexRoot = generateKey();
  await db.pool.query(
    `INSERT INTO keyring.root_keys (purpose, version, fingerprint, state) VALUES
       ('encrypt', 1, $1, 'active'), ('index', 1, $2, 'active')`,
    [fingerprint(root, 'encrypt'), fingerprint(indexRoot, 'index')],
  );
  const { rows } = await db.pool.query(
    `INSERT INTO keyring.columns (table_schema, table_name, column_name, data_type, pk_columns, pk_types, staging_view, trigger_prefix)
     VALUES ('public', 'people', 'email', 'text', '{id}', '{bigint}', 'people_staging', 'tg_people') RETURNING id`);
  columnId = rows[0].id;
  store = await withClient((c) => resolveRootKeys(c, {
    source: 'env', encrypt: [{ label: 'E[0]', key: root }], index: [{ label: 'I[0]', key: indexRoot }],
  }, { register: false }));
});
afterAll(async () => { await db?.drop(); });
beforeEach(async () => { await db.pool.query('DELETE FROM keyring.data_keys'); });

async function withClient<T>(fn: (c: pg.PoolClient) => Promise<T>): Promise<T> {
  const c = await db.pool.connect();
  try { return await fn(c); } finally { c.release(); }
}

function cache(capacity = 100, max?: bigint): DataKeyCache {
  return new DataKeyCache({
    capacity, rootKeys: () => store, autocommit: withClient, ivPool: new IvPool(),
    ...(max === undefined ? {} : { maxEncryptions: () => max }),
  });
}

describe('DataKeyCache', () => {
  it('creates the active data key of a scope on demand, wrapped under the active encrypt root', async () => {
    const dk = (await withClient((c) => cache().activeKeys(c, [{ columnId, subject: null, count: 1 }]))).get(`${columnId}`)!;
    const { rows } = await db.pool.query('SELECT id, root_version, wrapped, state, subject FROM keyring.data_keys');
    expect(rows).toHaveLength(1);
    expect(BigInt(rows[0].id)).toBe(dk.id);
    expect(rows[0]).toMatchObject({ root_version: 1, state: 'active', subject: null });
    expect(unwrapDataKey(root, 1, dk.id, rows[0].wrapped).equals(dk.key)).toBe(true);
  });

  it('keeps one key per (column, subject) and reuses it', async () => {
    const c1 = cache();
    const demands = [{ columnId, subject: '42', count: 3 }, { columnId, subject: null, count: 1 }];
    const first = await withClient((c) => c1.activeKeys(c, demands));
    const again = await withClient((c) => cache().activeKeys(c, demands));
    expect(again.get(`${columnId}:42`)!.id).toBe(first.get(`${columnId}:42`)!.id);
    expect(first.get(`${columnId}:42`)!.id).not.toBe(first.get(`${columnId}`)!.id);
    const { rows } = await db.pool.query('SELECT count(*)::int AS n FROM keyring.data_keys');
    expect(rows[0].n).toBe(2);
  });

  it('two processes creating the same scope at once agree on one key (ON CONFLICT, winner re-read)', async () => {
    const caches = Array.from({ length: 6 }, () => cache());
    const got = await Promise.all(caches.map((k) => withClient((c) => k.activeKeys(c, [{ columnId, subject: 's', count: 1 }]))));
    const ids = new Set(got.map((m) => m.get(`${columnId}:s`)!.id));
    expect(ids.size).toBe(1);
    const keys = got.map((m) => m.get(`${columnId}:s`)!.key);
    for (const k of keys) expect(k.equals(keys[0]!)).toBe(true);
    const { rows } = await db.pool.query(`SELECT count(*)::int AS n FROM keyring.data_keys WHERE state = 'active'`);
    expect(rows[0].n).toBe(1);
  });

  it('retires a key before it passes the encryption bound and creates the next generation', async () => {
    const k = cache(100, 10n);
    const first = (await withClient((c) => k.activeKeys(c, [{ columnId, subject: null, count: 4 }]))).get(`${columnId}`)!;
    await db.pool.query('UPDATE keyring.data_keys SET encryptions = 8 WHERE id = $1', [first.id.toString()]);
    const next = (await withClient((c) => k.activeKeys(c, [{ columnId, subject: null, count: 4 }]))).get(`${columnId}`)!;
    expect(next.id).not.toBe(first.id);
    const { rows } = await db.pool.query('SELECT id, state, generation FROM keyring.data_keys ORDER BY id');
    expect(rows.map((r) => [r.state, r.generation])).toEqual([['retired', 1], ['active', 2]]);
  });

  it('unwraps by id; a root version not held is KEY_UNAVAILABLE, a shredded key DATA_KEY_SHREDDED', async () => {
    const k = cache();
    const dk = (await withClient((c) => k.activeKeys(c, [{ columnId, subject: 'x', count: 1 }]))).get(`${columnId}:x`)!;
    const fresh = cache();
    const byId = await withClient((c) => fresh.byIds(c, [dk.id]));
    expect(byId.get(dk.id)!.key.equals(dk.key)).toBe(true);

    // A data key row under a root version this process does not hold.
    const other = generateKey();
    await db.pool.query(`INSERT INTO keyring.root_keys (purpose, version, fingerprint, state) VALUES ('encrypt', 9, $1, 'decrypt_only')`, [fingerprint(other, 'encrypt')]);
    const { rows } = await db.pool.query(
      `INSERT INTO keyring.data_keys (column_id, subject, root_version, wrapped, state) VALUES ($1, 'y', 9, $2, 'retired') RETURNING id`,
      [columnId, Buffer.alloc(60, 1)]);
    await expect(withClient((c) => fresh.byIds(c, [BigInt(rows[0].id)]))).rejects.toMatchObject({ code: 'KEY_UNAVAILABLE' });
    await expect(withClient((c) => fresh.byIds(c, [123456789n]))).rejects.toMatchObject({ code: 'KEY_UNAVAILABLE' });

    // Shredded after this cache unwrapped it: refused all the same, and zeroed.
    await db.pool.query(`UPDATE keyring.data_keys SET wrapped = NULL, state = 'shredded', shredded_at = now() WHERE id = $1`, [dk.id.toString()]);
    const cached = byId.get(dk.id)!.key;
    await expect(withClient((c) => fresh.byIds(c, [dk.id]))).rejects.toMatchObject({ code: 'DATA_KEY_SHREDDED' });
    expect(cached.disposed).toBe(true);
    await db.pool.query(`DELETE FROM keyring.root_keys WHERE version = 9`).catch(() => undefined);
  });

  it('an altered wrapped key is KEY_UNAVAILABLE (retryable), never a value failure', async () => {
    const k = cache();
    const dk = (await withClient((c) => k.activeKeys(c, [{ columnId, subject: 'z', count: 1 }]))).get(`${columnId}:z`)!;
    await db.pool.query(`UPDATE keyring.data_keys SET wrapped = set_byte(wrapped, 20, get_byte(wrapped, 20) # 1) WHERE id = $1`, [dk.id.toString()]);
    await expect(withClient((c) => cache().byIds(c, [dk.id]))).rejects.toMatchObject({ code: 'KEY_UNAVAILABLE' });
  });

  it('wraps no new key under a version that stopped being active (a registry a moment stale)', async () => {
    // The store still says encrypt v1 is active; the registry no longer does.
    await db.pool.query(`UPDATE keyring.root_keys SET state = 'decrypt_only' WHERE purpose = 'encrypt' AND version = 1`);
    try {
      await expect(withClient((c) => cache().activeKeys(c, [{ columnId, subject: 'stale', count: 1 }])))
        .rejects.toMatchObject({ code: 'KEY_UNAVAILABLE' }); // retryable: the sidecar reloads and retries
      expect((await db.pool.query('SELECT count(*)::int AS n FROM keyring.data_keys')).rows[0].n).toBe(0);
    } finally {
      await db.pool.query(`UPDATE keyring.root_keys SET state = 'active' WHERE purpose = 'encrypt' AND version = 1`);
    }
  });

  it('replaces the active data key of a scope whose root version is disabled, and refuses to decrypt under it', async () => {
    const k = cache();
    const first = (await withClient((c) => k.activeKeys(c, [{ columnId, subject: 'd', count: 1 }]))).get(`${columnId}:d`)!;
    const other = generateKey();
    await db.pool.query(`UPDATE keyring.root_keys SET state = 'disabled' WHERE purpose = 'encrypt' AND version = 1`);
    await db.pool.query(`INSERT INTO keyring.root_keys (purpose, version, fingerprint, state) VALUES ('encrypt', 2, $1, 'active')`,
      [fingerprint(other, 'encrypt')]);
    try {
      const fp1 = fingerprint(root, 'encrypt');
      const fp2 = fingerprint(other, 'encrypt');
      const now = new RootKeyStore(
        [{ purpose: 'encrypt', version: 1, state: 'disabled', fingerprint: fp1, label: 'E[0]', key: root },
          { purpose: 'encrypt', version: 2, state: 'active', fingerprint: fp2, label: 'E[1]', key: other }],
        [{ purpose: 'encrypt', version: 1, state: 'disabled', fingerprint: fp1 }, { purpose: 'encrypt', version: 2, state: 'active', fingerprint: fp2 }],
        [fp1, fp2]);
      const k2 = new DataKeyCache({ capacity: 10, rootKeys: () => now, autocommit: withClient, ivPool: new IvPool() });
      const next = (await withClient((c) => k2.activeKeys(c, [{ columnId, subject: 'd', count: 1 }]))).get(`${columnId}:d`)!;
      expect(next.id).not.toBe(first.id);
      expect(next.rootVersion).toBe(2);
      expect((await db.pool.query('SELECT state FROM keyring.data_keys WHERE id = $1', [first.id.toString()])).rows[0].state).toBe('retired');
      await expect(withClient((c) => k2.byIds(c, [first.id]))).rejects.toMatchObject({ code: 'KEY_UNAVAILABLE' });
      const forJob = await withClient((c) => k2.byIds(c, [first.id], { allowDisabledRoot: true }));
      expect(forJob.get(first.id)!.key.equals(first.key)).toBe(true);
    } finally {
      await db.pool.query('DELETE FROM keyring.data_keys');
      await db.pool.query(`DELETE FROM keyring.root_keys WHERE purpose = 'encrypt' AND version = 2`);
      await db.pool.query(`UPDATE keyring.root_keys SET state = 'active' WHERE purpose = 'encrypt' AND version = 1`);
    }
  });

  it('stays within its bound between batches and zeroes evicted keys', async () => {
    const k = cache(2);
    const got = await withClient((c) => k.activeKeys(c, ['a', 'b', 'c', 'd'].map((subject) => ({ columnId, subject, count: 1 }))));
    expect(k.size).toBe(4); // a batch's keys stay usable until it ends
    k.trim();
    expect(k.size).toBe(2);
    expect(got.get(`${columnId}:a`)!.key.disposed).toBe(true);
    expect(got.get(`${columnId}:d`)!.key.disposed).toBe(false);
    k.clear();
    expect(got.get(`${columnId}:d`)!.key.disposed).toBe(true);
  });
});

describe('IndexKeyCache', () => {
  it('derives one key per (version, column, tenant) from the active index root', () => {
    const ik = new IndexKeyCache(10, () => store);
    const a = ik.active(columnId, 'org-1');
    const expected = deriveIndexKey(indexRoot, columnId, 'org-1');
    expect(a.version).toBe(1);
    expect(a.key.equals(expected)).toBe(true);
    expect(ik.active(columnId, 'org-1').key).toBe(a.key); // cached
    expect(ik.active(columnId, null).key.equals(expected)).toBe(false);
    expect(ik.active(columnId, '').key.equals(ik.active(columnId, null).key)).toBe(false);
    expect(() => ik.forVersion(2, columnId, null)).toThrow(expect.objectContaining({ code: 'KEY_UNAVAILABLE' }));
  });
});
