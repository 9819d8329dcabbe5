/**
 * Refused privileged calls are audit events (00008, docs/audit.md "Refused privileged
 * calls"). Postgres refuses a DBA function to a role without EXECUTE before the function
 * runs, and whatever the refused transaction wrote rolls back; the refused client then
 * records the refusal in a new transaction with keyring.audit_refusal(), as the CLI does.
 *
 * For each of keyring_writer, keyring_auditor and keyring_sidecar and every DBA entry
 * point: the call is refused (42501), the function name is taken from the error message,
 * the refusal is recorded after the rollback, and the row (db_role = the login, never an
 * argument) is committed, chained and visible to auditors. What cannot be recorded: a
 * refusal of a function the login may call, a name that is no administrator function, more
 * than 60 refusals a minute per login.
 */
import { spawnSync } from 'node:child_process';
import pg from 'pg';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createTestDb, type TestDb } from '../helpers/db.js';
import { connect, APP_ROLE, appRoleUrl, loginRoleUrl } from '../helpers/roles.js';
import { createSidecarRole, dropRole } from '../helpers/sidecar.js';

type Role = 'keyring_writer' | 'keyring_auditor' | 'keyring_sidecar';
const AUDITOR_ROLE = 'keyring_test_auditor';

/** A plausible call of each DBA entry point (the arguments never matter: EXECUTE is checked first). */
const CALLS: Record<string, string> = {
  protect: `SELECT keyring.protect('public.customers', 'name')`,
  unprotect: `SELECT keyring.unprotect('public.customers', 'national_id', true)`,
  register_key: `SELECT keyring.register_key('encrypt', '${'ab'.repeat(16)}')`,
  activate_key: `SELECT keyring.activate_key('encrypt', 1)`,
  retire_key: `SELECT keyring.retire_key('encrypt', 1)`,
  disable_key: `SELECT keyring.disable_key('encrypt', 1, reason => 'suspected leak')`,
  enable_key: `SELECT keyring.enable_key('encrypt', 1, reason => 'false alarm')`,
  destroy_key: `SELECT keyring.destroy_key('encrypt', 1)`,
  rotate: `SELECT keyring.rotate('encrypt')`,
  reencrypt: `SELECT keyring.reencrypt('public.customers.national_id')`,
  key_dependents: `SELECT * FROM keyring.key_dependents('encrypt', 1)`,
  shred: `SELECT * FROM keyring.shred('42', reason => 'erasure request')`,
  audit_reveal: `SELECT keyring.audit_reveal('someone', 1, '1', 'a stated purpose', 1, NULL, '{}'::jsonb)`,
  reveal_allowed: `SELECT keyring.reveal_allowed('someone')`,
};

let db: TestDb;
const sidecarRole = `kr_sc_refusals_${process.pid}`;
const clients = {} as Record<Role, pg.Client>;
const logins = {} as Record<Role, string>;

async function q<T extends pg.QueryResultRow = Record<string, unknown>>(sql: string, params: unknown[] = []): Promise<T[]> {
  return (await db.pool.query<T>(sql, params)).rows;
}

/** What the CLI does: the call in a transaction; on "permission denied for function X", roll back, then record X. */
async function callAsCli(c: pg.Client, sql: string): Promise<{ code: string; fn?: string; id?: string | null }> {
  await c.query('BEGIN');
  try {
    await c.query(sql);
    await c.query('COMMIT');
    return { code: 'ok' };
  } catch (err) {
    await c.query('ROLLBACK');
    const e = err as pg.DatabaseError;
    const fn = /^permission denied for function (\w+)$/.exec(e.message)?.[1];
    if (e.code !== '42501' || !fn) return { code: e.code ?? String(err) };
    const { rows } = await c.query<{ id: string | null }>('SELECT keyring.audit_refusal($1) AS id', [fn]);
    return { code: e.code, fn, id: rows[0]!.id };
  }
}

async function codeOf(c: pg.Client, sql: string, params: unknown[] = []): Promise<string> {
  try {
    await c.query(sql, params);
    return 'ok';
  } catch (err) {
    return (err as { code?: string }).code ?? String(err);
  }
}

async function refusalRows(login?: string): Promise<{ id: string; db_role: string; actor: string | null; reason: string; detail: Record<string, unknown> }[]> {
  return q(`SELECT id, db_role::text, actor, reason, detail FROM keyring.audit_log
             WHERE action = 'privileged_call.refused' AND ($1::text IS NULL OR db_role = $1) ORDER BY id`, [login ?? null]);
}

