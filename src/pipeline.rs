//! Wiring of the stages: input tasks -> batcher -> engine -> sink, connected by bounded channels,
//! under one cancellation token.
//!
//! Shutdown: cancelling the token stops the inputs; every stage then drains what it holds and the
//! sink commits it (retrying for at most `pipeline.shutdown_timeout_ms`), so SIGTERM loses nothing
//! and repeats nothing. A fatal error in any stage cancels the inputs and is returned; the batch it
//! concerned is not committed and will be read again on the next start.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{broadcast, mpsc};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, InputKind};
use crate::decode::RawMessage;
use crate::engine::{Engine, EngineError};
use crate::metrics::Metrics;
use crate::sink::query::Label;
use crate::sink::{Sink, SinkBatch, SinkError, StoredOffsets};
use crate::source::kafka::{self, Assignment, Backoff, KafkaError};
use crate::source::simulator::{Simulator, SimulatorError};
use crate::source::{Batcher, Chunk};

/// Errors that stop the pipeline.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// The engine's thread or its runtime could not be started.
    #[error("cannot start the engine thread: {0}")]
    EngineThread(#[source] std::io::Error),
    /// Compiling or running the SQL stages failed.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The sink failed in a way retrying cannot fix.
    #[error(transparent)]
    Sink(#[from] SinkError),
    /// Kafka setup failed.
    #[error(transparent)]
    Kafka(#[from] KafkaError),
    /// The simulator could not start.
    #[error(transparent)]
    Simulator(#[from] SimulatorError),
    /// Shutdown was asked for while the sink was unreachable; the uncommitted batches will be read
    /// again on the next start.
    #[error(
        "shutdown: could not commit {batches} in-flight batch(es) within the shutdown timeout: {last_error}"
    )]
    ShutdownIncomplete {
        /// Batches left uncommitted.
        batches: usize,
        /// The last sink error.
        last_error: SinkError,
    },
}

/// Options of one run.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Kafka: stop once every partition reaches the end offset it had at start.
    pub stop_at_end: bool,
    /// Simulator: stop after this many messages.
    pub max_messages: Option<u64>,
    /// The HTTP API's scoring jobs and alert events (`POST /v1/score`, `/v1/alerts/stream`).
    pub online: Option<crate::online::OnlineLink>,
}

/// What a run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunSummary {
    /// Batches committed.
    pub batches: u64,
    /// Messages consumed.
    pub messages: u64,
    /// Transactions stored.
    pub transactions: u64,
    /// Messages dead-lettered.
    pub dead_letters: u64,
}

