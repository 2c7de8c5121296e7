-- outbox: the current state of the database schema.
--
-- This file is the truth about what a migrated database looks like. Alembic
-- revisions in migrations/ are the history that gets an existing database here;
-- tests/integration/test_migrations.py asserts that both produce the same catalog.
--
-- Everything lives in the schema `outbox`. These roles are created (cluster-wide,
-- NOLOGIN; the login roles are granted the first five by the database's operator):
--   outbox_producer          may call outbox.enqueue / outbox.enqueue_many, nothing else
--   outbox_recipient_writer  creates and updates recipients and push subscriptions
--   outbox_dispatcher        claims, finishes and logs messages; reads recipients
--   outbox_operator          reads dead letters and delivery history; redrives, purges,
--                            prunes (never enqueues, never reads addresses)
--   outbox_inspector         reads the operator views, nothing else
--   outbox_owner             owns the functions: the SECURITY DEFINER ones run with
--                            exactly its table privileges; nobody logs in as it

CREATE SCHEMA outbox;
COMMENT ON SCHEMA outbox IS 'Transactional outbox for trading notifications';

DO $roles$
DECLARE
    role_name text;
BEGIN
    -- Roles belong to the cluster: two databases migrated at the same time may race
    -- to create them, and the loser waits for the winner, then finds them there.
    FOREACH role_name IN ARRAY ARRAY['outbox_producer', 'outbox_dispatcher', 'outbox_inspector',
                                     'outbox_owner', 'outbox_operator',
                                     'outbox_recipient_writer']
    LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = role_name) THEN
            BEGIN
                EXECUTE format('CREATE ROLE %I NOLOGIN', role_name);
            EXCEPTION WHEN duplicate_object OR unique_violation THEN
                NULL;
            END;
        END IF;
    END LOOP;
END
$roles$;

-- ---------------------------------------------------------------------------
-- The hot table. Delivered rows are deleted, so it only holds work that is
-- pending, in flight or dead.
-- ---------------------------------------------------------------------------
CREATE TABLE outbox.message (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    lane            text        NOT NULL,
    priority        smallint    NOT NULL,
    channel         text        NOT NULL,
    user_id         text        NOT NULL,
    template        text        NOT NULL,
    vars            jsonb       NOT NULL DEFAULT '{}',
    fallback        text[],
    status          text        NOT NULL DEFAULT 'pending',
    attempts        integer     NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    lease_token     uuid,
    leased_until    timestamptz,
    leased_by       text,
    last_error      text,
    error_class     text,
    idempotency_key text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    dead_at         timestamptz,
    expires_at      timestamptz,
    collapse_key    text,
    escalate_after  interval,
    sent_at         timestamptz,
    acknowledged_at timestamptz,
    enqueued_by     oid DEFAULT to_regrole(quote_ident(session_user)),
    -- Only the state invariants are constraints. PostgreSQL parses and plans every
    -- CHECK expression again for each INSERT statement, which costs a single-row
    -- enqueue more than the insert itself (measured: 11 constraints, about 30 us of
    -- a 57 us enqueue); the rules for what a producer may write (lane, priority,
    -- channel, user id, template name, vars, fallback) are enforced by
    -- outbox.enqueue and outbox.enqueue_many, the only write path producers have.
    CONSTRAINT message_status_check CHECK (status IN ('pending', 'sending', 'dead', 'awaiting_ack')),
    -- a lease exists exactly while the message is being sent
    CONSTRAINT message_lease_iff_sending CHECK (
        (status = 'sending') = (lease_token IS NOT NULL)
        AND (lease_token IS NULL) = (leased_until IS NULL)
    ),
    CONSTRAINT message_dead_at_iff_dead CHECK ((status = 'dead') = (dead_at IS NOT NULL))
);
COMMENT ON TABLE outbox.message IS
    'Messages waiting, in flight or dead; delivered messages are deleted (see outbox.attempt)';
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

