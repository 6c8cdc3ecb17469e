//! The link between the HTTP API and the pipeline: scoring jobs go to the engine task through a
//! bounded channel and are served between two micro-batches ([`serve`]); labels stored by
//! `POST /v1/labels` reach the engine task the same way, through a broadcast
//! ([`OnlineLink::subscribe_labels`], [`label_batch`]); committed alerts come back as events for
//! `GET /v1/alerts/stream` ([`OnlineLink::publish_alerts`]).

use std::sync::{Arc, Mutex};

use datafusion::arrow::array::{ArrayRef, RecordBatch, StringArray, TimestampMillisecondArray};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Field, Schema};
use serde_json::{Map, Value};
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::engine::online::{OnlineInput, Rejection};
use crate::engine::{DECISION, Engine, MODEL_VERSION, RULE_HITS, SCORE, canonical};
use crate::metrics::Metrics;
use crate::sink::SinkBatch;
use crate::sink::query::Label;

/// Jobs served per turn of the engine task (one evaluation of the SQL stages for all of them).
const MAX_JOBS_PER_TURN: usize = 512;

/// One `POST /v1/score` request, for the engine task.
#[derive(Debug)]
pub struct ScoreJob {
    /// Its transactions.
    pub input: OnlineInput,
    /// Whether they enter the history and are stored.
    pub record: bool,
    /// Where the answer goes.
    pub reply: oneshot::Sender<ScoreReply>,
}

/// The answer to a [`ScoreJob`]: the decided rows, or why they were refused.
pub type ScoreReply = Result<RecordBatch, Rejection>;

/// Alerts of one committed batch, as JSON objects (the columns of the `alerts` table).
pub type AlertEvent = Arc<Vec<Value>>;

/// Both ends of the API <-> pipeline link (cheap to clone).
#[derive(Debug, Clone)]
pub struct OnlineLink {
    jobs_tx: mpsc::Sender<ScoreJob>,
    jobs_rx: Arc<Mutex<Option<mpsc::Receiver<ScoreJob>>>>,
    alerts: broadcast::Sender<AlertEvent>,
    labels: broadcast::Sender<Label>,
}

/// Labels of `POST /v1/labels` the broadcast holds for a subscriber that has not read them yet;
/// beyond, the oldest are lost to it (counted in `payguard_api_labels_lagged_total`).
pub const LABEL_BACKLOG: usize = 4096;

impl OnlineLink {
    /// A link whose job queue holds `capacity` requests.
    pub fn new(capacity: usize) -> Self {
        let (jobs_tx, jobs_rx) = mpsc::channel(capacity.max(1));
        let (alerts, _) = broadcast::channel(1024);
        let (labels, _) = broadcast::channel(LABEL_BACKLOG);
        Self {
            jobs_tx,
            jobs_rx: Arc::new(Mutex::new(Some(jobs_rx))),
            alerts,
            labels,
        }
    }

    /// Where the API publishes the labels it stored (`POST /v1/labels`).
    pub fn labels(&self) -> &broadcast::Sender<Label> {
        &self.labels
    }

    /// Labels stored by the API from now on (the engine task feeds them to the label features).
    pub fn subscribe_labels(&self) -> broadcast::Receiver<Label> {
        self.labels.subscribe()
    }

    /// The sending end of the job queue (the API).
    pub fn jobs(&self) -> &mpsc::Sender<ScoreJob> {
        &self.jobs_tx
    }

    /// The receiving end of the job queue, taken once by the engine task.
    pub fn take_jobs(&self) -> Option<mpsc::Receiver<ScoreJob>> {
        self.jobs_rx.lock().expect("jobs lock").take()
    }

    /// New alerts as they are committed.
    pub fn subscribe_alerts(&self) -> broadcast::Receiver<AlertEvent> {
        self.alerts.subscribe()
    }

    /// Publish the alerts of a committed batch (nothing is done without a subscriber).
    pub fn publish_alerts(&self, batch: &SinkBatch) {
        if self.alerts.receiver_count() == 0 {
            return;
        }
        let alerts: Vec<Value> = batch
            .transactions
            .iter()
            .flat_map(|b| decided_json(b).unwrap_or_default())
            .filter(|r| r.decision != "approve")
            .map(|r| r.alert())
            .collect();
        if !alerts.is_empty() {
            let _ = self.alerts.send(Arc::new(alerts));
        }
    }
}

