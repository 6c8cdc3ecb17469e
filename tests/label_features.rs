//! Label features (`fraud_labels(*)`, `known_labels(*)`) against a brute-force reference, and the
//! leakage rule: a transaction never counts a label reported after its own event time, however
//! early the label message was processed.

use std::collections::HashMap;
use std::sync::Arc;

use datafusion::arrow::array::{
    Array, ArrayRef, Decimal128Array, Int64Array, RecordBatch, StringArray,
    TimestampMillisecondArray, new_null_array,
};
use payguard::engine::canonical;
use payguard::engine::features::{FeatureLimits, FeatureStage};
use payguard::engine::labels::label_schema;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const DAY: i64 = 86_400_000;
const LATENESS_MS: i64 = 5 * 60_000;

const FEATURES: &str = "
SELECT transaction_id,
  fraud_labels(*) OVER (PARTITION BY merchant_id ORDER BY event_time
                        RANGE BETWEEN INTERVAL '30 days' PRECEDING AND CURRENT ROW) AS m_fraud_30d,
  known_labels(*) OVER (PARTITION BY merchant_id ORDER BY event_time
                        RANGE BETWEEN INTERVAL '30 days' PRECEDING AND CURRENT ROW) AS m_known_30d,
  fraud_labels(*) OVER (PARTITION BY card_id ORDER BY event_time
                        RANGE BETWEEN INTERVAL '2 days' PRECEDING AND CURRENT ROW) AS c_fraud_2d,
  count(*) OVER (PARTITION BY card_id ORDER BY event_time
                 RANGE BETWEEN INTERVAL '1 hour' PRECEDING AND CURRENT ROW) AS c_tx_1h
FROM transactions";

#[derive(Clone, Debug)]
struct Row {
    id: String,
    t: i64,
    card: Option<String>,
    merchant: Option<String>,
}

#[derive(Clone, Debug)]
struct Label {
    id: String,
    fraud: bool,
    reported_at: i64,
}

/// A stream over ~40 simulated days, out of order by up to 4 minutes, and labels for some of its
/// transactions reported 10 minutes to 10 days later (some transactions labelled twice, the second
/// report later: the first label wins).
fn stream(seed: u64, n: usize) -> (Vec<Row>, Vec<Label>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut clock = 1_762_000_000_000i64;
    let step = 40 * DAY / n as i64;
    let rows: Vec<Row> = (0..n)
        .map(|i| {
            clock += rng.random_range(0..2 * step);
            Row {
                id: format!("tx{i}"),
                t: clock - rng.random_range(0..240_000),
                card: rng
                    .random_bool(0.95)
                    .then(|| format!("card{}", rng.random_range(0..150))),
                merchant: rng
                    .random_bool(0.9)
                    .then(|| format!("m{}", rng.random_range(0..30))),
            }
        })
        .collect();
    let mut labels = Vec::new();
    for r in &rows {
        let draws = if rng.random_bool(0.15) {
            1
        } else if rng.random_bool(0.01) {
            2
        } else {
            0
        };
        // A second report of the same transaction comes later (the first one wins).
        let mut reported_at = r.t;
        for _ in 0..draws {
            reported_at += rng.random_range(10 * 60_000..10 * DAY);
            labels.push(Label {
                id: r.id.clone(),
                fraud: rng.random_bool(0.6),
                reported_at,
            });
        }
    }
    (rows, labels)
}

