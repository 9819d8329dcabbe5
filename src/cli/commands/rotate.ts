import { fmt, followJobs, jobProgress } from '../job-progress.js';
import { parse, type Command } from '../command.js';
import { CliError, usageError } from '../errors.js';
import { withClient } from '../sql.js';

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
