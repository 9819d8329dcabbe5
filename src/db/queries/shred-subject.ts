import type pg from 'pg';

export interface ShredResult {
  readonly dataKeys: number;
  readonly indexTerms: number;
  readonly queued: number;
}

/** keyring.shred(): destroys every data key of one data subject (crypto-shredding). Audited by the function. */
export async function shredSubject(client: pg.ClientBase, subject: string, reason: string | null): Promise<ShredResult> {
  const { rows } = await client.query<{ data_keys_shredded: string; index_terms_cleared: string; queued_deleted: string }>(
    'SELECT * FROM keyring.shred($1, $2)', [subject, reason]);
  const r = rows[0]!;
  return { dataKeys: Number(r.data_keys_shredded), indexTerms: Number(r.index_terms_cleared), queued: Number(r.queued_deleted) };
}
