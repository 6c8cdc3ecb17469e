//! Configuration: the TOML file a user writes, parsed into plain structs.
//!
//! The structs here are *descriptions*; runtime objects (Kafka clients, compiled SQL, database pools)
//! are built from them by the stages that own them. Every struct rejects unknown keys, every field is
//! documented, and [`load`] reports every problem of a file at once, each with its line
//! (see [`validation`]).

mod locate;
pub mod validation;

use std::path::{Path, PathBuf};

use serde::Deserialize;

pub use locate::KeyLines;
pub use validation::{ConfigError, ConfigErrors};

/// Environment variable that overrides `postgres.url` (keeps the password out of the file).
pub const ENV_POSTGRES_URL: &str = "PAYGUARD_POSTGRES_URL";
/// Environment variable holding the database password (overrides `postgres.password_file` and
/// the password of `postgres.url`).
pub const ENV_POSTGRES_PASSWORD: &str = "PAYGUARD_POSTGRES_PASSWORD";
/// Environment variable holding the Kafka SASL password (overrides `kafka.sasl.password_file`).
pub const ENV_KAFKA_PASSWORD: &str = "PAYGUARD_KAFKA_PASSWORD";
/// Environment variable that overrides `kafka.brokers` (comma-separated `host:port` list).
pub const ENV_KAFKA_BROKERS: &str = "PAYGUARD_KAFKA_BROKERS";

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Pipeline-wide settings: name, input and sink kinds, micro-batching, queue depths.
    #[serde(default)]
    pub pipeline: PipelineConfig,
    /// Kafka connection and fetch settings (used when `pipeline.input = "kafka"` and by `generate`).
    #[serde(default)]
    pub kafka: KafkaConfig,
    /// PostgreSQL / TimescaleDB connection and write settings (used when `pipeline.sink = "postgres"`).
    #[serde(default)]
    pub postgres: PostgresConfig,
    /// The SQL engine: features, rules, aggregates, event time, decisions.
    #[serde(default)]
    pub engine: EngineConfig,
    /// HTTP API settings.
    #[serde(default)]
    pub api: ApiConfig,
    /// Built-in payment simulator settings (`generate`, and the `simulator` input of `demo`).
    #[serde(default)]
    pub simulator: SimulatorConfig,
    /// Label feedback (chargebacks, fraud reports, analyst verdicts): stored, and read by
    /// `fraud_labels(*)` / `known_labels(*)` in `features.sql`.
    #[serde(default)]
    pub labels: LabelsConfig,
    /// Payment sources: one per message shape / Kafka topic, each mapped to the canonical
    /// transaction by its own SQL file.
    #[serde(default)]
    pub sources: Vec<SourceConfig>,
    /// Source attributes: the user's own typed columns (a card's CVV result, a PIX initiation
    /// type, a data set's anonymised signals) that a source mapping may select beside the
    /// canonical columns. They reach `features.sql`, `rules.sql`, the aggregates, the model, the
    /// API and the `transactions` table (one column each).
    #[serde(default)]
    pub attributes: Vec<AttributeConfig>,
    /// The fraud model (ONNX). Without this section, `score` stays NULL and decisions come from
    /// the rules.
    #[serde(default)]
    pub model: Option<ModelConfig>,

    /// Directory of the config file; relative paths in the file are resolved against it.
    #[serde(skip)]
    pub base_dir: PathBuf,
}

/// Where transactions come from.
#[derive(Debug, Clone, Copy, Deserialize, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum InputKind {
    /// Consume every partition of every source topic from Kafka.
    #[default]
    Kafka,
    /// Generate traffic in-process with the built-in simulator (no external service).
    Simulator,
}

/// Where results go.
#[derive(Debug, Clone, Copy, Deserialize, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SinkKind {
    /// PostgreSQL / TimescaleDB; results and consumed offsets commit in one transaction.
    #[default]
    Postgres,
    /// In-process memory store (demo and tests); nothing survives a restart.
    Memory,
}

