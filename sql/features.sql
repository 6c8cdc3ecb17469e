-- Behaviour features: one row per transaction, in input order; the first column is transaction_id.
-- Table `transactions` has the canonical columns and the source attributes declared in config.toml
-- ([[attributes]]; README, "SQL contracts"). A text feature is a category for the model.
-- Window functions over event-time RANGE frames per entity are evaluated incrementally by the
-- engine: a row's window holds the rows of the same entity that arrived before it (and itself)
-- whose event_time lies within the frame. Supported: count(*), count(x), count(DISTINCT x), sum,
-- avg, min, max over RANGE BETWEEN INTERVAL '...' PRECEDING AND CURRENT ROW, and lag(x).
-- fraud_labels(*) / known_labels(*) read the label feedback (chargebacks, fraud reports) point in
-- time: the entity's transactions in the frame whose label was reported at or before the row's
-- own event time (frames up to labels.history).
SELECT
  transaction_id,
  CAST(amount AS DOUBLE) AS txn_amount,
  CAST(extract(hour FROM event_time) AS DOUBLE) AS txn_hour,
  CASE WHEN channel = 'ecommerce' THEN 1.0 ELSE 0.0 END AS txn_online,

  -- The sources' own signals (attributes), as categories: how a card was read and checked, how a
  -- PIX was initiated and to which kind of key, a wallet's provider and funding, a transfer's kind.
  entry_mode AS txn_entry_mode,
  cvv_result AS txn_cvv_result,
  three_ds AS txn_three_ds,
  response_code AS txn_response_code,
  pix_initiation AS txn_pix_initiation,
  payee_key_type AS txn_payee_key_type,
  wallet_provider AS txn_wallet_provider,
  wallet_payment_type AS txn_wallet_payment_type,
  wallet_funding AS txn_wallet_funding,
  transfer_kind AS txn_transfer_kind,

  -- Card velocity: card testing is many small charges in minutes, a spree many large ones.
  count(*) OVER (PARTITION BY card_id ORDER BY event_time
                 RANGE BETWEEN INTERVAL '10 minutes' PRECEDING AND CURRENT ROW) AS card_tx_10m,
  count(*) OVER (PARTITION BY card_id ORDER BY event_time
                 RANGE BETWEEN INTERVAL '1 hour' PRECEDING AND CURRENT ROW) AS card_tx_1h,
  count(*) OVER (PARTITION BY card_id ORDER BY event_time
                 RANGE BETWEEN INTERVAL '24 hours' PRECEDING AND CURRENT ROW) AS card_tx_24h,
  COALESCE(CAST(sum(amount) OVER (PARTITION BY card_id ORDER BY event_time
                 RANGE BETWEEN INTERVAL '1 hour' PRECEDING AND CURRENT ROW) AS DOUBLE), 0) AS card_amount_1h,
  COALESCE(CAST(sum(amount) OVER (PARTITION BY card_id ORDER BY event_time
                 RANGE BETWEEN INTERVAL '24 hours' PRECEDING AND CURRENT ROW) AS DOUBLE), 0) AS card_amount_24h,
  count(DISTINCT merchant_id) OVER (PARTITION BY card_id ORDER BY event_time
                 RANGE BETWEEN INTERVAL '1 hour' PRECEDING AND CURRENT ROW) AS card_merchants_1h,
  count(DISTINCT country) OVER (PARTITION BY card_id ORDER BY event_time
                 RANGE BETWEEN INTERVAL '24 hours' PRECEDING AND CURRENT ROW) AS card_countries_24h,
  -- Issuer declines and CVV mismatches of the card: card testing probes with wrong data.
  count(CASE WHEN response_code <> '00' THEN 1 END) OVER (PARTITION BY card_id ORDER BY event_time
                 RANGE BETWEEN INTERVAL '1 hour' PRECEDING AND CURRENT ROW) AS card_declines_1h,
  count(CASE WHEN cvv_result = 'N' THEN 1 END) OVER (PARTITION BY card_id ORDER BY event_time
                 RANGE BETWEEN INTERVAL '24 hours' PRECEDING AND CURRENT ROW) AS card_cvv_mismatches_24h,

  -- Time and distance since the card's previous transaction (-1 when there is none).
  COALESCE((CAST(event_time AS BIGINT)
            - CAST(lag(event_time) OVER (PARTITION BY card_id ORDER BY event_time) AS BIGINT)) / 1000.0,
           -1.0) AS card_secs_since_prev,
  COALESCE(12742.0 * asin(sqrt(
      power(sin(radians(latitude - lag(latitude) OVER (PARTITION BY card_id ORDER BY event_time)) / 2), 2)
      + cos(radians(latitude)) * cos(radians(lag(latitude) OVER (PARTITION BY card_id ORDER BY event_time)))
        * power(sin(radians(longitude - lag(longitude) OVER (PARTITION BY card_id ORDER BY event_time)) / 2), 2))),
      -1.0) AS card_km_from_prev,

  -- Customer: amount against the customer's own habit, new devices.
  count(*) OVER (PARTITION BY customer_id ORDER BY event_time
                 RANGE BETWEEN INTERVAL '24 hours' PRECEDING AND CURRENT ROW) AS customer_tx_24h,
  COALESCE(CAST(amount AS DOUBLE) / NULLIF(avg(amount) OVER (PARTITION BY customer_id ORDER BY event_time
                 RANGE BETWEEN INTERVAL '7 days' PRECEDING AND CURRENT ROW), 0), 1.0) AS customer_amount_ratio_7d,
  count(DISTINCT device_id) OVER (PARTITION BY customer_id ORDER BY event_time
                 RANGE BETWEEN INTERVAL '7 days' PRECEDING AND CURRENT ROW) AS customer_devices_7d,

  -- Merchant: load and cards seen, amount against the merchant's usual ticket.
  count(*) OVER (PARTITION BY merchant_id ORDER BY event_time
                 RANGE BETWEEN INTERVAL '1 hour' PRECEDING AND CURRENT ROW) AS merchant_tx_1h,
  count(DISTINCT card_id) OVER (PARTITION BY merchant_id ORDER BY event_time
                 RANGE BETWEEN INTERVAL '10 minutes' PRECEDING AND CURRENT ROW) AS merchant_cards_10m,
  COALESCE(CAST(amount AS DOUBLE) / NULLIF(avg(amount) OVER (PARTITION BY merchant_id ORDER BY event_time
                 RANGE BETWEEN INTERVAL '24 hours' PRECEDING AND CURRENT ROW), 0), 1.0) AS merchant_amount_ratio_24h,

  -- Label feedback: confirmed fraud already reported for this merchant, terminal (a compromised
  -- terminal keeps producing chargebacks) and card (a card reported stolen is still being used).
  fraud_labels(*) OVER (PARTITION BY merchant_id ORDER BY event_time
                 RANGE BETWEEN INTERVAL '30 days' PRECEDING AND CURRENT ROW) AS merchant_fraud_labels_30d,
  fraud_labels(*) OVER (PARTITION BY terminal_id ORDER BY event_time
                 RANGE BETWEEN INTERVAL '30 days' PRECEDING AND CURRENT ROW) AS terminal_fraud_labels_30d,
  fraud_labels(*) OVER (PARTITION BY card_id ORDER BY event_time
                 RANGE BETWEEN INTERVAL '90 days' PRECEDING AND CURRENT ROW) AS card_fraud_labels_90d
FROM transactions
