-- outbox_0010 downgrade: back to outbox_0009. Email and Telegram addresses and
-- their states go back into outbox.recipient's columns; addresses on other
-- channels (sms, plugins) are dropped, and so are messages, breaker rows and
-- delivery reports of channels outbox_0009 does not know (as outbox_0009's own
-- downgrade did for inapp).

DROP FUNCTION outbox.mark_address_undeliverable(text, text, text);
DROP FUNCTION outbox.record_delivery_report(text, text, boolean, text, boolean);
DROP FUNCTION outbox.set_address(text, text, text);
DROP FUNCTION outbox.register_channel(text);

-- ---------------------------------------------------------------------------
-- Channel names of outbox_0009 only.
-- ---------------------------------------------------------------------------
DELETE FROM outbox.message WHERE channel NOT IN ('email', 'telegram', 'push', 'inapp');
UPDATE outbox.message
   SET fallback = ARRAY(SELECT f FROM unnest(fallback) WITH ORDINALITY AS u(f, i)
                         WHERE f IN ('email', 'telegram', 'push', 'inapp') ORDER BY i)
 WHERE NOT fallback <@ ARRAY['email', 'telegram', 'push', 'inapp']::text[];
UPDATE outbox.preference
   SET channels = ARRAY(SELECT c FROM unnest(channels) AS c
                         WHERE c IN ('email', 'telegram', 'push', 'inapp') ORDER BY c)
 WHERE NOT channels <@ ARRAY['email', 'telegram', 'push', 'inapp']::text[];
DELETE FROM outbox.channel_state WHERE channel NOT IN ('email', 'telegram', 'push', 'inapp');
ALTER TABLE outbox.channel_state DROP CONSTRAINT channel_state_channel_fkey;
ALTER TABLE outbox.channel_state ADD CONSTRAINT channel_state_channel_check
    CHECK (channel IN ('email', 'telegram', 'push', 'inapp'));

DROP INDEX outbox.attempt_provider_idx;
DELETE FROM outbox.attempt WHERE outcome IN ('delivered', 'undelivered');
ALTER TABLE outbox.attempt DROP CONSTRAINT attempt_outcome_check;
ALTER TABLE outbox.attempt ADD CONSTRAINT attempt_outcome_check CHECK (
    outcome IN ('sent', 'retry', 'dead', 'skipped', 'fallback', 'deferred', 'failed',
                'cancelled', 'expired', 'superseded', 'escalated', 'acknowledged')
);
ALTER TABLE outbox.attempt DROP COLUMN provider_id;

-- ---------------------------------------------------------------------------
-- outbox.recipient with its address columns again, in outbox_0009's order.
-- ---------------------------------------------------------------------------
ALTER TABLE outbox.recipient RENAME TO recipient_0010;
ALTER TABLE outbox.recipient_0010 RENAME CONSTRAINT recipient_pkey TO recipient_0010_pkey;
ALTER TABLE outbox.recipient_0010 RENAME CONSTRAINT recipient_user_id_check TO recipient_0010_user_id_check;
ALTER TABLE outbox.recipient_0010 RENAME CONSTRAINT recipient_quiet_hours_pair TO recipient_0010_quiet_hours_pair;
CREATE TABLE outbox.recipient (
    user_id                text        PRIMARY KEY,
    email                  text,
    telegram_chat_id       bigint,
    timezone               text        NOT NULL DEFAULT 'UTC',
    quiet_hours_start      time,
    quiet_hours_end        time,
    disabled_channels      text[]      NOT NULL DEFAULT '{}',
    campaign_opt_out       boolean     NOT NULL DEFAULT false,
    fallback_order         text[],
    email_undeliverable_at timestamptz,
    telegram_blocked_at    timestamptz,
    created_at             timestamptz NOT NULL DEFAULT now(),
    updated_at             timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT recipient_user_id_check CHECK (user_id <> '' AND length(user_id) <= 255),
    CONSTRAINT recipient_email_check CHECK (
        email IS NULL OR (email ~ '^[^@\s]+@[^@\s]+$' AND length(email) <= 254)
    ),
    CONSTRAINT recipient_quiet_hours_pair CHECK (
        (quiet_hours_start IS NULL) = (quiet_hours_end IS NULL)
    ),
    CONSTRAINT recipient_disabled_channels_check CHECK (
        disabled_channels <@ ARRAY['email', 'telegram', 'push', 'inapp']::text[]
    ),
    CONSTRAINT recipient_fallback_order_check CHECK (
        fallback_order IS NULL OR fallback_order <@ ARRAY['email', 'telegram', 'push', 'inapp']::text[]
    )
);
INSERT INTO outbox.recipient (user_id, email, telegram_chat_id, timezone, quiet_hours_start,
                              quiet_hours_end, disabled_channels, campaign_opt_out,
                              fallback_order, email_undeliverable_at, telegram_blocked_at,
                              created_at, updated_at)
SELECT r.user_id, e.address, t.address::bigint, r.timezone, r.quiet_hours_start,
       r.quiet_hours_end,
       ARRAY(SELECT d FROM unnest(r.disabled_channels) WITH ORDINALITY AS u(d, i)
              WHERE d IN ('email', 'telegram', 'push', 'inapp') ORDER BY i),
       r.campaign_opt_out,
       CASE WHEN r.fallback_order IS NOT NULL THEN
           ARRAY(SELECT f FROM unnest(r.fallback_order) WITH ORDINALITY AS u(f, i)
                  WHERE f IN ('email', 'telegram', 'push', 'inapp') ORDER BY i) END,
       coalesce(e.undeliverable_since, e.disabled_since),
       coalesce(t.disabled_since, t.undeliverable_since),
       r.created_at, r.updated_at
  FROM outbox.recipient_0010 r
  LEFT JOIN outbox.recipient_address e ON e.user_id = r.user_id AND e.channel = 'email'
  LEFT JOIN outbox.recipient_address t ON t.user_id = r.user_id AND t.channel = 'telegram';
DROP TABLE outbox.recipient_address;
DROP TABLE outbox.recipient_0010;
DROP FUNCTION outbox._check_recipient_channels();
DROP TABLE outbox.channel;
REVOKE ALL ON outbox.recipient FROM PUBLIC;
GRANT SELECT, UPDATE ON outbox.recipient TO outbox_dispatcher;
GRANT SELECT (user_id, email_undeliverable_at, telegram_blocked_at, updated_at)
    ON outbox.recipient TO outbox_operator;
GRANT SELECT, INSERT, UPDATE ON outbox.recipient TO outbox_recipient_writer;

-- ---------------------------------------------------------------------------
-- Enqueue and preferences with outbox_0009's lists of channel names.
-- ---------------------------------------------------------------------------
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

