/**
 * SQLSTATEs and socket errors classified once: a retryable error is about the link or
 * the moment (connection lost, serialization conflict, deadlock, lock timeout, server
 * shutting down, out of resources), not about the row being processed. The sidecar
 * retries those later and never counts them against a queued value.
 */
import { KeyringError } from '../crypto/index.js';

const RETRYABLE_SQLSTATE = new Set([
  '40001', // serialization_failure
  '40P01', // deadlock_detected
  '55P03', // lock_not_available
  '57014', // query_canceled (statement_timeout, cancel)
  '57P01', // admin_shutdown
  '57P02', // crash_shutdown
  '57P03', // cannot_connect_now
  '25P03', // idle_in_transaction_session_timeout
]);
// Whole classes: 08 connection exception, 53 insufficient resources, 58 system error.
const RETRYABLE_CLASS = new Set(['08', '53', '58']);

const SOCKET_CODES = new Set(['ECONNRESET', 'ECONNREFUSED', 'EPIPE', 'ETIMEDOUT', 'EHOSTUNREACH', 'ENETUNREACH', 'ENOTFOUND', 'EAI_AGAIN']);

/** Key codes that depend on which keys this process holds, not on the value. */
const RETRYABLE_KEYRING = new Set(['KEY_UNAVAILABLE', 'KEY_MISSING', 'DATA_KEY_WORN']);

export function sqlState(err: unknown): string | undefined {
  const code = (err as { code?: unknown } | null)?.code;
  return typeof code === 'string' && /^[0-9A-Z]{5}$/.test(code) ? code : undefined;
}

export function isRetryable(err: unknown): boolean {
  if (err instanceof KeyringError) return RETRYABLE_KEYRING.has(err.code);
  const state = sqlState(err);
  if (state) return RETRYABLE_SQLSTATE.has(state) || RETRYABLE_CLASS.has(state.slice(0, 2));
  const code = (err as { code?: unknown } | null)?.code;
  if (typeof code === 'string' && SOCKET_CODES.has(code)) return true;
  const msg = err instanceof Error ? err.message : '';
  // node-postgres reports a dropped socket with these messages and no code.
  return /Connection terminated|Client has encountered a connection error|timeout exceeded when trying to connect|Client was closed|not queryable/i.test(msg);
}

/**
 * A one-line description safe to store (keyring.pending.last_error) and log: the
 * SQLSTATE or error code and the message with every quoted part masked, since
 * Postgres quotes input values in messages such as `invalid input syntax ... "abc"`.
 */
export function describeError(err: unknown): string {
  const code = sqlState(err) ?? ((err as { code?: unknown } | null)?.code as string | undefined);
  const msg = (err instanceof Error ? err.message : String(err))
    // Greedy, first quote to last: a value may itself contain quotes. Byte sequences that
    // Postgres prints unquoted (invalid UTF-8: 0xc3 0x28) are masked too.
    .replace(/"[\s\S]*"/g, '"…"')
    .replace(/'[\s\S]*'/g, "'…'")
    .replace(/0x[0-9a-f]{2}(?: 0x[0-9a-f]{2})*/gi, '0x…')
    .replace(/\s+/g, ' ')
    .slice(0, 300);
  return code ? `${code}: ${msg}` : msg;
}

/** The schema in the database is missing, older or newer than this build knows. */
export class SchemaVersionError extends KeyringError {
  constructor(code: 'SCHEMA_MISSING' | 'SCHEMA_TOO_NEW' | 'SCHEMA_OUTDATED', message: string) {
    super(code, `keyring: ${message}`);
    this.name = 'SchemaVersionError';
  }
}
