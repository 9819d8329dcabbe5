-- Adopting a populated column online (docs/write-path.md "Adopting a populated column").
--
-- protect() on a column that already holds values no longer converts it under an ACCESS
-- EXCLUSIVE lock held for a full rewrite. In one short transaction it sets the plaintext
-- aside (<column>_keyring_plain), adds the ciphertext column empty under the original name
-- and registers a 'backfill' job. The sidecars share that job like a re-encryption (the
-- same chunks, sidecar/jobs/backfill.ts): each range's plaintext moves into the queue in
-- canonical form and its rows get the placeholder, so the ordinary write path encrypts
-- them. When no plaintext is left, adopt_finish() drops the plaintext column (a brief
-- lock again). Until then keyring.status shows the values still in plaintext:
-- columns.plain_column (the value_counts migration) names the plaintext column, and the
-- status counters count its values (bucket -2) once the first sidecar has counted them
-- (keyring.backfill_count, outside any DDL lock); until then status counts them by a scan.

ALTER TABLE keyring.jobs DROP CONSTRAINT jobs_kind_check;
ALTER TABLE keyring.jobs ADD CONSTRAINT jobs_kind_check
  CHECK (kind IN ('rewrap', 'reencrypt', 'reindex', 'shred', 'backfill'));

-- How long protect() and the last step of an adoption (adopt_finish) wait for their
-- brief ACCESS EXCLUSIVE lock. Every writer that arrives meanwhile queues behind it, so a
-- short bound (2 s) is the point; the caller gets a clear error and tries again.
INSERT INTO keyring.settings (name, value) VALUES ('ddl_lock_timeout_ms', '2000');
ALTER TABLE keyring.settings ADD CONSTRAINT ddl_lock_timeout_ms_range CHECK (name <> 'ddl_lock_timeout_ms'
  OR (value ~ '^[0-9]{1,6}$' AND value::integer BETWEEN 10 AND 600000));

-- Takes ACCESS EXCLUSIVE on a table (and first on its staging view) within
-- ddl_lock_timeout_ms, in the caller's transaction, or says clearly why not.
--
-- In attempts of at most 200 ms, below deadlock_timeout (1 s by default): a waiting
-- ACCESS EXCLUSIVE request holds up every writer that arrives after it, and a writer
-- that already holds the table and then waits for the view would otherwise form a
-- deadlock in which the detector may pick the application as the victim. A failed
-- attempt releases what it took (its subtransaction) and the writers run on; the next
-- attempt comes after a short random pause.
CREATE FUNCTION keyring.lock_for_ddl(p_rel regclass, p_what text) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, keyring, pg_temp AS $$
DECLARE
  v_ms integer := coalesce(keyring.setting('ddl_lock_timeout_ms'), '2000')::integer;
  v_deadline timestamptz := clock_timestamp() + make_interval(secs => v_ms / 1000.0);
  v_before text := current_setting('lock_timeout');
  v_view text;
BEGIN
  -- The staging view first, then the table: the order an application write takes them
  -- (the view's statement, then its trigger's base-table write).
  SELECT format('%I.%I', n.nspname, v.relname) INTO v_view
    FROM pg_class t JOIN pg_namespace n ON n.oid = t.relnamespace
    JOIN keyring.columns k ON k.table_schema = n.nspname AND k.table_name = t.relname
    JOIN pg_class v ON v.relnamespace = t.relnamespace AND v.relname = k.staging_view AND v.relkind = 'v'
   WHERE t.oid = p_rel
   LIMIT 1;
  LOOP
    BEGIN
      PERFORM set_config('lock_timeout', least(v_ms, 200) || 'ms', true);
      IF v_view IS NOT NULL THEN
        EXECUTE format('LOCK TABLE %s IN ACCESS EXCLUSIVE MODE', v_view);
      END IF;
      EXECUTE format('LOCK TABLE ONLY %s IN ACCESS EXCLUSIVE MODE', p_rel);
      -- the rest of the caller's transaction waits as it did before
      PERFORM set_config('lock_timeout', v_before, true);
      RETURN;
    EXCEPTION WHEN lock_not_available THEN
      IF clock_timestamp() >= v_deadline THEN
        RAISE EXCEPTION USING ERRCODE = 'lock_not_available',
          MESSAGE = format('keyring: %s could not lock %s within %s ms: other transactions are using it', p_what, p_rel, v_ms),
          HINT = 'Nothing was changed. Find the long transaction (SELECT pid, xact_start, query FROM pg_stat_activity '
                 || 'WHERE state <> ''idle'' ORDER BY xact_start), let it finish, and try again; or raise '
                 || 'keyring.settings ddl_lock_timeout_ms.';
      END IF;
    END;
    PERFORM pg_sleep(0.02 + random() * 0.08);
  END LOOP;
END
$$;

-- SQL text: `<ref> <op> key(<param>)` on the primary key, for a canonical row key
-- parameter (pk::text, or the JSON array of a composite key), as reencrypt-chunks.ts.
CREATE FUNCTION keyring.pk_range_sql(p_pk name[], p_types text[], p_ref text, p_op text, p_param text) RETURNS text
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
  SELECT CASE WHEN cardinality(p_pk) = 1
    THEN format('%s.%I %s %s::%s', p_ref, p_pk[1], p_op, p_param, p_types[1])
    ELSE format('(%s) %s (%s)',
      (SELECT string_agg(format('%s.%I', p_ref, c), ', ' ORDER BY o) FROM unnest(p_pk) WITH ORDINALITY AS u (c, o)),
      p_op,
      (SELECT string_agg(format('(%s::jsonb->>%s)::%s', p_param, o - 1, ty), ', ' ORDER BY o)
         FROM unnest(p_types) WITH ORDINALITY AS u (ty, o)))
  END
$$;

-- A backfill job for a column under adoption, or the unfinished one it already has.
CREATE FUNCTION keyring.start_backfill(p_column_id integer, p_batch_size integer) RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, keyring, pg_temp AS $$
DECLARE
  v_id bigint;
BEGIN
  SELECT j.id INTO v_id FROM keyring.jobs j
   WHERE j.kind = 'backfill' AND j.column_id = p_column_id AND j.state IN ('queued', 'running')
   ORDER BY j.id DESC LIMIT 1;
  IF FOUND THEN
    RETURN v_id;
  END IF;
  -- total: counted by the first sidecar that takes the job, outside any DDL lock.
  INSERT INTO keyring.jobs (kind, state, batch_size, column_id)
  VALUES ('backfill', 'queued', p_batch_size, p_column_id)
  RETURNING id INTO v_id;
  PERFORM keyring.audit_append('backfill.started', p_column_id => p_column_id,
                               p_detail => jsonb_build_object('job', v_id, 'batch_size', p_batch_size));
  PERFORM pg_notify('keyring', '{"kind":"job"}');
  RETURN v_id;
END
$$;

-- keyring.backfill('public.people.ssn'): runs the backfill of a column under adoption
-- again (after values over max_value_bytes were shortened, or the limit raised), or
-- returns the job still running. protect() starts the first one itself.
CREATE FUNCTION keyring.backfill(p_column text, p_batch_size integer DEFAULT 1000) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, keyring, pg_temp AS $$
DECLARE
  v_parts text[] := string_to_array(p_column, '.');
  k keyring.columns;
BEGIN
  IF p_batch_size IS NULL OR p_batch_size NOT BETWEEN 1 AND 100000 THEN
    RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
      MESSAGE = 'keyring: p_batch_size must be between 1 and 100000 rows per transaction';
  END IF;
  IF p_column IS NULL OR cardinality(v_parts) NOT IN (2, 3) THEN
    RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
      MESSAGE = format('keyring: %L is not a column reference', p_column),
      HINT = 'Write schema.table.column.';
  END IF;
  IF cardinality(v_parts) = 2 THEN v_parts := ARRAY['public'] || v_parts; END IF;
  SELECT * INTO k FROM keyring.columns c
   WHERE c.table_schema = v_parts[1] AND c.table_name = v_parts[2] AND c.column_name = v_parts[3];
  IF NOT FOUND THEN
    RAISE EXCEPTION USING ERRCODE = 'undefined_object',
      MESSAGE = format('keyring: %s is not a protected column', p_column),
      HINT = 'SELECT * FROM keyring.status lists the protected columns.';
  END IF;
  IF k.plain_column IS NULL THEN
    RAISE EXCEPTION USING ERRCODE = 'object_not_in_prerequisite_state',
      MESSAGE = format('keyring: %s holds no plaintext to adopt: its adoption finished or never started', p_column),
      HINT = 'Nothing to do; keyring.status shows plaintext 0 for it.';
  END IF;
  RETURN keyring.start_backfill(k.id, p_batch_size);
END
$$;

