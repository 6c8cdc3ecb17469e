-- Payguard schema, version 2: label feedback (chargebacks, PIX MED reports, fraud claims, analyst
-- verdicts). One row per labelled transaction; the first report wins (a producer retry or a second
-- report of the same transaction is not stored twice). `reported_at` is when the label became known:
-- features built on labels only see a label from a transaction whose event time is at or after it.
CREATE TABLE IF NOT EXISTS labels (
    transaction_id    text            NOT NULL PRIMARY KEY,
    -- Source of the labelled transaction (card, pix, ...), as the label message says.
    source            text,
    -- 'fraud' or 'genuine'.
    label             text            NOT NULL CHECK (label IN ('fraud', 'genuine')),
    -- chargeback, med, claim, analyst...
    report_type       text,
    fraud_scenario    text,
    -- Event time of the labelled transaction, as the label message says (may be NULL).
    transaction_time  timestamptz,
    reported_at       timestamptz     NOT NULL,
    received_at       timestamptz     NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS labels_reported_at_idx ON labels (reported_at DESC);
CREATE INDEX IF NOT EXISTS labels_transaction_time_idx ON labels (transaction_time DESC);
