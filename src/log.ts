/**
 * JSON logs (pino). A logger is created once by the entry point and passed in; no
 * module holds a global one. Redaction is the second line of defence: code never
 * logs values or keys on purpose, and these paths catch the fields that would carry
 * them if someone did (plaintext, key material, passwords, connection strings, and
 * the `detail` of Postgres errors, which quotes row values on constraint violations).
 */
import pino from 'pino';
import type { LogLevel } from './config.js';

export type Logger = pino.Logger;

const SENSITIVE = [
  'key', 'keys', 'secret', 'value', 'values', 'plaintext', 'ciphertext', 'payload',
  'password', 'databaseUrl', 'connectionString', 'DATABASE_URL', 'wrapped', 'detail',
];

/** Fields replaced by "[redacted]", at the top level and one level down (e.g. `err.detail`). */
export const REDACT_PATHS: readonly string[] = [
  ...SENSITIVE,
  ...SENSITIVE.map((f) => `*.${f}`),
  'err.where', 'err.internalQuery',
];

export interface LoggerOptions {
  readonly level: LogLevel;
  /** Bound into every line, e.g. { instance: 'host-1-ab12cd' }. */
  readonly bindings?: Record<string, string | number>;
  /** Where lines go; stdout when omitted. Tests pass a stream to read the lines back. */
  readonly destination?: pino.DestinationStream;
}

export function createLogger(opts: LoggerOptions): Logger {
  return pino(
    {
      level: opts.level,
      base: { ...(opts.bindings ?? {}) },
      redact: { paths: [...REDACT_PATHS], censor: '[redacted]' },
      timestamp: pino.stdTimeFunctions.isoTime,
      formatters: { level: (label) => ({ level: label }) },
    },
    opts.destination ?? pino.destination({ fd: 1, sync: true }),
  );
}

/** A logger that drops everything (library callers that pass none). */
export function silentLogger(): Logger {
  return pino({ level: 'silent' });
}
