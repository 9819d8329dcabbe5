/**
 * Helpers of the audit, reveal and shred tests: the library opened with test keys, the
 * CLI run in-process with its output captured, audit rows read back, and a backdated
 * append that keeps the hash chain whole (for alerts over time windows).
 */
import type pg from 'pg';
import { main } from '../../src/cli/main.js';
import type { Out } from '../../src/cli/output.js';
import { Keyring, type KeyringOptions } from '../../src/lib/keyring.js';
import { sidecarConfig, type TestKeys } from './sidecar.js';

/** The library with the test keys, connected to `url` (any role). */
export async function openLibrary(url: string, keys: TestKeys, opts: Partial<KeyringOptions> = {}): Promise<Keyring> {
  return Keyring.open({ databaseUrl: url, keys: sidecarConfig(url, keys).keys, ...opts });
}

export interface CliRun {
  readonly code: number;
  readonly stdout: string;
  readonly stderr: string;
}

/** Runs `keyring <argv>` in-process with `env`, capturing what it prints. */
export async function runCli(argv: readonly string[], env: NodeJS.ProcessEnv): Promise<CliRun> {
  const out: string[] = [];
  const err: string[] = [];
  const io: Out = { line: (t = '') => out.push(t), error: (t) => err.push(t) };
  const code = await main(argv, env, io);
  return { code, stdout: out.join('\n'), stderr: err.join('\n') };
}

export interface AuditRow {
  id: string;
  at: Date;
  db_role: string;
  actor: string | null;
  action: string;
  key_purpose: string | null;
  key_version: number | null;
  key_fingerprint: string | null;
  column_id: number | null;
  row_key: string | null;
  reason: string | null;
  detail: Record<string, unknown>;
}

/** Audit rows of `actions` (all when empty), oldest first. */
export async function auditRows(pool: pg.Pool, ...actions: string[]): Promise<AuditRow[]> {
  const { rows } = await pool.query<AuditRow>(
    `SELECT id::text, at, db_role::text, actor, action, key_purpose::text, key_version, key_fingerprint, column_id,
            row_key, reason, detail
       FROM keyring.audit_log WHERE cardinality($1::text[]) = 0 OR action = ANY($1) ORDER BY id`, [actions]);
  return rows;
}

/**
 * Installs test_append_at(): audit_append with a chosen time, chained like the real one
 * (same hash function, head moved), so that verify_audit_chain() stays empty. Superuser.
 */
export async function installBackdatedAppend(pool: pg.Pool): Promise<void> {
  await pool.query(`CREATE OR REPLACE FUNCTION public.test_append_at(
      p_at timestamptz, p_action text, p_actor text DEFAULT NULL, p_column_id integer DEFAULT NULL,
      p_row_key text DEFAULT NULL, p_reason text DEFAULT NULL, p_detail jsonb DEFAULT '{}')
    RETURNS bigint LANGUAGE plpgsql AS $$
    DECLARE r keyring.audit_log;
    BEGIN
      PERFORM pg_advisory_xact_lock(7263548196044561);
      SELECT h.hash INTO r.prev_hash FROM keyring.audit_head h FOR UPDATE;
      r.id := nextval('keyring.audit_log_id_seq');
      r.at := p_at; r.db_role := session_user; r.actor := p_actor; r.action := p_action;
      r.column_id := p_column_id; r.row_key := p_row_key; r.reason := p_reason; r.detail := p_detail;
      r.hash := keyring.audit_row_hash(r);
      INSERT INTO keyring.audit_log SELECT r.*;
      UPDATE keyring.audit_head SET id = r.id, hash = r.hash;
      RETURN r.id;
    END $$`);
}
