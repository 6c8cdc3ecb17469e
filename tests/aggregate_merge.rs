//! The merge of partial aggregates into their table, against the real PostgreSQL server: over
//! several commits whose groups overlap (NULL keys among them), the table must equal the
//! aggregate of all rows computed here by brute force, whichever way the groups went in (copied
//! as new, merged as known, or merged after a wrong guess by a sink that did not know them); and
//! a group inserted by a concurrent writer while a batch writes it must be merged, or make the
//! batch retryable, never lost or failed for good.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use datafusion::arrow::array::{
    ArrayRef, Decimal128Array, Float64Array, RecordBatch, StringArray, TimestampMillisecondArray,
};
use datafusion::arrow::datatypes::{DataType, Field, Schema, TimeUnit};
use payguard::engine::aggregates::AggregateStage;
use payguard::sink::postgres::{AggregatePaths, PgSink};
use payguard::sink::{CommitOutcome, Sink, SinkBatch, SinkError};
use rand::{Rng, SeedableRng};
use sqlx::{Connection, PgConnection, Row};

const AGGREGATE: &str = "\
SELECT date_bin(INTERVAL '5 minutes', event_time) AS bucket,
       country,
       count(*) AS transactions,
       sum(amount) AS amount,
       min(amount) AS smallest,
       max(score) AS max_score
FROM decided
GROUP BY date_bin(INTERVAL '5 minutes', event_time), country
";

const MINUTE_MS: i64 = 60_000;
const BUCKET_MS: i64 = 5 * MINUTE_MS;

fn schema() -> Arc<Schema> {
    Arc::new(Schema::new(vec![
        Field::new(
            "event_time",
            DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
            false,
        ),
        Field::new("country", DataType::Utf8, true),
        Field::new("amount", DataType::Decimal128(18, 2), false),
        Field::new("score", DataType::Float64, true),
    ]))
}

