//! Process metrics shared by every stage, rendered in the Prometheus text format at `/metrics`.
//!
//! Plain counters and gauges are lock-free atomics. Labelled families (by `source`, `partition`,
//! `decision`, `reason`) keep one series per label set behind a mutex taken once per fetch or
//! batch, never per message. Latency histograms use fixed buckets in seconds. The Grafana
//! dashboards (`grafana/provisioning/dashboards/`) query these names; `tests/grafana.rs` checks
//! that every name they use is rendered here.

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
    /// Add `d` (negative: subtract), atomically against concurrent adds.
    pub fn add(&self, d: f64) {
        let _ = self
            .0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                Some((f64::from_bits(bits) + d).to_bits())
            });
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
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
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
            .fetch_add((secs.max(0.0) * 1e6) as u64, Ordering::Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// The series lines (no HELP/TYPE), with `labels` (already rendered, `k="v",...`) before `le`.
    fn render_series(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        for (b, bound) in self.buckets.iter().zip(self.bounds) {
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {}",
                b.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}",
            self.count()
        );
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(
            out,
            "{name}_sum{braces} {}",
            self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count{braces} {}", self.count());
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        header(out, name, help, "histogram");
        self.render_series(out, name, "");
    }
}

fn header(out: &mut String, name: &str, help: &str, kind: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// Escape a label value (backslash, double quote, newline).
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn label_set(names: &[&str], values: &[String]) -> String {
    names
        .iter()
        .zip(values)
        .map(|(n, v)| format!("{n}=\"{}\"", escape(v)))
        .collect::<Vec<_>>()
        .join(",")
}

/// Counters by label values (e.g. `source`, `decision`).
#[derive(Debug)]
pub struct CounterVec {
    labels: &'static [&'static str],
    series: Mutex<BTreeMap<Vec<String>, u64>>,
}

impl CounterVec {
    /// A family with these label names.
    pub fn new(labels: &'static [&'static str]) -> Self {
        Self {
            labels,
            series: Mutex::default(),
        }
    }

    /// Add `n` to the series of `values` (one per label name, in order).
    pub fn add(&self, values: &[&str], n: u64) {
        debug_assert_eq!(values.len(), self.labels.len());
        let key: Vec<String> = values.iter().map(|v| v.to_string()).collect();
        *self
            .series
            .lock()
            .expect("counter lock")
            .entry(key)
            .or_default() += n;
    }

    /// Value of one series (0 if never added to).
    pub fn get(&self, values: &[&str]) -> u64 {
        let key: Vec<String> = values.iter().map(|v| v.to_string()).collect();
        self.series
            .lock()
            .expect("counter lock")
            .get(&key)
            .copied()
            .unwrap_or(0)
    }

    /// Sum over every series.
    pub fn total(&self) -> u64 {
        self.series.lock().expect("counter lock").values().sum()
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        header(out, name, help, "counter");
        for (values, v) in self.series.lock().expect("counter lock").iter() {
            let _ = writeln!(out, "{name}{{{}}} {v}", label_set(self.labels, values));
        }
    }
}

/// Histograms by label values.
#[derive(Debug)]
pub struct HistogramVec {
    labels: &'static [&'static str],
    series: Mutex<BTreeMap<Vec<String>, Histogram>>,
}

impl HistogramVec {
    /// A family with these label names.
    pub fn new(labels: &'static [&'static str]) -> Self {
        Self {
            labels,
            series: Mutex::default(),
        }
    }

    /// Record one observation (seconds) in the series of `values`.
    pub fn observe(&self, values: &[&str], secs: f64) {
        debug_assert_eq!(values.len(), self.labels.len());
        let key: Vec<String> = values.iter().map(|v| v.to_string()).collect();
        self.series
            .lock()
            .expect("histogram lock")
            .entry(key)
            .or_default()
            .observe(secs);
    }

    /// Observations over every series.
    pub fn count(&self) -> u64 {
        self.series
            .lock()
            .expect("histogram lock")
            .values()
            .map(Histogram::count)
            .sum()
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        header(out, name, help, "histogram");
        for (values, h) in self.series.lock().expect("histogram lock").iter() {
            h.render_series(out, name, &label_set(self.labels, values));
        }
    }
}

