/**
 * C15 — A crashed worker leaves claimed rows stuck.
 *
 * A claim is only row locks (FOR UPDATE SKIP LOCKED) inside the batch's transaction:
 * there is no committed "in progress" status or lease (variant b does not apply, and
 * the test checks that keyring.pending has no such column). When the process dies, its
 * session ends, Postgres releases the locks, and the rows are claimable at once.
 *
 * Real sidecar processes (sidecar/bin.ts) are killed; KEYRING_TEST_BATCH_DELAY_MS (honoured
 * only under NODE_ENV=test) holds each batch open long enough to kill it mid-way.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createTestDb, type TestDb } from '../helpers/db.js';
import {
  activateKeys, columnIdOf, decryptStored, newKeys, pendingCount, sidecarEnv, spawnSidecar, startSidecar, waitFor,
  type SpawnedSidecar, type TestKeys,
} from '../helpers/sidecar.js';

let db: TestDb;
let keys: TestKeys;
let col: number;
const children: SpawnedSidecar[] = [];

/** Queued values that some transaction has locked right now (a batch in hand). */
async function lockedCount(): Promise<number> {
  const c = await db.pool.connect();
  try {
    await c.query('BEGIN');
    const all = (await c.query('SELECT count(*)::int AS n FROM keyring.pending')).rows[0].n;
    const free = (await c.query('SELECT count(*)::int AS n FROM (SELECT id FROM keyring.pending FOR UPDATE SKIP LOCKED) s')).rows[0].n;
    return all - free;
  } finally {
    await c.query('ROLLBACK');
    c.release();
  }
}

async function queue(from: number, to: number): Promise<void> {
  await db.pool.query(
    `INSERT INTO patients_staging (id, ssn) SELECT i, 'SSN-' || lpad(i::text, 5, '0') FROM generate_series($1::int, $2::int) AS i`,
    [from, to]);
}

function spawn(extra: Record<string, string>): SpawnedSidecar {
  // One batch in flight (KEYRING_CONCURRENCY=1): the scenarios count "the batch in hand";
  // with two lanes a second batch may commit between the count and the signal.
  const child = spawnSidecar(sidecarEnv(db.url, keys, { KEYRING_BATCH_SIZE: '100', KEYRING_CONCURRENCY: '1', ...extra }));
  children.push(child);
  return child;
}

beforeAll(async () => {
  db = await createTestDb();
  keys = newKeys();
  await activateKeys(db.pool, keys);
  await db.pool.query('CREATE TABLE patients (id int PRIMARY KEY, ssn text)');
  await db.pool.query(`SELECT keyring.protect('public.patients', 'ssn')`);
  col = await columnIdOf(db.pool, 'patients', 'ssn');
  // One row per ciphertext write: "encrypted exactly once" is one row here per patient.
  await db.pool.query('CREATE TABLE ssn_writes (id int)');
  await db.pool.query(`CREATE FUNCTION log_ssn_write() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER AS $$
    BEGIN IF OLD.ssn IS DISTINCT FROM NEW.ssn AND get_byte(NEW.ssn, 0) = 1 THEN INSERT INTO ssn_writes VALUES (NEW.id); END IF; RETURN NEW; END $$`);
  await db.pool.query('CREATE TRIGGER log_ssn_write AFTER UPDATE ON patients FOR EACH ROW EXECUTE FUNCTION log_ssn_write()');
});
afterAll(async () => {
  for (const c of children) if (c.child.exitCode === null) c.child.kill('SIGKILL');
  await db?.drop();
});

