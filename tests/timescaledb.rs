//! The TimescaleDB path, on the TimescaleDB cluster that `.ci/timescaledb.sh` starts beside the
//! plain one (`bash .ci/services.sh up` starts both; without a TimescaleDB build for the server
//! these tests say they are skipped): every migration from an empty database and from each earlier
//! one with compressed chunks, the storage policies as configured (and left alone when unchanged),
//! the continuous aggregate against a direct GROUP BY, and a producer retry landing in a compressed
//! chunk. The SIGKILL test and the Grafana SQL run on this cluster too (`sink_crash.rs`,
//! `grafana.rs`).

mod common;

use std::path::PathBuf;

use chrono::{SecondsFormat, Utc};
use common::{TestEnv, assert_aggregates_match_transactions, repo, timescaledb_admin_url};
use sqlx::{Connection, PgConnection, Row};

const PARTITIONS: i32 = 3;

/// A [`TestEnv`] on the TimescaleDB cluster, or `None` (said) when this machine has none.
async fn ts_env(name: &str, tweak: impl FnOnce(&mut toml::Table)) -> Option<TestEnv> {
    let admin = timescaledb_admin_url(name)?;
    Some(TestEnv::with_services(name, &admin, &common::brokers(), tweak).await)
}

/// The shipped migrations, in order.
fn migrations() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo().join("sql/migrations"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "sql"))
        .collect();
    files.sort();
    files
}

/// A migrations directory as an earlier release shipped it: the first `n` shipped migrations.
fn earlier_release_migrations(n: usize) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in &migrations()[..n] {
        std::fs::copy(f, dir.path().join(f.file_name().unwrap())).unwrap();
    }
    dir
}

/// Apply the first `n` shipped migrations to `db_url`, as an earlier release did.
async fn migrate_to(db_url: &str, n: usize) {
    let dir = earlier_release_migrations(n);
    let migrator = sqlx::migrate::Migrator::new(dir.path()).await.unwrap();
    let mut conn = PgConnection::connect(db_url).await.unwrap();
    migrator.run(&mut conn).await.unwrap();
}

/// `chunks` of `table`: (range start, range end, compressed), oldest first.
async fn chunks(conn: &mut PgConnection, table: &str) -> Vec<(String, String, bool)> {
    sqlx::query(
        "SELECT range_start::text, range_end::text, is_compressed FROM timescaledb_information.chunks \
         WHERE hypertable_name = $1 ORDER BY range_start",
    )
    .bind(table)
    .fetch_all(conn)
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2)))
    .collect()
}

/// Compress every chunk of the three hypertables; returns how many chunks of `transactions` are
/// compressed.
async fn compress_all(conn: &mut PgConnection) -> i64 {
    for t in ["transactions", "alerts", "dead_letters"] {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT count(compress_chunk(c, if_not_compressed => true)) FROM show_chunks('{t}') c"
        )))
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    }
    sqlx::query_scalar(
        "SELECT count(*) FROM timescaledb_information.chunks \
         WHERE hypertable_name = 'transactions' AND is_compressed",
    )
    .fetch_one(conn)
    .await
    .unwrap()
}

/// An RFC 3339 time `days` days ago.
fn days_ago(days: f64) -> String {
    (Utc::now() - chrono::Duration::seconds((days * 86_400.0) as i64))
        .to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// The three tables are hypertables with compression enabled, and the per-minute figures a
/// continuous aggregate.
async fn assert_timescaledb_schema(conn: &mut PgConnection) {
    let hypertables: Vec<(String, bool)> = sqlx::query_as(
        "SELECT hypertable_name::text, compression_enabled FROM timescaledb_information.hypertables \
         WHERE hypertable_schema = current_schema() ORDER BY 1",
    )
    .fetch_all(&mut *conn)
    .await
    .unwrap();
    assert_eq!(
        hypertables,
        vec![
            ("alerts".to_string(), true),
            ("dead_letters".to_string(), true),
            ("transactions".to_string(), true),
        ]
    );
    let cagg: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM timescaledb_information.continuous_aggregates \
         WHERE view_name = 'transactions_per_minute' AND NOT materialized_only",
    )
    .fetch_one(conn)
    .await
    .unwrap();
    assert_eq!(
        cagg, 1,
        "transactions_per_minute is a real-time continuous aggregate"
    );
}

