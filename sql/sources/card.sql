-- Card authorisations (acquirer style) -> canonical transaction.
-- Input table `input`: the JSON fields declared in config.toml, plus _partition and _offset.
-- Output: the canonical columns and the source attributes declared in config.toml (see README,
-- "SQL contracts"). Labels (is_fraud, fraud_scenario)
-- are deliberately not selected: the scoring path never reads them.
SELECT
  auth_id                         AS transaction_id,
  ts                              AS event_time,
  'card'                          AS source,
  amount                          AS amount,
  upper(currency)                 AS currency,
  customer_ref                    AS customer_id,
  pan_token                       AS card_id,
  merchant_id                     AS merchant_id,
  terminal_id                     AS terminal_id,
  mcc                             AS mcc,
  upper(country)                  AS country,
  CASE WHEN entry_mode = 'ecommerce' THEN 'ecommerce' ELSE 'pos' END AS channel,
  device_id                       AS device_id,
  ip                              AS ip_address,
  lat                             AS latitude,
  lon                             AS longitude,
  entry_mode                      AS entry_mode,
  cvv_result                      AS cvv_result,
  three_ds                        AS three_ds,
  response_code                   AS response_code,
  _partition,
  _offset
FROM input
