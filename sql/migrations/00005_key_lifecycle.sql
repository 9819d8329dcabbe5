-- Root key lifecycle and online rotation, driven from psql (docs/key-lifecycle.md).
--
--   pending ──activate──▶ active ──(another version activated)──▶ decrypt_only ──retire──▶ retired ──destroy──▶ destroyed
--      │                                                            ▲  │    ▲
--      │                                                  activate ─┘  │    │ enable (audited, with a reason)
--      ├──retire──▶ retired                                            ▼    │
--      └──disable─▶ disabled ◀──────────────── disable ──────────── decrypt_only
--                      └──retire──▶ retired
--
-- The active version is disabled only together with activating another one
-- (disable_key(..., successor => n)), so a purpose that has had an active version always
-- keeps exactly one (Tink: the primary cannot be disabled). Every transition takes the
-- registry lock, is audited, and sends {"kind":"keys"} so sidecars reload at once.
-- The database never holds key material: "destroyed" is what the registry says; the
-- sidecars drop the material from memory and operators delete it from their key stores.

-- When the version was disabled (the compromise window ends here); NULL again once enabled.
ALTER TABLE keyring.root_keys ADD COLUMN disabled_at timestamptz;

-- ---------------------------------------------------------------------------------------
-- Jobs: rewrap now; re-encryption, re-index and shred jobs use the same table later.
-- ---------------------------------------------------------------------------------------

-- One row per job. A sidecar claims the row with FOR UPDATE SKIP LOCKED in every batch
-- transaction and advances cursor and counters in that same transaction, so a crash
-- loses at most the batch in hand (rolled back) and the job resumes where it stopped.
CREATE TABLE keyring.jobs (
  id             bigserial PRIMARY KEY,
  kind           text NOT NULL CHECK (kind IN ('rewrap', 'reencrypt', 'reindex', 'shred')),
  purpose        keyring.key_purpose,
  target_version integer,
  state          text NOT NULL DEFAULT 'queued' CHECK (state IN ('queued', 'running', 'done', 'failed')),
  cursor         text,                     -- rewrap: the last data key id done (keyset pagination)
  done           bigint NOT NULL DEFAULT 0,
  failed         bigint NOT NULL DEFAULT 0, -- items left as they were (rewrap: data keys that did not unwrap)
  total          bigint,                   -- items to do when the job was created
  batch_size     integer NOT NULL DEFAULT 5000 CHECK (batch_size BETWEEN 1 AND 100000),
  claimed_by     text,                     -- the sidecar instance that ran the latest batch
  created_at     timestamptz NOT NULL DEFAULT now(),
  created_by     name NOT NULL DEFAULT session_user,
  started_at     timestamptz,
  updated_at     timestamptz,
  finished_at    timestamptz,
  error          text
);
CREATE INDEX jobs_open ON keyring.jobs (id) WHERE state IN ('queued', 'running');

-- ---------------------------------------------------------------------------------------
-- Registry helpers
-- ---------------------------------------------------------------------------------------

-- Takes the registry lock (the one register_key and activate_key take: transitions of one
-- purpose are serialised) and returns the version's row, or raises 42704.
CREATE FUNCTION keyring.lock_root_key(p_purpose keyring.key_purpose, p_version integer) RETURNS keyring.root_keys
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, keyring, pg_temp AS $$
DECLARE
  k keyring.root_keys;
BEGIN
  LOCK TABLE keyring.root_keys IN SHARE ROW EXCLUSIVE MODE;
  SELECT * INTO k FROM keyring.root_keys r WHERE r.purpose = p_purpose AND r.version = p_version;
  IF NOT FOUND THEN
    RAISE EXCEPTION USING ERRCODE = 'undefined_object',
      MESSAGE = format('keyring: %s key version %s is not registered', p_purpose, p_version),
      HINT = 'Start a sidecar with the new key material (it registers the version), or run keyring init; '
             || 'SELECT * FROM keyring.key_inventory lists the versions.';
  END IF;
  RETURN k;
END
$$;