/// `[pipeline]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    /// Name of this pipeline; offsets are stored under it, so two pipelines can share a database.
    #[serde(default = "default_pipeline_name")]
    pub name: String,
    /// Input kind: `"kafka"` or `"simulator"`.
    #[serde(default)]
    pub input: InputKind,
    /// Sink kind: `"postgres"` or `"memory"`.
    #[serde(default)]
    pub sink: SinkKind,
    /// A micro-batch closes when it holds this many messages (1 ..= 1,000,000).
    #[serde(default = "default_batch_max_rows")]
    pub batch_max_rows: usize,
    /// ... or when this many milliseconds have passed since its first message (1 ..= 60,000).
    #[serde(default = "default_batch_max_wait_ms")]
    pub batch_max_wait_ms: u64,
    /// Capacity, in micro-batches, of each bounded queue between stages (1 ..= 64).
    #[serde(default = "default_queue_depth")]
    pub queue_depth: usize,
    /// On SIGINT/SIGTERM, how long to keep trying to commit in-flight batches before giving up
    /// (they are then re-read from Kafka on the next start; nothing is lost).
    #[serde(default = "default_shutdown_timeout_ms")]
    pub shutdown_timeout_ms: u64,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            name: default_pipeline_name(),
            input: InputKind::default(),
            sink: SinkKind::default(),
            batch_max_rows: default_batch_max_rows(),
            batch_max_wait_ms: default_batch_max_wait_ms(),
            queue_depth: default_queue_depth(),
            shutdown_timeout_ms: default_shutdown_timeout_ms(),
        }
    }
}

/// Where to start a partition that has no stored offset yet.
#[derive(Debug, Clone, Copy, Deserialize, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum StartFrom {
    /// The oldest record the broker still keeps.
    #[default]
    Earliest,
    /// Only records produced after the first start.
    Latest,
}

/// `[kafka]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// Bootstrap brokers, `host:port`. Override: `PAYGUARD_KAFKA_BROKERS` (comma-separated).
    #[serde(default = "default_brokers")]
    pub brokers: Vec<String>,
    /// Client id sent to the broker.
    #[serde(default = "default_client_id")]
    pub client_id: String,
    /// Start position for a partition never seen before: `"earliest"` or `"latest"`.
    #[serde(default)]
    pub start_from: StartFrom,
    /// Upper bound of bytes per fetch request and partition (1 KiB ..= 256 MiB).
    #[serde(default = "default_fetch_max_bytes")]
    pub fetch_max_bytes: i32,
    /// How long the broker may hold a fetch waiting for data, in milliseconds (1 ..= 30,000).
    #[serde(default = "default_fetch_max_wait_ms")]
    pub fetch_max_wait_ms: i32,
    /// Messages larger than this many bytes go to the dead-letter table instead of being decoded.
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: usize,
    /// First retry delay after a broker error, in milliseconds; doubles up to `retry_max_ms`.
    #[serde(default = "default_retry_initial_ms")]
    pub retry_initial_ms: u64,
    /// Longest retry delay after repeated broker errors, in milliseconds.
    #[serde(default = "default_retry_max_ms")]
    pub retry_max_ms: u64,
    /// `[kafka.tls]`: TLS to the brokers (SSL and SASL_SSL listeners). Absent: plaintext.
    #[serde(default)]
    pub tls: Option<KafkaTlsConfig>,
    /// `[kafka.sasl]`: SASL authentication (over TLS unless the listener is SASL_PLAINTEXT).
    /// Absent: none.
    #[serde(default)]
    pub sasl: Option<KafkaSaslConfig>,
}

/// `[kafka.tls]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaTlsConfig {
    /// PEM file of the CA(s) the brokers' certificates must chain to (relative to this file).
    /// Each broker's certificate must name the host it is reached by.
    pub ca_file: PathBuf,
    /// PEM client certificate chain, for brokers that authenticate clients by certificate (with
    /// `key_file`). Empty: none.
    #[serde(default)]
    pub cert_file: PathBuf,
    /// PEM private key of `cert_file`.
    #[serde(default)]
    pub key_file: PathBuf,
}

