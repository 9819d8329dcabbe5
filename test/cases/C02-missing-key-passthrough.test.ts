/**
 * C02 — A missing key passes ciphertext through as plaintext; re-encryption nests layers.
 *
 * 20 rows under v1, v2 active, a re-encryption queued. A sidecar without v1's key, then
 * one with wrong v1 material, refuse to start (they would strand v1's values, case C01),
 * so the rows stay on v1 byte for byte and nothing is counted as re-encrypted. A plain,
 * non-envelope value written by a privileged session reads as the generic decrypt error,
 * never as the stored bytes. With the right v1 key every row ends on v2 and decrypts, in
 * one layer, to its original plaintext; a value whose plaintext is itself an envelope
 * naming an existing data key is quarantined, never sealed once more.
 */
import type pg from 'pg';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { DecryptError, looksLikeEnvelope } from '../../src/crypto/index.js';
import { createTestDb, type TestDb } from '../helpers/db.js';
import {
  activateKeys, decryptStored, newKeyHex, newKeys, openKeyring, registerKey, sidecarEnv, spawnReadySidecar, spawnSidecar,
  killSpawned, stopSpawned, waitFor, type SpawnedSidecar, type TestKeys,
} from '../helpers/sidecar.js';

const q = async <T extends Record<string, unknown> = Record<string, unknown>>(pool: pg.Pool, sql: string, params: unknown[] = []) =>
  (await pool.query<T>(sql, params)).rows;

let db: TestDb;
let keys: TestKeys;
const v2 = newKeyHex();
const children: SpawnedSidecar[] = [];
let colId: number;
let blobCol: number;
const plain = (i: number) => `secret-${i}`;
const rows = () => q<{ id: number; secret: Buffer }>(db.pool, 'SELECT id, secret FROM accounts ORDER BY id');
const versions = () => q<{ v: number; n: number }>(db.pool,
  `SELECT d.root_version AS v, count(*)::int AS n FROM accounts a JOIN keyring.data_keys d ON d.id = keyring.data_key_id(a.secret) GROUP BY 1 ORDER BY 1`);

beforeAll(async () => {
  db = await createTestDb();
  keys = newKeys();
  await activateKeys(db.pool, keys);
  await db.pool.query('CREATE TABLE accounts (id int PRIMARY KEY, secret text)');
  await db.pool.query(`SELECT keyring.protect('public.accounts', 'secret')`);
  await db.pool.query('CREATE TABLE blobs (id int PRIMARY KEY, data bytea)');
  await db.pool.query(`SELECT keyring.protect('public.blobs', 'data')`);
  colId = (await q<{ id: number }>(db.pool, `SELECT id FROM keyring.columns WHERE column_name = 'secret'`))[0]!.id;
  blobCol = (await q<{ id: number }>(db.pool, `SELECT id FROM keyring.columns WHERE column_name = 'data'`))[0]!.id;
  await db.pool.query(`INSERT INTO accounts_staging SELECT g, 'secret-' || g FROM generate_series(1, 20) g`);
  const s = await spawnReadySidecar(sidecarEnv(db.url, { encrypt: [...keys.encrypt, v2], index: keys.index }, { KEYRING_POLL_INTERVAL_MS: '100' }));
  children.push(s);
  await waitFor(async () => (await q<{ n: number }>(db.pool, 'SELECT count(*)::int AS n FROM keyring.pending'))[0]!.n === 0);
  // A blob whose plaintext is another row's envelope (ciphertext fed back in): written as data, once.
  const [r1] = await rows();
  await db.pool.query('INSERT INTO blobs_staging VALUES (1, $1)', [r1!.secret]);
  await waitFor(async () => (await q<{ n: number }>(db.pool, 'SELECT count(*)::int AS n FROM keyring.pending'))[0]!.n === 0);
  await registerKey(db.pool, 'encrypt', v2);
  await db.pool.query(`SELECT keyring.activate_key('encrypt', 2)`);
  await stopSpawned(s);
});

afterAll(async () => {
  await killSpawned(children);
  await db?.drop();
});

