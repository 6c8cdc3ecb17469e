-- Payguard schema, version 4: storage policies and the dashboard's per-minute figures.
--
-- With the timescaledb extension (0001 made transactions, alerts and dead_letters hypertables):
--   * compression settings on the three hypertables; the compression and retention policies take
--     their intervals from config (postgres.compress_after, postgres.retention) through
--     payguard_storage_policies(), which the sink calls at every start;
--   * transactions_per_minute, a continuous aggregate (real-time: recent, not yet materialised
--     minutes are computed from the hypertable), refreshed by a policy every minute.
-- Without it (plain PostgreSQL): transactions_per_minute is a plain view with the same columns
-- and the same results, served by transactions_event_time_idx; payguard_storage_policies()
-- applies the retention by deleting old rows (there is no compression).

-- Fitting indexes for the plain path and the API (harmless on hypertables).
CREATE INDEX IF NOT EXISTS transactions_customer_idx ON transactions (customer_id, event_time DESC);
CREATE INDEX IF NOT EXISTS dead_letters_received_at_idx ON dead_letters (received_at DESC);
CREATE INDEX IF NOT EXISTS dead_letters_source_idx ON dead_letters (source, received_at DESC);

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb') THEN
        EXECUTE $q$ALTER TABLE transactions SET (timescaledb.compress,
            timescaledb.compress_segmentby = 'source',
            timescaledb.compress_orderby = 'event_time DESC, transaction_id')$q$;
        EXECUTE $q$ALTER TABLE alerts SET (timescaledb.compress,
            timescaledb.compress_segmentby = 'decision',
            timescaledb.compress_orderby = 'event_time DESC, transaction_id')$q$;
        EXECUTE $q$ALTER TABLE dead_letters SET (timescaledb.compress,
            timescaledb.compress_segmentby = 'source',
            timescaledb.compress_orderby = 'received_at DESC, id')$q$;
        -- WITH NO DATA: migrations run in a transaction; the refresh policy fills it.
        EXECUTE $q$CREATE MATERIALIZED VIEW IF NOT EXISTS transactions_per_minute
            WITH (timescaledb.continuous, timescaledb.materialized_only = false) AS
            SELECT time_bucket(INTERVAL '1 minute', event_time) AS bucket,
                   source,
                   decision,
                   count(*) AS transactions,
                   sum(amount) AS amount,
                   count(*) FILTER (WHERE decision <> 'approve') AS alerts,
                   max(score) AS max_score
            FROM transactions
            GROUP BY 1, 2, 3
            WITH NO DATA$q$;
        PERFORM add_continuous_aggregate_policy('transactions_per_minute',
            start_offset => NULL, end_offset => INTERVAL '1 minute',
            schedule_interval => INTERVAL '1 minute', if_not_exists => TRUE);
    ELSE
        EXECUTE $q$CREATE OR REPLACE VIEW transactions_per_minute AS
            SELECT date_bin(INTERVAL '1 minute', event_time, TIMESTAMPTZ '2000-01-03 00:00:00+00') AS bucket,
                   source,
                   decision,
                   count(*) AS transactions,
                   sum(amount) AS amount,
                   count(*) FILTER (WHERE decision <> 'approve') AS alerts,
                   max(score) AS max_score
            FROM transactions
            GROUP BY 1, 2, 3$q$;
    END IF;
END
$$;

-- Apply the configured storage policies; NULL interval = off. Returns what it did, e.g.
-- 'timescaledb: compress after 7 days, retention off' or 'plain: deleted 0 rows older than ...'.
CREATE OR REPLACE FUNCTION payguard_storage_policies(compress_after interval, retention interval)
RETURNS text LANGUAGE plpgsql AS $fn$
DECLARE
    t text;
    deleted bigint := 0;
    n bigint;
BEGIN
    IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb') THEN
        FOREACH t IN ARRAY ARRAY['transactions', 'alerts', 'dead_letters'] LOOP
            PERFORM remove_compression_policy(t, if_exists => TRUE);
            IF compress_after IS NOT NULL THEN
                PERFORM add_compression_policy(t, compress_after);
            END IF;
            PERFORM remove_retention_policy(t, if_exists => TRUE);
            IF retention IS NOT NULL THEN
                PERFORM add_retention_policy(t, retention);
            END IF;
        END LOOP;
        RETURN format('timescaledb: compress after %s, retention %s',
            coalesce(compress_after::text, 'off'), coalesce(retention::text, 'off'));
    END IF;
    IF retention IS NULL THEN
        RETURN 'plain: retention off (no compression without timescaledb)';
    END IF;
    DELETE FROM transactions WHERE event_time < now() - retention;
    GET DIAGNOSTICS n = ROW_COUNT; deleted := deleted + n;
    DELETE FROM alerts WHERE event_time < now() - retention;
    GET DIAGNOSTICS n = ROW_COUNT; deleted := deleted + n;
    DELETE FROM dead_letters WHERE received_at < now() - retention;
    GET DIAGNOSTICS n = ROW_COUNT; deleted := deleted + n;
    RETURN format('plain: deleted %s rows older than %s', deleted, retention);
END
$fn$;