/// `[kafka.sasl]`
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSaslConfig {
    /// `PLAIN`, `SCRAM-SHA-256` or `SCRAM-SHA-512`.
    pub mechanism: SaslMechanism,
    /// User name.
    pub username: String,
    /// File whose first line is the password (relative to this file);
    /// `PAYGUARD_KAFKA_PASSWORD` overrides it. Never printed.
    #[serde(default)]
    pub password_file: PathBuf,
    /// The password, read from `password_file` or `PAYGUARD_KAFKA_PASSWORD` at start (never
    /// in the file itself).
    #[serde(skip)]
    pub password: String,
}

impl std::fmt::Debug for KafkaSaslConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSaslConfig")
            .field("mechanism", &self.mechanism)
            .field("username", &self.username)
            .field("password_file", &self.password_file)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// SASL mechanisms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum SaslMechanism {
    /// PLAIN (user and password in the clear: only over TLS).
    #[serde(rename = "PLAIN")]
    Plain,
    /// SCRAM-SHA-256.
    #[serde(rename = "SCRAM-SHA-256")]
    ScramSha256,
    /// SCRAM-SHA-512.
    #[serde(rename = "SCRAM-SHA-512")]
    ScramSha512,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            brokers: default_brokers(),
            client_id: default_client_id(),
            start_from: StartFrom::default(),
            fetch_max_bytes: default_fetch_max_bytes(),
            fetch_max_wait_ms: default_fetch_max_wait_ms(),
            max_message_bytes: default_max_message_bytes(),
            retry_initial_ms: default_retry_initial_ms(),
            retry_max_ms: default_retry_max_ms(),
            tls: None,
            sasl: None,
        }
    }
}

/// `[postgres]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    /// Connection URL, `postgres://user:password@host:port/db`. Override: `PAYGUARD_POSTGRES_URL`.
    #[serde(default = "default_postgres_url")]
    pub url: String,
    /// Directory of the schema migrations, applied in order at start.
    #[serde(default = "default_migrations")]
    pub migrations: PathBuf,
    /// Connections in the pool (1 ..= 64).
    #[serde(default = "default_pg_pool")]
    pub max_connections: u32,
    /// First retry delay after a database error, in milliseconds; doubles up to `retry_max_ms`.
    #[serde(default = "default_retry_initial_ms")]
    pub retry_initial_ms: u64,
    /// Longest retry delay after repeated database errors, in milliseconds.
    #[serde(default = "default_retry_max_ms")]
    pub retry_max_ms: u64,
    /// With TimescaleDB: chunks of `transactions`, `alerts` and `dead_letters` older than this are
    /// compressed (a duration like "7 days"; "off": never). Ignored on plain PostgreSQL.
    #[serde(default = "default_compress_after")]
    pub compress_after: String,
    /// Rows older than this are dropped ("off": kept forever, the default). With TimescaleDB a
    /// retention policy drops whole chunks; on plain PostgreSQL the rows are deleted at start.
    #[serde(default = "default_retention")]
    pub retention: String,
    /// Merge each micro-batch's aggregates on a second connection, a batch behind its rows: the
    /// rows of one batch are copied while the aggregates of the one before are merged, so two
    /// database backends work at once. Still exactly-once: the rows' transaction records the
    /// merge it leaves pending, and a start applies what a crash left (computed again from the
    /// stored rows). Aggregates then trail the rows by at most two batches. Needs aggregates
    /// that read only columns stored in `transactions`; a set that reads others (features) is
    /// merged in the rows' transaction, as with `false`.
    #[serde(default = "default_true")]
    pub trail_aggregates: bool,
    /// File whose first line is the database password (relative to this file), read at start:
    /// it replaces the password of `url`, so that neither this file nor the environment holds
    /// it (`PAYGUARD_POSTGRES_PASSWORD` overrides it). Empty: the password of `url`, if any.
    #[serde(default)]
    pub password_file: PathBuf,
}

fn default_compress_after() -> String {
    "7 days".into()
}

fn default_retention() -> String {
    "off".into()
}

impl PostgresConfig {
    /// `compress_after` in milliseconds; `None` when "off".
    pub fn compress_after_ms(&self) -> Option<i64> {
        duration_or_off(&self.compress_after)
    }
    /// `retention` in milliseconds; `None` when "off".
    pub fn retention_ms(&self) -> Option<i64> {
        duration_or_off(&self.retention)
    }
}

