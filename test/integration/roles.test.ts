/**
 * Roles and privileges (DESIGN.md "Roles"): for each keyring role, a LOGIN role that is a
 * member of exactly that role tries every forbidden action and is refused (SQLSTATE
 * 42501, or the guard trigger's error); what the role must be able to do works.
 *
 *   keyring_writer   staging views, reads base tables; nothing in schema keyring
 *   keyring_auditor  reads the audit log and the audit views only
 *   keyring_sidecar  exactly what the sidecar needs (queue, registries, data keys, heartbeat)
 *   keyring_admin    runs the procedures; cannot write the audit log
 *
 * Relations and functions are enumerated from the catalog, so an object added later is
 * covered by the invariants (writer: nothing at all; auditor: no writes; no role writes
 * the audit log) until it is added to the matrix below. Every role may call
 * audit_refusal() (00008), which records its own refusal: test/integration/audit-refusals.test.ts.
 */
import pg from 'pg';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createTestDb, type TestDb } from '../helpers/db.js';
import { connect, APP_ROLE, appRoleUrl, DBA_ROLE, loginRoleUrl } from '../helpers/roles.js';
import { createSidecarRole, dropRole } from '../helpers/sidecar.js';
import { fakeCiphertext } from '../helpers/sql.js';

type Role = 'keyring_writer' | 'keyring_auditor' | 'keyring_sidecar' | 'keyring_admin';
type Op = 'SELECT' | 'INSERT' | 'UPDATE' | 'DELETE' | 'TRUNCATE';
const OPS: readonly Op[] = ['SELECT', 'INSERT', 'UPDATE', 'DELETE', 'TRUNCATE'];
const ALL: readonly Op[] = OPS;
const AUDITOR_ROLE = 'keyring_test_auditor';

/** What each role may do on the relations of schema keyring made by migrations 00001-00006. */
const MATRIX: Record<string, Record<Role, readonly Op[]>> = {
  root_keys: { keyring_writer: [], keyring_auditor: [], keyring_sidecar: ['SELECT'], keyring_admin: ALL },
  data_keys: { keyring_writer: [], keyring_auditor: [], keyring_sidecar: ['SELECT', 'INSERT', 'UPDATE'], keyring_admin: ALL },
  columns: { keyring_writer: [], keyring_auditor: [], keyring_sidecar: ['SELECT'], keyring_admin: ALL },
  // adopt migration: the sidecar queues the plaintext of an adopted column (backfill_range)
  pending: { keyring_writer: [], keyring_auditor: [], keyring_sidecar: ['SELECT', 'INSERT', 'UPDATE', 'DELETE'], keyring_admin: ALL },
  quarantine: { keyring_writer: [], keyring_auditor: [], keyring_sidecar: ['SELECT', 'INSERT'], keyring_admin: ALL },
  sidecars: { keyring_writer: [], keyring_auditor: [], keyring_sidecar: ['SELECT', 'INSERT', 'UPDATE'], keyring_admin: ALL },
  settings: { keyring_writer: [], keyring_auditor: ['SELECT'], keyring_sidecar: ['SELECT'], keyring_admin: ALL },
  migrations: { keyring_writer: [], keyring_auditor: [], keyring_sidecar: ['SELECT'], keyring_admin: ALL },
  audit_log: { keyring_writer: [], keyring_auditor: ['SELECT'], keyring_sidecar: [], keyring_admin: ['SELECT'] },
  audit_head: { keyring_writer: [], keyring_auditor: ['SELECT'], keyring_sidecar: [], keyring_admin: ['SELECT'] },
  // 00005: sidecars claim and advance jobs, they create none
  jobs: { keyring_writer: [], keyring_auditor: [], keyring_sidecar: ['SELECT', 'UPDATE'], keyring_admin: ALL },
  // views
  status: { keyring_writer: [], keyring_auditor: ['SELECT'], keyring_sidecar: [], keyring_admin: ALL },
  audit: { keyring_writer: [], keyring_auditor: ['SELECT'], keyring_sidecar: [], keyring_admin: ['SELECT'] },
  compromise_report: { keyring_writer: [], keyring_auditor: ['SELECT'], keyring_sidecar: [], keyring_admin: ['SELECT'] },
  alerts: { keyring_writer: [], keyring_auditor: ['SELECT'], keyring_sidecar: [], keyring_admin: ['SELECT'] },
  // 00005: auditors answer "which keys are due" and follow rotations
  key_inventory: { keyring_writer: [], keyring_auditor: ['SELECT'], keyring_sidecar: [], keyring_admin: ALL },
  rotation_due: { keyring_writer: [], keyring_auditor: ['SELECT'], keyring_sidecar: [], keyring_admin: ALL },
  rotation_progress: { keyring_writer: [], keyring_auditor: ['SELECT'], keyring_sidecar: [], keyring_admin: ALL },
  // the value_counts migration: the status counters, written by triggers that run as their owner
  value_counts: { keyring_writer: [], keyring_auditor: [], keyring_sidecar: [], keyring_admin: ALL },
};

