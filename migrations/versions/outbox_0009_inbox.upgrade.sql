-- outbox_0009: the in-app inbox (DESIGN section 9, users' own endpoints). Channel
-- inapp joins every list of channel names; outbox.inbox_item holds what it
-- delivers; reading an alert's item acknowledges it. outbox.unacknowledged_alert
-- shows on-call the alerts nobody saw. Frozen.

-- ---------------------------------------------------------------------------
-- The in-app inbox: channel inapp writes one item per message in the ack's
-- transaction (and NOTIFY outbox_inbox '<id> <user_id>' for the API's streams).
-- ---------------------------------------------------------------------------
CREATE TABLE outbox.inbox_item (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id    text        NOT NULL,
    message_id bigint      NOT NULL,
    template   text        NOT NULL,
    title      text        NOT NULL,
    body       text        NOT NULL,
    url        text,
    created_at timestamptz NOT NULL DEFAULT now(),
    read_at    timestamptz,
    -- one item per message: a redelivery (at least once) adds nothing
    CONSTRAINT inbox_item_message_key UNIQUE (message_id)
);
COMMENT ON TABLE outbox.inbox_item IS
    'In-app notifications (channel inapp), one per message; read_at NULL: unread';
CREATE INDEX inbox_item_user_idx ON outbox.inbox_item (user_id, id);
CREATE INDEX inbox_item_unread_idx ON outbox.inbox_item (user_id, id) WHERE read_at IS NULL;

ALTER TABLE outbox.recipient DROP CONSTRAINT recipient_disabled_channels_check;
ALTER TABLE outbox.recipient ADD CONSTRAINT recipient_disabled_channels_check CHECK (
    disabled_channels <@ ARRAY['email', 'telegram', 'push', 'inapp']::text[]
);
ALTER TABLE outbox.recipient DROP CONSTRAINT recipient_fallback_order_check;
ALTER TABLE outbox.recipient ADD CONSTRAINT recipient_fallback_order_check CHECK (
    fallback_order IS NULL OR fallback_order <@ ARRAY['email', 'telegram', 'push', 'inapp']::text[]
);
ALTER TABLE outbox.channel_state DROP CONSTRAINT channel_state_channel_check;
ALTER TABLE outbox.channel_state ADD CONSTRAINT channel_state_channel_check
    CHECK (channel IN ('email', 'telegram', 'push', 'inapp'));

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
    IF enqueue.channel IS NULL OR enqueue.channel NOT IN ('email', 'telegram', 'push', 'inapp') THEN
        RAISE EXCEPTION 'outbox: unknown channel %; expected email, telegram, push or inapp',
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
       AND NOT enqueue.fallback <@ ARRAY['email', 'telegram', 'push', 'inapp']::text[] THEN
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
    IF channel IS NULL OR channel NOT IN ('email', 'telegram', 'push', 'inapp') THEN
        RAISE EXCEPTION 'outbox: unknown channel %; expected email, telegram, push or inapp', channel
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

CREATE OR REPLACE FUNCTION outbox.set_preference(
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
       OR NOT set_preference.channels <@ ARRAY['email', 'telegram', 'push', 'inapp']::text[] THEN
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
    DELETE FROM outbox.inbox_item WHERE created_at < now() - older_than;
    -- alerts at the end of their chain that nobody acknowledged, as old as the history
    DELETE FROM outbox.message
     WHERE status = 'awaiting_ack' AND next_attempt_at = 'infinity'
       AND sent_at < now() - older_than;
    RETURN v_count;
END
$$;

-- The acknowledgement itself, without the caller check, so that reading an item
-- (the user's own) acknowledges whoever enqueued the alert.
CREATE FUNCTION outbox._acknowledge_seen(message_id bigint) RETURNS boolean
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
-- The user saw the alert: no more escalation. The row goes (pending, waiting or
-- dead); one in flight is marked, and its dispatcher's finish deletes it. No scope
-- check: callers are outbox.acknowledge (which checks the caller's role) and
-- outbox.read_inbox_item (the user's own item); nobody else may execute it.
DECLARE
    v_count integer;
BEGIN
    WITH target AS (
        SELECT m.id, m.status
          FROM outbox.message m
         WHERE m.id = _acknowledge_seen.message_id
           AND m.escalate_after IS NOT NULL AND m.sent_at IS NOT NULL
           AND m.acknowledged_at IS NULL
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
COMMENT ON FUNCTION outbox._acknowledge_seen(bigint) IS
    'Acknowledge an alert without checking who asks (see outbox.acknowledge)';

CREATE OR REPLACE FUNCTION outbox.acknowledge(message_id bigint) RETURNS boolean
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
-- A producer's role acknowledges only the alerts it enqueued; operators and the
-- API (outbox_dispatcher, which checked a signed link) any.
BEGIN
    IF NOT outbox._sees_all(true) AND NOT EXISTS (
        SELECT 1 FROM outbox.message m
         WHERE m.id = acknowledge.message_id
           AND m.enqueued_by = to_regrole(quote_ident(session_user))
    ) THEN
        RETURN false;
    END IF;
    RETURN outbox._acknowledge_seen(acknowledge.message_id);
END
$$;
COMMENT ON FUNCTION outbox.acknowledge(bigint) IS
    'The user saw this alert: stop its escalation; false when unknown, not an alert, not sent yet or acknowledged';

CREATE FUNCTION outbox.read_inbox_item(user_id text, item_id bigint) RETURNS boolean
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
-- Reading an alert's item is its acknowledgement (the user saw it), in the same
-- transaction: the inbox is one more way to say "seen", like the ack link.
DECLARE
    v_message bigint;
BEGIN
    UPDATE outbox.inbox_item i SET read_at = now()
     WHERE i.id = read_inbox_item.item_id AND i.user_id = read_inbox_item.user_id
       AND i.read_at IS NULL
    RETURNING i.message_id INTO v_message;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    PERFORM outbox._acknowledge_seen(v_message);
    RETURN true;
END
$$;
COMMENT ON FUNCTION outbox.read_inbox_item(text, bigint) IS
    'Mark one of the user''s inbox items read (and acknowledge its alert); false when unknown, another user''s or read';

CREATE FUNCTION outbox.read_all_inbox_items(user_id text) RETURNS integer
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_count integer;
BEGIN
    WITH read AS (
        UPDATE outbox.inbox_item i SET read_at = now()
         WHERE i.user_id = read_all_inbox_items.user_id AND i.read_at IS NULL
        RETURNING i.message_id
    ), acknowledged AS (
        SELECT outbox._acknowledge_seen(r.message_id) FROM read r
    )
    SELECT count(*) INTO v_count FROM acknowledged;
    RETURN v_count;
END
$$;
COMMENT ON FUNCTION outbox.read_all_inbox_items(text) IS
    'Mark every unread inbox item of the user read (and acknowledge their alerts); returns the count';

-- A user unsubscribed a browser. The service that manages users (outbox_recipient_writer)
-- may add and update subscriptions but not delete rows at will: this removes exactly one
-- endpoint of exactly one user, so a caller cannot empty another table's worth of rows.
CREATE FUNCTION outbox.remove_push_subscription(user_id text, endpoint text) RETURNS boolean
LANGUAGE sql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    WITH gone AS (
        DELETE FROM outbox.push_subscription s
         WHERE s.user_id = remove_push_subscription.user_id
           AND s.endpoint = remove_push_subscription.endpoint
        RETURNING s.id
    )
    SELECT count(*) > 0 FROM gone
$$;
COMMENT ON FUNCTION outbox.remove_push_subscription(text, text) IS
    'Remove one browser subscription of the user; false when the endpoint is not theirs or unknown';

-- On call at 3 a.m.: the alerts that were sent and that nobody acknowledged yet,
-- without their vars. Waiting (awaiting_ack), or on an escalation hop (pending,
-- sending); escalates_at NULL: every channel of the chain has had it.
CREATE VIEW outbox.unacknowledged_alert AS
SELECT id, lane, user_id, template, channel, status, sent_at,
       now() - sent_at AS unacknowledged_for,
       CASE WHEN status = 'awaiting_ack' AND next_attempt_at <> 'infinity'
            THEN next_attempt_at END AS escalates_at,
       CASE WHEN status = 'awaiting_ack' AND next_attempt_at <> 'infinity'
            THEN fallback[1] END AS escalates_to
  FROM outbox.message
 WHERE escalate_after IS NOT NULL AND sent_at IS NOT NULL AND acknowledged_at IS NULL
   AND status IN ('awaiting_ack', 'pending', 'sending');
COMMENT ON VIEW outbox.unacknowledged_alert IS
    'Alerts sent and not acknowledged yet, the oldest first by sent_at; no vars';

REVOKE ALL ON outbox.unacknowledged_alert FROM PUBLIC;
GRANT SELECT ON outbox.unacknowledged_alert TO outbox_operator, outbox_inspector, outbox_dispatcher;
REVOKE ALL ON outbox.inbox_item FROM PUBLIC;
REVOKE ALL ON FUNCTION outbox.read_inbox_item(text, bigint), outbox.read_all_inbox_items(text),
    outbox._acknowledge_seen(bigint), outbox.remove_push_subscription(text, text)
    FROM PUBLIC;
-- The dispatcher writes items; the API (which runs as outbox_dispatcher) and the
-- service that manages users read them and mark them read.
GRANT SELECT, INSERT ON outbox.inbox_item TO outbox_dispatcher;
GRANT SELECT ON outbox.inbox_item TO outbox_recipient_writer;
GRANT SELECT, UPDATE, DELETE ON outbox.inbox_item TO outbox_owner;
GRANT EXECUTE ON FUNCTION outbox.read_inbox_item(text, bigint), outbox.read_all_inbox_items(text),
    outbox.remove_push_subscription(text, text)
    TO outbox_dispatcher, outbox_recipient_writer;
-- The owner deletes a subscription only through remove_push_subscription; it matches
-- rows by user and endpoint and never reads the keys (p256dh, auth).
GRANT SELECT (id, user_id, endpoint), DELETE ON outbox.push_subscription TO outbox_owner;
-- The API (outbox_dispatcher) writes a user's own preferences (PUT /api/v1/preferences).
GRANT EXECUTE ON FUNCTION outbox.set_preference(text, text, text[], text) TO outbox_dispatcher;
-- A non-superuser may give a function to a role only if that role may create in the
-- schema: for the hand-over only (as in outbox_0006).
GRANT CREATE ON SCHEMA outbox TO outbox_owner;
ALTER FUNCTION outbox._acknowledge_seen(bigint) OWNER TO outbox_owner;
ALTER FUNCTION outbox.read_inbox_item(text, bigint) OWNER TO outbox_owner;
ALTER FUNCTION outbox.read_all_inbox_items(text) OWNER TO outbox_owner;
ALTER FUNCTION outbox.remove_push_subscription(text, text) OWNER TO outbox_owner;
REVOKE CREATE ON SCHEMA outbox FROM outbox_owner;
