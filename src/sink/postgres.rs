//! PostgreSQL / TimescaleDB sink: one database transaction per micro-batch holding the decided
//! transactions, the alerts, the merged aggregates, the dead letters and the offsets.
//!
//! Rows go in with COPY straight into `transactions`. A transaction id already stored (a producer
//! retry) makes that COPY fail on the primary key: the transaction is rolled back and the sink
//! answers with the duplicates ([`CommitOutcome::Duplicates`]); the pipeline removes them, computes
//! the aggregates again without them, and commits once more. So a duplicate is stored once *and*
//! counted once in every aggregate, and the common case pays nothing for it.
//!
//! Partial aggregates: groups the sink has never seen committed are COPYed into their table
//! under a savepoint, the others MERGEd through a staging table; a group guessed new that is
//! stored after all rolls the COPY back to the savepoint and the batch is merged
//! ([`super::groups`]).
//!
//! Offsets are written with a guard: a partition's stored offset must still be the one this process
//! started the batch from, or the commit is refused ([`SinkError::Fenced`]).
//!
//! With trailing aggregates ([`PgSink::prepare_trailing`], `postgres.trail_aggregates`) the
//! merges leave the rows' transaction: it records them as pending, and a second connection
//! applies them a batch behind ([`super::trailing`]).

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use datafusion::arrow::array::{
    Array, ArrayRef, BooleanArray, Int64Array, RecordBatch, StringArray, TimestampMillisecondArray,
};
use datafusion::arrow::compute::{filter_record_batch, not};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::arrow::error::ArrowError;
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::{Connection, Row};

use super::groups::{self, KnownGroups};
use super::trailing::{self, Writer};
use super::{CommitOutcome, CommitStats, SinkBatch, SinkError, StoredOffsets, copy};
use crate::config::PostgresConfig;
use crate::engine::aggregates::{AggregateStage, Merge};
use crate::engine::canonical::Canonical;
use crate::engine::{DECISION, EXPLANATION, MODEL_VERSION, RULE_HITS, SCORE};

/// Columns of `transactions` taken from the decided rows, in order: the canonical columns with
/// the declared attributes, then the decision (the sink adds [`COMMIT_SEQ`]).
fn transaction_columns(canonical: &Canonical) -> Vec<&str> {
    let mut c: Vec<&str> = canonical
        .columns()
        .iter()
        .map(|c| c.name.as_str())
        .collect();
    c.extend([SCORE, MODEL_VERSION, DECISION, RULE_HITS]);
    c
}

/// The column of `transactions` naming the database transaction that stored the row.
const COMMIT_SEQ: &str = "commit_seq";

/// Columns of `transactions` the sink writes, in order.
fn written_columns(canonical: &Canonical) -> Vec<&str> {
    let mut c = transaction_columns(canonical);
    c.push(COMMIT_SEQ);
    c
}

/// The decided rows as the sink writes them into `transactions`: [`transaction_columns`] and
/// the `commit_seq` of their transaction.
fn stored_rows(canonical: &Canonical, b: &RecordBatch, seq: i64) -> Result<RecordBatch, SinkError> {
    let p = project(b, &transaction_columns(canonical))?;
    let n = p.num_rows();
    with_column(
        &p,
        Field::new(COMMIT_SEQ, DataType::Int64, false),
        Arc::new(Int64Array::from_value(seq, n)),
    )
}

