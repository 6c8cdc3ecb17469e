//! `POST /v1/score`: one transaction or a batch, canonical or in a source's format, scored by the
//! engine task against the live entity history.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::compute::concat_batches;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::{mpsc::error::TrySendError, oneshot};

use super::{ApiState, ErrorBody, Failure, has_nul};
use crate::config::{FieldConfig, SourceConfig};
use crate::decode::{JsonDecoder, RawMessage};
use crate::engine::canonical::{self, Canonical, Conformer};
use crate::engine::online::OnlineInput;
use crate::online::ScoreJob;

/// Decoder of canonical transactions given as JSON objects (the source-mapping contract's columns).
#[derive(Debug)]
pub struct CanonicalDecoder {
    decoder: JsonDecoder,
    conformer: Conformer,
    canonical: Arc<Canonical>,
}

impl CanonicalDecoder {
    /// Build it for the columns of `canonical` (its attributes too; `max_bytes`: largest
    /// transaction).
    pub fn new(canonical: Arc<Canonical>, max_bytes: usize) -> Result<Self, String> {
        let fields = canonical
            .columns()
            .iter()
            .map(|c| FieldConfig {
                name: c.name.clone(),
                data_type: c.kind.field_type().into(),
                required: c.required,
            })
            .collect();
        let source = SourceConfig {
            name: "canonical".into(),
            simulator: String::new(),
            topic: "<api>".into(),
            partitions: 1,
            mapping: PathBuf::new(),
            fields,
        };
        let decoder = JsonDecoder::new(&source, max_bytes).map_err(|e| e.to_string())?;
        let conformer = Conformer::new(&canonical, &decoder.output_schema())?;
        Ok(Self {
            decoder,
            conformer,
            canonical,
        })
    }

    /// Canonical rows of the objects, or (index, reason) of every bad one.
    fn decode(&self, objects: &[Value]) -> Result<RecordBatch, Vec<(Option<usize>, String)>> {
        let mut problems = Vec::new();
        for (i, o) in objects.iter().enumerate() {
            let Some(map) = o.as_object() else {
                problems.push((Some(i), "a transaction must be a JSON object".to_string()));
                continue;
            };
            let unknown: Vec<&str> = map
                .keys()
                .filter(|k| !self.canonical.has(k))
                .map(String::as_str)
                .collect();
            if !unknown.is_empty() {
                problems.push((
                    Some(i),
                    format!(
                        "unknown column(s) {}; canonical columns and attributes: {} (for a source's own format, give `source`)",
                        unknown.join(", "),
                        self.canonical.names()
                    ),
                ));
            }
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        let messages = raw_messages(objects);
        let decoded = self
            .decoder
            .decode(&messages)
            .map_err(|e| vec![(None, e.to_string())])?;
        if !decoded.dead_letters.is_empty() {
            return Err(decoded
                .dead_letters
                .into_iter()
                .map(|d| (usize::try_from(d.offset).ok(), d.reason))
                .collect());
        }
        let conformed = self
            .conformer
            .conform(&decoded.batch)
            .map_err(|e| vec![(None, e.to_string())])?;
        if !conformed.rejected.is_empty() {
            return Err(conformed
                .rejected
                .into_iter()
                .map(|r| (r.offset.and_then(|o| usize::try_from(o).ok()), r.reason))
                .collect());
        }
        concat_batches(&self.canonical.schema(), [&conformed.rows])
            .map_err(|e| vec![(None, e.to_string())])
    }
}

/// Messages of a request (partition -1, offset = position in the request).
fn raw_messages(objects: &[Value]) -> Vec<RawMessage> {
    let now = chrono::Utc::now().timestamp_millis();
    objects
        .iter()
        .enumerate()
        .map(|(i, o)| RawMessage {
            partition: -1,
            offset: i as i64,
            key: None,
            value: Some(serde_json::to_vec(o).unwrap_or_default()),
            timestamp_ms: now,
        })
        .collect()
}

/// Body of `POST /v1/score`: `transaction` (one) or `transactions` (a batch).
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ScoreRequest {
    /// Required. `true`: the transactions enter the entity history and are stored like streamed
    /// ones (once per id); `false`: nothing is changed or stored.
    pub record: bool,
    /// The transactions are raw messages of this source (its decoder and mapping SQL run, as on
    /// the stream); without it they are canonical transactions (README, SQL contracts).
    #[serde(default)]
    pub source: Option<String>,
    /// One transaction.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub transaction: Option<Value>,
    /// A batch of transactions (at most `api.max_batch`); later ones see the earlier ones.
    #[serde(default)]
    #[schema(value_type = Option<Vec<Object>>)]
    pub transactions: Option<Vec<Value>>,
}

/// Query of `POST /v1/score`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ScoreQuery {
    /// Same as the body's `source`.
    pub source: Option<String>,
}

