/**
 * The peers of the rotation section (DESIGN.md, "Performance targets"), each on its own
 * copy of the same table, measured on the same server in the same run as keyring:
 *
 *   bare UPDATE   `UPDATE t SET c = c || ''` on a table of the same shape and bytes: the
 *                 cost of rewriting every row once, no crypto at all (the ceiling)
 *   naive loop    what an application would write by hand to re-encrypt a column: one
 *                 connection; per batch of 1,000 rows a keyset SELECT, every value
 *                 decrypted and sealed again in Node with a fresh randomBytes IV, one
 *                 multi-row UPDATE ... FROM unnest, COMMIT; then the next batch. Reasonable
 *                 (prepared statements, set-based UPDATE, data keys unwrapped once), but
 *                 nothing overlaps: the database waits while Node encrypts and back.
 *   pgcrypto      `UPDATE t SET c = pgp_sym_encrypt(pgp_sym_decrypt(c, old), new)` in SQL,
 *                 on a copy encrypted with pgp_sym_encrypt. About 1k rows/s (PGP's
 *                 iterated S2K runs per value), so it is measured on a subset.
 */
import { randomBytes } from 'node:crypto';
import type pg from 'pg';
import {
  GCM_IV_BYTES, IvPool, generateKey, openValue, parseKeyHex, readDataKeyId, sealValue, unwrapDataKey, type SecretBytes,
} from '../../src/crypto/index.js';
import { startCpu, type CpuReport } from './cpu.js';
import { rate } from './stats.js';

export interface PeerRun {
  readonly rows: number;
  readonly ms: number;
  readonly rate: number;
  readonly cpu: CpuReport | undefined;
}

async function backendPid(c: pg.ClientBase): Promise<number> {
  return (await c.query<{ pid: number }>('SELECT pg_backend_pid() AS pid')).rows[0]!.pid;
}

const probeOf = async (c: pg.ClientBase, label: string) =>
  ({ backends: new Map([[await backendPid(c), label]]), processes: new Map<number, string>(), appNames: [] as const });

/** `UPDATE <table> SET <column> = <column> || ''` in one statement (autocommit). */
export async function runBareUpdate(app: pg.Client, admin: pg.ClientBase, tableName: string, column: string, rows: number): Promise<PeerRun> {
  const stop = await startCpu(admin, await probeOf(app, 'peer backend'));
  const t0 = performance.now();
  const r = await app.query(`UPDATE ${tableName} SET ${column} = ${column} || ''::bytea`);
  const ms = performance.now() - t0;
  if (r.rowCount !== rows) throw new Error(`bare UPDATE: ${r.rowCount} rows updated, expected ${rows}`);
  return { rows, ms, rate: rate(rows, ms), cpu: await stop() };
}

export interface NaiveInput {
  readonly tableName: string;
  /** The keyring column id the envelopes were sealed for (their AAD names it). */
  readonly columnId: number;
  /** Hex of the encrypt root that wraps the envelopes' data keys, and its version. */
  readonly rootHex: string;
  readonly rootVersion: number;
  readonly rows: number;
  readonly batch: number;
}

/**
 * The naive client-side loop (see the file comment). The new data key is generated here
 * (its id only names it in the envelope header: the peer measures the work, not the
 * bookkeeping). Each value gets a fresh 12-byte IV from the CSPRNG (an IvPool of one IV
 * refills with randomFillSync on every call), as code that calls randomBytes per value.
 */