/// The decided schema narrowed to the columns stored in `transactions`: what trailing merges
/// are computed again from after a crash.
fn stored_schema(canonical: &Canonical, decided: &Schema) -> Result<SchemaRef, SinkError> {
    let fields = transaction_columns(canonical)
        .into_iter()
        .map(|c| {
            decided
                .field_with_name(c)
                .cloned()
                .map_err(|_| internal(format!("decided rows lack column {c}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Arc::new(Schema::new(fields)))
}

/// Columns of `alerts` taken from the decided rows (`features` is added as JSON).
const ALERT_COLUMNS: &[&str] = &[
    "transaction_id",
    "event_time",
    "source",
    "amount",
    "currency",
    "customer_id",
    "card_id",
    "merchant_id",
    DECISION,
    SCORE,
    MODEL_VERSION,
    RULE_HITS,
    EXPLANATION,
];

/// The PostgreSQL sink.
#[derive(Debug, Clone)]
pub struct PgSink {
    pool: PgPool,
    pipeline: String,
    /// The canonical contract: which attribute columns `transactions` has.
    canonical: Arc<Canonical>,
    copy_transactions: String,
    /// The COPY of `transactions` in binary format, and the column types it writes; `None`
    /// when a column has a type the binary encoder does not write (text COPY then).
    copy_transactions_binary: Option<(String, Vec<copy::PgType>)>,
    copy_alerts: String,
    /// Aggregate tables known to exist, by name, with the schema they were created for and their
    /// column types for a binary COPY (when every column has one).
    prepared: Arc<Mutex<HashMap<String, PreparedAggregate>>>,
    /// Groups of each aggregate table known to be stored, by stage name ([`groups`]).
    known: Arc<Mutex<HashMap<String, KnownGroups>>>,
    paths: Arc<PathCounters>,
    /// Set by [`PgSink::prepare_trailing`].
    trailing: Arc<Mutex<Option<Trailing>>>,
    /// `postgres.retry_initial_ms` and `retry_max_ms` (the trailing writer's backoff).
    retry_ms: (u64, u64),
    /// The commit of rows whose COMMIT was sent and not answered (the connection was lost):
    /// whether it landed is asked of the database before the batch is tried again.
    in_doubt: Arc<Mutex<Option<InDoubt>>>,
}

/// A commit of rows that may or may not have landed ([`PgSink::commit`] resolves it).
#[derive(Debug, Clone, Copy)]
struct InDoubt {
    /// [`SinkBatch::seq`] of the batch.
    batch: u64,
    /// Its `commit_seq` (0: it had no rows).
    seq: i64,
    /// Rows it inserted.
    rows: u64,
    /// Whether it left its merges pending (trailing).
    trailing: bool,
    /// The event-time range of its rows.
    first: chrono::DateTime<chrono::Utc>,
    /// See `first`.
    last: chrono::DateTime<chrono::Utc>,
}

/// Trailing aggregate merges ([`trailing`]).
#[derive(Debug)]
struct Trailing {
    /// The task applying them; `None` when merges stay in the rows' transaction.
    writer: Option<Writer>,
    /// [`stored_schema`].
    stored: SchemaRef,
    /// The aggregate stages compiled over `stored`, to apply what a crash left pending; `Err`:
    /// why they cannot be (a stage reads columns `transactions` does not store).
    recovery: Result<Arc<Vec<AggregateStage>>, String>,
    /// Stage sets seen in batches (a reload brings new ones) and whether each may trail.
    checked: Vec<(Arc<Vec<AggregateStage>>, bool)>,
}

/// How the groups of the aggregate merges went in, in the commits this sink attempted (a commit
/// that failed afterwards counts too).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AggregatePaths {
    /// Groups guessed new and COPYed straight into their table.
    pub copied: u64,
    /// Groups merged through the staging table (known ones, and all of a batch whose guess
    /// failed or was paused).
    pub merged: u64,
    /// COPYs of new groups rolled back because a group was stored after all.
    pub fallbacks: u64,
}

#[derive(Debug, Default)]
struct PathCounters {
    copied: AtomicU64,
    merged: AtomicU64,
    fallbacks: AtomicU64,
}

/// An aggregate table known to exist: the schema it was created for, and its column types for a
/// binary COPY (`None`: text COPY).
type PreparedAggregate = (SchemaRef, Option<Vec<copy::PgType>>);

const UNIQUE_VIOLATION: &str = "23505";

/// Rows encoded per COPY message sent.
const COPY_SLICE_ROWS: usize = 2048;

/// The schema version this binary reads and writes: every shipped migration up to it must be
/// applied (`sql/migrations/0007_*`).
pub const SCHEMA_VERSION: i64 = 7;

/// Earlier texts of shipped migrations whose change does not alter what they did on any database
/// that recorded them: (version, SHA-384 of the earlier text, as sqlx records it). A database that
/// applied an earlier text is recorded as having applied the current one, so that sqlx's checksum
/// check does not refuse it.
/// - 0001 made the schema TimescaleDB's whenever the extension was *installed*; it now asks for it
///   to be preloaded too. An installed but not preloaded TimescaleDB failed the earlier text (FATAL
///   at CREATE EXTENSION), so every database that recorded it got what the current text gives.
pub const SUPERSEDED_MIGRATIONS: &[(i64, &str)] = &[(
    1,
    "11899a5bde5ddb3a92af66c58f1dbf0c3b55529766469b2fc1de6c8ec85765f3650cb9b844a593e35cb5d24cdd7f15d9",
)];

/// Record the current text of every [`SUPERSEDED_MIGRATIONS`] entry that the database recorded
/// under its earlier text.
async fn accept_superseded_migrations(
    pool: &PgPool,
    migrator: &sqlx::migrate::Migrator,
) -> Result<(), SinkError> {
    let recorded: bool = sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations') IS NOT NULL")
        .fetch_one(pool)
        .await?;
    if !recorded {
        return Ok(());
    }
    for (version, earlier) in SUPERSEDED_MIGRATIONS {
        let Some(current) = migrator.iter().find(|m| m.version == *version) else {
            continue;
        };
        let updated = sqlx::query(
            "UPDATE _sqlx_migrations SET checksum = $1 WHERE version = $2 AND encode(checksum, 'hex') = $3",
        )
        .bind(&*current.checksum)
        .bind(version)
        .bind(earlier)
        .execute(pool)
        .await?
        .rows_affected();
        if updated > 0 {
            tracing::info!(
                version,
                "migration recorded under an earlier text of the same effect; recorded as the current one"
            );
        }
    }
    Ok(())
}

/// Warn when the server has TimescaleDB installed but this database does not use it (it was not
/// preloaded when the schema was created): the tables are plain PostgreSQL.
async fn warn_if_timescaledb_unused(pool: &PgPool) -> Result<(), SinkError> {
    let (available, used, loaded): (bool, bool, bool) = sqlx::query_as(
        "SELECT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb'), \
                EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb'), \
                EXISTS (SELECT 1 FROM pg_settings WHERE name LIKE 'timescaledb.%')",
    )
    .fetch_one(pool)
    .await?;
    if available && !used {
        let why = if loaded {
            "the schema was created while TimescaleDB was not preloaded"
        } else {
            "TimescaleDB is not in shared_preload_libraries"
        };
        tracing::warn!(
            "the server has TimescaleDB installed but this database does not use it ({why}): \
             tables are plain PostgreSQL (no hypertables, compression or continuous aggregate); \
             README \"TimescaleDB\" says how to use it"
        );
    }
    Ok(())
}

impl PgSink {
    /// Connect (one attempt; the caller retries), apply the migrations in `migrations`, and add
    /// a column to `transactions` for each attribute of `canonical` that has none.
    pub async fn connect(
        cfg: &PostgresConfig,
        migrations: &Path,
        pipeline: &str,
        canonical: Arc<Canonical>,
    ) -> Result<Self, SinkError> {
        let port = cfg
            .url
            .parse::<sqlx::postgres::PgConnectOptions>()
            .map(|o| o.get_port())
            .unwrap_or(5432);
        let pool = PgPoolOptions::new()
            .max_connections(cfg.max_connections)
            .acquire_timeout(Duration::from_secs(10))
            .after_connect(move |_conn, _meta| {
                Box::pin(async move {
                    set_nodelay_on_sockets_to(port);
                    Ok(())
                })
            })
            .connect(&cfg.url)
            .await?;
        let migrator = sqlx::migrate::Migrator::new(migrations)
            .await
            .map_err(|source| SinkError::Migrate {
                dir: migrations.display().to_string(),
                source,
            })?;
        accept_superseded_migrations(&pool, &migrator).await?;
        migrator
            .run(&pool)
            .await
            .map_err(|source| SinkError::Migrate {
                dir: migrations.display().to_string(),
                source,
            })?;
        let applied: Vec<i64> =
            sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success")
                .fetch_all(&pool)
                .await?;
        let missing: Vec<String> = (1..=SCHEMA_VERSION)
            .filter(|v| !applied.contains(v))
            .map(|v| v.to_string())
            .collect();
        if !missing.is_empty() {
            return Err(SinkError::SchemaTooOld {
                dir: migrations.display().to_string(),
                missing: missing.join(", "),
                needed: SCHEMA_VERSION,
            });
        }
        warn_if_timescaledb_unused(&pool).await?;
        let interval = |ms: Option<i64>| ms.map(|ms| format!("{ms} milliseconds"));
        let applied: String =
            sqlx::query_scalar("SELECT payguard_storage_policies($1::interval, $2::interval)")
                .bind(interval(cfg.compress_after_ms()))
                .bind(interval(cfg.retention_ms()))
                .fetch_one(&pool)
                .await?;
        tracing::info!(policies = %applied, "storage policies");
        attribute_columns(&pool, &canonical).await?;
        let tx_cols = written_columns(&canonical).join(", ");
        let copy_transactions_binary =
            column_types(&pool, "transactions", &written_columns(&canonical))
                .await?
                .map(|types| {
                    (
                        format!("COPY transactions ({tx_cols}) FROM STDIN WITH (FORMAT binary)"),
                        types,
                    )
                });
        let mut alert_cols: Vec<&str> = ALERT_COLUMNS.to_vec();
        alert_cols.push("features");
        Ok(Self {
            pool,
            pipeline: pipeline.to_string(),
            canonical,
            copy_transactions: format!("COPY transactions ({tx_cols}) FROM STDIN"),
            copy_transactions_binary,
            copy_alerts: format!("COPY alerts ({}) FROM STDIN", alert_cols.join(", ")),
            prepared: Arc::default(),
            known: Arc::default(),
            paths: Arc::default(),
            trailing: Arc::default(),
            retry_ms: (cfg.retry_initial_ms, cfg.retry_max_ms),
            in_doubt: Arc::default(),
        })
    }

    /// How the groups of the aggregate merges went in so far (tests, benchmarks).
    pub fn aggregate_paths(&self) -> AggregatePaths {
        let p = &self.paths;
        AggregatePaths {
            copied: p.copied.load(Ordering::Relaxed),
            merged: p.merged.load(Ordering::Relaxed),
            fallbacks: p.fallbacks.load(Ordering::Relaxed),
        }
    }

    /// Forget which aggregate groups are stored, as a new process starts: for tables emptied
    /// behind the sink's back (benchmarks; forgetting is never needed for correctness, a group
    /// wrongly known is merged).
    pub fn forget_stored_groups(&self) {
        self.known.lock().expect("known groups lock").clear();
    }

    /// The connection pool (for the API and tests).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Create (or check) the table of every aggregate stage. A table that exists with other
    /// columns is an error naming both shapes.
    pub async fn prepare_aggregates(&self, stages: &[AggregateStage]) -> Result<(), SinkError> {
        let mut conn = self.pool.acquire().await?;
        for s in stages {
            ensure_aggregate_table(&mut conn, s).await?;
            let schema = s.schema();
            let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
            let types = column_types(&mut *conn, &format!("agg_{}", s.name), &names)
                .await?
                .filter(|t| fits(t, &schema));
            self.prepared
                .lock()
                .expect("prepared lock")
                .insert(s.name.clone(), (schema, types));
        }
        Ok(())
    }

    /// Set up trailing aggregate merges for the engine's aggregate `stages` over its `decided`
    /// schema. With `enabled` (`postgres.trail_aggregates`) and stages that read only columns
    /// stored in `transactions`, merges commit a batch behind the rows on a second connection;
    /// otherwise in the rows' transaction. Either way, [`PgSink::load_offsets`] applies the
    /// merges an earlier run left pending. Returns whether merges trail.
    pub async fn prepare_trailing(
        &self,
        stages: &Arc<Vec<AggregateStage>>,
        decided: &Schema,
        enabled: bool,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Result<bool, SinkError> {
        let stored = stored_schema(&self.canonical, decided)?;
        let recovery = over_stored_columns(stages, &stored).await;
        let trails = enabled && !stages.is_empty() && recovery.is_ok();
        if let (true, Err(why)) = (enabled, &recovery) {
            tracing::warn!(%why, "aggregates merge in the rows' transaction (postgres.trail_aggregates needs aggregates over stored columns)");
        }
        let writer = trails.then(|| {
            let mut inner = self.clone();
            inner.trailing = Arc::default();
            Writer::spawn(inner, self.retry_ms.0, self.retry_ms.1, metrics)
        });
        *self.trailing.lock().expect("trailing lock") = Some(Trailing {
            writer,
            stored,
            recovery,
            checked: vec![(stages.clone(), trails)],
        });
        Ok(trails)
    }

    /// Wait until the trailing merges of every commit so far are applied (for shutdown,
    /// benchmarks and tests; a merge not applied stays pending for the next start anyway).
    pub async fn flush_trailing(&self) -> Result<(), SinkError> {
        let writer = self
            .trailing
            .lock()
            .expect("trailing lock")
            .as_ref()
            .and_then(|t| t.writer.clone());
        match writer {
            Some(w) => w.flush().await,
            None => Ok(()),
        }
    }

    /// The trailing writer when a batch computed by `stages` may leave its merges to it: merges
    /// trail, and the stages (new after a reload) read only stored columns.
    async fn trails(&self, stages: &Arc<Vec<AggregateStage>>) -> Option<Writer> {
        if stages.is_empty() {
            return None;
        }
        let (writer, stored) = {
            let t = self.trailing.lock().expect("trailing lock");
            let t = t.as_ref()?;
            let writer = t.writer.clone()?;
            if let Some((_, ok)) = t.checked.iter().find(|(s, _)| Arc::ptr_eq(s, stages)) {
                return ok.then_some(writer);
            }
            (writer, t.stored.clone())
        };
        let ok = over_stored_columns(stages, &stored).await.is_ok();
        if let Some(t) = self.trailing.lock().expect("trailing lock").as_mut() {
            // Only the last few sets matter: the engine holds one at a time.
            if t.checked.len() >= 4 {
                t.checked.remove(0);
            }
            t.checked.push((stages.clone(), ok));
        }
        ok.then_some(writer)
    }

    /// Offsets stored for this pipeline, once the aggregate merges an earlier run left pending
    /// are applied (after [`PgSink::prepare_trailing`]).
    pub async fn load_offsets(&self) -> Result<StoredOffsets, SinkError> {
        self.apply_pending().await?;
        self.stored_offsets().await
    }

    /// Offsets stored for this pipeline.
    async fn stored_offsets(&self) -> Result<StoredOffsets, SinkError> {
        let rows = sqlx::query(
            "SELECT topic, kafka_partition, next_offset FROM consumer_offsets WHERE pipeline = $1",
        )
        .bind(&self.pipeline)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| {
                (
                    (r.get::<String, _>(0), r.get::<i32, _>(1)),
                    r.get::<i64, _>(2),
                )
            })
            .collect())
    }

    /// Apply the merges this pipeline left pending (a crash between a commit of rows and its
    /// merges): each commit's partial aggregates are computed again from its stored rows.
    /// Returns how many commits were pending.
    pub async fn apply_pending(&self) -> Result<usize, SinkError> {
        let (stored, recovery) = match self.trailing.lock().expect("trailing lock").as_ref() {
            Some(t) => (t.stored.clone(), t.recovery.clone()),
            None => return Ok(0),
        };
        let pending = trailing::pending(&self.pool, &self.pipeline).await?;
        if pending.is_empty() {
            return Ok(0);
        }
        let stages = recovery.map_err(|why| {
            internal(format!(
                "{} aggregate merge(s) of pipeline {:?} are pending in sink_pending_aggregates, \
                 and the aggregate files cannot compute them again from the stored rows: {why}",
                pending.len(),
                self.pipeline
            ))
        })?;
        for p in &pending {
            let rows = trailing::stored_rows(&self.pool, &self.canonical, p, &stored).await?;
            let mut aggregates = Vec::with_capacity(stages.len());
            for s in stages.iter() {
                let partial = s.partial(std::slice::from_ref(&rows)).await.map_err(|e| {
                    internal(format!("recomputing the pending merge {}: {e}", p.seq))
                })?;
                aggregates.push((s.name.clone(), partial));
            }
            let job = trailing::Job {
                seq: p.seq,
                stages: stages.clone(),
                aggregates,
            };
            let applied = self.merge_pending(&job).await?;
            tracing::info!(
                commit_seq = p.seq,
                rows = rows.num_rows(),
                applied,
                "pending aggregate merge of an earlier run"
            );
        }
        Ok(pending.len())
    }

    /// Commit a batch: rows, alerts, dead letters and offsets in one transaction, with the
    /// aggregate merges, or with them left pending and handed to the trailing writer; or, when
    /// some of its transactions are stored already, nothing and the list of them.
    pub async fn commit(&self, batch: &SinkBatch) -> Result<CommitOutcome, SinkError> {
        let writer = self.trails(&batch.aggregate_stages).await;
        if let Some(e) = writer.as_ref().and_then(Writer::failure) {
            return Err(e);
        }
        let outcome = match self.landed(batch).await? {
            Some(stats) => CommitOutcome::Committed(stats),
            None => self.commit_rows(batch, writer.is_some()).await?,
        };
        if let (CommitOutcome::Committed(stats), Some(w)) = (&outcome, &writer)
            && let Some(seq) = stats.trailing
        {
            w.send(trailing::Job {
                seq,
                stages: batch.aggregate_stages.clone(),
                aggregates: batch.aggregates.clone(),
            })
            .await?;
        }
        Ok(outcome)
    }

    /// When the last attempt to commit `batch` lost its connection after sending COMMIT: the
    /// stats of that commit if it landed (the batch must not be committed again; its offsets
    /// would refuse it), `None` if it did not (commit the batch). Asks the database: the stored
    /// offsets of the batch's partitions are its `next` ones, or (a batch without offsets) its
    /// rows are stored under its `commit_seq`. Stays in doubt while the database cannot answer.
    async fn landed(&self, batch: &SinkBatch) -> Result<Option<CommitStats>, SinkError> {
        let Some(d) = *self.in_doubt.lock().expect("in-doubt lock") else {
            return Ok(None);
        };
        if d.batch != batch.seq {
            *self.in_doubt.lock().expect("in-doubt lock") = None;
            return Ok(None);
        }
        let landed = if !batch.offsets.is_empty() {
            let stored = self.stored_offsets().await?;
            batch.offsets.iter().any(|o| o.expected != Some(o.next))
                && batch
                    .offsets
                    .iter()
                    .all(|o| stored.get(&(o.topic.clone(), o.partition)) == Some(&o.next))
        } else if d.rows > 0 {
            sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM transactions \
                 WHERE commit_seq = $1 AND event_time BETWEEN $2 AND $3)",
            )
            .bind(d.seq)
            .bind(d.first)
            .bind(d.last)
            .fetch_one(&self.pool)
            .await?
        } else {
            false
        };
        *self.in_doubt.lock().expect("in-doubt lock") = None;
        tracing::warn!(
            seq = batch.seq,
            landed,
            "the last COMMIT of this batch got no answer; {}",
            if landed {
                "the commit had landed, it is not repeated"
            } else {
                "the commit had not landed, the batch is committed again"
            }
        );
        Ok(landed.then(|| CommitStats {
            inserted: d.rows,
            duplicates: 0,
            trailing: d.trailing.then_some(d.seq),
        }))
    }

    /// The rows' transaction of a batch. With `trail`, its aggregate merges are not applied but
    /// recorded as pending (`sink_pending_aggregates`, and [`CommitStats::trailing`]); a crash
    /// right after is what this leaves.
    pub async fn commit_rows(
        &self,
        batch: &SinkBatch,
        trail: bool,
    ) -> Result<CommitOutcome, SinkError> {
        let encode = |e: copy::CopyError| SinkError::Internal(e.to_string());
        let t0 = std::time::Instant::now();
        let rows = batch.rows() as u64;
        let mut conn = self.pool.acquire().await?;
        let mut tx = conn.begin().await?;
        self.write_offsets(&mut tx, batch).await?;
        let seq: i64 = if rows > 0 {
            sqlx::query_scalar("SELECT nextval('sink_commit_seq')")
                .fetch_one(&mut *tx)
                .await?
        } else {
            0
        };
        let mut projected = Vec::with_capacity(batch.transactions.len());
        let mut alert_data = Vec::new();
        for b in &batch.transactions {
            projected.push(stored_rows(&self.canonical, b, seq)?);
            if let Some(alerts) = alerts_of(self.canonical.len(), b)? {
                copy::encode(&alerts, &mut alert_data).map_err(encode)?;
            }
        }
        let t_encode = t0.elapsed();
        if rows > 0 {
            // Binary when the table's column types allow it: the server then converts no text.
            let binary = self
                .copy_transactions_binary
                .as_ref()
                .filter(|(_, types)| projected.iter().all(|b| fits(types, &b.schema())));
            let statement = binary.map_or(&self.copy_transactions, |(s, _)| s);
            let mut copy = tx.copy_in_raw(statement).await?;
            // Encode and send in slices: the server parses and indexes one slice while the next
            // is encoded (the two cores work at once instead of in turn).
            let mut chunk = Vec::with_capacity(COPY_SLICE_ROWS * 320);
            if binary.is_some() {
                chunk.extend_from_slice(copy::BINARY_HEADER);
            }
            for b in &projected {
                let mut at = 0;
                while at < b.num_rows() {
                    let n = COPY_SLICE_ROWS.min(b.num_rows() - at);
                    let slice = b.slice(at, n);
                    match binary {
                        Some((_, types)) => copy::encode_binary(&slice, types, &mut chunk),
                        None => copy::encode(&slice, &mut chunk),
                    }
                    .map_err(encode)?;
                    copy.send(chunk.as_slice()).await?;
                    chunk.clear();
                    at += n;
                }
            }
            if binary.is_some() {
                copy.send(copy::BINARY_TRAILER).await?;
            }
            match copy.finish().await {
                Ok(_) => {}
                Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some(UNIQUE_VIOLATION) => {
                    drop(tx);
                    return Ok(CommitOutcome::Duplicates(self.duplicates(batch).await?));
                }
                Err(e) => return Err(e.into()),
            }
        }
        let t_copy = t0.elapsed();
        if !alert_data.is_empty() {
            let mut copy = tx.copy_in_raw(&self.copy_alerts).await?;
            copy.send(alert_data.as_slice()).await?;
            copy.finish().await?;
        }
        if let Some(labels) = &batch.labels {
            super::labels::write(&mut tx, labels).await?;
        }
        if !batch.dead_letters.is_empty() {
            let d = &batch.dead_letters;
            sqlx::query(
                "INSERT INTO dead_letters (source, topic, kafka_partition, kafka_offset, raw, reason) \
                 SELECT * FROM UNNEST($1::text[], $2::text[], $3::int[], $4::bigint[], $5::bytea[], $6::text[])",
            )
            .bind(d.iter().map(|x| x.source.clone()).collect::<Vec<_>>())
            .bind(d.iter().map(|x| x.topic.clone()).collect::<Vec<_>>())
            .bind(d.iter().map(|x| x.partition).collect::<Vec<_>>())
            .bind(d.iter().map(|x| x.offset).collect::<Vec<_>>())
            .bind(d.iter().map(|x| x.raw.clone()).collect::<Vec<_>>())
            .bind(d.iter().map(|x| x.reason.clone()).collect::<Vec<_>>())
            .execute(&mut *tx)
            .await?;
        }
        let t_other = t0.elapsed();
        let trailing = trail && rows > 0;
        let (first, last) = event_time_range(&projected);
        let mut remember = Vec::new();
        if trailing {
            sqlx::query(
                "INSERT INTO sink_pending_aggregates \
                 (pipeline, commit_seq, first_event_time, last_event_time, rows) \
                 VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(&self.pipeline)
            .bind(seq)
            .bind(first)
            .bind(last)
            .bind(rows as i64)
            .execute(&mut *tx)
            .await?;
        } else {
            remember = self
                .merge_all(&mut tx, &batch.aggregate_stages, &batch.aggregates)
                .await?;
        }
        let t_aggregates = t0.elapsed();
        *self.in_doubt.lock().expect("in-doubt lock") = Some(InDoubt {
            batch: batch.seq,
            seq,
            rows,
            trailing,
            first,
            last,
        });
        tx.commit().await?;
        *self.in_doubt.lock().expect("in-doubt lock") = None;
        self.remember(remember);
        tracing::debug!(
            rows,
            trailing,
            encode = ?t_encode,
            copy = ?(t_copy - t_encode),
            alerts_labels_dead_letters = ?(t_other - t_copy),
            aggregates = ?(t_aggregates - t_other),
            total = ?t0.elapsed(),
            "sink commit phases"
        );
        Ok(CommitOutcome::Committed(CommitStats {
            inserted: rows,
            duplicates: 0,
            trailing: trailing.then_some(seq),
        }))
    }

    /// Apply the merges a commit of rows left pending, in a transaction that first removes its
    /// record from `sink_pending_aggregates`. Returns false, merging nothing, when the record
    /// is gone (another process applied it).
    pub async fn merge_pending(&self, job: &trailing::Job) -> Result<bool, SinkError> {
        let t0 = std::time::Instant::now();
        let mut conn = self.pool.acquire().await?;
        let mut tx = conn.begin().await?;
        let claimed = sqlx::query(
            "DELETE FROM sink_pending_aggregates WHERE pipeline = $1 AND commit_seq = $2",
        )
        .bind(&self.pipeline)
        .bind(job.seq)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if claimed == 0 {
            return Ok(false);
        }
        let remember = self
            .merge_all(&mut tx, &job.stages, &job.aggregates)
            .await?;
        tx.commit().await?;
        self.remember(remember);
        tracing::debug!(commit_seq = job.seq, took = ?t0.elapsed(), "trailing aggregate merges");
        Ok(true)
    }

    /// Merge every stage's partial aggregates in `tx`. Returns the group keys each stored, to
    /// [`PgSink::remember`] once `tx` has committed.
    async fn merge_all(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
        stages: &[AggregateStage],
        aggregates: &[(String, Vec<RecordBatch>)],
    ) -> Result<Vec<(String, Vec<groups::Key>)>, SinkError> {
        // Set before the first merge: it holds for the rest of the transaction.
        let mut planned = false;
        let mut remember = Vec::new();
        for (name, partials) in aggregates {
            let Some(stage) = stages.iter().find(|s| &s.name == name) else {
                continue;
            };
            if partials.iter().all(|b| b.num_rows() == 0) {
                continue;
            }
            if !planned {
                // A merge joins a batch's few thousand groups with an ever-growing table: probing
                // the unique key index per group is what stays fast. Without statistics on the
                // staging table the planner would hash the whole table once it has some (measured:
                // 80 -> 230 ms a merge after 25 batches, growing with the table).
                sqlx::raw_sql("SET LOCAL enable_hashjoin = off; SET LOCAL enable_mergejoin = off")
                    .execute(&mut **tx)
                    .await?;
                planned = true;
            }
            let stored = self.merge_aggregate(tx, stage, partials).await?;
            remember.push((name.clone(), stored));
        }
        Ok(remember)
    }

    /// Remember the groups a committed transaction stored ([`PgSink::merge_all`]).
    fn remember(&self, stored: Vec<(String, Vec<groups::Key>)>) {
        if stored.is_empty() {
            return;
        }
        let mut known = self.known.lock().expect("known groups lock");
        for (name, keys) in stored {
            known.entry(name).or_default().add(keys);
        }
    }

    /// Rows of the batch (batch index, row index) that must not be stored: ids already in the
    /// table, and repeats of an id within the batch after its first occurrence.
    async fn duplicates(&self, batch: &SinkBatch) -> Result<Vec<(usize, usize)>, SinkError> {
        let mut ids = Vec::new();
        let mut times = Vec::new();
        for b in &batch.transactions {
            let (id, t) = id_time(b);
            for i in 0..b.num_rows() {
                ids.push(id.value(i).to_string());
                times.push(chrono::DateTime::from_timestamp_millis(t.value(i)).unwrap_or_default());
            }
        }
        let stored: HashSet<(String, i64)> = sqlx::query(
            "SELECT t.transaction_id, (extract(epoch FROM t.event_time) * 1000)::bigint \
             FROM transactions t \
             JOIN UNNEST($1::text[], $2::timestamptz[]) AS u(id, ts) \
               ON t.transaction_id = u.id AND t.event_time = u.ts",
        )
        .bind(&ids)
        .bind(&times)
        .fetch_all(&self.pool)
        .await?
        .into_iter()
        .map(|r| (r.get::<String, _>(0), r.get::<i64, _>(1)))
        .collect();
        let mut seen: HashSet<(String, i64)> = HashSet::new();
        let mut out = Vec::new();
        for (bi, b) in batch.transactions.iter().enumerate() {
            let (id, t) = id_time(b);
            for i in 0..b.num_rows() {
                let key = (id.value(i).to_string(), t.value(i));
                if stored.contains(&key) || !seen.insert(key) {
                    out.push((bi, i));
                }
            }
        }
        Ok(out)
    }

    /// Merge a stage's partial aggregates into its table. Groups never seen committed are
    /// COPYed straight in, under a savepoint; the others go through the staging table and a
    /// MERGE ([`groups`]). Returns the keys of every group, to remember once the
    /// transaction commits.
    async fn merge_aggregate(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
        stage: &AggregateStage,
        partials: &[RecordBatch],
    ) -> Result<Vec<groups::Key>, SinkError> {
        if partials.iter().all(|b| b.num_rows() == 0) {
            return Ok(Vec::new());
        }
        let schema = stage.schema();
        let table = format!("agg_{}", stage.name);
        let cols: Vec<String> = schema.fields().iter().map(|f| quote(f.name())).collect();
        let known = self
            .prepared
            .lock()
            .expect("prepared lock")
            .get(&stage.name)
            .filter(|(s, _)| s == &schema)
            .map(|(_, types)| types.clone());
        let types = match known {
            Some(types) => types,
            None => {
                ensure_aggregate_table(&mut *tx, stage).await?;
                let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
                let types = column_types(&mut **tx, &table, &names)
                    .await?
                    .filter(|t| fits(t, &schema));
                self.prepared
                    .lock()
                    .expect("prepared lock")
                    .insert(stage.name.clone(), (schema.clone(), types.clone()));
                types
            }
        };
        let internal = |e: ArrowError| SinkError::Internal(e.to_string());
        let keys = partials
            .iter()
            .map(|b| groups::group_keys(b, &stage.keys))
            .collect::<Result<Vec<_>, _>>()
            .map_err(internal)?;
        // Which rows hold groups never seen committed (when guessing is not paused).
        let fresh: Option<Vec<BooleanArray>> = {
            let mut all = self.known.lock().expect("known groups lock");
            let k = all.entry(stage.name.clone()).or_default();
            k.guessing().then(|| {
                keys.iter()
                    .map(|h| h.iter().map(|x| Some(!k.contains(*x))).collect())
                    .collect()
            })
        };
        let t0 = std::time::Instant::now();
        let mut to_merge = partials.to_vec();
        let mut copied = 0;
        if let Some(fresh) = fresh {
            let filtered = |keep_fresh: bool| -> Result<Vec<RecordBatch>, SinkError> {
                partials
                    .iter()
                    .zip(&fresh)
                    .map(|(b, m)| {
                        let m = if keep_fresh {
                            m.clone()
                        } else {
                            not(m).map_err(internal)?
                        };
                        filter_record_batch(b, &m).map_err(internal)
                    })
                    .filter(|b| !matches!(b, Ok(b) if b.num_rows() == 0))
                    .collect()
            };
            let new = filtered(true)?;
            let n_new: usize = new.iter().map(RecordBatch::num_rows).sum();
            if n_new > 0 {
                sqlx::raw_sql("SAVEPOINT payguard_new_groups")
                    .execute(&mut **tx)
                    .await?;
                let (data, format) = encode_partials(&new, &types)?;
                let finished = {
                    let mut copy = tx
                        .copy_in_raw(&format!(
                            "COPY {table} ({}) FROM STDIN{format}",
                            cols.join(", ")
                        ))
                        .await?;
                    match copy.send(data.as_slice()).await {
                        Ok(_) => copy.finish().await.map(|_| ()),
                        Err(e) => {
                            let _ = copy.abort("payguard: sending the new groups failed").await;
                            Err(e)
                        }
                    }
                };
                match finished {
                    Ok(_) => {
                        sqlx::raw_sql("RELEASE SAVEPOINT payguard_new_groups")
                            .execute(&mut **tx)
                            .await?;
                        to_merge = filtered(false)?;
                        copied = n_new;
                    }
                    // A group guessed new is stored (another writer, or one from before this
                    // process): undo the COPY alone and merge the whole batch.
                    Err(sqlx::Error::Database(e))
                        if e.code().as_deref() == Some(UNIQUE_VIOLATION) =>
                    {
                        sqlx::raw_sql("ROLLBACK TO SAVEPOINT payguard_new_groups")
                            .execute(&mut **tx)
                            .await?;
                        self.paths.fallbacks.fetch_add(1, Ordering::Relaxed);
                        self.pause_guessing(&stage.name);
                        tracing::debug!(aggregate = %stage.name, detail = e.message(), "new groups were stored: merging them");
                    }
                    Err(e) => {
                        // Whatever failed, the retry of the batch merges it all.
                        self.pause_guessing(&stage.name);
                        return Err(e.into());
                    }
                }
            }
        }
        let t_copied = t0.elapsed();
        let merged: usize = to_merge.iter().map(RecordBatch::num_rows).sum();
        if merged > 0 {
            self.merge_staged(tx, stage, &table, &cols, &types, &to_merge)
                .await?;
        }
        self.paths
            .copied
            .fetch_add(copied as u64, Ordering::Relaxed);
        self.paths
            .merged
            .fetch_add(merged as u64, Ordering::Relaxed);
        tracing::debug!(
            aggregate = %stage.name,
            copied,
            merged,
            copy = ?t_copied,
            merge = ?(t0.elapsed() - t_copied),
            "aggregate merge phases"
        );
        Ok(keys.concat())
    }

    fn pause_guessing(&self, stage: &str) {
        self.known
            .lock()
            .expect("known groups lock")
            .entry(stage.to_string())
            .or_default()
            .pause();
    }

    /// MERGE groups into the table through its staging table (an existing group adds up, a new
    /// one is inserted).
    async fn merge_staged(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
        stage: &AggregateStage,
        table: &str,
        cols: &[String],
        types: &Option<Vec<copy::PgType>>,
        partials: &[RecordBatch],
    ) -> Result<(), SinkError> {
        let schema = stage.schema();
        let staging = format!("payguard_staging_{}", stage.name);
        // Identifiers come from the aggregate file's column aliases and are quoted.
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "CREATE TEMP TABLE IF NOT EXISTS {staging} (LIKE {table} INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
        )))
        .execute(&mut **tx)
        .await?;
        let (data, format) = encode_partials(partials, types)?;
        let mut copy = tx
            .copy_in_raw(&format!(
                "COPY {staging} ({}) FROM STDIN{format}",
                cols.join(", ")
            ))
            .await?;
        copy.send(data.as_slice()).await?;
        copy.finish().await?;
        let keys: Vec<String> = stage
            .keys
            .iter()
            .map(|i| quote(schema.field(*i).name()))
            .collect();
        let merged = |a: &str, b: &str| -> Vec<String> {
            stage
                .measures
                .iter()
                .map(|(i, m)| {
                    let c = quote(schema.field(*i).name());
                    match m {
                        Merge::Add => format!(
                            "{c} = CASE WHEN {a}.{c} IS NULL THEN {b}.{c} WHEN {b}.{c} IS NULL THEN {a}.{c} ELSE {a}.{c} + {b}.{c} END"
                        ),
                        // LEAST and GREATEST skip NULLs.
                        Merge::Min => format!("{c} = LEAST({a}.{c}, {b}.{c})"),
                        Merge::Max => format!("{c} = GREATEST({a}.{c}, {b}.{c})"),
                    }
                })
                .collect()
        };
        let set_keys = keys
            .iter()
            .map(|k| format!("{k} IS NOT NULL"))
            .collect::<Vec<_>>()
            .join(" AND ");
        // Groups whose key has no NULL: MERGE, which inserts new groups plainly. The unique key
        // (NULLS NOT DISTINCT) is checked by the insert itself; `INSERT ... ON CONFLICT` inserts
        // speculatively and checks twice (measured by hand: 160 against 110 ms for 18,000 new
        // groups). An equality join cannot match NULLs, so the other groups take the upsert.
        let result = sqlx::query(sqlx::AssertSqlSafe(format!(
            "MERGE INTO {table} AS a USING (SELECT {cols} FROM {staging} WHERE {set_keys}) AS s \
             ON {on} \
             WHEN MATCHED THEN UPDATE SET {sets}, updated_at = now() \
             WHEN NOT MATCHED THEN INSERT ({cols}) VALUES ({values})",
            cols = cols.join(", "),
            on = keys
                .iter()
                .map(|k| format!("a.{k} = s.{k}"))
                .collect::<Vec<_>>()
                .join(" AND "),
            sets = merged("a", "s").join(", "),
            values = cols
                .iter()
                .map(|c| format!("s.{c}"))
                .collect::<Vec<_>>()
                .join(", "),
        )))
        .execute(&mut **tx)
        .await;
        match result {
            Ok(_) => {}
            // Another writer inserted one of the new groups after the join looked: the batch is
            // retried and then finds the group.
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some(UNIQUE_VIOLATION) => {
                return Err(SinkError::ConcurrentGroup {
                    table: table.to_string(),
                    detail: e.message().to_string(),
                });
            }
            Err(e) => return Err(e.into()),
        }
        let null_keys = partials
            .iter()
            .any(|b| stage.keys.iter().any(|i| b.column(*i).null_count() > 0));
        if null_keys {
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "INSERT INTO {table} AS a ({cols}) SELECT {cols} FROM {staging} WHERE NOT ({set_keys}) \
                 ON CONFLICT ({keys}) DO UPDATE SET {sets}, updated_at = now()",
                cols = cols.join(", "),
                keys = keys.join(", "),
                sets = merged("a", "EXCLUDED").join(", "),
            )))
            .execute(&mut **tx)
            .await?;
        }
        Ok(())
    }

    async fn write_offsets(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
        batch: &SinkBatch,
    ) -> Result<(), SinkError> {
        if batch.offsets.is_empty() {
            return Ok(());
        }
        let o = &batch.offsets;
        let topics: Vec<String> = o.iter().map(|x| x.topic.clone()).collect();
        let parts: Vec<i32> = o.iter().map(|x| x.partition).collect();
        let expected: Vec<Option<i64>> = o.iter().map(|x| x.expected).collect();
        let next: Vec<i64> = o.iter().map(|x| x.next).collect();
        let moved = sqlx::query(
            "WITH input AS ( \
               SELECT * FROM UNNEST($2::text[], $3::int[], $4::bigint[], $5::bigint[]) \
                 AS t(topic, kafka_partition, expected, next_offset)) \
             INSERT INTO consumer_offsets AS c (pipeline, topic, kafka_partition, next_offset, updated_at) \
             SELECT $1, topic, kafka_partition, next_offset, now() FROM input \
             ON CONFLICT (pipeline, topic, kafka_partition) DO UPDATE \
               SET next_offset = EXCLUDED.next_offset, updated_at = EXCLUDED.updated_at \
               WHERE c.next_offset = (SELECT i.expected FROM input i \
                   WHERE i.topic = EXCLUDED.topic AND i.kafka_partition = EXCLUDED.kafka_partition) \
             RETURNING c.topic, c.kafka_partition",
        )
        .bind(&self.pipeline)
        .bind(&topics)
        .bind(&parts)
        .bind(&expected)
        .bind(&next)
        .fetch_all(&mut **tx)
        .await?;
        if moved.len() != o.len() {
            let done: Vec<(String, i32)> = moved
                .iter()
                .map(|r| (r.get::<String, _>(0), r.get::<i32, _>(1)))
                .collect();
            let stuck = o
                .iter()
                .find(|x| !done.contains(&(x.topic.clone(), x.partition)))
                .expect("a partition was not moved");
            return Err(SinkError::Fenced {
                pipeline: self.pipeline.clone(),
                topic: stuck.topic.clone(),
                partition: stuck.partition,
                expected: stuck.expected,
            });
        }
        Ok(())
    }
}