const SEEDS: i64 = 300;

/// Rows an earlier release stored, with the columns every schema version has: `SEEDS`
/// transactions (and an alert for every tenth, a dead letter for every thirtieth) spread over the
/// 30 to 8 days before now, so over several weekly chunks, all older than `compress_after`.
async fn seed(conn: &mut PgConnection) {
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "INSERT INTO transactions (transaction_id, event_time, source, amount, currency, customer_id, \
             card_id, merchant_id, decision) \
         SELECT 'seed-' || g, now() - interval '30 days' + g * (interval '22 days' / {SEEDS}), 'card', \
             g + 0.25, 'BRL', 'cus_seed', 'card_seed', 'mer_seed', \
             CASE WHEN g % 10 = 0 THEN 'review' ELSE 'approve' END \
         FROM generate_series(1, {SEEDS}) g; \
         INSERT INTO alerts (transaction_id, event_time, source, amount, currency, decision, rule_hits, features) \
         SELECT transaction_id, event_time, source, amount, currency, decision, '[]', '{{}}' \
         FROM transactions WHERE decision <> 'approve'; \
         INSERT INTO dead_letters (received_at, source, topic, kafka_partition, kafka_offset, raw, reason) \
         SELECT now() - interval '30 days' + g * interval '2 days', 'card', 'seed', 0, g, '\\x00', 'seed' \
         FROM generate_series(1, 10) g"
    )))
    .execute(conn)
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn every_migration_applies_from_empty_and_from_each_earlier_one_with_compressed_chunks() {
    let all = migrations();
    assert!(all.len() >= 7, "{} migrations", all.len());
    for at in 0..all.len() {
        let Some(env) = ts_env(&format!("ts_mig{at}"), |_| {}).await else {
            return;
        };
        let mut c = env.db().await;
        // The database as an earlier release left it: migrations 1..=at applied, rows stored,
        // and (from version 4 on, which enables compression) every chunk compressed.
        let mut compressed_before = Vec::new();
        if at > 0 {
            migrate_to(&env.db_url, at).await;
            // Recorded as a release before migration 0001's last change recorded it.
            for (version, earlier) in payguard::sink::postgres::SUPERSEDED_MIGRATIONS {
                sqlx::query(
                    "UPDATE _sqlx_migrations SET checksum = decode($1, 'hex') WHERE version = $2",
                )
                .bind(earlier)
                .bind(version)
                .execute(&mut c)
                .await
                .unwrap();
            }
            seed(&mut c).await;
            if at >= 4 {
                assert!(
                    compress_all(&mut c).await >= 3,
                    "version {at}: chunks compressed"
                );
                compressed_before = chunks(&mut c, "transactions").await;
            }
        }

        // The current binary over it: 2,000 payments from 20 days ago, in the seeds' chunks.
        env.generate(
            2_000,
            &[
                "--seed",
                "5",
                "--start-time",
                &days_ago(20.0),
                "--simulated-tps",
                "0.05",
            ],
        );
        env.run_ok(&["run", "--stop-at-end"]);

        let applied: Vec<i64> = sqlx::query_scalar(
            "SELECT version FROM _sqlx_migrations WHERE success ORDER BY version",
        )
        .fetch_all(&mut c)
        .await
        .unwrap();
        assert_eq!(
            applied,
            (1..=all.len() as i64).collect::<Vec<_>>(),
            "from version {at}: every migration applied"
        );
        assert_timescaledb_schema(&mut c).await;
        assert_eq!(
            env.scalar("SELECT count(*) FROM transactions WHERE transaction_id NOT LIKE 'seed-%'")
                .await,
            2_000,
            "from version {at}: the new rows stored"
        );
        assert_eq!(
            env.stored_offsets().await,
            env.end_offsets(PARTITIONS),
            "offsets = end offsets"
        );
        if at > 0 {
            // What the earlier release stored is intact.
            let (n, cents): (i64, i64) = sqlx::query_as(
                "SELECT count(*), (sum(amount) * 100)::bigint FROM transactions \
                 WHERE transaction_id LIKE 'seed-%'",
            )
            .fetch_one(&mut c)
            .await
            .unwrap();
            assert_eq!(
                (n, cents),
                (SEEDS, (SEEDS * (SEEDS + 1) / 2) * 100 + SEEDS * 25),
                "from version {at}: seeded rows intact"
            );
            assert_eq!(
                env.scalar("SELECT count(*) FROM alerts").await
                    - env
                        .scalar(
                            "SELECT count(*) FROM transactions WHERE decision <> 'approve' \
                             AND transaction_id NOT LIKE 'seed-%'",
                        )
                        .await,
                SEEDS / 10,
                "from version {at}: seeded alerts intact"
            );
            assert_eq!(
                env.scalar("SELECT count(*) FROM dead_letters WHERE topic = 'seed'")
                    .await,
                10
            );
        }
        if !compressed_before.is_empty() {
            // New rows landed in chunks that were compressed.
            let mut landed = 0i64;
            for (start, end, was) in &compressed_before {
                assert!(was, "every chunk was compressed");
                let n: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM transactions WHERE transaction_id NOT LIKE 'seed-%' \
                     AND event_time >= $1::timestamptz AND event_time < $2::timestamptz",
                )
                .bind(start)
                .bind(end)
                .fetch_one(&mut c)
                .await
                .unwrap();
                landed += n;
            }
            assert!(
                landed > 0,
                "from version {at}: rows landed in compressed chunks"
            );
        }
        // The seeds were never in the aggregates; without them every aggregate equals its
        // recomputation from the stored transactions.
        sqlx::query("DELETE FROM transactions WHERE transaction_id LIKE 'seed-%'")
            .execute(&mut c)
            .await
            .unwrap();
        assert_aggregates_match_transactions(&mut c).await;
        eprintln!(
            "from version {at}: ok ({} compressed chunks before)",
            compressed_before.len()
        );
    }
}

