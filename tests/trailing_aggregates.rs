//! Trailing aggregate merges (`postgres.trail_aggregates`) against the real PostgreSQL server,
//! with the shipped SQL and model: batches whose merges trail the rows on a second connection,
//! batches whose process "crashed" between the commit of their rows and their merges (the rows'
//! transaction alone, [`payguard::sink::postgres::PgSink::commit_rows`]), and a producer retry
//! among them. At every step the aggregates equal their recomputation from the stored rows whose
//! merges are not pending; the next start applies the pending ones once, and a late merge of an
//! applied commit merges nothing.

mod common;

use std::sync::Arc;

use common::{
    TestEnv, assert_aggregates_match_merged_transactions, assert_aggregates_match_transactions,
    prepare_sink, sink_batch,
};
use payguard::engine::Engine;
use payguard::engine::aggregates::AggregateStage;
use payguard::metrics::Metrics;
use payguard::sink::{CommitOutcome, Sink, trailing};

const BATCH: usize = 400;

async fn pending(env: &TestEnv) -> i64 {
    env.scalar("SELECT count(*) FROM sink_pending_aggregates")
        .await
}

#[tokio::test(flavor = "multi_thread")]
async fn merges_a_crash_left_pending_are_applied_once_at_the_next_start() {
    let env = TestEnv::new("trailing", |_| {}).await;
    let config = payguard::config::load(&env.config).unwrap();
    let mut engine = Engine::new(&config).await.unwrap();
    let data = payguard::bench::canonical_rows(&config, 6 * BATCH, 0.0)
        .await
        .unwrap();
    let mut decided = Vec::new();
    for i in 0..6 {
        decided.push(engine.decide(&data.slice(i * BATCH, BATCH)).await.unwrap());
    }

    let metrics = Arc::new(Metrics::default());
    let pg = prepare_sink(env.pg_sink().await, &engine, true, metrics.clone()).await;
    let sink = Sink::Postgres(pg.clone());
    let mut at = 0;
    let mut jobs = Vec::new();
    // Batches 0, 1 and 3 commit as the pipeline does (merges handed to the trailing writer);
    // the process "crashes" right after the rows of batches 2 and 4 (their merges stay pending).
    for (i, rows) in decided.iter().take(5).enumerate() {
        let mut b = sink_batch(&engine, i, at, rows.clone(), Some(&env.topic)).await;
        at += BATCH;
        if i == 2 || i == 4 {
            let CommitOutcome::Committed(stats) = pg.commit_rows(&b, true).await.unwrap() else {
                panic!("batch {i}: no duplicates here");
            };
            let seq = stats
                .trailing
                .expect("the rows' commit left its merges pending");
            jobs.push(trailing::Job {
                seq,
                stages: b.aggregate_stages.clone(),
                aggregates: b.aggregates.clone(),
            });
        } else {
            let stats = sink.commit_dedup(&mut b).await.unwrap();
            assert_eq!(stats.inserted as usize, BATCH);
            assert!(stats.trailing.is_some(), "batch {i} trails");
        }
        // Whatever the writer has applied so far, the invariant holds.
        assert_aggregates_match_merged_transactions(&mut env.db().await).await;
    }
    sink.flush().await.unwrap();
    assert_eq!(pending(&env).await, 2, "the merges of batches 2 and 4");
    assert_eq!(
        metrics.trailing_time.count(),
        3,
        "batches 0, 1 and 3 trailed"
    );
    assert_eq!(
        metrics.trailing_pending.get(),
        0.0,
        "none is left in the writer"
    );
    assert_aggregates_match_merged_transactions(&mut env.db().await).await;
    assert_eq!(env.transactions().await, 5 * BATCH as i64);

    // The next start (another process: a new sink) applies them before reading the offsets.
    let restarted = prepare_sink(env.pg_sink().await, &engine, true, Arc::default()).await;
    let offsets = restarted.load_offsets().await.unwrap();
    assert_eq!(
        offsets.get(&(env.topic.clone(), 0)),
        Some(&(5 * BATCH as i64))
    );
    assert_eq!(pending(&env).await, 0);
    assert_aggregates_match_transactions(&mut env.db().await).await;

    // The crashed process's merges, arriving late, merge nothing.
    for job in &jobs {
        assert!(!pg.merge_pending(job).await.unwrap(), "commit {}", job.seq);
    }
    assert_aggregates_match_transactions(&mut env.db().await).await;

    // A producer retry of batch 1's rows with the new batch 5: stored once, counted once.
    let sink = Sink::Postgres(restarted.clone());
    let retried = datafusion::arrow::compute::concat_batches(
        &decided[5].schema(),
        [&decided[1], &decided[5]],
    )
    .unwrap();
    let mut b = sink_batch(&engine, 5, at, retried, Some(&env.topic)).await;
    let stats = sink.commit_dedup(&mut b).await.unwrap();
    assert_eq!(
        (stats.inserted, stats.duplicates),
        (BATCH as u64, BATCH as u64)
    );
    sink.flush().await.unwrap();
    assert_eq!(env.transactions().await, 6 * BATCH as i64);
    assert_aggregates_match_transactions(&mut env.db().await).await;
}

#[tokio::test]
async fn aggregates_over_features_merge_in_the_rows_transaction() {
    let env = TestEnv::new("trailfeat", |_| {}).await;
    let config = payguard::config::load(&env.config).unwrap();
    let engine = Engine::new(&config).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("card_velocity.sql");
    std::fs::write(
        &file,
        "SELECT date_bin(INTERVAL '5 minutes', event_time) AS bucket, \
         max(card_tx_24h) AS busiest FROM decided GROUP BY 1",
    )
    .unwrap();
    let stage = AggregateStage::compile(&file, engine.decided_schema())
        .await
        .unwrap();
    let stages = Arc::new(vec![stage]);
    let pg = env.pg_sink().await;
    pg.prepare_aggregates(&stages).await.unwrap();
    assert!(
        !pg.prepare_trailing(&stages, &engine.decided_schema(), true, Arc::default())
            .await
            .unwrap(),
        "card_tx_24h is a feature, not stored in transactions: its merges cannot be recomputed"
    );
}
