//! The feature stage: `features.sql` compiled into a pre query (keys, arguments), the incremental
//! window operator, and a post query (the user's SELECT with window results as columns).
//!
//! Contract: the result has one row per input transaction, in input order, whose first column is
//! `transaction_id`; the other columns are the features. No feature may reuse a canonical column
//! name (they are joined to the canonical columns for the rules and the sink).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use datafusion::arrow::array::{
    Array, ArrayRef, RecordBatch, StringArray, TimestampMillisecondArray,
};
use datafusion::arrow::compute::concat_batches;
use datafusion::arrow::datatypes::{Field, Schema, SchemaRef};

use super::EngineError;
use super::canonical;
use super::labels::{LabelStats, LabelStore};
use super::sql::CompiledQuery;
use super::state::{self, ArgKind, StateStats, WindowInput, WindowState};
use super::windows::{FeaturePlan, WindowCall};

/// The compiled feature stage with its state.
#[derive(Debug)]
pub struct FeatureStage {
    plan: FeaturePlan,
    pre: CompiledQuery,
    post: CompiledQuery,
    /// Row-history calls (indices into the plan's calls) and the calls themselves.
    hist: Vec<usize>,
    hist_calls: Vec<WindowCall>,
    state: WindowState,
    labels: LabelStore,
    /// Schema of the feature columns (without `transaction_id`).
    features: SchemaRef,
    /// Time spent per step, for the benchmark's breakdown.
    pub(crate) times: super::StageTimes,
}

/// How much state the feature stage may keep.
#[derive(Debug, Clone, Copy)]
pub struct FeatureLimits {
    /// Longest row-history frame (`engine.history`).
    pub history_ms: i64,
    /// Allowed lateness (`engine.allowed_lateness`).
    pub lateness_ms: i64,
    /// Entities per key (`engine.max_entities`).
    pub max_entities: usize,
    /// Longest label frame (`labels.history`).
    pub label_history_ms: i64,
    /// Recent transactions indexed for label attribution (`labels.index_max`).
    pub label_index_max: usize,
}

impl FeatureLimits {
    /// The limits of a configuration.
    pub fn of(config: &crate::config::Config) -> Self {
        Self {
            history_ms: config.engine.history_ms(),
            lateness_ms: config.engine.lateness_ms(),
            max_entities: config.engine.max_entities,
            label_history_ms: config.labels.history_ms(),
            label_index_max: config.labels.index_max,
        }
    }
}

impl FeatureStage {
    /// Compile `file` over the canonical columns without attributes.
    pub async fn compile(file: &Path, limits: &FeatureLimits) -> Result<Self, EngineError> {
        Self::compile_over(file, canonical::schema(), limits).await
    }

