/**
 * The README's rotation runbook, run as written: the numbered commands of "Annual
 * rotation", "Emergency revocation" and "Index root rotation" are extracted from
 * README.md and run in order
 * (`keyring …` in-process, `psql "$DATABASE_URL" -c "…"` as SQL, `keyring sidecar` as a restart of the
 * sidecars with the key file), against a 100,000-row table while an application keeps
 * inserting and updating through the staging view. At the end every value is under the
 * newest version, nothing depends on the old ones, they are destroyed, and every row's
 * latest written value decrypts. From the index section's sidecar restart on, the
 * application also looks rows up by value (lookupTerms, `nid_bidx = ANY($terms)`) with a
 * Keyring opened then, before the activation: no lookup misses; at the end every term is
 * on index version 2 and version 1 is destroyed.
 */
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import pg from 'pg';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { loadConfig } from '../../src/config.js';
import { Keyring } from '../../src/lib/keyring.js';
import type { RootKeyMaterial } from '../../src/keys/index.js';
import { silentLogger } from '../../src/log.js';
import { Sidecar } from '../../sidecar/sidecar.js';
import { runCli } from '../helpers/audit.js';
import { createTestDb, type TestDb } from '../helpers/db.js';
import { waitFor } from '../helpers/sidecar.js';

const README = fileURLToPath(new URL('../../README.md', import.meta.url));
const ROWS = 100_000;
const KEY_FILE_IN_README = '/etc/keyring/keys.json';
/** Rows 1..LOOKED_UP are looked up by value during the index rotation; the writer leaves them alone. */
const LOOKED_UP = 1000;

