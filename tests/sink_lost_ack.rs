//! A commit whose connection is lost around its COMMIT, against the real PostgreSQL server
//! through a TCP proxy that cuts the connection at that moment: either the COMMIT never reaches
//! the server (the transaction is rolled back) or it does and its answer is lost (the
//! transaction committed, the sink sees an error). Retrying the same batch, as the pipeline
//! does, must store it exactly once in both cases: the sink asks the database whether the
//! commit landed before trying again (a lost answer used to be retried into the offsets' fence
//! and stop the pipeline). A trailing merge cut the same way is applied once: its retry finds
//! its `sink_pending_aggregates` record gone when the first attempt landed.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::time::Duration;

use common::{TestEnv, assert_aggregates_match_transactions, prepare_sink, sink_batch};
use datafusion::arrow::array::RecordBatch;
use payguard::engine::Engine;
use payguard::sink::postgres::PgSink;
use payguard::sink::{CommitOutcome, Sink, trailing};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const BATCH: usize = 300;

/// What the proxy does to the next COMMIT it sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Cut {
    /// Nothing: bytes pass.
    None = 0,
    /// Close the connection instead of forwarding the COMMIT.
    BeforeCommit = 1,
    /// Forward the COMMIT, drop the server's answer, close the connection.
    AnswerOfCommit = 2,
}

/// A TCP proxy in front of PostgreSQL.
struct Proxy {
    addr: SocketAddr,
    cut: Arc<AtomicU8>,
}

impl Proxy {
    async fn start(upstream: String) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cut = Arc::new(AtomicU8::new(Cut::None as u8));
        let armed = cut.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let server = TcpStream::connect(&upstream).await.unwrap();
                tokio::spawn(pump(client, server, armed.clone()));
            }
        });
        Self { addr, cut }
    }

    /// Act on the next COMMIT (then pass everything again).
    fn arm(&self, cut: Cut) {
        self.cut.store(cut as u8, Ordering::SeqCst);
    }
}

async fn pump(client: TcpStream, server: TcpStream, armed: Arc<AtomicU8>) {
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let deaf = Arc::new(AtomicBool::new(false));
    let deaf_down = deaf.clone();
    let up = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match cr.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let chunk = &buf[..n];
            // sqlx commits with a simple query: 'Q', length, "COMMIT\0".
            let commit = chunk.windows(7).any(|w| w == b"COMMIT\0");
            if commit {
                let cut = armed.swap(Cut::None as u8, Ordering::SeqCst);
                if cut == Cut::BeforeCommit as u8 {
                    return;
                }
                if cut == Cut::AnswerOfCommit as u8 {
                    deaf.store(true, Ordering::SeqCst);
                    let _ = sw.write_all(chunk).await;
                    // Let the server commit before the connection goes.
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    return;
                }
            }
            if sw.write_all(chunk).await.is_err() {
                return;
            }
        }
    };
    let down = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match sr.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if deaf_down.load(Ordering::SeqCst) {
                continue;
            }
            if cw.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    // Either side ending drops all four halves: both connections close.
    tokio::select! {
        _ = up => {}
        _ = down => {}
    }
}

/// A test's database behind a [`Proxy`], a sink connected through it, the shipped engine and
/// `3 * BATCH` canonical rows.
struct Setup {
    env: TestEnv,
    proxy: Proxy,
    engine: Engine,
    data: RecordBatch,
    pg: PgSink,
}

async fn setup(name: &str, trail: bool) -> Setup {
    let env = TestEnv::new(name, |t| {
        t["postgres"]
            .as_table_mut()
            .unwrap()
            .insert("trail_aggregates".into(), trail.into());
    })
    .await;
    let config = payguard::config::load(&env.config).unwrap();
    let url = &config.postgres.url;
    let host_port = url.split('@').nth(1).unwrap().split('/').next().unwrap();
    let proxy = Proxy::start(host_port.to_string()).await;
    // Plaintext through the proxy: it must read the protocol to find the COMMIT (with TLS
    // built in, sqlx's default `sslmode=prefer` would encrypt on a server with `ssl = on`).
    assert!(!url.contains('?'), "{url}");
    let proxied = format!(
        "{}?sslmode=disable",
        url.replace(host_port, &proxy.addr.to_string())
    );
    let engine = Engine::new(&config).await.unwrap();
    let data = payguard::bench::canonical_rows(&config, 3 * BATCH, 0.0)
        .await
        .unwrap();
    let pg = env.pg_sink_via(Some(proxied)).await;
    let pg = prepare_sink(pg, &engine, trail, Arc::default()).await;
    Setup {
        env,
        proxy,
        engine,
        data,
        pg,
    }
}

