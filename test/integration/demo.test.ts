/**
 * `keyring demo` end to end, as a user runs it: `node bin/keyring.js demo --rows 2000`
 * against the test server (DATABASE_URL = the admin URL). The demo drops and creates its
 * database, so it gets a unique name (--database) that is dropped afterwards; it runs in a
 * temporary working directory, so its key file and CSV (.keyring/) never touch the
 * repository's own .keyring/.
 */
import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, describe, expect, inject, it } from 'vitest';
import { dropDatabase, testDbName } from '../helpers/db.js';

const ROOT = fileURLToPath(new URL('../..', import.meta.url));
const database = testDbName('demo');
const cwd = mkdtempSync(join(tmpdir(), 'keyring-demo-test-'));

afterAll(async () => {
  await dropDatabase(database);
  rmSync(cwd, { recursive: true, force: true });
});

function runCli(args: string[], env: NodeJS.ProcessEnv): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [join(ROOT, 'bin/keyring.js'), ...args], {
      cwd, env: { PATH: process.env.PATH, ...env }, stdio: ['ignore', 'pipe', 'pipe'],
    });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => { stdout += d.toString(); });
    child.stderr.on('data', (d: Buffer) => { stderr += d.toString(); });
    child.on('error', reject);
    child.on('exit', (code) => resolve({ code, stdout, stderr }));
  });
}

describe('keyring demo', () => {
  it('runs 2,000 customers end to end: lookup finds exactly one row, no plaintext found, demo OK', async () => {
    const r = await runCli(['demo', '--rows', '2000', '--database', database], { DATABASE_URL: inject('adminUrl') });
    expect(r.stderr).not.toMatch(/error|failed/i);
    expect(r.code, r.stdout + r.stderr).toBe(0);
    expect(r.stdout).toContain(`database ${database}: keyring schema version`);
    expect(r.stdout).toMatch(/lookup of customer #\d+'s national id through lookupTerms: 1 row\(s\) found .*decrypts back to the same id: yes/);
    expect(r.stdout).toMatch(/plaintext check: .* none found;/);
    expect(r.stdout).toMatch(/encrypted 10,000 values \(2,000 rows x 5 columns\)/);
    expect(r.stdout).toMatch(/^demo OK$/m);
    // The demo's files went to its working directory, the key file private to its owner.
    expect(statSync(join(cwd, '.keyring', 'demo-keys.json')).mode & 0o077).toBe(0);
  });

  it('refuses a database name that is not a plain identifier, with one line', async () => {
    const r = await runCli(['demo', '--rows', '2', '--database', 'x; DROP DATABASE postgres'], { DATABASE_URL: inject('adminUrl') });
    expect(r.code).toBe(2);
    expect(r.stderr.trim().split('\n')).toHaveLength(1);
    expect(r.stderr).toContain('--database');
  });
});
