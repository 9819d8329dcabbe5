import { chmodSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { CONFIG_VARIABLES, ConfigError, loadConfig, redactUrl } from '../../src/config.js';
import { generateKey } from '../../src/crypto/index.js';

const hex = (): string => generateKey().use((b) => b.toString('hex'));
const URL_OK = 'postgres://app:s3cret-pw@127.0.0.1:5432/app';
const dir = mkdtempSync(join(tmpdir(), 'keyring-config-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

function expectConfigError(env: NodeJS.ProcessEnv): ConfigError {
  try {
    loadConfig(env);
  } catch (err) {
    expect(err).toBeInstanceOf(ConfigError);
    return err as ConfigError;
  }
  throw new Error('loadConfig accepted an invalid configuration');
}

function keyFile(content: unknown, mode = 0o600): string {
  const p = join(dir, `keys-${Math.random().toString(36).slice(2)}.json`);
  writeFileSync(p, typeof content === 'string' ? content : JSON.stringify(content));
  chmodSync(p, mode);
  return p;
}

describe('loadConfig', () => {
  it('applies the documented defaults and freezes the result', () => {
    const c = loadConfig({ DATABASE_URL: URL_OK, KEYRING_ENCRYPT_KEYS: hex(), KEYRING_INDEX_KEYS: hex() });
    expect(c).toMatchObject({
      batchSize: 500, pollIntervalMs: 1000, listenTimeoutMs: 10_000, logLevel: 'info', healthPort: 8787,
      dataKeyCacheSize: 1000, shutdownTimeoutMs: 10_000, testBatchDelayMs: 0,
    });
    expect(c.instanceId).toMatch(new RegExp(`-${process.pid}-[0-9a-f]{6}$`));
    expect(Object.isFrozen(c)).toBe(true);
    expect(Object.isFrozen(c.keys.encrypt)).toBe(true);
    expect(c.keys.source).toBe('env');
    expect(c.keys.encrypt.map((k) => k.label)).toEqual(['KEYRING_ENCRYPT_KEYS[0]']);
    // Every default documented in CONFIG_VARIABLES is the one applied.
    const byName = new Map(CONFIG_VARIABLES.map((v) => [v.name, v.default]));
    expect(byName.get('KEYRING_BATCH_SIZE')).toBe('500');
    expect(byName.get('KEYRING_HEALTH_PORT')).toBe('8787');
    expect(byName.get('KEYRING_LISTEN_TIMEOUT_MS')).toBe('10000');
  });

  it('takes several keys in any order, whitespace around commas ignored', () => {
    const c = loadConfig({ DATABASE_URL: URL_OK, KEYRING_ENCRYPT_KEYS: ` ${hex()} , ${hex()},${hex()} `, KEYRING_INDEX_KEYS: hex() });
    expect(c.keys.encrypt.map((k) => k.label)).toEqual(['KEYRING_ENCRYPT_KEYS[0]', 'KEYRING_ENCRYPT_KEYS[1]', 'KEYRING_ENCRYPT_KEYS[2]']);
  });

  it('reports every problem at once, each naming its variable, and never quotes a secret', () => {
    const weak = '00'.repeat(32);
    const good = hex();
    const err = expectConfigError({
      DATABASE_URL: 'mysql://root:hunter2-pw@db/x',
      KEYRING_ENCRYPT_KEYS: `${good},${weak},abc`,
      KEYRING_BATCH_SIZE: '0',
      KEYRING_POLL_INTERVAL_MS: 'soon',
      KEYRING_LOG_LEVEL: 'loud',
      KEYRING_HEALTH_PORT: '70000',
      KEYRING_DATA_KEY_CACHE_SIZE: '-1',
    });
    const text = err.problems.join('\n');
    for (const name of ['DATABASE_URL', 'KEYRING_ENCRYPT_KEYS[1]', 'KEYRING_ENCRYPT_KEYS[2]', 'KEYRING_BATCH_SIZE',
      'KEYRING_POLL_INTERVAL_MS', 'KEYRING_LOG_LEVEL', 'KEYRING_HEALTH_PORT', 'KEYRING_DATA_KEY_CACHE_SIZE']) {
      expect(text).toContain(name);
    }
    expect(err.problems.length).toBe(8);
    expect(err.code).toBe('CONFIG_INVALID');
    expect(err.message).not.toMatch(/\n/); // one line for the CLI
    for (const secret of ['hunter2-pw', weak, good, 'abc']) expect(err.message).not.toContain(secret);
  });

  it('requires DATABASE_URL and a key source, and says how to get keys', () => {
    const err = expectConfigError({});
    expect(err.problems.some((p) => p.startsWith('DATABASE_URL is required'))).toBe(true);
    expect(err.message).toMatch(/no key source.*keyring keygen/);
  });

  it('does not echo a password from an invalid DATABASE_URL', () => {
    const err = expectConfigError({ DATABASE_URL: 'postgres://u:pw-XYZ-123@', KEYRING_ENCRYPT_KEYS: hex() });
    expect(err.message).toContain('DATABASE_URL');
    expect(err.message).not.toContain('pw-XYZ-123');
  });

  it('allows an empty key store (the key registry check names the missing versions, case C01)', () => {
    const c = loadConfig({ DATABASE_URL: URL_OK, KEYRING_ENCRYPT_KEYS: '', KEYRING_INDEX_KEYS: '' });
    expect(c.keys.encrypt).toEqual([]);
    expect(c.keys.index).toEqual([]);
  });

  it('refuses one key given twice or for both purposes', () => {
    const k = hex();
    const err = expectConfigError({ DATABASE_URL: URL_OK, KEYRING_ENCRYPT_KEYS: k, KEYRING_INDEX_KEYS: k });
    expect(err.message).toContain('KEYRING_ENCRYPT_KEYS[0] and KEYRING_INDEX_KEYS[0] are the same key');
    expect(err.message).not.toContain(k);
  });

  it('reads a key file with mode 0600', () => {
    const path = keyFile({ encrypt: [hex(), hex()], index: [hex()], comment: 'test keys' });
    const c = loadConfig({ DATABASE_URL: URL_OK, KEYRING_KEY_FILE: path });
    expect(c.keys.source).toBe('file');
    expect(c.keys.encrypt.map((k) => k.label)).toEqual(['KEYRING_KEY_FILE encrypt[0]', 'KEYRING_KEY_FILE encrypt[1]']);
    expect(c.keys.index).toHaveLength(1);
  });

  it('refuses a key file readable by group or others, saying how to fix it', () => {
    const path = keyFile({ encrypt: [hex()], index: [] }, 0o644);
    const err = expectConfigError({ DATABASE_URL: URL_OK, KEYRING_KEY_FILE: path });
    expect(err.message).toContain(`KEYRING_KEY_FILE ${path} is accessible by group or others (mode 0644)`);
    expect(err.message).toContain(`chmod 600 ${path}`);
    expect(expectConfigError({ DATABASE_URL: URL_OK, KEYRING_KEY_FILE: keyFile({ encrypt: [] }, 0o640) }).message).toContain('mode 0640');
  });

  it('refuses both key sources at once', () => {
    const path = keyFile({ encrypt: [hex()], index: [hex()] });
    const err = expectConfigError({ DATABASE_URL: URL_OK, KEYRING_KEY_FILE: path, KEYRING_ENCRYPT_KEYS: hex() });
    expect(err.message).toContain('KEYRING_KEY_FILE and KEYRING_ENCRYPT_KEYS/KEYRING_INDEX_KEYS are both set');
  });

  it('refuses a key file that is not JSON without quoting its content', () => {
    const k = hex();
    const err = expectConfigError({ DATABASE_URL: URL_OK, KEYRING_KEY_FILE: keyFile(`{"encrypt": ["${k}"`) });
    expect(err.message).toContain('is not valid JSON');
    expect(err.message).not.toContain(k);
  });

  it('refuses unknown fields and wrong types in the key file, and weak keys by position', () => {
    const err = expectConfigError({ DATABASE_URL: URL_OK, KEYRING_KEY_FILE: keyFile({ encypt: [hex()] }) });
    expect(err.message).toContain('unknown field');
    const err2 = expectConfigError({ DATABASE_URL: URL_OK, KEYRING_KEY_FILE: keyFile({ encrypt: [hex(), 'ab'.repeat(32)] }) });
    expect(err2.message).toContain('KEYRING_KEY_FILE encrypt[1]');
    expect(err2.message).toMatch(/repeated pattern/);
  });

  it('refuses a missing key file', () => {
    const err = expectConfigError({ DATABASE_URL: URL_OK, KEYRING_KEY_FILE: join(dir, 'nope.json') });
    expect(err.message).toContain('cannot be read');
  });

  it('honours the test batch delay only under NODE_ENV=test', () => {
    const base = { DATABASE_URL: URL_OK, KEYRING_ENCRYPT_KEYS: hex(), KEYRING_TEST_BATCH_DELAY_MS: '250' };
    expect(loadConfig({ ...base, NODE_ENV: 'production' }).testBatchDelayMs).toBe(0);
    expect(loadConfig({ ...base, NODE_ENV: 'test' }).testBatchDelayMs).toBe(250);
  });

  it('accepts port 0 (ephemeral) and explicit values', () => {
    const c = loadConfig({
      DATABASE_URL: URL_OK, KEYRING_ENCRYPT_KEYS: hex(), KEYRING_HEALTH_PORT: '0', KEYRING_BATCH_SIZE: '10000',
      KEYRING_INSTANCE_ID: 'sidecar-a', KEYRING_LOG_LEVEL: 'silent',
    });
    expect(c).toMatchObject({ healthPort: 0, batchSize: 10_000, instanceId: 'sidecar-a', logLevel: 'silent' });
  });

  it('redactUrl hides the password', () => {
    expect(redactUrl(URL_OK)).toBe('postgres://app:***@127.0.0.1:5432/app');
  });

  it('documents every variable it reads', () => {
    const names = CONFIG_VARIABLES.map((v) => v.name);
    expect(names).toEqual(expect.arrayContaining(['DATABASE_URL', 'KEYRING_ENCRYPT_KEYS', 'KEYRING_INDEX_KEYS', 'KEYRING_KEY_FILE',
      'KEYRING_BATCH_SIZE', 'KEYRING_POLL_INTERVAL_MS', 'KEYRING_LISTEN_TIMEOUT_MS', 'KEYRING_LOG_LEVEL', 'KEYRING_HEALTH_PORT',
      'KEYRING_INSTANCE_ID', 'KEYRING_DATA_KEY_CACHE_SIZE', 'KEYRING_SHUTDOWN_TIMEOUT_MS']));
    for (const v of CONFIG_VARIABLES) expect(v.description.length).toBeGreaterThan(10);
  });
});
