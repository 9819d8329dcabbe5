/**
 * bytea[] parameters in PostgreSQL's binary array format (src/db/binary-array.ts), as the
 * sidecar sends envelopes: the server must read back exactly the bytes, NULLs, empty
 * values and an empty array included, and refuse the encoding for another element type.
 */
import { randomBytes } from 'node:crypto';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { encodeByteaArray } from '../../src/db/binary-array.js';
import { createTestDb, type TestDb } from '../helpers/db.js';
import { pgError } from '../helpers/sql.js';

let db: TestDb;
beforeAll(async () => { db = await createTestDb(); });
afterAll(async () => { await db.drop(); });

describe('binary bytea[] parameters', () => {
  it('reach the server byte for byte: values, NULL, empty, large', async () => {
    const values = [randomBytes(48), null, Buffer.alloc(0), randomBytes(70_000), Buffer.from([0]), randomBytes(1)];
    const { rows } = await db.pool.query<{ n: number; nulls: number; sizes: number[]; a: (Buffer | null)[] }>(
      `SELECT cardinality($1::bytea[]) AS n, array_lower($1::bytea[], 1) AS lower,
              (SELECT count(*)::int FROM unnest($1::bytea[]) v WHERE v IS NULL) AS nulls,
              (SELECT array_agg(octet_length(v) ORDER BY o) FROM unnest($1::bytea[]) WITH ORDINALITY AS u(v, o)) AS sizes,
              $1::bytea[] AS a`,
      [encodeByteaArray(values)]);
    expect(rows[0]).toMatchObject({ n: 6, lower: 1, nulls: 1, sizes: [48, null, 0, 70_000, 1, 1] });
    expect(rows[0]!.a).toEqual(values);
  });

  it('an empty array is an empty bytea[]', async () => {
    const { rows } = await db.pool.query<{ n: number; t: string }>(
      `SELECT cardinality($1::bytea[]) AS n, pg_typeof($1::bytea[])::text AS t`, [encodeByteaArray([])]);
    expect(rows[0]).toEqual({ n: 0, t: 'bytea[]' });
  });

  it('is refused as another array type (the element type travels in the encoding)', async () => {
    const e = await pgError(db.pool.query('SELECT $1::text[] AS a', [encodeByteaArray([Buffer.from('x')])]));
    expect(e.code).toBe('42804'); // datatype_mismatch: wrong element type
  });
});
