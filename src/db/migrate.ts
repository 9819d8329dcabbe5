import { fileURLToPath } from 'node:url';
import { dirname, join } from 'node:path';
import { readdirSync } from 'node:fs';
import pg from 'pg';
import { migrate as runMigrations } from 'postgres-migrations';

/** Folder holding the numbered SQL migrations (never edited once released). */
export const MIGRATIONS_DIR = join(dirname(fileURLToPath(import.meta.url)), '..', '..', 'sql', 'migrations');

/** Advisory lock key held for the whole `keyring migrate` run (one migrator per database). */
const MIGRATE_LOCK = 7263548196044562n;

/** The newest migration id this build knows; the sidecar refuses a newer schema. */
export function knownSchemaVersion(dir: string = MIGRATIONS_DIR): number {
  const ids = readdirSync(dir)
    .map((f) => /^(\d+)[_-]/.exec(f)?.[1])
    .filter((s): s is string => s !== undefined)
    .map(Number);
  return Math.max(0, ...ids);
}

/** The newest migration applied to the database, 0 when keyring was never installed. */
export async function appliedSchemaVersion(client: pg.ClientBase): Promise<number> {
  // Two statements: a subquery naming keyring.migrations would fail at plan time on a
  // database where keyring was never installed, whatever CASE guards it.
  const exists = await client.query<{ t: string | null }>(`SELECT to_regclass('keyring.migrations')::text AS t`);
  if (!exists.rows[0]?.t) return 0;
  const { rows } = await client.query<{ v: number | null }>('SELECT max(id) AS v FROM keyring.migrations');
  return Number(rows[0]?.v ?? 0);
}

export interface MigrateResult {
  readonly applied: string[];
  readonly version: number;
}

/**
 * Applies pending migrations under an advisory lock, so that concurrent runs (several
 * sidecars starting at once, CI in parallel) are safe, and a re-run is a no-op.
 *
 * Before running, INVALID indexes left in schema keyring by a failed
 * `CREATE INDEX CONCURRENTLY` are dropped, so that a re-run after fixing the data
 * succeeds with no manual cleanup (case C16).
 */
export async function migrate(databaseUrl: string, dir: string = MIGRATIONS_DIR): Promise<MigrateResult> {
  const client = new pg.Client({
    connectionString: databaseUrl,
    // The migrations table lives in schema keyring, not public, where an application
    // may well have a table called "migrations" of its own.
    options: '-c search_path=keyring -c lock_timeout=10s',
    application_name: 'keyring migrate',
  });
  client.on('error', () => undefined);
  await client.connect();
  try {
    // Poll rather than block: a session waiting in pg_advisory_lock() holds a snapshot,
    // and CREATE INDEX CONCURRENTLY in the migrator that holds the lock waits for every
    // older snapshot, so a blocked second migrator would deadlock with the first.
    for (let wait = 50; ; wait = Math.min(wait * 2, 1000)) {
      const { rows } = await client.query<{ ok: boolean }>('SELECT pg_try_advisory_lock($1) AS ok', [MIGRATE_LOCK.toString()]);
      if (rows[0]?.ok) break;
      await new Promise((r) => setTimeout(r, wait + Math.random() * wait));
    }
    try {
      await client.query('CREATE SCHEMA IF NOT EXISTS keyring');
      // Same DDL as postgres-migrations' own first step, created here so that its
      // relname-only existence check can never find another schema's "migrations".
      await client.query(`CREATE TABLE IF NOT EXISTS keyring.migrations (
        id integer PRIMARY KEY, name varchar(100) UNIQUE NOT NULL,
        hash varchar(40) NOT NULL, executed_at timestamp DEFAULT current_timestamp)`);
      const invalid = await client.query<{ idx: string }>(
        `SELECT format('%I.%I', n.nspname, c.relname) AS idx
           FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
           JOIN pg_namespace n ON n.oid = c.relnamespace
          WHERE NOT i.indisvalid AND n.nspname = 'keyring'`,
      );
      for (const { idx } of invalid.rows) await client.query(`DROP INDEX CONCURRENTLY IF EXISTS ${idx}`);
      const done = await runMigrations({ client }, dir, { logger: () => undefined });
      return { applied: done.map((m) => m.name), version: await appliedSchemaVersion(client) };
    } finally {
      await client.query('SELECT pg_advisory_unlock($1)', [MIGRATE_LOCK.toString()]);
    }
  } finally {
    await client.end();
  }
}