/// Run the pipeline until the inputs end or `cancel` fires.
pub async fn run(
    config: Arc<Config>,
    mut engine: Engine,
    sink: Sink,
    opts: RunOptions,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
) -> Result<RunSummary, PipelineError> {
    if let Sink::Postgres(pg) = &sink {
        pg.prepare_aggregates(&engine.aggregates()).await?;
        pg.prepare_trailing(
            &engine.aggregates(),
            &engine.decided_schema(),
            config.postgres.trail_aggregates,
            metrics.clone(),
        )
        .await?;
    }
    metrics.set_sources(
        config
            .sources
            .iter()
            .map(|s| (s.name.clone(), s.topic.clone())),
    );
    let reload = Arc::new(tokio::sync::Notify::new());
    if config.engine.hot_reload || config.model.as_ref().is_some_and(|m| m.hot_reload) {
        tokio::spawn(watch_sql_files(
            config.clone(),
            reload.clone(),
            cancel.clone(),
        ));
    }
    tokio::spawn(reload_on_sighup(reload.clone(), cancel.clone()));
    // Labels the API stores from now on reach the engine task; the ones stored before are read
    // back from the database by the label warm-up below.
    let mut api_labels = opts.online.as_ref().map(|o| o.subscribe_labels());
    let stored = load_offsets_retrying(&sink, &config, &cancel).await?;
    // The window state first: the transactions it replays are indexed for the labels that
    // follow, which then need no database lookup.
    // Partial aggregates are computed by the sink stage, off the engine thread.
    engine.defer_aggregates(true);
    warm_state(&mut engine, &sink, &config, &cancel).await;
    if engine.reads_labels() {
        warm_labels(&mut engine, &sink, &config).await;
    }
    let topics: Vec<String> = config.input_topics();
    let by_source: HashMap<(usize, i32), i64> = stored
        .iter()
        .filter_map(|((topic, p), o)| {
            topics
                .iter()
                .position(|t| t == topic)
                .map(|s| ((s, *p), *o))
        })
        .collect();

    let depth = config.pipeline.queue_depth;
    let (chunk_tx, chunk_rx) = mpsc::channel::<Chunk>(depth * 8);
    let (batch_tx, mut batch_rx) = mpsc::channel(depth);
    let (done_tx, mut done_rx) = mpsc::channel::<SinkBatch>(depth);

    // Inputs stop on the root token or when a later stage fails.
    let input_cancel = cancel.child_token();
    let mut tasks = JoinSet::new();
    match config.pipeline.input {
        InputKind::Kafka => {
            let client = Arc::new(
                kafka::connect_from(&config.kafka, &config.base_dir, &input_cancel).await?,
            );
            let parts = wait_for_topics(&client, &config, &topics, &input_cancel).await?;
            for (source, (topic, ps)) in topics.iter().zip(parts).enumerate() {
                for p in ps {
                    let stop_at = if opts.stop_at_end {
                        Some(kafka::end_offset(&client, &config.kafka, topic, p).await?)
                    } else {
                        None
                    };
                    let a = Assignment {
                        source,
                        topic: topic.clone(),
                        partition: p,
                        stored: by_source.get(&(source, p)).copied(),
                        stop_at,
                    };
                    tasks.spawn(kafka::fetch_partition(
                        client.clone(),
                        config.kafka.clone(),
                        a,
                        chunk_tx.clone(),
                        metrics.clone(),
                        input_cancel.clone(),
                    ));
                }
            }
        }
        InputKind::Simulator => {
            engine.check_stream_future(false);
            let sim = Simulator::with_params(
                &config.simulator,
                &config.sources,
                config.simulator.seed,
                // The population's own pace: simulated time runs as fast as needed for the
                // configured wall-clock rate, so velocity features see realistic gaps.
                0.0,
                crate::source::simulator::SimulatorParams {
                    label_feedback: config.labels.enabled,
                    ..Default::default()
                },
            )?;
            tasks.spawn(simulate(
                sim,
                config.clone(),
                by_source.clone(),
                opts.max_messages,
                chunk_tx.clone(),
                metrics.clone(),
                input_cancel.clone(),
            ));
        }
    }
    drop(chunk_tx);

    let batcher = Batcher::new(
        topics,
        config.pipeline.batch_max_rows,
        Duration::from_millis(config.pipeline.batch_max_wait_ms),
        by_source,
    );
    tasks.spawn(batcher.run(chunk_rx, batch_tx, input_cancel.clone()));

    // Engine stage; SQL reloads happen here, between two batches.
    let engine_metrics = metrics.clone();
    let engine_cancel = input_cancel.clone();
    let engine_config = config.clone();
    let mut jobs = opts.online.as_ref().and_then(|o| o.take_jobs());
    let slice_rows = config.api.stream_slice_rows;
    // The engine runs on a thread of its own, with a runtime of its own: deciding a batch keeps
    // a core busy for milliseconds, and on the shared runtime that held up the HTTP API's
    // connections (measured: `/health/live` p99 12 ms while the stream ran).
    let engine_loop = async move {
        // When a scoring request was last served: while they come in, stream batches are decided
        // in slices with the waiting requests served in between.
        let mut last_job: Option<Instant> = None;
        // Scoring requests (and API labels) are served first (latency), but never twice in a row
        // while a batch waits.
        let mut served_jobs = false;
        loop {
            // Labels of the API first: the next batch or scoring request sees them.
            receive_api_labels(&mut engine, None, &mut api_labels, &engine_metrics).await;
            if served_jobs {
                served_jobs = false;
                if let Ok(b) = batch_rx.try_recv() {
                    let online = jobs.as_mut().map(|j| (j, slice_rows, &mut last_job));
                    if !process_batch(
                        &mut engine,
                        b,
                        &done_tx,
                        &engine_metrics,
                        &engine_cancel,
                        online,
                    )
                    .await?
                    {
                        break;
                    }
                    continue;
                }
            }
            let batch = tokio::select! {
                biased;
                label = next_api_label(&mut api_labels) => {
                    receive_api_labels(&mut engine, Some(label), &mut api_labels, &engine_metrics)
                        .await;
                    // A flood of labels does not hold a waiting batch back either.
                    served_jobs = true;
                    continue;
                }
                Some(job) = next_job(&mut jobs) => {
                    served_jobs = true;
                    last_job = Some(Instant::now());
                    let rx = jobs.as_mut().expect("a job came from it");
                    if !crate::online::serve(&mut engine, job, rx, &done_tx, &engine_metrics).await {
                        break;
                    }
                    continue;
                }
                b = batch_rx.recv() => match b {
                    Some(b) => b,
                    None => break,
                },
                _ = reload.notified() => {
                    reload_engine(&mut engine, &engine_config, &engine_metrics).await;
                    continue;
                }
            };
            let online = jobs.as_mut().map(|j| (j, slice_rows, &mut last_job));
            if !process_batch(
                &mut engine,
                batch,
                &done_tx,
                &engine_metrics,
                &engine_cancel,
                online,
            )
            .await?
            {
                break;
            }
        }
        Ok::<(), EngineError>(())
    };
    let (engine_done_tx, engine_done_rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("payguard-engine".into())
        .spawn(move || {
            let result = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt.block_on(engine_loop).map_err(PipelineError::from),
                Err(e) => Err(PipelineError::EngineThread(e)),
            };
            let _ = engine_done_tx.send(result);
        })
        .map_err(PipelineError::EngineThread)?;

    // Aggregate stage: the partial aggregates of each batch, on a blocking thread. Neither the
    // engine thread (scoring requests wait for it) nor a worker of the runtime (the HTTP API's
    // connections) is held up, and a batch's are computed while the sink commits the one before.
    let (ready_tx, mut ready_rx) = mpsc::channel::<SinkBatch>(depth);
    let aggregate_cancel = input_cancel.clone();
    let aggregating = tokio::spawn(async move {
        while let Some(mut batch) = done_rx.recv().await {
            if batch.aggregates_pending {
                let handle = tokio::runtime::Handle::current();
                let (b, r) = tokio::task::spawn_blocking(move || {
                    let started = Instant::now();
                    let r = handle.block_on(batch.compute_aggregates());
                    tracing::debug!(rows = batch.rows(), took = ?started.elapsed(), "partial aggregates");
                    (batch, r)
                })
                .await
                .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
                if let Err(e) = r {
                    aggregate_cancel.cancel();
                    return Err(e);
                }
                batch = b;
            }
            if ready_tx.send(batch).await.is_err() {
                break;
            }
        }
        Ok::<(), EngineError>(())
    });

    // Sink stage, in this task.
    let mut summary = RunSummary::default();
    let mut backoff = Backoff::new(
        config.postgres.retry_initial_ms,
        config.postgres.retry_max_ms,
    );
    let shutdown_timeout = Duration::from_millis(config.pipeline.shutdown_timeout_ms);
    let mut cancelled_at: Option<Instant> = None;
    let mut result = Ok(());
    'batches: while let Some(mut batch) = ready_rx.recv().await {
        let arrived = Instant::now();
        loop {
            let t = Instant::now();
            match sink.commit_dedup(&mut batch).await {
                Ok(stats) => {
                    backoff.reset();
                    metrics.sink_time.observe(t.elapsed().as_secs_f64());
                    metrics.commit_time.observe(arrived.elapsed().as_secs_f64());
                    metrics.last_commit.set(
                        std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .map_or(0.0, |d| d.as_secs_f64()),
                    );
                    if let Some(opened) = batch.opened_at {
                        metrics
                            .batch_latency
                            .observe(opened.elapsed().as_secs_f64());
                    }
                    metrics.batches.inc();
                    metrics.batch_messages.add(batch.messages as u64);
                    metrics.transactions_out.add(stats.inserted);
                    metrics.duplicates.add(stats.duplicates);
                    count_decisions(&batch, &metrics);
                    if let Some(online) = &opts.online {
                        online.publish_alerts(&batch);
                    }
                    for d in &batch.dead_letters {
                        metrics.dead_letter(&d.source, &d.reason);
                        tracing::warn!(source = %d.source, topic = %d.topic, partition = d.partition,
                            offset = d.offset, reason = %d.reason, "dead letter");
                    }
                    summary.batches += 1;
                    summary.messages += batch.messages as u64;
                    summary.transactions += stats.inserted;
                    summary.dead_letters += batch.dead_letters.len() as u64;
                    tracing::debug!(seq = batch.seq, rows = stats.inserted, "batch committed");
                    break;
                }
                Err(e) if e.is_retryable() => {
                    metrics.sink_errors.inc();
                    if cancel.is_cancelled() {
                        let since = *cancelled_at.get_or_insert_with(Instant::now);
                        if since.elapsed() >= shutdown_timeout {
                            input_cancel.cancel();
                            let mut left = 1;
                            while ready_rx.try_recv().is_ok() {
                                left += 1;
                            }
                            result = Err(PipelineError::ShutdownIncomplete {
                                batches: left,
                                last_error: e,
                            });
                            break 'batches;
                        }
                    }
                    let d = backoff.next_delay();
                    tracing::warn!(error = %e, retry_in = ?d, seq = batch.seq, "commit failed; retrying the same batch");
                    tokio::time::sleep(d).await;
                }
                Err(e) => {
                    input_cancel.cancel();
                    result = Err(e.into());
                    break 'batches;
                }
            }
        }
    }
    drop(ready_rx);
    input_cancel.cancel();
    // Trailing aggregate merges of the last commits: applied now, or by the next start.
    let waited = cancelled_at.map_or(Duration::ZERO, |at| at.elapsed());
    match tokio::time::timeout(shutdown_timeout.saturating_sub(waited), sink.flush()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "trailing aggregate merges not applied; the next start applies them");
            if result.is_ok() {
                result = Err(e.into());
            }
        }
        Err(_) => tracing::warn!(
            "trailing aggregate merges still running at the shutdown timeout; the next start applies them"
        ),
    }
    while tasks.join_next().await.is_some() {}
    let aggregate_result = match aggregating.await {
        Ok(r) => r,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(_) => Ok(()),
    };
    let engine_result = engine_done_rx.await.unwrap_or(Ok(()));
    result?;
    engine_result?;
    aggregate_result?;
    Ok(summary)
}

