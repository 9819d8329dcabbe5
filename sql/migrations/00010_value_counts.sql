-- keyring schema: status counters (the value_counts migration).
--
--   keyring.value_counts              delta rows (column, bucket, n), insert-only from triggers
--   keyring.value_bucket(bytea)       which bucket a stored value counts in
--   keyring.install_counters(regclass) (re)generates a protected table's counting triggers
--   keyring.recount(column_id)        exact recount of a column, correct while writers run
--   keyring.check_counts(column_id)   counters that differ from a real count (keyring verify)
--   keyring.compact_value_counts()    folds the deltas into one row per (column, bucket)
--   keyring.columns.plain_column      plaintext still waiting to be adopted, counted too
--   keyring.column_status() / status  read the counters instead of scanning every table
--
-- keyring.status must answer in under 50 ms on a 1M-row table (DESIGN.md): it reads a
-- few counter rows, never a protected table. Decisions and their reasons: docs/write-path.md,
-- "Status counters".

-- ---------------------------------------------------------------------------------------
-- The counters
-- ---------------------------------------------------------------------------------------

ALTER TABLE keyring.columns ADD COLUMN plain_column name;
COMMENT ON COLUMN keyring.columns.plain_column IS
  'keyring: while a populated column is being adopted, the base-table column that still holds plaintext '
  'not yet moved to the queue or encrypted; NULL otherwise. Its non-NULL values are counted (status.plaintext).';

-- Delta rows: every write to a protected table inserts the change of its counts here, and
-- nothing ever updates a row, so concurrent writers never wait for one another on a hot
-- counter. compact_value_counts() folds the deltas; the count of a (column, bucket) is
-- always sum(n). Buckets:
--   > 0  the data key id in a format-1 envelope (the key version is looked up at read
--        time in data_keys: a rewrap changes root_version without touching any value)
--    0   (reserved) the placeholder '\x00' is NOT counted: every staged value is stored
--        as the placeholder, and a delta row per staged value cost the write path about
--        40% more CPU per row (measured); keyring.pending counts queued values instead
--   -1   bytes that are not a format-1 envelope with a valid data key id
--   -2   plaintext in columns.plain_column (adoption not finished)
-- No foreign key on column_id, like keyring.pending: the check would take a KEY SHARE lock
-- on the registry row for every delta of every concurrent writer (MultiXact churn).
-- unprotect() deletes a column's rows, and compaction drops rows of unknown columns.
CREATE TABLE keyring.value_counts (
  column_id       integer NOT NULL,
  bucket          bigint NOT NULL,
  n               bigint NOT NULL
);
COMMENT ON TABLE keyring.value_counts IS
  'keyring: value counts per protected column and bucket, as deltas (count = sum(n)); read keyring.status instead';

