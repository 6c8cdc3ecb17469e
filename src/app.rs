//! Glue behind the CLI commands: builds runtime objects from the config, starts the stages and
//! the API, handles signals. `anyhow` is used here and in `main` only.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rskafka::record::Record;
use tokio_util::sync::CancellationToken;

use crate::api::{self, ApiState};
use crate::config::{self, Config, SinkKind};
use crate::engine::Engine;
use crate::metrics::Metrics;
use crate::pipeline::{self, RunOptions, RunSummary};
use crate::sink::memory::MemorySink;
use crate::sink::postgres::PgSink;
use crate::sink::{Sink, SinkError};
use crate::source::kafka::{self, Backoff, TopicProducer};
use crate::source::simulator::Simulator;

/// Cancel `token` on SIGINT or SIGTERM.
pub fn cancel_on_signals(token: CancellationToken) {
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, "cannot listen for SIGTERM");
                    return;
                }
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: stopping, committing what is in flight"),
            _ = term.recv() => tracing::info!("SIGTERM: stopping, committing what is in flight"),
        }
        token.cancel();
    });
}

/// Load a config file, turning the collected problems into one error.
pub fn load_config(path: &Path) -> anyhow::Result<Config> {
    config::load(path).map_err(|e| anyhow::anyhow!("{e}"))
}

/// Connect the configured sink, retrying a database that is not up yet until `cancel`.
pub async fn connect_sink(
    config: &Config,
    metrics: &Metrics,
    cancel: &CancellationToken,
) -> anyhow::Result<Sink> {
    match config.pipeline.sink {
        SinkKind::Memory => {
            metrics.sink_ready.set(1.0);
            Ok(Sink::Memory(MemorySink::new(&config.pipeline.name)))
        }
        SinkKind::Postgres => {
            let dir = config.resolve(&config.postgres.migrations);
            let mut backoff = Backoff::new(
                config.postgres.retry_initial_ms,
                config.postgres.retry_max_ms,
            );
            loop {
                match PgSink::connect(&config.postgres, &dir, &config.pipeline.name).await {
                    Ok(s) => {
                        metrics.sink_ready.set(1.0);
                        return Ok(Sink::Postgres(s));
                    }
                    Err(e @ SinkError::Migrate { .. }) => return Err(e.into()),
                    Err(e) => {
                        if cancel.is_cancelled() {
                            return Err(e.into());
                        }
                        let d = backoff.next_delay();
                        tracing::warn!(error = %e, retry_in = ?d, "cannot connect to PostgreSQL");
                        tokio::select! {
                            _ = tokio::time::sleep(d) => {}
                            _ = cancel.cancelled() => bail!("cancelled while connecting to PostgreSQL"),
                        }
                    }
                }
            }
        }
    }
}

/// `payguard run` and `payguard demo`: the pipeline with the API beside it.
pub async fn run(config: Config, opts: RunOptions) -> anyhow::Result<RunSummary> {
    let cancel = CancellationToken::new();
    cancel_on_signals(cancel.clone());
    let metrics = Arc::new(Metrics::default());
    let config = Arc::new(config);
    // Fail fast on SQL problems, before waiting for any service.
    Engine::new(&config).await?;
    let sink = connect_sink(&config, &metrics, &cancel).await?;
    let api_cancel = CancellationToken::new();
    let api = if config.api.enabled {
        let state = ApiState {
            metrics: metrics.clone(),
            sink: sink.clone(),
        };
        let (addr, handle) = api::serve(&config.api.listen, state, api_cancel.clone()).await?;
        tracing::info!(%addr, "HTTP API listening");
        Some(handle)
    } else {
        None
    };
    let started = Instant::now();
    let result = pipeline::run(config.clone(), sink, opts, metrics.clone(), cancel.clone()).await;
    api_cancel.cancel();
    if let Some(h) = api {
        let _ = h.await;
    }
    let summary = match result {
        // Stopped by a signal before the inputs were up: a clean stop, nothing was consumed.
        Err(pipeline::PipelineError::Kafka(kafka::KafkaError::Cancelled)) => RunSummary::default(),
        other => other?,
    };
    let secs = started.elapsed().as_secs_f64();
    tracing::info!(
        batches = summary.batches,
        messages = summary.messages,
        transactions = summary.transactions,
        dead_letters = summary.dead_letters,
        seconds = format!("{secs:.1}"),
        "pipeline stopped"
    );
    Ok(summary)
}

/// `payguard check`: validate config and SQL without starting anything. Returns the problems.
pub async fn check(path: &Path) -> Vec<String> {
    let config = match config::load(path) {
        Ok(c) => c,
        Err(e) => return e.0.iter().map(ToString::to_string).collect(),
    };
    match Engine::new(&config).await {
        Ok(_) => Vec::new(),
        Err(crate::engine::EngineError::Many(all)) => all.iter().map(ToString::to_string).collect(),
        Err(e) => vec![e.to_string()],
    }
}

/// Where `generate` writes.
#[derive(Debug, Clone)]
pub enum GenerateOutput {
    /// The sources' Kafka topics.
    Kafka {
        /// Create missing topics with `sources[].partitions` partitions.
        create_topics: bool,
    },
    /// A JSON-lines file, one message per line.
    File(PathBuf),
}

