//! Sinks: where a processed micro-batch is committed, together with the offsets it consumed.
//!
//! - [`postgres`]: PostgreSQL / TimescaleDB. One database transaction per micro-batch holds the
//!   rows (bulk COPY), the dead letters and the next offsets; a crash before the commit leaves
//!   nothing, and the batch is re-read from Kafka on the next start. That is exactly-once.
//! - [`memory`]: an in-process store for the demo and tests, with the same offset semantics.

pub mod copy;
pub mod memory;
pub mod postgres;

use std::collections::HashMap;

use datafusion::arrow::array::RecordBatch;
use tokio::time::Instant;

use crate::decode::DeadLetter;
use crate::source::OffsetCommit;

/// Errors of the sinks.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// The database failed (connection lost, statement failed).
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// Applying the schema migrations failed.
    #[error("database migrations ({dir}): {source}")]
    Migrate {
        /// Migrations directory.
        dir: String,
        /// Underlying error.
        #[source]
        source: sqlx::migrate::MigrateError,
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
    /// Whether retrying the same batch can succeed (database loss) or not (a logic conflict).
    pub fn is_retryable(&self) -> bool {
        !matches!(self, Self::Fenced { .. } | Self::Migrate { .. })
    }
}

/// A processed micro-batch, ready to commit.
#[derive(Debug, Default)]
pub struct SinkBatch {
    /// Sequence number within this run.
    pub seq: u64,
    /// Messages the batch was made of.
    pub messages: usize,
    /// Canonical transactions.
    pub transactions: Vec<RecordBatch>,
    /// Messages that could not be processed.
    pub dead_letters: Vec<DeadLetter>,
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

    /// Commit a batch with its offsets, all or nothing.
    pub async fn commit(&self, batch: &SinkBatch) -> Result<CommitStats, SinkError> {
        match self {
            Self::Postgres(s) => s.commit(batch).await,
            Self::Memory(s) => s.commit(batch),
        }
    }
}
