-- keyring schema, version 6: the audit trail's head, audited reveal, crypto-shredding,
-- and the auditor's views.
--
--   keyring.audit_head                 the chain's head row: appends from REPEATABLE READ or
--                                      SERIALIZABLE transactions can no longer fork the chain,
--                                      and rows deleted from the end are detected
--   keyring.verify_audit_chain()       also names rows missing at the start or the end
--   keyring.reveal_allowed() / audit_reveal()   the allow list (setting reveal_actors) and the
--                                      audit row every reveal writes before it returns a value
--   keyring.shred()                    crypto-shredding of one data subject
--   keyring.audit / compromise_report / alerts  views for auditors
--
-- Decisions: docs/audit.md. Nothing here depends on objects created by 00005.

-- ---------------------------------------------------------------------------------------
-- The chain's head
-- ---------------------------------------------------------------------------------------

-- audit_append() of 00001 read the previous hash with the caller's snapshot. Under
-- REPEATABLE READ or SERIALIZABLE that snapshot can predate an append committed while the
-- caller waited for the advisory lock: the new row then linked to an older row and forked
-- the chain. The head row fixes that: audit_append() locks it (FOR UPDATE), which under
-- those isolation levels fails with 40001 (retry) instead of reading a stale head, and it
-- remembers the last row, so rows deleted from the end of the log are detected too.
CREATE TABLE keyring.audit_head (
  singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
  id        bigint NOT NULL,        -- the last appended row (0: none yet)
  hash      bytea NOT NULL          -- its hash ('\x': none yet)
);

-- Appends wait here until this migration commits, so the head starts at the true end.
SELECT pg_advisory_xact_lock(7263548196044561);
INSERT INTO keyring.audit_head (id, hash)
SELECT coalesce(max(a.id), 0),
       coalesce((SELECT l.hash FROM keyring.audit_log l ORDER BY l.id DESC LIMIT 1), '\x'::bytea)
  FROM keyring.audit_log a;

CREATE FUNCTION keyring.tg_audit_head__keep() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  RAISE EXCEPTION 'keyring.audit_head holds the head of the audit chain: % is not allowed', TG_OP
    USING ERRCODE = 'insufficient_privilege';
END
$$;
CREATE TRIGGER audit_head_no_delete BEFORE DELETE OR INSERT ON keyring.audit_head
  FOR EACH ROW EXECUTE FUNCTION keyring.tg_audit_head__keep();
CREATE TRIGGER audit_head_no_truncate BEFORE TRUNCATE ON keyring.audit_head
  FOR EACH STATEMENT EXECUTE FUNCTION keyring.tg_audit_head__keep();

CREATE OR REPLACE FUNCTION keyring.audit_append(
  p_action text,
  p_actor text DEFAULT NULL,
  p_key_purpose keyring.key_purpose DEFAULT NULL,
  p_key_version integer DEFAULT NULL,
  p_column_id integer DEFAULT NULL,
  p_row_key text DEFAULT NULL,
  p_reason text DEFAULT NULL,
  p_detail jsonb DEFAULT '{}'::jsonb
) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, keyring AS $$
DECLARE
  r keyring.audit_log;
  v_head_id bigint;
  v_head_hash bytea;
  v_last_id bigint;
  v_last_hash bytea;
BEGIN
  -- One writer at a time, until commit: the chain is linear under concurrency.
  PERFORM pg_advisory_xact_lock(7263548196044561);
  -- FOR UPDATE reads the newest head whatever the caller's isolation level, or fails with
  -- 40001 under REPEATABLE READ / SERIALIZABLE when another append committed meanwhile.
  SELECT h.id, h.hash INTO v_head_id, v_head_hash FROM keyring.audit_head h FOR UPDATE;
  -- A session still running the 00001 body during an upgrade appends without moving the
  -- head: the newer of head and last row is the chain's end.
  SELECT a.id, a.hash INTO v_last_id, v_last_hash FROM keyring.audit_log a ORDER BY a.id DESC LIMIT 1;
  r.prev_hash := CASE WHEN v_last_id > coalesce(v_head_id, 0) THEN v_last_hash
                      ELSE coalesce(v_head_hash, '\x'::bytea) END;
  r.id := nextval('keyring.audit_log_id_seq');
  r.at := clock_timestamp();
  r.db_role := session_user;
  r.actor := p_actor;
  r.action := p_action;
  r.key_purpose := p_key_purpose;
  r.key_version := p_key_version;
  r.key_fingerprint := CASE WHEN p_key_version IS NULL THEN NULL ELSE
    (SELECT fingerprint FROM keyring.root_keys WHERE purpose = p_key_purpose AND version = p_key_version) END;
  r.column_id := p_column_id;
  r.row_key := p_row_key;
  r.reason := p_reason;
  r.detail := coalesce(p_detail, '{}'::jsonb);
  r.hash := keyring.audit_row_hash(r);
  INSERT INTO keyring.audit_log SELECT r.*;
  UPDATE keyring.audit_head SET id = r.id, hash = r.hash;
  RETURN r.id;
