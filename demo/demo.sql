-- Statements of `outbox demo`: the trading service's own tables (schema `trading`)
-- and the read-only queries behind the progress bar and the closing summary.
-- Same format as sql/queries.sql: a `-- name --` header, a comment line, the statement.

-- ===================================================================== trading

-- trading_schema --
-- The trading service's tables; alerts are written next to them, same transaction.
DROP SCHEMA IF EXISTS trading CASCADE;
CREATE SCHEMA trading;
CREATE TABLE trading.account (
    user_id       text PRIMARY KEY,
    alert_channel text NOT NULL CHECK (alert_channel IN ('email', 'telegram', 'push', 'sms'))
);
CREATE TABLE trading.position (
    id            integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id       text    NOT NULL REFERENCES trading.account,
    instrument    text    NOT NULL,
    side          text    NOT NULL CHECK (side IN ('buy', 'sell')),
    volume        numeric NOT NULL,
    entry_price   numeric NOT NULL,
    broker_ticket text    NOT NULL UNIQUE,
    state         text    NOT NULL DEFAULT 'open' CHECK (
        state IN ('open', 'closed', 'sl_close_failed', 'tp_close_failed')),
    close_price   numeric,
    updated_at    timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE trading.entry_order (
    id          integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id     text    NOT NULL REFERENCES trading.account,
    instrument  text    NOT NULL,
    side        text    NOT NULL,
    volume      numeric NOT NULL,
    price       numeric NOT NULL,
    approval_id text    NOT NULL UNIQUE,
    state       text    NOT NULL DEFAULT 'pending' CHECK (
        state IN ('pending', 'filled', 'rejected')),
    reason      text
)

-- add_account --
-- A trader and the channel their alerts go to first.
INSERT INTO trading.account (user_id, alert_channel) VALUES (%(user_id)s, %(alert_channel)s)

-- open_position --
-- A position the broker opened.
INSERT INTO trading.position (user_id, instrument, side, volume, entry_price, broker_ticket)
VALUES (%(user_id)s, %(instrument)s, %(side)s, %(volume)s, %(entry_price)s, %(broker_ticket)s)
RETURNING id

-- close_position --
-- The stop-loss or take-profit fired: closed, or the close failed at the broker.
UPDATE trading.position
   SET state = %(state)s, close_price = %(close_price)s, updated_at = now()
 WHERE id = %(id)s AND state = 'open'

-- place_order --
-- An entry order that waits for the broker.
INSERT INTO trading.entry_order (user_id, instrument, side, volume, price, approval_id)
VALUES (%(user_id)s, %(instrument)s, %(side)s, %(volume)s, %(price)s, %(approval_id)s)
RETURNING id

-- settle_order --
-- The broker filled or rejected the entry.
UPDATE trading.entry_order SET state = %(state)s, reason = %(reason)s WHERE id = %(id)s

-- position_state --
-- What the trading tables say about one position.
SELECT state FROM trading.position WHERE broker_ticket = %(broker_ticket)s

-- message_exists --
-- Whether an outbox message with this id exists (pending, in flight or dead).
SELECT count(*) FROM outbox.message WHERE id = %(id)s

-- ===================================================================== progress

-- delivery_progress --
-- Messages still to do, and finished ones (sent, dead, handed to another channel,
-- skipped), plus the retries so far.
SELECT (SELECT count(*) FROM outbox.message WHERE status IN ('pending', 'sending')),
       count(*) FILTER (WHERE outcome = 'sent'),
       count(*) FILTER (WHERE outcome = 'dead'),
       count(*) FILTER (WHERE outcome = 'fallback'),
       count(*) FILTER (WHERE outcome = 'skipped'),
       count(*) FILTER (WHERE outcome = 'retry')
  FROM outbox.attempt
 WHERE NOT is_test

-- ===================================================================== summary

-- sent_by_lane --
-- Deliveries per lane and channel.
SELECT lane, channel, count(*)
  FROM outbox.attempt
 WHERE outcome = 'sent' AND NOT is_test
 GROUP BY lane, channel
 ORDER BY lane DESC, channel

-- sent_by_replica --
-- Deliveries per dispatcher replica.
SELECT dispatcher_id, count(*)
  FROM outbox.attempt
 WHERE outcome = 'sent' AND NOT is_test
 GROUP BY dispatcher_id
 ORDER BY dispatcher_id

-- attempts_by_reason --
-- Retries, fallbacks and skips, per channel and error class.
SELECT outcome, channel, error_class, count(*), string_agg(DISTINCT user_id, ', ')
  FROM outbox.attempt
 WHERE outcome IN ('retry', 'fallback', 'skipped') AND NOT is_test
 GROUP BY outcome, channel, error_class
 ORDER BY array_position(ARRAY['retry', 'fallback', 'skipped'], outcome), channel, error_class

-- alert_mails --
-- Message ids of the alerts delivered by email (their files are outbox-<id>.eml).
SELECT message_id
  FROM outbox.attempt
 WHERE outcome = 'sent' AND channel = 'email' AND lane = 'transactional' AND NOT is_test
 ORDER BY id

-- recipient_effects --
-- What the providers' answers changed: bounced addresses, blocked bots, gone browsers.
SELECT count(*) FILTER (WHERE channel = 'email' AND undeliverable_since IS NOT NULL),
       count(*) FILTER (WHERE channel = 'telegram' AND disabled_since IS NOT NULL),
       (SELECT count(*) FROM outbox.push_subscription)
  FROM outbox.recipient_address

-- dead_letter_report --
-- The operator's first look at the dead-letter queue.
SELECT id, lane, channel, user_id, template, attempts, error_class, last_error
  FROM outbox.dead_letter
 ORDER BY dead_at DESC, id DESC
