/**
 * The job runner's failure path (sidecar/jobs/runner.ts): a job that cannot go on is
 * failed and audited exactly once, even when two sidecars meet the failure one after the
 * other (the failing batch rolls back, which frees the job row for the next claim before
 * the first sidecar has recorded the failure).
 */
import type pg from 'pg';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { JobFailure, JobRunner, type JobHandler } from '../../sidecar/jobs/runner.js';
import { SidecarMetrics } from '../../sidecar/metrics.js';
import { Db } from '../../src/db/pool.js';
import { silentLogger } from '../../src/log.js';
import { createTestDb, type TestDb } from '../helpers/db.js';
import { waitFor } from '../helpers/sidecar.js';

const q = async <T extends Record<string, unknown> = Record<string, unknown>>(pool: pg.Pool, sql: string, params: unknown[] = []) =>
  (await pool.query<T>(sql, params)).rows;

describe('job runner failures', () => {
  let db: TestDb;
  let sidecarDb: Db;

  beforeAll(async () => {
    db = await createTestDb();
    sidecarDb = new Db({ connectionString: db.url, applicationName: 'job-runner test', connectTimeoutMs: 10_000, logger: silentLogger() });
  });

  afterAll(async () => {
    await sidecarDb?.close();
    await db?.drop();
  });

  it('a job that another sidecar failed first is not failed or audited again', async () => {
    const [{ id }] = await q<{ id: string }>(db.pool,
      `INSERT INTO keyring.jobs (kind, purpose, target_version) VALUES ('rewrap', 'encrypt', 1) RETURNING id::text AS id`) as [{ id: string }];
    let calls = 0;
    let rival: Promise<unknown> | undefined;
    const handler: JobHandler = {
      kind: 'rewrap',
      failedAction: 'rotation.failed',
      canRun: () => true,
      async runBatch(client, job) {
        calls++;
        // The "other sidecar": it fails the job as soon as this batch lets go of the job
        // row (its UPDATE queues behind this transaction's row lock), so it wins the race.
        rival = db.pool.query(
          `UPDATE keyring.jobs SET state = 'failed', error = 'failed by the other sidecar', claimed_by = 'other',
                  finished_at = clock_timestamp() WHERE id = $1 AND state IN ('queued', 'running')`, [job.id]);
        await waitFor(async () => (await q(db.pool,
          `SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE 'UPDATE keyring.jobs SET state = ''failed''%'`)).length > 0,
        { timeoutMs: 10_000, intervalMs: 10, what: 'the rival UPDATE to wait for the job row' });
        void client;
        throw new JobFailure('the column is gone');
      },
    };
    const runner = new JobRunner({
      db: sidecarDb, handlers: [handler], pollIntervalMs: 50, instanceId: 'runner-a', logger: silentLogger(),
      metrics: new SidecarMetrics('runner-a'), paused: () => undefined,
    });
    runner.start();
    try {
      await waitFor(async () => calls > 0 && rival !== undefined, { timeoutMs: 10_000, what: 'the batch to run' });
      await rival;
      await waitFor(async () => {
        const [j] = await q<{ state: string }>(db.pool, 'SELECT state FROM keyring.jobs WHERE id = $1', [id]);
        return j?.state === 'failed';
      }, { timeoutMs: 10_000, what: 'the job to end' });
      await new Promise((r) => setTimeout(r, 300)); // the runner's own failure path has run by now
    } finally {
      await runner.stop();
    }
    expect(await q(db.pool, 'SELECT error, claimed_by FROM keyring.jobs WHERE id = $1', [id]))
      .toEqual([{ error: 'failed by the other sidecar', claimed_by: 'other' }]);
    expect(await q(db.pool, `SELECT count(*)::int AS n FROM keyring.audit_log WHERE action = 'rotation.failed'`)).toEqual([{ n: 0 }]);
    expect(calls).toBe(1);
  });

  it('a job that fails here is failed and audited once, with the reason', async () => {
    const [{ id }] = await q<{ id: string }>(db.pool,
      `INSERT INTO keyring.jobs (kind, purpose, target_version) VALUES ('rewrap', 'encrypt', 1) RETURNING id::text AS id`) as [{ id: string }];
    const handler: JobHandler = {
      kind: 'rewrap', failedAction: 'rotation.failed', canRun: () => true,
      async runBatch() { throw new JobFailure('the column is gone'); },
    };
    const runner = new JobRunner({
      db: sidecarDb, handlers: [handler], pollIntervalMs: 50, instanceId: 'runner-b', logger: silentLogger(),
      metrics: new SidecarMetrics('runner-b'), paused: () => undefined,
    });
    runner.start();
    try {
      await waitFor(async () => (await q<{ state: string }>(db.pool, 'SELECT state FROM keyring.jobs WHERE id = $1', [id]))[0]?.state === 'failed',
        { timeoutMs: 10_000, what: 'the job to fail' });
    } finally {
      await runner.stop();
    }
    expect(await q(db.pool, 'SELECT error, claimed_by FROM keyring.jobs WHERE id = $1', [id]))
      .toEqual([{ error: 'the column is gone', claimed_by: 'runner-b' }]);
    expect(await q(db.pool, `SELECT actor, detail->>'error' AS error FROM keyring.audit_log WHERE action = 'rotation.failed' AND (detail->>'job')::bigint = $1`, [id]))
      .toEqual([{ actor: 'runner-b', error: 'the column is gone' }]);
  });
});
