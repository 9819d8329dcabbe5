/**
 * CPU time of processes on this host (Linux /proc), to tell where a phase's time went:
 * the application's backend (staging triggers), the sidecar process (crypto, protocol),
 * the sidecar's backends (UPDATE, DELETE, claim) and the rest of the server (WAL writer,
 * autovacuum, checkpointer). Works when the server runs on this machine (the embedded
 * server, or a local DATABASE_URL); elsewhere every reading is `undefined`.
 */
import { readFileSync } from 'node:fs';
import type pg from 'pg';

/** Clock ticks per second of /proc/<pid>/stat (USER_HZ: 100 on every Linux ABI in use). */
const TICKS_PER_SECOND = 100;

/** User + system CPU seconds of one process, or undefined when it cannot be read. */
export function cpuSeconds(pid: number): number | undefined {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    // The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    const utime = Number(fields[11]);
    const stime = Number(fields[12]);
    return Number.isFinite(utime) && Number.isFinite(stime) ? (utime + stime) / TICKS_PER_SECOND : undefined;
  } catch {
    return undefined;
  }
}

export interface CpuGroups {
  /** The bench's own Node process (data arrays, pg protocol, app-side crypto). */
  readonly bench: number;
  /** Named backends, keyed by label. */
  readonly [label: string]: number;
}

export interface CpuProbe {
  /** Labels of backends to track by pid (e.g. the app connection). */
  readonly backends: ReadonlyMap<number, string>;
  /** Other processes (e.g. the sidecar) by pid. */
  readonly processes: ReadonlyMap<number, string>;
  /** application_name prefixes whose backends get their own label. */
  readonly appNames: ReadonlyArray<readonly [prefix: string, label: string]>;
}

interface Snapshot {
  readonly at: number;
  readonly bench: number;
  readonly perPid: Map<number, { label: string; cpu: number }>;
}

/**
 * Every server process visible in pg_stat_activity (client backends and background
 * processes alike) labelled, plus the extra processes of the probe.
 */
async function snapshot(db: pg.ClientBase, probe: CpuProbe): Promise<Snapshot | undefined> {
  const { rows } = await db.query<{ pid: number; app: string | null; kind: string | null }>(
    'SELECT pid, application_name AS app, backend_type AS kind FROM pg_stat_activity');
  const perPid = new Map<number, { label: string; cpu: number }>();
  let readable = false;
  for (const r of rows) {
    const cpu = cpuSeconds(r.pid);
    if (cpu === undefined) continue;
    readable = true;
    let label = probe.backends.get(r.pid);
    label ??= probe.appNames.find(([prefix]) => (r.app ?? '').startsWith(prefix))?.[1];
    label ??= r.kind === 'client backend' ? 'other backends' : 'server background';
    perPid.set(r.pid, { label, cpu });
  }
  if (!readable) return undefined;
  for (const [pid, label] of probe.processes) {
    const cpu = cpuSeconds(pid);
    if (cpu !== undefined) perPid.set(pid, { label, cpu });
  }
  const u = process.cpuUsage();
  return { at: performance.now(), bench: (u.user + u.system) / 1e6, perPid };
}

export interface CpuReport {
  readonly wallSeconds: number;
  /** CPU seconds per label over the interval (bench included as "bench (node)"). */
  readonly byLabel: ReadonlyMap<string, number>;
  readonly total: number;
}

/**
 * Starts measuring; the returned function ends the interval. A process that appears
 * during the interval counts from zero; one that exits during it is lost (rare: pools
 * keep their connections).
 */
export async function startCpu(db: pg.ClientBase, probe: CpuProbe): Promise<() => Promise<CpuReport | undefined>> {
  const a = await snapshot(db, probe);
  return async () => {
    const b = await snapshot(db, probe);
    if (!a || !b) return undefined;
    const byLabel = new Map<string, number>();
    const add = (label: string, v: number): void => { byLabel.set(label, (byLabel.get(label) ?? 0) + Math.max(0, v)); };
    add('bench (node)', b.bench - a.bench);
    for (const [pid, { label, cpu }] of b.perPid) add(label, cpu - (a.perPid.get(pid)?.cpu ?? 0));
    let total = 0;
    for (const v of byLabel.values()) total += v;
    return { wallSeconds: (b.at - a.at) / 1000, byLabel, total };
  };
}

/** "sidecar (node) 1.23 s, ..." sorted by size, with µs per row. */
export function formatCpu(r: CpuReport, rows: number, order?: readonly string[]): string {
  const entries = [...r.byLabel].filter(([, v]) => v >= 0.005);
  if (order) entries.sort((x, y) => idx(order, x[0]) - idx(order, y[0]));
  else entries.sort((x, y) => y[1] - x[1]);
  const perRow = (s: number): string => `${((s * 1e6) / rows).toFixed(1)} µs/row`;
  return `CPU ${r.total.toFixed(2)} s in ${r.wallSeconds.toFixed(2)} s wall (${(r.total / r.wallSeconds).toFixed(2)} cores busy): ` +
    entries.map(([l, v]) => `${l} ${v.toFixed(2)} s (${perRow(v)})`).join(', ');
}

function idx(order: readonly string[], label: string): number {
  const i = order.indexOf(label);
  return i < 0 ? order.length : i;
}
