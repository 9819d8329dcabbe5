/**
 * C03 — One undecryptable row wedges rotation; rotation must resume after a crash.
 *
 * 1,000 rows under v1 across every registered column (two tables, 500 each). One row's
 * GCM tag is flipped; a second row is moved to a data key wrapped by v3, a registered
 * version whose material nobody holds. v2 is activated and a re-encryption started with
 * batch size 100; a child-process sidecar is SIGKILLed after about 3 batches and a new one
 * started. The job resumes and ends; rows done before the kill keep their bytes; 998 rows
 * end on v2 and decrypt; the corrupt row is quarantined (status view, log, metric)
 * without bytes in any of them; the missing-key row is counted apart and left untouched;
 * claims are bounded (no hot loop); "rows not on v2" returns the two rows; retiring v1
 * is refused.
 */
import { randomBytes } from 'node:crypto';
import type pg from 'pg';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createTestDb, type TestDb } from '../helpers/db.js';
import {
  activateKeys, newKeyHex, newKeys, openKeyring, registerKey, sidecarEnv, spawnReadySidecar, killSpawned, stopSpawned, waitFor,
  type SpawnedSidecar, type TestKeys,
} from '../helpers/sidecar.js';
import { fingerprint, pgError } from '../helpers/sql.js';

const q = async <T extends Record<string, unknown> = Record<string, unknown>>(pool: pg.Pool, sql: string, params: unknown[] = []) =>
  (await pool.query<T>(sql, params)).rows;

let db: TestDb;
let keys: TestKeys;
const v2 = newKeyHex();
const children: SpawnedSidecar[] = [];
// Late in the first job's pass, so that the restarted sidecar meets it (its metric is checked).
const CORRUPT = { table: 'cards', id: 480 };
const MISSING = { table: 'notes', id: 77 };

/** Every value of every registered column with the encrypt version of its data key. */
const ALL_VALUES = `
  SELECT 'cards' AS t, c.id, c.pan AS ct, d.root_version AS v FROM cards c JOIN keyring.data_keys d ON d.id = keyring.data_key_id(c.pan)
  UNION ALL
  SELECT 'notes', n.id, n.body, d.root_version FROM notes n JOIN keyring.data_keys d ON d.id = keyring.data_key_id(n.body)`;

beforeAll(async () => {
  db = await createTestDb();
  keys = newKeys();
  await activateKeys(db.pool, keys);
  await db.pool.query('CREATE TABLE cards (id int PRIMARY KEY, pan text)');
  await db.pool.query('CREATE TABLE notes (id int PRIMARY KEY, body text)');
  await db.pool.query(`SELECT keyring.protect('public.cards', 'pan')`);
  await db.pool.query(`SELECT keyring.protect('public.notes', 'body')`);
  await db.pool.query(`INSERT INTO cards_staging SELECT g, 'pan-' || g FROM generate_series(1, 500) g`);
  await db.pool.query(`INSERT INTO notes_staging SELECT g, 'note-' || g FROM generate_series(1, 500) g`);
  const s = await spawnReadySidecar(sidecarEnv(db.url, keys, { KEYRING_POLL_INTERVAL_MS: '100' }));
  children.push(s);
  await waitFor(async () => (await q<{ n: number }>(db.pool, 'SELECT count(*)::int AS n FROM keyring.pending'))[0]!.n === 0, { timeoutMs: 30_000 });
  await stopSpawned(s);
});

afterAll(async () => {
  await killSpawned(children);
  await db?.drop();
});

