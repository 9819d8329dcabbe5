/**
 * The staging view and its triggers as the application sees them (docs/write-path.md;
 * cases C04, C05, C12, C17, C18 for the parts SQL owns). Writes go through the
 * application role keyring_test_app, a member of keyring_writer only; the superuser pool
 * plays the sidecar where a ciphertext is needed.
 */
import { once } from 'node:events';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type pg from 'pg';
import { from as copyFrom } from 'pg-copy-streams';
import { createTestDb, type TestDb } from '../helpers/db.js';
import { connectAsApp } from '../helpers/roles.js';
import { fakeCiphertext, pgError } from '../helpers/sql.js';

let db: TestDb;
let app: pg.Client;

async function q<T extends Record<string, unknown> = Record<string, unknown>>(sql: string, params: unknown[] = []) {
  return (await db.pool.query<T>(sql, params)).rows;
}

/** Queue entries of one row, by column name. */
async function pendingOf(id: string | number): Promise<Record<string, { value: Buffer; subject: string | null; tenant: string | null }>> {
  const rows = await q<{ column_name: string; value: Buffer; subject: string | null; tenant: string | null }>(
    `SELECT c.column_name, p.value, p.subject, p.tenant FROM keyring.pending p
       JOIN keyring.columns c ON c.id = p.column_id
      WHERE c.table_name = 'customers' AND p.row_key = $1::text`, [String(id)]);
  return Object.fromEntries(rows.map((r) => [r.column_name, { value: r.value, subject: r.subject, tenant: r.tenant }]));
}

/** What the sidecar would leave behind: ciphertext and term in, queue entries out. */
async function fakeEncrypt(id: string): Promise<void> {
  await q(`UPDATE customers SET national_id = $2, national_id_bidx = '\\x0001aabbccdd', email = $3
            WHERE id = $1 AND national_id IS NOT NULL`, [id, fakeCiphertext(1, 'nid'), fakeCiphertext(1, 'mail')]);
  await q(`DELETE FROM keyring.pending WHERE row_key = $1`, [id]);
}

async function insertOne(values: Record<string, unknown>): Promise<string> {
  const cols = Object.keys(values);
  const { rows } = await app.query<{ id: string }>(
    `INSERT INTO customers_staging (${cols.join(', ')}) VALUES (${cols.map((_, i) => `$${i + 1}`).join(', ')}) RETURNING id`,
    Object.values(values));
  return rows[0]!.id;
}

beforeAll(async () => {
  db = await createTestDb();
  await q(`CREATE TABLE customers (
             id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
             name text NOT NULL,
             org text NOT NULL DEFAULT 'org-1',
             subject_ref text,
             national_id text,
             email varchar(64),
             born date,
             seen timestamptz,
             amount numeric,
             price numeric(12,4),
             big bigint,
             doc jsonb,
             raw bytea,
             note text,
             created_at timestamptz NOT NULL DEFAULT now())`);
  await q(`SELECT keyring.protect('customers', 'national_id', true, ARRAY['trim'],
                                  p_subject_column => 'subject_ref', p_tenant_column => 'org')`);
  await q(`SELECT keyring.protect('customers', 'email', true, ARRAY['trim', 'lower'])`);
  for (const col of ['born', 'seen', 'amount', 'price', 'big', 'doc', 'raw']) {
    await q(`SELECT keyring.protect('customers', $1)`, [col]);
  }
  app = await connectAsApp(db.url);
});

afterAll(async () => {
  await app?.end();
  await db.drop();
});

