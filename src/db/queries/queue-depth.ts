import type pg from 'pg';

/** Values waiting in the queue (for metrics and progress). */
export async function queueDepth(client: pg.ClientBase | pg.Pool): Promise<number> {
  const { rows } = await client.query<{ n: string }>('SELECT count(*) AS n FROM keyring.pending');
  return Number(rows[0]!.n);
}
