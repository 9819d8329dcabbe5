-- keyring schema, version 1: registries, queue, sidecars, audit log, roles.
-- Applied by `keyring migrate` (postgres-migrations) with search_path = keyring.
-- Every name is schema-qualified so that the file means the same under any search_path.

CREATE SCHEMA IF NOT EXISTS keyring;

-- Roles are cluster-wide: create each one only if it is missing. Two databases of one
-- cluster may migrate at the same time, so a concurrent creation is not an error.
DO $roles$
DECLARE r text;
BEGIN
  FOREACH r IN ARRAY ARRAY['keyring_admin', 'keyring_sidecar', 'keyring_writer', 'keyring_auditor'] LOOP
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r) THEN
      BEGIN
        EXECUTE format('CREATE ROLE %I NOLOGIN', r);
      EXCEPTION WHEN duplicate_object OR unique_violation THEN
        NULL;
      END;
    END IF;
  END LOOP;
END
$roles$;

CREATE TYPE keyring.key_purpose AS ENUM ('encrypt', 'index');
-- 'disabled' is added by a later, non-transactional migration (see 00004).
CREATE TYPE keyring.key_state AS ENUM ('pending', 'active', 'decrypt_only', 'retired', 'destroyed');

-- Settings the database enforces by itself (the sidecar reads them too).
CREATE TABLE keyring.settings (
  name  text PRIMARY KEY,
  value text NOT NULL,
  -- 4096: the staging triggers read the limit only for values larger than this floor, so
  -- that the common short value costs no lookup; 1 GiB - 1: the largest bytea.
  CONSTRAINT max_value_bytes_range CHECK (name <> 'max_value_bytes'
    OR (value ~ '^[0-9]{1,10}$' AND value::bigint BETWEEN 4096 AND 1073741823))
);
INSERT INTO keyring.settings (name, value) VALUES
  ('max_value_bytes', '8388608'),          -- 8 MiB: larger plaintexts are refused at insert
  ('data_key_max_encryptions', '4294967296'), -- 2^32: NIST SP 800-38D bound for random 96-bit IVs
  ('heartbeat_fresh_seconds', '30');

CREATE FUNCTION keyring.setting(p_name text) RETURNS text
LANGUAGE sql STABLE AS $$ SELECT value FROM keyring.settings WHERE name = p_name $$;

-- Root key versions. Material never enters the database: only a fingerprint
-- (HMAC-SHA-256 key check value, truncated) that lets a sidecar prove it holds the version.
CREATE TABLE keyring.root_keys (
  purpose         keyring.key_purpose NOT NULL,
  version         integer NOT NULL CHECK (version BETWEEN 1 AND 65535),
  fingerprint     text NOT NULL CHECK (fingerprint ~ '^[0-9a-f]{32}$'),
  state           keyring.key_state NOT NULL DEFAULT 'pending',
  created_at      timestamptz NOT NULL DEFAULT now(),
  activated_at    timestamptz,
  retired_at      timestamptz,
  destroyed_at    timestamptz,
  rotation_period interval NOT NULL DEFAULT interval '365 days',
  reason          text,
  PRIMARY KEY (purpose, version),
  UNIQUE (purpose, fingerprint)
);
-- Exactly one active version per purpose (Tink: exactly one primary).
CREATE UNIQUE INDEX root_keys_one_active ON keyring.root_keys (purpose) WHERE state = 'active';

-- Registry of protected columns.
CREATE TABLE keyring.columns (
  id              serial PRIMARY KEY,
  table_schema    name NOT NULL,
  table_name      name NOT NULL,
  column_name     name NOT NULL,
  data_type       text NOT NULL,            -- the plaintext type, format_type() text
  pk_columns      name[] NOT NULL,
  pk_types        text[] NOT NULL,
  staging_view    name NOT NULL,            -- same for every protected column of a table
  trigger_prefix  name NOT NULL,            -- keyring.<prefix>__insert/__update/__delete; same per table
  column_default  text,                     -- the plaintext default, moved to the staging view
  bidx_column     name,                     -- NULL: no blind index
  normalize       text[] NOT NULL DEFAULT ARRAY['none'],
  index_bytes     integer NOT NULL DEFAULT 16 CHECK (index_bytes BETWEEN 4 AND 32),
  subject_column  name,
  tenant_column   name,
  classification  text NOT NULL DEFAULT 'L3 Confidential',
  priority        integer NOT NULL DEFAULT 100,
  created_at      timestamptz NOT NULL DEFAULT now(),
  UNIQUE (table_schema, table_name, column_name)
);

-- Data keys, always wrapped by an encrypt root version.
-- column_id has no foreign key on purpose: a data key outlives the registry row of its
-- column (unprotect), so that backups taken while the column was protected stay readable.
CREATE TABLE keyring.data_keys (
  id              bigserial PRIMARY KEY,
  column_id       integer NOT NULL,
  subject         text,                     -- NULL: a per-column key; else a per-subject key
  root_version    integer NOT NULL,
  root_purpose    keyring.key_purpose NOT NULL DEFAULT 'encrypt' CHECK (root_purpose = 'encrypt'),
  generation      integer NOT NULL DEFAULT 1,
  wrapped         bytea,                    -- NULL once shredded
  encryptions     bigint NOT NULL DEFAULT 0,
  state           text NOT NULL DEFAULT 'active' CHECK (state IN ('active', 'retired', 'shredded')),
  created_at      timestamptz NOT NULL DEFAULT now(),
  shredded_at     timestamptz,
  FOREIGN KEY (root_purpose, root_version) REFERENCES keyring.root_keys (purpose, version)
);
CREATE UNIQUE INDEX data_keys_one_active ON keyring.data_keys (column_id, coalesce(subject, ''))
  WHERE state = 'active';
