import { fmt, followJobs, jobProgress } from '../job-progress.js';
import { parse, type Command } from '../command.js';
import { CliError, usageError } from '../errors.js';
import type { Out } from '../output.js';
import { withClient } from '../sql.js';

export const rotateCommand: Command = {
  name: 'rotate',
  summary: 'rotate a root key: rewrap data keys under the active encrypt version, or re-index blind indexes under the active index version',
  help: `Usage: keyring rotate [encrypt] [--detach] [--batch-size N]
       keyring rotate index [--detach] [--batch-size N]

encrypt (the default) runs SELECT keyring.rotate('encrypt'): a rewrap job that the
sidecars carry out (one holding the old and the active versions), in batches of
--batch-size data keys per transaction (default 5000), resumable after a crash. Values
are not touched.

index runs SELECT keyring.reindex(...) (what keyring.rotate('index') starts): one job per
column with a blind index, restricted classes first, that the running sidecars share;
every term is recomputed under the active index version, --batch-size rows per
transaction (default 1000). Lookups find every row meanwhile (they try every live index
version). Application writes always win over a batch.

Shows a progress bar with rate and ETA from keyring.rotation_progress until the jobs
end; Ctrl-C stops watching, not the jobs. With --detach, prints the job ids and returns
at once. Running it again while a job runs follows the same job.

Exit 0 when everything was moved to the active version; 1 when some data keys could not
be unwrapped (rewrap), some values were quarantined or left for a missing key version
(re-index; their terms stay on the old version), or a job failed.`,
  async run(args, env, out) {
    const { values, positionals } = parse(args, { detach: { type: 'boolean' }, 'batch-size': { type: 'string' } }, true);
    const purpose = positionals[0] ?? 'encrypt';
    if (positionals.length > 1 || (purpose !== 'encrypt' && purpose !== 'index')) {
      throw usageError('name the root to rotate: keyring rotate [encrypt|index]');
    }
    const batchSize = values['batch-size'] === undefined ? (purpose === 'index' ? 1000 : 5000) : Number(values['batch-size']);
    if (!Number.isInteger(batchSize) || batchSize < 1 || batchSize > 100_000) throw usageError('--batch-size must be a whole number 1..100000');
    if (purpose === 'index') return rotateIndex(env, out, batchSize, values.detach === true);

    return withClient(env, 'keyring rotate', async (c) => {
      const { rows } = await c.query<{ job: string }>(`SELECT keyring.rotate('encrypt', batch_size => $1) AS job`, [batchSize]);
      const job = rows[0]!.job;
      const [first] = await jobProgress(c, [job]);
      const where = `SELECT * FROM keyring.rotation_progress WHERE job = ${job}`;
      if (values.detach) {
        out.line(`rewrap job ${job} (${first!.state}): ${fmt(Number(first!.total))} data key(s) to rewrap under encrypt key version ${first!.target_version}; follow it with ${where}`);
        return 0;
      }
      const [p] = (await followJobs(c, [job], `rewrap job ${job}`, 'keys', out)) as [Awaited<ReturnType<typeof jobProgress>>[number]];
      const done = Number(p.done);
      const failed = Number(p.failed);
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

/** keyring rotate index: the re-index jobs of every blind-indexed column, followed to the end. */
function rotateIndex(env: NodeJS.ProcessEnv, out: Out, batchSize: number, detach: boolean): Promise<number> {
  return withClient(env, 'keyring rotate', async (c) => {
    const { rows } = await c.query<{ jobs: string[] }>('SELECT keyring.reindex($1)::text[] AS jobs', [batchSize]);
    const jobs = rows[0]!.jobs;
    if (jobs.length === 0) {
      out.line('no protected column has a blind index: nothing to re-index');
      return 0;
    }
    const where = `SELECT * FROM keyring.rotation_progress WHERE job IN (${jobs.join(', ')})`;
    if (detach) {
      for (const p of await jobProgress(c, jobs)) {
        out.line(`reindex job ${p.job} (${p.state}): ${fmt(Number(p.total))} term(s) of ${p.column_name} to recompute under index key version ${p.target_version}`);
      }
      out.line(`follow with ${where}`);
      return 0;
    }
    const ps = await followJobs(c, jobs, `reindex ${jobs.length === 1 ? `job ${jobs[0]}` : `${jobs.length} jobs`}`, 'rows', out);
    const sum = (k: 'done' | 'quarantined' | 'unavailable') => ps.reduce((a, p) => a + Number(p[k]), 0);
    const seconds = Math.max(...ps.map((p) => p.seconds ?? 0));
    for (const p of ps) {
      out.line(`${p.column_name}: ${fmt(Number(p.done))} term(s) recomputed, ${fmt(Number(p.skipped))} skipped, ${fmt(Number(p.erased))} erased, ` +
        `${fmt(Number(p.quarantined))} quarantined, ${fmt(Number(p.unavailable))} key unavailable (${p.state})`);
    }
    out.line(`re-indexed ${fmt(sum('done'))} term(s) under index key version ${ps[0]?.target_version} in ${seconds.toFixed(1)} s`);
    const failed = ps.filter((p) => p.state === 'failed');
    if (failed.length > 0) throw new CliError('JOB_FAILED', `reindex job ${failed.map((p) => p.job).join(', ')} failed: ${failed[0]!.error ?? 'no reason recorded'} (${where})`);
    const left = ps.filter((p) => p.error !== null);
    if (sum('quarantined') > 0 || sum('unavailable') > 0 || left.length > 0) {
      throw new CliError('REINDEX_INCOMPLETE', `${fmt(sum('quarantined'))} value(s) quarantined (did not decrypt; SELECT * FROM keyring.quarantine WHERE resolved_at IS NULL), ` +
        `${fmt(sum('unavailable'))} left for a missing key version; their terms stay on the old index version, which cannot be retired yet` +
        (left.length > 0 ? ` (${left[0]!.error})` : ''));
    }
    return 0;
  });
}
