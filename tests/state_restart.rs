//! The window state survives a restart (Kafka -> payguard run -> PostgreSQL): after a graceful
//! stop, `run` rebuilds the per-entity history of `features.sql` from the stored transactions
//! before consuming, so a card's velocity does not start again from 0. With
//! `engine.warm_max_rows = 0` (the rebuild off) it does.

mod common;

use std::time::Duration;

use common::{TestEnv, signal};
use sqlx::Row;

/// A card message `minutes_ago` minutes before the test's start.
fn card(id: &str, minutes_ago: i64, card: &str, merchant: &str) -> String {
    static START: std::sync::LazyLock<chrono::DateTime<chrono::Utc>> =
        std::sync::LazyLock::new(chrono::Utc::now);
    let ts = (*START - chrono::Duration::minutes(minutes_ago)).to_rfc3339();
    format!(
        r#"{{"auth_id":"{id}","ts":"{ts}","pan_token":"{card}","customer_ref":"cus-{card}","merchant_id":"{merchant}","terminal_id":"t-{merchant}","amount":"42.10","currency":"BRL","country":"BR","entry_mode":"ecommerce","lat":-23.5,"lon":-46.6}}"#
    )
}

/// The log of a spawned process so far.
fn log_of(env: &TestEnv, child: &std::process::Child) -> String {
    let path = std::fs::read_to_string(env.dir.path().join(format!("pid-{}", child.id())))
        .unwrap_or_default();
    std::fs::read_to_string(path).unwrap_or_default()
}

/// What the trace rules recorded for a transaction: (card_tx_24h, card_secs_since_prev).
async fn traced(env: &TestEnv, id: &str) -> (String, String) {
    let mut db = env.db().await;
    let hits = sqlx::query(
        "SELECT h->>'rule', h->>'reason' FROM transactions, jsonb_array_elements(rule_hits) h \
         WHERE transaction_id = $1 ORDER BY 1",
    )
    .bind(id)
    .fetch_all(&mut db)
    .await
    .unwrap();
    let get = |rule: &str| {
        hits.iter()
            .find(|r| r.get::<String, _>(0) == rule)
            .map(|r| r.get::<String, _>(1))
            .unwrap_or_else(|| panic!("{id} has no {rule} hit"))
    };
    (get("trace_card_tx_24h"), get("trace_card_secs_since_prev"))
}

async fn wait_rows(env: &TestEnv, n: i64) {
    env.wait_for(
        &format!("{n} stored rows"),
        Duration::from_secs(120),
        || async { env.transactions().await >= n },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn window_state_is_rebuilt_from_the_database_after_a_restart() {
    // Rules that only record the features under test in `transactions.rule_hits`.
    let rules = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        rules.path(),
        "SELECT transaction_id, 'trace_card_tx_24h' AS rule, 'info' AS severity, \
                CAST(card_tx_24h AS VARCHAR) AS reason FROM scored\n\
         UNION ALL\n\
         SELECT transaction_id, 'trace_card_secs_since_prev', 'info', \
                CAST(CAST(card_secs_since_prev AS BIGINT) AS VARCHAR) FROM scored\n",
    )
    .unwrap();
    let env = TestEnv::new("restart_state", |t| {
        t.remove("model");
        let engine = t["engine"].as_table_mut().unwrap();
        engine.insert("rules".into(), rules.path().display().to_string().into());
        engine.insert("hot_reload".into(), false.into());
        t["pipeline"]
            .as_table_mut()
            .unwrap()
            .insert("batch_max_wait_ms".into(), 20.into());
    })
    .await;

    // Run 1: four transactions of card-1 ten minutes apart (and one of another card), then a
    // graceful stop.
    let before: Vec<String> = (0..4)
        .map(|i| card(&format!("r{i}"), 180 - 10 * i, "card-1", &format!("m-{i}")))
        .chain([card("other", 170, "card-2", "m-9")])
        .collect();
    let msgs: Vec<&[u8]> = before.iter().map(|m| m.as_bytes()).collect();
    env.kcat_produce(0, &msgs);
    let run = env.spawn(&["run"]);
    wait_rows(&env, 5).await;
    signal(&run, "TERM");
    let (status, log) = env.wait(run, Duration::from_secs(60));
    assert!(status.success(), "first run: {status}\n{log}");
    assert_eq!(traced(&env, "r3").await, ("4".into(), "600".into()));

    // Run 2: a new process. Once it has rebuilt its state, one more transaction of card-1,
    // 30 minutes after the last one.
    let run = env.spawn(&["run"]);
    env.wait_for(
        "the window state rebuild",
        Duration::from_secs(120),
        || async { log_of(&env, &run).contains("window state rebuilt") },
    )
    .await;
    let log = log_of(&env, &run);
    let line = log
        .lines()
        .find(|l| l.contains("window state rebuilt"))
        .unwrap();
    assert!(line.contains("rows=5"), "{line}");
    let after = card("r4", 120, "card-1", "m-4");
    env.kcat_produce(0, &[after.as_bytes()]);
    wait_rows(&env, 6).await;
    signal(&run, "TERM");
    let (status, log) = env.wait(run, Duration::from_secs(60));
    assert!(status.success(), "second run: {status}\n{log}");
    assert_eq!(
        traced(&env, "r4").await,
        ("5".into(), "1800".into()),
        "r4 counts card-1's four transactions from before the restart"
    );
    assert_eq!(env.transactions().await, 6, "the rebuild stores nothing");

    // Run 3 with the rebuild off: the card starts again from nothing.
    let mut config: toml::Table =
        toml::from_str(&std::fs::read_to_string(&env.config).unwrap()).unwrap();
    config["engine"]
        .as_table_mut()
        .unwrap()
        .insert("warm_max_rows".into(), 0.into());
    std::fs::write(&env.config, toml::to_string(&config).unwrap()).unwrap();
    let cold = card("r5", 110, "card-1", "m-5");
    env.kcat_produce(0, &[cold.as_bytes()]);
    let out = env.run_ok(&["run", "--stop-at-end"]);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(!log.contains("window state rebuilt"), "{log}");
    assert_eq!(traced(&env, "r5").await, ("1".into(), "-1".into()));
}
