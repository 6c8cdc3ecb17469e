-- Payguard schema, version 6: aggregate merges may trail the rows on a second connection.
--
-- With `postgres.trail_aggregates` (the default), a micro-batch is two database transactions
-- instead of one, on two connections, so two backends work at once: the rows' transaction
-- (transactions, alerts, labels, dead letters, offsets) and, a batch behind, the aggregates'
-- (the merges into agg_<name>). Exactly-once still holds because the rows' transaction records
-- what it leaves pending, atomically with the rows:
--   * each stored row carries the `commit_seq` of the transaction that stored it;
--   * `sink_pending_aggregates` gets one row per commit of rows, naming that commit_seq and the
--     event-time range of its rows;
--   * the aggregates' transaction deletes that row first and merges the batch's partial
--     aggregates; it commits both or neither, and finding the row gone (another process applied
--     it) it merges nothing;
--   * at start, before reading on from the stored offsets, the sink applies every pending row of
--     its pipeline: the partial aggregates are computed again from the stored rows of that commit.
-- So after any crash each stored row is counted once in every aggregate.

ALTER TABLE transactions ADD COLUMN IF NOT EXISTS commit_seq bigint;

CREATE SEQUENCE IF NOT EXISTS sink_commit_seq;

CREATE TABLE IF NOT EXISTS sink_pending_aggregates (
    pipeline            text        NOT NULL,
    commit_seq          bigint      NOT NULL,
    first_event_time    timestamptz NOT NULL,
    last_event_time     timestamptz NOT NULL,
    rows                bigint      NOT NULL,
    committed_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (pipeline, commit_seq)
);
