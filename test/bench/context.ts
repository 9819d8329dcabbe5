/** What run.ts hands every bench section. */
import type { BenchData } from './data.js';
import type { BenchKeys } from './sidecar-process.js';

export interface BenchContext {
  /** The bench database (fresh, keyring schema migrated, keys registered and active). */
  readonly url: string;
  readonly serverVersion: string;
  /** True when the server is the embedded one started for this run. */
  readonly embedded: boolean;
  readonly rows: number;
  /** Rows per INSERT statement of every peer (1,000). */
  readonly insertBatch: number;
  /** KEYRING_BATCH_SIZE of the sidecar process. */
  readonly sidecarBatchSize: number;
  /** Sidecar processes running during the keyring measurement (1 unless `--sidecars`). */
  readonly sidecars: number;
  /** Server settings for the sidecar's sessions (`--sidecar-pg-options`, experiments), or undefined. */
  readonly sidecarPgOptions: string | undefined;
  /** Seconds of paced inserts in the latency measurement. */
  readonly latencySeconds: number;
  /** Rows/s of the latency run when fixed by `--latency-rate`; else half the measured keyring rate. */
  readonly latencyRate: number | undefined;
  readonly data: BenchData;
  /** Root keys for sidecar processes (env only; registered and active in the database). */
  readonly keys: BenchKeys;
  /** Progress to stderr (the report goes to stdout). */
  progress(line: string): void;
  /** Registers cleanup that must run even on error or Ctrl-C (run in reverse order). */
  defer(fn: () => Promise<void> | void): void;
}
