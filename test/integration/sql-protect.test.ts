/**
 * keyring.protect() / unprotect() / status: the DBA's side of the write path
 * (docs/write-path.md, DESIGN.md "Write path" step 1).
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createTestDb, type TestDb } from '../helpers/db.js';
import { connectAsApp, connectAsDba } from '../helpers/roles.js';
import { fakeCiphertext, fingerprint, pgError } from '../helpers/sql.js';

let db: TestDb;
beforeAll(async () => { db = await createTestDb(); });
afterAll(async () => { await db.drop(); });

async function q<T extends Record<string, unknown> = Record<string, unknown>>(sql: string, params: unknown[] = []) {
  return (await db.pool.query<T>(sql, params)).rows;
}

async function columnType(table: string, column: string): Promise<string | undefined> {
  const rows = await q<{ t: string }>(
    `SELECT format_type(atttypid, atttypmod) AS t FROM pg_attribute
      WHERE attrelid = $1::regclass AND attname = $2 AND NOT attisdropped`, [table, column]);
  return rows[0]?.t;
}

describe('protect() refuses what it cannot protect, with a clear error and no change', () => {
  beforeAll(async () => {
    await q(`CREATE TABLE refuse_nopk (a text);
             CREATE TABLE refuse (id bigint PRIMARY KEY, name text, n integer, tags text[], raw bytea,
                                  email text, uniq text UNIQUE, done text)`);
    await q(`SELECT keyring.protect('refuse', 'done')`);
  });

  it('a table without a primary key', async () => {
    const e = await pgError(q(`SELECT keyring.protect('refuse_nopk', 'a')`));
    expect(e.code).toBe('55000');
    expect(e.message).toBe(
      "keyring: table public.refuse_nopk has no primary key; protect() binds each ciphertext to its row's primary key.");
    expect(e.hint).toBe('Add one, then call protect() again.');
  });

  it('an unknown table or column', async () => {
    expect((await pgError(q(`SELECT keyring.protect('no_such_table', 'a')`))).code).toBe('42P01');
    const e = await pgError(q(`SELECT keyring.protect('public.refuse', 'nope')`));
    expect(e.code).toBe('42703');
    expect(e.message).toBe('keyring: column nope of table public.refuse does not exist');
  });

  it('a primary-key column', async () => {
    const e = await pgError(q(`SELECT keyring.protect('refuse', 'id')`));
    expect(e.code).toBe('0A000');
    expect(e.message).toBe('keyring: public.refuse.id is part of the primary key and cannot be protected');
    expect(e.hint).toMatch(/row key/);
  });

  it('an unsupported type', async () => {
    for (const [col, type] of [['n', 'integer'], ['tags', 'text[]']] as const) {
      const e = await pgError(q(`SELECT keyring.protect('refuse', $1)`, [col]));
      expect(e.code).toBe('0A000');
      expect(e.message).toBe(`keyring: public.refuse.${col} is ${type}, which protect() does not support`);
      expect(e.hint).toMatch(/^Supported: text, varchar\(n\), date, timestamp, timestamptz, numeric\(p,s\), bigint, jsonb, bytea/);
    }
  });

  it('a column already protected', async () => {
    const e = await pgError(q(`SELECT keyring.protect('refuse', 'done')`));
    expect(e.code).toBe('42710');
    expect(e.message).toBe('keyring: public.refuse.done is already protected');
  });

  it('bad normalisation names and index lengths', async () => {
    const cases: Array<[string, unknown[], string]> = [
      [`SELECT keyring.protect('refuse', 'email', true, ARRAY['upper'])`, [], "keyring: unknown normalisation 'upper'"],
      [`SELECT keyring.protect('refuse', 'email', true, ARRAY[]::text[])`, [], 'keyring: unknown normalisation list (empty)'],
      [`SELECT keyring.protect('refuse', 'email', true, ARRAY['none', 'trim'])`, [],
        'keyring: normalisation none cannot be combined with others'],
      [`SELECT keyring.protect('refuse', 'email', true, ARRAY['trim', 'trim'])`, [], 'keyring: a normalisation step is listed twice'],
      [`SELECT keyring.protect('refuse', 'raw', true, ARRAY['lower'])`, [],
        'keyring: public.refuse.raw is bytea: its only normalisation is none'],
      [`SELECT keyring.protect('refuse', 'email', true, p_index_bytes => 3)`, [], 'keyring: index bytes must be between 4 and 32, not 3'],
      [`SELECT keyring.protect('refuse', 'email', true, p_index_bytes => 33)`, [], 'keyring: index bytes must be between 4 and 32, not 33'],
    ];
    for (const [sql, params, message] of cases) {
      const e = await pgError(q(sql, params));
      expect(e.code, sql).toBe('22023');
      expect(e.message, sql).toBe(message);
      expect(e.hint, sql).toBeTruthy();
    }
  });

  it('subject and tenant columns that are missing or protected', async () => {
    let e = await pgError(q(`SELECT keyring.protect('refuse', 'email', p_subject_column => 'who')`));
    expect(e.code).toBe('42703');
    e = await pgError(q(`SELECT keyring.protect('refuse', 'email', p_tenant_column => 'done')`));
    expect(e.code).toBe('22023');
    expect(e.message).toBe('keyring: subject/tenant column public.refuse.done is protected');
    e = await pgError(q(`SELECT keyring.protect('refuse', 'email', p_subject_column => 'email')`));
    expect(e.code).toBe('22023');
  });

  it('a column an index or constraint depends on (a unique index would collide on placeholders)', async () => {
    const e = await pgError(q(`SELECT keyring.protect('refuse', 'uniq')`));
    expect(e.code).toBe('55000');
    expect(e.message).toMatch(/^keyring: public\.refuse\.uniq is used by (index refuse_uniq_key|constraint refuse_uniq_key)/);
  });

  it('leaves nothing behind after a refusal', async () => {
    expect(await columnType('refuse', 'email')).toBe('text');
    expect(await columnType('refuse', 'email_bidx')).toBeUndefined();
    expect(await columnType('refuse', 'n')).toBe('integer');
    const rows = await q(`SELECT column_name FROM keyring.columns WHERE table_name = 'refuse'`);
    expect(rows.map((r) => r.column_name)).toEqual(['done']);
  });
});

describe('protect() of a populated column', () => {
  beforeAll(async () => {
    await q(`CREATE TABLE people (
               id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
               name text NOT NULL,
               national_id text DEFAULT 'unknown',
               seen timestamptz,
               amount numeric(12,4),
               subject_ref text)`);
    await q(`INSERT INTO people (name, national_id, seen, amount, subject_ref) VALUES
               ('row-0001', 'NID-0001', '2024-03-31 02:30:00-03', 1.5, 's-1'),
               ('row-0002', '', NULL, NULL, 's-2'),
               ('row-0003', NULL, NULL, NULL, 's-3'),
               ('row-0004', ' ', NULL, 0, NULL)`);
  });

  // A populated column is adopted online (adopt.test.ts): protect() sets the plaintext
  // aside and a backfill job queues it range by range. These tests run that job's range
  // function by hand (no sidecar here) and check what the queue receives.
  it('adopts every non-null value: the backfill queues it in canonical form and leaves placeholders', async () => {
    const client = await db.pool.connect();
    try {
      // protect() queues under UTC / ISO whatever the session says
      await client.query(`SET TimeZone = 'America/Sao_Paulo'; SET DateStyle = 'SQL, DMY'`);
      const { rows } = await client.query<{ id: number }>(
        `SELECT keyring.protect('people', 'national_id', true, ARRAY['trim'], p_subject_column => 'subject_ref') AS id`);
      const id = rows[0]!.id;
      const seenId = (await client.query<{ id: number }>(`SELECT keyring.protect('people', 'seen') AS id`)).rows[0]!.id;
      const amountId = (await client.query<{ id: number }>(`SELECT keyring.protect('people', 'amount') AS id`)).rows[0]!.id;
      expect(await q(`SELECT count(*)::int AS n FROM keyring.pending`)).toEqual([{ n: 0 }]); // nothing queued under the lock
      for (const c of [id, seenId, amountId]) {
        // the range function runs with the canonical settings whatever the session says
        await client.query(`SELECT * FROM keyring.backfill_range($1, NULL, NULL)`, [c]);
      }

      const pending = await q<{ column_id: number; row_key: string; value: Buffer; subject: string | null }>(
        `SELECT column_id, row_key, value, subject FROM keyring.pending ORDER BY column_id, row_key`);
      expect(pending.map((p) => [p.column_id, p.row_key, p.value.toString('utf8'), p.subject])).toEqual([
        [id, '1', 'NID-0001', 's-1'],
        [id, '2', '', 's-2'],
        [id, '4', ' ', null],
        [seenId, '1', '2024-03-31 05:30:00+00', null], // 02:30 at -03, in UTC
        [amountId, '1', '1.5000', null], // numeric(12,4): the column's scale
        [amountId, '4', '0.0000', null],
      ]);

      const base = await q<{ id: string; national_id: Buffer | null; national_id_bidx: Buffer | null }>(
        `SELECT id, national_id, national_id_bidx FROM people ORDER BY id`);
      expect(base.map((r) => r.national_id?.toString('hex') ?? null)).toEqual(['00', '00', null, '00']);
      expect(base.every((r) => r.national_id_bidx === null)).toBe(true);
    } finally {
      client.release();
    }
  });

  it('records the column with its plaintext type, primary key and names', async () => {
    const [col] = await q(`SELECT data_type, pk_columns, pk_types, staging_view, trigger_prefix, bidx_column,
                                  normalize, index_bytes, subject_column, column_default, classification
                             FROM keyring.columns WHERE table_name = 'people' AND column_name = 'national_id'`);
    expect(col).toEqual({
      data_type: 'text', pk_columns: '{id}', pk_types: ['bigint'], staging_view: 'people_staging',
      trigger_prefix: 'tg_people', bidx_column: 'national_id_bidx', normalize: ['trim'], index_bytes: 16,
      subject_column: 'subject_ref', column_default: "'unknown'::text", classification: 'L3 Confidential',
    });
    expect(await columnType('people', 'national_id')).toBe('bytea');
    expect(await columnType('people', 'national_id_bidx')).toBe('bytea');
    expect(await columnType('people_staging', 'national_id')).toBe('text');
    expect(await columnType('people_staging', 'amount')).toBe('numeric');
    expect(await columnType('people_staging', 'national_id_bidx')).toBeUndefined();
    const idx = await q(`SELECT indexdef FROM pg_indexes WHERE tablename = 'people' AND indexdef LIKE '%national_id_bidx%'`);
    expect(idx).toHaveLength(1);
    expect(idx[0]!.indexdef).not.toMatch(/UNIQUE/);
  });

  it('moves the column default onto the staging view', async () => {
    const rows = await q<{ d: string | null; v: string | null }>(
      `SELECT (SELECT pg_get_expr(adbin, adrelid) FROM pg_attrdef d JOIN pg_attribute a ON a.attrelid = d.adrelid AND a.attnum = d.adnum
                WHERE d.adrelid = 'people'::regclass AND a.attname = 'national_id') AS d,
              (SELECT pg_get_expr(adbin, adrelid) FROM pg_attrdef d JOIN pg_attribute a ON a.attrelid = d.adrelid AND a.attnum = d.adnum
                WHERE d.adrelid = 'people_staging'::regclass AND a.attname = 'national_id') AS v`);
    expect(rows[0]).toEqual({ d: null, v: "'unknown'::text" });
    await q(`INSERT INTO people_staging (name) VALUES ('row-0005')`);
    const [p] = await q<{ value: Buffer }>(
      `SELECT value FROM keyring.pending p JOIN people t ON p.row_key = t.id::text
        WHERE t.name = 'row-0005' AND p.column_id = (SELECT id FROM keyring.columns WHERE column_name = 'national_id' AND table_name = 'people')`);
    expect(p!.value.toString()).toBe('unknown');
  });

  it('audits the protection without any value', async () => {
    const rows = await q<{ detail: Record<string, unknown> }>(
      `SELECT detail FROM keyring.audit_log WHERE action = 'column.protected' AND detail->>'table' = 'public.people' ORDER BY id`);
    // queued 0: adopted, the values are queued by the backfill job each detail names
    expect(rows.map((r) => [r.detail.column, r.detail.queued, typeof r.detail.adoption_job])).toEqual(
      [['national_id', 0, 'number'], ['seen', 0, 'number'], ['amount', 0, 'number']]);
    expect(JSON.stringify(rows)).not.toMatch(/NID-0001/);
    expect(await q(`SELECT * FROM keyring.verify_audit_chain()`)).toEqual([]);
  });

  it('keeps existing values over max_value_bytes in plaintext and quarantines them, never the value', async () => {
    await q(`CREATE TABLE big_values (id int PRIMARY KEY, v text)`);
    await q(`INSERT INTO big_values VALUES (1, repeat('x', 5000)), (2, repeat('y', 6000)), (3, 'ok')`);
    await q(`UPDATE keyring.settings SET value = '4096' WHERE name = 'max_value_bytes'`);
    try {
      const id = (await q<{ id: number }>(`SELECT keyring.protect('big_values', 'v') AS id`))[0]!.id;
      expect(await q(`SELECT * FROM keyring.backfill_range($1, NULL, NULL)`, [id])).toEqual([{ moved: '1', skipped: '0', oversized: '2' }]);
      expect(await q(`SELECT row_key, reason, detail FROM keyring.quarantine WHERE column_id = $1 ORDER BY row_key`, [id])).toEqual([
        { row_key: '1', reason: 'oversized', detail: expect.stringMatching(/over max_value_bytes \(4096\) and stays in v_keyring_plain/) },
        { row_key: '2', reason: 'oversized', detail: expect.stringMatching(/over max_value_bytes/) },
      ]);
      expect(await q(`SELECT id, length(v_keyring_plain) AS n FROM big_values WHERE v_keyring_plain IS NOT NULL ORDER BY id`))
        .toEqual([{ id: 1, n: 5000 }, { id: 2, n: 6000 }]);
      expect(JSON.stringify(await q(`SELECT * FROM keyring.quarantine`))).not.toMatch(/xxxx|yyyy/);
      expect(await columnType('big_values', 'v')).toBe('bytea');
    } finally {
      await q(`UPDATE keyring.settings SET value = '8388608' WHERE name = 'max_value_bytes'`);
    }
  });
});

describe('a second protected column regenerates the view and functions for the whole table', () => {
  beforeAll(async () => {
    await q(`CREATE TABLE accounts (id bigserial PRIMARY KEY, name text, iban text, email varchar(5))`);
    await q(`SELECT keyring.protect('accounts', 'iban')`);
    // a grant made on the view by hand must survive regeneration
    await q(`GRANT SELECT ON accounts_staging TO keyring_auditor`);
    await q(`SELECT keyring.protect('accounts', 'email', true, ARRAY['trim', 'lower'])`);
  });

  it('shows both columns masked and queues both', async () => {
    const ins = await q<Record<string, unknown>>(
      `INSERT INTO accounts_staging (name, iban, email) VALUES ('row-0001', 'DE00 0000', 'a@x') RETURNING *`);
    expect(ins).toEqual([{ id: '1', name: 'row-0001', iban: null, email: null }]);
    expect(await q(`SELECT * FROM accounts_staging`)).toEqual([{ id: '1', name: 'row-0001', iban: '********', email: '*****' }]);
    const pending = await q<{ column_name: string; value: Buffer }>(
      `SELECT c.column_name, p.value FROM keyring.pending p JOIN keyring.columns c ON c.id = p.column_id
        WHERE c.table_name = 'accounts' ORDER BY c.id`);
    expect(pending.map((p) => [p.column_name, p.value.toString()])).toEqual([['iban', 'DE00 0000'], ['email', 'a@x']]);
  });

  it('keeps one view, one set of trigger functions, and grants made on the view', async () => {
    const views = await q(`SELECT DISTINCT staging_view, trigger_prefix FROM keyring.columns WHERE table_name = 'accounts'`);
    expect(views).toEqual([{ staging_view: 'accounts_staging', trigger_prefix: 'tg_accounts' }]);
    const fns = await q<{ proname: string; prosecdef: boolean }>(
      `SELECT proname, prosecdef FROM pg_proc WHERE pronamespace = 'keyring'::regnamespace AND proname LIKE 'tg_accounts%' ORDER BY 1`);
    expect(fns).toEqual([
      { proname: 'tg_accounts__count', prosecdef: true }, // status counters (the value_counts migration)
      { proname: 'tg_accounts__delete', prosecdef: true },
      { proname: 'tg_accounts__insert', prosecdef: true },
      { proname: 'tg_accounts__update', prosecdef: true },
    ]);
    const [acl] = await q<{ a: boolean; w: boolean }>(
      `SELECT has_table_privilege('keyring_auditor', 'accounts_staging', 'SELECT') AS a,
              has_table_privilege('keyring_writer', 'accounts_staging', 'INSERT') AS w`);
    expect(acl).toEqual({ a: true, w: true });
  });

  it('names functions after schema and table, apart even when the names collide', async () => {
    await q(`CREATE SCHEMA sales;
             CREATE TABLE sales.orders (id int PRIMARY KEY, card text);
             CREATE TABLE public.sales_orders (id int PRIMARY KEY, card text)`);
    await q(`SELECT keyring.protect('sales.orders', 'card')`);
    await q(`SELECT keyring.protect('public.sales_orders', 'card')`);
    const rows = await q<{ table_schema: string; trigger_prefix: string; staging_view: string }>(
      `SELECT table_schema, trigger_prefix, staging_view FROM keyring.columns WHERE table_name IN ('orders', 'sales_orders') ORDER BY id`);
    expect(rows[0]).toEqual({ table_schema: 'sales', trigger_prefix: 'tg_sales_orders', staging_view: 'orders_staging' });
    expect(rows[1]!.trigger_prefix).toMatch(/^tg_sales_orders_[0-9a-f]{8}$/);
    await q(`INSERT INTO sales.orders_staging VALUES (1, 'card-1'); INSERT INTO public.sales_orders_staging VALUES (1, 'card-2')`);
    expect(await q(`SELECT has_schema_privilege('keyring_sidecar', 'sales', 'USAGE') AS s,
                           has_schema_privilege('keyring_writer', 'sales', 'USAGE') AS w`)).toEqual([{ s: true, w: true }]);
    expect(await q(`SELECT count(*)::int AS n FROM keyring.pending WHERE row_key = '1' AND column_id IN
                      (SELECT id FROM keyring.columns WHERE table_name IN ('orders', 'sales_orders'))`)).toEqual([{ n: 2 }]);
  });

  it('keeps generated names within 63 bytes', async () => {
    const long = 'a'.repeat(60);
    await q(`CREATE TABLE ${long} (id int PRIMARY KEY, v text)`);
    await q(`SELECT keyring.protect($1, 'v', true)`, [long]);
    const [row] = await q<{ staging_view: string; trigger_prefix: string }>(
      `SELECT staging_view, trigger_prefix FROM keyring.columns WHERE table_name = $1`, [long]);
    expect(Buffer.byteLength(row!.staging_view)).toBeLessThanOrEqual(63);
    expect(row!.staging_view).toMatch(/_staging$/);
    expect(Buffer.byteLength(`${row!.trigger_prefix}__insert`)).toBeLessThanOrEqual(63);
    await q(`INSERT INTO "${row!.staging_view}" VALUES (1, 'x')`);
  });
});

describe('unprotect()', () => {
  beforeAll(async () => {
    await q(`CREATE TABLE leaving (id int PRIMARY KEY, a text DEFAULT 'a-default', b date NOT NULL, c text)`);
    await q(`SELECT keyring.protect('leaving', 'a', true)`);
    await q(`SELECT keyring.protect('leaving', 'b')`);
    await q(`SELECT keyring.protect('leaving', 'c')`);
    await q(`INSERT INTO leaving_staging (id, a, b, c) VALUES (1, 'x', '2024-01-01', NULL)`);
  });

  it('is refused while the column holds queued or encrypted values', async () => {
    const e = await pgError(q(`SELECT keyring.unprotect('leaving', 'a')`));
    expect(e.code).toBe('55000');
    expect(e.message).toBe('keyring: public.leaving.a still holds 1 encrypted or queued values; unprotect() would lose them');
    expect(e.hint).toMatch(/p_force => true/);
    expect(await columnType('leaving', 'a')).toBe('bytea');
  });

  it('refuses a column that is not protected', async () => {
    const e = await pgError(q(`SELECT keyring.unprotect('leaving', 'id')`));
    expect(e.code).toBe('42704');
  });

  it('gives an empty column back in its plaintext type, with its default', async () => {
    await q(`SELECT keyring.unprotect('public.leaving', 'c')`);
    expect(await columnType('leaving', 'c')).toBe('text');
    expect(await columnType('leaving_staging', 'c')).toBe('text');
    expect(await q(`SELECT c FROM leaving_staging`)).toEqual([{ c: null }]);
    // the other columns keep working through the regenerated view
    await q(`UPDATE leaving_staging SET c = 'plain now' WHERE id = 1`);
    expect(await q(`SELECT c FROM leaving`)).toEqual([{ c: 'plain now' }]);
  });

  it('with force discards the values, the queue entries and the blind index', async () => {
    await q(`SELECT keyring.unprotect('leaving', 'a', p_force => true)`);
    expect(await columnType('leaving', 'a')).toBe('text');
    expect(await columnType('leaving', 'a_bidx')).toBeUndefined();
    expect(await q(`SELECT a FROM leaving`)).toEqual([{ a: null }]);
    expect(await q(`SELECT pg_get_expr(adbin, adrelid) AS d FROM pg_attrdef WHERE adrelid = 'leaving'::regclass`))
      .toEqual([{ d: "'a-default'::text" }]);
    const [audit] = await q<{ detail: Record<string, unknown> }>(
      `SELECT detail FROM keyring.audit_log WHERE action = 'column.unprotected' AND detail->>'column' = 'a'`);
    expect(audit!.detail).toMatchObject({ forced: true, values_discarded: 1, queued_discarded: 1 });
  });

  it('drops the view and trigger functions with the last protected column', async () => {
    await q(`SELECT keyring.unprotect('leaving', 'b', true)`);
    expect(await columnType('leaving', 'b')).toBe('date');
    expect(await q(`SELECT to_regclass('public.leaving_staging') AS v`)).toEqual([{ v: null }]);
    expect(await q(`SELECT proname FROM pg_proc WHERE proname LIKE 'tg_leaving%'`)).toEqual([]);
    expect(await q(`SELECT tgname FROM pg_trigger WHERE tgrelid = 'leaving'::regclass`)).toEqual([]);
    expect(await q(`SELECT count(*)::int AS n FROM keyring.pending p WHERE NOT EXISTS
                      (SELECT 1 FROM keyring.columns c WHERE c.id = p.column_id)`)).toEqual([{ n: 0 }]);
  });
});

describe('keyring.status', () => {
  it('counts values per key version, the queue backlog and quarantine per column', async () => {
    await q(`CREATE TABLE st (id int PRIMARY KEY, v text)`);
    const [{ id: col }] = (await q<{ id: number }>(`SELECT keyring.protect('st', 'v') AS id`)) as [{ id: number }];
    await q(`INSERT INTO st_staging SELECT g, 'v-' || g FROM generate_series(1, 5) g`);
    const v1 = (await q<{ v: number }>(`SELECT keyring.register_key('encrypt', $1) AS v`, [fingerprint('status-v1')]))[0]!.v;
    const [{ id: dk }] = (await q<{ id: string }>(
      `INSERT INTO keyring.data_keys (column_id, root_version, wrapped) VALUES ($1, $2, '\\x01') RETURNING id`,
      [col, v1])) as [{ id: string }];
    // two values "encrypted" (as the sidecar would: ciphertext in, queue entry out)
    await q(`UPDATE st SET v = $1 WHERE id IN (1, 2)`, [fakeCiphertext(Number(dk))]);
    await q(`DELETE FROM keyring.pending WHERE column_id = $1 AND row_key IN ('1', '2')`, [col]);
    await q(`INSERT INTO keyring.quarantine (column_id, row_key, reason) VALUES ($1, '3', 'test')`, [col]);

    const rows = await q(`SELECT key_version, data_key_id, data_keys, "values", pending, quarantined,
                                 oldest_pending_age > interval '0' AS aged
                            FROM keyring.status WHERE column_id = $1 ORDER BY key_version NULLS FIRST`, [col]);
    // the three queued values hold the placeholder: pending, not counted as values
    expect(rows).toEqual([
      { key_version: v1, data_key_id: dk, data_keys: '1', values: '2', pending: '3', quarantined: '1', aged: true },
    ]);
  });

  it('lists a protected column that holds no value yet', async () => {
    await q(`CREATE TABLE st_empty (id int PRIMARY KEY, v text)`);
    await q(`SELECT keyring.protect('st_empty', 'v')`);
    expect(await q(`SELECT key_version, "values", pending FROM keyring.status WHERE table_name = 'public.st_empty'`))
      .toEqual([{ key_version: null, values: '0', pending: '0' }]);
  });
});

describe('without a superuser: a DBA in keyring_admin, the application, the auditor', () => {
  it('protects, writes through the view, reads status, unprotects', async () => {
    const dba = await connectAsDba(db.url); // creates the cluster-wide role if missing
    await q(`GRANT CREATE ON SCHEMA public TO keyring_test_dba`);
    const app = await connectAsApp(db.url);
    try {
      expect((await dba.query(`SELECT rolsuper FROM pg_roles WHERE rolname = current_user`)).rows).toEqual([{ rolsuper: false }]);
      await dba.query(`CREATE TABLE dba_owned (id serial PRIMARY KEY, name text, secret text)`);
      await dba.query(`INSERT INTO dba_owned (name, secret) VALUES ('before', 'old-secret')`);
      const col = (await dba.query(`SELECT keyring.protect('dba_owned', 'secret', true) AS id`)).rows[0].id;
      // The row already there is adopted: its backfill range (the sidecar's work) moves it to the queue.
      await q(`SELECT keyring.backfill_range($1, NULL, NULL)`, [col]);

      const ins = await app.query(`INSERT INTO dba_owned_staging (name, secret) VALUES ('row-0001', 'new-secret') RETURNING id, secret`);
      expect(ins.rows).toEqual([{ id: 2, secret: null }]); // serial default through the view, as the writer
      await app.query(`UPDATE dba_owned_staging SET secret = 'newer' WHERE id = 2`);
      expect(await q(`SELECT row_key, convert_from(value, 'UTF8') AS v FROM keyring.pending WHERE column_id = $1 ORDER BY row_key`, [col]))
        .toEqual([{ row_key: '1', v: 'old-secret' }, { row_key: '2', v: 'newer' }]);
      expect((await pgError(app.query(`UPDATE dba_owned SET secret = 'x'::bytea`))).code).toBe('42501');

      // The adoption's last step (the sidecar's, once no plaintext is left) drops the plaintext column.
      await q(`SELECT keyring.adopt_finish((SELECT id FROM keyring.jobs WHERE kind = 'backfill' AND column_id = $1))`, [col]);
      expect(await columnType('dba_owned', 'secret_keyring_plain')).toBeUndefined();
      const auditor = await db.pool.connect();
      try {
        await auditor.query('BEGIN; SET LOCAL ROLE keyring_auditor');
        const status = await auditor.query(`SELECT "values", pending FROM keyring.status WHERE column_id = $1`, [col]);
        expect(status.rows).toEqual([{ values: '0', pending: '2' }]);
        expect((await auditor.query(`SELECT count(*)::int AS n FROM keyring.audit_log WHERE column_id = $1`, [col])).rows)
          .toEqual([{ n: 3 }]); // column.protected, backfill.started, column.adopted
        expect((await pgError(auditor.query(`SELECT * FROM keyring.pending`))).code).toBe('42501');
      } finally {
        await auditor.query('ROLLBACK');
        auditor.release();
      }

      await dba.query(`SELECT keyring.unprotect('dba_owned', 'secret', true)`);
      expect(await columnType('dba_owned', 'secret')).toBe('text');
    } finally {
      await app.end();
      await dba.end();
    }
  });
});