/// Run one micro-batch through the engine and hand it to the sink stage; false when the sink
/// stage is gone. An engine error cancels the inputs and is returned.
///
/// With `online` (the scoring jobs, the slice size, when a job was last served) and a job
/// served within the last second, the batch is decided in slices and the jobs waiting at the end
/// of a slice are served before the next one.
async fn process_batch(
    engine: &mut Engine,
    batch: crate::source::Batch,
    done_tx: &mpsc::Sender<SinkBatch>,
    metrics: &Metrics,
    cancel: &CancellationToken,
    online: Option<(
        &mut mpsc::Receiver<crate::online::ScoreJob>,
        usize,
        &mut Option<Instant>,
    )>,
) -> Result<bool, EngineError> {
    let t = Instant::now();
    let mut serving = Duration::ZERO;
    match decide_batch(engine, batch, done_tx, metrics, online, &mut serving).await {
        Ok(Some(out)) => {
            metrics
                .engine_time
                .observe(t.elapsed().saturating_sub(serving).as_secs_f64());
            Ok(done_tx.send(out).await.is_ok())
        }
        Ok(None) => Ok(false),
        Err(e) => {
            cancel.cancel();
            Err(e)
        }
    }
}

/// A job served within this long makes the next stream batches go in slices.
const SLICING_AFTER_JOB: Duration = Duration::from_secs(1);