/// Serve `first` and the jobs already waiting behind it (at most [`MAX_JOBS_PER_TURN`]), in
/// arrival order; runs of jobs with the same `record` are evaluated together. Recorded rows are
/// sent to the sink. Returns false when the sink stage is gone.
pub async fn serve(
    engine: &mut Engine,
    first: ScoreJob,
    jobs: &mut mpsc::Receiver<ScoreJob>,
    done: &mpsc::Sender<SinkBatch>,
    metrics: &Metrics,
) -> bool {
    let t = std::time::Instant::now();
    let mut all = vec![first];
    while all.len() < MAX_JOBS_PER_TURN {
        match jobs.try_recv() {
            Ok(j) => all.push(j),
            Err(_) => break,
        }
    }
    let mut alive = true;
    let mut rest = all.into_iter().peekable();
    while let Some(job) = rest.next() {
        let record = job.record;
        let mut run = vec![job];
        while let Some(j) = rest.next_if(|j| j.record == record) {
            run.push(j);
        }
        let (inputs, replies): (Vec<_>, Vec<_>) =
            run.into_iter().map(|j| (j.input, j.reply)).unzip();
        match engine.score_online(inputs, record).await {
            Ok(out) => {
                for (reply, result) in replies.into_iter().zip(out.results) {
                    let _ = reply.send(result);
                }
                if let Some(batch) = out.sink
                    && done.send(batch).await.is_err()
                {
                    alive = false;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "online scoring failed");
                for reply in replies {
                    let _ = reply.send(Err(vec![(None, format!("evaluation failed: {e}"))]));
                }
            }
        }
    }
    metrics.engine_time.observe(t.elapsed().as_secs_f64());
    alive
}

/// Labels of the API as a batch of [`crate::engine::labels::label_schema`], in their order.
pub fn label_batch(labels: &[Label]) -> RecordBatch {
    let ms = |t: &chrono::DateTime<chrono::Utc>| t.timestamp_millis();
    let text = |f: fn(&Label) -> Option<&str>| -> ArrayRef {
        Arc::new(labels.iter().map(f).collect::<StringArray>())
    };
    let columns: Vec<ArrayRef> = vec![
        text(|l| Some(l.transaction_id.as_str())),
        text(|l| Some(l.label())),
        Arc::new(
            labels
                .iter()
                .map(|l| Some(ms(&l.reported_at)))
                .collect::<TimestampMillisecondArray>()
                .with_timezone("UTC"),
        ),
        text(|l| l.source.as_deref()),
        text(|l| l.report_type.as_deref()),
        text(|l| l.fraud_scenario.as_deref()),
        Arc::new(
            labels
                .iter()
                .map(|l| l.transaction_time.as_ref().map(ms))
                .collect::<TimestampMillisecondArray>()
                .with_timezone("UTC"),
        ),
    ];
    RecordBatch::try_new(crate::engine::labels::label_schema(), columns)
        .expect("the columns follow label_schema")
}

/// One decided row as JSON, split by role.
#[derive(Debug, Clone)]
pub struct DecidedJson {
    /// Canonical columns (amount as an exact decimal string).
    pub transaction: Map<String, Value>,
    /// Feature columns.
    pub features: Map<String, Value>,
    /// Model score (null without a model).
    pub score: Value,
    /// Model version (null without a model).
    pub model_version: Value,
    /// approve, review or decline.
    pub decision: String,
    /// The rule hits (`[{rule, severity, reason}]`).
    pub rule_hits: Value,
}

impl DecidedJson {
    /// The row as an alert (the columns of the `alerts` table).
    pub fn alert(&self) -> Value {
        let mut a = Map::new();
        for k in [
            "transaction_id",
            "event_time",
            "source",
            "amount",
            "currency",
            "customer_id",
            "card_id",
            "merchant_id",
        ] {
            a.insert(
                k.into(),
                self.transaction.get(k).cloned().unwrap_or(Value::Null),
            );
        }
        a.insert(DECISION.into(), Value::String(self.decision.clone()));
        a.insert(SCORE.into(), self.score.clone());
        a.insert(MODEL_VERSION.into(), self.model_version.clone());
        a.insert(RULE_HITS.into(), self.rule_hits.clone());
        a.insert("features".into(), Value::Object(self.features.clone()));
        Value::Object(a)
    }
}

