import type pg from 'pg';

export interface SidecarIdentity {
  readonly instanceId: string;
  readonly host: string;
  readonly pid: number;
  /** Fingerprints of every root key this instance holds, both purposes. */
  readonly fingerprints: readonly string[];
}

/**
 * Upserts this instance's row in keyring.sidecars. activate_key reads it: a version is
 * activated only while a live sidecar holds its fingerprint.
 */
export async function heartbeat(client: pg.ClientBase, s: SidecarIdentity, starting = false): Promise<void> {
  // `starting`: a restart under the same KEYRING_INSTANCE_ID begins a new started_at.
  await client.query(
    `INSERT INTO keyring.sidecars (instance_id, host, pid, fingerprints, heartbeat_at, started_at, stopped_at)
     VALUES ($1, $2, $3, $4, now(), now(), NULL)
     ON CONFLICT (instance_id) DO UPDATE
        SET host = EXCLUDED.host, pid = EXCLUDED.pid, fingerprints = EXCLUDED.fingerprints,
            heartbeat_at = now(), stopped_at = NULL,
            started_at = CASE WHEN $5 THEN now() ELSE keyring.sidecars.started_at END`,
    [s.instanceId, s.host, s.pid, [...s.fingerprints], starting],
  );
}

/** Marks the instance stopped (it no longer vouches for any key). */
export async function markStopped(client: pg.ClientBase, instanceId: string): Promise<void> {
  await client.query('UPDATE keyring.sidecars SET stopped_at = now() WHERE instance_id = $1', [instanceId]);
}
