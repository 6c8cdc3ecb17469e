-- The feed's messages (table `input`) -> the canonical transaction and the declared attributes.
SELECT
  txn_ref                         AS transaction_id,
  ts_ms                           AS event_time,
  'cards'                         AS source,
  CAST(CAST(amount_cents AS DECIMAL(20,0)) / 100 AS DECIMAL(18,2)) AS amount,
  'EUR'                           AS currency,
  card                            AS card_id,
  card                            AS customer_id,
  shop                            AS merchant_id,
  CASE WHEN entry = 'keyed' THEN 'ecommerce' ELSE 'pos' END AS channel,
  entry                           AS entry,
  v1                              AS v1,
  v2                              AS v2,
  v3                              AS v3,
  v4                              AS v4,
  _partition,
  _offset
FROM input