CREATE INDEX data_keys_root ON keyring.data_keys (root_version);

-- The work queue between the staging triggers and the sidecar. One entry per (column,
-- row): a newer write replaces the queued value. Holds nothing once a value is encrypted.
-- column_id has no foreign key on purpose: the check would cost every queued value a
-- lookup and a KEY SHARE lock on the registry row, taken by every concurrent writer
-- (MultiXact churn); unprotect() deletes a column's entries itself.
CREATE TABLE keyring.pending (
  id              bigserial PRIMARY KEY,
  column_id       integer NOT NULL,
  row_key         text NOT NULL,
  value           bytea NOT NULL,           -- canonical plaintext bytes (UTF-8, or raw bytea)
  subject         text,
  tenant          text,
  enqueued_at     timestamptz NOT NULL DEFAULT clock_timestamp(),
  attempts        integer NOT NULL DEFAULT 0,
  last_error      text,
  UNIQUE (column_id, row_key)
);

-- Values the sidecar could not process (bad input, failed decryption). Never holds bytes.
CREATE TABLE keyring.quarantine (
  id              bigserial PRIMARY KEY,
  column_id       integer NOT NULL REFERENCES keyring.columns (id) ON DELETE CASCADE,
  row_key         text NOT NULL,
  reason          text NOT NULL,
  detail          text,
  created_at      timestamptz NOT NULL DEFAULT now(),
  resolved_at     timestamptz
);

-- Running sidecar instances.
CREATE TABLE keyring.sidecars (
  instance_id     text PRIMARY KEY,
  host            text,
  pid             integer,
  started_at      timestamptz NOT NULL DEFAULT now(),
  heartbeat_at    timestamptz NOT NULL DEFAULT now(),
  fingerprints    text[] NOT NULL DEFAULT '{}',
  stopped_at      timestamptz
);

-- Append-only, hash-chained audit log. Each row stores the hash of the previous row;
-- keyring.audit_append() serialises writers so the chain has no forks.
CREATE TABLE keyring.audit_log (
  id              bigserial PRIMARY KEY,
  at              timestamptz NOT NULL DEFAULT clock_timestamp(),
  db_role         name NOT NULL DEFAULT session_user,
  actor           text,                     -- sidecar instance or named person
  action          text NOT NULL,
  key_purpose     keyring.key_purpose,
  key_version     integer,
  key_fingerprint text,
  column_id       integer,
  row_key         text,
  reason          text,
  detail          jsonb NOT NULL DEFAULT '{}'::jsonb,
  prev_hash       bytea NOT NULL,
  hash            bytea NOT NULL
);

CREATE FUNCTION keyring.audit_row_hash(p keyring.audit_log) RETURNS bytea
LANGUAGE sql IMMUTABLE AS $$
  SELECT sha256(convert_to(concat_ws('|',
    p.id::text, to_char(p.at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'), p.db_role::text,
    coalesce(p.actor, ''), p.action, coalesce(p.key_purpose::text, ''), coalesce(p.key_version::text, ''),
    coalesce(p.key_fingerprint, ''), coalesce(p.column_id::text, ''), coalesce(p.row_key, ''),
    coalesce(p.reason, ''), p.detail::text, encode(p.prev_hash, 'hex')), 'UTF8'))
$$;

CREATE FUNCTION keyring.audit_append(
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
BEGIN
  -- One writer at a time, until commit: the chain is linear under concurrency.
  PERFORM pg_advisory_xact_lock(7263548196044561);
  SELECT hash INTO r.prev_hash FROM keyring.audit_log ORDER BY id DESC LIMIT 1;
  r.prev_hash := coalesce(r.prev_hash, '\x'::bytea);
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
  RETURN r.id;
END
$$;

CREATE FUNCTION keyring.tg_audit_log__append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  RAISE EXCEPTION 'keyring.audit_log is append-only: % is not allowed', TG_OP
    USING ERRCODE = 'insufficient_privilege';
END
$$;
CREATE TRIGGER audit_log_no_update BEFORE UPDATE OR DELETE ON keyring.audit_log
  FOR EACH ROW EXECUTE FUNCTION keyring.tg_audit_log__append_only();
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON keyring.audit_log
  FOR EACH STATEMENT EXECUTE FUNCTION keyring.tg_audit_log__append_only();

-- Walks the chain; returns the first broken or missing link, or nothing when it is whole.
CREATE FUNCTION keyring.verify_audit_chain()
RETURNS TABLE (id bigint, problem text)
LANGUAGE plpgsql STABLE AS $$
DECLARE
  r keyring.audit_log;
  prev bytea := '\x'::bytea;
  prev_id bigint := NULL;
BEGIN
  FOR r IN SELECT * FROM keyring.audit_log a ORDER BY a.id LOOP
    IF r.prev_hash IS DISTINCT FROM prev THEN
      id := r.id;
      problem := CASE WHEN prev_id IS NOT NULL AND r.id <> prev_id + 1
        THEN format('rows %s..%s are missing', prev_id + 1, r.id - 1)
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
END
$$;

-- Which data key protects a ciphertext: bytes 1..8 of format 1, read without any key.
-- IMMUTABLE and inlinable, so it can back an expression index.
CREATE FUNCTION keyring.data_key_id(ct bytea) RETURNS bigint
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
  SELECT CASE WHEN octet_length(ct) >= 37 AND get_byte(ct, 0) = 1
    THEN ('x' || encode(substring(ct FROM 2 FOR 8), 'hex'))::bit(64)::bigint END
$$;

CREATE FUNCTION keyring.notify() RETURNS void
LANGUAGE sql AS $$ SELECT pg_notify('keyring', '{"kind":"pending"}') $$;