-- One range of a backfill, in the caller's (the sidecar's) transaction: the plaintext of
-- the rows with after_key < pk <= last_key moves into the queue in canonical form and those
-- rows get the placeholder, so the write path encrypts them. Lock order as the write path:
-- queue entries first (the INSERT), base rows second. Per row, an application write wins:
--   - a row whose value was queued by a staging write has no plaintext any more (the
--     staging UPDATE cleared it) or its queue entry exists (ON CONFLICT DO NOTHING: this
--     range waits for that writer's commit, then leaves the row);
--   - the base UPDATE is a compare-and-swap (the plaintext is still there); entries this
--     range queued for rows that lost the race are taken back before commit;
--   - a staging write that clears the value after this range committed leaves a stale
--     queue entry, which the write path drops: it writes a ciphertext only over the
--     placeholder (update-base-rows.ts).
-- A value over max_value_bytes stays where it is and is quarantined (reason 'oversized'):
-- never lost, never queued; the job reports it and keeps the plaintext column until it is
-- shortened through the view (or the limit raised) and keyring.backfill() runs again.
-- Runs with the canonical settings, as the staging triggers do.
CREATE FUNCTION keyring.backfill_range(p_column_id integer, p_after_key text, p_last_key text,
                                       OUT moved bigint, OUT skipped bigint, OUT oversized bigint)
LANGUAGE plpgsql
SET search_path = pg_catalog, keyring, pg_temp
SET TimeZone = 'UTC' SET DateStyle = 'ISO, YMD' SET IntervalStyle = 'postgres' SET extra_float_digits = 3
AS $$
DECLARE
  k keyring.columns;
  v_qtable text;
  v_where text;
  v_row_key text;
  v_max bigint := keyring.max_value_bytes();
  v_seen bigint;
  v_queued text[];
  v_big text[];
  v_done text[];
BEGIN
  SELECT * INTO k FROM keyring.columns c WHERE c.id = p_column_id;
  IF NOT FOUND OR k.plain_column IS NULL THEN
    RAISE EXCEPTION USING ERRCODE = 'object_not_in_prerequisite_state',
      MESSAGE = format('keyring: column %s is not under adoption', p_column_id);
  END IF;
  v_qtable := format('ONLY %I.%I', k.table_schema, k.table_name);
  v_row_key := keyring.row_key_sql(k.pk_columns, 't');
  v_where := format('t.%I IS NOT NULL', k.plain_column)
    || CASE WHEN p_after_key IS NULL THEN '' ELSE ' AND ' || keyring.pk_range_sql(k.pk_columns, k.pk_types, 't', '>', '$1') END
    || CASE WHEN p_last_key IS NULL THEN '' ELSE ' AND ' || keyring.pk_range_sql(k.pk_columns, k.pk_types, 't', '<=', '$2') END;

  EXECUTE format(
    'WITH s AS MATERIALIZED (SELECT %1$s AS row_key, %2$s AS value, %3$s AS subject, %4$s AS tenant FROM %5$s t WHERE %6$s), '
    || 'q AS (INSERT INTO keyring.pending AS p (column_id, row_key, value, subject, tenant) '
    || '      SELECT $4, s.row_key, s.value, s.subject, s.tenant FROM s WHERE octet_length(s.value) <= $3 '
    || '      ON CONFLICT (column_id, row_key) DO NOTHING RETURNING p.row_key) '
    || 'SELECT (SELECT count(*) FROM s), (SELECT array_agg(row_key) FROM q), '
    || '       (SELECT array_agg(row_key) FROM s WHERE octet_length(s.value) > $3)',
    v_row_key, keyring.canonical_sql(format('t.%I', k.plain_column), k.data_type),
    CASE WHEN k.subject_column IS NULL THEN 'NULL::text' ELSE format('t.%I::text', k.subject_column) END,
    CASE WHEN k.tenant_column IS NULL THEN 'NULL::text' ELSE format('t.%I::text', k.tenant_column) END,
    v_qtable, v_where)
  INTO v_seen, v_queued, v_big USING p_after_key, p_last_key, v_max, p_column_id;

  IF v_queued IS NOT NULL THEN
    -- Joined on the primary key itself (an index probe per row), the plaintext still there.
    EXECUTE format(
      'WITH u AS (UPDATE %1$s AS t SET %2$I = ''\x00''::bytea, %3$I = NULL '
      || '          FROM unnest($1::text[]) AS q (row_key) WHERE t.%3$I IS NOT NULL AND %4$s RETURNING %5$s AS row_key) '
      || 'SELECT array_agg(row_key) FROM u',
      v_qtable, k.column_name, k.plain_column, keyring.pk_range_sql(k.pk_columns, k.pk_types, 't', '=', 'q.row_key'), v_row_key)
    INTO v_done USING v_queued;
    -- Rows whose plaintext a staging write cleared meanwhile: their value is not ours to queue.
    DELETE FROM keyring.pending p
     WHERE p.column_id = p_column_id AND p.row_key = ANY (v_queued)
       AND NOT (p.row_key = ANY (coalesce(v_done, '{}')));
  END IF;

  IF v_big IS NOT NULL THEN
    INSERT INTO keyring.quarantine (column_id, row_key, reason, detail)
    SELECT p_column_id, b, 'oversized',
           format('adoption: the value is over max_value_bytes (%s) and stays in %I until it is shortened '
                  || 'through the staging view (or the limit raised) and keyring.backfill() runs again', v_max, k.plain_column)
      FROM unnest(v_big) AS b
    ON CONFLICT (column_id, row_key) WHERE resolved_at IS NULL DO NOTHING;
  END IF;

  moved := coalesce(cardinality(v_done), 0);
  oversized := coalesce(cardinality(v_big), 0);
  skipped := v_seen - moved - oversized;
  IF moved > 0 THEN
    PERFORM pg_notify('keyring', '{"kind":"pending"}');
  END IF;
END
$$;

-- Values of a column still in plaintext (set aside, not moved to the queue yet); 0 when
-- the column is not under adoption. Exact, by a scan of the table: adopt_finish() drops
-- the plaintext column only when this says 0 (never on the strength of a counter), and
-- keyring.status uses it until the backfill's first step has counted the column.
CREATE FUNCTION keyring.plaintext_count(p_column_id integer) RETURNS bigint
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, keyring, pg_temp AS $$
DECLARE
  k keyring.columns;
  v_n bigint;
BEGIN
  SELECT * INTO k FROM keyring.columns c WHERE c.id = p_column_id;
  IF NOT FOUND OR k.plain_column IS NULL THEN
    RETURN 0;
  END IF;
  EXECUTE format('SELECT count(*) FROM ONLY %I.%I WHERE %I IS NOT NULL', k.table_schema, k.table_name, k.plain_column)
    INTO v_n;
  RETURN v_n;
EXCEPTION WHEN undefined_column THEN
  -- The adoption ended after this statement's snapshot read the registry: the column is
  -- gone (the catalog is always read current), and with it the plaintext.
  RETURN 0;
END
$$;

-- The last step of an adoption, called by the sidecar under the job row lock once every
-- range is done. Returns the values still in plaintext: 0 when the adoption is complete
-- (the plaintext column is dropped, the view regenerated, the job done, audited); more
-- when values were left (over the size limit): then nothing changes and the sidecar
-- fails the job with that count. SECURITY DEFINER: dropping a column needs the table's
-- owner (the role that ran keyring migrate must own the table or be a superuser;
-- docs/write-path.md). A lock it cannot get within ddl_lock_timeout_ms raises
-- lock_not_available, which the sidecar retries later.
CREATE FUNCTION keyring.adopt_finish(p_job bigint) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, keyring, pg_temp
AS $$
DECLARE
  j keyring.jobs;
  k keyring.columns;
  v_rel regclass;
  v_left bigint;
  v_acl aclitem[];
  v_nn name;
  v_had_nn boolean;
BEGIN
  SELECT * INTO j FROM keyring.jobs x WHERE x.id = p_job AND x.kind = 'backfill' FOR UPDATE;
  IF NOT FOUND OR j.state NOT IN ('queued', 'running') THEN
    RAISE EXCEPTION USING ERRCODE = 'object_not_in_prerequisite_state',
      MESSAGE = format('keyring: backfill job %s is not running', p_job);
  END IF;
  SELECT * INTO k FROM keyring.columns c WHERE c.id = j.column_id FOR UPDATE;
  IF NOT FOUND OR k.plain_column IS NULL THEN
    RAISE EXCEPTION USING ERRCODE = 'object_not_in_prerequisite_state',
      MESSAGE = format('keyring: the column of backfill job %s is not under adoption', p_job);
  END IF;
  v_rel := format('%I.%I', k.table_schema, k.table_name)::regclass;
  -- Counted before the lock: the plaintext column only ever loses values (staging writes
  -- and the backfill clear it, the guard refuses any other writer), so 0 stays 0.
  v_left := keyring.plaintext_count(k.id);
  IF v_left > 0 THEN
    RETURN v_left;
  END IF;
  PERFORM keyring.lock_for_ddl(v_rel, 'the end of an adoption');
  v_nn := keyring.fit_name(k.column_name, '_keyring_nn');
  v_had_nn := EXISTS (SELECT 1 FROM pg_constraint co WHERE co.conrelid = v_rel AND co.conname = v_nn);
  v_acl := keyring.drop_staging(v_rel);
  -- First: the counting triggers are regenerated without the plaintext column (their
  -- WHEN clause names it, so it could not be dropped) and its bucket goes to 0.
  UPDATE keyring.columns c SET plain_column = NULL WHERE c.id = k.id;
  -- Drops the two-column NOT NULL check with it.
  EXECUTE format('ALTER TABLE %s DROP COLUMN %I', v_rel, k.plain_column);
  IF v_had_nn THEN
    -- NOT VALID: no scan under the lock; every row holds a value by construction and every
    -- new row version is checked.
    EXECUTE format('ALTER TABLE %s ADD CONSTRAINT %I CHECK (%I IS NOT NULL) NOT VALID', v_rel, v_nn, k.column_name);
  END IF;
  -- Values once over the limit were shortened (or the limit raised) and are queued now.
  UPDATE keyring.quarantine q SET resolved_at = clock_timestamp()
   WHERE q.column_id = k.id AND q.reason = 'oversized' AND q.resolved_at IS NULL;
  PERFORM keyring.generate_staging(v_rel, v_acl);
  -- Created by this function's owner: give the view back to the table's owner, who
  -- created it with protect() and may unprotect() (drop it) later.
  EXECUTE format('ALTER VIEW %I.%I OWNER TO %I', k.table_schema, k.staging_view,
                 (SELECT pg_get_userbyid(t.relowner) FROM pg_class t WHERE t.oid = v_rel));
  UPDATE keyring.jobs x SET state = 'done', finished_at = clock_timestamp(), updated_at = clock_timestamp(),
         started_at = coalesce(x.started_at, clock_timestamp())
   WHERE x.id = p_job;
  PERFORM keyring.audit_append('column.adopted', p_column_id => k.id, p_detail => jsonb_build_object(
    'table', k.table_schema || '.' || k.table_name, 'column', k.column_name, 'job', p_job,
    'moved', j.done, 'skipped', j.skipped, 'total', j.total,
    'seconds', round(extract(epoch FROM clock_timestamp() - coalesce(j.started_at, j.created_at))::numeric, 3)));
  RETURN 0;
END
$$;

-- generate_staging (from the write-path migration): the plaintext column of an adoption is
-- neither shown nor written, a row reads as the mask while it holds one, and a staging write clears it.
CREATE OR REPLACE FUNCTION keyring.generate_staging(p_rel regclass, p_acl aclitem[]) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, keyring, pg_temp AS $gen$
DECLARE
  v_schema name;
  v_table name;
  v_view name;
  v_prefix name;
  v_qtable text;
  v_qview text;
  v_label text;
  v_pk name[];
  v_fn_insert text;
  v_fn_update text;
  v_fn_delete text;
  c record;
  g record;
  i integer := 0;
  v_mask text;
  v_vtype text;
  v_canonical text;
  v_size_check text;
  v_subject text;
  v_tenant text;
  v_upsert text;
  v_has_identity boolean := false;
  v_ids integer[] := '{}';
  -- the view
  v_select text[] := '{}';
  v_defaults text[] := '{}';
  -- INSERT
  v_ins_decl text := '';
  v_ins_check text := '';
  v_ins_cols text[] := '{}';
  v_ins_vals text[] := '{}';
  v_ins_ret text[] := '{}';
  v_ins_into text[] := '{}';
  v_ins_queue text := '';
  v_ins_hide text := '';
  -- UPDATE
  v_upd_decl text := '';
  v_upd_check text := '';
  v_upd_queue text := '';
  v_upd_set text[] := '{}';
  v_upd_ret text[] := '{}';
  v_upd_into text[] := '{}';
  -- the guard
  v_guard_cols text[] := '{}';
  v_guard_upd text[] := '{}';
  v_isnull text;
  v_plain_cols name[] := '{}';
  v_body text;
  v_settings constant text :=
    E'SET search_path = pg_catalog, keyring, pg_temp\n'
    -- canonical text independent of the writer's session (docs/write-path.md)
    || E'SET TimeZone = ''UTC'' SET DateStyle = ''ISO, YMD'' SET IntervalStyle = ''postgres'' SET extra_float_digits = 3\n';
BEGIN
  SELECT n.nspname, t.relname INTO v_schema, v_table
    FROM pg_class t JOIN pg_namespace n ON n.oid = t.relnamespace WHERE t.oid = p_rel;
  SELECT k.staging_view, k.trigger_prefix, k.pk_columns INTO v_view, v_prefix, v_pk
    FROM keyring.columns k WHERE k.table_schema = v_schema AND k.table_name = v_table
   ORDER BY k.id LIMIT 1;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'keyring: %.% has no protected column', v_schema, v_table;
  END IF;
  v_qtable := format('%I.%I', v_schema, v_table);
  v_qview := format('%I.%I', v_schema, v_view);
  v_label := v_schema || '.' || v_table;
  v_fn_insert := format('keyring.%I', v_prefix || '__insert');
  v_fn_update := format('keyring.%I', v_prefix || '__update');
  v_fn_delete := format('keyring.%I', v_prefix || '__delete');

  FOR c IN
    SELECT a.attnum, a.attname, a.attidentity, a.attgenerated,
           pg_get_expr(d.adbin, d.adrelid) AS def,
           a.attname = ANY (v_pk) AS is_pk,
           k.id, k.data_type, k.column_default, k.subject_column, k.tenant_column, k.bidx_column, k.plain_column
      FROM pg_attribute a
      LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
      LEFT JOIN keyring.columns k
        ON k.table_schema = v_schema AND k.table_name = v_table AND k.column_name = a.attname
     WHERE a.attrelid = p_rel AND a.attnum > 0 AND NOT a.attisdropped
       AND a.attname NOT IN (SELECT b.bidx_column FROM keyring.columns b
                              WHERE b.table_schema = v_schema AND b.table_name = v_table
                                AND b.bidx_column IS NOT NULL)
       -- The plaintext set aside by an unfinished adoption: never shown, never written
       -- by the staging triggers except to clear it (docs/write-path.md).
       AND a.attname NOT IN (SELECT b.plain_column FROM keyring.columns b
                              WHERE b.table_schema = v_schema AND b.table_name = v_table
                                AND b.plain_column IS NOT NULL)
     ORDER BY a.attnum
  LOOP
    IF c.id IS NULL THEN
      -- An ordinary column: shown as is, written as given, returned as stored.
      v_select := v_select || format('t.%I', c.attname);
      IF c.attidentity <> '' THEN
        -- A view has no identity: its default draws from the identity sequence, and the
        -- trigger inserts with OVERRIDING SYSTEM VALUE, so RETURNING gives the real id.
        v_has_identity := true;
        v_defaults := v_defaults || format('ALTER VIEW %s ALTER COLUMN %I SET DEFAULT nextval(%L::regclass)',
          v_qview, c.attname, pg_get_serial_sequence(v_qtable, c.attname));
      ELSIF c.def IS NOT NULL AND c.attgenerated = '' THEN
        v_defaults := v_defaults || format('ALTER VIEW %s ALTER COLUMN %I SET DEFAULT %s', v_qview, c.attname, c.def);
      END IF;
      IF c.attgenerated = '' THEN
        v_ins_cols := v_ins_cols || format('%I', c.attname);
        v_ins_vals := v_ins_vals || format('NEW.%I', c.attname);
      END IF;
      v_ins_ret := v_ins_ret || format('t.%I', c.attname);
      v_ins_into := v_ins_into || format('NEW.%I', c.attname);
      IF NOT c.is_pk AND c.attgenerated = '' THEN
        IF c.attidentity = 'a' THEN
          v_upd_check := v_upd_check || format(
            E'  IF NEW.%1$I::text IS DISTINCT FROM OLD.%1$I::text THEN\n'
            || E'    RAISE EXCEPTION USING ERRCODE = ''generated_always'', MESSAGE = %2$L;\n'
            || E'  END IF;\n',
            c.attname, format('column "%s" can only be updated to DEFAULT', c.attname));
        ELSE
          -- Only a column the statement changed is written: a column it did not mention
          -- keeps whatever a concurrent transaction stored in the meantime (an INSTEAD OF
          -- trigger gets no EvalPlanQual recheck). Compared as text: every type has one.
          v_upd_set := v_upd_set || format(
            '%1$I = CASE WHEN NEW.%1$I::text IS NOT DISTINCT FROM OLD.%1$I::text THEN t.%1$I ELSE NEW.%1$I END',
            c.attname);
        END IF;
      END IF;
      v_upd_ret := v_upd_ret || format('t.%I', c.attname);
      v_upd_into := v_upd_into || format('NEW.%I', c.attname);
      CONTINUE;
    END IF;

    -- A protected column. v_<i>: its canonical bytes; a_<i>: the UPDATE action,
    -- k = keep the stored value, n = set NULL, s = set a new value.
    i := i + 1;
    v_ids := v_ids || c.id;
    v_vtype := keyring.staging_type(c.data_type);
    v_mask := keyring.mask_sql(c.data_type);
    v_canonical := keyring.canonical_sql(format('NEW.%I', c.attname), c.data_type);
    v_subject := CASE WHEN c.subject_column IS NULL THEN 'NULL' ELSE format('(NEW.%I)::text', c.subject_column) END;
    v_tenant := CASE WHEN c.tenant_column IS NULL THEN 'NULL' ELSE format('(NEW.%I)::text', c.tenant_column) END;
    v_size_check := format(
      E'    IF octet_length(v_%1$s) > %4$s THEN\n'
      || E'      v_max := coalesce(v_max, keyring.max_value_bytes());\n'
      || E'      IF octet_length(v_%1$s) > v_max THEN\n'
      || E'        RAISE EXCEPTION USING ERRCODE = ''program_limit_exceeded'',\n'
      || E'          MESSAGE = format(%2$L, octet_length(v_%1$s), v_max),\n'
      || E'          HINT = %3$L;\n'
      || E'      END IF;\n'
      || E'    END IF;\n',
      i,
      'keyring: value for ' || replace(v_label || '.' || c.attname, '%', '%%')
        || ' is %s bytes, over the maximum of %s bytes',
      'The limit keeps the queue and the sidecar bounded (keyring.settings max_value_bytes). '
        || 'Store large objects outside the protected column, or raise the limit.',
      keyring.min_max_value_bytes());
    v_upsert := format(
      E'INSERT INTO keyring.pending AS p (column_id, row_key, value, subject, tenant)\n'
      || E'      VALUES (%s, v_row_key, v_%s, %s, %s)\n'
      || E'      ON CONFLICT (column_id, row_key) DO UPDATE\n'
      || E'      SET value = EXCLUDED.value, subject = EXCLUDED.subject, tenant = EXCLUDED.tenant,\n'
      || E'          enqueued_at = clock_timestamp(), attempts = 0, last_error = NULL;',
      c.id, i, v_subject, v_tenant);

    -- During an adoption a value not moved yet still lives in the plaintext column: the
    -- row reads as the mask (it holds a value), never as the plaintext.
    v_isnull := format('t.%I IS NULL', c.attname)
                || CASE WHEN c.plain_column IS NULL THEN '' ELSE format(' AND t.%I IS NULL', c.plain_column) END;
    IF c.plain_column IS NOT NULL THEN
      v_plain_cols := v_plain_cols || c.plain_column;
    END IF;
    v_select := v_select || format('CASE WHEN %4$s THEN NULL::%2$s ELSE %3$s END AS %1$I',
                                   c.attname, v_vtype, v_mask, v_isnull);
    IF c.column_default IS NOT NULL THEN
      v_defaults := v_defaults || format('ALTER VIEW %s ALTER COLUMN %I SET DEFAULT %s',
                                         v_qview, c.attname, c.column_default);
    END IF;

    v_ins_decl := v_ins_decl || format(E'  v_%s bytea;  -- %s\n', i, quote_ident(c.attname));
    v_ins_check := v_ins_check || format(E'  IF NEW.%I IS NOT NULL THEN\n    v_%s := %s;\n%s  END IF;\n',
                                         c.attname, i, v_canonical, v_size_check);
    v_ins_cols := v_ins_cols || format('%I', c.attname);
    v_ins_vals := v_ins_vals || format('CASE WHEN v_%s IS NULL THEN NULL ELSE ''\x00''::bytea END', i);
    v_ins_queue := v_ins_queue || format(E'  IF v_%s IS NOT NULL THEN\n    %s\n  END IF;\n', i, v_upsert);
    v_ins_hide := v_ins_hide || format(E'  NEW.%I := NULL;\n', c.attname);

    v_upd_decl := v_upd_decl || format(E'  v_%1$s bytea;  -- %2$s\n  a_%1$s "char";\n', i, quote_ident(c.attname));
    v_upd_check := v_upd_check || format(
      E'  IF NEW.%1$I IS NULL THEN\n'
      || E'    a_%2$s := CASE WHEN OLD.%1$I IS NULL THEN ''k'' ELSE ''n'' END;\n'
      || E'  ELSIF NEW.%1$I = %3$s THEN\n'
      || E'    a_%2$s := ''k'';  -- the mask: "not changed"\n'
      || E'  ELSE\n'
      || E'    a_%2$s := ''s'';\n'
      || E'    v_%2$s := %4$s;\n%5$s'
      || E'  END IF;\n',
      c.attname, i, v_mask, v_canonical, v_size_check);
    IF c.subject_column IS NOT NULL OR c.tenant_column IS NOT NULL THEN
      -- A kept value stays encrypted under the old subject's or tenant's key and index:
      -- moving it would need a re-encryption, so the change is refused (write-path.md).
      v_upd_check := v_upd_check || format(
        E'  IF a_%1$s = ''k'' AND OLD.%2$I IS NOT NULL AND (%3$s OR %4$s) THEN\n'
        || E'    RAISE EXCEPTION USING ERRCODE = ''feature_not_supported'', MESSAGE = %5$L, HINT = %6$L;\n'
        || E'  END IF;\n',
        i, c.attname,
        CASE WHEN c.subject_column IS NULL THEN 'false'
             ELSE format('NEW.%1$I::text IS DISTINCT FROM OLD.%1$I::text', c.subject_column) END,
        CASE WHEN c.tenant_column IS NULL THEN 'false'
             ELSE format('NEW.%1$I::text IS DISTINCT FROM OLD.%1$I::text', c.tenant_column) END,
        format('keyring: cannot change the data subject or tenant of a row of %s while %s holds a value',
               v_label, c.attname),
        format('The value is bound to the old subject''s or tenant''s keys. Set %s in the same UPDATE '
               || '(a new value or NULL) so it is encrypted again.', c.attname));
    END IF;
    v_upd_queue := v_upd_queue || format(
      E'  IF a_%1$s = ''n'' THEN\n'
      || E'    DELETE FROM keyring.pending WHERE column_id = %2$s AND row_key = v_row_key;\n'
      || E'  ELSIF a_%1$s = ''s'' THEN\n    %3$s\n'
      || E'  END IF;\n',
      i, c.id, v_upsert);
    v_upd_set := v_upd_set || format(
      '%1$I = CASE a_%2$s WHEN ''k'' THEN t.%1$I WHEN ''n'' THEN NULL ELSE ''\x00''::bytea END', c.attname, i);
    IF c.bidx_column IS NOT NULL THEN
      v_upd_set := v_upd_set || format('%1$I = CASE a_%2$s WHEN ''k'' THEN t.%1$I END', c.bidx_column, i);
    END IF;
    IF c.plain_column IS NOT NULL THEN
      -- A write through the view replaces (or clears) the value: the old plaintext goes at
      -- once, so the backfill can never bring it back over the newer value.
      v_upd_set := v_upd_set || format('%1$I = CASE a_%2$s WHEN ''k'' THEN t.%1$I END', c.plain_column, i);
    END IF;
    v_upd_ret := v_upd_ret || format('CASE WHEN %s THEN NULL::%s ELSE %s END', v_isnull, v_vtype, v_mask);
    v_upd_into := v_upd_into || format('NEW.%I', c.attname);

    v_guard_cols := v_guard_cols || format('%I', c.attname);
    v_guard_upd := v_guard_upd || format('OLD.%1$I IS DISTINCT FROM NEW.%1$I', c.attname);
    IF c.bidx_column IS NOT NULL THEN
      v_guard_cols := v_guard_cols || format('%I', c.bidx_column);
      v_guard_upd := v_guard_upd || format('OLD.%1$I IS DISTINCT FROM NEW.%1$I', c.bidx_column);
    END IF;
    IF c.plain_column IS NOT NULL THEN
      v_guard_cols := v_guard_cols || format('%I', c.plain_column);
      v_guard_upd := v_guard_upd || format('OLD.%1$I IS DISTINCT FROM NEW.%1$I', c.plain_column);
    END IF;
  END LOOP;

  -- INSTEAD OF INSERT: size-check every value, write the base row (placeholder for each
  -- value), queue the canonical bytes. RETURNING sees the stored row, protected columns
  -- NULL. The sidecar is hinted once per statement by keyring_notify, not per row.
  v_body := format(
    E'CREATE OR REPLACE FUNCTION %1$s() RETURNS trigger\n'
    || E'LANGUAGE plpgsql SECURITY DEFINER\n%2$s'
    || E'AS $keyring_generated$\nDECLARE\n  v_row_key text;\n  v_max bigint;\n%3$s'
    || E'BEGIN\n%4$s'
    || E'  INSERT INTO %5$s AS t (%6$s)%7$s\n  VALUES (%8$s)\n  RETURNING %9$s\n  INTO %10$s;\n'
    || E'  v_row_key := %11$s;\n%12$s%13$s'
    || E'  RETURN NEW;\nEND\n$keyring_generated$',
    v_fn_insert, v_settings, v_ins_decl, v_ins_check,
    v_qtable, array_to_string(v_ins_cols, ', '),
    CASE WHEN v_has_identity THEN ' OVERRIDING SYSTEM VALUE' ELSE '' END,
    array_to_string(v_ins_vals, ', '), array_to_string(v_ins_ret, ', '), array_to_string(v_ins_into, ', '),
    keyring.row_key_sql(v_pk, 'NEW'), v_ins_queue, v_ins_hide);
  EXECUTE v_body;

  -- INSTEAD OF UPDATE. Lock order (write-path.md): queue entries first, base row second,
  -- as in the sidecar, so a write racing a batch waits for it and then wins.
  v_body := format(
    E'CREATE OR REPLACE FUNCTION %1$s() RETURNS trigger\n'
    || E'LANGUAGE plpgsql SECURITY DEFINER\n%2$s'
    || E'AS $keyring_generated$\nDECLARE\n  v_row_key text;\n  v_max bigint;\n%3$s'
    || E'BEGIN\n'
    || E'  v_row_key := %4$s;\n'
    || E'  IF %5$s IS DISTINCT FROM v_row_key THEN\n'
    || E'    RAISE EXCEPTION USING ERRCODE = ''feature_not_supported'', MESSAGE = %6$L, HINT = %7$L;\n'
    || E'  END IF;\n%8$s%9$s'
    || E'  UPDATE ONLY %10$s AS t SET %11$s\n  WHERE %12$s\n  RETURNING %13$s\n  INTO %14$s;\n'
    || E'  IF NOT FOUND THEN\n'
    || E'    -- deleted meanwhile: take back what was queued for it, report no row\n'
    || E'    DELETE FROM keyring.pending WHERE column_id = ANY (%15$L::integer[]) AND row_key = v_row_key;\n'
    || E'    RETURN NULL;\n'
    || E'  END IF;\n'
    || E'  RETURN NEW;\nEND\n$keyring_generated$',
    v_fn_update, v_settings, v_upd_decl,
    keyring.row_key_sql(v_pk, 'OLD'), keyring.row_key_sql(v_pk, 'NEW'),
    format('keyring: the primary key of %s cannot be changed through %s', v_label, v_view),
    'Each ciphertext is bound to its row''s primary key. Delete the row and insert it again with the new key.',
    v_upd_check, v_upd_queue,
    v_qtable, array_to_string(v_upd_set, E',\n    '), keyring.pk_match_sql(p_rel, 't', 'OLD'),
    array_to_string(v_upd_ret, ', '), array_to_string(v_upd_into, ', '),
    v_ids);
  EXECUTE v_body;

  -- INSTEAD OF DELETE: queue entries first, then the row. RETURNING sees the view's row.
  v_body := format(
    E'CREATE OR REPLACE FUNCTION %1$s() RETURNS trigger\n'
    || E'LANGUAGE plpgsql SECURITY DEFINER\n%2$s'
    || E'AS $keyring_generated$\nDECLARE\n  v_row_key text;\n'
    || E'BEGIN\n'
    || E'  v_row_key := %3$s;\n'
    || E'  DELETE FROM keyring.pending WHERE column_id = ANY (%4$L::integer[]) AND row_key = v_row_key;\n'
    || E'  DELETE FROM ONLY %5$s AS t WHERE %6$s;\n'
    || E'  IF NOT FOUND THEN\n    RETURN NULL;\n  END IF;\n'
    || E'  RETURN OLD;\nEND\n$keyring_generated$',
    v_fn_delete, v_settings, keyring.row_key_sql(v_pk, 'OLD'), v_ids,
    v_qtable, keyring.pk_match_sql(p_rel, 't', 'OLD'));
  EXECUTE v_body;

  -- Trigger functions are called by triggers only; nobody needs EXECUTE on them.
  EXECUTE format('REVOKE ALL ON FUNCTION %1$s(), %2$s(), %3$s() FROM PUBLIC', v_fn_insert, v_fn_update, v_fn_delete);
  EXECUTE format('COMMENT ON FUNCTION %s() IS %L', v_fn_insert,
                 'keyring: INSTEAD OF INSERT on ' || v_qview || ', generated by keyring.protect(); do not edit');
  EXECUTE format('COMMENT ON FUNCTION %s() IS %L', v_fn_update,
                 'keyring: INSTEAD OF UPDATE on ' || v_qview || ', generated by keyring.protect(); do not edit');
  EXECUTE format('COMMENT ON FUNCTION %s() IS %L', v_fn_delete,
                 'keyring: INSTEAD OF DELETE on ' || v_qview || ', generated by keyring.protect(); do not edit');

  -- The view (dropped by the caller, before the column changed type). ONLY: rows of
  -- child tables are not protected by this table's triggers.
  EXECUTE format('CREATE VIEW %s AS SELECT %s FROM ONLY %s t', v_qview, array_to_string(v_select, ', '), v_qtable);
  FOR j IN 1 .. cardinality(v_defaults) LOOP
    EXECUTE v_defaults[j];
  END LOOP;
  EXECUTE format('COMMENT ON VIEW %s IS %L', v_qview,
    'keyring: write plaintext here; protected columns read as NULL or a mask, never as plaintext');
  EXECUTE format('CREATE TRIGGER keyring_insert INSTEAD OF INSERT ON %s FOR EACH ROW EXECUTE FUNCTION %s()',
                 v_qview, v_fn_insert);
  EXECUTE format('CREATE TRIGGER keyring_update INSTEAD OF UPDATE ON %s FOR EACH ROW EXECUTE FUNCTION %s()',
                 v_qview, v_fn_update);
  EXECUTE format('CREATE TRIGGER keyring_delete INSTEAD OF DELETE ON %s FOR EACH ROW EXECUTE FUNCTION %s()',
                 v_qview, v_fn_delete);
  EXECUTE format('CREATE TRIGGER keyring_notify AFTER INSERT OR UPDATE ON %s FOR EACH STATEMENT '
                 || 'EXECUTE FUNCTION keyring.tg_notify__pending()', v_qview);

  -- The guard on the base table (dropped by the caller with the view). UPDATE only: a
  -- guard on INSERT would cost every staged row a trigger (its WHEN clause is re-read for
  -- each base INSERT the staging trigger runs); writers have no INSERT on the base table.
  EXECUTE format(
    -- The role test in WHEN spares the sidecar's rows a PL/pgSQL call each (measured
    -- 1.5-2.6 ms per 1,000-row batch); the function keeps the same test for other callers.
    'CREATE TRIGGER keyring_guard_update BEFORE UPDATE OF %s ON %s FOR EACH ROW WHEN ((%s) '
    || 'AND NOT pg_catalog.pg_has_role(current_user, ''keyring_sidecar'', ''MEMBER'')) '
    || 'EXECUTE FUNCTION keyring.tg_guard__protected(%L, %L)',
    array_to_string(v_guard_cols, ', '), v_qtable, array_to_string(v_guard_upd, ' OR '),
    v_fn_update || '()', v_qview);

  -- Grants: the application role writes the view and reads the base table; the view's
  -- defaults draw from the table's sequences as the writer, who needs USAGE on them.
  -- Grants made on an earlier version of the view are restored.
  EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON %s TO keyring_writer', v_qview);
  IF cardinality(v_plain_cols) = 0 THEN
    EXECUTE format('GRANT SELECT ON %s TO keyring_writer', v_qtable);
  ELSE
    -- An adoption is running: the application role reads every column but the plaintext
    -- set aside (a table-level grant would include it). Revoking the table privilege
    -- revokes the column privileges too, so the list is always the current one.
    EXECUTE format('REVOKE SELECT ON %s FROM keyring_writer', v_qtable);
    EXECUTE format('GRANT SELECT (%s) ON %s TO keyring_writer',
      (SELECT string_agg(quote_ident(a.attname), ', ' ORDER BY a.attnum) FROM pg_attribute a
        WHERE a.attrelid = p_rel AND a.attnum > 0 AND NOT a.attisdropped AND a.attname <> ALL (v_plain_cols)),
      v_qtable);
  END IF;
  FOR g IN
    SELECT DISTINCT pg_get_serial_sequence(v_qtable, a.attname) AS seq
      FROM pg_attribute a
     WHERE a.attrelid = p_rel AND a.attnum > 0 AND NOT a.attisdropped
       AND pg_get_serial_sequence(v_qtable, a.attname) IS NOT NULL
  LOOP
    EXECUTE format('GRANT USAGE ON SEQUENCE %s TO keyring_writer', g.seq);
  END LOOP;
  FOR g IN
    SELECT a.grantee, a.privilege_type, a.is_grantable
      FROM unnest(p_acl) AS u (item), aclexplode(ARRAY[u.item]) AS a
     WHERE a.grantee <> (SELECT relowner FROM pg_class WHERE oid = v_qview::regclass)
  LOOP
    EXECUTE format('GRANT %s ON %s TO %s%s', g.privilege_type, v_qview,
                   CASE WHEN g.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(pg_get_userbyid(g.grantee)) END,
                   CASE WHEN g.is_grantable THEN ' WITH GRANT OPTION' ELSE '' END);
  END LOOP;