/**
 * Functions each role may call besides data_key_id() (PUBLIC); every other keyring function
 * is refused to writer, auditor and sidecar. For admin: the entry points it must be able to
 * call (internal helpers and trigger functions are nobody's to call).
 */
const CALLABLE: Record<Role, readonly string[]> = {
  keyring_admin: ['protect', 'unprotect', 'register_key', 'activate_key', 'retire_key', 'disable_key', 'enable_key',
    'destroy_key', 'rotate', 'key_dependents', 'reencrypt', 'shred', 'audit_reveal', 'reveal_allowed',
    'verify_audit_chain', 'column_status', 'audit_append', 'setting', 'max_value_bytes', 'audit_refusal', 'reindex',
    'lock_index_version', 'recount', 'check_counts', 'compact_value_counts', 'install_counters', 'backfill'],
  keyring_writer: ['audit_refusal'],
  keyring_auditor: ['column_status', 'verify_audit_chain', 'audit_row_hash', 'audit_refusal'],
  // adopt migration: the backfill's steps and the SQL-text helpers backfill_range (SECURITY INVOKER) uses
  keyring_sidecar: ['audit_append', 'register_key', 'setting', 'max_value_bytes', 'min_max_value_bytes', 'notify', 'audit_refusal',
    'lock_index_version', 'compact_value_counts', 'backfill_range', 'adopt_finish', 'backfill_count', 'pk_range_sql',
    'row_key_sql', 'canonical_sql'],
};

/**
 * The DBA entry points of 00002, 00005-00007 and the reindex migration, named so that a renamed or dropped one is
 * noticed: each must exist and be refused (42501) to every role but keyring_admin (and
 * register_key, which the sidecar calls at start).
 */
const DBA_ENTRY_POINTS = ['protect', 'unprotect', 'register_key', 'activate_key', 'retire_key', 'disable_key',
  'enable_key', 'destroy_key', 'rotate', 'key_dependents', 'reencrypt', 'reindex', 'shred', 'audit_reveal', 'reveal_allowed',
  'recount', 'check_counts', 'install_counters', 'backfill'] as const;

let db: TestDb;
const sidecarRole = `kr_sc_roles_${process.pid}`;
const clients = {} as Record<Role, pg.Client>;
const logins = {} as Record<Role, string>;
let relations: { name: string; kind: string; firstColumn: string }[];
let functions: { name: string; args: string }[];

async function q<T extends pg.QueryResultRow = Record<string, unknown>>(sql: string, params: unknown[] = []): Promise<T[]> {
  return (await db.pool.query<T>(sql, params)).rows;
}