describe('C03: an undecryptable row does not wedge re-encryption, which resumes after SIGKILL', () => {
  it('quarantines the corrupt row, leaves the missing-key row, resumes without rewriting, ends without looping', async () => {
    // 3 (first half). v2 registered by a sidecar holding it, and activated.
    const env = sidecarEnv(db.url, { encrypt: [...keys.encrypt, v2], index: keys.index },
      { KEYRING_POLL_INTERVAL_MS: '100', KEYRING_TEST_BATCH_DELAY_MS: '250' });
    const first = await spawnReadySidecar(env);
    children.push(first);
    await registerKey(db.pool, 'encrypt', v2);
    await db.pool.query(`SELECT keyring.activate_key('encrypt', 2)`);
    // 2. Corrupt one tag byte; move a second row to a data key under v3 (no material anywhere).
    await db.pool.query('ALTER TABLE cards DISABLE TRIGGER USER');
    await db.pool.query(`UPDATE cards SET pan = set_byte(pan, octet_length(pan) - 1, get_byte(pan, octet_length(pan) - 1) # 128) WHERE id = $1`, [CORRUPT.id]);
    await db.pool.query('ALTER TABLE cards ENABLE TRIGGER USER');
    const v3 = (await q<{ v: number }>(db.pool, `SELECT keyring.register_key('encrypt', $1) AS v`, [fingerprint('c03-nobody-holds')]))[0]!.v;
    expect(v3).toBe(3);
    const orphanKey = (await q<{ id: string }>(db.pool,
      `INSERT INTO keyring.data_keys (column_id, subject, root_version, wrapped, state)
       SELECT id, 'c03', 3, $1, 'retired' FROM keyring.columns WHERE table_name = 'notes' RETURNING id::text`, [randomBytes(60)]))[0]!.id;
    await db.pool.query('ALTER TABLE notes DISABLE TRIGGER USER');
    await db.pool.query(`UPDATE notes SET body = overlay(body PLACING int8send($2::bigint) FROM 2 FOR 8) WHERE id = $1`, [MISSING.id, orphanKey]);
    await db.pool.query('ALTER TABLE notes ENABLE TRIGGER USER');
    const untouched = await q<{ t: string; id: number; ct: Buffer }>(db.pool,
      `SELECT 'cards' AS t, id, pan AS ct FROM cards WHERE id = $1 UNION ALL SELECT 'notes', id, body FROM notes WHERE id = $2`, [CORRUPT.id, MISSING.id]);

    // 3. Re-encryption with batch size 100.
    const jobs = (await q<{ ids: string[] }>(db.pool, `SELECT keyring.reencrypt('all', 100)::text[] AS ids`))[0]!.ids;
    expect(jobs).toHaveLength(2);

    // SIGKILL after about 3 batches.
    await waitFor(async () => (await q<{ n: number }>(db.pool, `SELECT coalesce(sum(done + skipped + quarantined + unavailable), 0)::int AS n FROM keyring.jobs`))[0]!.n >= 300,
      { timeoutMs: 30_000, intervalMs: 10, what: '3 batches' });
    first.child.kill('SIGKILL');
    await first.exited;
    const doneBeforeKill = await q<{ t: string; id: number; ct: Buffer }>(db.pool, `SELECT t, id, ct FROM (${ALL_VALUES}) x WHERE v = 2`);
    expect(doneBeforeKill.length).toBeGreaterThanOrEqual(200);
    expect(doneBeforeKill.length).toBeLessThan(998);

    // Restart; the jobs resume from their committed ranges.
    const second = await spawnReadySidecar({ ...env, KEYRING_TEST_BATCH_DELAY_MS: '0' });
    children.push(second);
    const ended = await waitFor(async () => {
      const rows = await q<{ state: string; done: number; skipped: number; quarantined: number; unavailable: number; claims: number; error: string | null }>(db.pool,
        `SELECT state, done::int, skipped::int, quarantined::int, unavailable::int, claims::int, error FROM keyring.jobs WHERE id = ANY($1::bigint[]) ORDER BY id`, [jobs]);
      return rows.every((r) => r.state === 'done' || r.state === 'failed') ? rows : undefined;
    }, { timeoutMs: 60_000, intervalMs: 50, what: 'both jobs to end' });

    // The job ends, with every count where it belongs.
    expect(ended.map((j) => j.state)).toEqual(['done', 'done']);
    expect(ended.reduce((a, j) => a + j.done, 0)).toBe(998);
    expect(ended.reduce((a, j) => a + j.quarantined, 0)).toBe(1);
    expect(ended.reduce((a, j) => a + j.unavailable, 0)).toBe(1);
    expect(ended.find((j) => j.unavailable === 1)!.error).toMatch(/no live sidecar holds/);
    // No hot loop: 6 ranges per job, plus a claim or two per job around the kill and the end.
    for (const j of ended) expect(j.claims).toBeLessThanOrEqual(12);
    // Let the sidecar idle a while: the finished jobs are not claimed again.
    const claims = ended.map((j) => j.claims);
    await new Promise((r) => setTimeout(r, 700));
    expect((await q<{ claims: number }>(db.pool, 'SELECT claims::int FROM keyring.jobs WHERE id = ANY($1::bigint[]) ORDER BY id', [jobs])).map((r) => r.claims)).toEqual(claims);

    // Rows rotated before the kill were not rewritten.
    const now = new Map((await q<{ t: string; id: number; ct: Buffer }>(db.pool, `SELECT t, id, ct FROM (${ALL_VALUES}) x`)).map((r) => [`${r.t}:${r.id}`, r.ct]));
    for (const r of doneBeforeKill) expect(now.get(`${r.t}:${r.id}`), `${r.t}:${r.id}`).toEqual(r.ct);
    // The two problem rows are untouched, byte for byte.
    for (const r of untouched) expect(now.get(`${r.t}:${r.id}`)).toEqual(r.ct);

    // 998 rows on v2, decrypting to the original plaintext (library decrypt path).
    expect((await q<{ n: number }>(db.pool, `SELECT count(*)::int AS n FROM (${ALL_VALUES}) x WHERE v = 2`))[0]!.n).toBe(998);
    const kr = await openKeyring(db.url, { encrypt: [...keys.encrypt, v2], index: keys.index });
    try {
      for (const [ref, prefix, bad] of [['public.cards.pan', 'pan-', CORRUPT.id], ['public.notes.body', 'note-', MISSING.id]] as const) {
        const vals = await kr.decryptColumn(ref);
        for (const v of vals) {
          if (Number(v.rowKey) === bad) expect(v.problem).toBeDefined();
          else expect(v.value, `${ref} ${v.rowKey}`).toBe(`${prefix}${v.rowKey}`);
        }
      }
    } finally {
      await kr.close();
    }

    // Quarantine: status, table, audit, log and metric; never bytes.
    const quarantine = await q(db.pool, `SELECT k.table_name, q.row_key, q.reason FROM keyring.quarantine q JOIN keyring.columns k ON k.id = q.column_id WHERE q.resolved_at IS NULL`);
    expect(quarantine).toEqual([{ table_name: 'cards', row_key: String(CORRUPT.id), reason: 'decrypt_failed' }]);
    const status = await q<{ column_name: string; quarantined: string }>(db.pool, `SELECT DISTINCT column_name::text, quarantined::text FROM keyring.status ORDER BY 1`);
    expect(status).toEqual([{ column_name: 'body', quarantined: '0' }, { column_name: 'pan', quarantined: '1' }]);
    const audit = await q<{ row_key: string; reason: string; detail: Record<string, unknown> }>(db.pool,
      `SELECT row_key, reason, detail FROM keyring.audit_log WHERE action = 'decrypt.failed' AND detail->>'via' = 'reencrypt'`);
    expect(audit).toMatchObject([{ row_key: String(CORRUPT.id), reason: 'auth', detail: { via: 'reencrypt' } }]);
    const logs = [...first.logs, ...second.logs];
    const qlog = logs.filter((l) => l.msg === 'value did not decrypt during re-encryption; quarantined and left as it is');
    expect(qlog).toHaveLength(1);
    expect(qlog[0]).toMatchObject({ rowKey: String(CORRUPT.id), reason: 'auth' });
    const missingLog = logs.filter((l) => typeof l.msg === 'string' && /no live sidecar holds/.test(l.msg as string));
    expect(missingLog.length).toBeGreaterThanOrEqual(1);
    const allLogs = JSON.stringify(logs);
    for (const r of untouched) expect(allLogs).not.toContain(r.ct.toString('hex'));
    expect(allLogs).not.toContain(`pan-${CORRUPT.id}`);
    const metrics = await (await fetch(`http://127.0.0.1:${second.healthPort}/metrics`)).text();
    expect(Number(/keyring_quarantined_total(?:\{[^}]*\})? (\d+)/.exec(metrics)?.[1] ?? '0')).toBe(1);

    // "Rows still on an old version", across every registered column: exactly the two problem rows.
    const left = await q(db.pool, `SELECT t, id, v FROM (${ALL_VALUES}) x WHERE v <> 2 ORDER BY t, id`);
    expect(left).toEqual([{ t: 'cards', id: CORRUPT.id, v: 1 }, { t: 'notes', id: MISSING.id, v: 3 }]);

    // Retiring v1 is refused while anything still references it.
    const err = await pgError(db.pool.query(`SELECT keyring.retire_key('encrypt', 1)`));
    expect(err.code).toBe('55006');
    await stopSpawned(second);
  });
});