-- What still depends on a root version, per column:
--   encrypt: data keys it wraps (data_keys.root_version, not shredded);
--   index:   blind-index terms computed under it (a term starts with the uint16 BE version).
-- The index side scans every blind-index column (no index on the version prefix): fine
-- for a rare DBA operation; a later version keeps counters.
CREATE FUNCTION keyring.key_dependents(p_purpose keyring.key_purpose, p_version integer)
RETURNS TABLE (column_id integer, location text, n bigint)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, keyring, pg_temp AS $$
DECLARE
  c keyring.columns;
  v_prefix bytea;
  v_n bigint;
BEGIN
  IF p_purpose = 'encrypt' THEN
    RETURN QUERY
      SELECT d.column_id,
             CASE WHEN k.id IS NULL THEN format('column %s (no longer protected)', d.column_id)
                  ELSE format('%s.%s.%s', k.table_schema, k.table_name, k.column_name) END,
             count(*)
        FROM keyring.data_keys d
        LEFT JOIN keyring.columns k ON k.id = d.column_id
       WHERE d.root_purpose = 'encrypt' AND d.root_version = p_version AND d.wrapped IS NOT NULL
       GROUP BY 1, 2
       ORDER BY 3 DESC, 2;
    RETURN;
  END IF;
  v_prefix := decode(lpad(to_hex(p_version), 4, '0'), 'hex');
  FOR c IN SELECT * FROM keyring.columns k WHERE k.bidx_column IS NOT NULL ORDER BY k.id LOOP
    EXECUTE format('SELECT count(*) FROM ONLY %I.%I WHERE substring(%I FROM 1 FOR 2) = $1',
                   c.table_schema, c.table_name, c.bidx_column)
      INTO v_n USING v_prefix;
    IF v_n > 0 THEN
      column_id := c.id;
      location := format('%s.%s.%s', c.table_schema, c.table_name, c.bidx_column);
      n := v_n;
      RETURN NEXT;
    END IF;
  END LOOP;
END
$$;

