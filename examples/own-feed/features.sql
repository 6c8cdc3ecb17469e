-- Features of the example feed: its own signals as they are, a category, and card velocity.
SELECT
  transaction_id,
  CAST(amount AS DOUBLE) AS txn_amount,
  entry AS txn_entry,
  v1 AS txn_v1,
  v2 AS txn_v2,
  v3 AS txn_v3,
  v4 AS txn_v4,
  count(*) OVER (PARTITION BY card_id ORDER BY event_time
                 RANGE BETWEEN INTERVAL '1 hour' PRECEDING AND CURRENT ROW) AS card_tx_1h,
  count(CASE WHEN entry = 'keyed' THEN 1 END) OVER (PARTITION BY card_id ORDER BY event_time
                 RANGE BETWEEN INTERVAL '24 hours' PRECEDING AND CURRENT ROW) AS card_keyed_24h,
  count(DISTINCT merchant_id) OVER (PARTITION BY card_id ORDER BY event_time
                 RANGE BETWEEN INTERVAL '1 hour' PRECEDING AND CURRENT ROW) AS card_shops_1h
FROM transactions