/** Runs `sql` as `role` in a transaction that is always rolled back; the SQLSTATE of its failure, or 'ok'. */
async function attempt(role: Role, sql: string): Promise<string> {
  const c = clients[role];
  await c.query('BEGIN');
  try {
    await c.query(sql);
    return 'ok';
  } catch (err) {
    return (err as { code?: string }).code ?? String(err);
  } finally {
    await c.query('ROLLBACK');
  }
}

function statement(rel: { name: string; kind: string; firstColumn: string }, op: Op): string {
  const t = `keyring.${rel.name}`;
  switch (op) {
    case 'SELECT': return `SELECT * FROM ${t} LIMIT 0`;
    case 'INSERT': return `INSERT INTO ${t} DEFAULT VALUES`;
    case 'UPDATE': return `UPDATE ${t} SET "${rel.firstColumn}" = "${rel.firstColumn}" WHERE false`;
    case 'DELETE': return `DELETE FROM ${t} WHERE false`;
    case 'TRUNCATE': return `TRUNCATE ${t}`;
  }
}

beforeAll(async () => {
  db = await createTestDb();
  await q(`CREATE TABLE customers (id int PRIMARY KEY, name text, national_id text)`);
  await q(`SELECT keyring.protect('public.customers', 'national_id', p_blind_index => true)`);
  await q(`INSERT INTO customers_staging (id, name, national_id) VALUES (1, 'Kari', '01019012345')`);
  await q(`SELECT keyring.audit_append('test.seed')`);
  logins.keyring_writer = APP_ROLE;
  logins.keyring_auditor = AUDITOR_ROLE;
  logins.keyring_sidecar = sidecarRole;
  logins.keyring_admin = DBA_ROLE;
  clients.keyring_writer = await connect(await appRoleUrl(db.url));
  clients.keyring_auditor = await connect(await loginRoleUrl(db.url, AUDITOR_ROLE, 'keyring_auditor'));
  clients.keyring_sidecar = await connect(await createSidecarRole(db.pool, db.url, sidecarRole));
  clients.keyring_admin = await connect(await loginRoleUrl(db.url, DBA_ROLE, 'keyring_admin'));
  relations = await q(`SELECT c.relname AS name, c.relkind::text AS kind,
                              (SELECT a.attname FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attnum > 0
                                  AND NOT a.attisdropped ORDER BY a.attnum LIMIT 1) AS "firstColumn"
                         FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                        WHERE n.nspname = 'keyring' AND c.relkind IN ('r', 'v', 'p') ORDER BY 1`);
  functions = await q(`SELECT p.proname AS name, oidvectortypes(p.proargtypes) AS args
                         FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
                        WHERE n.nspname = 'keyring' AND p.prokind = 'f' ORDER BY 1, 2`);
});
afterAll(async () => {
  await Promise.all(Object.values(clients).map((c) => c?.end()));
  await db?.drop();
  await dropRole(sidecarRole);
});

describe('test login roles', () => {
  it('are each a member of exactly one keyring role, and not superusers', async () => {
    for (const [role, login] of Object.entries(logins)) {
      const rows = await q<{ of: string[]; su: boolean }>(
        `SELECT array(SELECT g.rolname::text FROM pg_auth_members m JOIN pg_roles g ON g.oid = m.roleid
                       WHERE m.member = r.oid ORDER BY 1) AS of, r.rolsuper AS su
           FROM pg_roles r WHERE r.rolname = $1`, [login]);
      expect(rows).toEqual([{ of: [role], su: false }]);
    }
  });

  it('the matrix names every relation made by 00001-00006', () => {
    for (const name of Object.keys(MATRIX)) expect(relations.map((r) => r.name)).toContain(name);
  });

  it('every named DBA entry point exists', () => {
    for (const name of DBA_ENTRY_POINTS) expect(functions.map((f) => f.name)).toContain(name);
  });
});

