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