describe('INSERT through the staging view', () => {
  it('writes the base row at once, placeholders for values, and queues canonical bytes (C17)', async () => {
    // The writer's session settings must not leak into the canonical text.
    await app.query(`SET TimeZone = 'America/Sao_Paulo'; SET DateStyle = 'SQL, DMY'; SET extra_float_digits = 0`);
    try {
      const id = await insertOne({
        name: 'row-0001', subject_ref: 'subject-42', national_id: 'NID-0001', email: '  Alpha.One@Example.TEST ',
        born: '1975-05-11', seen: '2024-03-31 02:30:00', amount: '294733346389144765940638005275322203805.000100',
        price: '1.5', big: '9007199254740993', doc: '{"b": 1, "a": [1, 2.50]}', raw: Buffer.from([0, 1, 255]),
      });
      const [base] = await q(`SELECT * FROM customers WHERE id = $1`, [id]);
      for (const col of ['national_id', 'email', 'born', 'seen', 'amount', 'price', 'big', 'doc', 'raw']) {
        expect((base![col] as Buffer).toString('hex'), col).toBe('00');
      }
      expect(base!.national_id_bidx).toBeNull();
      expect(base!.email_bidx).toBeNull();
      expect(base!.org).toBe('org-1'); // the base default, through the view

      const p = await pendingOf(id);
      const text = (c: string) => p[c]!.value.toString('utf8');
      expect(text('national_id')).toBe('NID-0001');
      expect(text('email')).toBe('  Alpha.One@Example.TEST '); // normalisation is the index's business only
      expect(text('born')).toBe('1975-05-11');
      expect(text('seen')).toBe('2024-03-31 05:30:00+00'); // 02:30 in Sao Paulo (-03), as UTC
      expect(text('amount')).toBe('294733346389144765940638005275322203805.000100');
      expect(text('price')).toBe('1.5000'); // numeric(12,4) keeps its scale
      expect(text('big')).toBe('9007199254740993'); // above 2^53: exact
      expect(text('doc')).toBe('{"a": [1, 2.50], "b": 1}');
      expect(p.raw!.value).toEqual(Buffer.from([0, 1, 255])); // raw bytes, not hex text
      expect(p.national_id).toMatchObject({ subject: 'subject-42', tenant: 'org-1' });
      expect(p.email).toMatchObject({ subject: null, tenant: null });
    } finally {
      await app.query(`RESET TimeZone; RESET DateStyle; RESET extra_float_digits`);
    }
  });

  it('gives the same canonical bytes for the same instant in any session time zone', async () => {
    await app.query(`SET TimeZone = 'Pacific/Chatham'`);
    const a = await insertOne({ name: 'tz-a', seen: '2024-03-31 05:30:00+00', born: '2024-03-31' });
    await app.query(`SET TimeZone = 'UTC'`);
    const b = await insertOne({ name: 'tz-b', seen: '2024-03-31 05:30:00+00', born: '2024-03-31' });
    await app.query(`RESET TimeZone`);
    const [pa, pb] = [await pendingOf(a), await pendingOf(b)];
    expect(pa.seen!.value.toString()).toBe('2024-03-31 05:30:00+00');
    expect(pb.seen!.value).toEqual(pa.seen!.value);
    expect(pb.born!.value).toEqual(pa.born!.value);
  });

  it('keeps NULL, empty string and a space apart (C04)', async () => {
    const ids = [];
    for (const v of [null, '', ' ']) ids.push(await insertOne({ name: 'c04', national_id: v }));
    const base = await q<{ national_id: Buffer | null }>(`SELECT national_id FROM customers WHERE id = ANY ($1) ORDER BY id`, [ids]);
    expect(base.map((r) => r.national_id?.toString('hex') ?? null)).toEqual([null, '00', '00']);
    expect((await pendingOf(ids[0]!)).national_id).toBeUndefined(); // NULL queues nothing
    expect((await pendingOf(ids[1]!)).national_id!.value).toEqual(Buffer.alloc(0));
    expect((await pendingOf(ids[2]!)).national_id!.value).toEqual(Buffer.from(' '));
    const view = await app.query(`SELECT national_id FROM customers_staging WHERE id = ANY ($1) ORDER BY id`, [ids]);
    expect(view.rows.map((r) => r.national_id)).toEqual([null, '********', '********']);
  });

  it('treats a mask value as an ordinary value on INSERT', async () => {
    const id = await insertOne({ name: 'mask-insert', national_id: '********', big: '-9223372036854775808' });
    const p = await pendingOf(id);
    expect(p.national_id!.value.toString()).toBe('********');
    expect(p.big!.value.toString()).toBe('-9223372036854775808');
  });

  it('keeps the base column semantics: varchar(n) length, numeric(p,s) overflow', async () => {
    expect((await pgError(insertOne({ name: 'x', email: 'e'.repeat(65) }))).code).toBe('22001');
    expect((await pgError(insertOne({ name: 'x', price: '123456789' }))).code).toBe('22003');
  });
});

