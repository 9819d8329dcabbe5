/**
 * Type round-trip through the write path, shared by C17 and test/integration/write-path-types:
 * one protected column per type, values written through the staging views by the
 * application role in a session with a non-UTC TimeZone, encrypted by a sidecar PROCESS
 * running under a given TZ, then read back through the system decrypt path (Keyring) and
 * compared in SQL with Postgres' own text of the original.
 */
import { readFileSync } from 'node:fs';
import pg from 'pg';
import type { Keyring } from '../../src/lib/keyring.js';
import { appRoleUrl } from './roles.js';
import {
  pendingCount, sidecarEnv, spawnReadySidecar, stopSpawned, waitFor, type TestKeys,
} from './sidecar.js';

export interface TypeCase {
  /** The column type as declared on the base table, e.g. `numeric(12,4)`. */
  readonly type: string;
  /** Input literals, given to Postgres as text and cast to `type` by the writer's session. */
  readonly values: readonly string[];
}

/** Table name for a type: rt_numeric_12_4, rt_character_varying_20, ... */
export function typeTable(type: string): string {
  return `rt_${type.replace(/[^a-z0-9]+/gi, '_').replace(/_+$/, '').toLowerCase()}`;
}

/**
 * One table per type, `(id int PRIMARY KEY, v <type>)`, with v protected and blind-indexed
 * (no normalisation). Returns the registry id of each column by type.
 */
export async function createTypeTables(pool: pg.Pool, cases: readonly TypeCase[]): Promise<Map<string, number>> {
  // The canonical text of a value read in the CALLER's session: the argument is parsed
  // there (a timestamptz without offset in the caller's zone), the function body renders
  // it under the trigger settings — the way the staging triggers do it.
  await pool.query(`CREATE FUNCTION public.kt_canonical_text(v anyelement) RETURNS text LANGUAGE plpgsql
    SET TimeZone = 'UTC' SET DateStyle = 'ISO, YMD' SET IntervalStyle = 'postgres' SET extra_float_digits = 3
    AS $$ BEGIN RETURN v::text; END $$`);
  const ids = new Map<string, number>();
  for (const c of cases) {
    const t = typeTable(c.type);
    await pool.query(`CREATE TABLE ${t} (id int PRIMARY KEY, v ${c.type})`);
    const { rows } = await pool.query<{ id: number }>(`SELECT keyring.protect('public.${t}', 'v', p_blind_index => true) AS id`);
    ids.set(c.type, rows[0]!.id);
  }
  return ids;
}

/** A client logged in as the application role with the given session settings (e.g. `-c TimeZone=...`). */
export async function connectAppWith(dbUrl: string, options: string): Promise<pg.Client> {
  const client = new pg.Client({ connectionString: await appRoleUrl(dbUrl), options });
  client.on('error', () => undefined);
  await client.connect();
  return client;
}

/** Inserts value i of each case as row `idBase + i` through the staging views. */
export async function insertCases(writer: pg.ClientBase, cases: readonly TypeCase[], idBase: number): Promise<void> {
  for (const c of cases) {
    for (const [i, v] of c.values.entries()) {
      await writer.query(`INSERT INTO ${typeTable(c.type)}_staging (id, v) VALUES ($1, $2::${c.type})`, [idBase + i, v]);
    }
  }
}

/**
 * Runs a sidecar process with `TZ=tz` until the queue is empty, then stops it with
 * SIGTERM (expects exit 0). Returns its instance id (the actor of its audit rows).
 */
export async function encryptWithSidecarInTz(
  dbUrl: string, pool: pg.Pool, keys: TestKeys, tz: string,
): Promise<{ instanceId: string; tzSeen: string | undefined; exitCode: number | null }> {
  const instanceId = `tz-${tz.replace(/[^A-Za-z0-9]+/g, '-').toLowerCase()}-${process.pid}-${Date.now()}`;
  const s = await spawnReadySidecar(sidecarEnv(dbUrl, keys, { TZ: tz, KEYRING_INSTANCE_ID: instanceId, KEYRING_POLL_INTERVAL_MS: '200' }));
  try {
    // The process's own environment, as the kernel holds it: proof the zone reached the sidecar.
    const environ = readFileSync(`/proc/${s.child.pid}/environ`, 'utf8').split('\0');
    const tzSeen = environ.find((e) => e.startsWith('TZ='))?.slice(3);
    await waitFor(async () => (await pendingCount(pool)) === 0, { timeoutMs: 30_000, what: `the ${tz} sidecar to drain the queue` });
    return { instanceId, tzSeen, exitCode: await stopSpawned(s) };
  } finally {
    if (s.child.exitCode === null && s.child.signalCode === null) s.child.kill('SIGKILL');
  }
}

