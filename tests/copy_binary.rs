//! The binary COPY encoder against the real PostgreSQL server: the same Arrow rows loaded once
//! in text format and once in binary format must read back identical, value for value, for every
//! type the sink writes (decimals of many magnitudes and scales among them).

mod common;

use std::sync::Arc;

use datafusion::arrow::array::{
    ArrayRef, BooleanArray, Decimal128Array, Float64Array, Int32Array, Int64Array, RecordBatch,
    StringArray, TimestampMillisecondArray, TimestampNanosecondArray,
};
use datafusion::arrow::datatypes::{DataType, Field, Schema, TimeUnit};
use payguard::sink::copy::{self, PgType};
use proptest::prelude::*;
use sqlx::{Connection, PgConnection, Row};

const COLUMNS: &str = "t text, j jsonb, ms timestamptz, ns timestamptz, d numeric(38,4), \
                       m numeric(18,2), f float8, i int8, w int8, k int4, b bool";

fn types() -> Vec<PgType> {
    use PgType::*;
    vec![
        Text, Jsonb, Timestamp, Timestamp, Numeric, Numeric, Float8, Int8, Int8, Int4, Bool,
    ]
}

#[allow(clippy::type_complexity)]
fn batch(
    rows: &[(
        Option<String>,
        i64,
        i128,
        i128,
        Option<f64>,
        i64,
        i32,
        Option<bool>,
    )],
) -> RecordBatch {
    let schema = Arc::new(Schema::new(vec![
        Field::new("t", DataType::Utf8, true),
        Field::new("j", DataType::Utf8, false),
        Field::new(
            "ms",
            DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
            false,
        ),
        Field::new(
            "ns",
            DataType::Timestamp(TimeUnit::Nanosecond, Some("UTC".into())),
            false,
        ),
        Field::new("d", DataType::Decimal128(38, 4), false),
        Field::new("m", DataType::Decimal128(18, 2), false),
        Field::new("f", DataType::Float64, true),
        Field::new("i", DataType::Int64, false),
        Field::new("w", DataType::Int32, false),
        Field::new("k", DataType::Int32, false),
        Field::new("b", DataType::Boolean, true),
    ]));
    let cols: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter(rows.iter().map(|r| r.0.clone()))),
        Arc::new(StringArray::from_iter_values(
            rows.iter()
                .map(|r| format!("{{\"n\": {}, \"s\": \"x\\ty\"}}", r.5)),
        )),
        Arc::new(
            TimestampMillisecondArray::from_iter_values(rows.iter().map(|r| r.1))
                .with_timezone("UTC"),
        ),
        Arc::new(
            TimestampNanosecondArray::from_iter_values(
                rows.iter()
                    .map(|r| (r.1 % 9_000_000_000_000) * 1_000_000 + 123_000),
            )
            .with_timezone("UTC"),
        ),
        Arc::new(
            Decimal128Array::from_iter_values(rows.iter().map(|r| r.2))
                .with_precision_and_scale(38, 4)
                .unwrap(),
        ),
        Arc::new(
            Decimal128Array::from_iter_values(rows.iter().map(|r| r.3))
                .with_precision_and_scale(18, 2)
                .unwrap(),
        ),
        Arc::new(Float64Array::from_iter(rows.iter().map(|r| r.4))),
        Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.5))),
        Arc::new(Int32Array::from_iter_values(rows.iter().map(|r| r.6))),
        Arc::new(Int32Array::from_iter_values(rows.iter().map(|r| r.6))),
        Arc::new(BooleanArray::from_iter(rows.iter().map(|r| r.7))),
    ];
    RecordBatch::try_new(schema, cols).unwrap()
}

