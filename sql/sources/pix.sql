-- PIX instant payments (SPI style) -> canonical transaction.
-- Input table `input`: the JSON fields declared in config.toml, plus _partition and _offset.
-- PIX is always in BRL and domestic. Accounts are identified as <ispb>-<branch>-<account>, the same
-- way the transfer mapping does, so one account has one id across sources. The payee account is
-- the "merchant or payee". Labels (is_fraud, fraud_scenario) are deliberately not selected.
SELECT
  end_to_end_id                   AS transaction_id,
  created_at                      AS event_time,
  'pix'                           AS source,
  amount                          AS amount,
  'BRL'                           AS currency,
  customer_ref                    AS customer_id,
  payer_ispb || '-' || payer_branch || '-' || payer_account AS account_id,
  CASE WHEN payee_account IS NULL THEN payee_key
       ELSE payee_ispb || '-' || payee_branch || '-' || payee_account END AS merchant_id,
  'BR'                            AS country,
  'pix'                           AS channel,
  device_id                       AS device_id,
  ip                              AS ip_address,
  initiation                      AS pix_initiation,
  payee_key_type                  AS payee_key_type,
  _partition,
  _offset
FROM input
