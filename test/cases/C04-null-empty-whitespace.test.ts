/**
 * C04 — NULL vs empty string vs whitespace.
 *
 * Documented convention (DESIGN.md, docs/write-path.md): NULL stays SQL NULL — no
 * ciphertext, no blind-index term, nothing queued — and decrypts to NULL; '' is a real
 * value with a 37-byte envelope and a term. Whitespace follows the column's declared
 * normalisation (the one function used on write and lookup, case C07): with `none`,
 * ' ' is its own value; with `trim`, ' ' and '' normalise to the same term.
 *
 * Column `v` has normalisation none, column `w` has trim; both get the same four rows.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { Keyring } from '../../src/lib/keyring.js';
import type { Sidecar } from '../../sidecar/sidecar.js';
import { createTestDb, type TestDb } from '../helpers/db.js';
import {
  activateKeys, newKeys, openKeyring, pendingCount, startSidecar, waitFor, type TestKeys,
} from '../helpers/sidecar.js';

let db: TestDb;
let keys: TestKeys;
let kr: Keyring;
let sidecar: Sidecar | undefined;

// Step 1's rows: id → value.
const ROWS: ReadonlyArray<[id: number, value: string | null]> = [[1, null], [2, ''], [3, ' '], [4, 'value-1']];

async function lookup(column: 'v' | 'w', value: string): Promise<number[]> {
  const terms = await kr.lookupTerms(`public.c04.${column}`, value);
  const { rows } = await db.pool.query<{ id: number }>(
    `SELECT id FROM c04 WHERE ${column}_bidx = ANY($1::bytea[]) ORDER BY id`, [terms]);
  return rows.map((r) => r.id);
}

async function baseRow(id: number) {
  const { rows } = await db.pool.query(
    `SELECT v, v_bidx, w, w_bidx, octet_length(v) AS v_len, octet_length(w) AS w_len,
            (SELECT count(*)::int FROM keyring.pending p WHERE p.row_key = c04.id::text) AS queued
       FROM c04 WHERE id = $1`, [id]);
  return rows[0];
}

const drained = () => waitFor(async () => (await pendingCount(db.pool)) === 0, { what: 'an empty queue' });

beforeAll(async () => {
  db = await createTestDb();
  keys = newKeys();
  await activateKeys(db.pool, keys);
  await db.pool.query('CREATE TABLE c04 (id int PRIMARY KEY, label text, v text, w text)');
  await db.pool.query(`SELECT keyring.protect('public.c04', 'v', p_blind_index => true)`);
  await db.pool.query(`SELECT keyring.protect('public.c04', 'w', p_blind_index => true, p_normalize => ARRAY['trim'])`);
  sidecar = await startSidecar(db.url, keys);
  kr = await openKeyring(db.url, keys);
});

afterAll(async () => {
  await sidecar?.stop();
  await kr?.close();
  await db?.drop();
});

describe('C04 NULL, empty string and whitespace', () => {
  it('step 1: the four rows go in through the staging view; NULL queues nothing', async () => {
    const r = await db.pool.query(
      `INSERT INTO c04_staging (id, label, v, w) SELECT * FROM unnest($1::int[], $2::text[], $3::text[], $3::text[])`,
      [ROWS.map(([id]) => id), ROWS.map(([id]) => `row-${id}`), ROWS.map(([, v]) => v)]);
    expect(r.rowCount).toBe(4);
    await drained();
    // Only the three non-NULL values of each column were queued and encrypted.
    const enc = await db.pool.query<{ n: number }>(
      `SELECT coalesce(sum((detail->>'count')::int), 0)::int AS n FROM keyring.audit_log WHERE action = 'encrypt.batch'`);
    expect(enc.rows[0]!.n).toBe(6);
  });

  it('stored: NULL has no ciphertext and no term; "" and " " are real envelopes with terms', async () => {
    const nul = await baseRow(1);
    expect(nul).toMatchObject({ v: null, v_bidx: null, w: null, w_bidx: null, queued: 0 });
    for (const [id, value] of ROWS.slice(1)) {
      const row = await baseRow(id);
      const bytes = Buffer.byteLength(value!);
      expect(row.v[0], `row ${id}`).toBe(1);
      expect(row.v_len, `row ${id}`).toBe(37 + bytes);
      expect(row.w_len, `row ${id}`).toBe(37 + bytes);
      expect(row.v_bidx, `row ${id}`).toBeInstanceOf(Buffer);
      expect(row.w_bidx, `row ${id}`).toBeInstanceOf(Buffer);
      expect(row.queued).toBe(0);
    }
    // The staging view reads NULL as NULL and a value ('' included) as the mask.
    const view = await db.pool.query(`SELECT id, v FROM c04_staging ORDER BY id`);
    expect(view.rows).toEqual([{ id: 1, v: null }, { id: 2, v: '********' }, { id: 3, v: '********' }, { id: 4, v: '********' }]);
  });

  it('step 2: one read of all four rows through the decrypt path: NULL, "", " ", "value-1"', async () => {
    for (const column of ['v', 'w']) {
      const res = await kr.decryptColumn(`public.c04.${column}`);
      expect(res.map(({ rowKey, value, error }) => ({ rowKey, value, error })), column).toEqual([
        { rowKey: '1', value: null, error: undefined },
        { rowKey: '2', value: '', error: undefined },
        { rowKey: '3', value: ' ', error: undefined },
        { rowKey: '4', value: 'value-1', error: undefined },
      ]);
    }
    expect(await kr.decrypt('public.c04.v', '1')).toBeNull();
    expect(await kr.decrypt('public.c04.v', '2')).toBe('');
    expect(await kr.decrypt('public.c04.v', '3')).toBe(' ');
  });

  it('step 3: a lookup of "" never returns the NULL row; " " follows the column normalisation', async () => {
    // none: '' and ' ' are different values.
    expect(await lookup('v', '')).toEqual([2]);
    expect(await lookup('v', ' ')).toEqual([3]);
    expect(await lookup('v', '  ')).toEqual([]);
    // trim: whitespace-only normalises to '', on write and on lookup alike.
    expect(await lookup('w', '')).toEqual([2, 3]);
    expect(await lookup('w', ' ')).toEqual([2, 3]);
    expect(await lookup('w', '\t \u00a0')).toEqual([2, 3]);
    expect(await lookup('w', ' value-1 ')).toEqual([4]);
    const terms = await db.pool.query(`SELECT id, v_bidx, w_bidx FROM c04 WHERE id IN (2, 3) ORDER BY id`);
    expect(Buffer.compare(terms.rows[0].v_bidx, terms.rows[1].v_bidx)).not.toBe(0);
    expect(Buffer.compare(terms.rows[0].w_bidx, terms.rows[1].w_bidx)).toBe(0);
  });

  it('step 4: updating "value-1" to NULL clears ciphertext and term; no stale index is left', async () => {
    const before = await lookup('v', 'value-1');
    expect(before).toEqual([4]);
    const r = await db.pool.query(`UPDATE c04_staging SET v = NULL, w = NULL WHERE id = 4`);
    expect(r.rowCount).toBe(1);
    expect(await baseRow(4)).toMatchObject({ v: null, v_bidx: null, w: null, w_bidx: null, queued: 0 });
    expect(await lookup('v', 'value-1')).toEqual([]);
    expect(await lookup('w', 'value-1')).toEqual([]);
    await sidecar!.drain(); // nothing comes back after another pass
    expect(await baseRow(4)).toMatchObject({ v: null, v_bidx: null, w: null, w_bidx: null, queued: 0 });
    expect(await kr.decrypt('public.c04.v', '4')).toBeNull();
    // label untouched
    expect((await db.pool.query(`SELECT label FROM c04 WHERE id = 4`)).rows[0].label).toBe('row-4');
  });

  it('a value set to NULL while still queued is dropped from the queue and never encrypted later', async () => {
    await sidecar!.stop();
    sidecar = undefined;
    await db.pool.query(`UPDATE c04_staging SET v = 'value-2', w = 'value-2' WHERE id = 3`);
    expect(await baseRow(3)).toMatchObject({ v_len: 1, v_bidx: null, queued: 2 }); // placeholder, term cleared
    await db.pool.query(`UPDATE c04_staging SET v = NULL WHERE id = 3`);
    expect(await baseRow(3)).toMatchObject({ v: null, v_bidx: null, w_len: 1, queued: 1 });
    sidecar = await startSidecar(db.url, keys);
    await sidecar.drain();
    await drained();
    const row = await baseRow(3);
    expect(row).toMatchObject({ v: null, v_bidx: null, queued: 0 });
    expect(row.w_len).toBe(37 + 'value-2'.length);
    expect(await lookup('v', 'value-2')).toEqual([]);
    expect(await lookup('w', 'value-2')).toEqual([3]);
  });

  it('one undecryptable value never fails the whole read', async () => {
    // A privileged session flips one tag byte of row 2's '' envelope, and stores in row 3 bytes
    // shaped like an envelope whose key id is above the bigint range.
    await db.pool.query(`UPDATE c04 SET v = set_byte(v, octet_length(v) - 1, get_byte(v, octet_length(v) - 1) # 1) WHERE id = 2`);
    await db.pool.query(`UPDATE c04 SET v = '\\x01'::bytea || decode(repeat('ff', 40), 'hex') WHERE id = 3`);
    const res = await kr.decryptColumn('public.c04.v');
    expect(res.map((r) => r.rowKey)).toEqual(['1', '2', '3', '4']);
    expect(res[0]).toMatchObject({ value: null });
    expect(res[0]!.error).toBeUndefined();
    for (const bad of [res[1]!, res[2]!]) {
      expect(bad.value, `row ${bad.rowKey}`).toBeNull();
      expect(bad.error, `row ${bad.rowKey}`).toMatch(/decrypt/i);
    }
    expect(res[3]).toMatchObject({ value: null });
    expect(res[3]!.error).toBeUndefined();
    // The other column of the same rows still reads.
    expect((await kr.decryptColumn('public.c04.w', { rowKeys: ['2'] }))[0]).toMatchObject({ value: '' });
  });
});
