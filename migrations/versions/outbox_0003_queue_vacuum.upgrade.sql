-- outbox_0003: vacuum the queue table by its dead rows. Frozen: this is what the
-- revision ran; the current state of the schema is sql/schema.sql.
ALTER TABLE outbox.message SET (
    autovacuum_vacuum_scale_factor = 0,
    autovacuum_vacuum_threshold = 10000,
    autovacuum_vacuum_cost_delay = 0,
    autovacuum_analyze_scale_factor = 0,
    autovacuum_analyze_threshold = 10000
);