describe('reading the staging view', () => {
  it('never returns plaintext: NULL for NULL, a fixed mask per type otherwise', async () => {
    const id = await insertOne({
      name: 'masks', national_id: 'secret-1', email: 'secret@example.test', born: '2000-01-01', seen: 'now',
      amount: '1', price: '1', big: '1', doc: '{"secret": 1}', raw: Buffer.from('secret'),
    });
    const { rows } = await app.query(
      `SELECT national_id, email, born::text, seen::text, amount::text, price::text, big::text, doc::text, raw, note
         FROM customers_staging WHERE id = $1`, [id]);
    expect(rows[0]).toEqual({
      national_id: '********', email: '********', born: '-infinity', seen: '-infinity', amount: '-Infinity',
      price: '-Infinity', big: '-9223372036854775808', doc: '"********"', raw: Buffer.from('********'), note: null,
    });
    const all = await app.query(`SELECT * FROM customers_staging`);
    expect(JSON.stringify(all.rows)).not.toMatch(/secret|NID-0001|Alpha/);
  });
});

describe('UPDATE through the staging view', () => {
  it('to NULL clears ciphertext and blind index and dequeues (C04 step 4)', async () => {
    const queued = await insertOne({ name: 'null-queued', national_id: 'value-1' });
    const encrypted = await insertOne({ name: 'null-encrypted', national_id: 'value-2', email: 'b@x' });
    await fakeEncrypt(encrypted);
    const r = await app.query(`UPDATE customers_staging SET national_id = NULL WHERE id = ANY ($1)`, [[queued, encrypted]]);
    expect(r.rowCount).toBe(2);
    const base = await q(`SELECT national_id, national_id_bidx FROM customers WHERE id = ANY ($1)`, [[queued, encrypted]]);
    expect(base).toEqual([{ national_id: null, national_id_bidx: null }, { national_id: null, national_id_bidx: null }]);
    expect((await pendingOf(queued)).national_id).toBeUndefined();
    expect((await pendingOf(encrypted)).national_id).toBeUndefined();
  });

  it('of other columns leaves ciphertext and blind index byte-identical (C05 step 4)', async () => {
    const id = await insertOne({ name: 'c05-4', national_id: 'NID-c05', email: 'c05@example.test' });
    await fakeEncrypt(id);
    const digest = `SELECT md5(national_id) AS n, md5(national_id_bidx) AS b, md5(email) AS e FROM customers WHERE id = $1`;
    const before = await q(digest, [id]);
    // not mentioned, and mentioned as the mask: both mean "unchanged"
    await app.query(`UPDATE customers_staging SET note = 'changed', name = 'c05-4b' WHERE id = $1`, [id]);
    await app.query(`UPDATE customers_staging SET national_id = '********', email = '********' WHERE id = $1`, [id]);
    expect(await q(digest, [id])).toEqual(before);
    expect(await pendingOf(id)).toEqual({});
    expect(await q(`SELECT note, name FROM customers WHERE id = $1`, [id])).toEqual([{ note: 'changed', name: 'c05-4b' }]);
  });

  it('to a new value queues it and drops the stale blind-index term (C05 step 2)', async () => {
    const marker = 'marker-UPDATE-7f3a';
    const id = await insertOne({ name: 'c05-2', national_id: 'NID-old' });
    await fakeEncrypt(id);
    const r = await app.query(`UPDATE customers_staging SET national_id = $2 WHERE id = $1 RETURNING national_id`, [id, marker]);
    expect(r.rows).toEqual([{ national_id: '********' }]);
    const [base] = await q<{ national_id: Buffer; national_id_bidx: Buffer | null }>(
      `SELECT national_id, national_id_bidx FROM customers WHERE id = $1`, [id]);
    expect(base!.national_id.toString('hex')).toBe('00');
    expect(base!.national_id_bidx).toBeNull();
    expect((await pendingOf(id)).national_id!.value.toString()).toBe(marker);
    // The marker is only in the queue, which the sidecar empties: not in the table, not audited.
    const hex = Buffer.from(marker).toString('hex');
    expect(await q(`SELECT count(*)::int AS n FROM customers t WHERE t::text LIKE '%' || $1 || '%' OR t::text LIKE '%' || $2 || '%'`,
      [marker, hex])).toEqual([{ n: 0 }]);
    expect(await q(`SELECT count(*)::int AS n FROM keyring.audit_log a WHERE a::text LIKE '%' || $1 || '%'`, [marker]))
      .toEqual([{ n: 0 }]);
  });

  it('replaces a queued value: one entry per (column, row), the newest wins', async () => {
    const id = await insertOne({ name: 'requeue', national_id: 'first' });
    await q(`UPDATE keyring.pending SET attempts = 3, last_error = 'x' WHERE row_key = $1`, [id]);
    await app.query(`UPDATE customers_staging SET national_id = 'second' WHERE id = $1`, [id]);
    const rows = await q(`SELECT value, attempts, last_error FROM keyring.pending p JOIN keyring.columns c ON c.id = p.column_id
                           WHERE c.column_name = 'national_id' AND row_key = $1`, [id]);
    expect(rows).toEqual([{ value: Buffer.from('second'), attempts: 0, last_error: null }]);
  });

  it('refuses a primary key change', async () => {
    const id = await insertOne({ name: 'pk' });
    const e = await pgError(app.query(`UPDATE customers_staging SET id = id + 100000 WHERE id = $1`, [id]));
    expect(e.code).toBe('0A000');
    expect(e.message).toBe('keyring: the primary key of public.customers cannot be changed through customers_staging');
  });

  it('refuses a subject or tenant change that would strand a kept value, allows it with a new value', async () => {
    const id = await insertOne({ name: 'subject', subject_ref: 's-1', national_id: 'NID-s' });
    let e = await pgError(app.query(`UPDATE customers_staging SET subject_ref = 's-2' WHERE id = $1`, [id]));
    expect(e.code).toBe('0A000');
    expect(e.message).toBe(
      'keyring: cannot change the data subject or tenant of a row of public.customers while national_id holds a value');
    e = await pgError(app.query(`UPDATE customers_staging SET org = 'org-2' WHERE id = $1`, [id]));
    expect(e.code).toBe('0A000');
    await app.query(`UPDATE customers_staging SET subject_ref = 's-2', national_id = 'NID-s' WHERE id = $1`, [id]);
    expect((await pendingOf(id)).national_id).toMatchObject({ subject: 's-2', tenant: 'org-1' });
    // a row without a value in that column may move freely
    const empty = await insertOne({ name: 'subject-empty', subject_ref: 's-1' });
    await app.query(`UPDATE customers_staging SET subject_ref = 's-3' WHERE id = $1`, [empty]);
  });
});

