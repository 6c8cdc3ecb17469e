//! Sinks: where a processed micro-batch is committed, together with the offsets it consumed.
//!
//! - [`postgres`]: PostgreSQL / TimescaleDB. One database transaction per micro-batch holds the
//!   rows (bulk COPY), the dead letters and the next offsets; a crash before the commit leaves
//!   nothing, and the batch is re-read from Kafka on the next start. That is exactly-once.
//! - [`groups`]: the aggregate groups the PostgreSQL sink knows to be stored, so that new groups
//!   are COPYed into their table and only known ones merged.
//! - [`trailing`]: the PostgreSQL sink's aggregate merges committed a batch behind the rows, on a
//!   second connection, still exactly-once (`postgres.trail_aggregates`).
//! - [`memory`]: an in-process store for the demo and tests, with the same offset semantics.

pub mod copy;
pub mod groups;
mod history;
mod labels;
pub mod memory;
pub mod postgres;
pub mod query;
pub mod trailing;

use std::collections::HashMap;

use datafusion::arrow::array::RecordBatch;
use tokio::time::Instant;

use crate::decode::DeadLetter;
use crate::engine::canonical::Canonical;
use crate::source::OffsetCommit;

/// Errors of the sinks.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// The database failed (connection lost, statement failed).
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// A batch that can never be written as it is (a bug or a contract the SQL files broke).
    #[error("sink: {0}")]
    Internal(String),
    /// Applying the schema migrations failed.
    #[error("database migrations ({dir}): {source}")]
    Migrate {
        /// Migrations directory.
        dir: String,
        /// Underlying error.
        #[source]
        source: sqlx::migrate::MigrateError,
    },
    /// The database lacks migrations this binary needs after applying those of `dir` (a
    /// migrations directory of an earlier release).
    #[error(
        "database schema ({dir}): migrations {missing} are not applied; this binary needs \
         versions 1-{needed}: point postgres.migrations at this release's sql/migrations"
    )]
    SchemaTooOld {
        /// Migrations directory.
        dir: String,
        /// The versions missing, e.g. "6, 7".
        missing: String,
        /// The newest version this binary needs.
        needed: i64,
    },
    /// `transactions` has a column of an attribute's name with another type.
    #[error(
        "transactions.{name} is {have}, but the attribute is declared as {want}: rename the attribute in [[attributes]], or ALTER the column"
    )]
    AttributeColumn {
        /// Attribute (and column) name.
        name: String,
        /// The column's type.
        have: String,
        /// The type the attribute needs.
        want: String,
    },
    /// A concurrent writer inserted a group of an aggregate table that this batch also inserts
    /// (its transaction committed after this merge looked). Retrying the batch merges into it.
    #[error(
        "aggregate table {table}: a group was inserted concurrently ({detail}); retrying the batch"
    )]
    ConcurrentGroup {
        /// Aggregate table.
        table: String,
        /// The database's message.
        detail: String,
    },
    /// The stored offset of a partition is not where this process left it: another process
    /// consumes the same partitions under the same pipeline name. Committing would duplicate rows.
    #[error(
        "offset store for {topic}/{partition} holds another position than expected ({expected:?}): \
         another payguard process with pipeline.name {pipeline:?} is running; stopping"
    )]
    Fenced {
        /// Pipeline name.
        pipeline: String,
        /// Topic.
        topic: String,
        /// Partition.
        partition: i32,
        /// What this process expected.
        expected: Option<i64>,
    },
}

impl SinkError {
    /// Whether retrying the same batch can succeed: the database is unreachable, restarting, out
    /// of resources, or the transaction lost a race (serialization failure, deadlock). A
    /// statement the database rejects for what it is (a bad type, a constraint) fails the same way
    /// every time and stops the pipeline instead of looping.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Database(e) => match e {
                sqlx::Error::Io(_)
                | sqlx::Error::Tls(_)
                | sqlx::Error::Protocol(_)
                | sqlx::Error::PoolTimedOut
                | sqlx::Error::PoolClosed
                | sqlx::Error::WorkerCrashed => true,
                sqlx::Error::Database(db) => db.code().is_some_and(|c| {
                    let c = c.as_ref();
                    c.starts_with("08")
                        || c.starts_with("53")
                        || c.starts_with("57")
                        || c == "40001"
                        || c == "40P01"
                        || c == "55P03"
                }),
                _ => false,
            },
            Self::ConcurrentGroup { .. } => true,
            Self::Internal(_)
            | Self::Fenced { .. }
            | Self::Migrate { .. }
            | Self::SchemaTooOld { .. }
            | Self::AttributeColumn { .. } => false,
        }
    }
}

