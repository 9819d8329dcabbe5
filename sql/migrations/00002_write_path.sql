-- keyring schema, version 2: the SQL half of the write path.
--
--   keyring.protect() / unprotect()   register a column, convert it to ciphertext (bytea),
--                                     generate <table>_staging and its trigger functions
--   keyring.status                    values per key version, queue backlog, quarantine
--   keyring.register_key() / activate_key()   the root key registry as the sidecar and
--                                     `keyring init` use it
--   grants for the four keyring roles
--
-- docs/write-path.md records the decisions (placeholder, canonical text, row key, masks,
-- lock order). Every name is schema-qualified; functions pin their search_path with
-- pg_temp last, so that no temporary object can shadow a catalog table.

-- ---------------------------------------------------------------------------------------
-- Small helpers used by protect() and by the generated trigger functions
-- ---------------------------------------------------------------------------------------

-- The size limit for one canonical plaintext. A settings row is the only source (a custom
-- GUC would be cheaper, but any session could raise it); the staging triggers call this
-- only for values over keyring.min_max_value_bytes(), the floor the setting cannot go
-- below (CHECK on keyring.settings), so a short value costs no lookup.
CREATE FUNCTION keyring.min_max_value_bytes() RETURNS bigint
LANGUAGE sql IMMUTABLE AS $$ SELECT 4096::bigint $$;

CREATE FUNCTION keyring.max_value_bytes() RETURNS bigint
LANGUAGE sql STABLE AS $$
  SELECT value::bigint FROM keyring.settings WHERE name = 'max_value_bytes'
$$;

-- A name derived from a table or column name, kept within NAMEDATALEN - 1 = 63 bytes:
-- a base too long is cut and made unique again with 8 hex digits of its md5.
CREATE FUNCTION keyring.fit_name(p_base text, p_suffix text) RETURNS name
LANGUAGE plpgsql IMMUTABLE STRICT SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_cut text := p_base;
  v_tag text := '_' || left(md5(p_base), 8);
BEGIN
  IF octet_length(p_base || p_suffix) <= 63 THEN
    RETURN p_base || p_suffix;
  END IF;
  WHILE octet_length(v_cut || v_tag || p_suffix) > 63 LOOP
    v_cut := left(v_cut, -1);
  END LOOP;
  RETURN v_cut || v_tag || p_suffix;
END
$$;

-- The type a protected column has in the staging view. numeric(p,s) is shown as plain
-- numeric because its mask, -Infinity, does not fit a declared precision; the trigger
-- applies the column's typmod itself (rounding and overflow exactly as the base would).
CREATE FUNCTION keyring.staging_type(p_data_type text) RETURNS text
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
  SELECT CASE WHEN to_regtype(p_data_type) = 'numeric'::regtype THEN 'numeric' ELSE p_data_type END
$$;

-- SQL text of the mask a protected column reads as when it is not NULL (docs/write-path.md).
CREATE FUNCTION keyring.mask_sql(p_data_type text) RETURNS text
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_type regtype := to_regtype(p_data_type);
  v_len integer;
BEGIN
  CASE v_type
    WHEN 'text'::regtype THEN RETURN '''********''::text';
    WHEN 'character varying'::regtype THEN
      -- varchar(n) with n < 8 cannot hold eight stars: repeat('*', least(n, 8)).
      v_len := substring(p_data_type FROM '\((\d+)\)')::integer;
      RETURN format('%L::%s', repeat('*', least(coalesce(v_len, 8), 8)), p_data_type);
    WHEN 'jsonb'::regtype THEN RETURN '''"********"''::jsonb';
    WHEN 'bytea'::regtype THEN RETURN '''\x2a2a2a2a2a2a2a2a''::bytea';
    WHEN 'date'::regtype, 'timestamp without time zone'::regtype, 'timestamp with time zone'::regtype THEN
      RETURN format('''-infinity''::%s', p_data_type);
    WHEN 'numeric'::regtype THEN RETURN '''-Infinity''::numeric';
    WHEN 'bigint'::regtype THEN RETURN '''-9223372036854775808''::bigint';
  END CASE;
END
$$;