/** The numbered commands of one runbook subsection, in order: the first `code span` of each item. */
export function runbookSteps(markdown: string, heading: string): string[] {
  const section = markdown.split(/^## /m).find((s) => s.startsWith('Rotation runbook'));
  if (!section) throw new Error('README.md has no "Rotation runbook" section');
  const sub = section.split(/^### /m).find((s) => s.startsWith(heading));
  if (!sub) throw new Error(`the runbook has no "${heading}" subsection`);
  const steps = [...sub.matchAll(/^(\d+)\. `([^`]+)`/gm)];
  steps.forEach((m, i) => { if (Number(m[1]) !== i + 1) throw new Error(`step ${m[1]} of "${heading}" is out of order`); });
  return steps.map((m) => m[2]!);
}

describe('rotation runbook (README.md), under application writes', () => {
  let db: TestDb;
  let dir: string;
  let env: NodeJS.ProcessEnv;
  let sidecars: Sidecar[] = [];
  const app = { pool: undefined as unknown as pg.Pool };
  const expected = new Map<number, string>();

  const startSidecars = async () => {
    const config = loadConfig({
      ...env, KEYRING_HEALTH_PORT: '0', KEYRING_LOG_LEVEL: 'silent', KEYRING_POLL_INTERVAL_MS: '100', KEYRING_BATCH_SIZE: '2000', NODE_ENV: 'test',
    });
    sidecars = await Promise.all([1, 2].map((i) => Sidecar.start({ ...config, instanceId: `${config.instanceId}-${i}` }, { logger: silentLogger() })));
  };
  const stopSidecars = async () => { await Promise.all(sidecars.splice(0).map((s) => s.stop())); };

  beforeAll(async () => {
    db = await createTestDb();
    dir = mkdtempSync(join(tmpdir(), 'keyring-runbook-'));
    const keyFile = join(dir, 'keys.json');
    env = { DATABASE_URL: db.url, KEYRING_KEY_FILE: keyFile, NODE_ENV: 'test' };
    for (const purpose of ['encrypt', 'index']) expect((await runCli(['keygen', '--key-file', keyFile, '--purpose', purpose], env)).code).toBe(0);
    expect((await runCli(['init'], env)).code).toBe(0);
    await db.pool.query('CREATE TABLE customers (id bigint PRIMARY KEY, nid text)');
    await db.pool.query(`SELECT keyring.protect('public.customers', 'nid', p_blind_index => true)`);
    await startSidecars();
    await db.pool.query(`INSERT INTO customers_staging SELECT g, 'nid-' || g FROM generate_series(1, ${ROWS}) g`);
    for (let g = 1; g <= ROWS; g++) expected.set(g, `nid-${g}`);
    await waitFor(async () => (await db.pool.query('SELECT 1 FROM keyring.pending LIMIT 1')).rowCount === 0, { timeoutMs: 60_000, intervalMs: 100 });
    app.pool = new pg.Pool({ connectionString: db.url, max: 2 });
  }, 120_000);

  afterAll(async () => {
    await stopSidecars();
    await app.pool?.end();
    await db?.drop();
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  it('annual rotation then emergency revocation, every step a README command; nothing lost', async () => {
    const readme = readFileSync(README, 'utf8');
    const steps = [...runbookSteps(readme, 'Annual rotation'), ...runbookSteps(readme, 'Emergency revocation')];
    expect(steps.length).toBeGreaterThanOrEqual(12);
    const indexSteps = runbookSteps(readme, 'Index root rotation');
    expect(indexSteps).toContain('keyring rotate index');
    const indexStart = steps.length;
    steps.push(...indexSteps);

    // The application: inserts new rows and updates random ones through the staging view.
    let stop = false;
    let writes = 0;
    let nextId = ROWS + 1;
    const writer = (async () => {
      while (!stop) {
        if (writes % 4 === 0) {
          const id = nextId++;
          await app.pool.query('INSERT INTO customers_staging (id, nid) VALUES ($1, $2)', [id, `new-${id}`]);
          expected.set(id, `new-${id}`);
        } else {
          const id = LOOKED_UP + 1 + Math.floor(Math.random() * (ROWS - LOOKED_UP));
          const v = `upd-${writes}-${id}`;
          await app.pool.query('UPDATE customers_staging SET nid = $2 WHERE id = $1', [id, v]);
          expected.set(id, v);
        }
        writes++;
      }
    })();

    // The application's lookups, from the index section's sidecar restart on (its Keyring
    // is reopened with the new key file then, as the runbook says): rows 1..LOOKED_UP,
    // which the writer never changes, must always be found.
    let lookups = 0;
    const misses: string[] = [];
    let looker: Promise<void> | undefined;
    const lookUp = async (keys: RootKeyMaterial) => {
      const kr = await Keyring.open({ databaseUrl: db.url, keys });
      try {
        while (!stop) {
          const id = 1 + (lookups++ % LOOKED_UP);
          const terms = await kr.lookupTerms('public.customers.nid', `nid-${id}`);
          const { rows } = await app.pool.query<{ id: string }>('SELECT id FROM customers WHERE nid_bidx = ANY($1)', [terms]);
          if (rows.length !== 1 || Number(rows[0]!.id) !== id) misses.push(`${id}: ${rows.length} row(s) with ${terms.length} term(s)`);
        }
      } finally {
        await kr.close();
      }
    };

    const timings: string[] = [];
    try {
      for (const [i, step] of steps.entries()) {
        const t0 = Date.now();
        if (step.startsWith('keyring sidecar')) {
          await stopSidecars();
          await startSidecars();
          if (i >= indexStart && !looker) looker = lookUp(loadConfig(env).keys);
        } else if (step.startsWith('keyring ')) {
          const argv = step.slice('keyring '.length).split(/\s+/).map((a) => (a === KEY_FILE_IN_README ? env.KEYRING_KEY_FILE! : a));
          const r = await runCli(argv, env);
          expect(r.code, `${step}\n${r.stdout}\n${r.stderr}`).toBe(0);
        } else {
          const m = /^psql "\$DATABASE_URL" -c "(.*)"$/.exec(step);
          if (!m) throw new Error(`not a runnable step: ${step}`);
          await db.pool.query(m[1]!);
        }
        timings.push(`${((Date.now() - t0) / 1000).toFixed(1)} s  ${step}`);
      }
    } finally {
      stop = true;
      await writer;
      await looker;
    }
    expect(misses).toEqual([]);
    expect(lookups).toBeGreaterThan(20);
    console.log(`runbook steps with ${writes} concurrent application writes:\n  ${timings.join('\n  ')}`);
    const jobs = (await db.pool.query<{ kind: string; done: string; seconds: number }>(
      `SELECT kind, done, extract(epoch FROM finished_at - started_at)::float8 AS seconds FROM keyring.jobs
        WHERE kind IN ('reencrypt', 'reindex') ORDER BY id`)).rows;
    for (const j of jobs) console.log(`${j.kind} job: ${j.done} values in ${j.seconds.toFixed(2)} s = ${Math.round(Number(j.done) / j.seconds)} values/s`);

    await waitFor(async () => (await db.pool.query('SELECT 1 FROM keyring.pending LIMIT 1')).rowCount === 0, { timeoutMs: 30_000, intervalMs: 50 });
    const inventory = (await db.pool.query<{ version: number; state: string }>(
      `SELECT version, state::text FROM keyring.root_keys WHERE purpose = 'encrypt' ORDER BY version`)).rows;
    expect(inventory).toEqual([{ version: 1, state: 'destroyed' }, { version: 2, state: 'destroyed' }, { version: 3, state: 'active' }]);
    for (const v of [1, 2]) expect((await db.pool.query(`SELECT * FROM keyring.key_dependents('encrypt', $1)`, [v])).rows).toEqual([]);
    const onVersions = (await db.pool.query<{ v: number; n: number }>(
      `SELECT d.root_version AS v, count(*)::int AS n FROM customers c JOIN keyring.data_keys d ON d.id = keyring.data_key_id(c.nid) GROUP BY 1`)).rows;
    expect(onVersions).toEqual([{ v: 3, n: expected.size }]);
    const index = (await db.pool.query<{ version: number; state: string }>(
      `SELECT version, state::text FROM keyring.root_keys WHERE purpose = 'index' ORDER BY version`)).rows;
    expect(index).toEqual([{ version: 1, state: 'destroyed' }, { version: 2, state: 'active' }]);
    const terms = (await db.pool.query<{ v: number; n: number }>(
      `SELECT (get_byte(nid_bidx, 0) << 8 | get_byte(nid_bidx, 1)) AS v, count(*)::int AS n FROM customers GROUP BY 1`)).rows;
    expect(terms).toEqual([{ v: 2, n: expected.size }]);

    const config = loadConfig(env);
    const kr = await Keyring.open({ databaseUrl: db.url, keys: config.keys });
    try {
      const values = await kr.decryptColumn('public.customers.nid');
      expect(values.length).toBe(expected.size);
      let wrong = 0;
      for (const v of values) if (v.value !== expected.get(Number(v.rowKey))) wrong++;
      expect(wrong).toBe(0);
      // Every row is found by its latest value (a sample: lookups cost a round trip each).
      const sample = [...expected].filter((_, k) => k % 97 === 0);
      let missed = 0;
      for (const [id, v] of sample) {
        const { rows } = await db.pool.query<{ id: string }>('SELECT id FROM customers WHERE nid_bidx = ANY($1)', [await kr.lookupTerms('public.customers.nid', v)]);
        if (!rows.some((r) => Number(r.id) === id)) missed++;
      }
      expect(missed).toBe(0);
    } finally {
      await kr.close();
    }
  }, 360_000);
});