/// The policy jobs of the database: (proc, relation, interval, job id), ordered.
async fn jobs(conn: &mut PgConnection) -> Vec<(String, String, String, i32)> {
    sqlx::query_as(
        "SELECT proc_name::text, hypertable_name::text, \
                coalesce(config ->> 'compress_after', config ->> 'drop_after', ''), job_id \
         FROM timescaledb_information.jobs \
         WHERE hypertable_schema = current_schema() ORDER BY 1, 2",
    )
    .fetch_all(conn)
    .await
    .unwrap()
}

/// Set `postgres.<key>` in the env's config file.
fn set_postgres(env: &TestEnv, key: &str, value: &str) {
    let text = std::fs::read_to_string(&env.config).unwrap();
    let mut t: toml::Table = toml::from_str(&text).unwrap();
    t["postgres"]
        .as_table_mut()
        .unwrap()
        .insert(key.into(), value.into());
    std::fs::write(&env.config, toml::to_string(&t).unwrap()).unwrap();
}

fn policy_jobs(
    compress_after: Option<&str>,
    retention: Option<&str>,
) -> Vec<(String, String, String)> {
    let mut want = Vec::new();
    if let Some(c) = compress_after {
        for t in ["alerts", "dead_letters", "transactions"] {
            want.push(("policy_compression".into(), t.into(), c.into()));
        }
    }
    want.push((
        "policy_refresh_continuous_aggregate".into(),
        "transactions_per_minute".into(),
        String::new(),
    ));
    if let Some(r) = retention {
        for t in [
            "alerts",
            "dead_letters",
            "transactions",
            "transactions_per_minute",
        ] {
            want.push(("policy_retention".into(), t.into(), r.into()));
        }
    }
    want
}

fn without_ids(jobs: &[(String, String, String, i32)]) -> Vec<(String, String, String)> {
    jobs.iter()
        .map(|(p, t, i, _)| (p.clone(), t.clone(), i.clone()))
        .collect()
}

