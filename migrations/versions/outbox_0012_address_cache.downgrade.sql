-- outbox_0012 down: the claim aggregates outbox.recipient_address itself again.
DROP TRIGGER recipient_address_truncate ON outbox.recipient_address;
DROP TRIGGER recipient_address_touch ON outbox.recipient_address;
DROP TRIGGER recipient_addresses_cache ON outbox.recipient;
DROP FUNCTION outbox._touch_recipient();
DROP FUNCTION outbox._recipient_addresses();
REVOKE SELECT (user_id) ON outbox.recipient FROM outbox_owner;
ALTER TABLE outbox.recipient DROP COLUMN addresses;
