import { fmt, followJobs, jobProgress } from '../job-progress.js';
import { parse, type Command } from '../command.js';
import { CliError, usageError } from '../errors.js';
import { withClient } from '../sql.js';

export const reencryptCommand: Command = {
  name: 'reencrypt',
  summary: 're-encrypt every value of a column (or all) under new data keys of the active encrypt version, with progress',
  help: `Usage: keyring reencrypt <schema.table.column|all> [--batch-size N] [--rate N] [--detach]

Runs SELECT keyring.reencrypt(...): one job per protected column (restricted classes
first) that the running sidecars share, --batch-size rows per transaction (default 5000),
at most --rate rows per second across all sidecars (default: no limit). The columns'
data keys are retired at once, so new writes get new keys too. Resumable after a crash;
application writes always win over a batch.

Shows a progress bar with rate and ETA from keyring.rotation_progress until the jobs end;
Ctrl-C stops watching, not the jobs. With --detach, prints the job ids and returns.

Exit 0 when every value was re-encrypted (or skipped: already done, a newer write, a
shredded subject); 1 when values were quarantined (they did not decrypt: see
keyring.quarantine), left for a missing key version, or a job failed.`,
  async run(args, env, out) {
    const { values, positionals } = parse(args, {
      detach: { type: 'boolean' }, 'batch-size': { type: 'string' }, rate: { type: 'string' },
    }, true);
    if (positionals.length !== 1) throw usageError('name one column (schema.table.column) or all: keyring reencrypt <column|all>');
    const column = positionals[0]!;
    const batchSize = values['batch-size'] === undefined ? 5000 : Number(values['batch-size']);
    if (!Number.isInteger(batchSize) || batchSize < 1 || batchSize > 100_000) throw usageError('--batch-size must be a whole number 1..100000');
    const rate = values.rate === undefined ? null : Number(values.rate);
    if (rate !== null && (!Number.isInteger(rate) || rate < 1)) throw usageError('--rate must be a positive whole number of rows per second');

    return withClient(env, 'keyring reencrypt', async (c) => {
      const { rows } = await c.query<{ jobs: string[] }>('SELECT keyring.reencrypt($1, $2, $3)::text[] AS jobs', [column, batchSize, rate]);
      const jobs = rows[0]!.jobs;
      const where = `SELECT * FROM keyring.rotation_progress WHERE job IN (${jobs.join(', ')})`;
      if (values.detach) {
        for (const p of await jobProgress(c, jobs)) {
          out.line(`reencrypt job ${p.job} (${p.state}): ${fmt(Number(p.total))} value(s) of ${p.column_name} to re-encrypt under encrypt key version ${p.target_version}`);
        }
        out.line(`follow with ${where}`);
        return 0;
      }
      const ps = await followJobs(c, jobs, `reencrypt ${jobs.length === 1 ? `job ${jobs[0]}` : `${jobs.length} jobs`}`, 'rows', out);
      const sum = (k: 'done' | 'skipped' | 'quarantined' | 'erased' | 'unavailable') => ps.reduce((a, p) => a + Number(p[k]), 0);
      const seconds = Math.max(...ps.map((p) => p.seconds ?? 0));
      for (const p of ps) {
        out.line(`${p.column_name}: ${fmt(Number(p.done))} re-encrypted, ${fmt(Number(p.skipped))} skipped, ${fmt(Number(p.erased))} erased, ` +
          `${fmt(Number(p.quarantined))} quarantined, ${fmt(Number(p.unavailable))} key unavailable (${p.state})`);
      }
      out.line(`re-encrypted ${fmt(sum('done'))} value(s) under encrypt key version ${ps[0]?.target_version} in ${seconds.toFixed(1)} s`);
      const failed = ps.filter((p) => p.state === 'failed');
      if (failed.length > 0) throw new CliError('JOB_FAILED', `reencrypt job ${failed.map((p) => p.job).join(', ')} failed: ${failed[0]!.error ?? 'no reason recorded'} (${where})`);
      if (sum('quarantined') > 0 || sum('unavailable') > 0) {
        throw new CliError('REENCRYPT_INCOMPLETE', `${fmt(sum('quarantined'))} value(s) quarantined (did not decrypt; SELECT * FROM keyring.quarantine WHERE resolved_at IS NULL), ` +
          `${fmt(sum('unavailable'))} left for a missing key version (start a sidecar with it, then run keyring reencrypt again)`);
      }
      return 0;
    });
  },
};
