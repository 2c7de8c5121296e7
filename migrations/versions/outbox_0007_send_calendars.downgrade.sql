-- outbox_0007 downgrade: the column and table as outbox_0006 left them. Frozen.

COMMENT ON COLUMN outbox.rate_limit.tokens IS NULL;
COMMENT ON TABLE outbox.rate_limit IS NULL;
ALTER TABLE outbox.rate_limit ALTER COLUMN tokens DROP DEFAULT;