export async function runNaiveLoop(app: pg.Client, admin: pg.ClientBase, o: NaiveInput): Promise<PeerRun> {
  const root = parseKeyHex(o.rootHex, 'bench encrypt root');
  const oldKeys = new Map<bigint, SecretBytes>();
  const newKey = generateKey();
  const newKeyId = BigInt(`0x${randomBytes(6).toString('hex')}`) + (1n << 60n); // above any real id
  const freshIv = new IvPool(GCM_IV_BYTES);
  const select = `SELECT t.id::text AS id, t.national_id AS c FROM ${o.tableName} t WHERE t.id > $1 ORDER BY t.id LIMIT ${o.batch}`;
  const update = `UPDATE ${o.tableName} t SET national_id = u.c FROM unnest($1::bigint[], $2::bytea[]) AS u(id, c) WHERE t.id = u.id`;
  try {
    const stop = await startCpu(admin, await probeOf(app, 'peer backend'));
    const t0 = performance.now();
    let cursor = '0';
    let done = 0;
    for (;;) {
      await app.query('BEGIN');
      const { rows } = await app.query<{ id: string; c: Buffer }>({ name: `naive_select_${o.tableName}`, text: select, values: [cursor] });
      if (rows.length === 0) {
        await app.query('COMMIT');
        break;
      }
      const ids: string[] = new Array(rows.length);
      const cts: Buffer[] = new Array(rows.length);
      for (let i = 0; i < rows.length; i++) {
        const r = rows[i]!;
        const keyId = readDataKeyId(r.c);
        let dk = oldKeys.get(keyId);
        if (!dk) {
          const { rows: [w] } = await app.query<{ root_version: number; wrapped: Buffer }>(
            'SELECT root_version, wrapped FROM keyring.data_keys WHERE id = $1', [String(keyId)]);
          if (!w || w.root_version !== o.rootVersion) throw new Error(`naive loop: data key ${keyId} is not under encrypt version ${o.rootVersion}`);
          dk = unwrapDataKey(root, o.rootVersion, keyId, w.wrapped);
          oldKeys.set(keyId, dk);
        }
        const plain = openValue(dk, o.columnId, r.id, r.c);
        ids[i] = r.id;
        cts[i] = sealValue(newKey, newKeyId, o.columnId, r.id, plain, freshIv);
        plain.fill(0);
      }
      const u = await app.query({ name: `naive_update_${o.tableName}`, text: update, values: [ids, cts] });
      await app.query('COMMIT');
      done += u.rowCount ?? 0;
      cursor = rows[rows.length - 1]!.id;
    }
    const ms = performance.now() - t0;
    if (done !== o.rows) throw new Error(`naive loop: ${done} rows re-encrypted, expected ${o.rows}`);
    return { rows: done, ms, rate: rate(done, ms), cpu: await stop() };
  } finally {
    root.dispose();
    newKey.dispose();
    for (const k of oldKeys.values()) k.dispose();
  }
}

/**
 * Creates `<tableName> (id bigint PRIMARY KEY, c bytea)` with `values` encrypted by
 * pgp_sym_encrypt under `password` (in SQL, in batches of 1,000).
 */
export async function createPgpTable(db: pg.ClientBase, tableName: string, ids: readonly string[], values: readonly string[], password: string): Promise<void> {
  await db.query(`CREATE TABLE ${tableName} (id bigint PRIMARY KEY, c bytea NOT NULL)`);
  for (let i = 0; i < ids.length; i += 1000) {
    await db.query(`INSERT INTO ${tableName} SELECT u.id, pgp_sym_encrypt(u.v, $3) FROM unnest($1::bigint[], $2::text[]) AS u(id, v)`,
      [ids.slice(i, i + 1000), values.slice(i, i + 1000), password]);
  }
}

/** The pgcrypto peer: one UPDATE decrypting and encrypting every value in SQL. */
export async function runPgcrypto(app: pg.Client, admin: pg.ClientBase, tableName: string, rows: number, oldPassword: string, newPassword: string): Promise<PeerRun> {
  const stop = await startCpu(admin, await probeOf(app, 'peer backend'));
  const t0 = performance.now();
  const r = await app.query(`UPDATE ${tableName} SET c = pgp_sym_encrypt(pgp_sym_decrypt(c, $1), $2)`, [oldPassword, newPassword]);
  const ms = performance.now() - t0;
  if (r.rowCount !== rows) throw new Error(`pgcrypto UPDATE: ${r.rowCount} rows updated, expected ${rows}`);
  const { rows: [check] } = await app.query<{ ok: boolean }>(
    `SELECT bool_and(pgp_sym_decrypt(c, $1) IS NOT NULL) AS ok FROM (SELECT c FROM ${tableName} LIMIT 10) s`, [newPassword]);
  if (!check?.ok) throw new Error('pgcrypto UPDATE: the values do not decrypt under the new password');
  return { rows, ms, rate: rate(rows, ms), cpu: await stop() };
}
