-- Undo outbox_0002: back to the constraints and functions of outbox_0001.

ALTER TABLE outbox.message
    ADD CONSTRAINT message_lane_check CHECK (lane IN ('transactional', 'campaign')),
    ADD CONSTRAINT message_priority_in_lane CHECK ( (lane = 'transactional' AND priority BETWEEN 0 AND 99) OR (lane = 'campaign' AND priority BETWEEN 100 AND 199) ),
    ADD CONSTRAINT message_channel_check CHECK (channel IN ('email', 'telegram', 'push')),
    ADD CONSTRAINT message_user_id_check CHECK (user_id <> '' AND length(user_id) <= 255),
    ADD CONSTRAINT message_template_check CHECK (template ~ '^[a-z0-9_]{1,100}$'),
    ADD CONSTRAINT message_vars_is_object CHECK (jsonb_typeof(vars) = 'object'),
    ADD CONSTRAINT message_fallback_channels CHECK ( fallback IS NULL OR fallback <@ ARRAY['email', 'telegram', 'push']::text[] ),
    ADD CONSTRAINT message_attempts_check CHECK (attempts >= 0);

CREATE FUNCTION outbox._insert_message(
    p_channel text, p_template text, p_user_id text, p_vars jsonb, p_lane text,
    p_idempotency_key text, p_send_at timestamptz, p_priority smallint,
    p_fallback text[], p_dedup_window interval
) RETURNS bigint
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_id       bigint;
    v_existing bigint;
BEGIN
    IF p_lane IS NULL OR p_lane NOT IN ('transactional', 'campaign') THEN
        RAISE EXCEPTION 'outbox: unknown lane %; expected transactional or campaign', p_lane
            USING ERRCODE = '22023';
    END IF;
    IF p_channel IS NULL OR p_channel NOT IN ('email', 'telegram', 'push') THEN
        RAISE EXCEPTION 'outbox: unknown channel %; expected email, telegram or push', p_channel
            USING ERRCODE = '22023';
    END IF;
    IF p_user_id IS NULL OR p_user_id = '' THEN
        RAISE EXCEPTION 'outbox: user_id must be a non-empty string' USING ERRCODE = '22023';
    END IF;

    IF p_idempotency_key IS NOT NULL THEN
        SELECT message_id INTO v_existing
          FROM outbox.idempotency_key
         WHERE key = p_idempotency_key AND created_at > now() - p_dedup_window;
        IF FOUND THEN
            RETURN v_existing;
        END IF;
    END IF;

    INSERT INTO outbox.message (lane, priority, channel, user_id, template, vars,
                                fallback, next_attempt_at, idempotency_key)
    VALUES (p_lane,
            coalesce(p_priority, CASE p_lane WHEN 'transactional' THEN 0 ELSE 100 END),
            p_channel, p_user_id, p_template, coalesce(p_vars, '{}'::jsonb), p_fallback,
            greatest(coalesce(p_send_at, now()), now()), p_idempotency_key)
    RETURNING id INTO v_id;

    IF p_idempotency_key IS NOT NULL THEN
        -- A concurrent transaction may have taken the key since the look-up above;
        -- the unique index makes us wait for it, and then the first one wins.
        INSERT INTO outbox.idempotency_key AS k (key, message_id)
        VALUES (p_idempotency_key, v_id)
        ON CONFLICT (key) DO UPDATE
            SET message_id = excluded.message_id, created_at = now()
            WHERE k.created_at <= now() - p_dedup_window
        RETURNING message_id INTO v_existing;
        IF v_existing IS NULL THEN
            DELETE FROM outbox.message WHERE id = v_id;
            SELECT message_id INTO v_existing
              FROM outbox.idempotency_key WHERE key = p_idempotency_key;
            RETURN v_existing;
        END IF;
    END IF;
    RETURN v_id;
END
$$;

REVOKE ALL ON FUNCTION outbox._insert_message(
    text, text, text, jsonb, text, text, timestamptz, smallint, text[], interval
) FROM PUBLIC;

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
DECLARE
    v_id bigint;
BEGIN
    v_id := outbox._insert_message(channel, template, user_id, vars, lane, idempotency_key,
                                   send_at, priority, fallback, dedup_window);
    IF send_at IS NULL OR send_at <= now() THEN
        PERFORM outbox._wake_dispatchers();
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
    v_count integer;
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

    INSERT INTO outbox.message (lane, priority, channel, user_id, template, vars,
                                next_attempt_at)
    SELECT enqueue_many.lane,
           coalesce(enqueue_many.priority,
                    CASE enqueue_many.lane WHEN 'transactional' THEN 0 ELSE 100 END),
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