    /// Compile `file` over the canonical columns `canonical` (with the declared attributes).
    pub async fn compile_over(
        file: &Path,
        canonical: SchemaRef,
        limits: &FeatureLimits,
    ) -> Result<Self, EngineError> {
        let FeatureLimits {
            history_ms,
            lateness_ms,
            max_entities,
            label_history_ms,
            label_index_max,
        } = *limits;
        let sql = std::fs::read_to_string(file).map_err(|source| {
            EngineError::Sql(super::sql::SqlError::Read {
                file: file.to_path_buf(),
                source,
            })
        })?;
        let plan = FeaturePlan::plan(file, &sql, history_ms, label_history_ms)?;
        let pre =
            CompiledQuery::compile(file, &plan.pre_sql, "transactions", canonical.clone()).await?;
        let pre_schema = pre.schema();
        let mut kinds = Vec::with_capacity(plan.calls.len());
        for (i, call) in plan.calls.iter().enumerate() {
            let kind = match pre_schema.index_of(&format!("__a{i}")) {
                Ok(idx) => {
                    ArgKind::of(pre_schema.field(idx).data_type(), call.func).map_err(|m| {
                        contract(
                            file,
                            format!(
                                "{} OVER (PARTITION BY {}): {m}",
                                describe(call),
                                call.partition
                            ),
                        )
                    })?
                }
                Err(_) => ArgKind::None,
            };
            kinds.push(kind);
        }
        let mut fields: Vec<Field> = canonical
            .fields()
            .iter()
            .map(|f| f.as_ref().clone())
            .collect();
        for (i, (call, kind)) in plan.calls.iter().zip(&kinds).enumerate() {
            fields.push(Field::new(
                format!("__w{i}"),
                state::output_type(call.func, *kind),
                true,
            ));
        }
        let post = CompiledQuery::compile(
            file,
            &plan.post_sql,
            "transactions",
            Arc::new(Schema::new(fields)),
        )
        .await?;
        let out = post.schema();
        if out.fields().is_empty() || out.field(0).name() != "transaction_id" {
            return Err(contract(
                file,
                "the first selected column must be transaction_id".into(),
            ));
        }
        let mut problems = Vec::new();
        for f in out.fields().iter().skip(1) {
            if canonical.index_of(f.name()).is_ok() {
                problems.push(format!(
                    "feature `{}` reuses a canonical column name; give it another alias",
                    f.name()
                ));
            }
            if f.name().starts_with("__") {
                problems.push(format!(
                    "feature `{}`: names starting with __ are reserved",
                    f.name()
                ));
            }
        }
        if !problems.is_empty() {
            return Err(contract(file, problems.join("; ")));
        }
        let features = Arc::new(Schema::new(
            out.fields().iter().skip(1).cloned().collect::<Vec<_>>(),
        ));
        let hist: Vec<usize> = (0..plan.calls.len())
            .filter(|&i| !plan.calls[i].func.is_label())
            .collect();
        let hist_calls: Vec<WindowCall> = hist.iter().map(|&i| plan.calls[i].clone()).collect();
        let state = WindowState::new(
            hist_calls.clone(),
            hist.iter().map(|&i| kinds[i]).collect(),
            &hist.iter().map(|&i| plan.call_key[i]).collect::<Vec<_>>(),
            plan.keys.len(),
            lateness_ms,
            max_entities,
        );
        let labels = LabelStore::new(
            &plan.calls,
            &plan.call_key,
            plan.keys.len(),
            label_index_max,
            lateness_ms,
        );
        Ok(Self {
            plan,
            pre,
            post,
            hist,
            hist_calls,
            state,
            labels,
            features,
            times: Default::default(),
        })
    }

    /// Schema of the feature columns (without `transaction_id`).
    pub fn feature_schema(&self) -> SchemaRef {
        self.features.clone()
    }

    /// The window calls, for deciding whether state can be kept across a reload.
    pub fn calls(&self) -> &[WindowCall] {
        &self.plan.calls
    }

    /// The SQL file.
    pub fn file(&self) -> &PathBuf {
        &self.plan.file
    }

    /// Take over the window state of the previous version when its window calls are the same.
    pub fn adopt_state(&mut self, previous: FeatureStage) -> bool {
        if previous.plan.calls == self.plan.calls && previous.plan.keys == self.plan.keys {
            self.state = previous.state;
            self.labels = previous.labels;
            true
        } else {
            if previous.plan.keys == self.plan.keys {
                self.labels.adopt(previous.labels);
            }
            false
        }
    }

    /// Whether `features.sql` reads label feedback.
    pub fn reads_labels(&self) -> bool {
        self.labels.is_active()
    }

    /// Queue decoded labels; they are attributed before the next batch's features.
    pub fn queue_labels(&mut self, labels: &RecordBatch) -> Result<(), EngineError> {
        self.labels
            .queue(labels)
            .map_err(|source| EngineError::Arrow {
                file: self.plan.file.clone(),
                source,
            })
    }

    /// Ids of queued labels whose transaction is neither indexed nor among `batch_ids`.
    pub fn unresolved_labels(&self, batch_ids: Option<&StringArray>) -> Vec<String> {
        self.labels.unresolved(batch_ids)
    }

    /// Index earlier transactions (canonical rows, e.g. looked up in the database) so queued
    /// labels of theirs can be attributed.
    pub async fn index_transactions(&mut self, canonical: &RecordBatch) -> Result<(), EngineError> {
        if !self.labels.is_active() || canonical.num_rows() == 0 {
            return Ok(());
        }
        let (time, keys, _) = self.pre_columns(canonical).await?;
        self.index_rows(canonical, &time, &keys)
    }

    /// Label statistics.
    pub fn label_stats(&self) -> LabelStats {
        self.labels.stats()
    }

