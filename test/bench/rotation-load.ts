/**
 * The application's write load of the rotation section: single-row INSERTs through a
 * staging view at a steady rate on one connection, each INSERT's round trip timed (what
 * the application waits for). A slot missed by more than one interval is dropped, not
 * made up by a burst, so a slow server shows up as latency, not as a changed load.
 */
import type pg from 'pg';
import type { BenchData } from './data.js';
import { smallBatches } from './data.js';
import { summarize, type Summary } from './stats.js';

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

export interface LoadResult {
  readonly rate: number;
  readonly seconds: number;
  readonly inserts: number;
  /** Slots dropped because an INSERT ran later than one interval behind schedule. */
  readonly late: number;
  readonly latency: Summary;
}

export interface InsertLoad {
  /** Stops after the INSERT in hand; resolves with what was measured. */
  stop(): Promise<LoadResult>;
}

/** Starts `rate` INSERTs per second into `view` (id, name, national_id), ids from `firstId`. */
export function startInsertLoad(app: pg.Client, view: string, data: BenchData, rate: number, firstId: number): InsertLoad {
  const intervalMs = 1000 / rate;
  const sql = `INSERT INTO ${view} (id, name, national_id) VALUES ($1, $2, $3)`;
  const source = smallBatches(data, 1, firstId);
  const ms: number[] = [];
  let late = 0;
  let stopping = false;
  const t0 = performance.now();
  const run = (async () => {
    let next = t0;
    while (!stopping) {
      const now = performance.now();
      if (next > now) await sleep(next - now);
      else if (now - next > intervalMs) {
        late++;
        next = now;
      }
      if (stopping) break;
      const b = source.next().value!;
      const s = performance.now();
      await app.query({ name: `load_${view}`, text: sql, values: [b.ids[0], b.names[0], b.nationalIds[0]] });
      ms.push(performance.now() - s);
      next += intervalMs;
    }
    return performance.now() - t0;
  })();
  return {
    async stop() {
      stopping = true;
      const wall = await run;
      return { rate, seconds: wall / 1000, inserts: ms.length, late, latency: summarize(ms) };
    },
  };
}

/** The load for `seconds`. */
export async function runInsertLoad(app: pg.Client, view: string, data: BenchData, rate: number, firstId: number, seconds: number): Promise<LoadResult> {
  const load = startInsertLoad(app, view, data, rate, firstId);
  await sleep(seconds * 1000);
  return load.stop();
}