/// A positive duration, or `None` for "off" (or anything that is not a duration: validation has
/// reported it).
pub fn duration_or_off(text: &str) -> Option<i64> {
    if text.trim().eq_ignore_ascii_case("off") {
        return None;
    }
    crate::engine::windows::parse_duration_ms(text).filter(|ms| *ms > 0)
}

impl Default for PostgresConfig {
    fn default() -> Self {
        Self {
            url: default_postgres_url(),
            migrations: default_migrations(),
            max_connections: default_pg_pool(),
            retry_initial_ms: default_retry_initial_ms(),
            retry_max_ms: default_retry_max_ms(),
            compress_after: default_compress_after(),
            retention: default_retention(),
            trail_aggregates: true,
            password_file: PathBuf::new(),
        }
    }
}

/// `[engine]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EngineConfig {
    /// Feature SQL: one SELECT over `transactions` yielding `transaction_id` and feature columns,
    /// one row per transaction, with window functions over event-time RANGE frames.
    #[serde(default = "default_features")]
    pub features: PathBuf,
    /// Rule SQL over `scored` yielding `transaction_id, rule, severity, reason` per rule hit.
    #[serde(default = "default_rules")]
    pub rules: PathBuf,
    /// Directory of windowed aggregate SQL files (`*.sql`), each merged into table `agg_<name>`.
    #[serde(default = "default_aggregates")]
    pub aggregates: PathBuf,
    /// History kept per entity, e.g. `"7 days"`: the longest window frame allowed, and how far
    /// back `lag()` looks.
    #[serde(default = "default_history")]
    pub history: String,
    /// How far behind the watermark an event may arrive and still see its full window, e.g.
    /// `"5 minutes"`. Later events are still scored (against the history that is left) and counted
    /// in `payguard_late_events_total`.
    #[serde(default = "default_lateness")]
    pub allowed_lateness: String,
    /// A partition with no message for this long stops holding the watermark back.
    #[serde(default = "default_idle_partition")]
    pub idle_partition_timeout: String,
    /// Entities kept per partition key (card, customer, merchant…); beyond it the least recently
    /// seen are evicted (counted in `payguard_entities_evicted_total`).
    #[serde(default = "default_max_entities")]
    pub max_entities: usize,
    /// Events whose time is more than this ahead of the wall clock are dead-lettered (Kafka input
    /// and API requests; not the built-in simulator, whose events carry its own clock).
    #[serde(default = "default_max_future")]
    pub max_future: String,
    /// Model score at or above which a transaction is sent to review (0 ..= 1).
    #[serde(default = "default_review_threshold")]
    pub review_threshold: f64,
    /// Model score at or above which a transaction is declined (review_threshold ..= 1).
    #[serde(default = "default_decline_threshold")]
    pub decline_threshold: f64,
    /// Watch the SQL files and reload them on change (SIGHUP reloads too).
    #[serde(default = "default_true")]
    pub hot_reload: bool,
    /// At start, with the PostgreSQL sink, the window state is rebuilt from the stored
    /// transactions of the longest window frame plus the allowed lateness (measured back from the
    /// newest stored event time), so a restart does not reset the entities' history: at most this
    /// many of them, the newest (0 ..= 100,000,000; 0 turns the rebuild off).
    #[serde(default = "default_warm_max_rows")]
    pub warm_max_rows: u64,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            features: default_features(),
            rules: default_rules(),
            aggregates: default_aggregates(),
            history: default_history(),
            allowed_lateness: default_lateness(),
            idle_partition_timeout: default_idle_partition(),
            max_entities: default_max_entities(),
            max_future: default_max_future(),
            review_threshold: default_review_threshold(),
            decline_threshold: default_decline_threshold(),
            hot_reload: true,
            warm_max_rows: default_warm_max_rows(),
        }
    }
}

