//! Label feedback in PostgreSQL: labels stored in the batch's transaction (the first report of a
//! transaction wins), canonical rows of labelled transactions looked up for the label features, and
//! the recent labels read back at start so the label features survive a restart.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use datafusion::arrow::array::{
    Array, ArrayRef, BooleanBuilder, Decimal128Builder, Float64Builder, Int64Builder, RecordBatch,
    StringArray, StringBuilder, TimestampMillisecondArray, TimestampMillisecondBuilder,
};
use sqlx::Row;
use sqlx::postgres::{PgConnection, PgPool, PgRow};

use super::SinkError;
use crate::engine::canonical::{AMOUNT_PRECISION, AMOUNT_SCALE, Canonical, CanonicalType};
use crate::engine::labels::label_schema;

fn internal(message: String) -> SinkError {
    SinkError::Internal(message)
}

fn text(b: &RecordBatch, name: &str) -> Result<Vec<Option<String>>, SinkError> {
    let c = b
        .column_by_name(name)
        .and_then(|c| c.as_any().downcast_ref::<StringArray>())
        .ok_or_else(|| internal(format!("labels: column {name} is not text")))?;
    Ok(c.iter().map(|v| v.map(str::to_string)).collect())
}

fn times(b: &RecordBatch, name: &str) -> Result<Vec<Option<DateTime<Utc>>>, SinkError> {
    let c = b
        .column_by_name(name)
        .and_then(|c| c.as_any().downcast_ref::<TimestampMillisecondArray>())
        .ok_or_else(|| internal(format!("labels: column {name} is not a timestamp")))?;
    Ok(c.iter()
        .map(|v| v.and_then(DateTime::from_timestamp_millis))
        .collect())
}

/// Store labels (schema [`label_schema`]); a transaction labelled before keeps its first label.
pub(super) async fn write(conn: &mut PgConnection, labels: &RecordBatch) -> Result<(), SinkError> {
    if labels.num_rows() == 0 {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO labels (transaction_id, source, label, report_type, fraud_scenario, \
         transaction_time, reported_at) \
         SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], \
         $6::timestamptz[], $7::timestamptz[]) \
         ON CONFLICT (transaction_id) DO NOTHING",
    )
    .bind(text(labels, "transaction_id")?)
    .bind(text(labels, "source")?)
    .bind(text(labels, "label")?)
    .bind(text(labels, "report_type")?)
    .bind(text(labels, "fraud_scenario")?)
    .bind(times(labels, "transaction_time")?)
    .bind(times(labels, "reported_at")?)
    .execute(conn)
    .await?;
    Ok(())
}

