//! Shared harness of the integration tests: a fresh database and fresh topics per test, a config
//! file pointing at them, and helpers to run the real `payguard` binary against the real Kafka
//! broker and PostgreSQL server that `.ci/run` starts.
#![allow(dead_code)]

pub mod certs;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use sqlx::{Connection, PgConnection, Row};

/// Admin connection URL (a database the tests may create others from).
pub fn admin_url() -> String {
    std::env::var("PAYGUARD_TEST_ADMIN_URL")
        .unwrap_or_else(|_| "postgres://payguard:payguard@127.0.0.1:5432/payguard".into())
}

/// Admin URL of the TimescaleDB cluster that `.ci/timescaledb.sh` starts beside the plain one
/// (`PAYGUARD_TIMESCALEDB_ADMIN_URL` overrides it), or `None` when `.ci/services.sh up` found no
/// TimescaleDB build for this server: then `test` says on stderr that it is skipped and why. A
/// cluster that is down without that verdict fails the test (a skip is never silent).
pub fn timescaledb_admin_url(test: &str) -> Option<String> {
    if let Ok(url) = std::env::var("PAYGUARD_TIMESCALEDB_ADMIN_URL") {
        return Some(url);
    }
    let cache = std::env::var("PAYGUARD_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/payguard"));
    if let Ok(why) = std::fs::read_to_string(cache.join("timescaledb.skip")) {
        eprintln!("{test}: SKIPPED (TimescaleDB): {}", why.trim());
        return None;
    }
    Some("postgres://payguard:payguard@127.0.0.1:5433/payguard".into())
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
    /// Admin URL of the server holding this test's database.
    pub admin: String,
    /// Kafka bootstrap address of this test's topics.
    pub brokers: String,
}

impl TestEnv {
    /// Create a database and a config whose only source is the shipped card source, on a topic of
    /// its own. `tweak` may change the config table before it is written.
    pub async fn new(name: &str, tweak: impl FnOnce(&mut toml::Table)) -> Self {
        Self::with_services(name, &admin_url(), &brokers(), tweak).await
    }

