/**
 * Queries of a re-index job (the reindex migration): the rows of a range whose term is
 * not on the target index version, the compare-and-swap that writes new terms, the lock
 * on the index version a term is written under, and the final count of terms left on
 * other versions. Ranges, claims and counters are the re-encryption job's
 * (reencrypt-chunks.ts).
 */
import type pg from 'pg';
import type { ColumnRow } from './select-columns.js';
import { checkTypes, id, orderBy, pkCompare, rowKeyExpr, table, type ChunkRow } from './reencrypt-chunks.js';

export type ReindexColumn = ColumnRow & { readonly subject_column: string | null; readonly tenant_column: string | null };

/** The 2-byte prefix of a term of index version `v` (uint16 big-endian, DESIGN.md "Blind index"). */
export function versionPrefix(v: number): Buffer {
  const b = Buffer.alloc(2);
  b.writeUInt16BE(v, 0);
  return b;
}

export interface TermRow {
  readonly row_key: string;
  readonly ct: Buffer;
  readonly term: Buffer;
  readonly subject: string | null;
  readonly tenant: string | null;
}

/**
 * The rows of a range whose term is on another version than `target` (rows already on
 * it, and rows without a term: NULL values, queued writes, shredded subjects, are not
 * read). `skipQuarantined` leaves out rows with an open quarantine entry (a later pass:
 * they were tried and reported already).
 */
export async function selectStaleTerms(
  client: pg.ClientBase, c: ReindexColumn, chunk: ChunkRow, target: number, skipQuarantined: boolean,
): Promise<TermRow[]> {
  checkTypes(c);
  const params: unknown[] = [versionPrefix(target)];
  const b = `t.${id(c.bidx_column!)}`;
  const conds = [`t.${id(c.column_name)} IS NOT NULL`, `${b} IS NOT NULL`, `substring(${b} FROM 1 FOR 2) <> $1`];
  if (chunk.after_key !== null) { params.push(chunk.after_key); conds.push(pkCompare(c, '>', `$${params.length}`)); }
  if (chunk.last_key !== null) { params.push(chunk.last_key); conds.push(pkCompare(c, '<=', `$${params.length}`)); }
  if (skipQuarantined) {
    params.push(c.id);
    conds.push(`NOT EXISTS (SELECT 1 FROM keyring.quarantine q WHERE q.column_id = $${params.length} AND q.resolved_at IS NULL AND q.row_key = ${rowKeyExpr(c)})`);
  }
  const text = (col: string | null) => (col === null ? 'NULL::text' : `t.${id(col)}::text`);
  const { rows } = await client.query<TermRow>(
    `SELECT ${rowKeyExpr(c)} AS row_key, t.${id(c.column_name)} AS ct, ${b} AS term,
            ${text(c.subject_column)} AS subject, ${text(c.tenant_column)} AS tenant
       FROM ${table(c)} t WHERE ${conds.join(' AND ')} ORDER BY ${orderBy(c)}`, params);
  return rows;
}

export interface TermUpdate {
  readonly rowKey: string;
  /** The new term, or null to remove it (a value whose data key was shredded). */
  readonly term: Buffer | null;
  /** The ciphertext and the term as read: the row is written only if both are unchanged. */
  readonly ct: Buffer;
  readonly old: Buffer;
}

/** Writes new terms (compare-and-swap on ciphertext and old term); returns the rows written. */
export async function updateTerms(client: pg.ClientBase, c: ReindexColumn, updates: readonly TermUpdate[]): Promise<number> {
  if (updates.length === 0) return 0;
  checkTypes(c);
  const b = id(c.bidx_column!);
  const where = c.pk_columns.length === 1
    ? `t.${id(c.pk_columns[0]!)} = u.row_key::${c.pk_types[0]}`
    : c.pk_columns.map((p, i) => `t.${id(p)} = (u.row_key::jsonb->>${i})::${c.pk_types[i]}`).join(' AND ');
  const { rowCount } = await client.query(
    `UPDATE ONLY ${id(c.table_schema)}.${id(c.table_name)} AS t SET ${b} = u.term
       FROM unnest($1::text[], $2::bytea[], $3::bytea[], $4::bytea[]) AS u(row_key, term, ct, old)
      WHERE ${where} AND t.${id(c.column_name)} = u.ct AND t.${b} = u.old`,
    [updates.map((u) => u.rowKey), updates.map((u) => u.term), updates.map((u) => u.ct), updates.map((u) => u.old)]);
  return rowCount ?? 0;
}

/**
 * Share-locks index version `v`'s registry row until the transaction ends; true when it
 * is active. A term of `v` may be written only while this holds: activate_key waits for
 * the lock, so no term of a version that stopped being active is written afterwards.
 */
export async function lockIndexVersion(client: pg.ClientBase, v: number): Promise<boolean> {
  const { rows } = await client.query<{ ok: boolean }>('SELECT keyring.lock_index_version($1) AS ok', [v]);
  return rows[0]?.ok === true;
}

/** Terms of the column on another index version than `target`, rows with an open quarantine entry apart. */
export async function countStaleTerms(client: pg.ClientBase, c: ReindexColumn, target: number): Promise<{ stale: number; quarantined: number }> {
  checkTypes(c);
  const b = `t.${id(c.bidx_column!)}`;
  const { rows: [r] } = await client.query<{ stale: number; quarantined: number }>(
    `SELECT count(*) FILTER (WHERE q.row_key IS NULL)::int AS stale, count(q.row_key)::int AS quarantined
       FROM ${table(c)} t
       LEFT JOIN keyring.quarantine q ON q.column_id = $2 AND q.resolved_at IS NULL AND q.row_key = ${rowKeyExpr(c)}
      WHERE ${b} IS NOT NULL AND substring(${b} FROM 1 FOR 2) <> $1`, [versionPrefix(target), c.id]);
  return r!;
}
