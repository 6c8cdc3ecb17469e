//! Shared harness of the integration tests: a fresh database and fresh topics per test, a config
//! file pointing at them, and helpers to run the real `payguard` binary against the real Kafka
//! broker and PostgreSQL server that `.ci/run` starts.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use sqlx::{Connection, PgConnection, Row};

/// Admin connection URL (a database the tests may create others from).
pub fn admin_url() -> String {
    std::env::var("PAYGUARD_TEST_ADMIN_URL")
        .unwrap_or_else(|_| "postgres://payguard:payguard@127.0.0.1:5432/payguard".into())
}

/// Kafka bootstrap address.
pub fn brokers() -> String {
    std::env::var("PAYGUARD_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

/// Path of the binary under test.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_payguard"))
}

/// Repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// One test's isolated world.
pub struct TestEnv {
    /// Temporary directory holding the config.
    pub dir: tempfile::TempDir,
    /// Config file.
    pub config: PathBuf,
    /// Database URL of this test's database.
    pub db_url: String,
    /// The card source's topic.
    pub topic: String,
    /// Pipeline name.
    pub pipeline: String,
}

impl TestEnv {
    /// Create a database and a config whose only source is the shipped card source, on a topic of
    /// its own. `tweak` may change the config table before it is written.
    pub async fn new(name: &str, tweak: impl FnOnce(&mut toml::Table)) -> Self {
        let unique = format!(
            "{}_{}_{}",
            name,
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis()
                % 1_000_000_000
        );
        let db = format!("pgtest_{unique}");
        let mut admin = PgConnection::connect(&admin_url())
            .await
            .expect("PostgreSQL must be running (bash .ci/services.sh up)");
        sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {db}")))
            .execute(&mut admin)
            .await
            .unwrap();
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {db}")))
            .execute(&mut admin)
            .await
            .unwrap();
        let base = admin_url();
        let db_url = format!("{}/{db}", &base[..base.rfind('/').unwrap()]);
        let topic = format!("test.{unique}");

        let repo = repo();
        let text = std::fs::read_to_string(repo.join("config.toml")).unwrap();
        let mut t: toml::Table = toml::from_str(&text).unwrap();
        let mut sources = t["sources"].as_array().unwrap().clone();
        sources.truncate(1);
        let card = sources[0].as_table_mut().unwrap();
        assert_eq!(card["name"].as_str(), Some("card"));
        card.insert("topic".into(), topic.clone().into());
        let mapping = repo.join(card["mapping"].as_str().unwrap());
        card.insert("mapping".into(), mapping.display().to_string().into());
        t.insert("sources".into(), toml::Value::Array(sources));
        let pipeline = format!("p_{unique}");
        t["pipeline"]
            .as_table_mut()
            .unwrap()
            .insert("name".into(), pipeline.clone().into());
        let pg = t["postgres"].as_table_mut().unwrap();
        pg.insert("url".into(), db_url.clone().into());
        pg.insert(
            "migrations".into(),
            repo.join("sql/migrations").display().to_string().into(),
        );
        let engine = t["engine"].as_table_mut().unwrap();
        for key in ["features", "rules", "aggregates"] {
            let abs = repo.join(engine[key].as_str().unwrap());
            engine.insert(key.into(), abs.display().to_string().into());
        }
        if let Some(model) = t.get_mut("model").and_then(|m| m.as_table_mut()) {
            let abs = repo.join(model["path"].as_str().unwrap());
            model.insert("path".into(), abs.display().to_string().into());
        }
        t["api"]
            .as_table_mut()
            .unwrap()
            .insert("listen".into(), "127.0.0.1:0".into());
        t["kafka"]
            .as_table_mut()
            .unwrap()
            .insert("brokers".into(), toml::Value::Array(vec![brokers().into()]));
        // Label feedback off unless a test turns it on, on a topic of the test's own.
        let labels = t
            .entry("labels")
            .or_insert_with(|| toml::Value::Table(Default::default()))
            .as_table_mut()
            .unwrap();
        labels.insert("enabled".into(), false.into());
        labels.insert("topic".into(), format!("{topic}.labels").into());
        tweak(&mut t);
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config.toml");
        std::fs::write(&config, toml::to_string(&t).unwrap()).unwrap();
        Self {
            dir,
            config,
            db_url,
            topic,
            pipeline,
        }
    }

    /// A `payguard` command with this config (and no environment overrides).
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(bin());
        c.args(args)
            .arg("--config")
            .arg(&self.config)
            .env_remove("PAYGUARD_POSTGRES_URL")
            .env_remove("PAYGUARD_KAFKA_BROKERS")
            .env("RUST_LOG", "info,rskafka=warn");
        c
    }

    /// Run a command to its end, failing the test on a non-zero exit.
    pub fn run_ok(&self, args: &[&str]) -> Output {
        let out = self.cmd(args).output().unwrap();
        assert!(
            out.status.success(),
            "payguard {args:?} failed: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// Start a command in the background; its stderr goes to a log file in the test directory
    /// (read back by [`wait_with_timeout`]).
    pub fn spawn(&self, args: &[&str]) -> Child {
        let n = std::fs::read_dir(self.dir.path()).unwrap().count();
        let log = self.dir.path().join(format!("process-{n}.log"));
        let file = std::fs::File::create(&log).unwrap();
        let child = self
            .cmd(args)
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .unwrap();
        std::fs::write(
            self.dir.path().join(format!("pid-{}", child.id())),
            log.display().to_string(),
        )
        .unwrap();
        child
    }

    /// Wait for a spawned child with a timeout; returns its status and log.
    pub fn wait(&self, mut child: Child, timeout: Duration) -> (std::process::ExitStatus, String) {
        let start = Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if start.elapsed() > timeout {
                let _ = child.kill();
                panic!("process did not exit within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let log_path = std::fs::read_to_string(self.dir.path().join(format!("pid-{}", child.id())))
            .unwrap_or_default();
        (
            status,
            std::fs::read_to_string(log_path).unwrap_or_default(),
        )
    }

    /// Produce `n` simulated transactions with the real generator.
    pub fn generate(&self, n: u64, extra: &[&str]) {
        let count = n.to_string();
        let mut args = vec!["generate", "--count", &count, "-q"];
        args.extend_from_slice(extra);
        self.run_ok(&args);
    }

    /// A connection to this test's database.
    pub async fn db(&self) -> PgConnection {
        PgConnection::connect(&self.db_url).await.unwrap()
    }

    /// Count rows of a query returning one bigint.
    pub async fn scalar(&self, sql: &'static str) -> i64 {
        let mut c = self.db().await;
        sqlx::query(sql)
            .fetch_one(&mut c)
            .await
            .unwrap()
            .get::<i64, _>(0)
    }

    /// Rows in `transactions` (0 before the schema exists).
    pub async fn transactions(&self) -> i64 {
        let mut c = self.db().await;
        match sqlx::query("SELECT count(*) FROM transactions")
            .fetch_one(&mut c)
            .await
        {
            Ok(r) => r.get(0),
            Err(_) => 0,
        }
    }

    /// Stored offsets by partition.
    pub async fn stored_offsets(&self) -> Vec<(i32, i64)> {
        let mut c = self.db().await;
        let rows = sqlx::query(
            "SELECT kafka_partition, next_offset FROM consumer_offsets \
             WHERE pipeline = $1 AND topic = $2 ORDER BY kafka_partition",
        )
        .bind(&self.pipeline)
        .bind(&self.topic)
        .fetch_all(&mut c)
        .await
        .unwrap();
        rows.iter().map(|r| (r.get(0), r.get(1))).collect()
    }

    /// End offsets of the topic, asked of the broker with kcat (an independent client).
    pub fn end_offsets(&self, partitions: i32) -> Vec<(i32, i64)> {
        let mut args = vec!["-b".to_string(), brokers(), "-Q".to_string()];
        for p in 0..partitions {
            args.push("-t".into());
            args.push(format!("{}:{p}:-1", self.topic));
        }
        let out = Command::new("kcat")
            .args(&args)
            .output()
            .expect("kcat installed");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).unwrap();
        let mut v: Vec<(i32, i64)> = text
            .lines()
            .filter_map(|l| {
                // "<topic> [<p>] offset <n>"
                let p = l.split('[').nth(1)?.split(']').next()?.parse().ok()?;
                let o = l.rsplit(' ').next()?.parse().ok()?;
                Some((p, o))
            })
            .collect();
        v.sort();
        v
    }

    /// Produce raw messages to one partition with kcat.
    pub fn kcat_produce(&self, partition: i32, messages: &[&[u8]]) {
        kcat_produce_to(&self.topic, partition, messages);
    }
}

/// Produce raw messages to one partition of `topic` with kcat.
pub fn kcat_produce_to(topic: &str, partition: i32, messages: &[&[u8]]) {
    {
        use std::io::Write;
        let mut child = Command::new("kcat")
            .args([
                "-P",
                "-b",
                &brokers(),
                "-t",
                topic,
                "-p",
                &partition.to_string(),
                "-D",
                "\u{1e}",
            ])
            .stdin(Stdio::piped())
            .spawn()
            .expect("kcat installed");
        let stdin = child.stdin.as_mut().unwrap();
        for m in messages {
            stdin.write_all(m).unwrap();
            stdin.write_all(b"\x1e").unwrap();
        }
        drop(child.stdin.take());
        assert!(child.wait().unwrap().success());
    }
}

impl TestEnv {
    /// Wait until `cond` holds, polling; panics after `timeout`.
    pub async fn wait_for<F, Fut>(&self, what: &str, timeout: Duration, mut cond: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let start = Instant::now();
        while !cond().await {
            assert!(start.elapsed() < timeout, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        // Keep databases of failed tests for inspection; drop the rest.
        if std::thread::panicking() {
            eprintln!("keeping database {} of the failed test", self.db_url);
            return;
        }
        let db = self.db_url.rsplit('/').next().unwrap().to_string();
        let _ = Command::new("psql")
            .arg(admin_url())
            .args([
                "-q",
                "-c",
                &format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"),
            ])
            .output();
    }
}

/// Send a signal to a child process.
pub fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .args([&format!("-{sig}"), &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{sig} failed");
}

/// Path helper for messages in assertions.
pub fn show(p: &Path) -> String {
    p.display().to_string()
}