/// The body of [`process_batch`]; `None` when the sink stage is gone. `serving` adds up the time
/// spent on scoring jobs between slices.
async fn decide_batch(
    engine: &mut Engine,
    batch: crate::source::Batch,
    done_tx: &mpsc::Sender<SinkBatch>,
    metrics: &Metrics,
    online: Option<(
        &mut mpsc::Receiver<crate::online::ScoreJob>,
        usize,
        &mut Option<Instant>,
    )>,
    serving: &mut Duration,
) -> Result<Option<SinkBatch>, EngineError> {
    // Slice when a scoring request was served lately: then requests wait at most one slice
    // (of messages to decode, then of rows to decide) behind the stream.
    let sliced = online.filter(|(_, slice, last_job)| {
        *slice > 0 && last_job.is_some_and(|t| t.elapsed() < SLICING_AFTER_JOB)
    });
    let Some((jobs, slice, last_job)) = sliced else {
        let mut f = engine.begin(batch, metrics).await?;
        while f.remaining() > 0 {
            engine.step(&mut f, usize::MAX).await?;
        }
        return engine.finish(f, metrics).await.map(Some);
    };
    // Serve one waiting job between two slices; false when the sink stage is gone.
    async fn between(
        engine: &mut Engine,
        jobs: &mut mpsc::Receiver<crate::online::ScoreJob>,
        last_job: &mut Option<Instant>,
        done_tx: &mpsc::Sender<SinkBatch>,
        metrics: &Metrics,
        serving: &mut Duration,
    ) -> bool {
        let Ok(job) = jobs.try_recv() else {
            return true;
        };
        let s = Instant::now();
        *last_job = Some(s);
        let alive = crate::online::serve(engine, job, jobs, done_tx, metrics).await;
        *serving += s.elapsed();
        alive
    }
    let mut o = engine.open(batch);
    while o.pending() > 0 {
        engine.decode(&mut o, slice).await?;
        if o.pending() > 0 && !between(engine, jobs, last_job, done_tx, metrics, serving).await {
            return Ok(None);
        }
    }
    let mut f = engine.opened(o, metrics).await?;
    while f.remaining() > 0 {
        engine.step(&mut f, slice).await?;
        if f.remaining() > 0 && !between(engine, jobs, last_job, done_tx, metrics, serving).await {
            return Ok(None);
        }
    }
    engine.finish(f, metrics).await.map(Some)
}

