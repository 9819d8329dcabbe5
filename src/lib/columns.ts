import type pg from 'pg';
import { KeyringError } from '../crypto/index.js';

/** A protected column as the library needs it (from keyring.columns). */
export interface ProtectedColumn {
  readonly id: number;
  readonly schema: string;
  readonly table: string;
  readonly column: string;
  readonly dataType: string;
  readonly pkColumns: readonly string[];
  readonly pkTypes: readonly string[];
  readonly bidxColumn: string | null;
  readonly normalize: readonly string[];
  readonly indexBytes: number;
  readonly tenantColumn: string | null;
}

/** Splits 'schema.table.column' ('table.column' means schema public). */
export function splitColumnRef(ref: string): { schema: string; table: string; column: string } {
  const parts = ref.split('.');
  if (parts.length === 2) return { schema: 'public', table: parts[0]!, column: parts[1]! };
  if (parts.length === 3) return { schema: parts[0]!, table: parts[1]!, column: parts[2]! };
  throw new KeyringError('BAD_COLUMN_REF', `keyring: '${ref}' is not a column reference; write schema.table.column`);
}

export async function loadColumn(client: pg.Pool | pg.ClientBase, ref: string): Promise<ProtectedColumn> {
  const { schema, table, column } = splitColumnRef(ref);
  const { rows } = await client.query(
    `SELECT id, table_schema, table_name, column_name, data_type, pk_columns::text[] AS pk_columns,
            pk_types, bidx_column, normalize, index_bytes, tenant_column
       FROM keyring.columns WHERE table_schema = $1 AND table_name = $2 AND column_name = $3`,
    [schema, table, column],
  );
  const r = rows[0];
  if (!r) throw new KeyringError('NOT_PROTECTED', `keyring: ${schema}.${table}.${column} is not a protected column`);
  return {
    id: r.id, schema: r.table_schema, table: r.table_name, column: r.column_name, dataType: r.data_type,
    pkColumns: r.pk_columns, pkTypes: r.pk_types, bidxColumn: r.bidx_column, normalize: r.normalize,
    indexBytes: r.index_bytes, tenantColumn: r.tenant_column,
  };
}

/** A text-typed column is encrypted as UTF-8 text; bytea as raw bytes. */
export function isTextType(dataType: string): boolean {
  return dataType !== 'bytea';
}

const q = (id: string) => `"${id.replace(/"/g, '""')}"`;

export function qualified(c: ProtectedColumn): string {
  return `${q(c.schema)}.${q(c.table)}`;
}

export function quoteIdent(id: string): string {
  return q(id);
}

/**
 * SQL that renders the canonical row key of `alias`'s row: pk::text, or a JSON array of
 * the texts for a composite key (docs/write-path.md). Run under the trigger settings.
 */
export function rowKeySql(c: ProtectedColumn, alias: string): string {
  if (c.pkColumns.length === 1) return `${alias}.${q(c.pkColumns[0]!)}::text`;
  return `json_build_array(${c.pkColumns.map((p) => `${alias}.${q(p)}::text`).join(', ')})::text`;
}
