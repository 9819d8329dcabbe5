import { migrate } from '../../db/migrate.js';
import { databaseUrl, parse, type Command } from '../command.js';

export const migrateCommand: Command = {
  name: 'migrate',
  summary: 'install or upgrade the keyring schema (safe to run concurrently, idempotent)',
  help: `Usage: keyring migrate

Applies the SQL migrations in sql/migrations to DATABASE_URL under an advisory lock.
A second run applies nothing. Needs a role that may create schemas and roles.`,
  async run(args, env, out) {
    parse(args, {});
    const result = await migrate(databaseUrl(env));
    // postgres-migrations counts its own bookkeeping step (id 0) as a migration.
    const applied = result.applied.filter((n) => n !== 'create-migrations-table');
    out.line(applied.length === 0
      ? `keyring schema is up to date (version ${result.version})`
      : `applied ${applied.length} migration(s): ${applied.join(', ')} (now version ${result.version})`);
    return 0;
  },
};