impl EngineConfig {
    /// `history` in milliseconds (validated at load).
    pub fn history_ms(&self) -> i64 {
        crate::engine::windows::parse_duration_ms(&self.history).unwrap_or(7 * 86_400_000)
    }
    /// `allowed_lateness` in milliseconds.
    pub fn lateness_ms(&self) -> i64 {
        crate::engine::windows::parse_duration_ms(&self.allowed_lateness).unwrap_or(300_000)
    }
    /// `idle_partition_timeout` in milliseconds.
    pub fn idle_partition_ms(&self) -> i64 {
        crate::engine::windows::parse_duration_ms(&self.idle_partition_timeout).unwrap_or(30_000)
    }
    /// `max_future` in milliseconds.
    pub fn max_future_ms(&self) -> i64 {
        crate::engine::windows::parse_duration_ms(&self.max_future).unwrap_or(3_600_000)
    }
}

/// `[api]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// Serve the HTTP API (health, live figures) while the pipeline runs.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Listen address, `ip:port`.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// API keys accepted on `/v1/*` (header `Authorization: Bearer <key>` or `X-API-Key`); with
    /// none here nor in `api_key_env`, the API is open.
    #[serde(default)]
    pub api_keys: Vec<String>,
    /// Environment variable holding more API keys, comma-separated (keeps them out of the file);
    /// empty: none.
    #[serde(default = "default_api_key_env")]
    pub api_key_env: String,
    /// File with more API keys, one per line (blank lines and `#` comments skipped; each at
    /// least 16 characters), read at start. Empty: none.
    #[serde(default)]
    pub api_keys_file: PathBuf,
    /// PEM certificate chain served over HTTPS (with `tls_key_file`; relative to this file).
    /// Empty: plain HTTP.
    #[serde(default)]
    pub tls_cert_file: PathBuf,
    /// PEM private key of `tls_cert_file`.
    #[serde(default)]
    pub tls_key_file: PathBuf,
    /// Largest request body accepted, in bytes (larger: 413).
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: usize,
    /// Most transactions in one `POST /v1/score` request.
    #[serde(default = "default_max_batch")]
    pub max_batch: usize,
    /// Scoring requests waiting for the engine at most; beyond, 503 with `Retry-After`.
    #[serde(default = "default_score_queue")]
    pub score_queue: usize,
    /// How long a scoring request waits for the engine before a 503.
    #[serde(default = "default_score_timeout_ms")]
    pub score_timeout_ms: u64,
    /// While scoring requests come in (one served in the last second), stream micro-batches are
    /// decided in slices of at most this many rows, and waiting requests are served between two
    /// slices: a request then waits for one slice of the stream, not a whole batch. 0: whole
    /// batches. Results do not depend on it.
    #[serde(default = "default_stream_slice_rows")]
    pub stream_slice_rows: usize,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: default_listen(),
            api_keys: Vec::new(),
            api_key_env: default_api_key_env(),
            api_keys_file: PathBuf::new(),
            tls_cert_file: PathBuf::new(),
            tls_key_file: PathBuf::new(),
            max_body_bytes: default_max_body_bytes(),
            max_batch: default_max_batch(),
            score_queue: default_score_queue(),
            score_timeout_ms: default_score_timeout_ms(),
            stream_slice_rows: default_stream_slice_rows(),
        }
    }
}

fn default_api_key_env() -> String {
    "PAYGUARD_API_KEYS".into()
}
fn default_max_body_bytes() -> usize {
    1_048_576
}
fn default_max_batch() -> usize {
    1000
}
fn default_score_queue() -> usize {
    4096
}
fn default_score_timeout_ms() -> u64 {
    2000
}
fn default_stream_slice_rows() -> usize {
    64
}

/// `[simulator]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimulatorConfig {
    /// Seed of the deterministic random generator: same seed, same bytes.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Number of simulated customers.
    #[serde(default = "default_customers")]
    pub customers: usize,
    /// Number of simulated merchants.
    #[serde(default = "default_merchants")]
    pub merchants: usize,
    /// Fraction of transactions that are fraudulent (0 ..= 0.5).
    #[serde(default = "default_fraud_rate")]
    pub fraud_rate: f64,
    /// Simulated start time, RFC 3339 (e.g. `"2026-11-01T00:00:00Z"`).
    #[serde(default = "default_start_time")]
    pub start_time: String,
    /// Transactions per second for the in-process `simulator` input (`demo`); 0 means as fast as possible.
    #[serde(default = "default_sim_rate")]
    pub rate: u64,
}

