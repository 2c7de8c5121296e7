-- outbox_0008: what a trader can rely on (DESIGN section 9). Frozen.
--   * cancel, expire, collapse: outbox.cancel, message columns expires_at and
--     collapse_key, outcomes cancelled, expired, superseded;
--   * status: outbox.message_status and outbox.message_attempts;
--   * acknowledge and escalate: escalate_after, sent_at, acknowledged_at, status
--     awaiting_ack (an alert that was sent and waits for the user; next_attempt_at
--     is when it escalates), outbox.acknowledge, outcomes escalated, acknowledged;
--   * preferences by topic: outbox.preference, outbox.set_preference;
--   * enqueued_by on messages and attempts: the producer's login role, so that one
--     team's code cannot cancel, acknowledge, collapse or read another's messages.
-- Every new column is nullable without a default or has a constant default: adding
-- them rewrites nothing and takes the table's lock only for a moment.

ALTER TABLE outbox.message
    ADD COLUMN expires_at      timestamptz,
    ADD COLUMN collapse_key    text,
    ADD COLUMN escalate_after  interval,
    ADD COLUMN sent_at         timestamptz,
    ADD COLUMN acknowledged_at timestamptz,
    ADD COLUMN enqueued_by     oid DEFAULT to_regrole(quote_ident(session_user));
COMMENT ON COLUMN outbox.message.expires_at IS 'Not sent after this time (outcome expired)';
COMMENT ON COLUMN outbox.message.collapse_key IS
    'A newer pending message of the same user, key and producer withdraws this one';
COMMENT ON COLUMN outbox.message.escalate_after IS
    'An alert: once sent it waits this long for the acknowledgement, then goes to the next channel';
COMMENT ON COLUMN outbox.message.sent_at IS 'First delivery of an alert (only alerts keep their row)';
COMMENT ON COLUMN outbox.message.acknowledged_at IS
    'Set by outbox.acknowledge while the alert is in flight; the finish then deletes the row';
COMMENT ON COLUMN outbox.message.enqueued_by IS
    'The login role (session_user) that enqueued it: the scope of cancel, acknowledge and status';

ALTER TABLE outbox.message DROP CONSTRAINT message_status_check;
ALTER TABLE outbox.message ADD CONSTRAINT message_status_check
    CHECK (status IN ('pending', 'sending', 'dead', 'awaiting_ack'));

-- Alerts whose escalation is due; the claim reads it next to message_claim_idx.
CREATE INDEX message_ack_due_idx ON outbox.message (next_attempt_at)
    WHERE status = 'awaiting_ack';
-- Collapse: the pending messages an enqueue with a collapse_key withdraws.
CREATE INDEX message_collapse_idx ON outbox.message (user_id, collapse_key)
    WHERE collapse_key IS NOT NULL AND status = 'pending';

ALTER TABLE outbox.attempt ADD COLUMN enqueued_by oid;
COMMENT ON COLUMN outbox.attempt.enqueued_by IS
    'The message''s outbox.message.enqueued_by: status stays scoped after the row is gone';
ALTER TABLE outbox.attempt DROP CONSTRAINT attempt_outcome_check;
ALTER TABLE outbox.attempt ADD CONSTRAINT attempt_outcome_check CHECK (
    outcome IN ('sent', 'retry', 'dead', 'skipped', 'fallback', 'deferred', 'failed',
                'cancelled', 'expired', 'superseded', 'escalated', 'acknowledged')
);

