-- Re-encryption of data (docs/key-lifecycle.md "Re-encryption"): new data keys under the
-- active encrypt root and every value rewritten, online, by the sidecars.
--
-- One job per protected column. A job's pass over the table is cut into chunks (ranges of
-- the primary key, keyset pagination): a sidecar holds the job row lock only while it
-- carves the next chunk and advances the job's cursor, then does the chunk in its own
-- transaction with the chunk row locked (FOR UPDATE SKIP LOCKED). Several sidecars thus
-- work on one job without ever taking the same rows; a chunk whose sidecar was killed
-- is rolled back with it and taken again by the next one (its rows were not written).
-- The job ends exactly once: the chunk transaction that finds the pass complete and no
-- other open chunk marks it done under the job row lock.

ALTER TABLE keyring.jobs
  ADD COLUMN column_id       integer,
  ADD COLUMN rows_per_second integer CHECK (rows_per_second IS NULL OR rows_per_second > 0),
  -- Data keys with an id above this were made after the job started (new generation):
  -- a value under one of them, wrapped by the target version, is already re-encrypted.
  ADD COLUMN key_floor       bigint,
  ADD COLUMN pass_done       boolean NOT NULL DEFAULT false,  -- every chunk carved
  ADD COLUMN next_chunk_at   timestamptz,                     -- rate limit: when the next chunk may start
  ADD COLUMN skipped         bigint NOT NULL DEFAULT 0,  -- already re-encrypted, or an application write won
  ADD COLUMN quarantined     bigint NOT NULL DEFAULT 0,  -- did not decrypt: keyring.quarantine
  ADD COLUMN erased          bigint NOT NULL DEFAULT 0,  -- data key shredded: left as it is, for good
  ADD COLUMN unavailable     bigint NOT NULL DEFAULT 0,  -- root key version held by no live sidecar: untouched
  ADD COLUMN claims          bigint NOT NULL DEFAULT 0;  -- chunk claims (hot-loop check, case C03)

CREATE TABLE keyring.job_chunks (
  job_id     bigint NOT NULL REFERENCES keyring.jobs (id) ON DELETE CASCADE,
  id         bigint NOT NULL,
  after_key  text,              -- exclusive lower bound (canonical row key), NULL: from the start
  last_key   text,              -- inclusive upper bound, NULL: to the end
  not_before timestamptz,       -- rate limit
  carved_by  text,
  PRIMARY KEY (job_id, id)
);

-- The sidecar reads the data keys' generation from here; nothing else needs it.
CREATE FUNCTION keyring.reencrypt(p_column text DEFAULT 'all', p_batch_size integer DEFAULT 500,
                                  p_rows_per_second integer DEFAULT NULL) RETURNS bigint[]
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, keyring, pg_temp AS $$
DECLARE
  v_target integer;
  c keyring.columns;
  v_ids bigint[] := '{}';
  v_id bigint;
  v_total bigint;
  v_floor bigint;
  v_retired bigint;
  v_parts text[];
  v_found boolean := false;
