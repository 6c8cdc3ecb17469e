-- One rule over the example feed's own signal and a feature.
SELECT transaction_id, 'keyed_burst' AS rule, 'review' AS severity,
       concat(card_keyed_24h, ' keyed-in charges on the card in 24 hours') AS reason
FROM scored
WHERE entry = 'keyed' AND card_keyed_24h >= 3