/// One scored transaction.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct ScoreResult {
    /// Transaction id.
    pub transaction_id: String,
    /// approve, review or decline.
    pub decision: String,
    /// Model score (null without a model).
    #[schema(value_type = Option<f64>)]
    pub score: Value,
    /// Model version (null without a model).
    #[schema(value_type = Option<String>)]
    pub model_version: Value,
    /// Rule hits: `[{rule, severity, reason}]`.
    #[schema(value_type = Vec<Object>)]
    pub rule_hits: Value,
    /// The features the decision used.
    #[schema(value_type = Object)]
    pub features: serde_json::Map<String, Value>,
    /// The canonical transaction (after the source's mapping).
    #[schema(value_type = Object)]
    pub transaction: serde_json::Map<String, Value>,
}

/// Response of `POST /v1/score`.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct ScoreResponse {
    /// Whether the transactions entered the history and were queued for storage.
    pub recorded: bool,
    /// One result per transaction, in request order.
    pub results: Vec<ScoreResult>,
}

/// Score transactions against the live entity history of the stream.
#[utoipa::path(post, path = "/v1/score", tag = "scoring",
    params(ScoreQuery),
    request_body = ScoreRequest,
    responses(
        (status = 200, description = "Scored", body = ScoreResponse),
        (status = 400, description = "Malformed JSON or query", body = ErrorBody),
        (status = 401, description = "API key missing or wrong", body = ErrorBody),
        (status = 413, description = "Body larger than api.max_body_bytes", body = ErrorBody),
        (status = 422, description = "Invalid transaction(s), unknown source, missing `record`", body = ErrorBody),
        (status = 503, description = "Engine overloaded or stopping; retry", body = ErrorBody)
    ),
    security((), ("api_key" = []), ("bearer" = [])))]
pub async fn score(
    State(s): State<ApiState>,
    query: Result<Query<ScoreQuery>, QueryRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    match score_inner(s, query, body).await {
        Ok(body) => (
            StatusCode::OK,
            [(
                axum::http::header::CONTENT_TYPE,
                axum::http::HeaderValue::from_static("application/json"),
            )],
            body,
        )
            .into_response(),
        Err(f) => f.into_response(),
    }
}