/// Give `transactions` a column for each attribute of `canonical` that has none (a nullable
/// column: adding it rewrites nothing, also on a compressed hypertable). An existing column of
/// another type is refused, naming both types: the attribute is renamed, or the column altered by
/// hand.
async fn attribute_columns(pool: &PgPool, canonical: &Canonical) -> Result<(), SinkError> {
    for a in canonical.attributes() {
        let want = a.kind.pg_type();
        let have: Option<String> = sqlx::query_scalar(
            "SELECT format_type(atttypid, atttypmod) FROM pg_attribute \
             WHERE attrelid = 'transactions'::regclass AND attname = $1 AND NOT attisdropped",
        )
        .bind(&a.name)
        .fetch_optional(pool)
        .await?;
        match have {
            Some(have) if have == want => {}
            Some(have) => {
                return Err(SinkError::AttributeColumn {
                    name: a.name.clone(),
                    have,
                    want: want.to_string(),
                });
            }
            None => {
                // The name was checked when the config was loaded (lower case, digits, '_').
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "ALTER TABLE transactions ADD COLUMN IF NOT EXISTS {} {want}",
                    a.name
                )))
                .execute(pool)
                .await?;
                tracing::info!(attribute = %a.name, r#type = want, "added attribute column to transactions");
            }
        }
    }
    Ok(())
}

