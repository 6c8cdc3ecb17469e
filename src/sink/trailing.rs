//! Trailing aggregates (`postgres.trail_aggregates`): a micro-batch's aggregate merges commit on
//! a second connection, a batch behind its rows, so that two PostgreSQL backends work at once
//! (the COPY of one batch's rows beside the merges of the batch before).
//!
//! Exactly-once holds across the two transactions (migration `0006_trailing_aggregates.sql`):
//! the rows' transaction tags every row with its `commit_seq` and records the merge it leaves
//! in `sink_pending_aggregates`; the merge's transaction deletes that record first and commits
//! with it. A merge whose record is gone (another process applied it) merges nothing. At start,
//! [`super::postgres::PgSink::load_offsets`] applies what a crash left pending, computing the
//! partial aggregates again from the stored rows of each pending commit ([`stored_rows`]).
//!
//! [`Writer`] is the task that applies the merges in commit order, retrying a lost database with
//! backoff; a merge it cannot apply (a statement the database rejects) stops it, and the next
//! commit of rows reports that error instead of committing.

use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use datafusion::arrow::array::{ArrayRef, Float64Builder, RecordBatch, StringBuilder};
use datafusion::arrow::datatypes::SchemaRef;
use sqlx::Row;
use sqlx::postgres::{PgPool, PgRow};
use tokio::sync::{mpsc, oneshot};

use super::SinkError;
use super::labels::{canonical_rows, canonical_select};
use super::postgres::PgSink;
use crate::engine::aggregates::AggregateStage;
use crate::engine::canonical::Canonical;
use crate::metrics::Metrics;
use crate::source::kafka::Backoff;

/// The merges a commit of rows left pending.
#[derive(Debug, Clone)]
pub struct Job {
    /// The `commit_seq` of the rows' transaction (the key of its `sink_pending_aggregates` row).
    pub seq: i64,
    /// The stages that computed the partials.
    pub stages: Arc<Vec<AggregateStage>>,
    /// Partial aggregates per stage name.
    pub aggregates: Vec<(String, Vec<RecordBatch>)>,
}

enum Message {
    Merge(Job),
    Flush(oneshot::Sender<()>),
}

/// The task applying pending merges, in order (cheap to clone).
#[derive(Debug, Clone)]
pub struct Writer {
    jobs: mpsc::Sender<Message>,
    failed: Arc<Mutex<Option<String>>>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Message {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Merge(j) => write!(f, "Merge({})", j.seq),
            Self::Flush(_) => f.write_str("Flush"),
        }
    }
}

impl Writer {
    /// Start the task on the current runtime. It holds one merge in hand and one queued: a
    /// commit of rows that would queue a third waits (aggregates trail by at most two batches).
    /// `metrics`: `payguard_sink_trailing_pending` and `payguard_sink_trailing_merge_seconds`.
    pub fn spawn(
        sink: PgSink,
        retry_initial_ms: u64,
        retry_max_ms: u64,
        metrics: Arc<Metrics>,
    ) -> Self {
        let (jobs, mut rx) = mpsc::channel::<Message>(1);
        let failed: Arc<Mutex<Option<String>>> = Arc::default();
        let failed_in_task = failed.clone();
        let task_metrics = metrics.clone();
        tokio::spawn(async move {
            let mut backoff = Backoff::new(retry_initial_ms, retry_max_ms);
            while let Some(message) = rx.recv().await {
                let job = match message {
                    Message::Merge(job) => job,
                    Message::Flush(done) => {
                        let _ = done.send(());
                        continue;
                    }
                };
                loop {
                    let started = std::time::Instant::now();
                    match sink.merge_pending(&job).await {
                        Ok(_) => {
                            backoff.reset();
                            let m = &task_metrics;
                            m.trailing_time.observe(started.elapsed().as_secs_f64());
                            m.trailing_pending.add(-1.0);
                            break;
                        }
                        Err(e) if e.is_retryable() => {
                            let d = backoff.next_delay();
                            tracing::warn!(error = %e, retry_in = ?d, commit_seq = job.seq,
                                "trailing aggregate merge failed; retrying it");
                            tokio::time::sleep(d).await;
                        }
                        Err(e) => {
                            tracing::error!(error = %e, commit_seq = job.seq,
                                "trailing aggregate merge failed; it stays pending for the next start");
                            *failed_in_task.lock().expect("failed lock") = Some(format!(
                                "the aggregate merge of commit {} failed: {e}",
                                job.seq
                            ));
                            return;
                        }
                    }
                }
            }
        });
        Self {
            jobs,
            failed,
            metrics,
        }
    }

