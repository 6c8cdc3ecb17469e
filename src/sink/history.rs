//! The recent history of `transactions` read back as canonical rows: what the window state of
//! `features.sql` is rebuilt from at start, so that a restart or a crash does not reset the
//! entities' history (a card's velocity, its previous transaction).

use datafusion::arrow::array::RecordBatch;
use futures::stream::{BoxStream, StreamExt};
use sqlx::postgres::{PgPool, PgRow};

use super::SinkError;
use super::labels::{canonical_rows, canonical_select};
use crate::engine::canonical::Canonical;

/// The stored transactions whose event time lies within `span_ms` of the newest stored event
/// time — at most `max_rows` of them, the newest — as canonical batches of at most `chunk_rows`
/// rows, in event-time order; rows of equal event time in the order they were committed
/// (`processed_at`), then by id. One query, streamed: one batch is held at a time.
pub(super) fn recent<'a>(
    pool: &'a PgPool,
    canonical: &'a Canonical,
    span_ms: i64,
    max_rows: u64,
    chunk_rows: usize,
) -> BoxStream<'a, Result<RecordBatch, SinkError>> {
    let names: Vec<&str> = canonical
        .columns()
        .iter()
        .map(|c| c.name.as_str())
        .collect();
    let sql = format!(
        "SELECT {select} FROM ( \
           SELECT {names}, processed_at FROM transactions \
           WHERE event_time >= (SELECT max(event_time) FROM transactions) \
                 - make_interval(secs => $1::float8 / 1000) \
           ORDER BY event_time DESC, processed_at DESC, transaction_id DESC \
           LIMIT $2) AS recent \
         ORDER BY event_time, processed_at, transaction_id",
        select = canonical_select(canonical),
        names = names.join(", "),
    );
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(span_ms as f64)
        .bind(i64::try_from(max_rows).unwrap_or(i64::MAX))
        .fetch(pool)
        .chunks(chunk_rows.max(1))
        .map(|rows| {
            let rows: Vec<PgRow> = rows.into_iter().collect::<Result<_, _>>()?;
            canonical_rows(canonical, &rows)
        })
        .boxed()
}
