-- Transactions and amount per hour and entry mode (an attribute as a group key).
SELECT date_bin(INTERVAL '1 hour', event_time) AS bucket, entry,
       count(*) AS transactions, sum(amount) AS amount
FROM decided
GROUP BY date_bin(INTERVAL '1 hour', event_time), entry