/// Options of `generate`.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    /// Messages to generate.
    pub count: u64,
    /// Messages per second of wall time (0: as fast as possible).
    pub rate: u64,
    /// Seed (default: `simulator.seed`).
    pub seed: Option<u64>,
    /// Simulated transactions per simulated second (how fast the simulated clock runs).
    pub simulated_tps: f64,
    /// Output.
    pub output: GenerateOutput,
    /// Print progress to stderr.
    pub progress: bool,
}

/// `payguard generate`.
pub async fn generate(config: &Config, opts: &GenerateOptions) -> anyhow::Result<u64> {
    let seed = opts.seed.unwrap_or(config.simulator.seed);
    let mut sim = Simulator::new(&config.simulator, &config.sources, seed, opts.simulated_tps)?;
    let started = Instant::now();
    let mut progress = Progress::new(opts.progress, opts.count);
    match &opts.output {
        GenerateOutput::File(path) => {
            let f = std::fs::File::create(path)
                .with_context(|| format!("cannot create {}", path.display()))?;
            let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
            for i in 0..opts.count {
                let g = sim.next_message();
                w.write_all(&g.value)?;
                w.write_all(b"\n")?;
                if opts.rate > 0 {
                    pace(started, i + 1, opts.rate).await;
                }
                progress.tick(i + 1);
            }
            w.flush()?;
        }
        GenerateOutput::Kafka { create_topics } => {
            let cancel = CancellationToken::new();
            cancel_on_signals(cancel.clone());
            let client = kafka::connect(&config.kafka, &cancel).await?;
            let mut producers = Vec::new();
            for src in &config.sources {
                if *create_topics {
                    kafka::ensure_topic(&client, &config.kafka, &src.topic, src.partitions).await?;
                }
                producers.push(TopicProducer::new(&client, &config.kafka, &src.topic).await?);
            }
            let chunk = if opts.rate > 0 {
                (opts.rate / 20).clamp(1, 5000)
            } else {
                5000
            };
            let mut done = 0u64;
            while done < opts.count && !cancel.is_cancelled() {
                let n = chunk.min(opts.count - done);
                let mut by_source: Vec<HashMap<i32, Vec<Record>>> =
                    (0..producers.len()).map(|_| HashMap::new()).collect();
                for _ in 0..n {
                    let g = sim.next_message();
                    let p = &producers[g.source];
                    let part = kafka::partition_for_key(&g.key, p.partition_count());
                    by_source[g.source].entry(part).or_default().push(Record {
                        key: Some(g.key),
                        value: Some(g.value),
                        headers: Default::default(),
                        timestamp: chrono::DateTime::from_timestamp_millis(g.event_time_ms)
                            .unwrap_or_default(),
                    });
                }
                for (p, records) in producers.iter().zip(by_source) {
                    produce_retrying(p, records, &config.kafka).await?;
                }
                done += n;
                progress.tick(done);
                if opts.rate > 0 {
                    pace(started, done, opts.rate).await;
                }
            }
            if done < opts.count {
                bail!("interrupted after {done} of {} messages", opts.count);
            }
        }
    }
    progress.finish(opts.count);
    Ok(opts.count)
}

async fn produce_retrying(
    p: &TopicProducer,
    records: HashMap<i32, Vec<Record>>,
    cfg: &crate::config::KafkaConfig,
) -> anyhow::Result<()> {
    let mut backoff = Backoff::new(cfg.retry_initial_ms, cfg.retry_max_ms);
    for attempt in 1..=20 {
        match p.produce(records.clone()).await {
            Ok(()) => return Ok(()),
            Err(e) if attempt < 20 => {
                let d = backoff.next_delay();
                tracing::warn!(topic = p.topic(), error = %e, retry_in = ?d, "produce failed");
                tokio::time::sleep(d).await;
            }
            Err(e) => return Err(e).context(format!("producing to {}", p.topic())),
        }
    }
    unreachable!("the last attempt returns")
}

async fn pace(started: Instant, done: u64, rate: u64) {
    let due = Duration::from_secs_f64(done as f64 / rate as f64);
    let elapsed = started.elapsed();
    if due > elapsed {
        tokio::time::sleep(due - elapsed).await;
    }
}

/// A one-line progress display on stderr: count, share and live rate.
struct Progress {
    enabled: bool,
    total: u64,
    started: Instant,
    last: Instant,
    last_count: u64,
}

impl Progress {
    fn new(enabled: bool, total: u64) -> Self {
        let now = Instant::now();
        Self {
            enabled,
            total,
            started: now,
            last: now,
            last_count: 0,
        }
    }

    fn tick(&mut self, done: u64) {
        if !self.enabled || self.last.elapsed() < Duration::from_millis(500) {
            return;
        }
        let rate = (done - self.last_count) as f64 / self.last.elapsed().as_secs_f64();
        self.last = Instant::now();
        self.last_count = done;
        let width = 30;
        let filled = (done as f64 / self.total.max(1) as f64 * width as f64) as usize;
        eprint!(
            "\r[{}{}] {done}/{} ({:.0} msg/s)   ",
            "#".repeat(filled),
            " ".repeat(width - filled.min(width)),
            self.total,
            rate
        );
    }

    fn finish(&self, done: u64) {
        if self.enabled {
            let secs = self.started.elapsed().as_secs_f64();
            eprintln!(
                "\rgenerated {done} messages in {secs:.2}s ({:.0} msg/s){}",
                done as f64 / secs.max(1e-9),
                " ".repeat(20)
            );
        }
    }
}
