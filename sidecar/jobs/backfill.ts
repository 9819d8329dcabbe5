/**
 * Adoption backfill (docs/write-path.md "Adopting a populated column"): the plaintext
 * that protect() set aside moves into the queue range by range, each row getting the
 * placeholder, and the ordinary write path encrypts it. No key is needed here, so every
 * sidecar can take part.
 *
 * Same shape as a re-encryption: runBatch holds the job row only to carve the next
 * primary-key range (and, once, to count the total); work() moves one range in its own
 * transaction with the range row locked (SKIP LOCKED: sidecars share the job, never a
 * range) and closes it with its counts in that transaction, so a kill -9 rolls back the
 * range in hand only. When every range is closed, runBatch calls keyring.adopt_finish
 * under the job row lock: the plaintext column is dropped and the job ends, exactly
 * once. Values over max_value_bytes stay in plaintext, quarantined; the job then fails
 * with their count and what to do, and keeps the column.
 */
import type pg from 'pg';
import type { Db } from '../../src/db/pool.js';
import {
  adoptFinish, backfillRange, finishRange, passComplete, selectAdoptingColumn, setBackfillTotal,
} from '../../src/db/queries/backfill.js';
import type { JobRow } from '../../src/db/queries/claim-job.js';
import { carveChunk, claimChunk, countClaim } from '../../src/db/queries/reencrypt-chunks.js';
import type { Logger } from '../../src/log.js';
import type { SidecarMetrics } from '../metrics.js';
import { JobFailure, type JobHandler } from './runner.js';

export interface BackfillContext {
  readonly db: Db;
  readonly instanceId: string;
  readonly logger: Logger;
  readonly metrics: SidecarMetrics;
  /** Test-only pause inside each range transaction (crash tests); 0 in production. */
  readonly testDelayMs: number;
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

export function backfillHandler(ctx: BackfillContext): JobHandler {
  return {
    kind: 'backfill',
    failedAction: 'backfill.failed',

    canRun(): boolean {
      return true;
    },

    async runBatch(client: pg.ClientBase, job: JobRow): Promise<boolean> {
      if (job.column_id === null) throw new JobFailure('a backfill job needs a column');
      const col = await selectAdoptingColumn(client, job.column_id);
      if (!col) throw new JobFailure(`column ${job.column_id} is no longer protected`);
      if (col.plain_column === null) throw new JobFailure(`${col.table_schema}.${col.table_name}.${col.column_name} is not under adoption any more`);
      if (job.total === null) await setBackfillTotal(client, job.id, col.id);
      if (await carveChunk(client, job.id, col, job.batch_size, ctx.instanceId)) return false;
      await countClaim(client, job.id);
      if (!(await passComplete(client, job.id))) return false;
      const left = await adoptFinish(client, job.id);
      const name = `${col.table_schema}.${col.table_name}.${col.column_name}`;
      if (left > 0) {
        throw new JobFailure(`${left} value(s) of ${name} are still in plaintext in column ${col.plain_column} ` +
          '(over max_value_bytes: see keyring.quarantine, reason oversized); shorten them through the staging view ' +
          `or raise keyring.settings max_value_bytes, then run SELECT keyring.backfill('${name}')`);
      }
      ctx.logger.info({ job: job.id, columnId: col.id }, 'adoption finished: plaintext column dropped');
      return true;
    },

    async work(job: JobRow): Promise<boolean> {
      return ctx.db.with(async (client) => {
        await client.query('BEGIN');
        try {
          const chunk = await claimChunk(client, job.id);
          if (!chunk) {
            await client.query('COMMIT');
            return false;
          }
          const n = await backfillRange(client, job.column_id!, chunk.after_key, chunk.last_key);
          if (ctx.testDelayMs > 0) await sleep(ctx.testDelayMs);
          await finishRange(client, job.id, chunk.id, n, ctx.instanceId);
          await client.query('COMMIT');
          if (n.oversized > 0) {
            ctx.logger.warn({ job: job.id, columnId: job.column_id, values: n.oversized },
              'values over max_value_bytes left in plaintext and quarantined during an adoption');
          }
          return true;
        } catch (err) {
          await client.query('ROLLBACK').catch(() => undefined);
          throw err;
        }
      });
    },
  };
}