-- The claim reads this index only: dead and leased rows are not in it.
CREATE INDEX message_claim_idx ON outbox.message (priority, next_attempt_at, id)
    WHERE status = 'pending';
-- Leases that expired (a dispatcher died) are found through this one.
CREATE INDEX message_lease_idx ON outbox.message (leased_until)
    WHERE status = 'sending';
CREATE INDEX message_dead_idx ON outbox.message (dead_at)
    WHERE status = 'dead';
-- Alerts whose escalation is due (status awaiting_ack: sent, waiting for the user;
-- next_attempt_at is when it escalates); the claim reads it next to message_claim_idx.
CREATE INDEX message_ack_due_idx ON outbox.message (next_attempt_at)
    WHERE status = 'awaiting_ack';
-- Collapse: the pending messages an enqueue with a collapse_key withdraws.
CREATE INDEX message_collapse_idx ON outbox.message (user_id, collapse_key)
    WHERE collapse_key IS NOT NULL AND status = 'pending';

-- A queue table: every message leaves two dead row versions (the claim's update,
-- the delivery's delete) and dead claim-index entries at the head of the queue,
-- where every claim starts reading. Vacuum it by the number of dead rows, not by
-- the table's size (it holds little live data), and without cost-based pauses.
-- These settings need autovacuum itself to be on (the server's `autovacuum`).
ALTER TABLE outbox.message SET (
    autovacuum_vacuum_scale_factor = 0,
    autovacuum_vacuum_threshold = 10000,
    autovacuum_vacuum_cost_delay = 0,
    autovacuum_analyze_scale_factor = 0,
    autovacuum_analyze_threshold = 10000
);

-- ---------------------------------------------------------------------------
-- Idempotency keys outlive delivered messages, so they have their own table.
-- A key's dedup window is fixed when it is first used: expires_at is stored with
-- it, and no later enqueue can shorten, reset or take over the key before then.
-- ---------------------------------------------------------------------------
CREATE TABLE outbox.idempotency_key (
    key        text        NOT NULL,
    message_id bigint      NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL,
    -- the login role that used the key: keys are per producer (outbox_0011)
    producer   oid         NOT NULL,
    CONSTRAINT idempotency_key_pkey PRIMARY KEY (producer, key),
    CONSTRAINT idempotency_key_length CHECK (key <> '' AND length(key) <= 255)
);
COMMENT ON COLUMN outbox.idempotency_key.producer IS
    'The login role that used the key (its oid, as outbox.message.enqueued_by): keys are per producer';
CREATE INDEX idempotency_key_expires_idx ON outbox.idempotency_key (expires_at);

-- ---------------------------------------------------------------------------
-- The delivery log: one row per attempt and outcome. Append-only.
-- ---------------------------------------------------------------------------
CREATE TABLE outbox.attempt (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    message_id    bigint      NOT NULL,
    lane          text        NOT NULL,
    channel       text        NOT NULL,
    user_id       text        NOT NULL,
    template      text        NOT NULL,
    attempt       integer     NOT NULL,
    outcome       text        NOT NULL,
    error_class   text,
    error         text,
    duration_ms   double precision,
    dispatcher_id text,
    is_test       boolean     NOT NULL DEFAULT false,
    created_at    timestamptz NOT NULL DEFAULT now(),
    enqueued_by   oid,
    provider_id   text,
    CONSTRAINT attempt_outcome_check CHECK (
        outcome IN ('sent', 'retry', 'dead', 'skipped', 'fallback', 'deferred', 'failed',
                    'cancelled', 'expired', 'superseded', 'escalated', 'acknowledged',
                    'delivered', 'undelivered')
    )
);
COMMENT ON TABLE outbox.attempt IS 'Append-only delivery log, one row per attempt and outcome';
COMMENT ON COLUMN outbox.attempt.enqueued_by IS
    'The message''s outbox.message.enqueued_by: status stays scoped after the row is gone';
CREATE INDEX attempt_message_idx ON outbox.attempt (message_id);
CREATE INDEX attempt_created_idx ON outbox.attempt USING brin (created_at);
COMMENT ON COLUMN outbox.attempt.provider_id IS
    'The provider''s id of the message (Sent.provider_id): delivery reports find it by this';
CREATE INDEX attempt_provider_idx ON outbox.attempt (channel, provider_id)
    WHERE provider_id IS NOT NULL;

-- ---------------------------------------------------------------------------
-- Recipients and their addresses and preferences.
-- ---------------------------------------------------------------------------
-- Which channels exist: the built-ins, and those plugins registered.
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
    -- outbox.recipient_address as the claim returns it, kept by triggers (outbox_0012)
    addresses              json        NOT NULL DEFAULT '[]',
    CONSTRAINT recipient_user_id_check CHECK (user_id <> '' AND length(user_id) <= 255),
    CONSTRAINT recipient_quiet_hours_pair CHECK (
        (quiet_hours_start IS NULL) = (quiet_hours_end IS NULL)
    )
);
COMMENT ON TABLE outbox.recipient IS
    'A user''s delivery settings; the addresses are in outbox.recipient_address and outbox.push_subscription';
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

-- Each recipient row carries its addresses as the claim returns them (outbox_0012):
-- the claim reads one column instead of aggregating address rows per message.
-- outbox.recipient_address stays the truth; the cache cannot drift or be forged.
COMMENT ON COLUMN outbox.recipient.addresses IS
    'The user''s outbox.recipient_address rows as the claim returns them, [[channel, '
    'address, usable], ...]: computed by a trigger, whatever a statement writes here';

CREATE FUNCTION outbox._recipient_addresses() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
-- BEFORE INSERT OR UPDATE ON outbox.recipient: the cache from the truth. Runs with
-- the row locked, and (READ COMMITTED) its query takes a fresh snapshot: it sees
-- every address committed before the lock was granted.
BEGIN
    NEW.addresses := coalesce(
        (SELECT json_agg(json_build_array(a.channel, a.address,
                                          a.undeliverable_since IS NULL
                                          AND a.disabled_since IS NULL)
                         ORDER BY a.channel)
           FROM outbox.recipient_address a WHERE a.user_id = NEW.user_id),
        '[]');
    RETURN NEW;
END
$$;
COMMENT ON FUNCTION outbox._recipient_addresses() IS
    'Trigger: outbox.recipient.addresses from outbox.recipient_address';
CREATE TRIGGER recipient_addresses_cache
    BEFORE INSERT OR UPDATE ON outbox.recipient
    FOR EACH ROW EXECUTE FUNCTION outbox._recipient_addresses();

CREATE FUNCTION outbox._touch_recipient() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
-- AFTER a change of outbox.recipient_address: update the recipient row, whose
-- BEFORE trigger recomputes its addresses. A recipient being deleted (the cascade
-- that deletes its addresses) is not found: nothing to do.
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        UPDATE outbox.recipient r SET addresses = '[]' WHERE json_array_length(r.addresses) > 0;
        RETURN NULL;
    END IF;
    IF TG_OP <> 'INSERT' THEN
        UPDATE outbox.recipient r SET addresses = '[]' WHERE r.user_id = OLD.user_id;
    END IF;
    IF TG_OP <> 'DELETE' AND (TG_OP = 'INSERT' OR NEW.user_id <> OLD.user_id) THEN
        UPDATE outbox.recipient r SET addresses = '[]' WHERE r.user_id = NEW.user_id;
    END IF;
    RETURN NULL;
END
$$;
COMMENT ON FUNCTION outbox._touch_recipient() IS
    'Trigger: a changed address recomputes its recipient''s outbox.recipient.addresses';
CREATE TRIGGER recipient_address_touch
    AFTER INSERT OR UPDATE OR DELETE ON outbox.recipient_address
    FOR EACH ROW EXECUTE FUNCTION outbox._touch_recipient();
CREATE TRIGGER recipient_address_truncate
    AFTER TRUNCATE ON outbox.recipient_address
    FOR EACH STATEMENT EXECUTE FUNCTION outbox._touch_recipient();

REVOKE ALL ON FUNCTION outbox._recipient_addresses(), outbox._touch_recipient() FROM PUBLIC;

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

CREATE TABLE outbox.push_subscription (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id      text        NOT NULL,
    endpoint     text        NOT NULL UNIQUE,
    p256dh       text        NOT NULL,
    auth         text        NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    last_used_at timestamptz,
    CONSTRAINT push_subscription_endpoint_https CHECK (
        endpoint ~ '^https://' AND length(endpoint) <= 2048
    )
);
CREATE INDEX push_subscription_user_idx ON outbox.push_subscription (user_id);

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

-- ---------------------------------------------------------------------------
-- Dispatcher coordination.
-- ---------------------------------------------------------------------------

-- Idle dispatchers register here before they wait on LISTEN; producers only pay
-- for a NOTIFY while this table has a row (see outbox.enqueue).
CREATE TABLE outbox.sleeper (
    dispatcher_id text        PRIMARY KEY,
    since         timestamptz NOT NULL DEFAULT now()
);

-- Cluster-wide rate limits (dispatcher/_limits.py): send calendars, a row per
-- taken slot, and recipient paces, a row per recipient with its next allowed send.
CREATE TABLE outbox.rate_limit (
    key        text             PRIMARY KEY,
    tokens     double precision NOT NULL DEFAULT 0,
    updated_at timestamptz      NOT NULL DEFAULT clock_timestamp()
);

COMMENT ON TABLE outbox.rate_limit IS
    'Send calendars (key slot:<limit>:<n>, one send each, at updated_at) and recipient paces '
    '(key pace:<...>, next send not before updated_at), shared by every dispatcher replica';
COMMENT ON COLUMN outbox.rate_limit.tokens IS
    'Unused (always 0); kept for dispatchers older than outbox_0007, dropped by a later revision';

-- Channel-wide circuit breaker: while paused_until is in the future no
-- dispatcher sends on the channel except one probe.
CREATE TABLE outbox.channel_state (
    channel      text        PRIMARY KEY,
    failures     integer     NOT NULL DEFAULT 0,
    paused_until timestamptz,
    last_error   text,
    updated_at   timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT channel_state_channel_fkey FOREIGN KEY (channel) REFERENCES outbox.channel
);

-- ---------------------------------------------------------------------------
-- The producer interface: callable from any language.
-- ---------------------------------------------------------------------------

-- Wake sleeping dispatchers, but only if one is asleep: under load nobody sleeps
-- and producers' commits never take NOTIFY's global lock.
CREATE FUNCTION outbox._wake_dispatchers() RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM outbox.sleeper) THEN
        PERFORM pg_notify('outbox_wakeup', '');
    END IF;
