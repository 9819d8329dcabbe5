/**
 * Per-subject data keys and crypto-shredding (DESIGN.md "Key hierarchy": destroy the data
 * keys of one data subject; every value of that subject becomes unreadable, other
 * subjects are untouched, rows kept for legal retention stay). keyring.shred() and
 * `keyring shred`; the shredded state is terminal for every role.
 */
import pg from 'pg';
import { afterAll, afterEach, beforeAll, describe, expect, it, vi } from 'vitest';
import { DataKeyCache } from '../../src/keys/data-keys.js';
import type { Keyring } from '../../src/lib/keyring.js';
import { parseHint } from '../../sidecar/listener.js';
import type { Sidecar } from '../../sidecar/sidecar.js';
import { auditRows, openLibrary, runCli } from '../helpers/audit.js';
import { createTestDb, type TestDb } from '../helpers/db.js';
import { connectAsDba } from '../helpers/roles.js';
import {
  activateKeys, createSidecarRole, dropRole, newKeys, pendingCount, startSidecar, waitFor, type TestKeys,
} from '../helpers/sidecar.js';
import { pgError } from '../helpers/sql.js';

let db: TestDb;
let keys: TestKeys;
let sidecarUrl: string;
let kr: Keyring;
const sidecarRole = `kr_sc_shred_${process.pid}`;
const running: Sidecar[] = [];
const NID = 'public.customers.national_id';
const IBAN = 'public.customers.iban';
const NOTE = 'public.orders.note';

async function q<T extends pg.QueryResultRow = Record<string, unknown>>(sql: string, params: unknown[] = []): Promise<T[]> {
  return (await db.pool.query<T>(sql, params)).rows;
}

async function start(extra: Record<string, string> = {}): Promise<Sidecar> {
  const s = await startSidecar(sidecarUrl, keys, extra);
  running.push(s);
  return s;
}

async function encryptAll(): Promise<void> {
  const s = await start();
  await s.drain();
  await s.stop();
}

const reveal = (column: string, rowKey: string) => kr.reveal({ column, rowKey, actor: 'dpo', purpose: 'erasure check' });

async function codeOf(p: Promise<unknown>): Promise<string> {
  try {
    await p;
  } catch (err) {
    return (err as { code: string }).code;
  }
  return 'resolved';
}

async function keysOf(subject: string) {
  return q<{ id: string; column_id: number; generation: number; state: string; wrapped: Buffer | null; shredded_at: Date | null }>(
    `SELECT id::text, column_id, generation, state, wrapped, shredded_at FROM keyring.data_keys WHERE subject = $1 ORDER BY id`, [subject]);
}

beforeAll(async () => {
  db = await createTestDb();
  keys = newKeys();
  await activateKeys(db.pool, keys);
  sidecarUrl = await createSidecarRole(db.pool, db.url, sidecarRole);
  // A bigint subject column (typed lookup), two protected columns, one with a blind index;
  // a second table whose subject column is text: shred() covers every protected column.
  await q(`CREATE TABLE customers (id bigint PRIMARY KEY, customer_id bigint NOT NULL, national_id text, iban text)`);
  await q(`SELECT keyring.protect('public.customers', 'national_id', p_blind_index => true, p_normalize => ARRAY['digits'],
                                  p_subject_column => 'customer_id')`);
  await q(`SELECT keyring.protect('public.customers', 'iban', p_subject_column => 'customer_id')`);
  await q(`CREATE TABLE orders (id bigint PRIMARY KEY, customer_ref text NOT NULL, note text)`);
  await q(`SELECT keyring.protect('public.orders', 'note', p_blind_index => true, p_subject_column => 'customer_ref')`);
  await q(`INSERT INTO customers_staging (id, customer_id, national_id, iban) VALUES
           (1, 42, '01019012345', 'NO9386011117947'), (2, 42, '01019012346', NULL),
           (3, 43, '02029054321', 'NO8330001234567')`);
  await q(`INSERT INTO orders_staging (id, customer_ref, note) VALUES (10, '42', 'deliver to the back door'), (11, '43', 'leave with neighbour')`);
  await encryptAll();
  await q(`UPDATE keyring.settings SET value = 'dpo' WHERE name = 'reveal_actors'`);
  kr = await openLibrary(db.url, keys);
});
afterEach(async () => {
  vi.restoreAllMocks();
  await Promise.all(running.splice(0).map((s) => s.stop()));
});
afterAll(async () => {
  await kr?.close();
  await db?.drop();
  await dropRole(sidecarRole);
});