fn canonical_batch(rows: &[Row]) -> RecordBatch {
    let schema = canonical::schema();
    let n = rows.len();
    let cols: Vec<ArrayRef> = schema
        .fields()
        .iter()
        .map(|f| -> ArrayRef {
            match f.name().as_str() {
                "transaction_id" => Arc::new(StringArray::from_iter_values(
                    rows.iter().map(|r| r.id.clone()),
                )),
                "event_time" => Arc::new(
                    TimestampMillisecondArray::from(rows.iter().map(|r| r.t).collect::<Vec<_>>())
                        .with_timezone("UTC"),
                ),
                "source" => Arc::new(StringArray::from_iter_values(rows.iter().map(|_| "card"))),
                "amount" => Arc::new(
                    Decimal128Array::from(vec![100i128; n])
                        .with_precision_and_scale(18, 2)
                        .unwrap(),
                ),
                "currency" => Arc::new(StringArray::from_iter_values(rows.iter().map(|_| "BRL"))),
                "card_id" => Arc::new(rows.iter().map(|r| r.card.clone()).collect::<StringArray>()),
                "merchant_id" => Arc::new(
                    rows.iter()
                        .map(|r| r.merchant.clone())
                        .collect::<StringArray>(),
                ),
                _ => new_null_array(f.data_type(), n),
            }
        })
        .collect();
    RecordBatch::try_new(schema, cols).unwrap()
}

fn label_batch(labels: &[&Label]) -> RecordBatch {
    let schema = label_schema();
    let n = labels.len();
    let mut cols: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(
            labels.iter().map(|l| l.id.clone()),
        )),
        Arc::new(StringArray::from_iter_values(
            labels
                .iter()
                .map(|l| if l.fraud { "fraud" } else { "genuine" }),
        )),
        Arc::new(
            TimestampMillisecondArray::from(
                labels.iter().map(|l| l.reported_at).collect::<Vec<_>>(),
            )
            .with_timezone("UTC"),
        ),
    ];
    for f in schema.fields().iter().skip(3) {
        cols.push(new_null_array(f.data_type(), n));
    }
    RecordBatch::try_new(schema, cols).unwrap()
}

async fn stage(dir: &std::path::Path) -> FeatureStage {
    let file = dir.join("features.sql");
    std::fs::write(&file, FEATURES).unwrap();
    FeatureStage::compile(
        &file,
        &FeatureLimits {
            history_ms: 7 * DAY,
            lateness_ms: LATENESS_MS,
            max_entities: 1_000_000,
            label_history_ms: 90 * DAY,
            label_index_max: 1_000_000,
        },
    )
    .await
    .unwrap()
}

/// When label messages are processed.
#[derive(Clone, Copy, Debug)]
enum Feed {
    /// As early as possible: with the batch holding the labelled transaction, long before the
    /// label was reported.
    Early,
    /// With the batch holding the first row at or after the report time (how `replay` feeds).
    AtReport,
}

/// Features of the stream cut into batches of `cut` rows, labels fed per `feed`.
async fn run(rows: &[Row], labels: &[Label], cut: usize, feed: Feed) -> Vec<[i64; 4]> {
    let dir = tempfile::tempdir().unwrap();
    let mut st = stage(dir.path()).await;
    let pos: HashMap<&str, usize> = rows
        .iter()
        .enumerate()
        .map(|(i, r)| (r.id.as_str(), i))
        .collect();
    // The batch (by its first row) each label is fed with.
    let mut fed_with: Vec<(usize, &Label)> = labels
        .iter()
        .map(|l| {
            let at = match feed {
                Feed::Early => pos[l.id.as_str()],
                Feed::AtReport => {
                    // The first row, in arrival order, at or after the report... or the end.
                    let i = rows
                        .iter()
                        .position(|r| r.t >= l.reported_at)
                        .unwrap_or(rows.len());
                    i.max(pos[l.id.as_str()])
                }
            };
            (at / cut, l)
        })
        .collect();
    fed_with.sort_by_key(|(b, _)| *b);
    let mut out = Vec::with_capacity(rows.len());
    let mut next = 0;
    for (b, chunk) in rows.chunks(cut).enumerate() {
        let batch = canonical_batch(chunk);
        let mine: Vec<&Label> = fed_with[next..]
            .iter()
            .take_while(|(fb, _)| *fb == b)
            .map(|(_, l)| *l)
            .collect();
        next += mine.len();
        if !mine.is_empty() {
            st.queue_labels(&label_batch(&mine)).unwrap();
            let ids = batch.column(0).as_any().downcast_ref::<StringArray>();
            assert!(
                st.unresolved_labels(ids).is_empty(),
                "every labelled transaction is indexed or in the batch"
            );
        }
        let f = st.process(&batch).await.unwrap();
        let col = |i: usize| {
            f.column(i)
                .as_any()
                .downcast_ref::<Int64Array>()
                .unwrap()
                .clone()
        };
        let cols = [col(0), col(1), col(2), col(3)];
        for r in 0..chunk.len() {
            out.push([
                cols[0].value(r),
                cols[1].value(r),
                cols[2].value(r),
                cols[3].value(r),
            ]);
        }
    }
    out
}