/// One row: event time (ms), country (None = NULL), amount in cents, score.
type Row4 = (i64, Option<&'static str>, i128, f64);

fn batch(rows: &[Row4]) -> RecordBatch {
    let cols: Vec<ArrayRef> = vec![
        Arc::new(
            TimestampMillisecondArray::from_iter_values(rows.iter().map(|r| r.0))
                .with_timezone("UTC"),
        ),
        Arc::new(rows.iter().map(|r| r.1).collect::<StringArray>()),
        Arc::new(
            Decimal128Array::from_iter_values(rows.iter().map(|r| r.2))
                .with_precision_and_scale(18, 2)
                .unwrap(),
        ),
        Arc::new(rows.iter().map(|r| Some(r.3)).collect::<Float64Array>()),
    ];
    RecordBatch::try_new(schema(), cols).unwrap()
}

/// Brute force: (bucket ms, country) -> (count, sum cents, min cents, max score).
type Expected = BTreeMap<(i64, Option<String>), (i64, i128, i128, f64)>;

fn expected(rows: &[Row4]) -> Expected {
    let mut out = Expected::new();
    for r in rows {
        let key = (
            r.0.div_euclid(BUCKET_MS) * BUCKET_MS,
            r.1.map(str::to_string),
        );
        let e = out.entry(key).or_insert((0, 0, i128::MAX, f64::MIN));
        e.0 += 1;
        e.1 += r.2;
        e.2 = e.2.min(r.2);
        e.3 = e.3.max(r.3);
    }
    out
}

async fn stored(conn: &mut PgConnection) -> Expected {
    sqlx::query(
        "SELECT (extract(epoch FROM bucket) * 1000)::bigint, country, transactions, \
                (amount * 100)::bigint, (smallest * 100)::bigint, max_score \
         FROM agg_merge_test",
    )
    .fetch_all(conn)
    .await
    .unwrap()
    .into_iter()
    .map(|r| {
        let cents = |i: usize| -> i128 { r.get::<i64, _>(i) as i128 };
        (
            (r.get::<i64, _>(0), r.get::<Option<String>, _>(1)),
            (r.get::<i64, _>(2), cents(3), cents(4), r.get::<f64, _>(5)),
        )
    })
    .collect()
}

struct Setup {
    env: common::TestEnv,
    _sql: tempfile::TempDir,
    stages: Arc<Vec<AggregateStage>>,
    pg: PgSink,
    sink: Sink,
}

/// A PostgreSQL sink on the test's database with the tables of `stages` prepared.
async fn connect(env: &common::TestEnv, stages: &[AggregateStage]) -> PgSink {
    let pg = env.pg_sink().await;
    pg.prepare_aggregates(stages).await.unwrap();
    pg
}

async fn setup(name: &str) -> Setup {
    let env = common::TestEnv::new(name, |_| {}).await;
    let sql = tempfile::tempdir().unwrap();
    let file = sql.path().join("merge_test.sql");
    std::fs::write(&file, AGGREGATE).unwrap();
    let stage = AggregateStage::compile(&file, schema()).await.unwrap();
    let pg = connect(&env, std::slice::from_ref(&stage)).await;
    Setup {
        env,
        _sql: sql,
        stages: Arc::new(vec![stage]),
        pg: pg.clone(),
        sink: Sink::Postgres(pg),
    }
}

impl Setup {
    /// A second sink on the same database, as another process would be: it knows no group.
    async fn other_sink(&self) -> PgSink {
        connect(&self.env, &self.stages).await
    }

    async fn sink_batch(&self, seq: u64, rows: &[Row4]) -> SinkBatch {
        let partials = self.stages[0].partial(&[batch(rows)]).await.unwrap();
        SinkBatch {
            seq,
            aggregates: vec![("merge_test".into(), partials)],
            aggregate_stages: self.stages.clone(),
            ..SinkBatch::default()
        }
    }
}

#[tokio::test]
async fn merged_groups_equal_the_aggregate_of_all_rows_null_keys_included() {
    let s = setup("aggmerge").await;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let countries = [Some("DE"), Some("FR"), None, Some("US"), Some("NL")];
    let other = s.other_sink().await;
    let mut all: Vec<Row4> = Vec::new();
    for seq in 0..6u64 {
        // Overlapping buckets from batch to batch: every commit both updates and inserts groups.
        let rows: Vec<Row4> = (0..400)
            .map(|_| {
                (
                    1_790_000_000_000
                        + (seq as i64 * 3 + rng.random_range(0..8)) * BUCKET_MS
                        + rng.random_range(0..BUCKET_MS),
                    countries[rng.random_range(0..countries.len())],
                    rng.random_range(1..1_000_000) as i128,
                    rng.random_range(0.0..1.0),
                )
            })
            .collect();
        all.extend_from_slice(&rows);
        let b = s.sink_batch(seq, &rows).await;
        // The last commit comes from a second sink that knows none of the groups: its guess that they
        // are new fails on the stored ones, and it merges the batch instead.
        let sink = if seq == 5 {
            Sink::Postgres(other.clone())
        } else {
            s.sink.clone()
        };
        assert!(matches!(
            sink.commit(&b).await.unwrap(),
            CommitOutcome::Committed(_)
        ));
        let mut conn = s.env.db().await;
        let got = stored(&mut conn).await;
        let want = expected(&all);
        assert!(
            want.keys().any(|k| k.1.is_none()),
            "the stream must hold NULL keys"
        );
        assert_eq!(got.len(), want.len(), "groups after commit {seq}");
        for (k, w) in &want {
            let g = got.get(k).unwrap_or_else(|| panic!("group {k:?} missing"));
            assert_eq!((g.0, g.1, g.2), (w.0, w.1, w.2), "group {k:?}");
            assert!((g.3 - w.3).abs() <= 1e-12, "max score of {k:?}");
        }
    }
    // Every path was taken: new groups copied and known ones merged by the first sink; one
    // wrong guess, rolled back and merged, by the second.
    let first = s.pg.aggregate_paths();
    assert!(first.copied > 0 && first.merged > 0, "{first:?}");
    assert_eq!(first.fallbacks, 0, "{first:?}");
    let second = other.aggregate_paths();
    assert_eq!(second.fallbacks, 1, "{second:?}");
    assert_eq!(second.copied, 0, "{second:?}");
    assert!(second.merged > 0, "{second:?}");
}

#[tokio::test]
async fn a_failed_guess_pauses_guessing_and_an_emptied_table_is_merged_into() {
    let s = setup("aggpause").await;
    let rows: Vec<Row4> = vec![
        (1_790_000_000_000, Some("DE"), 1_000, 0.5),
        (1_790_000_000_000, None, 3_000, 0.75),
    ];
    s.sink.commit(&s.sink_batch(0, &rows).await).await.unwrap();
    assert_eq!(
        s.pg.aggregate_paths(),
        AggregatePaths {
            copied: 2,
            merged: 0,
            fallbacks: 0
        }
    );
    // The table emptied behind the sink's back (as retention drops old groups): the groups it
    // knows are merged, which inserts them.
    let mut conn = s.env.db().await;
    sqlx::query("DELETE FROM agg_merge_test")
        .execute(&mut conn)
        .await
        .unwrap();
    s.sink.commit(&s.sink_batch(1, &rows).await).await.unwrap();
    assert_eq!(s.pg.aggregate_paths().merged, 2);
    assert_eq!(stored(&mut conn).await.len(), 2);
    // A sink that does not know them guesses wrong once, then merges for the paused commits
    // even groups it has never seen, then guesses again.
    let other = s.other_sink().await;
    let sink = Sink::Postgres(other.clone());
    sink.commit(&s.sink_batch(2, &rows).await).await.unwrap();
    assert_eq!(other.aggregate_paths().fallbacks, 1);
    let fresh =
        |i: i64| -> Vec<Row4> { vec![(1_790_000_000_000 + i * BUCKET_MS, Some("FR"), 10, 0.1)] };
    for i in 1..=payguard::sink::groups::PAUSE_COMMITS as i64 {
        sink.commit(&s.sink_batch(2 + i as u64, &fresh(i)).await)
            .await
            .unwrap();
    }
    let paused = other.aggregate_paths();
    assert_eq!(paused.copied, 0, "{paused:?}");
    sink.commit(&s.sink_batch(100, &fresh(100)).await)
        .await
        .unwrap();
    assert_eq!(other.aggregate_paths().copied, 1);
    let got = stored(&mut conn).await;
    assert_eq!(
        got.len(),
        2 + payguard::sink::groups::PAUSE_COMMITS as usize + 1
    );
    let bucket = 1_790_000_000_000_i64.div_euclid(BUCKET_MS) * BUCKET_MS;
    assert_eq!(got[&(bucket, Some("DE".into()))].0, 2);
    assert_eq!(got[&(bucket, None)].1, 6_000);
}

/// Another writer inserts the DE group of `bucket` and holds its transaction open while the
/// sink commits `rows`; it commits once the sink's `statement` (COPY or MERGE) waits for it on
/// the unique key. Returns the sink's result.
async fn commit_beside_a_concurrent_insert(
    s: &Setup,
    seq: u64,
    rows: &[Row4],
    bucket: i64,
    statement: &str,
) -> Result<CommitOutcome, SinkError> {
    let mut other = s.env.db().await;
    let mut tx = other.begin().await.unwrap();
    sqlx::query(
        "INSERT INTO agg_merge_test (bucket, country, transactions, amount, smallest, max_score) \
         VALUES (to_timestamp($1::double precision / 1000), 'DE', 10, 100.00, 1.00, 0.9)",
    )
    .bind(bucket as f64)
    .execute(&mut *tx)
    .await
    .unwrap();
    let b = s.sink_batch(seq, rows).await;
    let sink = s.sink.clone();
    let commit = tokio::spawn(async move { sink.commit(&b).await });
    let mut watch = s.env.db().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE datname = current_database() AND wait_event_type = 'Lock' AND query LIKE $1",
        )
        .bind(format!("{statement}%"))
        .fetch_one(&mut watch)
        .await
        .unwrap();
        if waiting > 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the sink's {statement} never waited for the concurrent insert"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tx.commit().await.unwrap();
    commit.await.unwrap()
}

