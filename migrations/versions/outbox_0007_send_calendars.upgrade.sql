-- outbox_0007: outbox.rate_limit holds send calendars and recipient paces (see
-- dispatcher/_limits.py), not the token buckets its first comment described. The
-- tokens column has been written as 0 and never read since outbox_0001; it gets a
-- default so that this version's dispatchers stop writing it, while dispatchers of
-- the previous version (still rolling, see docs/install.md: migrate first) keep
-- writing 0. A later revision drops it (expand, then contract). Frozen.

ALTER TABLE outbox.rate_limit ALTER COLUMN tokens SET DEFAULT 0;

COMMENT ON TABLE outbox.rate_limit IS
    'Send calendars (key slot:<limit>:<n>, one send each, at updated_at) and recipient paces '
    '(key pace:<...>, next send not before updated_at), shared by every dispatcher replica';
COMMENT ON COLUMN outbox.rate_limit.tokens IS
    'Unused (always 0); kept for dispatchers older than outbox_0007, dropped by a later revision';
