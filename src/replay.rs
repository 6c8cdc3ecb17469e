//! `payguard replay`: the same SQL, offline, over JSON-lines files of source messages, writing every
//! transaction with its features, score, rule hits and decision to Parquet: the training set of the
//! model, and the way to backtest a rule change on history before deploying it.
//!
//! Rows are processed in event-time order (ties: source order, then file order), in micro-batches
//! of `pipeline.batch_max_rows`, through exactly the stages `run` uses. With `--labels`, each row
//! gets the label feedback that eventually arrived for it (`label`, `label_scenario`,
//! `label_reported_at`); the features never read those columns, so the training set has no
//! leakage from labels into features.

use std::collections::HashMap;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use datafusion::arrow::array::{
    Array, ArrayRef, BooleanArray, RecordBatch, StringArray, TimestampMillisecondArray, UInt64Array,
};
use datafusion::arrow::compute::{
    SortColumn, concat_batches, lexsort_to_indices, take_record_batch,
};
use datafusion::arrow::datatypes::{DataType, Field, TimeUnit};
use datafusion::parquet::arrow::ArrowWriter;
use datafusion::parquet::basic::{Compression, ZstdLevel};
use datafusion::parquet::file::properties::WriterProperties;

use crate::config::Config;
use crate::decode::RawMessage;
use crate::engine::{Engine, EngineError};

/// Errors of a replay.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// The SQL stages failed.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
    /// An input's source could not be told.
    #[error("{0}")]
    Usage(String),
    /// Arrow or Parquet failed.
    #[error("{0}")]
    Data(String),
}

/// What a replay did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplaySummary {
    /// Messages read.
    pub messages: u64,
    /// Rows written.
    pub rows: u64,
    /// Messages that could not be decoded or mapped.
    pub dead_letters: u64,
    /// Rows with a fraud label.
    pub labelled_fraud: u64,
    /// Rows per decision.
    pub decisions: HashMap<String, u64>,
}

/// One input: a source and its file.
#[derive(Debug, Clone)]
pub struct ReplayInput {
    /// Source index in the config.
    pub source: usize,
    /// JSON-lines file.
    pub path: PathBuf,
}

/// Resolve `SOURCE=PATH` or `PATH` (source from a `<stem>.<source>.jsonl` name, or the only
/// source of the config) into an input.
pub fn parse_input(config: &Config, arg: &str) -> Result<ReplayInput, ReplayError> {
    let find = |name: &str| config.sources.iter().position(|s| s.name == name);
    if let Some((name, path)) = arg.split_once('=')
        && let Some(source) = find(name)
    {
        return Ok(ReplayInput {
            source,
            path: PathBuf::from(path),
        });
    }
    let path = PathBuf::from(arg);
    let stem = path
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or_default();
    if let Some(source) = stem.rsplit('.').next().and_then(find)
        && stem.contains('.')
    {
        return Ok(ReplayInput { source, path });
    }
    if config.sources.len() == 1 {
        return Ok(ReplayInput { source: 0, path });
    }
    Err(ReplayError::Usage(format!(
        "cannot tell the source of {arg}: name it SOURCE=PATH or <stem>.<source>.jsonl (sources: {})",
        config.source_names()
    )))
}

struct Label {
    fraud: bool,
    scenario: Option<String>,
    reported_at: Option<i64>,
}

fn read_labels(path: &Path) -> Result<HashMap<String, Label>, ReplayError> {
    let file = std::fs::File::open(path).map_err(|source| ReplayError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut out = HashMap::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|source| ReplayError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(&line).map_err(|e| {
            ReplayError::Usage(format!(
                "{}:{}: not a JSON label: {e}",
                path.display(),
                i + 1
            ))
        })?;
        let Some(id) = v["transaction_id"].as_str() else {
            return Err(ReplayError::Usage(format!(
                "{}:{}: label without transaction_id",
                path.display(),
                i + 1
            )));
        };
        let fraud = match &v["label"] {
            serde_json::Value::Bool(b) => *b,
            serde_json::Value::String(s) => s == "fraud",
            _ => true,
        };
        let reported_at = v["reported_at"]
            .as_str()
            .and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok())
            .map(|t| t.timestamp_millis());
        out.insert(
            id.to_string(),
            Label {
                fraud,
                scenario: v["fraud_scenario"].as_str().map(str::to_string),
                reported_at,
            },
        );
    }
    Ok(out)
}