async fn run_job(conn: &mut PgConnection, proc: &str, table: &str) {
    let id: i32 = sqlx::query_scalar(
        "SELECT job_id FROM timescaledb_information.jobs \
         WHERE proc_name = $1 AND hypertable_name = $2 AND hypertable_schema = current_schema()",
    )
    .bind(proc)
    .bind(table)
    .fetch_one(&mut *conn)
    .await
    .unwrap();
    // The scheduler runs a policy as soon as it is added: unscheduled and waited for, so that
    // this run is not concurrent with its own scheduled run.
    sqlx::query("SELECT alter_job($1, scheduled => false)")
        .bind(id)
        .execute(&mut *conn)
        .await
        .unwrap();
    for _ in 0..300 {
        let running: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM timescaledb_information.job_stats \
             WHERE job_id = $1 AND job_status = 'Running'",
        )
        .bind(id)
        .fetch_one(&mut *conn)
        .await
        .unwrap();
        if running == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CALL run_job({id})")))
        .execute(conn)
        .await
        .unwrap_or_else(|e| panic!("{proc} on {table}: {e}"));
}

#[tokio::test(flavor = "multi_thread")]
async fn storage_policies_are_the_configured_jobs_and_are_left_alone_when_unchanged() {
    let Some(env) = ts_env("ts_policies", |t| {
        let pg = t["postgres"].as_table_mut().unwrap();
        pg.insert("compress_after".into(), "7 days".into());
        pg.insert("retention".into(), "60 days".into());
    })
    .await
    else {
        return;
    };
    drop(env.pg_sink().await);
    let mut c = env.db().await;
    assert_timescaledb_schema(&mut c).await;
    let first = jobs(&mut c).await;
    assert_eq!(
        without_ids(&first),
        policy_jobs(Some("7 days"), Some("60 days"))
    );

    // A restart with the same configuration leaves the jobs as they are (same ids: no job is
    // removed and added again, so none is scheduled to run at once beside the others).
    drop(env.pg_sink().await);
    assert_eq!(jobs(&mut c).await, first, "unchanged at a restart");

    // A changed configuration changes exactly the policies it names.
    set_postgres(&env, "compress_after", "1 day");
    set_postgres(&env, "retention", "off");
    drop(env.pg_sink().await);
    let second = jobs(&mut c).await;
    assert_eq!(without_ids(&second), policy_jobs(Some("1 day"), None));
    let refresh = |j: &[(String, String, String, i32)]| {
        j.iter()
            .find(|j| j.0 == "policy_refresh_continuous_aggregate")
            .unwrap()
            .3
    };
    assert_eq!(refresh(&second), refresh(&first), "the refresh policy kept");

    // The jobs do what they say. Rows over the last 30 days; the compression job compresses every
    // chunk that ended more than a day ago.
    seed(&mut c).await;
    sqlx::query(
        "INSERT INTO transactions (transaction_id, event_time, source, amount, currency, decision) \
         SELECT 'recent-' || g, now() - g * interval '1 hour', 'card', 1.00, 'BRL', 'approve' \
         FROM generate_series(1, 100) g",
    )
    .execute(&mut c)
    .await
    .unwrap();
    run_job(&mut c, "policy_compression", "transactions").await;
    let uncompressed_old: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM timescaledb_information.chunks WHERE hypertable_name = 'transactions' \
         AND range_end < now() - interval '1 day' AND NOT is_compressed",
    )
    .fetch_one(&mut c)
    .await
    .unwrap();
    assert_eq!(uncompressed_old, 0, "old chunks compressed by the policy");
    assert!(
        chunks(&mut c, "transactions")
            .await
            .iter()
            .any(|(_, _, compressed)| *compressed)
    );
    let before: i64 = env.scalar("SELECT count(*) FROM transactions").await;
    assert_eq!(before, SEEDS + 100, "compression keeps every row");

    // Retention of 10 days: the job drops the chunks that ended more than 10 days ago, whole.
    set_postgres(&env, "retention", "10 days");
    drop(env.pg_sink().await);
    assert_eq!(
        without_ids(&jobs(&mut c).await),
        policy_jobs(Some("1 day"), Some("10 days"))
    );
    run_job(&mut c, "policy_retention", "transactions").await;
    let (older, kept_recent): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE event_time < now() - interval '17 days'), \
                count(*) FILTER (WHERE event_time >= now() - interval '10 days') FROM transactions",
    )
    .fetch_one(&mut c)
    .await
    .unwrap();
    assert_eq!(older, 0, "chunks past the retention dropped");
    let recent_before = 100 + SEEDS * 2 / 22; // seeds end 8 days ago: ~2 of their 22 days
    assert!(
        kept_recent >= recent_before - 1,
        "rows within the retention kept: {kept_recent}"
    );
    assert!(
        env.scalar("SELECT count(*) FROM transactions").await < before,
        "something was dropped"
    );
}

