/**
 * The wait shared by the sidecar's loops (write path and jobs): a notification is a hint
 * that ends an idle wait early; a kick (keys reloaded, link back, stop) ends any wait.
 * Every wait also ends on its own after its time: the table is the truth, and a loop
 * that waits also polls.
 */
import { backoffDelay } from './listener.js';

export class Wake {
  #wait: { resolve: () => void; hints: boolean } | undefined;

  /** Sleeps `ms`; a hint ends the sleep early only when `hints` (idle waits, not backoff). */
  sleep(ms: number, hints: boolean): Promise<void> {
    return new Promise((resolve) => {
      const wait = {
        hints,
        resolve: (): void => {
          clearTimeout(timer);
          if (this.#wait === wait) this.#wait = undefined;
          resolve();
        },
      };
      const timer = setTimeout(wait.resolve, ms);
      this.#wait = wait;
    });
  }

  /** A notification arrived: end an idle wait. */
  hint(): void {
    if (this.#wait?.hints) this.#wait.resolve();
  }

  /** End whatever wait is in progress. */
  now(): void {
    this.#wait?.resolve();
  }
}

/** Back-off after `streak` failed rounds: from 100 ms (or the poll interval, if shorter) up to 5 s (or the poll interval, if longer). */
export function retryDelay(streak: number, pollIntervalMs: number): number {
  return backoffDelay(streak, Math.min(100, pollIntervalMs), Math.max(pollIntervalMs, 5_000));
}

export interface PollLoopOptions {
  readonly pollIntervalMs: number;
  /** One round of work; it returns when there is nothing left to do, or throws. */
  readonly round: () => Promise<void>;
  /** A round failed; `streak` counts the failed rounds in a row (1 for the first). */
  readonly onError: (err: unknown, streak: number) => void;
  /** A round succeeded after `streak` failed ones. */
  readonly onRecovered?: (streak: number) => void;
}

/**
 * The sidecar's loop shape (write path and jobs): run a round; then, after a failure,
 * back off; after success, wait for a notification or the poll interval, unless a hint
 * came in during the round. A notification is a hint; the poll is the backstop.
 */
export class PollLoop {
  readonly #o: PollLoopOptions;
  readonly #wake = new Wake();
  #stopping = false;
  #hinted = false;
  #streak = 0;
  #loop: Promise<void> | undefined;

  constructor(o: PollLoopOptions) {
    this.#o = o;
  }

  get stopping(): boolean {
    return this.#stopping;
  }

  /** A notification: end an idle wait now, or run again right after the current round. */
  hint(): void {
    this.#hinted = true;
    this.#wake.hint();
  }

  /** Something may be unblocked (keys reloaded, link back): run again now, without back-off. */
  kick(): void {
    this.#hinted = true;
    this.#streak = 0;
    this.#wake.now();
  }

  start(): void {
    this.#loop ??= this.#run();
  }

  /** Stops looping; resolves when the round in progress has ended. */
  async stop(): Promise<void> {
    this.#stopping = true;
    this.#wake.now();
    await this.#loop;
  }

  async #run(): Promise<void> {
    while (!this.#stopping) {
      this.#hinted = false;
      let failed = false;
      try {
        await this.#o.round();
        if (this.#streak > 0) this.#o.onRecovered?.(this.#streak);
        this.#streak = 0;
      } catch (err) {
        failed = true;
        this.#o.onError(err, ++this.#streak);
      }
      if (this.#stopping) break;
      if (failed) await this.#wake.sleep(retryDelay(this.#streak, this.#o.pollIntervalMs), false);
      else if (!this.#hinted) await this.#wake.sleep(this.#o.pollIntervalMs, true);
    }
  }
}
