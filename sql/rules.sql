-- Rules over `scored` (canonical columns, source attributes, the features of features.sql, score,
-- model_version).
-- One SELECT per rule, joined with UNION ALL; each yields a row per hit:
--   transaction_id, rule (name), severity ('info' | 'review' | 'decline'), reason (for the analyst).
-- The decision is the strongest severity of the hits, raised by the model score thresholds.
SELECT transaction_id, 'card_testing' AS rule, 'review' AS severity,
       concat('card used ', card_tx_10m, ' times in 10 minutes, this charge ', amount, ' ', currency) AS reason
FROM scored
WHERE card_tx_10m >= 4 AND amount < 5

UNION ALL
SELECT transaction_id, 'card_declines_burst', 'review',
       concat('card declined ', card_declines_1h, ' times in 1 hour (', card_cvv_mismatches_24h,
              ' CVV mismatches in 24 hours), this response ', response_code)
FROM scored
WHERE card_declines_1h >= 3

UNION ALL
SELECT transaction_id, 'card_spend_spike', 'review',
       concat('card spent ', round(card_amount_1h, 2), ' in 1 hour over ', card_tx_1h, ' charges')
FROM scored
WHERE card_tx_1h >= 3 AND card_amount_1h > 3000

UNION ALL
SELECT transaction_id, 'impossible_travel', 'decline',
       concat('card present ', round(card_km_from_prev), ' km from its previous use ',
              round(card_secs_since_prev / 60), ' minutes earlier')
FROM scored
WHERE channel = 'pos' AND card_km_from_prev > 500
  AND card_secs_since_prev >= 0 AND card_km_from_prev / greatest(card_secs_since_prev / 3600.0, 0.01) > 900

UNION ALL
SELECT transaction_id, 'amount_far_above_habit', 'review',
       concat('amount ', amount, ' is ', round(customer_amount_ratio_7d, 1), 'x the customer''s 7-day average')
FROM scored
WHERE customer_amount_ratio_7d > 8 AND amount > 500

UNION ALL
SELECT transaction_id, 'very_high_model_score', 'decline',
       concat('model ', model_version, ' scored ', round(score, 3))
FROM scored
WHERE score >= 0.98