/// The next scoring job; pending forever without a job queue.
async fn next_job(
    jobs: &mut Option<mpsc::Receiver<crate::online::ScoreJob>>,
) -> Option<crate::online::ScoreJob> {
    match jobs {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// The next label stored by `POST /v1/labels`; pending forever without a subscription.
async fn next_api_label(
    rx: &mut Option<broadcast::Receiver<Label>>,
) -> Result<Label, broadcast::error::RecvError> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Most labels of the API attributed at once.
const API_LABELS_PER_TURN: usize = 4096;

/// Feed the labels the API stored to the label features: `first` (what the subscription
/// yielded, if anything) and those waiting behind it. An engine that fell behind the broadcast
/// lost the oldest ones: they are stored, and counted by the label features after a restart
/// (logged, and counted in `payguard_api_labels_lagged_total`). Never fails the pipeline.
async fn receive_api_labels(
    engine: &mut Engine,
    first: Option<Result<Label, broadcast::error::RecvError>>,
    rx: &mut Option<broadcast::Receiver<Label>>,
    metrics: &Metrics,
) {
    use broadcast::error::{RecvError, TryRecvError};
    let mut labels = Vec::new();
    let mut lagged = 0u64;
    match first {
        Some(Ok(l)) => labels.push(l),
        Some(Err(RecvError::Lagged(n))) => lagged += n,
        Some(Err(RecvError::Closed)) => *rx = None,
        None => {}
    }
    while let Some(r) = rx.as_mut()
        && labels.len() < API_LABELS_PER_TURN
    {
        match r.try_recv() {
            Ok(l) => labels.push(l),
            Err(TryRecvError::Lagged(n)) => lagged += n,
            Err(TryRecvError::Empty) => break,
            Err(TryRecvError::Closed) => *rx = None,
        }
    }
    if lagged > 0 {
        metrics.api_labels_lagged.add(lagged);
        tracing::warn!(
            labels = lagged,
            "the engine fell behind POST /v1/labels: these labels are stored but reach the label features only after a restart"
        );
    }
    if labels.is_empty() {
        return;
    }
    let batch = crate::online::label_batch(&labels);
    match engine.receive_labels(&batch).await {
        Ok(()) => tracing::debug!(labels = labels.len(), "API labels attributed"),
        Err(e) => {
            tracing::warn!(error = %e, labels = labels.len(), "attributing API labels failed; they are stored and count after a restart")
        }
    }
}

/// Partitions of every source topic; a topic that does not exist yet is waited for (it may be
/// created by its producer after Payguard starts), a broker error retried.
async fn wait_for_topics(
    client: &rskafka::client::Client,
    config: &Config,
    topics: &[String],
    cancel: &CancellationToken,
) -> Result<Vec<Vec<i32>>, PipelineError> {
    let mut backoff = Backoff::new(config.kafka.retry_initial_ms, config.kafka.retry_max_ms);
    loop {
        match kafka::partitions(client, &config.kafka, topics).await {
            Ok(p) => return Ok(p),
            Err(e) => {
                let d = backoff.next_delay();
                tracing::warn!(error = %e, retry_in = ?d, "waiting for the source topics");
                tokio::select! {
                    _ = tokio::time::sleep(d) => {}
                    _ = cancel.cancelled() => return Err(KafkaError::Cancelled.into()),
                }
            }
        }
    }
}

fn count_decisions(batch: &SinkBatch, metrics: &Metrics) {
    use datafusion::arrow::array::{Array, AsArray};
    use datafusion::arrow::datatypes::DataType;
    for b in &batch.transactions {
        let text = |name: &str| {
            let c = b.column_by_name(name)?;
            let c = match c.data_type() {
                DataType::Utf8 => c.clone(),
                _ => datafusion::arrow::compute::cast(c, &DataType::Utf8).ok()?,
            };
            Some(c)
        };
        let (Some(d), Some(s)) = (text(crate::engine::DECISION), text("source")) else {
            continue;
        };
        let (d, s) = (d.as_string::<i32>(), s.as_string::<i32>());
        let mut counts: HashMap<(&str, &str), u64> = HashMap::new();
        for i in 0..d.len() {
            let source = if s.is_null(i) { "" } else { s.value(i) };
            *counts.entry((source, d.value(i))).or_default() += 1;
        }
        for ((source, decision), n) in counts {
            metrics.decided(source, decision, n);
        }
    }
}

/// Stored transactions per chunk of the window state rebuild.
const WARM_CHUNK_ROWS: usize = 50_000;

/// Rebuild the window state of `features.sql` from the stored transactions, so that a restart
/// or a crash does not reset the entities' history (a card's `card_tx_24h` would start again
/// from 0): those of the longest window frame plus the allowed lateness before the newest stored
/// event time, at most `engine.warm_max_rows` (the newest), fed in event-time order through the
/// window state alone (no model, no rules, nothing written). Only with the PostgreSQL sink. A
/// failure is logged and the pipeline starts with what was rebuilt; a shutdown signal stops it.
async fn warm_state(engine: &mut Engine, sink: &Sink, config: &Config, cancel: &CancellationToken) {
    use futures::StreamExt;
    let max_rows = config.engine.warm_max_rows;
    let longest = engine.longest_frame_ms();
    if max_rows == 0 || longest == 0 || !matches!(sink, Sink::Postgres(_)) {
        return;
    }
    let span_ms = longest.saturating_add(config.engine.lateness_ms());
    let started = Instant::now();
    let mut rows = 0u64;
    let mut span: Option<(i64, i64)> = None;
    let canonical = engine.canonical().clone();
    let mut stream = sink.recent_transactions(&canonical, span_ms, max_rows, WARM_CHUNK_ROWS);
    let outcome = loop {
        let next = tokio::select! {
            next = stream.next() => next,
            _ = cancel.cancelled() => break "interrupted by shutdown",
        };
        let chunk = match next {
            None => break "done",
            Some(Ok(chunk)) => chunk,
            Some(Err(e)) => {
                tracing::warn!(error = %e, rows, "reading the stored transactions failed; the window state is rebuilt only in part");
                break "failed";
            }
        };
        if let Err(e) = engine.warm_state(&chunk).await {
            tracing::warn!(error = %e, rows, "rebuilding the window state failed; it is rebuilt only in part");
            break "failed";
        }
        if let Some((a, b)) = chunk_span(&chunk) {
            span = Some(span.map_or((a, b), |(lo, hi)| (lo.min(a), hi.max(b))));
        }
        rows += chunk.num_rows() as u64;
    };
    drop(stream);
    let when = |ms: i64| {
        chrono::DateTime::from_timestamp_millis(ms)
            .map(|t| t.to_rfc3339())
            .unwrap_or_default()
    };
    let state = engine.state_stats();
    tracing::info!(
        rows,
        entities = state.entities,
        from = %span.map(|s| when(s.0)).unwrap_or_default(),
        to = %span.map(|s| when(s.1)).unwrap_or_default(),
        seconds = format!("{:.2}", started.elapsed().as_secs_f64()),
        outcome,
        "window state rebuilt from the stored transactions"
    );
    if rows >= max_rows {
        tracing::warn!(
            rows,
            "engine.warm_max_rows reached: older transactions of the longest window were not replayed, their entities' features start lower"
        );
    }
}

/// Oldest and newest event time of canonical rows.
fn chunk_span(canonical: &datafusion::arrow::array::RecordBatch) -> Option<(i64, i64)> {
    let t = canonical
        .column(1)
        .as_any()
        .downcast_ref::<datafusion::arrow::array::TimestampMillisecondArray>()?;
    let lo = t.iter().flatten().min()?;
    let hi = t.iter().flatten().max()?;
    Some((lo, hi))
}

/// Rebuild the label features' state from the stored labels (a restart must not forget the
/// labels it had seen). A failure is logged: the labels stay stored, only their effect on the
/// features of the next transactions is lost until they are seen again.
async fn warm_labels(engine: &mut Engine, sink: &Sink, config: &Config) {
    if matches!(sink, Sink::Postgres(_)) {
        engine.set_label_lookup(sink.clone());
    }
    let history = config.labels.history_ms() + config.engine.lateness_ms();
    let result = match sink.recent_labels(history).await {
        Ok(labels) if labels.num_rows() == 0 => Ok(0),
        Ok(labels) => engine
            .add_labels(&labels, None)
            .await
            .map(|()| labels.num_rows()),
        Err(e) => {
            tracing::warn!(error = %e, "reading the stored labels failed");
            Ok(0)
        }
    };
    match result {
        Ok(n) if n > 0 => {
            tracing::info!(labels = n, "label feedback state rebuilt from the database")
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "rebuilding the label state failed"),
    }
}

async fn reload_engine(engine: &mut Engine, config: &Config, metrics: &Metrics) {
    match engine.reload(config).await {
        Ok(kept) => {
            metrics.reloads_ok.inc();
            *metrics.reload_error.lock().expect("reload lock") = None;
            tracing::info!(window_state_kept = kept, model = %engine.model_version().unwrap_or("none"), "SQL files and model reloaded");
        }
        Err(e) => {
            metrics.reloads_failed.inc();
            let text = e.problems().join("; ");
            tracing::error!(error = %text, "SQL reload refused; the running version stays");
            *metrics.reload_error.lock().expect("reload lock") = Some(text);
        }
    }
}

/// Every SQL file the engine reads (with `engine.hot_reload`) and the model file (with
/// `model.hot_reload`), with their content (they are small).
fn sql_files(config: &Config) -> Vec<(std::path::PathBuf, Option<Vec<u8>>)> {
    let mut files: Vec<std::path::PathBuf> = Vec::new();
    if config.engine.hot_reload {
        files.extend(config.sources.iter().map(|s| config.resolve(&s.mapping)));
        files.push(config.resolve(&config.engine.features));
        files.push(config.resolve(&config.engine.rules));
        if let Ok(rd) = std::fs::read_dir(config.resolve(&config.engine.aggregates)) {
            let mut aggs: Vec<_> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
            aggs.sort();
            files.extend(aggs);
        }
    }
    if let Some(m) = config.model.as_ref().filter(|m| m.hot_reload) {
        files.push(config.resolve(&m.path));
    }
    files
        .into_iter()
        .map(|f| {
            let content = std::fs::read(&f).ok();
            (f, content)
        })
        .collect()
}

/// Poll the SQL files twice a second and ask for a reload when their content changed and then
/// stayed the same for one more poll (so a file caught half-written is not loaded).
async fn watch_sql_files(
    config: Arc<Config>,
    reload: Arc<tokio::sync::Notify>,
    cancel: CancellationToken,
) {
    let mut loaded = sql_files(&config);
    let mut pending: Option<Vec<(std::path::PathBuf, Option<Vec<u8>>)>> = None;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = cancel.cancelled() => return,
        }
        let now = sql_files(&config);
        if now == loaded {
            pending = None;
            continue;
        }
        if pending.as_ref() == Some(&now) {
            tracing::info!("SQL files changed; reloading");
            loaded = now;
            pending = None;
            reload.notify_one();
        } else {
            pending = Some(now);
        }
    }
}