/// The columns of `transactions` the sink writes, and the COPY text of the decided rows in that
/// order: exactly what [`PgSink::commit`] sends (for benchmarks that COPY the same rows by other
/// means).
pub fn transactions_copy_text<'c>(
    canonical: &'c Canonical,
    batches: &[RecordBatch],
) -> Result<(Vec<&'c str>, Vec<u8>), SinkError> {
    let cols = written_columns(canonical);
    let mut out = Vec::new();
    for b in batches {
        copy::encode(&stored_rows(canonical, b, 0)?, &mut out)
            .map_err(|e| SinkError::Internal(e.to_string()))?;
    }
    Ok((cols, out))
}

impl PgSink {
    /// The decided rows as the sink's binary COPY stream of `transactions` (header to trailer),
    /// when the sink writes that table in binary format (for benchmarks).
    pub fn transactions_copy_binary(
        &self,
        batches: &[RecordBatch],
    ) -> Result<Option<Vec<u8>>, SinkError> {
        let Some((_, types)) = &self.copy_transactions_binary else {
            return Ok(None);
        };
        let mut out = copy::BINARY_HEADER.to_vec();
        for b in batches {
            let b = stored_rows(&self.canonical, b, 0)?;
            if !fits(types, &b.schema()) {
                return Ok(None);
            }
            copy::encode_binary(&b, types, &mut out)
                .map_err(|e| SinkError::Internal(e.to_string()))?;
        }
        out.extend_from_slice(copy::BINARY_TRAILER);
        Ok(Some(out))
    }
}

