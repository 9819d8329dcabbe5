/**
 * `keyring key list|activate|retire|disable|enable|destroy` and `keyring rotate` as a DBA
 * runs them: child processes of bin/keyring.js, DATABASE_URL naming a keyring_admin login
 * role (not a superuser), a real sidecar doing the rewrap.
 */
import { spawn } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { Sidecar } from '../../sidecar/sidecar.js';
import { createTestDb, type TestDb } from '../helpers/db.js';
import { DBA_ROLE, loginRoleUrl } from '../helpers/roles.js';
import {
  activateKeys, createSidecarRole, dropRole, fingerprintOf, newKeyHex, newKeys, startSidecar, type TestKeys,
} from '../helpers/sidecar.js';

const ROOT = fileURLToPath(new URL('../..', import.meta.url));

interface Run { code: number | null; stdout: string; stderr: string }

function cli(args: string[], env: Record<string, string>): Promise<Run> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, ['bin/keyring.js', ...args], {
      cwd: ROOT, env: { PATH: process.env.PATH, ...env }, stdio: ['ignore', 'pipe', 'pipe'],
    });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => { stdout += d.toString(); });
    child.stderr.on('data', (d: Buffer) => { stderr += d.toString(); });
    child.on('error', reject);
    child.on('exit', (code) => resolve({ code, stdout, stderr }));
  });
}

let db: TestDb;
let keys: TestKeys;
let env: Record<string, string>;
let sidecarUrl: string;
const role = `kr_sidecar_cli_${process.pid}`;
const running: Sidecar[] = [];
const [v2, v3] = [newKeyHex(), newKeyHex()];

const key = (...args: string[]) => cli(['key', ...args], env);
const states = async () => Object.fromEntries((await db.pool.query<{ version: number; state: string }>(
  `SELECT version, state::text FROM keyring.root_keys WHERE purpose = 'encrypt' ORDER BY version`)).rows.map((r) => [r.version, r.state]));

beforeAll(async () => {
  db = await createTestDb();
  keys = newKeys();
  await activateKeys(db.pool, keys);
  sidecarUrl = await createSidecarRole(db.pool, db.url, role);
  env = { DATABASE_URL: await loginRoleUrl(db.url, DBA_ROLE, 'keyring_admin') };
  await db.pool.query(`CREATE TABLE t (id int PRIMARY KEY, subject text NOT NULL, v text)`);
  await db.pool.query(`SELECT keyring.protect('t', 'v', p_subject_column => 'subject')`);
  const s = await startSidecar(sidecarUrl, keys, { KEYRING_POLL_INTERVAL_MS: '100' });
  await db.pool.query(`INSERT INTO t_staging SELECT g, 's' || (g % 40), 'v' || g FROM generate_series(1, 200) g`);
  await s.drain();
  await s.stop();
});
afterAll(async () => {
  await Promise.all(running.splice(0).map((s) => s.stop()));
  await db?.drop();
  await dropRole(role);
});

describe('keyring key', () => {
  it('lists every version, as a table or as JSON', async () => {
    const r = await key('list');
    expect(r.code).toBe(0);
    expect(r.stdout).toMatch(/^purpose\s+\| version \| state\s+\| fingerprint/);
    expect(r.stdout).toContain(fingerprintOf(keys.encrypt[0]!, 'encrypt'));
    expect(r.stdout).toMatch(/encrypt\s+\| 1\s+\| active .*\| 40\s/);
    const json = JSON.parse((await key('list', '--json')).stdout) as Record<string, unknown>[];
    expect(json.map((k) => [k.purpose, k.version, k.state, k.data_keys])).toEqual([['encrypt', 1, 'active', '40'], ['index', 1, 'active', null]]);
  });

  it('refuses to activate a version no live sidecar holds, with the reason and the hint', async () => {
    running.push(await startSidecar(sidecarUrl, { encrypt: [...keys.encrypt, v2, v3], index: keys.index }, { KEYRING_POLL_INTERVAL_MS: '100' }));
    await running[0]!.stop();
    running.splice(0);
    const r = await key('activate', 'encrypt', '2');
    expect(r.code).toBe(1);
    expect(r.stderr.trim()).toMatch(/^keyring key: no live sidecar holds encrypt key version 2 \(SQLSTATE 55000\)\. Hint: Give the key to the sidecars/);
  });

  it('activates with a live sidecar, and says what is left to rewrap', async () => {
    running.push(await startSidecar(sidecarUrl, { encrypt: [...keys.encrypt, v2, v3], index: keys.index }, { KEYRING_POLL_INTERVAL_MS: '100' }));
    const r = await key('activate', 'encrypt', '2');
    expect(r).toMatchObject({ code: 0, stdout: 'encrypt key version 2 is active\n40 data key(s) are still wrapped by older versions: run `keyring rotate`\n' });
    expect(await states()).toEqual({ 1: 'decrypt_only', 2: 'active', 3: 'pending' });
  });

  it('refuses to retire a version data keys depend on, naming them', async () => {
    const r = await key('retire', 'encrypt', '1');
    expect(r.code).toBe(1);
    expect(r.stderr).toContain("keyring key: cannot retire encrypt key version 1: it still wraps 40 data keys (public.t.v: 40); " +
      "run SELECT keyring.rotate('encrypt') first (SQLSTATE 55006). Hint: keyring.rotate rewraps");
  });
});