describe.each(['keyring_writer', 'keyring_auditor', 'keyring_sidecar', 'keyring_admin'] as const)('%s', (role) => {
  it('is refused every forbidden SELECT, INSERT, UPDATE, DELETE and TRUNCATE on keyring relations', async () => {
    const refused: string[] = [];
    const wrong: string[] = [];
    for (const rel of relations) {
      const known = MATRIX[rel.name]?.[role];
      for (const op of OPS) {
        // Views: only SELECT is run (a write on a non-updatable view fails before the
        // privilege check); their write privileges are checked in the catalog.
        const forbidden = known ? !known.includes(op)
          : role === 'keyring_writer' || (role === 'keyring_auditor' && op !== 'SELECT') || (op === 'TRUNCATE' && role !== 'keyring_admin');
        if (!forbidden) continue;
        if (rel.kind === 'v' && op !== 'SELECT') {
          const [{ ok }] = (await q<{ ok: boolean }>('SELECT has_table_privilege($1, $2, $3) AS ok', [logins[role], `keyring.${rel.name}`, op])) as [{ ok: boolean }];
          if (ok) wrong.push(`${op} ${rel.name}: privilege held`);
          continue;
        }
        const code = await attempt(role, statement(rel, op));
        if (code === '42501') refused.push(`${op} ${rel.name}`);
        else wrong.push(`${op} ${rel.name}: ${code}`);
      }
    }
    expect(wrong).toEqual([]);
    expect(refused.length).toBeGreaterThan(role === 'keyring_admin' ? 2 : 20);
  });

  it('may do what the matrix allows (no privilege error)', async () => {
    const wrong: string[] = [];
    for (const rel of relations.filter((r) => r.kind !== 'v' && MATRIX[r.name])) {
      for (const op of MATRIX[rel.name]![role]) {
        const code = await attempt(role, statement(rel, op));
        if (code === '42501') wrong.push(`${op} ${rel.name}`);
      }
    }
    for (const view of relations.filter((r) => r.kind === 'v' && MATRIX[r.name]?.[role].includes('SELECT'))) {
      const code = await attempt(role, statement(view, 'SELECT'));
      if (code !== 'ok') wrong.push(`SELECT ${view.name}: ${code}`);
    }
    expect(wrong).toEqual([]);
  });

  it('is refused every keyring function it is not meant to call', async () => {
    const allowed = new Set([...CALLABLE[role], 'data_key_id']);
    const wrong: string[] = [];
    let refused = 0;
    const refusedNames = new Set<string>();
    for (const f of functions) {
      // (SELECT NULL): a constant NULL would let the planner fold a STRICT function away
      // before its EXECUTE privilege is checked.
      const call = `SELECT keyring.${f.name}(${f.args === '' ? '' : f.args.split(', ').map((t) => `(SELECT NULL::${t})`).join(', ')})`;
      const mayCall = allowed.has(f.name);
      if (role === 'keyring_admin' && !mayCall) continue;
      const code = await attempt(role, call);
      if (mayCall && code === '42501') wrong.push(`${f.name}(${f.args}) refused`);
      if (!mayCall) {
        if (code === '42501') {
          refused++;
          refusedNames.add(f.name);
        } else wrong.push(`${f.name}(${f.args}): ${code}`);
      }
    }
    expect(wrong).toEqual([]);
    expect(refused).toBeGreaterThan(role === 'keyring_admin' ? -1 : 10);
    if (role !== 'keyring_admin') {
      const entryPoints = DBA_ENTRY_POINTS.filter((name) => !CALLABLE[role].includes(name));
      expect(entryPoints.filter((name) => !refusedNames.has(name))).toEqual([]);
    }
  });

  it('cannot write ciphertext or blind-index columns of a protected table, nor the audit log', async () => {
    const ct = fakeCiphertext(1).toString('hex');
    const attempts = [
      `UPDATE public.customers SET national_id = '\\x${ct}' WHERE id = 1`,
      `UPDATE public.customers SET national_id_bidx = '\\x0001aa' WHERE id = 1`,
      `INSERT INTO public.customers (id, name, national_id) VALUES (2, 'x', '\\x${ct}')`,
      `INSERT INTO keyring.audit_log (action, prev_hash, hash) VALUES ('forged', '\\x', '\\x')`,
      `UPDATE keyring.audit_log SET reason = 'rewritten'`,
      `DELETE FROM keyring.audit_log`,
      'TRUNCATE keyring.audit_log',
    ];
    // The sidecar writes ciphertext by design (tested in the write path); all else is refused.
    for (const sql of role === 'keyring_sidecar' ? attempts.slice(2) : attempts) {
      expect([sql, await attempt(role, sql)]).toEqual([sql, '42501']);
    }
  });
});