END
$$;

-- Walks the chain; returns the first broken or missing link, or nothing when it is whole.
-- Rows missing at the start (the first row does not start the chain) and at the end (the
-- head names a row that is gone or different) are reported too.
CREATE OR REPLACE FUNCTION keyring.verify_audit_chain()
RETURNS TABLE (id bigint, problem text)
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, keyring AS $$
DECLARE
  r keyring.audit_log;
  prev bytea := '\x'::bytea;
  prev_id bigint := NULL;
  v_head keyring.audit_head;
BEGIN
  FOR r IN SELECT * FROM keyring.audit_log a ORDER BY a.id LOOP
    IF r.prev_hash IS DISTINCT FROM prev THEN
      id := r.id;
      problem := CASE
        WHEN prev_id IS NULL THEN format('rows before %s are missing: the first row does not start the chain', r.id)
        WHEN r.id <> prev_id + 1 THEN format('rows %s..%s are missing', prev_id + 1, r.id - 1)
        ELSE 'prev_hash does not match the hash of the previous row' END;
      RETURN NEXT; RETURN;
    END IF;
    IF r.hash IS DISTINCT FROM keyring.audit_row_hash(r) THEN
      id := r.id; problem := 'row content does not match its hash';
      RETURN NEXT; RETURN;
    END IF;
    prev := r.hash;
    prev_id := r.id;
  END LOOP;
  SELECT * INTO v_head FROM keyring.audit_head;
  IF NOT FOUND THEN
    id := NULL; problem := 'the chain head (keyring.audit_head) is missing';
    RETURN NEXT; RETURN;
  END IF;
  IF v_head.id > coalesce(prev_id, 0) THEN
    id := v_head.id;
    problem := format('rows %s..%s are missing: the chain ends at %s but its head is row %s',
                      coalesce(prev_id, 0) + 1, v_head.id, coalesce(prev_id, 0), v_head.id);
    RETURN NEXT; RETURN;
  END IF;
  IF v_head.id > 0 AND NOT EXISTS (SELECT 1 FROM keyring.audit_log a WHERE a.id = v_head.id AND a.hash = v_head.hash) THEN
    id := v_head.id;
    problem := 'the chain head does not match its row: rows were deleted and the chain rewritten';
    RETURN NEXT; RETURN;
  END IF;
END
$$;

-- Auditors filter by action and time (compromise_report, alerts, the cookbook).
CREATE INDEX audit_log_action_at ON keyring.audit_log (action, at);

-- ---------------------------------------------------------------------------------------
-- Settings: who may reveal, and when reveals are expected
-- ---------------------------------------------------------------------------------------

-- Used by a CHECK constraint, so that a time zone the server does not know is refused
-- when it is set, not when an auditor reads keyring.alerts.
CREATE FUNCTION keyring.is_time_zone(p text) RETURNS boolean
LANGUAGE plpgsql STABLE SET search_path = pg_catalog AS $$
BEGIN
  PERFORM now() AT TIME ZONE p;
  RETURN p IS NOT NULL AND btrim(p) <> '';
EXCEPTION WHEN invalid_parameter_value OR feature_not_supported THEN
  RETURN false;
END
$$;

ALTER TABLE keyring.settings
  ADD CONSTRAINT business_hours_format CHECK (name <> 'business_hours'
    OR (value ~ '^([01][0-9]|2[0-3]):[0-5][0-9]-(([01][0-9]|2[0-3]):[0-5][0-9]|24:00)$'
        AND split_part(value, '-', 1) <> split_part(value, '-', 2))),
  ADD CONSTRAINT business_days_format CHECK (name <> 'business_days'
    OR value ~ '^[1-7](-[1-7])?(,[1-7](-[1-7])?)*$'),
  ADD CONSTRAINT business_time_zone_known CHECK (name <> 'business_time_zone' OR keyring.is_time_zone(value)),
  ADD CONSTRAINT reveal_actors_format CHECK (name <> 'reveal_actors' OR value !~ '[[:cntrl:]]');