/// A bounded name for a dead letter's free-text reason, the `reason` label of
/// `payguard_dead_letters_total` (the full text is in the `dead_letters` table).
pub fn dead_letter_kind(reason: &str) -> &'static str {
    let r = reason.to_ascii_lowercase();
    if r.contains("tombstone") {
        "tombstone"
    } else if r.contains("exceeds kafka.max_message_bytes") {
        "oversized"
    } else if r.starts_with("invalid utf-8") {
        "invalid_utf8"
    } else if r.starts_with("empty message") {
        "empty"
    } else if r.starts_with("invalid json") || r.starts_with("expected a json object") {
        "invalid_json"
    } else if r.starts_with("missing required field") {
        "missing_field"
    } else if r.starts_with("wrong field type") {
        "wrong_type"
    } else if r.contains("future") {
        "future_event"
    } else if r.starts_with("mapping") {
        "mapping"
    } else {
        "other"
    }
}

/// All metrics of the process.
#[derive(Debug)]
pub struct Metrics {
    /// Messages received from the inputs, all sources (use [`Metrics::messages_received`], which
    /// also counts them by source and partition).
    pub messages_in: Counter,
    /// Messages received by (source, partition).
    pub messages_in_by: CounterVec,
    /// Canonical transactions committed to the sink.
    pub transactions_out: Counter,
    /// Messages dead-lettered, all sources (see [`Metrics::dead_letter`]).
    pub dead_letters: Counter,
    /// Messages dead-lettered by (source, reason kind).
    pub dead_letters_by: CounterVec,
    /// Micro-batches committed.
    pub batches: Counter,
    /// Messages per committed batch (sum, with `batches` the mean batch size).
    pub batch_messages: Counter,
    /// Failed sink commits (each retried).
    pub sink_errors: Counter,
    /// Broker errors (each retried).
    pub broker_errors: Counter,
    /// Partitions moved to their earliest offset after an out-of-range error.
    pub offset_resets: Counter,
    /// Transactions seen before and not stored again (producer retries).
    pub duplicates: Counter,
    /// Time from a batch's first message to its commit (end to end).
    pub batch_latency: Histogram,
    /// Time of one Kafka fetch request, by source (includes the broker's wait for data,
    /// `kafka.fetch_max_wait_ms`, when the partition is at its end).
    pub fetch_time: HistogramVec,
    /// Decode (JSON -> Arrow) and mapping SQL time per batch.
    pub decode_time: Histogram,
    /// Time spent in the engine (decode + features + rules + aggregates) per batch.
    pub engine_time: Histogram,
    /// Database write time of a batch: the successful commit (COPY, aggregates, offsets).
    pub sink_time: Histogram,
    /// From a batch reaching the sink stage to its commit, retries and backoff included.
    pub commit_time: Histogram,
    /// Aggregate merges handed to the trailing writer and not applied yet
    /// (`postgres.trail_aggregates`).
    pub trailing_pending: Gauge,
    /// Time of one trailing aggregate merge (its successful transaction).
    pub trailing_time: Histogram,
    /// Messages behind the high watermark, per (topic, partition).
    lag: Mutex<BTreeMap<(String, i32), i64>>,
    /// (source name, topic) of each source index, for labels.
    sources: Mutex<Vec<(String, String)>>,
    /// 1 once the sink is connected and migrated.
    pub sink_ready: Gauge,
    /// Unix time (seconds) of the last committed batch.
    pub last_commit: Gauge,
    /// Events older than the watermark when they arrived (scored all the same).
    pub late_events: Counter,
    /// Label feedback messages accepted (chargebacks, fraud reports, verdicts).
    pub labels_in: Counter,
    /// Labels of `POST /v1/labels` the engine task missed because it fell behind the API's
    /// broadcast (stored all the same; their features count them after a restart).
    pub api_labels_lagged: Counter,
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
    /// Model reloads that succeeded (for the model scoring stage).
    pub model_reloads_ok: Counter,
    /// Model reloads that failed (the running model stayed).
    pub model_reloads_failed: Counter,
    /// Decisions by kind, all sources: approve, review, decline.
    pub decisions: [Counter; 3],
    /// Decisions by (source, decision).
    pub decisions_by: CounterVec,
    /// Outcome of the last SQL reload: `None` while it is fine, else the error kept the running
    /// version in place.
    pub reload_error: Mutex<Option<String>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            messages_in: Counter::default(),
            messages_in_by: CounterVec::new(&["source", "partition"]),
            transactions_out: Counter::default(),
            dead_letters: Counter::default(),
            dead_letters_by: CounterVec::new(&["source", "reason"]),
            batches: Counter::default(),
            batch_messages: Counter::default(),
            sink_errors: Counter::default(),
            broker_errors: Counter::default(),
            offset_resets: Counter::default(),
            duplicates: Counter::default(),
            batch_latency: Histogram::default(),
            fetch_time: HistogramVec::new(&["source"]),
            decode_time: Histogram::default(),
            engine_time: Histogram::default(),
            sink_time: Histogram::default(),
            trailing_pending: Gauge::default(),
            trailing_time: Histogram::default(),
            commit_time: Histogram::default(),
            lag: Mutex::default(),
            sources: Mutex::default(),
            sink_ready: Gauge::default(),
            last_commit: Gauge::default(),
            late_events: Counter::default(),
            labels_in: Counter::default(),
            api_labels_lagged: Counter::default(),
            tracked_entities: Gauge::default(),
            tracked_rows: Gauge::default(),
            entities_evicted: Gauge::default(),
            watermark_ms: Gauge::default(),
            reloads_ok: Counter::default(),
            reloads_failed: Counter::default(),
            model_reloads_ok: Counter::default(),
            model_reloads_failed: Counter::default(),
            decisions: Default::default(),
            decisions_by: CounterVec::new(&["source", "decision"]),
            reload_error: Mutex::default(),
        }
    }
}