    fn index_rows(
        &mut self,
        canonical: &RecordBatch,
        time: &TimestampMillisecondArray,
        keys: &[ArrayRef],
    ) -> Result<(), EngineError> {
        let ids = canonical
            .column(0)
            .as_any()
            .downcast_ref::<StringArray>()
            .ok_or_else(|| contract(&self.plan.file, "transaction_id is not text".into()))?;
        self.labels
            .index(ids, time, keys)
            .map_err(|source| EngineError::Arrow {
                file: self.plan.file.clone(),
                source,
            })
    }

    /// The pre query's event times, keys and arguments for canonical rows.
    async fn pre_columns(&self, canonical: &RecordBatch) -> Result<PreColumns, EngineError> {
        let file = &self.plan.file;
        let n = canonical.num_rows();
        let pre = self.pre.execute(vec![canonical.clone()]).await?;
        let pre = concat_or_empty(&self.pre.schema(), &pre, file)?;
        if pre.num_rows() != n {
            return Err(contract(
                file,
                format!("pre query returned {} rows for {n}", pre.num_rows()),
            ));
        }
        let time = pre
            .column_by_name("__t")
            .and_then(|c| c.as_any().downcast_ref::<TimestampMillisecondArray>())
            .ok_or_else(|| contract(file, "event_time is not a millisecond timestamp".into()))?
            .clone();
        // Keys as text once here (the window state and the label store read them as `Utf8`).
        let keys: Vec<ArrayRef> = (0..self.plan.keys.len())
            .map(|j| {
                let k = pre.column_by_name(&format!("__k{j}")).expect("planned key");
                state::utf8(k).map(|k| Arc::new(k) as ArrayRef)
            })
            .collect::<Result<_, _>>()
            .map_err(|source| EngineError::Arrow {
                file: file.clone(),
                source,
            })?;
        let args: Vec<Option<ArrayRef>> = (0..self.plan.calls.len())
            .map(|i| pre.column_by_name(&format!("__a{i}")).cloned())
            .collect();
        Ok((time, keys, args))
    }

    /// State statistics.
    pub fn stats(&self) -> StateStats {
        self.state.stats()
    }

    /// The longest row-history frame of `features.sql` (`lag` reaches back `engine.history`), in
    /// milliseconds; 0 without row-history windows.
    pub fn longest_frame_ms(&self) -> i64 {
        self.state.longest_ms()
    }

    /// Replay earlier transactions (canonical rows in event-time order, e.g. read back from the
    /// database at start) into the window state, and into the label index as [`Self::process`]
    /// indexes them, without computing any feature. Queued labels are left queued.
    pub async fn warm(&mut self, canonical: &RecordBatch) -> Result<(), EngineError> {
        if canonical.num_rows() == 0 || (self.hist.is_empty() && !self.labels.is_active()) {
            return Ok(());
        }
        let (time, keys, args) = self.pre_columns(canonical).await?;
        if self.labels.is_active() {
            self.index_rows(canonical, &time, &keys)?;
        }
        self.state
            .record(&WindowInput {
                time: &time,
                keys,
                args: self.hist.iter().map(|&i| args[i].clone()).collect(),
            })
            .map_err(|source| EngineError::Arrow {
                file: self.plan.file.clone(),
                source,
            })
    }

    /// Attribute the queued labels now (normally done before the next batch's features), so
    /// that an online evaluation (which does not change the state) sees them too.
    pub fn resolve_labels(&mut self) {
        if self.labels.is_active() {
            self.labels.resolve();
        }
    }

    /// Evict idle entities given the watermark.
    pub fn evict(&mut self, watermark_ms: i64) {
        self.state.evict(watermark_ms);
        self.labels.evict(watermark_ms);
    }

