/**
 * Root key lifecycle (sql/migrations/00005, docs/key-lifecycle.md): the transitions
 * pending → active → decrypt_only → retired → destroyed plus disabled / enable, every
 * refusal with its SQLSTATE and message, one active version per purpose, audit rows and
 * notifications, and what real sidecars do with an activated, disabled or destroyed
 * version. Transitions run as a keyring_admin login role that is not a superuser.
 */
import type pg from 'pg';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { Sidecar } from '../../sidecar/sidecar.js';
import { createTestDb, type TestDb } from '../helpers/db.js';
import { connectAsDba } from '../helpers/roles.js';
import {
  activateKeys, createSidecarRole, dropRole, fingerprintOf, newKeyHex, newKeys, openKeyring, registerKey,
  sidecarConfig, startSidecar, waitFor, type TestKeys,
} from '../helpers/sidecar.js';
import { fakeCiphertext, fingerprint, pgError } from '../helpers/sql.js';
import { Sidecar as SidecarClass } from '../../sidecar/sidecar.js';
import { silentLogger } from '../../src/log.js';

let db: TestDb;
let dba: pg.Client;
const notices: { message?: string; hint?: string }[] = [];

beforeAll(async () => {
  db = await createTestDb();
  dba = await connectAsDba(db.url);
  dba.on('notice', (n) => notices.push(n));
});
afterAll(async () => {
  await dba?.end();
  await db?.drop();
});

async function q<T extends Record<string, unknown> = Record<string, unknown>>(sql: string, params: unknown[] = []): Promise<T[]> {
  return (await db.pool.query<T>(sql, params)).rows;
}
/** Runs a statement as the DBA (member of keyring_admin, not superuser). */
async function asDba(sql: string, params: unknown[] = []): Promise<void> {
  await dba.query(sql, params);
}
const register = async (purpose: string, label: string): Promise<number> =>
  (await q<{ v: number }>('SELECT keyring.register_key($1, $2) AS v', [purpose, fingerprint(label)]))[0]!.v;
const states = async (purpose: string): Promise<Record<number, string>> =>
  Object.fromEntries((await q<{ version: number; state: string }>(
    'SELECT version, state::text FROM keyring.root_keys WHERE purpose = $1 ORDER BY version', [purpose]))
    .map((r) => [r.version, r.state]));
const auditCount = async (): Promise<number> => (await q<{ n: number }>('SELECT count(*)::int AS n FROM keyring.audit_log'))[0]!.n;

/** A live sidecar row vouching for `labels` (what a running sidecar's heartbeat writes). */
async function vouch(instance: string, labels: string[]): Promise<void> {
  await q(`INSERT INTO keyring.sidecars (instance_id, fingerprints) VALUES ($1, $2)
           ON CONFLICT (instance_id) DO UPDATE SET fingerprints = EXCLUDED.fingerprints, heartbeat_at = now(), stopped_at = NULL`,
  [instance, labels.map((l) => fingerprint(l))]);
}

/** Collects notifications on channel keyring while `fn` runs. */
async function notified(fn: () => Promise<void>): Promise<string[]> {
  const listener = await db.pool.connect();
  const payloads: string[] = [];
  const on = (n: pg.Notification): void => { payloads.push(n.payload ?? ''); };
  listener.on('notification', on);
  await listener.query('LISTEN keyring');
  try {
    await fn();
    await new Promise((r) => setTimeout(r, 100));
  } finally {
    await listener.query('UNLISTEN keyring');
    listener.off('notification', on);
    listener.release();
  }
  return payloads;
}

