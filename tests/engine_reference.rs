//! The window engine against a brute-force reference, and batch-boundary invariance.
//!
//! Reference: random streams over many entities, out of order within the allowed lateness; every
//! window feature is recomputed by brute force straight from its definition (the rows of the same
//! entity that arrived before, or are, the row, with event time in `[t - range, t]`) and must agree
//! exactly (integers, decimals, text) or to a relative 1e-9 (floats).
//!
//! Invariance: the same stream cut into batches of 1, 7, 1000 and 50,000 rows yields the same
//! features, decisions and merged aggregates.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::Arc;

use datafusion::arrow::array::{
    Array, ArrayRef, Decimal128Array, Float64Array, Int64Array, RecordBatch, StringArray,
    TimestampMillisecondArray, new_null_array,
};
use datafusion::arrow::util::display::array_value_to_string;
use payguard::engine::aggregates::Merge;
use payguard::engine::canonical;
use payguard::engine::features::{FeatureLimits, FeatureStage};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const LATENESS_MS: i64 = 5 * 60_000;
const HISTORY_MS: i64 = 7 * 86_400_000;

/// One generated row.
#[derive(Clone, Debug)]
struct Row {
    id: String,
    t: i64,
    card: Option<String>,
    customer: String,
    merchant: Option<String>,
    cents: i64,
    lat: f64,
}

fn stream(seed: u64, n: usize) -> Vec<Row> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut clock = 1_762_000_000_000i64;
    (0..n)
        .map(|i| {
            clock += rng.random_range(0..20_000);
            // Out of order by up to 4 minutes: within the 5-minute lateness.
            let t = clock - rng.random_range(0..240_000);
            Row {
                id: format!("tx{i}"),
                t,
                card: rng
                    .random_bool(0.95)
                    .then(|| format!("card{}", rng.random_range(0..300))),
                customer: format!("cus{}", rng.random_range(0..200)),
                merchant: rng
                    .random_bool(0.9)
                    .then(|| format!("m{}", rng.random_range(0..50))),
                cents: rng.random_range(1..500_000),
                lat: 100.0 + rng.random::<f64>() * 50.0,
            }
        })
        .collect()
}

fn canonical_batch(rows: &[Row]) -> RecordBatch {
    let schema = canonical::schema();
    let n = rows.len();
    let mut cols: Vec<ArrayRef> = Vec::new();
    for f in schema.fields() {
        let a: ArrayRef = match f.name().as_str() {
            "transaction_id" => Arc::new(StringArray::from_iter_values(
                rows.iter().map(|r| r.id.clone()),
            )),
            "event_time" => Arc::new(
                TimestampMillisecondArray::from(rows.iter().map(|r| r.t).collect::<Vec<_>>())
                    .with_timezone("UTC"),
            ),
            "source" => Arc::new(StringArray::from_iter_values(rows.iter().map(|_| "card"))),
            "amount" => Arc::new(
                Decimal128Array::from(rows.iter().map(|r| r.cents as i128).collect::<Vec<_>>())
                    .with_precision_and_scale(18, 2)
                    .unwrap(),
            ),
            "currency" => Arc::new(StringArray::from_iter_values(rows.iter().map(|_| "BRL"))),
            "card_id" => Arc::new(rows.iter().map(|r| r.card.clone()).collect::<StringArray>()),
            "customer_id" => Arc::new(StringArray::from_iter_values(
                rows.iter().map(|r| r.customer.clone()),
            )),
            "merchant_id" => Arc::new(
                rows.iter()
                    .map(|r| r.merchant.clone())
                    .collect::<StringArray>(),
            ),
            "latitude" => Arc::new(Float64Array::from(
                rows.iter().map(|r| r.lat).collect::<Vec<_>>(),
            )),
            _ => new_null_array(f.data_type(), n),
        };
        cols.push(a);
    }
    RecordBatch::try_new(schema, cols).unwrap()
}

