/** Database access for CLI commands: one short-lived client, SQL refusals as one-line CLI errors. */
import pg from 'pg';
import { databaseUrl } from './command.js';
import { CliError } from './errors.js';

/** Runs `fn` on a client connected to DATABASE_URL (application_name names the command in pg_stat_activity). */
export async function withClient<T>(env: NodeJS.ProcessEnv, applicationName: string, fn: (c: pg.Client) => Promise<T>): Promise<T> {
  const client = new pg.Client({ connectionString: databaseUrl(env), application_name: applicationName });
  client.on('error', () => undefined);
  await client.connect();
  try {
    return await fn(client);
  } catch (err) {
    throw asCliError(err);
  } finally {
    await client.end().catch(() => undefined);
  }
}

/**
 * A refusal raised by a keyring SQL function (message, then what to do in the HINT) as
 * one CLI line: `<message> (SQLSTATE 55006). Hint: <hint>`. Other errors pass unchanged.
 */
export function asCliError(err: unknown): unknown {
  if (!(err instanceof pg.DatabaseError) || err.code === undefined) return err;
  const message = err.message.replace(/^keyring: /, '');
  return new CliError(`SQLSTATE_${err.code}`, `${message} (SQLSTATE ${err.code})${err.hint ? `. Hint: ${err.hint}` : ''}`);
}
