import type pg from 'pg';

export interface DataKeyRow {
  readonly id: string; // bigint as text
  readonly column_id: number;
  readonly subject: string | null;
  readonly root_version: number;
  readonly wrapped: Buffer | null;
  readonly encryptions: string; // bigint as text
  readonly state: string;
}

/**
 * The active data key of each (column, subject) pair, as committed now. Read once per
 * batch, so a key retired or shredded by another process is never used again.
 */
export async function selectActiveDataKeys(
  client: pg.ClientBase,
  columnIds: readonly number[],
  subjects: readonly (string | null)[],
): Promise<DataKeyRow[]> {
  const { rows } = await client.query<DataKeyRow>(
    `SELECT d.id, d.column_id, d.subject, d.root_version, d.wrapped, d.encryptions, d.state
       FROM keyring.data_keys d
       JOIN unnest($1::int[], $2::text[]) AS u(column_id, subject)
         ON d.column_id = u.column_id AND coalesce(d.subject, '') = coalesce(u.subject, '')
      WHERE d.state = 'active'`,
    [columnIds, subjects],
  );
  return rows;
}
