import pg from 'pg';
import { fingerprint, type KeyPurpose } from '../../crypto/index.js';
import { loadConfig } from '../../config.js';
import { disposeMaterial, KEY_PURPOSES } from '../../keys/index.js';
import { parse, type Command } from '../command.js';
import { CliError } from '../errors.js';

export interface InitOutcome {
  readonly purpose: KeyPurpose;
  readonly version: number;
  readonly fingerprint: string;
  readonly action: 'activated' | 'already active';
}

/**
 * Registers and activates the first encrypt and index root key versions. Refuses when
 * a purpose already has an active version other than the given key, or when more than
 * one key per purpose is given (which one is "first" would be a guess).
 */
export async function initKeys(client: pg.ClientBase, fps: Record<KeyPurpose, string[]>): Promise<InitOutcome[]> {
  const out: InitOutcome[] = [];
  for (const purpose of KEY_PURPOSES) {
    const given = fps[purpose];
    if (given.length !== 1) {
      throw new CliError('INIT_KEYS', `init takes exactly one ${purpose} key (got ${given.length}); ` +
        'later versions are added by starting a sidecar with the new key and activating it');
    }
    const fp = given[0]!;
    const active = await client.query<{ version: number; fingerprint: string }>(
      `SELECT version, fingerprint FROM keyring.root_keys WHERE purpose = $1 AND state = 'active'`, [purpose]);
    const current = active.rows[0];
    if (current && current.fingerprint !== fp) {
      throw new CliError('INIT_ALREADY', `${purpose} key version ${current.version} is already active with another key ` +
        `(fingerprint ${current.fingerprint}); init only bootstraps an empty registry`);
    }
    if (current) {
      out.push({ purpose, version: current.version, fingerprint: fp, action: 'already active' });
      continue;
    }
    const { rows } = await client.query<{ v: number }>('SELECT keyring.register_key($1, $2) AS v', [purpose, fp]);
    const version = Number(rows[0]!.v);
    await client.query('SELECT keyring.activate_key($1, $2)', [purpose, version]);
    out.push({ purpose, version, fingerprint: fp, action: 'activated' });
  }
  return out;
}

export const initCommand: Command = {
  name: 'init',
  summary: 'register and activate the first encrypt and index root key versions',
  help: `Usage: keyring init

Reads one encrypt and one index key from KEYRING_ENCRYPT_KEYS / KEYRING_INDEX_KEYS or
KEYRING_KEY_FILE, registers their fingerprints in keyring.root_keys and activates them
as version 1. Only the fingerprints (key check values) reach the database. Running it
again with the same keys changes nothing.`,
  async run(args, env, out) {
    parse(args, {});
    const config = loadConfig(env);
    const fps = {
      encrypt: config.keys.encrypt.map((k) => fingerprint(k.key, 'encrypt')),
      index: config.keys.index.map((k) => fingerprint(k.key, 'index')),
    };
    disposeMaterial(config.keys);
    const client = new pg.Client({ connectionString: config.databaseUrl, application_name: 'keyring init' });
    await client.connect();
    try {
      await client.query('BEGIN');
      const done = await initKeys(client, fps);
      await client.query('COMMIT');
      for (const d of done) out.line(`${d.purpose} key version ${d.version} (fingerprint ${d.fingerprint}): ${d.action}`);
    } catch (err) {
      await client.query('ROLLBACK').catch(() => undefined);
      throw err;
    } finally {
      await client.end();
    }
    return 0;
  },
};
