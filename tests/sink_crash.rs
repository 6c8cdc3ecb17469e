//! Exactly-once under crashes: while a producer keeps writing simulated payments, `payguard run`
//! is killed with SIGKILL at random moments (at least ten times) and restarted. At the end every
//! produced transaction is stored once, every aggregate equals its recomputation from the stored
//! transactions, and the stored offsets are the topic's end offsets. After every kill, each
//! aggregate equals its recomputation from the stored rows whose (trailing) merges are not
//! pending: a crash between a commit of rows and its merges leaves them pending, never lost or
//! applied twice, and the next start applies them.

mod common;

use std::time::{Duration, Instant};

use common::{
    TestEnv, assert_aggregates_match_merged_transactions, assert_aggregates_match_transactions,
    signal,
};
use rand::{Rng, SeedableRng};

const PARTITIONS: i32 = 3;
const PRODUCED: i64 = 20_000;
const KILLS: usize = 12;

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_at_random_moments_under_load_loses_and_repeats_nothing() {
    sigkill_under_load(&common::admin_url(), "crash", false).await;
}

/// The same on TimescaleDB. The simulated payments are weeks old, older than
/// `postgres.compress_after` (7 days): the compression policy's job may compress their chunks at
/// any moment, and after the fourth kill the test compresses every chunk itself, so the rest of
/// the stream lands in compressed chunks.
#[tokio::test(flavor = "multi_thread")]
async fn sigkill_at_random_moments_under_load_loses_and_repeats_nothing_on_timescaledb() {
    let Some(admin) = common::timescaledb_admin_url("sigkill on TimescaleDB") else {
        return;
    };
    sigkill_under_load(&admin, "crash_ts", true).await;
}

/// `compress`: compress every chunk of `transactions` after the fourth kill (TimescaleDB).
async fn sigkill_under_load(admin: &str, name: &str, compress: bool) {
    let env = TestEnv::with_services(name, admin, &common::brokers(), |t| {
        let p = t["pipeline"].as_table_mut().unwrap();
        p.insert("batch_max_rows".into(), 1000.into());
        p.insert("batch_max_wait_ms".into(), 50.into());
    })
    .await;
    let seed: u64 = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    eprintln!("kill schedule seed {seed}");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);

    // Continuous load: the producer runs through all the kills. At 250 messages/s it produces
    // for 80 s, longer than the kill loop (12 kills of at most 4 s after start-up, 40-60 s): the
    // last kill always hits a pipeline with work still to do. (At 600/s the producer finished
    // within the loop once the engine got faster, and the pipeline caught up before the end.)
    let count = PRODUCED.to_string();
    let producer = env.spawn(&["generate", "--count", &count, "--rate", "250", "-q"]);
    let started = Instant::now();

    let mut kills_after_progress = 0;
    let mut kills_with_pending_merges = 0;
    for i in 0..KILLS {
        let before = env.transactions().await;
        let run = env.spawn(&["run"]);
        // A random moment: every other kill anywhere from start-up on (before the first commit,
        // between batches, in the middle of one), the others at a random moment after the run
        // has committed something (so that the crash always hits a process at work).
        let delay = if i % 2 == 0 {
            env.wait_for("a commit", Duration::from_secs(60), || async {
                env.transactions().await > before
            })
            .await;
            Duration::from_millis(rng.random_range(0..1_500))
        } else {
            Duration::from_millis(rng.random_range(200..4_000))
        };
        tokio::time::sleep(delay).await;
        // Every fourth kill (after a commit) hits a process whose aggregate merges are held up
        // (an analyst's lock on a table): rows keep committing, their merges pend, then the kill.
        let lock = if i % 4 == 0 {
            let mut c = env.db().await;
            sqlx::raw_sql("BEGIN; LOCK TABLE agg_merchant_5m IN SHARE ROW EXCLUSIVE MODE")
                .execute(&mut c)
                .await
                .unwrap();
            env.wait_for("a pending merge", Duration::from_secs(60), || async {
                env.scalar("SELECT count(*) FROM sink_pending_aggregates")
                    .await
                    > 0
            })
            .await;
            Some(c)
        } else {
            None
        };
        signal(&run, "KILL");
        let (status, log) = env.wait(run, Duration::from_secs(30));
        assert!(!status.success(), "kill {i}: the process was killed\n{log}");
        drop(lock);
        let rows = env.transactions().await;
        let offsets: i64 = env.stored_offsets().await.iter().map(|(_, o)| o).sum();
        assert_eq!(
            offsets, rows,
            "kill {i} after {delay:?}: rows and offsets are committed together"
        );
        if rows > before {
            kills_after_progress += 1;
        }
        if env
            .scalar("SELECT count(*) FROM sink_pending_aggregates")
            .await
            > 0
        {
            kills_with_pending_merges += 1;
        }
        assert_aggregates_match_merged_transactions(&mut env.db().await).await;
        if compress && i == 3 {
            let n = env
                .scalar(
                    "SELECT count(compress_chunk(c, if_not_compressed => true)) \
                     FROM show_chunks('transactions') c",
                )
                .await;
            assert!(n > 0, "chunks compressed");
        }
    }
    assert!(
        kills_with_pending_merges >= KILLS / 4,
        "the kills under a lock left merges pending"
    );
    eprintln!(
        "{KILLS} kills in {:?}, {kills_after_progress} of them after progress, \
         {kills_with_pending_merges} left aggregate merges pending",
        started.elapsed()
    );

    let (status, log) = env.wait(producer, Duration::from_secs(120));
    assert!(status.success(), "producer: {log}");
    assert!(
        env.transactions().await < PRODUCED,
        "the kills happened while there was still work to do"
    );
    env.run_ok(&["run", "--stop-at-end"]);

    assert_eq!(env.transactions().await, PRODUCED, "rows stored");
    assert_eq!(
        env.scalar("SELECT count(*) FROM (SELECT transaction_id FROM transactions GROUP BY 1 HAVING count(*) > 1) d")
            .await,
        0,
        "no id twice"
    );
    assert_eq!(
        env.scalar("SELECT count(DISTINCT transaction_id) FROM transactions")
            .await,
        PRODUCED
    );
    assert_eq!(env.scalar("SELECT count(*) FROM dead_letters").await, 0);
    assert_eq!(
        env.stored_offsets().await,
        env.end_offsets(PARTITIONS),
        "offsets = end offsets"
    );
    let mut c = env.db().await;
    assert_aggregates_match_transactions(&mut c).await;
    if compress {
        assert!(
            env.scalar(
                "SELECT count(*) FROM timescaledb_information.chunks \
                 WHERE hypertable_name = 'transactions' AND is_compressed"
            )
            .await
                > 0,
            "rows landed in compressed chunks"
        );
    }
    // Alerts are the stored review/decline transactions, once each.
    assert_eq!(
        env.scalar("SELECT count(*) FROM alerts").await,
        env.scalar("SELECT count(*) FROM transactions WHERE decision <> 'approve'")
            .await
    );
}
