//! Glue behind the CLI commands: builds runtime objects from the config, starts the stages and
//! the API, handles signals. `anyhow` is used here and in `main` only.

use std::collections::HashMap;
use std::io::Write as _;
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
use crate::source::simulator::{Simulator, SimulatorParams};

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
                match PgSink::connect(
                    &config.postgres,
                    &dir,
                    &config.pipeline.name,
                    crate::engine::canonical::Canonical::of(config),
                )
                .await
                {
                    Ok(s) => {
                        metrics.sink_ready.set(1.0);
                        return Ok(Sink::Postgres(s));
                    }
                    Err(
                        e @ (SinkError::Migrate { .. }
                        | SinkError::SchemaTooOld { .. }
                        | SinkError::AttributeColumn { .. }),
                    ) => {
                        return Err(e.into());
                    }
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
pub async fn run(config: Config, mut opts: RunOptions) -> anyhow::Result<RunSummary> {
    let cancel = CancellationToken::new();
    cancel_on_signals(cancel.clone());
    let metrics = Arc::new(Metrics::default());
    let config = Arc::new(config);
    // Fail fast on SQL problems, before waiting for any service.
    let engine = Engine::new(&config).await?;
    let sink = connect_sink(&config, &metrics, &cancel).await?;
    let api_cancel = CancellationToken::new();
    let api = if config.api.enabled {
        let online = crate::online::OnlineLink::new(config.api.score_queue);
        opts.online = Some(online.clone());
        let state = ApiState::new(config.clone(), metrics.clone(), sink.clone(), Some(online))?;
        if state.auth_required() {
            tracing::info!("API keys required on /v1/*");
        }
        let (addr, handle) = api::serve(&config.api.listen, state, api_cancel.clone()).await?;
        tracing::info!(%addr, "HTTP API listening");
        Some(handle)
    } else {
        None
    };
    let started = Instant::now();
    let result = pipeline::run(
        config.clone(),
        engine,
        sink,
        opts,
        metrics.clone(),
        cancel.clone(),
    )
    .await;
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
        Err(e) => e.problems(),
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
    /// JSON lines, one message per line. With one generated source, this file; with several, one
    /// file per source beside it, `<stem>.<source>.<ext>` (e.g. `gen.card.jsonl`). Labels, when
    /// asked for, go to `<stem>.labels.<ext>`.
    File(PathBuf),
}

/// Options of `generate`.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    /// Messages to generate (`u64::MAX`: until `duration`).
    pub count: u64,
    /// Messages per second of wall time (0: as fast as possible).
    pub rate: u64,
    /// Seed (default: `simulator.seed`).
    pub seed: Option<u64>,
    /// Simulated transactions per simulated second (how fast the simulated clock runs); 0: the
    /// population's own rate (customers × payments per day / 86,400), or as `speedup` says.
    pub simulated_tps: f64,
    /// Output.
    pub output: GenerateOutput,
    /// Print progress to stderr.
    pub progress: bool,
    /// Stop after this much wall time.
    pub duration: Option<Duration>,
    /// Simulated start time, RFC 3339 (default: `simulator.start_time`).
    pub start_time: Option<String>,
    /// Simulated seconds per wall second. With `rate`, the simulated clock runs at
    /// `rate / speedup` transactions per simulated second; without, the rate becomes the
    /// population's own rate times `speedup`.
    pub speedup: Option<f64>,
    /// Generate only these sources (names); empty: every source with a simulator shape.
    pub sources: Vec<String>,
    /// Topic of the label feedback (with `params.label_feedback`, Kafka output).
    pub labels_topic: String,
    /// Simulator tunables (label feedback and its delays, scenario shares...).
    pub params: SimulatorParams,
}

/// What `generate` produced.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GenerateSummary {
    /// Messages per source index.
    pub per_source: Vec<u64>,
    /// Fraudulent messages among them.
    pub fraudulent: u64,
    /// Label reports written.
    pub labels: u64,
    /// The latest simulated event time written (epoch milliseconds), if any.
    pub last_event_ms: Option<i64>,
}

impl GenerateSummary {
    /// All messages.
    pub fn messages(&self) -> u64 {
        self.per_source.iter().sum()
    }
}