END
$$;

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
    v_window   interval;
    v_size     integer;
    v_producer oid;
BEGIN
    -- The common call, without options, is one expression and one statement. Each
    -- PL/pgSQL expression is prepared again in every transaction (for a producer:
    -- on every call), so the input rules are asked at once: one expression that is
    -- true only if every rule below holds for a call without options. A NULL (an
    -- argument missing) or false goes the long way, where each rule is checked on
    -- its own and says what is wrong.
    -- (the options first: a call with one stops there, before the costlier rules)
    IF (enqueue.idempotency_key IS NULL AND enqueue.send_at IS NULL
        AND enqueue.fallback IS NULL AND enqueue.expires_at IS NULL
        AND enqueue.collapse_key IS NULL AND enqueue.escalate_after IS NULL
        AND enqueue.channel IS NOT NULL
        AND enqueue.user_id <> '' AND length(enqueue.user_id) <= 255
        -- the rule below, without its {1,100}: a bounded repeat costs the regex
        -- engine about 8 us per call (measured), a length() nothing
        AND length(enqueue.template) <= 100 AND enqueue.template ~ '^[a-z0-9_]+$'
        AND (enqueue.vars IS NULL
             OR (jsonb_typeof(enqueue.vars) = 'object'
                 -- uncompressed and under 256 bytes: within the size and depth limits
                 AND pg_column_compression(enqueue.vars) IS NULL
                 AND pg_column_size(enqueue.vars) < 256))
        AND ((enqueue.lane = 'transactional' AND coalesce(enqueue.priority, 0) BETWEEN 0 AND 99)
             OR (enqueue.lane = 'campaign'
                 AND coalesce(enqueue.priority, 100) BETWEEN 100 AND 199))
        AND (enqueue.dedup_window IS NULL
             OR enqueue.dedup_window BETWEEN interval '1 second' AND interval '30 days')) IS TRUE
    THEN
        -- The channel is checked by the join (no row: unknown), and the sleeper to
        -- wake is looked up by the same statement: a statement of its own would cost
        -- every enqueue an executor start.
        INSERT INTO outbox.message (lane, priority, channel, user_id, template, vars,
                                    next_attempt_at)
        SELECT enqueue.lane,
               coalesce(enqueue.priority,
                        CASE enqueue.lane WHEN 'transactional' THEN 0 ELSE 100 END),
               c.name, enqueue.user_id, enqueue.template,
               coalesce(enqueue.vars, '{}'::jsonb), now()
          FROM outbox.channel c
         WHERE c.name = enqueue.channel
        RETURNING id,
                  (SELECT s.dispatcher_id FROM outbox.sleeper s ORDER BY s.since DESC LIMIT 1)
             INTO v_id, v_sleeper;
        IF v_id IS NULL THEN
            RAISE EXCEPTION 'outbox: unknown channel %; see outbox.channel',
                left(enqueue.channel, 32) USING ERRCODE = '22023';
        END IF;
        -- as below: wake the sleeper that registered or renewed last, if any
        IF v_sleeper IS NOT NULL THEN
            PERFORM pg_notify('outbox_wakeup', v_sleeper);
        END IF;
        RETURN v_id;
    END IF;

    v_window := coalesce(enqueue.dedup_window, interval '24 hours');
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
        -- Keys belong to the producer (the login role) that used them: another team
        -- cannot take a key first and so swallow this one's message, nor learn the id
        -- of a message it did not write.
        v_producer := to_regrole(quote_ident(session_user));
        SELECT k.message_id INTO v_existing
          FROM outbox.idempotency_key k
         WHERE k.producer = v_producer AND k.key = enqueue.idempotency_key
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
        v_producer := coalesce(v_producer, to_regrole(quote_ident(session_user)));
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
        INSERT INTO outbox.idempotency_key AS k (key, message_id, expires_at, producer)
        VALUES (enqueue.idempotency_key, v_id, now() + v_window, v_producer)
        ON CONFLICT (producer, key) DO UPDATE
            SET message_id = excluded.message_id, created_at = now(),
                expires_at = excluded.expires_at
            WHERE k.expires_at <= now()
        RETURNING k.message_id INTO v_existing;
        IF v_existing IS NULL THEN
            DELETE FROM outbox.message m WHERE m.id = v_id;
            SELECT k.message_id INTO v_existing
              FROM outbox.idempotency_key k
             WHERE k.producer = v_producer AND k.key = enqueue.idempotency_key;
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

