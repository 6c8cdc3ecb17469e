//! Reads and feedback: `GET /v1/alerts`, `GET /v1/alerts/stream` (Server-Sent Events),
//! `GET /v1/transactions/{id}`, `POST /v1/labels`.

use std::convert::Infallible;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Json, Response};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::broadcast::error::RecvError;

use super::{ApiState, ErrorBody, Failure};
use crate::sink::query::{AlertFilter, Cursor, Label, MAX_LIMIT};

/// Decisions that make an alert.
#[derive(Debug, Clone, Copy, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum AlertDecision {
    /// Sent to review.
    Review,
    /// Declined.
    Decline,
}

impl AlertDecision {
    fn as_str(self) -> &'static str {
        match self {
            Self::Review => "review",
            Self::Decline => "decline",
        }
    }
}

/// Query of `GET /v1/alerts`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct AlertsQuery {
    /// Event time at or after (RFC 3339).
    pub from: Option<DateTime<Utc>>,
    /// Event time before (RFC 3339).
    pub to: Option<DateTime<Utc>>,
    /// `review` or `decline`.
    pub decision: Option<AlertDecision>,
    /// Source name.
    pub source: Option<String>,
    /// Page size, 1 ..= 1000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

/// A page of alerts, newest event time first.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct AlertsPage {
    /// The alerts: transaction columns, decision, score, model_version, rule_hits, features.
    #[schema(value_type = Vec<Object>)]
    pub alerts: Vec<Value>,
    /// Pass as `cursor` for the next page; null at the end.
    pub next_cursor: Option<String>,
}

/// Whether a time is one PostgreSQL stores (years 1 ..= 9999).
fn in_range(t: &DateTime<Utc>) -> bool {
    use chrono::Datelike;
    (1..=9999).contains(&t.year())
}

fn no_nul(what: &str, s: &str) -> Result<(), Failure> {
    if s.contains('\0') {
        Err(Failure::bad_request(format!(
            "{what} holds a NUL character"
        )))
    } else {
        Ok(())
    }
}

/// Alerts (review and decline decisions), newest first, with cursor paging.
#[utoipa::path(get, path = "/v1/alerts", tag = "alerts",
    params(AlertsQuery),
    responses(
        (status = 200, description = "A page of alerts", body = AlertsPage),
        (status = 400, description = "Bad query parameter", body = ErrorBody),
        (status = 401, description = "API key missing or wrong", body = ErrorBody),
        (status = 503, description = "Store unavailable", body = ErrorBody)
    ),
    security((), ("api_key" = []), ("bearer" = [])))]
pub async fn alerts(
    State(s): State<ApiState>,
    query: Result<Query<AlertsQuery>, QueryRejection>,
) -> Response {
    let r = async {
        let Query(q) = query.map_err(|e| Failure::bad_request(e.body_text()))?;
        let limit = q.limit.unwrap_or(100) as usize;
        if !(1..=MAX_LIMIT).contains(&limit) {
            return Err(Failure::bad_request(format!(
                "limit must be between 1 and {MAX_LIMIT}"
            )));
        }
        if let Some(src) = &q.source {
            no_nul("source", src)?;
        }
        for (what, t) in [("from", &q.from), ("to", &q.to)] {
            if t.is_some_and(|t| !in_range(&t)) {
                return Err(Failure::bad_request(format!(
                    "{what} must be between years 1 and 9999"
                )));
            }
        }
        let cursor =
            match &q.cursor {
                None => None,
                Some(c) => Some(Cursor::decode(c).ok_or_else(|| {
                    Failure::bad_request("cursor is not a next_cursor of this API")
                })?),
            };
        let filter = AlertFilter {
            from: q.from,
            to: q.to,
            decision: q.decision.map(|d| d.as_str().to_string()),
            source: q.source,
            limit,
            cursor,
        };
        let page = s
            .sink
            .alerts(&filter)
            .await
            .map_err(|e| Failure::from_sink(&e))?;
        Ok(AlertsPage {
            alerts: page.alerts,
            next_cursor: page.next_cursor,
        })
    }
    .await;
    match r {
        Ok(p) => Json(p).into_response(),
        Err(f) => f.into_response(),
    }
}