/// Rows that differ between `transactions_per_minute` and the same figures computed directly
/// from `transactions`, both ways.
async fn per_minute_differences(conn: &mut PgConnection) -> i64 {
    sqlx::query_scalar(
        "WITH v AS (SELECT bucket, source, decision, transactions, amount, alerts, max_score \
                    FROM transactions_per_minute), \
              d AS (SELECT time_bucket(INTERVAL '1 minute', event_time) AS bucket, source, decision, \
                           count(*) AS transactions, sum(amount) AS amount, \
                           count(*) FILTER (WHERE decision <> 'approve') AS alerts, \
                           max(score) AS max_score \
                    FROM transactions GROUP BY 1, 2, 3) \
         SELECT (SELECT count(*) FROM (SELECT * FROM v EXCEPT ALL SELECT * FROM d) a) \
              + (SELECT count(*) FROM (SELECT * FROM d EXCEPT ALL SELECT * FROM v) b)",
    )
    .fetch_one(conn)
    .await
    .unwrap()
}

async fn materialized_rows(conn: &mut PgConnection) -> i64 {
    let (schema, table): (String, String) = sqlx::query_as(
        "SELECT materialization_hypertable_schema::text, materialization_hypertable_name::text \
         FROM timescaledb_information.continuous_aggregates WHERE view_name = 'transactions_per_minute'",
    )
    .fetch_one(&mut *conn)
    .await
    .unwrap();
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FROM \"{schema}\".\"{table}\""
    )))
    .fetch_one(conn)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn transactions_per_minute_is_a_continuous_aggregate_equal_to_a_direct_group_by() {
    let Some(env) = ts_env("ts_per_minute", |_| {}).await else {
        return;
    };
    // The refresh policy paused, so that the test says when the view is materialized: a refresh
    // that runs while rows are still being committed into the minutes it materializes leaves
    // those minutes behind until the next refresh (as a backfill does, below).
    drop(env.pg_sink().await);
    let mut c = env.db().await;
    let refresh_job: i32 = sqlx::query_scalar(
        "SELECT job_id FROM timescaledb_information.jobs \
         WHERE proc_name = 'policy_refresh_continuous_aggregate' AND hypertable_name = 'transactions_per_minute'",
    )
    .fetch_one(&mut c)
    .await
    .unwrap();
    sqlx::query("SELECT alter_job($1, scheduled => false)")
        .bind(refresh_job)
        .execute(&mut c)
        .await
        .unwrap();
    // 3,000 payments over the hours after a day ago (all in the past, whatever the time of day).
    env.generate(
        3_000,
        &[
            "--seed",
            "3",
            "--start-time",
            &days_ago(1.0),
            "--simulated-tps",
            "2",
        ],
    );
    env.run_ok(&["run", "--stop-at-end"]);
    assert_timescaledb_schema(&mut c).await;
    assert_eq!(env.transactions().await, 3_000);
    assert!(
        env.scalar("SELECT count(*) FROM transactions WHERE decision <> 'approve'")
            .await
            > 0,
        "the stream has alerts"
    );

    // Real time: nothing is materialized yet, all is computed from the hypertable.
    assert_eq!(materialized_rows(&mut c).await, 0);
    assert_eq!(per_minute_differences(&mut c).await, 0, "real-time figures");
    // Materialized.
    sqlx::raw_sql("CALL refresh_continuous_aggregate('transactions_per_minute', NULL, NULL)")
        .execute(&mut c)
        .await
        .unwrap();
    assert!(materialized_rows(&mut c).await > 0, "buckets materialized");
    assert_eq!(
        per_minute_differences(&mut c).await,
        0,
        "materialized figures"
    );

    // A backfill into materialized minutes (payments of the day before, another seed: other
    // ids): the view lags it until the refresh policy runs (every minute when scheduled), which
    // covers the whole history (start_offset NULL).
    env.generate(
        500,
        &[
            "--seed",
            "4",
            "--start-time",
            &days_ago(1.2),
            "--simulated-tps",
            "2",
        ],
    );
    env.run_ok(&["run", "--stop-at-end"]);
    assert_eq!(env.transactions().await, 3_500);
    assert!(
        per_minute_differences(&mut c).await > 0,
        "the backfill is not in the materialized minutes before a refresh"
    );
    run_job(
        &mut c,
        "policy_refresh_continuous_aggregate",
        "transactions_per_minute",
    )
    .await;
    assert_eq!(
        per_minute_differences(&mut c).await,
        0,
        "after a backfill and the refresh policy's run"
    );

    // Compressed chunks change nothing.
    assert!(compress_all(&mut c).await >= 1);
    sqlx::raw_sql("CALL refresh_continuous_aggregate('transactions_per_minute', NULL, NULL)")
        .execute(&mut c)
        .await
        .unwrap();
    assert_eq!(
        per_minute_differences(&mut c).await,
        0,
        "over compressed chunks"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_producer_retry_into_a_compressed_chunk_is_stored_once() {
    let Some(env) = ts_env("ts_dupes", |_| {}).await else {
        return;
    };
    let ts = days_ago(20.0);
    let msg = |id: &str| {
        format!(
            r#"{{"auth_id":"{id}","ts":"{ts}","pan_token":"tok_d","merchant_id":"mer_1","amount":"99.99","currency":"BRL"}}"#
        )
    };
    let first = msg("dup-1");
    env.kcat_produce(0, &[first.as_bytes()]);
    env.run_ok(&["run", "--stop-at-end"]);
    let mut c = env.db().await;
    assert_eq!(compress_all(&mut c).await, 1, "its chunk compressed");

    // The retry on another partition, and a new payment in the same (compressed) chunk.
    let other = msg("dup-2");
    env.kcat_produce(2, &[first.as_bytes()]);
    env.kcat_produce(1, &[other.as_bytes(), first.as_bytes()]);
    env.run_ok(&["run", "--stop-at-end"]);
    assert_eq!(env.transactions().await, 2);
    assert_eq!(
        env.scalar("SELECT count(*) FROM transactions WHERE transaction_id = 'dup-1'")
            .await,
        1,
        "the retry stored once"
    );
    let chunks = chunks(&mut c, "transactions").await;
    assert_eq!(chunks.len(), 1, "both rows in one chunk");
    assert!(chunks[0].2, "that chunk is still compressed");
    assert_eq!(
        env.stored_offsets().await,
        env.end_offsets(PARTITIONS),
        "offsets = end offsets"
    );
    assert_aggregates_match_transactions(&mut c).await;

    // And a retry of both after the chunk was compressed again (rows only in compressed form).
    assert_eq!(compress_all(&mut c).await, 1);
    env.kcat_produce(0, &[first.as_bytes(), other.as_bytes()]);
    env.run_ok(&["run", "--stop-at-end"]);
    assert_eq!(env.transactions().await, 2);
    assert_aggregates_match_transactions(&mut c).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_migrations_directory_of_an_earlier_release_is_refused_naming_what_is_missing() {
    let Some(env) = ts_env("ts_old_dir", |_| {}).await else {
        return;
    };
    let dir = earlier_release_migrations(5);
    set_postgres(&env, "migrations", &dir.path().display().to_string());
    let out = env.cmd(&["run", "--stop-at-end"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "refused: {stderr}");
    let want = format!(
        "migrations 6, 7 are not applied; this binary needs versions 1-{}",
        payguard::sink::postgres::SCHEMA_VERSION
    );
    assert!(stderr.contains(&want), "{stderr}");
    assert!(stderr.contains("postgres.migrations"), "{stderr}");
}