INSERT INTO keyring.settings (name, value) VALUES
  ('reveal_actors', ''),                 -- comma-separated names; empty: nobody may reveal
  ('business_hours', '08:00-18:00'),     -- local time, [start, end); start > end spans midnight
  ('business_days', '1-5'),              -- ISO days of the week, 1 = Monday .. 7 = Sunday
  ('business_time_zone', 'UTC');

-- The allow list, trimmed, without empty entries.
CREATE FUNCTION keyring.reveal_actors() RETURNS text[]
LANGUAGE sql STABLE SET search_path = pg_catalog, keyring AS $$
  SELECT coalesce(array_agg(btrim(x)) FILTER (WHERE btrim(x) <> ''), '{}')
    FROM unnest(string_to_array(coalesce(keyring.setting('reveal_actors'), ''), ',')) AS x
$$;

-- The actor a reveal is recorded under: the given name, else the database login.
CREATE FUNCTION keyring.reveal_actor(p_actor text) RETURNS text
LANGUAGE sql STABLE AS $$ SELECT coalesce(nullif(btrim(p_actor), ''), session_user::text) $$;

-- May this actor reveal? Read before any value is touched; audit_reveal() decides again.
CREATE FUNCTION keyring.reveal_allowed(p_actor text DEFAULT NULL) RETURNS boolean
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, keyring AS $$
  SELECT keyring.reveal_actor(p_actor) = ANY (keyring.reveal_actors())
$$;

-- ---------------------------------------------------------------------------------------
-- Audited reveal
-- ---------------------------------------------------------------------------------------

-- The audit row of one reveal, written (and committed by the caller) before the caller
-- returns the value. Returns true when the reveal may go ahead: the row is 'reveal'.
-- Returns false, having written 'reveal.refused', when the actor is not on the allow list
-- (setting reveal_actors) or the caller reports why the value cannot be revealed
-- (p_refusal: erased, pending, no_row). The purpose is required: 3..500 characters.
CREATE FUNCTION keyring.audit_reveal(
  p_actor text,
  p_column_id integer,
  p_row_key text,
  p_purpose text,
  p_key_version integer DEFAULT NULL,
  p_refusal text DEFAULT NULL,
  p_detail jsonb DEFAULT '{}'::jsonb
) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, keyring, pg_temp AS $$
DECLARE
  v_actor text := keyring.reveal_actor(p_actor);
  v_purpose text := btrim(p_purpose);
  v_refusal text := p_refusal;
BEGIN
  IF v_purpose IS NULL OR char_length(v_purpose) NOT BETWEEN 3 AND 500 THEN
    RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
      MESSAGE = 'keyring: a reveal needs a purpose of 3 to 500 characters',
      HINT = 'State why the value is needed, e.g. a case or ticket number; it is written to the audit log.';
  END IF;
  IF char_length(v_actor) > 200 OR v_actor ~ '[[:cntrl:]]' THEN
    RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
      MESSAGE = 'keyring: an actor name has at most 200 characters and no control characters';
  END IF;
  IF p_column_id IS NULL OR p_row_key IS NULL THEN
    RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
      MESSAGE = 'keyring: a reveal names a column id and a row key';
  END IF;
  IF v_refusal IS NOT NULL AND v_refusal NOT IN ('erased', 'pending', 'no_row') THEN
    RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
      MESSAGE = 'keyring: p_refusal is erased, pending, no_row or NULL';
  END IF;
  IF NOT v_actor = ANY (keyring.reveal_actors()) THEN
    v_refusal := 'actor_not_allowed';
  END IF;
  PERFORM keyring.audit_append(
    CASE WHEN v_refusal IS NULL THEN 'reveal' ELSE 'reveal.refused' END,
    v_actor,
    CASE WHEN p_key_version IS NOT NULL THEN 'encrypt'::keyring.key_purpose END,
    p_key_version, p_column_id, p_row_key, v_purpose,
    coalesce(p_detail, '{}'::jsonb)
      || CASE WHEN v_refusal IS NULL THEN '{}'::jsonb ELSE jsonb_build_object('refusal', v_refusal) END);
  RETURN v_refusal IS NULL;
