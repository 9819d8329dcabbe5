import type pg from 'pg';
import { parse, type Command } from '../command.js';
import { CliError, usageError } from '../errors.js';
import { formatTable } from '../output.js';
import { withClient, withKeyring } from '../sql.js';

interface ColumnRef {
  readonly id: number;
  readonly ref: string;
  readonly schema: string;
  readonly table: string;
  readonly column: string;
  readonly pk: string;
}

const q = (s: string): string => `"${s.replace(/"/g, '""')}"`;

async function columns(c: pg.ClientBase, only: string | undefined): Promise<ColumnRef[]> {
  const { rows } = await c.query<{ id: number; table_schema: string; table_name: string; column_name: string; pk_columns: string[] }>(
    `SELECT id, table_schema, table_name, column_name, pk_columns::text[] AS pk_columns FROM keyring.columns ORDER BY priority, id`);
  const all = rows.map((r) => ({
    id: r.id, ref: `${r.table_schema}.${r.table_name}.${r.column_name}`, schema: r.table_schema, table: r.table_name, column: r.column_name,
    pk: r.pk_columns.length === 1 ? `t.${q(r.pk_columns[0]!)}::text` : `json_build_array(${r.pk_columns.map((p) => `t.${q(p)}::text`).join(', ')})::text`,
  }));
  if (only === undefined) return all;
  const want = only.split('.').length === 2 ? `public.${only}` : only;
  const hit = all.filter((x) => x.ref === want);
  if (hit.length === 0) throw new CliError('NOT_PROTECTED', `${only} is not a protected column (SELECT * FROM keyring.status lists them)`);
  return hit;
}

/** Values of `col` whose data key is wrapped by a retired, destroyed or disabled root version. */
async function onDeadVersions(c: pg.ClientBase, col: ColumnRef): Promise<{ n: number; versions: string }> {
  const { rows } = await c.query<{ n: number; versions: string | null }>(
    `SELECT count(*)::int AS n, string_agg(DISTINCT r.version || ' ' || r.state, ', ') AS versions
       FROM ONLY ${q(col.schema)}.${q(col.table)} t
       JOIN keyring.data_keys d ON d.id = keyring.data_key_id(t.${q(col.column)})
       JOIN keyring.root_keys r ON r.purpose = 'encrypt' AND r.version = d.root_version
      WHERE octet_length(t.${q(col.column)}) >= 37 AND d.state <> 'shredded'
        AND r.state IN ('retired', 'destroyed', 'disabled')`);
  return { n: rows[0]!.n, versions: rows[0]!.versions ?? '' };
}

interface CountMismatch {
  readonly what: string;
  readonly counted: string;
  readonly actual: string;
}

/** Status counters of `col` that differ from a real count of its table (keyring.check_counts). */
async function countMismatches(c: pg.ClientBase, col: ColumnRef): Promise<CountMismatch[]> {
  const { rows } = await c.query<CountMismatch>(
    'SELECT what, counted::text, actual::text FROM keyring.check_counts($1) ORDER BY bucket', [col.id]);
  return rows;
}

export const verifyCommand: Command = {
  name: 'verify',
  summary: 'check that every value decrypts under its recorded version and none depends on a retired, destroyed or disabled one',
  help: `Usage: keyring verify [--sample N] [--column schema.table.column]

For every protected column (or --column): every value (or a random sample of N values
per column) is decrypted through the library's decrypt path (audited as decrypt.batch /
decrypt.failed), and every value's data key is checked against the registry: none may be
wrapped by a retired, destroyed or disabled encrypt root version. Also checks that no
data key created after a version was retired is wrapped under it (a retired key cannot
protect new ciphertext). Queued (not yet encrypted) values and values of shredded
subjects are counted, not errors. Also checks that the status counters (keyring.status)
equal a real count of each table (keyring.check_counts); a mismatch is a problem, and
SELECT keyring.recount(<column id>) repairs it.

Keys come from KEYRING_ENCRYPT_KEYS / KEYRING_INDEX_KEYS or KEYRING_KEY_FILE, the database
from DATABASE_URL. Prints a summary table; exit 1 on any problem.`,
  async run(args, env, out) {
    const { values, positionals } = parse(args, { sample: { type: 'string' }, column: { type: 'string' } }, true);
    if (positionals.length > 0) throw usageError('unexpected argument; use --column schema.table.column');
    const sample = values.sample === undefined ? undefined : Number(values.sample);
    if (sample !== undefined && (!Number.isInteger(sample) || sample < 1)) throw usageError('--sample must be a positive whole number');
    return withKeyring(env, async (kr) => {
      return await withClient(env, 'keyring verify', async (c) => {
        const table: Record<string, unknown>[] = [];
        let problems = 0;
        for (const col of await columns(c, values.column)) {
          let rowKeys: string[] | undefined;
          if (sample !== undefined) {
            const { rows } = await c.query<{ k: string }>(
              `SELECT ${col.pk} AS k FROM ONLY ${q(col.schema)}.${q(col.table)} t WHERE t.${q(col.column)} IS NOT NULL ORDER BY random() LIMIT $1`, [sample]);
            rowKeys = rows.map((r) => r.k);
          }
          // SQL NULLs hold no ciphertext: nothing to verify, and not counted as checked.
          const vals = (await kr.decryptColumn(col.ref, rowKeys ? { rowKeys } : {}))
            .filter((v) => !(v.value === null && v.problem === undefined));
          const failed = vals.filter((v) => v.problem !== undefined && v.problem !== 'pending' && v.problem !== 'erased');
          const dead = await onDeadVersions(c, col);
          const counts = await countMismatches(c, col);
          problems += failed.length + dead.n + counts.length;
          for (const m of counts) {
            out.line(`status counter of ${col.ref} is wrong: ${m.what} counted ${m.counted}, actually ${m.actual} ` +
              `(repair: SELECT keyring.recount(${col.id}))`);
          }
          table.push({
            column: col.ref, checked: vals.length, ok: vals.filter((v) => v.problem === undefined).length,
            queued: vals.filter((v) => v.problem === 'pending').length, erased: vals.filter((v) => v.problem === 'erased').length,
            failed: failed.length, on_dead_version: dead.n, dead_versions: dead.versions, wrong_counters: counts.length,
            first_failures: failed.slice(0, 3).map((f) => `${f.rowKey} (${f.problem})`).join(', '),
          });
        }
        out.line(formatTable(table));
        const { rows: late } = await c.query<{ version: number; n: number }>(
          `SELECT r.version, count(*)::int AS n FROM keyring.data_keys d
             JOIN keyring.root_keys r ON r.purpose = 'encrypt' AND r.version = d.root_version
            WHERE r.retired_at IS NOT NULL AND d.created_at > r.retired_at GROUP BY 1 ORDER BY 1`);
        for (const l of late) out.line(`encrypt key version ${l.version} is retired but wraps ${l.n} data key(s) created after it was retired`);
        problems += late.reduce((a, l) => a + l.n, 0);
        if (problems > 0) {
          throw new CliError('VERIFY_FAILED', `${problems} problem(s): values that do not decrypt, depend on a retired, destroyed or disabled version, ` +
            'data keys made under a retired version, or wrong status counters (see above)');
        }
        out.line('verify: every checked value decrypts and depends only on live key versions');
        return 0;
      });
    });
  },
};
