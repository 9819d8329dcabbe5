/**
 * Tenant-scoped blind indexes (DESIGN.md "Blind index": K_col_scope = HKDF(index root,
 * "keyring/bidx/1" || column id || tenant scope)): protect(..., p_tenant_column) makes equal
 * values in two tenants get different terms; lookupTerms({ tenant }) finds a tenant's rows
 * only. End to end: staging view → queue (tenant recorded) → sidecar → terms → lookup.
 */
import pg from 'pg';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { blindIndexTerm, deriveIndexKey, parseKeyHex, parseNormalization } from '../../src/crypto/index.js';
import type { Keyring } from '../../src/lib/keyring.js';
import { openLibrary } from '../helpers/audit.js';
import { createTestDb, type TestDb } from '../helpers/db.js';
import { activateKeys, createSidecarRole, dropRole, newKeys, startSidecar, type TestKeys } from '../helpers/sidecar.js';

let db: TestDb;
let keys: TestKeys;
let kr: Keyring;
let col: number;
const sidecarRole = `kr_sc_tenant_${process.pid}`;
const EMAIL = 'public.accounts.email';

async function q<T extends pg.QueryResultRow = Record<string, unknown>>(sql: string, params: unknown[] = []): Promise<T[]> {
  return (await db.pool.query<T>(sql, params)).rows;
}

beforeAll(async () => {
  db = await createTestDb();
  keys = newKeys();
  await activateKeys(db.pool, keys);
  const url = await createSidecarRole(db.pool, db.url, sidecarRole);
  await q(`CREATE TABLE accounts (id int PRIMARY KEY, org_id uuid NOT NULL, email text)`);
  col = (await q<{ id: number }>(`SELECT keyring.protect('public.accounts', 'email', p_blind_index => true,
    p_normalize => ARRAY['trim', 'lower'], p_tenant_column => 'org_id') AS id`))[0]!.id;
  await q(`INSERT INTO accounts_staging (id, org_id, email) VALUES
           (1, '00000000-0000-4000-8000-00000000000a', 'kari@example.test'),
           (2, '00000000-0000-4000-8000-00000000000b', 'kari@example.test'),
           (3, '00000000-0000-4000-8000-00000000000a', '  KARI@Example.TEST '),
           (4, '00000000-0000-4000-8000-00000000000b', 'ola@example.test')`);
  const s = await startSidecar(url, keys);
  await s.drain();
  await s.stop();
  kr = await openLibrary(db.url, keys);
});
afterAll(async () => {
  await kr?.close();
  await db?.drop();
  await dropRole(sidecarRole);
});

const A = '00000000-0000-4000-8000-00000000000a';
const B = '00000000-0000-4000-8000-00000000000b';

describe('tenant-scoped blind index', () => {
  it('queues each value with its tenant (the staging trigger records org_id as text)', async () => {
    await q(`INSERT INTO accounts_staging (id, org_id, email) VALUES (5, $1, 'queued@example.test')`, [A]);
    expect(await q('SELECT row_key, tenant, subject FROM keyring.pending')).toEqual([{ row_key: '5', tenant: A, subject: null }]);
    await q(`DELETE FROM accounts_staging WHERE id = 5`);
  });

  it('gives equal values different terms in different tenants, equal terms within one', async () => {
    const rows = await q<{ id: number; email_bidx: Buffer }>('SELECT id, email_bidx FROM accounts ORDER BY id');
    const term = (id: number) => rows.find((r) => r.id === id)!.email_bidx;
    expect(term(1).equals(term(2))).toBe(false); // same address, tenants a and b
    expect(term(1).equals(term(3))).toBe(true); // same address after normalisation, same tenant
    expect(new Set(rows.map((r) => r.email_bidx.toString('hex'))).size).toBe(3);
  });

  it('derives the index key per (column, tenant) with HKDF, as DESIGN.md specifies', async () => {
    const root = parseKeyHex(keys.index[0]!, 'index');
    const rows = await q<{ id: number; email_bidx: Buffer }>('SELECT id, email_bidx FROM accounts WHERE id IN (1, 2) ORDER BY id');
    try {
      for (const [i, tenant] of [A, B].entries()) {
        const k = deriveIndexKey(root, col, tenant);
        const expected = blindIndexTerm(k, 1, Buffer.from('kari@example.test'), parseNormalization(['trim', 'lower']), 16, true);
        k.dispose();
        expect(rows[i]!.email_bidx.equals(expected)).toBe(true);
      }
    } finally {
      root.dispose();
    }
  });

  it('lookupTerms({ tenant }) finds that tenant\'s rows only', async () => {
    const find = async (tenant: string, value: string) =>
      (await q<{ id: number }>('SELECT id FROM accounts WHERE email_bidx = ANY($1) ORDER BY id',
        [await kr.lookupTerms(EMAIL, value, { tenant })])).map((r) => r.id);
    expect(await find(A, 'Kari@Example.test')).toEqual([1, 3]);
    expect(await find(B, 'kari@example.test')).toEqual([2]);
    expect(await find(B, 'ola@example.test')).toEqual([4]);
    expect(await find(A, 'ola@example.test')).toEqual([]);
    expect(await find('00000000-0000-4000-8000-00000000000c', 'kari@example.test')).toEqual([]);
    // The tenant is canonicalised like the trigger records it (org_id::text): upper case works.
    expect(await find(A.toUpperCase(), 'kari@example.test')).toEqual([1, 3]);
  });

  it('refuses a lookup without a tenant on a tenant-scoped column', async () => {
    await expect(kr.lookupTerms(EMAIL, 'kari@example.test')).rejects.toMatchObject({ code: 'TENANT_REQUIRED' });
    await expect(kr.lookupTerms(EMAIL, 'kari@example.test', { tenant: 'not-a-uuid' })).rejects.toMatchObject({ code: 'BAD_TENANT' });
  });
});