describe('transitions (SQL)', () => {
  it('walks every allowed transition; each is audited and wakes the sidecars', async () => {
    for (const v of [1, 2, 3, 4]) expect(await register('encrypt', `life-enc-${v}`)).toBe(v);
    await vouch('life-sidecar', ['life-enc-1', 'life-enc-2', 'life-enc-3', 'life-enc-4']);
    const start = (await q<{ id: number }>('SELECT coalesce(max(id), 0)::int AS id FROM keyring.audit_log'))[0]!.id;

    const steps: [string, Record<number, string>, 'no-op'?][] = [
      [`SELECT keyring.activate_key('encrypt', 1)`, { 1: 'active', 2: 'pending', 3: 'pending', 4: 'pending' }],
      [`SELECT keyring.activate_key('encrypt', 2)`, { 1: 'decrypt_only', 2: 'active', 3: 'pending', 4: 'pending' }],
      [`SELECT keyring.disable_key('encrypt', 1, reason => 'drill: suspected leak')`, { 1: 'disabled', 2: 'active', 3: 'pending', 4: 'pending' }],
      [`SELECT keyring.enable_key('encrypt', 1, reason => 'drill over')`, { 1: 'decrypt_only', 2: 'active', 3: 'pending', 4: 'pending' }],
      [`SELECT keyring.activate_key('encrypt', 1)`, { 1: 'active', 2: 'decrypt_only', 3: 'pending', 4: 'pending' }],
      // the active version, disabled together with activating its successor
      [`SELECT keyring.disable_key('encrypt', 1, reason => 'leaked in a log', successor => 2)`, { 1: 'disabled', 2: 'active', 3: 'pending', 4: 'pending' }],
      [`SELECT keyring.retire_key('encrypt', 1)`, { 1: 'retired', 2: 'active', 3: 'pending', 4: 'pending' }],
      [`SELECT keyring.destroy_key('encrypt', 1)`, { 1: 'destroyed', 2: 'active', 3: 'pending', 4: 'pending' }],
      [`SELECT keyring.disable_key('encrypt', 3, reason => 'generated on a compromised host')`, { 1: 'destroyed', 2: 'active', 3: 'disabled', 4: 'pending' }],
      [`SELECT keyring.retire_key('encrypt', 3)`, { 1: 'destroyed', 2: 'active', 3: 'retired', 4: 'pending' }],
      [`SELECT keyring.retire_key('encrypt', 4)`, { 1: 'destroyed', 2: 'active', 3: 'retired', 4: 'retired' }],
      [`SELECT keyring.activate_key('encrypt', 2)`, { 1: 'destroyed', 2: 'active', 3: 'retired', 4: 'retired' }, 'no-op'],
      [`SELECT keyring.retire_key('encrypt', 4)`, { 1: 'destroyed', 2: 'active', 3: 'retired', 4: 'retired' }, 'no-op'],
      [`SELECT keyring.destroy_key('encrypt', 1)`, { 1: 'destroyed', 2: 'active', 3: 'retired', 4: 'retired' }, 'no-op'],
    ];
    for (const [sql, expected, noop] of steps) {
      const before = await auditCount();
      const payloads = await notified(() => asDba(sql));
      expect(await states('encrypt'), sql).toEqual(expected);
      // One notification per transaction (Postgres folds identical ones), none for a no-op.
      expect(payloads, sql).toEqual(noop ? [] : ['{"kind":"keys"}']);
      if (noop) expect(await auditCount(), sql).toBe(before);
    }
    const audit = await q(`SELECT action, key_version, reason, db_role::text, detail FROM keyring.audit_log
                            WHERE id > $1 AND action LIKE 'key.%' ORDER BY id`, [start]);
    expect(audit.map((a) => [a.action, a.key_version, a.reason])).toEqual([
      ['key.activated', 1, null],
      ['key.activated', 2, null],
      ['key.disabled', 1, 'drill: suspected leak'],
      ['key.enabled', 1, 'drill over'],
      ['key.activated', 1, null],
      ['key.activated', 2, null], // the successor, activated by disable_key
      ['key.disabled', 1, 'leaked in a log'],
      ['key.retired', 1, null],
      ['key.destroyed', 1, null],
      ['key.disabled', 3, 'generated on a compromised host'],
      ['key.retired', 3, null],
      ['key.retired', 4, null],
    ]);
    expect(audit.every((a) => a.db_role === 'keyring_test_dba')).toBe(true);
    expect(audit[6]!.detail).toMatchObject({ previous_state: 'active', successor: 2 });
    expect(audit[7]!.detail).toEqual({ previous_state: 'disabled' });
    expect(notices.map((n) => n.message)).toContainEqual(
      `keyring: encrypt key version 1 (fingerprint ${fingerprint('life-enc-1')}) is destroyed; sidecars drop it now`);
    expect(notices.find((n) => n.message?.includes('is destroyed'))?.hint).toMatch(/Delete its material from every key store/);

    const row = (await q(`SELECT activated_at IS NOT NULL AS a, retired_at IS NOT NULL AS r, destroyed_at IS NOT NULL AS d,
                                 disabled_at IS NOT NULL AS dis, reason FROM keyring.root_keys WHERE purpose = 'encrypt' AND version = 1`))[0];
    expect(row).toEqual({ a: true, r: true, d: true, dis: true, reason: 'leaked in a log' });
    expect(await q('SELECT * FROM keyring.verify_audit_chain()')).toEqual([]);
  });

  it('refuses every other transition with a SQLSTATE, a message and a hint, changing nothing', async () => {
    // encrypt now: 1 destroyed, 2 active, 3 retired, 4 retired; add 5 pending, 6 decrypt_only-by-activation-and-back
    expect(await register('encrypt', 'life-enc-5')).toBe(5);
    const cases: { sql: string; code: string; message: string; hint?: RegExp }[] = [
      { sql: `SELECT keyring.retire_key('encrypt', 2)`, code: '55000',
        message: 'keyring: encrypt key version 2 is the active version and cannot be retired', hint: /activate_key\('encrypt', <version>\)/ },
      { sql: `SELECT keyring.retire_key('encrypt', 1)`, code: '55000',
        message: 'keyring: encrypt key version 1 is destroyed; a destroyed version stays destroyed' },
      { sql: `SELECT keyring.disable_key('encrypt', 2, reason => 'x')`, code: '55000',
        message: 'keyring: encrypt key version 2 is the active version; it can be disabled only together with activating another',
        hint: /successor => <new version>/ },
      { sql: `SELECT keyring.disable_key('encrypt', 5, reason => NULL)`, code: '22023', message: 'keyring: disable_key needs a reason',
        hint: /reason => / },
      { sql: `SELECT keyring.disable_key('encrypt', 5, reason => '   ')`, code: '22023', message: 'keyring: disable_key needs a reason' },
      { sql: `SELECT keyring.disable_key('encrypt', 2, reason => 'x', successor => 2)`, code: '22023',
        message: 'keyring: the successor of encrypt key version 2 must be another version' },
      { sql: `SELECT keyring.disable_key('encrypt', 2, reason => 'x', successor => 5)`, code: '55000',
        message: 'keyring: no live sidecar holds encrypt key version 5', hint: /KEYRING_ENCRYPT_KEYS/ },
      { sql: `SELECT keyring.disable_key('encrypt', 3, reason => 'x')`, code: '55000',
        message: 'keyring: encrypt key version 3 is retired; nothing uses it any more', hint: /destroy_key\('encrypt', 3\)/ },
      { sql: `SELECT keyring.disable_key('encrypt', 1, reason => 'x')`, code: '55000',
        message: 'keyring: encrypt key version 1 is destroyed; nothing uses it any more' },
      { sql: `SELECT keyring.enable_key('encrypt', 5, reason => 'x')`, code: '55000',
        message: 'keyring: encrypt key version 5 is pending; only a disabled version can be enabled' },
      { sql: `SELECT keyring.enable_key('encrypt', 5, reason => '')`, code: '22023', message: 'keyring: enable_key needs a reason' },
      { sql: `SELECT keyring.destroy_key('encrypt', 2)`, code: '55000',
        message: 'keyring: encrypt key version 2 is active; only a retired version can be destroyed', hint: /retire_key\('encrypt', 2\)/ },
      { sql: `SELECT keyring.destroy_key('encrypt', 5)`, code: '55000',
        message: 'keyring: encrypt key version 5 is pending; only a retired version can be destroyed' },
      { sql: `SELECT keyring.activate_key('encrypt', 3)`, code: '55000',
        message: 'keyring: encrypt key version 3 is retired; only a pending or decrypt_only version can be activated' },
      { sql: `SELECT keyring.activate_key('encrypt', 1)`, code: '55000',
        message: 'keyring: encrypt key version 1 is destroyed; only a pending or decrypt_only version can be activated' },
      { sql: `SELECT keyring.activate_key('encrypt', 5)`, code: '55000', message: 'keyring: no live sidecar holds encrypt key version 5' },
    ];
    for (const verb of ['activate_key', 'retire_key', 'destroy_key']) {
      cases.push({ sql: `SELECT keyring.${verb}('encrypt', 99)`, code: '42704', message: 'keyring: encrypt key version 99 is not registered',
        hint: /key_inventory/ });
    }
    cases.push({ sql: `SELECT keyring.disable_key('index', 99, reason => 'x')`, code: '42704', message: 'keyring: index key version 99 is not registered' });
    cases.push({ sql: `SELECT keyring.enable_key('index', 99, reason => 'x')`, code: '42704', message: 'keyring: index key version 99 is not registered' });

    const before = await states('encrypt');
    const audits = await auditCount();
    for (const c of cases) {
      const e = await pgError(asDba(c.sql));
      expect([e.code, e.message], c.sql).toEqual([c.code, c.message]);
      expect(e.hint, c.sql).toMatch(c.hint ?? /\w/); // every refusal says what to do next
    }
    expect(await states('encrypt')).toEqual(before);
    expect(await auditCount()).toBe(audits);
  });

  it('activating a disabled version is refused with a hint to enable it first', async () => {
    await vouch('life-sidecar', ['life-enc-2', 'life-enc-5']);
    await asDba(`SELECT keyring.activate_key('encrypt', 5)`);
    await asDba(`SELECT keyring.disable_key('encrypt', 2, reason => 'drill')`);
    const e = await pgError(asDba(`SELECT keyring.activate_key('encrypt', 2)`));
    expect([e.code, e.message]).toEqual(['55000', 'keyring: encrypt key version 2 is disabled; only a pending or decrypt_only version can be activated']);
    expect(e.hint).toMatch(/enable_key\('encrypt', 2, reason => '...'\) first/);
    // and the reversal: enabled (decrypt_only), then it can be activated again
    await asDba(`SELECT keyring.enable_key('encrypt', 2, reason => 'drill over')`);
    await asDba(`SELECT keyring.activate_key('encrypt', 2)`);
    expect(await states('encrypt')).toMatchObject({ 2: 'active', 5: 'decrypt_only' });
  });

  it('keeps exactly one active version per purpose', async () => {
    const active = await q(`SELECT purpose::text, count(*)::int AS n FROM keyring.root_keys WHERE state = 'active' GROUP BY 1`);
    expect(active).toEqual([{ purpose: 'encrypt', n: 1 }]);
    const e = await pgError(q(`UPDATE keyring.root_keys SET state = 'active' WHERE purpose = 'encrypt' AND version = 5`));
    expect(e.code).toBe('23505'); // root_keys_one_active
  });

  it('refuses retire and destroy while data keys depend on the version, naming how many and where', async () => {
    await q(`CREATE TABLE customers (id int PRIMARY KEY, national_id text, iban text)`);
    const nid = (await q<{ id: number }>(`SELECT keyring.protect('customers', 'national_id') AS id`))[0]!.id;
    const iban = (await q<{ id: number }>(`SELECT keyring.protect('customers', 'iban') AS id`))[0]!.id;
    // encrypt 5 is decrypt_only: three live data keys under it, one shredded (not counted), one of a column since unprotected
    const ins = (col: number, subject: string | null, state = 'retired', wrapped: Buffer | null = Buffer.alloc(60, 1)) =>
      q(`INSERT INTO keyring.data_keys (column_id, subject, root_version, wrapped, state) VALUES ($1, $2, 5, $3, $4)`,
        [col, subject, wrapped, state]);
    await ins(nid, 'a');
    await ins(nid, 'b');
    await ins(iban, null);
    await ins(iban, 'gone', 'shredded', null);
    const e = await pgError(asDba(`SELECT keyring.retire_key('encrypt', 5)`));
    expect(e.code).toBe('55006');
    expect(e.message).toBe("keyring: cannot retire encrypt key version 5: it still wraps 3 data keys " +
      "(public.customers.national_id: 2, public.customers.iban: 1); run SELECT keyring.rotate('encrypt') first");
    expect(e.hint).toMatch(/SELECT id FROM keyring.data_keys WHERE root_version = 5 AND wrapped IS NOT NULL/);
    await ins(4242, null);
    expect((await pgError(asDba(`SELECT keyring.retire_key('encrypt', 5)`))).message).toContain(
      '4 data keys (public.customers.national_id: 2, column 4242 (no longer protected): 1, public.customers.iban: 1)');

    // moved away (as a rewrap would): retire passes; a key that appears under it later blocks destroy
    await q(`UPDATE keyring.data_keys SET root_version = 2 WHERE root_version = 5`);
    await asDba(`SELECT keyring.retire_key('encrypt', 5)`);
    await ins(iban, 'late');
    const d = await pgError(asDba(`SELECT keyring.destroy_key('encrypt', 5)`));
    expect([d.code, d.message]).toEqual(['55006', "keyring: cannot destroy encrypt key version 5: it still wraps 1 data key " +
      "(public.customers.iban: 1); run SELECT keyring.rotate('encrypt') first"]);
    expect(await states('encrypt')).toMatchObject({ 5: 'retired' });
    await q(`UPDATE keyring.data_keys SET root_version = 2 WHERE root_version = 5`);
    await asDba(`SELECT keyring.destroy_key('encrypt', 5)`);
    expect(await states('encrypt')).toMatchObject({ 5: 'destroyed' });
  });

  it('refuses to retire an index version while blind-index terms use it, per column', async () => {
    for (const v of [1, 2]) expect(await register('index', `life-idx-${v}`)).toBe(v);
    await asDba(`SELECT keyring.activate_key('index', 1)`); // bootstrap
    await q(`CREATE TABLE people (id int PRIMARY KEY, email text)`);
    await q(`SELECT keyring.protect('people', 'email', p_blind_index => true)`);
    await q(`INSERT INTO people_staging VALUES (1, 'a@example.test'), (2, 'b@example.test'), (3, 'c@example.test')`);
    // terms as the sidecar writes them: uint16 BE index version, then the HMAC
    await q(`UPDATE people SET email = $1, email_bidx = '\\x0001'::bytea || sha256(id::text::bytea) WHERE id IN (1, 2)`, [fakeCiphertext(1)]);
    await q(`UPDATE people SET email = $1, email_bidx = '\\x0002'::bytea || sha256(id::text::bytea) WHERE id = 3`, [fakeCiphertext(1)]);
    await vouch('life-sidecar', ['life-idx-1', 'life-idx-2']);
    await asDba(`SELECT keyring.activate_key('index', 2)`);
    const e = await pgError(asDba(`SELECT keyring.retire_key('index', 1)`));
    expect([e.code, e.message]).toEqual(['55006',
      'keyring: cannot retire index key version 1: 2 blind-index terms still use it (public.people.email_bidx: 2)']);
    expect(e.hint).toMatch(/re-index/);
    await q(`UPDATE people SET email_bidx = '\\x0002'::bytea || substring(email_bidx FROM 3) WHERE id IN (1, 2)`);
    await asDba(`SELECT keyring.retire_key('index', 1)`);
    expect(await states('index')).toEqual({ 1: 'retired', 2: 'active' });
  });

  it('key_inventory lists every version; rotation_due shows active versions overdue or due within 30 days', async () => {
    const inv = await q(`SELECT purpose::text, version, state::text, data_keys::int, next_due IS NOT NULL AS has_due, overdue
                           FROM keyring.key_inventory WHERE purpose = 'encrypt'`);
    expect(inv).toEqual([
      { purpose: 'encrypt', version: 1, state: 'destroyed', data_keys: 0, has_due: false, overdue: false },
      { purpose: 'encrypt', version: 2, state: 'active', data_keys: 5, has_due: true, overdue: false },
      { purpose: 'encrypt', version: 3, state: 'retired', data_keys: 0, has_due: false, overdue: false },
      { purpose: 'encrypt', version: 4, state: 'retired', data_keys: 0, has_due: false, overdue: false },
      { purpose: 'encrypt', version: 5, state: 'destroyed', data_keys: 0, has_due: false, overdue: false },
    ]);
    expect(await q(`SELECT data_keys FROM keyring.key_inventory WHERE purpose = 'index'`)).toEqual([{ data_keys: null }, { data_keys: null }]);
    expect(await q(`SELECT next_due = activated_at + rotation_period AS ok FROM keyring.key_inventory WHERE state = 'active'`))
      .toEqual([{ ok: true }, { ok: true }]);
    expect(await q('SELECT * FROM keyring.rotation_due')).toEqual([]); // default period 365 days
    await q(`UPDATE keyring.root_keys SET activated_at = now() - interval '400 days' WHERE purpose = 'encrypt' AND version = 2`);
    await q(`UPDATE keyring.root_keys SET activated_at = now() - interval '350 days' WHERE purpose = 'index' AND version = 2`);
    const due = await q(`SELECT purpose::text, version, overdue, due_in < interval '0' AS past FROM keyring.rotation_due`);
    expect(due).toEqual([
      { purpose: 'encrypt', version: 2, overdue: true, past: true },
      { purpose: 'index', version: 2, overdue: false, past: false },
    ]);
    // readable by an auditor; neither readable nor callable by an application role
    const asRole = async (role: string, sql: string): Promise<void> => {
      const c = await db.pool.connect();
      try {
        await c.query('BEGIN');
        await c.query(`SET LOCAL ROLE ${role}`);
        await c.query(sql);
      } finally {
        await c.query('ROLLBACK');
        c.release();
      }
    };
    await asRole('keyring_auditor', 'SELECT * FROM keyring.key_inventory, keyring.rotation_due, keyring.rotation_progress');
    expect((await pgError(asRole('keyring_writer', 'SELECT * FROM keyring.key_inventory'))).code).toBe('42501');
    expect((await pgError(asRole('keyring_writer', `SELECT keyring.retire_key('encrypt', 3)`))).code).toBe('42501');
    expect((await pgError(asRole('keyring_auditor', `SELECT keyring.rotate('encrypt')`))).code).toBe('42501');
  });
});

