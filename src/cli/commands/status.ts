import pg from 'pg';
import { formatTable, jsonValue } from '../output.js';
import { databaseUrl, parse, type Command } from '../command.js';

export const statusCommand: Command = {
  name: 'status',
  summary: 'show protected columns, values per key version, queue backlog',
  help: `Usage: keyring status [--json]

Prints keyring.status: per protected column, how many values each encrypt key version
protects, the pending backlog and the age of its oldest entry, quarantined values, and
values still plaintext in a column being adopted (from the status counters).`,
  async run(args, env, out) {
    const { values } = parse(args, { json: { type: 'boolean' } });
    const client = new pg.Client({ connectionString: databaseUrl(env), application_name: 'keyring status' });
    await client.connect();
    try {
      const { rows } = await client.query('SELECT * FROM keyring.status ORDER BY 1, 2, 3');
      out.line(values.json ? JSON.stringify(rows, jsonValue, 2) : formatTable(rows));
    } finally {
      await client.end();
    }
    return 0;
  },
};
