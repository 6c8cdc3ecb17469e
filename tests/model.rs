//! The fraud model as the pipeline uses it: the Rust scores equal Python onnxruntime's on the same
//! rows, a corrupt or mismatched model file is a clear error at `check` and at start (never a
//! panic), replayed transactions carry score, model version and explanations, and a model file
//! swapped under a running pipeline is taken between two batches (a corrupt one refused).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use datafusion::arrow::array::{Array, Float32Array, RecordBatch};
use datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use payguard::model::Model;

fn shipped_config() -> payguard::config::Config {
    payguard::config::load(&common::repo().join("config.toml")).unwrap()
}

fn read_parquet(path: &Path) -> RecordBatch {
    let file = std::fs::File::open(path).unwrap();
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .unwrap()
        .build()
        .unwrap();
    let batches: Vec<RecordBatch> = reader.map(|b| b.unwrap()).collect();
    datafusion::arrow::compute::concat_batches(&batches[0].schema(), &batches).unwrap()
}

#[test]
fn rust_scores_equal_python_onnxruntime_scores_on_the_parity_rows() {
    let config = shipped_config();
    let cfg = config
        .model
        .clone()
        .expect("the shipped config has a [model]");
    let mut model = Model::load(&config, &cfg).unwrap();
    // rows.parquet: transaction_id, the features (a few NULLs in every column), expected_score
    // (models/train.py, Python onnxruntime on the same ONNX file).
    let rows = read_parquet(&common::repo().join("models/parity/rows.parquet"));
    let schema = rows.schema();
    let keep: Vec<usize> = (0..schema.fields().len())
        .filter(|&i| {
            let n = schema.field(i).name();
            n != "transaction_id" && n != "expected_score"
        })
        .collect();
    let features = rows.project(&keep).unwrap();
    assert!(
        features.columns().iter().any(|c| c.null_count() > 0),
        "the fixture exercises NULL features"
    );
    model
        .bind(&features.schema(), Path::new("models/parity/rows.parquet"))
        .unwrap();
    let got = model.score(&features).unwrap();
    let want = rows
        .column_by_name("expected_score")
        .unwrap()
        .as_any()
        .downcast_ref::<Float32Array>()
        .unwrap()
        .clone();
    assert_eq!(got.len(), want.len());
    assert!(want.len() >= 100);
    let mut spread = (f32::MAX, f32::MIN);
    for (i, (g, w)) in got.iter().zip(want.values()).enumerate() {
        assert!(
            (g - w).abs() <= 1e-5,
            "row {i}: Rust {g}, Python onnxruntime {w}"
        );
        spread = (spread.0.min(*w), spread.1.max(*w));
    }
    assert!(
        spread.0 < 0.1 && spread.1 > 0.9,
        "the fixture covers low and high scores: {spread:?}"
    );
}

/// A directory with the shipped config and SQL, and `models/fraud_model.onnx` = `model`.
fn world_with_model(model: &[u8]) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(common::repo().join("sql"), dir.path().join("sql")).unwrap();
    std::fs::create_dir(dir.path().join("models")).unwrap();
    std::fs::write(dir.path().join("models/fraud_model.onnx"), model).unwrap();
    let config = dir.path().join("config.toml");
    std::fs::copy(common::repo().join("config.toml"), &config).unwrap();
    (dir, config)
}

fn shipped_model() -> Vec<u8> {
    std::fs::read(common::repo().join("models/fraud_model.onnx")).unwrap()
}