/// Query of `GET /v1/alerts/stream`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct StreamQuery {
    /// Only this decision.
    pub decision: Option<AlertDecision>,
    /// Only this source.
    pub source: Option<String>,
}

/// New alerts as Server-Sent Events (`event: alert`, data: the alert as JSON), as their batches
/// are committed. A client too slow to keep up gets an `event: lagged` with the number skipped.
#[utoipa::path(get, path = "/v1/alerts/stream", tag = "alerts",
    params(StreamQuery),
    responses(
        (status = 200, description = "An endless event stream", content_type = "text/event-stream", body = String),
        (status = 400, description = "Bad query parameter", body = ErrorBody),
        (status = 401, description = "API key missing or wrong", body = ErrorBody),
        (status = 503, description = "No pipeline runs", body = ErrorBody)
    ),
    security((), ("api_key" = []), ("bearer" = [])))]
pub async fn alerts_stream(
    State(s): State<ApiState>,
    query: Result<Query<StreamQuery>, QueryRejection>,
) -> Response {
    let q = match query {
        Ok(Query(q)) => q,
        Err(e) => return Failure::bad_request(e.body_text()).into_response(),
    };
    let Some(online) = &s.online else {
        return Failure::unavailable("no pipeline runs").into_response();
    };
    let rx = online.subscribe_alerts();
    let shutdown = s.shutdown.clone();
    let decision = q.decision.map(AlertDecision::as_str);
    let source = q.source;
    let stream = futures::stream::unfold(
        (rx, std::collections::VecDeque::<Event>::new()),
        move |(mut rx, mut pending)| {
            let source = source.clone();
            let shutdown = shutdown.clone();
            async move {
                loop {
                    if let Some(e) = pending.pop_front() {
                        return Some((Ok::<Event, Infallible>(e), (rx, pending)));
                    }
                    let next = tokio::select! {
                        n = rx.recv() => n,
                        _ = shutdown.cancelled() => return None,
                    };
                    match next {
                        Ok(alerts) => {
                            for a in alerts.iter() {
                                if decision.is_some_and(|d| a["decision"] != d)
                                    || source.as_deref().is_some_and(|x| a["source"] != x)
                                {
                                    continue;
                                }
                                pending
                                    .push_back(Event::default().event("alert").data(a.to_string()));
                            }
                        }
                        Err(RecvError::Lagged(n)) => {
                            pending.push_back(
                                Event::default()
                                    .event("lagged")
                                    .data(json!({ "skipped_batches": n }).to_string()),
                            );
                        }
                        Err(RecvError::Closed) => return None,
                    }
                }
            }
        },
    );
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// One stored transaction with its decision, rule hits, features (alerts) and label.
#[utoipa::path(get, path = "/v1/transactions/{id}", tag = "alerts",
    params(("id" = String, Path, description = "transaction_id")),
    responses(
        (status = 200, description = "The transaction", body = Object),
        (status = 401, description = "API key missing or wrong", body = ErrorBody),
        (status = 404, description = "Not stored (the demo's memory store keeps only the latest batches)", body = ErrorBody),
        (status = 503, description = "Store unavailable", body = ErrorBody)
    ),
    security((), ("api_key" = []), ("bearer" = [])))]
pub async fn transaction(State(s): State<ApiState>, Path(id): Path<String>) -> Response {
    if id.contains('\0') {
        return Failure::new(StatusCode::NOT_FOUND, "no such transaction").into_response();
    }
    match s.sink.transaction(&id).await {
        Ok(Some(t)) => Json(t).into_response(),
        Ok(None) => {
            Failure::new(StatusCode::NOT_FOUND, format!("no transaction {id:?}")).into_response()
        }
        Err(e) => Failure::from_sink(&e).into_response(),
    }
}

/// `fraud` or `genuine`.
#[derive(Debug, Clone, Copy, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum LabelKind {
    /// Confirmed fraud.
    Fraud,
    /// Confirmed genuine.
    Genuine,
}