/// `payguard generate`.
pub async fn generate(config: &Config, opts: &GenerateOptions) -> anyhow::Result<GenerateSummary> {
    let seed = opts.seed.unwrap_or(config.simulator.seed);
    let mut sim_cfg = config.simulator.clone();
    if let Some(t) = &opts.start_time {
        sim_cfg.start_time = t.clone();
    }
    // `--source`: the other sources keep their place (indexes) but lose their shape.
    let mut sources = config.sources.clone();
    if !opts.sources.is_empty() {
        for name in &opts.sources {
            match sources.iter().find(|s| &s.name == name) {
                None => bail!(
                    "no source named {name:?}; configured: {}",
                    config.source_names()
                ),
                Some(s) if s.simulator.is_empty() => {
                    bail!("source {name:?} has no `simulator` shape, so it cannot be generated")
                }
                Some(_) => {}
            }
        }
        for s in &mut sources {
            if !opts.sources.contains(&s.name) {
                s.simulator.clear();
            }
        }
    }
    if opts.simulated_tps > 0.0 && opts.speedup.is_some() {
        bail!("give --simulated-tps or --speedup, not both");
    }
    if opts.speedup.is_some_and(|s| !(s > 0.0 && s.is_finite())) {
        bail!("--speedup must be a positive number");
    }
    let mut sim = Simulator::with_params(
        &sim_cfg,
        &sources,
        seed,
        opts.simulated_tps,
        opts.params.clone(),
    )?;
    let mut rate = opts.rate;
    if let Some(s) = opts.speedup {
        if rate > 0 {
            sim.set_simulated_tps(rate as f64 / s);
        } else {
            rate = (sim.natural_tps() * s).round().max(1.0) as u64;
        }
    }
    let generated: Vec<usize> = (0..sources.len())
        .filter(|&i| !sources[i].simulator.is_empty())
        .collect();
    let limits = Limits {
        count: opts.count,
        duration: opts.duration,
        rate,
    };
    let mut progress = Progress::new(opts.progress, opts.count, opts.duration);
    let summary = match &opts.output {
        GenerateOutput::File(path) => {
            generate_files(&mut sim, &sources, &generated, path, &limits, &mut progress).await?
        }
        GenerateOutput::Kafka { create_topics } => {
            generate_kafka(
                sim,
                config,
                &generated,
                *create_topics,
                opts.params
                    .label_feedback
                    .then_some(opts.labels_topic.as_str()),
                &limits,
                &mut progress,
            )
            .await?
        }
    };
    progress.finish(&summary, &sources);
    warn_if_ahead(config, &summary);
    Ok(summary)
}

/// Say so when the simulated clock ended further ahead of the wall clock than `engine.max_future`:
/// `payguard run` dead-letters those events (a producer's clock that far ahead is wrong).
fn warn_if_ahead(config: &Config, summary: &GenerateSummary) {
    let Some(last) = summary.last_event_ms else {
        return;
    };
    let limit = chrono::Utc::now().timestamp_millis() + config.engine.max_future_ms();
    if last > limit {
        let at = |ms: i64| {
            chrono::DateTime::from_timestamp_millis(ms)
                .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
                .unwrap_or_default()
        };
        tracing::warn!(
            "the simulated clock ended at {}, more than engine.max_future ({}) ahead of the wall \
             clock: `payguard run` dead-letters the events stamped after {}. Give an earlier \
             --start-time (or a higher --simulated-tps) to keep them",
            at(last),
            config.engine.max_future,
            at(limit)
        );
    }
}

/// When `generate` stops and how fast it goes.
struct Limits {
    count: u64,
    duration: Option<Duration>,
    rate: u64,
}

impl Limits {
    fn done(&self, started: Instant, produced: u64) -> bool {
        produced >= self.count || self.duration.is_some_and(|d| started.elapsed() >= d)
    }

    /// How long to wait, if at all, before message number `produced + 1`.
    fn wait(&self, started: Instant, produced: u64) -> Option<Duration> {
        if self.rate == 0 {
            return None;
        }
        let due = Duration::from_secs_f64(produced as f64 / self.rate as f64);
        due.checked_sub(started.elapsed()).filter(|d| !d.is_zero())
    }
}

