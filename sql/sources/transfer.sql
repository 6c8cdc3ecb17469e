-- Bank transfers (TED, internal) and boleto payments -> canonical transaction.
-- Input table `input`: the JSON fields declared in config.toml, plus _partition and _offset.
-- requested_at is epoch milliseconds (decoded as a timestamp), the amount is a JSON number decoded
-- exactly as decimal(18,2). Accounts are <ispb>-<branch>-<account>, as in the PIX mapping.
-- Labels (is_fraud, fraud_scenario) are deliberately not selected.
SELECT
  transfer_id                     AS transaction_id,
  requested_at                    AS event_time,
  'transfer'                      AS source,
  amount                          AS amount,
  upper(currency)                 AS currency,
  customer_id                     AS customer_id,
  debtor_ispb || '-' || debtor_branch || '-' || debtor_account AS account_id,
  creditor_ispb || '-' || creditor_branch || '-' || creditor_account AS merchant_id,
  'BR'                            AS country,
  CASE WHEN kind = 'boleto' THEN 'boleto' ELSE 'transfer' END AS channel,
  device_id                       AS device_id,
  ip                              AS ip_address,
  kind                            AS transfer_kind,
  _partition,
  _offset
FROM input
