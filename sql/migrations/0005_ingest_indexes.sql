-- Payguard schema, version 5: `transactions` keeps only the indexes its ingest can afford.
--
-- Every row of a micro-batch is COPYed into `transactions`, and each index on a random key costs
-- a B-tree descent and page write per row. Measured with psql's COPY of 300,000 rows of this
-- table's shape on the 2-core machine (BENCHMARKS.md, "Sink and end to end", session 10): with the
-- three entity indexes below 18-20k rows/s, without them 38-47k. The primary key (dedupe, the API's
-- lookup by id), the event-time index (time ranges, the per-minute view, the state rebuilt at
-- start) and the partial decision index (only alerts) stay.
--
-- Investigations by entity read `alerts` (a few percent of the rows), indexed by card here. To
-- query all of a card's (or merchant's, customer's) transactions fast, create the index yourself,
-- e.g. `CREATE INDEX CONCURRENTLY ON transactions (card_id, event_time DESC)`, knowing it roughly
-- halves what one database transaction ingests per second.
DROP INDEX IF EXISTS transactions_card_idx;
DROP INDEX IF EXISTS transactions_merchant_idx;
DROP INDEX IF EXISTS transactions_customer_idx;

CREATE INDEX IF NOT EXISTS alerts_card_idx ON alerts (card_id, event_time DESC);
