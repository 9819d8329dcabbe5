-- Index root rotation (docs/key-lifecycle.md "Index root rotation"): every blind-index
-- term recomputed under the active index root version, online, by the sidecars.
--
-- One 'reindex' job per protected column with a blind index, cut into primary-key ranges
-- exactly as a re-encryption job (keyring.job_chunks, 00007): a sidecar carves a range
-- under the job row lock, then does it in its own transaction (SKIP LOCKED), decrypting
-- each value and writing the new term with a compare-and-swap on the ciphertext and the
-- old term. While the job runs, lookups compute a term for every live index version
-- (Keyring.lookupTerms), so a row is found whichever version its term is on.
--
-- Invariant that makes "afterwards no row keeps an old-version term" hold: a term of
-- index version v is written only by a transaction that holds a share lock on v's
-- registry row and sees v active (the write path and the re-index ranges both take it).
-- activate_key updates that row, so it waits for such a transaction, and once it has
-- committed no term of the old version can be written any more. The job's final check
-- (the end of each pass) still counts the terms left on another version and starts a new
-- pass over them when there are any (a concurrent re-encryption rewrote a ciphertext
-- between read and compare-and-swap, say); only then is the job done.

ALTER TABLE keyring.jobs
  ADD COLUMN passes integer NOT NULL DEFAULT 1;  -- re-index: passes over the table (a final check may start another)

-- All the re-index jobs of one rotation, restricted classes first; returns their ids (in
-- that order). keyring.rotate('index') is the documented entry point and returns the
-- first id; this function exists for callers (the CLI) that follow every job.
CREATE FUNCTION keyring.reindex(p_batch_size integer DEFAULT 1000) RETURNS bigint[]
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, keyring, pg_temp AS $$
DECLARE
  v_target integer;
  v_prefix bytea;
  c keyring.columns;
  j keyring.jobs;
  v_ids bigint[] := '{}';
  v_id bigint;
  v_total bigint;
  v_from jsonb;
