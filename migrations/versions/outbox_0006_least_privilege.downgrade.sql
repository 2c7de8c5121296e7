-- outbox_0006 downgrade: back to outbox_0005 (functions owned by the role that runs
-- this, keys without their own expiry, redrive and retention granted to
-- outbox_dispatcher) and the three roles of outbox_0006 dropped. Frozen.

-- The functions back to the migrating role, as before.
ALTER FUNCTION outbox._wake_dispatchers() OWNER TO CURRENT_USER;
ALTER FUNCTION outbox.enqueue(text, text, text, jsonb, text, text, timestamptz, smallint,
                              text[], interval) OWNER TO CURRENT_USER;
ALTER FUNCTION outbox.enqueue_many(text, text, text[], jsonb[], text, timestamptz, smallint)
    OWNER TO CURRENT_USER;
ALTER FUNCTION outbox.retry_dead(bigint[]) OWNER TO CURRENT_USER;
ALTER FUNCTION outbox.purge_dead(interval) OWNER TO CURRENT_USER;
ALTER FUNCTION outbox.prune_history(interval) OWNER TO CURRENT_USER;

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
    -- The Python API's limit (256 KiB), for producers that call SQL directly.
    IF pg_column_size(enqueue.vars) > 262144 THEN
        RAISE EXCEPTION 'outbox: vars are % bytes; the limit is 262144',
            pg_column_size(enqueue.vars) USING ERRCODE = '54000';
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
           AND k.created_at > now() - enqueue.dedup_window;
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
        -- the unique index makes us wait for it, and then the first one wins.
        INSERT INTO outbox.idempotency_key AS k (key, message_id)
        VALUES (enqueue.idempotency_key, v_id)
        ON CONFLICT (key) DO UPDATE
            SET message_id = excluded.message_id, created_at = now()
            WHERE k.created_at <= now() - enqueue.dedup_window
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
    IF EXISTS (SELECT 1 FROM unnest(vars_list) AS v(vars) WHERE pg_column_size(v.vars) > 262144)
    THEN
        RAISE EXCEPTION 'outbox: a vars object is over the limit of 262144 bytes'
            USING ERRCODE = '54000';
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
    DELETE FROM outbox.idempotency_key WHERE created_at < now() - older_than;
    RETURN v_count;
END
$$;
COMMENT ON FUNCTION outbox.prune_history(interval) IS
    'Retention: delete attempt rows and idempotency keys older than older_than';

DROP INDEX outbox.idempotency_key_expires_idx;
ALTER TABLE outbox.idempotency_key DROP COLUMN expires_at;
CREATE INDEX idempotency_key_created_idx ON outbox.idempotency_key (created_at);

GRANT EXECUTE ON FUNCTION
    outbox.retry_dead(bigint[]), outbox.purge_dead(interval), outbox.prune_history(interval)
    TO outbox_dispatcher;

-- Take back everything this database granted the three roles, so that they can go.
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA outbox
    FROM outbox_owner, outbox_operator, outbox_recipient_writer;
REVOKE ALL ON ALL TABLES IN SCHEMA outbox
    FROM outbox_owner, outbox_operator, outbox_recipient_writer;
REVOKE ALL (user_id, email_undeliverable_at, telegram_blocked_at, updated_at)
    ON outbox.recipient FROM outbox_operator;
REVOKE ALL ON SCHEMA outbox FROM outbox_owner, outbox_operator, outbox_recipient_writer;

-- Roles are cluster-wide: drop each one unless another database still grants it
-- something (then it stays, and the operator drops it when the last one goes).
DO $roles$
DECLARE
    r text;
BEGIN
    FOREACH r IN ARRAY ARRAY['outbox_owner', 'outbox_operator', 'outbox_recipient_writer'] LOOP
        IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r) THEN
            BEGIN
                EXECUTE format('DROP ROLE %I', r);
            EXCEPTION WHEN dependent_objects_still_exist THEN
                RAISE NOTICE 'outbox: role % is still used by another database; kept', r;
            WHEN insufficient_privilege THEN
                -- PostgreSQL 16+: a role created by another (a superuser) stays
                RAISE NOTICE 'outbox: role % belongs to another role; kept', r;
            END;
        END IF;
    END LOOP;
END
$roles$;
