/**
 * keyring.alerts: each kind fires in a constructed scenario and not otherwise.
 *   decrypt_failures               more than 3 decryption failures by one actor within 5 minutes
 *   reveal_outside_business_hours  a reveal outside business_hours / business_days in business_time_zone
 *   reveal_actor_not_allowed       a reveal (or refused attempt) by an actor not on reveal_actors
 *   key_scheduled_for_destruction  a root key version in state retired
 *   key_rotation_overdue           the active version older than its rotation period
 * Events are written with their real time (audit_append) or a chosen one (a chained,
 * backdated append: test/helpers/audit.ts), so verify_audit_chain() stays empty throughout.
 */
import pg from 'pg';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { installBackdatedAppend } from '../helpers/audit.js';
import { createTestDb, type TestDb } from '../helpers/db.js';
import { fingerprint, pgError } from '../helpers/sql.js';

let db: TestDb;

interface Alert {
  kind: string;
  at: Date;
  actor: string | null;
  detail: Record<string, unknown>;
}

async function q<T extends pg.QueryResultRow = Record<string, unknown>>(sql: string, params: unknown[] = []): Promise<T[]> {
  return (await db.pool.query<T>(sql, params)).rows;
}

const alerts = (kind: string) => q<Alert>('SELECT kind, at, actor, detail FROM keyring.alerts WHERE kind = $1 ORDER BY at, actor', [kind]);

/** Appends `action` by `actor` at now() - `ago` (a Postgres interval); returns the audit id. */
async function appendAgo(ago: string, action: string, actor: string | null, extra: { reason?: string; detail?: object } = {}): Promise<string> {
  const [r] = await q<{ id: string }>(`SELECT public.test_append_at(now() - $1::interval, $2, $3, 1, '7', $4, $5::jsonb)::text AS id`,
    [ago, action, actor, extra.reason ?? null, JSON.stringify(extra.detail ?? {})]);
  return r!.id;
}

/** Appends a reveal at a local wall-clock time of last week in Europe/Oslo (day 1 = Monday). */
async function revealLastWeek(day: number, time: string, actor = 'alice'): Promise<string> {
  const [r] = await q<{ id: string }>(
    `SELECT public.test_append_at(
       ((date_trunc('week', now() AT TIME ZONE 'Europe/Oslo') - interval '7 days') + make_interval(days => $1 - 1) + $2::time)
         AT TIME ZONE 'Europe/Oslo',
       'reveal', $3, 1, '7', 'case 1')::text AS id`, [day, time, actor]);
  return r!.id;
}

beforeAll(async () => {
  db = await createTestDb();
  await installBackdatedAppend(db.pool);
  await q(`UPDATE keyring.settings SET value = 'alice, bob' WHERE name = 'reveal_actors'`);
  await q(`UPDATE keyring.settings SET value = 'Europe/Oslo' WHERE name = 'business_time_zone'`);
});
afterAll(async () => {
  expect(await q('SELECT * FROM keyring.verify_audit_chain()')).toEqual([]);
  await db?.drop();
});

