//! TLS to PostgreSQL (issue 28): a private PostgreSQL 15 with `ssl = on`, certificates made by the
//! test with openssl, `hostssl` only (plaintext refused), a client-certificate user. The sink
//! connects with libpq's URL parameters (`sslmode`, `sslrootcert`, `sslcert`, `sslkey`); each
//! wrong setup is a clear error naming the cause.

mod common;

use std::sync::Arc;

use common::PrivatePostgres;
use common::certs::{ca, expired, signed};
use payguard::config::PostgresConfig;
use payguard::engine::canonical::Canonical;
use payguard::sink::postgres::PgSink;

async fn connect(url: &str) -> Result<PgSink, String> {
    let cfg = PostgresConfig {
        url: url.to_string(),
        ..PostgresConfig::default()
    };
    PgSink::connect(
        &cfg,
        &common::repo().join("sql/migrations"),
        "tls",
        Arc::clone(&Canonical::fixed()),
    )
    .await
    .map_err(|e| {
        let mut m = e.to_string();
        let mut s = std::error::Error::source(&e);
        while let Some(c) = s {
            m.push_str(": ");
            m.push_str(&c.to_string());
            s = c.source();
        }
        m
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn the_sink_connects_over_verified_tls_and_each_wrong_setup_names_its_cause() {
    let certs = tempfile::tempdir().unwrap();
    let d = certs.path();
    ca(d, "ca");
    ca(d, "other-ca");
    signed(d, "ca", "server", "localhost", "DNS:localhost");
    signed(d, "ca", "client", "payguard", "DNS:payguard");
    let pg = PrivatePostgres::start();
    // TLS only; user payguard by client certificate, anyone else by password.
    pg.enable_tls(
        &d.join("server.crt"),
        &d.join("server.key"),
        &d.join("ca.crt"),
        "hostssl all payguard 127.0.0.1/32 cert\nhostssl all all 127.0.0.1/32 scram-sha-256\nhost all all 127.0.0.1/32 reject",
    );
    // The client key must not be readable by others (libpq's rule, which sqlx follows).
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(d.join("client.key"), std::fs::Permissions::from_mode(0o600)).unwrap();
    let base = format!("postgres://payguard@localhost:{}/payguard", pg.port);
    let p = |f: &str| d.join(f).display().to_string();

    // verify-full with the CA and the client certificate: connected, encrypted, migrated.
    let url = format!(
        "{base}?sslmode=verify-full&sslrootcert={}&sslcert={}&sslkey={}",
        p("ca.crt"),
        p("client.crt"),
        p("client.key")
    );
    let sink = connect(&url)
        .await
        .expect("verified TLS with a client certificate");
    let ssl: bool = sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .fetch_one(sink.pool())
        .await
        .unwrap();
    assert!(ssl, "the connection is encrypted");
    let tables: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM information_schema.tables WHERE table_name = 'transactions'",
    )
    .fetch_one(sink.pool())
    .await
    .unwrap();
    assert_eq!(tables, 1, "migrations ran over TLS");
    drop(sink);

    // The certificate names `localhost`: reached as 127.0.0.1, verify-full refuses it (the
    // name check), verify-ca accepts it (the chain alone).
    let by_ip = format!("postgres://payguard@127.0.0.1:{}/payguard", pg.port);
    let client = format!("&sslcert={}&sslkey={}", p("client.crt"), p("client.key"));
    let err = connect(&format!(
        "{by_ip}?sslmode=verify-full&sslrootcert={}{client}",
        p("ca.crt")
    ))
    .await
    .expect_err("a certificate for another name is refused by verify-full");
    assert!(
        err.contains("certificate not valid for name \"127.0.0.1\""),
        "the name mismatch names the certificate: {err}"
    );
    connect(&format!(
        "{by_ip}?sslmode=verify-ca&sslrootcert={}{client}",
        p("ca.crt")
    ))
    .await
    .expect("verify-ca checks the chain, not the name");

    // A server certificate from a CA the client does not trust: refused, naming the certificate.
    let unknown = format!(
        "{base}?sslmode=verify-full&sslrootcert={}&sslcert={}&sslkey={}",
        p("other-ca.crt"),
        p("client.crt"),
        p("client.key")
    );
    let err = connect(&unknown).await.expect_err("unknown CA refused");
    assert!(
        err.contains("invalid peer certificate: UnknownIssuer"),
        "an unknown CA names the certificate: {err}"
    );

    // A plaintext client to a TLS-only server: refused by the server, saying why.
    let plain = format!("{base}?sslmode=disable");
    let err = connect(&plain).await.expect_err("plaintext refused");
    assert!(
        err.contains("no encryption"),
        "plaintext names the missing encryption: {err}"
    );

    // TLS without the client certificate: the cert-authenticated user is refused.
    let no_cert = format!("{base}?sslmode=verify-full&sslrootcert={}", p("ca.crt"));
    let err = connect(&no_cert)
        .await
        .expect_err("no client certificate refused");
    assert!(
        err.contains("requires a valid client certificate"),
        "a missing client certificate is named: {err}"
    );

    // An expired server certificate: refused, saying so.
    expired(d, "ca", "old-server", "localhost", "DNS:localhost");
    pg.enable_tls(
        &d.join("old-server.crt"),
        &d.join("old-server.key"),
        &d.join("ca.crt"),
        "hostssl all payguard 127.0.0.1/32 cert\nhost all all 127.0.0.1/32 reject",
    );
    let err = connect(&url)
        .await
        .expect_err("an expired certificate is refused");
    assert!(
        err.contains("invalid peer certificate: certificate expired"),
        "an expired certificate is named: {err}"
    );
}
