//! `POST /v1/score`: one transaction or a batch, canonical or in a source's format, scored by the
//! engine task against the live entity history.

use std::path::PathBuf;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json, Response};
use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::compute::concat_batches;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::{mpsc::error::TrySendError, oneshot};

use super::{ApiState, ErrorBody, Failure, has_nul};
use crate::config::{FieldConfig, SourceConfig};
use crate::decode::{JsonDecoder, RawMessage};
use crate::engine::canonical::{self, CanonicalType, Conformer};
use crate::engine::online::OnlineInput;
use crate::online::{ScoreJob, decided_json};

/// Decoder of canonical transactions given as JSON objects (the source-mapping contract's columns).
#[derive(Debug)]
pub struct CanonicalDecoder {
    decoder: JsonDecoder,
    conformer: Conformer,
}

impl CanonicalDecoder {
    /// Build it (`max_bytes`: largest transaction).
    pub fn new(max_bytes: usize) -> Result<Self, String> {
        let fields = canonical::COLUMNS
            .iter()
            .map(|(name, kind, required, _)| FieldConfig {
                name: name.to_string(),
                data_type: match kind {
                    CanonicalType::Text => "string",
                    CanonicalType::Time => "timestamp",
                    CanonicalType::Money => "decimal(18,2)",
                    CanonicalType::Coordinate => "float64",
                }
                .into(),
                required: *required,
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
        let conformer = Conformer::new(&decoder.output_schema())?;
        Ok(Self { decoder, conformer })
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
                .filter(|k| !canonical::COLUMNS.iter().any(|c| c.0 == k.as_str()))
                .map(String::as_str)
                .collect();
            if !unknown.is_empty() {
                problems.push((
                    Some(i),
                    format!(
                        "unknown column(s) {}; canonical columns: {} (for a source's own format, give `source`)",
                        unknown.join(", "),
                        canonical::COLUMNS.iter().map(|c| c.0).collect::<Vec<_>>().join(", ")
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
        concat_batches(&canonical::schema(), [&conformed.rows])
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
        Ok(r) => (StatusCode::OK, Json(r)).into_response(),
        Err(f) => f.into_response(),
    }
}

async fn score_inner(
    s: ApiState,
    query: Result<Query<ScoreQuery>, QueryRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<ScoreResponse, Failure> {
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
    let rows =
        decided_json(&decided).map_err(|e| Failure::new(StatusCode::INTERNAL_SERVER_ERROR, e))?;
    Ok(ScoreResponse {
        recorded: req.record,
        results: rows
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
            .collect(),
    })
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
