/**
 * C12 — NOTIFY payload over 8000 bytes rolls back the INSERT; a malformed payload kills
 * the listener.
 *
 * The staging triggers notify a fixed hint ({"kind":"pending"}), never a value, so the
 * size of a value cannot reach the 8000-byte NOTIFY limit; the sidecar treats anything
 * it does not recognise as noise: a warning (by length, never content), then nothing.
 */
import { createHash } from 'node:crypto';
import { Writable } from 'node:stream';
import pg from 'pg';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createLogger } from '../../src/log.js';
import type { Sidecar } from '../../sidecar/sidecar.js';
import { createTestDb, type TestDb } from '../helpers/db.js';
import { activateKeys, columnIdOf, decryptStored, newKeys, pendingCount, startSidecar, waitFor, type TestKeys } from '../helpers/sidecar.js';

let db: TestDb;
let keys: TestKeys;
let col: number;
let sidecar: Sidecar;
let listener: pg.Client;
const captured: string[] = [];
const logs: Record<string, unknown>[] = [];

const sha = (b: Buffer | string) => createHash('sha256').update(b).digest('hex');

// [label, value]: byte counts around the 8000-byte NOTIFY limit, and multi-byte text
// whose character count is under 8000 while its byte count is over it.
const VALUES: [string, string][] = [
  ['7999 bytes', 'a'.repeat(7998) + 'Z'],
  ['8000 bytes', 'b'.repeat(7999) + 'Z'],
  ['100 KB', 'c'.repeat(100 * 1024)],
  ['5 MB', 'd'.repeat(5 * 1024 * 1024)],
  ['CJK 3-byte: 3000 chars, 9000 bytes', '\u6f22'.repeat(3000)],
  ['emoji 4-byte: 2500 chars, 10000 bytes', '\u{1F600}'.repeat(2500)],
];

beforeAll(async () => {
  db = await createTestDb();
  keys = newKeys();
  await activateKeys(db.pool, keys);
  await db.pool.query('CREATE TABLE notes (id int PRIMARY KEY, body text)');
  await db.pool.query(`SELECT keyring.protect('public.notes', 'body', p_blind_index => true)`);
  col = await columnIdOf(db.pool, 'notes', 'body');

  listener = new pg.Client({ connectionString: db.url });
  listener.on('error', () => undefined);
  await listener.connect();
  listener.on('notification', (m) => captured.push(m.payload ?? ''));
  await listener.query('LISTEN keyring');

  const sink = new Writable({ write(chunk, _e, cb) { for (const l of String(chunk).split('\n')) if (l) logs.push(JSON.parse(l)); cb(); } });
  // A one-minute poll: the row after the bad payloads can only be picked up via LISTEN.
  sidecar = await startSidecar(db.url, keys, { KEYRING_POLL_INTERVAL_MS: '60000' }, createLogger({ level: 'info', destination: sink }));
});
afterAll(async () => {
  await sidecar?.stop();
  await listener?.end().catch(() => undefined);
  await db?.drop();
});

describe('C12 notify payloads', () => {
  it('steps 1-2: large and multi-byte values insert, get encrypted, and notifications carry identifiers only', async () => {
    for (const [i, [, value]] of VALUES.entries()) {
      const r = await db.pool.query('INSERT INTO notes_staging (id, body) VALUES ($1, $2)', [i + 1, value]);
      expect(r.rowCount).toBe(1);
    }
    await waitFor(async () => (await pendingCount(db.pool)) === 0, { timeoutMs: 30_000, what: 'all values encrypted' });
    const { rows } = await db.pool.query('SELECT id, body, octet_length(body) AS len FROM notes ORDER BY id');
    for (const [i, [label, value]] of VALUES.entries()) {
      const r = rows[i];
      expect(r.len, label).toBe(37 + Buffer.byteLength(value));
      const plain = await decryptStored(db.pool, keys.encrypt, col, String(r.id), r.body);
      expect(sha(plain), label).toBe(sha(Buffer.from(value)));
    }
    await waitFor(() => captured.length >= VALUES.length || undefined, { what: 'notifications' });
    for (const p of captured) {
      expect(Buffer.byteLength(p)).toBeLessThan(8000);
      expect(JSON.parse(p)).toEqual({ kind: 'pending' });
      for (const [, value] of VALUES) expect(p).not.toContain(value.slice(0, 16));
    }
  });

  it('step 3: non-JSON, unknown-shape and empty payloads are logged and ignored; the listener stays subscribed', async () => {
    const pid = sidecar.listener.backendPid;
    const bad = ['this is not json {', '{"unexpected":["shape"]}', '[1,2,3]', '{"kind":42}', '{"kind":"launch-missiles"}', ''];
    for (const p of bad) await db.pool.query('SELECT pg_notify($1, $2)', ['keyring', p]);
    await db.pool.query(`NOTIFY keyring`); // no payload at all
    const warned = await waitFor(() => {
      const w = logs.filter((l) => l.msg === 'ignored a notification that is not a keyring hint');
      return w.length >= bad.length + 1 ? w : undefined;
    }, { what: 'one warning per bad payload' });
    expect(warned.every((l) => l.level === 'warn')).toBe(true);
    expect(new Set(warned.map((l) => l.problem))).toEqual(new Set([
      'payload is not JSON', 'payload has no string "kind"', 'payload is not a JSON object', 'unknown hint kind', 'empty payload',
    ]));
    const all = JSON.stringify(logs);
    for (const p of bad.filter((x) => x.length > 0)) expect(all).not.toContain(p); // never the payload itself

    expect(sidecar.listener.listening).toBe(true);
    expect(sidecar.listener.backendPid).toBe(pid);
    expect(await sidecar.listener.channels()).toEqual(['keyring']);
    expect(sidecar.healthy).toBe(true);

    await db.pool.query(`INSERT INTO notes_staging (id, body) VALUES (100, 'row-0100 after bad payloads')`);
    await waitFor(async () => (await pendingCount(db.pool)) === 0, { timeoutMs: 5_000, what: 'the normal row' });
    const r = (await db.pool.query('SELECT body FROM notes WHERE id = 100')).rows[0];
    expect((await decryptStored(db.pool, keys.encrypt, col, '100', r.body)).toString()).toBe('row-0100 after bad payloads');
  });
});