impl Default for SimulatorConfig {
    fn default() -> Self {
        Self {
            seed: default_seed(),
            customers: default_customers(),
            merchants: default_merchants(),
            fraud_rate: default_fraud_rate(),
            start_time: default_start_time(),
            rate: default_sim_rate(),
        }
    }
}

/// `[labels]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabelsConfig {
    /// Consume label messages (from `topic` with the Kafka input; simulated with the simulator
    /// input), store them in `labels` and feed them to the label features.
    #[serde(default)]
    pub enabled: bool,
    /// Kafka topic of the label messages (`generate --labels` writes to it).
    #[serde(default = "default_labels_topic")]
    pub topic: String,
    /// Partitions to create when `generate --create-topics` creates the topic.
    #[serde(default = "default_label_partitions")]
    pub partitions: i32,
    /// The longest frame a label window (`fraud_labels(*)`, `known_labels(*)`) may use, e.g.
    /// `"90 days"`. Only labels are kept that long, not transactions.
    #[serde(default = "default_label_history")]
    pub history: String,
    /// Recent transactions indexed (id, event time, entity keys) to attribute a label to its
    /// transaction's entities without a database lookup; older ones are looked up.
    #[serde(default = "default_label_index")]
    pub index_max: usize,
}

fn default_labels_topic() -> String {
    "payguard.labels".into()
}
fn default_label_partitions() -> i32 {
    1
}
fn default_label_history() -> String {
    "90 days".into()
}
fn default_label_index() -> usize {
    2_000_000
}

impl Default for LabelsConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            topic: default_labels_topic(),
            partitions: default_label_partitions(),
            history: default_label_history(),
            index_max: default_label_index(),
        }
    }
}

impl LabelsConfig {
    /// `history` in milliseconds (validated at load).
    pub fn history_ms(&self) -> i64 {
        crate::engine::windows::parse_duration_ms(&self.history).unwrap_or(90 * 86_400_000)
    }
}

/// `[model]`: the ONNX fraud model scored on every transaction (see `models/train.py`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// ONNX file written by `models/train.py` (input `features`, output `score`, `payguard.*`
    /// metadata).
    pub path: PathBuf,
    /// Label column the model was trained on (read by `models/train.py`; checked against the
    /// model's `payguard.label_column`).
    #[serde(default = "default_label_column")]
    pub label_column: String,
    /// Features stored with each alert as its explanation: the top contributions by occlusion
    /// (0 = no explanations; at most 100).
    #[serde(default = "default_explain_top")]
    pub explain_top: usize,
    /// ONNX Runtime shared library. Empty: `ORT_DYLIB_PATH`, then
    /// `~/.cache/payguard/onnxruntime/lib/libonnxruntime.so` (what `.ci/onnxruntime.sh`
    /// installs), then the system's `libonnxruntime.so`.
    #[serde(default)]
    pub ort_library: PathBuf,
    /// Threads ONNX Runtime may use per scoring call (1 ..= 64).
    #[serde(default = "default_model_threads")]
    pub threads: usize,
    /// Watch the model file and swap a new version in between two batches (SIGHUP reloads too).
    #[serde(default = "default_true")]
    pub hot_reload: bool,
}

fn default_label_column() -> String {
    "label".into()
}
fn default_explain_top() -> usize {
    5
}
fn default_model_threads() -> usize {
    1
}

/// `[[sources]]`: one payment source.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// Unique name; becomes the canonical `source` value when the mapping SQL says so.
    pub name: String,
    /// Message shape the simulator produces for this source (`"card"`); empty for a source fed
    /// only by external producers.
    #[serde(default)]
    pub simulator: String,
    /// Kafka topic the source is consumed from (and `generate` writes to).
    pub topic: String,
    /// Partitions to create when `generate --create-topics` creates the topic.
    #[serde(default = "default_partitions")]
    pub partitions: i32,
    /// SQL file (relative to the config file) mapping this source's messages, exposed as the table
    /// `input`, to the canonical transaction columns.
    pub mapping: PathBuf,
    /// JSON fields of a message, decoded in this order into Arrow columns.
    pub fields: Vec<FieldConfig>,
}

