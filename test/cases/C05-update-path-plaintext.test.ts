/**
 * C05 — The UPDATE path skips encryption and stores plaintext.
 *
 * An UPDATE through the staging view queues the new value like an INSERT (placeholder in
 * the column, term cleared); the sidecar encrypts it. The marker value is then searched
 * for, as text and as hex bytes, in every table of schemas public and keyring (base
 * table, pending, quarantine, audit_log, ...) and in every log line the sidecar wrote
 * (pino at level trace into an in-memory stream). The application role cannot write
 * the ciphertext column directly, neither by privileges nor, if mis-granted, past the
 * guard trigger. An UPDATE of other columns leaves ciphertext, term and key byte-identical.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type pg from 'pg';
import type { Keyring } from '../../src/lib/keyring.js';
import { createLogger } from '../../src/log.js';
import type { Sidecar } from '../../sidecar/sidecar.js';
import { createTestDb, type TestDb } from '../helpers/db.js';
import { APP_ROLE, connectAsApp } from '../helpers/roles.js';
import {
  activateKeys, newKeys, openKeyring, pendingCount, startSidecar, waitFor, type TestKeys,
} from '../helpers/sidecar.js';
import { pgError } from '../helpers/sql.js';

const ORIGINAL = 'original-c05-value';
const MARKER = 'marker-UPDATE-7f3a';
const DIRECT = 'marker-DIRECT-9c1e';

let db: TestDb;
let keys: TestKeys;
let kr: Keyring;
let app: pg.Client;
let sidecar: Sidecar;
let id: string;
const logLines: string[] = [];

interface Stored { secret: Buffer; secret_bidx: Buffer; key_id: string; note: string; xmin: string }

async function stored(): Promise<Stored> {
  const { rows } = await db.pool.query<Stored>(
    `SELECT secret, secret_bidx, keyring.data_key_id(secret)::text AS key_id, note, xmin::text AS xmin FROM c05 WHERE id = $1`, [id]);
  return rows[0]!;
}

async function lookup(value: string): Promise<string[]> {
  const terms = await kr.lookupTerms('public.c05.secret', value);
  const { rows } = await db.pool.query<{ id: string }>('SELECT id::text FROM c05 WHERE secret_bidx = ANY($1::bytea[])', [terms]);
  return rows.map((r) => r.id);
}

/** Tables in schemas public and keyring whose rows contain `needle`, as text or as the hex of its UTF-8 bytes. */
async function tablesContaining(needle: string): Promise<string[]> {
  const hex = Buffer.from(needle, 'utf8').toString('hex');
  const { rows: tables } = await db.pool.query<{ t: string }>(
    `SELECT format('%I.%I', n.nspname, c.relname) AS t FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
      WHERE c.relkind IN ('r', 'p') AND n.nspname IN ('public', 'keyring') ORDER BY 1`);
  expect(tables.map((t) => t.t)).toEqual(expect.arrayContaining(['public.c05', 'keyring.pending', 'keyring.audit_log', 'keyring.quarantine']));
  const hits: string[] = [];
  for (const { t } of tables) {
    const { rows } = await db.pool.query<{ n: number }>(
      `SELECT count(*)::int AS n FROM ${t} x WHERE strpos(x::text, $1) > 0 OR strpos(lower(x::text), $2) > 0`, [needle, hex]);
    if (rows[0]!.n > 0) hits.push(t);
  }
  return hits;
}

const drained = () => waitFor(async () => (await pendingCount(db.pool)) === 0, { what: 'an empty queue' });

beforeAll(async () => {
  db = await createTestDb();
  keys = newKeys();
  await activateKeys(db.pool, keys);
  await db.pool.query('CREATE TABLE c05 (id bigserial PRIMARY KEY, secret text, note text)');
  await db.pool.query(`SELECT keyring.protect('public.c05', 'secret', p_blind_index => true)`);
  const logger = createLogger({ level: 'trace', destination: { write: (line: string) => { logLines.push(line); } } });
  sidecar = await startSidecar(db.url, keys, { KEYRING_LOG_LEVEL: 'trace' }, logger);
  kr = await openKeyring(db.url, keys);
  app = await connectAsApp(db.url);
});

afterAll(async () => {
  await app?.end();
  await sidecar?.stop();
  await kr?.close();
  await db?.drop();
});

