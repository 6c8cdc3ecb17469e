-- Hopping window: 15-minute windows starting every 5 minutes, per country. Each transaction
-- belongs to the three windows that start 0, 5 and 10 minutes before its 5-minute bin.
SELECT date_bin(INTERVAL '5 minutes', event_time) - h.back AS window_start,
       country,
       count(*) AS transactions,
       sum(amount) AS amount,
       sum(CASE WHEN decision = 'decline' THEN 1 ELSE 0 END) AS declines
FROM decided
CROSS JOIN (VALUES (INTERVAL '0 minutes'), (INTERVAL '5 minutes'), (INTERVAL '10 minutes')) AS h(back)
GROUP BY date_bin(INTERVAL '5 minutes', event_time) - h.back, country
