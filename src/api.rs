//! HTTP API (axum): synchronous scoring against the live stream state, alerts (paged and as
//! Server-Sent Events), transactions, label feedback, health, Prometheus metrics, the OpenAPI
//! document (`/openapi.json`, generated from this code with utoipa) and the demo page (`/`).
//!
//! Every error is a JSON body `{"error": "...", "details": ...}`: 4xx for client mistakes
//! (malformed JSON 400, wrong types or missing fields 422, unknown endpoint 404, body too large
//! 413, missing or wrong API key 401), 503 only when the engine is overloaded or stopping. No
//! client input can produce a 5xx. `/v1/*` requires an API key when keys are configured
//! (`api.api_keys`, or the variable named by `api.api_key_env`), compared in constant time.

mod records;
mod score;
pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Json, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use utoipa::OpenApi;

use crate::config::{Config, InputKind};
use crate::engine::canonical::Canonical;
use crate::metrics::Metrics;
use crate::online::OnlineLink;
use crate::sink::Sink;
use crate::sink::query::Label;

/// Errors of the API server.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The listen address could not be bound.
    #[error("api.listen {addr}: {source}")]
    Bind {
        /// Address.
        addr: String,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The canonical transaction decoder could not be built (internal error).
    #[error("canonical decoder: {0}")]
    Decoder(String),
    /// The HTTPS certificate or key could not be used.
    #[error("api.tls_cert_file / api.tls_key_file: {0}")]
    Tls(String),
}

/// Shared state of the handlers.
#[derive(Clone)]
pub struct ApiState {
    /// Process metrics.
    pub metrics: Arc<Metrics>,
    /// The sink (PostgreSQL queries, or the memory store of the demo).
    pub sink: Sink,
    /// The configuration.
    pub config: Arc<Config>,
    /// Scoring jobs to the engine task and committed alerts from the sink stage (`None`: no
    /// pipeline runs, scoring answers 503).
    pub online: Option<OnlineLink>,
    /// Labels received by `POST /v1/labels`, after they are stored: the engine task of the
    /// pipeline subscribes (through [`OnlineLink::subscribe_labels`]) and feeds them to the label
    /// features at once.
    pub labels: broadcast::Sender<Label>,
    keys: Arc<Vec<Vec<u8>>>,
    canonical: Arc<score::CanonicalDecoder>,
    /// Fires when the server shuts down (ends the event streams).
    shutdown: CancellationToken,
}

impl ApiState {
    /// State for `config`; the API keys are read from the config and from `api.api_key_env`.
    pub fn new(
        config: Arc<Config>,
        metrics: Arc<Metrics>,
        sink: Sink,
        online: Option<OnlineLink>,
    ) -> Result<Self, ApiError> {
        let mut keys: Vec<Vec<u8>> = config
            .api
            .api_keys
            .iter()
            .map(|k| k.trim().as_bytes().to_vec())
            .collect();
        if !config.api.api_key_env.is_empty()
            && let Ok(v) = std::env::var(&config.api.api_key_env)
        {
            keys.extend(
                v.split(',')
                    .map(str::trim)
                    .filter(|k| !k.is_empty())
                    .map(|k| k.as_bytes().to_vec()),
            );
        }
        let canonical =
            score::CanonicalDecoder::new(Canonical::of(&config), config.api.max_body_bytes)
                .map_err(ApiError::Decoder)?;
        let labels = match &online {
            Some(link) => link.labels().clone(),
            None => broadcast::channel(crate::online::LABEL_BACKLOG).0,
        };
        Ok(Self {
            metrics,
            sink,
            config,
            online,
            labels,
            keys: Arc::new(keys),
            canonical: Arc::new(canonical),
            shutdown: CancellationToken::new(),
        })
    }

    /// Whether API keys are required.
    pub fn auth_required(&self) -> bool {
        !self.keys.is_empty()
    }
}

/// A client or server error as a JSON response.
#[derive(Debug)]
pub struct Failure {
    status: StatusCode,
    error: String,
    details: Option<Value>,
    retry_after: Option<u64>,
}