describe('beyond privileges', () => {
  it('the guard trigger refuses a direct ciphertext write by a role that was granted UPDATE on the table', async () => {
    await q(`GRANT UPDATE ON public.customers TO ${APP_ROLE}`);
    try {
      const c = clients.keyring_writer;
      await c.query('BEGIN');
      try {
        await c.query(`UPDATE public.customers SET national_id = '\\x${fakeCiphertext(1).toString('hex')}' WHERE id = 1`);
        throw new Error('the guard let the write through');
      } catch (err) {
        expect((err as pg.DatabaseError).code).toBe('42501');
        expect((err as pg.DatabaseError).message).toMatch(/may not write the protected columns/);
      } finally {
        await c.query('ROLLBACK');
      }
    } finally {
      await q(`REVOKE UPDATE ON public.customers FROM ${APP_ROLE}`);
    }
  });

  it('the superuser cannot UPDATE, DELETE or TRUNCATE the audit log either (trigger)', async () => {
    for (const sql of [`UPDATE keyring.audit_log SET reason = 'x'`, 'DELETE FROM keyring.audit_log', 'TRUNCATE keyring.audit_log']) {
      await expect(q(sql)).rejects.toMatchObject({ code: '42501', message: expect.stringMatching(/append-only/) });
    }
  });

  it('each role does its job: writer stages, auditor verifies, sidecar reads the queue, admin reads alerts', async () => {
    expect(await attempt('keyring_writer', `INSERT INTO public.customers_staging (id, name, national_id) VALUES (3, 'Ola', '02029054321')`)).toBe('ok');
    expect(await attempt('keyring_writer', 'SELECT id, name, national_id FROM public.customers')).toBe('ok');
    expect(await attempt('keyring_auditor', 'SELECT * FROM keyring.verify_audit_chain()')).toBe('ok');
    expect(await attempt('keyring_auditor', `SELECT * FROM keyring.compromise_report WHERE key_version = 1`)).toBe('ok');
    expect(await attempt('keyring_auditor', 'SELECT purpose, version, next_due, overdue FROM keyring.key_inventory')).toBe('ok');
    expect(await attempt('keyring_auditor', 'SELECT * FROM keyring.rotation_due')).toBe('ok');
    expect(await attempt('keyring_auditor', 'SELECT job, state, percent, eta FROM keyring.rotation_progress')).toBe('ok');
    expect(await attempt('keyring_sidecar', `SELECT id FROM keyring.jobs WHERE state IN ('queued', 'running') FOR UPDATE SKIP LOCKED`)).toBe('ok');
    expect(await attempt('keyring_admin', `SELECT * FROM keyring.key_dependents('encrypt', 1)`)).toBe('ok');
    expect(await attempt('keyring_sidecar', 'SELECT id, value FROM keyring.pending FOR UPDATE SKIP LOCKED')).toBe('ok');
    expect(await attempt('keyring_admin', `SELECT * FROM keyring.alerts`)).toBe('ok');
    expect(await attempt('keyring_admin', `SELECT keyring.reveal_allowed('someone')`)).toBe('ok');
  });
});
