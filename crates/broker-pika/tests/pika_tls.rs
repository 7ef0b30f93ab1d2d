//! TLS for real: stunnel on 127.0.0.1 with a CA made by the test, in front of the real RabbitMQ,
//! requiring a client certificate. `amqps://` with the CA in the URI, Rasa's client-certificate
//! variables with a plain host, and the failures: a wrong CA, a host name the certificate does
//! not cover, no client certificate.

mod common;

use broker_core::{Backend, ConfigValue, Options};
use broker_pika::{PikaBackend, PikaConfig};
use broker_testkit::tls::{Stunnel, TestCa};

async fn publish_one(config: PikaConfig) -> Result<(), broker_core::Error> {
    let broker = PikaBackend::new(config).connect().await?;
    broker.publish(broker_testkit::user_event("tls", 0)).await?.await?;
    broker.close().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_client_certificates() {
    let Some(service) = broker_testkit::services::rabbitmq("tls_with_client_certificates").await else { return };
    if !Stunnel::available() {
        broker_testkit::services::skip("tls_with_client_certificates", "stunnel is not installed (package stunnel4)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::generate(dir.path()).expect("make test certificates");
    let upstream = common::config_with(&service.url, &["q"], "x", &[]).target;
    let stunnel = Stunnel::start(&ca, &format!("{}:{}", upstream.host, upstream.port), true).expect("stunnel");
    let (user, pass) = (upstream.username.clone(), upstream.password.expose().to_owned());
    let port = stunnel.port;
    let q = common::name("q");
    let x = common::name("x");
    let amqps = |host: &str, ca_file: &std::path::Path, client: bool| {
        let mut url = format!("amqps://{user}:{pass}@{host}:{port}/%2f?cacertfile={}", ca_file.display());
        if client {
            url.push_str(&format!("&certfile={}&keyfile={}", ca.client_cert.display(), ca.client_key.display()));
        }
        common::config_with(&url, &[&q], &x, &[("connection_attempts", ConfigValue::Int(1))])
    };

    // amqps:// with the CA and the client certificate in the URI: published and confirmed.
    publish_one(amqps("localhost", &ca.ca, true)).await.expect("TLS with a client certificate works");

    // Rasa's way: a plain host, the client certificate from the environment, the CA as `cafile`.
    let options = Options::from_pairs([
        ("url", ConfigValue::Str("localhost".into())),
        ("port", ConfigValue::Int(port.into())),
        ("username", ConfigValue::Str(user.clone())),
        ("password", ConfigValue::Str(pass.clone())),
        ("queues", ConfigValue::Str(q.clone())),
        ("exchange_name", ConfigValue::Str(x.clone())),
        ("cafile", ConfigValue::Str(ca.ca.display().to_string())),
    ]);
    let env = |k: &str| match k {
        "RABBITMQ_SSL_CLIENT_CERTIFICATE" => Some(ca.client_cert.display().to_string()),
        "RABBITMQ_SSL_CLIENT_KEY" => Some(ca.client_key.display().to_string()),
        _ => None,
    };
    let (config, _) = PikaConfig::from_options_with_env(options, &env).unwrap();
    assert!(config.target.tls);
    let backend = PikaBackend::new(config);
    publish_one(backend.config().clone()).await.expect("Rasa's client-certificate variables work");
    let got = broker_testkit::consume(&backend, 2, std::time::Duration::from_secs(10)).await;
    assert_eq!(got.len(), 2, "both events came through TLS");

    // A CA that did not sign the server's certificate.
    let err = publish_one(amqps("localhost", &ca.other_ca, true)).await.expect_err("a wrong CA fails");
    let text = err.to_string();
    println!("wrong CA: {text}");
    assert!(text.contains("cannot connect") && text.contains("certificate"), "{text}");
    assert!(matches!(err, broker_core::Error::Denied { .. }), "an untrusted certificate is permanent: {err:?}");

    // The certificate is for localhost and 127.0.0.1, not for this name.
    let mut config = amqps("localhost", &ca.ca, true);
    config.target.server_name = Some("rabbit.example".into());
    let err = publish_one(config).await.expect_err("a host name mismatch fails");
    assert!(!err.is_temporary(), "a certificate for another name is permanent: {err:?}");
    let text = err.to_string();
    println!("wrong name: {text}");
    assert!(text.contains("certificate") && text.contains("rabbit.example"), "{text}");

    // No client certificate: the server refuses the handshake.
    let err = publish_one(amqps("localhost", &ca.ca, false)).await.expect_err("no client certificate fails");
    assert!(!err.is_temporary(), "a refused handshake is permanent: {err:?}");
    let text = err.to_string();
    println!("no client certificate: {text}");
    assert!(text.contains("cannot connect") && text.contains("client certificate"), "{text}");

    // A missing CA file is named.
    let text = publish_one(amqps("localhost", std::path::Path::new("/nonexistent/ca.pem"), true))
        .await
        .expect_err("a missing CA file fails")
        .to_string();
    assert!(text.contains("/nonexistent/ca.pem"), "{text}");
    drop(stunnel);
    common::cleanup(&service.url, &[&q], &[&x]).await;
}