/// The SELECT list of the canonical columns of `transactions` (with the attributes), in
/// canonical order, in the forms [`canonical_rows`] decodes (times as epoch ms, amounts in minor
/// units).
pub(super) fn canonical_select(canonical: &Canonical) -> String {
    canonical
        .columns()
        .iter()
        .map(|c| {
            let name = &c.name;
            match c.kind {
                CanonicalType::Text => format!("{name}::text"),
                CanonicalType::Time => {
                    format!("(extract(epoch FROM {name}) * 1000)::bigint")
                }
                CanonicalType::Money => {
                    format!("round({name} * {})::bigint", 10i64.pow(AMOUNT_SCALE as u32))
                }
                CanonicalType::Coordinate | CanonicalType::Number => format!("{name}::float8"),
                CanonicalType::Integer => format!("{name}::bigint"),
                CanonicalType::Boolean => format!("{name}::boolean"),
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Rows selected with [`canonical_select`] as a canonical batch.
pub(super) fn canonical_rows(
    canonical: &Canonical,
    rows: &[PgRow],
) -> Result<RecordBatch, SinkError> {
    let mut columns: Vec<ArrayRef> = Vec::with_capacity(canonical.len());
    for (i, c) in canonical.columns().iter().enumerate() {
        let col: ArrayRef = match c.kind {
            CanonicalType::Text => {
                let mut b = StringBuilder::new();
                for r in rows {
                    b.append_option(r.try_get::<Option<String>, _>(i)?);
                }
                Arc::new(b.finish())
            }
            CanonicalType::Time => {
                let mut b = TimestampMillisecondBuilder::new();
                for r in rows {
                    b.append_option(r.try_get::<Option<i64>, _>(i)?);
                }
                Arc::new(b.finish().with_timezone("UTC"))
            }
            CanonicalType::Money => {
                let mut b = Decimal128Builder::new();
                for r in rows {
                    b.append_option(r.try_get::<Option<i64>, _>(i)?.map(i128::from));
                }
                Arc::new(
                    b.finish()
                        .with_precision_and_scale(AMOUNT_PRECISION, AMOUNT_SCALE)
                        .map_err(|e| internal(e.to_string()))?,
                )
            }
            CanonicalType::Coordinate | CanonicalType::Number => {
                let mut b = Float64Builder::new();
                for r in rows {
                    b.append_option(r.try_get::<Option<f64>, _>(i)?);
                }
                Arc::new(b.finish())
            }
            CanonicalType::Integer => {
                let mut b = Int64Builder::new();
                for r in rows {
                    b.append_option(r.try_get::<Option<i64>, _>(i)?);
                }
                Arc::new(b.finish())
            }
            CanonicalType::Boolean => {
                let mut b = BooleanBuilder::new();
                for r in rows {
                    b.append_option(r.try_get::<Option<bool>, _>(i)?);
                }
                Arc::new(b.finish())
            }
        };
        columns.push(col);
    }
    RecordBatch::try_new(canonical.schema(), columns)
        .map_err(|e| internal(format!("stored transactions: {e}")))
}

/// The canonical rows of the stored transactions with these ids.
pub(super) async fn lookup_canonical(
    pool: &PgPool,
    canonical: &Canonical,
    ids: &[String],
) -> Result<RecordBatch, SinkError> {
    let sql = format!(
        "SELECT {} FROM transactions WHERE transaction_id = ANY($1)",
        canonical_select(canonical)
    );
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(ids)
        .fetch_all(pool)
        .await?;
    canonical_rows(canonical, &rows)
}

/// Labels reported within `history_ms` of the newest stored transaction (schema
/// [`label_schema`], whose column order the query follows): the ones a label feature can still
/// count.
pub(super) async fn recent(pool: &PgPool, history_ms: i64) -> Result<RecordBatch, SinkError> {
    let rows = sqlx::query(
        "SELECT transaction_id, label, (extract(epoch FROM reported_at) * 1000)::bigint, \
         source, report_type, fraud_scenario, \
         (extract(epoch FROM transaction_time) * 1000)::bigint \
         FROM labels \
         WHERE reported_at >= (SELECT max(event_time) FROM transactions) \
               - make_interval(secs => $1::float8 / 1000) \
         ORDER BY received_at",
    )
    .bind(history_ms as f64)
    .fetch_all(pool)
    .await?;
    let schema = label_schema();
    let mut columns: Vec<ArrayRef> = Vec::new();
    for (i, f) in schema.fields().iter().enumerate() {
        let col: ArrayRef = if matches!(f.data_type(), datafusion::arrow::datatypes::DataType::Utf8)
        {
            let mut b = StringBuilder::new();
            for r in &rows {
                b.append_option(r.try_get::<Option<String>, _>(i)?);
            }
            Arc::new(b.finish())
        } else {
            let mut b = TimestampMillisecondBuilder::new();
            for r in &rows {
                b.append_option(r.try_get::<Option<i64>, _>(i)?);
            }
            Arc::new(b.finish().with_timezone("UTC"))
        };
        columns.push(col);
    }
    RecordBatch::try_new(schema, columns).map_err(|e| internal(format!("recent labels: {e}")))
}
