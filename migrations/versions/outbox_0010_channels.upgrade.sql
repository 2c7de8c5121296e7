-- outbox_0010: channels are data (DESIGN section 9). outbox.channel lists the
-- channels (a plugin registers its own with outbox.register_channel); every
-- user's address on every channel, with its state, is a row of
-- outbox.recipient_address instead of a column of outbox.recipient. No list of
-- channel names is left in a constraint or a function. outbox.attempt learns the
-- provider's message id and the outcomes of delivery reports (webhooks).
--
-- outbox.recipient is rebuilt (created anew, rows copied, renamed) so that its
-- columns keep the order of a fresh schema.sql: the copy holds an ACCESS
-- EXCLUSIVE lock on the recipients for as long as it takes.

-- ---------------------------------------------------------------------------
-- Which channels exist.
-- ---------------------------------------------------------------------------
CREATE TABLE outbox.channel (
    name       text        PRIMARY KEY,
    builtin    boolean     NOT NULL DEFAULT false,
    created_at timestamptz NOT NULL DEFAULT now(),
    -- a name is a template folder, a metric label and a settings key: keep it plain
    CONSTRAINT channel_name_check CHECK (name ~ '^[a-z][a-z0-9_]{0,31}$')
);
COMMENT ON TABLE outbox.channel IS
    'The channels messages may go to: the built-ins and those plugins registered (outbox.register_channel)';
INSERT INTO outbox.channel (name, builtin)
VALUES ('email', true), ('telegram', true), ('push', true), ('inapp', true), ('sms', true);

-- ---------------------------------------------------------------------------
-- outbox.recipient without its address columns (rebuilt in schema.sql's order).
-- ---------------------------------------------------------------------------
ALTER TABLE outbox.recipient RENAME TO recipient_0009;
ALTER TABLE outbox.recipient_0009 RENAME CONSTRAINT recipient_pkey TO recipient_0009_pkey;
ALTER TABLE outbox.recipient_0009 RENAME CONSTRAINT recipient_user_id_check TO recipient_0009_user_id_check;
ALTER TABLE outbox.recipient_0009 RENAME CONSTRAINT recipient_quiet_hours_pair TO recipient_0009_quiet_hours_pair;
CREATE TABLE outbox.recipient (
    user_id                text        PRIMARY KEY,
    timezone               text        NOT NULL DEFAULT 'UTC',
    quiet_hours_start      time,
    quiet_hours_end        time,
    disabled_channels      text[]      NOT NULL DEFAULT '{}',
    campaign_opt_out       boolean     NOT NULL DEFAULT false,
    fallback_order         text[],
    created_at             timestamptz NOT NULL DEFAULT now(),
    updated_at             timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT recipient_user_id_check CHECK (user_id <> '' AND length(user_id) <= 255),
    CONSTRAINT recipient_quiet_hours_pair CHECK (
        (quiet_hours_start IS NULL) = (quiet_hours_end IS NULL)
    )
);
COMMENT ON TABLE outbox.recipient IS
    'A user''s delivery settings; the addresses are in outbox.recipient_address and outbox.push_subscription';
INSERT INTO outbox.recipient (user_id, timezone, quiet_hours_start, quiet_hours_end,
                              disabled_channels, campaign_opt_out, fallback_order,
                              created_at, updated_at)
SELECT user_id, timezone, quiet_hours_start, quiet_hours_end, disabled_channels,
       campaign_opt_out, fallback_order, created_at, updated_at
  FROM outbox.recipient_0009;

-- ---------------------------------------------------------------------------
-- Each user's address on each channel, and what the providers said about it.
-- Push subscriptions stay in outbox.push_subscription (many per user); inapp
-- needs no address.
-- ---------------------------------------------------------------------------
CREATE TABLE outbox.recipient_address (
    user_id              text        NOT NULL REFERENCES outbox.recipient ON DELETE CASCADE,
    channel              text        NOT NULL REFERENCES outbox.channel,
    address              text        NOT NULL,
    undeliverable_since  timestamptz,
    undeliverable_reason text,
    disabled_since       timestamptz,
    created_at           timestamptz NOT NULL DEFAULT now(),
    updated_at           timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, channel),
    -- an address goes into provider requests and mail headers: no control characters
    CONSTRAINT recipient_address_text_check CHECK (
        address <> '' AND length(address) <= 1024 AND address !~ '[[:cntrl:]]'
    ),
    CONSTRAINT recipient_address_reason_check CHECK (length(undeliverable_reason) <= 500),
    CONSTRAINT recipient_address_no_push_inapp CHECK (channel <> 'push' AND channel <> 'inapp'),
    CONSTRAINT recipient_address_email_check CHECK (
        channel <> 'email' OR (address ~ '^[^@\s]+@[^@\s]+$' AND length(address) <= 254)
    ),
    -- a Telegram chat id: a 64-bit integer in its plain decimal spelling
    CONSTRAINT recipient_address_telegram_check CHECK (
        channel <> 'telegram' OR CASE WHEN address ~ '^-?(0|[1-9][0-9]{0,18})$'
            THEN address::numeric BETWEEN -9223372036854775808 AND 9223372036854775807
            ELSE false END
    ),
    -- E.164
    CONSTRAINT recipient_address_sms_check CHECK (
        channel <> 'sms' OR address ~ '^\+[1-9][0-9]{6,14}$'
    )
);
COMMENT ON TABLE outbox.recipient_address IS
    'A user''s address on one channel; undeliverable_since (the provider refused it) or '
    'disabled_since (the user turned the channel off there) make the channel unreachable';
