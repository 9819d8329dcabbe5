/**
 * Audited reveal (DESIGN.md "compliance officer: reveal one value for a stated reason,
 * every reveal audited"): Keyring.reveal() and `keyring reveal`. The audit row is
 * committed before a value is returned; without it nothing is revealed. Only actors on
 * the allow list (keyring.settings reveal_actors) may reveal; refusals are audited too.
 */
import pg from 'pg';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { Keyring } from '../../src/lib/keyring.js';
import { auditRows, openLibrary, runCli } from '../helpers/audit.js';
import { createTestDb, type TestDb } from '../helpers/db.js';
import { DBA_ROLE, loginRoleUrl } from '../helpers/roles.js';
import {
  activateKeys, columnIdOf, createSidecarRole, dropRole, fingerprintOf, newKeys, sidecarEnv, startSidecar, type TestKeys,
} from '../helpers/sidecar.js';

let db: TestDb;
let keys: TestKeys;
let kr: Keyring;
let nationalCol: number;
const sidecarRole = `kr_sc_reveal_${process.pid}`;
const NID = 'public.customers.national_id';

async function q<T extends pg.QueryResultRow = Record<string, unknown>>(sql: string, params: unknown[] = []): Promise<T[]> {
  return (await db.pool.query<T>(sql, params)).rows;
}

/** What another session sees right now: proves the audit row was committed. */
async function committedAudit(action: string): Promise<Record<string, unknown>[]> {
  const c = new pg.Client({ connectionString: db.url });
  await c.connect();
  try {
    return (await c.query(`SELECT actor, row_key, reason, detail, key_version FROM keyring.audit_log WHERE action = $1 ORDER BY id`, [action])).rows;
  } finally {
    await c.end();
  }
}

async function codeOf(p: Promise<unknown>): Promise<{ code: string; message: string }> {
  try {
    await p;
  } catch (err) {
    return err as { code: string; message: string };
  }
  throw new Error('expected a rejection');
}

beforeAll(async () => {
  db = await createTestDb();
  keys = newKeys();
  await activateKeys(db.pool, keys);
  const sidecarUrl = await createSidecarRole(db.pool, db.url, sidecarRole);
  await q(`CREATE TABLE customers (id bigint PRIMARY KEY, customer_id text NOT NULL, national_id text, photo bytea)`);
  nationalCol = (await q<{ id: number }>(`SELECT keyring.protect('public.customers', 'national_id', p_blind_index => true,
    p_normalize => ARRAY['digits'], p_subject_column => 'customer_id') AS id`))[0]!.id;
  await q(`SELECT keyring.protect('public.customers', 'photo')`);
  await q(`INSERT INTO customers_staging (id, customer_id, national_id, photo) VALUES
           (1, 'c1', '01019012345', '\\x00ff01'), (2, 'c2', '02029054321', NULL), (3, 'c3', NULL, NULL)`);
  const s = await startSidecar(sidecarUrl, keys);
  await s.drain();
  await s.stop();
  await q(`UPDATE keyring.settings SET value = 'alice, bob' WHERE name = 'reveal_actors'`);
  kr = await openLibrary(db.url, keys);
});
afterAll(async () => {
  await kr?.close();
  await db?.drop();
  await dropRole(sidecarRole);
});

