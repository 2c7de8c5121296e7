-- The claim statement of schema revision outbox_0009: `claim_batch` in sql/queries.sql
-- as of commit f10a293, the last before outbox_0010 (channels and addresses as data)
-- merged, with its fragments pasted in. Recipients then had one column per channel
-- (email, telegram_chat_id, email_undeliverable_at, telegram_blocked_at). Frozen here
-- so that `python -m bench claims` can run it side by side with today's statement.
WITH async_commit AS (
    SELECT set_config('synchronous_commit', 'off', true)
), paused AS (
    SELECT coalesce(array_agg(channel), '{}') AS channels
      FROM outbox.channel_state WHERE paused_until > now()
), due AS (
    SELECT m.id FROM outbox.message m, paused
     WHERE m.status = 'pending' AND m.next_attempt_at <= now()
       AND m.channel <> ALL (paused.channels)
     ORDER BY m.priority, m.next_attempt_at, m.id
     LIMIT %(batch_size)s
     FOR UPDATE OF m SKIP LOCKED
), expired AS (
    SELECT m.id FROM outbox.message m
     WHERE m.status = 'sending' AND m.leased_until < now()
     ORDER BY m.leased_until
     LIMIT %(batch_size)s
     FOR UPDATE OF m SKIP LOCKED
), escalate AS (
    SELECT m.id FROM outbox.message m, paused
     WHERE m.status = 'awaiting_ack' AND m.next_attempt_at <= now()
       AND m.fallback[1] <> ALL (paused.channels)
     ORDER BY m.next_attempt_at
     LIMIT %(batch_size)s
     FOR UPDATE OF m SKIP LOCKED
), claimed AS (
    UPDATE outbox.message m
       SET status = 'sending',
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
       (SELECT json_agg(json_build_array(p.instrument, p.channels))
          FROM outbox.preference p WHERE p.user_id = c.user_id AND p.topic = c.template),
       r.user_id, r.email, r.telegram_chat_id, r.timezone, r.quiet_hours_start,
r.quiet_hours_end, r.disabled_channels, r.campaign_opt_out, r.fallback_order,
r.email_undeliverable_at IS NOT NULL AS email_undeliverable,
r.telegram_blocked_at IS NOT NULL AS telegram_blocked,
coalesce((SELECT json_agg(json_build_array(s.endpoint, s.p256dh, s.auth) ORDER BY s.id)
            FROM outbox.push_subscription s WHERE s.user_id = r.user_id), '[]')
    AS subscriptions
  FROM claimed c
 CROSS JOIN LATERAL (SELECT CAST(c.vars AS text) AS text OFFSET 0) v
 CROSS JOIN async_commit
  LEFT JOIN outbox.recipient r ON r.user_id = c.user_id
