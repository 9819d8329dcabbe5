/**
 * The claim loop: drain until a claim comes back short, then wait for a hint or the
 * poll interval, whichever comes first (a notification is a hint, the table is the
 * truth). After an error it backs off, and hints do not cut that wait short, so a
 * steady stream of inserts cannot turn a persistent failure into a hot loop; a
 * reconnect or a key reload (kick) does.
 */
import { EventEmitter } from 'node:events';
import { describeError, isRetryable } from '../src/db/errors.js';
import type { Logger } from '../src/log.js';
import type { BatchResult } from './claim.js';
import { PollLoop } from './wake.js';
import type { SidecarMetrics } from './metrics.js';

export interface Progress {
  /** Rows encrypted in this drain so far. */
  readonly done: number;
  /** Estimated rows still queued (the last count, at most a second old, minus rows processed since). */
  readonly queueDepth: number;
  readonly quarantined: number;
}

export interface WorkerOptions {
  readonly batchSize: number;
  /** Batches in flight at once (KEYRING_CONCURRENCY). */
  readonly concurrency?: number;
  readonly pollIntervalMs: number;
  readonly logger: Logger;
  readonly metrics: SidecarMetrics;
  readonly processBatch: (limit: number, afterId: string) => Promise<BatchResult>;
  readonly queueDepth: () => Promise<number>;
}

/**
 * The queue is counted at most this often: a drain starts on every notification, and a
 * count(*) of keyring.pending (a scan of its heap, dead rows included until vacuum) on
 * each one cost more server time than the rows it drained under a steady trickle of
 * single-row writes (bench, rotation section: ~4 ms a count, ~15 counts a second).
 */
const DEPTH_RECOUNT_MS = 1000;

export class Worker extends EventEmitter<{ progress: [Progress]; drained: [done: number] }> {
  readonly #o: WorkerOptions;
  #chain: Promise<unknown> = Promise.resolve();
  readonly #poll: PollLoop;
  #depth = 0;
  #depthAt = -Infinity;

  constructor(o: WorkerOptions) {
    super();
    this.#o = o;
    this.#poll = new PollLoop({
      pollIntervalMs: o.pollIntervalMs,
      round: async () => { await this.drain(); },
      onError: (err, streak) => this.#onError(err, streak),
      onRecovered: () => o.logger.info('queue processing recovered'),
    });
  }

  /** Processes batches until the queue is empty (a claim returns fewer rows than the batch size). */
  drain(): Promise<number> {
    const run = this.#chain.then(() => this.#drainNow());
    this.#chain = run.catch(() => undefined);
    return run;
  }

  /** A notification arrived: end an idle wait now, or drain again after the current pass. */
  hint(): void {
    this.#poll.hint();
  }

  /** Something changed that may unblock work (listener reconnected, keys reloaded): catch up now. */
  kick(): void {
    this.#poll.kick();
  }

  start(): void {
    this.#poll.start();
  }

  /** Stops claiming; resolves when the batch in hand has finished or failed. */
  async stop(): Promise<void> {
    await this.#poll.stop();
    await this.#chain;
  }

  #onError(err: unknown, streak: number): void {
    const retryable = isRetryable(err);
    this.#o.metrics.errors.inc({ kind: retryable ? 'retryable' : 'unexpected' });
    // Once per failure streak at warn (a database down for minutes must not flood the log).
    const level = streak === 1 || !retryable ? 'warn' : 'debug';
    this.#o.logger[level]({ err: { message: describeError(err) }, streak }, 'queue processing paused; will retry');
  }

  async #drainNow(): Promise<number> {
    if (performance.now() - this.#depthAt >= DEPTH_RECOUNT_MS) {
      this.#depth = await this.#o.queueDepth();
      this.#depthAt = performance.now();
    }
    const tally = { done: 0, quarantined: 0, depth: this.#depth };
    this.#o.metrics.queueDepth.set(tally.depth);
    // Several lanes, each a batch in its own transaction: while one lane's batch is in
    // the database (UPDATE, DELETE, COMMIT), another encrypts in Node. SKIP LOCKED keeps
    // their claims disjoint. One lane leaves a core idle half of the time (measured with
    // npm run bench --diagnose: the sidecar kept about 1.0 core busy on 2).
    const lanes = Array.from({ length: Math.max(1, this.#o.concurrency ?? 1) }, () => this.#lane(tally));
    const results = await Promise.allSettled(lanes);
    const failed = results.find((r): r is PromiseRejectedResult => r.status === 'rejected');
    if (failed) throw failed.reason;
    // The estimate is exact unless writes arrived meanwhile; a drain a second later recounts.
    this.#depth = tally.depth;
    this.#o.metrics.queueDepth.set(tally.depth);
    this.emit('drained', tally.done);
    return tally.done;
  }

  async #lane(tally: { done: number; quarantined: number; depth: number }): Promise<void> {
    let cursor = '0';
    while (!this.#poll.stopping) {
      const end = this.#o.metrics.batchSeconds.startTimer();
      const r = await this.#o.processBatch(this.#o.batchSize, cursor);
      if (r.claimed > 0) end();
      tally.done += r.encrypted;
      tally.quarantined += r.quarantined;
      tally.depth = Math.max(0, tally.depth - r.encrypted - r.quarantined);
      this.#o.metrics.queueDepth.set(tally.depth);
      if (r.claimed > 0) this.emit('progress', { done: tally.done, queueDepth: tally.depth, quarantined: tally.quarantined });
      if (r.claimed < this.#o.batchSize) {
        if (cursor === '0') break;
        cursor = '0'; // one pass from the start before calling the queue empty
      } else {
        cursor = r.lastId;
      }
    }
  }
}
