import type pg from 'pg';
import { KeyringError } from '../../crypto/index.js';

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
}

/** One base row: per column (same order as BaseTable.columns) the new envelope and term, or undefined to leave it. */
export interface BaseRowUpdate {
  readonly rowKey: string;
  readonly values: readonly ({ readonly ciphertext: Buffer; readonly term: Buffer | null } | undefined)[];
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
  const shape = JSON.stringify([t.schema, t.table, t.pkColumns, t.pkTypes, t.columns]);
  const hit = sqlCache.get(shape);
  if (hit) return hit;
  const id = (s: string): string => `"${s.replace(/"/g, '""')}"`; // pg's escapeIdentifier
  for (const ty of t.pkTypes) {
    if (!TYPE_RE.test(ty)) throw new KeyringError('BAD_REGISTRY', `keyring: primary key type ${JSON.stringify(ty)} of ${t.schema}.${t.table} is not a type name`);
  }
  const sets: string[] = [];
  const args: string[] = ['$1::text[]'];
  const names: string[] = ['row_key'];
  t.columns.forEach((c, i) => {
    const p = args.length;
    args.push(`$${p + 1}::bool[]`, `$${p + 2}::bytea[]`);
    names.push(`s${i}`, `v${i}`);
    sets.push(`${id(c.column)} = CASE WHEN u.s${i} THEN u.v${i} ELSE t.${id(c.column)} END`);
    if (c.bidxColumn !== null) {
      args.push(`$${p + 3}::bytea[]`);
      names.push(`b${i}`);
      sets.push(`${id(c.bidxColumn)} = CASE WHEN u.s${i} THEN u.b${i} ELSE t.${id(c.bidxColumn)} END`);
    }
  });
  const where = t.pkColumns.length === 1
    ? `t.${id(t.pkColumns[0]!)} = u.row_key::${t.pkTypes[0]}`
    : t.pkColumns.map((c, i) => `t.${id(c)} = (u.row_key::jsonb->>${i})::${t.pkTypes[i]}`).join(' AND ');
  const sql = `UPDATE ${id(t.schema)}.${id(t.table)} AS t SET ${sets.join(', ')}
    FROM unnest(${args.join(', ')}) AS u(${names.join(', ')})
   WHERE ${where}`;
  sqlCache.set(shape, sql);
  return sql;
}

/** The parameter arrays of baseUpdateSql, column-major. */
export function baseUpdateParams(t: BaseTable, rows: readonly BaseRowUpdate[]): unknown[] {
  const params: unknown[] = [rows.map((r) => r.rowKey)];
  t.columns.forEach((c, i) => {
    params.push(rows.map((r) => r.values[i] !== undefined));
    params.push(rows.map((r) => r.values[i]?.ciphertext ?? null));
    if (c.bidxColumn !== null) params.push(rows.map((r) => r.values[i]?.term ?? null));
  });
  return params;
}

/** Writes envelopes and terms of one table's rows; returns the number of rows updated. */
export async function updateBaseRows(client: pg.ClientBase, t: BaseTable, rows: readonly BaseRowUpdate[]): Promise<number> {
  const { rowCount } = await client.query(baseUpdateSql(t), baseUpdateParams(t, rows));
  return rowCount ?? 0;
}