fn payguard(args: &[&str], config: &Path) -> (Option<i32>, String) {
    let out = Command::new(common::bin())
        .args(args)
        .arg("--config")
        .arg(config)
        .env_remove("PAYGUARD_POSTGRES_URL")
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_corrupt_model_is_a_clear_error_at_check_and_at_start() {
    let good = shipped_model();
    for (what, bytes) in [
        ("truncated", good[..good.len() / 3].to_vec()),
        ("not onnx", b"this is not a model\n".to_vec()),
        ("empty", Vec::new()),
    ] {
        let (dir, config) = world_with_model(&bytes);
        let file = dir.path().join("models/fraud_model.onnx");
        let (code, err) = payguard(&["check"], &config);
        assert_eq!(code, Some(2), "{what}: {err}");
        assert!(
            err.contains(&format!("{}: not a usable ONNX model", file.display())),
            "{what}: {err}"
        );
        assert!(!err.contains("panicked"), "{what}: {err}");
        // At start the model is loaded before any service is contacted.
        let (code, err) = payguard(&["run"], &config);
        assert_eq!(code, Some(1), "{what}: {err}");
        assert!(err.contains("not a usable ONNX model"), "{what}: {err}");
        assert!(!err.contains("panicked"), "{what}: {err}");
    }
    // A missing file names the fix.
    let (dir, config) = world_with_model(b"");
    std::fs::remove_file(dir.path().join("models/fraud_model.onnx")).unwrap();
    let (code, err) = payguard(&["check"], &config);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("model file does not exist"), "{err}");
}

