-- Digital wallet payments -> canonical transaction.
-- Input table `input`: the JSON fields declared in config.toml, plus _partition and _offset.
-- Amounts arrive as integer minor units (cents) and become exact decimal(18,2). A wallet funded by
-- a card carries its token, and person-to-person payments have a counterparty wallet instead of a
-- merchant. Labels (is_fraud, fraud_scenario) are deliberately not selected.
SELECT
  payment_id                      AS transaction_id,
  created                         AS event_time,
  'wallet'                        AS source,
  CAST(CAST(amount_minor AS DECIMAL(20,0)) / 100 AS DECIMAL(18,2)) AS amount,
  upper(currency)                 AS currency,
  customer_ref                    AS customer_id,
  wallet_id                       AS account_id,
  card_token                      AS card_id,
  COALESCE(merchant_ref, counterparty) AS merchant_id,
  mcc                             AS mcc,
  CASE payment_type WHEN 'nfc' THEN 'wallet_nfc' WHEN 'in_app' THEN 'wallet_in_app'
       ELSE 'wallet_p2p' END      AS channel,
  device_id                       AS device_id,
  ip                              AS ip_address,
  provider                        AS wallet_provider,
  payment_type                    AS wallet_payment_type,
  funding                         AS wallet_funding,
  _partition,
  _offset
FROM input