END
$gen$;

-- protect_column (from the write-path migration): a populated column is adopted online.
CREATE OR REPLACE FUNCTION keyring.protect_column(
  p_rel regclass, p_column name, p_blind_index boolean, p_normalize text[], p_index_bytes integer,
  p_classification text, p_priority integer, p_subject_column name, p_tenant_column name
) RETURNS integer
LANGUAGE plpgsql
SET search_path = pg_catalog, keyring, pg_temp
SET TimeZone = 'UTC' SET DateStyle = 'ISO, YMD' SET IntervalStyle = 'postgres' SET extra_float_digits = 3
AS $$
DECLARE
  v_schema name;
  v_table name;
  v_kind "char";
  v_qtable text;
  v_label text;
  v_att record;
  v_pk name[];
  v_pk_types text[];
  v_type text;
  v_bidx name;
  v_view name;
  v_prefix name;
  v_id integer;
  v_default text;
  v_uses text;
  v_bad text;
  v_other name;
  v_max bigint := keyring.max_value_bytes();
  v_queued bigint;
  v_over bigint;
  v_largest bigint;
  v_acl aclitem[];
  v_adopt boolean;
  v_plain name;
  v_job bigint;
BEGIN
  SELECT n.nspname, t.relname, t.relkind INTO v_schema, v_table, v_kind
    FROM pg_class t JOIN pg_namespace n ON n.oid = t.relnamespace WHERE t.oid = p_rel;
  v_qtable := format('%I.%I', v_schema, v_table);
  v_label := v_schema || '.' || v_table;
  IF v_kind <> 'r' THEN
    RAISE EXCEPTION USING ERRCODE = 'wrong_object_type',
      MESSAGE = format('keyring: %s is not a plain table', v_label),
      HINT = 'protect() works on ordinary tables (not views, partitioned or foreign tables).';
  END IF;
  -- No write may slip in between the checks below and the change of the column. Brief:
  -- a populated column is adopted without a rewrite (docs/write-path.md "Adopting a
  -- populated column"); bounded: waiting behind a long transaction would hold up every
  -- writer queued behind this lock, so protect() gives up after ddl_lock_timeout_ms.
  PERFORM keyring.lock_for_ddl(p_rel, 'protect()');

  SELECT array_agg(a.attname ORDER BY k.ord), array_agg(format_type(a.atttypid, a.atttypmod) ORDER BY k.ord)
    INTO v_pk, v_pk_types
    FROM pg_index i
   CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k (attnum, ord)
    JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
   WHERE i.indrelid = p_rel AND i.indisprimary;
  IF v_pk IS NULL THEN
    RAISE EXCEPTION USING ERRCODE = 'object_not_in_prerequisite_state',
      MESSAGE = format('keyring: table %s has no primary key; protect() binds each ciphertext to its row''s primary key.', v_label),
      HINT = 'Add one, then call protect() again.';
  END IF;

  SELECT a.attnum, a.atttypid, a.attidentity, a.attgenerated, a.attnotnull, format_type(a.atttypid, a.atttypmod) AS typ
    INTO v_att
    FROM pg_attribute a
   WHERE a.attrelid = p_rel AND a.attname = p_column AND a.attnum > 0 AND NOT a.attisdropped;
  IF NOT FOUND THEN
    RAISE EXCEPTION USING ERRCODE = 'undefined_column',
      MESSAGE = format('keyring: column %s of table %s does not exist', quote_ident(p_column), v_label),
      HINT = 'Column names are case-sensitive as stored; check \d of the table.';
  END IF;
  v_type := v_att.typ;
  IF p_column = ANY (v_pk) THEN
    RAISE EXCEPTION USING ERRCODE = 'feature_not_supported',
      MESSAGE = format('keyring: %s.%s is part of the primary key and cannot be protected', v_label, p_column),
      HINT = 'The primary key is bound into every ciphertext as the row key and must stay readable. Use a surrogate key.';
  END IF;
  IF EXISTS (SELECT 1 FROM keyring.columns k
              WHERE k.table_schema = v_schema AND k.table_name = v_table AND k.column_name = p_column) THEN
    RAISE EXCEPTION USING ERRCODE = 'duplicate_object',
      MESSAGE = format('keyring: %s.%s is already protected', v_label, p_column),
      HINT = 'To change its settings, unprotect it first (keyring.unprotect).';
  END IF;
  IF EXISTS (SELECT 1 FROM keyring.columns k
              WHERE k.table_schema = v_schema AND k.table_name = v_table
                AND p_column IN (k.bidx_column, k.subject_column, k.tenant_column)) THEN
    RAISE EXCEPTION USING ERRCODE = 'feature_not_supported',
      MESSAGE = format('keyring: %s.%s is the blind-index, subject or tenant column of a protected column', v_label, p_column),
      HINT = 'Those columns must stay readable by the staging triggers and the sidecar.';
  END IF;
  IF v_att.atttypid NOT IN ('text'::regtype, 'character varying'::regtype, 'date'::regtype,
                            'timestamp without time zone'::regtype, 'timestamp with time zone'::regtype,
                            'numeric'::regtype, 'bigint'::regtype, 'jsonb'::regtype, 'bytea'::regtype)
     OR v_att.attidentity <> '' OR v_att.attgenerated <> '' THEN
    RAISE EXCEPTION USING ERRCODE = 'feature_not_supported',
      MESSAGE = format('keyring: %s.%s is %s%s, which protect() does not support', v_label, p_column, v_type,
                       CASE WHEN v_att.attidentity <> '' THEN ' (identity)'
                            WHEN v_att.attgenerated <> '' THEN ' (generated)' ELSE '' END),
      HINT = 'Supported: text, varchar(n), date, timestamp, timestamptz, numeric(p,s), bigint, jsonb, bytea; not identity or generated columns.';
  END IF;

  -- Normalisation and index length: the blind index's contract, validated here once.
  SELECT string_agg(coalesce(quote_literal(x), 'NULL'), ', ') INTO v_bad
    FROM unnest(p_normalize) AS x
   WHERE x IS NULL OR x NOT IN ('none', 'trim', 'lower', 'digits', 'nfc');
  IF p_normalize IS NULL OR cardinality(p_normalize) = 0 OR v_bad IS NOT NULL THEN
    RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
      MESSAGE = format('keyring: unknown normalisation %s', coalesce(v_bad, 'list (empty)')),
      HINT = 'Use none, or any of trim, lower, digits, nfc (e.g. ARRAY[''trim'', ''lower'']).';
  END IF;
  IF cardinality(p_normalize) > 1 AND 'none' = ANY (p_normalize) THEN
    RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
      MESSAGE = 'keyring: normalisation none cannot be combined with others',
      HINT = 'Use ARRAY[''none''] alone, or list only the steps you want.';
  END IF;
  IF (SELECT count(DISTINCT x) FROM unnest(p_normalize) AS x) <> cardinality(p_normalize) THEN
    RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
      MESSAGE = 'keyring: a normalisation step is listed twice',
      HINT = 'List each step once.';
  END IF;
  IF v_att.atttypid = 'bytea'::regtype AND p_normalize <> ARRAY['none'] THEN
    RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
      MESSAGE = format('keyring: %s.%s is bytea: its only normalisation is none', v_label, p_column),
      HINT = 'Text normalisation does not apply to raw bytes.';
  END IF;
  IF p_index_bytes IS NULL OR p_index_bytes NOT BETWEEN 4 AND 32 THEN
    RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
      MESSAGE = format('keyring: index bytes must be between 4 and 32, not %s', coalesce(p_index_bytes::text, 'NULL')),
      HINT = 'The default, 16, keeps collisions negligible; fewer bytes leak less about equal values (docs).';
  END IF;

  -- Subject and tenant columns: read as text by the triggers, so they must exist and stay plain.
  FOREACH v_other IN ARRAY ARRAY[p_subject_column, p_tenant_column] LOOP
    CONTINUE WHEN v_other IS NULL;
    IF NOT EXISTS (SELECT 1 FROM pg_attribute a
                    WHERE a.attrelid = p_rel AND a.attname = v_other AND a.attnum > 0 AND NOT a.attisdropped) THEN
      RAISE EXCEPTION USING ERRCODE = 'undefined_column',
        MESSAGE = format('keyring: subject/tenant column %s of table %s does not exist', quote_ident(v_other), v_label),
        HINT = 'Name an existing column of the same table.';
    END IF;
    IF v_other = p_column OR EXISTS (SELECT 1 FROM keyring.columns k
                 WHERE k.table_schema = v_schema AND k.table_name = v_table
                   AND v_other IN (k.column_name, k.bidx_column)) THEN
      RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
        MESSAGE = format('keyring: subject/tenant column %s.%s is protected', v_label, v_other),
        HINT = 'A subject or tenant column must stay readable: it selects the data key and the index scope.';
    END IF;
  END LOOP;

  -- Objects that bind the column's current type and values would break on bytea and
  -- placeholders (a unique index on '\x00'!): the user decides what replaces them.
  SELECT string_agg(DISTINCT x, ', ') INTO v_uses FROM (
    SELECT format('index %s', ic.relname) AS x
      FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid
     WHERE i.indrelid = p_rel
       AND (v_att.attnum = ANY (i.indkey::int2[])
            OR EXISTS (SELECT 1 FROM pg_depend d
                        WHERE d.classid = 'pg_class'::regclass AND d.objid = i.indexrelid
                          AND d.refobjid = p_rel AND d.refobjsubid = v_att.attnum))
    UNION ALL
    SELECT format('constraint %s', co.conname)
      FROM pg_constraint co
     WHERE (co.conrelid = p_rel AND v_att.attnum = ANY (co.conkey) AND co.contype IN ('c', 'f', 'u', 'x'))
        OR (co.confrelid = p_rel AND v_att.attnum = ANY (co.confkey))
  ) u;
  IF v_uses IS NOT NULL THEN
    RAISE EXCEPTION USING ERRCODE = 'object_not_in_prerequisite_state',
      MESSAGE = format('keyring: %s.%s is used by %s', v_label, p_column, v_uses),
      HINT = 'Drop them first (equality lookups use the blind index instead), then call protect() again.';
  END IF;

  IF p_blind_index THEN
    v_bidx := keyring.fit_name(p_column, '_bidx');
    IF EXISTS (SELECT 1 FROM pg_attribute a
                WHERE a.attrelid = p_rel AND a.attname = v_bidx AND NOT a.attisdropped) THEN
      RAISE EXCEPTION USING ERRCODE = 'duplicate_column',
        MESSAGE = format('keyring: %s already has a column %s for the blind index', v_label, quote_ident(v_bidx)),
        HINT = 'Rename or drop that column first.';
    END IF;
  END IF;

  -- View and function names: shared by every protected column of the table.
  SELECT k.staging_view, k.trigger_prefix INTO v_view, v_prefix
    FROM keyring.columns k WHERE k.table_schema = v_schema AND k.table_name = v_table LIMIT 1;
  IF NOT FOUND THEN
    v_view := keyring.fit_name(v_table, '_staging');
    IF to_regclass(format('%I.%I', v_schema, v_view)) IS NOT NULL THEN
      RAISE EXCEPTION USING ERRCODE = 'duplicate_table',
        MESSAGE = format('keyring: %s.%s already exists; protect() creates the staging view under that name', v_schema, v_view),
        HINT = 'Rename that relation first.';
    END IF;
    -- tg_<table> in public, tg_<schema>_<table> elsewhere; if that is taken (public.a_b
    -- and schema a, table b), an md5 tag of the qualified name keeps them apart.
    v_prefix := left(keyring.fit_name('tg_' || CASE WHEN v_schema = 'public' THEN v_table
                                                    ELSE v_schema || '_' || v_table END, '__insert'), -8);
    IF EXISTS (SELECT 1 FROM keyring.columns k WHERE k.trigger_prefix = v_prefix)
       OR to_regprocedure(format('keyring.%I()', v_prefix || '__insert')) IS NOT NULL THEN
      v_prefix := left(keyring.fit_name('tg_' || v_table || '_' || left(md5(v_label), 8), '__insert'), -8);
    END IF;
  END IF;

  SELECT pg_get_expr(d.adbin, d.adrelid) INTO v_default
    FROM pg_attrdef d WHERE d.adrelid = p_rel AND d.adnum = v_att.attnum;

  INSERT INTO keyring.columns (table_schema, table_name, column_name, data_type, pk_columns, pk_types,
                               staging_view, trigger_prefix, column_default, bidx_column, normalize,
                               index_bytes, subject_column, tenant_column, classification, priority)
  VALUES (v_schema, v_table, p_column, v_type, v_pk, v_pk_types, v_view, v_prefix, v_default, v_bidx,
          p_normalize, p_index_bytes, p_subject_column, p_tenant_column, p_classification, p_priority)
  RETURNING id INTO v_id;

  -- A column that holds values is adopted online: its plaintext is set aside and a
  -- backfill job moves it to the queue range by range (sidecar/jobs/backfill.ts). The
  -- probe stops at the first value; only a column of NULLs is scanned to the end.
  EXECUTE format('SELECT EXISTS (SELECT 1 FROM ONLY %s WHERE %I IS NOT NULL)', v_qtable, p_column) INTO v_adopt;
  IF v_adopt THEN
    v_plain := keyring.fit_name(p_column, '_keyring_plain');
    IF EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = p_rel AND a.attname = v_plain AND NOT a.attisdropped) THEN
      RAISE EXCEPTION USING ERRCODE = 'duplicate_column',
        MESSAGE = format('keyring: %s already has a column %s, where protect() would set the plaintext aside', v_label, quote_ident(v_plain)),
        HINT = 'Rename or drop that column first.';
    END IF;
    -- Catalog changes only (no rewrite, no scan) except the blind index, see below.
    v_acl := keyring.drop_staging(p_rel);
    EXECUTE format('ALTER TABLE %s RENAME COLUMN %I TO %I', v_qtable, p_column, v_plain);
    IF v_default IS NOT NULL THEN
      -- the view applies it now; on the plaintext column it would fill every new row
      EXECUTE format('ALTER TABLE %s ALTER COLUMN %I DROP DEFAULT', v_qtable, v_plain);
    END IF;
    EXECUTE format('ALTER TABLE %s ADD COLUMN %I bytea', v_qtable, p_column);
    IF v_att.attnotnull THEN
      -- Staging writes clear the plaintext: NOT NULL moves to a check over both columns,
      -- NOT VALID (no scan; every new row version is checked). See adopt_finish().
      EXECUTE format('ALTER TABLE %s ALTER COLUMN %I DROP NOT NULL', v_qtable, v_plain);
      EXECUTE format('ALTER TABLE %s ADD CONSTRAINT %I CHECK (%I IS NOT NULL OR %I IS NOT NULL) NOT VALID',
                     v_qtable, keyring.fit_name(p_column, '_keyring_nn'), p_column, v_plain);
    END IF;
    IF p_blind_index THEN
      EXECUTE format('ALTER TABLE %s ADD COLUMN %I bytea', v_qtable, v_bidx);
      -- Partial: the build scans the heap but indexes nothing (every term is NULL yet),
      -- the one step of an adoption that grows with the table (measured in the docs).
      -- Lookups (bidx = ANY(terms)) imply bidx IS NOT NULL, so they use it.
      EXECUTE format('CREATE INDEX ON %s (%I) WHERE %I IS NOT NULL', v_qtable, v_bidx, v_bidx);
    END IF;
    UPDATE keyring.columns SET plain_column = v_plain WHERE id = v_id;
    v_job := keyring.start_backfill(v_id, 1000);
    v_queued := 0;
  ELSE
  -- Queue every value already stored, in canonical form, then refuse the lot if any is
  -- over the limit (the sidecar would refuse it; better to say so now). Only a race can
  -- find one now (the probe above saw none): the old path stays correct for it.
  EXECUTE format(
    'WITH q AS (INSERT INTO keyring.pending (column_id, row_key, value, subject, tenant) '
    || 'SELECT $1, %s, %s, %s, %s FROM ONLY %s t WHERE t.%I IS NOT NULL RETURNING octet_length(value) AS n) '
    || 'SELECT count(*), count(*) FILTER (WHERE n > $2), max(n) FROM q',
    keyring.row_key_sql(v_pk, 't'), keyring.canonical_sql(format('t.%I', p_column), v_type),
    CASE WHEN p_subject_column IS NULL THEN 'NULL' ELSE format('t.%I::text', p_subject_column) END,
    CASE WHEN p_tenant_column IS NULL THEN 'NULL' ELSE format('t.%I::text', p_tenant_column) END,
    v_qtable, p_column)
  INTO v_queued, v_over, v_largest USING v_id, v_max;
  IF v_over > 0 THEN
    RAISE EXCEPTION USING ERRCODE = 'program_limit_exceeded',
      MESSAGE = format('keyring: %s values of %s.%s are over the maximum of %s bytes (the largest is %s bytes)',
                       v_over, v_label, p_column, v_max, v_largest),
      HINT = 'Shorten or move those values, or raise keyring.settings max_value_bytes, then call protect() again.';
  END IF;

  -- Convert: every value becomes the placeholder until the sidecar writes its ciphertext.
  v_acl := keyring.drop_staging(p_rel);
  IF v_default IS NOT NULL THEN
    EXECUTE format('ALTER TABLE %s ALTER COLUMN %I DROP DEFAULT', v_qtable, p_column);
  END IF;
  EXECUTE format('ALTER TABLE %1$s ALTER COLUMN %2$I TYPE bytea USING CASE WHEN %2$I IS NULL THEN NULL ELSE ''\x00''::bytea END',
                 v_qtable, p_column);
  IF p_blind_index THEN
    EXECUTE format('ALTER TABLE %s ADD COLUMN %I bytea', v_qtable, v_bidx);
    -- Not unique: uniqueness cannot be checked at insert time (write-path.md).
    EXECUTE format('CREATE INDEX ON %s (%I)', v_qtable, v_bidx);
  END IF;
  END IF;

  PERFORM keyring.generate_staging(p_rel, v_acl);

  -- The sidecar reads rows by primary key and writes ciphertext and terms, nothing else.
  -- USAGE on the table's schema lets both roles reach it (public has it for PUBLIC);
  -- unprotect() leaves it, other protected tables may live there.
  EXECUTE format('GRANT USAGE ON SCHEMA %I TO keyring_sidecar, keyring_writer', v_schema);
  EXECUTE format('GRANT SELECT ON %s TO keyring_sidecar', v_qtable);
  EXECUTE format('GRANT UPDATE (%I%s%s) ON %s TO keyring_sidecar', p_column,
                 CASE WHEN p_blind_index THEN format(', %I', v_bidx) ELSE '' END,
                 CASE WHEN v_adopt THEN format(', %I', v_plain) ELSE '' END, v_qtable);

  PERFORM keyring.audit_append('column.protected', p_column_id => v_id, p_detail => jsonb_build_object(
    'table', v_label, 'column', p_column, 'data_type', v_type, 'blind_index', v_bidx,
    'normalize', p_normalize, 'index_bytes', p_index_bytes, 'classification', p_classification,
    'subject_column', p_subject_column, 'tenant_column', p_tenant_column, 'queued', v_queued,
    'adoption_job', v_job));
  RETURN v_id;
