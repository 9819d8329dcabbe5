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
    out.line(result.applied.length === 0
      ? `keyring schema is up to date (version ${result.version})`
      : `applied ${result.applied.length} migration(s): ${result.applied.join(', ')} (now version ${result.version})`);
    return 0;
  },
};
