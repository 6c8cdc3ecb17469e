//! `payguard bench engine`: throughput of the engine with the shipped SQL, against DataFusion's
//! own window evaluation of the same `features.sql` measured in the same run, per-batch latency,
//! and memory per tracked entity. Figures are medians over repeated runs (these machines are
//! noisy); see BENCHMARKS.md.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::compute::concat_batches;

use crate::config::Config;
use crate::decode::RawMessage;
use crate::engine::{Engine, EngineError};
use crate::source::simulator::Simulator;

/// Errors of a benchmark.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The engine failed.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// DataFusion failed on the baseline.
    #[error("baseline: {0}")]
    Baseline(String),
    /// The simulator failed.
    #[error(transparent)]
    Simulator(#[from] crate::source::simulator::SimulatorError),
}

/// Results of the engine benchmark.
#[derive(Debug, Clone)]
pub struct EngineBench {
    /// Rows per run.
    pub rows: usize,
    /// Rows per second through features, rules and decision (median).
    pub engine_rows_per_sec: f64,
    /// Rows per second of DataFusion's window functions over all rows at once (median).
    pub baseline_rows_per_sec: f64,
    /// Median and p99 time of one batch of `latency_batch` rows, milliseconds.
    pub batch_p50_ms: f64,
    /// p99 of the batch time.
    pub batch_p99_ms: f64,
    /// Rows per latency batch.
    pub latency_batch: usize,
    /// Entities tracked after a run.
    pub entities: usize,
    /// Window rows kept after a run.
    pub state_rows: usize,
    /// Resident memory added by the window state, bytes per entity.
    pub bytes_per_entity: f64,
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    v[v.len() / 2]
}

fn rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = s.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

/// Canonical rows of `n` simulated card transactions.
async fn canonical_rows(config: &Config, n: usize) -> Result<RecordBatch, BenchError> {
    let mut engine = Engine::new(config).await?;
    let card = config
        .sources
        .iter()
        .position(|s| s.simulator == "card")
        .unwrap_or(0);
    let mut sim = Simulator::new(
        &config.simulator,
        &config.sources[card..=card],
        config.simulator.seed,
        200.0,
    )?;
    let mut parts = Vec::new();
    let mut made = 0;
    while made < n {
        let k = (n - made).min(50_000);
        let msgs: Vec<RawMessage> = (0..k)
            .map(|i| {
                let g = sim.next_message();
                RawMessage {
                    partition: 0,
                    offset: (made + i) as i64,
                    key: None,
                    value: Some(g.value),
                    timestamp_ms: g.event_time_ms,
                }
            })
            .collect();
        made += k;
        let (rows, _) = engine
            .canonicalize(card, &msgs, i64::MAX / 4, std::time::Instant::now())
            .await?;
        parts.extend(rows);
    }
    let schema = crate::engine::canonical::schema();
    concat_batches(&schema, &parts).map_err(|e| BenchError::Baseline(e.to_string()))
}