-- SQL text of the canonical bytes of a plaintext expression: the type's text output
-- under the trigger settings (UTC, ISO), UTF-8 encoded; raw bytes for bytea.
CREATE FUNCTION keyring.canonical_sql(p_ref text, p_data_type text) RETURNS text
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
  SELECT CASE
    WHEN to_regtype(p_data_type) = 'bytea'::regtype THEN p_ref
    WHEN to_regtype(p_data_type) = 'text'::regtype THEN format('convert_to(%s, ''UTF8'')', p_ref)
    -- the staging view shows numeric(p,s) as numeric: apply the declared precision here
    WHEN to_regtype(p_data_type) = 'numeric'::regtype
      THEN format('convert_to((%s)::%s::text, ''UTF8'')', p_ref, p_data_type)
    ELSE format('convert_to((%s)::text, ''UTF8'')', p_ref)
  END
$$;

-- SQL text of the canonical row key of a row reference (e.g. NEW, OLD, t): pk::text for a
-- one-column key, json_build_array(pk1::text, ...)::text for a composite one.
CREATE FUNCTION keyring.row_key_sql(p_pk_columns name[], p_ref text) RETURNS text
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
  SELECT CASE WHEN cardinality(p_pk_columns) = 1
    THEN format('(%s.%I)::text', p_ref, p_pk_columns[1])
    ELSE format('json_build_array(%s)::text',
      (SELECT string_agg(format('(%s.%I)::text', p_ref, c), ', ' ORDER BY o)
         FROM unnest(p_pk_columns) WITH ORDINALITY AS u (c, o)))
  END
$$;

-- SQL text matching a base row to a row reference on the primary key, with the equality
-- operator of the key's own btree opclass, schema-qualified: the generated functions run
-- with search_path = pg_catalog, so a plain "=" would miss an extension type's operator.
CREATE FUNCTION keyring.pk_match_sql(p_rel regclass, p_left text, p_right text) RETURNS text
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
  SELECT string_agg(format('%s.%I OPERATOR(%I.%s) %s.%I', p_left, a.attname, n.nspname, o.oprname,
                           p_right, a.attname), ' AND ' ORDER BY k.ord)
    FROM pg_index i
   CROSS JOIN LATERAL unnest(i.indkey::int2[], i.indclass::oid[]) WITH ORDINALITY AS k (attnum, opclass, ord)
    JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
    JOIN pg_opclass oc ON oc.oid = k.opclass
    JOIN pg_amop ao ON ao.amopfamily = oc.opcfamily AND ao.amopstrategy = 3   -- btree "equal"
                   AND ao.amoplefttype = oc.opcintype AND ao.amoprighttype = oc.opcintype
    JOIN pg_operator o ON o.oid = ao.amopopr
    JOIN pg_namespace n ON n.oid = o.oprnamespace
   WHERE i.indrelid = p_rel AND i.indisprimary
$$;

-- ---------------------------------------------------------------------------------------
-- Guard on protected base tables
-- ---------------------------------------------------------------------------------------

-- Refuses a direct write of a protected or blind-index column (case C05 step 3). Two
-- writers may: the sidecar (members of keyring_sidecar) and the staging trigger
-- functions, which are SECURITY DEFINER and so run as their owner. TG_ARGV[0] names the
-- table's update trigger function, TG_ARGV[1] the staging view (for the hint).
-- SECURITY INVOKER on purpose: current_user must be the writer, not this function's owner.
CREATE FUNCTION keyring.tg_guard__protected() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, keyring, pg_temp AS $$
BEGIN
  IF pg_has_role(current_user, 'keyring_sidecar', 'MEMBER') THEN
    RETURN NEW;
  END IF;
  IF EXISTS (SELECT 1 FROM pg_proc p JOIN pg_roles r ON r.oid = p.proowner
              WHERE p.oid = to_regprocedure(TG_ARGV[0]) AND r.rolname = current_user) THEN
    RETURN NEW;
  END IF;
  RAISE EXCEPTION USING
    ERRCODE = 'insufficient_privilege',
    MESSAGE = format('keyring: %s may not write the protected columns of %I.%I directly',
                     current_user, TG_TABLE_SCHEMA, TG_TABLE_NAME),
    HINT = format('Write plaintext through %s; only the staging triggers and the sidecar write ciphertext and blind-index terms.',
                  TG_ARGV[1]);
END
$$;

