/** Database access for CLI commands: one short-lived client, SQL refusals as one-line CLI errors. */
import pg from 'pg';
import { databaseUrl } from './command.js';
import { CliError } from './errors.js';
import { KeyringError } from '../crypto/index.js';
import { loadConfig } from '../config.js';
import { disposeMaterial } from '../keys/index.js';
import { Keyring } from '../lib/keyring.js';

/** Runs `fn` on a client connected to DATABASE_URL (application_name names the command in pg_stat_activity). */
export async function withClient<T>(env: NodeJS.ProcessEnv, applicationName: string, fn: (c: pg.Client) => Promise<T>): Promise<T> {
  const client = new pg.Client({ connectionString: databaseUrl(env), application_name: applicationName });
  client.on('error', () => undefined);
  await client.connect();
  try {
    return await fn(client);
  } catch (err) {
    await recordRefusal(client, err);
    throw asCliError(err);
  } finally {
    await client.end().catch(() => undefined);
  }
}

/**
 * A refused privileged call is an audit event (docs/audit.md "Refused privileged calls"):
 * Postgres refuses the call before the function runs and the transaction rolls back, so
 * the refusal is recorded afterwards, in a new transaction, as this login. Best effort:
 * the refusal itself is what the command reports.
 */
async function recordRefusal(client: pg.Client, err: unknown): Promise<void> {
  if (!(err instanceof pg.DatabaseError) || err.code !== '42501') return;
  const fn = /^permission denied for function (\w+)$/.exec(err.message)?.[1];
  if (!fn) return;
  try {
    await client.query('ROLLBACK'); // a WARNING only, outside a transaction
    await client.query('SELECT keyring.audit_refusal($1)', [fn]);
  } catch {
    // not recorded (older schema, connection lost): the refusal is still reported
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

/**
 * Runs `fn` with a library Keyring opened from the environment's keys (the commands that
 * decrypt: reveal, verify). Key material is zeroed afterwards; a library refusal becomes a
 * one-line CLI error with its stable code.
 */
export async function withKeyring<T>(env: NodeJS.ProcessEnv, fn: (kr: Keyring) => Promise<T>): Promise<T> {
  const config = loadConfig(env);
  try {
    const kr = await Keyring.open({ databaseUrl: config.databaseUrl, keys: config.keys });
    try {
      return await fn(kr);
    } finally {
      await kr.close();
    }
  } catch (err) {
    if (err instanceof KeyringError) throw new CliError(err.code, err.message.replace(/^keyring: /, ''));
    throw err;
  } finally {
    disposeMaterial(config.keys);
  }
}