/// Run the engine benchmark over `rows` simulated card transactions, `runs` times.
pub async fn engine(
    config: &Config,
    rows: usize,
    runs: usize,
    batch: usize,
) -> Result<EngineBench, BenchError> {
    let data = canonical_rows(config, rows).await?;
    let features_sql = std::fs::read_to_string(config.resolve(&config.engine.features))
        .map_err(|e| BenchError::Baseline(e.to_string()))?;

    let mut engine_rates = Vec::new();
    let mut base_rates = Vec::new();
    let mut entities = 0;
    let mut state_rows = 0;
    let mut bytes_per_entity = 0.0;
    for _ in 0..runs.max(1) {
        // Payguard: features (incremental windows) + rules + decision, in micro-batches.
        let mut engine = Engine::new(config).await?;
        let before = rss_bytes();
        let t = Instant::now();
        let mut at = 0;
        while at < data.num_rows() {
            let n = batch.min(data.num_rows() - at);
            let out = engine.decide(&data.slice(at, n)).await?;
            std::hint::black_box(out);
            at += n;
        }
        engine_rates.push(data.num_rows() as f64 / t.elapsed().as_secs_f64());
        let st = engine.state_stats();
        entities = st.entities;
        state_rows = st.rows;
        if let (Some(b), Some(a)) = (before, rss_bytes()) {
            bytes_per_entity = a.saturating_sub(b) as f64 / st.entities.max(1) as f64;
        }
        drop(engine);

        // Baseline: DataFusion evaluating the same features.sql, window functions included, over
        // all rows at once (one partition, as the engine runs).
        let ctx = crate::engine::sql::session();
        let table =
            datafusion::datasource::MemTable::try_new(data.schema(), vec![vec![data.clone()]])
                .map_err(|e| BenchError::Baseline(e.to_string()))?;
        ctx.register_table("transactions", Arc::new(table))
            .map_err(|e| BenchError::Baseline(e.to_string()))?;
        let t = Instant::now();
        let df = ctx
            .sql(&features_sql)
            .await
            .map_err(|e| BenchError::Baseline(e.to_string()))?;
        let out = df
            .collect()
            .await
            .map_err(|e| BenchError::Baseline(e.to_string()))?;
        base_rates.push(data.num_rows() as f64 / t.elapsed().as_secs_f64());
        std::hint::black_box(out);
    }

    // Per-batch latency at a steady state: a warmed engine, batches of `batch` rows.
    let mut engine = Engine::new(config).await?;
    let warm = data.num_rows() / 2;
    let mut at = 0;
    while at < warm {
        let n = batch.min(warm - at);
        engine.decide(&data.slice(at, n)).await?;
        at += n;
    }
    let mut times = Vec::new();
    while at < data.num_rows() {
        let n = batch.min(data.num_rows() - at);
        let t = Instant::now();
        engine.decide(&data.slice(at, n)).await?;
        times.push(t.elapsed().as_secs_f64() * 1000.0);
        at += n;
    }
    times.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    let p = |q: f64| times[((times.len() as f64 - 1.0) * q).round() as usize];
    Ok(EngineBench {
        rows: data.num_rows(),
        engine_rows_per_sec: median(&mut engine_rates),
        baseline_rows_per_sec: median(&mut base_rates),
        batch_p50_ms: p(0.5),
        batch_p99_ms: p(0.99),
        latency_batch: batch,
        entities,
        state_rows,
        bytes_per_entity,
    })
}

/// Print the results as a Markdown table.
pub fn report(b: &EngineBench, config_path: &Path) -> String {
    format!(
        "| figure | value |\n|---|---|\n\
         | rows per run | {} |\n\
         | engine: features + rules + decision (median) | {:.0} rows/s |\n\
         | baseline: DataFusion window functions over all rows at once (median) | {:.0} rows/s |\n\
         | ratio engine / baseline | {:.2} |\n\
         | batch of {} rows, p50 / p99 | {:.1} ms / {:.1} ms |\n\
         | entities tracked / window rows kept | {} / {} |\n\
         | resident memory per tracked entity | {:.0} bytes |\n\
         \nconfig: {}\n",
        b.rows,
        b.engine_rows_per_sec,
        b.baseline_rows_per_sec,
        b.engine_rows_per_sec / b.baseline_rows_per_sec,
        b.latency_batch,
        b.batch_p50_ms,
        b.batch_p99_ms,
        b.entities,
        b.state_rows,
        b.bytes_per_entity,
        config_path.display()
    )
}

/// One batch size of the model benchmark.
#[derive(Debug, Clone)]
pub struct ModelBenchRow {
    /// Rows per scoring call.
    pub batch: usize,
    /// Rows scored per run.
    pub rows: usize,
    /// Arrow feature columns -> tensor -> ONNX Runtime -> scores, rows per second (median).
    pub arrow_rows_per_sec: f64,
    /// The raw ONNX Runtime call on a pre-built tensor, rows per second (median).
    pub raw_rows_per_sec: f64,
}

/// Results of `bench model`.
#[derive(Debug, Clone)]
pub struct ModelBench {
    /// Model version.
    pub version: String,
    /// Features per row.
    pub features: usize,
    /// ONNX Runtime threads per call (`model.threads`).
    pub threads: usize,
    /// Per batch size.
    pub rows: Vec<ModelBenchRow>,
    /// Explanation (occlusion) of one alert, microseconds (median over runs, 100 alerts per run).
    pub explain_us_per_alert: f64,
}

