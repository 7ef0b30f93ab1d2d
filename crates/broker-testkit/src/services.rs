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
    skip(test, &format!("no service: {var} is not set and {why}"));
    None
}

/// Reports that `test` is skipped because `why`; under `CI=true` a missing prerequisite (a
/// service, a tool, a variable) is a failure instead.
pub fn skip(test: &str, why: &str) {
    assert!(!in_ci(), "{test}: {why} (CI=true: a missing prerequisite is a failure)");
    eprintln!("SKIPPED {test}: {why}");
}

/// The variable `name` a test needs (a restart command, a tool path), or `None` after [`skip`].
pub fn var(test: &str, name: &str) -> Option<String> {
    let value = std::env::var(name).ok();
    if value.is_none() {
        skip(test, &format!("{name} is not set"));
    }
    value
}

/// Whether `python3` can import `module` (the consumers Rasa's users run); [`skip`] when not.
pub fn python_module(test: &str, module: &str) -> bool {
    let ok = std::process::Command::new("python3")
        .args(["-c", &format!("import {module}")])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        skip(test, &format!("python3 with {module} is not installed"));
    }
    ok
}

/// What a container start gives: the service's URL and the handle that keeps it running.
#[cfg(feature = "containers")]
type Started = Result<(String, Box<dyn Any + Send>), String>;

/// The service from `var` when set; else the container `start` gives (feature `containers`);
/// else skipped with the reason (a failure under `CI=true`).
#[cfg(feature = "containers")]
async fn resolve(test: &str, var: &str, start: impl std::future::Future<Output = Started>) -> Option<Service> {
    if let Ok(url) = std::env::var(var) {
        return Some(Service { url, origin: "environment", _container: None });
    }
    match start.await {
        Ok((url, node)) => Some(Service { url, origin: "testcontainers", _container: Some(node) }),
        Err(why) => unavailable(test, var, &why),
    }
}

#[cfg(not(feature = "containers"))]
async fn resolve<F>(test: &str, var: &str, _start: F) -> Option<Service> {
    if let Ok(url) = std::env::var(var) {
        return Some(Service { url, origin: "environment", _container: None });
    }
    unavailable(test, var, "the `containers` feature of broker-testkit is off")
}

/// Starts `image` with testcontainers and builds the URL from its host port for `port`.
#[cfg(feature = "containers")]
async fn container<I>(image: I, what: &str, port: u16, url: impl Fn(u16) -> String) -> Started
where
    I: testcontainers_modules::testcontainers::Image + 'static,
{
    use testcontainers_modules::testcontainers::runners::AsyncRunner;
    let node = image.start().await.map_err(|e| format!("testcontainers could not start {what}: {e}"))?;
    let host_port = node.get_host_port_ipv4(port).await.map_err(|e| format!("the container has no port: {e}"))?;
    Ok((url(host_port), Box::new(node)))
}

/// PostgreSQL: `BROKER_TEST_POSTGRES_URL` (e.g. `postgres://postgres@127.0.0.1:5432/test`), or a
/// container. `None` means skipped (never under CI).
pub async fn postgres(test: &str) -> Option<Service> {
    resolve(test, "BROKER_TEST_POSTGRES_URL", async {
        #[cfg(feature = "containers")]
        {
            let image = testcontainers_modules::postgres::Postgres::default();
            container(image, "PostgreSQL", 5432, |p| format!("postgres://postgres:postgres@127.0.0.1:{p}/postgres"))
                .await
        }
    })
    .await
}

/// Kafka: `BROKER_TEST_KAFKA_BOOTSTRAP` (e.g. `127.0.0.1:9092`; `.ci/run` starts tansu there), or
/// a container. `None` means skipped (never under CI).
pub async fn kafka(test: &str) -> Option<Service> {
    resolve(test, "BROKER_TEST_KAFKA_BOOTSTRAP", async {
        #[cfg(feature = "containers")]
        {
            use testcontainers_modules::kafka::apache::{KAFKA_PORT, Kafka};
            container(Kafka::default(), "Kafka", KAFKA_PORT.as_u16(), |p| format!("127.0.0.1:{p}")).await
        }
    })
    .await
}

/// RabbitMQ: `BROKER_TEST_AMQP_URL` (e.g. `amqp://guest:guest@127.0.0.1:5672/%2f`), or a
/// container. `None` means skipped (never under CI).
pub async fn rabbitmq(test: &str) -> Option<Service> {
    resolve(test, "BROKER_TEST_AMQP_URL", async {
        #[cfg(feature = "containers")]
        {
            let image = testcontainers_modules::rabbitmq::RabbitMq::default();
            container(image, "RabbitMQ", 5672, |p| format!("amqp://guest:guest@127.0.0.1:{p}/%2f")).await
        }
    })
    .await
}

/// A suffix unique to this process and call, for per-test tables, topics and queues.
pub fn unique_suffix() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    format!("{}_{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}