/// A processed micro-batch, ready to commit.
#[derive(Debug, Default)]
pub struct SinkBatch {
    /// Sequence number within this run.
    pub seq: u64,
    /// Messages the batch was made of.
    pub messages: usize,
    /// Decided transactions: canonical columns, features, score, model_version, decision,
    /// rule_hits.
    pub transactions: Vec<RecordBatch>,
    /// Partial aggregates of this batch, per aggregate name.
    pub aggregates: Vec<(String, Vec<RecordBatch>)>,
    /// The aggregate stages that computed them (to recompute them without duplicates).
    pub aggregate_stages: std::sync::Arc<Vec<crate::engine::aggregates::AggregateStage>>,
    /// The partial aggregates are still to be computed ([`SinkBatch::compute_aggregates`]): the
    /// pipeline's engine leaves them to the sink stage, off the engine thread.
    pub aggregates_pending: bool,
    /// Messages that could not be processed.
    pub dead_letters: Vec<DeadLetter>,
    /// Label feedback received in this batch (schema `engine::labels::label_schema`).
    pub labels: Option<RecordBatch>,
    /// Offsets to store with the rows.
    pub offsets: Vec<OffsetCommit>,
    /// When the batch's first message arrived.
    pub opened_at: Option<Instant>,
}

impl SinkBatch {
    /// Number of transaction rows.
    pub fn rows(&self) -> usize {
        self.transactions.iter().map(RecordBatch::num_rows).sum()
    }
}

/// What a commit did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CommitStats {
    /// Transactions newly stored.
    pub inserted: u64,
    /// Transactions already stored before (not stored twice).
    pub duplicates: u64,
    /// The `commit_seq` of a commit whose aggregate merges were left to trail (PostgreSQL).
    pub trailing: Option<i64>,
}

/// The result of a commit attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommitOutcome {
    /// Committed.
    Committed(CommitStats),
    /// Nothing was committed: these rows (batch index, row index) are stored already or repeat an
    /// earlier row of the batch. Remove them, recompute the aggregates, commit again.
    Duplicates(Vec<(usize, usize)>),
}

impl SinkBatch {
    /// Remove rows (batch index, row index) and recompute the partial aggregates without them.
    pub async fn remove_rows(
        &mut self,
        rows: &[(usize, usize)],
    ) -> Result<usize, crate::engine::EngineError> {
        let mut removed = 0;
        for (bi, b) in self.transactions.iter_mut().enumerate() {
            let drop: std::collections::HashSet<usize> = rows
                .iter()
                .filter(|(x, _)| *x == bi)
                .map(|(_, r)| *r)
                .collect();
            if drop.is_empty() {
                continue;
            }
            removed += drop.len();
            let keep: datafusion::arrow::array::BooleanArray = (0..b.num_rows())
                .map(|i| Some(!drop.contains(&i)))
                .collect();
            *b = datafusion::arrow::compute::filter_record_batch(b, &keep).map_err(|source| {
                crate::engine::EngineError::Arrow {
                    file: "<duplicates>".into(),
                    source,
                }
            })?;
        }
        self.compute_aggregates().await?;
        Ok(removed)
    }

    /// (Re)compute the partial aggregates of the batch's transactions.
    pub async fn compute_aggregates(&mut self) -> Result<(), crate::engine::EngineError> {
        let mut partials = Vec::new();
        if self.rows() > 0 {
            for stage in self.aggregate_stages.iter() {
                partials.push((stage.name.clone(), stage.partial(&self.transactions).await?));
            }
        }
        self.aggregates = partials;
        self.aggregates_pending = false;
        Ok(())
    }
}

