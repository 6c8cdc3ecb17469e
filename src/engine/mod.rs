//! The engine: per micro-batch, decode each source's messages, map them to canonical transactions
//! (`sql/sources/*.sql`), compute behaviour features (`features.sql`, windows kept incrementally),
//! score, apply the rules (`rules.sql`) and decide, and compute the partial windowed aggregates
//! (`sql/aggregates/*.sql`); hand the sink one [`SinkBatch`].
//!
//! Everything is compiled once ([`Engine::new`]); [`Engine::process`] only executes. A reload
//! ([`Engine::reload`]) compiles the files again and swaps them in between two batches, keeping the
//! window state when the windows did not change; an invalid edit keeps the running version.

pub mod aggregates;
pub mod canonical;
pub mod features;
pub mod labels;
pub mod online;
pub mod rules;
pub mod sql;
pub mod state;
pub mod watermark;
pub mod windows;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use datafusion::arrow::array::{
    Array, ArrayRef, Float64Array, Int32Array, RecordBatch, StringArray, TimestampMillisecondArray,
    new_null_array,
};
use datafusion::arrow::compute::concat_batches;
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};

use crate::config::Config;
use crate::decode::{DeadLetter, DecodeError, JsonDecoder};
use crate::metrics::Metrics;
use crate::model::Model;
use crate::sink::SinkBatch;
use crate::source::Batch;
use aggregates::AggregateStage;
use canonical::{Canonical, Conformer};
use features::{FeatureLimits, FeatureStage};
use rules::RuleStage;
use sql::{CompiledQuery, SqlError};
use watermark::Watermark;