/// Compile `stages` again over the `stored` columns: `Err` names the first file that reads a
/// column `transactions` does not store.
async fn over_stored_columns(
    stages: &[AggregateStage],
    stored: &SchemaRef,
) -> Result<Arc<Vec<AggregateStage>>, String> {
    let mut out = Vec::with_capacity(stages.len());
    for s in stages {
        out.push(
            AggregateStage::compile(&s.file, stored.clone())
                .await
                .map_err(|e| e.to_string())?,
        );
    }
    Ok(Arc::new(out))
}

/// The first and last event time of stored rows ([`stored_rows`]; the epoch twice when there
/// are none).
fn event_time_range(
    batches: &[RecordBatch],
) -> (chrono::DateTime<chrono::Utc>, chrono::DateTime<chrono::Utc>) {
    let (mut first, mut last) = (i64::MAX, i64::MIN);
    for b in batches {
        let (_, t) = id_time(b);
        if let (Some(lo), Some(hi)) = (
            datafusion::arrow::compute::min(t),
            datafusion::arrow::compute::max(t),
        ) {
            first = first.min(lo);
            last = last.max(hi);
        }
    }
    let at = |ms: i64| chrono::DateTime::from_timestamp_millis(ms).unwrap_or_default();
    (at(first), at(last))
}

