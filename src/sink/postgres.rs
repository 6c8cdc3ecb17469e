//! PostgreSQL / TimescaleDB sink: one database transaction per micro-batch holding the rows, the
//! dead letters and the offsets.
//!
//! Rows go in with COPY straight into `transactions`. A transaction id already stored (a producer
//! retry) makes that COPY fail on the primary key; the batch is then committed again through a
//! staging table with `INSERT .. ON CONFLICT DO NOTHING`, so a duplicate is stored once and the
//! common case pays no staging cost.
//!
//! Offsets are written with a guard: a partition's stored offset must still be the one this process
//! started the batch from, or the commit is refused ([`SinkError::Fenced`]): two processes under one
//! pipeline name cannot both write the same messages.

use std::path::Path;
use std::time::Duration;

use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::{Connection, Row};

use super::{CommitStats, SinkBatch, SinkError, StoredOffsets, copy};
use crate::config::PostgresConfig;
use crate::engine::canonical::COLUMNS;

/// The PostgreSQL sink.
#[derive(Debug, Clone)]
pub struct PgSink {
    pool: PgPool,
    pipeline: String,
    copy_statement: String,
    column_list: String,
}

const UNIQUE_VIOLATION: &str = "23505";

impl PgSink {
    /// Connect (one attempt; the caller retries) and apply the migrations in `migrations`.
    pub async fn connect(
        cfg: &PostgresConfig,
        migrations: &Path,
        pipeline: &str,
    ) -> Result<Self, SinkError> {
        let pool = PgPoolOptions::new()
            .max_connections(cfg.max_connections)
            .acquire_timeout(Duration::from_secs(10))
            .connect(&cfg.url)
            .await?;
        let migrator = sqlx::migrate::Migrator::new(migrations)
            .await
            .map_err(|source| SinkError::Migrate {
                dir: migrations.display().to_string(),
                source,
            })?;
        migrator
            .run(&pool)
            .await
            .map_err(|source| SinkError::Migrate {
                dir: migrations.display().to_string(),
                source,
            })?;
        let column_list = COLUMNS.iter().map(|c| c.0).collect::<Vec<_>>().join(", ");
        Ok(Self {
            pool,
            pipeline: pipeline.to_string(),
            copy_statement: format!("COPY transactions ({column_list}) FROM STDIN"),
            column_list,
        })
    }

    /// The connection pool (for the API and tests).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Offsets stored for this pipeline.
    pub async fn load_offsets(&self) -> Result<StoredOffsets, SinkError> {
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

    /// Commit a batch: rows, dead letters and offsets in one transaction.
    pub async fn commit(&self, batch: &SinkBatch) -> Result<CommitStats, SinkError> {
        let mut data = Vec::with_capacity(batch.rows() * 200);
        for b in &batch.transactions {
            copy::encode(b, &mut data)
                .map_err(|e| SinkError::Database(sqlx::Error::Encode(Box::new(e))))?;
        }
        match self.commit_once(batch, &data, false).await {
            Err(SinkError::Database(sqlx::Error::Database(e)))
                if e.code().as_deref() == Some(UNIQUE_VIOLATION) =>
            {
                self.commit_once(batch, &data, true).await
            }
            other => other,
        }
    }

    async fn commit_once(
        &self,
        batch: &SinkBatch,
        data: &[u8],
        dedup: bool,
    ) -> Result<CommitStats, SinkError> {
        let mut conn = self.pool.acquire().await?;
        let mut tx = conn.begin().await?;
        self.write_offsets(&mut tx, batch).await?;
        let rows = batch.rows() as u64;
        let inserted = if rows == 0 {
            0
        } else if !dedup {
            let mut copy = tx.copy_in_raw(&self.copy_statement).await?;
            copy.send(data).await?;
            copy.finish().await?
        } else {
            sqlx::query(
                "CREATE TEMP TABLE IF NOT EXISTS payguard_staging \
                 (LIKE transactions INCLUDING DEFAULTS) ON COMMIT DELETE ROWS",
            )
            .execute(&mut *tx)
            .await?;
            let mut copy = tx
                .copy_in_raw(&format!(
                    "COPY payguard_staging ({}) FROM STDIN",
                    self.column_list
                ))
                .await?;
            copy.send(data).await?;
            copy.finish().await?;
            // The column list is built from compile-time constants (canonical::COLUMNS).
            let r = sqlx::query(sqlx::AssertSqlSafe(format!(
                "INSERT INTO transactions ({cols}) \
                 SELECT DISTINCT ON (transaction_id, event_time) {cols} FROM payguard_staging \
                 ORDER BY transaction_id, event_time \
                 ON CONFLICT DO NOTHING",
                cols = self.column_list
            )))
            .execute(&mut *tx)
            .await?;
            r.rows_affected()
        };
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
        tx.commit().await?;
        Ok(CommitStats {
            inserted,
            duplicates: rows - inserted,
        })
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
