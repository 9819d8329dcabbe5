/**
 * The write path end to end: staging view → keyring.pending → sidecar → base row.
 * The sidecar runs as a login role that is only a member of keyring_sidecar.
 */
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import {
  blindIndexTerm, DecryptError, deriveIndexKey, openValue, parseKeyHex, parseNormalization, readDataKeyId, unwrapDataKey,
} from '../../src/crypto/index.js';
import type { Sidecar } from '../../sidecar/sidecar.js';
import { createTestDb, type TestDb } from '../helpers/db.js';
import {
  activateKeys, columnIdOf, createSidecarRole, decryptStored, dropRole, getHealth, newKeys, pendingCount, startSidecar, waitFor,
  type TestKeys,
} from '../helpers/sidecar.js';

let db: TestDb;
let keys: TestKeys;
let url: string;
const role = `kr_sidecar_wp_${process.pid}`;
const running: Sidecar[] = [];
let emailCol: number;
let phoneCol: number;

async function start(extra: Record<string, string> = {}): Promise<Sidecar> {
  const s = await startSidecar(url, keys, extra);
  running.push(s);
  return s;
}

async function stopAll(): Promise<void> {
  await Promise.all(running.splice(0).map((s) => s.stop()));
}

async function insertPeople(n: number, prefix: string): Promise<void> {
  await db.pool.query(
    `INSERT INTO people_staging (name, email, phone, org)
     SELECT 'n' || i, '  ' || $1 || '-' || i || '@Example.TEST ', '+1-555-' || lpad(i::text, 4, '0'), 'org-' || (i % 3)
       FROM generate_series(1, $2) AS i`,
    [prefix, n],
  );
}

beforeAll(async () => {
  db = await createTestDb();
  keys = newKeys();
  await activateKeys(db.pool, keys);
  url = await createSidecarRole(db.pool, db.url, role);
  await db.pool.query(`CREATE TABLE people (id bigserial PRIMARY KEY, name text, email text, phone text, org text)`);
  emailCol = (await db.pool.query(
    `SELECT keyring.protect('public.people', 'email', p_blind_index => true, p_normalize => ARRAY['trim', 'lower'],
                            p_tenant_column => 'org') AS id`)).rows[0].id;
  phoneCol = (await db.pool.query(`SELECT keyring.protect('public.people', 'phone') AS id`)).rows[0].id;
  // One row per UPDATE of a base row, naming the protected columns it changed: shows both
  // "one update per row" and "no value written twice".
  await db.pool.query(`CREATE TABLE row_writes (id bigint, n int NOT NULL DEFAULT 1, cols text[])`);
  await db.pool.query(`CREATE FUNCTION count_write() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER AS $$
    BEGIN
      INSERT INTO row_writes (id, cols) VALUES (NEW.id, array_remove(ARRAY[
        CASE WHEN OLD.email IS DISTINCT FROM NEW.email THEN 'email' END,
        CASE WHEN OLD.phone IS DISTINCT FROM NEW.phone THEN 'phone' END], NULL));
      RETURN NEW;
    END $$`);
  await db.pool.query(`CREATE TRIGGER count_write AFTER UPDATE ON people FOR EACH ROW EXECUTE FUNCTION count_write()`);
});
afterEach(stopAll);
afterAll(async () => {
  await stopAll();
  await db?.drop();
  await dropRole(role);
});