/// `<stem>.<part>.<ext>` beside `path`.
fn sibling(path: &Path, part: &str) -> PathBuf {
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let name = match path.extension() {
        Some(ext) => format!("{stem}.{part}.{}", ext.to_string_lossy()),
        None => format!("{stem}.{part}"),
    };
    path.with_file_name(name)
}

async fn generate_files(
    sim: &mut Simulator,
    sources: &[config::SourceConfig],
    generated: &[usize],
    path: &Path,
    limits: &Limits,
    progress: &mut Progress,
) -> anyhow::Result<GenerateSummary> {
    const FLUSH_AT: usize = 1 << 20;
    let create = |p: &Path| {
        std::fs::File::create(p).with_context(|| format!("cannot create {}", p.display()))
    };
    let mut files: Vec<Option<std::fs::File>> = (0..sources.len()).map(|_| None).collect();
    for &i in generated {
        let p = if generated.len() == 1 {
            path.to_path_buf()
        } else {
            sibling(path, &sources[i].name)
        };
        progress.output(&sources[i].name, &p);
        files[i] = Some(create(&p)?);
    }
    let labels = sim.params().label_feedback;
    let mut label_file = if labels {
        let p = sibling(path, "labels");
        progress.output("labels", &p);
        Some(create(&p)?)
    } else {
        None
    };
    let mut bufs: Vec<Vec<u8>> = (0..sources.len())
        .map(|_| Vec::with_capacity(FLUSH_AT + 4096))
        .collect();
    let mut label_buf = Vec::new();
    let mut scratch = Vec::with_capacity(1024);
    let mut summary = GenerateSummary {
        per_source: vec![0; sources.len()],
        ..Default::default()
    };
    let started = Instant::now();
    let mut produced = 0u64;
    let cancel = CancellationToken::new();
    cancel_on_signals(cancel.clone());
    loop {
        if produced >= limits.count {
            break;
        }
        // The clock and the signal are looked at every 1024 messages (each one when paced).
        if (limits.rate > 0 || produced.is_multiple_of(1024))
            && (limits.done(started, produced) || cancel.is_cancelled())
        {
            break;
        }
        if limits.rate > 0
            && let Some(d) = limits.wait(started, produced)
        {
            tokio::time::sleep(d).await;
        }
        scratch.clear();
        let m = sim.next_into(&mut scratch);
        let buf = &mut bufs[m.source];
        buf.extend_from_slice(&scratch);
        buf.push(b'\n');
        if buf.len() >= FLUSH_AT
            && let Some(f) = &mut files[m.source]
        {
            f.write_all(buf)?;
            buf.clear();
        }
        summary.per_source[m.source] += 1;
        summary.fraudulent += m.is_fraud as u64;
        summary.last_event_ms = summary.last_event_ms.max(Some(m.event_time_ms));
        produced += 1;
        while labels && sim.next_label_into(&mut label_buf).is_some() {
            label_buf.push(b'\n');
            summary.labels += 1;
        }
        if label_buf.len() >= FLUSH_AT
            && let Some(f) = &mut label_file
        {
            f.write_all(&label_buf)?;
            label_buf.clear();
        }
        if produced.is_multiple_of(1024) {
            progress.tick(produced, started);
        }
    }
    for (f, buf) in files.iter_mut().zip(&bufs) {
        if let Some(f) = f {
            f.write_all(buf)?;
            f.flush()?;
        }
    }
    if let Some(f) = &mut label_file {
        f.write_all(&label_buf)?;
        f.flush()?;
    }
    if cancel.is_cancelled() && produced < limits.count && limits.duration.is_none() {
        bail!("interrupted after {produced} messages");
    }
    Ok(summary)
}

/// Records of one chunk, by source and partition, and the label reports.
struct KafkaChunk {
    by_source: Vec<HashMap<i32, Vec<Record>>>,
    labels: HashMap<i32, Vec<Record>>,
    messages: u64,
    fraudulent: u64,
    per_source: Vec<u64>,
    label_count: u64,
    last_event_ms: Option<i64>,
}