/// `[[attributes]]`: one source attribute, a column every source mapping may select (a source
/// that does not select it gives NULL).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttributeConfig {
    /// Column name (lower case letters, digits and `_`, starting with a letter); it must not be a
    /// canonical column or a column of `transactions` Payguard writes itself.
    pub name: String,
    /// Type: `number` (float64), `integer` (int64), `boolean`, or `category` (text, one of a set
    /// of values: a model takes it as a categorical input).
    #[serde(rename = "type")]
    pub kind: AttributeKind,
    /// What it means (shown by `payguard check` and in the docs).
    #[serde(default)]
    pub doc: String,
}

/// Types of a source attribute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttributeKind {
    /// Float64 number (a signal, never money: amounts are the canonical `amount`).
    Number,
    /// Int64 integer.
    Integer,
    /// Boolean.
    Boolean,
    /// Text category.
    Category,
}

/// One JSON field of a source message.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FieldConfig {
    /// JSON key.
    pub name: String,
    /// Type: `string`, `int32`, `int64`, `float64`, `boolean`, `timestamp` (RFC 3339 string or epoch
    /// milliseconds) or `decimal(P,S)` (exact; from a JSON string or number).
    #[serde(rename = "type")]
    pub data_type: String,
    /// A message without this field (or with `null`) is dead-lettered.
    #[serde(default)]
    pub required: bool,
}

impl Config {
    /// Topics the pipeline consumes, by input index: every source's, then the labels topic when
    /// label feedback is enabled (index [`Config::label_input`]).
    pub fn input_topics(&self) -> Vec<String> {
        let mut topics: Vec<String> = self.sources.iter().map(|s| s.topic.clone()).collect();
        if self.labels.enabled {
            topics.push(self.labels.topic.clone());
        }
        topics
    }

    /// Input index of the label messages, when enabled.
    pub fn label_input(&self) -> Option<usize> {
        self.labels.enabled.then_some(self.sources.len())
    }

    /// The configured source names, comma-separated (for messages).
    pub fn source_names(&self) -> String {
        self.sources
            .iter()
            .map(|s| s.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Resolve a path from the file against the config file's directory.
    pub fn resolve(&self, path: &Path) -> PathBuf {
        if path.is_absolute() {
            path.to_path_buf()
        } else {
            self.base_dir.join(path)
        }
    }
}

/// Read, parse, override from the environment and validate a config file.
///
/// Every problem is collected first; the error lists them all with file and line.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors::single(ConfigError {
            file: path.to_path_buf(),
            line: None,
            key: String::new(),
            message: format!("cannot read config file: {e}"),
        })
    })?;
    let base_dir = path
        .parent()
        .map(|p| {
            if p.as_os_str().is_empty() {
                PathBuf::from(".")
            } else {
                p.to_path_buf()
            }
        })
        .unwrap_or_else(|| PathBuf::from("."));
    load_str(&text, path, &base_dir, &EnvOverrides::from_env())
}

/// Environment overrides, captured once so tests can pass their own.
#[derive(Debug, Clone, Default)]
pub struct EnvOverrides {
    /// Value of `PAYGUARD_POSTGRES_URL`.
    pub postgres_url: Option<String>,
    /// Value of `PAYGUARD_KAFKA_BROKERS`.
    pub kafka_brokers: Option<String>,
    /// Value of `PAYGUARD_POSTGRES_PASSWORD`.
    pub postgres_password: Option<String>,
    /// Value of `PAYGUARD_KAFKA_PASSWORD`.
    pub kafka_password: Option<String>,
}

impl EnvOverrides {
    /// Read the overrides from the process environment.
    pub fn from_env() -> Self {
        Self {
            postgres_url: std::env::var(ENV_POSTGRES_URL)
                .ok()
                .filter(|s| !s.is_empty()),
            kafka_brokers: std::env::var(ENV_KAFKA_BROKERS)
                .ok()
                .filter(|s| !s.is_empty()),
            postgres_password: std::env::var(ENV_POSTGRES_PASSWORD)
                .ok()
                .filter(|s| !s.is_empty()),
            kafka_password: std::env::var(ENV_KAFKA_PASSWORD)
                .ok()
                .filter(|s| !s.is_empty()),
        }
    }
}