BEGIN
  IF p_batch_size IS NULL OR p_batch_size NOT BETWEEN 1 AND 100000 THEN
    RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
      MESSAGE = 'keyring: p_batch_size must be between 1 and 100000 rows per transaction',
      HINT = 'The default, 500, keeps each transaction short so application writes keep their latency.';
  END IF;
  IF p_rows_per_second IS NOT NULL AND p_rows_per_second < 1 THEN
    RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
      MESSAGE = 'keyring: p_rows_per_second must be positive (or NULL: no limit)';
  END IF;
  IF p_column IS NULL OR (p_column <> 'all' AND cardinality(string_to_array(p_column, '.')) NOT IN (2, 3)) THEN
    RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
      MESSAGE = format('keyring: %L is not a column reference', p_column),
      HINT = 'Write schema.table.column, or ''all'' for every protected column.';
  END IF;
  LOCK TABLE keyring.root_keys IN SHARE ROW EXCLUSIVE MODE;
  SELECT r.version INTO v_target FROM keyring.root_keys r WHERE r.purpose = 'encrypt' AND r.state = 'active';
  IF NOT FOUND THEN
    RAISE EXCEPTION USING ERRCODE = 'object_not_in_prerequisite_state',
      MESSAGE = 'keyring: no encrypt key version is active; nothing to re-encrypt to',
      HINT = 'Activate a version first: SELECT keyring.activate_key(''encrypt'', <version>).';
  END IF;
  v_parts := string_to_array(p_column, '.');
  IF cardinality(v_parts) = 2 THEN v_parts := ARRAY['public'] || v_parts; END IF;
  -- Restricted classes first: lower priority number, then classification (L4 before L3).
  FOR c IN SELECT * FROM keyring.columns k
            WHERE p_column = 'all' OR (k.table_schema = v_parts[1] AND k.table_name = v_parts[2] AND k.column_name = v_parts[3])
            ORDER BY k.priority, k.classification DESC, k.id LOOP
    v_found := true;
    -- An unfinished job of this column towards the active version: follow it.
    SELECT j.id INTO v_id FROM keyring.jobs j
     WHERE j.kind = 'reencrypt' AND j.column_id = c.id AND j.state IN ('queued', 'running') AND j.target_version = v_target
     ORDER BY j.id DESC LIMIT 1;
    IF FOUND THEN
      v_ids := v_ids || v_id;
      CONTINUE;
    END IF;
    UPDATE keyring.jobs j SET state = 'failed', finished_at = now(), updated_at = now(),
           error = format('superseded: encrypt key version %s is active now', v_target)
     WHERE j.kind = 'reencrypt' AND j.column_id = c.id AND j.state IN ('queued', 'running');
    -- A new generation: new writes (and the job) get new data keys from now on.
    UPDATE keyring.data_keys d SET state = 'retired' WHERE d.column_id = c.id AND d.state = 'active';
    GET DIAGNOSTICS v_retired = ROW_COUNT;
    SELECT coalesce(max(d.id), 0) INTO v_floor FROM keyring.data_keys d;
    EXECUTE format('SELECT count(*) FROM ONLY %I.%I WHERE %I IS NOT NULL AND %I <> ''\x00''::bytea',
                   c.table_schema, c.table_name, c.column_name, c.column_name) INTO v_total;
    INSERT INTO keyring.jobs (kind, purpose, target_version, state, total, batch_size, column_id, rows_per_second, key_floor)
    VALUES ('reencrypt', 'encrypt', v_target, 'queued', v_total, p_batch_size, c.id, p_rows_per_second, v_floor)
    RETURNING id INTO v_id;
    v_ids := v_ids || v_id;
    PERFORM keyring.audit_append('reencrypt.started', p_key_purpose => 'encrypt', p_key_version => v_target,
      p_column_id => c.id,
      p_detail => jsonb_build_object('job', v_id, 'total', v_total, 'batch_size', p_batch_size,
                                     'rows_per_second', p_rows_per_second, 'data_keys_retired', v_retired,
                                     'classification', c.classification, 'priority', c.priority));
  END LOOP;
  IF NOT v_found THEN
    RAISE EXCEPTION USING ERRCODE = 'undefined_object',
      MESSAGE = CASE WHEN p_column = 'all' THEN 'keyring: no column is protected; nothing to re-encrypt'
                     ELSE format('keyring: %s is not a protected column', p_column) END,
      HINT = 'SELECT * FROM keyring.status lists the protected columns.';
  END IF;
  PERFORM pg_notify('keyring', '{"kind":"job"}');
  RETURN v_ids;
END
$$;

-- Same columns as in 00005 (done, failed, ... kept in place), then the re-encryption
-- counters. failed counts what was left behind: quarantined + unavailable for a
-- re-encryption (erased values are terminal, counted apart).
CREATE OR REPLACE VIEW keyring.rotation_progress AS
SELECT j.id AS job, j.kind, j.purpose, j.target_version, j.state, j.done, j.total,
       j.failed + j.quarantined + j.unavailable AS failed,
       CASE WHEN coalesce(j.total, 0) = 0 THEN CASE WHEN j.state = 'done' THEN 100.0 END
            ELSE round(100.0 * least(j.done + j.failed + j.skipped + j.quarantined + j.erased + j.unavailable, j.total) / j.total, 1) END AS percent,
       round(r.rate)::bigint AS rows_per_second,
       CASE WHEN j.state IN ('queued', 'running') AND r.rate > 0
            THEN make_interval(secs => round(greatest(j.total - r.n, 0) / r.rate)::double precision) END AS eta,
       j.claimed_by AS sidecar, j.created_at, j.created_by, j.started_at, j.updated_at, j.finished_at, j.error,
       j.column_id, CASE WHEN k.id IS NOT NULL THEN format('%s.%s.%s', k.table_schema, k.table_name, k.column_name) END AS column_name,
       j.skipped, j.quarantined, j.erased, j.unavailable
  FROM keyring.jobs j
  LEFT JOIN keyring.columns k ON k.id = j.column_id
  CROSS JOIN LATERAL (SELECT j.done + j.failed + j.skipped + j.quarantined + j.erased + j.unavailable AS n) c
  CROSS JOIN LATERAL (
    SELECT c.n, CASE WHEN j.started_at IS NOT NULL
                     AND extract(epoch FROM coalesce(j.finished_at, now()) - j.started_at) > 0
                THEN c.n / extract(epoch FROM coalesce(j.finished_at, now()) - j.started_at) END AS rate
  ) r
 ORDER BY j.id DESC;

REVOKE ALL ON keyring.job_chunks FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION keyring.reencrypt(text, integer, integer) FROM PUBLIC;
GRANT ALL ON keyring.job_chunks TO keyring_admin;
GRANT EXECUTE ON FUNCTION keyring.reencrypt(text, integer, integer) TO keyring_admin;
GRANT SELECT, INSERT, UPDATE, DELETE ON keyring.job_chunks TO keyring_sidecar;
GRANT SELECT ON keyring.rotation_progress TO keyring_auditor, keyring_admin;