BEGIN
  IF p_batch_size IS NULL OR p_batch_size NOT BETWEEN 1 AND 100000 THEN
    RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
      MESSAGE = 'keyring: the batch size must be between 1 and 100000 rows per transaction',
      HINT = 'The default, 1000, keeps each transaction short so application writes keep their latency.';
  END IF;
  -- The registry lock: the target is the version that is active when this commits.
  LOCK TABLE keyring.root_keys IN SHARE ROW EXCLUSIVE MODE;
  SELECT r.version INTO v_target FROM keyring.root_keys r WHERE r.purpose = 'index' AND r.state = 'active';
  IF NOT FOUND THEN
    RAISE EXCEPTION USING ERRCODE = 'object_not_in_prerequisite_state',
      MESSAGE = 'keyring: no index key version is active; nothing to re-index to',
      HINT = 'Generate an index key (keyring keygen --purpose index), give it to the sidecars, restart them, '
             || 'then SELECT keyring.activate_key(''index'', <version>).';
  END IF;
  v_prefix := decode(lpad(to_hex(v_target), 4, '0'), 'hex');
  FOR c IN SELECT * FROM keyring.columns k WHERE k.bidx_column IS NOT NULL
            ORDER BY k.priority, k.classification DESC, k.id LOOP
    SELECT * INTO j FROM keyring.jobs x
     WHERE x.kind = 'reindex' AND x.column_id = c.id AND x.state IN ('queued', 'running')
     ORDER BY x.id DESC LIMIT 1 FOR UPDATE;
    IF FOUND THEN
      IF j.target_version = v_target THEN
        v_ids := v_ids || j.id;  -- an unfinished job towards the active version: follow it
        CONTINUE;
      END IF;
      UPDATE keyring.jobs x SET state = 'failed', finished_at = now(), updated_at = now(),
             error = format('superseded: index key version %s is active now', v_target)
       WHERE x.kind = 'reindex' AND x.column_id = c.id AND x.state IN ('queued', 'running');
      PERFORM keyring.audit_append('rotation.failed', p_key_purpose => 'index', p_key_version => j.target_version,
        p_column_id => c.id,
        p_detail => jsonb_build_object('job', j.id, 'kind', 'reindex', 'done', j.done, 'error', 'superseded',
                                       'superseded_by_version', v_target));
    END IF;
    -- Exact: one scan of the column (terms per version; the target's are left out).
    EXECUTE format('SELECT coalesce(sum(g.n), 0), coalesce(jsonb_object_agg(g.v::text, g.n), ''{}''::jsonb)
                      FROM (SELECT (get_byte(%1$I, 0) << 8) | get_byte(%1$I, 1) AS v, count(*) AS n FROM ONLY %2$I.%3$I
                             WHERE octet_length(%1$I) >= 2 AND substring(%1$I FROM 1 FOR 2) <> $1 GROUP BY 1) g',
                   c.bidx_column, c.table_schema, c.table_name)
      INTO v_total, v_from USING v_prefix;
    INSERT INTO keyring.jobs (kind, purpose, target_version, state, total, batch_size, column_id)
    VALUES ('reindex', 'index', v_target, 'queued', v_total, p_batch_size, c.id)
    RETURNING id INTO v_id;
    v_ids := v_ids || v_id;
    PERFORM keyring.audit_append('rotation.started', p_key_purpose => 'index', p_key_version => v_target,
      p_column_id => c.id,
      p_detail => jsonb_build_object('job', v_id, 'kind', 'reindex', 'total', v_total, 'from_versions', v_from,
                                     'batch_size', p_batch_size, 'classification', c.classification, 'priority', c.priority));
  END LOOP;
  IF cardinality(v_ids) = 0 THEN
    RAISE NOTICE USING MESSAGE = 'keyring: no protected column has a blind index; nothing to re-index',
      HINT = format('Nothing depends on older index versions; retire them (SELECT keyring.retire_key(''index'', <version>)).');
  ELSE
    RAISE NOTICE USING MESSAGE = format('keyring: re-index job(s) %s towards index key version %s; follow them in keyring.rotation_progress',
                                        array_to_string(v_ids, ', '), v_target);
    PERFORM pg_notify('keyring', '{"kind":"job"}');
  END IF;
  RETURN v_ids;
END
$$;

-- Same contract as in 00005 for 'encrypt' (the body below the first IF is unchanged);
-- 'index' now starts the re-index jobs (keyring.reindex, batch_size rows per transaction)
-- and returns the first job's id (restricted classes first), NULL when no column has a
-- blind index. Every job id is in the notice and in its rotation.started audit row.
CREATE OR REPLACE FUNCTION keyring.rotate(p_purpose keyring.key_purpose, batch_size integer DEFAULT 5000) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, keyring, pg_temp AS $$
DECLARE
  v_target integer;
  j keyring.jobs;
  v_total bigint;
  v_from jsonb;
  v_id bigint;
BEGIN
  IF p_purpose = 'index' THEN
    RETURN (keyring.reindex(rotate.batch_size))[1];
  END IF;
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

-- Same columns as in 00007. A finished job shows 100%: a re-index counts only the terms
-- it had to recompute, and application writes may have moved some rows to the new
-- version before the job reached them (they are in the total, not in the counters).
CREATE OR REPLACE VIEW keyring.rotation_progress AS
SELECT j.id AS job, j.kind, j.purpose, j.target_version, j.state, j.done, j.total,
       j.failed + j.quarantined + j.unavailable AS failed,
       CASE WHEN j.state = 'done' THEN 100.0
            WHEN coalesce(j.total, 0) = 0 THEN NULL
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

-- Takes a share lock on an index version's registry row for the rest of the caller's
-- transaction and says whether the version is active (the invariant above). A function,
-- because FOR SHARE needs UPDATE on the table, which the sidecar must not have.
CREATE FUNCTION keyring.lock_index_version(p_version integer) RETURNS boolean
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, keyring, pg_temp AS $$
  SELECT coalesce((SELECT r.state = 'active' FROM keyring.root_keys r
                    WHERE r.purpose = 'index' AND r.version = p_version FOR SHARE), false)
$$;

REVOKE EXECUTE ON FUNCTION keyring.reindex(integer), keyring.lock_index_version(integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION keyring.reindex(integer) TO keyring_admin;
GRANT EXECUTE ON FUNCTION keyring.lock_index_version(integer) TO keyring_sidecar, keyring_admin;