-- The bucket of a stored value, NULL for NULL. A SQL-standard body: names are bound when
-- the function is created (not in the writer's search_path), and it still inlines into
-- the counting queries (data_key_id() is STRICT with a CASE body, so it does not).
CREATE FUNCTION keyring.value_bucket(v bytea) RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN CASE
  WHEN v IS NULL OR v = '\x00'::bytea THEN NULL
  WHEN octet_length(v) >= 37 AND get_byte(v, 0) = 1
   AND ('x' || encode(substring(v FROM 2 FOR 8), 'hex'))::bit(64)::bigint > 0
  THEN ('x' || encode(substring(v FROM 2 FOR 8), 'hex'))::bit(64)::bigint
  ELSE -1
END;

-- What a bucket means, for people (check_counts, docs).
CREATE FUNCTION keyring.bucket_label(p_bucket bigint) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN CASE
  WHEN p_bucket > 0 THEN 'data key ' || p_bucket
  WHEN p_bucket = 0 THEN 'queued'
  WHEN p_bucket = -1 THEN 'not an envelope'
  WHEN p_bucket = -2 THEN 'plaintext'
END;

-- ---------------------------------------------------------------------------------------
-- Counting triggers, generated per protected table
-- ---------------------------------------------------------------------------------------

-- Drops the counting triggers of a table (before a column they name changes type or goes
-- away). install_counters() creates them again.
CREATE FUNCTION keyring.drop_counters(p_rel regclass) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, keyring, pg_temp AS $$
DECLARE
  v_trigger name;
BEGIN
  FOR v_trigger IN SELECT tgname FROM pg_trigger
                    WHERE tgrelid = p_rel AND tgname IN ('keyring_count_insert', 'keyring_count_update',
                                                         'keyring_count_delete', 'keyring_count_truncate') LOOP
    EXECUTE format('DROP TRIGGER %I ON %s', v_trigger, p_rel);
  END LOOP;
END
$$;

-- (Re)creates the counting triggers of a table from keyring.columns, or drops them (and
-- their function) when no column of the table is protected any more. One generated
-- function, keyring.<prefix>__count(), static SQL naming the table's protected (and
-- plaintext) columns, serves four triggers on the base table:
--   AFTER INSERT   FOR EACH ROW, WHEN some counted column IS NOT NULL: the staging view
--                  inserts one base row per statement, so a statement trigger would run
--                  for every row anyway, and a row trigger whose WHEN is false costs no
--                  PL/pgSQL call (rows with no value at all)
--   AFTER UPDATE   FOR EACH STATEMENT with transition tables: a sidecar batch (one UPDATE
--                  of up to KEYRING_BATCH_SIZE rows) costs one call and one aggregate;
--                  an update that leaves the values alone nets to zero and writes nothing
--   AFTER DELETE   FOR EACH STATEMENT with a transition table
--   AFTER TRUNCATE inserts the negation of the column's counts
-- SECURITY DEFINER: whoever writes the table (the sidecar, a staging function's owner, a
-- role granted direct writes) may not insert into value_counts itself.
-- Postgres forbids transition tables on a trigger with a column list or several events,
-- hence one trigger per event.
CREATE FUNCTION keyring.install_counters(p_rel regclass) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, keyring, pg_temp AS $gen$
DECLARE
  v_schema name;
  v_table name;
  v_qtable text;
  v_prefix name;
  v_fn text;
  v_ids integer[];
  c record;
  -- one entry per counted expression: (column id, column name, is plaintext)
  v_ins text[] := '{}';
  v_when text[] := '{}';
  v_old text[] := '{}';
  v_new text[] := '{}';
  v_ins_sql text;