    /// The error that stopped the task, if it stopped.
    pub fn failure(&self) -> Option<SinkError> {
        self.failed
            .lock()
            .expect("failed lock")
            .clone()
            .map(SinkError::Internal)
    }

    /// Queue a merge (waits while the task has one in hand and one queued).
    pub async fn send(&self, job: Job) -> Result<(), SinkError> {
        self.metrics.trailing_pending.add(1.0);
        if self.jobs.send(Message::Merge(job)).await.is_err() {
            return Err(self.stopped());
        }
        Ok(())
    }

    /// Wait until every merge queued before is applied.
    pub async fn flush(&self) -> Result<(), SinkError> {
        let (tx, rx) = oneshot::channel();
        if self.jobs.send(Message::Flush(tx)).await.is_err() || rx.await.is_err() {
            return Err(self.stopped());
        }
        Ok(())
    }

    fn stopped(&self) -> SinkError {
        self.failure()
            .unwrap_or_else(|| SinkError::Internal("the trailing aggregate writer stopped".into()))
    }
}

/// A commit whose merges are pending in the database.
#[derive(Debug, Clone, Copy)]
pub struct Pending {
    /// Its `commit_seq`.
    pub seq: i64,
    /// The event-time range of its rows (bounds the scan for them).
    pub first: DateTime<Utc>,
    /// See `first`.
    pub last: DateTime<Utc>,
}

/// The commits of `pipeline` whose merges are pending, oldest first.
pub async fn pending(pool: &PgPool, pipeline: &str) -> Result<Vec<Pending>, SinkError> {
    Ok(sqlx::query(
        "SELECT commit_seq, first_event_time, last_event_time FROM sink_pending_aggregates \
         WHERE pipeline = $1 ORDER BY commit_seq",
    )
    .bind(pipeline)
    .fetch_all(pool)
    .await?
    .into_iter()
    .map(|r| Pending {
        seq: r.get(0),
        first: r.get(1),
        last: r.get(2),
    })
    .collect())
}

/// The stored rows of one commit, in `stored` (the decided schema narrowed to the columns of
/// `transactions`: canonical columns, score, model_version, decision, rule_hits).
pub async fn stored_rows(
    pool: &PgPool,
    canonical: &Canonical,
    p: &Pending,
    stored: &SchemaRef,
) -> Result<RecordBatch, SinkError> {
    let sql = format!(
        "SELECT {}, score, model_version, decision, rule_hits::text FROM transactions \
         WHERE commit_seq = $1 AND event_time BETWEEN $2 AND $3",
        canonical_select(canonical)
    );
    let rows: Vec<PgRow> = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(p.seq)
        .bind(p.first)
        .bind(p.last)
        .fetch_all(pool)
        .await?;
    let at = canonical.len();
    let canonical = canonical_rows(canonical, &rows)?;
    let mut score = Float64Builder::with_capacity(rows.len());
    let mut text = [
        StringBuilder::new(),
        StringBuilder::new(),
        StringBuilder::new(),
    ];
    for r in &rows {
        score.append_option(r.try_get::<Option<f64>, _>(at)?);
        for (i, b) in text.iter_mut().enumerate() {
            b.append_option(r.try_get::<Option<String>, _>(at + 1 + i)?);
        }
    }
    let mut columns: Vec<ArrayRef> = canonical.columns().to_vec();
    columns.push(Arc::new(score.finish()));
    columns.extend(text.iter_mut().map(|b| Arc::new(b.finish()) as ArrayRef));
    RecordBatch::try_new(stored.clone(), columns).map_err(|e| {
        SinkError::Internal(format!(
            "the stored rows of commit {} do not fit the decided columns: {e}",
            p.seq
        ))
    })
}
