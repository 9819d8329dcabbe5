/**
 * The write path for every supported type and every kind of write.
 *
 * 1. Every type protect() supports (text, varchar(n), date, timestamp, timestamptz,
 *    numeric, numeric(p,s), bigint, jsonb, bytea) round-trips exactly, encrypted by a
 *    sidecar process under TZ=UTC and under TZ=Pacific/Chatham (+12:45/+13:45 with DST),
 *    written by the application from a session with another zone and another DateStyle
 *    (Asia/Kathmandu, SQL/DMY). Shared with C17 (test/helpers/types.ts), which covers the
 *    case's own values, blind indexes and audit times.
 * 2. INSERT, UPDATE, DELETE (with RETURNING) and COPY through the staging view by the
 *    application role, with a sidecar running on its own (LISTEN, no drain calls): every
 *    value ends encrypted and decrypts (Keyring) to its input, 5 MiB and Unicode included.
 */
import { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type pg from 'pg';
import { from as copyFrom } from 'pg-copy-streams';
import type { Keyring } from '../../src/lib/keyring.js';
import type { Sidecar } from '../../sidecar/sidecar.js';
import { createTestDb, type TestDb } from '../helpers/db.js';
import { connectAsApp } from '../helpers/roles.js';
import { activateKeys, newKeys, openKeyring, pendingCount, startSidecar, waitFor, type TestKeys } from '../helpers/sidecar.js';
import {
  ALL_TYPES, checkRoundTrip, connectAppWith, createTypeTables, encryptWithSidecarInTz, insertCases, typeTable,
} from '../helpers/types.js';

const MiB = 1024 * 1024;

let db: TestDb;
let keys: TestKeys;
let kr: Keyring;

beforeAll(async () => {
  db = await createTestDb();
  keys = newKeys();
  await activateKeys(db.pool, keys);
  kr = await openKeyring(db.url, keys);
});

afterAll(async () => {
  await kr?.close();
  await db?.drop();
});

describe('every supported type round-trips, whatever the time zone of sidecar and writer', () => {
  let writer: pg.Client;

  beforeAll(async () => {
    await createTypeTables(db.pool, ALL_TYPES);
    writer = await connectAppWith(db.url, '-c TimeZone=Asia/Kathmandu -c DateStyle=SQL,DMY');
  });
  afterAll(async () => { await writer?.end(); });

  const zones = ['UTC', 'Pacific/Chatham'] as const;
  zones.forEach((tz, k) => {
    it(`sidecar process under TZ=${tz}`, async () => {
      const base = 1000 * (k + 1);
      await insertCases(writer, ALL_TYPES, base);
      const run = await encryptWithSidecarInTz(db.url, db.pool, keys, tz);
      expect(run.tzSeen).toBe(tz);
      expect(run.exitCode).toBe(0);
      expect(await checkRoundTrip(kr, writer, ALL_TYPES, base)).toEqual([]);
    });
  });

  it('both runs stored the same blind-index terms for the same values', async () => {
    for (const c of ALL_TYPES) {
      const t = typeTable(c.type);
      const { rows } = await db.pool.query<{ same: boolean }>(
        `SELECT a.v_bidx = b.v_bidx AS same FROM ${t} a JOIN ${t} b ON b.id = a.id + 1000 WHERE a.id < 2000 ORDER BY a.id`);
      expect(rows.map((r) => r.same), c.type).toEqual(c.values.map(() => true));
    }
  });
});

describe('INSERT, UPDATE, DELETE and COPY through the staging view, sidecar running', () => {
  let app: pg.Client;
  let sidecar: Sidecar;
  /** Expected plaintexts by row id (null: SQL NULL). */
  const want = new Map<string, { doc: string | null; amount: string | null; born: string | null; blob: Buffer | null }>();
  const big = 'Ǆ𝄞€a'.repeat((5 * MiB) / 10); // 2+4+3+1 = 10 bytes a round: exactly 5 MiB

  const settled = () => waitFor(async () => (await pendingCount(db.pool)) === 0, { timeoutMs: 20_000, what: 'the sidecar to empty the queue' });

  async function expectDecrypted(): Promise<void> {
    const cols = ['doc', 'amount', 'born', 'blob'] as const;
    for (const col of cols) {
      const got = await kr.decryptColumn(`public.wp.${col}`);
      expect(got.map((r) => r.rowKey).sort(), col).toEqual([...want.keys()].sort());
      for (const r of got) {
        expect(r.error, `${col} of row ${r.rowKey}`).toBeUndefined();
        const w = want.get(r.rowKey)![col];
        if (Buffer.isBuffer(w)) expect(Buffer.isBuffer(r.value) && r.value.equals(w), `${col} of row ${r.rowKey}`).toBe(true);
        else if (col === 'doc' && w !== null && w.length > 1000) expect(r.value === w, `doc of row ${r.rowKey} (5 MiB)`).toBe(true);
        else expect(r.value, `${col} of row ${r.rowKey}`).toBe(w);
      }
    }
    // Every value is an envelope of the exact length: nothing left as plaintext or placeholder.
    const { rows } = await db.pool.query<{ id: string; doc: number | null; blob: number | null }>(
      `SELECT id::text, octet_length(doc) AS doc, octet_length(blob) AS blob FROM wp
        WHERE coalesce(get_byte(doc, 0), 1) <> 1 OR coalesce(get_byte(amount, 0), 1) <> 1
           OR coalesce(get_byte(born, 0), 1) <> 1 OR coalesce(get_byte(blob, 0), 1) <> 1`);
    expect(rows).toEqual([]);
    for (const [id, w] of want) {
      const len = (await db.pool.query(`SELECT octet_length(doc) AS d, octet_length(blob) AS b FROM wp WHERE id = $1`, [id])).rows[0];
      expect(len.d, `row ${id}`).toBe(w.doc === null ? null : 37 + Buffer.byteLength(w.doc));
      expect(len.b, `row ${id}`).toBe(w.blob === null ? null : 37 + w.blob.length);
    }
  }

  beforeAll(async () => {
    await db.pool.query(`CREATE TABLE wp (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, name text NOT NULL,
      doc text, amount numeric(12,2), born date, blob bytea)`);
    await db.pool.query(`SELECT keyring.protect('public.wp', 'doc', p_blind_index => true, p_normalize => ARRAY['trim'])`);
    await db.pool.query(`SELECT keyring.protect('public.wp', 'amount')`);
    await db.pool.query(`SELECT keyring.protect('public.wp', 'born')`);
    await db.pool.query(`SELECT keyring.protect('public.wp', 'blob')`);
    sidecar = await startSidecar(db.url, keys, { KEYRING_POLL_INTERVAL_MS: '60000' }); // only LISTEN makes it act quickly
    app = await connectAsApp(db.url);
  });
  afterAll(async () => {
    await app?.end();
    await sidecar?.stop();
  });

  it('INSERT ... RETURNING (three rows, one of 5 MiB): real ids, no values returned; all encrypted and exact', async () => {
    const r = await app.query<{ id: string; name: string; doc: string | null; amount: string | null }>(
      `INSERT INTO wp_staging (name, doc, amount, born, blob)
       VALUES ('row-1', $1, '12.5', '2024-02-29', '\\x00ff'), ('row-2', $2, '-0.01', NULL, ''::bytea), ('row-3', $3, NULL, '1975-05-11', NULL)
       RETURNING id, name, doc, amount`,
      ['Ünïcødé ✓ 👩‍👩‍👧‍👦 שָׁלוֹם', '', big]);
    expect(r.rowCount).toBe(3);
    expect(r.rows.map((x) => x.name)).toEqual(['row-1', 'row-2', 'row-3']);
    expect(r.rows.every((x) => x.doc === null && x.amount === null)).toBe(true);
    const [a, b, c] = r.rows.map((x) => String(x.id));
    want.set(a!, { doc: 'Ünïcødé ✓ 👩‍👩‍👧‍👦 שָׁלוֹם', amount: '12.50', born: '2024-02-29', blob: Buffer.from([0, 255]) });
    want.set(b!, { doc: '', amount: '-0.01', born: null, blob: Buffer.alloc(0) });
    want.set(c!, { doc: big, amount: null, born: '1975-05-11', blob: null });
    const base = await db.pool.query('SELECT id::text FROM wp ORDER BY id');
    expect(base.rows.map((x) => x.id)).toEqual([a, b, c]);
    await settled();
    await expectDecrypted();
  });

  it('UPDATE ... RETURNING: new values encrypted, masks returned, untouched values byte-identical', async () => {
    const [a, b] = [...want.keys()];
    const before = (await db.pool.query(`SELECT amount, born, blob FROM wp WHERE id = $1`, [a])).rows[0];
    const r = await app.query(`UPDATE wp_staging SET doc = $1, name = 'row-1u' WHERE id = $2 RETURNING id, doc, amount`, ['  nouveau 💶 ', a]);
    expect(r.rowCount).toBe(1);
    expect(r.rows[0]).toEqual({ id: a, doc: '********', amount: '-Infinity' });
    const r2 = await app.query(`UPDATE wp_staging SET amount = 99.999, born = '2000-01-01', blob = NULL WHERE id = $1 RETURNING amount, blob`, [b]);
    expect(r2.rowCount).toBe(1);
    expect(r2.rows[0]).toEqual({ amount: '-Infinity', blob: null });
    want.set(a!, { ...want.get(a!)!, doc: '  nouveau 💶 ' });
    want.set(b!, { ...want.get(b!)!, amount: '100.00', born: '2000-01-01', blob: null });
    await settled();
    await expectDecrypted();
    const after = (await db.pool.query(`SELECT amount, born, blob FROM wp WHERE id = $1`, [a])).rows[0];
    expect(after).toEqual(before);
    // The blind index follows the update (trim normalisation).
    const terms = await kr.lookupTerms('public.wp.doc', 'nouveau 💶');
    expect((await db.pool.query(`SELECT id::text FROM wp WHERE doc_bidx = ANY($1::bytea[])`, [terms])).rows).toEqual([{ id: a }]);
  });

  it('DELETE ... RETURNING removes the row and anything queued for it', async () => {
    const [, b] = [...want.keys()];
    await app.query(`UPDATE wp_staging SET doc = 'queued, then deleted' WHERE id = $1`, [b]);
    const r = await app.query(`DELETE FROM wp_staging WHERE id = $1 RETURNING id, name`, [b]);
    expect(r.rowCount).toBe(1);
    expect(r.rows[0].id).toBe(b);
    want.delete(b!);
    await settled();
    expect((await db.pool.query(`SELECT count(*)::int AS n FROM wp WHERE id = $1`, [b])).rows[0].n).toBe(0);
    expect((await db.pool.query(`SELECT count(*)::int AS n FROM keyring.pending WHERE row_key = $1`, [b])).rows[0].n).toBe(0);
    await expectDecrypted();
  });

  it('COPY FROM STDIN into the staging view: quoting, NULL vs empty, Unicode, bytea hex', async () => {
    const csv = [
      'copy-1,"comma, ""quote"" and\nnewline",1.005,2024-03-31,\\x0001ff',
      'copy-2,"",0,,\\x',
      'copy-3,,,1999-12-31,',
      'copy-4,Ελληνικά 中文 𝄞 \u0001 end,-1234567890.12,0044-03-15 BC,\\x5c783431',
    ].join('\n') + '\n';
    const before = new Set((await db.pool.query('SELECT id::text FROM wp')).rows.map((x) => x.id as string));
    const copy = app.query(copyFrom(`COPY wp_staging (name, doc, amount, born, blob) FROM STDIN WITH (FORMAT csv)`));
    await pipeline(Readable.from([csv]), copy);
    expect(copy.rowCount).toBe(4);
    const added = (await db.pool.query<{ id: string; name: string }>('SELECT id::text, name FROM wp ORDER BY id')).rows
      .filter((x) => !before.has(x.id));
    expect(added.map((x) => x.name)).toEqual(['copy-1', 'copy-2', 'copy-3', 'copy-4']);
    const byName = new Map(added.map((x) => [x.name, x.id]));
    want.set(byName.get('copy-1')!, { doc: 'comma, "quote" and\nnewline', amount: '1.01', born: '2024-03-31', blob: Buffer.from([0, 1, 255]) });
    want.set(byName.get('copy-2')!, { doc: '', amount: '0.00', born: null, blob: Buffer.alloc(0) });
    want.set(byName.get('copy-3')!, { doc: null, amount: null, born: '1999-12-31', blob: null });
    want.set(byName.get('copy-4')!, { doc: 'Ελληνικά 中文 𝄞 \u0001 end', amount: '-1234567890.12', born: '0044-03-15 BC', blob: Buffer.from('\\x41', 'latin1') });
    await settled();
    await expectDecrypted();
  });
});