/// Index of a decision in [`Metrics::decisions`].
fn decision_index(decision: &str) -> usize {
    match decision {
        "approve" => 0,
        "review" => 1,
        _ => 2,
    }
}

impl Metrics {
    /// Name the sources (index -> name, topic), so per-source series carry the source name.
    pub fn set_sources(&self, sources: impl IntoIterator<Item = (String, String)>) {
        *self.sources.lock().expect("sources lock") = sources.into_iter().collect();
    }

    /// Name of source `index` (its index as text if unnamed).
    pub fn source_name(&self, index: usize) -> String {
        self.sources
            .lock()
            .expect("sources lock")
            .get(index)
            .map_or_else(|| index.to_string(), |(n, _)| n.clone())
    }

    fn source_of_topic(&self, topic: &str) -> String {
        self.sources
            .lock()
            .expect("sources lock")
            .iter()
            .find(|(_, t)| t == topic)
            .map_or_else(String::new, |(n, _)| n.clone())
    }

    /// Count `n` messages received from partition `partition` of source `source`.
    pub fn messages_received(&self, source: usize, partition: i32, n: u64) {
        self.messages_in.add(n);
        self.messages_in_by
            .add(&[&self.source_name(source), &partition.to_string()], n);
    }

    /// Count one dead letter of `source` with its free-text `reason`.
    pub fn dead_letter(&self, source: &str, reason: &str) {
        self.dead_letters.inc();
        self.dead_letters_by
            .add(&[source, dead_letter_kind(reason)], 1);
    }