BEGIN
  SELECT n.nspname, t.relname INTO v_schema, v_table
    FROM pg_class t JOIN pg_namespace n ON n.oid = t.relnamespace WHERE t.oid = p_rel AND t.relkind = 'r';
  IF NOT FOUND THEN
    RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
      MESSAGE = format('keyring: install_counters needs a table, not %s', coalesce(p_rel::text, 'NULL')),
      HINT = 'Pass the protected table, e.g. SELECT keyring.install_counters(''public.customers'').';
  END IF;
  v_qtable := format('%I.%I', v_schema, v_table);
  -- No write may slip past the counters while they are replaced.
  EXECUTE format('LOCK TABLE ONLY %s IN SHARE ROW EXCLUSIVE MODE', v_qtable);
  PERFORM keyring.drop_counters(p_rel);

  SELECT min(k.trigger_prefix), array_agg(k.id ORDER BY k.id) INTO v_prefix, v_ids
    FROM keyring.columns k WHERE k.table_schema = v_schema AND k.table_name = v_table;
  IF v_ids IS NULL THEN
    -- trigger_prefix is gone with the last registry row: find the function by its comment
    FOR v_fn IN SELECT p.oid::regprocedure::text FROM pg_proc p
                 WHERE p.pronamespace = 'keyring'::regnamespace AND p.proname LIKE '%\_\_count'
                   AND obj_description(p.oid, 'pg_proc') = 'keyring: counting triggers of ' || v_qtable
                   || ', generated by keyring.install_counters(); do not edit' LOOP
      EXECUTE format('DROP FUNCTION %s', v_fn);
    END LOOP;
    RETURN;
  END IF;
  v_fn := format('keyring.%I', v_prefix || '__count');

  FOR c IN
    SELECT k.id, k.column_name AS col, false AS plain FROM keyring.columns k
     WHERE k.table_schema = v_schema AND k.table_name = v_table
    UNION ALL
    SELECT k.id, k.plain_column, true FROM keyring.columns k
     WHERE k.table_schema = v_schema AND k.table_name = v_table AND k.plain_column IS NOT NULL
    ORDER BY 1, 3
  LOOP
    IF c.plain AND NOT EXISTS (SELECT 1 FROM pg_attribute a
                                WHERE a.attrelid = p_rel AND a.attname = c.col AND a.attnum > 0 AND NOT a.attisdropped) THEN
      RAISE EXCEPTION USING ERRCODE = 'undefined_column',
        MESSAGE = format('keyring: plain_column %s of protected column %s does not exist in %s',
                         quote_ident(c.col), c.id, v_qtable),
        HINT = 'Set keyring.columns.plain_column to an existing column of the same table, or to NULL.';
    END IF;
    -- a staged row (NULL or the placeholder) costs no call: the queue counts queued values
    v_when := v_when || CASE WHEN c.plain THEN format('NEW.%I IS NOT NULL', c.col)
                             ELSE format('(NEW.%1$I IS NOT NULL AND NEW.%1$I <> ''\x00''::bytea)', c.col) END;
    IF c.plain THEN
      v_ins := v_ins || format('(%s, CASE WHEN NEW.%I IS NOT NULL THEN -2 END)', c.id, c.col);
      v_old := v_old || format('SELECT %s AS c, -2::bigint AS b, -1 AS d FROM keyring_old o WHERE o.%I IS NOT NULL', c.id, c.col);
      v_new := v_new || format('SELECT %s, -2::bigint, 1 FROM keyring_new o WHERE o.%I IS NOT NULL', c.id, c.col);
    ELSE
      v_ins := v_ins || format('(%s, keyring.value_bucket(NEW.%I))', c.id, c.col);
      v_old := v_old || format('SELECT %s AS c, keyring.value_bucket(o.%2$I) AS b, -1 AS d FROM keyring_old o WHERE keyring.value_bucket(o.%2$I) IS NOT NULL', c.id, c.col);
      v_new := v_new || format('SELECT %s, keyring.value_bucket(o.%2$I), 1 FROM keyring_new o WHERE keyring.value_bucket(o.%2$I) IS NOT NULL', c.id, c.col);
    END IF;
  END LOOP;

  IF cardinality(v_ins) = 1 THEN
    -- the WHEN clause already says the one value is not NULL
    v_ins_sql := format('INSERT INTO keyring.value_counts (column_id, bucket, n) VALUES %s;',
                        regexp_replace(v_ins[1], '\)$', ', 1)'));
  ELSE
    v_ins_sql := format('INSERT INTO keyring.value_counts (column_id, bucket, n) '
                        || E'\n      SELECT v.c, v.b, 1 FROM (VALUES %s) v (c, b) WHERE v.b IS NOT NULL;',
                        array_to_string(v_ins, ', '));
  END IF;

  EXECUTE format(
    E'CREATE OR REPLACE FUNCTION %1$s() RETURNS trigger\n'
    || E'LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp\n'
    || E'AS $keyring_generated$\nBEGIN\n'
    || E'  IF TG_OP = ''INSERT'' THEN\n    %2$s\n'
    || E'  ELSIF TG_OP = ''UPDATE'' THEN\n'
    || E'    INSERT INTO keyring.value_counts (column_id, bucket, n)\n'
    || E'    SELECT d.c, d.b, sum(d.d) FROM (\n      %3$s\n      UNION ALL\n      %4$s) d\n'
    || E'     GROUP BY d.c, d.b HAVING sum(d.d) <> 0;\n'
    || E'  ELSIF TG_OP = ''DELETE'' THEN\n'
    || E'    INSERT INTO keyring.value_counts (column_id, bucket, n)\n'
    || E'    SELECT d.c, d.b, sum(d.d) FROM (\n      %3$s) d\n'
    || E'     GROUP BY d.c, d.b;\n'
    || E'  ELSIF TG_OP = ''TRUNCATE'' THEN\n'
    -- The table is empty and locked (ACCESS EXCLUSIVE): every count visible now goes to 0.
    -- A negation, not a DELETE, so that a compaction running meanwhile cannot resurrect rows.
    || E'    INSERT INTO keyring.value_counts (column_id, bucket, n)\n'
    || E'    SELECT v.column_id, v.bucket, -sum(v.n) FROM keyring.value_counts v\n'
    || E'     WHERE v.column_id = ANY (%5$L::integer[]) GROUP BY 1, 2 HAVING sum(v.n) <> 0;\n'
    || E'  END IF;\n  RETURN NULL;\nEND\n$keyring_generated$',
    v_fn, v_ins_sql, array_to_string(v_old, E'\n      UNION ALL '), array_to_string(v_new, E'\n      UNION ALL '),
    v_ids);
  EXECUTE format('REVOKE ALL ON FUNCTION %s() FROM PUBLIC', v_fn);
  EXECUTE format('COMMENT ON FUNCTION %s() IS %L', v_fn,
                 'keyring: counting triggers of ' || v_qtable || ', generated by keyring.install_counters(); do not edit');

  EXECUTE format('CREATE TRIGGER keyring_count_insert AFTER INSERT ON %s FOR EACH ROW WHEN (%s) EXECUTE FUNCTION %s()',
                 v_qtable, array_to_string(v_when, ' OR '), v_fn);
  EXECUTE format('CREATE TRIGGER keyring_count_update AFTER UPDATE ON %s '
                 || 'REFERENCING OLD TABLE AS keyring_old NEW TABLE AS keyring_new FOR EACH STATEMENT EXECUTE FUNCTION %s()',
                 v_qtable, v_fn);
  EXECUTE format('CREATE TRIGGER keyring_count_delete AFTER DELETE ON %s '
                 || 'REFERENCING OLD TABLE AS keyring_old FOR EACH STATEMENT EXECUTE FUNCTION %s()', v_qtable, v_fn);
  EXECUTE format('CREATE TRIGGER keyring_count_truncate AFTER TRUNCATE ON %s FOR EACH STATEMENT EXECUTE FUNCTION %s()',
                 v_qtable, v_fn);