/// Errors of the engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A source's decoder could not be built.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// A SQL file failed to compile or run.
    #[error(transparent)]
    Sql(#[from] SqlError),
    /// `features.sql` uses a window the engine cannot evaluate.
    #[error(transparent)]
    Window(#[from] windows::WindowPlanError),
    /// A SQL file's result breaks its contract.
    #[error("{file}: {message}")]
    Contract {
        /// The SQL file.
        file: PathBuf,
        /// Every problem found.
        message: String,
    },
    /// Arrow failed converting a result (internal error).
    #[error("{file}: converting the result failed: {source}")]
    Arrow {
        /// The SQL file.
        file: PathBuf,
        /// Underlying error.
        #[source]
        source: datafusion::arrow::error::ArrowError,
    },
    /// The aggregates directory could not be read.
    #[error("{dir}: {source}")]
    Io {
        /// Directory.
        dir: PathBuf,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The model could not be loaded, or does not fit `features.sql`.
    #[error(transparent)]
    Model(#[from] crate::model::ModelError),
    /// Several problems found while compiling (all reported at once).
    #[error("{}", .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n"))]
    Many(Vec<EngineError>),
}

impl EngineError {
    /// Each problem on its own (a `Many` flattened).
    pub fn problems(&self) -> Vec<String> {
        match self {
            Self::Many(all) => all.iter().flat_map(|e| e.problems()).collect(),
            other => vec![other.to_string()],
        }
    }
}

#[derive(Debug)]
struct SourceStage {
    name: String,
    topic: String,
    decoder: JsonDecoder,
    mapping: CompiledQuery,
    conformer: Conformer,
}

/// The compiled stages and the window state.
#[derive(Debug)]
pub struct Engine {
    sources: Vec<SourceStage>,
    features: FeatureStage,
    rules: RuleStage,
    aggregates: Arc<Vec<AggregateStage>>,
    decided_schema: SchemaRef,
    watermark: Watermark,
    max_future_ms: i64,
    /// Whether stream events are checked against `max_future` (off for the built-in simulator,
    /// whose events carry its own simulated clock).
    stream_future_check: bool,
    /// Decoder of label messages and their input index (when `labels.enabled`).
    label_input: Option<(usize, JsonDecoder)>,
    /// Where labels of transactions older than the label index are looked up.
    lookup: Option<crate::sink::Sink>,
    /// The fraud model, when `[model]` is configured.
    model: Option<Model>,
    /// Contributions stored per alert (`model.explain_top`).
    explain_top: usize,
    /// Model, rules and explanation times (the feature steps are kept by the feature stage).
    times: StageTimes,
    /// When the state gauges were last counted (see [`STATE_GAUGES_EVERY`]).
    state_gauges_at: Option<Instant>,
    /// Leave the partial aggregates of a batch to the sink stage ([`Engine::defer_aggregates`]).
    defer_aggregates: bool,
    /// The canonical contract: fixed columns and the config's attributes.
    canonical: Arc<Canonical>,
}

/// The window-state gauges (entities, rows kept, evictions) are counted at most this often: a
/// count walks every tracked entity, which at 50,000 entities took milliseconds out of every
/// batch (and held up the scoring requests waiting behind it).
const STATE_GAUGES_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// A batch's finish (partial aggregates, eviction, gauges) taking this long is logged at debug
/// level with its phases: it is not sliced, so scoring requests wait behind it.
const LONG_FINISH: std::time::Duration = std::time::Duration::from_millis(2);

/// Time spent in each step of [`Engine::decide`] since the engine was built (or
/// [`Engine::take_stage_times`] last ran): the benchmark's breakdown of where a row's time goes.
#[derive(Debug, Clone, Copy, Default)]
pub struct StageTimes {
    /// The features' pre query (DataFusion: keys, window arguments).
    pub pre: std::time::Duration,
    /// The incremental window state.
    pub windows: std::time::Duration,
    /// Label features (the index of recent transactions and the label windows).
    pub labels: std::time::Duration,
    /// The features' post query (DataFusion: the user's SELECT over the window results).
    pub post: std::time::Duration,
    /// Model scoring.
    pub model: std::time::Duration,
    /// Rules and decision.
    pub rules: std::time::Duration,
    /// Explanations of alerts.
    pub explain: std::time::Duration,
}

impl StageTimes {
    /// Every step, named, in order.
    pub fn named(&self) -> [(&'static str, std::time::Duration); 7] {
        [
            ("features: pre query (DataFusion)", self.pre),
            ("features: window state", self.windows),
            ("features: label index and windows", self.labels),
            ("features: post query (DataFusion)", self.post),
            ("model scoring", self.model),
            ("rules and decision", self.rules),
            ("alert explanations", self.explain),
        ]
    }
}

/// Column names the engine adds after the features.
pub const SCORE: &str = "score";
/// Model version column.
pub const MODEL_VERSION: &str = "model_version";
/// Decision column.
pub const DECISION: &str = "decision";
/// Rule hits column (JSON array).
pub const RULE_HITS: &str = "rule_hits";
/// Explanation column: for alerts scored by a model, the top contributing features (JSON array of
/// `{feature, value, baseline, contribution}`); NULL otherwise, and for the rows of a scoring
/// request that is not recorded.
pub const EXPLANATION: &str = "explanation";

impl Engine {
    /// Compile every stage of `config`; all problems are reported together.
    pub async fn new(config: &Config) -> Result<Self, EngineError> {
        let mut stages = Vec::new();
        let mut errors = Vec::new();
        let canonical = Canonical::of(config);
        for src in &config.sources {
            match compile_source(config, &canonical, src).await {
                Ok(s) => stages.push(s),
                Err(e) => errors.push(e),
            }
        }
        let e = &config.engine;
        let features = FeatureStage::compile_over(
            &config.resolve(&e.features),
            canonical.schema(),
            &FeatureLimits::of(config),
        )
        .await;
        let mut model = None;
        let (features, rules, aggregates, decided_schema) = match features {
            Err(err) => {
                errors.push(err);
                // Without the feature columns, rules and aggregates cannot be compiled; still
                // check what can be checked of the aggregate files.
                if let Ok(files) = aggregate_files(&config.resolve(&e.aggregates)) {
                    for file in files {
                        if let Err(err) = AggregateStage::lint(&file) {
                            errors.push(err);
                        }
                    }
                }
                (None, None, Vec::new(), None)
            }
            Ok(f) => {
                match crate::model::load_bound(config, &f.feature_schema()) {
                    Ok(m) => model = m,
                    Err(err) => errors.push(err.into()),
                }
                let scored = RuleStage::scored_schema(&canonical.schema(), &f.feature_schema());
                let rules = RuleStage::compile(
                    &config.resolve(&e.rules),
                    scored.clone(),
                    e.review_threshold,
                    e.decline_threshold,
                )
                .await;
                let rules = match rules {
                    Ok(r) => Some(r),
                    Err(err) => {
                        errors.push(err);
                        None
                    }
                };
                let decided = decided_schema(&scored, canonical.len());
                let mut aggs = Vec::new();
                match aggregate_files(&config.resolve(&e.aggregates)) {
                    Ok(files) => {
                        for file in files {
                            match AggregateStage::compile(&file, decided.clone()).await {
                                Ok(a) => aggs.push(a),
                                Err(err) => errors.push(err),
                            }
                        }
                    }
                    Err(err) => errors.push(err),
                }
                (Some(f), rules, aggs, Some(decided))
            }
        };
        if !errors.is_empty() {
            return Err(if errors.len() == 1 {
                errors.pop().expect("one error")
            } else {
                EngineError::Many(errors)
            });
        }
        Ok(Self {
            sources: stages,
            features: features.expect("no errors"),
            rules: rules.expect("no errors"),
            aggregates: Arc::new(aggregates),
            decided_schema: decided_schema.expect("no errors"),
            watermark: Watermark::new(e.lateness_ms(), e.idle_partition_ms()),
            max_future_ms: e.max_future_ms(),
            stream_future_check: true,
            label_input: match config.label_input() {
                Some(i) => Some((
                    i,
                    JsonDecoder::new(
                        &labels::label_source(&config.labels.topic),
                        config.kafka.max_message_bytes,
                    )?,
                )),
                None => None,
            },
            lookup: None,
            state_gauges_at: None,
            defer_aggregates: false,
            canonical,
            model,
            explain_top: config.model.as_ref().map_or(0, |m| m.explain_top),
            times: StageTimes::default(),
        })
    }

    /// With `yes`, [`Engine::finish`] leaves the partial aggregates to be computed by the sink
    /// stage ([`SinkBatch::aggregates_pending`]): they depend on the decided rows alone, and
    /// computing them here (three DataFusion executions, milliseconds a batch) held up the
    /// scoring requests waiting for the engine.
    pub fn defer_aggregates(&mut self, yes: bool) {
        self.defer_aggregates = yes;
    }

    /// Check stream events against `engine.max_future` (the default) or not. The built-in
    /// simulator stamps its events with its own clock, which runs thousands of times faster than
    /// the wall clock in the demo (2,000 transactions/s from 20,000 customers): checked, its
    /// events would all be dead-lettered once that clock passed the wall clock. Scoring requests
    /// of the HTTP API are always checked.
    pub fn check_stream_future(&mut self, yes: bool) {
        self.stream_future_check = yes;
    }

    /// The canonical contract (fixed columns, then the declared attributes): the columns of a
    /// decided row before its features.
    pub fn canonical(&self) -> &Arc<Canonical> {
        &self.canonical
    }

    /// Look labelled transactions that left the label index up in `sink` (the database).
    pub fn set_label_lookup(&mut self, sink: crate::sink::Sink) {
        self.lookup = Some(sink);
    }

    /// Whether `features.sql` reads label feedback (`fraud_labels(*)`, `known_labels(*)`).
    pub fn reads_labels(&self) -> bool {
        self.features.reads_labels()
    }

    /// Label statistics.
    pub fn label_stats(&self) -> labels::LabelStats {
        self.features.label_stats()
    }

    /// Add label feedback (schema [`labels::label_schema`]): attributed before the next rows'
    /// features, counted only by rows at or after each label's `reported_at`. Labels whose
    /// transaction is no longer indexed are looked up through [`Engine::set_label_lookup`].
    pub async fn add_labels(
        &mut self,
        labels: &RecordBatch,
        batch_ids: Option<&StringArray>,
    ) -> Result<(), EngineError> {
        self.features.queue_labels(labels)?;
        let missing = self.features.unresolved_labels(batch_ids);
        if missing.is_empty() {
            return Ok(());
        }
        if let Some(sink) = &self.lookup {
            match sink.lookup_canonical(&self.canonical, &missing).await {
                Ok(rows) => self.features.index_transactions(&rows).await?,
                // The labels are stored anyway; only their feature effect is lost.
                Err(e) => tracing::warn!(error = %e, labels = missing.len(),
                    "looking up labelled transactions failed; these labels are not attributed"),
            }
        }
        Ok(())
    }

    /// Decode label messages: valid labels, and dead letters for the rest.
    fn decode_labels(
        &self,
        decoder: &JsonDecoder,
        msgs: &[crate::decode::RawMessage],
    ) -> Result<(RecordBatch, Vec<DeadLetter>), EngineError> {
        let decoded = decoder.decode(msgs)?;
        let mut dead = decoded.dead_letters;
        let b = decoded.batch;
        let schema = labels::label_schema();
        let file = PathBuf::from("<labels>");
        let arrow = |source| EngineError::Arrow {
            file: file.clone(),
            source,
        };
        let kinds = b
            .column_by_name("label")
            .and_then(|c| c.as_any().downcast_ref::<StringArray>())
            .cloned();
        let parts = b
            .column_by_name(crate::decode::PARTITION_COLUMN)
            .and_then(|c| c.as_any().downcast_ref::<Int32Array>())
            .cloned();
        let offsets = b
            .column_by_name(crate::decode::OFFSET_COLUMN)
            .and_then(|c| {
                c.as_any()
                    .downcast_ref::<datafusion::arrow::array::Int64Array>()
            })
            .cloned();
        let mut keep = Vec::with_capacity(b.num_rows());
        for r in 0..b.num_rows() {
            let value = kinds.as_ref().filter(|k| !k.is_null(r)).map(|k| k.value(r));
            let ok = value.and_then(labels::is_fraud).is_some();
            if !ok {
                let (p, o) = (
                    parts.as_ref().map_or(-1, |p| p.value(r)),
                    offsets.as_ref().map_or(-1, |o| o.value(r)),
                );
                let raw = msgs
                    .iter()
                    .find(|m| m.partition == p && m.offset == o)
                    .and_then(|m| m.value.clone())
                    .unwrap_or_default();
                dead.push(DeadLetter {
                    source: labels::LABEL_SOURCE.into(),
                    topic: decoder.topic().to_string(),
                    partition: p,
                    offset: o,
                    raw,
                    reason: format!(
                        "label {:?} is neither \"fraud\" nor \"genuine\"",
                        value.unwrap_or("")
                    ),
                });
            }
            keep.push(ok);
        }
        let keep = datafusion::arrow::array::BooleanArray::from(keep);
        let kept = datafusion::arrow::compute::filter_record_batch(&b, &keep).map_err(arrow)?;
        let columns = schema
            .fields()
            .iter()
            .map(|f| {
                let c = kept.column_by_name(f.name()).expect("label field decoded");
                datafusion::arrow::compute::cast(c, f.data_type())
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(arrow)?;
        let out = RecordBatch::try_new(schema, columns).map_err(arrow)?;
        Ok((out, dead))
    }

    /// Compile the SQL files again and, if all compile, swap them in (keeping the window state
    /// when the windows are unchanged). On error the running version stays and the error is
    /// returned.
    pub async fn reload(&mut self, config: &Config) -> Result<bool, EngineError> {
        let mut fresh = Engine::new(config).await?;
        let old_features = std::mem::replace(&mut self.features, fresh.features);
        let kept = {
            let f = &mut self.features;
            f.adopt_state(old_features)
        };
        self.sources = std::mem::take(&mut fresh.sources);
        self.rules = fresh.rules;
        self.aggregates = fresh.aggregates;
        self.decided_schema = fresh.decided_schema;
        self.model = fresh.model.take();
        self.explain_top = fresh.explain_top;
        Ok(kept)
    }

    /// The aggregate stages (their tables are created by the sink).
    pub fn aggregates(&self) -> Arc<Vec<AggregateStage>> {
        self.aggregates.clone()
    }

    /// Schema of the decided rows.
    pub fn decided_schema(&self) -> SchemaRef {
        self.decided_schema.clone()
    }

    /// Feature columns.
    pub fn feature_schema(&self) -> SchemaRef {
        self.features.feature_schema()
    }

    /// The model's version, when a model is loaded.
    pub fn model_version(&self) -> Option<&str> {
        self.model.as_ref().map(|m| m.meta().version.as_str())
    }

    /// The loaded model (the benchmark scores with it).
    pub fn model_mut(&mut self) -> Option<&mut Model> {
        self.model.as_mut()
    }

    /// The current watermark (epoch ms).
    pub fn watermark(&self) -> i64 {
        self.watermark.get()
    }

    /// Window state statistics.
    pub fn state_stats(&self) -> state::StateStats {
        self.features.stats()
    }

    /// The longest row-history frame of `features.sql` in milliseconds (`lag` reaches back
    /// `engine.history`); 0 without row-history windows.
    pub fn longest_frame_ms(&self) -> i64 {
        self.features.longest_frame_ms()
    }

    /// Rebuild the window state from earlier transactions: canonical rows in event-time order,
    /// chunk after chunk (read back from the database at start, so that a restart does not reset
    /// the entities' history). Only the window state and the label index change: no feature,
    /// score, rule, aggregate or sink row is computed, queued labels stay queued, and the
    /// watermark is left to the live events. Idle entities are evicted as the stream would.
    pub async fn warm_state(&mut self, canonical: &RecordBatch) -> Result<(), EngineError> {
        self.features.warm(canonical).await?;
        if let Some(newest) = event_times(canonical).iter().flatten().max() {
            self.features
                .evict(newest.saturating_sub(self.watermark.lateness_ms()));
        }
        Ok(())
    }

    /// Labels that arrive outside a batch (`POST /v1/labels`): queued, looked up when their
    /// transaction is no longer indexed, and attributed at once, so that the next batch and
    /// online evaluations (`POST /v1/score`) see them.
    pub async fn receive_labels(&mut self, labels: &RecordBatch) -> Result<(), EngineError> {
        self.add_labels(labels, None).await?;
        self.features.resolve_labels();
        Ok(())
    }

    /// The time spent per step since the last call (or since the engine was built), and start
    /// counting again.
    pub fn take_stage_times(&mut self) -> StageTimes {
        let f = std::mem::take(&mut self.features.times);
        let e = std::mem::take(&mut self.times);
        StageTimes {
            pre: f.pre,
            windows: f.windows,
            labels: f.labels,
            post: f.post,
            model: e.model,
            rules: e.rules,
            explain: e.explain,
        }
    }

    /// Process one micro-batch: [`Engine::begin`], [`Engine::step`] over all its rows,
    /// [`Engine::finish`].
    pub async fn process(
        &mut self,
        batch: Batch,
        metrics: &Metrics,
    ) -> Result<SinkBatch, EngineError> {
        let mut f = self.begin(batch, metrics).await?;
        while f.remaining() > 0 {
            self.step(&mut f, usize::MAX).await?;
        }
        self.finish(f, metrics).await
    }

    /// Start a micro-batch: decode and map its messages, take its labels, advance the
    /// watermark. Its transactions are then decided by [`Engine::step`], in slices if wanted:
    /// between two slices the engine may serve other work (scoring requests), which sees the
    /// window state as of the rows decided so far. Slicing does not change any result: a row
    /// sees the rows that came before it, whatever the cut (the batch-boundary invariance).
    /// [`Engine::open`], [`Engine::decode`] and [`Engine::opened`] do the same in chunks.
    pub async fn begin(
        &mut self,
        batch: Batch,
        metrics: &Metrics,
    ) -> Result<InFlight, EngineError> {
        let mut o = self.open(batch);
        while o.pending() > 0 {
            self.decode(&mut o, usize::MAX).await?;
        }
        self.opened(o, metrics).await
    }

    /// Open a micro-batch for decoding in chunks ([`Engine::decode`]); nothing is decoded yet.
    pub fn open(&self, batch: Batch) -> Opening {
        Opening {
            seq: batch.seq,
            messages: batch.len(),
            pending: batch.len(),
            raw: batch.messages,
            source: 0,
            at: 0,
            canonical: Vec::new(),
            dead_letters: Vec::new(),
            label_batches: Vec::new(),
            offsets: batch.offsets,
            opened_at: batch.opened_at,
            now: Instant::now(),
            wall_ms: chrono::Utc::now().timestamp_millis(),
            watermark_before: self.watermark.get(),
            decode_time: Duration::ZERO,
        }
    }

    /// Decode and map the next (at most) `max_messages` messages of an opened batch. Between
    /// two chunks the engine may serve other work: nothing is decided, and no state but the
    /// watermark's observations changes, until [`Engine::opened`].
    pub async fn decode(
        &mut self,
        o: &mut Opening,
        max_messages: usize,
    ) -> Result<(), EngineError> {
        while o.source < o.raw.len() && o.at >= o.raw[o.source].len() {
            o.source += 1;
            o.at = 0;
        }
        let Some(all) = o.raw.get(o.source) else {
            return Ok(());
        };
        let started = Instant::now();
        let end = all.len().min(o.at.saturating_add(max_messages.max(1)));
        let msgs = &all[o.at..end];
        let source_idx = o.source;
        if let Some((_, decoder)) = self.label_input.as_ref().filter(|l| l.0 == source_idx) {
            let (labels, dead) = self.decode_labels(decoder, msgs)?;
            o.dead_letters.extend(dead);
            if labels.num_rows() > 0 {
                o.label_batches.push(labels);
            }
        } else {
            let (rows, dead) = self
                .canonicalize(source_idx, msgs, o.wall_ms, o.now)
                .await?;
            o.canonical.extend(rows);
            o.dead_letters.extend(dead);
        }
        o.pending -= end - o.at;
        o.at = end;
        o.decode_time += started.elapsed();
        Ok(())
    }

    /// End the decoding of a batch (every message decoded): take its labels, advance the
    /// watermark; its transactions are then decided by [`Engine::step`].
    pub async fn opened(&mut self, o: Opening, metrics: &Metrics) -> Result<InFlight, EngineError> {
        debug_assert_eq!(o.pending, 0, "opened before every message was decoded");
        metrics.decode_time.observe(o.decode_time.as_secs_f64());
        let watermark = self.watermark.advance(o.now);
        let schema = self.canonical.schema();
        let canonical =
            concat_batches(&schema, &o.canonical).map_err(|source| EngineError::Arrow {
                file: PathBuf::from("<canonical>"),
                source,
            })?;
        let labels = if o.label_batches.is_empty() {
            None
        } else {
            let all =
                concat_batches(&labels::label_schema(), &o.label_batches).map_err(|source| {
                    EngineError::Arrow {
                        file: PathBuf::from("<labels>"),
                        source,
                    }
                })?;
            let ids = canonical.column(0).as_any().downcast_ref::<StringArray>();
            self.add_labels(&all, ids).await?;
            metrics.labels_in.add(all.num_rows() as u64);
            Some(all)
        };
        if canonical.num_rows() > 0 {
            let late = count_before(&canonical, o.watermark_before);
            metrics.late_events.add(late as u64);
        }
        Ok(InFlight {
            seq: o.seq,
            messages: o.messages,
            canonical,
            at: 0,
            decided: Vec::new(),
            dead_letters: o.dead_letters,
            labels,
            offsets: o.offsets,
            opened_at: o.opened_at,
            watermark,
        })
    }

    /// Decide the next (at most) `max_rows` transactions of a batch begun with
    /// [`Engine::begin`].
    pub async fn step(&mut self, f: &mut InFlight, max_rows: usize) -> Result<(), EngineError> {
        let n = f.remaining().min(max_rows.max(1));
        if n == 0 {
            return Ok(());
        }
        let decided = self.decide(&f.canonical.slice(f.at, n)).await?;
        f.decided.push(decided);
        f.at += n;
        Ok(())
    }

    /// End a batch whose transactions are all decided: its partial aggregates, eviction of idle
    /// entities, the state metrics; the result for the sink.
    pub async fn finish(
        &mut self,
        f: InFlight,
        metrics: &Metrics,
    ) -> Result<SinkBatch, EngineError> {
        debug_assert_eq!(f.remaining(), 0, "finish before every row was decided");
        let started = Instant::now();
        let mut transactions = Vec::new();
        if !f.decided.is_empty() {
            let decided = if f.decided.len() == 1 {
                f.decided.into_iter().next().expect("one")
            } else {
                concat_batches(&f.decided[0].schema(), &f.decided).map_err(|source| {
                    EngineError::Arrow {
                        file: PathBuf::from("<decided>"),
                        source,
                    }
                })?
            };
            transactions.push(decided);
        }
        let rows = f.canonical.num_rows();
        let watermark = f.watermark;
        let mut out = SinkBatch {
            seq: f.seq,
            messages: f.messages,
            aggregates_pending: !transactions.is_empty(),
            transactions,
            aggregates: Vec::new(),
            aggregate_stages: self.aggregates.clone(),
            dead_letters: f.dead_letters,
            labels: f.labels,
            offsets: f.offsets,
            opened_at: f.opened_at,
        };
        if !self.defer_aggregates {
            out.compute_aggregates().await?;
        }
        let aggregated = started.elapsed();
        self.features.evict(watermark);
        let evicted = started.elapsed();
        if self
            .state_gauges_at
            .is_none_or(|t| t.elapsed() >= STATE_GAUGES_EVERY)
        {
            self.state_gauges_at = Some(Instant::now());
            let st = self.features.stats();
            metrics.tracked_entities.set(st.entities as f64);
            metrics.tracked_rows.set(st.rows as f64);
            metrics
                .entities_evicted
                .set((st.evicted_idle + st.evicted_budget) as f64);
        }
        metrics.watermark_ms.set(watermark as f64);
        // Work of a batch that is not sliced: scoring requests wait behind it.
        if started.elapsed() >= LONG_FINISH {
            tracing::debug!(
                rows,
                aggregates = ?aggregated,
                evict = ?(evicted - aggregated),
                gauges = ?(started.elapsed() - evicted),
                "long batch finish"
            );
        }
        Ok(out)
    }

    /// Decode and map one source's messages into canonical rows (and dead letters), updating the
    /// watermark. `wall_ms` is the wall clock used to refuse events from the future.
    pub async fn canonicalize(
        &mut self,
        source_idx: usize,
        msgs: &[crate::decode::RawMessage],
        wall_ms: i64,
        now: Instant,
    ) -> Result<(Vec<RecordBatch>, Vec<DeadLetter>), EngineError> {
        let stage = &self.sources[source_idx];
        let mut canonical = Vec::new();
        let mut dead_letters = Vec::new();
        let decoded = stage.decoder.decode(msgs)?;
        dead_letters.extend(decoded.dead_letters);
        if decoded.batch.num_rows() == 0 {
            return Ok((canonical, dead_letters));
        }
        let mapped = stage.mapping.execute(vec![decoded.batch]).await?;
        for b in mapped {
            if b.num_rows() == 0 {
                continue;
            }
            let conformed = stage
                .conformer
                .conform(&b)
                .map_err(|source| EngineError::Arrow {
                    file: stage.mapping.file().to_path_buf(),
                    source,
                })?;
            for r in conformed.rejected {
                dead_letters.push(dead_letter_of(
                    stage,
                    msgs,
                    r.partition,
                    r.offset,
                    r.row,
                    r.reason,
                ));
            }
            let rows = conformed.rows;
            if rows.num_rows() == 0 {
                continue;
            }
            let limit = if self.stream_future_check {
                wall_ms.saturating_add(self.max_future_ms)
            } else {
                i64::MAX
            };
            let (rows, future) = split_future(
                &rows,
                limit,
                conformed.partitions.as_ref(),
                conformed.offsets.as_ref(),
            )
            .map_err(|source| EngineError::Arrow {
                file: stage.mapping.file().to_path_buf(),
                source,
            })?;
            for (partition, offset, row, reason) in future {
                dead_letters.push(dead_letter_of(stage, msgs, partition, offset, row, reason));
            }
            observe_watermark(
                &mut self.watermark,
                source_idx,
                &rows.0,
                rows.1.as_ref(),
                now,
            );
            if rows.0.num_rows() > 0 {
                canonical.push(rows.0);
            }
        }

        Ok((canonical, dead_letters))
    }

    /// Features, score, rules and decision for canonical rows: the decided batch.
    pub async fn decide(&mut self, canonical: &RecordBatch) -> Result<RecordBatch, EngineError> {
        let features = self.features.process(canonical).await?;
        let n = canonical.num_rows();
        let mut columns: Vec<ArrayRef> = canonical.columns().to_vec();
        columns.extend(features.columns().iter().cloned());
        // The model stage fills these; without a model the score is NULL.
        let model_file = |m: &Model| m.path().to_path_buf();
        let started = Instant::now();
        let scores = match &mut self.model {
            Some(m) => {
                let s = m.score(&features)?;
                columns.push(Arc::new(Float64Array::from_iter_values(
                    s.iter().map(|&v| v as f64),
                )));
                columns.push(Arc::new(StringArray::from(vec![
                    m.meta().version.as_str();
                    n
                ])));
                Some(s)
            }
            None => {
                columns.push(Arc::new(Float64Array::new_null(n)));
                columns.push(new_null_array(&DataType::Utf8, n));
                None
            }
        };
        let scored_schema = RuleStage::scored_schema(&self.canonical.schema(), &features.schema());
        let scored = RecordBatch::try_new(scored_schema, columns.clone()).map_err(|source| {
            EngineError::Arrow {
                file: self.features.file().clone(),
                source,
            }
        })?;
        self.times.model += started.elapsed();
        let started = Instant::now();
        let decided = self.rules.decide(&scored).await?;
        self.times.rules += started.elapsed();
        let started = Instant::now();
        // Explanations for the alerts (review or decline) of a model-scored batch; not for a
        // scoring request that is not recorded: they are stored with the alerts, and its rows
        // are not (the API does not return them). They cost one more ONNX call.
        let explanation: ArrayRef = match (&mut self.model, &scores) {
            (Some(m), Some(s)) if self.explain_top > 0 && !self.features.peeking() => {
                let d = decided
                    .decision
                    .as_any()
                    .downcast_ref::<StringArray>()
                    .expect("decision is Utf8");
                let alerts: Vec<usize> = (0..n).filter(|&i| d.value(i) != "approve").collect();
                let why = m.explain(&features, &alerts, s, self.explain_top)?;
                let mut text: Vec<Option<String>> = vec![None; n];
                for (i, c) in alerts.iter().zip(why) {
                    text[*i] = Some(serde_json::to_string(&c).map_err(|e| {
                        crate::model::ModelError::Tensor {
                            path: model_file(m),
                            message: e.to_string(),
                        }
                    })?);
                }
                Arc::new(StringArray::from(text))
            }
            _ => new_null_array(&DataType::Utf8, n),
        };
        self.times.explain += started.elapsed();
        columns.push(decided.decision);
        columns.push(decided.rule_hits);
        columns.push(explanation);
        RecordBatch::try_new(self.decided_schema.clone(), columns).map_err(|source| {
            EngineError::Arrow {
                file: self.features.file().clone(),
                source,
            }
        })
    }
}

fn decided_schema(scored: &SchemaRef, canonical_width: usize) -> SchemaRef {
    let mut fields: Vec<Field> = scored.fields().iter().map(|f| f.as_ref().clone()).collect();
    fields.push(Field::new(DECISION, DataType::Utf8, false));
    fields.push(Field::new(RULE_HITS, DataType::Utf8, false));
    fields.push(Field::new(EXPLANATION, DataType::Utf8, true));
    Arc::new(canonical::with_width(Schema::new(fields), canonical_width))
}

async fn compile_source(
    config: &Config,
    canonical: &Canonical,
    src: &crate::config::SourceConfig,
) -> Result<SourceStage, EngineError> {
    let decoder = JsonDecoder::new(src, config.kafka.max_message_bytes)?;
    let file = config.resolve(&src.mapping);
    let mapping = CompiledQuery::compile_file(&file, "input", decoder.output_schema()).await?;
    let conformer =
        Conformer::new(canonical, &mapping.schema()).map_err(|message| EngineError::Contract {
            file: file.clone(),
            message: format!("result does not match the canonical transaction: {message}"),
        })?;
    Ok(SourceStage {
        name: src.name.clone(),
        topic: src.topic.clone(),
        decoder,
        mapping,
        conformer,
    })
}

/// The `*.sql` files of the aggregates directory, sorted.
fn aggregate_files(dir: &std::path::Path) -> Result<Vec<PathBuf>, EngineError> {
    let rd = std::fs::read_dir(dir).map_err(|source| EngineError::Io {
        dir: dir.to_path_buf(),
        source,
    })?;
    let mut files: Vec<PathBuf> = rd
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "sql"))
        .collect();
    files.sort();
    Ok(files)
}

fn dead_letter_of(
    stage: &SourceStage,
    msgs: &[crate::decode::RawMessage],
    partition: Option<i32>,
    offset: Option<i64>,
    row: Vec<u8>,
    reason: String,
) -> DeadLetter {
    // Keep the original bytes when the mapping passed the position through.
    let raw = partition
        .zip(offset)
        .and_then(|(p, o)| {
            msgs.iter()
                .find(|m| m.partition == p && m.offset == o)
                .and_then(|m| m.value.clone())
        })
        .unwrap_or(row);
    DeadLetter {
        source: stage.name.clone(),
        topic: stage.topic.clone(),
        partition: partition.unwrap_or(-1),
        offset: offset.unwrap_or(-1),
        raw,
        reason,
    }
}

type Future = (Option<i32>, Option<i64>, Vec<u8>, String);

/// Take out rows stamped after `limit_ms` (clock skew or a broken producer).
#[allow(clippy::type_complexity)]
fn split_future(
    rows: &RecordBatch,
    limit_ms: i64,
    partitions: Option<&ArrayRef>,
    offsets: Option<&ArrayRef>,
) -> Result<((RecordBatch, Option<ArrayRef>), Vec<Future>), datafusion::arrow::error::ArrowError> {
    let times = event_times(rows);
    let future: Vec<usize> = (0..rows.num_rows())
        .filter(|&i| !times.is_null(i) && times.value(i) > limit_ms)
        .collect();
    if future.is_empty() {
        return Ok(((rows.clone(), partitions.cloned()), Vec::new()));
    }
    let ids = rows
        .column(0)
        .as_any()
        .downcast_ref::<StringArray>()
        .expect("canonical id");
    let parts = partitions.and_then(|p| p.as_any().downcast_ref::<Int32Array>());
    let offs = offsets.and_then(|o| {
        o.as_any()
            .downcast_ref::<datafusion::arrow::array::Int64Array>()
    });
    let out = future
        .iter()
        .map(|&i| {
            let when = chrono::DateTime::from_timestamp_millis(times.value(i))
                .map(|t| t.to_rfc3339())
                .unwrap_or_default();
            (
                parts.map(|p| p.value(i)),
                offs.map(|o| o.value(i)),
                format!(
                    "{{\"transaction_id\":{:?},\"event_time\":{when:?}}}",
                    ids.value(i)
                )
                .into_bytes(),
                format!("event_time {when} is further in the future than engine.max_future allows"),
            )
        })
        .collect();
    let keep: datafusion::arrow::array::BooleanArray = (0..rows.num_rows())
        .map(|i| Some(!future.contains(&i)))
        .collect();
    let kept = datafusion::arrow::compute::filter_record_batch(rows, &keep)?;
    let kept_parts = partitions
        .map(|p| datafusion::arrow::compute::filter(p, &keep))
        .transpose()?;
    Ok(((kept, kept_parts), out))
}

fn observe_watermark(
    w: &mut Watermark,
    source: usize,
    rows: &RecordBatch,
    partitions: Option<&ArrayRef>,
    now: Instant,
) {
    let times = event_times(rows);
    let parts = partitions.and_then(|p| p.as_any().downcast_ref::<Int32Array>());
    let mut newest: std::collections::HashMap<i32, i64> = std::collections::HashMap::new();
    for i in 0..rows.num_rows() {
        if times.is_null(i) {
            continue;
        }
        let p = parts.map_or(-1, |p| p.value(i));
        let e = newest.entry(p).or_insert(i64::MIN);
        *e = (*e).max(times.value(i));
    }
    for (p, t) in newest {
        w.observe(source, p, t, now);
    }
}

/// The `event_time` column of a canonical batch.
fn event_times(rows: &RecordBatch) -> &TimestampMillisecondArray {
    rows.column(1)
        .as_any()
        .downcast_ref::<TimestampMillisecondArray>()
        .expect("canonical event_time")
}

/// A micro-batch being decoded: between [`Engine::open`] and [`Engine::opened`].
#[derive(Debug)]
pub struct Opening {
    seq: u64,
    /// Messages of the batch.
    messages: usize,
    /// Messages not decoded yet.
    pending: usize,
    /// Messages per source index.
    raw: Vec<Vec<crate::decode::RawMessage>>,
    /// Next message: source index and position.
    source: usize,
    at: usize,
    canonical: Vec<RecordBatch>,
    dead_letters: Vec<DeadLetter>,
    label_batches: Vec<RecordBatch>,
    offsets: Vec<crate::source::OffsetCommit>,
    opened_at: Option<tokio::time::Instant>,
    /// Arrival time and wall clock of the batch (the same for every chunk).
    now: Instant,
    wall_ms: i64,
    watermark_before: i64,
    decode_time: Duration,
}

impl Opening {
    /// Messages not decoded yet.
    pub fn pending(&self) -> usize {
        self.pending
    }
}

/// A micro-batch between [`Engine::begin`] and [`Engine::finish`].
#[derive(Debug)]
pub struct InFlight {
    seq: u64,
    messages: usize,
    canonical: RecordBatch,
    /// Rows of `canonical` decided so far.
    at: usize,
    decided: Vec<RecordBatch>,
    dead_letters: Vec<DeadLetter>,
    labels: Option<RecordBatch>,
    offsets: Vec<crate::source::OffsetCommit>,
    opened_at: Option<tokio::time::Instant>,
    watermark: i64,
}

impl InFlight {
    /// Transactions not decided yet.
    pub fn remaining(&self) -> usize {
        self.canonical.num_rows() - self.at
    }
}

fn count_before(canonical: &RecordBatch, watermark: i64) -> usize {
    let times = event_times(canonical);
    (0..times.len())
        .filter(|&i| !times.is_null(i) && times.value(i) < watermark)
        .count()
}

/// `batch` with `extra` columns appended (their fields and arrays), for the stages that widen
/// a batch: window columns, the sink's `commit_seq` and alert features, replay's labels. The
/// schema keeps its metadata ([`canonical::width`]).
pub fn with_columns(
    batch: &RecordBatch,
    extra: impl IntoIterator<Item = (Field, ArrayRef)>,
) -> Result<RecordBatch, datafusion::arrow::error::ArrowError> {
    let mut fields: Vec<_> = batch.schema().fields().iter().cloned().collect();
    let mut columns = batch.columns().to_vec();
    for (field, array) in extra {
        fields.push(Arc::new(field));
        columns.push(array);
    }
    let metadata = batch.schema().metadata().clone();
    RecordBatch::try_new(
        Arc::new(Schema::new_with_metadata(fields, metadata)),
        columns,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::RawMessage;
    use std::path::Path;

    #[tokio::test]
    async fn shipped_card_mapping_yields_canonical_rows() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
        let config = crate::config::load(&dir.join("config.toml")).unwrap();
        let mut engine = Engine::new(&config).await.unwrap();
        let metrics = Metrics::default();
        let msg = |offset: i64, v: &str| RawMessage {
            partition: 1,
            offset,
            key: None,
            value: Some(v.as_bytes().to_vec()),
            timestamp_ms: 0,
        };
        let batch = Batch {
            seq: 1,
            messages: vec![vec![
                msg(
                    0,
                    r#"{"auth_id":"a1","ts":"2026-11-01T10:00:00.250Z","pan_token":"tok_1","customer_ref":"cus_1","merchant_id":"mer_1","terminal_id":"ter_1_0","mcc":"5411","amount":"12.30","currency":"brl","country":"br","entry_mode":"chip","lat":-23.5,"lon":-46.6,"is_fraud":false}"#,
                ),
                msg(
                    1,
                    r#"{"auth_id":"a2","ts":"2026-11-01T10:00:01Z","pan_token":"tok_2","merchant_id":"mer_2","amount":7,"currency":"USD","entry_mode":"ecommerce"}"#,
                ),
                msg(2, r#"{"auth_id":"a3""#),
            ]],
            offsets: vec![],
            opened_at: None,
        };
        let out = engine.process(batch, &metrics).await.unwrap();
        assert_eq!(out.messages, 3);
        let canonical_part: Vec<usize> = (0..canonical::COLUMNS.len()).collect();
        let canon: Vec<RecordBatch> = out
            .transactions
            .iter()
            .map(|b| b.project(&canonical_part).unwrap())
            .collect();
        datafusion::assert_batches_eq!(
            [
                "+----------------+--------------------------+--------+--------+----------+-------------+------------+---------+-------------+-------------+------+---------+-----------+-----------+------------+----------+-----------+",
                "| transaction_id | event_time               | source | amount | currency | customer_id | account_id | card_id | merchant_id | terminal_id | mcc  | country | channel   | device_id | ip_address | latitude | longitude |",
                "+----------------+--------------------------+--------+--------+----------+-------------+------------+---------+-------------+-------------+------+---------+-----------+-----------+------------+----------+-----------+",
                "| a1             | 2026-11-01T10:00:00.250Z | card   | 12.30  | BRL      | cus_1       |            | tok_1   | mer_1       | ter_1_0     | 5411 | BR      | pos       |           |            | -23.5    | -46.6     |",
                "| a2             | 2026-11-01T10:00:01Z     | card   | 7.00   | USD      |             |            | tok_2   | mer_2       |             |      |         | ecommerce |           |            |          |           |",
                "+----------------+--------------------------+--------+--------+----------+-------------+------------+---------+-------------+-------------+------+---------+-----------+-----------+------------+----------+-----------+",
            ],
            &canon
        );
        assert_eq!(out.dead_letters.len(), 1);
        assert_eq!(out.dead_letters[0].offset, 2);
        assert_eq!(out.dead_letters[0].partition, 1);
    }

    #[tokio::test]
    async fn a_batch_decided_in_slices_gives_the_results_of_the_whole_batch() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
        let config = crate::config::load(&dir.join("config.toml")).unwrap();
        let metrics = Metrics::default();
        // 300 card transactions over 5 cards, 3 customers and 4 merchants, out of order, and
        // 6 malformed messages among them.
        let mut messages: Vec<RawMessage> = (0..300i64)
            .map(|i| {
                let secs = (i * 37) % 300;
                RawMessage {
                    partition: 0,
                    offset: i,
                    key: None,
                    value: Some(
                        format!(
                            r#"{{"auth_id":"s{i}","ts":"2026-11-01T10:{:02}:{:02}Z","pan_token":"tok_{}","customer_ref":"cus_{}","merchant_id":"mer_{}","amount":"{}.{:02}","currency":"BRL","country":"{}","entry_mode":"ecommerce","lat":-23.5,"lon":-46.6}}"#,
                            secs / 60,
                            secs % 60,
                            i % 5,
                            i % 3,
                            i % 4,
                            1 + i % 97,
                            i % 100,
                            if i % 11 == 0 { "AR" } else { "BR" },
                        )
                        .into_bytes(),
                    ),
                    timestamp_ms: 0,
                }
            })
            .collect();
        for (i, m) in messages.iter_mut().enumerate() {
            if i % 50 == 13 {
                m.value = Some(format!(r#"{{"auth_id":"bad{i}","amount":"#).into_bytes());
            }
        }
        let batch = || Batch {
            seq: 1,
            messages: vec![messages.clone()],
            offsets: vec![],
            opened_at: None,
        };
        let show = |b: &[RecordBatch]| {
            datafusion::arrow::util::pretty::pretty_format_batches(b)
                .unwrap()
                .to_string()
        };
        let mut whole = Engine::new(&config).await.unwrap();
        let expected = whole.process(batch(), &metrics).await.unwrap();
        for slice in [1, 7, 64] {
            let mut sliced = Engine::new(&config).await.unwrap();
            // Decoded in chunks of `slice` messages too.
            let mut o = sliced.open(batch());
            let mut chunks = 0;
            while o.pending() > 0 {
                sliced.decode(&mut o, slice).await.unwrap();
                chunks += 1;
            }
            assert_eq!(chunks, 300usize.div_ceil(slice));
            let mut f = sliced.opened(o, &metrics).await.unwrap();
            let mut steps = 0;
            while f.remaining() > 0 {
                sliced.step(&mut f, slice).await.unwrap();
                steps += 1;
            }
            assert_eq!(steps, 294usize.div_ceil(slice));
            // The pipeline's engine leaves the aggregates to the sink stage.
            sliced.defer_aggregates(slice == 64);
            let mut got = sliced.finish(f, &metrics).await.unwrap();
            assert_eq!(got.aggregates_pending, slice == 64);
            if got.aggregates_pending {
                assert!(got.aggregates.is_empty());
                got.compute_aggregates().await.unwrap();
            }
            assert_eq!(got.aggregates.len(), expected.aggregates.len());
            assert!(!expected.aggregates.is_empty());
            let dead = |b: &SinkBatch| -> Vec<(i64, String)> {
                b.dead_letters
                    .iter()
                    .map(|d| (d.offset, d.reason.clone()))
                    .collect()
            };
            assert_eq!(expected.dead_letters.len(), 6);
            assert_eq!(dead(&got), dead(&expected), "dead letters, slice {slice}");
            assert_eq!(got.messages, 300);
            assert_eq!(
                got.transactions.len(),
                1,
                "slices are joined into one batch"
            );
            assert_eq!(
                show(&got.transactions),
                show(&expected.transactions),
                "slice {slice}"
            );
            for ((n1, a), (n2, b)) in got.aggregates.iter().zip(&expected.aggregates) {
                assert_eq!(n1, n2);
                let mut a: Vec<String> = show(a).lines().map(str::to_string).collect();
                let mut b: Vec<String> = show(b).lines().map(str::to_string).collect();
                a.sort();
                b.sort();
                assert_eq!(a, b, "aggregate {n1}, slice {slice}");
            }
        }
    }

    #[tokio::test]
    async fn warm_state_from_stored_rows_continues_the_entity_history() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut config = crate::config::load(&dir.join("config.toml")).unwrap();
        config.model = None;
        let metrics = Metrics::default();
        let msg = |i: i64| {
            RawMessage {
            partition: 0,
            offset: i,
            key: None,
            value: Some(
                format!(
                    r#"{{"auth_id":"w{i}","ts":"2026-11-01T10:0{i}:00Z","pan_token":"tok_w","customer_ref":"cus_w","merchant_id":"mer_{i}","amount":"{i}.50","currency":"BRL","country":"BR","entry_mode":"ecommerce","lat":-23.{i},"lon":-46.6}}"#
                )
                .into_bytes(),
            ),
            timestamp_ms: 0,
        }
        };
        let batch = |seq: u64, range: std::ops::Range<i64>| Batch {
            seq,
            messages: vec![range.map(msg).collect()],
            offsets: vec![],
            opened_at: None,
        };
        // The uninterrupted run.
        let mut live = Engine::new(&config).await.unwrap();
        let first = live.process(batch(1, 0..4), &metrics).await.unwrap();
        let stored: Vec<usize> = (0..live.canonical().len()).collect();
        let stored = first.transactions[0].project(&stored).unwrap();
        // A restart that rebuilds the state from the stored rows, in two chunks.
        let mut restarted = Engine::new(&config).await.unwrap();
        assert_eq!(restarted.longest_frame_ms(), config.engine.history_ms());
        restarted.warm_state(&stored.slice(0, 2)).await.unwrap();
        restarted.warm_state(&stored.slice(2, 2)).await.unwrap();
        assert_eq!(restarted.state_stats(), live.state_stats());
        // A restart that does not.
        let mut cold = Engine::new(&config).await.unwrap();

        let a = live.process(batch(2, 4..5), &metrics).await.unwrap();
        let b = restarted.process(batch(2, 4..5), &metrics).await.unwrap();
        let c = cold.process(batch(2, 4..5), &metrics).await.unwrap();
        let (a, b, c) = (&a.transactions[0], &b.transactions[0], &c.transactions[0]);
        assert_eq!(
            a, b,
            "the rebuilt state gives the uninterrupted run's features"
        );
        let count = |x: &RecordBatch, name: &str| {
            x.column_by_name(name)
                .unwrap()
                .as_any()
                .downcast_ref::<datafusion::arrow::array::Int64Array>()
                .unwrap()
                .value(0)
        };
        assert_eq!(count(b, "card_tx_24h"), 5);
        assert_eq!(count(b, "card_merchants_1h"), 5);
        assert_eq!(
            count(c, "card_tx_24h"),
            1,
            "without the rebuild the card starts again"
        );
        assert_ne!(a, c);
    }

    #[tokio::test]
    async fn card_testing_burst_is_featured_ruled_and_aggregated() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut config = crate::config::load(&dir.join("config.toml")).unwrap();
        // The rules alone decide here (the model's scores are tested in tests/model.rs).
        config.model = None;
        let mut engine = Engine::new(&config).await.unwrap();
        let metrics = Metrics::default();
        let msgs: Vec<RawMessage> = (0..5)
            .map(|i| RawMessage {
                partition: 0,
                offset: i,
                key: None,
                value: Some(
                    format!(
                        r#"{{"auth_id":"t{i}","ts":"2026-11-01T10:0{i}:00Z","pan_token":"tok_9","customer_ref":"cus_9","merchant_id":"mer_{i}","amount":"1.{i}0","currency":"BRL","entry_mode":"ecommerce"}}"#
                    )
                    .into_bytes(),
                ),
                timestamp_ms: 0,
            })
            .collect();
        let batch = Batch {
            seq: 1,
            messages: vec![msgs],
            offsets: vec![],
            opened_at: None,
        };
        let out = engine.process(batch, &metrics).await.unwrap();
        let b = &out.transactions[0];
        let cols: Vec<usize> = [
            "transaction_id",
            "card_tx_10m",
            "card_merchants_1h",
            "card_secs_since_prev",
            "decision",
        ]
        .iter()
        .map(|c| b.schema().index_of(c).unwrap())
        .collect();
        datafusion::assert_batches_eq!(
            [
                "+----------------+-------------+-------------------+----------------------+----------+",
                "| transaction_id | card_tx_10m | card_merchants_1h | card_secs_since_prev | decision |",
                "+----------------+-------------+-------------------+----------------------+----------+",
                "| t0             | 1           | 1                 | -1.0                 | approve  |",
                "| t1             | 2           | 2                 | 60.0                 | approve  |",
                "| t2             | 3           | 3                 | 60.0                 | approve  |",
                "| t3             | 4           | 4                 | 60.0                 | review   |",
                "| t4             | 5           | 5                 | 60.0                 | review   |",
                "+----------------+-------------+-------------------+----------------------+----------+",
            ],
            &[b.project(&cols).unwrap()]
        );
        let hits = b.column_by_name(RULE_HITS).unwrap();
        let hits = hits.as_any().downcast_ref::<StringArray>().unwrap();
        assert!(
            hits.value(4).contains("\"rule\":\"card_testing\""),
            "{}",
            hits.value(4)
        );
        assert_eq!(hits.value(0), "[]");
        let (name, partial) = &out
            .aggregates
            .iter()
            .find(|(n, _)| n == "minute_by_source")
            .unwrap();
        assert_eq!(name, "minute_by_source");
        let rows: usize = partial.iter().map(|b| b.num_rows()).sum();
        assert_eq!(rows, 5, "five minutes, one decision each");
    }
}
