/**
 * C07 — Blind-index normalisation is applied on write but not on query.
 *
 * `email` is declared trim,lower,nfc; `name` trim,lower (no nfc). The sidecar writes the
 * term (sidecar/claim.ts) and the library computes lookup terms (Keyring.lookupTerms)
 * with the same function, blindIndexTerm → normalize (src/crypto/blind-index.ts); this
 * test checks the stored term equals both the lookup term and an independent
 * computation, so the two paths cannot drift. Normalisation touches only the index:
 * decryption returns the input as written.
 *
 * Step 4 ("if the index is declared unique"): unique blind indexes are not offered
 * (docs/write-path.md "Unique blind indexes": the database holds no index key, so it
 * cannot check uniqueness at insert time, and a check that fired later in the sidecar
 * would reject a row the application was told had been written). The test asserts
 * protect() has no such option, then the documented behaviour instead: a value equal
 * after normalisation gets the same term (so a lookup before insert finds it), and a
 * value with different content never matches.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  blindIndexTerm, deriveIndexKey, parseKeyHex, parseNormalization,
} from '../../src/crypto/index.js';
import { protectCommand } from '../../src/cli/commands/protect.js';
import type { Keyring } from '../../src/lib/keyring.js';
import type { Sidecar } from '../../sidecar/sidecar.js';
import { createTestDb, type TestDb } from '../helpers/db.js';
import { connectAsApp } from '../helpers/roles.js';
import {
  activateKeys, columnIdOf, newKeys, openKeyring, pendingCount, startSidecar, waitFor, type TestKeys,
} from '../helpers/sidecar.js';

const STORED = '  Alpha.One@Example.TEST ';
const CAFE_NFC = 'Caf\u00e9-1';
const CAFE_NFD = 'Cafe\u0301-2';

let db: TestDb;
let keys: TestKeys;
let kr: Keyring;
let sidecar: Sidecar;
let emailCol: number;
let nameCol: number;
const ids = new Map<string, string>();

async function insert(email: string, name: string = email): Promise<string> {
  const app = await connectAsApp(db.url);
  try {
    const r = await app.query<{ id: string }>(`INSERT INTO c07_staging (email, name) VALUES ($1, $2) RETURNING id`, [email, name]);
    expect(r.rowCount).toBe(1);
    return r.rows[0]!.id;
  } finally {
    await app.end();
  }
}

async function lookup(column: 'email' | 'name', value: string): Promise<string[]> {
  const terms = await kr.lookupTerms(`public.c07.${column}`, value);
  const { rows } = await db.pool.query<{ id: string }>(
    `SELECT id::text FROM c07 WHERE ${column}_bidx = ANY($1::bytea[]) ORDER BY id`, [terms]);
  return rows.map((r) => r.id);
}

async function storedTerm(column: 'email' | 'name', id: string): Promise<Buffer> {
  const { rows } = await db.pool.query(`SELECT ${column}_bidx AS t FROM c07 WHERE id = $1`, [id]);
  return rows[0].t as Buffer;
}

/** The term computed here from the root key, independently of sidecar and library. */
function expectedTerm(columnId: number, value: string, normalize: string[]): Buffer {
  const root = parseKeyHex(keys.index[0]!, 'index root');
  const k = deriveIndexKey(root, columnId, null);
  try {
    return blindIndexTerm(k, 1, Buffer.from(value, 'utf8'), parseNormalization(normalize), 16, true);
  } finally {
    k.dispose();
    root.dispose();
  }
}

const drained = () => waitFor(async () => (await pendingCount(db.pool)) === 0, { what: 'an empty queue' });

beforeAll(async () => {
  db = await createTestDb();
  keys = newKeys();
  await activateKeys(db.pool, keys);
  await db.pool.query('CREATE TABLE c07 (id bigserial PRIMARY KEY, email text, name text)');
  // Declared in another order than the canonical one: the steps are applied nfc, trim, lower.
  await db.pool.query(`SELECT keyring.protect('public.c07', 'email', p_blind_index => true, p_normalize => ARRAY['lower', 'trim', 'nfc'])`);
  await db.pool.query(`SELECT keyring.protect('public.c07', 'name', p_blind_index => true, p_normalize => ARRAY['trim', 'lower'])`);
  emailCol = await columnIdOf(db.pool, 'c07', 'email');
  nameCol = await columnIdOf(db.pool, 'c07', 'name');
  sidecar = await startSidecar(db.url, keys);
  kr = await openKeyring(db.url, keys);
  // Near misses, so that "exactly one row" means something.
  for (const v of ['alpha.two@example.test', 'alpha.one@example.tes', 'lpha.one@example.test', 'Cafe-1', 'Cafè-1']) ids.set(v, await insert(v));
});

afterAll(async () => {
  await sidecar?.stop();
  await kr?.close();
  await db?.drop();
});