END
$$;

-- ---------------------------------------------------------------------------------------
-- Crypto-shredding
-- ---------------------------------------------------------------------------------------

-- A shredded data key is gone for good: no role (owner included) can give it key material
-- again, move it out of 'shredded', or count new encryptions under it. The last one also
-- rolls back a sidecar batch that sealed values with the key while shred() committed:
-- its rows are retried and get a new data key.
ALTER TABLE keyring.data_keys
  ADD CONSTRAINT data_keys_shredded_no_key CHECK (state <> 'shredded' OR wrapped IS NULL);

CREATE FUNCTION keyring.tg_data_keys__shredded_terminal() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  IF NEW.state IS DISTINCT FROM 'shredded' OR NEW.wrapped IS NOT NULL OR NEW.encryptions > OLD.encryptions THEN
    RAISE EXCEPTION USING ERRCODE = 'object_not_in_prerequisite_state',
      MESSAGE = format('keyring: data key %s was shredded; a shredded key stays destroyed', OLD.id),
      HINT = 'New values of the subject get a new data key; shredded values cannot be recovered.';
  END IF;
  RETURN NEW;
END
$$;
CREATE TRIGGER data_keys_shredded_terminal BEFORE UPDATE ON keyring.data_keys
  FOR EACH ROW WHEN (OLD.state = 'shredded') EXECUTE FUNCTION keyring.tg_data_keys__shredded_terminal();

-- Destroys every data key of one data subject across all protected columns, clears the
-- subject's blind-index terms, deletes its queued plaintext, tells the sidecars to drop
-- cached keys, and audits 'subject.shredded' (counts, never values). Rows stay; their
-- ciphertexts can no longer be decrypted. SECURITY INVOKER: the caller (a keyring_admin
-- who owns the protected tables, as for protect()) needs UPDATE on them; a SECURITY
-- DEFINER body would let anyone who can write keyring.columns update any table.
--
-- Lock order as in the sidecar (queue entry, base row, data key, audit chain), so a
-- concurrent batch waits or is waited for, and never deadlocks with a shred.
CREATE FUNCTION keyring.shred(subject text, reason text DEFAULT NULL)
RETURNS TABLE (data_keys_shredded bigint, index_terms_cleared bigint, queued_deleted bigint)
LANGUAGE plpgsql
SET search_path = pg_catalog, keyring, pg_temp
SET TimeZone = 'UTC' SET DateStyle = 'ISO, YMD' SET IntervalStyle = 'postgres' SET extra_float_digits = 3
AS $$
#variable_conflict use_column
DECLARE
  v_subject text := shred.subject;
  v_reason text := shred.reason;
  c record;
  v_q_columns integer[];
  v_q_rows text[];
  v_type text;
  v_n bigint;
  v_keys bigint := 0;
  v_terms bigint := 0;
  v_queued bigint := 0;
  v_columns integer[] := '{}';
