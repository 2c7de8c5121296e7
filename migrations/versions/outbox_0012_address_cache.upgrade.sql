-- outbox_0012: each recipient row carries its addresses as the claim returns them.
--
-- Since outbox_0010 a user's addresses are rows of outbox.recipient_address, and the
-- claim aggregated them per message (a correlated subquery and json_agg for every
-- message of every batch): a claim of 100 cost 16 % more than with the address
-- columns of outbox_0009 (python -m bench claims). Addresses change rarely and are
-- read with every message, so the aggregate is now kept with the recipient:
-- outbox.recipient.addresses, the claim's [[channel, address, usable], ...].
--
-- outbox.recipient_address stays the truth and the only place addresses are
-- written. The cache cannot drift or be forged: a BEFORE trigger on outbox.recipient
-- computes it from outbox.recipient_address on every insert and update of the row,
-- whatever the statement set it to, and every change of an address touches its
-- recipient row. The touch takes the recipient's row lock before the trigger reads
-- the addresses, so two transactions changing one user's addresses at once queue
-- there and the second computes the cache from a snapshot that sees the first.

ALTER TABLE outbox.recipient ADD COLUMN addresses json NOT NULL DEFAULT '[]';
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

-- Functions belong to outbox_owner, like every function of the schema; its triggers
-- read the addresses (it may) and write the cache column alone of a recipient row.
GRANT SELECT (user_id, addresses), UPDATE (addresses) ON outbox.recipient TO outbox_owner;
GRANT CREATE ON SCHEMA outbox TO outbox_owner;  -- a new owner needs it, for the moment
ALTER FUNCTION outbox._recipient_addresses() OWNER TO outbox_owner;
ALTER FUNCTION outbox._touch_recipient() OWNER TO outbox_owner;
REVOKE CREATE ON SCHEMA outbox FROM outbox_owner;

-- today's addresses (the BEFORE trigger computes them)
UPDATE outbox.recipient r SET addresses = '[]'
 WHERE EXISTS (SELECT 1 FROM outbox.recipient_address a WHERE a.user_id = r.user_id);