/// Run a replay.
pub async fn replay(
    config: &Config,
    inputs: &[ReplayInput],
    labels: Option<&Path>,
    output: &Path,
) -> Result<ReplaySummary, ReplayError> {
    // Offline every transaction of the input stays indexed, so every label can be attributed.
    let mut offline = config.clone();
    offline.labels.index_max = usize::MAX;
    let mut engine = Engine::new(&offline).await?;
    let mut summary = ReplaySummary::default();
    let labels = labels.map(read_labels).transpose()?;
    // The label feedback as a stream in report order, fed to the features point-in-time.
    let feedback = match (&labels, engine.reads_labels()) {
        (Some(l), true) => Some(feedback_batch(l)?),
        _ => None,
    };
    let mut fed = 0usize;
    let now = Instant::now();
    // 1. Decode and map every input, remembering (source, line) to order ties.
    let mut parts: Vec<RecordBatch> = Vec::new();
    let mut order_source: Vec<u64> = Vec::new();
    let mut order_line: Vec<u64> = Vec::new();
    for input in inputs {
        let file = std::fs::File::open(&input.path).map_err(|source| ReplayError::Io {
            path: input.path.clone(),
            source,
        })?;
        let mut reader = std::io::BufReader::with_capacity(1 << 20, file);
        let mut line_no = 0i64;
        loop {
            let mut chunk = Vec::with_capacity(50_000);
            let mut buf = Vec::new();
            while chunk.len() < 50_000 {
                buf.clear();
                let n = reader
                    .read_until(b'\n', &mut buf)
                    .map_err(|source| ReplayError::Io {
                        path: input.path.clone(),
                        source,
                    })?;
                if n == 0 {
                    break;
                }
                while buf.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                    buf.pop();
                }
                line_no += 1;
                if buf.is_empty() {
                    continue;
                }
                chunk.push(RawMessage {
                    partition: 0,
                    offset: line_no,
                    key: None,
                    value: Some(buf.clone()),
                    timestamp_ms: 0,
                });
            }
            if chunk.is_empty() {
                break;
            }
            summary.messages += chunk.len() as u64;
            let (rows, dead) = engine
                .canonicalize(input.source, &chunk, i64::MAX / 4, now)
                .await?;
            summary.dead_letters += dead.len() as u64;
            for d in dead.iter().take(5) {
                tracing::warn!(file = %input.path.display(), line = d.offset, reason = %d.reason, "skipped message");
            }
            for r in rows {
                let first = order_line.len() as u64;
                order_source.extend(std::iter::repeat_n(input.source as u64, r.num_rows()));
                order_line.extend(first..first + r.num_rows() as u64);
                parts.push(r);
            }
        }
    }
    let schema = engine.canonical().schema();
    let all = concat_batches(&schema, &parts).map_err(|e| ReplayError::Data(e.to_string()))?;
    drop(parts);
    // 2. Event-time order, ties by source then file order.
    let sort = lexsort_to_indices(
        &[
            SortColumn {
                values: all.column(1).clone(),
                options: None,
            },
            SortColumn {
                values: Arc::new(UInt64Array::from(order_source)),
                options: None,
            },
            SortColumn {
                values: Arc::new(UInt64Array::from(order_line)),
                options: None,
            },
        ],
        None,
    )
    .map_err(|e| ReplayError::Data(e.to_string()))?;
    let all = take_record_batch(&all, &sort).map_err(|e| ReplayError::Data(e.to_string()))?;

    // 3. Features, score, rules, decisions, in micro-batches; labels joined; Parquet out.
    let out_file = std::fs::File::create(output).map_err(|source| ReplayError::Io {
        path: output.to_path_buf(),
        source,
    })?;
    let mut writer: Option<ArrowWriter<std::fs::File>> = None;
    let mut out_file = Some(out_file);
    let step = config.pipeline.batch_max_rows.max(1);
    let mut at = 0;
    while at < all.num_rows() {
        let n = step.min(all.num_rows() - at);
        let slice = all.slice(at, n);
        if let Some(fb) = &feedback {
            // Every label reported by the slice's newest event time; a row counts one only
            // from its report time on, so none is seen early.
            let newest = slice
                .column(1)
                .as_any()
                .downcast_ref::<datafusion::arrow::array::TimestampMillisecondArray>()
                .and_then(|t| t.iter().flatten().max())
                .unwrap_or(i64::MIN);
            let reported = fb
                .column(2)
                .as_any()
                .downcast_ref::<datafusion::arrow::array::TimestampMillisecondArray>()
                .expect("reported_at");
            let upto = fed
                + (fed..fb.num_rows())
                    .take_while(|&i| reported.value(i) <= newest)
                    .count();
            if upto > fed {
                let ids = slice
                    .column(0)
                    .as_any()
                    .downcast_ref::<datafusion::arrow::array::StringArray>();
                engine.add_labels(&fb.slice(fed, upto - fed), ids).await?;
                fed = upto;
            }
        }
        let decided = engine.decide(&slice).await?;
        at += n;
        let decided = match &labels {
            Some(l) => with_labels(&decided, l, &mut summary)?,
            None => decided,
        };
        count_decisions(&decided, &mut summary);
        summary.rows += decided.num_rows() as u64;
        if writer.is_none() {
            let props = WriterProperties::builder()
                .set_compression(Compression::ZSTD(ZstdLevel::default()))
                .build();
            writer = Some(
                ArrowWriter::try_new(
                    out_file.take().expect("file taken once"),
                    decided.schema(),
                    Some(props),
                )
                .map_err(|e| ReplayError::Data(e.to_string()))?,
            );
        }
        writer
            .as_mut()
            .expect("writer")
            .write(&decided)
            .map_err(|e| ReplayError::Data(e.to_string()))?;
    }
    match writer {
        Some(w) => {
            w.close().map_err(|e| ReplayError::Data(e.to_string()))?;
        }
        None => {
            return Err(ReplayError::Usage(
                "no transaction in the inputs: nothing to write".into(),
            ));
        }
    }
    Ok(summary)
}