describe('per-subject data keys', () => {
  it('the sidecar creates one data key per (column, subject)', async () => {
    const rows = await q<{ column_name: string; subject: string; n: number }>(
      `SELECT c.column_name, d.subject, count(*)::int AS n FROM keyring.data_keys d JOIN keyring.columns c ON c.id = d.column_id
        GROUP BY 1, 2 ORDER BY 1, 2`);
    expect(rows).toEqual([
      { column_name: 'iban', subject: '42', n: 1 }, { column_name: 'iban', subject: '43', n: 1 },
      { column_name: 'national_id', subject: '42', n: 1 }, { column_name: 'national_id', subject: '43', n: 1 },
      { column_name: 'note', subject: '42', n: 1 }, { column_name: 'note', subject: '43', n: 1 },
    ]);
    // Rows 1 and 2 share subject 42's key; row 3 has its own.
    const ids = await q<{ id: number; dk: string }>('SELECT id::int, keyring.data_key_id(national_id)::text AS dk FROM customers ORDER BY id');
    expect(ids[0]!.dk).toBe(ids[1]!.dk);
    expect(ids[2]!.dk).not.toBe(ids[0]!.dk);
  });
});

describe('keyring.shred()', () => {
  it('destroys every data key of the subject, clears its terms, keeps rows; other subjects are untouched', async () => {
    const before = await q<{ id: number; national_id: Buffer; national_id_bidx: Buffer | null }>(
      'SELECT id::int, national_id, national_id_bidx FROM customers ORDER BY id');
    const result = await q(`SELECT * FROM keyring.shred('42', reason => 'GDPR Art. 17 request 2024-118')`);
    expect(result).toEqual([{ data_keys_shredded: '3', index_terms_cleared: '3', queued_deleted: '0' }]);

    const gone = await keysOf('42');
    expect(gone).toHaveLength(3);
    expect(gone.every((k) => k.state === 'shredded' && k.wrapped === null && k.shredded_at instanceof Date)).toBe(true);
    expect((await keysOf('43')).every((k) => k.state === 'active' && k.wrapped !== null)).toBe(true);

    const after = await q<{ id: number; national_id: Buffer; national_id_bidx: Buffer | null }>(
      'SELECT id::int, national_id, national_id_bidx FROM customers ORDER BY id');
    expect(after.map((r) => r.id)).toEqual([1, 2, 3]); // rows stay
    expect(after.map((r) => r.national_id.equals(before.find((b) => b.id === r.id)!.national_id))).toEqual([true, true, true]);
    expect(after.map((r) => r.national_id_bidx === null)).toEqual([true, true, false]);
    expect(after[2]!.national_id_bidx!.equals(before[2]!.national_id_bidx!)).toBe(true);
    expect(await q(`SELECT id::int FROM orders WHERE note_bidx IS NULL ORDER BY id`)).toEqual([{ id: 10 }]);

    const [audit] = await auditRows(db.pool, 'subject.shredded');
    expect(audit).toMatchObject({
      reason: 'GDPR Art. 17 request 2024-118', column_id: null, key_version: null,
      detail: { subject: '42', data_keys: 3, index_terms: 3, queued: 0 },
    });
    expect((audit!.detail.columns as number[]).length).toBe(3);
    expect(JSON.stringify(audit)).not.toMatch(/0101901234|NO938|back door/);
  });

  it('afterwards reveal fails with ERASED for the subject and works for the others', async () => {
    expect(await codeOf(reveal(NID, '1'))).toBe('ERASED');
    expect(await codeOf(reveal(IBAN, '1'))).toBe('ERASED');
    expect(await codeOf(reveal(NOTE, '10'))).toBe('ERASED');
    expect(await reveal(NID, '3')).toBe('02029054321');
    expect(await reveal(NOTE, '11')).toBe('leave with neighbour');
    const refused = (await auditRows(db.pool, 'reveal.refused')).map((r) => [r.row_key, r.detail.refusal]);
    expect(refused).toEqual([['1', 'erased'], ['1', 'erased'], ['10', 'erased']]);
    // The bulk path reports them as erased too, without calling it a decryption failure.
    const values = await kr.decryptColumn(NID);
    expect(values.map((v) => [v.rowKey, v.value, v.problem])).toEqual([
      ['1', null, 'erased'], ['2', null, 'erased'], ['3', '02029054321', undefined],
    ]);
    expect(await codeOf(kr.decrypt(NID, '2'))).toBe('ERASED');
    expect((await auditRows(db.pool, 'decrypt.failed'))).toEqual([]);
  });

  it('blind-index lookups no longer find the subject', async () => {
    const terms = await kr.lookupTerms(NID, '010190 12345');
    expect(await q('SELECT id FROM customers WHERE national_id_bidx = ANY($1)', [terms])).toEqual([]);
    const other = await kr.lookupTerms(NID, '02029054321');
    expect(await q('SELECT id::int FROM customers WHERE national_id_bidx = ANY($1)', [other])).toEqual([{ id: 3 }]);
  });

  it('stays unreadable after a new sidecar start and a new library instance', async () => {
    const s = await start();
    expect(s.healthy).toBe(true);
    const fresh = await openLibrary(db.url, keys);
    try {
      expect(await codeOf(fresh.reveal({ column: NID, rowKey: '2', actor: 'dpo', purpose: 'erasure check' }))).toBe('ERASED');
    } finally {
      await fresh.close();
    }
  });

  it('a new write for a shredded subject gets a new data key generation; old values stay erased', async () => {
    const s = await start();
    await q(`INSERT INTO customers_staging (id, customer_id, national_id) VALUES (4, 42, '05059099999')`);
    await s.drain();
    const fresh = (await keysOf('42')).filter((k) => k.state === 'active');
    expect(fresh).toHaveLength(1);
    expect(fresh[0]).toMatchObject({ generation: 2 });
    expect(await reveal(NID, '4')).toBe('05059099999');
    expect(await codeOf(reveal(NID, '1'))).toBe('ERASED');
  });

  it('deletes the subject\'s queued plaintext and leaves other subjects\' queue entries', async () => {
    await q(`INSERT INTO customers_staging (id, customer_id, national_id, iban) VALUES
             (5, 44, '06069011111', 'NO1111'), (6, 45, '07079022222', NULL)`);
    expect(await pendingCount(db.pool)).toBe(3);
    const [r] = await q(`SELECT * FROM keyring.shred('44', 'request 2024-119')`);
    expect(r).toEqual({ data_keys_shredded: '0', index_terms_cleared: '0', queued_deleted: '2' });
    expect(await q(`SELECT subject FROM keyring.pending`)).toEqual([{ subject: '45' }]);
    // No ciphertext will ever exist for the deleted values: the placeholders become NULL.
    expect(await q(`SELECT national_id, iban, national_id_bidx FROM customers WHERE id = 5`))
      .toEqual([{ national_id: null, iban: null, national_id_bidx: null }]);
    await encryptAll();
    expect(await reveal(NID, '6')).toBe('07079022222');
  });

  it('tells running sidecars to drop their cached data keys (NOTIFY {"kind":"shred"})', async () => {
    expect(parseHint('{"kind":"shred"}')).toEqual({ ok: true, kind: 'shred' });
    const listener = await db.pool.connect();
    const payloads: string[] = [];
    listener.on('notification', (n) => payloads.push(n.payload ?? ''));
    await listener.query('LISTEN keyring');
    const clear = vi.spyOn(DataKeyCache.prototype, 'clear');
    const s = await start({ KEYRING_POLL_INTERVAL_MS: '60000' });
    try {
      await q(`SELECT keyring.shred('43', 'request 2024-120')`);
      await waitFor(() => clear.mock.calls.length > 0, { what: 'the sidecar to clear its data key cache' });
      await waitFor(() => payloads.includes('{"kind":"shred"}'), { what: 'the shred notification' });
      expect(s.healthy).toBe(true);
    } finally {
      await listener.query('UNLISTEN keyring');
      listener.release();
    }
    expect(await codeOf(reveal(NID, '3'))).toBe('ERASED');
  });

  it('a write racing a shred is never sealed under the destroyed key: its batch is redone with a new key', async () => {
    await q(`INSERT INTO customers_staging (id, customer_id, national_id) VALUES (7, 46, '08089033333')`);
    await encryptAll();
    const [old] = await keysOf('46');
    const shredder = await db.pool.connect();
    const s = await start({ KEYRING_POLL_INTERVAL_MS: '60000' });
    try {
      await shredder.query('BEGIN');
      await shredder.query(`SELECT keyring.shred('46', 'request 2024-121')`);
      // Written after the shred's queue delete, before it commits: the sidecar reads subject
      // 46's key as still active, seals, and then waits for the shred's lock on the key row.
      await q(`INSERT INTO customers_staging (id, customer_id, national_id) VALUES (8, 46, '09099044444')`);
      const drained = s.drain();
      await waitFor(async () => (await q(`SELECT 1 FROM pg_stat_activity WHERE usename = $1 AND wait_event_type = 'Lock'`,
        [sidecarRole])).length > 0, { what: 'the batch to wait for the shred' });
      await shredder.query('COMMIT');
      await drained;
      await waitFor(async () => (await pendingCount(db.pool)) === 0, { what: 'an empty queue' });
    } finally {
      await shredder.query('ROLLBACK').catch(() => undefined);
      shredder.release();
    }
    const after = await keysOf('46');
    expect(after.find((k) => k.id === old!.id)).toMatchObject({ state: 'shredded' });
    const active = after.filter((k) => k.state === 'active');
    expect(active).toHaveLength(1);
    expect(await q(`SELECT keyring.data_key_id(national_id)::text AS dk FROM customers WHERE id = 8`)).toEqual([{ dk: active[0]!.id }]);
    expect(await q(`SELECT encryptions::int AS n FROM keyring.data_keys WHERE id = $1`, [old!.id])).toEqual([{ n: 1 }]);
    expect(await reveal(NID, '8')).toBe('09099044444');
    expect(await codeOf(reveal(NID, '7'))).toBe('ERASED');
  });

  it('needs a subject and records a request that matched nothing', async () => {
    expect((await pgError(q('SELECT keyring.shred(NULL)'))).code).toBe('22004');
    expect(await q(`SELECT * FROM keyring.shred('no-such-subject')`))
      .toEqual([{ data_keys_shredded: '0', index_terms_cleared: '0', queued_deleted: '0' }]);
    expect((await auditRows(db.pool, 'subject.shredded')).at(-1)!.detail).toMatchObject({ subject: 'no-such-subject', data_keys: 0 });
  });

  it('is for keyring_admin: the sidecar role may not call it', async () => {
    const c = new pg.Client({ connectionString: sidecarUrl });
    await c.connect();
    try {
      expect((await pgError(c.query(`SELECT keyring.shred('43')`))).code).toBe('42501');
    } finally {
      await c.end();
    }
    const dba = await connectAsDba(db.url);
    try {
      // A DBA who does not own the protected tables cannot clear their terms: refused, nothing done.
      await q(`INSERT INTO customers_staging (id, customer_id, national_id) VALUES (9, 47, '10109055555')`);
      await encryptAll();
      expect((await pgError(dba.query(`SELECT keyring.shred('47', 'request')`))).code).toBe('42501');
      expect((await keysOf('47')).every((k) => k.state === 'active')).toBe(true);
    } finally {
      await dba.end();
    }
  });
});