/// `bench model`: rows scored per second at each batch size, straight from the feature batches
/// the engine computes over simulated card transactions, against the raw session call on the same
/// rows pre-built as a tensor (measured in the same run, same session).
pub async fn model(
    config: &Config,
    rows: usize,
    runs: usize,
    batches: &[usize],
) -> Result<ModelBench, BenchError> {
    let Some(cfg) = config.model.clone() else {
        return Err(BenchError::Baseline(
            "no [model] section in the config: nothing to measure".into(),
        ));
    };
    let n = rows.clamp(1, 200_000);
    let data = canonical_rows(config, n).await?;
    let mut engine = Engine::new(config).await?;
    let mut parts = Vec::new();
    let mut at = 0;
    while at < data.num_rows() {
        let k = 20_000.min(data.num_rows() - at);
        let decided = engine.decide(&data.slice(at, k)).await?;
        let first = crate::engine::canonical::COLUMNS.len();
        let score = decided
            .schema()
            .index_of(crate::engine::SCORE)
            .map_err(|e| BenchError::Baseline(e.to_string()))?;
        parts.push(
            decided
                .project(&(first..score).collect::<Vec<_>>())
                .map_err(|e| BenchError::Baseline(e.to_string()))?,
        );
        at += k;
    }
    let features = concat_batches(&parts[0].schema(), &parts)
        .map_err(|e| BenchError::Baseline(e.to_string()))?;
    let model = engine.model_mut().expect("[model] is configured");
    let err = |e: crate::model::ModelError| BenchError::Engine(e.into());
    let tensor = model.tensor(&features).map_err(err)?;
    let width = model.meta().features.len();
    let mut out = Vec::new();
    for &b in batches {
        // Small batches are slow per row: fewer rows keep the run short.
        let total = if b < 100 {
            features.num_rows().min(20_000)
        } else {
            features.num_rows()
        };
        let calls = (total / b).max(1);
        let b = b.min(features.num_rows());
        let mut arrow = Vec::new();
        let mut raw = Vec::new();
        for _ in 0..runs.max(1) {
            let t = Instant::now();
            for c in 0..calls {
                let at = (c * b) % (features.num_rows() - b + 1);
                std::hint::black_box(model.score(&features.slice(at, b)).map_err(err)?);
            }
            arrow.push((calls * b) as f64 / t.elapsed().as_secs_f64());
            let t = Instant::now();
            for c in 0..calls {
                let at = (c * b) % (features.num_rows() - b + 1);
                std::hint::black_box(
                    model
                        .score_raw(&tensor[at * width..(at + b) * width])
                        .map_err(err)?,
                );
            }
            raw.push((calls * b) as f64 / t.elapsed().as_secs_f64());
        }
        out.push(ModelBenchRow {
            batch: b,
            rows: calls * b,
            arrow_rows_per_sec: median(&mut arrow),
            raw_rows_per_sec: median(&mut raw),
        });
    }
    let alerts: Vec<usize> = (0..features.num_rows().min(100)).collect();
    let scores = model.score(&features.slice(0, alerts.len())).map_err(err)?;
    let mut explain = Vec::new();
    for _ in 0..runs.max(1) {
        let t = Instant::now();
        std::hint::black_box(
            model
                .explain(&features, &alerts, &scores, cfg.explain_top.max(1))
                .map_err(err)?,
        );
        explain.push(t.elapsed().as_secs_f64() * 1e6 / alerts.len() as f64);
    }
    Ok(ModelBench {
        version: model.meta().version.clone(),
        features: width,
        threads: cfg.threads,
        rows: out,
        explain_us_per_alert: median(&mut explain),
    })
}

/// The model benchmark as a Markdown table.
pub fn model_report(b: &ModelBench, config_path: &Path) -> String {
    let mut s = format!(
        "model {} ({} features, {} ONNX Runtime thread{} per call)\n\n\
         | batch | rows per run | Arrow -> tensor -> score (median) | raw session call on a pre-built tensor (median) | ratio |\n\
         |---|---|---|---|---|\n",
        b.version,
        b.features,
        b.threads,
        if b.threads == 1 { "" } else { "s" }
    );
    for r in &b.rows {
        s.push_str(&format!(
            "| {} | {} | {:.0} rows/s | {:.0} rows/s | {:.2} |\n",
            r.batch,
            r.rows,
            r.arrow_rows_per_sec,
            r.raw_rows_per_sec,
            r.arrow_rows_per_sec / r.raw_rows_per_sec
        ));
    }
    s.push_str(&format!(
        "\nexplanation of one alert (occlusion, one call per 100 alerts): {:.1} µs\n\nconfig: {}\n",
        b.explain_us_per_alert,
        config_path.display()
    ));
    s
}