/// The labels that carry a report time, as a label batch sorted by `reported_at` (then id).
fn feedback_batch(labels: &HashMap<String, Label>) -> Result<RecordBatch, ReplayError> {
    let mut rows: Vec<(&String, &Label, i64)> = labels
        .iter()
        .filter_map(|(id, l)| l.reported_at.map(|t| (id, l, t)))
        .collect();
    rows.sort_by(|a, b| (a.2, a.0).cmp(&(b.2, b.0)));
    let schema = crate::engine::labels::label_schema();
    let n = rows.len();
    let mut columns: Vec<datafusion::arrow::array::ArrayRef> = vec![
        Arc::new(datafusion::arrow::array::StringArray::from_iter_values(
            rows.iter().map(|r| r.0.as_str()),
        )),
        Arc::new(datafusion::arrow::array::StringArray::from_iter_values(
            rows.iter()
                .map(|r| if r.1.fraud { "fraud" } else { "genuine" }),
        )),
        Arc::new(
            datafusion::arrow::array::TimestampMillisecondArray::from_iter_values(
                rows.iter().map(|r| r.2),
            )
            .with_timezone("UTC"),
        ),
    ];
    for f in schema.fields().iter().skip(3) {
        columns.push(datafusion::arrow::array::new_null_array(f.data_type(), n));
    }
    RecordBatch::try_new(schema, columns).map_err(|e| ReplayError::Data(e.to_string()))
}

fn with_labels(
    decided: &RecordBatch,
    labels: &HashMap<String, Label>,
    summary: &mut ReplaySummary,
) -> Result<RecordBatch, ReplayError> {
    let ids = decided
        .column(0)
        .as_any()
        .downcast_ref::<StringArray>()
        .expect("transaction_id");
    let mut fraud = Vec::with_capacity(ids.len());
    let mut scenario = Vec::with_capacity(ids.len());
    let mut reported = Vec::with_capacity(ids.len());
    for id in ids.iter() {
        let l = id.and_then(|id| labels.get(id));
        let is_fraud = l.is_some_and(|l| l.fraud);
        summary.labelled_fraud += is_fraud as u64;
        fraud.push(is_fraud);
        scenario.push(l.and_then(|l| l.scenario.clone()));
        reported.push(l.and_then(|l| l.reported_at));
    }
    crate::engine::with_columns(
        decided,
        [
            (
                Field::new("label", DataType::Boolean, false),
                Arc::new(BooleanArray::from(fraud)) as ArrayRef,
            ),
            (
                Field::new("label_scenario", DataType::Utf8, true),
                Arc::new(StringArray::from(scenario)),
            ),
            (
                Field::new(
                    "label_reported_at",
                    DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
                    true,
                ),
                Arc::new(TimestampMillisecondArray::from(reported).with_timezone("UTC")),
            ),
        ],
    )
    .map_err(|e| ReplayError::Data(e.to_string()))
}

fn count_decisions(b: &RecordBatch, summary: &mut ReplaySummary) {
    if let Some(d) = b
        .column_by_name(crate::engine::DECISION)
        .and_then(|c| c.as_any().downcast_ref::<StringArray>())
    {
        for v in d.iter().flatten() {
            *summary.decisions.entry(v.to_string()).or_default() += 1;
        }
    }
}
