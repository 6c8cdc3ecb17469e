//! Label feedback through the real pipeline (Kafka -> payguard run -> PostgreSQL): labels are
//! stored once with their offsets, bad labels are dead-lettered, the label features see a label
//! only from its report time on, and the label state survives a restart.

mod common;

use common::{TestEnv, kcat_produce_to};
use sqlx::Row;

fn card(id: &str, ts: &str, card: &str, merchant: &str) -> String {
    format!(
        r#"{{"auth_id":"{id}","ts":"{ts}","pan_token":"{card}","merchant_id":"{merchant}","terminal_id":"t-{merchant}","amount":"42.10","currency":"BRL","country":"BR","entry_mode":"chip","lat":-23.5,"lon":-46.6}}"#
    )
}

fn at(days: f64) -> String {
    let base = chrono::Utc::now() - chrono::Duration::days(10);
    (base + chrono::Duration::milliseconds((days * 86_400_000.0) as i64)).to_rfc3339()
}

#[tokio::test(flavor = "multi_thread")]
async fn labels_are_stored_once_and_seen_point_in_time_across_a_restart() {
    // The shipped rules plus one on the label feature (a card with a confirmed fraud report).
    let rules = common::rules_with_card_fraud_label_rule();
    let env = TestEnv::new("labels", |t| {
        t["labels"]
            .as_table_mut()
            .unwrap()
            .insert("enabled".into(), true.into());
        // Rules only: the assertions are about the label rule.
        t.remove("model");
        t["engine"]
            .as_table_mut()
            .unwrap()
            .insert("rules".into(), rules.path().display().to_string().into());
    })
    .await;
    let labels_topic = format!("{}.labels", env.topic);

    // Run 1: transaction A, its chargeback (reported a day later) twice (a producer retry), a
    // label that is not a label, and one naming an unknown transaction.
    let a = card("A", &at(0.0), "card-1", "m-1");
    kcat_produce_to(&env.topic, 0, &[a.as_bytes()]);
    let chargeback = format!(
        r#"{{"transaction_id":"A","source":"card","label":"fraud","report_type":"chargeback","fraud_scenario":"stolen_card","transaction_time":"{}","reported_at":"{}"}}"#,
        at(0.0),
        at(1.0)
    );
    let bad = format!(
        r#"{{"transaction_id":"A","label":"maybe","reported_at":"{}"}}"#,
        at(1.0)
    );
    let unknown = format!(
        r#"{{"transaction_id":"nobody","label":"genuine","reported_at":"{}"}}"#,
        at(1.0)
    );
    kcat_produce_to(
        &labels_topic,
        0,
        &[
            chargeback.as_bytes(),
            chargeback.as_bytes(),
            bad.as_bytes(),
            b"{not json",
            unknown.as_bytes(),
        ],
    );
    env.run_ok(&["run", "--stop-at-end"]);
    assert_eq!(env.scalar("SELECT count(*) FROM labels").await, 2);
    assert_eq!(
        env.scalar("SELECT count(*) FROM labels WHERE transaction_id = 'A' AND label = 'fraud' AND report_type = 'chargeback'")
            .await,
        1
    );
    let mut db = env.db().await;
    let dead = sqlx::query(
        "SELECT source, topic, kafka_offset, reason, raw FROM dead_letters ORDER BY kafka_offset",
    )
    .fetch_all(&mut db)
    .await
    .unwrap();
    assert_eq!(dead.len(), 2, "the bad label and the broken JSON");
    for (row, offset) in dead.iter().zip([2i64, 3]) {
        assert_eq!(row.get::<String, _>(0), "labels");
        assert_eq!(row.get::<String, _>(1), labels_topic);
        assert_eq!(row.get::<i64, _>(2), offset);
    }
    assert!(
        dead[0].get::<String, _>(3).contains("neither"),
        "{}",
        dead[0].get::<String, _>(3)
    );
    assert_eq!(dead[0].get::<Vec<u8>, _>(4), bad.as_bytes());
    let label_offsets: i64 =
        sqlx::query("SELECT next_offset FROM consumer_offsets WHERE pipeline = $1 AND topic = $2")
            .bind(&env.pipeline)
            .bind(&labels_topic)
            .fetch_one(&mut db)
            .await
            .unwrap()
            .get(0);
    assert_eq!(label_offsets, 5, "every label message is accounted for");

    // Run 2 (a fresh process: the label state is rebuilt from the database). B uses the same
    // card two days after A, after the report: the label rule declines it. C happened 12 hours
    // after A, before the report: it arrives late, and must not see the label.
    let b = card("B", &at(2.0), "card-1", "m-2");
    let c = card("C", &at(0.5), "card-1", "m-3");
    kcat_produce_to(&env.topic, 0, &[b.as_bytes(), c.as_bytes()]);
    env.run_ok(&["run", "--stop-at-end"]);
    let rows = sqlx::query(
        "SELECT transaction_id, decision, rule_hits::text FROM transactions ORDER BY transaction_id",
    )
    .fetch_all(&mut db)
    .await
    .unwrap();
    let got: Vec<(String, String, String)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(got.len(), 3);
    assert!(
        !got[0].2.contains("card_reported_fraud"),
        "A itself: {got:?}"
    );
    assert_eq!(got[1].1, "decline", "B: {got:?}");
    assert!(got[1].2.contains("card_reported_fraud"), "B: {got:?}");
    assert!(
        !got[2].2.contains("card_reported_fraud"),
        "C happened before the report: {got:?}"
    );
    assert_eq!(
        env.scalar("SELECT (features->>'card_fraud_labels_90d')::bigint FROM alerts WHERE transaction_id = 'B'")
            .await,
        1,
        "B's alert shows the label feature"
    );
}
