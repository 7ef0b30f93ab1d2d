//! Real services for integration tests (contracts §E): the `BROKER_TEST_*` variable when it is
//! set (CI sets them), else a container started with testcontainers (feature `containers`, needs
//! Docker), else the test is skipped with the reason, except under `CI=true`, where a missing
//! service is a failure.

use std::any::Any;

/// A service to test against. Keep it alive for the test's duration: a container stops when its
/// handle is dropped.
pub struct Service {
    /// Where to reach it (a URL or `host:port`).
    pub url: String,
    /// How it was found, for the test output.
    pub origin: &'static str,
    _container: Option<Box<dyn Any + Send>>,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service").field("origin", &self.origin).finish_non_exhaustive()
    }
}

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Decides what to do without a service: fail under CI, otherwise say why it is skipped.
fn unavailable(test: &str, var: &str, why: &str) -> Option<Service> {
    let message = format!("{test}: no service: {var} is not set and {why}");
    assert!(!in_ci(), "{message} (CI=true: a missing service is a failure)");
    eprintln!("SKIPPED {message}");
    None
}

/// PostgreSQL: `BROKER_TEST_POSTGRES_URL` (e.g. `postgres://postgres@127.0.0.1:5432/test`), or a
/// container. `None` means skipped (never under CI).
pub async fn postgres(test: &str) -> Option<Service> {
    const VAR: &str = "BROKER_TEST_POSTGRES_URL";
    if let Ok(url) = std::env::var(VAR) {
        return Some(Service { url, origin: VAR, _container: None });
    }
    #[cfg(feature = "containers")]
    {
        use testcontainers_modules::postgres::Postgres;
        use testcontainers_modules::testcontainers::runners::AsyncRunner;
        match Postgres::default().start().await {
            Ok(node) => match node.get_host_port_ipv4(5432).await {
                Ok(port) => {
                    let url = format!("postgres://postgres:postgres@127.0.0.1:{port}/postgres");
                    Some(Service { url, origin: "testcontainers", _container: Some(Box::new(node)) })
                }
                Err(e) => unavailable(test, VAR, &format!("the container has no port: {e}")),
            },
            Err(e) => unavailable(test, VAR, &format!("testcontainers could not start PostgreSQL: {e}")),
        }
    }
    #[cfg(not(feature = "containers"))]
    unavailable(test, VAR, "the `containers` feature of broker-testkit is off")
}

/// Kafka: `BROKER_TEST_KAFKA_BOOTSTRAP` (e.g. `127.0.0.1:9092`; `.ci/run` starts tansu there), or
/// a container. `None` means skipped (never under CI).
pub async fn kafka(test: &str) -> Option<Service> {
    const VAR: &str = "BROKER_TEST_KAFKA_BOOTSTRAP";
    if let Ok(url) = std::env::var(VAR) {
        return Some(Service { url, origin: VAR, _container: None });
    }
    #[cfg(feature = "containers")]
    {
        use testcontainers_modules::kafka::apache::Kafka;
        use testcontainers_modules::testcontainers::runners::AsyncRunner;
        match Kafka::default().start().await {
            Ok(node) => match node.get_host_port_ipv4(testcontainers_modules::kafka::apache::KAFKA_PORT).await {
                Ok(port) => {
                    let url = format!("127.0.0.1:{port}");
                    Some(Service { url, origin: "testcontainers", _container: Some(Box::new(node)) })
                }
                Err(e) => unavailable(test, VAR, &format!("the container has no port: {e}")),
            },
            Err(e) => unavailable(test, VAR, &format!("testcontainers could not start Kafka: {e}")),
        }
    }
    #[cfg(not(feature = "containers"))]
    unavailable(test, VAR, "the `containers` feature of broker-testkit is off")
}

/// RabbitMQ: `BROKER_TEST_AMQP_URL` (e.g. `amqp://guest:guest@127.0.0.1:5672/%2f`), or a
/// container. `None` means skipped (never under CI).
pub async fn rabbitmq(test: &str) -> Option<Service> {
    const VAR: &str = "BROKER_TEST_AMQP_URL";
    if let Ok(url) = std::env::var(VAR) {
        return Some(Service { url, origin: VAR, _container: None });
    }
    #[cfg(feature = "containers")]
    {
        use testcontainers_modules::rabbitmq::RabbitMq;
        use testcontainers_modules::testcontainers::runners::AsyncRunner;
        match RabbitMq::default().start().await {
            Ok(node) => match node.get_host_port_ipv4(5672).await {
                Ok(port) => {
                    let url = format!("amqp://guest:guest@127.0.0.1:{port}/%2f");
                    Some(Service { url, origin: "testcontainers", _container: Some(Box::new(node)) })
                }
                Err(e) => unavailable(test, VAR, &format!("the container has no port: {e}")),
            },
            Err(e) => unavailable(test, VAR, &format!("testcontainers could not start RabbitMQ: {e}")),
        }
    }
    #[cfg(not(feature = "containers"))]
    unavailable(test, VAR, "the `containers` feature of broker-testkit is off")
}

/// A suffix unique to this process and call, for per-test tables, topics and queues.
pub fn unique_suffix() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    format!("{}_{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}