describe('sidecar write path', () => {
  it('encrypts rows written through the staging view: envelopes, exact plaintext, blind index, empty queue', async () => {
    await db.pool.query('TRUNCATE people, row_writes');
    const s = await start();
    expect((await getHealth(s.healthPort)).status).toBe(200);
    await insertPeople(40, 'alpha');
    await s.drain();
    expect(await pendingCount(db.pool)).toBe(0);

    const { rows } = await db.pool.query(
      `SELECT id, email, email_bidx, phone, org, octet_length(email) AS len, get_byte(email, 0) AS fmt FROM people ORDER BY id`);
    expect(rows).toHaveLength(40);
    const indexRoot = parseKeyHex(keys.index[0]!, 'index');
    try {
      for (const [i, r] of rows.entries()) {
        const email = `  alpha-${i + 1}@Example.TEST `;
        expect(r.fmt).toBe(1);
        expect(r.len).toBe(37 + Buffer.byteLength(email));
        expect((await decryptStored(db.pool, keys.encrypt, emailCol, String(r.id), r.email)).toString('utf8')).toBe(email);
        expect((await decryptStored(db.pool, keys.encrypt, phoneCol, String(r.id), r.phone)).toString('utf8'))
          .toBe(`+1-555-${String(i + 1).padStart(4, '0')}`);
        const ik = deriveIndexKey(indexRoot, emailCol, r.org);
        const term = blindIndexTerm(ik, 1, Buffer.from(email), parseNormalization(['trim', 'lower']), 16, true);
        expect(Buffer.compare(r.email_bidx, term)).toBe(0);
        ik.dispose();
      }
    } finally {
      indexRoot.dispose();
    }
    // One sidecar UPDATE per row although the table has two protected columns.
    const writes = await db.pool.query(`SELECT id, sum(n)::int AS n, max(cols::text) AS cols FROM row_writes GROUP BY id`);
    expect(writes.rows).toHaveLength(40);
    expect(writes.rows.every((w) => w.n === 1 && w.cols === '{email,phone}')).toBe(true);
    const metrics = await (await fetch(`http://127.0.0.1:${s.healthPort}/metrics`)).text();
    expect(metrics).toMatch(/keyring_encryptions_total\{root_version="1",instance_id="[^"]+"\} 80/);
  });

  it('two sidecars on one queue never process a row twice', async () => {
    await db.pool.query('TRUNCATE people, row_writes');
    const before = await db.pool.query(
      `SELECT coalesce(sum((detail->>'count')::int), 0)::int AS n FROM keyring.audit_log WHERE action = 'encrypt.batch'`);
    const enc0 = await db.pool.query('SELECT coalesce(sum(encryptions), 0)::int AS n FROM keyring.data_keys');
    const [a, b] = [await start({ KEYRING_BATCH_SIZE: '25', KEYRING_INSTANCE_ID: 'sc-a' }), await start({ KEYRING_BATCH_SIZE: '25', KEYRING_INSTANCE_ID: 'sc-b' })];
    await insertPeople(300, 'beta');
    await Promise.all([a.drain(), b.drain(), a.drain(), b.drain()]);
    await waitFor(async () => (await pendingCount(db.pool)) === 0, { what: 'an empty queue' });

    const audited = await db.pool.query(
      `SELECT coalesce(sum((detail->>'count')::int), 0)::int AS n, count(DISTINCT actor)::int AS actors
         FROM keyring.audit_log WHERE action = 'encrypt.batch'`);
    expect(audited.rows[0].n - before.rows[0].n).toBe(600); // 300 rows × 2 columns
    const enc = await db.pool.query('SELECT sum(encryptions)::int AS n FROM keyring.data_keys');
    expect(enc.rows[0].n - enc0.rows[0].n).toBe(600);
    // Every value written exactly once (a row's two values may land in two batches, or
    // with two sidecars, when the claim boundary falls between them).
    const writes = await db.pool.query(
      `SELECT count(*)::int AS values, max(n)::int AS most
         FROM (SELECT id, c, count(*) AS n FROM row_writes, unnest(cols) AS c GROUP BY id, c) w`);
    expect(writes.rows[0]).toEqual({ values: 600, most: 1 });
    const bad = await db.pool.query(`SELECT count(*)::int AS n FROM people WHERE get_byte(email, 0) <> 1 OR get_byte(phone, 0) <> 1`);
    expect(bad.rows[0].n).toBe(0);
  });

  it('processes rows inserted while no sidecar ran, at start, without a drain call', async () => {
    await db.pool.query('TRUNCATE people, row_writes');
    await insertPeople(30, 'gamma');
    expect(await pendingCount(db.pool)).toBe(60);
    await start({ KEYRING_POLL_INTERVAL_MS: '60000' });
    await waitFor(async () => (await pendingCount(db.pool)) === 0, { timeoutMs: 10_000, what: 'the backlog to drain' });
  });

  it('recovers from pg_terminate_backend on its LISTEN connection and acts on notifications again', async () => {
    // A one-minute poll: only a working LISTEN can explain a fast pickup below.
    const s = await start({ KEYRING_POLL_INTERVAL_MS: '60000', KEYRING_LISTEN_TIMEOUT_MS: '2000' });
    const old = s.listener.backendPid!;
    await insertPeople(1, 'warmup');
    await waitFor(async () => (await pendingCount(db.pool)) === 0, { what: 'warm-up row' });
    await db.pool.query('SELECT pg_terminate_backend($1)', [old]);
    const fresh = await waitFor(() => s.listener.listening && s.listener.backendPid !== old && s.listener.backendPid, { timeoutMs: 15_000, what: 'a new LISTEN backend' });
    expect(await s.listener.channels()).toEqual(['keyring']);
    const alive = await db.pool.query('SELECT count(*)::int AS n FROM pg_stat_activity WHERE pid = $1', [fresh]);
    expect(alive.rows[0].n).toBe(1);
    const t0 = Date.now();
    await insertPeople(5, 'after-kill');
    await waitFor(async () => (await pendingCount(db.pool)) === 0, { timeoutMs: 5_000, what: 'rows after the reconnect' });
    expect(Date.now() - t0).toBeLessThan(5_000);
    expect(s.listener.reconnects).toBe(1);
  });

  it('tampered and moved ciphertexts fail with the same generic DecryptError', async () => {
    await db.pool.query('TRUNCATE people, row_writes');
    const s = await start();
    await insertPeople(2, 'delta');
    await s.drain();
    const { rows } = await db.pool.query('SELECT id, email FROM people ORDER BY id');
    const [r1, r2] = rows;
    const id = readDataKeyId(r1.email);
    const dk = (await db.pool.query('SELECT root_version, wrapped FROM keyring.data_keys WHERE id = $1', [id.toString()])).rows[0];
    const root = parseKeyHex(keys.encrypt[0]!, 'root');
    const dataKey = unwrapDataKey(root, dk.root_version, id, dk.wrapped);
    expect(openValue(dataKey, emailCol, String(r1.id), r1.email).toString()).toBe('  delta-1@Example.TEST ');

    const flipped = Buffer.from(r1.email);
    flipped[30] = flipped[30]! ^ 0x01;
    const errors: unknown[] = [];
    for (const attempt of [
      () => openValue(dataKey, emailCol, String(r1.id), flipped), // one flipped byte
      () => openValue(dataKey, emailCol, String(r2.id), r1.email), // copied to another row
      () => openValue(dataKey, phoneCol, String(r1.id), r1.email), // copied to another column
    ]) {
      try {
        attempt();
        errors.push(undefined);
      } catch (err) {
        errors.push(err);
      }
    }
    for (const e of errors) expect(e).toBeInstanceOf(DecryptError);
    expect(new Set(errors.map((e) => (e as Error).message)).size).toBe(1);
    // In the database too: a value moved to another row does not open there.
    await db.pool.query('UPDATE people SET email = (SELECT email FROM people WHERE id = $1) WHERE id = $2', [r1.id, r2.id]);
    const moved = (await db.pool.query('SELECT email FROM people WHERE id = $1', [r2.id])).rows[0].email;
    await expect(decryptStored(db.pool, keys.encrypt, emailCol, String(r2.id), moved)).rejects.toBeInstanceOf(DecryptError);
    root.dispose();
    dataKey.dispose();
  });

  it('retries a failed batch row by row and quarantines a poison row after 5 attempts, without its value', async () => {
    await db.pool.query('TRUNCATE people, row_writes');
    const s = await start({ KEYRING_POLL_INTERVAL_MS: '60000' });
    await s.drain();
    // A queued value whose row key is not a bigint: the base UPDATE fails for it alone.
    await db.pool.query(`INSERT INTO keyring.pending (column_id, row_key, value) VALUES ($1, 'not-a-number', convert_to('poison-marker', 'UTF8'))`, [phoneCol]);
    await insertPeople(5, 'eps');
    await s.drain(); // (the insert's notification may have started a pass too)
    const first = await db.pool.query('SELECT row_key, attempts, last_error FROM keyring.pending');
    expect(first.rows).toEqual([{ row_key: 'not-a-number', attempts: expect.any(Number), last_error: expect.stringMatching(/^22P02: /) }]);
    expect(first.rows[0].attempts).toBeGreaterThanOrEqual(1);
    expect(first.rows[0].last_error).not.toContain('not-a-number');
    const ok = await db.pool.query(`SELECT count(*)::int AS n FROM people WHERE get_byte(email, 0) = 1 AND get_byte(phone, 0) = 1`);
    expect(ok.rows[0].n).toBe(5); // the good rows of the failed batch went through
    // One attempt per pass: at most 5 passes quarantine it, and it never comes back.
    for (let i = 0; i < 5; i++) await s.drain();
    expect(await pendingCount(db.pool)).toBe(0);
    const q = await db.pool.query('SELECT column_id, row_key, reason, detail FROM keyring.quarantine');
    expect(q.rows).toEqual([{ column_id: phoneCol, row_key: 'not-a-number', reason: 'encrypt_failed', detail: expect.stringMatching(/^22P02/) }]);
    const audit = await db.pool.query(`SELECT detail::text AS d FROM keyring.audit_log WHERE action = 'encrypt.quarantined'`);
    expect(audit.rows).toHaveLength(1);
    expect(audit.rows[0].d).not.toContain('poison-marker');
    expect(await (await fetch(`http://127.0.0.1:${s.healthPort}/metrics`)).text()).toMatch(/keyring_quarantined_total\{[^}]*\} 1/);
    // Queued and failing again while the first entry is still open: one open entry, refreshed.
    await db.pool.query(`INSERT INTO keyring.pending (column_id, row_key, value) VALUES ($1, 'not-a-number', convert_to('poison-marker', 'UTF8'))`, [phoneCol]);
    for (let i = 0; i < 5; i++) await s.drain();
    expect(await pendingCount(db.pool)).toBe(0);
    expect((await db.pool.query('SELECT count(*)::int AS n FROM keyring.quarantine WHERE resolved_at IS NULL')).rows[0].n).toBe(1);
  });

  it('starts a new data key when the active one reaches its encryption bound', async () => {
    await db.pool.query('TRUNCATE people, row_writes');
    await db.pool.query(`UPDATE keyring.settings SET value = '10' WHERE name = 'data_key_max_encryptions'`);
    const last = (await db.pool.query('SELECT coalesce(max(id), 0)::text AS id FROM keyring.data_keys')).rows[0].id;
    try {
      const s = await start({ KEYRING_BATCH_SIZE: '4' });
      await insertPeople(25, 'zeta');
      await s.drain();
      const { rows } = await db.pool.query(
        `SELECT max(encryptions)::int AS most, count(*) FILTER (WHERE state = 'active')::int AS active
           FROM keyring.data_keys WHERE column_id = $1 AND id > $2`, [phoneCol, last]);
      expect(rows[0].most).toBeLessThanOrEqual(10);
      expect(rows[0].active).toBe(1);
      const spread = await db.pool.query(
        `SELECT count(DISTINCT keyring.data_key_id(phone))::int AS n FROM people`);
      expect(spread.rows[0].n).toBeGreaterThanOrEqual(3);
    } finally {
      await db.pool.query(`UPDATE keyring.settings SET value = '4294967296' WHERE name = 'data_key_max_encryptions'`);
    }
  });

  it('refuses to start against a schema newer than it knows, or none', async () => {
    await db.pool.query(`INSERT INTO keyring.migrations (id, name, hash) VALUES (999, '00999_future', 'x')`);
    try {
      await expect(startSidecar(url, keys)).rejects.toMatchObject({ code: 'SCHEMA_TOO_NEW', message: expect.stringContaining('version 999') });
    } finally {
      await db.pool.query('DELETE FROM keyring.migrations WHERE id = 999');
    }
    // A database without the keyring schema.
    const name = `${db.name}_empty`;
    await db.pool.query(`CREATE DATABASE ${name} TEMPLATE template0`);
    try {
      const u = new URL(url);
      u.pathname = `/${name}`;
      await expect(startSidecar(u.toString(), keys)).rejects.toMatchObject({ code: 'SCHEMA_MISSING', message: expect.stringContaining('keyring migrate') });
    } finally {
      await db.pool.query(`DROP DATABASE ${name} WITH (FORCE)`);
    }
  });
});
