import { runDemo, demoWorkDir, DEFAULT_DEMO_DB, isDemoDatabaseName } from '../../demo/run.js';
import { parse, type Command } from '../command.js';
import { usageError } from '../errors.js';

export const demoCommand: Command = {
  name: 'demo',
  summary: 'encrypt 100,000 synthetic customers end to end (embedded Postgres unless DATABASE_URL)',
  help: `Usage: keyring demo [--rows N] [--database NAME]

Without DATABASE_URL, starts an embedded PostgreSQL with its data in .keyring/postgres.
With DATABASE_URL, uses that server. Either way it drops and (re)creates the database
keyring_demo (or --database NAME), generates DEMO-ONLY keys into .keyring/demo-keys.json (mode 0600),
protects national_id, email, oib, jmbg and iban of a customers table, loads a CSV of
synthetic customers with COPY into customers_staging, runs the sidecar until the queue
is empty, and shows ciphertext, a blind-index lookup, keyring status and a check that
no plaintext identifier is left in the base table or the queue.

Options:
  --rows N          number of customers (default 100000)
  --database NAME   database to drop and create on the server (default ${DEFAULT_DEMO_DB})`,
  async run(args, env, out) {
    const { values } = parse(args, { rows: { type: 'string' }, database: { type: 'string' } });
    const rows = values.rows === undefined ? 100_000 : Number(values.rows);
    if (!Number.isInteger(rows) || rows < 2) throw usageError('--rows must be a whole number of at least 2');
    const database = values.database ?? DEFAULT_DEMO_DB;
    if (!isDemoDatabaseName(database)) throw usageError('--database must be a plain lower-case name (a-z, 0-9, _)');
    return runDemo(env, { rows, workDir: demoWorkDir(process.cwd()), database }, out);
  },
};
