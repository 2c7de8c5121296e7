-- outbox_0002: a cheaper enqueue. Frozen: this is what the revision ran; the
-- current state of the schema is sql/schema.sql.
--
-- The input rules of outbox.message move from CHECK constraints (parsed and planned
-- again by every single-row INSERT) into outbox.enqueue and outbox.enqueue_many, and
-- outbox.enqueue no longer calls two nested functions.

ALTER TABLE outbox.message
    DROP CONSTRAINT message_lane_check,
    DROP CONSTRAINT message_priority_in_lane,
    DROP CONSTRAINT message_channel_check,
    DROP CONSTRAINT message_user_id_check,
    DROP CONSTRAINT message_template_check,
    DROP CONSTRAINT message_vars_is_object,
    DROP CONSTRAINT message_fallback_channels,
    DROP CONSTRAINT message_attempts_check;

DROP FUNCTION outbox._insert_message(
    text, text, text, jsonb, text, text, timestamptz, smallint, text[], interval
);

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

    -- wake sleeping dispatchers (see outbox._wake_dispatchers), inlined
    IF (enqueue.send_at IS NULL OR enqueue.send_at <= now())
       AND EXISTS (SELECT 1 FROM outbox.sleeper) THEN
        PERFORM pg_notify('outbox_wakeup', '');
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