/// Body of `POST /v1/labels`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LabelRequest {
    /// The labelled transaction.
    pub transaction_id: String,
    /// `fraud` or `genuine`.
    pub label: LabelKind,
    /// chargeback, med, claim, analyst…
    #[serde(default)]
    pub report_type: Option<String>,
    /// When the label became known (RFC 3339; default: now).
    #[serde(default)]
    pub reported_at: Option<DateTime<Utc>>,
    /// Source of the transaction (default: the stored transaction's).
    #[serde(default)]
    pub source: Option<String>,
    /// Event time of the transaction (default: the stored transaction's).
    #[serde(default)]
    pub transaction_time: Option<DateTime<Utc>>,
    /// Fraud scenario, when known.
    #[serde(default)]
    pub fraud_scenario: Option<String>,
}

/// What `POST /v1/labels` did.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct LabelResponse {
    /// False when the transaction was labelled before (the first report wins).
    pub stored: bool,
    /// Whether the transaction is in the store.
    pub transaction_known: bool,
    /// The label as stored (or as refused).
    #[schema(value_type = Object)]
    pub label: Value,
}

/// Confirmed fraud / genuine feedback (chargebacks, claims, analyst verdicts), stored in `labels`
/// for the dashboards, retraining and label-based features; a stored label also reaches the
/// running engine at once, so the label features of the next transactions count it.
#[utoipa::path(post, path = "/v1/labels", tag = "alerts",
    request_body = LabelRequest,
    responses(
        (status = 201, description = "Stored", body = LabelResponse),
        (status = 200, description = "Already labelled: the first report wins", body = LabelResponse),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 401, description = "API key missing or wrong", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 422, description = "Missing or invalid field", body = ErrorBody),
        (status = 503, description = "Store unavailable", body = ErrorBody)
    ),
    security((), ("api_key" = []), ("bearer" = [])))]
pub async fn labels(State(s): State<ApiState>, body: Result<Bytes, BytesRejection>) -> Response {
    let r = async {
        let body = body.map_err(|e| Failure::from_body(&e, s.config.api.max_body_bytes))?;
        let req: LabelRequest = Failure::parse(&body)?;
        let id = req.transaction_id.trim();
        if id.is_empty() || id.len() > 256 {
            return Err(Failure::unprocessable(
                "transaction_id must have 1 to 256 characters",
            ));
        }
        for (what, v) in [
            ("transaction_id", Some(&req.transaction_id)),
            ("report_type", req.report_type.as_ref()),
            ("source", req.source.as_ref()),
            ("fraud_scenario", req.fraud_scenario.as_ref()),
        ] {
            if let Some(v) = v {
                if v.contains('\0') {
                    return Err(Failure::unprocessable(format!(
                        "{what} holds a NUL character"
                    )));
                }
                if v.len() > 256 {
                    return Err(Failure::unprocessable(format!(
                        "{what} is longer than 256 characters"
                    )));
                }
            }
        }
        for (what, t) in [
            ("reported_at", &req.reported_at),
            ("transaction_time", &req.transaction_time),
        ] {
            if t.is_some_and(|t| !in_range(&t)) {
                return Err(Failure::unprocessable(format!(
                    "{what} must be between years 1 and 9999"
                )));
            }
        }
        let label = Label {
            transaction_id: id.to_string(),
            fraud: matches!(req.label, LabelKind::Fraud),
            report_type: req.report_type,
            reported_at: req.reported_at.unwrap_or_else(Utc::now),
            source: req.source,
            transaction_time: req.transaction_time,
            fraud_scenario: req.fraud_scenario,
        };
        let stored = s
            .sink
            .store_label(&label)
            .await
            .map_err(|e| Failure::from_sink(&e))?;
        if stored.stored {
            let _ = s.labels.send(label.clone());
        }
        Ok((stored, label))
    }
    .await;
    match r {
        Ok((stored, label)) => (
            if stored.stored {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            },
            Json(LabelResponse {
                stored: stored.stored,
                transaction_known: stored.transaction_known,
                label: label.to_json(),
            }),
        )
            .into_response(),
        Err(f) => f.into_response(),
    }
}