#[tokio::test]
async fn a_group_inserted_concurrently_is_merged_or_makes_the_batch_retryable() {
    let s = setup("aggconflict").await;
    let t0 = 1_790_000_000_000_i64;
    let rows: Vec<Row4> = vec![
        (t0, Some("DE"), 1_000, 0.5),
        (t0 + MINUTE_MS, Some("FR"), 2_000, 0.25),
    ];
    let bucket = t0.div_euclid(BUCKET_MS) * BUCKET_MS;
    // Groups the sink has never seen are copied: the COPY meets the concurrent DE group, is
    // rolled back to its savepoint, and the batch merges into that group in the same commit.
    let done = commit_beside_a_concurrent_insert(&s, 0, &rows, bucket, "COPY")
        .await
        .unwrap();
    assert!(matches!(done, CommitOutcome::Committed(_)));
    assert_eq!(s.pg.aggregate_paths().fallbacks, 1);
    let mut conn = s.env.db().await;
    let got = stored(&mut conn).await;
    assert_eq!(got[&(bucket, Some("DE".into()))].0, 11);
    assert_eq!(got[&(bucket, Some("DE".into()))].1, 11_000);
    assert_eq!(got[&(bucket, Some("DE".into()))].2, 100);
    assert_eq!(got[&(bucket, Some("FR".into()))].0, 1);

    // A group the sink knows goes through the MERGE. Gone from the table (as retention drops
    // it) and inserted again by another writer while the MERGE inserts it, it makes the batch
    // retryable.
    sqlx::query("DELETE FROM agg_merge_test")
        .execute(&mut conn)
        .await
        .unwrap();
    let err = commit_beside_a_concurrent_insert(&s, 1, &rows, bucket, "MERGE")
        .await
        .expect_err("the merge must meet the concurrent group");
    assert!(
        matches!(err, SinkError::ConcurrentGroup { .. }) && err.is_retryable(),
        "{err}"
    );
    // The retry (what the pipeline does) merges into the group the other writer stored.
    s.sink.commit(&s.sink_batch(1, &rows).await).await.unwrap();
    let got = stored(&mut conn).await;
    assert_eq!(got[&(bucket, Some("DE".into()))].0, 11);
    assert_eq!(got[&(bucket, Some("DE".into()))].1, 11_000);
    assert_eq!(got[&(bucket, Some("FR".into()))].0, 1);
}