/// Brute force: labels of the entity's transactions with event time in `[t - range, t]`,
/// reported at or before `t`; the first label of a transaction wins.
fn brute(rows: &[Row], labels: &[Label]) -> Vec<[i64; 3]> {
    let mut first: HashMap<&str, &Label> = HashMap::new();
    for l in labels {
        first.entry(l.id.as_str()).or_insert(l);
    }
    let by_id: HashMap<&str, &Row> = rows.iter().map(|r| (r.id.as_str(), r)).collect();
    let labelled: Vec<(&Row, &Label)> =
        first.values().map(|l| (by_id[l.id.as_str()], *l)).collect();
    rows.iter()
        .map(|x| {
            let count = |key: fn(&Row) -> &Option<String>, range: i64, fraud_only: bool| {
                let Some(k) = key(x) else { return 0 };
                labelled
                    .iter()
                    .filter(|(r, l)| {
                        key(r).as_ref() == Some(k)
                            && r.t >= x.t - range
                            && r.t <= x.t
                            && l.reported_at <= x.t
                            && (l.fraud || !fraud_only)
                    })
                    .count() as i64
            };
            [
                count(|r| &r.merchant, 30 * DAY, true),
                count(|r| &r.merchant, 30 * DAY, false),
                count(|r| &r.card, 2 * DAY, true),
            ]
        })
        .collect()
}

#[tokio::test]
async fn label_features_match_brute_force_for_every_cut_and_feeding_time() {
    for seed in [1u64, 2] {
        let (rows, labels) = stream(seed, 4_000);
        let want = brute(&rows, &labels);
        assert!(
            want.iter().filter(|w| w[0] > 0).count() > 200,
            "the stream must exercise the label features"
        );
        let mut reference: Option<Vec<[i64; 4]>> = None;
        for (cut, feed) in [
            (1, Feed::Early),
            (7, Feed::AtReport),
            (1000, Feed::Early),
            (1000, Feed::AtReport),
            (50_000, Feed::Early),
        ] {
            let got = run(&rows, &labels, cut, feed).await;
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert_eq!(
                    &g[..3],
                    &w[..],
                    "seed {seed}, cut {cut}, {feed:?}: row {i} ({:?})",
                    rows[i]
                );
            }
            // The row-history feature beside them is unaffected by the labels.
            if let Some(r) = &reference {
                assert_eq!(r, &got, "seed {seed}, cut {cut}, {feed:?}");
            }
            reference = Some(got);
        }
    }
}

#[tokio::test]
async fn a_label_processed_early_is_not_seen_before_its_report_time() {
    let hour = 3_600_000;
    let t0 = 1_762_000_000_000i64;
    let row = |id: &str, t: i64| Row {
        id: id.into(),
        t,
        card: Some(format!("card-{id}")),
        merchant: Some("m1".into()),
    };
    let rows = vec![
        row("a", t0),
        row("b", t0 + hour),
        row("c", t0 + 25 * hour),
        row("d", t0 + 31 * DAY),
    ];
    // a's chargeback is reported a day after a, but the message is processed with a itself.
    let labels = vec![Label {
        id: "a".into(),
        fraud: true,
        reported_at: t0 + DAY,
    }];
    let got = run(&rows, &labels, 50_000, Feed::Early).await;
    let fraud: Vec<i64> = got.iter().map(|g| g[0]).collect();
    // a and b happened before the report: they must not see it; c does; d is 31 days after a,
    // outside the 30-day frame.
    assert_eq!(fraud, vec![0, 0, 1, 0]);
}