-- Wakes the sidecar once per INSERT, UPDATE or COPY statement on a staging view (a
-- statement trigger: a 100k-row COPY sends one notification, not 100k). The payload is a
-- fixed hint, never a value; the queue is the truth, and an UPDATE that queued nothing
-- costs the sidecar one empty claim.
CREATE FUNCTION keyring.tg_notify__pending() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  PERFORM pg_notify('keyring', '{"kind":"pending"}');
  RETURN NULL;
END
$$;

-- ---------------------------------------------------------------------------------------
-- Staging view and trigger functions, generated per table
-- ---------------------------------------------------------------------------------------

-- Drops the staging view of a table (before a column type changes under it) and returns
-- its ACL, so that grants made on the view survive regeneration.
CREATE FUNCTION keyring.drop_staging(p_rel regclass) RETURNS aclitem[]
LANGUAGE plpgsql SET search_path = pg_catalog, keyring, pg_temp AS $$
DECLARE
  v_view oid;
  v_acl aclitem[];
  v_trigger name;
BEGIN
  SELECT v.oid, v.relacl INTO v_view, v_acl
    FROM pg_class t JOIN pg_namespace n ON n.oid = t.relnamespace
    JOIN keyring.columns k ON k.table_schema = n.nspname AND k.table_name = t.relname
    JOIN pg_class v ON v.relnamespace = t.relnamespace AND v.relname = k.staging_view AND v.relkind = 'v'
   WHERE t.oid = p_rel
   LIMIT 1;
  IF v_view IS NOT NULL THEN
    EXECUTE format('DROP VIEW %s', v_view::regclass);
  END IF;
  -- The guard trigger names protected columns (UPDATE OF, WHEN): drop it before any of
  -- those columns changes; generate_staging() creates it again.
  FOR v_trigger IN SELECT tgname FROM pg_trigger
                    WHERE tgrelid = p_rel AND tgname = 'keyring_guard_update' LOOP
    EXECUTE format('DROP TRIGGER %I ON %s', v_trigger, p_rel);
  END LOOP;
  RETURN v_acl;
END
$$;

-- (Re)creates <table>_staging, its triggers and their functions, and the guard trigger
-- on the base table, for every protected column of the table. Static SQL per table, built
-- here once: the trigger functions run for every inserted or copied row, so they hold no
-- dynamic EXECUTE and no catalog lookup.
CREATE FUNCTION keyring.generate_staging(p_rel regclass, p_acl aclitem[]) RETURNS void
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
           k.id, k.data_type, k.column_default, k.subject_column, k.tenant_column, k.bidx_column
      FROM pg_attribute a
      LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
      LEFT JOIN keyring.columns k
        ON k.table_schema = v_schema AND k.table_name = v_table AND k.column_name = a.attname
     WHERE a.attrelid = p_rel AND a.attnum > 0 AND NOT a.attisdropped
       AND a.attname NOT IN (SELECT b.bidx_column FROM keyring.columns b
                              WHERE b.table_schema = v_schema AND b.table_name = v_table
                                AND b.bidx_column IS NOT NULL)
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

    v_select := v_select || format('CASE WHEN t.%1$I IS NULL THEN NULL::%2$s ELSE %3$s END AS %1$I',
                                   c.attname, v_vtype, v_mask);
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
    v_upd_ret := v_upd_ret || format('CASE WHEN t.%I IS NULL THEN NULL::%s ELSE %s END', c.attname, v_vtype, v_mask);
    v_upd_into := v_upd_into || format('NEW.%I', c.attname);

    v_guard_cols := v_guard_cols || format('%I', c.attname);
    v_guard_upd := v_guard_upd || format('OLD.%1$I IS DISTINCT FROM NEW.%1$I', c.attname);
    IF c.bidx_column IS NOT NULL THEN
      v_guard_cols := v_guard_cols || format('%I', c.bidx_column);
      v_guard_upd := v_guard_upd || format('OLD.%1$I IS DISTINCT FROM NEW.%1$I', c.bidx_column);
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
  EXECUTE format('GRANT SELECT ON %s TO keyring_writer', v_qtable);
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

-- ---------------------------------------------------------------------------------------
-- protect() / unprotect()
-- ---------------------------------------------------------------------------------------