#[test]
fn a_model_that_does_not_match_features_sql_is_refused_naming_the_columns() {
    let (dir, config) = world_with_model(&shipped_model());
    // features.sql renames one feature and changes the type of another.
    std::fs::remove_file(dir.path().join("sql")).unwrap();
    assert!(
        Command::new("cp")
            .arg("-r")
            .arg(common::repo().join("sql"))
            .arg(dir.path())
            .status()
            .unwrap()
            .success()
    );
    let features = dir.path().join("sql/features.sql");
    let text = std::fs::read_to_string(&features).unwrap();
    let changed = text
        .replacen(") AS card_tx_24h,", ") AS card_tx_day,", 1)
        .replacen(
            "CAST(extract(hour FROM event_time) AS DOUBLE) AS txn_hour",
            "CAST(extract(hour FROM event_time) AS BIGINT) AS txn_hour",
            1,
        );
    assert_ne!(changed, text);
    std::fs::write(&features, changed).unwrap();
    let (code, err) = payguard(&["check"], &config);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("do not match"), "{err}");
    assert!(
        err.contains("feature card_tx_24h is not a column of it"),
        "{err}"
    );
    assert!(
        err.contains("feature txn_hour is int64 there, the model was trained on float64"),
        "{err}"
    );
    let (code, err) = payguard(&["run"], &config);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("card_tx_24h"), "{err}");

    // A model trained on another label column than the config names.
    let (_dir, config) = world_with_model(&shipped_model());
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text.replacen(
            "label_column = \"label\"",
            "label_column = \"chargeback\"",
            1,
        ),
    )
    .unwrap();
    let (code, err) = payguard(&["check"], &config);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("trained on label column \"label\""), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn replayed_transactions_carry_score_version_and_alert_explanations() {
    let dir = tempfile::tempdir().unwrap();
    let generated = dir.path().join("gen.jsonl");
    let out = Command::new(common::bin())
        .args(["generate", "--config", "config.toml", "--source", "card"])
        .args(["--count", "20000", "-q", "--output"])
        .arg(&generated)
        .current_dir(common::repo())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let replay = |parquet: &Path, extra: &[&str]| {
        let out = Command::new(common::bin())
            .args(["replay", "--config", "config.toml", "--input"])
            .arg(format!("card={}", generated.display()))
            .arg("--output")
            .arg(parquet)
            .args(extra)
            .current_dir(common::repo())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let with = dir.path().join("with.parquet");
    let without = dir.path().join("without.parquet");
    replay(&with, &[]);
    replay(&without, &["--no-model"]);
    let config = shipped_config();
    let version = Model::load(&config, config.model.as_ref().unwrap())
        .unwrap()
        .meta()
        .version
        .clone();
    let ctx = datafusion::prelude::SessionContext::new();
    ctx.register_parquet("w", with.to_str().unwrap(), Default::default())
        .await
        .unwrap();
    ctx.register_parquet("o", without.to_str().unwrap(), Default::default())
        .await
        .unwrap();
    let one = |sql: String| {
        let ctx = ctx.clone();
        async move {
            let b = ctx.sql(&sql).await.unwrap().collect().await.unwrap();
            datafusion::arrow::util::pretty::pretty_format_batches(&b)
                .unwrap()
                .to_string()
                .lines()
                .nth(3)
                .unwrap()
                .split('|')
                .filter_map(|c| c.trim().parse::<i64>().ok())
                .collect::<Vec<i64>>()
        }
    };
    let v = one(format!(
        "SELECT count(*), \
                sum(CASE WHEN score >= 0 AND score <= 1 THEN 1 ELSE 0 END), \
                sum(CASE WHEN model_version = '{version}' THEN 1 ELSE 0 END), \
                sum(CASE WHEN decision <> 'approve' THEN 1 ELSE 0 END), \
                sum(CASE WHEN decision <> 'approve' AND explanation LIKE '[{{\"feature\":%' THEN 1 ELSE 0 END), \
                sum(CASE WHEN decision = 'approve' AND explanation IS NOT NULL THEN 1 ELSE 0 END), \
                sum(CASE WHEN score >= 0.5 AND decision = 'approve' THEN 1 ELSE 0 END) \
         FROM w"
    ))
    .await;
    assert_eq!(v[0], 20_000);
    assert_eq!(v[1], 20_000, "every row scored in [0, 1]");
    assert_eq!(v[2], 20_000, "every row carries the model version");
    assert!(v[3] > 0, "some alerts");
    assert_eq!(v[4], v[3], "every alert has its explanation");
    assert_eq!(v[5], 0, "approved rows have none");
    assert_eq!(
        v[6], 0,
        "a score over the review threshold is never approved"
    );
    let v = one(
        "SELECT count(*), count(score), count(model_version), count(explanation) FROM o".into(),
    )
    .await;
    assert_eq!(v, vec![20_000, 0, 0, 0], "--no-model: rules alone");
    // An explanation lists at most model.explain_top features, largest contribution first.
    let b = ctx
        .sql("SELECT explanation FROM w WHERE explanation IS NOT NULL LIMIT 50")
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    let top = config.model.as_ref().unwrap().explain_top;
    for batch in b {
        let col = datafusion::arrow::compute::cast(
            batch.column(0),
            &datafusion::arrow::datatypes::DataType::Utf8,
        )
        .unwrap();
        let col = col
            .as_any()
            .downcast_ref::<datafusion::arrow::array::StringArray>()
            .unwrap();
        for text in col.iter().flatten() {
            let v: Vec<serde_json::Value> = serde_json::from_str(text).unwrap();
            assert!(!v.is_empty() && v.len() <= top, "{text}");
            let c: Vec<f64> = v
                .iter()
                .map(|e| e["contribution"].as_f64().unwrap().abs())
                .collect();
            assert!(c.windows(2).all(|w| w[0] >= w[1]), "{text}");
        }
    }
}

/// The same model with its version string replaced by one of equal length (the protobuf stays
/// valid): a "new" model the test can swap in.
fn with_version(model: &[u8], old: &str, new: &str) -> Vec<u8> {
    assert_eq!(old.len(), new.len());
    let (o, n) = (old.as_bytes(), new.as_bytes());
    let mut out = model.to_vec();
    let mut replaced = 0;
    let mut i = 0;
    while i + o.len() <= out.len() {
        if &out[i..i + o.len()] == o {
            out[i..i + o.len()].copy_from_slice(n);
            replaced += 1;
            i += o.len();
        } else {
            i += 1;
        }
    }
    assert!(replaced > 0);
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn a_swapped_model_file_is_taken_between_batches_and_a_corrupt_one_refused() {
    let models = tempfile::tempdir().unwrap();
    let file = models.path().join("fraud_model.onnx");
    std::fs::write(&file, shipped_model()).unwrap();
    let file_s = file.display().to_string();
    let env = common::TestEnv::new("model_swap", |t| {
        t["model"]
            .as_table_mut()
            .unwrap()
            .insert("path".into(), file_s.clone().into());
    })
    .await;
    let config = shipped_config();
    let old = Model::load(&config, config.model.as_ref().unwrap())
        .unwrap()
        .meta()
        .version
        .clone();
    let new: String = format!("{}X", &old[..old.len() - 1]);
    env.generate(2_000, &[]);
    let run = env.spawn(&["run"]);
    env.wait_for("the first rows", Duration::from_secs(60), || async {
        env.transactions().await >= 2_000
    })
    .await;
    let count_version = |v: String| {
        let url = env.db_url.clone();
        async move {
            let mut db = <sqlx::PgConnection as sqlx::Connection>::connect(&url)
                .await
                .unwrap();
            let n: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM transactions WHERE model_version = $1 AND score IS NOT NULL",
            )
            .bind(v)
            .fetch_one(&mut db)
            .await
            .unwrap();
            n
        }
    };
    assert_eq!(count_version(old.clone()).await, 2_000);
    assert_eq!(
        env.scalar("SELECT count(*) FROM alerts WHERE explanation IS NULL")
            .await,
        0,
        "every alert of a model-scored batch has its explanation"
    );

    // A corrupt file is refused: the running model keeps scoring.
    let tmp = models.path().join("fraud_model.onnx.tmp");
    std::fs::write(&tmp, b"garbage").unwrap();
    std::fs::rename(&tmp, &file).unwrap();
    env.wait_for("the refusal", Duration::from_secs(30), || async {
        std::fs::read_to_string(env.dir.path().join(format!("pid-{}", run.id())))
            .ok()
            .and_then(|p| std::fs::read_to_string(p.trim()).ok())
            .is_some_and(|log| log.contains("not a usable ONNX model"))
    })
    .await;
    env.generate(1_000, &["--seed", "5"]);
    env.wait_for(
        "rows under the old model",
        Duration::from_secs(60),
        || async { env.transactions().await >= 3_000 },
    )
    .await;
    assert_eq!(count_version(old.clone()).await, 3_000);

    // A valid new version is swapped in between two batches.
    std::fs::write(&tmp, with_version(&shipped_model(), &old, &new)).unwrap();
    std::fs::rename(&tmp, &file).unwrap();
    env.wait_for("the new model", Duration::from_secs(30), || async {
        std::fs::read_to_string(env.dir.path().join(format!("pid-{}", run.id())))
            .ok()
            .and_then(|p| std::fs::read_to_string(p.trim()).ok())
            .is_some_and(|log| log.contains(&format!("model={new}")))
    })
    .await;
    env.generate(1_000, &["--seed", "6"]);
    env.wait_for(
        "rows under the new model",
        Duration::from_secs(60),
        || async { env.transactions().await >= 4_000 },
    )
    .await;
    assert_eq!(count_version(new.clone()).await, 1_000);
    assert_eq!(count_version(old.clone()).await, 3_000);
    common::signal(&run, "TERM");
    let (status, log) = env.wait(run, Duration::from_secs(30));
    assert!(status.success(), "{log}");
}

#[test]
fn bind_refuses_features_in_another_order_and_allows_extra_ones() {
    let config = shipped_config();
    let mut model = Model::load(&config, config.model.as_ref().unwrap()).unwrap();
    let rows = read_parquet(&common::repo().join("models/parity/rows.parquet"));
    let schema = rows.schema();
    let names: Vec<String> = model.meta().features.clone();
    let idx = |n: &str| schema.index_of(n).unwrap();
    // The model's order with the first two swapped.
    let mut swapped: Vec<usize> = names.iter().map(|n| idx(n)).collect();
    swapped.swap(0, 1);
    let err = model
        .bind(
            &schema.project(&swapped).unwrap(),
            Path::new("features.sql"),
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("feature order differs"), "{err}");
    assert!(err.contains(&names[0]) && err.contains(&names[1]), "{err}");
    // An extra column features.sql yields that the model does not use: allowed, and reported.
    let with_extra = schema
        .project(&(0..schema.fields().len()).collect::<Vec<_>>())
        .unwrap();
    let unused = model.bind(&with_extra, Path::new("features.sql")).unwrap();
    assert_eq!(
        unused,
        vec!["transaction_id".to_string(), "expected_score".to_string()]
    );
}