beforeAll(async () => {
  db = await createTestDb();
  await q(`CREATE TABLE customers (id int PRIMARY KEY, name text, national_id text)`);
  await q(`SELECT keyring.protect('public.customers', 'national_id', p_blind_index => true)`);
  logins.keyring_writer = APP_ROLE;
  logins.keyring_auditor = AUDITOR_ROLE;
  logins.keyring_sidecar = sidecarRole;
  clients.keyring_writer = await connect(await appRoleUrl(db.url), 'audit-refusals-test');
  clients.keyring_auditor = await connect(await loginRoleUrl(db.url, AUDITOR_ROLE, 'keyring_auditor'), 'audit-refusals-test');
  clients.keyring_sidecar = await connect(await createSidecarRole(db.pool, db.url, sidecarRole), 'audit-refusals-test');
});
afterAll(async () => {
  await Promise.all(Object.values(clients).map((c) => c?.end()));
  await db?.drop();
  await dropRole(sidecarRole);
});

describe('a refused DBA call, recorded by the refused client', () => {
  it.each(['keyring_writer', 'keyring_auditor', 'keyring_sidecar'] as const)('%s: every DBA entry point is refused and each refusal is committed to the audit log', async (role) => {
    const before = await refusalRows(logins[role]);
    const recorded: string[] = [];
    for (const [name, sql] of Object.entries(CALLS)) {
      const r = await callAsCli(clients[role], sql);
      if (role === 'keyring_sidecar' && name === 'register_key') {
        // The sidecar registers keys by design: not refused, nothing to record.
        expect([name, r.code]).toEqual([name, 'ok']);
        continue;
      }
      expect([name, r.code, r.fn]).toEqual([name, '42501', name]);
      expect(r.id).toMatch(/^\d+$/);
      recorded.push(`keyring.${name}`);
    }
    const rows = (await refusalRows(logins[role])).slice(before.length);
    expect(rows.map((r) => r.detail.function)).toEqual(recorded);
    for (const r of rows) {
      expect(r).toMatchObject({ db_role: logins[role], actor: null, reason: 'insufficient_privilege' });
      expect(r.detail).toEqual({ function: r.detail.function, sqlstate: '42501', application_name: 'audit-refusals-test' });
    }
    // Nothing the refused calls would have written is there (they rolled back); the
    // sidecar's own register_key call is the one key.registered row.
    expect(await q(`SELECT action, db_role::text FROM keyring.audit_log WHERE action NOT IN ('privileged_call.refused', 'column.protected')`))
      .toEqual(role === 'keyring_sidecar' ? [{ action: 'key.registered', db_role: sidecarRole }] : []);
  });

  it('the rows are chained, readable by auditors in keyring.audit, and the chain verifies', async () => {
    expect(await q('SELECT * FROM keyring.verify_audit_chain()')).toEqual([]);
    const { rows } = await clients.keyring_auditor.query<{ db_role: string; n: string }>(
      `SELECT db_role::text, count(*) AS n FROM keyring.audit WHERE action = 'privileged_call.refused' GROUP BY 1 ORDER BY 1`);
    const n = Object.keys(CALLS).length;
    expect(rows).toEqual([
      { db_role: AUDITOR_ROLE, n: String(n) },
      { db_role: APP_ROLE, n: String(n) },
      { db_role: sidecarRole, n: String(n - 1) },
    ].sort((a, b) => (a.db_role < b.db_role ? -1 : 1)));
  });

  it('an actor name is kept, and the function may be given qualified or with its signature', async () => {
    const c = clients.keyring_writer;
    const { rows } = await c.query<{ id: string }>(
      `SELECT keyring.audit_refusal('keyring.retire_key(keyring.key_purpose, integer)', p_actor => 'alice') AS id`);
    expect(await q('SELECT actor, db_role::text, detail->>$2 AS fn FROM keyring.audit_log WHERE id = $1', [rows[0]!.id, 'function']))
      .toEqual([{ actor: 'alice', db_role: APP_ROLE, fn: 'keyring.retire_key' }]);
  });

  it('must follow the rollback: inside the refused transaction it fails too (25P02)', async () => {
    const c = clients.keyring_auditor;
    await c.query('BEGIN');
    expect(await codeOf(c, CALLS.rotate!)).toBe('42501');
    expect(await codeOf(c, `SELECT keyring.audit_refusal('rotate')`)).toBe('25P02');
    await c.query('ROLLBACK');
  });

  it('a refusal recorded in a transaction the client rolls back is not recorded (a client that does not report is not seen)', async () => {
    const c = clients.keyring_writer;
    const before = (await refusalRows()).length;
    await c.query('BEGIN');
    await c.query(`SELECT keyring.audit_refusal('rotate')`);
    await c.query('ROLLBACK');
    expect((await refusalRows()).length).toBe(before);
  });
});

