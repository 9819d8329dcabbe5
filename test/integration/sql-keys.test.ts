/**
 * keyring.register_key() / activate_key(): the root key registry as the sidecar and
 * `keyring init` use it (DESIGN.md "Key hierarchy", "Rotation"; case C01's registry side).
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createTestDb, type TestDb } from '../helpers/db.js';
import { fingerprint, pgError } from '../helpers/sql.js';

let db: TestDb;
beforeAll(async () => { db = await createTestDb(); });
afterAll(async () => { await db.drop(); });

async function q<T extends Record<string, unknown> = Record<string, unknown>>(sql: string, params: unknown[] = []) {
  return (await db.pool.query<T>(sql, params)).rows;
}
const register = async (purpose: string, fp: string) =>
  (await q<{ v: number }>(`SELECT keyring.register_key($1, $2) AS v`, [purpose, fp]))[0]!.v;
const states = async (purpose: string) =>
  q(`SELECT version, state::text, activated_at IS NOT NULL AS activated FROM keyring.root_keys WHERE purpose = $1 ORDER BY version`, [purpose]);
const audits = async (action: string) =>
  q(`SELECT key_purpose::text, key_version, key_fingerprint, detail FROM keyring.audit_log WHERE action = $1 ORDER BY id`, [action]);

async function heartbeat(instance: string, fps: string[], opts: { ageSeconds?: number; stopped?: boolean } = {}) {
  await q(`INSERT INTO keyring.sidecars (instance_id, fingerprints, heartbeat_at, stopped_at)
           VALUES ($1, $2, now() - make_interval(secs => $3), CASE WHEN $4 THEN now() END)
           ON CONFLICT (instance_id) DO UPDATE SET fingerprints = EXCLUDED.fingerprints,
             heartbeat_at = EXCLUDED.heartbeat_at, stopped_at = EXCLUDED.stopped_at`,
  [instance, fps, opts.ageSeconds ?? 0, opts.stopped ?? false]);
}

describe('register_key()', () => {
  it('is idempotent per fingerprint and numbers versions per purpose', async () => {
    expect(await register('encrypt', fingerprint('enc-1'))).toBe(1);
    expect(await register('encrypt', fingerprint('enc-1'))).toBe(1);
    expect(await register('encrypt', fingerprint('enc-2'))).toBe(2);
    expect(await register('index', fingerprint('idx-1'))).toBe(1);
    expect(await states('encrypt')).toEqual([
      { version: 1, state: 'pending', activated: false },
      { version: 2, state: 'pending', activated: false },
    ]);
    const rows = await audits('key.registered');
    expect(rows.map((r) => [r.key_purpose, r.key_version, r.key_fingerprint])).toEqual([
      ['encrypt', 1, fingerprint('enc-1')], ['encrypt', 2, fingerprint('enc-2')], ['index', 1, fingerprint('idx-1')],
    ]);
  });

  it('gives two sidecars registering the same new key at once one version', async () => {
    const fp = fingerprint('enc-race');
    const [a, b] = await Promise.all([register('encrypt', fp), register('encrypt', fp)]);
    expect(a).toBe(b);
    expect(await q(`SELECT count(*)::int AS n FROM keyring.root_keys WHERE fingerprint = $1`, [fp])).toEqual([{ n: 1 }]);
  });

  it('refuses anything but a fingerprint, without echoing it', async () => {
    const keyByMistake = 'ab'.repeat(32);
    const e = await pgError(register('encrypt', keyByMistake));
    expect(e.code).toBe('22023');
    expect(`${e.message} ${e.hint}`).not.toContain(keyByMistake.slice(0, 16));
  });

  it('is callable by the sidecar role, activate_key() is not', async () => {
    const client = await db.pool.connect();
    try {
      await client.query('BEGIN');
      await client.query('SET LOCAL ROLE keyring_sidecar');
      const { rows } = await client.query(`SELECT keyring.register_key('index', $1) AS v`, [fingerprint('idx-sidecar')]);
      expect(rows[0].v).toBe(2);
      expect((await pgError(client.query(`SELECT keyring.activate_key('index', 2)`))).code).toBe('42501');
    } finally {
      await client.query('ROLLBACK');
      client.release();
    }
  });
});

describe('activate_key()', () => {
  it('bootstraps without a sidecar while no version of the purpose was ever active', async () => {
    const listener = await db.pool.connect();
    const payloads: string[] = [];
    listener.on('notification', (n) => payloads.push(n.payload ?? ''));
    await listener.query('LISTEN keyring');
    try {
      await q(`SELECT keyring.activate_key('encrypt', 1)`);
      await new Promise((r) => setTimeout(r, 100));
      expect(payloads).toEqual(['{"kind":"keys"}']);
    } finally {
      await listener.query('UNLISTEN keyring');
      listener.release();
    }
    expect((await states('encrypt'))[0]).toEqual({ version: 1, state: 'active', activated: true });
    const [audit] = await audits('key.activated');
    expect(audit).toMatchObject({ key_purpose: 'encrypt', key_version: 1, detail: { previous_version: null } });
  });

  it('is a no-op for the version already active', async () => {
    await q(`SELECT keyring.activate_key('encrypt', 1)`);
    expect(await audits('key.activated')).toHaveLength(1);
  });

  it('refuses a version no live sidecar holds', async () => {
    const fp2 = fingerprint('enc-2');
    const expectRefused = async () => {
      const e = await pgError(q(`SELECT keyring.activate_key('encrypt', 2)`));
      expect(e.code).toBe('55000');
      expect(e.message).toBe('keyring: no live sidecar holds encrypt key version 2');
      expect(e.hint).toMatch(/KEYRING_ENCRYPT_KEYS/);
    };
    await expectRefused(); // no sidecar at all
    await heartbeat('other-key', [fingerprint('enc-1')]);
    await expectRefused(); // a live sidecar, without v2
    await heartbeat('stale', [fp2], { ageSeconds: 120 });
    await expectRefused(); // v2, but no heartbeat for 120 s (fresh = 30 s)
    await heartbeat('stopped', [fp2], { stopped: true });
    await expectRefused(); // v2, but stopped
    expect((await states('encrypt')).map((s) => s.state)).toEqual(['active', 'pending', 'pending']);
  });

  it('activates a version a live sidecar holds; the previous one keeps decrypting', async () => {
    await heartbeat('live', [fingerprint('enc-1'), fingerprint('enc-2')]);
    await q(`SELECT keyring.activate_key('encrypt', 2)`);
    expect((await states('encrypt')).slice(0, 2)).toEqual([
      { version: 1, state: 'decrypt_only', activated: true },
      { version: 2, state: 'active', activated: true },
    ]);
    expect((await audits('key.activated'))[1]).toMatchObject({ key_version: 2, detail: { previous_version: 1 } });
    // and back: a decrypt_only version can be activated again
    await q(`SELECT keyring.activate_key('encrypt', 1)`);
    expect((await states('encrypt')).slice(0, 2).map((s) => s.state)).toEqual(['active', 'decrypt_only']);
  });

  it('refuses unknown versions and versions past decrypt_only', async () => {
    const unknown = await pgError(q(`SELECT keyring.activate_key('encrypt', 99)`));
    expect(unknown.code).toBe('42704');
    expect(unknown.message).toBe('keyring: encrypt key version 99 is not registered');
    await q(`UPDATE keyring.root_keys SET state = 'retired' WHERE purpose = 'encrypt' AND version = 3`);
    const retired = await pgError(q(`SELECT keyring.activate_key('encrypt', 3)`));
    expect(retired.code).toBe('55000');
    expect(retired.message).toBe(
      'keyring: encrypt key version 3 is retired; only a pending or decrypt_only version can be activated');
  });

  it('treats each purpose apart: the index root has its own bootstrap', async () => {
    await q(`SELECT keyring.activate_key('index', 1)`);
    expect(await q(`SELECT purpose::text, version FROM keyring.root_keys WHERE state = 'active' ORDER BY 1`))
      .toEqual([{ purpose: 'encrypt', version: 1 }, { purpose: 'index', version: 1 }]);
    expect(await q(`SELECT * FROM keyring.verify_audit_chain()`)).toEqual([]);
  });
});