describe('DELETE through the staging view', () => {
  it('removes the queue entries, then the row', async () => {
    const id = await insertOne({ name: 'delete-me', national_id: 'gone', email: 'gone@x' });
    const r = await app.query(`DELETE FROM customers_staging WHERE id = $1 RETURNING id, national_id`, [id]);
    expect(r.rowCount).toBe(1);
    expect(r.rows).toEqual([{ id, national_id: '********' }]);
    expect(await pendingOf(id)).toEqual({});
    expect(await q(`SELECT id FROM customers WHERE id = $1`, [id])).toEqual([]);
  });
});

describe('sizes (C12, C18)', () => {
  it('accepts a 5 MiB value', async () => {
    const big = 'x'.repeat(5 * 1024 * 1024 - 8) + '-5MiB-ok';
    const id = await insertOne({ name: '5mib', national_id: big });
    const [row] = await q<{ n: number; tail: string }>(
      `SELECT octet_length(value) AS n, convert_from(substring(value FROM octet_length(value) - 7), 'UTF8') AS tail
         FROM keyring.pending WHERE row_key = $1`, [id]);
    expect(row).toEqual({ n: 5 * 1024 * 1024, tail: '-5MiB-ok' });
    await app.query(`DELETE FROM customers_staging WHERE id = $1`, [id]);
  });

  it('refuses a value one byte over max_value_bytes with SQLSTATE 54000, never echoing it', async () => {
    await q(`UPDATE keyring.settings SET value = '65536' WHERE name = 'max_value_bytes'`);
    try {
      const count = async () => (await q<{ n: number }>(`SELECT count(*)::int AS n FROM customers`))[0]!.n;
      const rows = await count();
      const e = await pgError(insertOne({ name: 'too-big', national_id: 'q'.repeat(65537) }));
      expect(e.code).toBe('54000');
      expect(e.message).toBe('keyring: value for public.customers.national_id is 65537 bytes, over the maximum of 65536 bytes');
      expect(e.hint).toMatch(/max_value_bytes/);
      expect(`${e.message} ${e.detail ?? ''} ${e.hint ?? ''} ${e.where ?? ''}`).not.toMatch(/qqqq/);
      expect(await count()).toBe(rows); // nothing written, nothing queued

      // bytes, not characters: 16385 four-byte emoji are 65540 bytes
      const emoji = await pgError(insertOne({ name: 'too-big', email: '😀'.repeat(16) , national_id: '😀'.repeat(16385) }));
      expect(emoji.message).toMatch(/is 65540 bytes, over the maximum of 65536 bytes$/);

      // exactly at the limit is fine; the UPDATE path checks too; so does every typed column
      const id = await insertOne({ name: 'at-limit', national_id: 'q'.repeat(65536) });
      const upd = await pgError(app.query(`UPDATE customers_staging SET national_id = $2 WHERE id = $1`, [id, 'q'.repeat(65537)]));
      expect(upd.code).toBe('54000');
      const raw = await pgError(insertOne({ name: 'too-big', raw: Buffer.alloc(65537, 1) }));
      expect(raw.message).toBe('keyring: value for public.customers.raw is 65537 bytes, over the maximum of 65536 bytes');
      await app.query(`DELETE FROM customers_staging WHERE id = $1`, [id]);
    } finally {
      await q(`UPDATE keyring.settings SET value = '8388608' WHERE name = 'max_value_bytes'`);
    }
  });

  it('holds the default limit at 8 MiB', async () => {
    const e = await pgError(insertOne({ name: 'too-big', national_id: 'z'.repeat(8 * 1024 * 1024 + 1) }));
    expect(e.code).toBe('54000');
    expect(e.message).toBe('keyring: value for public.customers.national_id is 8388609 bytes, over the maximum of 8388608 bytes');
    const id = await insertOne({ name: '8mib', national_id: 'z'.repeat(8 * 1024 * 1024) });
    await app.query(`DELETE FROM customers_staging WHERE id = $1`, [id]);
  });

  it('keeps the limit within the range the triggers rely on', async () => {
    expect((await pgError(q(`UPDATE keyring.settings SET value = '100' WHERE name = 'max_value_bytes'`))).code).toBe('23514');
    expect((await pgError(q(`UPDATE keyring.settings SET value = '8 MiB' WHERE name = 'max_value_bytes'`))).code).toBe('23514');
  });
});