describe('C15 crashed worker', () => {
  it('(b) does not apply: the queue has no lease or in-progress column, a claim is row locks only', async () => {
    const { rows } = await db.pool.query(
      `SELECT column_name FROM information_schema.columns WHERE table_schema = 'keyring' AND table_name = 'pending'`);
    const cols = rows.map((r) => r.column_name as string);
    expect(cols.filter((c) => /lock|lease|claim|worker|progress|owner/.test(c))).toEqual([]);
  });

  it('(a) SIGKILL mid-batch: locks are released at once, a restarted sidecar encrypts every row exactly once', async () => {
    await queue(1, 500);
    const victim = spawn({ KEYRING_TEST_BATCH_DELAY_MS: '1500', KEYRING_INSTANCE_ID: 'victim' });
    await victim.waitForLog((l) => l.msg === 'sidecar ready');
    // Let one batch commit, then kill while the next is in hand (claimed, encrypted, not committed).
    await waitFor(async () => (await pendingCount(db.pool)) <= 400 && (await lockedCount()) > 0, { timeoutMs: 20_000, what: 'a second batch in hand' });
    const doneBeforeKill = 500 - (await pendingCount(db.pool));
    victim.child.kill('SIGKILL');
    expect((await victim.exited).signal).toBe('SIGKILL');
    // Postgres ends the dead session and releases its row locks promptly.
    const t0 = Date.now();
    await waitFor(async () => (await lockedCount()) === 0, { timeoutMs: 5_000, intervalMs: 50, what: 'locks released' });
    expect(Date.now() - t0).toBeLessThan(5_000);
    expect(await pendingCount(db.pool)).toBe(500 - doneBeforeKill); // the killed batch rolled back: nothing lost

    const s = await startSidecar(db.url, keys, { KEYRING_INSTANCE_ID: 'second' });
    try {
      await s.drain();
    } finally {
      await s.stop();
    }
    expect(await pendingCount(db.pool)).toBe(0); // no plaintext left in the queue
    const writes = await db.pool.query('SELECT count(*)::int AS n, count(DISTINCT id)::int AS rows FROM ssn_writes');
    expect(writes.rows[0]).toEqual({ n: 500, rows: 500 }); // each row written exactly once
    const audit = await db.pool.query(
      `SELECT sum((detail->>'count')::int)::int AS n FROM keyring.audit_log WHERE action = 'encrypt.batch' AND column_id = $1`, [col]);
    expect(audit.rows[0].n).toBe(500); // one audited encryption per row
    const enc = await db.pool.query('SELECT sum(encryptions)::int AS n FROM keyring.data_keys WHERE column_id = $1', [col]);
    expect(enc.rows[0].n).toBe(500);
    const { rows } = await db.pool.query('SELECT id, ssn FROM patients ORDER BY id');
    for (const r of rows) {
      const plain = (await decryptStored(db.pool, keys.encrypt, col, String(r.id), r.ssn)).toString();
      expect(plain).toBe(`SSN-${String(r.id).padStart(5, '0')}`); // one layer: the original text
    }
  });

  it('SIGTERM during a batch: the batch finishes and the process exits 0 within the shutdown timeout', async () => {
    await queue(501, 700);
    const child = spawn({ KEYRING_TEST_BATCH_DELAY_MS: '1000', KEYRING_SHUTDOWN_TIMEOUT_MS: '5000', KEYRING_INSTANCE_ID: 'term-finish' });
    await child.waitForLog((l) => l.msg === 'sidecar ready');
    await waitFor(async () => (await lockedCount()) > 0, { timeoutMs: 10_000, what: 'a batch in hand' });
    const t0 = Date.now();
    child.child.kill('SIGTERM');
    const { code } = await child.exited;
    expect(code).toBe(0);
    expect(Date.now() - t0).toBeLessThan(5_000);
    expect(child.logs.find((l) => l.msg === 'sidecar stopped')).toMatchObject({ rolledBack: false });
    expect(await lockedCount()).toBe(0);
    const stopped = await db.pool.query(`SELECT stopped_at IS NOT NULL AS stopped FROM keyring.sidecars WHERE instance_id = 'term-finish'`);
    expect(stopped.rows[0].stopped).toBe(true);
    // What it committed is whole: encrypted rows equal the audited count.
    const done = (await db.pool.query('SELECT count(*)::int AS n FROM ssn_writes WHERE id > 500')).rows[0].n;
    expect(done).toBeGreaterThanOrEqual(100);
    expect(await pendingCount(db.pool)).toBe(200 - done);
  });

  it('SIGTERM with a batch slower than the shutdown timeout: the batch is rolled back and released, exit 0 in time', async () => {
    const before = await pendingCount(db.pool);
    expect(before).toBeGreaterThan(0);
    const child = spawn({ KEYRING_TEST_BATCH_DELAY_MS: '8000', KEYRING_SHUTDOWN_TIMEOUT_MS: '1000', KEYRING_INSTANCE_ID: 'term-rollback' });
    await child.waitForLog((l) => l.msg === 'sidecar ready');
    await waitFor(async () => (await lockedCount()) > 0, { timeoutMs: 10_000, what: 'a batch in hand' });
    const t0 = Date.now();
    child.child.kill('SIGTERM');
    const { code } = await child.exited;
    expect(code).toBe(0);
    expect(Date.now() - t0).toBeLessThan(3_000); // 1 s timeout plus closing
    expect(child.logs.find((l) => l.msg === 'sidecar stopped')).toMatchObject({ rolledBack: true });
    await waitFor(async () => (await lockedCount()) === 0, { timeoutMs: 3_000, what: 'locks released' });
    expect(await pendingCount(db.pool)).toBe(before); // released, not lost

    const s = await startSidecar(db.url, keys);
    try {
      await s.drain();
    } finally {
      await s.stop();
    }
    const writes = await db.pool.query('SELECT count(*)::int AS n, count(DISTINCT id)::int AS rows FROM ssn_writes');
    expect(writes.rows[0]).toEqual({ n: 700, rows: 700 });
  });
});
