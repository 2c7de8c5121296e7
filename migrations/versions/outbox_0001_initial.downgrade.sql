-- Remove everything revision outbox_0001 created.
DROP SCHEMA IF EXISTS outbox CASCADE;

-- Roles are cluster-wide: drop each one unless another database still grants it
-- something (then it stays, and the operator drops it when the last one goes).
DO $roles$
DECLARE
    r text;
BEGIN
    FOREACH r IN ARRAY ARRAY['outbox_producer', 'outbox_dispatcher', 'outbox_inspector'] LOOP
        IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r) THEN
            BEGIN
                EXECUTE format('DROP ROLE %I', r);
            EXCEPTION WHEN dependent_objects_still_exist THEN
                RAISE NOTICE 'outbox: role % is still used by another database; kept', r;
            END;
        END IF;
    END LOOP;
END
$roles$;
