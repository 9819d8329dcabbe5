/**
 * Bench rows: the demo's deterministic synthetic customers (valid-looking Norwegian
 * national ids, no real persons), generated once before any clock starts and shared by
 * every peer, so all of them write the same bytes.
 */
import { generateCustomers } from '../../src/demo/generate.js';

export interface Batch {
  /** bigint ids as text (pg sends them as-is into bigint[]). */
  readonly ids: string[];
  readonly names: string[];
  readonly nationalIds: string[];
}

export interface BenchData {
  readonly rows: number;
  readonly batches: readonly Batch[];
}

/** `rows` customers in batches of `batchRows`. */
export function makeData(rows: number, batchRows: number): BenchData {
  const batches: Batch[] = [];
  let cur: Batch = { ids: [], names: [], nationalIds: [] };
  for (const c of generateCustomers(rows)) {
    cur.ids.push(String(c.id));
    cur.names.push(c.name);
    cur.nationalIds.push(c.nationalId);
    if (cur.ids.length === batchRows) {
      batches.push(cur);
      cur = { ids: [], names: [], nationalIds: [] };
    }
  }
  if (cur.ids.length > 0) batches.push(cur);
  return { rows, batches };
}

/**
 * An endless supply of small batches with fresh ids starting at `firstId`, cycling
 * through the values of `data` (the latency run needs more rows than one pass holds).
 */
export function* smallBatches(data: BenchData, size: number, firstId: number): Generator<Batch> {
  const names = data.batches.flatMap((b) => b.names);
  const nids = data.batches.flatMap((b) => b.nationalIds);
  let id = firstId;
  let i = 0;
  for (;;) {
    const b: Batch = { ids: [], names: [], nationalIds: [] };
    for (let k = 0; k < size; k++, i = (i + 1) % names.length) {
      b.ids.push(String(id++));
      b.names.push(names[i]!);
      b.nationalIds.push(nids[i]!);
    }
    yield b;
  }
}
