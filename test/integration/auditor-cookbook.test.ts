/**
 * README.md "Auditor's cookbook": every SQL block is read from the README and run as a
 * login that is a member of keyring_auditor only, on a database with some history (keys,
 * encryptions, reveals, a refused reveal, decryption failures, a shred). README and schema
 * cannot drift apart: a query that no longer runs, or that an auditor may not run, fails here.
 */
import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import pg from 'pg';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createTestDb, type TestDb } from '../helpers/db.js';
import { loginRoleUrl } from '../helpers/roles.js';
import { fingerprint, splitStatements } from '../helpers/sql.js';

const README = fileURLToPath(new URL('../../README.md', import.meta.url));

/** The ```sql blocks of the README section whose heading is `heading`. */
function sqlBlocksOf(markdown: string, heading: string): string[] {
  const start = markdown.indexOf(`\n## ${heading}\n`);
  if (start < 0) throw new Error(`README.md has no section "## ${heading}"`);
  const next = markdown.indexOf('\n## ', start + 4);
  const section = markdown.slice(start, next < 0 ? undefined : next);
  return [...section.matchAll(/```sql\n([\s\S]*?)```/g)].map((m) => m[1]!.trim());
}

let db: TestDb;
let auditor: pg.Client;
const blocks = sqlBlocksOf(readFileSync(README, 'utf8'), "Auditor's cookbook");

beforeAll(async () => {
  db = await createTestDb();
  const q = (sql: string, params: unknown[] = []) => db.pool.query(sql, params);
  await q(`SELECT keyring.register_key('encrypt', $1)`, [fingerprint('cookbook-enc-1')]);
  await q(`SELECT keyring.activate_key('encrypt', 1)`);
  await q(`CREATE TABLE customers (id int PRIMARY KEY, customer_id text, national_id text)`);
  const col = (await q(`SELECT keyring.protect('customers', 'national_id', p_subject_column => 'customer_id') AS id`)).rows[0].id;
  await q(`UPDATE keyring.settings SET value = 'alice' WHERE name = 'reveal_actors'`);
  await q(`SELECT keyring.audit_append('encrypt.batch', 'sidecar-1', 'encrypt', 1, $1, p_detail => '{"count": 3}')`, [col]);
  await q(`SELECT keyring.audit_append('decrypt.batch', 'nightly-export', 'encrypt', 1, $1, p_detail => '{"count": 3}')`, [col]);
  await q(`SELECT keyring.audit_reveal('alice', $1, '1', 'case 2024-118', p_key_version => 1)`, [col]);
  await q(`SELECT keyring.audit_reveal('mallory', $1, '1', 'curious')`, [col]);
  for (let i = 0; i < 4; i++) {
    await q(`SELECT keyring.audit_append('decrypt.failed', 'mallory', 'encrypt', 1, $1, '2', 'auth')`, [col]);
  }
  await q(`SELECT keyring.shred('42', 'GDPR Art. 17 request 118')`);
  auditor = new pg.Client({ connectionString: await loginRoleUrl(db.url, 'keyring_test_auditor', 'keyring_auditor') });
  await auditor.connect();
});
afterAll(async () => {
  await auditor?.end();
  await db?.drop();
});

describe("README: Auditor's cookbook", () => {
  it('has its queries', () => {
    expect(blocks.length).toBeGreaterThanOrEqual(10);
  });

  it.each(blocks.map((b) => [b.split('\n')[0]!, b]))('runs as keyring_auditor: %s', async (_title, block) => {
    for (const sql of splitStatements(block)) {
      const res = await auditor.query(sql);
      expect(Array.isArray(res.rows)).toBe(true);
    }
  });

  it('answers from the history: chain intact, the reveal, the refusal, the compromise report, the alerts, the erasure', async () => {
    const run = async (needle: string) => {
      const block = blocks.find((b) => b.includes(needle));
      if (!block) throw new Error(`no cookbook query contains ${needle}`);
      return (await auditor.query(splitStatements(block).at(-1)!)).rows;
    };
    expect(await run('verify_audit_chain')).toEqual([]);
    expect(await run(`action = 'reveal' AND`)).toMatchObject([{ actor: 'alice', column: 'public.customers.national_id', purpose: 'case 2024-118' }]);
    expect(await run(`'reveal.refused'`)).toMatchObject([{ actor: 'mallory', refusal: 'actor_not_allowed' }]);
    const report = await run('compromise_report');
    expect(report.map((r) => [r.action, r.actor, r.events, r.values])).toEqual([
      ['decrypt.batch', 'nightly-export', '1', '3'], ['decrypt.failed', 'mallory', '4', '4'], ['reveal', 'alice', '1', '1'],
    ]);
    const kinds = (await run('keyring.alerts')).map((r) => r.kind);
    expect(kinds).toEqual(expect.arrayContaining(['decrypt_failures', 'reveal_actor_not_allowed']));
    expect(await run(`'subject.shredded'`)).toMatchObject([{ subject: '42', reason: 'GDPR Art. 17 request 118', data_keys: 0 }]);
  });
});
