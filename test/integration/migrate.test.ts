import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createTestDb, type TestDb } from '../helpers/db.js';
import { migrate, knownSchemaVersion } from '../../src/db/migrate.js';

describe('keyring migrate', () => {
  let db: TestDb;
  beforeAll(async () => { db = await createTestDb(); });
  afterAll(async () => { await db.drop(); });

  it('is idempotent: a second run applies nothing and reports the known version', async () => {
    const again = await migrate(db.url);
    expect(again.applied).toEqual([]);
    expect(again.version).toBe(knownSchemaVersion());
  });

  it('keeps its migrations table in schema keyring, not public', async () => {
    const { rows } = await db.pool.query(
      `SELECT table_schema FROM information_schema.tables WHERE table_name = 'migrations'`);
    expect(rows.map((r) => r.table_schema)).toEqual(['keyring']);
  });
});