const FEATURES: &str = "
SELECT transaction_id,
  count(*) OVER (PARTITION BY card_id ORDER BY event_time RANGE BETWEEN INTERVAL '10 minutes' PRECEDING AND CURRENT ROW) AS c10,
  count(merchant_id) OVER (PARTITION BY card_id ORDER BY event_time RANGE BETWEEN INTERVAL '1 hour' PRECEDING AND CURRENT ROW) AS cm1h,
  count(DISTINCT merchant_id) OVER (PARTITION BY card_id ORDER BY event_time RANGE BETWEEN INTERVAL '1 hour' PRECEDING AND CURRENT ROW) AS dm1h,
  sum(amount) OVER (PARTITION BY customer_id ORDER BY event_time RANGE BETWEEN INTERVAL '1 hour' PRECEDING AND CURRENT ROW) AS s1h,
  avg(amount) OVER (PARTITION BY customer_id ORDER BY event_time RANGE BETWEEN INTERVAL '24 hours' PRECEDING AND CURRENT ROW) AS a24h,
  min(amount) OVER (PARTITION BY merchant_id ORDER BY event_time RANGE BETWEEN INTERVAL '30 minutes' PRECEDING AND CURRENT ROW) AS mn30,
  max(amount) OVER (PARTITION BY merchant_id ORDER BY event_time RANGE BETWEEN INTERVAL '30 minutes' PRECEDING AND CURRENT ROW) AS mx30,
  sum(latitude) OVER (PARTITION BY card_id ORDER BY event_time RANGE BETWEEN INTERVAL '1 hour' PRECEDING AND CURRENT ROW) AS slat,
  lag(amount) OVER (PARTITION BY card_id ORDER BY event_time) AS prev_amount,
  lag(merchant_id) OVER (PARTITION BY card_id ORDER BY event_time) AS prev_merchant,
  count(DISTINCT amount) OVER (PARTITION BY customer_id ORDER BY event_time RANGE BETWEEN INTERVAL '1 hour' PRECEDING AND CURRENT ROW) AS damt1h,
  -- Frames shorter than the disorder: a late row can land before their head frame.
  count(*) OVER (PARTITION BY card_id ORDER BY event_time RANGE BETWEEN INTERVAL '2 minutes' PRECEDING AND CURRENT ROW) AS c2m,
  sum(amount) OVER (PARTITION BY customer_id ORDER BY event_time RANGE BETWEEN INTERVAL '2 minutes' PRECEDING AND CURRENT ROW) AS s2m
FROM transactions";

async fn stage(dir: &Path) -> FeatureStage {
    let file = dir.join("features.sql");
    std::fs::write(&file, FEATURES).unwrap();
    FeatureStage::compile(
        &file,
        &FeatureLimits {
            history_ms: HISTORY_MS,
            lateness_ms: LATENESS_MS,
            max_entities: 1_000_000,
            label_history_ms: HISTORY_MS,
            label_index_max: 1_000_000,
        },
    )
    .await
    .unwrap()
}

/// Expected value of one feature for row `i`, by brute force.
#[derive(Debug, Clone, PartialEq)]
enum Want {
    Null,
    Int(i128),
    Float(f64),
    Text(String),
}

fn brute(rows: &[Row], i: usize) -> Vec<Want> {
    let x = &rows[i];
    let frame = |key: &dyn Fn(&Row) -> Option<String>, range: i64| -> Vec<&Row> {
        match key(x) {
            None => vec![],
            Some(k) => rows[..=i]
                .iter()
                .filter(|y| {
                    key(y).as_deref() == Some(k.as_str()) && y.t >= x.t - range && y.t <= x.t
                })
                .collect(),
        }
    };
    let card = |r: &Row| r.card.clone();
    let customer = |r: &Row| Some(r.customer.clone());
    let merchant = |r: &Row| r.merchant.clone();
    let min10 = 600_000;
    let h1 = 3_600_000;
    let f_c10 = frame(&card, min10);
    let f_card1h = frame(&card, h1);
    let f_cus1h = frame(&customer, h1);
    let f_cus24 = frame(&customer, 24 * h1);
    let f_m30 = frame(&merchant, 30 * 60_000);
    let dm: HashSet<&String> = f_card1h
        .iter()
        .filter_map(|r| r.merchant.as_ref())
        .collect();
    let opt_int = |v: Vec<i128>| -> Want {
        if v.is_empty() {
            Want::Null
        } else {
            Want::Int(v.iter().sum())
        }
    };
    let avg = if f_cus24.is_empty() {
        Want::Null
    } else {
        let s: i128 = f_cus24.iter().map(|r| r.cents as i128).sum();
        Want::Float(s as f64 / f_cus24.len() as f64 / 100.0)
    };
    let slat = if f_card1h.is_empty() {
        Want::Null
    } else {
        Want::Float(f_card1h.iter().map(|r| r.lat).sum())
    };
    // The previous row by (event time, arrival) among the rows that arrived before.
    let prev = x.card.as_ref().and_then(|c| {
        rows[..i]
            .iter()
            .enumerate()
            .filter(|(_, y)| y.card.as_ref() == Some(c) && y.t <= x.t && y.t >= x.t - HISTORY_MS)
            .max_by_key(|(j, y)| (y.t, *j))
            .map(|(_, y)| y)
    });
    vec![
        Want::Int(if x.card.is_some() {
            f_c10.len() as i128
        } else {
            0
        }),
        Want::Int(f_card1h.iter().filter(|r| r.merchant.is_some()).count() as i128),
        Want::Int(dm.len() as i128),
        opt_int(f_cus1h.iter().map(|r| r.cents as i128).collect()),
        avg,
        f_m30
            .iter()
            .map(|r| r.cents as i128)
            .min()
            .map_or(Want::Null, Want::Int),
        f_m30
            .iter()
            .map(|r| r.cents as i128)
            .max()
            .map_or(Want::Null, Want::Int),
        slat,
        prev.map_or(Want::Null, |p| Want::Int(p.cents as i128)),
        prev.and_then(|p| p.merchant.clone())
            .map_or(Want::Null, Want::Text),
        Want::Int(
            f_cus1h
                .iter()
                .map(|r| r.cents)
                .collect::<HashSet<_>>()
                .len() as i128,
        ),
        Want::Int(if x.card.is_some() {
            frame(&card, 2 * 60_000).len() as i128
        } else {
            0
        }),
        opt_int(
            frame(&customer, 2 * 60_000)
                .iter()
                .map(|r| r.cents as i128)
                .collect(),
        ),
    ]
}