fn id_time(b: &RecordBatch) -> (&StringArray, &TimestampMillisecondArray) {
    (
        b.column(0)
            .as_any()
            .downcast_ref::<StringArray>()
            .expect("transaction_id"),
        b.column(1)
            .as_any()
            .downcast_ref::<TimestampMillisecondArray>()
            .expect("event_time"),
    )
}

/// Partial aggregates as COPY data: binary with the table's column `types`, text without.
/// Returns the data and the COPY options.
fn encode_partials(
    partials: &[RecordBatch],
    types: &Option<Vec<copy::PgType>>,
) -> Result<(Vec<u8>, &'static str), SinkError> {
    let encode_err = |e: copy::CopyError| SinkError::Internal(e.to_string());
    let mut data = Vec::new();
    match types {
        Some(types) => {
            data.extend_from_slice(copy::BINARY_HEADER);
            for b in partials {
                copy::encode_binary(b, types, &mut data).map_err(encode_err)?;
            }
            data.extend_from_slice(copy::BINARY_TRAILER);
            Ok((data, " WITH (FORMAT binary)"))
        }
        None => {
            for b in partials {
                copy::encode(b, &mut data).map_err(encode_err)?;
            }
            Ok((data, ""))
        }
    }
}

/// Turn Nagle's algorithm off on this process's TCP connections to the database `port`.
///
/// sqlx 0.9 opens its TCP sockets without `TCP_NODELAY`. The small message that ends a COPY
/// (`CopyDone`) is then held back until the server acknowledges the data before it, and the
/// server delays that acknowledgement (40 ms on Linux): measured, every COPY of a commit paid
/// about 40 ms, five per commit (transactions, alerts, three aggregate stagings). libpq (psql)
/// sets `TCP_NODELAY`; this does the same for the pool's connections, called as each one opens.
/// sqlx does not hand out its socket, so the sockets are found among the process's open file
/// descriptors by their peer port. Setting the option on a socket that has it is harmless; a
/// descriptor that is not a TCP socket, or closes meanwhile, is skipped.
fn set_nodelay_on_sockets_to(port: u16) {
    use std::os::fd::BorrowedFd;
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    for entry in dir.flatten() {
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        // SAFETY: the descriptor is only used for getpeername/setsockopt during this call; if
        // another thread closes it meanwhile, those calls fail (EBADF) or touch the socket that
        // reused the number, which is then checked by its peer port like any other.
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        let sock = socket2::SockRef::from(&fd);
        let Ok(peer) = sock.peer_addr() else { continue };
        if peer.as_socket().is_some_and(|a| a.port() == port) {
            let _ = sock.set_tcp_nodelay(true);
        }
    }
}