describe('Keyring.reveal()', () => {
  it('reveals one value to an allowed actor; the audit row is committed when the value is returned', async () => {
    const value = await kr.reveal({ column: NID, rowKey: '1', actor: 'alice', purpose: 'case 4711: identity check' });
    expect(value).toBe('01019012345');
    const [row] = await auditRows(db.pool, 'reveal');
    const { who } = (await q<{ who: string }>('SELECT session_user::text AS who'))[0]!;
    expect(row).toMatchObject({
      actor: 'alice', db_role: who, key_purpose: 'encrypt', key_version: 1, key_fingerprint: fingerprintOf(keys.encrypt[0]!, 'encrypt'),
      column_id: nationalCol, row_key: '1', reason: 'case 4711: identity check',
    });
    expect(row!.detail).toEqual({ data_key_id: expect.stringMatching(/^\d+$/) });
    expect(row!.at.getTime()).toBeGreaterThan(Date.now() - 60_000);
    expect(await committedAudit('reveal')).toHaveLength(1);
    expect(JSON.stringify(row)).not.toContain('01019012345');
  });

  it('returns bytea as bytes and NULL as null, each audited', async () => {
    const photo = await kr.reveal({ column: 'public.customers.photo', rowKey: '1', actor: 'bob', purpose: 'case 4712' });
    expect(Buffer.isBuffer(photo) && photo.toString('hex')).toBe('00ff01');
    expect(await kr.reveal({ column: NID, rowKey: '3', actor: 'bob', purpose: 'case 4713' })).toBeNull();
    const rows = await committedAudit('reveal');
    expect(rows.slice(-2).map((r) => [r.actor, r.row_key, r.reason, r.key_version])).toEqual([
      ['bob', '1', 'case 4712', 1], ['bob', '3', 'case 4713', null],
    ]);
  });

  it('requires a purpose of 3..500 characters and reads or audits nothing without one', async () => {
    const before = (await auditRows(db.pool)).length;
    for (const purpose of ['', '   ', 'ab', 'x'.repeat(501), undefined as unknown as string]) {
      const e = await codeOf(kr.reveal({ column: NID, rowKey: '1', actor: 'alice', purpose }));
      expect(e.code).toBe('PURPOSE_REQUIRED');
    }
    expect((await auditRows(db.pool)).length).toBe(before);
    // The SQL side enforces the same bound for any other client.
    const e = await codeOf(q(`SELECT keyring.audit_reveal('alice', $1, '1', '  ')`, [nationalCol]));
    expect(e.code).toBe('22023');
  });

  it('refuses an actor not on the allow list, audits the refusal (committed), reveals nothing', async () => {
    const e = await codeOf(kr.reveal({ column: NID, rowKey: '1', actor: 'mallory', purpose: 'just curious' }));
    expect(e.code).toBe('REVEAL_REFUSED');
    expect(e.message).not.toContain('01019012345');
    const refused = await committedAudit('reveal.refused');
    expect(refused.at(-1)).toMatchObject({ actor: 'mallory', row_key: '1', reason: 'just curious', detail: { refusal: 'actor_not_allowed' } });
    expect((await committedAudit('reveal')).some((r) => r.actor === 'mallory')).toBe(false);
  });

  it('without an actor, the database role is the actor and must be on the list', async () => {
    const { who } = (await q<{ who: string }>('SELECT session_user::text AS who'))[0]!;
    expect((await codeOf(kr.reveal({ column: NID, rowKey: '2', purpose: 'case 4714' }))).code).toBe('REVEAL_REFUSED');
    expect((await committedAudit('reveal.refused')).at(-1)).toMatchObject({ actor: who, row_key: '2' });
    await q(`UPDATE keyring.settings SET value = value || ', ' || session_user WHERE name = 'reveal_actors'`);
    try {
      expect(await kr.reveal({ column: NID, rowKey: '2', purpose: 'case 4714' })).toBe('02029054321');
      expect((await committedAudit('reveal')).at(-1)).toMatchObject({ actor: who, row_key: '2', reason: 'case 4714' });
    } finally {
      await q(`UPDATE keyring.settings SET value = 'alice, bob' WHERE name = 'reveal_actors'`);
    }
  });

  it('reveals nothing when the audit row cannot be written (insert into the log fails)', async () => {
    await q(`CREATE OR REPLACE FUNCTION public.refuse_audit() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN RAISE EXCEPTION 'audit storage unavailable'; END $$`);
    await q(`CREATE TRIGGER refuse_audit BEFORE INSERT ON keyring.audit_log FOR EACH ROW EXECUTE FUNCTION public.refuse_audit()`);
    const reveals = (await committedAudit('reveal')).length;
    try {
      const e = await codeOf(kr.reveal({ column: NID, rowKey: '1', actor: 'alice', purpose: 'case 4715' }));
      expect(e.code).toBe('AUDIT_FAILED');
      expect(e.message).not.toContain('01019012345');
    } finally {
      await q('DROP TRIGGER refuse_audit ON keyring.audit_log');
    }
    expect((await committedAudit('reveal')).length).toBe(reveals);
  });

  it('reveals nothing when the role may not write the audit row (EXECUTE on audit_reveal revoked)', async () => {
    const url = await loginRoleUrl(db.url, DBA_ROLE, 'keyring_admin');
    await q(`GRANT SELECT ON customers TO ${DBA_ROLE}`);
    const dba = await openLibrary(url, keys);
    try {
      // The same role reveals while it holds the privilege ...
      expect(await dba.reveal({ column: NID, rowKey: '1', actor: 'alice', purpose: 'case 4716' })).toBe('01019012345');
      await q('REVOKE EXECUTE ON FUNCTION keyring.audit_reveal(text, integer, text, text, integer, text, jsonb) FROM keyring_admin');
      const reveals = (await committedAudit('reveal')).length;
      // ... and gets nothing once it cannot audit.
      const e = await codeOf(dba.reveal({ column: NID, rowKey: '1', actor: 'alice', purpose: 'case 4717' }));
      expect(e.code).toBe('AUDIT_FAILED');
      expect(e.message).not.toContain('01019012345');
      expect((await committedAudit('reveal')).length).toBe(reveals);
    } finally {
      await q('GRANT EXECUTE ON FUNCTION keyring.audit_reveal(text, integer, text, text, integer, text, jsonb) TO keyring_admin');
      await q(`REVOKE SELECT ON customers FROM ${DBA_ROLE}`);
      await dba.close();
    }
  });

  it('audits a decryption failure (column, row key, reason class, never bytes) and throws the generic error', async () => {
    const { ct } = (await q<{ ct: Buffer }>('SELECT national_id AS ct FROM customers WHERE id = 2'))[0]!;
    const tampered = Buffer.from(ct);
    tampered[30] = tampered[30]! ^ 0x01;
    await q('UPDATE customers SET national_id = $1 WHERE id = 2', [tampered]);
    try {
      const e = await codeOf(kr.reveal({ column: NID, rowKey: '2', actor: 'alice', purpose: 'case 4718' }));
      expect(e.code).toBe('DECRYPT_FAILED');
      expect(e.message).toBe('keyring: value could not be decrypted (wrong key, tampered, or moved ciphertext)');
      const [failed] = (await auditRows(db.pool, 'decrypt.failed')).slice(-1);
      expect(failed).toMatchObject({
        actor: 'alice', column_id: nationalCol, row_key: '2', reason: 'auth', key_purpose: 'encrypt', key_version: 1,
        detail: { data_key_id: expect.stringMatching(/^\d+$/), purpose: 'case 4718', via: 'reveal' },
      });
      const text = JSON.stringify(failed);
      expect(text).not.toContain(ct.subarray(21, 30).toString('hex'));
      expect(text).not.toContain('02029054321');
      expect((await committedAudit('reveal')).some((r) => r.reason === 'case 4718')).toBe(false);
    } finally {
      await q('UPDATE customers SET national_id = $1 WHERE id = 2', [ct]);
    }
  });

  it('refuses, audited, a value still queued and a row that does not exist', async () => {
    await q(`INSERT INTO customers_staging (id, customer_id, national_id) VALUES (4, 'c4', '04049011111')`);
    expect((await codeOf(kr.reveal({ column: NID, rowKey: '4', actor: 'alice', purpose: 'case 4719' }))).code).toBe('PENDING');
    expect((await codeOf(kr.reveal({ column: NID, rowKey: '99', actor: 'alice', purpose: 'case 4720' }))).code).toBe('NO_ROW');
    const refused = (await committedAudit('reveal.refused')).slice(-2);
    expect(refused.map((r) => [r.row_key, (r.detail as { refusal: string }).refusal])).toEqual([['4', 'pending'], ['99', 'no_row']]);
  });
});