-- The work of protect(), on a resolved table. Runs with the canonical settings, so that
-- the values already in the column are queued in the same canonical form the triggers use,
-- and with search_path = pg_catalog, so that saved default expressions come out qualified.
CREATE FUNCTION keyring.protect_column(
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
  -- No write may slip in between queuing the current values and converting the column.
  EXECUTE format('LOCK TABLE ONLY %s IN ACCESS EXCLUSIVE MODE', v_qtable);

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

  SELECT a.attnum, a.atttypid, a.attidentity, a.attgenerated, format_type(a.atttypid, a.atttypmod) AS typ
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

  -- Queue every value already stored, in canonical form, then refuse the lot if any is
  -- over the limit (the sidecar would refuse it; better to say so now).
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

  PERFORM keyring.generate_staging(p_rel, v_acl);

  -- The sidecar reads rows by primary key and writes ciphertext and terms, nothing else.
  -- USAGE on the table's schema lets both roles reach it (public has it for PUBLIC);
  -- unprotect() leaves it, other protected tables may live there.
  EXECUTE format('GRANT USAGE ON SCHEMA %I TO keyring_sidecar, keyring_writer', v_schema);
  EXECUTE format('GRANT SELECT ON %s TO keyring_sidecar', v_qtable);
  EXECUTE format('GRANT UPDATE (%I%s) ON %s TO keyring_sidecar', p_column,
                 CASE WHEN p_blind_index THEN format(', %I', v_bidx) ELSE '' END, v_qtable);

  PERFORM keyring.audit_append('column.protected', p_column_id => v_id, p_detail => jsonb_build_object(
    'table', v_label, 'column', p_column, 'data_type', v_type, 'blind_index', v_bidx,
    'normalize', p_normalize, 'index_bytes', p_index_bytes, 'classification', p_classification,
    'subject_column', p_subject_column, 'tenant_column', p_tenant_column, 'queued', v_queued));
  RETURN v_id;
END
$$;

-- protect('public.customers', 'national_id', ...): the DBA's entry point. The table is
-- resolved here, in the caller's search_path, like any table name in SQL.
CREATE FUNCTION keyring.protect(
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
BEGIN
  RETURN keyring.protect_column(p_table::regclass, p_column, p_blind_index, p_normalize, p_index_bytes,
                                p_classification, p_priority, p_subject_column, p_tenant_column);
END
$$;

-- The work of unprotect(): the column goes back to its plaintext type, empty.
CREATE FUNCTION keyring.unprotect_column(p_rel regclass, p_column name, p_force boolean) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, keyring, pg_temp AS $$
DECLARE
  v_schema name;
  v_table name;
  v_qtable text;
  v_label text;
  k keyring.columns;
  v_values bigint;
  v_pending bigint;
  v_acl aclitem[];
  v_remaining integer;
  v_seq text;
BEGIN
  SELECT n.nspname, t.relname INTO v_schema, v_table
    FROM pg_class t JOIN pg_namespace n ON n.oid = t.relnamespace WHERE t.oid = p_rel;
  v_qtable := format('%I.%I', v_schema, v_table);
  v_label := v_schema || '.' || v_table;
  EXECUTE format('LOCK TABLE ONLY %s IN ACCESS EXCLUSIVE MODE', v_qtable);
  SELECT * INTO k FROM keyring.columns c
   WHERE c.table_schema = v_schema AND c.table_name = v_table AND c.column_name = p_column
     FOR UPDATE;
  IF NOT FOUND THEN
    RAISE EXCEPTION USING ERRCODE = 'undefined_object',
      MESSAGE = format('keyring: %s.%s is not protected', v_label, p_column),
      HINT = 'SELECT * FROM keyring.status lists the protected columns.';
  END IF;

  EXECUTE format('SELECT count(*) FROM ONLY %s WHERE %I IS NOT NULL', v_qtable, p_column) INTO v_values;
  SELECT count(*) INTO v_pending FROM keyring.pending WHERE column_id = k.id;
  IF (v_values > 0 OR v_pending > 0) AND NOT coalesce(p_force, false) THEN
    RAISE EXCEPTION USING ERRCODE = 'object_not_in_prerequisite_state',
      MESSAGE = format('keyring: %s.%s still holds %s encrypted or queued values; unprotect() would lose them',
                       v_label, p_column, greatest(v_values, v_pending)),
      HINT = 'Set them to NULL through the staging view first, or call unprotect(..., p_force => true) to discard them.';
  END IF;

  v_acl := keyring.drop_staging(p_rel);
  IF k.bidx_column IS NOT NULL THEN
    EXECUTE format('ALTER TABLE %s DROP COLUMN %I', v_qtable, k.bidx_column);
  END IF;
  IF v_values > 0 THEN
    -- forced: the ciphertexts cannot become plaintext here, so the values become NULL
    EXECUTE format('ALTER TABLE %s ALTER COLUMN %I DROP NOT NULL', v_qtable, p_column);
  END IF;
  EXECUTE format('ALTER TABLE %1$s ALTER COLUMN %2$I TYPE %3$s USING NULL::%3$s', v_qtable, p_column, k.data_type);
  IF k.column_default IS NOT NULL THEN
    EXECUTE format('ALTER TABLE %s ALTER COLUMN %I SET DEFAULT %s', v_qtable, p_column, k.column_default);
  END IF;
  EXECUTE format('REVOKE UPDATE (%I) ON %s FROM keyring_sidecar', p_column, v_qtable);

  -- Data keys stay (no foreign key): backups taken while the column was protected still
  -- need them. Queue and quarantine entries go with the registry row.
  DELETE FROM keyring.pending WHERE column_id = k.id;
  DELETE FROM keyring.columns WHERE id = k.id;

  SELECT count(*) INTO v_remaining FROM keyring.columns c
   WHERE c.table_schema = v_schema AND c.table_name = v_table;
  IF v_remaining > 0 THEN
    PERFORM keyring.generate_staging(p_rel, v_acl);
  ELSE
    EXECUTE format('DROP FUNCTION IF EXISTS keyring.%I(), keyring.%I(), keyring.%I()',
                   k.trigger_prefix || '__insert', k.trigger_prefix || '__update', k.trigger_prefix || '__delete');
    EXECUTE format('REVOKE SELECT ON %s FROM keyring_sidecar, keyring_writer', v_qtable);
    FOR v_seq IN SELECT DISTINCT pg_get_serial_sequence(v_qtable, a.attname)
                   FROM pg_attribute a
                  WHERE a.attrelid = p_rel AND a.attnum > 0 AND NOT a.attisdropped
                    AND pg_get_serial_sequence(v_qtable, a.attname) IS NOT NULL LOOP
      EXECUTE format('REVOKE USAGE ON SEQUENCE %s FROM keyring_writer', v_seq);
    END LOOP;
  END IF;

  PERFORM keyring.audit_append('column.unprotected', p_column_id => k.id, p_detail => jsonb_build_object(
    'table', v_label, 'column', p_column, 'forced', coalesce(p_force, false),
    'values_discarded', v_values, 'queued_discarded', v_pending));
END
$$;

CREATE FUNCTION keyring.unprotect(p_table text, p_column name, p_force boolean DEFAULT false) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
  PERFORM keyring.unprotect_column(p_table::regclass, p_column, p_force);
END
$$;

-- ---------------------------------------------------------------------------------------
-- Status
-- ---------------------------------------------------------------------------------------

-- One row per (protected column, encrypt root version of the data keys in use). Values
-- still queued (the placeholder) or whose data key is unknown count under key_version
-- NULL; a column with no value at all still gets one row. data_key_id is the data key
-- when the group uses exactly one (per-column keys), NULL when it spans several
-- (per-subject keys; data_keys says how many). pending, oldest_pending_age and
-- quarantined are per column, repeated on each of its rows.
-- Counts scan the tables: fine for now, a later version keeps counters.
CREATE FUNCTION keyring.column_status()
RETURNS TABLE (column_id integer, table_name text, column_name name, classification text,
               key_version integer, data_key_id bigint, data_keys bigint, "values" bigint,
               pending bigint, oldest_pending_age interval, quarantined bigint)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, keyring, pg_temp AS $$
DECLARE
  k keyring.columns;
  r record;
  v_rows integer;
BEGIN
  FOR k IN SELECT * FROM keyring.columns ORDER BY id LOOP
    column_id := k.id;
    table_name := k.table_schema || '.' || k.table_name;
    column_name := k.column_name;
    classification := k.classification;
    SELECT count(*), clock_timestamp() - min(p.enqueued_at) INTO pending, oldest_pending_age
      FROM keyring.pending p WHERE p.column_id = k.id;
    SELECT count(*) INTO quarantined
      FROM keyring.quarantine q WHERE q.column_id = k.id AND q.resolved_at IS NULL;
    v_rows := 0;
    FOR r IN EXECUTE format(
      'SELECT dk.root_version AS key_version, '
      || 'CASE WHEN count(g.dk) = 1 THEN min(g.dk) END AS data_key_id, count(g.dk) AS data_keys, sum(g.n)::bigint AS n '
      || 'FROM (SELECT keyring.data_key_id(t.%1$I) AS dk, count(*) AS n FROM ONLY %2$I.%3$I t '
      || 'WHERE t.%1$I IS NOT NULL GROUP BY 1) g '
      || 'LEFT JOIN keyring.data_keys dk ON dk.id = g.dk GROUP BY dk.root_version ORDER BY 1 NULLS FIRST',
      k.column_name, k.table_schema, k.table_name)
    LOOP
      key_version := r.key_version;
      data_key_id := r.data_key_id;
      data_keys := r.data_keys;
      "values" := r.n;
      v_rows := v_rows + 1;
      RETURN NEXT;
    END LOOP;
    IF v_rows = 0 THEN
      key_version := NULL; data_key_id := NULL; data_keys := 0; "values" := 0;
      RETURN NEXT;
    END IF;
  END LOOP;
END
$$;

CREATE VIEW keyring.status AS SELECT * FROM keyring.column_status();

-- ---------------------------------------------------------------------------------------
-- Root key registry: registration and activation
-- ---------------------------------------------------------------------------------------

-- Registers a root key version by its fingerprint, or finds it. Idempotent: every sidecar
-- holding the same material gets the same version. Never takes key material.
CREATE FUNCTION keyring.register_key(p_purpose keyring.key_purpose, p_fingerprint text) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, keyring, pg_temp AS $$
DECLARE
  v_version integer;
BEGIN
  IF p_purpose IS NULL OR p_fingerprint IS NULL OR p_fingerprint !~ '^[0-9a-f]{32}$' THEN
    -- The input is not echoed: a caller who passes key material by mistake must not see
    -- it in a log.
    RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
      MESSAGE = 'keyring: a key fingerprint is 32 lowercase hex digits (and the purpose is encrypt or index)',
      HINT = 'Pass the key check value the sidecar or `keyring keygen` prints, never the key itself.';
  END IF;
  -- One registration at a time: two sidecars starting with the same new key get one version.
  LOCK TABLE keyring.root_keys IN SHARE ROW EXCLUSIVE MODE;
  SELECT k.version INTO v_version FROM keyring.root_keys k
   WHERE k.purpose = p_purpose AND k.fingerprint = p_fingerprint;
  IF FOUND THEN
    RETURN v_version;
  END IF;
  SELECT coalesce(max(k.version), 0) + 1 INTO v_version FROM keyring.root_keys k WHERE k.purpose = p_purpose;
  INSERT INTO keyring.root_keys (purpose, version, fingerprint, state)
  VALUES (p_purpose, v_version, p_fingerprint, 'pending');
  PERFORM keyring.audit_append('key.registered', p_key_purpose => p_purpose, p_key_version => v_version);
  RETURN v_version;
END
$$;

-- Makes a version the one new writes use; the previous active version keeps decrypting.
-- Refused unless a live sidecar holds the version (else every write would stall), except
-- at bootstrap, when no version of the purpose was ever active and no data depends on it.
CREATE FUNCTION keyring.activate_key(p_purpose keyring.key_purpose, p_version integer) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, keyring, pg_temp AS $$
DECLARE
  k keyring.root_keys;
  v_previous integer;
  v_fresh interval := make_interval(secs => keyring.setting('heartbeat_fresh_seconds')::double precision);
BEGIN
  LOCK TABLE keyring.root_keys IN SHARE ROW EXCLUSIVE MODE;
  SELECT * INTO k FROM keyring.root_keys r WHERE r.purpose = p_purpose AND r.version = p_version;
  IF NOT FOUND THEN
    RAISE EXCEPTION USING ERRCODE = 'undefined_object',
      MESSAGE = format('keyring: %s key version %s is not registered', p_purpose, p_version),
      HINT = 'Start a sidecar with the new key material (it registers the version), or run keyring init.';
  END IF;
  IF k.state = 'active' THEN
    RETURN;  -- already the active version: nothing to do, nothing to audit
  END IF;
  IF k.state NOT IN ('pending', 'decrypt_only') THEN
    RAISE EXCEPTION USING ERRCODE = 'object_not_in_prerequisite_state',
      MESSAGE = format('keyring: %s key version %s is %s; only a pending or decrypt_only version can be activated',
                       p_purpose, p_version, k.state),
      HINT = 'Register new key material instead (keyring keygen, then restart the sidecars).';
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
  PERFORM keyring.audit_append('key.activated', p_key_purpose => p_purpose, p_key_version => p_version,
                               p_detail => jsonb_build_object('previous_version', v_previous));
  PERFORM pg_notify('keyring', '{"kind":"keys"}');
END
$$;

-- ---------------------------------------------------------------------------------------
-- Privileges
-- ---------------------------------------------------------------------------------------
-- keyring_writer  (application roles): the staging views and SELECT on protected tables,
--                  both granted by protect(); nothing in schema keyring but USAGE.
-- keyring_sidecar: the queue, the registries, data keys, its own heartbeat, quarantine;
--                  protect() grants it SELECT and UPDATE (protected columns) per table.
-- keyring_auditor: the audit log and the status view.
-- keyring_admin:   everything in schema keyring (the audit log only through audit_append).

GRANT USAGE ON SCHEMA keyring TO keyring_admin, keyring_sidecar, keyring_writer, keyring_auditor;
REVOKE CREATE ON SCHEMA keyring FROM PUBLIC;
GRANT CREATE ON SCHEMA keyring TO keyring_admin;     -- protect() creates trigger functions here
REVOKE ALL ON ALL TABLES IN SCHEMA keyring FROM PUBLIC;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA keyring FROM PUBLIC;
REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA keyring FROM PUBLIC;
-- Functions this role creates here later (next migrations) start without PUBLIC EXECUTE too.
ALTER DEFAULT PRIVILEGES IN SCHEMA keyring REVOKE EXECUTE ON FUNCTIONS FROM PUBLIC;

-- Reading a ciphertext header is harmless and useful to everyone ("which key protects this?").
GRANT EXECUTE ON FUNCTION keyring.data_key_id(bytea) TO PUBLIC;

GRANT ALL ON ALL TABLES IN SCHEMA keyring TO keyring_admin;
GRANT ALL ON ALL SEQUENCES IN SCHEMA keyring TO keyring_admin;
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA keyring TO keyring_admin;
REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON keyring.audit_log FROM keyring_admin;

GRANT SELECT, UPDATE, DELETE ON keyring.pending TO keyring_sidecar;
GRANT SELECT ON keyring.columns, keyring.settings, keyring.root_keys, keyring.migrations TO keyring_sidecar;
GRANT SELECT, INSERT, UPDATE ON keyring.data_keys TO keyring_sidecar;
GRANT USAGE ON SEQUENCE keyring.data_keys_id_seq TO keyring_sidecar;
-- SELECT on sidecars and quarantine: an UPDATE ... WHERE or ON CONFLICT reads the row.
GRANT SELECT, INSERT, UPDATE ON keyring.sidecars TO keyring_sidecar;
GRANT SELECT, INSERT ON keyring.quarantine TO keyring_sidecar;
GRANT USAGE ON SEQUENCE keyring.quarantine_id_seq TO keyring_sidecar;
GRANT EXECUTE ON FUNCTION keyring.audit_append(text, text, keyring.key_purpose, integer, integer, text, text, jsonb),
                          keyring.register_key(keyring.key_purpose, text),
                          keyring.setting(text), keyring.max_value_bytes(), keyring.min_max_value_bytes(),
                          keyring.notify()
   TO keyring_sidecar;

GRANT SELECT ON keyring.audit_log, keyring.status TO keyring_auditor;
GRANT EXECUTE ON FUNCTION keyring.column_status(), keyring.verify_audit_chain(),
                          keyring.audit_row_hash(keyring.audit_log)
   TO keyring_auditor;