END
$$;

-- protect('public.customers', 'national_id', ...): the DBA's entry point. The table is

-- unprotect() during an adoption is refused: the values still in plaintext would have to
-- be put back under the original name while writers add ciphertext; wait for the backfill.
CREATE OR REPLACE FUNCTION keyring.unprotect(p_table text, p_column name, p_force boolean DEFAULT false) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
  v_rel regclass := p_table::regclass;
  v_job bigint;
  v_id integer;
BEGIN
  IF EXISTS (SELECT 1 FROM keyring.columns k JOIN pg_class t ON t.relname = k.table_name
               JOIN pg_namespace n ON n.oid = t.relnamespace AND n.nspname = k.table_schema
              WHERE t.oid = v_rel AND k.column_name = p_column AND k.plain_column IS NOT NULL) THEN
    SELECT j.id INTO v_job FROM keyring.jobs j JOIN keyring.columns k ON k.id = j.column_id
      JOIN pg_class t ON t.relname = k.table_name JOIN pg_namespace n ON n.oid = t.relnamespace AND n.nspname = k.table_schema
     WHERE t.oid = v_rel AND k.column_name = p_column AND j.kind = 'backfill'
     ORDER BY j.id DESC LIMIT 1;
    RAISE EXCEPTION USING ERRCODE = 'object_not_in_prerequisite_state',
      MESSAGE = format('keyring: %s.%s is being adopted (backfill job %s); unprotect() must wait until it ends',
                       v_rel, p_column, coalesce(v_job::text, '?')),
      HINT = 'Follow it with SELECT * FROM keyring.rotation_progress; if the job failed, fix what its error says and run '
             || 'SELECT keyring.backfill(''schema.table.column'') to finish the adoption first.';
  END IF;
  -- as in the value_counts migration: the counting triggers go first and come back for
  -- the table's other protected columns
  EXECUTE format('LOCK TABLE ONLY %s IN ACCESS EXCLUSIVE MODE', v_rel);
  SELECT k.id INTO v_id FROM keyring.columns k JOIN pg_catalog.pg_class t ON t.relname = k.table_name
    JOIN pg_catalog.pg_namespace n ON n.oid = t.relnamespace AND n.nspname = k.table_schema
   WHERE t.oid = v_rel AND k.column_name = p_column;
  PERFORM keyring.drop_counters(v_rel);
  PERFORM keyring.unprotect_column(v_rel, p_column, p_force);
  DELETE FROM keyring.value_counts v WHERE v.column_id = v_id;
  PERFORM keyring.install_counters(v_rel);
