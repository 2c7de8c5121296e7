-- outbox_0008 downgrade: back to outbox_0007. Alerts waiting for their
-- acknowledgement are gone with the feature (they were sent); preferences are
-- dropped; the new outcomes' attempt rows are deleted (the old constraint refuses
-- them). Frozen.

DROP FUNCTION outbox.set_preference(text, text, text[], text);
DROP FUNCTION outbox.message_attempts(bigint);
DROP FUNCTION outbox.message_status(bigint);
DROP FUNCTION outbox.message_state(bigint);
DROP FUNCTION outbox.acknowledge(bigint);
DROP FUNCTION outbox.cancel(bigint);
DROP FUNCTION outbox.enqueue(text, text, text, jsonb, text, text, timestamptz, smallint,
                             text[], interval, timestamptz, text, interval);
DROP FUNCTION outbox._sees_all(boolean);
DROP TABLE outbox.preference;

DELETE FROM outbox.message WHERE status = 'awaiting_ack';
DROP INDEX outbox.message_ack_due_idx;
DROP INDEX outbox.message_collapse_idx;
ALTER TABLE outbox.message DROP CONSTRAINT message_status_check;
ALTER TABLE outbox.message ADD CONSTRAINT message_status_check
    CHECK (status IN ('pending', 'sending', 'dead'));
ALTER TABLE outbox.message
    DROP COLUMN expires_at,
    DROP COLUMN collapse_key,
    DROP COLUMN escalate_after,
    DROP COLUMN sent_at,
    DROP COLUMN acknowledged_at,
    DROP COLUMN enqueued_by;

DELETE FROM outbox.attempt
 WHERE outcome IN ('cancelled', 'expired', 'superseded', 'escalated', 'acknowledged');
ALTER TABLE outbox.attempt DROP CONSTRAINT attempt_outcome_check;
ALTER TABLE outbox.attempt ADD CONSTRAINT attempt_outcome_check CHECK (
    outcome IN ('sent', 'retry', 'dead', 'skipped', 'fallback', 'deferred', 'failed')
);
ALTER TABLE outbox.attempt DROP COLUMN enqueued_by;
REVOKE INSERT ON outbox.attempt FROM outbox_owner;

CREATE FUNCTION outbox.enqueue(
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
COMMENT ON FUNCTION outbox.enqueue(text, text, text, jsonb, text, text, timestamptz, smallint,
                                   text[], interval) IS
    'Write a message in the caller''s transaction; returns its id (or the first id for a repeated idempotency key)';
REVOKE ALL ON FUNCTION outbox.enqueue(text, text, text, jsonb, text, text, timestamptz, smallint,
                                      text[], interval) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION
    outbox.enqueue(text, text, text, jsonb, text, text, timestamptz, smallint, text[], interval)
    TO outbox_producer, outbox_dispatcher;
-- A non-superuser may give a function to a role only if that role may create in the
-- schema: for the hand-over only (as in outbox_0006).
GRANT CREATE ON SCHEMA outbox TO outbox_owner;
ALTER FUNCTION outbox.enqueue(text, text, text, jsonb, text, text, timestamptz, smallint,
                              text[], interval) OWNER TO outbox_owner;
REVOKE CREATE ON SCHEMA outbox FROM outbox_owner;

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