/// Load `b` into two temporary tables, in text and in binary format, and read both back as text.
async fn load_both(conn: &mut PgConnection, b: &RecordBatch) -> (Vec<String>, Vec<String>) {
    for t in ["by_text", "by_binary"] {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "CREATE TEMP TABLE IF NOT EXISTS {t} (seq serial, {COLUMNS})"
        )))
        .execute(&mut *conn)
        .await
        .unwrap();
        sqlx::query(sqlx::AssertSqlSafe(format!("TRUNCATE {t}")))
            .execute(&mut *conn)
            .await
            .unwrap();
    }
    let cols = "t, j, ms, ns, d, m, f, i, w, k, b";
    let mut text = Vec::new();
    copy::encode(b, &mut text).unwrap();
    let mut c = conn
        .copy_in_raw(&format!("COPY by_text ({cols}) FROM STDIN"))
        .await
        .unwrap();
    c.send(text.as_slice()).await.unwrap();
    c.finish().await.unwrap();
    let mut bin = copy::BINARY_HEADER.to_vec();
    copy::encode_binary(b, &types(), &mut bin).unwrap();
    bin.extend_from_slice(copy::BINARY_TRAILER);
    let mut c = conn
        .copy_in_raw(&format!(
            "COPY by_binary ({cols}) FROM STDIN WITH (FORMAT binary)"
        ))
        .await
        .unwrap();
    c.send(bin.as_slice()).await.unwrap();
    c.finish().await.unwrap();
    let mut out = Vec::new();
    for t in ["by_text", "by_binary"] {
        let rows: Vec<String> = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT concat_ws('|', t, j::text, ms::text, ns::text, d::text, m::text, \
             f::text, i::text, w::text, k::text, b::text, scale(d)::text, scale(m)::text) \
             FROM {t} ORDER BY seq"
        )))
        .fetch_all(&mut *conn)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.get::<String, _>(0))
        .collect();
        out.push(rows);
    }
    let by_binary = out.pop().unwrap();
    (out.pop().unwrap(), by_binary)
}

#[tokio::test]
async fn binary_copy_reads_back_as_the_text_copy_for_edge_values() {
    let mut conn = PgConnection::connect(&common::admin_url()).await.unwrap();
    let rows = vec![
        (
            Some("plain".to_string()),
            0,
            0,
            0,
            Some(0.0),
            0,
            0,
            Some(true),
        ),
        (None, -1, -1, -5, None, -1, -1, None),
        (
            Some("tab\tnew\nline\\".into()),
            1_764_547_200_123,
            12_345_678,
            123_456,
            Some(-23.5),
            i64::MAX,
            i32::MAX,
            Some(false),
        ),
        (
            Some("ünïcødé".into()),
            -946_684_800_000,
            100_000_000,
            1_000_000,
            Some(1e-300),
            i64::MIN,
            i32::MIN,
            Some(true),
        ),
        (
            Some(String::new()),
            946_684_800_000,
            99_999_999_999_999_999_999_999_999_999_999_999,
            999_999_999_999_999_999,
            Some(f64::MAX),
            42,
            7,
            None,
        ),
        (
            Some("x".into()),
            253_402_300_799_999,
            -99_999_999_999_999_999_999_999_999_999_999_999,
            -999_999_999_999_999_999,
            Some(f64::NAN),
            1,
            1,
            Some(false),
        ),
        (
            Some("y".into()),
            1,
            1,
            1,
            Some(f64::INFINITY),
            2,
            2,
            Some(true),
        ),
        (
            Some("z".into()),
            2,
            10_000,
            100,
            Some(f64::NEG_INFINITY),
            3,
            3,
            Some(true),
        ),
        (
            Some("w".into()),
            3,
            1_000_000_000_000,
            1_000_000,
            Some(0.1),
            4,
            4,
            Some(true),
        ),
    ];
    let (text, binary) = load_both(&mut conn, &batch(&rows)).await;
    assert_eq!(text.len(), rows.len());
    assert_eq!(text, binary);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]
    #[test]
    fn binary_copy_reads_back_as_the_text_copy(
        rows in prop::collection::vec(
            (
                prop::option::of("[a-z\t\\\\ ]{0,12}"),
                -2_000_000_000_000i64..4_000_000_000_000,
                -10i128.pow(30)..10i128.pow(30),
                -10i128.pow(17)..10i128.pow(17),
                prop::option::of(-1e12f64..1e12),
                any::<i64>(),
                any::<i32>(),
                prop::option::of(any::<bool>()),
            ),
            1..200,
        )
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let (text, binary) = rt.block_on(async {
            let mut conn = PgConnection::connect(&common::admin_url()).await.unwrap();
            load_both(&mut conn, &batch(&rows)).await
        });
        prop_assert_eq!(text.len(), rows.len());
        prop_assert_eq!(text, binary);
    }
}
