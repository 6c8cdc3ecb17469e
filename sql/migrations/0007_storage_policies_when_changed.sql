-- Payguard schema, version 7: storage policies are set only when the configuration changes them.
--
-- payguard_storage_policies() (version 4) removed and added every TimescaleDB compression and
-- retention policy at each start. Each add schedules its job to run at once, so the jobs of a
-- restart ran together and raced on the same chunk (a retention job dropping the chunk that a
-- compression job was converting: "converting chunk ... failed (chunk not found)"), and job ids
-- and their statistics were lost at every start. Now a policy whose interval is already the
-- configured one is left as it is; a different one is replaced, an unwanted one removed. The
-- continuous aggregate transactions_per_minute gets the retention policy too.
-- Plain PostgreSQL: unchanged (retention deletes old rows at each start; no compression).

CREATE OR REPLACE FUNCTION payguard_storage_policies(compress_after interval, retention interval)
RETURNS text LANGUAGE plpgsql AS $fn$
DECLARE
    t text;
    deleted bigint := 0;
    n bigint;
    current interval;
    job integer;
    changes text[] := ARRAY[]::text[];
BEGIN
    -- Whole days read better in timescaledb_information.jobs (7 days, not 168:00:00); hours only,
    -- never months, whose length varies.
    compress_after := justify_hours(compress_after);
    retention := justify_hours(retention);
    IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb') THEN
        FOREACH t IN ARRAY ARRAY['transactions', 'alerts', 'dead_letters'] LOOP
            SELECT j.job_id, (j.config ->> 'compress_after')::interval INTO job, current
              FROM timescaledb_information.jobs j
             WHERE j.proc_name = 'policy_compression'
               AND j.hypertable_schema = current_schema() AND j.hypertable_name = t;
            IF job IS NOT NULL AND current IS DISTINCT FROM compress_after THEN
                PERFORM remove_compression_policy(t);
                changes := changes || format('%s: compression policy after %s removed', t, current);
                job := NULL;
            END IF;
            IF job IS NULL AND compress_after IS NOT NULL THEN
                PERFORM add_compression_policy(t, compress_after);
                changes := changes || format('%s: compression policy after %s added', t, compress_after);
            END IF;
        END LOOP;
        -- The continuous aggregate keeps its buckets when chunks of transactions are dropped:
        -- it gets the same retention, as the plain view loses the deleted rows' minutes.
        FOREACH t IN ARRAY ARRAY['transactions', 'alerts', 'dead_letters', 'transactions_per_minute'] LOOP
            SELECT j.job_id, (j.config ->> 'drop_after')::interval INTO job, current
              FROM timescaledb_information.jobs j
             WHERE j.proc_name = 'policy_retention'
               AND j.hypertable_schema = current_schema() AND j.hypertable_name = t;
            IF job IS NOT NULL AND current IS DISTINCT FROM retention THEN
                PERFORM remove_retention_policy(t);
                changes := changes || format('%s: retention policy of %s removed', t, current);
                job := NULL;
            END IF;
            IF job IS NULL AND retention IS NOT NULL THEN
                PERFORM add_retention_policy(t, retention);
                changes := changes || format('%s: retention policy of %s added', t, retention);
            END IF;
        END LOOP;
        RETURN format('timescaledb: compress after %s, retention %s (%s)',
            coalesce(compress_after::text, 'off'), coalesce(retention::text, 'off'),
            CASE WHEN cardinality(changes) = 0 THEN 'unchanged' ELSE array_to_string(changes, '; ') END);
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