describe('C07 blind-index normalisation on write and on lookup', () => {
  it('steps 1-2: every case and whitespace variant finds exactly the one row; decryption returns the original', async () => {
    const id = await insert(STORED);
    ids.set(STORED, id);
    await drained();
    for (const variant of ['alpha.one@example.test', 'ALPHA.ONE@EXAMPLE.TEST', 'alpha.one@example.test  ', STORED, '\tAlpha.ONE@example.Test\n']) {
      expect(await lookup('email', variant), JSON.stringify(variant)).toEqual([id]);
      expect(await lookup('name', variant), JSON.stringify(variant)).toEqual([id]);
    }
    // Normalisation affects only the index.
    expect(await kr.decrypt('public.c07.email', id)).toBe(STORED);
    expect(await kr.decrypt('public.c07.name', id)).toBe(STORED);
    const { rows } = await db.pool.query(`SELECT octet_length(email) AS n FROM c07 WHERE id = $1`, [id]);
    expect(rows[0].n).toBe(37 + Buffer.byteLength(STORED));
  });

  it('one normalisation on both paths: the stored term equals the lookup term and an independent computation', async () => {
    const id = ids.get(STORED)!;
    const stored = await storedTerm('email', id);
    const [lookupTerm] = await kr.lookupTerms('public.c07.email', 'alpha.one@example.test');
    expect(stored.equals(lookupTerm!)).toBe(true);
    expect(stored.equals(expectedTerm(emailCol, 'alpha.one@example.test', ['none']))).toBe(true);
    expect(stored.equals(expectedTerm(emailCol, STORED, ['nfc', 'trim', 'lower']))).toBe(true);
    expect((await storedTerm('name', id)).equals(expectedTerm(nameCol, STORED, ['trim', 'lower']))).toBe(true);
    // Without normalisation the stored input would hash differently: the term really is of the normalised value.
    expect(stored.equals(expectedTerm(emailCol, STORED, ['none']))).toBe(false);
  });

  it('step 3: NFC and NFD forms match when nfc is declared, both ways; decryption keeps the exact code points', async () => {
    const nfcId = await insert(CAFE_NFC);
    const nfdId = await insert(CAFE_NFD);
    await drained();
    // email (nfc declared): the other form finds the row.
    expect(await lookup('email', 'Cafe\u0301-1')).toEqual([nfcId]);
    expect(await lookup('email', CAFE_NFC)).toEqual([nfcId]);
    expect(await lookup('email', 'Caf\u00e9-2')).toEqual([nfdId]);
    expect(await lookup('email', CAFE_NFD)).toEqual([nfdId]);
    expect(await lookup('email', ' CAFE\u0301-1 ')).toEqual([nfcId]);
    // name (no nfc): the documented policy is byte equality after trim and lower, on both paths alike.
    expect(await lookup('name', CAFE_NFC)).toEqual([nfcId]);
    expect(await lookup('name', 'Cafe\u0301-1')).toEqual([]);
    expect(await lookup('name', CAFE_NFD)).toEqual([nfdId]);
    expect(await lookup('name', 'Caf\u00e9-2')).toEqual([]);
    // Decryption returns the input as written, NFC stays NFC and NFD stays NFD.
    const nfc = await kr.decrypt('public.c07.email', nfcId);
    const nfd = await kr.decrypt('public.c07.email', nfdId);
    expect(Buffer.from(nfc as string).toString('hex')).toBe(Buffer.from(CAFE_NFC).toString('hex'));
    expect(Buffer.from(nfd as string).toString('hex')).toBe(Buffer.from(CAFE_NFD).toString('hex'));
  });

  it('step 4: unique blind indexes are not offered (no protect option, no CLI flag)', async () => {
    const { rows } = await db.pool.query<{ args: string[] }>(
      `SELECT proargnames AS args FROM pg_proc WHERE oid = 'keyring.protect'::regproc`);
    expect(rows[0]!.args.length).toBeGreaterThan(5);
    expect(rows[0]!.args.filter((a) => /uniq/i.test(a))).toEqual([]);
    expect(protectCommand.help).not.toMatch(/uniq/i);
    // The blind-index index protect() builds is a plain (non-unique) btree.
    const idx = await db.pool.query<{ unique: boolean }>(
      `SELECT i.indisunique AS unique FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)
        WHERE i.indrelid = 'public.c07'::regclass AND a.attname = 'email_bidx'`);
    expect(idx.rows).toEqual([{ unique: false }]);
  });

  it('step 4, documented behaviour: an equal normalised value gets the same term; different content never matches', async () => {
    const firstId = ids.get(STORED)!;
    const dupId = await insert('ALPHA.ONE@example.test');
    const different = [
      'alpha.one@example.test.', 'alpha.one@example.tests', 'alpha-one@example.test', 'alpha.one @example.test',
      'alpha.one@example.test\u200b', 'alpha.oné@example.test', 'alpha.one@example.tést', 'alpha.one',
    ];
    const diffIds = new Map<string, string>();
    for (const v of different) diffIds.set(v, await insert(v));
    await drained();
    // Accepted (not refused: no uniqueness is offered), and findable by a lookup before a second insert.
    expect((await storedTerm('email', dupId)).equals(await storedTerm('email', firstId))).toBe(true);
    expect(await lookup('email', 'alpha.one@example.test')).toEqual([firstId, dupId]);
    // Different content: its own term, never the first row's; each finds only itself.
    const firstTerm = await storedTerm('email', firstId);
    for (const v of different) {
      expect((await storedTerm('email', diffIds.get(v)!)).equals(firstTerm), JSON.stringify(v)).toBe(false);
      expect(await lookup('email', v), JSON.stringify(v)).toEqual([diffIds.get(v)!]);
    }
    // Every stored term in the column is distinct except the one intended pair.
    const dups = await db.pool.query<{ n: number }>(
      `SELECT count(*)::int AS n FROM (SELECT email_bidx FROM c07 GROUP BY 1 HAVING count(*) > 1) d`);
    expect(dups.rows[0]!.n).toBe(1);
  });
});
