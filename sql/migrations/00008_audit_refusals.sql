-- keyring schema, version 8: refused privileged calls in the audit log.
--
--   keyring.audit_refusal(p_function, p_actor)   records 'privileged_call.refused' for the
--                                                 calling login, after its refused call
--
-- Postgres refuses a call to a DBA function (protect, retire_key, rotate, shred, ...) by
-- a role without EXECUTE before the function runs, and an audit row written in the
-- refused transaction rolls back with it. So the refused client records its own refusal
-- afterwards, in a new transaction: the CLI does this for every "permission denied for
-- function" (SELECT keyring.audit_refusal('retire_key')), and anyone can from psql.
-- The privileges themselves are unchanged: refusal stays Postgres's EXECUTE check, which
-- runs before any code and cannot be lost by a later CREATE OR REPLACE of a function.
-- Decisions and what this does not cover (a client that does not report): docs/audit.md,
-- "Refused privileged calls".

CREATE FUNCTION keyring.audit_refusal(p_function text, p_actor text DEFAULT NULL) RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, keyring, pg_temp AS $$
DECLARE
  -- 'retire_key', 'keyring.retire_key' and 'keyring.retire_key(keyring.key_purpose, integer)'
  -- (what a client may have at hand) all name keyring.retire_key.
  v_fn text := lower(regexp_replace(btrim(coalesce(p_function, '')), '^keyring\.|\(.*$', '', 'g'));
  v_actor text := nullif(btrim(p_actor), '');
  v_admin_fn boolean;
  v_may_call boolean;
  v_recent bigint;
BEGIN
  IF v_fn !~ '^[a-z_][a-z0-9_]{0,62}$' THEN
    RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
      MESSAGE = 'keyring: audit_refusal takes the name of the keyring function that was refused',
      HINT = 'For example: SELECT keyring.audit_refusal(''retire_key'') after "permission denied for function retire_key".';
  END IF;
  -- Only a refusal that really happens is recorded: the function is one the keyring
  -- administrator may call, and this login may not call it (any overload). The log is not
  -- a free-text channel for every role.
  SELECT bool_or(has_function_privilege('keyring_admin', p.oid, 'EXECUTE')),
         bool_or(has_function_privilege(session_user, p.oid, 'EXECUTE'))
    INTO v_admin_fn, v_may_call
    FROM pg_catalog.pg_proc p
   WHERE p.pronamespace = 'keyring'::regnamespace AND p.proname = v_fn AND p.prokind = 'f';
  IF NOT coalesce(v_admin_fn, false) THEN
    RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
      MESSAGE = format('keyring: %s is not a keyring administrator function', v_fn),
      HINT = 'Name the function of the refused call, e.g. retire_key, rotate, shred, protect.';
  END IF;
  IF v_may_call THEN
    RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
      MESSAGE = format('keyring: %s may call keyring.%s; there is no refusal to record', session_user, v_fn),
      HINT = 'A refusal inside the function (a state or dependency check) is its own error, not a privilege refusal.';
  END IF;
  IF v_actor IS NOT NULL AND (length(v_actor) > 200 OR v_actor ~ '[[:cntrl:]]') THEN
    RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
      MESSAGE = 'keyring: an actor name has at most 200 characters and no control characters';
  END IF;
  -- Every role may call this: bound what one login can add (and the time it holds the
  -- audit chain's lock, which the sidecars' batches take too) to 60 rows a minute.
  SELECT count(*) INTO v_recent FROM keyring.audit_log a
   WHERE a.action = 'privileged_call.refused' AND a.at > clock_timestamp() - interval '1 minute'
     AND a.db_role = session_user;
  IF v_recent >= 60 THEN
    RAISE WARNING USING
      MESSAGE = format('keyring: refusal of keyring.%s by %s not recorded: %s refusals by this login in the last minute already are',
                       v_fn, session_user, v_recent);
    RETURN NULL;
  END IF;
  RETURN keyring.audit_append('privileged_call.refused', p_actor => v_actor, p_reason => 'insufficient_privilege',
    p_detail => jsonb_build_object('function', 'keyring.' || v_fn, 'sqlstate', '42501',
                                   'application_name', nullif(current_setting('application_name', true), '')));
END
$$;

-- Every role: the function checks the caller itself (session_user, never an argument).
-- Roles without USAGE on schema keyring cannot reach it (nor any keyring function).
REVOKE ALL ON FUNCTION keyring.audit_refusal(text, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION keyring.audit_refusal(text, text) TO PUBLIC;
