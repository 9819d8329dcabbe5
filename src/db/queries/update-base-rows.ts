import type pg from 'pg';
import { KeyringError } from '../../crypto/index.js';
import { encodeByteaArray } from '../binary-array.js';

/** One protected column of a table written by a batch. */
export interface BaseColumn {
  readonly column: string;
  readonly bidxColumn: string | null;
}

export interface BaseTable {
  readonly schema: string;
  readonly table: string;
  readonly pkColumns: readonly string[];
  readonly pkTypes: readonly string[];
  /** Protected columns written by this batch, in a fixed order (the SQL is cached per shape). */
  readonly columns: readonly BaseColumn[];
  /**
   * Compare-and-swap (re-encryption): a column is written only where it still holds the
   * value's `expected` bytes, so an application write that raced the batch wins.
   */
  readonly compareAndSwap?: boolean;
}

/** One base row: per column (same order as BaseTable.columns) the new envelope and term, or undefined to leave it. */
export interface BaseRowUpdate {
  readonly rowKey: string;
  readonly values: readonly ({ readonly ciphertext: Buffer; readonly term: Buffer | null; readonly expected?: Buffer } | undefined)[];
}

// format_type() output: names, schema qualification, quoting, modifiers, arrays.
const TYPE_RE = /^[A-Za-z0-9_ ."(),[\]]+$/;
const sqlCache = new Map<string, string>();

/**
 * `UPDATE ... FROM unnest(...)` writing every protected column of a row in one row
 * version, whatever the number of columns (one heap write per row, DESIGN.md write
 * path). A column a row has no value for keeps its current bytes (`CASE WHEN set`).
 */
export function baseUpdateSql(t: BaseTable): string {
  const shape = JSON.stringify([t.schema, t.table, t.pkColumns, t.pkTypes, t.columns, t.compareAndSwap === true]);
  const hit = sqlCache.get(shape);
  if (hit) return hit;
  const id = (s: string): string => `"${s.replace(/"/g, '""')}"`; // pg's escapeIdentifier
  for (const ty of t.pkTypes) {
    if (!TYPE_RE.test(ty)) throw new KeyringError('BAD_REGISTRY', `keyring: primary key type ${JSON.stringify(ty)} of ${t.schema}.${t.table} is not a type name`);
  }
  const sets: string[] = [];
  const args: string[] = ['$1::text[]'];
  const names: string[] = ['row_key'];
  const cas: string[] = [];
  t.columns.forEach((c, i) => {
    const p = args.length;
    args.push(`$${p + 1}::bool[]`, `$${p + 2}::bytea[]`);
    names.push(`s${i}`, `v${i}`);
    // The write path writes only over the placeholder: a queue entry whose row was set to
    // NULL meanwhile (a staging write that could not see the entry yet, e.g. one an
    // adoption range queued in a transaction still open) must not bring the value back.
    // Re-encryption (compare-and-swap on the envelope it read) writes over ciphertext.
    const when = t.compareAndSwap ? `u.s${i}` : `u.s${i} AND t.${id(c.column)} = '\\x00'::bytea`;
    sets.push(`${id(c.column)} = CASE WHEN ${when} THEN u.v${i} ELSE t.${id(c.column)} END`);
    if (c.bidxColumn !== null) {
      args.push(`$${p + 3}::bytea[]`);
      names.push(`b${i}`);
      sets.push(`${id(c.bidxColumn)} = CASE WHEN ${when} THEN u.b${i} ELSE t.${id(c.bidxColumn)} END`);
    }
    if (t.compareAndSwap) {
      args.push(`$${args.length + 1}::bytea[]`);
      names.push(`e${i}`);
      cas.push(` AND (NOT u.s${i} OR t.${id(c.column)} = u.e${i})`);
    }
  });
  const where = t.pkColumns.length === 1
    ? `t.${id(t.pkColumns[0]!)} = u.row_key::${t.pkTypes[0]}`
    : t.pkColumns.map((c, i) => `t.${id(c)} = (u.row_key::jsonb->>${i})::${t.pkTypes[i]}`).join(' AND ');
  const sql = `UPDATE ${id(t.schema)}.${id(t.table)} AS t SET ${sets.join(', ')}
    FROM unnest(${args.join(', ')}) AS u(${names.join(', ')})
   WHERE ${where}${cas.join('')}`;
  sqlCache.set(shape, sql);
  return sql;
}

/**
 * The parameter arrays of baseUpdateSql, column-major. bytea[] parameters are JS arrays
 * of Buffers, or with `binary` single Buffers in the binary array format (no hex).
 */
export function baseUpdateParams(t: BaseTable, rows: readonly BaseRowUpdate[], opts: { binary?: boolean } = {}): unknown[] {
  const bytes = opts.binary ? encodeByteaArray : (v: (Buffer | null)[]) => v;
  const params: unknown[] = [rows.map((r) => r.rowKey)];
  t.columns.forEach((c, i) => {
    params.push(rows.map((r) => r.values[i] !== undefined));
    params.push(bytes(rows.map((r) => r.values[i]?.ciphertext ?? null)));
    if (c.bidxColumn !== null) params.push(bytes(rows.map((r) => r.values[i]?.term ?? null)));
    if (t.compareAndSwap) params.push(bytes(rows.map((r) => r.values[i]?.expected ?? null)));
  });
  return params;
}

/** Envelopes above this size are written one row at a time with binary parameters. */
export const LARGE_ENVELOPE_BYTES = 65_536;

/**
 * The one-row form of baseUpdateSql with scalar parameters: a multi-MiB envelope is sent
 * as its own binary parameter instead of being copied into an array parameter.
 */
function singleRowSql(t: BaseTable): string {
  const n = 1 + t.columns.reduce((acc, c) => acc + (c.bidxColumn === null ? 2 : 3) + (t.compareAndSwap ? 1 : 0), 0);
  let sql = baseUpdateSql(t)
    .replace(/unnest\((.*)\) AS u\((.*)\)/s, (_m, args: string, names: string) => {
      const a = args.split(', ').map((x) => x.replace('[]', ''));
      return `(SELECT ${a.map((x, i) => `${x} AS ${names.split(', ')[i]}`).join(', ')}) AS u`;
    });
  if (!sql.includes(`$${n}`)) throw new Error('singleRowSql: parameter count mismatch');
  return sql;
}

/** Writes envelopes and terms of one table's rows; returns the number of rows updated. */
export async function updateBaseRows(client: pg.ClientBase, t: BaseTable, rows: readonly BaseRowUpdate[]): Promise<number> {
  const isLarge = (r: BaseRowUpdate) => r.values.some((v) => v !== undefined && v.ciphertext.length > LARGE_ENVELOPE_BYTES);
  const small = rows.filter((r) => !isLarge(r));
  let updated = 0;
  if (small.length > 0) updated += (await client.query(baseUpdateSql(t), baseUpdateParams(t, small, { binary: true }))).rowCount ?? 0;
  for (const r of rows.filter(isLarge)) {
    const params = baseUpdateParams(t, [r]).map((p) => (p as unknown[])[0]);
    updated += (await client.query(singleRowSql(t), params)).rowCount ?? 0;
  }
  return updated;
}
