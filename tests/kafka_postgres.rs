//! End-to-end tests of the foundation slice against the real Kafka broker and PostgreSQL server
//! (started by `.ci/run`, or `bash .ci/services.sh up`): generate -> Kafka -> payguard run ->
//! PostgreSQL, exactly-once across stops, restarts and crashes.

mod common;

use std::time::Duration;

use common::{TestEnv, signal};

const PARTITIONS: i32 = 3;

/// Everything produced is stored exactly once and the stored offsets are the topic's end offsets.
async fn assert_exactly_once(env: &TestEnv, produced: i64) {
    assert_eq!(env.transactions().await, produced, "rows stored");
    assert_eq!(
        env.scalar("SELECT count(DISTINCT transaction_id) FROM transactions")
            .await,
        produced,
        "distinct ids"
    );
    assert_eq!(
        env.stored_offsets().await,
        env.end_offsets(PARTITIONS),
        "offsets = end offsets"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn fifty_thousand_transactions_over_three_partitions_are_stored_once() {
    let env = TestEnv::new("fifty_k", |_| {}).await;
    env.generate(50_000, &[]);
    let ends = env.end_offsets(PARTITIONS);
    assert_eq!(ends.len(), 3);
    assert!(
        ends.iter().all(|(_, o)| *o > 10_000),
        "keys spread over all partitions: {ends:?}"
    );
    assert_eq!(ends.iter().map(|(_, o)| o).sum::<i64>(), 50_000);

    env.run_ok(&["run", "--stop-at-end"]);
    assert_exactly_once(&env, 50_000).await;

    // Money is exact: the stored sum equals the sum of the amounts in the produced messages.
    let out = std::process::Command::new("kcat")
        .args(["-C", "-b", &common::brokers(), "-t", &env.topic, "-e", "-q"])
        .output()
        .unwrap();
    let mut cents: i64 = 0;
    for line in String::from_utf8(out.stdout).unwrap().lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let (units, frac) = v["amount"].as_str().unwrap().split_once('.').unwrap();
        cents += units.parse::<i64>().unwrap() * 100 + frac.parse::<i64>().unwrap();
    }
    let stored = env
        .scalar("SELECT (sum(amount) * 100)::bigint FROM transactions")
        .await;
    assert_eq!(stored, cents);

    // A second run finds nothing new and changes nothing.
    env.run_ok(&["run", "--stop-at-end"]);
    assert_exactly_once(&env, 50_000).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn stop_and_crash_mid_stream_then_restart_loses_and_repeats_nothing() {
    let env = TestEnv::new("restart", |t| {
        let p = t["pipeline"].as_table_mut().unwrap();
        p.insert("batch_max_rows".into(), 500.into());
        p.insert("batch_max_wait_ms".into(), 20.into());
    })
    .await;
    // The producer keeps going while the consumer is stopped and crashed.
    let producer = env.spawn(&["generate", "--count", "60000", "--rate", "12000", "-q"]);

    // 1. Graceful stop with SIGTERM mid-stream: exit code 0, what was in flight is committed.
    let run = env.spawn(&["run"]);
    env.wait_for("rows to arrive", Duration::from_secs(60), || async {
        env.transactions().await > 5_000
    })
    .await;
    signal(&run, "TERM");
    let (status, log) = env.wait(run, Duration::from_secs(30));
    assert!(status.success(), "SIGTERM exit: {status}\n{log}");
    let after_term = env.transactions().await;
    assert!(after_term < 60_000, "the stop was mid-stream");
    let offsets: i64 = env.stored_offsets().await.iter().map(|(_, o)| o).sum();
    assert_eq!(
        offsets, after_term,
        "stored offsets cover exactly the stored rows"
    );

    // 2. Crash with SIGKILL mid-stream: the uncommitted batch is simply read again.
    let run = env.spawn(&["run"]);
    env.wait_for("more rows", Duration::from_secs(60), || async {
        env.transactions().await > after_term + 5_000
    })
    .await;
    signal(&run, "KILL");
    let _ = env.wait(run, Duration::from_secs(30));
    let after_kill = env.transactions().await;
    let offsets: i64 = env.stored_offsets().await.iter().map(|(_, o)| o).sum();
    assert_eq!(offsets, after_kill, "rows and offsets committed together");

    let (status, log) = env.wait(producer, Duration::from_secs(120));
    assert!(status.success(), "producer: {log}");
    // 3. Restart and catch up.
    env.run_ok(&["run", "--stop-at-end"]);
    assert_exactly_once(&env, 60_000).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_messages_are_dead_lettered_and_the_rest_of_the_batch_is_kept() {
    let env = TestEnv::new("bad_input", |_| {}).await;
    env.generate(3_000, &[]);
    let good = br#"{"auth_id":"kcat-good-1","ts":"2026-11-01T12:00:00Z","pan_token":"tok_x","merchant_id":"mer_1","amount":"10.00","currency":"BRL"}"#;
    let bad: Vec<&[u8]> = vec![
        b"this is not json",
        br#"{"auth_id":"kcat-missing-amount","ts":"2026-11-01T12:00:00Z","pan_token":"tok_x","merchant_id":"mer_1","currency":"BRL"}"#,
        br#"{"auth_id":"kcat-bad-amount","ts":"2026-11-01T12:00:00Z","pan_token":"tok_x","merchant_id":"mer_1","amount":"ten","currency":"BRL"}"#,
        b"\xc3\x28 invalid utf-8",
        good,
    ];
    env.kcat_produce(1, &bad);
    env.generate(2_000, &["--seed", "99"]);

    env.run_ok(&["run", "--stop-at-end"]);
    assert_eq!(
        env.transactions().await,
        5_001,
        "every good message is stored"
    );
    assert_eq!(env.scalar("SELECT count(*) FROM dead_letters").await, 4);
    assert_eq!(
        env.scalar("SELECT count(*) FROM transactions WHERE transaction_id = 'kcat-good-1'")
            .await,
        1
    );
    let mut c = env.db().await;
    let rows: Vec<(String, i32, Vec<u8>, String)> = sqlx::query_as(
        "SELECT topic, kafka_partition, raw, reason FROM dead_letters ORDER BY kafka_offset",
    )
    .fetch_all(&mut c)
    .await
    .unwrap();
    assert!(rows.iter().all(|r| r.0 == env.topic && r.1 == 1));
    assert_eq!(rows[0].2, b"this is not json");
    assert!(rows[0].3.starts_with("invalid JSON"), "{}", rows[0].3);
    assert_eq!(rows[1].3, "missing required field(s): amount");
    assert!(
        rows[2].3.contains("wrong field type or value"),
        "{}",
        rows[2].3
    );
    assert_eq!(rows[3].2, b"\xc3\x28 invalid utf-8");
    assert!(rows[3].3.starts_with("invalid UTF-8"), "{}", rows[3].3);
    // Dead letters move the offsets too: nothing is read twice.
    assert_exactly_once(&env, 5_001).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_producer_retry_is_stored_once() {
    let env = TestEnv::new("dupes", |_| {}).await;
    let msg = br#"{"auth_id":"dup-1","ts":"2026-11-01T12:00:00Z","pan_token":"tok_d","merchant_id":"mer_1","amount":"99.99","currency":"BRL"}"#;
    env.kcat_produce(0, &[msg, msg]);
    env.run_ok(&["run", "--stop-at-end"]);
    env.kcat_produce(2, &[msg]);
    env.run_ok(&["run", "--stop-at-end"]);
    assert_eq!(env.transactions().await, 1);
    assert_eq!(
        env.stored_offsets().await,
        env.end_offsets(PARTITIONS)
            .into_iter()
            .filter(|(_, o)| *o > 0)
            .collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn source_attributes_are_stored_in_typed_columns_and_a_conflicting_column_is_refused() {
    let env = TestEnv::new("attributes", |_| {}).await;
    env.generate(20_000, &[]);
    env.run_ok(&["run", "--stop-at-end"]);
    assert_exactly_once(&env, 20_000).await;
    // The card mapping selects its signals: each is a column of its own, filled on every row.
    for (column, sql) in [
        (
            "entry_mode",
            "SELECT count(*) FROM transactions WHERE entry_mode IN ('chip', 'contactless', 'magstripe', 'ecommerce')",
        ),
        (
            "cvv_result",
            "SELECT count(*) FROM transactions WHERE cvv_result IN ('M', 'N', 'P', 'U')",
        ),
        (
            "three_ds",
            "SELECT count(*) FROM transactions WHERE three_ds IS NOT NULL",
        ),
        (
            "response_code",
            "SELECT count(*) FROM transactions WHERE response_code ~ '^[0-9A-Z]{2}$'",
        ),
    ] {
        assert_eq!(env.scalar(sql).await, 20_000, "{column} on every card row");
    }
    // Attributes of other sources are NULL for card rows, and typed as declared.
    assert_eq!(
        env.scalar("SELECT count(*) FROM transactions WHERE pix_initiation IS NOT NULL")
            .await,
        0
    );
    assert_eq!(
        env.scalar(
            "SELECT count(*) FROM information_schema.columns WHERE table_name = 'transactions' \
             AND column_name IN ('entry_mode', 'cvv_result', 'three_ds', 'response_code', \
             'pix_initiation', 'payee_key_type', 'wallet_provider', 'wallet_payment_type', \
             'wallet_funding', 'transfer_kind') AND data_type = 'text'"
        )
        .await,
        10
    );
    // A feature over an attribute: the card's CVV mismatches, as stored with the alerts.
    assert!(
        env.scalar(
            "SELECT count(*) FROM alerts WHERE (features->>'card_cvv_mismatches_24h')::int > 0"
        )
        .await
            > 0,
        "card testing probes with wrong CVVs are counted"
    );

    // A column of an attribute's name with another type: the start is refused, naming the fix.
    let mut db = env.db().await;
    sqlx::query("ALTER TABLE transactions ALTER COLUMN cvv_result TYPE integer USING NULL")
        .execute(&mut db)
        .await
        .unwrap();
    let out = env.cmd(&["run", "--stop-at-end"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains(
            "transactions.cvv_result is integer, but the attribute is declared as text: rename the attribute"
        ),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_database_password_comes_from_a_file_and_never_reaches_the_logs() {
    let secrets = tempfile::tempdir().unwrap();
    let password_file = secrets.path().join("pg-password");
    std::fs::write(&password_file, "payguard\n").unwrap();
    let env = TestEnv::new("pwfile", |t| {
        let pg = t["postgres"].as_table_mut().unwrap();
        let url = pg["url"]
            .as_str()
            .unwrap()
            .replace("payguard:payguard@", "payguard@");
        assert!(!url.contains(":payguard@"), "{url}");
        pg.insert("url".into(), url.into());
        pg.insert(
            "password_file".into(),
            password_file.display().to_string().into(),
        );
        // Retry quickly while the password is wrong.
        pg.insert("retry_max_ms".into(), 500.into());
    })
    .await;
    env.generate(1_000, &[]);
    env.run_ok(&["run", "--stop-at-end"]);
    assert_exactly_once(&env, 1_000).await;

    // A wrong password: refused by the server, retried, and never printed, even at debug level.
    let wrong = "Wr0ng:Pa55@w0rd-7f3a";
    std::fs::write(&password_file, format!("{wrong}\n")).unwrap();
    let log = env
        .run_until_logged(
            "wrong-password",
            "debug,rskafka=warn",
            "password authentication failed",
        )
        .await;
    assert!(!log.contains(wrong), "the password reached the log:\n{log}");
    assert!(
        !log.contains("Wr0ng%3APa55%40w0rd-7f3a") && !log.contains("Pa55"),
        "the encoded password reached the log"
    );
    let check = env.cmd(&["check"]).output().unwrap();
    for out in [&check.stdout, &check.stderr] {
        assert!(!String::from_utf8_lossy(out).contains(wrong));
    }
    // An unreadable file is a config error naming the key and the file, at start.
    std::fs::remove_file(&password_file).unwrap();
    let out = env.cmd(&["run", "--stop-at-end"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("postgres.password_file: cannot read"),
        "{stderr}"
    );
}
