//! HTTP API (axum): health, live figures and Prometheus metrics, served beside the pipeline.
//!
//! Every error is a JSON body `{"error": "..."}` with a 4xx status for client mistakes.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::sink::Sink;

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
}

/// Shared state of the handlers.
#[derive(Clone)]
pub struct ApiState {
    /// Process metrics.
    pub metrics: Arc<Metrics>,
    /// The sink (figures of the memory store in the demo).
    pub sink: Sink,
}

/// The router.
pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/health/live", get(live))
        .route("/health/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/v1/stats", get(stats))
        .fallback(not_found)
        .with_state(state)
}

/// Bind `addr` and serve until `cancel`. Returns the bound address (port 0 picks one).
pub async fn serve(
    addr: &str,
    state: ApiState,
    cancel: CancellationToken,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), ApiError> {
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
    let app = router(state);
    let handle = tokio::spawn(async move {
        let r = axum::serve(listener, app)
            .with_graceful_shutdown(async move { cancel.cancelled().await })
            .await;
        if let Err(e) = r {
            tracing::error!(error = %e, "HTTP server stopped");
        }
    });
    Ok((local, handle))
}

async fn live() -> Json<serde_json::Value> {
    Json(json!({ "status": "live" }))
}

async fn ready(State(s): State<ApiState>) -> Response {
    let sql = match s.metrics.reload_error.lock().expect("reload lock").clone() {
        None => json!({ "status": "ok" }),
        Some(e) => {
            json!({ "status": "reload_failed", "error": e, "detail": "the previous SQL version keeps running" })
        }
    };
    if s.metrics.sink_ready.get() >= 1.0 {
        Json(json!({ "status": "ready", "lag": s.metrics.total_lag(), "sql": sql })).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "starting", "detail": "sink not connected yet" })),
        )
            .into_response()
    }
}

async fn metrics(State(s): State<ApiState>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.metrics.render(),
    )
        .into_response()
}

async fn stats(State(s): State<ApiState>) -> Json<serde_json::Value> {
    let m = &s.metrics;
    let mut body = json!({
        "messages_in": m.messages_in.get(),
        "transactions": m.transactions_out.get(),
        "dead_letters": m.dead_letters.get(),
        "batches": m.batches.get(),
        "duplicates": m.duplicates.get(),
        "lag": m.total_lag(),
    });
    if let Sink::Memory(mem) = &s.sink {
        let (rows, dead) = mem.totals();
        body["memory_store"] = json!({ "transactions": rows, "dead_letters": dead });
    }
    Json(body)
}

async fn not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(json!({ "error": "no such endpoint; see /health/live, /health/ready, /metrics, /v1/stats" })),
    )
        .into_response()
}