/// Offsets stored per (topic, partition).
pub type StoredOffsets = HashMap<(String, i32), i64>;

/// A configured sink.
#[derive(Debug, Clone)]
pub enum Sink {
    /// PostgreSQL / TimescaleDB.
    Postgres(postgres::PgSink),
    /// In-process memory.
    Memory(memory::MemorySink),
}

impl Sink {
    /// The offsets stored for this pipeline.
    pub async fn load_offsets(&self) -> Result<StoredOffsets, SinkError> {
        match self {
            Self::Postgres(s) => s.load_offsets().await,
            Self::Memory(s) => Ok(s.load_offsets()),
        }
    }

    /// Canonical rows of stored transactions with these ids (labelled transactions the engine
    /// no longer indexes). The memory store keeps none.
    pub async fn lookup_canonical(
        &self,
        canonical: &Canonical,
        ids: &[String],
    ) -> Result<RecordBatch, SinkError> {
        match self {
            Self::Postgres(s) => labels::lookup_canonical(s.pool(), canonical, ids).await,
            Self::Memory(_) => Ok(RecordBatch::new_empty(canonical.schema())),
        }
    }

    /// Stored labels a label feature of `history_ms` can still count (to rebuild the label
    /// state at start). The memory store keeps none.
    pub async fn recent_labels(&self, history_ms: i64) -> Result<RecordBatch, SinkError> {
        match self {
            Self::Postgres(s) => labels::recent(s.pool(), history_ms).await,
            Self::Memory(_) => Ok(RecordBatch::new_empty(crate::engine::labels::label_schema())),
        }
    }

    /// The stored transactions of the last `span_ms` before the newest stored event time (at
    /// most `max_rows`, the newest) as canonical batches of at most `chunk_rows` rows, in
    /// event-time order then commit order: the history the window state is rebuilt from at
    /// start. The memory store keeps none (nothing survives its process anyway).
    pub fn recent_transactions<'a>(
        &'a self,
        canonical: &'a Canonical,
        span_ms: i64,
        max_rows: u64,
        chunk_rows: usize,
    ) -> futures::stream::BoxStream<'a, Result<RecordBatch, SinkError>> {
        match self {
            Self::Postgres(s) => {
                history::recent(s.pool(), canonical, span_ms, max_rows, chunk_rows)
            }
            Self::Memory(_) => Box::pin(futures::stream::empty()),
        }
    }

    /// Wait until the aggregate merges of the commits so far are applied (PostgreSQL with
    /// trailing aggregates; the memory store merges in its commit).
    pub async fn flush(&self) -> Result<(), SinkError> {
        match self {
            Self::Postgres(s) => s.flush_trailing().await,
            Self::Memory(_) => Ok(()),
        }
    }

    /// Commit a batch with its offsets, all or nothing.
    pub async fn commit(&self, batch: &SinkBatch) -> Result<CommitOutcome, SinkError> {
        match self {
            Self::Postgres(s) => s.commit(batch).await,
            Self::Memory(s) => s.commit(batch),
        }
    }

    /// Commit, removing duplicates (and recomputing the aggregates without them) until it
    /// commits. Returns the stats with the number of duplicates removed.
    pub async fn commit_dedup(&self, batch: &mut SinkBatch) -> Result<CommitStats, SinkError> {
        let mut duplicates = 0u64;
        loop {
            match self.commit(batch).await? {
                CommitOutcome::Committed(mut stats) => {
                    stats.duplicates += duplicates;
                    return Ok(stats);
                }
                CommitOutcome::Duplicates(rows) => {
                    let n = batch.remove_rows(&rows).await.map_err(|e| {
                        SinkError::Internal(format!(
                            "recomputing aggregates without duplicates: {e}"
                        ))
                    })?;
                    if n == 0 {
                        return Err(SinkError::Internal(
                            "unique violation without a duplicate row".into(),
                        ));
                    }
                    duplicates += n as u64;
                }
            }
        }
    }
}
