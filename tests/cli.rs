//! The command line as a user meets it: help, version, `check` reporting every problem at once,
//! and the self-contained demo. No external service is needed.

mod common;

use std::process::Command;

fn payguard(args: &[&str]) -> std::process::Output {
    Command::new(common::bin())
        .args(args)
        .current_dir(common::repo())
        .output()
        .unwrap()
}

#[test]
fn every_command_has_help_and_there_is_a_version() {
    for cmd in ["run", "demo", "generate", "check"] {
        let out = payguard(&[cmd, "--help"]);
        assert!(out.status.success(), "{cmd} --help");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("Usage: payguard"), "{cmd}: {text}");
        assert!(text.contains("--config"), "{cmd}: {text}");
    }
    let out = payguard(&["--version"]);
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("payguard {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn check_accepts_the_shipped_config() {
    let out = payguard(&["check", "--config", "config.toml"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn check_reports_all_three_mistakes_with_their_lines() {
    let text = std::fs::read_to_string(common::repo().join("config.toml")).unwrap();
    let broken = text
        // 1: a value out of range
        .replacen("batch_max_rows = 20000", "batch_max_rows = 0", 1)
        // 2: an unknown key (a typo)
        .replacen("fetch_max_wait_ms = 100", "fetch_max_wiat_ms = 100", 1)
        // 3: a wrong type
        .replacen("max_connections = 4", "max_connections = \"four\"", 1);
    assert_ne!(broken, text);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broken.toml");
    std::fs::write(&path, &broken).unwrap();
    // The SQL files are looked up next to the config.
    std::os::unix::fs::symlink(common::repo().join("sql"), dir.path().join("sql")).unwrap();

    let out = payguard(&["check", "--config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    let line_of = |needle: &str| {
        broken
            .lines()
            .position(|l| l.contains(needle))
            .map(|i| i + 1)
            .unwrap()
    };
    let p = path.display();
    for (needle, key, what) in [
        (
            "batch_max_rows = 0",
            "pipeline.batch_max_rows",
            "must be between 1 and 1000000",
        ),
        (
            "fetch_max_wiat_ms",
            "kafka.fetch_max_wiat_ms",
            "unknown field",
        ),
        (
            "max_connections = \"four\"",
            "postgres.max_connections",
            "invalid type",
        ),
    ] {
        let expected = format!("{p}:{}: {key}: {what}", line_of(needle));
        assert!(err.contains(&expected), "missing {expected:?} in:\n{err}");
    }
    assert!(err.contains("3 problems"), "{err}");
}

#[test]
fn check_reports_sql_problems_with_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let copied = Command::new("cp")
        .arg("-r")
        .arg(common::repo().join("sql"))
        .arg(dir.path())
        .status()
        .unwrap();
    assert!(copied.success());
    let sql = std::fs::read_to_string(common::repo().join("sql/sources/card.sql")).unwrap();
    let broken = sql.replacen(
        "pan_token                       AS card_id",
        "pan_tokn AS card_id",
        1,
    );
    assert_ne!(broken, sql);
    std::fs::write(dir.path().join("sql/sources/card.sql"), &broken).unwrap();
    let cfg = std::fs::read_to_string(common::repo().join("config.toml")).unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(&path, cfg).unwrap();
    let out = payguard(&["check", "--config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    let line = broken.lines().position(|l| l.contains("pan_tokn")).unwrap() + 1;
    let file = dir.path().join("sql/sources/card.sql");
    assert!(
        err.contains(&format!("{}:{line}: ", file.display())) && err.contains("pan_tokn"),
        "{err}"
    );
}

/// `payguard demo --count 20000 --rate 0` (with `extra` arguments, from the repository): asserts
/// that all 20,000 messages became transactions and returns the log.
fn run_demo(extra: &[&std::ffi::OsStr]) -> String {
    let out = Command::new(common::bin())
        .args([
            "demo",
            "--count",
            "20000",
            "--rate",
            "0",
            "--listen",
            "127.0.0.1:0",
        ])
        .args(extra)
        .current_dir(common::repo())
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{err}");
    assert!(err.contains("messages=20000"), "{err}");
    assert!(err.contains("transactions=20000"), "{err}");
    err
}

#[test]
fn demo_runs_the_whole_pipeline_without_any_service() {
    run_demo(&[]);
}

/// The demo's simulated clock runs thousands of times faster than the wall clock (20,000
/// customers at 2,000 transactions/s): started at the wall clock, it is days ahead within
/// seconds. Its events carry that clock, so they must not be dead-lettered as "from the future".
#[test]
fn demo_keeps_running_when_its_simulated_clock_passes_the_wall_clock() {
    let dir = tempfile::tempdir().unwrap();
    let repo = common::repo();
    let now = chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ");
    let config = std::fs::read_to_string(repo.join("config.toml"))
        .unwrap()
        .replace("= \"sql/", &format!("= \"{}/sql/", repo.display()))
        .replace("= \"models/", &format!("= \"{}/models/", repo.display()))
        .replace(
            "start_time = \"2026-11-01T00:00:00Z\"",
            &format!("start_time = \"{now}\""),
        );
    assert!(config.contains(&format!("start_time = \"{now}\"")));
    let path = dir.path().join("config.toml");
    std::fs::write(&path, config).unwrap();
    let err = run_demo(&["-c".as_ref(), path.as_os_str()]);
    assert!(!err.contains("dead letter"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn replay_writes_every_transaction_with_features_decision_and_labels_to_parquet() {
    let dir = tempfile::tempdir().unwrap();
    let generated = dir.path().join("gen.jsonl");
    let out = Command::new(common::bin())
        .args([
            "generate",
            "--config",
            "config.toml",
            "--source",
            "card",
            "--count",
            "20000",
            "--labels",
        ])
        .args([
            "--label-delay-min-days",
            "0",
            "--label-delay-max-days",
            "0",
            "-q",
            "--output",
        ])
        .arg(&generated)
        .current_dir(common::repo())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let card = if dir.path().join("gen.card.jsonl").exists() {
        dir.path().join("gen.card.jsonl")
    } else {
        generated.clone()
    };
    let labels = dir.path().join("gen.labels.jsonl");
    let label_lines = std::fs::read_to_string(&labels).unwrap().lines().count();
    assert!(label_lines > 0, "the simulator wrote label feedback");
    let parquet = dir.path().join("out.parquet");
    let out = Command::new(common::bin())
        .args(["replay", "--config", "config.toml", "--input"])
        .arg(format!("card={}", card.display()))
        .arg("--labels")
        .arg(&labels)
        .arg("--output")
        .arg(&parquet)
        .current_dir(common::repo())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let ctx = datafusion::prelude::SessionContext::new();
    ctx.register_parquet("r", parquet.to_str().unwrap(), Default::default())
        .await
        .unwrap();
    let batches = ctx
        .sql(
            "SELECT count(*) AS n, count(DISTINCT transaction_id) AS ids, \
              sum(CASE WHEN label THEN 1 ELSE 0 END) AS fraud, \
              min(card_tx_10m) AS min_velocity, count(decision) AS decided \
              FROM r",
        )
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    let row = datafusion::arrow::util::pretty::pretty_format_batches(&batches)
        .unwrap()
        .to_string();
    let values: Vec<i64> = row
        .lines()
        .nth(3)
        .unwrap()
        .split('|')
        .filter_map(|c| c.trim().parse().ok())
        .collect();
    assert_eq!(values[0], 20_000, "{row}");
    assert_eq!(values[1], 20_000, "{row}");
    assert_eq!(values[2], label_lines as i64, "every label joined: {row}");
    assert_eq!(values[3], 1, "{row}");
    assert_eq!(values[4], 20_000, "{row}");
}

#[test]
fn check_refuses_an_aggregate_that_cannot_be_merged_and_a_window_it_cannot_keep() {
    let dir = tempfile::tempdir().unwrap();
    assert!(
        Command::new("cp")
            .arg("-r")
            .arg(common::repo().join("sql"))
            .arg(dir.path())
            .status()
            .unwrap()
            .success()
    );
    std::fs::write(
        dir.path().join("sql/aggregates/bad_median.sql"),
        "SELECT date_bin(INTERVAL '1 minute', event_time) AS bucket,\n       median(amount) AS typical\nFROM decided GROUP BY 1",
    )
    .unwrap();
    let features = std::fs::read_to_string(dir.path().join("sql/features.sql")).unwrap();
    let broken = features.replacen("INTERVAL '7 days'", "INTERVAL '30 days'", 1);
    assert_ne!(broken, features);
    std::fs::write(dir.path().join("sql/features.sql"), &broken).unwrap();
    std::fs::copy(
        common::repo().join("config.toml"),
        dir.path().join("config.toml"),
    )
    .unwrap();
    let out = payguard(&[
        "check",
        "--config",
        dir.path().join("config.toml").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    let line = broken
        .lines()
        .position(|l| l.contains("'30 days'"))
        .unwrap()
        + 1;
    assert!(
        err.contains(&format!("features.sql:{}: ", line - 1))
            || err.contains(&format!("features.sql:{line}: ")),
        "{err}"
    );
    assert!(
        err.contains("exceeds the kept history engine.history = 7d"),
        "{err}"
    );
    assert!(
        err.contains("bad_median.sql: line 2: `median(amount)`"),
        "{err}"
    );
    assert!(
        err.contains("cannot be merged across micro-batches"),
        "{err}"
    );
}