    /// As [`TestEnv::new`], on the given PostgreSQL server (admin URL) and Kafka broker (a
    /// [`PrivatePostgres`] and [`PrivateKafka`] that the test may restart).
    pub async fn with_services(
        name: &str,
        admin: &str,
        brokers: &str,
        tweak: impl FnOnce(&mut toml::Table),
    ) -> Self {
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
        let mut admin_conn = PgConnection::connect(admin).await.unwrap_or_else(|e| {
            panic!("PostgreSQL must be running at {admin} (start it with `bash .ci/services.sh up`): {e}")
        });
        sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {db}")))
            .execute(&mut admin_conn)
            .await
            .unwrap();
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {db}")))
            .execute(&mut admin_conn)
            .await
            .unwrap();
        let base = admin.to_string();
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
            .insert("brokers".into(), toml::Value::Array(vec![brokers.into()]));
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
            admin: admin.to_string(),
            brokers: brokers.to_string(),
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

    /// `payguard run` at log level `rust_log` until its log shows `want` (within 60 s), then
    /// SIGTERM; returns the whole log (also kept in the test directory as `<name>.log`).
    pub async fn run_until_logged(&self, name: &str, rust_log: &str, want: &str) -> String {
        let log = self.dir.path().join(format!("{name}.log"));
        let mut child = self
            .cmd(&["run"])
            .env("RUST_LOG", rust_log)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        self.wait_for(want, Duration::from_secs(60), || async {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains(want)
        })
        .await;
        signal(&child, "TERM");
        let _ = child.wait();
        std::fs::read_to_string(&log).unwrap()
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
    /// A PostgreSQL sink on this test's database, migrations applied, as `run` connects it.
    pub async fn pg_sink(&self) -> payguard::sink::postgres::PgSink {
        self.pg_sink_via(None).await
    }

    /// [`TestEnv::pg_sink`] connecting to `url` instead of the config's (a proxy of the same
    /// database).
    pub async fn pg_sink_via(&self, url: Option<String>) -> payguard::sink::postgres::PgSink {
        let mut config = payguard::config::load(&self.config).unwrap();
        if let Some(url) = url {
            config.postgres.url = url;
        }
        payguard::sink::postgres::PgSink::connect(
            &config.postgres,
            &config.resolve(&config.postgres.migrations),
            &self.pipeline,
            payguard::engine::canonical::Canonical::of(&config),
        )
        .await
        .unwrap()
    }

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
        // None before the schema exists (a process killed before its migrations ran).
        .unwrap_or_default();
        rows.iter().map(|r| (r.get(0), r.get(1))).collect()
    }

    /// End offsets of the topic, asked of the broker with kcat (an independent client).
    pub fn end_offsets(&self, partitions: i32) -> Vec<(i32, i64)> {
        let mut args = vec!["-b".to_string(), self.brokers.clone(), "-Q".to_string()];
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
        kcat_produce_on(&self.brokers, &self.topic, partition, messages);
    }
}

/// Produce raw messages to one partition of `topic` of the shared broker with kcat.
pub fn kcat_produce_to(topic: &str, partition: i32, messages: &[&[u8]]) {
    kcat_produce_on(&brokers(), topic, partition, messages);
}

/// Produce raw messages to one partition of `topic` on `brokers` with kcat.
pub fn kcat_produce_on(brokers: &str, topic: &str, partition: i32, messages: &[&[u8]]) {
    {
        use std::io::Write;
        let mut child = Command::new("kcat")
            .args([
                "-P",
                "-b",
                brokers,
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
            if start.elapsed() >= timeout {
                panic!(
                    "timed out waiting for {what}\n{}",
                    self.process_logs_tail(60)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The last `lines` lines of every spawned process's log (for a failing test's message).
    pub fn process_logs_tail(&self, lines: usize) -> String {
        let mut logs: Vec<_> = std::fs::read_dir(self.dir.path())
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        logs.retain(|p: &std::path::PathBuf| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("process-"))
        });
        logs.sort();
        let mut out = String::new();
        for p in logs {
            let text = std::fs::read_to_string(&p).unwrap_or_default();
            let all: Vec<&str> = text.lines().collect();
            let from = all.len().saturating_sub(lines);
            out += &format!("--- {} (last {} lines)\n", p.display(), all.len() - from);
            for l in &all[from..] {
                out += l;
                out.push('\n');
            }
        }
        out
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
            .arg(&self.admin)
            .args([
                "-q",
                "-c",
                &format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"),
            ])
            .output();
    }
}

/// A rules file: the shipped `sql/rules.sql` plus one rule on a label feature (a card with a
/// confirmed fraud report is declined). Kept alive by the returned handle.
pub fn rules_with_card_fraud_label_rule() -> tempfile::NamedTempFile {
    let rules = tempfile::NamedTempFile::new().unwrap();
    let shipped = std::fs::read_to_string(repo().join("sql/rules.sql")).unwrap();
    std::fs::write(
        rules.path(),
        format!(
            "{}\nUNION ALL\nSELECT transaction_id, 'card_reported_fraud', 'decline', \
             'card has a confirmed fraud report' FROM scored WHERE card_fraud_labels_90d > 0\n",
            shipped.trim_end()
        ),
    )
    .unwrap();
    rules
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

/// A free TCP port on 127.0.0.1 (bound once, then released for the caller to take).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// A PostgreSQL 15 server of this test alone (initdb into a temporary directory, a free port), so
/// that the test can stop and restart it without disturbing the shared server other tests use.
/// Runs as the current user, or as `postgres` when the tests run as root (PostgreSQL refuses root).
pub struct PrivatePostgres {
    dir: tempfile::TempDir,
    /// TCP port on 127.0.0.1.
    pub port: u16,
    as_postgres: bool,
}

impl PrivatePostgres {
    const BIN: &'static str = "/usr/lib/postgresql/15/bin";

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn pg(&self, tool: &str) -> Command {
        let exe = format!("{}/{tool}", Self::BIN);
        let mut c = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--", &exe]);
            c
        } else {
            Command::new(exe)
        };
        c.current_dir("/");
        c
    }

    /// initdb (superuser `payguard`, trust authentication), start, create database `payguard`.
    pub fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let as_postgres = running_as_root();
        if as_postgres {
            let ok = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .status()
                .unwrap()
                .success();
            assert!(ok, "chown of the private PostgreSQL directory");
        }
        let pg = Self {
            dir,
            port: free_port(),
            as_postgres,
        };
        let out = pg
            .pg("initdb")
            .arg("-D")
            .arg(pg.data())
            .args(["-U", "payguard", "--auth=trust", "-E", "UTF8", "--no-sync"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        pg.start_again();
        let out = Command::new("psql")
            .arg(pg.url("postgres"))
            .args(["-q", "-c", "CREATE DATABASE payguard"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "create database: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        pg
    }

    /// URL of a database on this server.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://payguard:payguard@127.0.0.1:{}/{db}", self.port)
    }

    /// Admin URL (database `payguard`), for [`TestEnv::with_services`].
    pub fn admin_url(&self) -> String {
        self.url("payguard")
    }

    /// Start the server (again) and wait until it accepts connections.
    pub fn start_again(&self) {
        let opts = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k {} -c max_connections=50 -c shared_buffers=64MB",
            self.port,
            self.dir.path().display()
        );
        let out = self
            .pg("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .args(["-o", &opts, "-l"])
            .arg(self.dir.path().join("server.log"))
            .args(["-w", "-t", "60", "start"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "pg_ctl start: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
        );
    }

    /// Turn TLS on (`ssl = on` with this server certificate, key and CA for client
    /// certificates), replace `pg_hba.conf` by `hba` (local connections stay trusted), restart.
    pub fn enable_tls(&self, cert: &Path, key: &Path, ca: &Path, hba: &str) {
        let data = self.data();
        for (from, to) in [(cert, "server.crt"), (key, "server.key"), (ca, "root.crt")] {
            std::fs::copy(from, data.join(to)).unwrap();
        }
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            data.join("server.key"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        let mut conf = std::fs::read_to_string(data.join("postgresql.conf")).unwrap();
        conf.push_str(
            "\nssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\nssl_ca_file = 'root.crt'\n",
        );
        std::fs::write(data.join("postgresql.conf"), conf).unwrap();
        std::fs::write(
            data.join("pg_hba.conf"),
            format!("local all all trust\n{hba}\n"),
        )
        .unwrap();
        if self.as_postgres {
            let ok = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&data)
                .status()
                .unwrap()
                .success();
            assert!(ok, "chown of the TLS files");
        }
        self.stop("fast");
        self.start_again();
    }

    /// Stop the server: `immediate` is a crash (no checkpoint, connections cut), `fast` a clean
    /// shutdown that still aborts open transactions.
    pub fn stop(&self, mode: &str) {
        let out = self
            .pg("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .args(["-m", mode, "-w", "-t", "60", "stop"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "pg_ctl stop: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = self
            .pg("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .args(["-m", "immediate", "-w", "stop"])
            .output();
    }
}

/// A single-node Kafka broker (KRaft, combined broker and controller, the jars `.ci/kafka.sh`
/// installs) of this test alone, in a temporary directory on free ports, so that the test can
/// kill and restart it without disturbing the shared broker.
/// The TLS and SASL side of a [`PrivateKafka::start_secured`] broker.
pub struct Secured {
    /// PEM file with the broker's private key (unencrypted PKCS#8) and certificate chain.
    pub keystore: PathBuf,
    /// SASL users: (name, password).
    pub users: Vec<(String, String)>,
}

pub struct PrivateKafka {
    dir: tempfile::TempDir,
    /// Client port on 127.0.0.1.
    pub port: u16,
    /// The `SASL_SSL` port of [`PrivateKafka::start_secured`] (`localhost:<port>`).
    pub secure_port: u16,
    child: Option<Child>,
}

impl PrivateKafka {
    fn libs() -> PathBuf {
        let cache = std::env::var("PAYGUARD_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|_| {
                PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/payguard")
            });
        let version = std::env::var("PAYGUARD_KAFKA_VERSION").unwrap_or_else(|_| "4.2.2".into());
        cache.join(format!("kafka-{version}")).join("libs")
    }

    fn java(&self, heap: &str) -> Command {
        let java = std::env::var("JAVA_HOME")
            .map(|h| format!("{h}/bin/java"))
            .unwrap_or_else(|_| "java".into());
        let mut c = Command::new(java);
        c.arg(heap)
            .arg(format!(
                "-Dlog4j2.configurationFile={}",
                self.dir.path().join("log4j2.properties").display()
            ))
            .arg("-cp")
            .arg(format!("{}/*", Self::libs().display()));
        c
    }

    /// Write the config, format the storage, start the broker and wait until it answers.
    pub fn start() -> Self {
        Self::start_with(None)
    }

    /// [`PrivateKafka::start`] with a `SASL_SSL` listener too: advertised as `localhost` (the
    /// name the certificate must carry), the broker's PEM key and chain in `secured.keystore`,
    /// SASL PLAIN, SCRAM-SHA-256 and SCRAM-SHA-512 for each of `secured.users` (name, password).
    pub fn start_secured(secured: &Secured) -> Self {
        Self::start_with(Some(secured))
    }

    fn start_with(secured: Option<&Secured>) -> Self {
        assert!(
            Self::libs().exists(),
            "Kafka jars missing in {} (bash .ci/services.sh up installs them)",
            show(&Self::libs())
        );
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let controller = free_port();
        let secure_port = free_port();
        let data = dir.path().join("data");
        let (listeners, advertised, map, security) = match secured {
            None => (String::new(), String::new(), String::new(), String::new()),
            Some(sec) => {
                let plain_users: String = sec
                    .users
                    .iter()
                    .map(|(u, p)| format!(" user_{u}=\"{p}\""))
                    .collect();
                (
                    format!(",SASL_SSL://127.0.0.1:{secure_port}"),
                    format!(",SASL_SSL://localhost:{secure_port}"),
                    ",SASL_SSL:SASL_SSL".to_string(),
                    format!(
                        "sasl.enabled.mechanisms=PLAIN,SCRAM-SHA-256,SCRAM-SHA-512\n\
                         listener.name.sasl_ssl.plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required{plain_users};\n\
                         listener.name.sasl_ssl.scram-sha-256.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;\n\
                         listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;\n\
                         ssl.keystore.type=PEM\n\
                         ssl.keystore.location={}\n",
                        sec.keystore.display()
                    ),
                )
            }
        };
        std::fs::write(
            dir.path().join("server.properties"),
            format!(
                "process.roles=broker,controller\n\
                 node.id=1\n\
                 controller.quorum.voters=1@127.0.0.1:{controller}\n\
                 listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller}{listeners}\n\
                 advertised.listeners=PLAINTEXT://127.0.0.1:{port}{advertised}\n\
                 controller.listener.names=CONTROLLER\n\
                 inter.broker.listener.name=PLAINTEXT\n\
                 listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT{map}\n\
                 {security}\
                 log.dirs={}\n\
                 num.partitions=3\n\
                 default.replication.factor=1\n\
                 min.insync.replicas=1\n\
                 offsets.topic.replication.factor=1\n\
                 offsets.topic.num.partitions=1\n\
                 transaction.state.log.replication.factor=1\n\
                 transaction.state.log.min.isr=1\n\
                 transaction.state.log.num.partitions=1\n\
                 share.coordinator.state.topic.replication.factor=1\n\
                 share.coordinator.state.topic.min.isr=1\n\
                 auto.create.topics.enable=true\n\
                 group.initial.rebalance.delay.ms=0\n\
                 message.max.bytes=10485760\n\
                 socket.request.max.bytes=104857600\n\
                 num.network.threads=1\n\
                 num.io.threads=2\n\
                 log.retention.hours=168\n",
                data.display()
            ),
        )
        .unwrap();
        std::fs::write(
            dir.path().join("log4j2.properties"),
            format!(
                "status = warn\n\
                 appender.file.type = File\n\
                 appender.file.name = FILE\n\
                 appender.file.fileName = {}\n\
                 appender.file.layout.type = PatternLayout\n\
                 appender.file.layout.pattern = [%d] %p %m (%c)%n\n\
                 rootLogger.level = WARN\n\
                 rootLogger.appenderRef.file.ref = FILE\n",
                dir.path().join("server.log").display()
            ),
        )
        .unwrap();
        let mut k = Self {
            dir,
            port,
            secure_port,
            child: None,
        };
        let out = k
            .java("-Xmx256m")
            .args(["kafka.tools.StorageTool", "random-uuid"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let cluster = String::from_utf8(out.stdout).unwrap();
        let cluster = cluster.lines().last().unwrap().trim().to_string();
        let mut format = k.java("-Xmx256m");
        format
            .args(["kafka.tools.StorageTool", "format", "-t", &cluster, "-c"])
            .arg(k.dir.path().join("server.properties"));
        for (u, p) in secured.map(|s| s.users.as_slice()).unwrap_or(&[]) {
            for mechanism in ["SCRAM-SHA-256", "SCRAM-SHA-512"] {
                format
                    .arg("--add-scram")
                    .arg(format!("{mechanism}=[name={u},password={p}]"));
            }
        }
        let out = format.output().unwrap();
        assert!(
            out.status.success(),
            "kafka storage format: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        k.start_again();
        k
    }

    /// Bootstrap address.
    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Start the broker (again, same data and ports) and wait until it lists itself.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "broker already running");
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("kafka.out"))
            .unwrap();
        let child = self
            .java("-Xmx512m")
            .args(["-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1", "kafka.Kafka"])
            .arg(self.dir.path().join("server.properties"))
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        let start = Instant::now();
        loop {
            let md = Command::new("kcat")
                .args(["-b", &self.bootstrap(), "-L", "-m", "2"])
                .output()
                .unwrap();
            if md.status.success() && String::from_utf8_lossy(&md.stdout).contains("broker 1 at") {
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "private broker exited: {status}\n{}",
                    std::fs::read_to_string(self.dir.path().join("kafka.out")).unwrap_or_default()
                );
            }
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "private broker did not answer within 120 s"
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    /// Stop the broker: `KILL` is a crash, `TERM` a clean shutdown (waited for).
    pub fn stop(&mut self, sig: &str) {
        let mut child = self.child.take().expect("broker running");
        signal(&child, sig);
        let start = Instant::now();
        while child.try_wait().unwrap().is_none() {
            if start.elapsed() > Duration::from_secs(60) {
                let _ = child.kill();
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for PrivateKafka {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The shipped aggregates, recomputed in SQL from the stored `transactions` (independently of the
/// engine), as `(table, recomputation)`. A new aggregate file needs its line here:
/// [`assert_aggregates_match_transactions`] fails on an `agg_*` table it does not know.
pub const AGGREGATE_RECOMPUTATIONS: &[(&str, &str)] = &[
    (
        "agg_minute_by_source",
        "SELECT date_bin('1 minute', event_time, timestamptz '1970-01-01 00:00:00+00') AS bucket, \
                source, decision, count(*)::bigint AS transactions, sum(amount) AS amount, \
                max(score) AS max_score \
         FROM transactions GROUP BY 1, 2, 3",
    ),
    (
        "agg_merchant_5m",
        "SELECT date_bin('5 minutes', event_time, timestamptz '1970-01-01 00:00:00+00') AS bucket, \
                merchant_id, count(*)::bigint AS transactions, sum(amount) AS amount, \
                sum(CASE WHEN decision <> 'approve' THEN 1 ELSE 0 END)::bigint AS alerts \
         FROM transactions GROUP BY 1, 2",
    ),
    (
        "agg_country_15m_hop_5m",
        "SELECT date_bin('5 minutes', event_time, timestamptz '1970-01-01 00:00:00+00') - h.back \
                  AS window_start, \
                country, count(*)::bigint AS transactions, sum(amount) AS amount, \
                sum(CASE WHEN decision = 'decline' THEN 1 ELSE 0 END)::bigint AS declines \
         FROM transactions \
         CROSS JOIN (VALUES (interval '0 minutes'), (interval '5 minutes'), (interval '10 minutes')) \
              AS h(back) \
         GROUP BY 1, 2",
    ),
];

/// Every `agg_*` table equals its recomputation from the stored transactions, row for row (both
/// ways: nothing missing, nothing extra, nothing counted twice).
pub async fn assert_aggregates_match_transactions(conn: &mut PgConnection) {
    assert_eq!(
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM sink_pending_aggregates")
            .fetch_one(&mut *conn)
            .await
            .unwrap(),
        0,
        "no aggregate merge is left pending"
    );
    for (table, stored, diff) in aggregate_differences(conn, false).await {
        assert!(stored > 0, "{table} is empty");
        assert_eq!(
            diff, 0,
            "{table} differs from its recomputation in {diff} rows"
        );
    }
}

/// The invariant of trailing merges at any moment (a crash included): every `agg_*` table
/// equals its recomputation from the stored transactions whose merges are not pending.
pub async fn assert_aggregates_match_merged_transactions(conn: &mut PgConnection) {
    for (table, _, diff) in aggregate_differences(conn, true).await {
        assert_eq!(
            diff, 0,
            "{table} differs in {diff} rows from its recomputation over the rows whose merges are not pending"
        );
    }
}

/// Per `agg_*` table: its row count and how many rows differ from its recomputation from the
/// stored transactions (with `merged_only`, those whose merges are not pending).
async fn aggregate_differences(
    conn: &mut PgConnection,
    merged_only: bool,
) -> Vec<(&'static str, i64, i64)> {
    let tables: Vec<String> = sqlx::query(
        "SELECT table_name::text FROM information_schema.tables \
         WHERE table_schema = current_schema() AND table_name LIKE 'agg\\_%' ORDER BY 1",
    )
    .fetch_all(&mut *conn)
    .await
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect();
    let mut known: Vec<String> = AGGREGATE_RECOMPUTATIONS
        .iter()
        .map(|(t, _)| t.to_string())
        .collect();
    known.sort();
    assert_eq!(tables, known, "every agg_* table has a recomputation");
    let mut out = Vec::new();
    for (table, recompute) in AGGREGATE_RECOMPUTATIONS {
        let recompute = if merged_only {
            recompute.replace(
                "FROM transactions",
                "FROM (SELECT * FROM transactions WHERE commit_seq IS NULL OR commit_seq NOT IN \
                 (SELECT commit_seq FROM sink_pending_aggregates)) AS transactions",
            )
        } else {
            recompute.to_string()
        };
        let cols: Vec<String> = sqlx::query(
            "SELECT column_name::text FROM information_schema.columns \
             WHERE table_schema = current_schema() AND table_name = $1 \
               AND column_name <> 'updated_at' ORDER BY ordinal_position",
        )
        .bind(table)
        .fetch_all(&mut *conn)
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
        let cols = cols
            .iter()
            .map(|c| format!("\"{c}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let stored: i64 = sqlx::query(sqlx::AssertSqlSafe(format!("SELECT count(*) FROM {table}")))
            .fetch_one(&mut *conn)
            .await
            .unwrap()
            .get(0);
        let diff: i64 = sqlx::query(sqlx::AssertSqlSafe(format!(
            "WITH r AS ({recompute}), s AS (SELECT {cols} FROM {table}) \
             SELECT (SELECT count(*) FROM (SELECT {cols} FROM s EXCEPT ALL SELECT {cols} FROM r) a) \
                  + (SELECT count(*) FROM (SELECT {cols} FROM r EXCEPT ALL SELECT {cols} FROM s) b)"
        )))
        .fetch_one(&mut *conn)
        .await
        .unwrap()
        .get(0);
        out.push((*table, stored, diff));
    }
    out
}

/// `pg` ready for the batches of `engine`, as `run` prepares it: aggregate tables created and
/// trailing merges set up as `trail` (asserted possible: the shipped aggregates read only stored
/// columns).
pub async fn prepare_sink(
    pg: payguard::sink::postgres::PgSink,
    engine: &payguard::engine::Engine,
    trail: bool,
    metrics: std::sync::Arc<payguard::metrics::Metrics>,
) -> payguard::sink::postgres::PgSink {
    pg.prepare_aggregates(&engine.aggregates()).await.unwrap();
    assert_eq!(
        pg.prepare_trailing(
            &engine.aggregates(),
            &engine.decided_schema(),
            trail,
            metrics,
        )
        .await
        .unwrap(),
        trail,
        "the shipped aggregates read only stored columns"
    );
    pg
}

/// Batch `i` of decided `rows` with its partial aggregates; with a `topic`, the offsets it
/// advances on its partition 0 (one offset a row, `at` rows before it).
pub async fn sink_batch(
    engine: &payguard::engine::Engine,
    i: usize,
    at: usize,
    rows: datafusion::arrow::array::RecordBatch,
    topic: Option<&str>,
) -> payguard::sink::SinkBatch {
    let n = rows.num_rows();
    let mut b = payguard::sink::SinkBatch {
        seq: i as u64,
        messages: n,
        transactions: vec![rows],
        aggregate_stages: engine.aggregates(),
        aggregates_pending: true,
        offsets: topic
            .map(|topic| payguard::source::OffsetCommit {
                source: 0,
                topic: topic.into(),
                partition: 0,
                expected: (at > 0).then_some(at as i64),
                next: (at + n) as i64,
            })
            .into_iter()
            .collect(),
        ..Default::default()
    };
    b.compute_aggregates().await.unwrap();
    b
}
