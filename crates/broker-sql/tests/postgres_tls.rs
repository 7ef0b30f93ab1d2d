//! TLS to the real PostgreSQL: `sslmode` verify-full / verify-ca / require, a wrong CA, a wrong
//! host name. The server's certificate comes from the machine (`BROKER_TEST_POSTGRES_TLS_CA`,
//! which `.ci/run` points at the certificate the local PostgreSQL serves, issued to `localhost`).

use std::time::Duration;

use broker_core::{BackendFactory, ConfigValue, Options};
use broker_sql::SqlFactory;

/// The CA file, or `None` to skip (never under CI, unless TLS tests are switched off explicitly
/// with `BROKER_TEST_POSTGRES_TLS=off` for a server without TLS).
fn ca(test: &str) -> Option<String> {
    if let Ok(ca) = std::env::var("BROKER_TEST_POSTGRES_TLS_CA") {
        return Some(ca);
    }
    let off = std::env::var("BROKER_TEST_POSTGRES_TLS").as_deref() == Ok("off");
    assert!(off || std::env::var("CI").as_deref() != Ok("true"), "{test}: CI=true needs BROKER_TEST_POSTGRES_TLS_CA");
    eprintln!("SKIPPED {test}: BROKER_TEST_POSTGRES_TLS_CA is not set");
    None
}

/// Port, database and user from `BROKER_TEST_POSTGRES_URL` (default the local test database).
fn parts() -> (i64, String, String) {
    let url =
        std::env::var("BROKER_TEST_POSTGRES_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let config: tokio_postgres::Config = url.parse().unwrap();
    let port = config.get_ports().first().copied().unwrap_or(5432) as i64;
    (port, config.get_dbname().unwrap_or("test").to_owned(), config.get_user().unwrap_or("postgres").to_owned())
}

fn backend(host: &str, mode: &str, ca: Option<&str>, table: &str) -> Box<dyn broker_core::Backend> {
    let (port, db, user) = parts();
    let s = |v: &str| ConfigValue::Str(v.into());
    let mut pairs = vec![
        ("dialect", s("postgresql")),
        ("url", s(host)),
        ("port", ConfigValue::Int(port)),
        ("db", s(&db)),
        ("username", s(&user)),
        ("sslmode", s(mode)),
        ("table", s(table)),
        ("connect_timeout", ConfigValue::Int(5)),
    ];
    if let Some(ca) = ca {
        pairs.push(("sslrootcert", s(ca)));
    }
    SqlFactory.configure(Options::from_pairs(pairs)).unwrap().backend
}

async fn plain_client() -> tokio_postgres::Client {
    let url =
        std::env::var("BROKER_TEST_POSTGRES_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    client
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_connects_over_tls_and_delivers() {
    let Some(ca) = ca("verify_full_connects_over_tls_and_delivers") else { return };
    let table = format!("tls_{}", broker_testkit::services::unique_suffix());
    let backend = backend("localhost", "verify-full", Some(&ca), &table);
    let broker = backend.connect().await.unwrap();
    broker.publish(broker_testkit::user_event("tls", 1)).await.unwrap().await.unwrap();

    // The server sees our connection as TLS.
    let client = plain_client().await;
    let row = client
        .query_one(
            "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
             WHERE s.ssl AND a.application_name = 'rasa-event-broker'",
            &[],
        )
        .await
        .unwrap();
    assert!(row.get::<_, i64>(0) >= 1, "no TLS connection from the broker");
    broker.close().await.unwrap();
    let rows = client.query(&format!("SELECT data FROM \"{table}\""), &[]).await.unwrap();
    assert_eq!(rows.len(), 1);
    client.batch_execute(&format!("DROP TABLE \"{table}\"")).await.unwrap();
}

#[tokio::test]
async fn a_wrong_ca_or_host_name_fails_clearly() {
    let Some(ca) = ca("a_wrong_ca_or_host_name_fails_clearly") else { return };
    let table = format!("tls_{}", broker_testkit::services::unique_suffix());
    // A CA that did not sign the server's certificate: a public CA bundle, or a certificate we
    // make on the spot.
    let dir = tempfile::tempdir().unwrap();
    let other = dir.path().join("other-ca.pem");
    let made = std::process::Command::new("openssl")
        .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost"])
        .arg("-keyout")
        .arg(dir.path().join("other.key"))
        .arg("-out")
        .arg(&other)
        .output()
        .expect("openssl");
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    let started = std::time::Instant::now();
    let err = backend("localhost", "verify-full", Some(other.to_str().unwrap()), &table)
        .connect()
        .await
        .expect_err("wrong CA must fail");
    let text = err.to_string();
    assert!(text.contains("cannot connect") && text.to_lowercase().contains("certificate"), "{text}");
    assert!(matches!(err, broker_core::Error::Denied { .. }), "an untrusted certificate is permanent: {err:?}");
    assert!(started.elapsed() < Duration::from_secs(10));

    // The certificate names `localhost`; 127.0.0.1 is not in it.
    let err = backend("127.0.0.1", "verify-full", Some(&ca), &table).connect().await.expect_err("wrong name must fail");
    let text = err.to_string();
    assert!(text.contains("cannot connect") && text.to_lowercase().contains("name"), "{text}");
    assert!(matches!(err, broker_core::Error::Denied { .. }), "a certificate for another name is permanent: {err:?}");

    // verify-ca checks the chain only, and require (no CA) only encrypts: both connect.
    for (host, mode, ca) in [("127.0.0.1", "verify-ca", Some(ca.as_str())), ("127.0.0.1", "require", None)] {
        let broker = backend(host, mode, ca, &table).connect().await.unwrap_or_else(|e| panic!("{mode}: {e}"));
        broker.close().await.unwrap();
    }
    let client = plain_client().await;
    client.batch_execute(&format!("DROP TABLE IF EXISTS \"{table}\"")).await.unwrap();
}

#[test]
fn verify_modes_need_a_ca() {
    let s = |v: &str| ConfigValue::Str(v.into());
    let err = SqlFactory
        .configure(Options::from_pairs([("dialect", s("postgresql")), ("sslmode", s("verify-full"))]))
        .unwrap_err();
    assert!(err.to_string().contains("`sslrootcert`: is required with this sslmode"), "{err}");
}
