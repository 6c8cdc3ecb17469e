//! Bad input of every kind, in one run against the real broker and database: each bad message
//! lands in `dead_letters` with its raw bytes, topic, partition, offset and a reason; every good
//! message around it is stored; the offsets cover everything (count in = rows + dead letters).

mod common;

use common::TestEnv;

const PARTITIONS: i32 = 3;

fn card(id: &str, ts: &str, amount: &str) -> Vec<u8> {
    format!(
        r#"{{"auth_id":"{id}","ts":"{ts}","pan_token":"tok_dl","merchant_id":"mer_1","amount":{amount},"currency":"BRL"}}"#
    )
    .into_bytes()
}

#[tokio::test(flavor = "multi_thread")]
async fn every_kind_of_bad_input_is_dead_lettered_with_its_reason_and_nothing_is_lost() {
    let env = TestEnv::new("dead_letters", |t| {
        t["kafka"]
            .as_table_mut()
            .unwrap()
            .insert("max_message_bytes".into(), 2000.into());
    })
    .await;
    env.generate(2_000, &[]);
    let ts = "2026-11-01T12:00:00Z";
    let mut oversized = card("dl-oversized", ts, r#""10.00""#);
    oversized.truncate(oversized.len() - 1);
    oversized.extend_from_slice(format!(r#","ip":"{}"}}"#, "x".repeat(3000)).as_bytes());
    // (message, expected reason prefix or part)
    let bad: Vec<(Vec<u8>, &str)> = vec![
        (br#"{"auth_id":"dl-trunc","ts":"#.to_vec(), "invalid JSON"),
        (b"not json at all".to_vec(), "invalid JSON"),
        (b"[1,2,3]".to_vec(), "expected a JSON object, got an array"),
        (
            br#"{"auth_id":5,"ts":"2026-11-01T12:00:00Z","pan_token":"t","merchant_id":"m","amount":"1.00","currency":"BRL"}"#.to_vec(),
            "wrong field type or value",
        ),
        (card("dl-bool-amount", ts, "true"), "wrong field type or value"),
        (card("dl-bad-ts", "yesterday", r#""1.00""#), "wrong field type or value"),
        (
            br#"{"auth_id":"dl-missing","ts":"2026-11-01T12:00:00Z","merchant_id":"m","amount":"1.00","currency":"BRL"}"#.to_vec(),
            "missing required field(s): pan_token",
        ),
        (b"\xc3\x28 invalid utf-8".to_vec(), "invalid UTF-8"),
        (oversized, "exceeds kafka.max_message_bytes (2000)"),
        (card("dl-two-dots", ts, r#""12.345.6""#), "wrong field type or value"),
        (card("dl-1e400-number", ts, "1e400"), "invalid JSON: number out of range"),
        (card("dl-1e400-string", ts, r#""1e400""#), "overflow"),
        (
            card("dl-three-decimals", ts, r#""12.345""#),
            "field amount: 12.345 has more decimals than decimal(18,2)",
        ),
        (card("dl-no-digits", ts, r#""+.""#), "field amount: \"+.\" is not a number"),
        (
            card("dl-future", "2099-01-01T00:00:00Z", r#""5.00""#),
            "further in the future than engine.max_future",
        ),
        (
            br#"{"auth_id":"dl-nul\u0000","ts":"2026-11-01T12:00:00Z","pan_token":"t","merchant_id":"m","amount":"1.00","currency":"BRL"}"#.to_vec(),
            "NUL character",
        ),
        (b"   ".to_vec(), "empty message"),
    ];
    let good = card("dl-good", ts, r#""10.00""#);
    let mut batch: Vec<&[u8]> = bad.iter().map(|(m, _)| m.as_slice()).collect();
    batch.push(&good);
    env.kcat_produce(1, &batch);
    env.generate(2_000, &["--seed", "7"]);

    env.run_ok(&["run", "--stop-at-end"]);

    let ends = env.end_offsets(PARTITIONS);
    let produced: i64 = ends.iter().map(|(_, o)| o).sum();
    assert_eq!(produced, 4_000 + bad.len() as i64 + 1);
    assert_eq!(
        env.transactions().await,
        4_001,
        "every good message is stored"
    );
    assert_eq!(
        env.scalar("SELECT count(*) FROM transactions WHERE transaction_id = 'dl-good'")
            .await,
        1
    );
    assert_eq!(
        env.scalar("SELECT count(*) FROM dead_letters").await,
        bad.len() as i64,
        "one dead letter per bad message"
    );
    assert_eq!(
        env.transactions().await + env.scalar("SELECT count(*) FROM dead_letters").await,
        produced,
        "count in = rows + dead letters"
    );
    assert_eq!(env.stored_offsets().await, ends, "offsets = end offsets");

    let mut c = env.db().await;
    let rows: Vec<(String, String, i32, i64, Vec<u8>, String)> = sqlx::query_as(
        "SELECT source, topic, kafka_partition, kafka_offset, raw, reason FROM dead_letters \
         ORDER BY kafka_offset",
    )
    .fetch_all(&mut c)
    .await
    .unwrap();
    // The bad messages were produced in a row on partition 1, after the generator's messages.
    let first = rows[0].3;
    for (i, ((source, topic, partition, offset, raw, reason), (sent, why))) in
        rows.iter().zip(bad.iter()).enumerate()
    {
        assert_eq!(source, "card");
        assert_eq!(topic, &env.topic);
        assert_eq!(*partition, 1);
        assert_eq!(
            *offset,
            first + i as i64,
            "dead letter {i} keeps its offset"
        );
        assert_eq!(raw, sent, "dead letter {i} keeps the raw bytes");
        assert!(
            reason.contains(why),
            "dead letter {i}: reason {reason:?} should say {why:?}"
        );
    }
}