describe('with real sidecars', () => {
  let sdb: TestDb;
  let keys: TestKeys;
  let sidecarUrl: string;
  const role = `kr_sidecar_life_${process.pid}`;
  const running: Sidecar[] = [];
  const v2 = newKeyHex();
  const i2 = newKeyHex();
  const fast = { KEYRING_POLL_INTERVAL_MS: '100' };

  async function start(k: TestKeys, instance: string): Promise<Sidecar> {
    const s = await startSidecar(sidecarUrl, k, { ...fast, KEYRING_INSTANCE_ID: instance });
    running.push(s);
    return s;
  }
  async function stop(s: Sidecar): Promise<void> {
    running.splice(running.indexOf(s), 1);
    await s.stop();
  }
  const sq = async <T extends Record<string, unknown> = Record<string, unknown>>(sql: string, params: unknown[] = []) =>
    (await sdb.pool.query<T>(sql, params)).rows;
  /** Root version of the data key behind each stored value of a column. */
  const versionsOf = async (table: string, column: string) =>
    (await sq<{ id: number; v: number; dk: string }>(
      `SELECT t.id, d.root_version AS v, d.id AS dk FROM ${table} t JOIN keyring.data_keys d ON d.id = keyring.data_key_id(t.${column}) ORDER BY t.id`));

  beforeAll(async () => {
    sdb = await createTestDb();
    keys = newKeys();
    await activateKeys(sdb.pool, keys);
    sidecarUrl = await createSidecarRole(sdb.pool, sdb.url, role);
    await sdb.pool.query(`CREATE TABLE t1 (id int PRIMARY KEY, v text)`);
    await sdb.pool.query(`SELECT keyring.protect('t1', 'v')`);
  });
  afterAll(async () => {
    await Promise.all(running.splice(0).map((s) => s.stop()));
    await sdb?.drop();
    await dropRole(role);
  });

  it('activate is refused while no live sidecar holds the version, allowed with one, and picked up at once', async () => {
    const a = await start(keys, 'holds-v1');
    await sdb.pool.query(`INSERT INTO t1_staging SELECT g, 'one-' || g FROM generate_series(1, 5) g`);
    await a.drain();
    expect((await versionsOf('t1', 'v')).map((r) => r.v)).toEqual([1, 1, 1, 1, 1]);

    expect(await registerKey(sdb.pool, 'encrypt', v2)).toBe(2);
    const e = await pgError(sdb.pool.query(`SELECT keyring.activate_key('encrypt', 2)`));
    expect([e.code, e.message]).toEqual(['55000', 'keyring: no live sidecar holds encrypt key version 2']);

    const both = { encrypt: [...keys.encrypt, v2], index: keys.index };
    const b = await start(both, 'holds-v1-v2');
    await stop(a); // it lacks v2: once v2 is active it pauses (case C01); not needed here
    const t0 = Date.now();
    await sdb.pool.query(`SELECT keyring.activate_key('encrypt', 2)`);
    // Picked up by the {"kind":"keys"} notification, well before the next heartbeat (5 s).
    await waitFor(() => b.rootKeys.activeVersion('encrypt') === 2, { timeoutMs: 2000, intervalMs: 10, what: 'the sidecar to see v2 active' });
    expect(Date.now() - t0).toBeLessThan(2000);

    // A new data key (a newly protected column) is wrapped under v2, without a restart.
    await sdb.pool.query(`CREATE TABLE t2 (id int PRIMARY KEY, v text)`);
    await sdb.pool.query(`SELECT keyring.protect('t2', 'v')`);
    await sdb.pool.query(`INSERT INTO t2_staging SELECT g, 'two-' || g FROM generate_series(1, 5) g`);
    await b.drain();
    expect((await versionsOf('t2', 'v')).map((r) => r.v)).toEqual([2, 2, 2, 2, 2]);
  });

  it('a disabled encrypt version is never used for new encryption, and its values are not decrypted outside jobs', async () => {
    const b = running[0]!;
    const oldKey = (await versionsOf('t1', 'v'))[0]!.dk;
    // decrypt_only: its existing data key still seals new values until a rotation
    await sdb.pool.query(`INSERT INTO t1_staging VALUES (6, 'one-6')`);
    await b.drain();
    expect((await versionsOf('t1', 'v')).at(-1)).toMatchObject({ v: 1, dk: oldKey });

    await sdb.pool.query(`SELECT keyring.disable_key('encrypt', 1, reason => 'test: suspected leak')`);
    await waitFor(() => b.rootKeys.stateOf('encrypt', 1) === 'disabled', { timeoutMs: 2000, intervalMs: 10, what: 'the reload' });
    await sdb.pool.query(`INSERT INTO t1_staging SELECT g, 'one-' || g FROM generate_series(7, 10) g`);
    await sdb.pool.query(`UPDATE t1_staging SET v = 'one-1-updated' WHERE id = 1`);
    await b.drain();
    const after = await versionsOf('t1', 'v');
    const fresh = after.filter((r) => r.id === 1 || r.id >= 7);
    expect(fresh.map((r) => r.v)).toEqual([2, 2, 2, 2, 2]);
    expect(new Set(fresh.map((r) => r.dk)).has(oldKey)).toBe(false);
    expect((await sq(`SELECT state FROM keyring.data_keys WHERE id = $1`, [oldKey]))[0]).toEqual({ state: 'retired' });
    expect((await sq(`SELECT count(*)::int AS n FROM keyring.data_keys WHERE root_version = 1 AND state = 'active'`))[0]).toEqual({ n: 0 });

    // The library refuses values under the disabled version (re-encryption jobs only) and reads the rest.
    const kr = await openKeyring(sdb.url, { encrypt: [...keys.encrypt, v2], index: keys.index });
    try {
      const res = await kr.decryptColumn('public.t1.v');
      expect(res.filter((r) => r.error === undefined).map((r) => r.value).sort()).toEqual(['one-1-updated', 'one-10', 'one-7', 'one-8', 'one-9']);
      expect(res.filter((r) => r.error !== undefined).map((r) => r.rowKey).sort()).toEqual(['2', '3', '4', '5', '6']);
    } finally {
      await kr.close();
    }
    await sdb.pool.query(`SELECT keyring.enable_key('encrypt', 1, reason => 'test: false alarm')`);
    const kr2 = await openKeyring(sdb.url, { encrypt: [...keys.encrypt, v2], index: keys.index });
    try {
      expect((await kr2.decryptColumn('public.t1.v')).every((r) => r.error === undefined)).toBe(true);
    } finally {
      await kr2.close();
    }
  });

  it('an index version disabled with its successor gets no new terms', async () => {
    const b = running[0]!;
    await b.stop();
    running.splice(0);
    const all = { encrypt: [...keys.encrypt, v2], index: [...keys.index, i2] };
    const c = await start(all, 'holds-i2');
    await sdb.pool.query(`CREATE TABLE t3 (id int PRIMARY KEY, v text)`);
    await sdb.pool.query(`SELECT keyring.protect('t3', 'v', p_blind_index => true)`);
    await sdb.pool.query(`INSERT INTO t3_staging VALUES (1, 'x')`);
    await c.drain();
    await sdb.pool.query(`SELECT keyring.disable_key('index', 1, reason => 'test', successor => 2)`);
    await waitFor(() => c.rootKeys.activeVersion('index') === 2, { timeoutMs: 2000, intervalMs: 10, what: 'the reload' });
    await sdb.pool.query(`INSERT INTO t3_staging VALUES (2, 'y')`);
    await c.drain();
    expect(await sq(`SELECT id, substring(v_bidx FROM 1 FOR 2) AS version FROM t3 ORDER BY id`)).toEqual([
      { id: 1, version: Buffer.from([0, 1]) }, { id: 2, version: Buffer.from([0, 2]) },
    ]);
  });

  it('a destroyed version is dropped from sidecar memory at once and never vouched for again', async () => {
    const c = running[0]!;
    // Rewrap everything off encrypt v1 (the sidecar runs the job), then retire and destroy it.
    const job = (await sq<{ job: string }>(`SELECT keyring.rotate('encrypt') AS job`))[0]!.job;
    await waitFor(async () => (await sq(`SELECT state FROM keyring.jobs WHERE id = $1`, [job]))[0]!.state === 'done', { what: 'the rewrap' });
    await sdb.pool.query(`SELECT keyring.retire_key('encrypt', 1)`);
    const fp1 = fingerprintOf(keys.encrypt[0]!, 'encrypt');
    expect(c.rootKeys.get('encrypt', 1)).toBeDefined();
    await sdb.pool.query(`SELECT keyring.destroy_key('encrypt', 1)`);
    await waitFor(() => c.rootKeys.get('encrypt', 1) === undefined, { timeoutMs: 2000, intervalMs: 10, what: 'the drop' });
    expect(() => c.rootKeys.require('encrypt', 1)).toThrow(/encrypt root key version 1 was destroyed/);
    expect(c.rootKeys.fingerprints).not.toContain(fp1);
    await waitFor(async () => !(await sq<{ f: string[] }>(`SELECT fingerprints AS f FROM keyring.sidecars WHERE instance_id = 'holds-i2'`))[0]!.f.includes(fp1),
      { timeoutMs: 2000, what: 'the heartbeat without v1' });

    // A sidecar started with the destroyed key still configured drops (zeroes) it at start.
    const config = sidecarConfig(sidecarUrl, { encrypt: [...keys.encrypt, v2], index: [...keys.index, i2] }, { KEYRING_INSTANCE_ID: 'late-starter' });
    const late = await SidecarClass.start(config, { logger: silentLogger() });
    try {
      expect(config.keys.encrypt[0]!.key.disposed).toBe(true);
      expect(config.keys.encrypt[1]!.key.disposed).toBe(false);
      expect(late.rootKeys.fingerprints).not.toContain(fp1);
      expect(late.rootKeys.get('encrypt', 1)).toBeUndefined();
    } finally {
      await late.stop();
    }
    // Every value still reads with v2 alone.
    const kr = await openKeyring(sdb.url, { encrypt: [v2], index: [...keys.index, i2] });
    try {
      const all = [...await kr.decryptColumn('public.t1.v'), ...await kr.decryptColumn('public.t2.v')];
      expect(all).toHaveLength(15);
      expect(all.every((r) => r.error === undefined)).toBe(true);
    } finally {
      await kr.close();
    }
    expect(await sq('SELECT * FROM keyring.verify_audit_chain()')).toEqual([]);
    expect((await sq(`SELECT array_agg(action ORDER BY id) AS a FROM keyring.audit_log WHERE action LIKE 'key.%' AND action <> 'key.registered'`))[0]!.a)
      .toEqual(['key.activated', 'key.activated', 'key.activated', 'key.disabled', 'key.enabled', 'key.activated', 'key.disabled',
        'key.retired', 'key.destroyed']);
  });
});