    /// Compute features for canonical rows (one batch, in arrival order). Returns the feature
    /// columns (without `transaction_id`), row-aligned with the input.
    pub async fn process(&mut self, canonical: &RecordBatch) -> Result<RecordBatch, EngineError> {
        let file = self.plan.file.clone();
        let n = canonical.num_rows();
        let started = std::time::Instant::now();
        let (time, keys, args) = self.pre_columns(canonical).await?;
        self.times.pre += started.elapsed();
        let started = std::time::Instant::now();
        let arrow = |source| EngineError::Arrow {
            file: file.clone(),
            source,
        };
        // Labels first: this batch's transactions are indexed so that labels of theirs in the
        // same batch are attributed; a label only counts for rows at or after its report time.
        if self.labels.is_active() && !self.state.peeking() {
            self.index_rows(canonical, &time, &keys)?;
            self.labels.resolve();
        }
        self.times.labels += started.elapsed();
        let started = std::time::Instant::now();
        let mut hist = self
            .state
            .process(&WindowInput {
                time: &time,
                keys: keys.clone(),
                args: self.hist.iter().map(|&i| args[i].clone()).collect(),
            })
            .map_err(arrow)?;
        state::rescale_averages(&mut hist, &self.hist_calls, self.state.kinds()).map_err(arrow)?;
        self.times.windows += started.elapsed();
        let started = std::time::Instant::now();
        let labelled = self.labels.evaluate(&time, &keys).map_err(arrow)?;
        self.times.labels += started.elapsed();
        let started = std::time::Instant::now();
        let mut slots: Vec<Option<ArrayRef>> = vec![None; self.plan.calls.len()];
        for (&i, col) in self.hist.iter().zip(hist) {
            slots[i] = Some(col);
        }
        for (i, col) in self.labels.call_indices().zip(labelled) {
            slots[i] = Some(col);
        }
        let windows: Vec<ArrayRef> = slots
            .into_iter()
            .map(|c| c.expect("every call evaluated"))
            .collect();
        let with_windows =
            state::append_columns(canonical, windows).map_err(|source| EngineError::Arrow {
                file: file.clone(),
                source,
            })?;
        let out = self.post.execute(vec![with_windows]).await?;
        let out = concat_or_empty(&self.post.schema(), &out, &file)?;
        if out.num_rows() != n {
            return Err(contract(
                &file,
                format!(
                    "must return one row per transaction in input order (no WHERE, GROUP BY, ORDER BY or DISTINCT); returned {} rows for {n}",
                    out.num_rows()
                ),
            ));
        }
        let ids_in = canonical.column(0);
        let ids_out = out.column(0);
        let (a, b) = (
            ids_in.as_any().downcast_ref::<StringArray>(),
            ids_out.as_any().downcast_ref::<StringArray>(),
        );
        if let (Some(a), Some(b)) = (a, b)
            && (0..n).any(|i| a.value(i) != b.value(i))
        {
            return Err(contract(
                &file,
                "rows must keep the input order (remove ORDER BY)".into(),
            ));
        }
        let features = RecordBatch::try_new(
            self.features.clone(),
            out.columns().iter().skip(1).cloned().collect(),
        )
        .map_err(|source| EngineError::Arrow { file, source })?;
        self.times.post += started.elapsed();
        Ok(features)
    }
}

/// Event times, keys and arguments of the pre query.
type PreColumns = (
    TimestampMillisecondArray,
    Vec<ArrayRef>,
    Vec<Option<ArrayRef>>,
);

fn describe(call: &WindowCall) -> String {
    format!("{:?}({})", call.func, call.arg.as_deref().unwrap_or("*")).to_lowercase()
}

fn contract(file: &Path, message: String) -> EngineError {
    EngineError::Contract {
        file: file.to_path_buf(),
        message,
    }
}

/// Concatenate result batches (an empty result becomes an empty batch of the schema).
pub fn concat_or_empty(
    schema: &SchemaRef,
    batches: &[RecordBatch],
    file: &Path,
) -> Result<RecordBatch, EngineError> {
    match batches {
        [] => Ok(RecordBatch::new_empty(schema.clone())),
        [one] => Ok(one.clone()),
        many => concat_batches(schema, many).map_err(|source| EngineError::Arrow {
            file: file.to_path_buf(),
            source,
        }),
    }
}

/// Online scoring (`POST /v1/score`): evaluation without recording.
impl FeatureStage {
    /// Make the next [`FeatureStage::process`] calls leave the window state unchanged (see
    /// [`super::state::WindowState::peek`]): `groups` gives each row's request; `None` records
    /// again.
    pub fn set_peek(&mut self, groups: Option<Vec<u32>>) {
        self.state.set_peek(groups);
    }

    /// Whether the calls leave the window state unchanged (a scoring request that is not
    /// recorded).
    pub fn peeking(&self) -> bool {
        self.state.peeking()
    }
}
