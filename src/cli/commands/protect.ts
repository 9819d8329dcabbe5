import { parse, type Command } from '../command.js';
import { usageError } from '../errors.js';
import { withClient } from '../sql.js';

/** Splits `schema.table.column` (or `table.column`, schema public). */
export function parseColumnRef(ref: string): { table: string; column: string } {
  const parts = ref.split('.');
  if (parts.length === 2) return { table: `public.${parts[0]}`, column: parts[1]! };
  if (parts.length === 3) return { table: `${parts[0]}.${parts[1]}`, column: parts[2]! };
  throw usageError(`'${ref}' is not a column reference; write schema.table.column`);
}

export const protectCommand: Command = {
  name: 'protect',
  summary: 'encrypt a column: ciphertext storage, staging view, optional blind index',
  help: `Usage: keyring protect <schema.table.column> [options]

Turns the column into ciphertext storage (bytea), creates <table>_staging with
INSTEAD OF triggers, and registers the column with keyring. Values already in the
column are queued for the sidecar to encrypt.

Options:
  --blind-index            add <column>_bidx for equality lookups
  --normalize LIST         blind-index normalisation: none | trim,lower,digits,nfc (default none)
  --index-bytes N          blind-index term length in bytes, 4..32 (default 16)
  --classification TEXT    e.g. "L4 Restricted" (default "L3 Confidential")
  --priority N             re-encryption order, lower first (default 100)`,
  async run(args, env, out) {
    const { values, positionals } = parse(args, {
      'blind-index': { type: 'boolean' },
      normalize: { type: 'string' },
      'index-bytes': { type: 'string' },
      classification: { type: 'string' },
      priority: { type: 'string' },
    }, true);
    if (positionals.length !== 1) throw usageError('expected exactly one <schema.table.column>');
    const { table, column } = parseColumnRef(positionals[0]!);
    const indexBytes = values['index-bytes'] === undefined ? 16 : Number(values['index-bytes']);
    if (!Number.isInteger(indexBytes)) throw usageError('--index-bytes must be a whole number');
    const priority = values.priority === undefined ? 100 : Number(values.priority);
    if (!Number.isInteger(priority)) throw usageError('--priority must be a whole number');
    const normalize = (values.normalize ?? 'none').split(',').map((s) => s.trim()).filter(Boolean);
    return withClient(env, 'keyring protect', async (client) => {
      const { rows } = await client.query<{ id: number }>(
        `SELECT keyring.protect($1, $2, p_blind_index => $3, p_normalize => $4, p_index_bytes => $5,
                p_classification => $6, p_priority => $7) AS id`,
        [table, column, values['blind-index'] ?? false, normalize, indexBytes,
          values.classification ?? 'L3 Confidential', priority],
      );
      out.line(`protected ${table}.${column} (column id ${rows[0]?.id}); write plaintext into ${table}_staging`);
      return 0;
    });
  },
};
