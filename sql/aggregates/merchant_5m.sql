-- Per merchant, 5-minute tumbling windows: volume, amount, alerts (review or decline).
SELECT date_bin(INTERVAL '5 minutes', event_time) AS bucket,
       merchant_id,
       count(*) AS transactions,
       sum(amount) AS amount,
       sum(CASE WHEN decision <> 'approve' THEN 1 ELSE 0 END) AS alerts
FROM decided
GROUP BY date_bin(INTERVAL '5 minutes', event_time), merchant_id