/// Decided rows (canonical columns, features, score, model_version, decision, rule_hits) as
/// JSON; decimals become exact strings, timestamps RFC 3339.
pub fn decided_json(b: &RecordBatch) -> Result<Vec<DecidedJson>, String> {
    let rows = batch_json(b)?;
    let n_canonical = canonical::width(&b.schema());
    let score_at = b.schema().index_of(SCORE).map_err(|e| e.to_string())?;
    let names: Vec<String> = b
        .schema()
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect();
    Ok(rows
        .into_iter()
        .map(|mut row| {
            let mut transaction = Map::new();
            let mut features = Map::new();
            for (i, name) in names.iter().enumerate() {
                if i < n_canonical {
                    transaction.insert(name.clone(), row.remove(name).unwrap_or(Value::Null));
                } else if i < score_at {
                    features.insert(name.clone(), row.remove(name).unwrap_or(Value::Null));
                }
            }
            let rule_hits = rule_hits_json(row.get(RULE_HITS));
            DecidedJson {
                transaction,
                features,
                score: row.remove(SCORE).unwrap_or(Value::Null),
                model_version: row.remove(MODEL_VERSION).unwrap_or(Value::Null),
                decision: match row.remove(DECISION) {
                    Some(Value::String(s)) => s,
                    _ => String::new(),
                },
                rule_hits,
            }
        })
        .collect())
}

/// The `rule_hits` of a decided row as JSON: the column holds JSON text, parsed (kept as a string
/// if it is not JSON); `[]` without the column.
pub(crate) fn rule_hits_json(v: Option<&Value>) -> Value {
    match v {
        Some(Value::String(s)) => {
            serde_json::from_str(s).unwrap_or_else(|_| Value::String(s.clone()))
        }
        Some(v) => v.clone(),
        None => Value::Array(vec![]),
    }
}

/// Every row of a batch as a JSON object with every column (nulls explicit); decimals as exact
/// strings, timestamps RFC 3339, non-finite floats null: what Arrow's JSON writer gives, built
/// column by column without writing and parsing JSON text (the response of every scoring
/// request goes through here). Types without a direct conversion go through the writer.
pub fn batch_json(b: &RecordBatch) -> Result<Vec<Map<String, Value>>, String> {
    let mut rows: Vec<Map<String, Value>> = (0..b.num_rows()).map(|_| Map::new()).collect();
    for (f, c) in b.schema().fields().iter().zip(b.columns()) {
        for (row, v) in rows.iter_mut().zip(column_values(f, c)?) {
            row.insert(f.name().clone(), v);
        }
    }
    Ok(rows)
}

/// The values of one column as [`batch_json`] gives them, one per row.
pub(crate) fn column_values(f: &Field, c: &ArrayRef) -> Result<Vec<Value>, String> {
    if let Some(v) = column_json(c)? {
        return Ok(v);
    }
    let one = RecordBatch::try_new(Arc::new(Schema::new(vec![f.clone()])), vec![c.clone()])
        .map_err(|e| e.to_string())?;
    Ok(written_json(&one)?
        .into_iter()
        .map(|mut r| r.remove(f.name()).unwrap_or(Value::Null))
        .collect())
}

/// The values of a column as JSON, for the types converted directly; `None` for the others.
fn column_json(c: &ArrayRef) -> Result<Option<Vec<Value>>, String> {
    use datafusion::arrow::array::{Array, AsArray};
    use datafusion::arrow::datatypes::{Float64Type, Int32Type, Int64Type, UInt64Type};
    use datafusion::arrow::util::display::{ArrayFormatter, FormatOptions};
    let values = |f: &dyn Fn(usize) -> Value| -> Vec<Value> {
        (0..c.len())
            .map(|i| if c.is_null(i) { Value::Null } else { f(i) })
            .collect()
    };
    Ok(Some(match c.data_type() {
        DataType::Utf8 => {
            let a = c.as_string::<i32>();
            values(&|i| Value::String(a.value(i).to_string()))
        }
        DataType::Boolean => {
            let a = c.as_boolean();
            values(&|i| Value::Bool(a.value(i)))
        }
        DataType::Int64 => {
            let a = c.as_primitive::<Int64Type>();
            values(&|i| Value::from(a.value(i)))
        }
        DataType::Int32 => {
            let a = c.as_primitive::<Int32Type>();
            values(&|i| Value::from(a.value(i)))
        }
        DataType::UInt64 => {
            let a = c.as_primitive::<UInt64Type>();
            values(&|i| Value::from(a.value(i)))
        }
        DataType::Float64 => {
            let a = c.as_primitive::<Float64Type>();
            values(&|i| serde_json::Number::from_f64(a.value(i)).map_or(Value::Null, Value::Number))
        }
        DataType::Decimal128(..) => {
            let text = cast(c, &DataType::Utf8).map_err(|e| e.to_string())?;
            let a = text.as_string::<i32>();
            values(&|i| Value::String(a.value(i).to_string()))
        }
        DataType::Timestamp(..) => {
            let options = FormatOptions::new().with_display_error(true);
            let f = ArrayFormatter::try_new(c.as_ref(), &options).map_err(|e| e.to_string())?;
            values(&|i| Value::String(f.value(i).to_string()))
        }
        _ => return Ok(None),
    }))
}