COMMENT ON COLUMN outbox.recipient_address.disabled_since IS
    'The user blocked the bot (telegram) or answered STOP (sms); cleared by a new address';
-- Delivery reports name an address (an email bounce), not a user.
CREATE INDEX recipient_address_lookup_idx ON outbox.recipient_address (channel, lower(address));

INSERT INTO outbox.recipient_address (user_id, channel, address, undeliverable_since,
                                      created_at, updated_at)
SELECT user_id, 'email', email, email_undeliverable_at, created_at, updated_at
  FROM outbox.recipient_0009 WHERE email IS NOT NULL;
INSERT INTO outbox.recipient_address (user_id, channel, address, disabled_since,
                                      created_at, updated_at)
SELECT user_id, 'telegram', telegram_chat_id::text, telegram_blocked_at, created_at, updated_at
  FROM outbox.recipient_0009 WHERE telegram_chat_id IS NOT NULL;
DROP TABLE outbox.recipient_0009;

-- Channel lists in arrays: a trigger checks them against outbox.channel (a CHECK
-- cannot read a table).
CREATE FUNCTION outbox._check_recipient_channels() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF array_position(NEW.disabled_channels, NULL) IS NOT NULL
       OR NOT NEW.disabled_channels <@ ARRAY(SELECT c.name FROM outbox.channel c) THEN
        RAISE EXCEPTION 'outbox: disabled_channels % names an unknown channel',
            NEW.disabled_channels USING ERRCODE = '23514';
    END IF;
    IF NEW.fallback_order IS NOT NULL AND (array_position(NEW.fallback_order, NULL) IS NOT NULL
       OR NOT NEW.fallback_order <@ ARRAY(SELECT c.name FROM outbox.channel c)) THEN
        RAISE EXCEPTION 'outbox: fallback_order % names an unknown channel',
            NEW.fallback_order USING ERRCODE = '23514';
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER recipient_channels_check
    BEFORE INSERT OR UPDATE OF disabled_channels, fallback_order ON outbox.recipient
    FOR EACH ROW EXECUTE FUNCTION outbox._check_recipient_channels();

-- The circuit breaker's channels.
ALTER TABLE outbox.channel_state DROP CONSTRAINT channel_state_channel_check;
ALTER TABLE outbox.channel_state ADD CONSTRAINT channel_state_channel_fkey
    FOREIGN KEY (channel) REFERENCES outbox.channel;

-- ---------------------------------------------------------------------------
-- Delivery reports: the provider's id of a sent message, and what it said later.
-- ---------------------------------------------------------------------------
ALTER TABLE outbox.attempt ADD COLUMN provider_id text;
COMMENT ON COLUMN outbox.attempt.provider_id IS
    'The provider''s id of the message (Sent.provider_id): delivery reports find it by this';