describe('C05 the UPDATE path encrypts like the INSERT path', () => {
  let first: Stored;

  it('step 1: a row inserted through the staging view is encrypted', async () => {
    const r = await app.query<{ id: string }>(`INSERT INTO c05_staging (secret, note) VALUES ($1, 'n1') RETURNING id`, [ORIGINAL]);
    id = r.rows[0]!.id;
    await drained();
    first = await stored();
    expect(first.secret[0]).toBe(1);
    expect(first.secret.length).toBe(37 + ORIGINAL.length);
    expect(await kr.decrypt('public.c05.secret', id)).toBe(ORIGINAL);
    expect(await lookup(ORIGINAL)).toEqual([id]);
  });

  it('step 2: an UPDATE through the staging view re-encrypts; the marker appears nowhere once processed', async () => {
    const r = await app.query(`UPDATE c05_staging SET secret = $1 WHERE id = $2 RETURNING secret`, [MARKER, id]);
    expect(r.rowCount).toBe(1);
    expect(r.rows[0].secret).toBe('********'); // RETURNING gives the mask, never the value
    await drained();
    const now = await stored();
    expect(now.secret[0]).toBe(1);
    expect(now.secret.length).toBe(37 + MARKER.length);
    expect(now.secret.equals(first.secret)).toBe(false);
    expect(await kr.decrypt('public.c05.secret', id)).toBe(MARKER);
    // The blind index follows: the new value matches, the old one no longer does.
    expect(await lookup(MARKER)).toEqual([id]);
    expect(await lookup(ORIGINAL)).toEqual([]);
    expect(now.secret_bidx.equals(first.secret_bidx)).toBe(false);

    // Control: the search finds a value stored as bytea bytes (as a queued value is).
    await db.pool.query(`CREATE TABLE c05_control AS SELECT convert_to('control-needle-41d2', 'UTF8') AS b`);
    expect(await tablesContaining('control-needle-41d2')).toEqual(['public.c05_control']);
    await db.pool.query('DROP TABLE c05_control');
    // Nowhere in the database: base table, pending, quarantine, audit log, registry...
    expect(await tablesContaining(MARKER)).toEqual([]);
    // ...and nowhere in the sidecar's logs (which did log the batches).
    expect(logLines.length).toBeGreaterThan(0);
    expect(logLines.some((l) => l.includes('"msg"'))).toBe(true);
    const logs = logLines.join('');
    expect(logs).not.toContain(MARKER);
    expect(logs).not.toContain(Buffer.from(MARKER).toString('hex'));
    expect(logs).not.toContain(Buffer.from(MARKER).toString('base64'));
    // The search works: the original value's row key is there, and the audit rows exist.
    expect(await tablesContaining('encrypt.batch')).toEqual(['keyring.audit_log']);
  });

  it('step 3: the application role cannot write the ciphertext or term column of the base table', async () => {
    const before = await stored();
    const direct = (sql: string) => pgError(app.query(sql, [DIRECT, id]));
    const e1 = await direct(`UPDATE c05 SET secret = convert_to($1, 'UTF8') WHERE id = $2`);
    expect(e1.code).toBe('42501');
    const e2 = await direct(`UPDATE c05 SET secret_bidx = convert_to($1, 'UTF8') WHERE id = $2`);
    expect(e2.code).toBe('42501');
    // Even with UPDATE mis-granted on the table, the guard trigger refuses the write.
    await db.pool.query(`GRANT UPDATE ON c05 TO ${APP_ROLE}`);
    try {
      const e3 = await direct(`UPDATE c05 SET secret = convert_to($1, 'UTF8') WHERE id = $2`);
      expect(e3.code).toBe('42501');
      expect(e3.message).not.toContain(DIRECT);
      const e4 = await direct(`UPDATE c05 SET secret_bidx = NULL, note = $1 WHERE id = $2`);
      expect(e4.code).toBe('42501');
    } finally {
      await db.pool.query(`REVOKE UPDATE ON c05 FROM ${APP_ROLE}`);
    }
    const after = await stored();
    expect(after).toEqual(before);
    expect(await tablesContaining(DIRECT)).toEqual([]);
  });

  it('step 4: an UPDATE of a non-encrypted column leaves ciphertext, term and key version byte-identical', async () => {
    const before = await stored();
    const enc0 = await db.pool.query<{ n: string }>('SELECT sum(encryptions)::text AS n FROM keyring.data_keys');
    const batches0 = await db.pool.query<{ n: number }>(`SELECT count(*)::int AS n FROM keyring.audit_log WHERE action = 'encrypt.batch'`);
    const r = await app.query(`UPDATE c05_staging SET note = 'n2' WHERE id = $1`, [id]);
    expect(r.rowCount).toBe(1);
    // Writing the mask back (what an ORM does when it saves the row it read) keeps the value too.
    const m = await app.query(`UPDATE c05_staging SET note = 'n3', secret = '********' WHERE id = $1`, [id]);
    expect(m.rowCount).toBe(1);
    expect(await pendingCount(db.pool)).toBe(0);
    await sidecar.drain();
    const after = await stored();
    expect(after.note).toBe('n3');
    expect(after.xmin).not.toBe(before.xmin); // the row was written...
    expect(after.secret.equals(before.secret)).toBe(true); // ...but not its protected value
    expect(after.secret_bidx.equals(before.secret_bidx)).toBe(true);
    expect(after.key_id).toBe(before.key_id);
    expect((await db.pool.query('SELECT sum(encryptions)::text AS n FROM keyring.data_keys')).rows[0].n).toBe(enc0.rows[0]!.n);
    expect((await db.pool.query(`SELECT count(*)::int AS n FROM keyring.audit_log WHERE action = 'encrypt.batch'`)).rows[0].n)
      .toBe(batches0.rows[0]!.n);
    expect(await kr.decrypt('public.c05.secret', id)).toBe(MARKER);
  });

  it('no decrypt or read path writes plaintext back into the ciphertext column', async () => {
    const before = await stored();
    await kr.decryptColumn('public.c05.secret');
    await kr.decrypt('public.c05.secret', id);
    await kr.lookupTerms('public.c05.secret', MARKER);
    await app.query('SELECT * FROM c05_staging');
    await app.query('SELECT * FROM c05');
    await sidecar.drain();
    const after = await stored();
    expect(after).toEqual(before); // same bytes, same row version (xmin)
    expect(await tablesContaining(MARKER)).toEqual([]);
    expect(logLines.join('')).not.toContain(MARKER);
  });
});
