/**
 * The sidecar's job loop (keyring.jobs: rewrap now, re-encryption and friends later).
 * One batch of the oldest unfinished job per transaction, the job row locked with
 * FOR UPDATE SKIP LOCKED as the claim; batches follow each other until no job is left
 * that this sidecar can run, then it waits for a `job` hint or the poll interval (a
 * notification is a hint, the table is the truth). Retryable errors (link lost, key not
 * held, deadlock) roll the batch back and back off; any other error fails the job with
 * the reason, audited, so one broken job never turns into a loop.
 */
import { describeError, isRetryable } from '../../src/db/errors.js';
import type { Db } from '../../src/db/pool.js';
import { auditAppend } from '../../src/db/queries/audit-append.js';
import { claimJob, openJobExists, type JobRow } from '../../src/db/queries/claim-job.js';
import { failJob } from '../../src/db/queries/update-job.js';
import type { Logger } from '../../src/log.js';
import { PollLoop } from '../wake.js';
import type { SidecarMetrics } from '../metrics.js';
import type pg from 'pg';

/** A job that cannot go on (superseded, malformed): failed with this message, not retried. */
export class JobFailure extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'JobFailure';
  }
}

export interface JobHandler {
  readonly kind: string;
  /** Audit action written when a job of this kind fails (e.g. rotation.failed). */
  readonly failedAction: string;
  /** Whether this sidecar holds what the job needs; if not, it leaves the job to another one. */
  canRun(job: JobRow): boolean;
  /** One batch inside the caller's transaction (the job row is locked); true when the job is finished. */
  runBatch(client: pg.ClientBase, job: JobRow): Promise<boolean>;
  /**
   * Work done after the claim transaction committed, in transactions of its own (a
   * re-encryption: runBatch only carves the next range under the job row lock, so that
   * several sidecars share one job). True when something was done; false leaves the job
   * to others until the next round.
   */
  work?(job: JobRow): Promise<boolean>;
}

export interface JobRunnerOptions {
  readonly db: Db;
  readonly handlers: readonly JobHandler[];
  readonly pollIntervalMs: number;
  readonly instanceId: string;
  readonly logger: Logger;
  readonly metrics: SidecarMetrics;
  /** A reason to run nothing now (key material missing); rechecked after kick(). */
  readonly paused: () => string | undefined;
}

type Step = 'idle' | 'progress';

export class JobRunner {
  readonly #o: JobRunnerOptions;
  readonly #kinds: string[];
  /** Jobs this sidecar cannot run with the keys it holds; forgotten on kick() (keys reloaded). */
  readonly #skip = new Set<string>();
  /** Jobs with nothing for this sidecar in this round (other sidecars hold their open ranges). */
  readonly #busy = new Set<string>();
  readonly #poll: PollLoop;

  constructor(o: JobRunnerOptions) {
    this.#o = o;
    this.#kinds = o.handlers.map((h) => h.kind);
    this.#poll = new PollLoop({
      pollIntervalMs: o.pollIntervalMs,
      round: async () => {
        while (!this.#poll.stopping && (await this.#step()) === 'progress');
      },
      onError: (err, streak) => {
        o.metrics.errors.inc({ kind: 'job' });
        o.logger[streak === 1 ? 'warn' : 'debug']({ err: { message: describeError(err) }, streak }, 'job batch rolled back; will retry');
      },
    });
  }

  /** A `job` notification: end an idle wait now. */
  hint(): void {
    this.#poll.hint();
  }

  /** Keys reloaded or the link came back: look again at once, including skipped jobs. */
  kick(): void {
    this.#skip.clear();
    this.#poll.kick();
  }

  start(): void {
    this.#poll.start();
  }

  /** Stops after the batch in hand has committed or failed. */
  async stop(): Promise<void> {
    await this.#poll.stop();
  }

  async #step(): Promise<Step> {
    if (this.#o.paused()) return 'idle';
    if (!(await openJobExists(this.#o.db.pool, this.#kinds))) return 'idle';
    let claimed: JobRow | undefined;
    let after: JobHandler | undefined;
    try {
      const step = await this.#o.db.with(async (client): Promise<Step> => {
        await client.query('BEGIN');
        try {
          claimed = await claimJob(client, this.#kinds, [...this.#skip, ...this.#busy]);
          const job = claimed;
          if (!job) {
            await client.query('COMMIT');
            this.#busy.clear();
            return 'idle';
          }
          const handler = this.#o.handlers.find((h) => h.kind === job.kind)!;
          if (!handler.canRun(job)) {
            await client.query('ROLLBACK');
            this.#skip.add(job.id);
            this.#o.logger.info({ job: job.id, kind: job.kind, targetVersion: job.target_version },
              'job left to another sidecar: this one does not hold its target key');
            return 'progress';
          }
          await handler.runBatch(client, job);
          await client.query('COMMIT');
          if (handler.work) after = handler;
          return 'progress';
        } catch (err) {
          await client.query('ROLLBACK').catch(() => undefined);
          throw err;
        }
      });
      if (after && claimed && !(await after.work!(claimed))) this.#busy.add(claimed.id);
      return step;
    } catch (err) {
      if (!claimed || isRetryable(err)) throw err;
      await this.#fail(claimed, err instanceof JobFailure ? err.message : describeError(err));
      return 'progress';
    }
  }

  async #fail(job: JobRow, error: string): Promise<void> {
    const handler = this.#o.handlers.find((h) => h.kind === job.kind);
    this.#o.metrics.errors.inc({ kind: 'job' });
    this.#o.logger.error({ job: job.id, kind: job.kind, err: { message: error } }, 'job failed');
    await this.#o.db.with(async (client) => {
      await client.query('BEGIN');
      try {
        // Two sidecars can both meet the failure (the job row is free again once the
        // failing batch rolled back): the one that ends the job audits it, once.
        if (!(await failJob(client, job.id, error, this.#o.instanceId))) {
          await client.query('COMMIT');
          return;
        }
        await auditAppend(client, {
          action: handler?.failedAction ?? 'job.failed', actor: this.#o.instanceId,
          ...(job.purpose ? { keyPurpose: job.purpose } : {}),
          ...(job.target_version !== null ? { keyVersion: job.target_version } : {}),
          detail: { job: Number(job.id), kind: job.kind, error },
        });
        await client.query('COMMIT');
      } catch (err) {
        await client.query('ROLLBACK').catch(() => undefined);
        throw err;
      }
    });
  }
}
