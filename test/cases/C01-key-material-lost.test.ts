/**
 * C01 — Key material lost or regenerated on restart makes stored ciphertext invalid.
 *
 * The sidecar finds each key's version by its fingerprint in keyring.root_keys. A
 * registered version in state active / decrypt_only with no matching material refuses
 * the start (non-zero exit, one line naming the version), before anything is
 * registered: the sidecar never invents a key, and queued rows stay queued.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createTestDb, type TestDb } from '../helpers/db.js';
import {
  activateKeys, columnIdOf, decryptStored, fingerprintOf, getHealth, newKeyHex, newKeys, pendingCount, registerKey,
  sidecarEnv, spawnSidecar, startSidecar, waitFor, type TestKeys,
} from '../helpers/sidecar.js';

let db: TestDb;
let original: TestKeys;
let col: number;

const insert = (from: number, to: number) => db.pool.query(
  `INSERT INTO accounts_staging (id, national_id)
   SELECT i, 'NID-' || lpad(i::text, 6, '0') FROM generate_series($1::int, $2::int) AS i`, [from, to]);

async function registrySnapshot(): Promise<string> {
  const { rows } = await db.pool.query(`SELECT purpose, version, fingerprint, state FROM keyring.root_keys ORDER BY 1, 2`);
  return JSON.stringify(rows);
}

async function dataKeyCount(): Promise<number> {
  return (await db.pool.query('SELECT count(*)::int AS n FROM keyring.data_keys')).rows[0].n;
}

async function expectAllDecrypt(n: number): Promise<void> {
  const { rows } = await db.pool.query('SELECT id, national_id FROM accounts ORDER BY id');
  expect(rows).toHaveLength(n);
  for (const r of rows) {
    expect(r.national_id[0]).toBe(1);
    const plain = await decryptStored(db.pool, original.encrypt, col, String(r.id), r.national_id);
    expect(plain.toString()).toBe(`NID-${String(r.id).padStart(6, '0')}`);
  }
}

beforeAll(async () => {
  db = await createTestDb();
  original = newKeys();
  await activateKeys(db.pool, original);
  await db.pool.query('CREATE TABLE accounts (id int PRIMARY KEY, national_id text)');
  await db.pool.query(`SELECT keyring.protect('public.accounts', 'national_id', p_blind_index => true)`);
  col = await columnIdOf(db.pool, 'accounts', 'national_id');
});
afterAll(async () => { await db?.drop(); });

describe('C01 key material lost or regenerated', () => {
  it('step 1: 50 rows encrypted with the normal key source decrypt correctly', async () => {
    const s = await startSidecar(db.url, original);
    try {
      await insert(1, 50);
      await s.drain();
      expect(await pendingCount(db.pool)).toBe(0);
      await expectAllDecrypt(50);
    } finally {
      await s.stop();
    }
  });

  const variants: [string, () => TestKeys, string][] = [
    ['(a) an empty key store', () => ({ encrypt: [], index: [] }), 'no configured key has an unregistered fingerprint'],
    ['(b) the same key slots with different bytes', () => newKeys(), 'KEYRING_ENCRYPT_KEYS[0], KEYRING_INDEX_KEYS[0]'],
  ];
  for (const [name, material, hint] of variants) {
    it(`steps 2-3 ${name}: the sidecar refuses to start, names the versions, invents no key, and new rows stay queued`, async () => {
      const before = await registrySnapshot();
      const dataKeys = await dataKeyCount();
      const child = spawnSidecar(sidecarEnv(db.url, material()));
      const { code } = await child.exited;
      expect(code).toBe(1);
      const line = child.stderr().trim();
      expect(line.split('\n')).toHaveLength(1);
      expect(line).toContain(`encrypt root key version 1 (active, fingerprint ${fingerprintOf(original.encrypt[0]!, 'encrypt')})`);
      expect(line).toContain(`index root key version 1 (active, fingerprint ${fingerprintOf(original.index[0]!, 'index')})`);
      expect(line).toContain(hint);
      expect(child.logs.some((l) => l.code === 'KEY_MISSING')).toBe(true);

      // In process too: the start rejects with the typed error and never becomes ready.
      await expect(startSidecar(db.url, material())).rejects.toMatchObject({ code: 'KEY_MISSING' });

      await insert(51, 55).catch(() => undefined); // once per variant: inserted by (a), already there for (b)
      expect(await pendingCount(db.pool)).toBe(5);
      expect(await registrySnapshot()).toBe(before); // nothing registered, no new version
      expect(await dataKeyCount()).toBe(dataKeys); // nothing encrypted under other material
      const { rows } = await db.pool.query(`SELECT count(*)::int AS n FROM accounts WHERE national_id = '\\x00'::bytea`);
      expect(rows[0].n).toBe(5);
    });
  }

  it('step 4: with the original material restored, all 55 rows are encrypted and decrypt to their values', async () => {
    const s = await startSidecar(db.url, original);
    try {
      expect(s.healthy).toBe(true);
      await waitFor(async () => (await pendingCount(db.pool)) === 0, { what: 'the 5 queued rows' });
      await expectAllDecrypt(55);
    } finally {
      await s.stop();
    }
  });
  it('after step 4: a running sidecar that lacks a newly activated version fails /healthz and leaves rows queued', async () => {
    // Sidecar A holds v1 only; sidecar B holds v1 and v2 and vouches for v2, so the DBA can activate it.
    const v2 = newKeyHex();
    const a = await startSidecar(db.url, original, { KEYRING_POLL_INTERVAL_MS: '100', KEYRING_INSTANCE_ID: 'holds-v1' });
    const b = await startSidecar(db.url, { encrypt: [...original.encrypt, v2], index: original.index }, { KEYRING_INSTANCE_ID: 'holds-v1-v2' });
    await b.stop(); // B leaves: its heartbeat stays fresh long enough for the activation
    await db.pool.query(`UPDATE keyring.sidecars SET stopped_at = NULL WHERE instance_id = 'holds-v1-v2'`);
    await db.pool.query(`SELECT keyring.activate_key('encrypt', 2)`);
    try {
      const h = await waitFor(async () => {
        const r = await getHealth(a.healthPort);
        return r.status === 503 ? r : undefined;
      }, { what: '/healthz to fail' });
      expect(h.body.reason).toMatch(/encrypt root key version 2 \(active, fingerprint [0-9a-f]{32}\)/);
      await insert(56, 56);
      await new Promise((r) => setTimeout(r, 500));
      expect(await pendingCount(db.pool)).toBe(1); // paused: not encrypted, not lost, not quarantined
      expect((await db.pool.query('SELECT count(*)::int AS n FROM keyring.quarantine')).rows[0].n).toBe(0);
    } finally {
      await a.stop();
      // Back to v1 (v2 was never used: nothing depends on it).
      await db.pool.query(`UPDATE keyring.root_keys SET state = 'retired' WHERE purpose = 'encrypt' AND version = 2`);
      await db.pool.query(`UPDATE keyring.root_keys SET state = 'active' WHERE purpose = 'encrypt' AND version = 1`);
      await db.pool.query('DELETE FROM accounts_staging WHERE id = 56');
    }
    expect(await registerKey(db.pool, 'encrypt', v2)).toBe(2); // idempotent: still version 2
  });
});