/// The binary-COPY types of `table`'s columns `cols`, in that order; `None` when one is missing
/// or has a type [`copy::PgType`] does not cover.
async fn column_types<'e, E>(
    executor: E,
    table: &str,
    cols: &[&str],
) -> Result<Option<Vec<copy::PgType>>, SinkError>
where
    E: sqlx::Executor<'e, Database = sqlx::Postgres>,
{
    let found: HashMap<String, String> = sqlx::query(
        "SELECT a.attname::text, t.typname::text FROM pg_attribute a \
         JOIN pg_type t ON t.oid = a.atttypid \
         WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped",
    )
    .bind(table)
    .fetch_all(executor)
    .await?
    .into_iter()
    .map(|r| (r.get::<String, _>(0), r.get::<String, _>(1)))
    .collect();
    Ok(cols
        .iter()
        .map(|c| found.get(*c).and_then(|t| copy::PgType::from_typname(t)))
        .collect())
}

/// Whether every field of `schema` can be written as the type at its position.
fn fits(types: &[copy::PgType], schema: &Schema) -> bool {
    types.len() == schema.fields().len()
        && types
            .iter()
            .zip(schema.fields())
            .all(|(t, f)| t.accepts(f.data_type()))
}

fn quote(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

fn internal(message: String) -> SinkError {
    SinkError::Internal(message)
}

/// The named columns of a batch, in the given order.
fn project(b: &RecordBatch, cols: &[&str]) -> Result<RecordBatch, SinkError> {
    let schema = b.schema();
    let mut fields = Vec::with_capacity(cols.len());
    let mut arrays = Vec::with_capacity(cols.len());
    for c in cols {
        let i = schema
            .index_of(c)
            .map_err(|_| internal(format!("decided rows lack column {c}")))?;
        fields.push(schema.field(i).clone());
        arrays.push(b.column(i).clone());
    }
    RecordBatch::try_new(Arc::new(Schema::new(fields)), arrays).map_err(|e| internal(e.to_string()))
}

/// `b` with one more column at the end.
fn with_column(b: &RecordBatch, field: Field, array: ArrayRef) -> Result<RecordBatch, SinkError> {
    crate::engine::with_columns(b, [(field, array)]).map_err(|e| internal(e.to_string()))
}

/// Alert rows (decision other than approve) with their features as one JSON column.
fn alerts_of(first_feature: usize, b: &RecordBatch) -> Result<Option<RecordBatch>, SinkError> {
    let schema = b.schema();
    let decision = b
        .column_by_name(DECISION)
        .and_then(|c| c.as_any().downcast_ref::<StringArray>())
        .ok_or_else(|| internal("decided rows lack decision".into()))?;
    let mask: datafusion::arrow::array::BooleanArray = decision
        .iter()
        .map(|d| Some(d.is_some_and(|d| d != "approve")))
        .collect();
    if mask.true_count() == 0 {
        return Ok(None);
    }
    let alerts = datafusion::arrow::compute::filter_record_batch(b, &mask)
        .map_err(|e| internal(e.to_string()))?;
    let score = schema
        .index_of(SCORE)
        .map_err(|_| internal("decided rows lack score".into()))?;
    let feature_fields: Vec<Field> = (first_feature..score)
        .map(|i| schema.field(i).clone())
        .collect();
    let feature_batch = RecordBatch::try_new(
        Arc::new(Schema::new(feature_fields)),
        (first_feature..score)
            .map(|i| alerts.column(i).clone())
            .collect(),
    )
    .map_err(|e| internal(e.to_string()))?;
    let mut w = datafusion::arrow::json::LineDelimitedWriter::new(Vec::new());
    w.write(&feature_batch)
        .map_err(|e| internal(e.to_string()))?;
    w.finish().map_err(|e| internal(e.to_string()))?;
    let text = String::from_utf8(w.into_inner()).map_err(|e| internal(e.to_string()))?;
    let features: ArrayRef = Arc::new(StringArray::from(text.lines().collect::<Vec<_>>()));
    with_column(
        &project(&alerts, ALERT_COLUMNS)?,
        Field::new("features", DataType::Utf8, false),
        features,
    )
    .map(Some)
}

fn pg_type(t: &DataType) -> Result<&'static str, String> {
    Ok(match t {
        DataType::Utf8 | DataType::Utf8View | DataType::LargeUtf8 => "text",
        DataType::Int64 => "bigint",
        DataType::Int32 | DataType::Int16 | DataType::Int8 => "integer",
        DataType::Float64 | DataType::Float32 => "double precision",
        DataType::Decimal128(_, _) => "numeric",
        DataType::Timestamp(_, _) => "timestamptz",
        DataType::Boolean => "boolean",
        other => return Err(format!("type {other} has no PostgreSQL column type here")),
    })
}

