//! `payguard bench engine`: throughput of the engine with the shipped SQL, against DataFusion's
//! own window evaluation of the same `features.sql` measured in the same run, per-batch latency,
//! and memory per tracked entity. Figures are medians over repeated runs (these machines are
//! noisy); see BENCHMARKS.md.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use datafusion::arrow::array::{Array, RecordBatch, StringArray};
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
    /// The database failed.
    #[error(transparent)]
    Sink(#[from] crate::sink::SinkError),
    /// The pipeline failed.
    #[error(transparent)]
    Pipeline(#[from] crate::pipeline::PipelineError),
    /// A statement of the benchmark failed.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// Setting up a benchmark failed (database, topics, psql, kcat).
    #[error("setup: {0}")]
    Setup(String),
}

/// Results of the engine benchmark.
#[derive(Debug, Clone)]
pub struct EngineBench {
    /// Rows per run.
    pub rows: usize,
    /// Rows per second through features, model, rules, decision and explanations (median).
    pub engine_rows_per_sec: f64,
    /// Rows per second through features, rules and decision with no model (score NULL, so no
    /// explanations either), the same rows (median); `None` when the config has no model.
    pub no_model_rows_per_sec: Option<f64>,
    /// Rows per second of DataFusion's window functions over all rows at once (median).
    pub baseline_rows_per_sec: f64,
    /// Rows per second of the warmed engine (the second half of the rows, after the first
    /// half: most entities already known), one run.
    pub warmed_rows_per_sec: f64,
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
    /// Heap bytes of the window state per entity, counted from its structures.
    pub counted_bytes_per_entity: f64,
    /// Simulated time the rows span, hours.
    pub span_hours: f64,
    /// Share of rows decided review or decline.
    pub alert_share: f64,
    /// Microseconds per row spent in each step of the engine (median over runs).
    pub stages: Vec<(&'static str, f64)>,
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

/// Canonical rows of `n` simulated card transactions, at `simulated_tps` transactions per
/// simulated second (0: the population's own rate, as `generate` and the training set have it).
pub async fn canonical_rows(
    config: &Config,
    n: usize,
    simulated_tps: f64,
) -> Result<RecordBatch, BenchError> {
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
        simulated_tps,
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
    let schema = engine.canonical().schema();
    concat_batches(&schema, &parts).map_err(|e| BenchError::Baseline(e.to_string()))
}

/// Run the engine benchmark over `rows` simulated card transactions (at `simulated_tps` per
/// simulated second; 0 = the population's own rate), `runs` times.
pub async fn engine(
    config: &Config,
    rows: usize,
    runs: usize,
    batch: usize,
    simulated_tps: f64,
) -> Result<EngineBench, BenchError> {
    let data = canonical_rows(config, rows, simulated_tps).await?;
    let span_hours = data
        .column_by_name("event_time")
        .and_then(|c| {
            c.as_any()
                .downcast_ref::<datafusion::arrow::array::TimestampMillisecondArray>()
        })
        .and_then(|t| {
            let (lo, hi) = (
                datafusion::arrow::compute::min(t)?,
                datafusion::arrow::compute::max(t)?,
            );
            Some((hi - lo) as f64 / 3_600_000.0)
        })
        .unwrap_or(0.0);
    // DataFusion has no label windows: the baseline counts the frame's rows in their place
    // (`count(*)` over the same frame, about the same work).
    let features_sql = std::fs::read_to_string(config.resolve(&config.engine.features))
        .map_err(|e| BenchError::Baseline(e.to_string()))?
        .replace("fraud_labels(*)", "count(*)")
        .replace("known_labels(*)", "count(*)");

    let mut engine_rates = Vec::new();
    let mut no_model_rates = Vec::new();
    let mut base_rates = Vec::new();
    let no_model = config.model.is_some().then(|| Config {
        model: None,
        ..config.clone()
    });
    let mut entities = 0;
    let mut state_rows = 0;
    let mut bytes_per_entity = 0.0;
    let mut counted_per_entity = 0.0;
    let mut stage_us: Vec<(&'static str, Vec<f64>)> = Vec::new();
    let mut alerts = 0;
    for _ in 0..runs.max(1) {
        // Payguard: features (incremental windows) + rules + decision, in micro-batches.
        let mut engine = Engine::new(config).await?;
        let before = rss_bytes();
        let t = Instant::now();
        let mut at = 0;
        while at < data.num_rows() {
            let n = batch.min(data.num_rows() - at);
            let out = engine.decide(&data.slice(at, n)).await?;
            if let Some(d) = out
                .column_by_name(crate::engine::DECISION)
                .and_then(|c| c.as_any().downcast_ref::<StringArray>())
            {
                alerts += d.iter().filter(|v| *v != Some("approve")).count();
            }
            std::hint::black_box(out);
            at += n;
        }
        let elapsed = t.elapsed();
        engine_rates.push(data.num_rows() as f64 / elapsed.as_secs_f64());
        let times = engine.take_stage_times();
        let mut accounted = std::time::Duration::ZERO;
        for (i, (name, d)) in times.named().into_iter().enumerate() {
            accounted += d;
            stage_us.resize(stage_us.len().max(i + 1), (name, Vec::new()));
            stage_us[i]
                .1
                .push(d.as_secs_f64() * 1e6 / data.num_rows() as f64);
        }
        let other = elapsed.saturating_sub(accounted);
        stage_us.resize(
            stage_us.len().max(8),
            ("other (batching, schema, glue)", Vec::new()),
        );
        stage_us[7]
            .1
            .push(other.as_secs_f64() * 1e6 / data.num_rows() as f64);
        let st = engine.state_stats();
        entities = st.entities;
        state_rows = st.rows;
        // Resident growth of the first run only: later runs reuse the memory freed before them.
        if let (Some(b), Some(a), true) = (before, rss_bytes(), bytes_per_entity == 0.0) {
            bytes_per_entity = a.saturating_sub(b) as f64 / st.entities.max(1) as f64;
        }
        counted_per_entity = st.bytes as f64 / st.entities.max(1) as f64;
        drop(engine);

        // The same without the model: what features and rules alone take.
        if let Some(no_model) = &no_model {
            let mut engine = Engine::new(no_model).await?;
            let t = Instant::now();
            let mut at = 0;
            while at < data.num_rows() {
                let n = batch.min(data.num_rows() - at);
                std::hint::black_box(engine.decide(&data.slice(at, n)).await?);
                at += n;
            }
            no_model_rates.push(data.num_rows() as f64 / t.elapsed().as_secs_f64());
        }

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
        no_model_rows_per_sec: (!no_model_rates.is_empty()).then(|| median(&mut no_model_rates)),
        baseline_rows_per_sec: median(&mut base_rates),
        warmed_rows_per_sec: (data.num_rows() - warm) as f64 / (times.iter().sum::<f64>() / 1000.0),
        batch_p50_ms: p(0.5),
        batch_p99_ms: p(0.99),
        latency_batch: batch,
        entities,
        state_rows,
        bytes_per_entity,
        counted_bytes_per_entity: counted_per_entity,
        span_hours,
        alert_share: alerts as f64 / (data.num_rows() * runs.max(1)) as f64,
        stages: stage_us
            .into_iter()
            .map(|(name, mut v)| (name, median(&mut v)))
            .collect(),
    })
}

/// Print the results as a Markdown table.
pub fn report(b: &EngineBench, config_path: &Path) -> String {
    format!(
        "| figure | value |\n|---|---|\n\
         | rows per run (simulated time they span) | {} ({:.1} hours) |\n\
         | engine: features + model + rules + decision + explanations (median) | {:.0} rows/s |\n\
         | engine without the model: features + rules + decision (median) | {} |\n\
         | warmed engine (second half of the rows after the first; one run) | {:.0} rows/s |\n\
         | baseline: DataFusion window functions over all rows at once (median) | {:.0} rows/s |\n\
         | ratio engine / baseline | {:.2} |\n\
         | batch of {} rows, p50 / p99 | {:.1} ms / {:.1} ms |\n\
         | entities tracked / window rows kept | {} / {} |\n\
         | resident memory per tracked entity (first run's RSS growth) | {:.0} bytes |\n\
         | window state per tracked entity (counted heap bytes) | {:.0} bytes |\n\
         | rows decided review or decline | {:.2}% |\n\
         \nWhere a row's time goes (engine runs, median µs per row):\n\n\
         | step | µs per row |\n|---|---|\n{}\
         \nconfig: {}\n",
        b.rows,
        b.span_hours,
        b.engine_rows_per_sec,
        b.no_model_rows_per_sec
            .map_or("no model configured".into(), |r| format!("{r:.0} rows/s")),
        b.warmed_rows_per_sec,
        b.baseline_rows_per_sec,
        b.engine_rows_per_sec / b.baseline_rows_per_sec,
        b.latency_batch,
        b.batch_p50_ms,
        b.batch_p99_ms,
        b.entities,
        b.state_rows,
        b.bytes_per_entity,
        b.counted_bytes_per_entity,
        b.alert_share * 100.0,
        b.stages
            .iter()
            .map(|(name, us)| format!("| {name} | {us:.2} |\n"))
            .collect::<String>(),
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
    let data = canonical_rows(config, n, 0.0).await?;
    let mut engine = Engine::new(config).await?;
    let mut parts = Vec::new();
    let mut at = 0;
    while at < data.num_rows() {
        let k = 20_000.min(data.num_rows() - at);
        let decided = engine.decide(&data.slice(at, k)).await?;
        let first = engine.canonical().len();
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

fn setup<E: std::fmt::Display>(what: &str) -> impl Fn(E) -> BenchError + '_ {
    move |e| BenchError::Setup(format!("{what}: {e}"))
}

/// The URL of database `db` on the server of `url`.
fn database_url(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let server = match base.rfind('/') {
        Some(i) if i > "postgres://".len() => &base[..i],
        _ => base,
    };
    match query {
        Some(q) => format!("{server}/{db}?{q}"),
        None => format!("{server}/{db}"),
    }
}

/// Drop and create database `db` on the configured server; returns its URL.
async fn fresh_database(config: &Config, db: &str) -> Result<String, BenchError> {
    use sqlx::Connection;
    let mut admin = sqlx::PgConnection::connect(&config.postgres.url)
        .await
        .map_err(setup("connect to postgres.url"))?;
    for sql in [
        format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"),
        format!("CREATE DATABASE {db}"),
    ] {
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .execute(&mut admin)
            .await
            .map_err(setup("create the benchmark database"))?;
    }
    Ok(database_url(&config.postgres.url, db))
}

async fn drop_database(config: &Config, db: &str) {
    use sqlx::Connection;
    if let Ok(mut admin) = sqlx::PgConnection::connect(&config.postgres.url).await {
        let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {db} WITH (FORCE)"
        )))
        .execute(&mut admin)
        .await;
    }
}

/// Results of the sink benchmark.
#[derive(Debug, Clone)]
pub struct SinkBench {
    /// Rows per run.
    pub rows: usize,
    /// Rows per committed batch.
    pub batch: usize,
    /// Whether the aggregate merges trailed on a second connection (`postgres.trail_aggregates`).
    pub trailing: bool,
    /// Rows per second through [`crate::sink::postgres::PgSink::commit`] (encoding, COPY of
    /// transactions, alerts, aggregate merges, offsets, one transaction per batch; median).
    pub sink_rows_per_sec: f64,
    /// Rows per second of `psql \copy` of the same rows (the same COPY text) into a table like
    /// `transactions` (same indexes), one COPY of all rows (median).
    pub psql_rows_per_sec: f64,
    /// The same in binary COPY format (the sink's own binary stream of the rows, from a file),
    /// when the sink writes binary (median).
    pub psql_binary_rows_per_sec: Option<f64>,
    /// Alerts among the rows.
    pub alerts: usize,
}

/// `payguard bench sink`: the sink against a plain `psql \copy` of the same rows, in a database of
/// its own (`payguard_bench_sink`, dropped at the end) on the server of `postgres.url`.
pub async fn sink(
    config: &Config,
    rows: usize,
    runs: usize,
    batch: usize,
) -> Result<SinkBench, BenchError> {
    use crate::sink::postgres::{PgSink, transactions_copy_text};
    use crate::sink::{Sink, SinkBatch};
    use crate::source::OffsetCommit;

    let data = canonical_rows(config, rows, 0.0).await?;
    let mut engine = Engine::new(config).await?;
    let stages = engine.aggregates();
    // Decided rows and partial aggregates per batch, computed once, outside the measurement.
    let mut batches = Vec::new();
    let mut at = 0;
    let mut alerts = 0;
    while at < data.num_rows() {
        let n = batch.min(data.num_rows() - at);
        let decided = engine.decide(&data.slice(at, n)).await?;
        alerts += decided
            .column_by_name(crate::engine::DECISION)
            .and_then(|c| {
                c.as_any()
                    .downcast_ref::<datafusion::arrow::array::StringArray>()
            })
            .map_or(0, |d| d.iter().filter(|v| *v != Some("approve")).count());
        let mut aggregated = SinkBatch {
            transactions: vec![decided.clone()],
            aggregate_stages: stages.clone(),
            aggregates_pending: true,
            ..SinkBatch::default()
        };
        aggregated.compute_aggregates().await?;
        batches.push((at, n, decided, aggregated.aggregates));
        at += n;
    }
    let db = "payguard_bench_sink";
    let url = fresh_database(config, db).await?;
    let mut pg_cfg = config.postgres.clone();
    pg_cfg.url = url.clone();
    let pg = PgSink::connect(
        &pg_cfg,
        &config.resolve(&config.postgres.migrations),
        "bench",
        engine.canonical().clone(),
    )
    .await?;
    pg.prepare_aggregates(&stages).await?;
    let trailing = pg
        .prepare_trailing(
            &stages,
            &engine.decided_schema(),
            config.postgres.trail_aggregates,
            Arc::default(),
        )
        .await?;
    let sink = Sink::Postgres(pg.clone());
    sqlx::query("CREATE TABLE bench_copy (LIKE transactions INCLUDING ALL)")
        .execute(pg.pool())
        .await?;
    let decided: Vec<RecordBatch> = batches.iter().map(|b| b.2.clone()).collect();
    let (cols, text) = transactions_copy_text(engine.canonical(), &decided)?;
    let file =
        std::env::temp_dir().join(format!("payguard-bench-sink-{}.copy", std::process::id()));
    std::fs::write(&file, &text).map_err(setup("write the COPY file"))?;
    let binary_file = match pg.transactions_copy_binary(&decided)? {
        Some(bytes) => {
            let f = file.with_extension("bin");
            std::fs::write(&f, bytes).map_err(setup("write the binary COPY file"))?;
            Some(f)
        }
        None => None,
    };

    let truncate = format!(
        "TRUNCATE transactions, alerts, consumer_offsets, bench_copy{}",
        stages
            .iter()
            .map(|s| format!(", agg_{}", s.name))
            .collect::<String>()
    );
    let mut sink_rates = Vec::new();
    let mut psql_rates = Vec::new();
    let mut psql_binary_rates = Vec::new();
    // One COPY into the emptied table, after a checkpoint (as the sink's run starts).
    let psql_copy = |from: &Path, with: &str| -> Result<f64, BenchError> {
        let psql = |command: String| -> Result<(), BenchError> {
            let out = std::process::Command::new("psql")
                .arg(&url)
                .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-c"])
                .arg(command)
                .output()
                .map_err(setup("run psql"))?;
            if out.status.success() {
                Ok(())
            } else {
                Err(BenchError::Setup(format!(
                    "psql: {}",
                    String::from_utf8_lossy(&out.stderr)
                )))
            }
        };
        psql("TRUNCATE bench_copy".into())?;
        psql("CHECKPOINT".into())?;
        let t = Instant::now();
        psql(format!(
            "\\copy bench_copy ({}) FROM '{}'{with}",
            cols.join(", "),
            from.display()
        ))?;
        Ok(data.num_rows() as f64 / t.elapsed().as_secs_f64())
    };
    for _ in 0..runs.max(1) {
        sqlx::query(sqlx::AssertSqlSafe(truncate.clone()))
            .execute(pg.pool())
            .await?;
        sqlx::query("CHECKPOINT").execute(pg.pool()).await?;
        // Each run starts like a new process on empty tables.
        pg.forget_stored_groups();
        let t = Instant::now();
        for (seq, (at, n, decided, partials)) in batches.iter().enumerate() {
            let b = SinkBatch {
                seq: seq as u64,
                messages: *n,
                transactions: vec![decided.clone()],
                aggregates: partials.clone(),
                aggregate_stages: stages.clone(),
                aggregates_pending: false,
                dead_letters: Vec::new(),
                labels: None,
                offsets: vec![OffsetCommit {
                    source: 0,
                    topic: "bench".into(),
                    partition: 0,
                    expected: (*at > 0).then_some(*at as i64),
                    next: (*at + *n) as i64,
                }],
                opened_at: None,
            };
            match sink.commit(&b).await? {
                crate::sink::CommitOutcome::Committed(_) => {}
                crate::sink::CommitOutcome::Duplicates(_) => {
                    return Err(BenchError::Setup("unexpected duplicates".into()));
                }
            }
        }
        // The last trailing merges are part of the run.
        sink.flush().await?;
        sink_rates.push(data.num_rows() as f64 / t.elapsed().as_secs_f64());

        psql_rates.push(psql_copy(&file, "")?);
        if let Some(f) = &binary_file {
            psql_binary_rates.push(psql_copy(f, " WITH (FORMAT binary)")?);
        }
    }
    let _ = std::fs::remove_file(&file);
    if let Some(f) = &binary_file {
        let _ = std::fs::remove_file(f);
    }
    pg.pool().close().await;
    drop(sink);
    drop_database(config, db).await;
    Ok(SinkBench {
        rows: data.num_rows(),
        batch,
        trailing,
        sink_rows_per_sec: median(&mut sink_rates),
        psql_rows_per_sec: median(&mut psql_rates),
        psql_binary_rows_per_sec: (!psql_binary_rates.is_empty())
            .then(|| median(&mut psql_binary_rates)),
        alerts,
    })
}

/// Print the sink results as a Markdown table.
pub fn sink_report(b: &SinkBench, config_path: &Path) -> String {
    format!(
        "| figure | value |\n|---|---|\n\
         | rows per run (alerts among them) | {} ({}) |\n\
         | sink: batches of {} rows: COPY transactions, COPY alerts, offsets{} (median) | {:.0} rows/s |\n\
         | baseline: `psql \\copy` of the same rows into a table like `transactions`, one COPY (median) | {:.0} rows/s |\n\
         | ratio sink / psql COPY | {:.2} |\n\
         {}\
         \nconfig: {}\n",
        b.rows,
        b.alerts,
        b.batch,
        if b.trailing {
            "; aggregate merges on a second connection, a batch behind"
        } else {
            ", aggregate merges, one transaction"
        },
        b.sink_rows_per_sec,
        b.psql_rows_per_sec,
        b.sink_rows_per_sec / b.psql_rows_per_sec,
        b.psql_binary_rows_per_sec.map_or(String::new(), |r| format!(
            "| baseline 2: `psql \\copy ... WITH (FORMAT binary)` of the sink's binary stream of the same rows (median) | {r:.0} rows/s |\n\
             | ratio sink / psql binary COPY | {:.2} |\n",
            b.sink_rows_per_sec / r
        )),
        config_path.display()
    )
}

/// Results of the end-to-end benchmark.
#[derive(Debug, Clone)]
pub struct E2eBench {
    /// Messages per run (over every configured source).
    pub messages: u64,
    /// Transactions stored per second, Kafka to PostgreSQL, `run --stop-at-end` (median).
    pub e2e_rows_per_sec: f64,
    /// Messages per second of `kcat -C -e` reading the same topics to /dev/null (median): the
    /// broker's own delivery rate to a C client on this machine.
    pub kcat_msgs_per_sec: f64,
}

/// `payguard bench e2e`: `count` simulated messages are produced once to topics of their own;
/// each run reads them all from Kafka into a fresh database (`payguard_bench_e2e`) with the real
/// pipeline (`run --stop-at-end`), against `kcat` reading the same topics in the same run.
pub async fn e2e(config: &Config, count: u64, runs: usize) -> Result<E2eBench, BenchError> {
    use crate::app::{GenerateOptions, GenerateOutput};
    let mut config = config.clone();
    let tag = std::process::id();
    for s in &mut config.sources {
        s.topic = format!("payguard.bench.{tag}.{}", s.name);
    }
    config.pipeline.name = format!("bench_{tag}");
    config.engine.hot_reload = false;
    config.api.enabled = false;
    // Transactions only: the label stream (a few per thousand transactions) is left out, so the
    // run needs no label topic and kcat reads exactly what the pipeline reads.
    config.labels.enabled = false;
    // The simulated clock runs at the population's own pace (about 60,000 transactions a
    // simulated day): start it early enough that every event is in the past, or the run would
    // dead-letter the tail as "from the future" and measure less.
    let natural_tps = Simulator::new(
        &config.simulator,
        &config.sources,
        config.simulator.seed,
        0.0,
    )?
    .natural_tps();
    let span_ms = (count as f64 / natural_tps * 1000.0 * 1.5) as i64 + 86_400_000;
    let start = chrono::Utc::now() - chrono::Duration::milliseconds(span_ms);
    let opts = GenerateOptions {
        count,
        rate: 0,
        seed: None,
        simulated_tps: 0.0,
        output: GenerateOutput::Kafka {
            create_topics: true,
        },
        progress: false,
        duration: None,
        start_time: Some(start.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
        speedup: None,
        sources: Vec::new(),
        labels_topic: "payguard.labels".into(),
        params: Default::default(),
    };
    let made = crate::app::generate(&config, &opts)
        .await
        .map_err(setup("generate"))?;
    let messages = made.messages();
    let brokers = config.kafka.brokers.join(",");
    let db = "payguard_bench_e2e";
    let mut e2e_rates = Vec::new();
    let mut kcat_rates = Vec::new();
    for _ in 0..runs.max(1) {
        let t = Instant::now();
        for s in &config.sources {
            let out = std::process::Command::new("kcat")
                .args([
                    "-C",
                    "-b",
                    &brokers,
                    "-t",
                    &s.topic,
                    "-o",
                    "beginning",
                    "-e",
                    "-q",
                ])
                .stdout(std::process::Stdio::null())
                .status()
                .map_err(setup("run kcat"))?;
            if !out.success() {
                return Err(BenchError::Setup(format!("kcat -C {} failed", s.topic)));
            }
        }
        kcat_rates.push(messages as f64 / t.elapsed().as_secs_f64());

        let url = fresh_database(&config, db).await?;
        let mut run_cfg = config.clone();
        run_cfg.postgres.url = url;
        let run_cfg = Arc::new(run_cfg);
        let metrics = Arc::new(crate::metrics::Metrics::default());
        let cancel = tokio_util::sync::CancellationToken::new();
        let engine = Engine::new(&run_cfg).await?;
        let sink = crate::app::connect_sink(&run_cfg, &metrics, &cancel)
            .await
            .map_err(setup("connect the sink"))?;
        let t = Instant::now();
        let summary = crate::pipeline::run(
            run_cfg.clone(),
            engine,
            sink,
            crate::pipeline::RunOptions {
                stop_at_end: true,
                max_messages: None,
                ..Default::default()
            },
            metrics,
            cancel,
        )
        .await?;
        e2e_rates.push(summary.transactions as f64 / t.elapsed().as_secs_f64());
        if summary.messages != messages {
            return Err(BenchError::Setup(format!(
                "the run consumed {} of {messages} messages",
                summary.messages
            )));
        }
        if summary.dead_letters > 0 {
            return Err(BenchError::Setup(format!(
                "the run dead-lettered {} of {messages} messages: the benchmark measures clean input",
                summary.dead_letters
            )));
        }
    }
    drop_database(&config, db).await;
    // The benchmark's topics are its own: delete them.
    let stop = tokio_util::sync::CancellationToken::new();
    if let Ok(client) =
        crate::source::kafka::connect_from(&config.kafka, &config.base_dir, &stop).await
        && let Ok(controller) = client.controller_client()
    {
        for s in &config.sources {
            let _ = controller.delete_topic(s.topic.clone(), 10_000).await;
        }
    }
    Ok(E2eBench {
        messages,
        e2e_rows_per_sec: median(&mut e2e_rates),
        kcat_msgs_per_sec: median(&mut kcat_rates),
    })
}

/// Print the end-to-end results as a Markdown table.
pub fn e2e_report(b: &E2eBench, config_path: &Path) -> String {
    format!(
        "| figure | value |\n|---|---|\n\
         | messages per run (every configured source) | {} |\n\
         | end to end: Kafka -> decode -> SQL -> PostgreSQL, `run --stop-at-end` (median) | {:.0} transactions/s |\n\
         | baseline: `kcat -C -e` reading the same topics to /dev/null (median) | {:.0} messages/s |\n\
         | ratio end to end / kcat | {:.2} |\n\
         \nconfig: {}\n",
        b.messages,
        b.e2e_rows_per_sec,
        b.kcat_msgs_per_sec,
        b.e2e_rows_per_sec / b.kcat_msgs_per_sec,
        config_path.display()
    )
}
