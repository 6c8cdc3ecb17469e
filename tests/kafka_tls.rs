//! TLS and SASL to Kafka (issue 28): a private Apache Kafka broker with a SASL_SSL listener
//! (certificates made by the test with openssl, SCRAM and PLAIN users), fed by `generate` and
//! consumed by `run` through it; a wrong password, an unknown CA, a plaintext client to the TLS
//! port and an expired broker certificate are each a clear error, retried, with nothing stored
//! twice and the password never printed.

mod common;

use std::path::Path;

use common::certs::{ca, expired, key_and_chain, signed};
use common::{PrivateKafka, Secured, TestEnv};

fn certificates(d: &Path) {
    ca(d, "ca");
    ca(d, "other-ca");
    signed(d, "ca", "broker", "localhost", "DNS:localhost");
    key_and_chain(d, "broker", &d.join("broker.pem"));
}

#[tokio::test(flavor = "multi_thread")]
async fn generate_and_run_over_sasl_ssl_and_each_wrong_setup_is_a_clear_error() {
    let certs = tempfile::tempdir().unwrap();
    let d = certs.path();
    certificates(d);
    let password = "alice-S3cret-pw";
    let kafka = PrivateKafka::start_secured(&Secured {
        keystore: d.join("broker.pem"),
        users: vec![("alice".into(), password.into())],
    });
    let password_file = d.join("kafka-password");
    std::fs::write(&password_file, format!("{password}\n")).unwrap();
    let secure = format!("localhost:{}", kafka.secure_port);
    let env = TestEnv::with_services("kafka_tls", &common::admin_url(), &kafka.bootstrap(), |t| {
        let k = t["kafka"].as_table_mut().unwrap();
        k.insert(
            "brokers".into(),
            toml::Value::Array(vec![secure.clone().into()]),
        );
        k.insert("retry_max_ms".into(), 500.into());
        let mut tls = toml::Table::new();
        tls.insert(
            "ca_file".into(),
            d.join("ca.crt").display().to_string().into(),
        );
        k.insert("tls".into(), tls.into());
        let mut sasl = toml::Table::new();
        sasl.insert("mechanism".into(), "SCRAM-SHA-256".into());
        sasl.insert("username".into(), "alice".into());
        sasl.insert(
            "password_file".into(),
            password_file.display().to_string().into(),
        );
        k.insert("sasl".into(), sasl.into());
    })
    .await;
    // Produced and consumed over SASL_SSL with SCRAM-SHA-256: everything stored once.
    env.generate(2_000, &[]);
    env.run_ok(&["run", "--stop-at-end"]);
    assert_eq!(env.transactions().await, 2_000);

    let config = std::fs::read_to_string(&env.config).unwrap();
    let set = |from: &str, to: &str| {
        let text = config.replace(from, to);
        assert_ne!(text, config, "{from} not in the config");
        std::fs::write(&env.config, text).unwrap();
    };
    // PLAIN and SCRAM-SHA-512 work the same way.
    for mechanism in ["PLAIN", "SCRAM-SHA-512"] {
        set("\"SCRAM-SHA-256\"", &format!("\"{mechanism}\""));
        env.run_ok(&["run", "--stop-at-end"]);
        assert_eq!(
            env.transactions().await,
            2_000,
            "{mechanism}: nothing twice"
        );
        std::fs::write(&env.config, &config).unwrap();
    }

    // A wrong password: the broker refuses it, the pipeline retries and says why, nothing is
    // printed of the password.
    let wrong = "Wr0ng-Kafka-Pa55";
    std::fs::write(&password_file, format!("{wrong}\n")).unwrap();
    let log = env
        .run_until_logged(
            "wrong-password",
            "debug,rskafka=info",
            "cannot reach Kafka brokers",
        )
        .await;
    assert!(
        log.to_lowercase().contains("authentication"),
        "a refused login says so: {log}"
    );
    assert!(!log.contains(wrong), "the password reached the log");
    assert!(!log.contains(password));
    std::fs::write(&password_file, format!("{password}\n")).unwrap();

    // A broker certificate from a CA the client does not trust.
    set(
        &d.join("ca.crt").display().to_string(),
        &d.join("other-ca.crt").display().to_string(),
    );
    let log = env
        .run_until_logged(
            "unknown-ca",
            "debug,rskafka=info",
            "cannot reach Kafka brokers",
        )
        .await;
    assert!(
        log.contains("UnknownIssuer"),
        "an unknown CA is named: {log}"
    );
    std::fs::write(&env.config, &config).unwrap();

    // A plaintext client (no [kafka.tls], no SASL) to the TLS port: an error, retried.
    let mut t: toml::Table = toml::from_str(&config).unwrap();
    let k = t["kafka"].as_table_mut().unwrap();
    k.remove("tls");
    k.remove("sasl");
    std::fs::write(&env.config, toml::to_string(&t).unwrap()).unwrap();
    let log = env
        .run_until_logged(
            "plaintext",
            "debug,rskafka=info",
            "cannot reach Kafka brokers",
        )
        .await;
    assert!(log.contains(&secure), "the error names the broker: {log}");
    std::fs::write(&env.config, &config).unwrap();

    // An expired broker certificate (valid in 2020 only, from the trusted CA): refused, saying so.
    expired_keystore(d);
    let mut kafka = kafka;
    kafka.stop("TERM");
    kafka.start_again();
    let log = env
        .run_until_logged(
            "expired",
            "debug,rskafka=info",
            "cannot reach Kafka brokers",
        )
        .await;
    assert!(
        log.contains("certificate expired"),
        "an expired certificate is named: {log}"
    );
    assert_eq!(env.transactions().await, 2_000, "nothing stored twice");
}

/// Replace the broker's keystore by a certificate of the same CA and name that expired in 2020.
fn expired_keystore(d: &Path) {
    expired(d, "ca", "old", "localhost", "DNS:localhost");
    key_and_chain(d, "old", &d.join("broker.pem"));
}