END
$gen$;

-- ---------------------------------------------------------------------------------------
-- Recount, check, compaction
-- ---------------------------------------------------------------------------------------

-- A query (text) counting one column's stored values by bucket: "SELECT bucket, n".
CREATE FUNCTION keyring.count_values_sql(k keyring.columns) RETURNS text
LANGUAGE sql STABLE SET search_path = pg_catalog, keyring, pg_temp AS $$
  SELECT format('SELECT keyring.value_bucket(t.%1$I) AS bucket, count(*) AS n FROM ONLY %2$I.%3$I t '
                || 'WHERE keyring.value_bucket(t.%1$I) IS NOT NULL GROUP BY 1', k.column_name, k.table_schema, k.table_name)
      || CASE WHEN k.plain_column IS NULL THEN ''
              ELSE format(' UNION ALL SELECT -2, count(*) FROM ONLY %2$I.%3$I t WHERE t.%1$I IS NOT NULL',
                          k.plain_column, k.table_schema, k.table_name) END
$$;

CREATE FUNCTION keyring.column_for_counts(p_column_id integer) RETURNS keyring.columns
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, keyring, pg_temp AS $$
DECLARE
  k keyring.columns;
BEGIN
  SELECT * INTO k FROM keyring.columns c WHERE c.id = p_column_id;
  IF NOT FOUND THEN
    RAISE EXCEPTION USING ERRCODE = 'undefined_object',
      MESSAGE = format('keyring: no protected column has id %s', coalesce(p_column_id::text, 'NULL')),
      HINT = 'SELECT column_id, table_name, column_name FROM keyring.status lists them.';
  END IF;
  RETURN k;
END
$$;

-- Exact recount of one column (NULL: every column); returns the number of buckets that
-- were wrong. Correct while writers run: ONE statement, so one snapshot, counts the table
-- and subtracts the deltas visible in that same snapshot, and inserts the difference as a
-- correction delta. A writer's base rows and its deltas commit together, so they are both
-- in the snapshot or both out of it: count at the snapshot + later deltas = the truth.
-- Reads the whole table (a sequential scan): run it to repair, not to read status.
CREATE FUNCTION keyring.recount(p_column_id integer DEFAULT NULL) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, keyring, pg_temp AS $$
DECLARE
  k keyring.columns;
  v_fixed bigint;
  v_total bigint := 0;
BEGIN
  FOR k IN SELECT * FROM keyring.columns c WHERE p_column_id IS NULL OR c.id = p_column_id ORDER BY c.id LOOP
    EXECUTE format(
      'WITH actual AS (%s), '
      || 'counted AS (SELECT v.bucket, sum(v.n) AS n FROM keyring.value_counts v WHERE v.column_id = $1 GROUP BY 1), '
      || 'fix AS (INSERT INTO keyring.value_counts (column_id, bucket, n) '
      || '  SELECT $1, coalesce(a.bucket, c.bucket), coalesce(a.n, 0) - coalesce(c.n, 0) '
      || '    FROM actual a FULL JOIN counted c ON c.bucket = a.bucket '
      || '   WHERE coalesce(a.n, 0) <> coalesce(c.n, 0) RETURNING 1) '
      || 'SELECT count(*) FROM fix', keyring.count_values_sql(k))
    INTO v_fixed USING k.id;
    v_total := v_total + v_fixed;
  END LOOP;
  IF NOT FOUND AND p_column_id IS NOT NULL THEN
    PERFORM keyring.column_for_counts(p_column_id);  -- raises: unknown id
  END IF;
  RETURN v_total;
