-- Payguard schema, version 1: scored transactions, alerts, dead letters and consumer offsets.
-- (Windowed aggregate tables agg_<name> are created at start from sql/aggregates/*.sql.)
-- Works on plain PostgreSQL; when the timescaledb extension is available, `transactions`, `alerts`
-- and `dead_letters` become hypertables on their time column (same columns, same query results).

CREATE TABLE IF NOT EXISTS transactions (
    transaction_id  text            NOT NULL,
    event_time      timestamptz     NOT NULL,
    source          text            NOT NULL,
    amount          numeric(18,2)   NOT NULL,
    currency        text            NOT NULL,
    customer_id     text,
    account_id      text,
    card_id         text,
    merchant_id     text,
    terminal_id     text,
    mcc             text,
    country         text,
    channel         text,
    device_id       text,
    ip_address      text,
    latitude        double precision,
    longitude       double precision,
    score           double precision,
    model_version   text,
    decision        text            NOT NULL,
    rule_hits       jsonb           NOT NULL DEFAULT '[]',
    processed_at    timestamptz     NOT NULL DEFAULT now(),
    -- A producer retry repeats the id (and its event time): stored once.
    PRIMARY KEY (transaction_id, event_time)
);
CREATE INDEX IF NOT EXISTS transactions_event_time_idx ON transactions (event_time DESC);
CREATE INDEX IF NOT EXISTS transactions_card_idx ON transactions (card_id, event_time DESC);
CREATE INDEX IF NOT EXISTS transactions_merchant_idx ON transactions (merchant_id, event_time DESC);

CREATE INDEX IF NOT EXISTS transactions_decision_idx ON transactions (decision, event_time DESC)
    WHERE decision <> 'approve';

-- One alert per transaction sent to review or declined, with why: the rule hits and the features.
CREATE TABLE IF NOT EXISTS alerts (
    transaction_id  text            NOT NULL,
    event_time      timestamptz     NOT NULL,
    source          text            NOT NULL,
    amount          numeric(18,2)   NOT NULL,
    currency        text            NOT NULL,
    customer_id     text,
    card_id         text,
    merchant_id     text,
    decision        text            NOT NULL,
    score           double precision,
    model_version   text,
    rule_hits       jsonb           NOT NULL,
    features        jsonb           NOT NULL,
    created_at      timestamptz     NOT NULL DEFAULT now(),
    PRIMARY KEY (transaction_id, event_time)
);
CREATE INDEX IF NOT EXISTS alerts_event_time_idx ON alerts (event_time DESC);
CREATE INDEX IF NOT EXISTS alerts_decision_idx ON alerts (decision, event_time DESC);

CREATE TABLE IF NOT EXISTS dead_letters (
    id              bigserial,
    received_at     timestamptz     NOT NULL DEFAULT now(),
    source          text            NOT NULL,
    topic           text            NOT NULL,
    kafka_partition integer         NOT NULL,
    kafka_offset    bigint          NOT NULL,
    raw             bytea           NOT NULL,
    reason          text            NOT NULL,
    PRIMARY KEY (id, received_at)
);
CREATE INDEX IF NOT EXISTS dead_letters_position_idx ON dead_letters (topic, kafka_partition, kafka_offset);

-- The offset store: the next offset to read per (pipeline, topic, partition), committed in the
-- same transaction as the rows it covers.
CREATE TABLE IF NOT EXISTS consumer_offsets (
    pipeline        text            NOT NULL,
    topic           text            NOT NULL,
    kafka_partition integer         NOT NULL,
    next_offset     bigint          NOT NULL,
    updated_at      timestamptz     NOT NULL DEFAULT now(),
    PRIMARY KEY (pipeline, topic, kafka_partition)
);

-- TimescaleDB is used when the server has it installed *and* preloaded (its library is loaded, so
-- its settings show in pg_settings): an installed but not preloaded TimescaleDB refuses CREATE
-- EXTENSION with a FATAL error, and the schema stays plain PostgreSQL (the sink warns at start).
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb')
       AND EXISTS (SELECT 1 FROM pg_settings WHERE name LIKE 'timescaledb.%') THEN
        CREATE EXTENSION IF NOT EXISTS timescaledb;
        PERFORM create_hypertable('transactions', 'event_time', if_not_exists => TRUE, migrate_data => TRUE);
        PERFORM create_hypertable('alerts', 'event_time', if_not_exists => TRUE, migrate_data => TRUE);
        PERFORM create_hypertable('dead_letters', 'received_at', if_not_exists => TRUE, migrate_data => TRUE);
    END IF;
END
$$;