describe('what is not recorded', () => {
  it('a function the login may call, a non-administrator function, a bad name or actor: 22023, no row', async () => {
    const before = (await refusalRows()).length;
    const cases: [Role, string, unknown[]][] = [
      ['keyring_sidecar', `SELECT keyring.audit_refusal('register_key')`, []], // the sidecar may call it
      ['keyring_auditor', `SELECT keyring.audit_refusal('verify_audit_chain')`, []], // auditors may call it
      ['keyring_writer', `SELECT keyring.audit_refusal('data_key_id')`, []], // everyone may
      ['keyring_writer', `SELECT keyring.audit_refusal('audit_refusal')`, []],
      ['keyring_writer', `SELECT keyring.audit_refusal('no_such_function')`, []],
      ['keyring_writer', `SELECT keyring.audit_refusal('pg_sleep')`, []], // not in schema keyring
      ['keyring_writer', `SELECT keyring.audit_refusal($1)`, ["retire_key'); DROP TABLE keyring.audit_log; --"]],
      ['keyring_writer', `SELECT keyring.audit_refusal(NULL)`, []],
      ['keyring_writer', `SELECT keyring.audit_refusal('')`, []],
      ['keyring_writer', `SELECT keyring.audit_refusal('rotate', p_actor => $1)`, ['line\nbreak']],
      ['keyring_writer', `SELECT keyring.audit_refusal('rotate', p_actor => $1)`, ['x'.repeat(201)]],
    ];
    for (const [role, sql, params] of cases) expect([sql, params, await codeOf(clients[role], sql, params)]).toEqual([sql, params, '22023']);
    // An administrator (here the superuser) may call everything: nothing to record.
    await expect(q(`SELECT keyring.audit_refusal('retire_key')`)).rejects.toMatchObject({ code: '22023' });
    expect((await refusalRows()).length).toBe(before);
  });

  it('more than 60 refusals a minute by one login: a WARNING, no row, NULL', async () => {
    const c = clients.keyring_sidecar;
    const warnings: string[] = [];
    const onNotice = (n: { severity?: string; message?: string }): void => { if (n.severity === 'WARNING') warnings.push(n.message ?? ''); };
    c.on('notice', onNotice);
    try {
      const [{ n }] = (await q<{ n: string }>(
        `SELECT count(*) AS n FROM keyring.audit_log WHERE action = 'privileged_call.refused' AND db_role = $1
            AND at > clock_timestamp() - interval '1 minute'`, [sidecarRole])) as [{ n: string }];
      const ids: (string | null)[] = [];
      for (let i = Number(n); i <= 60; i++) {
        ids.push((await c.query<{ id: string | null }>(`SELECT keyring.audit_refusal('destroy_key') AS id`)).rows[0]!.id);
      }
      expect(ids.slice(0, -1).every((id) => id !== null)).toBe(true);
      expect(ids.at(-1)).toBeNull();
      expect(warnings).toEqual([expect.stringMatching(/refusal of keyring\.destroy_key .* not recorded: 60 refusals/)]);
      // Other logins are not affected.
      const r = await callAsCli(clients.keyring_writer, CALLS.destroy_key!);
      expect(r.id).toMatch(/^\d+$/);
    } finally {
      c.off('notice', onNotice);
    }
    expect(await q('SELECT * FROM keyring.verify_audit_chain()')).toEqual([]);
  });

  it('the CLI records its own refusal: keyring protect and keyring key retire as the application role', async () => {
    const url = await appRoleUrl(db.url);
    const before = (await refusalRows()).length;
    for (const args of [['protect', 'public.customers.name'], ['key', 'retire', 'encrypt', '1']]) {
      const r = spawnSync(process.execPath, ['bin/keyring.js', ...args], { env: { ...process.env, DATABASE_URL: url }, encoding: 'utf8' });
      expect(r.status, r.stderr).toBe(1);
      expect(r.stderr.trim().split('\n')).toHaveLength(1);
      expect(r.stderr).toMatch(/permission denied for function (protect|retire_key)/);
    }
    const rows = (await refusalRows()).slice(before);
    expect(rows.map((row) => String(row.detail.function)).sort())
      .toEqual(['keyring.protect', 'keyring.retire_key']);
    expect(await q('SELECT * FROM keyring.verify_audit_chain()')).toEqual([]);
  });
});