describe('the library decrypt path', () => {
  it('audits every decryption: counts per key version, and each failure with its class', async () => {
    const tool = await openLibrary(db.url, keys, { actor: 'nightly-export' });
    const { ct } = (await q<{ ct: Buffer }>('SELECT national_id AS ct FROM customers WHERE id = 1'))[0]!;
    const moved = Buffer.from(ct);
    try {
      // Row 1's ciphertext copied into row 2: authentication fails (AAD binds the row).
      const { ct2 } = (await q<{ ct2: Buffer }>('SELECT national_id AS ct2 FROM customers WHERE id = 2'))[0]!;
      await q('UPDATE customers SET national_id = $1 WHERE id = 2', [moved]);
      const values = await tool.decryptColumn(NID);
      expect(values.map((v) => [v.rowKey, v.value, v.problem])).toEqual([
        ['1', '01019012345', undefined], ['2', null, 'auth'], ['3', null, undefined], ['4', null, 'pending'],
      ]);
      await q('UPDATE customers SET national_id = $1 WHERE id = 2', [ct2]);
      const rows = (await auditRows(db.pool, 'decrypt.batch', 'decrypt.failed')).filter((r) => r.actor === 'nightly-export');
      expect(rows.map((r) => [r.action, r.key_version, r.row_key, r.reason, r.detail.count])).toEqual([
        ['decrypt.batch', 1, null, null, 1], ['decrypt.failed', 1, '2', 'auth', undefined],
      ]);
    } finally {
      await tool.close();
    }
  });

  it('returns no values when the decryption cannot be audited', async () => {
    await q(`CREATE OR REPLACE FUNCTION public.refuse_audit() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN RAISE EXCEPTION 'audit storage unavailable'; END $$`);
    await q(`CREATE TRIGGER refuse_audit BEFORE INSERT ON keyring.audit_log FOR EACH ROW EXECUTE FUNCTION public.refuse_audit()`);
    try {
      expect((await codeOf(kr.decryptColumn(NID))).code).toBe('AUDIT_FAILED');
      expect((await codeOf(kr.decrypt(NID, '1'))).code).toBe('AUDIT_FAILED');
    } finally {
      await q('DROP TRIGGER refuse_audit ON keyring.audit_log');
    }
  });
});

