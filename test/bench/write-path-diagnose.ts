/**
 * `--diagnose`: where the keyring write path's time goes.
 *
 *   1. the staging inserts alone (no sidecar running): the trigger path's cost per row
 *   2. one sidecar batch statement by statement, with EXPLAIN ANALYZE (rolled back)
 *   3. the crypto alone in this process (what the sidecar's Node process cannot go below)
 *   4. the sidecar alone draining a queue filled beforehand (filled in one transaction
 *      while the sidecar idles, so the clock starts at COMMIT), for several batch sizes
 *
 * CPU per component comes from /proc (local servers only), see cpu.ts.
 */
import { randomBytes } from 'node:crypto';
import pg from 'pg';
import { IvPool, blindIndexTerm, deriveIndexKey, generateKey, parseNormalization, sealValue } from '../../src/crypto/index.js';
import { claimPending } from '../../src/db/queries/claim-pending.js';
import { baseUpdateParams, baseUpdateSql, type BaseTable } from '../../src/db/queries/update-base-rows.js';
import type { BenchContext } from './context.js';
import { connect } from './env.js';
import { formatCpu, startCpu } from './cpu.js';
import { metricValue, startSidecarProcess } from './sidecar-process.js';
import { fmtInt, fmtMs, rate } from './stats.js';
import { settle, waitEncrypted } from './write-path.js';

const PROTECT_ARGS = `p_blind_index => true, p_normalize => ARRAY['digits']`;
const CPU_ORDER = ['app backend', 'bench (node)', 'sidecar (node)', 'sidecar backends', 'server background', 'other backends'];

async function protectedTable(db: pg.ClientBase, name: string): Promise<void> {
  await db.query(`CREATE TABLE ${name} (id bigint PRIMARY KEY, name text, national_id text)`);
  await db.query(`SELECT keyring.protect('public.${name}', 'national_id', ${PROTECT_ARGS})`);
}

const stagingInsert = (table: string): string =>
  `INSERT INTO ${table}_staging (id, name, national_id) SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[])`;

async function pidOf(c: pg.ClientBase): Promise<number> {
  return (await c.query<{ pid: number }>('SELECT pg_backend_pid() AS pid')).rows[0]!.pid;
}

/** The lines of an EXPLAIN ANALYZE worth reading: the top node, triggers, totals. */
function condense(plan: string[]): string[] {
  return plan.filter((l, i) => i === 0 || /^\s*(Trigger|Planning Time|Execution Time|Buffers)/.test(l) || /->\s+(Seq|Index|Tid|Hash|Nested|Function|LockRows|Limit)/.test(l))
    .map((l) => `      ${l.trim()}`);
}

async function explain(db: pg.ClientBase, sql: string, values: unknown[]): Promise<string[]> {
  await db.query('SAVEPOINT bench_explain');
  try {
    const { rows } = await db.query<{ 'QUERY PLAN': string }>(`EXPLAIN (ANALYZE, BUFFERS) ${sql}`, values);
    return rows.map((r) => r['QUERY PLAN']);
  } finally {
    await db.query('ROLLBACK TO SAVEPOINT bench_explain');
  }
}

async function timed<T>(fn: () => Promise<T>): Promise<[T, number]> {
  const t0 = performance.now();
  const v = await fn();
  return [v, performance.now() - t0];
}

