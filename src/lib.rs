//! Payguard: real-time payment fraud detection in one process.
//!
//! ```text
//!   Kafka topics ──► source ──► decode ──► engine (DataFusion SQL) ──► sink ──► PostgreSQL
//!   (or simulator)   Chunks     Arrow      mapping -> canonical rows   one transaction per
//!                    Batcher    batches                                  batch: rows + offsets
//! ```
//!
//! Modules, one per stage:
//! - [`config`]: the TOML file, parsed into documented structs; every problem reported at once.
//! - [`source`]: inputs ([`source::kafka`] partitions with rskafka, the [`source::simulator`]) and
//!   the [`source::Batcher`] that cuts micro-batches by rows or time.
//! - [`decode`]: raw JSON messages -> Arrow record batches; bad messages -> dead letters.
//! - [`engine`]: SQL files compiled once and re-executed per batch ([`engine::sql`]), the
//!   canonical transaction contract ([`engine::canonical`]).
//! - [`sink`]: PostgreSQL (COPY, offsets in the same transaction: exactly-once) and memory.
//! - [`pipeline`]: wiring of the stages with bounded channels and one cancellation token.
//! - [`replay`]: the same SQL offline over files, to Parquet (training sets, backtests).
//! - [`api`]: HTTP API (axum): scoring, alerts, transactions, labels, health, metrics, OpenAPI.
//! - [`model`]: the ONNX fraud model (ort): batched scoring from Arrow, feature contract checks,
//!   explanations by occlusion.
//! - [`online`]: the link between the API and the engine task (scoring jobs, alert events).
//! - [`metrics`]: counters, gauges, histograms in Prometheus text format.
//! - [`app`]: glue behind the CLI commands.
//! - [`bench`]: `payguard bench` measurements (BENCHMARKS.md).

pub mod api;
pub mod app;
pub mod bench;
pub mod config;
pub mod decode;
pub mod engine;
pub mod metrics;
pub mod model;
pub mod online;
pub mod pipeline;
pub mod replay;
pub mod sink;
pub mod source;