describe('NOTIFY (C12)', () => {
  it('sends a tiny fixed hint per statement, never a value', async () => {
    const listener = await db.pool.connect();
    const payloads: string[] = [];
    const onNotify = (n: pg.Notification) => { if (n.channel === 'keyring') payloads.push(n.payload ?? ''); };
    listener.on('notification', onNotify);
    await listener.query('LISTEN keyring');
    try {
      const values = ['n'.repeat(7999), 'm'.repeat(8000), 'k'.repeat(100_000), '漢'.repeat(3000), '😀'.repeat(2500)];
      for (const v of values) await insertOne({ name: 'notify', national_id: v });
      await app.query(`INSERT INTO customers_staging (name, email) VALUES ('notify', 'notify-3@x'), ('notify', 'notify-4@x')`);
      await app.query(`UPDATE customers_staging SET national_id = 'notify-update' WHERE name = 'notify'`);
      const deadline = Date.now() + 2000;
      while (payloads.length < values.length + 2 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
      expect(payloads.length).toBe(values.length + 2); // one per statement (each autocommitted)
      for (const p of payloads) {
        expect(p).toBe('{"kind":"pending"}');
        expect(Buffer.byteLength(p)).toBeLessThan(8000);
      }
    } finally {
      listener.off('notification', onNotify);
      await listener.query('UNLISTEN keyring');
      listener.release();
    }
  });
});

describe('COPY FROM STDIN into the staging view', () => {
  it('inserts every row through the trigger, with generated ids and queued values', async () => {
    const before = (await q<{ m: string | null }>(`SELECT max(id)::text AS m FROM customers`))[0]!.m;
    const stream = app.query(copyFrom(`COPY customers_staging (name, national_id, email, seen) FROM STDIN`));
    const lines: string[] = [];
    for (let i = 1; i <= 1000; i++) {
      const nid = i % 10 === 0 ? '\\N' : `NID-${String(i).padStart(4, '0')}`;
      lines.push(`copy-${i}\t${nid}\tuser${i}@example.test\t2024-03-31 02:30:00-03\n`);
    }
    stream.end(lines.join(''));
    await once(stream, 'finish');
    expect(stream.rowCount).toBe(1000);
    const [stats] = await q(`SELECT count(*)::int AS rows, count(DISTINCT id)::int AS ids, min(id) > $1::bigint AS fresh,
                                    count(national_id)::int AS nid
                               FROM customers WHERE name LIKE 'copy-%'`, [before ?? '0']);
    expect(stats).toEqual({ rows: 1000, ids: 1000, fresh: true, nid: 900 });
    const queued = await q(`SELECT c.column_name, count(*)::int AS n FROM keyring.pending p JOIN keyring.columns c ON c.id = p.column_id
                              JOIN customers t ON t.id::text = p.row_key WHERE t.name LIKE 'copy-%' GROUP BY 1 ORDER BY 1`);
    expect(queued).toEqual([{ column_name: 'email', n: 1000 }, { column_name: 'national_id', n: 900 }, { column_name: 'seen', n: 1000 }]);
    const [seen] = await q<{ v: Buffer }>(`SELECT p.value AS v FROM keyring.pending p JOIN keyring.columns c ON c.id = p.column_id
                                             JOIN customers t ON t.id::text = p.row_key WHERE t.name = 'copy-7' AND c.column_name = 'seen'`);
    expect(seen!.v.toString()).toBe('2024-03-31 05:30:00+00');
  });
});

describe('privileges of the application role (keyring_writer)', () => {
  it('cannot read the queue, the keys, the audit log, quarantine or sidecars', async () => {
    for (const t of ['pending', 'data_keys', 'audit_log', 'quarantine', 'sidecars', 'root_keys']) {
      const e = await pgError(app.query(`SELECT * FROM keyring.${t} LIMIT 1`));
      expect(e.code, t).toBe('42501');
    }
  });

  it('cannot call the DBA functions', async () => {
    for (const sql of [
      `SELECT keyring.protect('customers', 'note')`,
      `SELECT keyring.unprotect('customers', 'national_id', true)`,
      `SELECT keyring.register_key('encrypt', '00000000000000000000000000000000')`,
      `SELECT keyring.activate_key('encrypt', 1)`,
      `SELECT keyring.audit_append('forged')`,
      `SELECT * FROM keyring.column_status()`,
    ]) {
      const e = await pgError(app.query(sql));
      expect(e.code, sql).toBe('42501');
    }
  });

  it('cannot write the base table directly (C05 step 3), but can read it', async () => {
    const id = await insertOne({ name: 'direct', national_id: 'NID-direct' });
    for (const sql of [
      `UPDATE customers SET national_id = 'plain'::bytea WHERE id = $1`,
      `UPDATE customers SET national_id_bidx = '\\x00'::bytea WHERE id = $1`,
      `DELETE FROM customers WHERE id = $1`,
    ]) {
      expect((await pgError(app.query(sql, [id]))).code, sql).toBe('42501');
    }
    expect((await pgError(app.query(`INSERT INTO customers (name, national_id) VALUES ('x', 'plain')`))).code).toBe('42501');
    const { rows } = await app.query(`SELECT id, national_id FROM customers WHERE id = $1`, [id]);
    expect(rows).toEqual([{ id, national_id: Buffer.from([0]) }]);
  });

  it('is stopped by the guard trigger even when granted UPDATE on the base table', async () => {
    const id = await insertOne({ name: 'guard', national_id: 'NID-guard' });
    await q(`GRANT UPDATE ON customers TO keyring_test_app`);
    try {
      for (const col of ['national_id', 'national_id_bidx', 'email']) {
        const e = await pgError(app.query(`UPDATE customers SET ${col} = 'plaintext'::bytea WHERE id = $1`, [id]));
        expect(e.code, col).toBe('42501');
        expect(e.message).toBe('keyring: keyring_test_app may not write the protected columns of public.customers directly');
        expect(e.hint).toMatch(/public\.customers_staging/);
      }
      // other columns, and a protected column set to itself, pass
      await app.query(`UPDATE customers SET note = 'direct ok', national_id = national_id WHERE id = $1`, [id]);
    } finally {
      await q(`REVOKE UPDATE ON customers FROM keyring_test_app`);
    }
  });

  it('lets the sidecar role write ciphertext and terms with its own grants', async () => {
    const id = await insertOne({ name: 'sidecar', national_id: 'NID-sidecar' });
    const client = await db.pool.connect();
    try {
      await client.query('BEGIN');
      await client.query('SET LOCAL ROLE keyring_sidecar');
      const claimed = await client.query(
        `SELECT p.id FROM keyring.pending p JOIN keyring.columns c ON c.id = p.column_id
          WHERE c.column_name = 'national_id' AND p.row_key = $1 FOR UPDATE OF p SKIP LOCKED`, [id]);
      expect(claimed.rowCount).toBe(1);
      const upd = await client.query(
        `UPDATE customers SET national_id = $2, national_id_bidx = '\\x0001ff' WHERE id = $1 AND national_id = '\\x00'`,
        [id, fakeCiphertext(1)]);
      expect(upd.rowCount).toBe(1);
      await client.query(`DELETE FROM keyring.pending WHERE id = $1`, [claimed.rows[0].id]);
      const denied = await pgError(client.query(`UPDATE customers SET note = 'sidecar' WHERE id = $1`, [id]));
      expect(denied.code).toBe('42501'); // the sidecar may write protected columns only
      await client.query('ROLLBACK');
    } finally {
      client.release();
    }
  });
});
