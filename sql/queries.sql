-- Named statements used by outbox (producer side) and the dispatcher.
-- Each block: a `-- name --` header, a line saying what it does, the statement.
-- Casts are written CAST(x AS t) so the same text also works through
-- SQLAlchemy's text() with :name placeholders.

-- ===================================================================== producer

-- enqueue --
-- Write one message in the caller's transaction; returns its id.
SELECT outbox.enqueue(
    %(channel)s, %(template)s, %(user_id)s, CAST(%(vars)s AS jsonb), %(lane)s,
    %(idempotency_key)s, CAST(%(send_at)s AS timestamptz), CAST(%(priority)s AS smallint),
    CAST(%(fallback)s AS text[]), CAST(%(dedup_window)s AS interval),
    CAST(%(expires_at)s AS timestamptz), %(collapse_key)s, CAST(%(escalate_after)s AS interval)
)

-- enqueue_many --
-- Write one message per user id in one statement; returns the count written.
SELECT outbox.enqueue_many(
    %(channel)s, %(template)s, CAST(%(user_ids)s AS text[]), CAST(%(vars_list)s AS jsonb[]),
    %(lane)s, CAST(%(send_at)s AS timestamptz), CAST(%(priority)s AS smallint)
)

-- upsert_recipient --
-- Insert or update a recipient and its email, Telegram and SMS addresses; only the
-- arguments passed as non-null change. A new email or phone clears what the
-- provider said about the old one (a bounce, a STOP); a Telegram chat id given
-- again clears the block (the user started the bot again).
WITH recipient AS (
    INSERT INTO outbox.recipient AS r (
        user_id, timezone, quiet_hours_start, quiet_hours_end, disabled_channels,
        campaign_opt_out, fallback_order
    ) VALUES (
        %(user_id)s, coalesce(%(timezone)s, 'UTC'),
        CAST(%(quiet_hours_start)s AS time), CAST(%(quiet_hours_end)s AS time),
        coalesce(CAST(%(disabled_channels)s AS text[]), '{}'),
        coalesce(%(campaign_opt_out)s, false), CAST(%(fallback_order)s AS text[])
    )
    ON CONFLICT (user_id) DO UPDATE SET
        timezone = coalesce(%(timezone)s, r.timezone),
        quiet_hours_start = CASE WHEN %(set_quiet_hours)s THEN excluded.quiet_hours_start
                                 ELSE r.quiet_hours_start END,
        quiet_hours_end = CASE WHEN %(set_quiet_hours)s THEN excluded.quiet_hours_end
                               ELSE r.quiet_hours_end END,
        disabled_channels = coalesce(CAST(%(disabled_channels)s AS text[]), r.disabled_channels),
        campaign_opt_out = coalesce(%(campaign_opt_out)s, r.campaign_opt_out),
        fallback_order = coalesce(CAST(%(fallback_order)s AS text[]), r.fallback_order),
        updated_at = now()
    RETURNING r.user_id
), given (channel, address) AS (
    VALUES ('email', CAST(%(email)s AS text)),
           ('telegram', CAST(CAST(%(telegram_chat_id)s AS bigint) AS text)),
           ('sms', CAST(%(phone)s AS text))
)
INSERT INTO outbox.recipient_address AS a (user_id, channel, address)
SELECT r.user_id, g.channel, g.address FROM recipient r, given g WHERE g.address IS NOT NULL
ON CONFLICT (user_id, channel) DO UPDATE SET
    address = excluded.address,
    undeliverable_since = CASE WHEN a.address = excluded.address
                               THEN a.undeliverable_since END,
    undeliverable_reason = CASE WHEN a.address = excluded.address
                                THEN a.undeliverable_reason END,
    disabled_since = CASE WHEN a.address = excluded.address AND a.channel <> 'telegram'
                          THEN a.disabled_since END,
    updated_at = now()

-- set_address --
-- Set (or with NULL remove) a user's address on any channel.
SELECT outbox.set_address(%(user_id)s, %(channel)s, %(address)s)

