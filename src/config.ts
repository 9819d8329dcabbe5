/**
 * Sidecar configuration: parsed once from the environment into a frozen object that is
 * passed in everywhere else (nothing else reads process.env). Every problem is reported
 * at once, naming the variable; no message ever quotes key material or a password.
 */
import { randomBytes } from 'node:crypto';
import { hostname } from 'node:os';
import { z } from 'zod';
import { KeyringError } from './crypto/index.js';
import { loadKeyMaterial } from './keys/key-source.js';
import { disposeMaterial, type RootKeyMaterial } from './keys/material.js';

export const LOG_LEVELS = ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'] as const;
export type LogLevel = (typeof LOG_LEVELS)[number];

export interface Config {
  readonly databaseUrl: string;
  readonly keys: RootKeyMaterial;
  readonly batchSize: number;
  /** Plaintext bytes claimed per batch at most (at least one value): bounds sidecar memory. */
  readonly batchBytes: number;
  /** Batches in flight at once, each in its own transaction. */
  readonly concurrency: number;
  readonly pollIntervalMs: number;
  /** Bound on detecting a dead LISTEN link (half-open TCP included), case C10. */
  readonly listenTimeoutMs: number;
  readonly logLevel: LogLevel;
  /** 0: an ephemeral port chosen by the OS (tests). */
  readonly healthPort: number;
  readonly instanceId: string;
  readonly dataKeyCacheSize: number;
  readonly shutdownTimeoutMs: number;
  /** Test-only pause inside each batch transaction (crash tests); 0 unless NODE_ENV=test. */
  readonly testBatchDelayMs: number;
}

export interface ConfigVariable {
  readonly name: string;
  readonly default: string | undefined;
  readonly description: string;
  /** Honoured only under NODE_ENV=test; left out of user documentation. */
  readonly testOnly?: boolean;
}

/** Every variable the sidecar reads, for the README table and the docker-compose test. */
export const CONFIG_VARIABLES: readonly ConfigVariable[] = Object.freeze([
  { name: 'DATABASE_URL', default: undefined, description: 'PostgreSQL connection URL (postgres://user:password@host:port/db). Required.' },
  { name: 'KEYRING_ENCRYPT_KEYS', default: undefined, description: 'Encrypt root keys: 64-hex-digit keys, comma-separated, any order (versions are found by fingerprint).' },
  { name: 'KEYRING_INDEX_KEYS', default: undefined, description: 'Blind-index root keys, same format as KEYRING_ENCRYPT_KEYS.' },
  { name: 'KEYRING_KEY_FILE', default: undefined, description: 'Instead of the two variables above: path to a JSON file {"encrypt": [hex...], "index": [hex...], "comment"?: string}, mode 0600 or stricter.' },
  { name: 'KEYRING_BATCH_SIZE', default: '500', description: 'Queued values claimed and encrypted per transaction (1..10000).' },
  { name: 'KEYRING_BATCH_BYTES', default: '8388608', description: 'Plaintext bytes claimed per batch at most (a single larger value still goes alone); bounds sidecar memory with large values.' },
  { name: 'KEYRING_CONCURRENCY', default: '2', description: 'Batches in flight at once, each in its own transaction: one encrypts while another is written.' },
  { name: 'KEYRING_POLL_INTERVAL_MS', default: '1000', description: 'Backstop poll of the queue when no notification arrives (ms).' },
  { name: 'KEYRING_LISTEN_TIMEOUT_MS', default: '10000', description: 'A dead LISTEN connection, half-open TCP included, is detected within this time and reconnected (ms).' },
  { name: 'KEYRING_LOG_LEVEL', default: 'info', description: `Log level: ${LOG_LEVELS.join(', ')}.` },
  { name: 'KEYRING_HEALTH_PORT', default: '8787', description: 'Port of /healthz and /metrics; 0 picks a free port.' },
  { name: 'KEYRING_INSTANCE_ID', default: '<host>-<pid>-<random>', description: 'Name of this sidecar in keyring.sidecars and the audit log.' },
  { name: 'KEYRING_DATA_KEY_CACHE_SIZE', default: '1000', description: 'Unwrapped data keys kept in memory (LRU; evicted keys are zeroed).' },
  { name: 'KEYRING_SHUTDOWN_TIMEOUT_MS', default: '10000', description: 'On SIGTERM, time allowed to finish the batch in hand before it is rolled back (ms).' },
  { name: 'KEYRING_TEST_BATCH_DELAY_MS', default: '0', description: 'Test only (NODE_ENV=test): pause inside each batch transaction.', testOnly: true },
]);

/** The configuration is invalid; `problems` lists every problem, each naming its variable. */
export class ConfigError extends KeyringError {
  readonly problems: readonly string[];