export async function runWritePathDiagnosis(ctx: BenchContext, batchSizes: readonly number[] = [500, 1000, 2000]): Promise<string> {
  const out: string[] = ['diagnosis (--diagnose)'];
  const admin = await connect(ctx.url, 'bench admin');
  const app = await connect(ctx.url, 'bench app');
  ctx.defer(async () => {
    await app.end().catch(() => undefined);
    await admin.end().catch(() => undefined);
  });
  const appPid = await pidOf(app);
  const batches = ctx.data.batches;

  // 1. Staging inserts with no sidecar running.
  await protectedTable(admin, 'bench_diag');
  await settle(admin);
  ctx.progress('diagnose: staging inserts alone (no sidecar) ...');
  {
    const stop = await startCpu(admin, { backends: new Map([[appPid, 'app backend']]), processes: new Map(), appNames: [] });
    const [, ms] = await timed(async () => {
      for (const b of batches) await app.query({ name: 'diag_ins', text: stagingInsert('bench_diag'), values: [b.ids, b.names, b.nationalIds] });
    });
    const cpu = await stop();
    out.push(`  1. staging inserts alone, no sidecar: ${fmtInt(rate(ctx.rows, ms))} rows/s (${(ms / 1000).toFixed(2)} s)`);
    if (cpu) out.push(`     ${formatCpu(cpu, ctx.rows, CPU_ORDER)}`);
    // One more batch of the same shape, explained (rolled back): the INSTEAD OF trigger's share.
    const b = batches[0]!;
    const ids = b.ids.map((id) => String(Number(id) + 10 * ctx.rows));
    await admin.query('BEGIN');
    try {
      const plan = await explain(admin, stagingInsert('bench_diag'), [ids, b.names, b.nationalIds]);
      const plainPlan = await explain(admin, 'INSERT INTO bench_plain SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[])', [ids, b.names, b.nationalIds]);
      out.push(`     EXPLAIN ANALYZE of one ${b.ids.length}-row INSERT into the staging view:`, ...condense(plan));
      out.push(`     the same rows into the plain table:`, ...condense(plainPlan));
    } finally {
      await admin.query('ROLLBACK');
    }
  }

  // 2. One sidecar batch, statement by statement, on the queue left by step 1 (rolled back).
  ctx.progress('diagnose: one sidecar batch statement by statement ...');
  {
    const size = ctx.sidecarBatchSize;
    const { rows: cols } = await admin.query<{ id: number }>(`SELECT id FROM keyring.columns WHERE table_name = 'bench_diag'`);
    const columnId = cols[0]!.id;
    const table: BaseTable = {
      schema: 'public', table: 'bench_diag', pkColumns: ['id'], pkTypes: ['bigint'],
      columns: [{ column: 'national_id', bidxColumn: 'national_id_bidx' }],
    };
    await admin.query('BEGIN');
    try {
      const claimSql = `SELECT id, ctid::text AS ctid, column_id, row_key, value, subject, tenant, attempts
         FROM keyring.pending WHERE id > $2 ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED`;
      const claimPlan = await explain(admin, claimSql, [size, '0']);
      const [claimed, claimMs] = await timed(() => claimPending(admin, size, '0'));
      // Ciphertexts of the right size: the database's work does not depend on their bytes.
      const updates = claimed.map((r) => ({ rowKey: r.row_key, values: [{ ciphertext: randomBytes(37 + r.size), term: randomBytes(18) }] }));
      const updSql = baseUpdateSql(table);
      const updParams = baseUpdateParams(table, updates);
      const updPlan = await explain(admin, updSql, updParams);
      // The same UPDATE with the planner kept to index lookups (the plan it picks for a
      // large table), timed inside a savepoint so that the real one below starts afresh.
      await admin.query('SAVEPOINT bench_nl');
      await admin.query('SET LOCAL enable_hashjoin = off');
      await admin.query('SET LOCAL enable_mergejoin = off');
      const nlPlan = await explain(admin, updSql, updParams);
      const [, nlMs] = await timed(() => admin.query(updSql, updParams));
      await admin.query('ROLLBACK TO SAVEPOINT bench_nl');
      const [, updMs] = await timed(() => admin.query(updSql, updParams));
      const delSql = 'DELETE FROM keyring.pending WHERE ctid = ANY($1::tid[])';
      const ctids = claimed.map((r) => r.ctid);
      const delPlan = await explain(admin, delSql, [ctids]);
      const [, delMs] = await timed(() => admin.query(delSql, [ctids]));
      const [, auditMs] = await timed(() => admin.query(`SELECT keyring.audit_append('encrypt.batch', p_actor => 'bench', p_column_id => $1, p_detail => '{"count": 1}'::jsonb)`, [columnId]));
      const [, commitLikeMs] = await timed(() => admin.query('SELECT 1'));
      out.push(`  2. one sidecar batch of ${claimed.length} rows, statement by statement (wall ms, then EXPLAIN ANALYZE; rolled back):`);
      out.push(`     claim ${fmtMs(claimMs)} ms`, ...condense(claimPlan));
      out.push(`     base UPDATE ${fmtMs(updMs)} ms (${((updMs * 1000) / claimed.length).toFixed(1)} µs/row)`, ...condense(updPlan));
      out.push(`     the same UPDATE with enable_hashjoin = off, enable_mergejoin = off: ${fmtMs(nlMs)} ms (${((nlMs * 1000) / claimed.length).toFixed(1)} µs/row)`, ...condense(nlPlan));
      out.push(`     queue DELETE ${fmtMs(delMs)} ms (${((delMs * 1000) / claimed.length).toFixed(1)} µs/row)`, ...condense(delPlan));
      out.push(`     audit_append ${fmtMs(auditMs)} ms; a round trip ${fmtMs(commitLikeMs)} ms`);
    } finally {
      await admin.query('ROLLBACK');
    }
  }

  // 3. Crypto alone, in this process, for the same values (what the sidecar does per value).
  {
    const dataKey = generateKey();
    const root = generateKey();
    const indexKey = deriveIndexKey(root, 1, null);
    root.dispose();
    const iv = new IvPool();
    const norm = parseNormalization(['digits']);
    const [, ms] = await timed(async () => {
      for (const b of batches) {
        for (let i = 0; i < b.ids.length; i++) {
          const v = Buffer.from(b.nationalIds[i]!, 'utf8');
          sealValue(dataKey, 1n, 1, b.ids[i]!, v, iv);
          blindIndexTerm(indexKey, 1, v, norm, 16, true);
        }
      }
    });
    dataKey.dispose();
    indexKey.dispose();
    out.push(`  3. crypto alone (sealValue + blindIndexTerm, this process): ${fmtInt(rate(ctx.rows, ms))} values/s, ${((ms * 1000) / ctx.rows).toFixed(1)} µs/value`);
  }

  // 4. Sidecar drain of a queue filled beforehand, per batch size.
  out.push(`  4. sidecar alone draining ${fmtInt(ctx.rows)} queued values (filled in one transaction while the sidecar idled; clock from COMMIT):`);
  let first = true;
  for (const size of batchSizes) {
    ctx.progress(`diagnose: sidecar drain alone, KEYRING_BATCH_SIZE=${size} ...`);
    const sidecar = await startSidecarProcess({ databaseUrl: ctx.url, keys: ctx.keys, batchSize: size, pgOptions: ctx.sidecarPgOptions, instanceId: `bench-diag-${size}` });
    ctx.defer(() => sidecar.stop());
    try {
      if (first) {
        await waitEncrypted(admin, 'bench_diag'); // step 1's queue
        first = false;
      }
      const t = `bench_diag_${size}`;
      await protectedTable(admin, t);
      await app.query('BEGIN');
      for (const b of batches) await app.query(stagingInsert(t), [b.ids, b.names, b.nationalIds]);
      await settle(admin);
      const m0 = await sidecar.metrics();
      const stop = await startCpu(admin, {
        backends: new Map([[appPid, 'app backend']]), processes: new Map([[sidecar.pid, 'sidecar (node)']]),
        appNames: [['keyring sidecar', 'sidecar backends']],
      });
      const t0 = performance.now();
      await app.query('COMMIT');
      const tEnd = await waitEncrypted(admin, t);
      const cpu = await stop();
      const m1 = await sidecar.metrics();
      const n = metricValue(m1, 'keyring_batch_duration_seconds_count') - metricValue(m0, 'keyring_batch_duration_seconds_count');
      const s = metricValue(m1, 'keyring_batch_duration_seconds_sum') - metricValue(m0, 'keyring_batch_duration_seconds_sum');
      const ms = tEnd - t0;
      out.push(`     batch ${String(size).padStart(5)}: ${fmtInt(rate(ctx.rows, ms))} rows/s (${(ms / 1000).toFixed(2)} s), ` +
        `${fmtInt(n)} batches of ${fmtMs((s * 1000) / n)} ms (${(((s * 1000) / n) * 1000 / size).toFixed(1)} µs/row)`);
      if (cpu) out.push(`       ${formatCpu(cpu, ctx.rows, CPU_ORDER)}`);
    } finally {
      await app.query('ROLLBACK').catch(() => undefined); // after an error mid-fill; a no-op otherwise
      await sidecar.stop();
    }
  }
  return out.join('\n');
}