describe('the shredded state is terminal', () => {
  it('refuses, for every role, giving a shredded key material again, reviving it, or counting encryptions under it', async () => {
    const [k] = (await keysOf('42')).filter((x) => x.state === 'shredded');
    const attempts = [
      `UPDATE keyring.data_keys SET wrapped = '\\x0102' WHERE id = ${k!.id}`,
      `UPDATE keyring.data_keys SET state = 'active' WHERE id = ${k!.id}`,
      `UPDATE keyring.data_keys SET state = 'retired' WHERE id = ${k!.id}`,
      `UPDATE keyring.data_keys SET encryptions = encryptions + 1 WHERE id = ${k!.id}`,
    ];
    const sidecar = new pg.Client({ connectionString: sidecarUrl });
    await sidecar.connect();
    try {
      for (const sql of attempts) {
        expect((await pgError(q(sql))).code).toBe('55000');            // superuser, owner
        expect((await pgError(sidecar.query(sql))).code).toBe('55000'); // the role that may UPDATE data_keys
      }
    } finally {
      await sidecar.end();
    }
    // A row can never be shredded and hold key material (a CHECK: triggers can be disabled, constraints not).
    const e = await pgError(q(`INSERT INTO keyring.data_keys (column_id, subject, root_version, wrapped, state)
                               VALUES (1, 'x', 1, '\\x01', 'shredded')`));
    expect(e.code).toBe('23514');
    expect(await keysOf('42')).toContainEqual(expect.objectContaining({ id: k!.id, state: 'shredded', wrapped: null }));
  });
});

describe('keyring shred (CLI)', () => {
  it('requires --reason and --yes, then prints the counts', async () => {
    const env = { DATABASE_URL: db.url };
    await q(`INSERT INTO customers_staging (id, customer_id, national_id) VALUES (12, 48, '11119066666')`);
    await encryptAll();
    expect((await runCli(['shred', '48', '--reason', 'request 2024-122'], env)).code).toBe(2);
    expect((await runCli(['shred', '48', '--yes'], env)).code).toBe(2);
    const ok = await runCli(['shred', '48', '--reason', 'request 2024-122', '--yes'], env);
    expect(ok).toEqual({
      code: 0, stderr: '',
      stdout: 'shredded subject 48: 1 data keys destroyed, 1 blind-index terms cleared, 0 queued values deleted',
    });
    expect(await codeOf(reveal(NID, '12'))).toBe('ERASED');
  });
});
