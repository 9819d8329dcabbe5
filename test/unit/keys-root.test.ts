import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { fingerprint, generateKey, type KeyPurpose, type SecretBytes } from '../../src/crypto/index.js';
import { KeyMissingError, NoKeysError } from '../../src/keys/errors.js';
import type { RootKeyMaterial } from '../../src/keys/material.js';
import { dropDestroyed, resolveRootKeys } from '../../src/keys/root-keys.js';
import { createTestDb, type TestDb } from '../helpers/db.js';

let db: TestDb;
beforeAll(async () => { db = await createTestDb(); });
afterAll(async () => { await db?.drop(); });
beforeEach(async () => { await db.pool.query('TRUNCATE keyring.root_keys CASCADE'); });

const material = (encrypt: SecretBytes[], index: SecretBytes[] = []): RootKeyMaterial => ({
  source: 'env',
  encrypt: encrypt.map((key, i) => ({ label: `KEYRING_ENCRYPT_KEYS[${i}]`, key })),
  index: index.map((key, i) => ({ label: `KEYRING_INDEX_KEYS[${i}]`, key })),
});

async function registry(purpose: KeyPurpose, version: number, key: SecretBytes | string, state: string): Promise<void> {
  const fp = typeof key === 'string' ? key : fingerprint(key, purpose);
  await db.pool.query(
    `INSERT INTO keyring.root_keys (purpose, version, fingerprint, state) VALUES ($1, $2, $3, $4::keyring.key_state)`,
    [purpose, version, fp, state],
  );
}

describe('resolveRootKeys', () => {
  it('finds versions by fingerprint, whatever the order of the configured keys', async () => {
    const [k1, k2, i1] = [generateKey(), generateKey(), generateKey()];
    await registry('encrypt', 1, k1, 'decrypt_only');
    await registry('encrypt', 2, k2, 'active');
    await registry('index', 1, i1, 'active');
    const store = await db.pool.connect().then(async (c) => {
      try { return await resolveRootKeys(c, material([k2, k1], [i1]), { register: false }); } finally { c.release(); }
    });
    expect(store.active('encrypt').version).toBe(2);
    expect(store.active('encrypt').label).toBe('KEYRING_ENCRYPT_KEYS[0]');
    expect(store.require('encrypt', 1).label).toBe('KEYRING_ENCRYPT_KEYS[1]');
    expect(store.active('index').version).toBe(1);
    expect(store.fingerprints).toHaveLength(3);
  });

  for (const state of ['active', 'decrypt_only']) {
    it(`refuses when a ${state} version has no material, naming purpose, version and fingerprint, before registering anything`, async () => {
      const lost = generateKey();
      await registry('encrypt', 1, lost, state);
      const other = generateKey();
      const c = await db.pool.connect();
      try {
        const err = await resolveRootKeys(c, material([other]), { register: true }).catch((e: unknown) => e);
        expect(err).toBeInstanceOf(KeyMissingError);
        const e = err as KeyMissingError;
        expect(e.code).toBe('KEY_MISSING');
        expect(e.message).toContain(`encrypt root key version 1 (${state}, fingerprint ${fingerprint(lost, 'encrypt')})`);
        expect(e.message).toContain('KEYRING_ENCRYPT_KEYS[0]'); // the unregistered (wrong) key is named by label
        expect(e.message).toMatch(/Supply the original key/);
        expect(e.missing).toEqual([{ purpose: 'encrypt', version: 1, state, fingerprint: fingerprint(lost, 'encrypt') }]);
      } finally {
        c.release();
      }
      const { rows } = await db.pool.query('SELECT count(*)::int AS n FROM keyring.root_keys');
      expect(rows[0].n).toBe(1); // nothing registered
    });
  }

  it('names every missing version of both purposes at once', async () => {
    await registry('encrypt', 1, generateKey(), 'active');
    await registry('index', 3, generateKey(), 'active');
    const c = await db.pool.connect();
    try {
      const e = (await resolveRootKeys(c, material([]), { register: false }).catch((x: unknown) => x)) as KeyMissingError;
      expect(e.missing.map((m) => `${m.purpose}${m.version}`)).toEqual(['encrypt1', 'index3']);
    } finally {
      c.release();
    }
  });

  it('does not require material for pending, retired or destroyed versions', async () => {
    const k = generateKey();
    await registry('encrypt', 1, generateKey(), 'retired');
    await registry('encrypt', 2, generateKey(), 'pending');
    await registry('encrypt', 3, k, 'active');
    const c = await db.pool.connect();
    try {
      const store = await resolveRootKeys(c, material([k]), { register: false });
      expect(store.active('encrypt').version).toBe(3);
      expect(() => store.require('encrypt', 2)).toThrow(expect.objectContaining({ code: 'KEY_UNAVAILABLE' }));
    } finally {
      c.release();
    }
  });

  it('refuses to start with no encrypt key at all', async () => {
    const c = await db.pool.connect();
    try {
      await expect(resolveRootKeys(c, material([]), { register: false })).rejects.toBeInstanceOf(NoKeysError);
    } finally {
      c.release();
    }
  });

  it('reports no active version as KEY_UNAVAILABLE (retryable), not a crash', async () => {
    const k = generateKey();
    await registry('encrypt', 1, k, 'pending');
    const c = await db.pool.connect();
    try {
      const store = await resolveRootKeys(c, material([k]), { register: false });
      expect(() => store.active('encrypt')).toThrow(expect.objectContaining({ code: 'KEY_UNAVAILABLE' }));
      expect(store.activeVersion('encrypt')).toBeUndefined();
    } finally {
      c.release();
    }
  });

  it('sets a destroyed version apart: never held, never vouched for, zeroed by dropDestroyed', async () => {
    const [gone, live] = [generateKey(), generateKey()];
    await registry('encrypt', 1, gone, 'destroyed');
    await registry('encrypt', 2, live, 'active');
    const m = material([gone, live]);
    const c = await db.pool.connect();
    try {
      const store = await resolveRootKeys(c, m, { register: false });
      expect(store.get('encrypt', 1)).toBeUndefined();
      expect(() => store.require('encrypt', 1)).toThrow(/encrypt root key version 1 was destroyed/);
      expect(store.fingerprints).toEqual([fingerprint(live, 'encrypt')]);
      expect(store.destroyed.map((h) => [h.version, h.label])).toEqual([[1, 'KEYRING_ENCRYPT_KEYS[0]']]);
      const kept = dropDestroyed(m, store);
      expect(gone.disposed).toBe(true);
      expect(kept.encrypt.map((k) => k.label)).toEqual(['KEYRING_ENCRYPT_KEYS[1]']);
      expect(live.disposed).toBe(false);
      const again = await resolveRootKeys(c, kept, { register: false });
      expect(dropDestroyed(kept, again)).toBe(kept); // nothing left to drop
    } finally {
      c.release();
    }
  });
});
