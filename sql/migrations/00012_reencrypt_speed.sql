-- Re-encryption speed (docs/key-lifecycle.md "Re-encryption", bench rotation section):
-- keyring.reencrypt's default batch goes from 500 to 5000 rows per transaction. Each
-- range costs about fifteen statements besides its rows (claim, carve, key look-ups,
-- counters), which at 500 rows was a third of the time; the sidecar now writes a range
-- in parts of 1,000 rows, sealing the next part while the server writes the previous
-- one. A range of 5,000 rows is a transaction of a fraction of a second: an application
-- write to one of its rows waits at most that long (and then wins: compare-and-swap).
-- Only the default changes; the body is that of the reencrypt migration.

CREATE OR REPLACE FUNCTION keyring.reencrypt(p_column text DEFAULT 'all', p_batch_size integer DEFAULT 5000,
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
      HINT = 'The default, 5000, keeps a transaction under a second; application writes to rows of the range in hand wait for it.';
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
