//! The worked example of README "Your own feed" (`examples/own-feed/`): a feed with its own
//! columns is mapped (declared attributes beside the canonical columns), checked and replayed,
//! and its attributes reach the features, the rules and the training set. No services needed.

mod common;

use std::path::Path;
use std::process::Command;

use datafusion::arrow::array::{Array, Float64Array, Int64Array, RecordBatch, StringArray};
use datafusion::arrow::compute::concat_batches;
use datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

fn copy_example(to: &Path) {
    let from = common::repo().join("examples/own-feed");
    for entry in walk(&from) {
        let rel = entry.strip_prefix(&from).unwrap();
        let dest = to.join(rel);
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        std::fs::copy(&entry, &dest).unwrap();
    }
    // The migrations path is relative to the example's place in the checkout.
    let config = to.join("config.toml");
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "../../sql/migrations",
        &common::repo().join("sql/migrations").display().to_string(),
    );
    std::fs::write(config, text).unwrap();
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

fn payguard(dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new(common::bin())
        .args(args)
        .arg("--config")
        .arg(dir.join("config.toml"))
        .env("RUST_LOG", "warn")
        .output()
        .unwrap()
}

fn read_parquet(path: &Path) -> RecordBatch {
    let file = std::fs::File::open(path).unwrap();
    let builder = ParquetRecordBatchReaderBuilder::try_new(file).unwrap();
    // The file's schema, with its metadata (the batches read carry none).
    let schema = builder.schema().clone();
    let batches: Vec<RecordBatch> = builder.build().unwrap().map(Result::unwrap).collect();
    let all = concat_batches(&batches[0].schema(), &batches).unwrap();
    all.with_schema(schema).unwrap()
}

fn text(b: &RecordBatch, name: &str) -> Vec<Option<String>> {
    let c = b
        .column_by_name(name)
        .unwrap_or_else(|| panic!("no column {name}"));
    let a = c.as_any().downcast_ref::<StringArray>().unwrap();
    a.iter().map(|v| v.map(str::to_string)).collect()
}

fn ints(b: &RecordBatch, name: &str) -> Vec<i64> {
    let c = b
        .column_by_name(name)
        .unwrap_or_else(|| panic!("no column {name}"));
    let a = c.as_any().downcast_ref::<Int64Array>().unwrap();
    (0..a.len()).map(|i| a.value(i)).collect()
}

#[test]
fn a_feed_with_its_own_columns_is_mapped_replayed_and_its_attributes_reach_features_and_rules() {
    let dir = tempfile::tempdir().unwrap();
    copy_example(dir.path());
    let out = payguard(dir.path(), &["check"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Card A: three keyed charges within minutes, then one three hours later; card B: one chip.
    let t0: i64 = 1_790_812_800_000;
    let min = 60_000;
    let rows = [
        ("a1", t0, 1200, "card1", "keyed", 2.5),
        ("b1", t0 + min / 2, 900, "card2", "chip", -0.3),
        ("a2", t0 + min, 4500, "card1", "keyed", 1.9),
        ("a3", t0 + 2 * min, 9900, "card1", "keyed", 2.2),
        ("a4", t0 + 180 * min, 700, "card1", "keyed", 0.1),
    ];
    let mut feed = String::new();
    for (id, ts, cents, card, entry, v1) in rows {
        feed.push_str(&format!(
            r#"{{"txn_ref":"{id}","ts_ms":{ts},"amount_cents":{cents},"card":"{card}","shop":"shop1","entry":"{entry}","v1":{v1},"v2":0.5}}"#
        ));
        feed.push('\n');
    }
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("feed.jsonl"), feed).unwrap();
    std::fs::write(
        data.join("labels.jsonl"),
        r#"{"transaction_id":"a3","label":"fraud","fraud_scenario":"compromised_card","reported_at":"2026-10-03T00:00:00Z"}"#,
    )
    .unwrap();
    let parquet = data.join("train.parquet");
    let out = payguard(
        dir.path(),
        &[
            "replay",
            "--no-model",
            "--input",
            &format!("cards={}", data.join("feed.jsonl").display()),
            "--labels",
            &data.join("labels.jsonl").display().to_string(),
            "--output",
            &parquet.display().to_string(),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let b = read_parquet(&parquet);
    assert_eq!(b.num_rows(), 5);
    // Event-time order; the attributes are transaction columns, typed as declared.
    let ids = text(&b, "transaction_id");
    let ids: Vec<&str> = ids.iter().map(|v| v.as_deref().unwrap()).collect();
    assert_eq!(ids, ["a1", "b1", "a2", "a3", "a4"]);
    let entry = text(&b, "entry");
    assert_eq!(entry[1].as_deref(), Some("chip"));
    let v1 = b.column_by_name("v1").unwrap();
    let v1 = v1.as_any().downcast_ref::<Float64Array>().unwrap();
    assert_eq!(v1.value(0), 2.5);
    let v3 = b.column_by_name("v3").unwrap();
    assert_eq!(v3.null_count(), 5, "a field the feed does not send is NULL");
    // The transaction's columns: canonical, then the attributes; the replay marks the width.
    let width: usize = b.schema().metadata()["payguard.canonical_columns"]
        .parse()
        .unwrap();
    assert_eq!(b.schema().field(width - 1).name(), "v4");
    assert_eq!(b.schema().field(width).name(), "txn_amount");
    // Features over them: the category, and a window counting an attribute's value.
    assert_eq!(text(&b, "txn_entry")[0].as_deref(), Some("keyed"));
    assert_eq!(ints(&b, "card_keyed_24h"), [1, 0, 2, 3, 4]);
    assert_eq!(ints(&b, "card_tx_1h"), [1, 1, 2, 3, 1]);
    // The rule over the attribute and the feature.
    let decisions = text(&b, "decision");
    let decisions: Vec<&str> = decisions.iter().map(|v| v.as_deref().unwrap()).collect();
    assert_eq!(
        decisions,
        ["approve", "approve", "approve", "review", "review"]
    );
    let label = b.column_by_name("label").unwrap();
    let label = label
        .as_any()
        .downcast_ref::<datafusion::arrow::array::BooleanArray>()
        .unwrap();
    assert!(label.value(3) && !label.value(2));
}

#[test]
fn an_undeclared_column_in_the_mapping_is_an_error_naming_the_declared_attributes() {
    let dir = tempfile::tempdir().unwrap();
    copy_example(dir.path());
    let mapping = dir.path().join("cards.sql");
    let sql = std::fs::read_to_string(&mapping)
        .unwrap()
        .replace("v4                              AS v4,", "v4 AS v5,");
    std::fs::write(&mapping, sql).unwrap();
    let out = payguard(dir.path(), &["check"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("cards.sql"), "{stderr}");
    assert!(
        stderr.contains("`v5` is not a canonical column nor a declared attribute"),
        "{stderr}"
    );
    assert!(stderr.contains("entry, v1, v2, v3, v4"), "{stderr}");
    assert!(stderr.contains("[[attributes]]"), "{stderr}");
}