/// Commit three batches through the proxy, the second with its COMMIT cut as `cut`, retried
/// as the pipeline retries; everything must be stored once. Without `offsets` the batches
/// advance no offset (as from a source without any): the sink then looks for the rows.
async fn lose_the_second_commit(name: &str, trail: bool, cut: Cut, offsets: bool) {
    let Setup {
        env,
        proxy,
        mut engine,
        data,
        pg,
    } = setup(name, trail).await;
    let sink = Sink::Postgres(pg);
    for i in 0..3 {
        let rows = engine.decide(&data.slice(i * BATCH, BATCH)).await.unwrap();
        let topic = offsets.then_some(env.topic.as_str());
        let mut b = sink_batch(&engine, i, i * BATCH, rows, topic).await;
        if i == 1 {
            // The writer's merges of batch 0 done first: the next COMMIT is the rows' one.
            sink.flush().await.unwrap();
            proxy.arm(cut);
            let e = sink
                .commit_dedup(&mut b)
                .await
                .expect_err("the connection is cut at COMMIT");
            assert!(e.is_retryable(), "a lost connection is retried: {e}");
            let stored = env.transactions().await;
            let expected = if cut == Cut::AnswerOfCommit { 2 } else { 1 };
            assert_eq!(
                stored,
                (expected * BATCH) as i64,
                "the cut happened where intended ({cut:?})"
            );
        }
        let stats = sink
            .commit_dedup(&mut b)
            .await
            .unwrap_or_else(|e| panic!("batch {i} (after {cut:?}): {e}"));
        assert_eq!(
            (stats.inserted, stats.duplicates),
            (BATCH as u64, 0),
            "batch {i}"
        );
        assert_eq!(stats.trailing.is_some(), trail, "batch {i}");
    }
    sink.flush().await.unwrap();
    assert_eq!(env.transactions().await, (3 * BATCH) as i64);
    if offsets {
        assert_eq!(env.stored_offsets().await, vec![(0, (3 * BATCH) as i64)]);
    }
    assert_aggregates_match_transactions(&mut env.db().await).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lost_answer_to_commit_is_not_committed_twice_with_trailing_aggregates() {
    lose_the_second_commit("lostack_trail", true, Cut::AnswerOfCommit, true).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lost_answer_to_commit_of_a_batch_without_offsets_is_not_committed_twice() {
    lose_the_second_commit("lostack_nooff", true, Cut::AnswerOfCommit, false).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lost_answer_to_commit_is_not_committed_twice_in_one_transaction() {
    lose_the_second_commit("lostack_one", false, Cut::AnswerOfCommit, true).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_commit_lost_on_its_way_is_committed_again() {
    lose_the_second_commit("lostack_before", true, Cut::BeforeCommit, true).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_trailing_merge_whose_commit_is_cut_is_applied_once() {
    let Setup {
        env,
        proxy,
        mut engine,
        data,
        pg,
    } = setup("lostack_merge", true).await;
    let pending = || env.scalar("SELECT count(*) FROM sink_pending_aggregates");
    for (i, cut) in [Cut::AnswerOfCommit, Cut::BeforeCommit]
        .into_iter()
        .enumerate()
    {
        let rows = engine.decide(&data.slice(i * BATCH, BATCH)).await.unwrap();
        let b = sink_batch(&engine, i, i * BATCH, rows, Some(&env.topic)).await;
        let CommitOutcome::Committed(stats) = pg.commit_rows(&b, true).await.unwrap() else {
            panic!("no duplicates here");
        };
        let job = trailing::Job {
            seq: stats.trailing.expect("the merges trail"),
            stages: b.aggregate_stages.clone(),
            aggregates: b.aggregates.clone(),
        };
        proxy.arm(cut);
        let e = pg.merge_pending(&job).await.expect_err("cut at COMMIT");
        assert!(
            e.is_retryable(),
            "the writer retries a lost connection: {e}"
        );
        let landed = cut == Cut::AnswerOfCommit;
        assert_eq!(pending().await, i64::from(!landed), "{cut:?}");
        // The writer's retry: merges only when the first attempt did not land.
        assert_eq!(pg.merge_pending(&job).await.unwrap(), !landed, "{cut:?}");
        assert_eq!(pending().await, 0);
        assert_aggregates_match_transactions(&mut env.db().await).await;
    }
}