describe('C02: a missing key never passes ciphertext through; re-encryption never nests layers', () => {
  let jobs: string[];
  let before: { id: number; secret: Buffer }[];

  it('step 2: without v1, or with wrong v1 material, nothing is re-encrypted and the rows stay on v1 byte for byte', async () => {
    before = await rows();
    jobs = (await q<{ ids: string[] }>(db.pool, `SELECT keyring.reencrypt('all', 5)::text[] AS ids`))[0]!.ids;
    for (const encrypt of [[v2], [newKeyHex(), v2]]) {
      const s = spawnSidecar(sidecarEnv(db.url, { encrypt, index: keys.index }));
      children.push(s);
      const { code } = await s.exited;
      expect(code).not.toBe(0);
      expect(s.stderr() + JSON.stringify(s.logs)).toMatch(/encrypt root key version 1/);
    }
    expect(await rows()).toEqual(before);
    expect(await versions()).toEqual([{ v: 1, n: 20 }]);
    const js = await q(db.pool, 'SELECT state, done::int FROM keyring.jobs WHERE id = ANY($1::bigint[])', [jobs]);
    for (const j of js) expect(j).toEqual({ state: 'queued', done: 0 });
  });

  it('step 3: a non-envelope value reads as the generic decrypt error, never as the stored bytes', async () => {
    await db.pool.query('ALTER TABLE accounts DISABLE TRIGGER USER');
    await db.pool.query(`UPDATE accounts SET secret = convert_to('plain text, not an envelope, longer than the 37-byte overhead', 'UTF8') WHERE id = 5`);
    const kr = await openKeyring(db.url, { encrypt: [...keys.encrypt, v2], index: keys.index });
    try {
      const [v] = await kr.decryptColumn('public.accounts.secret', { rowKeys: ['5'] });
      expect(v!.value).toBeNull();
      expect(v!.problem).toBe('format');
      await expect(kr.decrypt('public.accounts.secret', '5')).rejects.toBeInstanceOf(DecryptError);
    } finally {
      await kr.close();
    }
    await db.pool.query('UPDATE accounts SET secret = $1 WHERE id = 5', [before.find((r) => r.id === 5)!.secret]);
    await db.pool.query('ALTER TABLE accounts ENABLE TRIGGER USER');
  });

  it('step 4: with the right v1 key every row ends on v2 and decrypts in exactly one layer; an envelope plaintext is quarantined', async () => {
    const s = await spawnReadySidecar(sidecarEnv(db.url, { encrypt: [...keys.encrypt, v2], index: keys.index }, { KEYRING_POLL_INTERVAL_MS: '100' }));
    children.push(s);
    const ended = await waitFor(async () => {
      const js = await q<{ state: string; done: number; quarantined: number; unavailable: number }>(db.pool,
        'SELECT state, done::int, quarantined::int, unavailable::int FROM keyring.jobs WHERE id = ANY($1::bigint[]) ORDER BY id', [jobs]);
      return js.every((j) => j.state === 'done') ? js : undefined;
    }, { timeoutMs: 30_000 });
    expect(ended.reduce((a, j) => a + j.done, 0)).toBe(20);
    expect(ended.reduce((a, j) => a + j.quarantined, 0)).toBe(1); // the blob holding an envelope
    expect(ended.reduce((a, j) => a + j.unavailable, 0)).toBe(0);
    expect(await versions()).toEqual([{ v: 2, n: 20 }]);
    const allKeys = { encrypt: [...keys.encrypt, v2], index: keys.index };
    for (const r of await rows()) {
      const p = await decryptStored(db.pool, allKeys.encrypt, colId, String(r.id), r.secret);
      expect(looksLikeEnvelope(p)).toBe(false); // invariant: one layer
      expect(p.toString('utf8')).toBe(plain(r.id));
    }
    const kr = await openKeyring(db.url, allKeys);
    try {
      for (const v of await kr.decryptColumn('public.accounts.secret')) expect(v.value).toBe(plain(Number(v.rowKey)));
      const [b] = await kr.decryptColumn('public.blobs.data');
      expect(b!.problem).toBe('nested');
    } finally {
      await kr.close();
    }
    expect(await q(db.pool, 'SELECT column_id, row_key, reason, detail FROM keyring.quarantine')).toEqual([
      { column_id: blobCol, row_key: '1', reason: 'decrypt_failed', detail: expect.stringMatching(/nested/) },
    ]);
    await stopSpawned(s);
  });
});
