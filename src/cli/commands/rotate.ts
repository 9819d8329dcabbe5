import type pg from 'pg';
import { ProgressBar } from '../output.js';
import { parse, type Command } from '../command.js';
import { CliError, usageError } from '../errors.js';
import { withClient } from '../sql.js';

/** How often the progress bar reads keyring.rotation_progress (ms). */
const POLL_MS = 250;
/** After this long in state queued, say that no sidecar has taken the job (ms). */
const QUEUED_NOTICE_MS = 10_000;

interface ProgressRow {
  readonly job: string;
  readonly state: 'queued' | 'running' | 'done' | 'failed';
  readonly target_version: number;
  readonly done: string;
  readonly total: string;
  readonly failed: string;
  readonly rows_per_second: string | null;
  readonly eta_seconds: number | null;
  readonly seconds: number | null;
  readonly error: string | null;
}

async function progress(c: pg.Client, job: string): Promise<ProgressRow> {
  const { rows } = await c.query<ProgressRow>(
    `SELECT job, state, target_version, done, total, failed, rows_per_second,
            extract(epoch FROM eta)::float8 AS eta_seconds,
            extract(epoch FROM coalesce(finished_at, now()) - started_at)::float8 AS seconds, error
       FROM keyring.rotation_progress WHERE job = $1`, [job]);
  if (!rows[0]) throw new CliError('NO_JOB', `job ${job} vanished from keyring.jobs`);
  return rows[0];
}

const fmt = (n: number): string => n.toLocaleString('en-US');

export const rotateCommand: Command = {
  name: 'rotate',
  summary: 'rewrap every data key under the active encrypt root version (values untouched), with progress',
  help: `Usage: keyring rotate [encrypt] [--detach] [--batch-size N]

Runs SELECT keyring.rotate('encrypt'): a rewrap job that the sidecars carry out (one
holding the old and the active versions), in batches of --batch-size data keys per
transaction (default 5000), resumable after a crash. Values are not touched.

Shows a progress bar with rate and ETA from keyring.rotation_progress until the job
ends; Ctrl-C stops watching, not the job. With --detach, prints the job id and returns
at once. Running it again while the job runs follows the same job.

Exit 0 when every data key was rewrapped; 1 when some could not be unwrapped (they stay
on their old version and are listed by the query printed) or the job failed.`,
  async run(args, env, out) {
    const { values, positionals } = parse(args, { detach: { type: 'boolean' }, 'batch-size': { type: 'string' } }, true);
    if (positionals.length > 1 || (positionals[0] !== undefined && positionals[0] !== 'encrypt')) {
      throw usageError('only the encrypt root is rotated by rewrapping: keyring rotate [encrypt]');
    }
    const batchSize = values['batch-size'] === undefined ? 5000 : Number(values['batch-size']);
    if (!Number.isInteger(batchSize) || batchSize < 1 || batchSize > 100_000) throw usageError('--batch-size must be a whole number 1..100000');

    return withClient(env, 'keyring rotate', async (c) => {
      const { rows } = await c.query<{ job: string }>(`SELECT keyring.rotate('encrypt', batch_size => $1) AS job`, [batchSize]);
      const job = rows[0]!.job;
      let p = await progress(c, job);
      const total = Number(p.total);
      const where = `SELECT * FROM keyring.rotation_progress WHERE job = ${job}`;
      if (values.detach) {
        out.line(`rewrap job ${job} (${p.state}): ${fmt(total)} data key(s) to rewrap under encrypt key version ${p.target_version}; follow it with ${where}`);
        return 0;
      }
      const bar = new ProgressBar(`rewrap job ${job}`, total, 'keys');
      const since = Date.now();
      let noticed = false;
      while (p.state === 'queued' || p.state === 'running') {
        const known = p.rows_per_second === null ? undefined : { rate: Number(p.rows_per_second), etaSeconds: p.eta_seconds ?? 0 };
        bar.update(Number(p.done) + Number(p.failed), false, known);
        if (p.state === 'queued' && !noticed && Date.now() - since > QUEUED_NOTICE_MS) {
          noticed = true;
          out.error(`no sidecar has taken job ${job} yet: one holding encrypt key version ${p.target_version} must be running (SELECT * FROM keyring.sidecars)`);
        }
        await new Promise((r) => setTimeout(r, POLL_MS));
        p = await progress(c, job);
      }
      const done = Number(p.done);
      const failed = Number(p.failed);
      bar.finish(done + failed, { rate: Number(p.rows_per_second ?? 0), etaSeconds: 0 });
      if (p.state === 'failed') throw new CliError('JOB_FAILED', `rewrap job ${job} failed: ${p.error ?? 'no reason recorded'} (${where})`);
      out.line(`rewrapped ${fmt(done)} data key(s) under encrypt key version ${p.target_version} in ${(p.seconds ?? 0).toFixed(1)} s`);
      if (failed > 0) {
        throw new CliError('REWRAP_FAILED_KEYS', `${fmt(failed)} data key(s) did not unwrap and were left under their old version; ` +
          `list them with SELECT id, root_version FROM keyring.data_keys WHERE root_version <> ${p.target_version} AND wrapped IS NOT NULL`);
      }
      return 0;
    });
  },
};