CREATE TABLE outbox.preference (
    user_id    text        NOT NULL,
    topic      text        NOT NULL,
    instrument text        NOT NULL DEFAULT '',
    channels   text[]      NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, topic, instrument),
    CONSTRAINT preference_user_id_check CHECK (user_id <> '' AND length(user_id) <= 255),
    CONSTRAINT preference_topic_check CHECK (topic <> '' AND length(topic) <= 255),
    CONSTRAINT preference_instrument_check CHECK (length(instrument) <= 255)
);
COMMENT ON TABLE outbox.preference IS
    'Per user and topic (template), optionally per vars.instrument (''''=any): the only '
    'channels to deliver on; an empty list mutes';

-- Whether the session's login role may see and change every message (operators, the
-- dispatcher and the API that runs as it, inspectors read only), not just its own.
CREATE FUNCTION outbox._sees_all(writes boolean) RETURNS boolean
LANGUAGE sql
STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT pg_has_role(session_user, 'outbox_operator', 'USAGE')
        OR pg_has_role(session_user, 'outbox_dispatcher', 'USAGE')
        OR (NOT writes AND pg_has_role(session_user, 'outbox_inspector', 'USAGE'))
$$;

-- enqueue gains expires_at, collapse_key and escalate_after (defaults: callers of
-- the ten-argument form keep working). The old signature goes with its grants.
DROP FUNCTION outbox.enqueue(text, text, text, jsonb, text, text, timestamptz, smallint,
                             text[], interval);

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
    dedup_window interval DEFAULT '24 hours',
    expires_at timestamptz DEFAULT NULL,
    collapse_key text DEFAULT NULL,
    escalate_after interval DEFAULT NULL
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
    v_producer oid;
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

    -- The second wave's options cost nothing when unused: each check sits behind
    -- its own IS NOT NULL.
    IF enqueue.expires_at IS NOT NULL AND (
           NOT isfinite(enqueue.expires_at) OR enqueue.expires_at <= now()
           OR enqueue.expires_at <= enqueue.send_at) THEN
        RAISE EXCEPTION 'outbox: expires_at % must be a finite time in the future and after send_at',
            enqueue.expires_at USING ERRCODE = '22023';
    END IF;
    IF enqueue.collapse_key IS NOT NULL
       AND (enqueue.collapse_key = '' OR length(enqueue.collapse_key) > 255) THEN
        RAISE EXCEPTION 'outbox: collapse_key must be 1-255 characters' USING ERRCODE = '22023';
    END IF;
    IF enqueue.escalate_after IS NOT NULL AND (
           enqueue.escalate_after < interval '1 second'
           OR enqueue.escalate_after > interval '7 days') THEN
        RAISE EXCEPTION 'outbox: escalate_after % must be between 1 second and 7 days',
            enqueue.escalate_after USING ERRCODE = '22023';
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

    IF enqueue.collapse_key IS NOT NULL THEN
        -- A newer message withdraws the pending ones it collapses with: same user, same
        -- key, same producer (the login role: one team cannot withdraw another's
        -- alerts by guessing a key). Never one in flight, already sent or dead.
        v_producer := to_regrole(quote_ident(session_user));
        WITH gone AS (
            DELETE FROM outbox.message m
             WHERE m.user_id = enqueue.user_id AND m.collapse_key = enqueue.collapse_key
               AND m.status = 'pending' AND m.sent_at IS NULL
               AND m.enqueued_by = v_producer
            RETURNING m.id, m.lane, m.channel, m.user_id, m.template, m.attempts, m.enqueued_by
        )
        INSERT INTO outbox.attempt (message_id, lane, channel, user_id, template, attempt,
                                    outcome, error_class, error, enqueued_by)
        SELECT g.id, g.lane, g.channel, g.user_id, g.template, g.attempts + 1, 'superseded',
               'collapsed', 'a newer message with the same collapse_key replaced it',
               g.enqueued_by
          FROM gone g;
    END IF;

    INSERT INTO outbox.message (lane, priority, channel, user_id, template, vars,
                                fallback, next_attempt_at, idempotency_key,
                                expires_at, collapse_key, escalate_after)
    VALUES (enqueue.lane, v_priority, enqueue.channel, enqueue.user_id, enqueue.template,
            coalesce(enqueue.vars, '{}'::jsonb), enqueue.fallback,
            greatest(coalesce(enqueue.send_at, now()), now()), enqueue.idempotency_key,
            enqueue.expires_at, enqueue.collapse_key, enqueue.escalate_after)
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
                                   text[], interval, timestamptz, text, interval) IS
    'Write a message in the caller''s transaction; returns its id (or the first id for a repeated idempotency key)';

CREATE FUNCTION outbox.cancel(message_id bigint) RETURNS boolean
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
-- Withdraw a message nobody has started sending. A message in flight is not
-- cancelled: its dispatcher may already have handed it to the provider, and a
-- "cancelled" that was delivered anyway would be a lie (docs/guarantees.md).
DECLARE
    v_count integer;
BEGIN
    WITH gone AS (
        DELETE FROM outbox.message m
         WHERE m.id = cancel.message_id AND m.status = 'pending' AND m.sent_at IS NULL
           AND (m.enqueued_by = to_regrole(quote_ident(session_user))
                OR outbox._sees_all(true))
        RETURNING m.id, m.lane, m.channel, m.user_id, m.template, m.attempts, m.enqueued_by
    )
    INSERT INTO outbox.attempt (message_id, lane, channel, user_id, template, attempt,
                                outcome, enqueued_by)
    SELECT g.id, g.lane, g.channel, g.user_id, g.template, g.attempts + 1, 'cancelled',
           g.enqueued_by
      FROM gone g;
    GET DIAGNOSTICS v_count = ROW_COUNT;
    RETURN v_count > 0;
END
$$;
COMMENT ON FUNCTION outbox.cancel(bigint) IS
    'Withdraw a pending message that was never sent; false when unknown, sent, in flight or dead';

CREATE FUNCTION outbox.acknowledge(message_id bigint) RETURNS boolean
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
-- The user saw the alert: no more escalation. The row goes (pending, waiting or
-- dead); one in flight is marked, and its dispatcher's finish deletes it.
DECLARE
    v_count integer;
BEGIN
    WITH target AS (
        SELECT m.id, m.status
          FROM outbox.message m
         WHERE m.id = acknowledge.message_id
           AND m.escalate_after IS NOT NULL AND m.sent_at IS NOT NULL
           AND m.acknowledged_at IS NULL
           AND (m.enqueued_by = to_regrole(quote_ident(session_user))
                OR outbox._sees_all(true))
           FOR UPDATE OF m
    ), gone AS (
        DELETE FROM outbox.message m USING target t
         WHERE m.id = t.id AND t.status <> 'sending'
        RETURNING m.id, m.lane, m.channel, m.user_id, m.template, m.attempts, m.enqueued_by
    ), marked AS (
        UPDATE outbox.message m SET acknowledged_at = now()
          FROM target t
         WHERE m.id = t.id AND t.status = 'sending'
        RETURNING m.id, m.lane, m.channel, m.user_id, m.template, m.attempts, m.enqueued_by
    )
    INSERT INTO outbox.attempt (message_id, lane, channel, user_id, template, attempt,
                                outcome, enqueued_by)
    SELECT a.id, a.lane, a.channel, a.user_id, a.template, a.attempts, 'acknowledged',
           a.enqueued_by
      FROM (SELECT * FROM gone UNION ALL SELECT * FROM marked) a;
    GET DIAGNOSTICS v_count = ROW_COUNT;
    RETURN v_count > 0;
END
$$;
COMMENT ON FUNCTION outbox.acknowledge(bigint) IS
    'The user saw this alert: stop its escalation; false when unknown, not an alert, not sent yet or acknowledged';

CREATE FUNCTION outbox.message_state(message_id bigint)
RETURNS TABLE (state text, channel text)
LANGUAGE plpgsql
STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
-- Two index probes: the row (primary key) while it exists, else the delivery log
-- (attempt_message_idx). No row for a message that is unknown or not the caller's.
DECLARE
    v_status  text;
    v_channel text;
    v_by      oid;
    v_outcome text;
    v_acked   boolean;
BEGIN
    SELECT m.status, m.channel, m.enqueued_by INTO v_status, v_channel, v_by
      FROM outbox.message m WHERE m.id = message_state.message_id;
    IF NOT FOUND THEN
        SELECT (array_agg(a.outcome ORDER BY a.id DESC))[1],
               (array_agg(a.channel ORDER BY a.id DESC))[1],
               bool_or(a.outcome = 'acknowledged'), min(a.enqueued_by)
          INTO v_outcome, v_channel, v_acked, v_by
          FROM outbox.attempt a
         WHERE a.message_id = message_state.message_id AND NOT a.is_test;
        IF v_outcome IS NULL THEN
            RETURN;
        END IF;
    END IF;
    IF v_by IS DISTINCT FROM to_regrole(quote_ident(session_user))
       AND NOT outbox._sees_all(false) THEN
        RETURN;
    END IF;
    state := CASE
        WHEN v_status IS NOT NULL THEN v_status  -- pending, sending, dead, awaiting_ack
        WHEN v_acked THEN 'acknowledged'
        WHEN v_outcome IN ('sent', 'dead', 'cancelled', 'expired', 'superseded', 'skipped')
            THEN v_outcome
        ELSE 'sent' END;
    channel := v_channel;
    RETURN NEXT;
END
$$;
COMMENT ON FUNCTION outbox.message_state(bigint) IS
    'The state of one message (see outbox.message_status) and its channel; no row when unknown';

CREATE FUNCTION outbox.message_status(message_id bigint) RETURNS text
LANGUAGE sql
STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT s.state FROM outbox.message_state(message_id) s
$$;
COMMENT ON FUNCTION outbox.message_status(bigint) IS
    'pending, sending, sent, dead, cancelled, expired, superseded, awaiting_ack, acknowledged or skipped; NULL when unknown';

CREATE FUNCTION outbox.message_attempts(message_id bigint)
RETURNS TABLE (attempt integer, channel text, outcome text, error_class text,
               at timestamptz)
LANGUAGE plpgsql
STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
-- The delivery log of one message, oldest first, scoped like outbox.message_status.
-- Error texts stay with operators (they may quote a provider's answer).
BEGIN
    IF NOT outbox._sees_all(false) AND NOT EXISTS (
        SELECT 1 FROM outbox.message m
         WHERE m.id = message_attempts.message_id
           AND m.enqueued_by = to_regrole(quote_ident(session_user))
        UNION ALL
        SELECT 1 FROM outbox.attempt a
         WHERE a.message_id = message_attempts.message_id AND NOT a.is_test
           AND a.enqueued_by = to_regrole(quote_ident(session_user))
    ) THEN
        RETURN;
    END IF;
    RETURN QUERY
        SELECT a.attempt, a.channel, a.outcome, a.error_class, a.created_at
          FROM outbox.attempt a
         WHERE a.message_id = message_attempts.message_id AND NOT a.is_test
         ORDER BY a.id;
END
$$;
COMMENT ON FUNCTION outbox.message_attempts(bigint) IS
    'The attempt rows of one message, oldest first (empty when unknown or not the caller''s)';

CREATE FUNCTION outbox.set_preference(
    user_id text,
    topic text,
    channels text[],
    instrument text DEFAULT NULL
) RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
-- channels NULL forgets the preference; '{}' mutes the topic (or the instrument).
BEGIN
    IF set_preference.user_id IS NULL OR set_preference.user_id = ''
       OR length(set_preference.user_id) > 255 THEN
        RAISE EXCEPTION 'outbox: user_id must be 1-255 characters' USING ERRCODE = '22023';
    END IF;
    IF set_preference.topic IS NULL OR set_preference.topic = ''
       OR length(set_preference.topic) > 255 THEN
        RAISE EXCEPTION 'outbox: topic must be 1-255 characters' USING ERRCODE = '22023';
    END IF;
    IF set_preference.instrument IS NOT NULL AND (set_preference.instrument = ''
       OR length(set_preference.instrument) > 255) THEN
        RAISE EXCEPTION 'outbox: instrument must be 1-255 characters' USING ERRCODE = '22023';
    END IF;
    IF set_preference.channels IS NULL THEN
        DELETE FROM outbox.preference p
         WHERE p.user_id = set_preference.user_id AND p.topic = set_preference.topic
           AND p.instrument = coalesce(set_preference.instrument, '');
        RETURN;
    END IF;
    IF array_position(set_preference.channels, NULL) IS NOT NULL
       OR NOT set_preference.channels <@ ARRAY['email', 'telegram', 'push']::text[] THEN
        RAISE EXCEPTION 'outbox: channels % names an unknown channel', set_preference.channels
            USING ERRCODE = '22023';
    END IF;
    -- A failed stop-loss, take-profit or entry must reach the trader somewhere.
    IF cardinality(set_preference.channels) = 0
       AND starts_with(set_preference.topic, 'position_failure_') THEN
        RAISE EXCEPTION 'outbox: position-failure alerts (%) cannot be muted on every channel',
            set_preference.topic USING ERRCODE = '22023';
    END IF;
    INSERT INTO outbox.preference AS p (user_id, topic, instrument, channels)
    VALUES (set_preference.user_id, set_preference.topic,
            coalesce(set_preference.instrument, ''),
            ARRAY(SELECT DISTINCT c FROM unnest(set_preference.channels) AS c ORDER BY c))
    ON CONFLICT ON CONSTRAINT preference_pkey DO UPDATE
        SET channels = excluded.channels, updated_at = now();
END
$$;
COMMENT ON FUNCTION outbox.set_preference(text, text, text[], text) IS
    'Deliver messages of topic (optionally only for vars.instrument) only on channels; NULL forgets';

-- Retention also ends the wait of alerts nobody acknowledged within older_than.
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
    -- alerts at the end of their chain that nobody acknowledged, as old as the history
    DELETE FROM outbox.message
     WHERE status = 'awaiting_ack' AND next_attempt_at = 'infinity'
       AND sent_at < now() - older_than;
    RETURN v_count;
END
$$;

REVOKE ALL ON FUNCTION
    outbox.enqueue(text, text, text, jsonb, text, text, timestamptz, smallint, text[], interval,
                   timestamptz, text, interval),
    outbox.cancel(bigint), outbox.acknowledge(bigint), outbox.message_status(bigint),
    outbox.message_state(bigint), outbox.message_attempts(bigint), outbox.set_preference(text, text, text[], text),
    outbox._sees_all(boolean)
    FROM PUBLIC;
REVOKE ALL ON outbox.preference FROM PUBLIC;

-- Producers: enqueue, and cancel, acknowledge and read the status of their own messages.
GRANT EXECUTE ON FUNCTION
    outbox.enqueue(text, text, text, jsonb, text, text, timestamptz, smallint, text[], interval,
                   timestamptz, text, interval),
    outbox.cancel(bigint), outbox.acknowledge(bigint), outbox.message_status(bigint),
    outbox.message_state(bigint), outbox.message_attempts(bigint)
    TO outbox_producer, outbox_dispatcher;
GRANT EXECUTE ON FUNCTION
    outbox.cancel(bigint), outbox.acknowledge(bigint), outbox.message_status(bigint),
    outbox.message_state(bigint), outbox.message_attempts(bigint)
    TO outbox_operator;
GRANT EXECUTE ON FUNCTION
    outbox.message_status(bigint), outbox.message_state(bigint), outbox.message_attempts(bigint)
    TO outbox_inspector;
-- The dispatcher reads preferences with each claim; the service that registers users
-- writes them.
GRANT SELECT ON outbox.preference TO outbox_dispatcher;
GRANT SELECT, INSERT, UPDATE, DELETE ON outbox.preference TO outbox_owner;
GRANT EXECUTE ON FUNCTION outbox.set_preference(text, text, text[], text)
    TO outbox_recipient_writer;
GRANT INSERT ON outbox.attempt TO outbox_owner;
GRANT EXECUTE ON FUNCTION outbox._sees_all(boolean) TO outbox_owner;

-- A non-superuser may give a function to a role only if that role may create in the
-- schema: for the hand-over only (as in outbox_0006).
GRANT CREATE ON SCHEMA outbox TO outbox_owner;
ALTER FUNCTION outbox.enqueue(text, text, text, jsonb, text, text, timestamptz, smallint,
                              text[], interval, timestamptz, text, interval)
    OWNER TO outbox_owner;
ALTER FUNCTION outbox.cancel(bigint) OWNER TO outbox_owner;
ALTER FUNCTION outbox.acknowledge(bigint) OWNER TO outbox_owner;
ALTER FUNCTION outbox.message_status(bigint) OWNER TO outbox_owner;
ALTER FUNCTION outbox.message_state(bigint) OWNER TO outbox_owner;
ALTER FUNCTION outbox.message_attempts(bigint) OWNER TO outbox_owner;
ALTER FUNCTION outbox.set_preference(text, text, text[], text) OWNER TO outbox_owner;
ALTER FUNCTION outbox._sees_all(boolean) OWNER TO outbox_owner;
REVOKE CREATE ON SCHEMA outbox FROM outbox_owner;