describe('keyring rotate', () => {
  it('rewraps with a progress bar until done', async () => {
    const r = await cli(['rotate', '--batch-size', '7'], env);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toMatch(/^rewrapped 40 data key\(s\) under encrypt key version 2 in \d+\.\d s\n$/);
    expect(r.stderr).toMatch(/rewrap job \d+ \[#{30}\] 40\/40 [\d,]+ keys\/s ETA 0s/); // not a TTY: one line per update
    expect((await db.pool.query(`SELECT count(*)::int AS n FROM keyring.data_keys WHERE root_version = 2`)).rows[0].n).toBe(40);
  });

  it('--detach queues the job and returns at once', async () => {
    const r = await cli(['rotate', '--detach'], env);
    expect(r.code).toBe(0);
    expect(r.stdout).toMatch(/^rewrap job (\d+) \(done\): 0 data key\(s\) to rewrap under encrypt key version 2; follow it with SELECT \* FROM keyring.rotation_progress WHERE job = \1\n$/);
  });

  it('refuses an unknown root and bad options (exit 2)', async () => {
    expect((await cli(['rotate', 'other'], env)).code).toBe(2);
    expect((await cli(['rotate', 'index', 'encrypt'], env)).code).toBe(2);
    expect((await cli(['rotate', '--batch-size', '0'], env)).code).toBe(2);
  });
});

describe('keyring key: emergency and end of life', () => {
  it('disable needs --reason, and --successor for the active version', async () => {
    const noReason = await key('disable', 'encrypt', '2');
    expect(noReason.code).toBe(2);
    expect(noReason.stderr).toContain('keyring key disable needs --reason "<why>"');
    const active = await key('disable', 'encrypt', '2', '--reason', 'suspected leak');
    expect(active.code).toBe(1);
    expect(active.stderr).toContain('encrypt key version 2 is the active version; it can be disabled only together with activating another');
    const r = await key('disable', 'encrypt', '2', '--reason', 'suspected leak', '--successor', '3');
    expect(r).toMatchObject({ code: 0, stdout: 'encrypt key version 3 is active\nencrypt key version 2 is disabled: nothing new is encrypted, wrapped or indexed under it\n' });
    expect(await states()).toEqual({ 1: 'decrypt_only', 2: 'disabled', 3: 'active' });
    const audit = (await db.pool.query(`SELECT reason, db_role::text FROM keyring.audit_log WHERE action = 'key.disabled'`)).rows;
    expect(audit).toEqual([{ reason: 'suspected leak', db_role: DBA_ROLE }]);
  });

  it('enable undoes it with a reason', async () => {
    expect((await key('enable', 'encrypt', '2')).code).toBe(2);
    const r = await key('enable', 'encrypt', '2', '--reason', 'false alarm');
    expect(r.code).toBe(0);
    expect(r.stdout).toContain('encrypt key version 2 is enabled again (decrypt_only)');
    expect(await states()).toEqual({ 1: 'decrypt_only', 2: 'decrypt_only', 3: 'active' });
  });

  it('retire, then destroy only with --yes', async () => {
    expect(await key('retire', 'encrypt', '1')).toMatchObject({ code: 0 });
    const noYes = await key('destroy', 'encrypt', '1');
    expect(noYes.code).toBe(2);
    expect(noYes.stderr).toContain('destroying encrypt key version 1 cannot be undone; run again with --yes');
    expect(await states()).toMatchObject({ 1: 'retired' });
    const r = await key('destroy', 'encrypt', '1', '--yes');
    expect(r.code).toBe(0);
    expect(r.stdout).toContain(`Delete the key with fingerprint ${fingerprintOf(keys.encrypt[0]!, 'encrypt')} from every key store`);
    expect(await states()).toMatchObject({ 1: 'destroyed' });
  });

  it('rejects unknown subcommands, options that do not belong, and bad versions (exit 2)', async () => {
    for (const args of [['rotate'], ['list', '--reason', 'x'], ['retire', 'encrypt'], ['retire', 'encrypt', 'one'], ['retire', 'other', '1'],
      ['destroy', 'encrypt', '1', '--reason', 'x']]) {
      const r = await key(...args);
      expect(r.code, args.join(' ')).toBe(2);
    }
  });

  it('is listed in keyring --help', async () => {
    const r = await cli(['--help'], env);
    expect(r.stdout).toMatch(/\n {2}key +root key versions: list, activate, retire, disable, enable, destroy\n/);
    expect(r.stdout).toMatch(/\n {2}rotate +rotate a root key: rewrap data keys under the active encrypt version, or re-index/);
  });
});