impl Failure {
    /// An error with a status.
    pub fn new(status: StatusCode, error: impl Into<String>) -> Self {
        Self {
            status,
            error: error.into(),
            details: None,
            retry_after: None,
        }
    }
    /// 400.
    pub fn bad_request(error: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, error)
    }
    /// 422.
    pub fn unprocessable(error: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, error)
    }
    /// 503 with `Retry-After: 1`.
    pub fn unavailable(error: impl Into<String>) -> Self {
        let mut f = Self::new(StatusCode::SERVICE_UNAVAILABLE, error);
        f.retry_after = Some(1);
        f
    }
    /// Attach details.
    pub fn with_details(mut self, details: Value) -> Self {
        self.details = Some(details);
        self
    }

    /// A JSON body that failed to parse: syntax errors are 400, a wrong shape (type, missing or
    /// unknown field) 422.
    pub fn from_json(e: &serde_json::Error) -> Self {
        use serde_json::error::Category;
        match e.classify() {
            Category::Data => Self::unprocessable(format!("invalid request: {e}")),
            Category::Io | Category::Syntax | Category::Eof => {
                Self::bad_request(format!("malformed JSON: {e}"))
            }
        }
    }

    /// Parse a JSON body; the error names the field at fault.
    pub fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, Self> {
        let mut de = serde_json::Deserializer::from_slice(body);
        let v: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            let mut f = Self::from_json(&inner);
            if path != "." && !path.is_empty() {
                f.error = format!("{path}: {}", f.error);
            }
            f
        })?;
        de.end().map_err(|e| Self::from_json(&e))?;
        Ok(v)
    }

    /// A body that could not be read (too large: 413).
    pub fn from_body(e: &axum::extract::rejection::BytesRejection, limit: usize) -> Self {
        match e.status() {
            StatusCode::PAYLOAD_TOO_LARGE => Self::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body too large: at most {limit} bytes (api.max_body_bytes)"),
            ),
            s if s.is_client_error() => Self::new(s, format!("request body: {}", e.body_text())),
            _ => Self::bad_request(format!("request body: {}", e.body_text())),
        }
    }

    /// A sink (database) error: the store is unavailable, not the client's fault.
    pub fn from_sink(e: &crate::sink::SinkError) -> Self {
        tracing::warn!(error = %e, "API query failed");
        Self::unavailable(format!("store unavailable: {e}"))
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let mut body = json!({ "error": self.error });
        if let Some(d) = self.details {
            body["details"] = d;
        }
        let mut r = (self.status, Json(body)).into_response();
        if let Some(s) = self.retry_after {
            r.headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from(s));
        }
        r
    }
}

/// JSON error body of every error response.
#[derive(utoipa::ToSchema, serde::Serialize)]
pub struct ErrorBody {
    /// What is wrong.
    pub error: String,
    /// Per-transaction reasons (scoring), when there are several.
    #[schema(value_type = Option<Object>)]
    pub details: Option<Value>,
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Payguard API",
        description = "Real-time payment fraud detection: synchronous scoring against the live stream state, alerts, transactions, label feedback, health."
    ),
    paths(
        score::score,
        records::alerts,
        records::alerts_stream,
        records::transaction,
        records::labels,
        live,
        ready,
        metrics,
        stats,
    ),
    components(schemas(ErrorBody, records::AlertDecision)),
    modifiers(&SecurityAddon),
    tags(
        (name = "scoring", description = "Synchronous scoring for the authorisation path"),
        (name = "alerts", description = "Review/decline decisions, transactions and label feedback"),
        (name = "operations", description = "Health, figures and metrics"),
    )
)]
struct ApiDoc;

struct SecurityAddon;

impl utoipa::Modify for SecurityAddon {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            utoipa::openapi::security::SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new(
                "X-API-Key",
            ))),
        );
        components.add_security_scheme(
            "bearer",
            utoipa::openapi::security::SecurityScheme::Http(
                HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build(),
            ),
        );
    }
}

/// The OpenAPI document of this API.
pub fn openapi() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

/// The router.
pub fn router(state: ApiState) -> Router {
    let v1 = Router::new()
        .route("/v1/score", post(score::score))
        .route("/v1/alerts", get(records::alerts))
        .route("/v1/alerts/stream", get(records::alerts_stream))
        .route("/v1/transactions/{id}", get(records::transaction))
        .route("/v1/labels", post(records::labels))
        .route("/v1/stats", get(stats))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth));
    Router::new()
        .route("/", get(demo_page))
        .route("/openapi.json", get(openapi_json))
        .route("/health/live", get(live))
        .route("/health/ready", get(ready))
        .route("/metrics", get(metrics))
        .merge(v1)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(state.config.api.max_body_bytes))
        .with_state(state)
}

