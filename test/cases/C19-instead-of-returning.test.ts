/**
 * C19 — INSERT through an INSTEAD OF trigger: RETURNING and affected-row count.
 *
 * As the application role, through node-postgres: rowCount is exact for INSERT, UPDATE
 * and DELETE on the staging view; RETURNING gives the real generated ids (equal to the
 * base table's) and never a plaintext; a rejected row raises an error, never "0 rows".
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type pg from 'pg';
import { createTestDb, type TestDb } from '../helpers/db.js';
import { connectAsApp } from '../helpers/roles.js';
import { pgError } from '../helpers/sql.js';

let db: TestDb;
let app: pg.Client;

beforeAll(async () => {
  db = await createTestDb();
  await db.pool.query(`
    CREATE TABLE c19_users (
      id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
      handle text NOT NULL,
      national_id text,
      email text,
      created_at timestamptz NOT NULL DEFAULT now())`);
  await db.pool.query(`SELECT keyring.protect('c19_users', 'national_id', true)`);
  await db.pool.query(`SELECT keyring.protect('c19_users', 'email')`);
  // A small limit keeps the over-limit row cheap to send.
  await db.pool.query(`UPDATE keyring.settings SET value = '4096' WHERE name = 'max_value_bytes'`);
  app = await connectAsApp(db.url);
});

afterAll(async () => {
  await app?.end();
  await db.drop();
});

async function baseIds(handles: string[]): Promise<string[]> {
  const { rows } = await db.pool.query<{ id: string }>(
    `SELECT id FROM c19_users WHERE handle = ANY ($1) ORDER BY id`, [handles]);
  return rows.map((r) => r.id);
}

describe('C19: INSERT ... RETURNING through the staging view', () => {
  it('one row: rowCount 1, the real generated id, protected columns NULL', async () => {
    const r = await app.query(
      `INSERT INTO c19_users_staging (handle, national_id, email) VALUES ($1, $2, $3) RETURNING *`,
      ['row-0001', 'NID-0001', 'alpha@example.test']);
    expect(r.rowCount).toBe(1);
    expect(r.rows).toHaveLength(1);
    const row = r.rows[0];
    expect(row.id).not.toBeNull();
    expect([row.id]).toEqual(await baseIds(['row-0001']));
    expect(row.national_id).toBeNull();
    expect(row.email).toBeNull();
    expect(row.created_at).toBeInstanceOf(Date); // the base default, evaluated for real
    expect(JSON.stringify(r.rows)).not.toMatch(/NID-0001|alpha@/);
  });

  it('three rows: rowCount 3, one distinct id per row, equal to the base ids', async () => {
    const r = await app.query(
      `INSERT INTO c19_users_staging (handle, national_id, email)
       VALUES ('row-0002', 'NID-0002', NULL), ('row-0003', NULL, 'c@example.test'), ('row-0004', '', ' ')
       RETURNING id, handle, national_id, email`);
    expect(r.rowCount).toBe(3);
    expect(r.rows.map((x) => x.handle)).toEqual(['row-0002', 'row-0003', 'row-0004']);
    expect(r.rows.every((x) => x.id !== null && x.national_id === null && x.email === null)).toBe(true);
    expect(r.rows.map((x) => x.id)).toEqual(await baseIds(['row-0002', 'row-0003', 'row-0004']));
    expect(new Set(r.rows.map((x) => x.id)).size).toBe(3);
  });

  it('INSERT ... SELECT reports every row too', async () => {
    const r = await app.query(
      `INSERT INTO c19_users_staging (handle, national_id) SELECT 'bulk-' || g, 'NID-bulk-' || g FROM generate_series(1, 25) g`);
    expect(r.rowCount).toBe(25);
  });
});

describe('C19: UPDATE and DELETE ... RETURNING through the staging view', () => {
  it('UPDATE reports the rows it changed and returns masks, never values', async () => {
    const r = await app.query(
      `UPDATE c19_users_staging SET national_id = 'NID-new-' || id, handle = handle || '-u'
        WHERE handle IN ('row-0002', 'row-0003', 'row-0004') RETURNING id, handle, national_id, email`);
    expect(r.rowCount).toBe(3);
    expect(r.rows.map((x) => x.handle).sort()).toEqual(['row-0002-u', 'row-0003-u', 'row-0004-u']);
    expect(r.rows.every((x) => x.national_id === '********')).toBe(true);
    // email: NULL stays NULL, a value reads as the mask
    expect(r.rows.map((x) => x.email).sort()).toEqual(['********', '********', null]);
    expect(JSON.stringify(r.rows)).not.toMatch(/NID-new/);
  });

  it('UPDATE matching nothing reports 0', async () => {
    const r = await app.query(`UPDATE c19_users_staging SET handle = 'x' WHERE handle = 'no-such-row' RETURNING id`);
    expect(r.rowCount).toBe(0);
    expect(r.rows).toEqual([]);
  });

  it('DELETE reports the rows it removed', async () => {
    const ids = await baseIds(['row-0002-u', 'row-0003-u']);
    const r = await app.query(`DELETE FROM c19_users_staging WHERE id = ANY ($1) RETURNING id, national_id`, [ids]);
    expect(r.rowCount).toBe(2);
    expect(r.rows.map((x) => x.id).sort()).toEqual([...ids].sort());
    expect(r.rows.every((x) => x.national_id === '********')).toBe(true);
    expect(await baseIds(['row-0002-u', 'row-0003-u'])).toEqual([]);
    const d = await app.query(`DELETE FROM c19_users_staging WHERE id = -1`);
    expect(d.rowCount).toBe(0);
  });
});

describe('C19: a row the trigger must reject raises an error', () => {
  it('an unknown column', async () => {
    const e = await pgError(app.query(`INSERT INTO c19_users_staging (handle, no_such_column) VALUES ('x', 'y') RETURNING id`));
    expect(e.code).toBe('42703');
  });

  it('a value over the size limit, and the whole statement with it', async () => {
    const before = (await db.pool.query(`SELECT count(*)::int AS n FROM c19_users`)).rows[0].n;
    const e = await pgError(app.query(
      `INSERT INTO c19_users_staging (handle, national_id) VALUES ('ok-1', 'fine'), ('too-big', $1), ('ok-2', 'fine') RETURNING id`,
      ['v'.repeat(4097)]));
    expect(e.code).toBe('54000');
    expect(e.message).toBe('keyring: value for public.c19_users.national_id is 4097 bytes, over the maximum of 4096 bytes');
    expect((await db.pool.query(`SELECT count(*)::int AS n FROM c19_users`)).rows[0].n).toBe(before);
  });

  it('an UPDATE the trigger refuses (primary key change)', async () => {
    const e = await pgError(app.query(`UPDATE c19_users_staging SET id = id + 1 WHERE handle = 'row-0001' RETURNING id`));
    expect(e.code).toBe('0A000');
  });
});