ALTER TABLE outbox.attempt DROP CONSTRAINT attempt_outcome_check;
ALTER TABLE outbox.attempt ADD CONSTRAINT attempt_outcome_check CHECK (
    outcome IN ('sent', 'retry', 'dead', 'skipped', 'fallback', 'deferred', 'failed',
                'cancelled', 'expired', 'superseded', 'escalated', 'acknowledged',
                'delivered', 'undelivered')
);
CREATE INDEX attempt_provider_idx ON outbox.attempt (channel, provider_id)
    WHERE provider_id IS NOT NULL;

-- ---------------------------------------------------------------------------
-- Enqueue and preferences check channel names against outbox.channel.
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
    -- The channels are rows of outbox.channel (plugins register theirs). Whether it
    -- is one is asked by the INSERT below, which writes nothing for an unknown one:
    -- a statement of its own would cost every enqueue an executor start (8 us).
    IF enqueue.channel IS NULL THEN
        RAISE EXCEPTION 'outbox: unknown channel NULL; see outbox.channel'
            USING ERRCODE = '22023';
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
       AND NOT enqueue.fallback <@ ARRAY(SELECT c.name FROM outbox.channel c) THEN
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
            -- a repeat is checked like a first call (only repeats pay this probe)
            IF NOT EXISTS (SELECT 1 FROM outbox.channel c WHERE c.name = enqueue.channel) THEN
                RAISE EXCEPTION 'outbox: unknown channel %; see outbox.channel',
                    left(enqueue.channel, 32) USING ERRCODE = '22023';
            END IF;
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
    SELECT enqueue.lane, v_priority, c.name, enqueue.user_id, enqueue.template,
           coalesce(enqueue.vars, '{}'::jsonb), enqueue.fallback,
           greatest(coalesce(enqueue.send_at, now()), now()), enqueue.idempotency_key,
           enqueue.expires_at, enqueue.collapse_key, enqueue.escalate_after
      FROM outbox.channel c
     WHERE c.name = enqueue.channel
    RETURNING id INTO v_id;
    IF v_id IS NULL THEN
        -- raising undoes what this call did (a collapse's withdrawals included)
        RAISE EXCEPTION 'outbox: unknown channel %; see outbox.channel', left(enqueue.channel, 32)
            USING ERRCODE = '22023';
    END IF;

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
    IF enqueue_many.channel IS NULL
       OR NOT EXISTS (SELECT 1 FROM outbox.channel c WHERE c.name = enqueue_many.channel) THEN
        RAISE EXCEPTION 'outbox: unknown channel %; see outbox.channel',
            left(enqueue_many.channel, 32) USING ERRCODE = '22023';
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
       OR NOT set_preference.channels <@ ARRAY(SELECT c.name FROM outbox.channel c) THEN
        -- name the first one the caller got wrong (the API shows this to users)
        RAISE EXCEPTION 'outbox: unknown channel % in channels %',
            quote_nullable((SELECT left(u.name, 32) FROM unnest(set_preference.channels) u(name)
                             WHERE u.name IS NULL OR NOT EXISTS (
                                 SELECT 1 FROM outbox.channel c WHERE c.name = u.name)
                             LIMIT 1)),
            left(set_preference.channels::text, 200)
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

-- ---------------------------------------------------------------------------
-- Channels, addresses and delivery reports: the functions.
-- ---------------------------------------------------------------------------
CREATE FUNCTION outbox.register_channel(name text) RETURNS boolean
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
-- A plugin's channel (OUTBOX_CHANNEL_PLUGINS) exists once it is a row here: then
-- producers may enqueue to it and users may have an address on it. Idempotent.
BEGIN
    IF register_channel.name IS NULL OR register_channel.name !~ '^[a-z][a-z0-9_]{0,31}$' THEN
        RAISE EXCEPTION 'outbox: a channel name is 1-32 characters of a-z, 0-9 and _, starting with a letter'
            USING ERRCODE = '22023';
    END IF;
    -- the key of Telegram's per-chat rate limit in OUTBOX_RATE_LIMITS
    IF register_channel.name = 'telegram_chat' THEN
        RAISE EXCEPTION 'outbox: telegram_chat is a reserved name' USING ERRCODE = '22023';
    END IF;
    INSERT INTO outbox.channel (name) VALUES (register_channel.name)
    ON CONFLICT ON CONSTRAINT channel_pkey DO NOTHING;
    RETURN FOUND;
END
$$;
COMMENT ON FUNCTION outbox.register_channel(text) IS
    'Add a channel (a plugin''s); true when it is new, false when it existed';

CREATE FUNCTION outbox.set_address(p_user_id text, p_channel text, p_address text) RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
-- A user's address on any channel; NULL removes it. A new address clears what the
-- provider said about the old one; the same address again keeps it (a bounce or a
-- STOP on that very address still holds). Addresses are not quoted in errors.
BEGIN
    IF p_user_id IS NULL OR p_user_id = '' OR length(p_user_id) > 255 THEN
        RAISE EXCEPTION 'outbox: user_id must be 1-255 characters' USING ERRCODE = '22023';
    END IF;
    IF p_channel IS NULL OR length(p_channel) > 32
       OR NOT EXISTS (SELECT 1 FROM outbox.channel c WHERE c.name = p_channel) THEN
        RAISE EXCEPTION 'outbox: unknown channel %', left(p_channel, 32) USING ERRCODE = '22023';
    END IF;
    IF p_channel = 'push' OR p_channel = 'inapp' THEN
        RAISE EXCEPTION 'outbox: channel % takes no address (push: add_push_subscription; inapp reaches every user)',
            p_channel USING ERRCODE = '22023';
    END IF;
    IF p_address IS NULL THEN
        DELETE FROM outbox.recipient_address a
         WHERE a.user_id = p_user_id AND a.channel = p_channel;
        RETURN;
    END IF;
    IF p_address = '' OR length(p_address) > 1024 OR p_address ~ '[[:cntrl:]]' THEN
        RAISE EXCEPTION 'outbox: an address must be 1-1024 characters without control characters'
            USING ERRCODE = '22023';
    END IF;
    IF p_channel = 'email'
       AND (p_address !~ '^[^@\s]+@[^@\s]+$' OR length(p_address) > 254) THEN
        RAISE EXCEPTION 'outbox: the email address is not an address' USING ERRCODE = '22023';
    END IF;
    IF p_channel = 'telegram' AND NOT (CASE WHEN p_address ~ '^-?(0|[1-9][0-9]{0,18})$'
           THEN p_address::numeric BETWEEN -9223372036854775808 AND 9223372036854775807
           ELSE false END) THEN
        RAISE EXCEPTION 'outbox: a Telegram chat id is a 64-bit integer' USING ERRCODE = '22023';
    END IF;
    IF p_channel = 'sms' AND p_address !~ '^\+[1-9][0-9]{6,14}$' THEN
        RAISE EXCEPTION 'outbox: a phone number must be E.164: + and 7-15 digits, no leading 0'
            USING ERRCODE = '22023';
    END IF;
    -- no conflict target: the owner may insert recipients but read none of them
    INSERT INTO outbox.recipient AS r (user_id) VALUES (p_user_id) ON CONFLICT DO NOTHING;
    INSERT INTO outbox.recipient_address AS a (user_id, channel, address)
    VALUES (p_user_id, p_channel, p_address)
    ON CONFLICT ON CONSTRAINT recipient_address_pkey DO UPDATE
        SET address = excluded.address,
            undeliverable_since = CASE WHEN a.address = excluded.address
                                       THEN a.undeliverable_since END,
            undeliverable_reason = CASE WHEN a.address = excluded.address
                                        THEN a.undeliverable_reason END,
            disabled_since = CASE WHEN a.address = excluded.address THEN a.disabled_since END,
            updated_at = now();
END
$$;
COMMENT ON FUNCTION outbox.set_address(text, text, text) IS
    'Set (or with NULL remove) a user''s address on a channel; creates the recipient';

CREATE FUNCTION outbox.record_delivery_report(
    p_channel text,
    p_provider_id text,
    p_delivered boolean,
    p_error_code text,
    p_permanent boolean
) RETURNS bigint
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
-- A provider's later word on a message it accepted (an SMS status callback): one
-- attempt row 'delivered' or 'undelivered' for the message whose 'sent' attempt
-- carries p_provider_id. Providers retry their callbacks: the same report again
-- writes nothing. A permanent failure marks the user's address undeliverable.
-- Returns the message id; NULL when no message was sent with that id.
DECLARE
    v_sent    record;
    v_outcome text := CASE WHEN p_delivered THEN 'delivered' ELSE 'undelivered' END;
BEGIN
    IF p_channel IS NULL OR length(p_channel) > 32
       OR NOT EXISTS (SELECT 1 FROM outbox.channel c WHERE c.name = p_channel) THEN
        RAISE EXCEPTION 'outbox: unknown channel %', left(p_channel, 32) USING ERRCODE = '22023';
    END IF;
    IF p_provider_id IS NULL OR p_provider_id = '' OR length(p_provider_id) > 255
       OR p_provider_id ~ '[[:cntrl:]]' THEN
        RAISE EXCEPTION 'outbox: provider_id must be 1-255 characters without control characters'
            USING ERRCODE = '22023';
    END IF;
    IF p_delivered IS NULL THEN
        RAISE EXCEPTION 'outbox: delivered must be true or false' USING ERRCODE = '22023';
    END IF;
    IF p_error_code IS NOT NULL AND p_error_code !~ '^[A-Za-z0-9_.:-]{1,64}$' THEN
        RAISE EXCEPTION 'outbox: error_code must be 1-64 characters of A-Z, a-z, 0-9 and _.:-'
            USING ERRCODE = '22023';
    END IF;
    SELECT a.message_id, a.lane, a.user_id, a.template, a.attempt, a.is_test, a.enqueued_by
      INTO v_sent
      FROM outbox.attempt a
     WHERE a.channel = p_channel AND a.provider_id = p_provider_id AND a.outcome = 'sent'
     ORDER BY a.id DESC
     LIMIT 1;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    -- two deliveries of the same callback at once: the second waits, then sees the first
    PERFORM pg_advisory_xact_lock(hashtext('outbox.record_delivery_report'),
                                  hashtext(p_channel || ' ' || p_provider_id));
    IF EXISTS (SELECT 1 FROM outbox.attempt a
                WHERE a.channel = p_channel AND a.provider_id = p_provider_id
                  AND a.outcome = v_outcome) THEN
        RETURN v_sent.message_id;
    END IF;
    INSERT INTO outbox.attempt (message_id, lane, channel, user_id, template, attempt, outcome,
                                error_class, error, provider_id, is_test, enqueued_by)
    VALUES (v_sent.message_id, v_sent.lane, p_channel, v_sent.user_id, v_sent.template,
            v_sent.attempt, v_outcome,
            CASE WHEN p_delivered THEN NULL
                 WHEN p_permanent THEN 'undeliverable' ELSE 'undelivered' END,
            CASE WHEN p_error_code IS NOT NULL THEN 'provider error ' || p_error_code END,
            p_provider_id, v_sent.is_test, v_sent.enqueued_by);
    IF NOT p_delivered AND coalesce(p_permanent, false) THEN
        UPDATE outbox.recipient_address a
           SET undeliverable_since = now(),
               undeliverable_reason = 'provider error ' || coalesce(p_error_code, 'unknown'),
               updated_at = now()
         WHERE a.user_id = v_sent.user_id AND a.channel = p_channel
           AND a.undeliverable_since IS NULL;
    END IF;
    RETURN v_sent.message_id;
END
$$;
COMMENT ON FUNCTION outbox.record_delivery_report(text, text, boolean, text, boolean) IS
    'Log a provider''s delivery report (delivered or undelivered) for the message it names; idempotent';

CREATE FUNCTION outbox.mark_address_undeliverable(p_channel text, p_address text, p_reason text)
RETURNS integer
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
-- A provider reports an address dead after it accepted a message (a hard bounce,
-- a complaint): every user with that address on that channel stops being sent
-- there. Addresses compare case-insensitively (mail providers report them as
-- they like). Returns how many users it marked; a repeated report marks none.
DECLARE
    v_count integer;
BEGIN
    IF p_channel IS NULL OR length(p_channel) > 32
       OR NOT EXISTS (SELECT 1 FROM outbox.channel c WHERE c.name = p_channel) THEN
        RAISE EXCEPTION 'outbox: unknown channel %', left(p_channel, 32) USING ERRCODE = '22023';
    END IF;
    IF p_address IS NULL OR p_address = '' OR length(p_address) > 1024 THEN
        RAISE EXCEPTION 'outbox: an address must be 1-1024 characters' USING ERRCODE = '22023';
    END IF;
    IF length(p_reason) > 500 THEN
        RAISE EXCEPTION 'outbox: reason must be at most 500 characters' USING ERRCODE = '22023';
    END IF;
    UPDATE outbox.recipient_address a
       SET undeliverable_since = now(),
           undeliverable_reason = regexp_replace(p_reason, '[[:cntrl:]]', ' ', 'g'),
           updated_at = now()
     WHERE a.channel = p_channel AND lower(a.address) = lower(p_address)
       AND a.undeliverable_since IS NULL;
    GET DIAGNOSTICS v_count = ROW_COUNT;
    RETURN v_count;
END
$$;
COMMENT ON FUNCTION outbox.mark_address_undeliverable(text, text, text) IS
    'Mark every user''s address on a channel undeliverable (bounce webhooks); returns the count marked';

-- ---------------------------------------------------------------------------
-- Privileges of the new and rebuilt tables and functions.
-- ---------------------------------------------------------------------------
REVOKE ALL ON outbox.channel, outbox.recipient, outbox.recipient_address FROM PUBLIC;
REVOKE ALL ON FUNCTION outbox._check_recipient_channels(), outbox.register_channel(text),
    outbox.set_address(text, text, text),
    outbox.record_delivery_report(text, text, boolean, text, boolean),
    outbox.mark_address_undeliverable(text, text, text) FROM PUBLIC;
-- outbox.recipient as outbox_0009 granted it
GRANT SELECT, UPDATE ON outbox.recipient TO outbox_dispatcher;
GRANT SELECT (user_id, updated_at) ON outbox.recipient TO outbox_operator;
GRANT SELECT, INSERT, UPDATE ON outbox.recipient TO outbox_recipient_writer;
-- set_address creates the recipient it addresses (INSERT ... ON CONFLICT DO NOTHING:
-- the owner still reads no recipient's settings)
GRANT INSERT ON outbox.recipient TO outbox_owner;
-- everybody who checks a channel name reads the list
GRANT SELECT ON outbox.channel TO outbox_dispatcher, outbox_operator, outbox_inspector,
    outbox_recipient_writer;
GRANT SELECT, INSERT ON outbox.channel TO outbox_owner;
-- addresses: the service that registers users writes them, the dispatcher reads them
-- and records what providers say; operators see which ones were refused, not the
-- addresses themselves
GRANT SELECT, INSERT, UPDATE, DELETE ON outbox.recipient_address TO outbox_recipient_writer;
GRANT SELECT, UPDATE ON outbox.recipient_address TO outbox_dispatcher;
GRANT SELECT, INSERT, UPDATE, DELETE ON outbox.recipient_address TO outbox_owner;
GRANT SELECT (user_id, channel, undeliverable_since, undeliverable_reason, disabled_since,
              updated_at)
    ON outbox.recipient_address TO outbox_operator;
GRANT EXECUTE ON FUNCTION outbox.register_channel(text) TO outbox_operator;
GRANT EXECUTE ON FUNCTION outbox.set_address(text, text, text) TO outbox_recipient_writer;
-- the API's webhooks run as outbox_dispatcher
GRANT EXECUTE ON FUNCTION
    outbox.record_delivery_report(text, text, boolean, text, boolean),
    outbox.mark_address_undeliverable(text, text, text)
    TO outbox_dispatcher;
GRANT CREATE ON SCHEMA outbox TO outbox_owner;
ALTER FUNCTION outbox._check_recipient_channels() OWNER TO outbox_owner;
ALTER FUNCTION outbox.register_channel(text) OWNER TO outbox_owner;
ALTER FUNCTION outbox.set_address(text, text, text) OWNER TO outbox_owner;
ALTER FUNCTION outbox.record_delivery_report(text, text, boolean, text, boolean)
    OWNER TO outbox_owner;
ALTER FUNCTION outbox.mark_address_undeliverable(text, text, text) OWNER TO outbox_owner;
REVOKE CREATE ON SCHEMA outbox FROM outbox_owner;