/// Bind `addr` and serve until `cancel`. Returns the bound address (port 0 picks one).
pub async fn serve(
    addr: &str,
    mut state: ApiState,
    cancel: CancellationToken,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), ApiError> {
    state.shutdown = cancel.clone();
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ApiError::Bind {
            addr: addr.to_string(),
            source,
        })?;
    let local = listener.local_addr().map_err(|source| ApiError::Bind {
        addr: addr.to_string(),
        source,
    })?;
    let api = &state.config.api;
    let acceptor = if api.tls_cert_file.as_os_str().is_empty() {
        None
    } else {
        let cert = state.config.resolve(&api.tls_cert_file);
        let key = state.config.resolve(&api.tls_key_file);
        Some(tls::acceptor(&cert, &key).map_err(ApiError::Tls)?)
    };
    let app = router(state);
    let handle = match acceptor {
        None => tokio::spawn(async move {
            let r = axum::serve(listener, app)
                .with_graceful_shutdown(async move { cancel.cancelled().await })
                .await;
            if let Err(e) = r {
                tracing::error!(error = %e, "HTTP server stopped");
            }
        }),
        Some(acceptor) => tokio::spawn(async move {
            let tls = tls::TlsListener::new(listener, acceptor, cancel.clone());
            let r = axum::serve(tls, app)
                .with_graceful_shutdown(async move { cancel.cancelled().await })
                .await;
            if let Err(e) = r {
                tracing::error!(error = %e, "HTTPS server stopped");
            }
        }),
    };
    Ok((local, handle))
}

/// API-key check of `/v1/*`: `Authorization: Bearer <key>` or `X-API-Key: <key>`, every
/// configured key compared in constant time.
async fn auth(State(s): State<ApiState>, req: Request, next: Next) -> Response {
    if s.keys.is_empty() {
        return next.run(req).await;
    }
    match presented_key(req.headers()) {
        None => Failure::new(
            StatusCode::UNAUTHORIZED,
            "API key required: send `Authorization: Bearer <key>` or `X-API-Key: <key>`",
        )
        .into_response(),
        Some(k) if key_matches(&s.keys, k) => next.run(req).await,
        Some(_) => Failure::new(StatusCode::UNAUTHORIZED, "invalid API key").into_response(),
    }
}

fn presented_key(h: &HeaderMap) -> Option<&[u8]> {
    if let Some(v) = h.get("x-api-key") {
        return Some(v.as_bytes());
    }
    let v = h.get(header::AUTHORIZATION)?.as_bytes();
    let prefix = b"bearer ";
    (v.len() > prefix.len() && v[..prefix.len()].eq_ignore_ascii_case(prefix))
        .then(|| &v[prefix.len()..])
}

/// Constant-time comparison against every key (no early exit on a match; only the lengths of the
/// configured keys can be learnt from timing).
fn key_matches(keys: &[Vec<u8>], presented: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    let mut ok = subtle::Choice::from(0);
    for k in keys {
        ok |= k.as_slice().ct_eq(presented);
    }
    ok.into()
}

async fn demo_page() -> Html<&'static str> {
    Html(include_str!("api/demo.html"))
}

async fn openapi_json() -> Response {
    match openapi().to_json() {
        Ok(text) => ([(header::CONTENT_TYPE, "application/json")], text).into_response(),
        Err(e) => Failure::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

/// The process is up.
#[utoipa::path(get, path = "/health/live", tag = "operations",
    responses((status = 200, description = "The process is up", body = Object)))]
async fn live() -> Json<Value> {
    Json(json!({ "status": "live" }))
}

/// Ready: the store answers, the broker is reachable (Kafka input), with the consumer lag and the
/// status of the last SQL reload.
#[utoipa::path(get, path = "/health/ready", tag = "operations",
    responses(
        (status = 200, description = "Ready", body = Object),
        (status = 503, description = "Not ready: which dependency is missing", body = Object)
    ))]
async fn ready(State(s): State<ApiState>) -> Response {
    let sql = match s.metrics.reload_error.lock().expect("reload lock").clone() {
        None => json!({ "status": "ok" }),
        Some(e) => {
            json!({ "status": "reload_failed", "error": e, "detail": "the previous SQL version keeps running" })
        }
    };
    if s.metrics.sink_ready.get() < 1.0 {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "starting", "detail": "sink not connected yet", "sql": sql })),
        )
            .into_response();
    }
    let db = match tokio::time::timeout(Duration::from_secs(2), s.sink.ping()).await {
        Ok(Ok(())) => json!({ "status": "ok" }),
        Ok(Err(e)) => json!({ "status": "down", "error": e.to_string() }),
        Err(_) => json!({ "status": "down", "error": "no answer within 2 s" }),
    };
    let broker = match s.config.pipeline.input {
        InputKind::Simulator => json!({ "status": "not_used" }),
        InputKind::Kafka => broker_status(&s.config.kafka.brokers).await,
    };
    let ok = db["status"] == "ok" && broker["status"] != "down";
    let body = json!({
        "status": if ok { "ready" } else { "not_ready" },
        "database": db,
        "broker": broker,
        "lag": s.metrics.total_lag(),
        "sql": sql,
    });
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

