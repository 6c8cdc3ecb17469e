//! Hot reload of the SQL files while `payguard run` consumes: a valid edit takes effect between two
//! batches; an invalid edit is refused, reported (log, metric, /health/ready) and the running
//! version keeps deciding.

mod common;

use std::time::Duration;

use common::{TestEnv, signal};

/// Replace a file the way editors do: write a temporary file, rename it over the original.
fn save(path: &std::path::Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn copy_sql(env: &TestEnv) -> std::path::PathBuf {
    let dst = env.dir.path().join("sql");
    let ok = std::process::Command::new("cp")
        .arg("-r")
        .arg(common::repo().join("sql"))
        .arg(&dst)
        .status()
        .unwrap()
        .success();
    assert!(ok);
    dst
}

async fn http_get(addr: &str, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn sql_edits_are_reloaded_between_batches_and_bad_edits_are_refused() {
    let env = TestEnv::new("reload", |_| {}).await;
    let sql = copy_sql(&env);
    // Point the engine at the copy so the test can edit it.
    let text = std::fs::read_to_string(&env.config).unwrap();
    let mut t: toml::Table = toml::from_str(&text).unwrap();
    let e = t["engine"].as_table_mut().unwrap();
    e.insert(
        "rules".into(),
        sql.join("rules.sql").display().to_string().into(),
    );
    std::fs::write(&env.config, toml::to_string(&t).unwrap()).unwrap();

    env.generate(2_000, &[]);
    let run = env.spawn(&["run"]);
    env.wait_for("the first rows", Duration::from_secs(60), || async {
        env.transactions().await >= 2_000
    })
    .await;
    let log_path =
        std::fs::read_to_string(env.dir.path().join(format!("pid-{}", run.id()))).unwrap();
    let log = std::fs::read_to_string(&log_path).unwrap();
    let addr = log
        .lines()
        .find_map(|l| l.split("addr=").nth(1))
        .expect("API address in the log")
        .trim()
        .to_string();
    assert_eq!(
        env.scalar(
            "SELECT count(*) FROM transactions WHERE rule_hits @> '[{\"rule\":\"all_declined\"}]'"
        )
        .await,
        0,
        "no row carries the test rule before it exists"
    );

    // 1. An invalid edit: refused, reported, and the running rules keep deciding.
    let rules = sql.join("rules.sql");
    let good = std::fs::read_to_string(&rules).unwrap();
    save(
        &rules,
        &format!(
            "{good}\nUNION ALL SELECT transaction_id, 'x', 'decline', 'x' FROM scored WHERE no_such_column > 1"
        ),
    );
    env.wait_for("the refusal", Duration::from_secs(30), || async {
        http_get(&addr, "/health/ready")
            .await
            .contains("reload_failed")
    })
    .await;
    let ready = http_get(&addr, "/health/ready").await;
    assert!(ready.contains("no_such_column"), "{ready}");
    let metrics = http_get(&addr, "/metrics").await;
    assert!(
        metrics.contains("payguard_sql_reload_failures_total 1"),
        "{metrics}"
    );
    env.generate(1_000, &["--seed", "5"]);
    env.wait_for(
        "rows under the old rules",
        Duration::from_secs(60),
        || async { env.transactions().await >= 3_000 },
    )
    .await;
    assert_eq!(
        env.scalar(
            "SELECT count(*) FROM transactions WHERE rule_hits @> '[{\"rule\":\"all_declined\"}]'"
        )
        .await,
        0
    );

    // 2. A valid edit: every later transaction over 0.00 is declined by the new rule.
    save(
        &rules,
        &format!(
            "{good}\nUNION ALL SELECT transaction_id, 'all_declined', 'decline', 'test rule' FROM scored WHERE amount > 0"
        ),
    );
    env.wait_for("the reload", Duration::from_secs(30), || async {
        http_get(&addr, "/metrics")
            .await
            .contains("payguard_sql_reloads_total 1")
    })
    .await;
    assert!(
        !http_get(&addr, "/health/ready")
            .await
            .contains("reload_failed")
    );
    env.generate(1_000, &["--seed", "6"]);
    env.wait_for(
        "rows under the new rules",
        Duration::from_secs(60),
        || async { env.transactions().await >= 4_000 },
    )
    .await;
    let declined = env
        .scalar(
            "SELECT count(*) FROM transactions WHERE rule_hits @> '[{\"rule\":\"all_declined\"}]'",
        )
        .await;
    let log_now = std::fs::read_to_string(log_path.trim()).unwrap_or_else(|e| e.to_string());
    assert_eq!(
        declined, 1_000,
        "exactly the rows after the reload are declined\n{log_path}:\n{log_now}"
    );
    assert_eq!(
        env.scalar(
            "SELECT count(*) FROM alerts WHERE rule_hits @> '[{\"rule\":\"all_declined\"}]'"
        )
        .await,
        1_000
    );
    signal(&run, "TERM");
    let (status, log) = env.wait(run, Duration::from_secs(30));
    assert!(status.success(), "{log}");
    assert!(log.contains("SQL reload refused"), "{log}");
}