fn got(col: &ArrayRef, i: usize) -> Want {
    if col.is_null(i) {
        return Want::Null;
    }
    let any = col.as_any();
    if let Some(a) = any.downcast_ref::<Int64Array>() {
        return Want::Int(a.value(i) as i128);
    }
    if let Some(a) = any.downcast_ref::<Decimal128Array>() {
        return Want::Int(a.value(i));
    }
    if let Some(a) = any.downcast_ref::<Float64Array>() {
        return Want::Float(a.value(i));
    }
    if let Some(a) = any.downcast_ref::<StringArray>() {
        return Want::Text(a.value(i).to_string());
    }
    panic!("unexpected type {}", col.data_type())
}

fn same(a: &Want, b: &Want) -> bool {
    match (a, b) {
        (Want::Float(x), Want::Float(y)) => {
            (x - y).abs() <= 1e-9 * x.abs().max(y.abs()).max(1e-300)
        }
        _ => a == b,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn incremental_windows_equal_brute_force_on_out_of_order_streams() {
    let dir = tempfile::tempdir().unwrap();
    for seed in [1u64, 2, 3] {
        let rows = stream(seed, 6_000);
        let mut st = stage(dir.path()).await;
        let mut outputs: Vec<RecordBatch> = Vec::new();
        // Batches of varying size, in arrival order.
        let mut at = 0;
        let mut rng = ChaCha8Rng::seed_from_u64(seed + 100);
        while at < rows.len() {
            let n = rng.random_range(1..800).min(rows.len() - at);
            outputs.push(
                st.process(&canonical_batch(&rows[at..at + n]))
                    .await
                    .unwrap(),
            );
            at += n;
        }
        let all =
            datafusion::arrow::compute::concat_batches(&outputs[0].schema(), &outputs).unwrap();
        let names: Vec<String> = all
            .schema()
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect();
        let mut checked = 0;
        for i in 0..rows.len() {
            let want = brute(&rows, i);
            for (c, w) in want.iter().enumerate() {
                let g = got(all.column(c), i);
                assert!(
                    same(&g, w),
                    "seed {seed} row {i} ({:?}) feature {}: engine {g:?}, brute force {w:?}",
                    rows[i],
                    names[c]
                );
                checked += 1;
            }
        }
        assert_eq!(checked, rows.len() * 13);
        // The stream really was out of order.
        assert!(rows.windows(2).filter(|w| w[1].t < w[0].t).count() > rows.len() / 4);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn window_features_do_not_depend_on_batch_boundaries() {
    let dir = tempfile::tempdir().unwrap();
    let rows = stream(7, 3_000);
    let mut reference: Option<Vec<String>> = None;
    for cut in [50_000usize, 1000, 7, 1] {
        let mut st = stage(dir.path()).await;
        let mut lines = Vec::new();
        for chunk in rows.chunks(cut) {
            let out = st.process(&canonical_batch(chunk)).await.unwrap();
            for i in 0..out.num_rows() {
                let line: Vec<String> = out
                    .columns()
                    .iter()
                    .map(|c| array_value_to_string(c, i).unwrap())
                    .collect();
                lines.push(line.join("|"));
            }
        }
        match &reference {
            None => reference = Some(lines),
            Some(r) => assert!(r == &lines, "batches of {cut} rows differ from one batch"),
        }
    }
}

/// Decided rows and merged aggregates of the shipped SQL over simulator traffic, for one cut.
async fn decided_and_aggregates(
    messages: &[payguard::decode::RawMessage],
    cut: usize,
) -> (Vec<String>, BTreeMap<(String, String), Vec<String>>) {
    let config =
        payguard::config::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("config.toml")).unwrap();
    let mut engine = payguard::engine::Engine::new(&config).await.unwrap();
    let metrics = payguard::metrics::Metrics::default();
    let stages = engine.aggregates();
    let mut rows = Vec::new();
    // Merged measures per (aggregate, key), as exact text after merging.
    let mut merged: BTreeMap<(String, String), Vec<Merged>> = BTreeMap::new();
    for (seq, chunk) in messages.chunks(cut).enumerate() {
        let mut per_source = vec![Vec::new(); config.sources.len()];
        per_source[0] = chunk.to_vec();
        let batch = payguard::source::Batch {
            seq: seq as u64,
            messages: per_source,
            offsets: vec![],
            opened_at: None,
        };
        let out = engine.process(batch, &metrics).await.unwrap();
        for b in &out.transactions {
            let keep: Vec<usize> = (0..b.num_columns()).collect();
            for i in 0..b.num_rows() {
                rows.push(
                    keep.iter()
                        .map(|c| array_value_to_string(b.column(*c), i).unwrap())
                        .collect::<Vec<_>>()
                        .join("|"),
                );
            }
        }
        for (name, partials) in &out.aggregates {
            let stage = stages.iter().find(|s| &s.name == name).unwrap();
            for p in partials {
                for i in 0..p.num_rows() {
                    let key: Vec<String> = stage
                        .keys
                        .iter()
                        .map(|k| array_value_to_string(p.column(*k), i).unwrap())
                        .collect();
                    let entry = merged
                        .entry((name.clone(), key.join("|")))
                        .or_insert_with(|| vec![Merged::Empty; stage.measures.len()]);
                    for (m, (col, how)) in stage.measures.iter().enumerate() {
                        entry[m] = entry[m].merge(p.column(*col), i, *how);
                    }
                }
            }
        }
    }
    let merged = merged
        .into_iter()
        .map(|(k, v)| (k, v.iter().map(|m| format!("{m:?}")).collect()))
        .collect();
    (rows, merged)
}

#[derive(Clone, Debug, PartialEq)]
enum Merged {
    Empty,
    Int(i128),
    Float(f64),
}

impl Merged {
    fn merge(&self, col: &ArrayRef, i: usize, how: Merge) -> Merged {
        if col.is_null(i) {
            return self.clone();
        }
        let v = match got(col, i) {
            Want::Int(x) => Merged::Int(x),
            Want::Float(x) => Merged::Float(x),
            other => panic!("measure {other:?}"),
        };
        match (self, v, how) {
            (Merged::Empty, v, _) => v,
            (Merged::Int(a), Merged::Int(b), Merge::Add) => Merged::Int(a + b),
            (Merged::Int(a), Merged::Int(b), Merge::Min) => Merged::Int(*a.min(&b)),
            (Merged::Int(a), Merged::Int(b), Merge::Max) => Merged::Int(*a.max(&b)),
            (Merged::Float(a), Merged::Float(b), Merge::Add) => Merged::Float(a + b),
            (Merged::Float(a), Merged::Float(b), Merge::Min) => Merged::Float(a.min(b)),
            (Merged::Float(a), Merged::Float(b), Merge::Max) => Merged::Float(a.max(b)),
            (a, b, _) => panic!("mixed measures {a:?} {b:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn features_decisions_and_aggregates_do_not_depend_on_batch_boundaries() {
    let config =
        payguard::config::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("config.toml")).unwrap();
    let mut sim = payguard::source::simulator::Simulator::new(
        &config.simulator,
        &config.sources[..1],
        11,
        20.0,
    )
    .unwrap();
    let messages: Vec<payguard::decode::RawMessage> = (0..1_500)
        .map(|i| {
            let g = sim.next_message();
            payguard::decode::RawMessage {
                partition: 0,
                offset: i,
                key: Some(g.key),
                value: Some(g.value),
                timestamp_ms: g.event_time_ms,
            }
        })
        .collect();
    let (rows, aggs) = decided_and_aggregates(&messages, 50_000).await;
    assert_eq!(rows.len(), messages.len());
    assert!(!aggs.is_empty());
    for cut in [1000, 7, 1] {
        let (r, a) = decided_and_aggregates(&messages, cut).await;
        assert!(r == rows, "decided rows differ for batches of {cut}");
        assert!(a == aggs, "merged aggregates differ for batches of {cut}");
    }
}