describe('keyring reveal (CLI)', () => {
  it('prints the value for an allowed actor, exits 2 without a purpose and 1 when refused', async () => {
    const env = sidecarEnv(db.url, keys);
    const ok = await runCli(['reveal', NID, '--row', '1', '--purpose', 'case 4721', '--actor', 'alice'], env);
    expect(ok).toEqual({ code: 0, stdout: '01019012345', stderr: '' });
    const photo = await runCli(['reveal', 'public.customers.photo', '--row', '1', '--purpose', 'case 4722', '--actor', 'bob'], env);
    expect(photo.stdout).toBe('\\x00ff01');
    const usage = await runCli(['reveal', NID, '--row', '1', '--actor', 'alice'], env);
    expect(usage.code).toBe(2);
    expect(usage.stderr).toContain('--purpose');
    const refused = await runCli(['reveal', NID, '--row', '1', '--purpose', 'case 4723', '--actor', 'mallory'], env);
    expect(refused.code).toBe(1);
    expect(refused.stdout).toBe('');
    expect(refused.stderr).toContain('mallory may not reveal values');
    expect((await committedAudit('reveal')).at(-1)).toMatchObject({ actor: 'bob', reason: 'case 4722' });
    expect(await columnIdOf(db.pool, 'customers', 'national_id')).toBe(nationalCol);
  });
});