describe('keyring.alerts', () => {
  it('starts empty', async () => {
    expect(await q('SELECT * FROM keyring.alerts')).toEqual([]);
  });

  it('decrypt_failures: more than 3 by one actor within 5 minutes, once per burst, last 30 days only', async () => {
    const fail = (actor: string) => q(`SELECT keyring.audit_append('decrypt.failed', $1, p_column_id => 1, p_row_key => '7', p_reason => 'auth')`, [actor]);
    for (let i = 0; i < 3; i++) await fail('bob');                       // 3: not more than 3
    for (const ago of ['20 min', '18 min', '16 min', '14 min']) await appendAgo(ago, 'decrypt.failed', 'eve', { reason: 'auth' }); // 4, never 4 within 5 min
    for (const ago of ['40 days', '40 days', '40 days', '40 days']) await appendAgo(ago, 'decrypt.failed', 'trent', { reason: 'auth' }); // too old
    for (let i = 0; i < 3; i++) await appendAgo('1 hour', 'decrypt.failed', 'carol', { reason: 'format' });
    expect(await alerts('decrypt_failures')).toEqual([]);
    await appendAgo('58 min', 'decrypt.failed', 'carol', { reason: 'format' }); // 4th within 5 minutes
    for (let i = 0; i < 6; i++) await fail('mallory');                   // one burst of 6: one alert
    const fired = await alerts('decrypt_failures');
    expect(fired.map((a) => [a.actor, a.detail.failures_in_5_minutes])).toEqual([['carol', 4], ['mallory', 4]]);
    // The failures of the library and the sidecar name their actor; without one the role counts.
    await appendAgo('3 hours', 'decrypt.failed', null);
    expect((await alerts('decrypt_failures')).length).toBe(2);
  });

  it('reveal_outside_business_hours: outside 08:00-18:00, Monday to Friday, Europe/Oslo', async () => {
    const inside = [await revealLastWeek(3, '10:00'), await revealLastWeek(1, '08:00'), await revealLastWeek(5, '17:59:59')];
    const outside = [await revealLastWeek(3, '20:00'), await revealLastWeek(6, '10:00'), await revealLastWeek(3, '07:59'),
      await revealLastWeek(2, '18:00')];
    const ids = [...inside, ...outside];
    const fired = (await alerts('reveal_outside_business_hours')).filter((a) => ids.includes(String(a.detail.audit_id)));
    expect(fired.map((a) => String(a.detail.audit_id)).sort()).toEqual([...outside].sort());
    expect(fired.find((a) => String(a.detail.audit_id) === outside[0])!.detail).toMatchObject({
      time_zone: 'Europe/Oslo', local_time: expect.stringMatching(/ 20:00:00$/), purpose: 'case 1', row_key: '7',
    });
    // Hours that span midnight: 22:00-06:00 makes the night inside and the day outside.
    await q(`UPDATE keyring.settings SET value = '22:00-06:00' WHERE name = 'business_hours'`);
    await q(`UPDATE keyring.settings SET value = '1-7' WHERE name = 'business_days'`);
    try {
      const night = await revealLastWeek(3, '23:30');
      const early = await revealLastWeek(4, '05:59');
      const now = (await alerts('reveal_outside_business_hours')).map((a) => String(a.detail.audit_id));
      expect(now).not.toContain(night);
      expect(now).not.toContain(early);
      expect(now).toContain(inside[0]); // Wednesday 10:00 is outside night hours
    } finally {
      await q(`UPDATE keyring.settings SET value = '08:00-18:00' WHERE name = 'business_hours'`);
      await q(`UPDATE keyring.settings SET value = '1-5' WHERE name = 'business_days'`);
    }
  });

  it('refuses business settings it could not evaluate', async () => {
    for (const [name, value] of [['business_hours', '25:00-26:00'], ['business_hours', '08:00-08:00'], ['business_hours', '8-18'],
      ['business_days', '0-8'], ['business_days', 'mon-fri'], ['business_time_zone', 'Mars/Olympus_Mons']]) {
      expect([name, value, (await pgError(q('UPDATE keyring.settings SET value = $2 WHERE name = $1', [name, value]))).code])
        .toEqual([name, value, '23514']);
    }
  });

  it('reveal_actor_not_allowed: refused attempts by unlisted actors, and reveals by actors not on the list', async () => {
    await q(`SELECT keyring.audit_reveal('alice', 1, '7', 'case 2')`);                       // allowed
    await q(`SELECT keyring.audit_reveal('alice', 1, '8', 'case 3', p_refusal => 'erased')`); // refused, but alice is allowed
    expect(await alerts('reveal_actor_not_allowed')).toEqual([]);
    const refused = await q<{ ok: boolean }>(`SELECT keyring.audit_reveal('mallory', 1, '7', 'case 4') AS ok`);
    expect(refused).toEqual([{ ok: false }]);
    // A reveal written around audit_reveal(), and one by an actor removed from the list since.
    await q(`SELECT keyring.audit_append('reveal', 'dave', p_column_id => 1, p_row_key => '7', p_reason => 'case 5')`);
    await q(`SELECT keyring.audit_reveal('bob', 1, '9', 'case 6')`);
    expect((await alerts('reveal_actor_not_allowed')).map((a) => a.actor)).toEqual(['mallory', 'dave']);
    await q(`UPDATE keyring.settings SET value = 'alice' WHERE name = 'reveal_actors'`);
    const fired = await alerts('reveal_actor_not_allowed');
    expect(fired.map((a) => [a.actor, a.detail.refused, a.detail.purpose])).toEqual([
      ['mallory', true, 'case 4'], ['dave', false, 'case 5'], ['bob', false, 'case 6'],
    ]);
  });

  it('key_scheduled_for_destruction: a retired root key version, until it is destroyed', async () => {
    for (const [i, fp] of ['enc-1', 'enc-2', 'enc-3'].entries()) {
      expect((await q<{ v: number }>(`SELECT keyring.register_key('encrypt', $1) AS v`, [fingerprint(fp)]))[0]!.v).toBe(i + 1);
    }
    await q(`SELECT keyring.activate_key('encrypt', 1)`);
    expect(await alerts('key_scheduled_for_destruction')).toEqual([]);
    await q(`UPDATE keyring.root_keys SET state = 'retired', retired_at = now() - interval '2 days', reason = 'rotated'
              WHERE purpose = 'encrypt' AND version = 2`);
    const fired = await alerts('key_scheduled_for_destruction');
    expect(fired.map((a) => [a.actor, a.detail.purpose, a.detail.version, a.detail.fingerprint])).toEqual([[null, 'encrypt', 2, fingerprint('enc-2')]]);
    await q(`UPDATE keyring.root_keys SET state = 'destroyed', destroyed_at = now() WHERE purpose = 'encrypt' AND version = 2`);
    expect(await alerts('key_scheduled_for_destruction')).toEqual([]);
  });

  it('key_rotation_overdue: the active version older than its rotation period', async () => {
    expect(await alerts('key_rotation_overdue')).toEqual([]);  // encrypt v1 was activated just now
    await q(`UPDATE keyring.root_keys SET activated_at = now() - interval '400 days' WHERE purpose = 'encrypt' AND version = 1`);
    const fired = await alerts('key_rotation_overdue');
    expect(fired.map((a) => [a.detail.purpose, a.detail.version, a.detail.rotation_period])).toEqual([['encrypt', 1, '365 days']]);
    expect(fired[0]!.detail.overdue_by).toMatch(/^35 days/);
    // A decrypt_only version is not due: only the active one is rotated.
    await q(`UPDATE keyring.root_keys SET state = 'decrypt_only' WHERE purpose = 'encrypt' AND version = 1`);
    expect(await alerts('key_rotation_overdue')).toEqual([]);
    await q(`UPDATE keyring.root_keys SET state = 'active', activated_at = now() - interval '31 days', rotation_period = '30 days'
              WHERE purpose = 'encrypt' AND version = 1`);
    expect((await alerts('key_rotation_overdue')).length).toBe(1);
  });

  it('is readable by keyring_auditor and keyring_admin, nobody else', async () => {
    const privileges = await q<{ role: string; ok: boolean }>(
      `SELECT r AS role, has_table_privilege(r, 'keyring.alerts', 'SELECT') AS ok
         FROM unnest(ARRAY['keyring_auditor', 'keyring_admin', 'keyring_sidecar', 'keyring_writer']) AS r`);
    expect(privileges).toEqual([
      { role: 'keyring_auditor', ok: true }, { role: 'keyring_admin', ok: true },
      { role: 'keyring_sidecar', ok: false }, { role: 'keyring_writer', ok: false },
    ]);
  });
});
