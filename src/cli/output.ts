/** Terminal output helpers for the CLI: aligned tables and one-line failures. */

export interface Out {
  line(text?: string): void;
  error(text: string): void;
}

export const stdio: Out = {
  line: (text = '') => process.stdout.write(`${text}\n`),
  error: (text) => process.stderr.write(`${text}\n`),
};

function cell(v: unknown): string {
  if (v === null || v === undefined) return '';
  if (v instanceof Date) return v.toISOString();
  if (Buffer.isBuffer(v)) return `\\x${v.toString('hex')}`;
  // node-postgres parses an interval into an object with toPostgres(): print it as psql does.
  const pgValue = v as { toPostgres?: () => string };
  if (typeof v === 'object' && typeof pgValue.toPostgres === 'function') return pgValue.toPostgres();
  if (typeof v === 'object') return JSON.stringify(v);
  return String(v);
}

/** JSON.stringify replacer: Postgres values (an interval) as the text psql shows. */
export function jsonValue(_key: string, v: unknown): unknown {
  const pgValue = v as { toPostgres?: () => string } | null;
  return v !== null && typeof v === 'object' && typeof pgValue?.toPostgres === 'function' ? pgValue.toPostgres() : v;
}

/** Renders rows as an aligned text table, like psql's default output. */
export function formatTable(rows: readonly Record<string, unknown>[], columns?: readonly string[]): string {
  const cols = columns ?? (rows[0] ? Object.keys(rows[0]) : []);
  if (cols.length === 0) return '(no rows)';
  const cells = rows.map((r) => cols.map((c) => cell(r[c])));
  const widths = cols.map((c, i) => Math.max(c.length, ...cells.map((r) => r[i]!.length)));
  const fmt = (vals: string[]) => vals.map((v, i) => v.padEnd(widths[i]!)).join(' | ').trimEnd();
  const out = [fmt([...cols]), widths.map((w) => '-'.repeat(w)).join('-+-'), ...cells.map(fmt)];
  out.push(`(${rows.length} row${rows.length === 1 ? '' : 's'})`);
  return out.join('\n');
}

/** A single-line progress bar with rate and ETA, redrawn in place on a TTY. */
export class ProgressBar {
  private readonly started = Date.now();
  private lastDraw = 0;
  constructor(
    private readonly label: string,
    private readonly total: number,
    private readonly unit = 'rows',
    private readonly stream: NodeJS.WriteStream = process.stderr,
  ) {}

  /** Redraws; `known` gives rate and ETA measured elsewhere (e.g. keyring.rotation_progress) instead of since construction. */
  update(done: number, force = false, known?: { rate: number; etaSeconds: number }): void {
    const now = Date.now();
    if (!force && now - this.lastDraw < (this.stream.isTTY ? 200 : 2000)) return;
    this.lastDraw = now;
    // A job's total is counted when it starts; rows the application adds meanwhile can
    // carry `done` past it: the bar then shows the grown total, never "101/100".
    const total = Math.max(this.total, done);
    const frac = total > 0 ? done / total : 1;
    const width = 30;
    const filled = Math.round(frac * width);
    const secs = (now - this.started) / 1000;
    const rate = known?.rate ?? (secs > 0 ? done / secs : 0);
    const eta = known?.etaSeconds ?? (rate > 0 ? Math.max(0, (total - done) / rate) : 0);
    const text = `${this.label} [${'#'.repeat(filled)}${'.'.repeat(width - filled)}] ` +
      `${done.toLocaleString('en-US')}/${total.toLocaleString('en-US')} ` +
      `${Math.round(rate).toLocaleString('en-US')} ${this.unit}/s ETA ${eta.toFixed(0)}s`;
    if (this.stream.isTTY) this.stream.write(`\r${text}`);
    else this.stream.write(`${text}\n`);
  }

  finish(done: number, known?: { rate: number; etaSeconds: number }): void {
    this.update(done, true, known);
    if (this.stream.isTTY) this.stream.write('\n');
  }
}