  constructor(problems: readonly string[]) {
    const n = problems.length;
    super('CONFIG_INVALID', `keyring: invalid configuration (${n} problem${n === 1 ? '' : 's'}): ${problems.join('; ')}`);
    this.name = 'ConfigError';
    this.problems = problems;
  }
}

const blankToUndefined = (v: unknown): unknown => (typeof v === 'string' && v.trim() === '' ? undefined : v);

function intVar(def: number, min: number, max: number) {
  return z.preprocess(
    blankToUndefined,
    z
      .string()
      .regex(/^\s*\d+\s*$/, { error: `must be an integer ${min}..${max}` })
      .transform(Number)
      .pipe(z.number().min(min, { error: `must be an integer ${min}..${max}` }).max(max, { error: `must be an integer ${min}..${max}` }))
      .optional()
      .default(def),
  );
}

/** A postgres URL; the message never quotes the value (it holds a password). */
const databaseUrl = z.preprocess(
  blankToUndefined,
  z
    .string({ error: (iss) => (iss.input === undefined ? 'is required' : 'must be a string') })
    .refine((s) => {
      try {
        const u = new URL(s);
        return (u.protocol === 'postgres:' || u.protocol === 'postgresql:') && u.hostname !== '';
      } catch {
        return false;
      }
    }, { error: 'must be a postgres:// or postgresql:// URL with a host' }),
);

const schema = z.object({
  DATABASE_URL: databaseUrl,
  KEYRING_BATCH_SIZE: intVar(500, 1, 10_000),
  KEYRING_BATCH_BYTES: intVar(8_388_608, 65_536, 1_073_741_823),
  KEYRING_CONCURRENCY: intVar(2, 1, 16),
  KEYRING_POLL_INTERVAL_MS: intVar(1000, 10, 3_600_000),
  KEYRING_LISTEN_TIMEOUT_MS: intVar(10_000, 100, 600_000),
  KEYRING_LOG_LEVEL: z.preprocess(
    blankToUndefined,
    z.enum(LOG_LEVELS, { error: `must be one of ${LOG_LEVELS.join(', ')}` }).optional().default('info'),
  ),
  KEYRING_HEALTH_PORT: intVar(8787, 0, 65_535),
  KEYRING_INSTANCE_ID: z.preprocess(
    blankToUndefined,
    z.string().max(200, { error: 'must be at most 200 characters' }).optional(),
  ),
  KEYRING_DATA_KEY_CACHE_SIZE: intVar(1000, 1, 10_000_000),
  KEYRING_SHUTDOWN_TIMEOUT_MS: intVar(10_000, 0, 3_600_000),
  KEYRING_TEST_BATCH_DELAY_MS: intVar(0, 0, 600_000),
});

function defaultInstanceId(): string {
  return `${hostname()}-${process.pid}-${randomBytes(3).toString('hex')}`;
}

/**
 * Parses and validates the environment. Throws ConfigError listing every problem.
 * Key material is parsed into SecretBytes (see src/keys/key-source.ts).
 */
export function loadConfig(env: NodeJS.ProcessEnv): Config {
  const problems: string[] = [];
  const parsed = schema.safeParse(env);
  if (!parsed.success) {
    for (const issue of parsed.error.issues) {
      problems.push(`${issue.path.join('.')} ${issue.message}`);
    }
  }
  const keys = loadKeyMaterial(env, problems);
  if (!parsed.success || keys === undefined || problems.length > 0) {
    if (keys) disposeMaterial(keys);
    throw new ConfigError(problems);
  }
  const v = parsed.data;
  return Object.freeze({
    databaseUrl: v.DATABASE_URL,
    keys,
    batchSize: v.KEYRING_BATCH_SIZE,
    batchBytes: v.KEYRING_BATCH_BYTES,
    concurrency: v.KEYRING_CONCURRENCY,
    pollIntervalMs: v.KEYRING_POLL_INTERVAL_MS,
    listenTimeoutMs: v.KEYRING_LISTEN_TIMEOUT_MS,
    logLevel: v.KEYRING_LOG_LEVEL,
    healthPort: v.KEYRING_HEALTH_PORT,
    instanceId: v.KEYRING_INSTANCE_ID ?? defaultInstanceId(),
    dataKeyCacheSize: v.KEYRING_DATA_KEY_CACHE_SIZE,
    shutdownTimeoutMs: v.KEYRING_SHUTDOWN_TIMEOUT_MS,
    // A deliberate slowdown must never reach production: ignored outside tests.
    testBatchDelayMs: env.NODE_ENV === 'test' ? v.KEYRING_TEST_BATCH_DELAY_MS : 0,
  });
}

/** The database URL with its password replaced, for logs and messages. */
export function redactUrl(url: string): string {
  try {
    const u = new URL(url);
    if (u.password) u.password = '***';
    return u.toString();
  } catch {
    return '<unparseable url>';
  }
}
