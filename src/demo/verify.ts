/**
 * The demo's plaintext check: streams the base table and the queue out of the database
 * and searches them for every identifier that went in.
 */
import { createInterface } from 'node:readline';
import type pg from 'pg';
import { to as copyTo } from 'pg-copy-streams';
import type { Customer } from './generate.js';

export interface ScanResult {
  readonly identifiers: number;
  readonly rowsScanned: number;
  readonly queueRows: number;
  /** Identifiers found as a whole field anywhere, or inside their own row's bytes. */
  readonly found: number;
  readonly envelopes: number;
  readonly badEnvelopes: number;
}

const FIELD: Record<string, keyof Customer> = {
  national_id: 'nationalId', email: 'email', oib: 'oib', jmbg: 'jmbg', iban: 'iban',
};

async function* copyLines(client: pg.PoolClient, sql: string): AsyncGenerator<string> {
  const stream = client.query(copyTo(`COPY (${sql}) TO STDOUT`));
  yield* createInterface({ input: stream, crlfDelay: Infinity });
}

/** COPY text format renders bytea as \\x<hex>. */
function byteaField(field: string): Buffer | null {
  return field.startsWith('\\\\x') ? Buffer.from(field.slice(3), 'hex') : null;
}

/**
 * Checks, for every customer: each protected column holds a format-1 envelope whose
 * length is exactly 37 + the plaintext's UTF-8 length; no field anywhere equals any
 * identifier; and none of the row's own identifiers occurs inside its bytes. The queue
 * is checked for every identifier too.
 */
export async function scanForPlaintext(
  pool: pg.Pool, customers: Iterable<Customer>, columns: readonly string[],
): Promise<ScanResult> {
  const all = new Set<string>();
  const byId = new Map<number, Customer>();
  for (const c of customers) {
    byId.set(c.id, c);
    for (const col of columns) all.add(String(c[FIELD[col]!]));
  }
  const client = await pool.connect();
  let found = 0, rowsScanned = 0, queueRows = 0, envelopes = 0, badEnvelopes = 0;
  try {
    for await (const line of copyLines(client, `SELECT * FROM public.customers ORDER BY id`)) {
      rowsScanned++;
      const fields = line.split('\t');
      for (const f of fields) if (all.has(f)) found++;
      const c = byId.get(Number(fields[0]));
      if (!c) continue;
      const own = columns.map((col) => Buffer.from(String(c[FIELD[col]!]), 'utf8'));
      const bytes = fields.map(byteaField).filter((b): b is Buffer => b !== null);
      for (const b of bytes) for (const id of own) if (b.includes(id)) found++;
      for (const id of own) if (line.includes(id.toString('utf8'))) found++;
    }
    for await (const line of copyLines(client,
      `SELECT id, ${columns.map((c) => `octet_length("${c}")`).join(', ')}, ${columns.map((c) => `get_byte("${c}", 0)`).join(', ')}
         FROM public.customers ORDER BY id`)) {
      const f = line.split('\t');
      const c = byId.get(Number(f[0]));
      if (!c) continue;
      columns.forEach((col, i) => {
        const len = Number(f[1 + i]);
        const first = Number(f[1 + columns.length + i]);
        const expected = 37 + Buffer.byteLength(String(c[FIELD[col]!]), 'utf8');
        if (first === 1 && len === expected) envelopes++;
        else badEnvelopes++;
      });
    }
    for await (const line of copyLines(client, 'SELECT * FROM keyring.pending')) {
      queueRows++;
      for (const f of line.split('\t')) if (all.has(f)) found++;
      for (const id of all) if (line.includes(id)) { found++; break; }
    }
  } finally {
    client.release();
  }
  return { identifiers: all.size, rowsScanned, queueRows, found, envelopes, badEnvelopes };
}