-- Refuses (55006) to retire or destroy a version anything still depends on, saying how
-- many and where, and what to run first. Data keys are locked against writes until the
-- caller commits, so a key created meanwhile cannot slip past the count.
CREATE FUNCTION keyring.refuse_if_in_use(k keyring.root_keys, p_action text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, keyring, pg_temp AS $$
DECLARE
  v_total bigint;
  v_places bigint;
  v_list text;
BEGIN
  IF k.purpose = 'encrypt' THEN
    LOCK TABLE keyring.data_keys IN SHARE MODE;
  END IF;
  SELECT sum(d.n), count(*),
         string_agg(format('%s: %s', d.location, d.n), ', ' ORDER BY d.n DESC, d.location)
           FILTER (WHERE d.rank <= 10)
    INTO v_total, v_places, v_list
    FROM (SELECT x.*, row_number() OVER (ORDER BY x.n DESC, x.location) AS rank
            FROM keyring.key_dependents(k.purpose, k.version) x) d;
  IF coalesce(v_total, 0) = 0 THEN
    RETURN;
  END IF;
  IF v_places > 10 THEN
    v_list := v_list || format(', and %s more columns', v_places - 10);
  END IF;
  IF k.purpose = 'encrypt' THEN
    RAISE EXCEPTION USING ERRCODE = 'object_in_use',
      MESSAGE = format('keyring: cannot %s encrypt key version %s: it still wraps %s data key%s (%s); run SELECT keyring.rotate(''encrypt'') first',
                       p_action, k.version, v_total, CASE WHEN v_total = 1 THEN '' ELSE 's' END, v_list),
      HINT = 'keyring.rotate rewraps every data key under the active version (values are untouched); '
             || 'follow it in keyring.rotation_progress. Data keys that fail to unwrap stay on this version and are counted as failed: '
             || format('SELECT id FROM keyring.data_keys WHERE root_version = %s AND wrapped IS NOT NULL lists what is left.', k.version)
             || CASE WHEN k.state = 'disabled'
                     THEN ' This version is disabled: rewrapping does not protect values from a leaked key; re-encrypt them under new data keys.'
                     ELSE '' END;
  END IF;
  RAISE EXCEPTION USING ERRCODE = 'object_in_use',
    MESSAGE = format('keyring: cannot %s index key version %s: %s blind-index term%s still use%s it (%s)',
                     p_action, k.version, v_total, CASE WHEN v_total = 1 THEN '' ELSE 's' END,
                     CASE WHEN v_total = 1 THEN 's' ELSE '' END, v_list),
    HINT = 'Lookups compute a term for every live index version, so these rows are still found; '
           || 'recompute the terms under the active index version (a re-index), then retry.';
END
$$;

-- A reason is required for emergency transitions: it is the audit trail's answer to "why".
CREATE FUNCTION keyring.require_reason(p_reason text, p_what text) RETURNS text
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
  IF p_reason IS NULL OR btrim(p_reason) = '' THEN
    RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
      MESSAGE = format('keyring: %s needs a reason', p_what),
      HINT = format('Say why, for the audit log: SELECT keyring.%s(''encrypt'', 1, reason => ''<why>'')', p_what);
  END IF;
  RETURN btrim(p_reason);
END
$$;

-- Audit and wake the sidecars: the common tail of every transition.
CREATE FUNCTION keyring.key_transition_done(p_action text, p_purpose keyring.key_purpose, p_version integer,
                                            p_reason text, p_detail jsonb) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, keyring, pg_temp AS $$
BEGIN
  PERFORM keyring.audit_append(p_action, p_key_purpose => p_purpose, p_key_version => p_version,
                               p_reason => p_reason, p_detail => p_detail);
  PERFORM pg_notify('keyring', '{"kind":"keys"}');
END
$$;

-- ---------------------------------------------------------------------------------------
-- Transitions
-- ---------------------------------------------------------------------------------------

-- Same contract as in 00002 (bootstrap exception included); the refusals now say what to
-- do for each state, e.g. enable_key first for a disabled version.
CREATE OR REPLACE FUNCTION keyring.activate_key(p_purpose keyring.key_purpose, p_version integer) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, keyring, pg_temp AS $$
DECLARE
  k keyring.root_keys;
  v_previous integer;
  v_fresh interval := make_interval(secs => keyring.setting('heartbeat_fresh_seconds')::double precision);
BEGIN
  k := keyring.lock_root_key(p_purpose, p_version);
  IF k.state = 'active' THEN
    RETURN;  -- already the active version: nothing to do, nothing to audit
  END IF;
  IF k.state NOT IN ('pending', 'decrypt_only') THEN
    RAISE EXCEPTION USING ERRCODE = 'object_not_in_prerequisite_state',
      MESSAGE = format('keyring: %s key version %s is %s; only a pending or decrypt_only version can be activated',
                       p_purpose, p_version, k.state),
      HINT = CASE WHEN k.state = 'disabled'
                  THEN format('If the compromise was a false alarm, run SELECT keyring.enable_key(''%s'', %s, reason => ''...'') first; '
                              || 'otherwise register new key material (keyring keygen, then restart the sidecars).', p_purpose, p_version)
                  ELSE 'Register new key material instead (keyring keygen, then restart the sidecars).' END;
  END IF;
  IF EXISTS (SELECT 1 FROM keyring.root_keys r WHERE r.purpose = p_purpose AND r.activated_at IS NOT NULL)
     AND NOT EXISTS (SELECT 1 FROM keyring.sidecars s
                      WHERE s.stopped_at IS NULL AND s.heartbeat_at >= now() - v_fresh
                        AND k.fingerprint = ANY (s.fingerprints)) THEN
    RAISE EXCEPTION USING ERRCODE = 'object_not_in_prerequisite_state',
      MESSAGE = format('keyring: no live sidecar holds %s key version %s', p_purpose, p_version),
      HINT = 'Give the key to the sidecars (KEYRING_ENCRYPT_KEYS / KEYRING_INDEX_KEYS or the key file), restart them, '
             || 'wait for a heartbeat (SELECT * FROM keyring.sidecars), then activate again.';
  END IF;
  -- Demote first: the partial unique index allows one active version per purpose.
  UPDATE keyring.root_keys r SET state = 'decrypt_only'
   WHERE r.purpose = p_purpose AND r.state = 'active'
  RETURNING r.version INTO v_previous;
  UPDATE keyring.root_keys r SET state = 'active', activated_at = now()
   WHERE r.purpose = p_purpose AND r.version = p_version;
  PERFORM keyring.key_transition_done('key.activated', p_purpose, p_version, NULL,
                                      jsonb_build_object('previous_version', v_previous));
END
$$;

-- decrypt_only / disabled / pending → retired: nothing depends on the version any more.
-- Sidecars may then drop its material; destroy_key makes that final.
CREATE FUNCTION keyring.retire_key(p_purpose keyring.key_purpose, p_version integer) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, keyring, pg_temp AS $$
DECLARE
  k keyring.root_keys;
BEGIN
  k := keyring.lock_root_key(p_purpose, p_version);
  IF k.state = 'retired' THEN
    RETURN;  -- nothing to do, nothing to audit
  END IF;
  IF k.state = 'active' THEN
    RAISE EXCEPTION USING ERRCODE = 'object_not_in_prerequisite_state',
      MESSAGE = format('keyring: %s key version %s is the active version and cannot be retired', p_purpose, p_version),
      HINT = format('Activate another version first (SELECT keyring.activate_key(''%s'', <version>)), '
                    || 'move everything off this one (SELECT keyring.rotate(''%s'')), then retire it.', p_purpose, p_purpose);
  END IF;
  IF k.state = 'destroyed' THEN
    RAISE EXCEPTION USING ERRCODE = 'object_not_in_prerequisite_state',
      MESSAGE = format('keyring: %s key version %s is destroyed; a destroyed version stays destroyed', p_purpose, p_version),
      HINT = 'Nothing to do. SELECT * FROM keyring.key_inventory shows the state of every version.';
  END IF;
  PERFORM keyring.refuse_if_in_use(k, 'retire');
  UPDATE keyring.root_keys r SET state = 'retired', retired_at = now()
   WHERE r.purpose = p_purpose AND r.version = p_version;
  PERFORM keyring.key_transition_done('key.retired', p_purpose, p_version, NULL,
                                      jsonb_build_object('previous_state', k.state));
END
$$;

-- Emergency switch-off of a (suspected) compromised version: no new encryption, wrapping
-- or blind-index term uses it; its data keys are used only by rewrap / re-encryption jobs.
-- The active version can be disabled only together with activating `successor` (same
-- checks as activate_key: a live sidecar must hold it), so writes never stall.
CREATE FUNCTION keyring.disable_key(p_purpose keyring.key_purpose, p_version integer, reason text,
                                    successor integer DEFAULT NULL) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, keyring, pg_temp AS $$
DECLARE
  k keyring.root_keys;
  v_reason text := keyring.require_reason(disable_key.reason, 'disable_key');
BEGIN
  k := keyring.lock_root_key(p_purpose, p_version);
  IF k.state = 'disabled' THEN
    RETURN;  -- already disabled: the first reason stands in the audit log
  END IF;
  IF k.state IN ('retired', 'destroyed') THEN
    RAISE EXCEPTION USING ERRCODE = 'object_not_in_prerequisite_state',
      MESSAGE = format('keyring: %s key version %s is %s; nothing uses it any more', p_purpose, p_version, k.state),
      HINT = CASE WHEN k.state = 'retired'
                  THEN format('Destroy it instead: SELECT keyring.destroy_key(''%s'', %s), and delete its material from every key store.', p_purpose, p_version)
                  ELSE 'Delete its material from every key store, if not done yet.' END;
  END IF;
  IF successor = p_version THEN
    RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
      MESSAGE = format('keyring: the successor of %s key version %s must be another version', p_purpose, p_version),
      HINT = 'Pass the version that takes over (registered by a sidecar that holds it), e.g. successor => 3.';
  END IF;
  IF k.state = 'active' AND successor IS NULL THEN
    RAISE EXCEPTION USING ERRCODE = 'object_not_in_prerequisite_state',
      MESSAGE = format('keyring: %s key version %s is the active version; it can be disabled only together with activating another',
                       p_purpose, p_version),
      HINT = format('Generate a new key (keyring keygen), give it to the sidecars and restart them, then run '
                    || 'SELECT keyring.disable_key(''%s'', %s, reason => ''...'', successor => <new version>).', p_purpose, p_version);
  END IF;
  IF successor IS NOT NULL THEN
    PERFORM keyring.activate_key(p_purpose, successor);  -- demotes this version to decrypt_only
  END IF;
  UPDATE keyring.root_keys r SET state = 'disabled', disabled_at = now(), reason = v_reason
   WHERE r.purpose = p_purpose AND r.version = p_version;
  PERFORM keyring.key_transition_done('key.disabled', p_purpose, p_version, v_reason,
    jsonb_build_object('previous_state', k.state, 'successor', successor,
                       'dependents', (SELECT coalesce(sum(d.n), 0) FROM keyring.key_dependents(p_purpose, p_version) d)));
END
$$;

-- The audited reversal of disable_key (a false alarm): disabled → decrypt_only. The
-- version does not become active again by itself; activate_key does that.
CREATE FUNCTION keyring.enable_key(p_purpose keyring.key_purpose, p_version integer, reason text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, keyring, pg_temp AS $$
DECLARE
  k keyring.root_keys;
  v_reason text := keyring.require_reason(enable_key.reason, 'enable_key');
BEGIN
  k := keyring.lock_root_key(p_purpose, p_version);
  IF k.state <> 'disabled' THEN
    RAISE EXCEPTION USING ERRCODE = 'object_not_in_prerequisite_state',
      MESSAGE = format('keyring: %s key version %s is %s; only a disabled version can be enabled', p_purpose, p_version, k.state),
      HINT = 'SELECT * FROM keyring.key_inventory shows the state of every version.';
  END IF;
  UPDATE keyring.root_keys r SET state = 'decrypt_only', disabled_at = NULL, reason = v_reason
   WHERE r.purpose = p_purpose AND r.version = p_version;
  PERFORM keyring.key_transition_done('key.enabled', p_purpose, p_version, v_reason,
                                      jsonb_build_object('disabled_at', k.disabled_at, 'disabled_reason', k.reason));
END
$$;

-- retired → destroyed, final. The database never held the material: this records that
-- it is gone, makes every sidecar drop it from memory and refuse it from then on. The
-- operator deletes it from the key stores (env, key files, KMS) and their backups.
CREATE FUNCTION keyring.destroy_key(p_purpose keyring.key_purpose, p_version integer) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, keyring, pg_temp AS $$
DECLARE
  k keyring.root_keys;
BEGIN
  k := keyring.lock_root_key(p_purpose, p_version);
  IF k.state = 'destroyed' THEN
    RETURN;
  END IF;
  IF k.state <> 'retired' THEN
    RAISE EXCEPTION USING ERRCODE = 'object_not_in_prerequisite_state',
      MESSAGE = format('keyring: %s key version %s is %s; only a retired version can be destroyed', p_purpose, p_version, k.state),
      HINT = format('Retire it first: SELECT keyring.retire_key(''%s'', %s) (refused while anything depends on it).', p_purpose, p_version);
  END IF;
  -- Retired versions wrap nothing new, but check again: destroying loses data for good.
  PERFORM keyring.refuse_if_in_use(k, 'destroy');
  UPDATE keyring.root_keys r SET state = 'destroyed', destroyed_at = now()
   WHERE r.purpose = p_purpose AND r.version = p_version;
  PERFORM keyring.key_transition_done('key.destroyed', p_purpose, p_version, NULL,
                                      jsonb_build_object('fingerprint', k.fingerprint));
  RAISE NOTICE USING MESSAGE = format('keyring: %s key version %s (fingerprint %s) is destroyed; sidecars drop it now',
                                      p_purpose, p_version, k.fingerprint),
    HINT = 'Delete its material from every key store (KEYRING_*_KEYS, key files, KMS) and from their backups.';
END
$$;

-- ---------------------------------------------------------------------------------------
-- Rotation: rewrap every data key under the active encrypt version (values untouched)
-- ---------------------------------------------------------------------------------------

-- Queues a rewrap job and wakes the sidecars; returns the job id. The database cannot
-- unwrap, so a sidecar holding the old and new versions does the work in batches
-- (sidecar/jobs/rewrap.ts). Idempotent: while a job towards the active version is
-- unfinished, its id is returned; a job towards a version no longer active is failed
-- as superseded; with nothing to rewrap the job is done at once.
CREATE FUNCTION keyring.rotate(p_purpose keyring.key_purpose, batch_size integer DEFAULT 5000) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, keyring, pg_temp AS $$
DECLARE
  v_target integer;
  j keyring.jobs;
  v_total bigint;
  v_from jsonb;
  v_id bigint;
BEGIN
  IF p_purpose IS DISTINCT FROM 'encrypt' THEN
    RAISE EXCEPTION USING ERRCODE = 'feature_not_supported',
      MESSAGE = format('keyring: rotate(''%s'') is not supported; only the encrypt root is rotated by rewrapping', p_purpose),
      HINT = 'An index root rotation recomputes every blind-index term (a re-index); lookups try every live index version meanwhile.';
  END IF;
  IF rotate.batch_size IS NULL OR rotate.batch_size NOT BETWEEN 1 AND 100000 THEN
    RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
      MESSAGE = 'keyring: batch_size must be between 1 and 100000 data keys per transaction',
      HINT = 'The default, 5000, keeps each transaction short; a smaller batch holds fewer row locks at a time.';
  END IF;
  -- The registry lock: the target is the version that is active when this commits.
  LOCK TABLE keyring.root_keys IN SHARE ROW EXCLUSIVE MODE;
  SELECT r.version INTO v_target FROM keyring.root_keys r WHERE r.purpose = p_purpose AND r.state = 'active';
  IF NOT FOUND THEN
    RAISE EXCEPTION USING ERRCODE = 'object_not_in_prerequisite_state',
      MESSAGE = format('keyring: no %s key version is active; nothing to rotate to', p_purpose),
      HINT = 'Activate a version first: SELECT keyring.activate_key(''encrypt'', <version>).';
  END IF;
  SELECT * INTO j FROM keyring.jobs x
   WHERE x.kind = 'rewrap' AND x.purpose = p_purpose AND x.state IN ('queued', 'running')
   ORDER BY x.id DESC LIMIT 1 FOR UPDATE;
  IF FOUND THEN
    IF j.target_version = v_target THEN
      RETURN j.id;
    END IF;
    UPDATE keyring.jobs x SET state = 'failed', finished_at = now(), updated_at = now(),
           error = format('superseded: %s key version %s is active now', p_purpose, v_target)
     WHERE x.id = j.id;
    PERFORM keyring.audit_append('rotation.failed', p_key_purpose => p_purpose, p_key_version => j.target_version,
      p_detail => jsonb_build_object('job', j.id, 'kind', 'rewrap', 'done', j.done, 'failed', j.failed,
                                     'error', 'superseded', 'superseded_by_version', v_target));
  END IF;
  SELECT coalesce(sum(g.n), 0), coalesce(jsonb_object_agg(g.root_version::text, g.n), '{}'::jsonb)
    INTO v_total, v_from
    FROM (SELECT d.root_version, count(*) AS n FROM keyring.data_keys d
           WHERE d.root_version <> v_target AND d.wrapped IS NOT NULL GROUP BY 1) g;
  INSERT INTO keyring.jobs (kind, purpose, target_version, state, cursor, total, batch_size)
  VALUES ('rewrap', p_purpose, v_target, 'queued', '0', v_total, rotate.batch_size)
  RETURNING id INTO v_id;
  PERFORM keyring.audit_append('rotation.started', p_key_purpose => p_purpose, p_key_version => v_target,
    p_detail => jsonb_build_object('job', v_id, 'kind', 'rewrap', 'total', v_total, 'from_versions', v_from,
                                   'batch_size', rotate.batch_size));
  IF v_total = 0 THEN
    UPDATE keyring.jobs x SET state = 'done', started_at = now(), updated_at = now(), finished_at = now()
     WHERE x.id = v_id;
    PERFORM keyring.audit_append('rotation.finished', p_key_purpose => p_purpose, p_key_version => v_target,
      p_detail => jsonb_build_object('job', v_id, 'kind', 'rewrap', 'done', 0, 'failed', 0));
  ELSE
    PERFORM pg_notify('keyring', '{"kind":"job"}');
  END IF;
  RETURN v_id;
END
$$;

-- ---------------------------------------------------------------------------------------
-- Views for psql
-- ---------------------------------------------------------------------------------------

-- Every root key version: lifecycle timestamps, when the active one is due, and how many
-- data keys each encrypt version wraps (NULL for index versions).
CREATE VIEW keyring.key_inventory AS
SELECT k.purpose, k.version, k.state, k.fingerprint, k.created_at, k.activated_at, k.disabled_at,
       k.retired_at, k.destroyed_at, k.rotation_period,
       CASE WHEN k.state = 'active' THEN k.activated_at + k.rotation_period END AS next_due,
       coalesce(k.state = 'active' AND k.activated_at + k.rotation_period < now(), false) AS overdue,
       CASE WHEN k.purpose = 'encrypt' THEN coalesce(d.n, 0) END AS data_keys,
       k.reason
  FROM keyring.root_keys k
  LEFT JOIN (SELECT dk.root_version, count(*) AS n FROM keyring.data_keys dk
              WHERE dk.wrapped IS NOT NULL GROUP BY dk.root_version) d
    ON k.purpose = 'encrypt' AND d.root_version = k.version
 ORDER BY k.purpose, k.version;

-- Active versions overdue for rotation or due within 30 days.
CREATE VIEW keyring.rotation_due AS
SELECT i.purpose, i.version, i.activated_at, i.rotation_period, i.next_due,
       i.next_due - now() AS due_in, i.overdue, i.data_keys
  FROM keyring.key_inventory i
 WHERE i.next_due < now() + interval '30 days'
 ORDER BY i.next_due;

-- Jobs, newest first: progress, rate, ETA, and what failed.
CREATE VIEW keyring.rotation_progress AS
SELECT j.id AS job, j.kind, j.purpose, j.target_version, j.state, j.done, j.total, j.failed,
       CASE WHEN coalesce(j.total, 0) = 0 THEN CASE WHEN j.state = 'done' THEN 100.0 END
            ELSE round(100.0 * least(j.done + j.failed, j.total) / j.total, 1) END AS percent,
       round(r.rate)::bigint AS rows_per_second,
       CASE WHEN j.state IN ('queued', 'running') AND r.rate > 0
            THEN make_interval(secs => round(greatest(j.total - j.done - j.failed, 0) / r.rate)::double precision) END AS eta,
       j.claimed_by AS sidecar, j.created_at, j.created_by, j.started_at, j.updated_at, j.finished_at, j.error
  FROM keyring.jobs j
  CROSS JOIN LATERAL (
    SELECT CASE WHEN j.started_at IS NOT NULL
                     AND extract(epoch FROM coalesce(j.finished_at, now()) - j.started_at) > 0
                THEN (j.done + j.failed) / extract(epoch FROM coalesce(j.finished_at, now()) - j.started_at) END AS rate
  ) r
 ORDER BY j.id DESC;

-- ---------------------------------------------------------------------------------------
-- Privileges (functions made here start without PUBLIC EXECUTE: revoked explicitly too)
-- ---------------------------------------------------------------------------------------

REVOKE ALL ON keyring.jobs FROM PUBLIC;
REVOKE ALL ON SEQUENCE keyring.jobs_id_seq FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION
  keyring.lock_root_key(keyring.key_purpose, integer),
  keyring.key_dependents(keyring.key_purpose, integer),
  keyring.refuse_if_in_use(keyring.root_keys, text),
  keyring.require_reason(text, text),
  keyring.key_transition_done(text, keyring.key_purpose, integer, text, jsonb),
  keyring.retire_key(keyring.key_purpose, integer),
  keyring.disable_key(keyring.key_purpose, integer, text, integer),
  keyring.enable_key(keyring.key_purpose, integer, text),
  keyring.destroy_key(keyring.key_purpose, integer),
  keyring.rotate(keyring.key_purpose, integer)
  FROM PUBLIC;

GRANT ALL ON keyring.jobs, keyring.key_inventory, keyring.rotation_due, keyring.rotation_progress TO keyring_admin;
GRANT ALL ON SEQUENCE keyring.jobs_id_seq TO keyring_admin;
GRANT EXECUTE ON FUNCTION
  keyring.key_dependents(keyring.key_purpose, integer),
  keyring.retire_key(keyring.key_purpose, integer),
  keyring.disable_key(keyring.key_purpose, integer, text, integer),
  keyring.enable_key(keyring.key_purpose, integer, text),
  keyring.destroy_key(keyring.key_purpose, integer),
  keyring.rotate(keyring.key_purpose, integer)
  TO keyring_admin;

-- The sidecar claims jobs and advances them; it creates none.
GRANT SELECT, UPDATE ON keyring.jobs TO keyring_sidecar;

GRANT SELECT ON keyring.key_inventory, keyring.rotation_due, keyring.rotation_progress TO keyring_auditor;
