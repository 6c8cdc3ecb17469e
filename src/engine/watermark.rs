//! Event-time watermark: the newest event time seen per (source, partition), minus the allowed
//! lateness, taken as the minimum over the partitions that are not idle. A partition without a
//! message for `idle_partition_timeout` (of wall time) stops holding the watermark back, so one
//! quiet partition cannot stall eviction. The watermark never moves back: when an idle partition
//! speaks again with older events, those events are late (and counted as such).

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// The watermark tracker.
#[derive(Debug, Clone)]
pub struct Watermark {
    lateness_ms: i64,
    idle: Duration,
    partitions: HashMap<(usize, i32), (i64, Instant)>,
    current: i64,
}

impl Watermark {
    /// A tracker with the given lateness and idle timeout.
    pub fn new(lateness_ms: i64, idle_ms: i64) -> Self {
        Self {
            lateness_ms,
            idle: Duration::from_millis(idle_ms.max(0) as u64),
            partitions: HashMap::new(),
            current: i64::MIN,
        }
    }

    /// Record the newest event time of a partition in a batch, at wall time `now`.
    pub fn observe(&mut self, source: usize, partition: i32, max_event_ms: i64, now: Instant) {
        let e = self
            .partitions
            .entry((source, partition))
            .or_insert((i64::MIN, now));
        e.0 = e.0.max(max_event_ms);
        e.1 = now;
    }

    /// The allowed lateness, in milliseconds.
    pub fn lateness_ms(&self) -> i64 {
        self.lateness_ms
    }

    /// The watermark (`i64::MIN` before any event).
    pub fn get(&self) -> i64 {
        self.current
    }

    /// Move the watermark forward as of wall time `now`; returns it.
    pub fn advance(&mut self, now: Instant) -> i64 {
        self.current = self.current.max(self.computed(now));
        self.current
    }

    fn computed(&self, now: Instant) -> i64 {
        let active = self
            .partitions
            .values()
            .filter(|(_, seen)| now.duration_since(*seen) < self.idle)
            .map(|(t, _)| *t)
            .min();
        let newest = active.or_else(|| self.partitions.values().map(|(t, _)| *t).max());
        newest.map_or(i64::MIN, |t| t.saturating_sub(self.lateness_ms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_partitions_do_not_stall_the_watermark() {
        let mut w = Watermark::new(1_000, 30_000);
        let t0 = Instant::now();
        assert_eq!(w.advance(t0), i64::MIN);
        w.observe(0, 0, 10_000, t0);
        w.observe(0, 1, 50_000, t0);
        assert_eq!(w.advance(t0), 9_000, "held back by the slowest partition");
        let later = t0 + Duration::from_secs(31);
        w.observe(0, 1, 60_000, later);
        assert_eq!(w.advance(later), 59_000, "partition 0 went idle");
        w.observe(0, 0, 20_000, later);
        assert_eq!(
            w.advance(later),
            59_000,
            "it never moves back: partition 0's events are late"
        );
        assert_eq!(w.get(), 59_000);
    }
}