/// A TCP connection to any bootstrap broker within 1 s.
async fn broker_status(brokers: &[String]) -> Value {
    let mut last = String::from("no brokers configured");
    for b in brokers {
        match tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(b)).await
        {
            Ok(Ok(_)) => return json!({ "status": "ok", "broker": b }),
            Ok(Err(e)) => last = format!("{b}: {e}"),
            Err(_) => last = format!("{b}: no answer within 1 s"),
        }
    }
    json!({ "status": "down", "error": last })
}

/// Prometheus metrics.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text format", body = String, content_type = "text/plain")))]
async fn metrics(State(s): State<ApiState>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.metrics.render(),
    )
        .into_response()
}

/// Live figures: messages, transactions, decisions, dead letters, lag.
#[utoipa::path(get, path = "/v1/stats", tag = "operations",
    responses(
        (status = 200, description = "Figures since start", body = Object),
        (status = 401, description = "API key missing or wrong", body = ErrorBody)
    ),
    security((), ("api_key" = []), ("bearer" = [])))]
async fn stats(State(s): State<ApiState>) -> Json<Value> {
    let m = &s.metrics;
    let mut body = json!({
        "messages_in": m.messages_in.get(),
        "transactions": m.transactions_out.get(),
        "dead_letters": m.dead_letters.get(),
        "batches": m.batches.get(),
        "duplicates": m.duplicates.get(),
        "lag": m.total_lag(),
        "decisions": {
            "approve": m.decisions[0].get(),
            "review": m.decisions[1].get(),
            "decline": m.decisions[2].get(),
        },
        "watermark_ms": m.watermark_ms.get(),
    });
    if let Sink::Memory(mem) = &s.sink {
        let (rows, dead) = mem.totals();
        body["memory_store"] = json!({ "transactions": rows, "dead_letters": dead });
    }
    Json(body)
}

async fn not_found() -> Failure {
    Failure::new(
        StatusCode::NOT_FOUND,
        "no such endpoint; see /openapi.json (GET /health/live, /health/ready, /metrics, /v1/stats, \
         /v1/alerts, /v1/alerts/stream, /v1/transactions/{id}; POST /v1/score, /v1/labels)",
    )
}

async fn method_not_allowed() -> Failure {
    Failure::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method not allowed on this endpoint; see /openapi.json",
    )
}

/// Whether a JSON value holds a NUL character in any string or key (PostgreSQL text cannot).
fn has_nul(v: &Value) -> bool {
    match v {
        Value::String(s) => s.contains('\0'),
        Value::Array(a) => a.iter().any(has_nul),
        Value::Object(o) => o.iter().any(|(k, v)| k.contains('\0') || has_nul(v)),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_matched_exactly() {
        let keys = vec![b"0123456789abcdef".to_vec(), b"another-key-0000".to_vec()];
        assert!(key_matches(&keys, b"0123456789abcdef"));
        assert!(key_matches(&keys, b"another-key-0000"));
        assert!(!key_matches(&keys, b"0123456789abcde"));
        assert!(!key_matches(&keys, b"0123456789abcdeF"));
        assert!(!key_matches(&keys, b""));
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, "Bearer abc".parse().unwrap());
        assert_eq!(presented_key(&h), Some(&b"abc"[..]));
        h.insert(header::AUTHORIZATION, "Basic abc".parse().unwrap());
        assert_eq!(presented_key(&h), None);
        h.insert("x-api-key", "k".parse().unwrap());
        assert_eq!(presented_key(&h), Some(&b"k"[..]));
    }

    #[test]
    fn the_openapi_document_lists_every_endpoint() {
        let doc = openapi().to_json().unwrap();
        for p in [
            "/v1/score",
            "/v1/alerts",
            "/v1/alerts/stream",
            "/v1/transactions/{id}",
            "/v1/labels",
            "/health/ready",
        ] {
            assert!(doc.contains(&format!("\"{p}\"")), "{p} missing");
        }
    }
}