/// Parse and validate config text (see [`load`]).
pub fn load_str(
    text: &str,
    file: &Path,
    base_dir: &Path,
    env: &EnvOverrides,
) -> Result<Config, ConfigErrors> {
    let (parsed, mut errors) = validation::parse_collecting(text, file);
    let Some(mut config) = parsed else {
        return Err(ConfigErrors(errors));
    };
    config.base_dir = base_dir.to_path_buf();
    if let Some(url) = &env.postgres_url {
        config.postgres.url = url.clone();
    }
    if let Some(brokers) = &env.kafka_brokers {
        config.kafka.brokers = brokers
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect();
    }
    errors.extend(validation::validate(&config, text, file));
    errors.extend(validation::read_secrets(&mut config, text, file, env));
    if errors.is_empty() {
        Ok(config)
    } else {
        errors.sort_by_key(|e| e.line);
        errors.dedup();
        Err(ConfigErrors(errors))
    }
}

/// The configuration `payguard demo` runs when no file is given: the shipped sources, the simulator
/// as input and the memory sink.
pub fn demo_default(base_dir: &Path) -> Result<Config, ConfigErrors> {
    let file = base_dir.join("config.toml");
    let mut config = if file.exists() {
        load(&file)?
    } else {
        let text = include_str!("../../config.toml");
        load_str(
            text,
            Path::new("<built-in config.toml>"),
            base_dir,
            &EnvOverrides::default(),
        )?
    };
    config.pipeline.input = InputKind::Simulator;
    config.pipeline.sink = SinkKind::Memory;
    Ok(config)
}

fn default_features() -> PathBuf {
    PathBuf::from("sql/features.sql")
}
fn default_rules() -> PathBuf {
    PathBuf::from("sql/rules.sql")
}
fn default_aggregates() -> PathBuf {
    PathBuf::from("sql/aggregates")
}
fn default_history() -> String {
    "7 days".into()
}
fn default_lateness() -> String {
    "5 minutes".into()
}
fn default_idle_partition() -> String {
    "30 seconds".into()
}
fn default_max_entities() -> usize {
    2_000_000
}
fn default_warm_max_rows() -> u64 {
    5_000_000
}
fn default_max_future() -> String {
    "1 hour".into()
}
fn default_review_threshold() -> f64 {
    0.5
}
fn default_decline_threshold() -> f64 {
    0.9
}
fn default_pipeline_name() -> String {
    "payguard".into()
}
fn default_batch_max_rows() -> usize {
    20_000
}
fn default_batch_max_wait_ms() -> u64 {
    100
}
fn default_queue_depth() -> usize {
    4
}
fn default_shutdown_timeout_ms() -> u64 {
    15_000
}
fn default_brokers() -> Vec<String> {
    vec!["127.0.0.1:9092".into()]
}
fn default_client_id() -> String {
    "payguard".into()
}
fn default_fetch_max_bytes() -> i32 {
    8 * 1024 * 1024
}
fn default_fetch_max_wait_ms() -> i32 {
    100
}
fn default_max_message_bytes() -> usize {
    64 * 1024
}
fn default_retry_initial_ms() -> u64 {
    100
}
fn default_retry_max_ms() -> u64 {
    5_000
}
fn default_postgres_url() -> String {
    "postgres://payguard:payguard@127.0.0.1:5432/payguard".into()
}
fn default_migrations() -> PathBuf {
    PathBuf::from("sql/migrations")
}
fn default_pg_pool() -> u32 {
    4
}
fn default_true() -> bool {
    true
}
fn default_listen() -> String {
    "127.0.0.1:8080".into()
}
fn default_seed() -> u64 {
    42
}
fn default_customers() -> usize {
    20_000
}
fn default_merchants() -> usize {
    2_000
}
fn default_fraud_rate() -> f64 {
    0.005
}
fn default_start_time() -> String {
    "2026-11-01T00:00:00Z".into()
}
fn default_sim_rate() -> u64 {
    2_000
}
fn default_partitions() -> i32 {
    3
}