-- Many messages of one template in one statement (campaigns). vars_list holds
-- either one object for everybody or one object per user id.
CREATE FUNCTION outbox.enqueue_many(
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

-- ---------------------------------------------------------------------------
-- The operator interface.
-- ---------------------------------------------------------------------------
CREATE VIEW outbox.dead_letter AS
SELECT id, lane, channel, user_id, template, attempts, error_class, last_error,
       created_at, dead_at, vars
  FROM outbox.message
 WHERE status = 'dead';
COMMENT ON VIEW outbox.dead_letter IS 'One row per dead message; redrive with outbox.retry_dead';

CREATE VIEW outbox.queue_stats AS
SELECT lane, channel, status,
       count(*)::bigint AS count,
       min(CASE status WHEN 'dead' THEN dead_at ELSE created_at END) AS oldest_at,
       extract(epoch FROM now() - min(CASE status WHEN 'dead' THEN dead_at
                                                  ELSE created_at END))::double precision
           AS oldest_age_seconds
  FROM outbox.message
 GROUP BY lane, channel, status;
COMMENT ON VIEW outbox.queue_stats IS 'Per lane, channel and status: count and age of the oldest';

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

CREATE FUNCTION outbox.retry_dead(ids bigint[] DEFAULT NULL) RETURNS integer
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
COMMENT ON FUNCTION outbox.retry_dead(bigint[]) IS
    'Dead messages back to pending with attempts reset; NULL means all; returns the count';

CREATE FUNCTION outbox.purge_dead(older_than interval) RETURNS integer
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
COMMENT ON FUNCTION outbox.purge_dead(interval) IS
    'Delete dead messages that died longer ago than older_than; returns the count';

CREATE FUNCTION outbox.prune_history(older_than interval) RETURNS integer
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
COMMENT ON FUNCTION outbox.prune_history(interval) IS
    'Retention: delete attempt rows older than older_than and idempotency keys past their window';

-- ---------------------------------------------------------------------------
-- Cancel, acknowledge, status, preferences (DESIGN section 9).
-- ---------------------------------------------------------------------------
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

CREATE FUNCTION outbox.acknowledge(message_id bigint) RETURNS boolean
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
COMMENT ON FUNCTION outbox.set_preference(text, text, text[], text) IS
    'Deliver messages of topic (optionally only for vars.instrument) only on channels; NULL forgets';

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
-- Privileges. Functions are executable by PUBLIC by default; take that back.
-- ---------------------------------------------------------------------------
REVOKE ALL ON SCHEMA outbox FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA outbox FROM PUBLIC;
REVOKE ALL ON ALL TABLES IN SCHEMA outbox FROM PUBLIC;

GRANT USAGE ON SCHEMA outbox TO outbox_producer, outbox_dispatcher, outbox_inspector;
GRANT USAGE ON SCHEMA outbox TO outbox_owner, outbox_operator, outbox_recipient_writer;

-- Producers: the two enqueue functions, nothing else.
GRANT EXECUTE ON FUNCTION
    outbox.enqueue(text, text, text, jsonb, text, text, timestamptz, smallint, text[], interval,
                   timestamptz, text, interval),
    outbox.enqueue_many(text, text, text[], jsonb[], text, timestamptz, smallint)
    TO outbox_producer, outbox_dispatcher;

-- Dispatchers: claim, finish, log, follow the recipients' addresses.
GRANT SELECT, INSERT, UPDATE, DELETE ON
    outbox.message, outbox.sleeper, outbox.rate_limit, outbox.channel_state,
    outbox.push_subscription
    TO outbox_dispatcher;
GRANT SELECT, UPDATE ON outbox.recipient TO outbox_dispatcher;
GRANT SELECT, INSERT ON outbox.attempt TO outbox_dispatcher;
GRANT SELECT ON outbox.dead_letter, outbox.queue_stats TO outbox_dispatcher;
GRANT EXECUTE ON FUNCTION outbox._wake_dispatchers() TO outbox_dispatcher;

GRANT SELECT ON outbox.dead_letter, outbox.queue_stats TO outbox_inspector;

-- The functions' owner: exactly the table privileges the SECURITY DEFINER functions
-- use (enqueue, enqueue_many, retry_dead, purge_dead, prune_history).
GRANT SELECT, INSERT, UPDATE, DELETE ON outbox.message, outbox.idempotency_key TO outbox_owner;
GRANT SELECT, DELETE ON outbox.attempt TO outbox_owner;
GRANT SELECT ON outbox.sleeper TO outbox_owner;

-- Operators (on call): the dead letters, the delivery history, which recipients the
-- providers refused (not their addresses), and redrive, purge and retention.
GRANT SELECT ON outbox.dead_letter, outbox.queue_stats, outbox.attempt TO outbox_operator;
GRANT SELECT (user_id, updated_at) ON outbox.recipient TO outbox_operator;
GRANT EXECUTE ON FUNCTION
    outbox.retry_dead(bigint[]), outbox.purge_dead(interval), outbox.prune_history(interval)
    TO outbox_operator;

-- The service that registers users: recipients and their push subscriptions
-- (outbox.upsert_recipient, outbox.add_push_subscription in Python).
GRANT SELECT, INSERT, UPDATE ON outbox.recipient, outbox.push_subscription
    TO outbox_recipient_writer;

-- Every function belongs to outbox_owner, not to whoever ran the migration (often a
-- superuser): a SECURITY DEFINER function runs with its owner's privileges.
ALTER FUNCTION outbox._wake_dispatchers() OWNER TO outbox_owner;
ALTER FUNCTION outbox.enqueue(text, text, text, jsonb, text, text, timestamptz, smallint,
                              text[], interval, timestamptz, text, interval) OWNER TO outbox_owner;
ALTER FUNCTION outbox.enqueue_many(text, text, text[], jsonb[], text, timestamptz, smallint)
    OWNER TO outbox_owner;
ALTER FUNCTION outbox.retry_dead(bigint[]) OWNER TO outbox_owner;
ALTER FUNCTION outbox.purge_dead(interval) OWNER TO outbox_owner;
ALTER FUNCTION outbox.prune_history(interval) OWNER TO outbox_owner;

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

ALTER FUNCTION outbox.cancel(bigint) OWNER TO outbox_owner;
ALTER FUNCTION outbox.acknowledge(bigint) OWNER TO outbox_owner;
ALTER FUNCTION outbox.message_status(bigint) OWNER TO outbox_owner;
ALTER FUNCTION outbox.message_state(bigint) OWNER TO outbox_owner;
ALTER FUNCTION outbox.message_attempts(bigint) OWNER TO outbox_owner;
ALTER FUNCTION outbox.set_preference(text, text, text[], text) OWNER TO outbox_owner;
ALTER FUNCTION outbox._sees_all(boolean) OWNER TO outbox_owner;

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
ALTER FUNCTION outbox.remove_push_subscription(text, text) OWNER TO outbox_owner;
ALTER FUNCTION outbox._acknowledge_seen(bigint) OWNER TO outbox_owner;
ALTER FUNCTION outbox.read_inbox_item(text, bigint) OWNER TO outbox_owner;
ALTER FUNCTION outbox.read_all_inbox_items(text) OWNER TO outbox_owner;
GRANT SELECT ON outbox.unacknowledged_alert TO outbox_operator, outbox_inspector, outbox_dispatcher;
-- The API (outbox_dispatcher) writes a user's own preferences (PUT /api/v1/preferences).
GRANT EXECUTE ON FUNCTION outbox.set_preference(text, text, text[], text) TO outbox_dispatcher;

-- Channels as data (outbox_0010).
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
-- outbox_0012: the address cache's triggers read the addresses and write that column alone
GRANT SELECT (user_id, addresses), UPDATE (addresses) ON outbox.recipient TO outbox_owner;
ALTER FUNCTION outbox._recipient_addresses() OWNER TO outbox_owner;
ALTER FUNCTION outbox._touch_recipient() OWNER TO outbox_owner;
ALTER FUNCTION outbox.set_address(text, text, text) OWNER TO outbox_owner;
ALTER FUNCTION outbox.record_delivery_report(text, text, boolean, text, boolean)
    OWNER TO outbox_owner;
ALTER FUNCTION outbox.mark_address_undeliverable(text, text, text) OWNER TO outbox_owner;
REVOKE CREATE ON SCHEMA outbox FROM outbox_owner;
