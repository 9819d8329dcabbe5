import { parse, type Command } from '../command.js';
import { CliError, usageError } from '../errors.js';
import { fmt, followJobs } from '../job-progress.js';
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
INSTEAD OF triggers, and registers the column with keyring.

A column that already holds values is adopted online: the table stays writable (brief
metadata locks only), the plaintext is set aside and a backfill job, shared by the
running sidecars, moves it into the queue range by range for the sidecars to encrypt,
then drops it. A progress bar follows that job until it ends (Ctrl-C stops watching,
not the job); with --detach the command prints the job id and returns.

Options:
  --blind-index            add <column>_bidx for equality lookups
  --normalize LIST         blind-index normalisation: none | trim,lower,digits,nfc (default none)
  --index-bytes N          blind-index term length in bytes, 4..32 (default 16)
  --classification TEXT    e.g. "L4 Restricted" (default "L3 Confidential")
  --priority N             re-encryption order, lower first (default 100)
  --detach                 do not wait for the backfill of an adopted column`,
  async run(args, env, out) {
    const { values, positionals } = parse(args, {
      'blind-index': { type: 'boolean' },
      normalize: { type: 'string' },
      'index-bytes': { type: 'string' },
      classification: { type: 'string' },
      priority: { type: 'string' },
      detach: { type: 'boolean' },
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
      const id = rows[0]?.id;
      out.line(`protected ${table}.${column} (column id ${id}); write plaintext into ${table}_staging`);
      const { rows: jobs } = await client.query<{ job: string }>(
        `SELECT id::text AS job FROM keyring.jobs WHERE kind = 'backfill' AND column_id = $1 AND state IN ('queued', 'running')`, [id]);
      const job = jobs[0]?.job;
      if (job === undefined) return 0;
      const where = `SELECT * FROM keyring.rotation_progress WHERE job = ${job}`;
      if (values.detach) {
        out.line(`adopting the values already stored: backfill job ${job}; follow with ${where}`);
        return 0;
      }
      const [p] = await followJobs(client, [job], `adopt ${table}.${column}`, 'rows', out);
      if (p!.state === 'failed') throw new CliError('JOB_FAILED', `backfill job ${job} failed: ${p!.error ?? 'no reason recorded'} (${where})`);
      out.line(`adopted ${fmt(Number(p!.done))} value(s) of ${table}.${column} into the queue in ${(p!.seconds ?? 0).toFixed(1)} s; ` +
        'the plaintext column is dropped (SELECT * FROM keyring.status shows what the sidecars still have to encrypt)');
      return 0;
    });
  },
};
