-- outbox_0006: close the holes a producer or an operator could fall through. Frozen:
-- this is what the revision ran; the current state of the schema is sql/schema.sql.
--
-- - An idempotency key stores its own expiry, fixed by its first use: no later
--   enqueue (whatever its dedup_window) can shorten, reset or take over a key still
--   in force. dedup_window must be between 1 second and 30 days.
-- - The 256 KiB vars limit measures a compressed datum's real size; vars nested
--   deeper than 32 levels are refused; send_at must be finite and at most 365 days
--   ahead.
-- - The functions belong to a NOLOGIN role outbox_owner with exactly the table
--   privileges they use; retry_dead and purge_dead run as it (SECURITY DEFINER).
-- - New roles outbox_operator (dead letters, history, redrive, purge, prune; taken
--   from outbox_dispatcher) and outbox_recipient_writer (recipients, push
--   subscriptions).
--
-- The role that runs it needs CREATEROLE (it creates the roles and makes itself a
-- member of outbox_owner to hand the functions over), or a superuser, or a DBA who
-- created the roles beforehand and granted outbox_owner to it.

DO $roles$
DECLARE
    role_name text;
BEGIN
    -- Roles belong to the cluster: two databases migrated at the same time may race
    -- to create them, and the loser waits for the winner, then finds them there.
    FOREACH role_name IN ARRAY ARRAY['outbox_owner', 'outbox_operator', 'outbox_recipient_writer']
    LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = role_name) THEN
            BEGIN
                EXECUTE format('CREATE ROLE %I NOLOGIN', role_name);
            EXCEPTION WHEN duplicate_object OR unique_violation THEN
                NULL;
            END;
        END IF;
    END LOOP;
    -- ALTER ... OWNER TO needs a non-superuser to be able to SET ROLE to the new
    -- owner: a member of it (from PostgreSQL 16, one with the SET option, which the
    -- automatic grant to a role's creator lacks).
    IF NOT (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)
       AND NOT pg_has_role(current_user, 'outbox_owner',
                           CASE WHEN current_setting('server_version_num')::int >= 160000
                                THEN 'SET' ELSE 'MEMBER' END) THEN
        BEGIN
            EXECUTE format('GRANT outbox_owner TO %I', current_user);
        EXCEPTION WHEN insufficient_privilege THEN
            -- PostgreSQL 16+: only a role's admin may grant it, and outbox_owner was
            -- created by another role (another database's migration, a superuser)
            RAISE EXCEPTION 'outbox: the migrating role % must be a member of outbox_owner, which another role created', current_user
                USING ERRCODE = '42501',
                      HINT = format('As a superuser run: GRANT outbox_owner TO %I', current_user);
        END;
    END IF;
END
$roles$;

-- Each key's window is its own. Keys written before this revision had the default.
ALTER TABLE outbox.idempotency_key ADD COLUMN expires_at timestamptz;
UPDATE outbox.idempotency_key SET expires_at = created_at + interval '24 hours';
ALTER TABLE outbox.idempotency_key ALTER COLUMN expires_at SET NOT NULL;
DROP INDEX outbox.idempotency_key_created_idx;
CREATE INDEX idempotency_key_expires_idx ON outbox.idempotency_key (expires_at);

CREATE OR REPLACE FUNCTION outbox.enqueue(
    channel text,
    template text,
    user_id text,
    vars jsonb,
    lane text DEFAULT 'transactional',
    idempotency_key text DEFAULT NULL,
    send_at timestamptz DEFAULT NULL,
    priority smallint DEFAULT NULL,
    fallback text[] DEFAULT NULL,
    dedup_window interval DEFAULT '24 hours'
) RETURNS bigint
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
-- One function, no nested calls: this runs inside every producer transaction.
DECLARE
    v_id       bigint;
    v_existing bigint;
    v_priority smallint;
    v_sleeper  text;
    v_window   interval := coalesce(enqueue.dedup_window, interval '24 hours');
    v_size     integer;
BEGIN
    IF enqueue.lane IS NULL OR enqueue.lane NOT IN ('transactional', 'campaign') THEN
        RAISE EXCEPTION 'outbox: unknown lane %; expected transactional or campaign',
            enqueue.lane USING ERRCODE = '22023';
    END IF;
    IF enqueue.channel IS NULL OR enqueue.channel NOT IN ('email', 'telegram', 'push') THEN
        RAISE EXCEPTION 'outbox: unknown channel %; expected email, telegram or push',
            enqueue.channel USING ERRCODE = '22023';
    END IF;
    IF enqueue.user_id IS NULL OR enqueue.user_id = '' THEN
        RAISE EXCEPTION 'outbox: user_id must be a non-empty string' USING ERRCODE = '22023';
    END IF;
    IF length(enqueue.user_id) > 255 THEN
        RAISE EXCEPTION 'outbox: user_id is longer than 255 characters'
            USING ERRCODE = '23514';
    END IF;
    IF enqueue.template IS NULL OR enqueue.template !~ '^[a-z0-9_]{1,100}$' THEN
        RAISE EXCEPTION 'outbox: template name % must be 1-100 characters of a-z, 0-9 and _',
            enqueue.template USING ERRCODE = '23514';
    END IF;
    IF enqueue.vars IS NOT NULL AND jsonb_typeof(enqueue.vars) <> 'object' THEN
        RAISE EXCEPTION 'outbox: vars must be a JSON object' USING ERRCODE = '23514';
    END IF;
    -- The Python API's limits (256 KiB, 32 levels), for producers that call SQL
    -- directly. pg_column_size is the real size only of an uncompressed datum: a
    -- compressed one (vars built in a table of the caller's) is measured as text.
    -- Small vars are never compressed, so the common enqueue pays one cheap call.
    IF pg_column_compression(enqueue.vars) IS NULL THEN
        v_size := pg_column_size(enqueue.vars);
    ELSE
        v_size := octet_length(enqueue.vars::text);
    END IF;
    IF v_size > 262144 THEN
        RAISE EXCEPTION 'outbox: vars are % bytes; the limit is 262144', v_size
            USING ERRCODE = '54000';
    END IF;
    -- Nesting: the top-level object is level 1. A jsonb under 256 bytes cannot hold
    -- 33 levels (each adds at least 8 bytes), so only larger vars are walked, and
    -- the walk never goes below level 33 however deep the document is.
    IF v_size >= 256 AND jsonb_path_exists(enqueue.vars,
           'strict $.**{32} ? (@.type() == "object" || @.type() == "array")') THEN
        RAISE EXCEPTION 'outbox: vars are nested more than 32 levels deep; the limit is 32'
            USING ERRCODE = '54000';
    END IF;
    IF enqueue.send_at IS NOT NULL
       AND (NOT isfinite(enqueue.send_at) OR enqueue.send_at > now() + interval '365 days')
    THEN
        RAISE EXCEPTION 'outbox: send_at % must be a finite time at most 365 days ahead',
            enqueue.send_at USING ERRCODE = '22023';
    END IF;
    -- The window is the caller's choice only for a key's first use (see below).
    IF v_window < interval '1 second' OR v_window > interval '30 days' THEN
        RAISE EXCEPTION 'outbox: dedup_window % must be between 1 second and 30 days',
            v_window USING ERRCODE = '22023';
    END IF;
    v_priority := coalesce(enqueue.priority,
                           CASE enqueue.lane WHEN 'transactional' THEN 0 ELSE 100 END);
    IF (enqueue.lane = 'transactional' AND v_priority NOT BETWEEN 0 AND 99)
       OR (enqueue.lane = 'campaign' AND v_priority NOT BETWEEN 100 AND 199) THEN
        RAISE EXCEPTION 'outbox: priority % is outside the % lane', v_priority, enqueue.lane
            USING ERRCODE = '23514';
    END IF;
    IF enqueue.fallback IS NOT NULL
       AND NOT enqueue.fallback <@ ARRAY['email', 'telegram', 'push']::text[] THEN
        RAISE EXCEPTION 'outbox: fallback % names an unknown channel', enqueue.fallback
            USING ERRCODE = '23514';
    END IF;

    IF enqueue.idempotency_key IS NOT NULL THEN
        SELECT k.message_id INTO v_existing
          FROM outbox.idempotency_key k
         WHERE k.key = enqueue.idempotency_key
           AND k.expires_at > now();
        IF FOUND THEN
            RETURN v_existing;
        END IF;
    END IF;

    INSERT INTO outbox.message (lane, priority, channel, user_id, template, vars,
                                fallback, next_attempt_at, idempotency_key)
    VALUES (enqueue.lane, v_priority, enqueue.channel, enqueue.user_id, enqueue.template,
            coalesce(enqueue.vars, '{}'::jsonb), enqueue.fallback,
            greatest(coalesce(enqueue.send_at, now()), now()), enqueue.idempotency_key)
    RETURNING id INTO v_id;

    IF enqueue.idempotency_key IS NOT NULL THEN
        -- A concurrent transaction may have taken the key since the look-up above;
        -- the unique index makes us wait for it, and then the first one wins. A key
        -- is taken over only once its own window has passed: the caller's window
        -- counts for a new key, never against one that is still in force.
        INSERT INTO outbox.idempotency_key AS k (key, message_id, expires_at)
        VALUES (enqueue.idempotency_key, v_id, now() + v_window)
        ON CONFLICT (key) DO UPDATE
            SET message_id = excluded.message_id, created_at = now(),
                expires_at = excluded.expires_at
            WHERE k.expires_at <= now()
        RETURNING k.message_id INTO v_existing;
        IF v_existing IS NULL THEN
            DELETE FROM outbox.message m WHERE m.id = v_id;
            SELECT k.message_id INTO v_existing
              FROM outbox.idempotency_key k WHERE k.key = enqueue.idempotency_key;
            RETURN v_existing;
        END IF;
    END IF;

    -- Wake one sleeping dispatcher, the one that registered or renewed last (a
    -- dispatcher that died asleep stops renewing and sinks): the payload names it,
    -- the others go back to sleep without running a claim. Bulk writes
    -- (outbox._wake_dispatchers) wake them all with an empty payload.
    IF enqueue.send_at IS NULL OR enqueue.send_at <= now() THEN
        SELECT s.dispatcher_id INTO v_sleeper
          FROM outbox.sleeper s ORDER BY s.since DESC LIMIT 1;
        IF FOUND THEN
            PERFORM pg_notify('outbox_wakeup', v_sleeper);
        END IF;
    END IF;
    RETURN v_id;
END
$$;

CREATE OR REPLACE FUNCTION outbox.enqueue_many(
    channel text,
    template text,
    user_ids text[],
    vars_list jsonb[],
    lane text DEFAULT 'campaign',
    send_at timestamptz DEFAULT NULL,
    priority smallint DEFAULT NULL
) RETURNS integer
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_count    integer;
    v_priority smallint;
BEGIN
    IF lane IS NULL OR lane NOT IN ('transactional', 'campaign') THEN
        RAISE EXCEPTION 'outbox: unknown lane %; expected transactional or campaign', lane
            USING ERRCODE = '22023';
    END IF;
    IF channel IS NULL OR channel NOT IN ('email', 'telegram', 'push') THEN
        RAISE EXCEPTION 'outbox: unknown channel %; expected email, telegram or push', channel
            USING ERRCODE = '22023';
    END IF;
    IF cardinality(vars_list) NOT IN (1, cardinality(user_ids)) THEN
        RAISE EXCEPTION 'outbox: vars_list must hold 1 or % objects, not %',
            cardinality(user_ids), cardinality(vars_list) USING ERRCODE = '22023';
    END IF;
    IF template IS NULL OR template !~ '^[a-z0-9_]{1,100}$' THEN
        RAISE EXCEPTION 'outbox: template name % must be 1-100 characters of a-z, 0-9 and _',
            template USING ERRCODE = '23514';
    END IF;
    v_priority := coalesce(enqueue_many.priority,
                           CASE enqueue_many.lane WHEN 'transactional' THEN 0 ELSE 100 END);
    IF (lane = 'transactional' AND v_priority NOT BETWEEN 0 AND 99)
       OR (lane = 'campaign' AND v_priority NOT BETWEEN 100 AND 199) THEN
        RAISE EXCEPTION 'outbox: priority % is outside the % lane', v_priority, lane
            USING ERRCODE = '23514';
    END IF;
    IF EXISTS (SELECT 1 FROM unnest(user_ids) AS u(id) WHERE u.id = '' OR length(u.id) > 255)
    THEN
        RAISE EXCEPTION 'outbox: every user id must be 1-255 characters'
            USING ERRCODE = '23514';
    END IF;
    IF EXISTS (SELECT 1 FROM unnest(vars_list) AS v(vars) WHERE jsonb_typeof(v.vars) <> 'object')
    THEN
        RAISE EXCEPTION 'outbox: every vars must be a JSON object' USING ERRCODE = '23514';
    END IF;
    -- The limits of outbox.enqueue (which explains them), per vars object.
    IF EXISTS (SELECT 1 FROM unnest(vars_list) AS v(vars)
                WHERE CASE WHEN pg_column_compression(v.vars) IS NULL
                           THEN pg_column_size(v.vars)
                           ELSE octet_length(v.vars::text) END > 262144)
    THEN
        RAISE EXCEPTION 'outbox: a vars object is over the limit of 262144 bytes'
            USING ERRCODE = '54000';
    END IF;
    IF EXISTS (SELECT 1 FROM unnest(vars_list) AS v(vars)
                WHERE CASE WHEN pg_column_compression(v.vars) IS NULL
                                AND pg_column_size(v.vars) < 256 THEN false
                           ELSE jsonb_path_exists(v.vars,
                               'strict $.**{32} ? (@.type() == "object" || @.type() == "array")')
                      END)
    THEN
        RAISE EXCEPTION 'outbox: a vars object is nested more than 32 levels deep; the limit is 32'
            USING ERRCODE = '54000';
    END IF;
    IF send_at IS NOT NULL AND (NOT isfinite(send_at) OR send_at > now() + interval '365 days')
    THEN
        RAISE EXCEPTION 'outbox: send_at % must be a finite time at most 365 days ahead',
            send_at USING ERRCODE = '22023';
    END IF;

    INSERT INTO outbox.message (lane, priority, channel, user_id, template, vars,
                                next_attempt_at)
    SELECT enqueue_many.lane, v_priority,
           enqueue_many.channel, u.user_id, enqueue_many.template,
           CASE WHEN cardinality(vars_list) = 1 THEN vars_list[1] ELSE vars_list[u.ord] END,
           greatest(coalesce(enqueue_many.send_at, now()), now())
      FROM unnest(user_ids) WITH ORDINALITY AS u(user_id, ord);
    GET DIAGNOSTICS v_count = ROW_COUNT;

    IF send_at IS NULL OR send_at <= now() THEN
        PERFORM outbox._wake_dispatchers();
    END IF;
    RETURN v_count;
END
$$;

CREATE OR REPLACE FUNCTION outbox.retry_dead(ids bigint[] DEFAULT NULL) RETURNS integer
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_count integer;
BEGIN
    UPDATE outbox.message
       SET status = 'pending', attempts = 0, next_attempt_at = now(), dead_at = NULL,
           last_error = NULL, error_class = NULL
     WHERE status = 'dead' AND (ids IS NULL OR id = ANY (ids));
    GET DIAGNOSTICS v_count = ROW_COUNT;
    IF v_count > 0 THEN
        PERFORM outbox._wake_dispatchers();
    END IF;
    RETURN v_count;
END
$$;

CREATE OR REPLACE FUNCTION outbox.purge_dead(older_than interval) RETURNS integer
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_count integer;
BEGIN
    IF older_than IS NULL OR older_than < interval '0' THEN
        RAISE EXCEPTION 'outbox: older_than must be a non-negative interval'
            USING ERRCODE = '22023';
    END IF;
    DELETE FROM outbox.message WHERE status = 'dead' AND dead_at < now() - older_than;
    GET DIAGNOSTICS v_count = ROW_COUNT;
    RETURN v_count;
END
$$;

CREATE OR REPLACE FUNCTION outbox.prune_history(older_than interval) RETURNS integer
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_count integer;
BEGIN
    IF older_than IS NULL OR older_than < interval '1 hour' THEN
        RAISE EXCEPTION 'outbox: older_than must be at least 1 hour' USING ERRCODE = '22023';
    END IF;
    DELETE FROM outbox.attempt WHERE created_at < now() - older_than;
    GET DIAGNOSTICS v_count = ROW_COUNT;
    -- a key stays until its own dedup window has passed, whatever older_than says
    DELETE FROM outbox.idempotency_key WHERE expires_at <= now();
    RETURN v_count;
END
$$;
COMMENT ON FUNCTION outbox.prune_history(interval) IS
    'Retention: delete attempt rows older than older_than and idempotency keys past their window';

GRANT USAGE ON SCHEMA outbox TO outbox_owner, outbox_operator, outbox_recipient_writer;

-- redrive, purge and retention are the operator's, not the dispatcher's
REVOKE EXECUTE ON FUNCTION
    outbox.retry_dead(bigint[]), outbox.purge_dead(interval), outbox.prune_history(interval)
    FROM outbox_dispatcher;

GRANT SELECT, INSERT, UPDATE, DELETE ON outbox.message, outbox.idempotency_key TO outbox_owner;
GRANT SELECT, DELETE ON outbox.attempt TO outbox_owner;
GRANT SELECT ON outbox.sleeper TO outbox_owner;

GRANT SELECT ON outbox.dead_letter, outbox.queue_stats, outbox.attempt TO outbox_operator;
GRANT SELECT (user_id, email_undeliverable_at, telegram_blocked_at, updated_at)
    ON outbox.recipient TO outbox_operator;
GRANT EXECUTE ON FUNCTION
    outbox.retry_dead(bigint[]), outbox.purge_dead(interval), outbox.prune_history(interval)
    TO outbox_operator;

GRANT SELECT, INSERT, UPDATE ON outbox.recipient, outbox.push_subscription
    TO outbox_recipient_writer;

-- A non-superuser may give a function to a role only if that role may create in the
-- schema: for the hand-over only.
GRANT CREATE ON SCHEMA outbox TO outbox_owner;
ALTER FUNCTION outbox._wake_dispatchers() OWNER TO outbox_owner;
ALTER FUNCTION outbox.enqueue(text, text, text, jsonb, text, text, timestamptz, smallint,
                              text[], interval) OWNER TO outbox_owner;
ALTER FUNCTION outbox.enqueue_many(text, text, text[], jsonb[], text, timestamptz, smallint)
    OWNER TO outbox_owner;
ALTER FUNCTION outbox.retry_dead(bigint[]) OWNER TO outbox_owner;
ALTER FUNCTION outbox.purge_dead(interval) OWNER TO outbox_owner;
ALTER FUNCTION outbox.prune_history(interval) OWNER TO outbox_owner;
REVOKE CREATE ON SCHEMA outbox FROM outbox_owner;