    /// Count `n` transactions of `source` decided `decision`.
    pub fn decided(&self, source: &str, decision: &str, n: u64) {
        self.decisions[decision_index(decision)].add(n);
        self.decisions_by.add(&[source, decision], n);
    }

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
        let mut out = String::with_capacity(16 * 1024);
        let _ = writeln!(
            out,
            "# HELP payguard_build_info Version of the running binary.\n# TYPE payguard_build_info gauge\npayguard_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        );
        self.messages_in_by.render(
            &mut out,
            "payguard_messages_in_total",
            "Messages received from the inputs, by source and partition.",
        );
        self.decisions_by.render(
            &mut out,
            "payguard_decisions_total",
            "Transactions decided and committed, by source and decision.",
        );
        self.dead_letters_by.render(
            &mut out,
            "payguard_dead_letters_total",
            "Messages sent to the dead-letter table, by source and reason.",
        );
        let counters: [(&str, &str, &Counter); 15] = [
            (
                "payguard_labels_total",
                "Label feedback messages accepted.",
                &self.labels_in,
            ),
            (
                "payguard_api_labels_lagged_total",
                "Labels of POST /v1/labels the engine missed by falling behind (applied after a restart).",
                &self.api_labels_lagged,
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
                "payguard_model_reloads_total",
                "Model reloads that succeeded.",
                &self.model_reloads_ok,
            ),
            (
                "payguard_model_reload_failures_total",
                "Model reloads refused (the running model stayed).",
                &self.model_reloads_failed,
            ),
            (
                "payguard_transactions_out_total",
                "Transactions committed to the sink.",
                &self.transactions_out,
            ),
            (
                "payguard_batches_total",
                "Micro-batches committed.",
                &self.batches,
            ),
            (
                "payguard_batch_messages_total",
                "Messages in committed micro-batches.",
                &self.batch_messages,
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
            (
                "payguard_entities_evicted_total",
                "Entities evicted from window state so far.",
                &Counter(AtomicU64::new(self.entities_evicted.get() as u64)),
            ),
        ];
        for (name, help, c) in counters {
            header(&mut out, name, help, "counter");
            let _ = writeln!(out, "{name} {}", c.get());
        }
        header(
            &mut out,
            "payguard_consumer_lag",
            "Messages behind the partition's high watermark.",
            "gauge",
        );
        for ((topic, p), lag) in self.lag.lock().expect("lag lock").iter() {
            let _ = writeln!(
                out,
                "payguard_consumer_lag{{source=\"{}\",topic=\"{}\",partition=\"{p}\"}} {lag}",
                escape(&self.source_of_topic(topic)),
                escape(topic)
            );
        }
        for (name, help, v) in [
            (
                "payguard_tracked_entities",
                "Entities with window state.",
                self.tracked_entities.get(),
            ),
            (
                "payguard_tracked_rows",
                "Rows kept in window state.",
                self.tracked_rows.get(),
            ),
            (
                "payguard_watermark_seconds",
                "Event-time watermark (Unix seconds).",
                self.watermark_ms.get() / 1000.0,
            ),
            (
                "payguard_last_commit_timestamp_seconds",
                "Wall-clock time of the last committed batch (Unix seconds; 0 before the first).",
                self.last_commit.get(),
            ),
            (
                "payguard_sink_ready",
                "1 when the sink is connected.",
                self.sink_ready.get(),
            ),
            (
                "payguard_sink_trailing_pending",
                "Aggregate merges handed to the trailing writer and not applied yet.",
                self.trailing_pending.get(),
            ),
        ] {
            header(&mut out, name, help, "gauge");
            let _ = writeln!(out, "{name} {v}");
        }
        self.fetch_time.render(
            &mut out,
            "payguard_fetch_seconds",
            "Kafka fetch request time, by source (includes the broker's wait at the end of a partition).",
        );
        for (h, name, help) in [
            (
                &self.batch_latency,
                "payguard_batch_latency_seconds",
                "From a batch's first message to its commit.",
            ),
            (
                &self.decode_time,
                "payguard_decode_seconds",
                "Decode (JSON to Arrow) and mapping SQL time per batch.",
            ),
            (
                &self.engine_time,
                "payguard_engine_seconds",
                "Engine time per batch: decode, features, rules, aggregates.",
            ),
            (
                &self.sink_time,
                "payguard_sink_write_seconds",
                "Database write time per batch (the successful commit).",
            ),
            (
                &self.commit_time,
                "payguard_sink_commit_seconds",
                "From a batch reaching the sink to its commit, retries included.",
            ),
            (
                &self.trailing_time,
                "payguard_sink_trailing_merge_seconds",
                "Time of one trailing aggregate merge (its successful transaction).",
            ),
        ] {
            h.render(&mut out, name, help);
        }
        out
    }
}

/// The metric names [`Metrics::render`] exposes, with the suffixes Prometheus derives for
/// histograms (`_bucket`, `_sum`, `_count`).
pub fn exported_names(text: &str) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut it = rest.split_whitespace();
            if let (Some(name), Some(kind)) = (it.next(), it.next()) {
                names.insert(name.to_string());
                if kind == "histogram" {
                    for s in ["_bucket", "_sum", "_count"] {
                        names.insert(format!("{name}{s}"));
                    }
                }
            }
        }
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::default();
        m.set_sources([("card".to_string(), "t".to_string())]);
        m.messages_received(0, 2, 5);
        m.set_lag("t", 2, 7);
        m.batch_latency.observe(0.03);
        m.fetch_time.observe(&["card"], 0.002);
        m.decided("card", "decline", 2);
        m.dead_letter("card", "invalid JSON: expected value at line 1");
        let text = m.render();
        assert!(text.contains("payguard_messages_in_total{source=\"card\",partition=\"2\"} 5\n"));
        assert_eq!(m.messages_in.get(), 5);
        assert!(
            text.contains("payguard_consumer_lag{source=\"card\",topic=\"t\",partition=\"2\"} 7\n")
        );
        assert!(text.contains("payguard_batch_latency_seconds_bucket{le=\"0.05\"} 1\n"));
        assert!(text.contains("payguard_batch_latency_seconds_bucket{le=\"0.025\"} 0\n"));
        assert!(text.contains("payguard_batch_latency_seconds_count 1\n"));
        assert!(text.contains("payguard_fetch_seconds_bucket{source=\"card\",le=\"0.0025\"} 1\n"));
        assert!(text.contains("payguard_fetch_seconds_bucket{source=\"card\",le=\"0.001\"} 0\n"));
        assert!(text.contains("payguard_fetch_seconds_count{source=\"card\"} 1\n"));
        assert!(
            text.contains("payguard_decisions_total{source=\"card\",decision=\"decline\"} 2\n")
        );
        assert_eq!(m.decisions[2].get(), 2);
        assert!(
            text.contains(
                "payguard_dead_letters_total{source=\"card\",reason=\"invalid_json\"} 1\n"
            )
        );
        // Each family is declared once.
        let mut types: Vec<&str> = text.lines().filter(|l| l.starts_with("# TYPE ")).collect();
        let n = types.len();
        types.sort();
        types.dedup();
        assert_eq!(types.len(), n, "a metric family declared twice");
        let names = exported_names(&text);
        assert!(names.contains("payguard_fetch_seconds_bucket"));
        assert!(names.contains("payguard_consumer_lag"));
    }

    #[test]
    fn label_values_are_escaped() {
        let v = CounterVec::new(&["source"]);
        v.add(&["a\"b\\c\nd"], 1);
        let mut out = String::new();
        v.render(&mut out, "x_total", "x");
        assert!(
            out.contains("x_total{source=\"a\\\"b\\\\c\\nd\"} 1\n"),
            "{out}"
        );
    }

    #[test]
    fn dead_letter_reasons_map_to_few_kinds() {
        for (reason, kind) in [
            ("message has no value (tombstone)", "tombstone"),
            (
                "message of 70000 bytes exceeds kafka.max_message_bytes (65536)",
                "oversized",
            ),
            ("invalid UTF-8 at byte 3", "invalid_utf8"),
            ("empty message", "empty"),
            ("invalid JSON: expected value", "invalid_json"),
            ("expected a JSON object, got an array", "invalid_json"),
            ("missing required field(s): amount", "missing_field"),
            ("wrong field type or value: ten", "wrong_type"),
            (
                "event_time 2030-01-01 is further in the future than engine.max_future allows",
                "future_event",
            ),
            (
                "mapping SQL produced NULL for required column(s): amount",
                "mapping",
            ),
            ("something new", "other"),
        ] {
            assert_eq!(dead_letter_kind(reason), kind, "{reason}");
        }
    }
}
