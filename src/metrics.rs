//! Process metrics: lock-free counters and gauges shared by every stage, rendered in the Prometheus
//! text format at `/metrics`.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// A monotonically increasing counter.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Add one.
    pub fn inc(&self) {
        self.add(1);
    }
    /// Add `n`.
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    /// Current value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A value that goes up and down (stored as f64 bits).
#[derive(Debug, Default)]
pub struct Gauge(AtomicU64);

impl Gauge {
    /// Set the value.
    pub fn set(&self, v: f64) {
        self.0.store(v.to_bits(), Ordering::Relaxed);
    }
    /// Current value.
    pub fn get(&self) -> f64 {
        f64::from_bits(self.0.load(Ordering::Relaxed))
    }
}

/// Fixed-bucket latency histogram (seconds).
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    buckets: Vec<AtomicU64>,
    count: AtomicU64,
    sum_micros: AtomicU64,
}

const LATENCY_BOUNDS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

impl Default for Histogram {
    fn default() -> Self {
        Self {
            bounds: LATENCY_BOUNDS,
            buckets: LATENCY_BOUNDS.iter().map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_micros: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    /// Record one observation, in seconds.
    pub fn observe(&self, secs: f64) {
        for (b, bound) in self.buckets.iter().zip(self.bounds) {
            if secs <= *bound {
                b.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add((secs * 1e6) as u64, Ordering::Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (b, bound) in self.buckets.iter().zip(self.bounds) {
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{bound}\"}} {}",
                b.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count());
        let _ = writeln!(
            out,
            "{name}_sum {}",
            self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count {}", self.count());
    }
}

/// All metrics of the process.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Messages received from the inputs.
    pub messages_in: Counter,
    /// Canonical transactions committed to the sink.
    pub transactions_out: Counter,
    /// Messages dead-lettered.
    pub dead_letters: Counter,
    /// Micro-batches committed.
    pub batches: Counter,
    /// Failed sink commits (each retried).
    pub sink_errors: Counter,
    /// Broker errors (each retried).
    pub broker_errors: Counter,
    /// Partitions moved to their earliest offset after an out-of-range error.
    pub offset_resets: Counter,
    /// Transactions seen before and not stored again (producer retries).
    pub duplicates: Counter,
    /// Time from a batch's first message to its commit.
    pub batch_latency: Histogram,
    /// Time spent in the engine (decode + SQL) per batch.
    pub engine_time: Histogram,
    /// Time spent writing a batch to the sink.
    pub sink_time: Histogram,
    /// Messages behind the high watermark, per "topic/partition".
    lag: Mutex<BTreeMap<(String, i32), i64>>,
    /// 1 once the sink is connected and migrated.
    pub sink_ready: Gauge,
    /// Events older than the watermark when they arrived (scored all the same).
    pub late_events: Counter,
    /// Label feedback messages accepted (chargebacks, fraud reports, verdicts).
    pub labels_in: Counter,
    /// Entities with window state.
    pub tracked_entities: Gauge,
    /// Rows kept in window state.
    pub tracked_rows: Gauge,
    /// Entities evicted from window state (idle or over budget).
    pub entities_evicted: Gauge,
    /// Event-time watermark, epoch milliseconds.
    pub watermark_ms: Gauge,
    /// SQL reloads that succeeded.
    pub reloads_ok: Counter,
    /// SQL reloads that failed (the running version stayed).
    pub reloads_failed: Counter,
    /// Decisions by kind: approve, review, decline.
    pub decisions: [Counter; 3],
    /// Outcome of the last SQL reload: `None` while it is fine, else the error kept the running
    /// version in place.
    pub reload_error: Mutex<Option<String>>,
}

impl Metrics {
    /// Record the lag of a partition.
    pub fn set_lag(&self, topic: &str, partition: i32, lag: i64) {
        let mut l = self.lag.lock().expect("lag lock");
        l.insert((topic.to_string(), partition), lag.max(0));
    }

    /// Total lag over all partitions.
    pub fn total_lag(&self) -> i64 {
        self.lag.lock().expect("lag lock").values().sum()
    }

    /// Render in the Prometheus text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        let counters: [(&str, &str, &Counter); 12] = [
            (
                "payguard_labels_total",
                "Label feedback messages accepted.",
                &self.labels_in,
            ),
            (
                "payguard_late_events_total",
                "Events older than the watermark on arrival (still scored).",
                &self.late_events,
            ),
            (
                "payguard_sql_reloads_total",
                "SQL reloads that succeeded.",
                &self.reloads_ok,
            ),
            (
                "payguard_sql_reload_failures_total",
                "SQL reloads refused (the running version stayed).",
                &self.reloads_failed,
            ),
            (
                "payguard_messages_in_total",
                "Messages received from the inputs.",
                &self.messages_in,
            ),
            (
                "payguard_transactions_out_total",
                "Transactions committed to the sink.",
                &self.transactions_out,
            ),
            (
                "payguard_dead_letters_total",
                "Messages sent to the dead-letter table.",
                &self.dead_letters,
            ),
            (
                "payguard_batches_total",
                "Micro-batches committed.",
                &self.batches,
            ),
            (
                "payguard_sink_errors_total",
                "Failed sink commits (retried).",
                &self.sink_errors,
            ),
            (
                "payguard_broker_errors_total",
                "Kafka errors (retried).",
                &self.broker_errors,
            ),
            (
                "payguard_offset_resets_total",
                "Partitions reset to their earliest offset.",
                &self.offset_resets,
            ),
            (
                "payguard_duplicates_total",
                "Transactions already stored (producer retries).",
                &self.duplicates,
            ),
        ];
        for (name, help, c) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                c.get()
            );
        }
        let _ = writeln!(
            out,
            "# HELP payguard_consumer_lag Messages behind the partition's high watermark.\n# TYPE payguard_consumer_lag gauge"
        );
        for ((topic, p), lag) in self.lag.lock().expect("lag lock").iter() {
            let _ = writeln!(
                out,
                "payguard_consumer_lag{{topic=\"{topic}\",partition=\"{p}\"}} {lag}"
            );
        }
        for (name, help, g) in [
            (
                "payguard_tracked_entities",
                "Entities with window state.",
                &self.tracked_entities,
            ),
            (
                "payguard_tracked_rows",
                "Rows kept in window state.",
                &self.tracked_rows,
            ),
            (
                "payguard_entities_evicted",
                "Entities evicted from window state so far.",
                &self.entities_evicted,
            ),
            (
                "payguard_watermark_seconds",
                "Event-time watermark (Unix seconds).",
                &self.watermark_ms,
            ),
        ] {
            let v = if name == "payguard_watermark_seconds" {
                g.get() / 1000.0
            } else {
                g.get()
            };
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        }
        let _ = writeln!(
            out,
            "# HELP payguard_decisions_total Transactions decided, by decision.\n# TYPE payguard_decisions_total counter"
        );
        for (d, c) in ["approve", "review", "decline"].iter().zip(&self.decisions) {
            let _ = writeln!(
                out,
                "payguard_decisions_total{{decision=\"{d}\"}} {}",
                c.get()
            );
        }
        let _ = writeln!(
            out,
            "# HELP payguard_sink_ready 1 when the sink is connected.\n# TYPE payguard_sink_ready gauge\npayguard_sink_ready {}",
            self.sink_ready.get()
        );
        self.batch_latency.render(
            &mut out,
            "payguard_batch_latency_seconds",
            "From a batch's first message to its commit.",
        );
        self.engine_time.render(
            &mut out,
            "payguard_engine_seconds",
            "Decode and SQL time per batch.",
        );
        self.sink_time.render(
            &mut out,
            "payguard_sink_write_seconds",
            "Database write time per batch.",
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::default();
        m.messages_in.add(5);
        m.set_lag("t", 2, 7);
        m.batch_latency.observe(0.03);
        let text = m.render();
        assert!(text.contains("payguard_messages_in_total 5\n"));
        assert!(text.contains("payguard_consumer_lag{topic=\"t\",partition=\"2\"} 7\n"));
        assert!(text.contains("payguard_batch_latency_seconds_bucket{le=\"0.05\"} 1\n"));
        assert!(text.contains("payguard_batch_latency_seconds_bucket{le=\"0.025\"} 0\n"));
        assert!(text.contains("payguard_batch_latency_seconds_count 1\n"));
    }
}