async fn ensure_aggregate_table(
    conn: &mut sqlx::PgConnection,
    stage: &AggregateStage,
) -> Result<(), SinkError> {
    let schema = stage.schema();
    let table = format!("agg_{}", stage.name);
    let mut defs = Vec::new();
    for f in schema.fields() {
        let t = pg_type(f.data_type()).map_err(|m| {
            internal(format!(
                "{}: column {}: {m}",
                stage.file.display(),
                f.name()
            ))
        })?;
        defs.push(format!("{} {t}", quote(f.name())));
    }
    defs.push("updated_at timestamptz NOT NULL DEFAULT now()".into());
    let keys: Vec<String> = stage
        .keys
        .iter()
        .map(|i| quote(schema.field(*i).name()))
        .collect();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE TABLE IF NOT EXISTS {table} ({})",
        defs.join(", ")
    )))
    .execute(&mut *conn)
    .await?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE UNIQUE INDEX IF NOT EXISTS {table}_key ON {table} ({}) NULLS NOT DISTINCT",
        keys.join(", ")
    )))
    .execute(&mut *conn)
    .await?;
    let existing: Vec<String> = sqlx::query(
        "SELECT column_name FROM information_schema.columns \
         WHERE table_schema = current_schema() AND table_name = $1 AND column_name <> 'updated_at' \
         ORDER BY ordinal_position",
    )
    .bind(&table)
    .fetch_all(&mut *conn)
    .await?
    .into_iter()
    .map(|r| r.get::<String, _>(0))
    .collect();
    let wanted: Vec<String> = schema.fields().iter().map(|f| f.name().clone()).collect();
    if existing != wanted {
        return Err(internal(format!(
            "{}: table {table} exists with columns ({}) but the query yields ({}); rename the file or drop the table",
            stage.file.display(),
            existing.join(", "),
            wanted.join(", ")
        )));
    }
    Ok(())
}
