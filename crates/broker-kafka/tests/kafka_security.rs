//! SASL SCRAM and TLS against a real Kafka-protocol broker of the test's own (tansu, see
//! `common`): a SCRAM-SHA-512 user made by the test, and TLS through stunnel with host name
//! verification and a CA made by the test. Wrong credentials and a wrong CA must fail clearly.

mod common;

use std::time::Duration;

use broker_core::{Backend, ConfigValue, Options};
use broker_kafka::{KafkaBackend, KafkaConfig};
use broker_testkit::tls::{Stunnel, TestCa};
use common::Tansu;

fn config(pairs: &[(&str, &str)]) -> KafkaConfig {
    let options = Options::from_pairs(pairs.iter().map(|(k, v)| (*k, ConfigValue::Str((*v).into()))));
    let (mut config, _) = KafkaConfig::from_options(options).expect("a valid config");
    config.create_topic = Some((3, 1));
    config
}

async fn round_trip(config: KafkaConfig) -> Result<(), broker_core::Error> {
    let backend = KafkaBackend::new(config);
    let broker = backend.connect().await?;
    for seq in 0..20 {
        broker.publish(broker_testkit::user_event("secure", seq)).await?.await?;
    }
    broker.close().await?;
    let got = broker_testkit::consume(&backend, 20, Duration::from_secs(60)).await;
    // No key (Rasa's default): spread over the partitions, so compare as a set.
    let mut seqs: Vec<u64> = got.iter().filter_map(|r| broker_testkit::seq_of(&r.event)).collect();
    seqs.sort_unstable();
    assert_eq!(seqs, (0..20).collect::<Vec<_>>());
    assert!(got.iter().all(|r| r.event.to_json() == r.raw), "the bytes came back unchanged");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_sha_512_login() {
    let Some(root) = Tansu::root("scram_sha_512_login") else { return };
    let tansu = Tansu::new(root, None);
    // Users are created over the Kafka protocol before authentication is turned on.
    tansu.run(&["start", "sqlite"]);
    tansu.create_user("scram512", "rasa-ci", "s3cret-Pa55");
    tansu.run(&["stop"]);
    tansu.run(&["start", "sqlite", "--authentication"]);
    let url = format!("127.0.0.1:{}", tansu.port);
    let scram = |password: &str| {
        config(&[
            ("url", &url),
            ("topic", "secure"),
            ("security_protocol", "SASL_PLAINTEXT"),
            ("sasl_mechanism", "scram-sha-512"),
            ("sasl_username", "rasa-ci"),
            ("sasl_password", password),
        ])
    };
    round_trip(scram("s3cret-Pa55")).await.expect("SCRAM-SHA-512 with the right password");

    let mut wrong = scram("not-the-password");
    wrong.create_topic = None;
    let err = KafkaBackend::new(wrong).connect().await.expect_err("a wrong password fails");
    let text = err.to_string();
    println!("wrong password: {text}");
    assert!(text.contains("cannot connect") && text.contains("SASL") && !text.contains("not-the-password"), "{text}");
    assert!(matches!(err, broker_core::Error::Denied { .. }), "a refused password is permanent: {err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_through_stunnel_with_host_name_verification() {
    let Some(root) = Tansu::root("tls_through_stunnel") else { return };
    if !Stunnel::available() {
        broker_testkit::services::skip("tls_through_stunnel", "stunnel is not installed (package stunnel4)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::generate(dir.path()).expect("test certificates");
    // The broker advertises the TLS port by the name its certificate carries; the plaintext
    // port stays on loopback and is never advertised.
    let tls_port = common::free_port();
    let tansu = Tansu::new(root, Some(format!("localhost:{tls_port}")));
    tansu.run(&["start", "memory"]);
    let stunnel = Stunnel::start_on(&ca, tls_port, &format!("127.0.0.1:{}", tansu.port), false).expect("stunnel");
    let url = format!("localhost:{}", stunnel.port);
    let tls = |cafile: &std::path::Path| {
        config(&[
            ("url", &url),
            ("topic", "tls"),
            ("security_protocol", "SSL"),
            ("ssl_cafile", &cafile.display().to_string()),
        ])
    };
    let good = tls(&ca.ca);
    assert!(good.ssl_check_hostname, "host name verification is on by default");
    round_trip(good).await.expect("TLS with the right CA");

    let mut wrong = tls(&ca.other_ca);
    wrong.create_topic = None;
    let err = KafkaBackend::new(wrong).connect().await.expect_err("a wrong CA fails");
    let text = err.to_string();
    println!("wrong CA: {text}");
    assert!(text.contains("cannot connect") && text.contains("certificate"), "{text}");
    assert!(matches!(err, broker_core::Error::Denied { .. }), "an untrusted certificate is permanent: {err:?}");
}