BEGIN
  IF v_subject IS NULL THEN
    RAISE EXCEPTION USING ERRCODE = 'null_value_not_allowed',
      MESSAGE = 'keyring: shred() needs a subject',
      HINT = 'Pass the value of the subject column as text, e.g. keyring.shred(''42'', reason => ''GDPR Art. 17 request 1234'').';
  END IF;

  -- 1. Queued plaintext (not encrypted yet): deleted, and its placeholder becomes NULL,
  --    since no ciphertext will ever exist for it.
  WITH d AS (DELETE FROM keyring.pending p WHERE p.subject = v_subject RETURNING p.column_id, p.row_key)
  SELECT coalesce(array_agg(d.column_id), '{}'), coalesce(array_agg(d.row_key), '{}')
    INTO v_q_columns, v_q_rows FROM d;
  v_queued := cardinality(v_q_rows);
  FOR c IN SELECT * FROM keyring.columns k WHERE k.id = ANY (v_q_columns) ORDER BY k.id LOOP
    EXECUTE format('UPDATE ONLY %I.%I t SET %I = NULL%s WHERE %s = ANY ($1) AND t.%I = ''\x00''::bytea',
                   c.table_schema, c.table_name, c.column_name,
                   CASE WHEN c.bidx_column IS NULL THEN '' ELSE format(', %I = NULL', c.bidx_column) END,
                   keyring.row_key_sql(c.pk_columns, 't'), c.column_name)
      USING ARRAY(SELECT u.row_key FROM unnest(v_q_columns, v_q_rows) AS u (column_id, row_key)
                   WHERE u.column_id = c.id);
  END LOOP;
  v_columns := ARRAY(SELECT DISTINCT x FROM unnest(v_q_columns) AS x);

  -- 2. Blind-index terms of the subject's rows, per column with a subject column.
  FOR c IN SELECT * FROM keyring.columns k
            WHERE k.subject_column IS NOT NULL AND k.bidx_column IS NOT NULL ORDER BY k.id LOOP
    SELECT format_type(a.atttypid, a.atttypmod) INTO v_type
      FROM pg_attribute a
     WHERE a.attrelid = format('%I.%I', c.table_schema, c.table_name)::regclass
       AND a.attname = c.subject_column AND NOT a.attisdropped;
    IF v_type IS NULL THEN
      RAISE EXCEPTION USING ERRCODE = 'undefined_column',
        MESSAGE = format('keyring: the subject column %s of %s.%s no longer exists',
                         c.subject_column, c.table_schema, c.table_name);
    END IF;
    BEGIN
      -- Typed equality can use an index on the subject column; the text comparison keeps
      -- the match exact (the staging triggers record subject_column::text).
      EXECUTE format('UPDATE ONLY %1$I.%2$I t SET %3$I = NULL WHERE t.%4$I = $1::%5$s AND t.%4$I::text = $1 AND t.%3$I IS NOT NULL',
                     c.table_schema, c.table_name, c.bidx_column, c.subject_column, v_type)
        USING v_subject;
      GET DIAGNOSTICS v_n = ROW_COUNT;
    EXCEPTION WHEN data_exception THEN
      v_n := 0;  -- the subject is not a value of this column's type: no row here is its
    END;
    v_terms := v_terms + v_n;
    IF v_n > 0 AND NOT c.id = ANY (v_columns) THEN
      v_columns := v_columns || c.id;
    END IF;
  END LOOP;

  -- 3. The data keys, every generation and column (unprotected columns' keys included).
  WITH s AS (
    UPDATE keyring.data_keys d SET wrapped = NULL, state = 'shredded', shredded_at = now()
     WHERE d.subject = v_subject AND d.state <> 'shredded'
    RETURNING d.column_id
  )
  SELECT count(*), v_columns || coalesce(array_agg(s.column_id), '{}') INTO v_keys, v_columns FROM s;
  v_columns := ARRAY(SELECT DISTINCT x FROM unnest(v_columns) AS x ORDER BY x);

  IF v_keys = 0 AND v_terms = 0 AND v_queued = 0 THEN
    RAISE NOTICE 'keyring: nothing belonged to subject % (no data key, term or queued value); the request is audited', v_subject;
  END IF;

  -- Sidecars drop their cached data keys (a hint; they re-read key rows anyway).
  PERFORM pg_notify('keyring', '{"kind":"shred"}');
  PERFORM keyring.audit_append('subject.shredded', p_reason => v_reason, p_detail => jsonb_build_object(
    'subject', v_subject, 'data_keys', v_keys, 'index_terms', v_terms, 'queued', v_queued, 'columns', to_jsonb(v_columns)));

  data_keys_shredded := v_keys;
  index_terms_cleared := v_terms;
  queued_deleted := v_queued;
  RETURN NEXT;
END
$$;

-- ---------------------------------------------------------------------------------------
-- Views for auditors
-- ---------------------------------------------------------------------------------------

-- The audit log, readable: key as 'encrypt v2', column as schema.table.column (from the
-- registry, or, once unprotected, from its column.protected audit row).
CREATE VIEW keyring.audit AS
SELECT a.id, a.at, a.db_role, a.actor, a.action,
       CASE WHEN a.key_purpose IS NOT NULL
            THEN a.key_purpose::text || coalesce(' v' || a.key_version::text, '') END AS key,
       a.key_fingerprint,
       CASE WHEN a.column_id IS NOT NULL THEN coalesce(
         (SELECT c.table_schema || '.' || c.table_name || '.' || c.column_name
            FROM keyring.columns c WHERE c.id = a.column_id),
         (SELECT (p.detail ->> 'table') || '.' || (p.detail ->> 'column')
            FROM keyring.audit_log p
           WHERE p.action = 'column.protected' AND p.column_id = a.column_id
           ORDER BY p.id DESC LIMIT 1),
         'column #' || a.column_id) END AS "column",
       a.row_key, a.reason, a.detail
  FROM keyring.audit_log a;

-- For one key version: what was decrypted or revealed with it in the last 30 days, by whom,
-- per column. "values": values decrypted (decrypt.batch counts), else one per event.
CREATE VIEW keyring.compromise_report AS
SELECT a.key_purpose, a.key_version, a."column", a.action, a.actor, a.db_role,
       count(*) AS events,
       sum(CASE WHEN a.action = 'decrypt.batch' AND a.detail ->> 'count' ~ '^[0-9]{1,18}$'
                THEN (a.detail ->> 'count')::bigint ELSE 1 END)::bigint AS "values",
       min(a.at) AS first_at, max(a.at) AS last_at
  FROM (SELECT l.key_purpose, l.key_version, l.action, l.actor, l.db_role, l.detail, l.at,
               v."column"
          FROM keyring.audit_log l
          JOIN keyring.audit v ON v.id = l.id
         WHERE l.action IN ('decrypt.batch', 'decrypt.failed', 'reveal')
           AND l.at >= now() - interval '30 days'
           AND l.key_version IS NOT NULL) a
 GROUP BY a.key_purpose, a.key_version, a."column", a.action, a.actor, a.db_role;

-- What an auditor should look at (docs/audit.md). Event kinds cover the last 30 days;
-- key kinds are the current state of keyring.root_keys.
CREATE VIEW keyring.alerts AS
WITH s AS (
  SELECT max(value) FILTER (WHERE name = 'business_time_zone') AS tz,
         max(value) FILTER (WHERE name = 'business_hours') AS hours,
         max(value) FILTER (WHERE name = 'business_days') AS days,
         max(value) FILTER (WHERE name = 'reveal_actors') AS actors
    FROM keyring.settings
), cfg AS (
  SELECT coalesce(s.tz, 'UTC') AS tz,
         split_part(coalesce(s.hours, '00:00-24:00'), '-', 1)::time AS open_at,
         split_part(coalesce(s.hours, '00:00-24:00'), '-', 2)::time AS close_at,
         coalesce((SELECT array_agg(DISTINCT d)
                     FROM unnest(string_to_array(s.days, ',')) AS part,
                          generate_series(split_part(part, '-', 1)::int,
                                          coalesce(nullif(split_part(part, '-', 2), ''), split_part(part, '-', 1))::int) AS d),
                  '{1,2,3,4,5,6,7}') AS days,
         coalesce((SELECT array_agg(btrim(x)) FROM unnest(string_to_array(s.actors, ',')) AS x
                    WHERE btrim(x) <> ''), '{}') AS actors
    FROM s
), failures AS (
  SELECT f.id, f.at, f.who, f.n, lag(f.n) OVER (PARTITION BY f.who ORDER BY f.at, f.id) AS prev_n
    FROM (SELECT a.id, a.at, coalesce(a.actor, a.db_role::text) AS who,
                 count(*) OVER (PARTITION BY coalesce(a.actor, a.db_role::text) ORDER BY a.at
                                RANGE BETWEEN interval '5 minutes' PRECEDING AND CURRENT ROW) AS n
            FROM keyring.audit_log a
           WHERE a.action = 'decrypt.failed'
             AND a.at >= now() - interval '30 days' - interval '5 minutes') f
)
-- More than 3 decryption failures by one actor within 5 minutes: one alert when the count
-- crosses the threshold.
SELECT 'decrypt_failures'::text AS kind, f.at, f.who AS actor,
       jsonb_build_object('failures_in_5_minutes', f.n, 'audit_id', f.id) AS detail
  FROM failures f
 WHERE f.n > 3 AND coalesce(f.prev_n, 0) <= 3 AND f.at >= now() - interval '30 days'
UNION ALL
-- A reveal outside business hours or days, in the business time zone.
SELECT 'reveal_outside_business_hours', a.at, coalesce(a.actor, a.db_role::text),
       jsonb_build_object('audit_id', a.id, 'local_time', to_char(a.at AT TIME ZONE cfg.tz, 'YYYY-MM-DD HH24:MI:SS'),
                          'time_zone', cfg.tz, 'column_id', a.column_id, 'row_key', a.row_key, 'purpose', a.reason)
  FROM keyring.audit_log a CROSS JOIN cfg
 WHERE a.action = 'reveal' AND a.at >= now() - interval '30 days'
   AND (NOT extract(isodow FROM a.at AT TIME ZONE cfg.tz)::int = ANY (cfg.days)
        OR NOT CASE WHEN cfg.open_at < cfg.close_at   -- '24:00' is after every time of day
                    THEN (a.at AT TIME ZONE cfg.tz)::time >= cfg.open_at AND (a.at AT TIME ZONE cfg.tz)::time < cfg.close_at
                    ELSE (a.at AT TIME ZONE cfg.tz)::time >= cfg.open_at OR (a.at AT TIME ZONE cfg.tz)::time < cfg.close_at
               END)
UNION ALL
-- A reveal attempt refused because the actor is not on the allow list, and any reveal by
-- an actor not on the current list (the list changed, or audit_reveal() was bypassed).
SELECT 'reveal_actor_not_allowed', a.at, coalesce(a.actor, a.db_role::text),
       jsonb_build_object('audit_id', a.id, 'action', a.action, 'refused', a.action = 'reveal.refused',
                          'column_id', a.column_id, 'row_key', a.row_key, 'purpose', a.reason)
  FROM keyring.audit_log a CROSS JOIN cfg
 WHERE a.at >= now() - interval '30 days'
   AND ((a.action = 'reveal.refused' AND a.detail ->> 'refusal' = 'actor_not_allowed')
        OR (a.action = 'reveal' AND NOT coalesce(a.actor, a.db_role::text) = ANY (cfg.actors)))
UNION ALL
-- A root key version retired: scheduled for destruction (keyring.destroy_key).
SELECT 'key_scheduled_for_destruction', coalesce(k.retired_at, k.activated_at, k.created_at), NULL::text,
       jsonb_build_object('purpose', k.purpose, 'version', k.version, 'fingerprint', k.fingerprint,
                          'retired_at', k.retired_at, 'reason', k.reason)
  FROM keyring.root_keys k
 WHERE k.state = 'retired'
UNION ALL
-- The active version of a purpose is older than its rotation period.
SELECT 'key_rotation_overdue', k.activated_at + k.rotation_period, NULL::text,
       jsonb_build_object('purpose', k.purpose, 'version', k.version, 'fingerprint', k.fingerprint,
                          'activated_at', k.activated_at, 'rotation_period', k.rotation_period,
                          'overdue_by', date_trunc('second', now() - (k.activated_at + k.rotation_period)))
  FROM keyring.root_keys k
 WHERE k.state = 'active' AND k.activated_at + k.rotation_period < now();

-- ---------------------------------------------------------------------------------------
-- Privileges
-- ---------------------------------------------------------------------------------------
-- keyring_auditor: the audit views, the audit log and its head, the settings (who may
--                  reveal, business hours). keyring_admin: the same, shred() and reveals.
-- New functions start without PUBLIC EXECUTE (00002's default privileges); said again
-- here, in case another role runs this migration.

REVOKE ALL ON keyring.audit_head FROM PUBLIC;
REVOKE ALL ON keyring.audit, keyring.compromise_report, keyring.alerts FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION keyring.tg_audit_head__keep(), keyring.is_time_zone(text), keyring.reveal_actors(),
                           keyring.reveal_actor(text), keyring.reveal_allowed(text),
                           keyring.audit_reveal(text, integer, text, text, integer, text, jsonb),
                           keyring.tg_data_keys__shredded_terminal(), keyring.shred(text, text)
  FROM PUBLIC;

GRANT SELECT ON keyring.audit, keyring.compromise_report, keyring.alerts, keyring.audit_head
   TO keyring_auditor, keyring_admin;
GRANT SELECT ON keyring.settings TO keyring_auditor;
-- is_time_zone: the CHECK on settings runs it as whoever writes a setting.
GRANT EXECUTE ON FUNCTION keyring.is_time_zone(text), keyring.reveal_actors(), keyring.reveal_actor(text),
                          keyring.reveal_allowed(text),
                          keyring.audit_reveal(text, integer, text, text, integer, text, jsonb),
                          keyring.shred(text, text)
   TO keyring_admin;
