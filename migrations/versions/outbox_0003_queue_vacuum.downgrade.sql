-- Undo outbox_0003: the server's autovacuum settings for outbox.message again.
ALTER TABLE outbox.message RESET (
    autovacuum_vacuum_scale_factor,
    autovacuum_vacuum_threshold,
    autovacuum_vacuum_cost_delay,
    autovacuum_analyze_scale_factor,
    autovacuum_analyze_threshold
);