/// Every row as Arrow's JSON writer writes it, parsed back; decimals as strings.
fn written_json(b: &RecordBatch) -> Result<Vec<Map<String, Value>>, String> {
    let mut fields = Vec::with_capacity(b.num_columns());
    let mut cols: Vec<ArrayRef> = Vec::with_capacity(b.num_columns());
    for (f, c) in b.schema().fields().iter().zip(b.columns()) {
        if matches!(f.data_type(), DataType::Decimal128(..)) {
            cols.push(cast(c, &DataType::Utf8).map_err(|e| e.to_string())?);
            fields.push(Field::new(f.name(), DataType::Utf8, true));
        } else {
            cols.push(c.clone());
            fields.push(f.as_ref().clone());
        }
    }
    let text_batch =
        RecordBatch::try_new(Arc::new(Schema::new(fields)), cols).map_err(|e| e.to_string())?;
    let mut w = datafusion::arrow::json::WriterBuilder::new()
        .with_explicit_nulls(true)
        .build::<_, datafusion::arrow::json::writer::JsonArray>(Vec::new());
    w.write(&text_batch).map_err(|e| e.to_string())?;
    w.finish().map_err(|e| e.to_string())?;
    let bytes = w.into_inner();
    if bytes.is_empty() {
        return Ok(Vec::new());
    }
    let v: Vec<Map<String, Value>> = serde_json::from_slice(&bytes).map_err(|e| e.to_string())?;
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::{
        BooleanArray, Decimal128Array, Float32Array, Float64Array, Int64Array,
    };

    #[test]
    fn json_of_a_batch_equals_what_the_arrow_writer_gives() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("s", DataType::Utf8, true),
            Field::new(
                "t",
                DataType::Timestamp(
                    datafusion::arrow::datatypes::TimeUnit::Millisecond,
                    Some("UTC".into()),
                ),
                true,
            ),
            Field::new("amount", DataType::Decimal128(18, 2), true),
            Field::new("f", DataType::Float64, true),
            Field::new("n", DataType::Int64, true),
            Field::new("b", DataType::Boolean, true),
            Field::new("f32", DataType::Float32, true),
        ]));
        let b = RecordBatch::try_new(
            schema,
            vec![
                Arc::new(StringArray::from(vec![
                    Some("a\"é\n"),
                    None,
                    Some(""),
                    Some("x"),
                ])),
                Arc::new(
                    TimestampMillisecondArray::from(vec![
                        Some(1_762_000_003_740),
                        Some(0),
                        None,
                        Some(-1),
                    ])
                    .with_timezone("UTC"),
                ),
                Arc::new(
                    Decimal128Array::from(vec![Some(4210), Some(-5), None, Some(i64::MAX as i128)])
                        .with_precision_and_scale(18, 2)
                        .unwrap(),
                ),
                Arc::new(Float64Array::from(vec![
                    Some(0.1),
                    Some(f64::NAN),
                    Some(f64::INFINITY),
                    Some(3.874_301_910_400_390_6e-7),
                ])),
                Arc::new(Int64Array::from(vec![
                    Some(i64::MIN),
                    None,
                    Some(0),
                    Some(7),
                ])),
                Arc::new(BooleanArray::from(vec![
                    Some(true),
                    Some(false),
                    None,
                    Some(true),
                ])),
                Arc::new(Float32Array::from(vec![
                    Some(0.1f32),
                    None,
                    Some(2.5),
                    Some(-0.0),
                ])),
            ],
        )
        .unwrap();
        let direct = batch_json(&b).unwrap();
        let written = written_json(&b).unwrap();
        assert_eq!(direct, written);
        assert_eq!(direct[0]["amount"], Value::String("42.10".into()));
        assert_eq!(direct[1]["f"], Value::Null, "NaN is null");
        assert_eq!(
            direct[0]["f32"],
            serde_json::json!(0.1),
            "through the writer"
        );
        assert!(batch_json(&b.slice(0, 0)).unwrap().is_empty());
    }
}