END
$$;

-- Counters that differ from a real count of the table, per column and bucket (NULL: every
-- column). One statement per column, so a running writer cannot cause a false mismatch.
-- Empty when every counter is right; keyring.recount(column_id) repairs a column.
CREATE FUNCTION keyring.check_counts(p_column_id integer DEFAULT NULL)
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
      || ' WHERE coalesce(a.n, 0) <> coalesce(c.n, 0) ORDER BY 4', keyring.count_values_sql(k))
    USING k.id, k.table_schema || '.' || k.table_name, k.column_name;
  END LOOP;
END
$$;

-- Folds the deltas into one row per (column, bucket) and drops rows of columns that are no
-- longer protected; returns the number of delta rows folded (0: nothing to do, or another
-- session is compacting). One statement: the rows it deletes are exactly the rows it sums,
-- and rows inserted meanwhile by writers are not in its snapshot, so they stay as they are.
-- The sidecars call it from their heartbeat (one at a time: the advisory lock).
CREATE FUNCTION keyring.compact_value_counts() RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, keyring, pg_temp AS $$
DECLARE
  v_folded bigint;
BEGIN
  IF NOT pg_try_advisory_xact_lock(7263548196044562) THEN
    RETURN 0;
  END IF;
  -- Nothing to fold: do not churn the table (every compaction leaves dead rows).
  IF NOT EXISTS (SELECT 1 FROM keyring.value_counts v
                  GROUP BY v.column_id, v.bucket HAVING count(*) > 1 OR sum(v.n) = 0
                  UNION ALL
                 SELECT 1 FROM keyring.value_counts v
                  WHERE NOT EXISTS (SELECT 1 FROM keyring.columns c WHERE c.id = v.column_id)) THEN
    RETURN 0;
  END IF;
  WITH gone AS (DELETE FROM keyring.value_counts RETURNING column_id, bucket, n),
       kept AS (INSERT INTO keyring.value_counts (column_id, bucket, n)
                SELECT g.column_id, g.bucket, sum(g.n) FROM gone g
                 WHERE EXISTS (SELECT 1 FROM keyring.columns c WHERE c.id = g.column_id)
                 GROUP BY 1, 2 HAVING sum(g.n) <> 0)
  SELECT count(*) INTO v_folded FROM gone;
  RETURN v_folded;
END
$$;

-- ---------------------------------------------------------------------------------------
-- protect() / unprotect() keep the counters; plain_column changes regenerate them
-- ---------------------------------------------------------------------------------------

-- protect() converts the column under ACCESS EXCLUSIVE (protect_column), so the count
-- taken in the same transaction is exact.
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
  PERFORM keyring.recount(v_id);
  RETURN v_id;
END
$$;

-- The counting triggers name the column in a WHEN clause, and its type is about to change:
-- they go first, and come back for the table's other protected columns.
CREATE OR REPLACE FUNCTION keyring.unprotect(p_table text, p_column name, p_force boolean DEFAULT false) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
  v_rel regclass := p_table::regclass;
  v_id integer;
BEGIN
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

-- Setting or clearing columns.plain_column (the adoption of a populated column) regenerates
-- the table's counting triggers and recounts the column, in the same transaction.
CREATE FUNCTION keyring.tg_columns__plain_column() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, keyring, pg_temp AS $$
BEGIN
  PERFORM keyring.install_counters(format('%I.%I', NEW.table_schema, NEW.table_name)::regclass);
  PERFORM keyring.recount(NEW.id);
  RETURN NULL;
END
$$;
CREATE TRIGGER keyring_plain_column AFTER UPDATE OF plain_column ON keyring.columns
  FOR EACH ROW WHEN (OLD.plain_column IS DISTINCT FROM NEW.plain_column)
  EXECUTE FUNCTION keyring.tg_columns__plain_column();

-- ---------------------------------------------------------------------------------------
-- Status from the counters
-- ---------------------------------------------------------------------------------------

