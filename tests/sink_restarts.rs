//! Loss of the database and of the broker in the middle of the load, on a PostgreSQL server and a
//! Kafka broker of this test alone (the shared ones are never restarted): `payguard run` keeps
//! its batch, retries with backoff, skips no offset, and ends in the same state as an
//! undisturbed run: every transaction stored once, aggregates equal to their recomputation,
//! offsets equal to the end offsets.

mod common;

use std::time::Duration;

use common::{
    PrivateKafka, PrivatePostgres, TestEnv, assert_aggregates_match_transactions, signal,
};

const PARTITIONS: i32 = 3;

#[tokio::test(flavor = "multi_thread")]
async fn database_restart_and_broker_restart_mid_load_lose_and_repeat_nothing() {
    let pg = PrivatePostgres::start();
    let mut kafka = PrivateKafka::start();
    let env = TestEnv::with_services("restarts", &pg.admin_url(), &kafka.bootstrap(), |t| {
        let p = t["pipeline"].as_table_mut().unwrap();
        p.insert("batch_max_rows".into(), 1000.into());
        p.insert("batch_max_wait_ms".into(), 50.into());
        for section in ["postgres", "kafka"] {
            let s = t[section].as_table_mut().unwrap();
            s.insert("retry_initial_ms".into(), 50.into());
            s.insert("retry_max_ms".into(), 1000.into());
        }
    })
    .await;
    env.generate(8_000, &["--seed", "1"]);
    let run = env.spawn(&["run"]);
    env.wait_for("rows to arrive", Duration::from_secs(90), || async {
        env.transactions().await > 1_000
    })
    .await;

    // 1. The database crashes (immediate shutdown: connections cut, open transactions lost) while
    //    the producer keeps writing; it comes back twelve seconds later (longer than the pool's
    //    10 s acquire timeout, so that a commit fails and is retried, not only waited for).
    let producer = env.spawn(&[
        "generate", "--count", "6000", "--rate", "1500", "--seed", "2", "-q",
    ]);
    pg.stop("immediate");
    tokio::time::sleep(Duration::from_secs(12)).await;
    pg.start_again();
    let (status, log) = env.wait(producer, Duration::from_secs(60));
    assert!(status.success(), "producer: {log}");
    let after_db = env.transactions().await;
    env.wait_for(
        "progress after the database restart",
        Duration::from_secs(90),
        || async { env.transactions().await > after_db + 1_000 },
    )
    .await;
    assert!(
        env.transactions().await < 14_000,
        "the broker restart happens under load"
    );

    // 2. The broker is killed and restarted while there is a backlog; production goes on after.
    kafka.stop("KILL");
    tokio::time::sleep(Duration::from_secs(3)).await;
    kafka.start_again();
    env.generate(4_000, &["--seed", "3"]);

    env.wait_for("every transaction", Duration::from_secs(240), || async {
        env.transactions().await >= 18_000
    })
    .await;
    signal(&run, "TERM");
    let (status, log) = env.wait(run, Duration::from_secs(60));
    assert!(status.success(), "SIGTERM exit: {status}\n{log}");
    assert!(
        log.contains("commit failed; retrying the same batch"),
        "the database loss was seen and retried:\n{log}"
    );
    assert!(
        log.contains("fetch failed")
            || log.contains("cannot open partition")
            || log.contains("Failed to connect to broker"),
        "the broker loss was seen and retried:\n{log}"
    );

    assert_eq!(env.transactions().await, 18_000, "rows stored");
    assert_eq!(
        env.scalar("SELECT count(DISTINCT transaction_id) FROM transactions")
            .await,
        18_000,
        "no id twice"
    );
    assert_eq!(env.scalar("SELECT count(*) FROM dead_letters").await, 0);
    assert_eq!(
        env.stored_offsets().await,
        env.end_offsets(PARTITIONS),
        "offsets = end offsets"
    );
    let mut c = env.db().await;
    assert_aggregates_match_transactions(&mut c).await;
    assert_eq!(
        env.scalar("SELECT count(*) FROM alerts").await,
        env.scalar("SELECT count(*) FROM transactions WHERE decision <> 'approve'")
            .await
    );
    // The per-minute view (migration 0004, plain PostgreSQL path) agrees with the table.
    assert_eq!(
        env.scalar("SELECT sum(transactions)::bigint FROM transactions_per_minute")
            .await,
        18_000
    );
}