export interface RoundTripMismatch {
  readonly type: string;
  readonly input: string;
  readonly rowKey: string;
  readonly decrypted: string | null;
  readonly problem: string;
}

/**
 * Decrypts rows `idBase + i` of every case with the library and checks each value in the
 * given (writer's) session: `($decrypted::type)::text = ($input::type)::text`, and that the
 * decrypted text is exactly Postgres' canonical text (UTC, ISO) of the input as that session
 * reads it — no shift, no rounding, scale and trailing zeros kept. Returns the problems
 * (empty when all is well).
 */
export async function checkRoundTrip(
  kr: Keyring, session: pg.ClientBase, cases: readonly TypeCase[], idBase: number,
): Promise<RoundTripMismatch[]> {
  const problems: RoundTripMismatch[] = [];
  for (const c of cases) {
    const ref = `public.${typeTable(c.type)}.v`;
    const keys = c.values.map((_, i) => String(idBase + i));
    const results = new Map((await kr.decryptColumn(ref, { rowKeys: keys })).map((r) => [r.rowKey, r]));
    for (const [i, input] of c.values.entries()) {
      const rowKey = keys[i]!;
      const r = results.get(rowKey);
      const shown = (v: string | Buffer | null | undefined): string | null =>
        v === null || v === undefined ? null : Buffer.isBuffer(v) ? `\\x${v.toString('hex')}` : v;
      if (!r || r.error !== undefined || r.value === null) {
        problems.push({ type: c.type, input, rowKey, decrypted: shown(r?.value), problem: `no value: ${r?.error ?? 'row missing'}` });
        continue;
      }
      const same = await session.query<{ eq: boolean; got: string; want: string }>(
        `SELECT ($1::${c.type})::text = ($2::${c.type})::text AS eq, ($1::${c.type})::text AS got, ($2::${c.type})::text AS want`,
        [r.value, input]);
      const row = same.rows[0]!;
      if (!row.eq) {
        problems.push({ type: c.type, input, rowKey, decrypted: shown(r.value), problem: `writer session: ${row.got} <> ${row.want}` });
      }
      const canon = await session.query<{ t: string | null; b: Buffer | null }>(
        c.type === 'bytea' ? 'SELECT NULL::text AS t, $1::bytea AS b' : `SELECT public.kt_canonical_text($1::${c.type}) AS t, NULL::bytea AS b`,
        [input]);
      const want = canon.rows[0]!;
      const exact = c.type === 'bytea'
        ? Buffer.isBuffer(r.value) && Buffer.compare(r.value, want.b!) === 0
        : r.value === want.t;
      if (!exact) {
        problems.push({ type: c.type, input, rowKey, decrypted: shown(r.value), problem: `not the canonical text ${want.t ?? shown(want.b)}` });
      }
    }
  }
  return problems;
}

/** Every type protect() supports, with values that catch time-zone shifts and lost precision. */
export const ALL_TYPES: readonly TypeCase[] = [
  { type: 'text', values: ['plain', '', ' ', 'Ünïcødé ✓ 𝄞 שָׁלוֹם', 'tab\tnewline\nend'] },
  { type: 'varchar(20)', values: ['exactly-twenty-chars', 'ÆØÅ-æøå', ''] },
  { type: 'date', values: ['1975-05-11', '2024-03-31', '2018-11-04', '2019-02-16', '0044-03-15 BC', 'infinity'] },
  { type: 'timestamp', values: ['2024-03-31 02:30:00', '2018-11-04 00:30:00', '1975-05-11 23:59:59.999999', '2024-10-27 02:30:00'] },
  {
    type: 'timestamptz',
    values: ['2024-03-31 02:30:00+02', '2018-11-04 00:30:00', '2024-10-27 02:30:00 Europe/Berlin', '1975-05-11 12:00:00-03',
      '2024-06-01 12:00:00.123456+05:45', '2019-02-16 23:30:00'],
  },
  {
    type: 'numeric',
    values: ['294733346389144765940638005275322203805.000100', '-0.000000000000000001', 'NaN', '0.10', '-1e-30', 'Infinity', '100'],
  },
  { type: 'numeric(12,4)', values: ['1.5', '-0.0100', '12345678.9999', '0', '2.00005'] },
  { type: 'bigint', values: ['9007199254740993', '-9223372036854775808', '9223372036854775807', '0', '-1'] },
  { type: 'jsonb', values: ['{"b": 1, "a": [1.50, "x"]}', '"\\u00e9"', 'null', '12345678901234567890.10', '[]'] },
  { type: 'bytea', values: ['\\x00ff01', '\\x', '\\x5c783431', '\\x01000000000000000100'] },
];
