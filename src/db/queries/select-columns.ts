import type pg from 'pg';

export interface ColumnRow {
  readonly id: number;
  readonly table_schema: string;
  readonly table_name: string;
  readonly column_name: string;
  readonly data_type: string;
  readonly pk_columns: string[];
  readonly pk_types: string[];
  readonly bidx_column: string | null;
  readonly normalize: string[];
  readonly index_bytes: number;
}

/** Registry rows of the given protected columns. */
export async function selectColumns(client: pg.ClientBase, ids: readonly number[]): Promise<ColumnRow[]> {
  const { rows } = await client.query<ColumnRow>(
    `SELECT id, table_schema, table_name, column_name, data_type, pk_columns::text[] AS pk_columns,
            pk_types, bidx_column, normalize, index_bytes
       FROM keyring.columns WHERE id = ANY($1::int[])`,
    [ids],
  );
  return rows;
}