/// SIGHUP asks for a reload.
async fn reload_on_sighup(reload: Arc<tokio::sync::Notify>, cancel: CancellationToken) {
    let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else {
        return;
    };
    loop {
        tokio::select! {
            _ = hup.recv() => {
                tracing::info!("SIGHUP: reloading SQL files");
                reload.notify_one();
            }
            _ = cancel.cancelled() => return,
        }
    }
}

async fn load_offsets_retrying(
    sink: &Sink,
    config: &Config,
    cancel: &CancellationToken,
) -> Result<StoredOffsets, PipelineError> {
    let mut backoff = Backoff::new(
        config.postgres.retry_initial_ms,
        config.postgres.retry_max_ms,
    );
    loop {
        match sink.load_offsets().await {
            Ok(o) => return Ok(o),
            Err(e) if e.is_retryable() && !cancel.is_cancelled() => {
                let d = backoff.next_delay();
                tracing::warn!(error = %e, retry_in = ?d, "cannot read stored offsets");
                tokio::time::sleep(d).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// The in-process simulator input: one partition (0) per simulated source, paced at
/// `simulator.rate` messages per second (0: as fast as the pipeline takes them).
async fn simulate(
    mut sim: Simulator,
    config: Arc<Config>,
    stored: HashMap<(usize, i32), i64>,
    max_messages: Option<u64>,
    out: mpsc::Sender<Chunk>,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
) {
    let rate = config.simulator.rate;
    let per_tick = if rate == 0 { 2000 } else { (rate / 50).max(1) };
    let inputs = config.input_topics().len();
    let label_input = config.label_input();
    let mut next_offset: Vec<i64> = (0..inputs)
        .map(|s| stored.get(&(s, 0)).copied().unwrap_or(0))
        .collect();
    let mut label_buf = Vec::new();
    let mut produced = 0u64;
    let start = Instant::now();
    loop {
        if cancel.is_cancelled() || max_messages.is_some_and(|m| produced >= m) {
            return;
        }
        let n = max_messages.map_or(per_tick, |m| per_tick.min(m - produced));
        let mut by_source: Vec<Vec<RawMessage>> = vec![Vec::new(); inputs];
        for _ in 0..n {
            let g = sim.next_message();
            let offset = next_offset[g.source];
            next_offset[g.source] += 1;
            by_source[g.source].push(RawMessage {
                partition: 0,
                offset,
                key: Some(g.key),
                value: Some(g.value),
                timestamp_ms: g.event_time_ms,
            });
            if let Some(li) = label_input {
                label_buf.clear();
                while let Some(l) = sim.next_label_into(&mut label_buf) {
                    let offset = next_offset[li];
                    next_offset[li] += 1;
                    by_source[li].push(RawMessage {
                        partition: 0,
                        offset,
                        key: Some(l.transaction_id.as_bytes().to_vec()),
                        value: Some(std::mem::take(&mut label_buf)),
                        timestamp_ms: l.reported_at_ms,
                    });
                }
            }
        }
        produced += n;
        for (source, messages) in by_source.into_iter().enumerate() {
            if messages.is_empty() {
                continue;
            }
            metrics.messages_received(source, 0, messages.len() as u64);
            let chunk = Chunk {
                source,
                partition: 0,
                messages,
                next_offset: next_offset[source],
            };
            tokio::select! {
                r = out.send(chunk) => if r.is_err() { return },
                _ = cancel.cancelled() => return,
            }
        }
        if rate > 0 {
            let due = start + Duration::from_secs_f64(produced as f64 / rate as f64);
            tokio::select! {
                _ = tokio::time::sleep_until(due) => {}
                _ = cancel.cancelled() => return,
            }
        } else {
            tokio::task::yield_now().await;
        }
    }
}