-- register_channel --
-- Add a channel (a plugin's); true when it is new.
SELECT outbox.register_channel(%(name)s)

-- channels --
-- Every channel, built-ins first.
SELECT name, builtin, created_at FROM outbox.channel ORDER BY NOT builtin, name

-- add_push_subscription --
-- Store a browser subscription (endpoint unique: a re-subscription moves it).
INSERT INTO outbox.push_subscription (user_id, endpoint, p256dh, auth)
VALUES (%(user_id)s, %(endpoint)s, %(p256dh)s, %(auth)s)
ON CONFLICT (endpoint) DO UPDATE
    SET user_id = excluded.user_id, p256dh = excluded.p256dh, auth = excluded.auth,
        created_at = now()
RETURNING id

-- list_push_subscriptions --
-- One user's browser subscriptions as one JSON array, oldest first (NULL when none):
-- [[id, endpoint, p256dh, auth, created_at, last_used_at], ...].
SELECT json_agg(json_build_array(s.id, s.endpoint, s.p256dh, s.auth, s.created_at,
                                 s.last_used_at) ORDER BY s.id)
  FROM outbox.push_subscription s
 WHERE s.user_id = %(user_id)s

-- remove_push_subscription --
-- The user unsubscribed this endpoint: true when it was theirs and is gone.
SELECT outbox.remove_push_subscription(%(user_id)s, %(endpoint)s)

-- cancel --
-- Withdraw a pending message nobody has started sending; true when it was.
SELECT outbox.cancel(%(id)s)

-- acknowledge --
-- The user saw this alert: stop its escalation; true when this call acknowledged it.
SELECT outbox.acknowledge(%(id)s)

-- message_status --
-- One message's state and channel, and its attempts as JSON, oldest first
-- ([attempt, channel, outcome, error_class, at], ...); no row when unknown.
SELECT s.state, s.channel,
       (SELECT json_agg(json_build_array(a.attempt, a.channel, a.outcome, a.error_class, a.at))
          FROM outbox.message_attempts(%(id)s) a)
  FROM outbox.message_state(%(id)s) s

-- set_preference --
-- Deliver the topic (optionally one instrument) only on these channels; NULL forgets.
SELECT outbox.set_preference(%(user_id)s, %(topic)s, CAST(%(channels)s AS text[]),
                             %(instrument)s)

-- inbox --
-- One user's inbox items, newest first, as one JSON array (NULL when none):
-- [[id, message_id, template, title, body, url, created_at, read_at], ...].
SELECT json_agg(json_build_array(i.id, i.message_id, i.template, i.title, i.body, i.url,
                                 i.created_at, i.read_at) ORDER BY i.id DESC)
  FROM (SELECT * FROM outbox.inbox_item
         WHERE user_id = %(user_id)s
           AND (NOT %(unread_only)s OR read_at IS NULL)
           AND (CAST(%(before)s AS bigint) IS NULL OR id < CAST(%(before)s AS bigint))
         ORDER BY id DESC
         LIMIT %(limit)s) i

-- read_inbox_item --
-- Mark one of the user's items read (and acknowledge its alert).
SELECT outbox.read_inbox_item(%(user_id)s, %(item_id)s)

-- read_all_inbox_items --
-- Mark every unread item of the user read (and acknowledge their alerts).
SELECT outbox.read_all_inbox_items(%(user_id)s)

-- ===================================================================== operator

-- queue_stats --
-- Depth and age of the oldest message per lane, channel and status.
SELECT lane, channel, status, count, oldest_age_seconds
  FROM outbox.queue_stats
 ORDER BY lane DESC, channel, status

-- dead_letters --
-- The newest dead messages first.
SELECT id, lane, channel, user_id, template, attempts, error_class, last_error, dead_at
  FROM outbox.dead_letter
 ORDER BY dead_at DESC, id DESC
 LIMIT %(limit)s

-- dead_letter --
-- One dead message with its vars.
SELECT id, lane, channel, user_id, template, attempts, error_class, last_error,
       created_at, dead_at, vars
  FROM outbox.dead_letter
 WHERE id = %(id)s

-- message_history --
-- Every attempt logged for one message, oldest first.
SELECT created_at, attempt, outcome, error_class, error, duration_ms, dispatcher_id
  FROM outbox.attempt
 WHERE message_id = %(id)s
 ORDER BY id

-- retry_dead --
-- Dead messages back to pending (NULL ids: all of them).
SELECT outbox.retry_dead(CAST(%(ids)s AS bigint[]))

-- purge_dead --
-- Delete dead messages older than the interval.
SELECT outbox.purge_dead(CAST(%(older_than)s AS interval))

-- =================================================================== dispatcher

-- claim_batch --
-- Lease up to %(batch_size)s due messages (most urgent first), messages whose
-- lease expired because their dispatcher died, and alerts whose escalation is due;
-- paused channels are left alone.
-- Every claim passes a fresh %(lease_token)s: the token fences this claim's
-- messages, so a stale finish (a lease lost and claimed again) matches nothing.
-- Each row comes with its recipient (the columns of `recipients`, NULL when the
-- user is unknown), so claiming a batch is one round trip. vars come back as text:
-- jsonb's canonical text is also the dispatcher's render cache key. A text over
-- 262144 bytes (outbox.MAX_VARS_BYTES: a row written past enqueue's check) comes
-- back NULL: the dispatcher refuses it without receiving, holding or decoding it.
-- %(priority_from)s <= priority < %(priority_below)s bounds the pending part (an
-- index range of message_claim_idx): the dispatcher's urgent claim passes the
-- transactional lane's (below 100) and %(expired_limit)s 0, so that its `due`
-- select stops before the campaign's part of the index and its dead entries; a busy
-- dispatcher's regular claim the campaign's (from 100), an idle one's every smallint.
-- The claim commits with the session's synchronous_commit (on by default), not
-- without the WAL flush: a claim lost in a crash would put messages its dispatcher
-- already sent back to pending, where outbox.cancel withdraws them and says so
-- (see dispatcher/_dispatcher.py, "Durability").
WITH paused AS (
    -- channels whose circuit breaker is open
    SELECT coalesce(array_agg(channel), '{}') AS channels
      FROM outbox.channel_state WHERE paused_until > now()
), due AS (
    -- pending and due, in claim order, through message_claim_idx
    SELECT m.id FROM outbox.message m, paused
     WHERE m.status = 'pending' AND m.next_attempt_at <= now()
       AND m.priority >= %(priority_from)s AND m.priority < %(priority_below)s
       AND m.channel <> ALL (paused.channels)
     ORDER BY m.priority, m.next_attempt_at, m.id
     LIMIT %(batch_size)s
     FOR UPDATE OF m SKIP LOCKED
), expired AS (
    -- in flight, but nobody renewed the lease: the dispatcher is gone
    SELECT m.id FROM outbox.message m
     WHERE m.status = 'sending' AND m.leased_until < now()
     ORDER BY m.leased_until
     LIMIT %(expired_limit)s
     FOR UPDATE OF m SKIP LOCKED
), escalate AS (
    -- alerts nobody acknowledged in time; the sent finish put the channel they
    -- escalate to first in their chain (fallback[1])
    SELECT m.id FROM outbox.message m, paused
     WHERE m.status = 'awaiting_ack' AND m.next_attempt_at <= now()
       AND m.fallback[1] <> ALL (paused.channels)
     ORDER BY m.next_attempt_at
     LIMIT %(batch_size)s
     FOR UPDATE OF m SKIP LOCKED
), claimed AS (
    -- the lease
    UPDATE outbox.message m
       SET status = 'sending',
           -- an escalation moves to its next channel in the claim itself: a claim
           -- lost in a crash then cannot send the same channel twice
           channel = CASE WHEN m.status = 'awaiting_ack' THEN m.fallback[1]
                          ELSE m.channel END,
           fallback = CASE WHEN m.status = 'awaiting_ack' THEN m.fallback[2:]
                           ELSE m.fallback END,
           lease_token = CAST(%(lease_token)s AS uuid),
           leased_until = now() + make_interval(secs => %(lease_seconds)s),
           leased_by = %(dispatcher_id)s
     WHERE m.id = ANY (ARRAY(SELECT id FROM due UNION ALL SELECT id FROM expired
                             UNION ALL SELECT id FROM escalate))
    RETURNING m.id, m.lane, m.priority, m.channel, m.user_id, m.template, m.vars,
              m.fallback, m.attempts, m.expires_at, m.escalate_after,
              m.acknowledged_at IS NOT NULL AS acknowledged, m.sent_at IS NOT NULL AS sent,
              m.enqueued_by
), escalated AS (
    -- the escalation is logged by the claim that makes it, once
    INSERT INTO outbox.attempt (message_id, lane, channel, user_id, template, attempt,
                                outcome, error_class, dispatcher_id, enqueued_by)
    SELECT c.id, c.lane, c.channel, c.user_id, c.template, 0, 'escalated', 'unacknowledged',
           %(dispatcher_id)s, c.enqueued_by
      FROM claimed c
     WHERE c.id IN (SELECT id FROM escalate)
)
SELECT c.id, c.lane, c.priority, c.channel, c.user_id, c.template,
       CASE WHEN octet_length(v.text) <= 262144 THEN v.text END,
       c.fallback, c.attempts, c.expires_at,
       CAST(extract(epoch FROM c.escalate_after) AS float8), c.acknowledged, c.sent,
       c.id IN (SELECT id FROM escalate),
       -- the user's preferences for this topic: [[instrument or '', [channels]], ...]
       (SELECT json_agg(json_build_array(p.instrument, p.channels))
          FROM outbox.preference p WHERE p.user_id = c.user_id AND p.topic = c.template),
       {_recipient_columns}
  FROM claimed c
 -- OFFSET 0: the text is built once per row, not once per use
 CROSS JOIN LATERAL (SELECT CAST(c.vars AS text) AS text OFFSET 0) v
  LEFT JOIN outbox.recipient r ON r.user_id = c.user_id

-- _recipient_columns --
-- Fragment: one recipient as the dispatcher reads it (RecipientRecord.from_row),
-- from outbox.recipient r: preferences, addresses and push subscriptions as JSON.
r.user_id, r.timezone, r.quiet_hours_start, r.quiet_hours_end, r.disabled_channels,
r.campaign_opt_out, r.fallback_order,
-- [[channel, address, usable], ...]: usable unless the provider refused the address
-- or the user turned the channel off there; outbox.recipient_address aggregated by
-- triggers into the recipient row (outbox_0012), not per message here
coalesce(r.addresses, '[]') AS addresses,
coalesce((SELECT json_agg(json_build_array(s.endpoint, s.p256dh, s.auth) ORDER BY s.id)
            FROM outbox.push_subscription s WHERE s.user_id = r.user_id), '[]')
    AS subscriptions

-- recipients --
-- Addresses, preferences and push subscriptions of the given users (the claim
-- returns the same columns with each message).
SELECT {_recipient_columns}
  FROM outbox.recipient r
 WHERE r.user_id = ANY (CAST(%(user_ids)s AS text[]))

-- extend_leases --
-- Heartbeat: push the lease of our in-flight messages forward.
UPDATE outbox.message m
   SET leased_until = now() + make_interval(secs => %(lease_seconds)s)
  FROM unnest(CAST(%(ids)s AS bigint[]), CAST(%(tokens)s AS uuid[])) AS l(id, token)
 WHERE m.id = l.id AND m.lease_token = l.token
RETURNING m.id

-- finish_sent --
-- Delivered: delete the rows we still lease and log one 'sent' attempt each.
WITH done AS (
    DELETE FROM outbox.message m
     USING unnest(CAST(%(ids)s AS bigint[]), CAST(%(tokens)s AS uuid[]),
                  CAST(%(durations)s AS float8[]), CAST(%(provider_ids)s AS text[]))
           AS d(id, token, duration_ms, provider_id)
     WHERE m.id = d.id AND m.lease_token = d.token
    RETURNING m.id, m.lane, m.channel, m.user_id, m.template, m.attempts, d.duration_ms,
              m.enqueued_by, d.provider_id
)
INSERT INTO outbox.attempt (message_id, lane, channel, user_id, template, attempt, outcome,
                            duration_ms, dispatcher_id, enqueued_by, provider_id)
SELECT id, lane, channel, user_id, template, attempts + 1, 'sent', duration_ms,
       %(dispatcher_id)s, enqueued_by, provider_id
  FROM done
RETURNING message_id

-- finish_sent_alert --
-- Delivered alerts (escalate_after): each waits for its acknowledgement
-- (awaiting_ack) on the channel it went out on, its chain now starting with the
-- channel it escalates to after %(waits)s seconds; without a next channel (the
-- chain's end) it waits without a deadline. One the user acknowledged while it
-- was in flight is deleted instead. Logs 'sent'.
WITH f AS (
    SELECT * FROM unnest(
        CAST(%(ids)s AS bigint[]), CAST(%(tokens)s AS uuid[]), CAST(%(durations)s AS float8[]),
        CAST(%(channels)s AS text[]), CAST(%(attempts)s AS integer[]),
        CAST(%(waits)s AS float8[]), CAST(%(next_channels)s AS text[]),
        CAST(%(next_fallbacks)s AS text[]), CAST(%(provider_ids)s AS text[])
    ) AS f(id, token, duration_ms, channel, attempt, wait, next_channel, next_fallback,
           provider_id)
), acknowledged AS (
    DELETE FROM outbox.message m
     USING f
     WHERE m.id = f.id AND m.lease_token = f.token AND m.acknowledged_at IS NOT NULL
    RETURNING m.id, m.lane, m.user_id, m.template, m.enqueued_by, f.channel, f.attempt,
              f.duration_ms, f.provider_id
), waiting AS (
    UPDATE outbox.message m
       SET status = 'awaiting_ack', sent_at = coalesce(m.sent_at, now()), attempts = 0,
           fallback = CASE WHEN f.next_channel IS NULL THEN m.fallback
                           ELSE f.next_channel
                                || CAST(string_to_array(f.next_fallback, ',') AS text[]) END,
           next_attempt_at = CASE WHEN f.next_channel IS NULL THEN 'infinity'
                                  ELSE now() + make_interval(secs => f.wait) END,
           lease_token = NULL, leased_until = NULL, leased_by = NULL
      FROM f
     WHERE m.id = f.id AND m.lease_token = f.token AND m.acknowledged_at IS NULL
    RETURNING m.id, m.lane, m.user_id, m.template, m.enqueued_by, f.channel, f.attempt,
              f.duration_ms, f.provider_id
)
INSERT INTO outbox.attempt (message_id, lane, channel, user_id, template, attempt, outcome,
                            duration_ms, dispatcher_id, enqueued_by, provider_id)
SELECT id, lane, channel, user_id, template, attempt, 'sent', duration_ms,
       %(dispatcher_id)s, enqueued_by, provider_id
  FROM (SELECT * FROM acknowledged UNION ALL SELECT * FROM waiting) a
RETURNING message_id

-- finish_requeue --
-- Back to pending at now() + delay: retries (attempt burned) and deferrals
-- (rate limit, quiet hours, outage: not burned). Logs one attempt row each.
WITH f AS (
    SELECT * FROM unnest(
        CAST(%(ids)s AS bigint[]), CAST(%(tokens)s AS uuid[]), CAST(%(delays)s AS float8[]),
        CAST(%(burn)s AS boolean[]), CAST(%(outcomes)s AS text[]),
        CAST(%(error_classes)s AS text[]), CAST(%(errors)s AS text[]),
        CAST(%(durations)s AS float8[])
    ) AS f(id, token, delay, burn, outcome, error_class, error, duration_ms)
), moved AS (
    UPDATE outbox.message m
       SET status = 'pending',
           attempts = m.attempts + CASE WHEN f.burn THEN 1 ELSE 0 END,
           next_attempt_at = now() + make_interval(secs => f.delay),
           lease_token = NULL, leased_until = NULL, leased_by = NULL,
           last_error = coalesce(f.error, m.last_error),
           error_class = coalesce(f.error_class, m.error_class)
      FROM f
     WHERE m.id = f.id AND m.lease_token = f.token
    RETURNING m.id, m.lane, m.channel, m.user_id, m.template, m.attempts, f.burn, f.outcome,
              f.error_class, f.error, f.duration_ms, m.enqueued_by
)
INSERT INTO outbox.attempt (message_id, lane, channel, user_id, template, attempt, outcome,
                            error_class, error, duration_ms, dispatcher_id, enqueued_by)
SELECT id, lane, channel, user_id, template,
       CASE WHEN burn THEN attempts ELSE attempts + 1 END,
       outcome, error_class, error, duration_ms, %(dispatcher_id)s, enqueued_by
  FROM moved
RETURNING message_id

-- finish_dead --
-- Dead letters: permanent failures and exhausted retries, kept for operators.
WITH f AS (
    SELECT * FROM unnest(
        CAST(%(ids)s AS bigint[]), CAST(%(tokens)s AS uuid[]),
        CAST(%(error_classes)s AS text[]), CAST(%(errors)s AS text[]),
        CAST(%(durations)s AS float8[])
    ) AS f(id, token, error_class, error, duration_ms)
), died AS (
    UPDATE outbox.message m
       SET status = 'dead', attempts = m.attempts + 1, dead_at = now(),
           lease_token = NULL, leased_until = NULL, leased_by = NULL,
           last_error = f.error, error_class = f.error_class
      FROM f
     WHERE m.id = f.id AND m.lease_token = f.token
    RETURNING m.id, m.lane, m.channel, m.user_id, m.template, m.attempts, f.error_class,
              f.error, f.duration_ms, m.enqueued_by
)
INSERT INTO outbox.attempt (message_id, lane, channel, user_id, template, attempt, outcome,
                            error_class, error, duration_ms, dispatcher_id, enqueued_by)
SELECT id, lane, channel, user_id, template, attempts, 'dead', error_class, error,
       duration_ms, %(dispatcher_id)s, enqueued_by
  FROM died
RETURNING message_id

-- finish_handoff --
-- Skipped, expired, or handed to the next channel of its chain: a message with a
-- next channel moves there in place (same id, attempts start again, due now); one
-- without is deleted. Logs the outcome on the channel it leaves.
WITH f AS (
    SELECT * FROM unnest(
        CAST(%(ids)s AS bigint[]), CAST(%(tokens)s AS uuid[]), CAST(%(outcomes)s AS text[]),
        CAST(%(error_classes)s AS text[]), CAST(%(errors)s AS text[]),
        CAST(%(next_channels)s AS text[]), CAST(%(next_fallbacks)s AS text[]),
        CAST(%(durations)s AS float8[])
    ) AS f(id, token, outcome, error_class, error, next_channel, next_fallback, duration_ms)
), gone AS (
    DELETE FROM outbox.message m
     USING f
     WHERE m.id = f.id AND m.lease_token = f.token AND f.next_channel IS NULL
    RETURNING m.id, m.lane, m.channel, m.user_id, m.template, m.attempts, m.enqueued_by,
              f.outcome, f.error_class, f.error, f.duration_ms
), moved AS (
    UPDATE outbox.message m
       SET channel = f.next_channel,
           -- '' is an exhausted list ('{}'), never NULL: NULL means the default order
           fallback = CAST(string_to_array(f.next_fallback, ',') AS text[]),
           status = 'pending', attempts = 0, next_attempt_at = now(),
           lease_token = NULL, leased_until = NULL, leased_by = NULL,
           last_error = coalesce(f.error, m.last_error),
           error_class = coalesce(f.error_class, m.error_class)
      FROM f, outbox.message old
     WHERE m.id = f.id AND m.lease_token = f.token AND f.next_channel IS NOT NULL
       AND old.id = m.id
    RETURNING m.id, m.lane, old.channel, m.user_id, m.template, old.attempts, m.enqueued_by,
              f.outcome, f.error_class, f.error, f.duration_ms
), logged AS (
    INSERT INTO outbox.attempt (message_id, lane, channel, user_id, template, attempt,
                                outcome, error_class, error, duration_ms, dispatcher_id,
                                enqueued_by)
    SELECT id, lane, channel, user_id, template, attempts + 1, outcome, error_class, error,
           duration_ms, %(dispatcher_id)s, enqueued_by
      FROM (SELECT * FROM gone UNION ALL SELECT * FROM moved) h
)
-- every finished id, and whether it moved to a next channel
SELECT id, true FROM moved
UNION ALL
SELECT id, false FROM gone

-- release_leases --
-- Shutdown: give unfinished messages back without burning an attempt.
UPDATE outbox.message m
   SET status = 'pending', lease_token = NULL, leased_until = NULL, leased_by = NULL
  FROM unnest(CAST(%(ids)s AS bigint[]), CAST(%(tokens)s AS uuid[])) AS l(id, token)
 WHERE m.id = l.id AND m.lease_token = l.token
RETURNING m.id

-- register_sleeper --
-- About to wait on LISTEN: ask producers to notify us, forget long-gone sleepers.
WITH stale AS (
    DELETE FROM outbox.sleeper
     WHERE since < now() - make_interval(secs => %(stale_seconds)s)
       AND dispatcher_id <> %(dispatcher_id)s
)
INSERT INTO outbox.sleeper (dispatcher_id) VALUES (%(dispatcher_id)s)
ON CONFLICT (dispatcher_id) DO UPDATE SET since = now()

-- unregister_sleeper --
-- Awake and busy: producers need not notify on our account.
DELETE FROM outbox.sleeper WHERE dispatcher_id = %(dispatcher_id)s

-- urgent_due --
-- Is a pending message of the transactional lane (priorities 0-99) due now? The
-- busy dispatcher's cheap question before its urgent claim: one descent into the
-- head of message_claim_idx (3 buffers, 0.06 ms with a million campaign rows behind
-- it). The bound is a literal, not a parameter: a prepared statement's generic plan
-- cannot know that `priority < $1` is rare and scanned the whole table (400 ms).
SELECT EXISTS (
    SELECT 1 FROM outbox.message
     WHERE status = 'pending' AND priority < 100 AND next_attempt_at <= now()
)

-- next_due --
-- Seconds until the next pending message is due, and whether any is in flight.
-- A loose index scan of message_claim_idx: one descent per distinct priority to find
-- it, one more for its earliest message; never a scan of the pending rows.
WITH RECURSIVE priorities AS (
    -- the lowest priority with a pending message, then the next higher, and so on
    (SELECT priority FROM outbox.message WHERE status = 'pending'
      ORDER BY priority LIMIT 1)
    UNION ALL
    SELECT (SELECT m.priority FROM outbox.message m
             WHERE m.status = 'pending' AND m.priority > p.priority
             ORDER BY m.priority LIMIT 1)
      FROM priorities p
     WHERE p.priority IS NOT NULL
)
SELECT CAST(extract(epoch FROM min(
           (SELECT m.next_attempt_at FROM outbox.message m
             WHERE m.status = 'pending' AND m.priority = p.priority
             ORDER BY m.next_attempt_at LIMIT 1)) - now()) AS float8),
       EXISTS (SELECT 1 FROM outbox.message WHERE status = 'sending')
  FROM priorities p
 WHERE p.priority IS NOT NULL

-- database_now --
-- The server's clock now (not the transaction's start): the dispatcher's clock offset.
SELECT clock_timestamp()

-- pause_ends --
-- Seconds until the first pause of a channel (an open breaker) ends; NULL: none.
SELECT CAST(extract(epoch FROM min(paused_until) - now()) AS float8)
  FROM outbox.channel_state WHERE paused_until > now()

-- deferred_summary --
-- What an until-idle run leaves behind: pending messages and when the first is due.
SELECT count(*), min(next_attempt_at) FROM outbox.message WHERE status = 'pending'

-- effect_disable_channel --
-- The user turned the channel off at the provider (blocked the bot, answered STOP):
-- not tried again until a new address is set. The first time is kept.
UPDATE outbox.recipient_address
   SET disabled_since = coalesce(disabled_since, now()), updated_at = now()
 WHERE user_id = %(user_id)s AND channel = %(channel)s

-- effect_address_undeliverable --
-- The provider refused the user's address on the channel (an SMTP 5xx, an invalid number).
UPDATE outbox.recipient_address
   SET undeliverable_since = coalesce(undeliverable_since, now()),
       undeliverable_reason = coalesce(undeliverable_reason, %(reason)s), updated_at = now()
 WHERE user_id = %(user_id)s AND channel = %(channel)s

-- effect_telegram_chat --
-- The chat migrated to a supergroup.
UPDATE outbox.recipient_address
   SET address = CAST(CAST(%(chat_id)s AS bigint) AS text), updated_at = now()
 WHERE user_id = %(user_id)s AND channel = 'telegram'

-- effect_inbox_item --
-- Channel inapp delivered: the user's inbox item (one per message), and a word to
-- the API's streams, heard at this transaction's commit.
WITH item AS (
    INSERT INTO outbox.inbox_item (user_id, message_id, template, title, body, url)
    VALUES (%(user_id)s, %(message_id)s, %(template)s, %(title)s, %(body)s, %(url)s)
    ON CONFLICT ON CONSTRAINT inbox_item_message_key DO NOTHING
    RETURNING id, user_id
)
SELECT pg_notify('outbox_inbox', CAST(id AS text) || ' ' || user_id) FROM item

-- effect_delete_subscription --
-- The push service says the subscription is gone.
DELETE FROM outbox.push_subscription WHERE user_id = %(user_id)s AND endpoint = %(endpoint)s

-- ========================================================================== api

-- api_pending_lag --
-- Per lane: seconds the oldest due message has waited since it became due
-- (scheduled and backed-off messages count from their due time, not creation); an
-- alert whose escalation is due counts too: no dispatcher running shows here.
SELECT lane, CAST(extract(epoch FROM now() - min(next_attempt_at)) AS double precision)
  FROM (SELECT lane, next_attempt_at FROM outbox.message
         WHERE status = 'pending' AND next_attempt_at <= now()
        UNION ALL
        SELECT lane, next_attempt_at FROM outbox.message
         WHERE status = 'awaiting_ack' AND next_attempt_at <= now()) due
 GROUP BY lane

-- api_log_test_attempt --
-- Log one synchronous test send of the owner's API: is_test, never a queued message.
INSERT INTO outbox.attempt (message_id, lane, channel, user_id, template, attempt, outcome,
                            error_class, error, duration_ms, dispatcher_id, is_test)
VALUES (%(message_id)s, 'transactional', %(channel)s, %(user_id)s, %(template)s, 1,
        %(outcome)s, %(error_class)s, %(error)s, %(duration_ms)s, %(caller)s, true)

-- api_ack_sent_age --
-- Before an acknowledgement through a link, in its transaction: seconds since the
-- alert was first delivered, on the database's clock (no row when it is gone).
SELECT CAST(extract(epoch FROM now() - sent_at) AS double precision)
  FROM outbox.message
 WHERE id = %(message_id)s

-- api_ack_state --
-- Why an acknowledgement changed nothing: the message's state, and whether an
-- earlier acknowledgement marked it in flight (its state says sending until the
-- dispatcher's finish deletes it).
SELECT outbox.message_status(%(message_id)s),
       EXISTS (SELECT 1 FROM outbox.message
                WHERE id = %(message_id)s AND acknowledged_at IS NOT NULL)

-- api_inbox_unread_count --
-- How many of the user's inbox items are unread (the partial unread index answers).
SELECT count(*) FROM outbox.inbox_item WHERE user_id = %(user_id)s AND read_at IS NULL

-- api_inbox_item_is_read --
-- Whether this item is the user's and read: why marking it read changed nothing
-- (no row: unknown, or another user's).
SELECT read_at IS NOT NULL FROM outbox.inbox_item
 WHERE id = %(item_id)s AND user_id = %(user_id)s

-- api_inbox_last_id --
-- Where a new stream starts: the user's newest item id (0 when none).
SELECT coalesce(max(id), 0) FROM outbox.inbox_item WHERE user_id = %(user_id)s

-- api_inbox_after --
-- A stream catching up: the user's items after the last one it sent, oldest first.
SELECT id, user_id, message_id, template, title, body, url, created_at, read_at
  FROM outbox.inbox_item
 WHERE user_id = %(user_id)s AND id > %(after)s
 ORDER BY id
 LIMIT %(limit)s

-- api_inbox_items --
-- The items a batch of NOTIFYs named (their user comes from the row, never from the
-- payload: anyone may NOTIFY).
SELECT id, user_id, message_id, template, title, body, url, created_at, read_at
  FROM outbox.inbox_item
 WHERE id = ANY (CAST(%(ids)s AS bigint[]))
 ORDER BY id

-- api_preferences --
-- One user's topic preferences ('' instrument: the whole topic).
SELECT topic, instrument, channels FROM outbox.preference
 WHERE user_id = %(user_id)s
 ORDER BY topic, instrument

-- api_push_subscription_owner --
-- Who holds this endpoint now (no row: nobody), locked until the subscription is
-- written, so two users cannot both take it.
SELECT user_id FROM outbox.push_subscription WHERE endpoint = %(endpoint)s FOR UPDATE

-- ====================================================== dispatcher: shared limits
-- Rate limits as send calendars and recipient paces (outbox.rate_limit), and a
-- circuit breaker whose state every replica shares (dispatcher/_limits.py explains
-- both).

-- hold_pace --
-- Lock one recipient's pace row for this transaction (created on first use); return
-- the earliest moment its next send may go out and the database's clock, both in
-- epoch seconds.
INSERT INTO outbox.rate_limit AS p (key, updated_at)
VALUES (%(key)s, '-infinity')
ON CONFLICT (key) DO UPDATE SET updated_at = p.updated_at  -- locks the row, changes nothing
RETURNING CAST(extract(epoch FROM greatest(p.updated_at, clock_timestamp())) AS float8),
          CAST(extract(epoch FROM clock_timestamp()) AS float8)

-- hold_calendar --
-- Take turns on one send calendar until the end of this transaction, so that
-- replicas never race for the same slot.
SELECT pg_advisory_xact_lock(hashtextextended(%(key)s, 0))

-- set_pace --
-- The recipient's next send may go out at %(next_at)s (epoch seconds).
UPDATE outbox.rate_limit SET updated_at = to_timestamp(%(next_at)s) WHERE key = %(key)s

-- take_slot --
-- Take the first free slot of a send calendar at or after %(not_before)s (epoch
-- seconds); slots lie %(interval)s seconds apart on a fixed grid and hold one send
-- each. Returns the slot's key, its time (epoch) and the seconds until it; no row
-- when none is free within %(horizon)s slots. Run under hold_calendar.
WITH start AS (
    -- the first grid point at or after both the wanted time and now
    SELECT CAST(ceil(greatest(CAST(%(not_before)s AS float8),
                              extract(epoch FROM clock_timestamp()))
                     / %(interval)s) AS bigint) AS n
)
INSERT INTO outbox.rate_limit (key, updated_at)
SELECT %(prefix)s || g.n, to_timestamp(g.n * CAST(%(interval)s AS float8))
  FROM start, generate_series(start.n, start.n + %(horizon)s) AS g(n)
 WHERE NOT EXISTS (SELECT 1 FROM outbox.rate_limit r WHERE r.key = %(prefix)s || g.n)
 ORDER BY g.n
 LIMIT 1
ON CONFLICT (key) DO NOTHING
RETURNING key, CAST(extract(epoch FROM updated_at) AS float8),
          CAST(extract(epoch FROM updated_at - clock_timestamp()) AS float8)

-- release_slots --
-- Give back calendar slots that a deferred message will not use.
DELETE FROM outbox.rate_limit WHERE key = ANY (CAST(%(keys)s AS text[]))

-- forget_past_slots --
-- Calendar slots and recipient paces in the past constrain nothing: drop them.
DELETE FROM outbox.rate_limit
 WHERE (starts_with(key, 'slot:') OR starts_with(key, 'pace:'))
   AND updated_at < clock_timestamp() - interval '10 seconds'

-- trip_breaker --
-- A channel-wide outage seen by any replica pauses the channel for all of them. A
-- report while it is paused already (a send that began earlier) changes nothing but
-- the error; each probe that fails after a pause doubles the next pause.
INSERT INTO outbox.channel_state AS s (channel, failures, paused_until, last_error, updated_at)
VALUES (%(channel)s, 1, now() + make_interval(secs => %(base_seconds)s), %(error)s, now())
ON CONFLICT (channel) DO UPDATE
   SET failures = s.failures + CASE WHEN s.paused_until > now() THEN 0 ELSE 1 END,
       paused_until = CASE
           WHEN s.paused_until > now() THEN s.paused_until
           ELSE now() + make_interval(secs => least(
               %(max_seconds)s, %(base_seconds)s * 2 ^ least(s.failures, 10)))
       END,
       last_error = %(error)s, updated_at = now()
RETURNING CAST(extract(epoch FROM paused_until - now()) AS float8)

-- close_breaker_after_probe --
-- A delivery once the pause is over closes the channel's breaker for every replica
-- (one that ends while the channel is paused may have begun before the outage and
-- closes nothing). Returns whether the breaker is still open.
WITH closed AS (
    UPDATE outbox.channel_state
       SET failures = 0, paused_until = NULL, last_error = NULL, updated_at = now()
     WHERE channel = %(channel)s AND failures > 0
       AND (paused_until IS NULL OR paused_until <= now())
    RETURNING channel
)
SELECT EXISTS (SELECT 1 FROM outbox.channel_state
                WHERE channel = %(channel)s AND failures > 0)
       AND NOT EXISTS (SELECT 1 FROM closed)

-- api_sms_delivery_report --
-- A verified Twilio status callback: log delivered/undelivered for the message sent
-- with that SID (idempotent; NULL when no message was); permanent marks the number.
SELECT outbox.record_delivery_report('sms', %(provider_id)s, %(delivered)s, %(error_code)s,
                                     %(permanent)s)

-- api_email_bounce --
-- A verified bounce or complaint from the mail provider: mark every user with that
-- address undeliverable on email (how many were marked; 0 when repeated).
SELECT outbox.mark_address_undeliverable('email', %(address)s, %(reason)s)