/// A Kafka record. Its timestamp is the wall-clock produce time, not the simulated event time
/// (which travels in the payload): the broker's time-based retention reads record timestamps, and
/// simulated days in the past would have it delete the records at once.
fn record(key: &[u8], value: Vec<u8>, _event_time_ms: i64) -> Record {
    Record {
        key: Some(key.to_vec()),
        value: Some(value),
        headers: Default::default(),
        timestamp: chrono::Utc::now(),
    }
}

async fn generate_kafka(
    mut sim: Simulator,
    config: &Config,
    generated: &[usize],
    create_topics: bool,
    labels_topic: Option<&str>,
    limits: &Limits,
    progress: &mut Progress,
) -> anyhow::Result<GenerateSummary> {
    let cancel = CancellationToken::new();
    cancel_on_signals(cancel.clone());
    let client = kafka::connect_from(&config.kafka, &config.base_dir, &cancel).await?;
    // One producer per source index (only the generated ones are used).
    let mut producers: Vec<Option<TopicProducer>> = Vec::new();
    for (i, src) in config.sources.iter().enumerate() {
        if !generated.contains(&i) {
            producers.push(None);
            continue;
        }
        if create_topics {
            kafka::ensure_topic(&client, &config.kafka, &src.topic, src.partitions).await?;
        }
        producers.push(Some(
            TopicProducer::new(&client, &config.kafka, &src.topic).await?,
        ));
    }
    let label_producer = match labels_topic {
        Some(topic) => {
            if create_topics {
                kafka::ensure_topic(&client, &config.kafka, topic, config.labels.partitions)
                    .await?;
            }
            Some(TopicProducer::new(&client, &config.kafka, topic).await?)
        }
        None => None,
    };
    let partitions: Vec<i32> = producers
        .iter()
        .map(|p| p.as_ref().map_or(1, TopicProducer::partition_count))
        .collect();
    let label_partitions = label_producer
        .as_ref()
        .map_or(1, TopicProducer::partition_count);

    // Generation runs on a thread of its own, a few chunks ahead of the producer, so that the
    // simulator and the network overlap.
    let chunk = if limits.rate > 0 {
        (limits.rate / 20).clamp(1, 5000)
    } else {
        5000
    };
    let (tx, mut rx) = tokio::sync::mpsc::channel::<KafkaChunk>(4);
    let (count, duration, rate) = (limits.count, limits.duration, limits.rate);
    let gen_cancel = cancel.clone();
    let started = Instant::now();
    let generator = tokio::task::spawn_blocking(move || {
        let limits = Limits {
            count,
            duration,
            rate,
        };
        let n_sources = partitions.len();
        let mut produced = 0u64;
        let mut label_buf = Vec::new();
        while !limits.done(started, produced) && !gen_cancel.is_cancelled() {
            let n = chunk.min(limits.count - produced);
            let mut c = KafkaChunk {
                by_source: (0..n_sources).map(|_| HashMap::new()).collect(),
                labels: HashMap::new(),
                messages: n,
                fraudulent: 0,
                per_source: vec![0; n_sources],
                label_count: 0,
                last_event_ms: None,
            };
            for _ in 0..n {
                let mut value = Vec::with_capacity(512);
                let m = sim.next_into(&mut value);
                let key = m.key.as_bytes();
                let part = kafka::partition_for_key(key, partitions[m.source]);
                c.by_source[m.source].entry(part).or_default().push(record(
                    key,
                    value,
                    m.event_time_ms,
                ));
                c.per_source[m.source] += 1;
                c.fraudulent += m.is_fraud as u64;
                c.last_event_ms = c.last_event_ms.max(Some(m.event_time_ms));
                while let Some(l) = sim.next_label_into(&mut label_buf) {
                    let key = l.transaction_id.as_bytes();
                    let part = kafka::partition_for_key(key, label_partitions);
                    let value = std::mem::take(&mut label_buf);
                    c.labels
                        .entry(part)
                        .or_default()
                        .push(record(key, value, l.reported_at_ms));
                    c.label_count += 1;
                }
            }
            produced += n;
            if tx.blocking_send(c).is_err() {
                return;
            }
            if let Some(d) = limits.wait(started, produced) {
                std::thread::sleep(d);
            }
        }
    });

    let mut summary = GenerateSummary {
        per_source: vec![0; config.sources.len()],
        ..Default::default()
    };
    let mut done = 0u64;
    while let Some(c) = rx.recv().await {
        let mut sends = Vec::new();
        for (p, records) in producers.iter().zip(c.by_source) {
            if let Some(p) = p
                && !records.is_empty()
            {
                sends.push(produce_retrying(p, records, &config.kafka));
            }
        }
        if let Some(p) = &label_producer
            && !c.labels.is_empty()
        {
            sends.push(produce_retrying(p, c.labels, &config.kafka));
        }
        for r in futures::future::join_all(sends).await {
            r?;
        }
        done += c.messages;
        summary.fraudulent += c.fraudulent;
        summary.labels += c.label_count;
        summary.last_event_ms = summary.last_event_ms.max(c.last_event_ms);
        for (s, n) in summary.per_source.iter_mut().zip(&c.per_source) {
            *s += n;
        }
        progress.tick(done, started);
    }
    generator.await.context("generator thread")?;
    if cancel.is_cancelled() && done < limits.count && limits.duration.is_none() {
        bail!("interrupted after {done} of {} messages", limits.count);
    }
    Ok(summary)
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

/// A one-line progress display on stderr: a bar, the count and the live rate.
struct Progress {
    enabled: bool,
    total: u64,
    duration: Option<Duration>,
    first: Instant,
    last: Instant,
    last_count: u64,
    outputs: Vec<(String, PathBuf)>,
}

impl Progress {
    fn new(enabled: bool, total: u64, duration: Option<Duration>) -> Self {
        Self {
            enabled,
            total,
            duration,
            first: Instant::now(),
            last: Instant::now(),
            last_count: 0,
            outputs: Vec::new(),
        }
    }

    fn output(&mut self, what: &str, path: &Path) {
        self.outputs.push((what.to_string(), path.to_path_buf()));
    }

    fn tick(&mut self, done: u64, started: Instant) {
        if !self.enabled || self.last.elapsed() < Duration::from_millis(500) {
            return;
        }
        let rate = (done - self.last_count) as f64 / self.last.elapsed().as_secs_f64();
        self.last = Instant::now();
        self.last_count = done;
        let by_count = if self.total == u64::MAX {
            0.0
        } else {
            done as f64 / self.total.max(1) as f64
        };
        let by_time = self.duration.map_or(0.0, |d| {
            started.elapsed().as_secs_f64() / d.as_secs_f64().max(1e-9)
        });
        let width = 30;
        let filled = ((by_count.max(by_time) * width as f64) as usize).min(width);
        let of = if self.total == u64::MAX {
            String::new()
        } else {
            format!("/{}", self.total)
        };
        eprint!(
            "\r[{}{}] {done}{of} ({rate:.0} msg/s)   ",
            "#".repeat(filled),
            " ".repeat(width - filled),
        );
    }

    fn finish(&self, summary: &GenerateSummary, sources: &[config::SourceConfig]) {
        if !self.enabled {
            return;
        }
        let secs = self.first.elapsed().as_secs_f64();
        let done = summary.messages();
        eprintln!(
            "\rgenerated {done} messages in {secs:.2}s ({:.0} msg/s), {} fraudulent, {} label reports{}",
            done as f64 / secs.max(1e-9),
            summary.fraudulent,
            summary.labels,
            " ".repeat(20)
        );
        for (i, n) in summary.per_source.iter().enumerate() {
            if *n > 0 {
                let name = &sources[i].name;
                let to = self.outputs.iter().find(|(w, _)| w == name).map_or_else(
                    || sources[i].topic.clone(),
                    |(_, p)| p.display().to_string(),
                );
                eprintln!("  {name:<10} {n:>10}  -> {to}");
            }
        }
        if let Some((_, p)) = self.outputs.iter().find(|(w, _)| w == "labels") {
            eprintln!(
                "  {:<10} {:>10}  -> {}",
                "labels",
                summary.labels,
                p.display()
            );
        }
    }
}