-- Same columns as before, in the same order, plus plaintext at the end (the return type
-- changes, so the view and the function are recreated). Reads value_counts (a few rows
-- per column once compacted), data_keys by primary key, the head of the column's queue
-- and the open quarantine entries by index; never a protected table.
--   values / key_version / data_key_id / data_keys: as before, from the counters; the
--     version of each data key is read now, so a rewrap moves the counts at once.
--   pending: entries of the column in keyring.pending, counted by index up to 100,000
--     (a larger backlog shows as 100000: count keyring.pending yourself for the exact
--     figure); placeholders are not counted (see the buckets above), so "values" counts
--     stored ciphertext (and bytes that are not an envelope, under key_version NULL).
--   oldest_pending_age: age of the head of the column's queue (lowest id, the entry
--     claimed first; a rewrite of a queued value refreshes enqueued_at but keeps the id).
--   plaintext: values still in columns.plain_column (0 when none is set).
DROP VIEW keyring.status;
DROP FUNCTION keyring.column_status();
CREATE FUNCTION keyring.column_status()
RETURNS TABLE (column_id integer, table_name text, column_name name, classification text,
               key_version integer, data_key_id bigint, data_keys bigint, "values" bigint,
               pending bigint, oldest_pending_age interval, quarantined bigint, plaintext bigint)
-- jit off: the correlated lookups make the estimated cost large enough for JIT, whose
-- compilation took 400 ms of a query that runs in 1 ms (measured on PostgreSQL 15).
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
         -- only for a column with queued values: the head lookup walks the queue in id
         -- order, and a column with nothing queued would walk all of it
         CASE WHEN ph.n > 0 THEN
           (SELECT clock_timestamp() - p.enqueued_at FROM keyring.pending p WHERE p.column_id = k.id ORDER BY p.id LIMIT 1)
         END,
         (SELECT count(*) FROM keyring.quarantine q WHERE q.column_id = k.id AND q.resolved_at IS NULL),
         coalesce((SELECT c.n FROM counts c WHERE c.column_id = k.id AND c.bucket = -2), 0)
    FROM keyring.columns k
    LEFT JOIN per_version v ON v.column_id = k.id
    CROSS JOIN LATERAL (SELECT count(*)::bigint AS n
                          FROM (SELECT 1 FROM keyring.pending p WHERE p.column_id = k.id LIMIT 100000) x) ph
   ORDER BY k.id, v.key_version NULLS FIRST
$$;

CREATE VIEW keyring.status AS SELECT * FROM keyring.column_status();

-- ---------------------------------------------------------------------------------------
-- Tables protected before this migration: counters from now on, counted once
-- ---------------------------------------------------------------------------------------

SELECT keyring.install_counters(format('%I.%I', t.table_schema, t.table_name)::regclass)
  FROM (SELECT DISTINCT table_schema, table_name FROM keyring.columns) t;
SELECT keyring.recount();

-- ---------------------------------------------------------------------------------------
-- Privileges
-- ---------------------------------------------------------------------------------------

REVOKE ALL ON keyring.value_counts FROM PUBLIC;
GRANT ALL ON keyring.value_counts TO keyring_admin;
REVOKE ALL ON FUNCTION keyring.value_bucket(bytea), keyring.bucket_label(bigint), keyring.drop_counters(regclass),
  keyring.install_counters(regclass), keyring.count_values_sql(keyring.columns), keyring.column_for_counts(integer),
  keyring.recount(integer), keyring.check_counts(integer), keyring.compact_value_counts(),
  keyring.tg_columns__plain_column(), keyring.column_status() FROM PUBLIC;
-- The generated counting functions run as their owner (the DBA who protected the table).
GRANT EXECUTE ON FUNCTION keyring.value_bucket(bytea), keyring.bucket_label(bigint), keyring.drop_counters(regclass),
  keyring.install_counters(regclass), keyring.count_values_sql(keyring.columns), keyring.column_for_counts(integer),
  keyring.recount(integer), keyring.check_counts(integer), keyring.compact_value_counts(),
  keyring.column_status() TO keyring_admin;
GRANT EXECUTE ON FUNCTION keyring.compact_value_counts() TO keyring_sidecar;
GRANT ALL ON keyring.status TO keyring_admin;
GRANT SELECT ON keyring.status TO keyring_auditor;
GRANT EXECUTE ON FUNCTION keyring.column_status() TO keyring_auditor;