async fn score_inner(
    s: ApiState,
    query: Result<Query<ScoreQuery>, QueryRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Vec<u8>, Failure> {
    let Query(query) = query.map_err(|e| Failure::bad_request(e.body_text()))?;
    let body = body.map_err(|e| Failure::from_body(&e, s.config.api.max_body_bytes))?;
    let req: ScoreRequest = Failure::parse(&body)?;
    let source = match (query.source, req.source) {
        (Some(a), Some(b)) if a != b => {
            return Err(Failure::unprocessable(format!(
                "source {a:?} in the query and {b:?} in the body differ"
            )));
        }
        (a, b) => a.or(b),
    };
    let objects = match (req.transaction, req.transactions) {
        (Some(t), None) => vec![t],
        (None, Some(ts)) => ts,
        (Some(_), Some(_)) => {
            return Err(Failure::unprocessable(
                "give either `transaction` or `transactions`, not both",
            ));
        }
        (None, None) => {
            return Err(Failure::unprocessable(
                "missing `transaction` (one object) or `transactions` (an array)",
            ));
        }
    };
    if objects.is_empty() {
        return Err(Failure::unprocessable("`transactions` is empty"));
    }
    let max = s.config.api.max_batch;
    if objects.len() > max {
        return Err(Failure::unprocessable(format!(
            "{} transactions in one request; at most {max} (api.max_batch)",
            objects.len()
        )));
    }
    if let Some(i) = objects.iter().position(|o| !o.is_object()) {
        return Err(Failure::unprocessable(format!(
            "transaction {i} is not a JSON object"
        )));
    }
    if let Some(i) = objects.iter().position(has_nul) {
        return Err(Failure::unprocessable(format!(
            "transaction {i} holds a NUL character, which text cannot store"
        )));
    }
    let input = match &source {
        Some(name) => {
            let idx = s
                .config
                .sources
                .iter()
                .position(|x| &x.name == name)
                .ok_or_else(|| {
                    Failure::unprocessable(format!(
                        "unknown source {name:?}; configured: {}",
                        s.config.source_names()
                    ))
                })?;
            OnlineInput::Source {
                source: idx,
                messages: raw_messages(&objects),
            }
        }
        None => OnlineInput::Canonical(s.canonical.decode(&objects).map_err(rejection)?),
    };
    let Some(online) = &s.online else {
        return Err(Failure::unavailable("scoring needs a running pipeline"));
    };
    let (tx, rx) = oneshot::channel();
    let job = ScoreJob {
        input,
        record: req.record,
        reply: tx,
    };
    match online.jobs().try_send(job) {
        Ok(()) => {}
        Err(TrySendError::Full(_)) => {
            return Err(Failure::unavailable(format!(
                "scoring queue full ({} requests waiting, api.score_queue); retry",
                s.config.api.score_queue
            )));
        }
        Err(TrySendError::Closed(_)) => {
            return Err(Failure::unavailable("the engine is stopping"));
        }
    }
    let wait = Duration::from_millis(s.config.api.score_timeout_ms);
    let reply = match tokio::time::timeout(wait, rx).await {
        Ok(Ok(r)) => r,
        Ok(Err(_)) => return Err(Failure::unavailable("the engine is stopping")),
        Err(_) => {
            return Err(Failure::unavailable(format!(
                "the engine did not answer within {} ms (api.score_timeout_ms)",
                s.config.api.score_timeout_ms
            )));
        }
    };
    let decided = reply.map_err(rejection)?;
    response_body(&decided, req.record)
        .map_err(|e| Failure::new(StatusCode::INTERNAL_SERVER_ERROR, e))
}

/// The JSON of a [`ScoreResponse`] for these decided rows, byte for byte what serialising one
/// built from [`crate::online::decided_json`] gives (a test checks it), written straight from
/// the columns: no map of every column per row, no second map per role. Keys of `features` and
/// `transaction` come in name order, as serde_json's maps keep them.
// `row` indexes each column's values, one after the other.
#[allow(clippy::needless_range_loop)]
pub fn response_body(decided: &RecordBatch, recorded: bool) -> Result<Vec<u8>, String> {
    use crate::engine::{DECISION, MODEL_VERSION, RULE_HITS, SCORE};
    let schema = decided.schema();
    let n_canonical = canonical::width(&schema);
    let score_at = schema.index_of(SCORE).map_err(|e| e.to_string())?;
    let values: Vec<Vec<Value>> = schema
        .fields()
        .iter()
        .zip(decided.columns())
        .map(|(f, c)| crate::online::column_values(f, c))
        .collect::<Result<_, _>>()?;
    let named = |range: std::ops::Range<usize>| -> Vec<usize> {
        let mut v: Vec<usize> = range.collect();
        v.sort_by(|a, b| schema.field(*a).name().cmp(schema.field(*b).name()));
        v
    };
    let transaction = named(0..n_canonical.min(values.len()));
    let features = named(n_canonical.min(score_at)..score_at);
    let column = |name: &str| schema.index_of(name).ok();
    let (model_version, decision, rule_hits, id) = (
        column(MODEL_VERSION),
        column(DECISION),
        column(RULE_HITS),
        transaction
            .iter()
            .copied()
            .find(|i| schema.field(*i).name() == "transaction_id"),
    );
    let mut out = Vec::with_capacity(256 + 64 * values.len() * decided.num_rows());
    let json =
        |out: &mut Vec<u8>, v: &Value| serde_json::to_writer(out, v).map_err(|e| e.to_string());
    // A text as JSON, written like `Value::String` is, without allocating one.
    let text =
        |out: &mut Vec<u8>, t: &str| serde_json::to_writer(out, t).map_err(|e| e.to_string());
    let object = |out: &mut Vec<u8>, columns: &[usize], row: usize| -> Result<(), String> {
        out.push(b'{');
        for (k, i) in columns.iter().enumerate() {
            if k > 0 {
                out.push(b',');
            }
            text(out, schema.field(*i).name())?;
            out.push(b':');
            json(out, &values[*i][row])?;
        }
        out.push(b'}');
        Ok(())
    };
    out.extend_from_slice(if recorded {
        b"{\"recorded\":true,\"results\":["
    } else {
        b"{\"recorded\":false,\"results\":["
    });
    let null = Value::Null;
    for row in 0..decided.num_rows() {
        if row > 0 {
            out.push(b',');
        }
        let at = |i: Option<usize>| i.map_or(&null, |i| &values[i][row]);
        out.extend_from_slice(b"{\"transaction_id\":");
        text(&mut out, at(id).as_str().unwrap_or_default())?;
        out.extend_from_slice(b",\"decision\":");
        let decided_as = match at(decision) {
            Value::String(s) => s.as_str(),
            _ => "",
        };
        text(&mut out, decided_as)?;
        out.extend_from_slice(b",\"score\":");
        json(&mut out, &values[score_at][row])?;
        out.extend_from_slice(b",\"model_version\":");
        json(&mut out, at(model_version))?;
        out.extend_from_slice(b",\"rule_hits\":");
        json(
            &mut out,
            &crate::online::rule_hits_json(rule_hits.map(|i| &values[i][row])),
        )?;
        out.extend_from_slice(b",\"features\":");
        object(&mut out, &features, row)?;
        out.extend_from_slice(b",\"transaction\":");
        object(&mut out, &transaction, row)?;
        out.push(b'}');
    }
    out.extend_from_slice(b"]}");
    Ok(out)
}

fn rejection(reasons: Vec<(Option<usize>, String)>) -> Failure {
    let summary = match reasons.as_slice() {
        [(Some(i), r)] => format!("transaction {i}: {r}"),
        [(None, r)] => r.clone(),
        many => format!("{} transactions are invalid", many.len()),
    };
    Failure::unprocessable(summary).with_details(Value::Array(
        reasons
            .into_iter()
            .map(|(i, r)| json!({ "index": i, "reason": r }))
            .collect(),
    ))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use datafusion::arrow::array::{
        ArrayRef, Decimal128Array, Float32Array, Float64Array, Int64Array, StringArray,
        TimestampMillisecondArray,
    };
    use datafusion::arrow::datatypes::{DataType, Field, Schema, TimeUnit};

    use super::*;
    use crate::engine::canonical::CanonicalType;
    use crate::engine::{DECISION, MODEL_VERSION, RULE_HITS, SCORE};
    use crate::online::decided_json;

    /// The response as it was built before `response_body`: maps per row, then serde.
    fn through_maps(decided: &RecordBatch, recorded: bool) -> Vec<u8> {
        let results = decided_json(decided)
            .unwrap()
            .into_iter()
            .map(|r| ScoreResult {
                transaction_id: r
                    .transaction
                    .get("transaction_id")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string(),
                decision: r.decision,
                score: r.score,
                model_version: r.model_version,
                rule_hits: r.rule_hits,
                features: r.features,
                transaction: r.transaction,
            })
            .collect();
        serde_json::to_vec(&ScoreResponse { recorded, results }).unwrap()
    }

    fn decided() -> RecordBatch {
        let n = 3;
        let mut fields = Vec::new();
        let mut columns: Vec<ArrayRef> = Vec::new();
        for (i, (name, kind, _, _)) in canonical::COLUMNS.iter().enumerate() {
            let (t, c): (DataType, ArrayRef) = match kind {
                CanonicalType::Text => (
                    DataType::Utf8,
                    Arc::new(StringArray::from(vec![
                        Some(format!("{name}-\"é\\\n{i}")),
                        None,
                        Some(name.to_string()),
                    ])),
                ),
                CanonicalType::Time => (
                    DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
                    Arc::new(
                        TimestampMillisecondArray::from(vec![
                            Some(1_762_000_003_740),
                            None,
                            Some(-1),
                        ])
                        .with_timezone("UTC"),
                    ),
                ),
                CanonicalType::Money => (
                    DataType::Decimal128(18, 2),
                    Arc::new(
                        Decimal128Array::from(vec![Some(4210), None, Some(-5)])
                            .with_precision_and_scale(18, 2)
                            .unwrap(),
                    ),
                ),
                CanonicalType::Coordinate => (
                    DataType::Float64,
                    Arc::new(Float64Array::from(vec![Some(-23.55), Some(f64::NAN), None])),
                ),
                other => unreachable!("{other:?} is no fixed column's kind"),
            };
            fields.push(Field::new(*name, t, true));
            columns.push(c);
        }
        // Two declared attributes: part of the transaction, not of the features.
        let attributes: Vec<(&str, ArrayRef)> = vec![
            (
                "cvv_result",
                Arc::new(StringArray::from(vec![Some("N"), None, Some("M")])),
            ),
            (
                "risk_points",
                Arc::new(Int64Array::from(vec![Some(7), Some(0), None])),
            ),
        ];
        for (name, c) in attributes {
            fields.push(Field::new(name, c.data_type().clone(), true));
            columns.push(c);
        }
        let width = fields.len();
        // Features, not in name order, of each kind the engine writes (Float32 goes through
        // Arrow's writer).
        let features: Vec<(&str, ArrayRef)> = vec![
            (
                "z_sum",
                Arc::new(
                    Decimal128Array::from(vec![Some(123_456), Some(0), None])
                        .with_precision_and_scale(20, 2)
                        .unwrap(),
                ),
            ),
            (
                "a_count",
                Arc::new(Int64Array::from(vec![Some(3), None, Some(i64::MIN)])),
            ),
            (
                "m_ratio",
                Arc::new(Float64Array::from(vec![
                    Some(0.1),
                    Some(f64::INFINITY),
                    Some(1e-7),
                ])),
            ),
            (
                "b_f32",
                Arc::new(Float32Array::from(vec![Some(0.1f32), None, Some(-0.0)])),
            ),
        ];
        for (name, c) in features {
            fields.push(Field::new(name, c.data_type().clone(), true));
            columns.push(c);
        }
        let tail: Vec<(&str, ArrayRef)> = vec![
            (
                SCORE,
                Arc::new(Float64Array::from(vec![Some(0.93), None, Some(f64::NAN)])),
            ),
            (
                MODEL_VERSION,
                Arc::new(StringArray::from(vec![Some("m-1"), None, Some("m-1")])),
            ),
            (
                DECISION,
                Arc::new(StringArray::from(vec![
                    Some("decline"),
                    Some("approve"),
                    None,
                ])),
            ),
            (
                RULE_HITS,
                Arc::new(StringArray::from(vec![
                    Some(r#"[{"rule":"r1","severity":"high","reason":"x \"y\""}]"#),
                    Some("[]"),
                    Some("not json"),
                ])),
            ),
            (
                "explanation",
                Arc::new(StringArray::from(vec![Some("{}"), None, None])),
            ),
        ];
        for (name, c) in tail {
            fields.push(Field::new(name, c.data_type().clone(), true));
            columns.push(c);
        }
        let schema = canonical::with_width(Schema::new(fields), width);
        let b = RecordBatch::try_new(Arc::new(schema), columns).unwrap();
        assert_eq!(b.num_rows(), n);
        b
    }

    #[test]
    fn the_direct_response_is_what_the_maps_serialised_to() {
        let b = decided();
        for recorded in [false, true] {
            let direct = response_body(&b, recorded).unwrap();
            assert_eq!(
                String::from_utf8(direct).unwrap(),
                String::from_utf8(through_maps(&b, recorded)).unwrap()
            );
        }
        for (at, len) in [(0, 1), (1, 2), (0, 0)] {
            let s = b.slice(at, len);
            assert_eq!(response_body(&s, true).unwrap(), through_maps(&s, true));
        }
        let v: Value = serde_json::from_slice(&response_body(&b, false).unwrap()).unwrap();
        assert_eq!(v["results"][0]["transaction"]["amount"], "42.10");
        assert_eq!(v["results"][0]["rule_hits"][0]["rule"], "r1");
        assert_eq!(v["results"][2]["rule_hits"], "not json");
        assert_eq!(v["results"][2]["decision"], "");
        assert!(v["results"][0].get("explanation").is_none());
        assert_eq!(v["results"][0]["transaction"]["cvv_result"], "N");
        assert_eq!(v["results"][0]["transaction"]["risk_points"], 7);
        assert!(v["results"][0]["features"].get("cvv_result").is_none());
        assert_eq!(v["results"][0]["features"]["a_count"], 3);
    }
}
