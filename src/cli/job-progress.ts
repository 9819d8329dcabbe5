/**
 * Following keyring jobs from the CLI (keyring rotate [index], reencrypt, protect): one progress
 * bar with rate and ETA read from keyring.rotation_progress until every job ends, and a
 * notice when no sidecar has taken a job for a while.
 */
import type pg from 'pg';
import { CliError } from './errors.js';
import { ProgressBar, type Out } from './output.js';

/** How often the progress bar reads keyring.rotation_progress (ms). */
const POLL_MS = 250;
/** After this long in state queued, say that no sidecar has taken the job (ms). */
const QUEUED_NOTICE_MS = 10_000;

export interface JobProgress {
  readonly job: string;
  readonly state: 'queued' | 'running' | 'done' | 'failed';
  readonly purpose: 'encrypt' | 'index' | null;
  /** NULL for a job that needs no key (an adoption's backfill). */
  readonly target_version: number | null;
  readonly column_name: string | null;
  readonly done: string;
  /** NULL until a sidecar has counted it (an adoption's backfill). */
  readonly total: string | null;
  /** Left behind: data keys that did not unwrap (rewrap); quarantined + unavailable values (re-encryption). */
  readonly failed: string;
  readonly skipped: string;
  readonly quarantined: string;
  readonly erased: string;
  readonly unavailable: string;
  readonly rows_per_second: string | null;
  readonly eta_seconds: number | null;
  readonly seconds: number | null;
  readonly error: string | null;
}

export async function jobProgress(c: pg.ClientBase, jobs: readonly string[]): Promise<JobProgress[]> {
  const { rows } = await c.query<JobProgress>(
    `SELECT job::text, state, purpose::text AS purpose, target_version, column_name, done, total, failed, skipped, quarantined, erased, unavailable,
            rows_per_second, extract(epoch FROM eta)::float8 AS eta_seconds,
            extract(epoch FROM coalesce(finished_at, now()) - started_at)::float8 AS seconds, error
       FROM keyring.rotation_progress WHERE job = ANY($1::bigint[]) ORDER BY job`, [jobs]);
  if (rows.length !== jobs.length) throw new CliError('NO_JOB', `job(s) ${jobs.join(', ')} vanished from keyring.jobs`);
  return rows;
}

/** Items a job has dealt with, whatever the outcome. */
const handled = (p: JobProgress): number =>
  Number(p.done) + Number(p.failed) + Number(p.skipped) + Number(p.erased);

/**
 * Draws one bar over `jobs` until all of them end (Ctrl-C stops watching, not the jobs);
 * returns their final rows.
 */
export async function followJobs(c: pg.ClientBase, jobs: readonly string[], label: string, unit: string, out: Out): Promise<JobProgress[]> {
  let ps = await jobProgress(c, jobs);
  const since = Date.now();
  let noticed = false;
  const open = () => ps.some((p) => p.state === 'queued' || p.state === 'running');
  const notice = () => {
    if (noticed || Date.now() - since <= QUEUED_NOTICE_MS || ps.some((p) => p.state === 'running')) return;
    noticed = true;
    const v = ps[0]?.target_version;
    out.error(`no sidecar has taken job(s) ${jobs.join(', ')} yet: ` +
      `${v === null || v === undefined ? 'a sidecar' : `one holding ${ps[0]?.purpose ?? 'encrypt'} key version ${v}`} must be running (SELECT * FROM keyring.sidecars)`);
  };
  // A backfill's total is counted by the sidecar that takes it first.
  while (open() && ps.some((p) => p.total === null)) {
    notice();
    await new Promise((res) => setTimeout(res, POLL_MS));
    ps = await jobProgress(c, jobs);
  }
  const total = ps.reduce((a, p) => a + Number(p.total ?? 0), 0);
  const bar = new ProgressBar(label, total, unit);
  const rate = () => ps.reduce((a, p) => a + (p.state === 'running' ? Number(p.rows_per_second ?? 0) : 0), 0);
  while (open()) {
    const done = ps.reduce((a, p) => a + handled(p), 0);
    const r = rate();
    bar.update(done, false, r > 0 ? { rate: r, etaSeconds: Math.max(0, total - done) / r } : undefined);
    notice();
    await new Promise((res) => setTimeout(res, POLL_MS));
    ps = await jobProgress(c, jobs);
  }
  const done = ps.reduce((a, p) => a + handled(p), 0);
  const seconds = Math.max(...ps.map((p) => p.seconds ?? 0));
  bar.finish(done, { rate: seconds > 0 ? done / seconds : 0, etaSeconds: 0 });
  return ps;
}

export const fmt = (n: number): string => n.toLocaleString('en-US');
