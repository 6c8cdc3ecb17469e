-- Per minute, source and decision: volume, amount, alerts, highest score. Tumbling 1-minute window.
-- Merged into agg_minute_by_source (key: bucket, source, decision) in the offsets' transaction.
SELECT date_bin(INTERVAL '1 minute', event_time) AS bucket,
       source,
       decision,
       count(*) AS transactions,
       sum(amount) AS amount,
       max(score) AS max_score
FROM decided
GROUP BY date_bin(INTERVAL '1 minute', event_time), source, decision