END
$$;

-- protect(): as in the value_counts migration, but an adoption's column is not recounted
-- here (that would scan the table under protect's ACCESS EXCLUSIVE lock): its ciphertext
-- column is new and empty, and its plaintext is counted by the backfill's first step.
CREATE OR REPLACE FUNCTION keyring.protect(
  p_table text,
  p_column name,
  p_blind_index boolean DEFAULT false,
  p_normalize text[] DEFAULT ARRAY['none'],
  p_index_bytes integer DEFAULT 16,
  p_classification text DEFAULT 'L3 Confidential',
  p_priority integer DEFAULT 100,
  p_subject_column name DEFAULT NULL,
  p_tenant_column name DEFAULT NULL
) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
  v_rel regclass := p_table::regclass;
  v_id integer;
BEGIN
  v_id := keyring.protect_column(v_rel, p_column, p_blind_index, p_normalize, p_index_bytes,
                                 p_classification, p_priority, p_subject_column, p_tenant_column);
  PERFORM keyring.install_counters(v_rel);
  IF (SELECT k.plain_column FROM keyring.columns k WHERE k.id = v_id) IS NULL THEN
    PERFORM keyring.recount(v_id);
  END IF;
  RETURN v_id;
END
$$;

-- Setting or clearing columns.plain_column regenerates the table's counting triggers; it
-- no longer recounts (a scan, and both protect() and adopt_finish() hold an ACCESS
-- EXCLUSIVE lock when they change it). Set: the backfill's first step counts the
-- plaintext (backfill_count). Cleared: the plaintext bucket goes to 0 by a negation (the
-- column is about to be dropped, and nothing writes the table under that lock).
-- Setting it by hand: run SELECT keyring.recount(column_id) afterwards.
CREATE OR REPLACE FUNCTION keyring.tg_columns__plain_column() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, keyring, pg_temp AS $$
BEGIN
  PERFORM keyring.install_counters(format('%I.%I', NEW.table_schema, NEW.table_name)::regclass);
  IF NEW.plain_column IS NULL THEN
    INSERT INTO keyring.value_counts (column_id, bucket, n)
    SELECT v.column_id, v.bucket, -sum(v.n) FROM keyring.value_counts v
     WHERE v.column_id = NEW.id AND v.bucket = -2 GROUP BY 1, 2 HAVING sum(v.n) <> 0;
  END IF;
  RETURN NULL;
END
$$;

-- The backfill's first step (a sidecar, under the job row lock, no DDL lock): recounts the
-- column into the status counters (one snapshot, correct while writers run) and returns
-- the values in plaintext, the job's total.
CREATE FUNCTION keyring.backfill_count(p_column_id integer) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, keyring, pg_temp AS $$
BEGIN
  PERFORM keyring.recount(p_column_id);
  RETURN (SELECT coalesce(sum(v.n), 0) FROM keyring.value_counts v WHERE v.column_id = p_column_id AND v.bucket = -2);
END
$$;

-- check_counts as in the value_counts migration, except that the plaintext bucket of a
-- column whose backfill has not counted it yet (the seconds between protect() and the
-- job's first step) is not compared: it is not counted yet, and status scans meanwhile.
CREATE OR REPLACE FUNCTION keyring.check_counts(p_column_id integer DEFAULT NULL)
RETURNS TABLE (column_id integer, table_name text, column_name name, bucket bigint, what text,
               counted bigint, actual bigint)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, keyring, pg_temp AS $$
DECLARE
  k keyring.columns;
BEGIN
  IF p_column_id IS NOT NULL THEN
    PERFORM keyring.column_for_counts(p_column_id);
  END IF;
  FOR k IN SELECT * FROM keyring.columns c WHERE p_column_id IS NULL OR c.id = p_column_id ORDER BY c.id LOOP
    RETURN QUERY EXECUTE format(
      'WITH actual AS (%s), '
      || 'counted AS (SELECT v.bucket, sum(v.n) AS n FROM keyring.value_counts v WHERE v.column_id = $1 GROUP BY 1) '
      || 'SELECT $1, $2, $3, coalesce(a.bucket, c.bucket), keyring.bucket_label(coalesce(a.bucket, c.bucket)), '
      || '       coalesce(c.n, 0)::bigint, coalesce(a.n, 0)::bigint '
      || '  FROM actual a FULL JOIN counted c ON c.bucket = a.bucket '
      || ' WHERE coalesce(a.n, 0) <> coalesce(c.n, 0) AND NOT (coalesce(a.bucket, c.bucket) = -2 AND $4) ORDER BY 4',
      keyring.count_values_sql(k))
    USING k.id, k.table_schema || '.' || k.table_name, k.column_name,
          EXISTS (SELECT 1 FROM keyring.jobs j WHERE j.kind = 'backfill' AND j.column_id = k.id
                     AND j.state IN ('queued', 'running') AND j.total IS NULL);
  END LOOP;
END
$$;

-- keyring.status as in the value_counts migration, except plaintext: from the counters,
-- or by a scan (plaintext_count) while a backfill job has not counted its column yet.
CREATE OR REPLACE FUNCTION keyring.column_status()
RETURNS TABLE (column_id integer, table_name text, column_name name, classification text,
               key_version integer, data_key_id bigint, data_keys bigint, "values" bigint,
               pending bigint, oldest_pending_age interval, quarantined bigint, plaintext bigint)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, keyring, pg_temp SET jit = off AS $$
  WITH counts AS (
    SELECT v.column_id, v.bucket, sum(v.n)::bigint AS n
      FROM keyring.value_counts v GROUP BY 1, 2 HAVING sum(v.n) <> 0
  ), per_version AS (
    SELECT c.column_id, d.root_version AS key_version,
           count(*) FILTER (WHERE c.bucket > 0) AS data_keys,
           min(c.bucket) FILTER (WHERE c.bucket > 0) AS first_key,
           sum(c.n)::bigint AS n
      FROM counts c LEFT JOIN keyring.data_keys d ON c.bucket > 0 AND d.id = c.bucket
     WHERE c.bucket >= -1
     GROUP BY c.column_id, d.root_version
  )
  SELECT k.id, k.table_schema || '.' || k.table_name, k.column_name, k.classification,
         v.key_version, CASE WHEN v.data_keys = 1 THEN v.first_key END, coalesce(v.data_keys, 0), coalesce(v.n, 0),
         ph.n,
         CASE WHEN ph.n > 0 THEN
           (SELECT clock_timestamp() - p.enqueued_at FROM keyring.pending p WHERE p.column_id = k.id ORDER BY p.id LIMIT 1)
         END,
         (SELECT count(*) FROM keyring.quarantine q WHERE q.column_id = k.id AND q.resolved_at IS NULL),
         CASE WHEN k.plain_column IS NOT NULL
                   AND EXISTS (SELECT 1 FROM keyring.jobs j WHERE j.kind = 'backfill' AND j.column_id = k.id
                                  AND j.state IN ('queued', 'running') AND j.total IS NULL)
              THEN keyring.plaintext_count(k.id)
              ELSE coalesce((SELECT c.n FROM counts c WHERE c.column_id = k.id AND c.bucket = -2), 0) END
    FROM keyring.columns k
    LEFT JOIN per_version v ON v.column_id = k.id
    CROSS JOIN LATERAL (SELECT count(*)::bigint AS n
                          FROM (SELECT 1 FROM keyring.pending p WHERE p.column_id = k.id LIMIT 100000) x) ph
   ORDER BY k.id, v.key_version NULLS FIRST
$$;

REVOKE EXECUTE ON FUNCTION keyring.lock_for_ddl(regclass, text), keyring.pk_range_sql(name[], text[], text, text, text),
  keyring.start_backfill(integer, integer), keyring.backfill(text, integer),
  keyring.backfill_range(integer, text, text), keyring.plaintext_count(integer), keyring.adopt_finish(bigint),
  keyring.backfill_count(integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION keyring.lock_for_ddl(regclass, text), keyring.pk_range_sql(name[], text[], text, text, text),
  keyring.start_backfill(integer, integer), keyring.backfill(text, integer),
  keyring.backfill_range(integer, text, text), keyring.plaintext_count(integer), keyring.adopt_finish(bigint),
  keyring.backfill_count(integer) TO keyring_admin;
-- The sidecar runs the ranges (as itself: the guard lets it clear the plaintext column)
-- and the last step; it queues, so it may now insert into the queue.
GRANT EXECUTE ON FUNCTION keyring.backfill_range(integer, text, text), keyring.adopt_finish(bigint),
  keyring.pk_range_sql(name[], text[], text, text, text), keyring.row_key_sql(name[], text),
  keyring.canonical_sql(text, text), keyring.backfill_count(integer)
  TO keyring_sidecar;
GRANT INSERT ON keyring.pending TO keyring_sidecar;
GRANT USAGE ON SEQUENCE keyring.pending_id_seq TO keyring_sidecar;
