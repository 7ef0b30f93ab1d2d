//! Real services for integration tests (docs/contract.md §E): the `BROKER_TEST_*` variable when it is
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

/// What starting a service gives: its URL and the handle that keeps it running (a container is
/// stopped when its handle is dropped), or why it could not be started.
pub type Started = Result<(String, Box<dyn Any + Send>), String>;

/// The rule every service follows, for backends of other crates too: the service from the
/// variable `var` when it is set; else what `start` gives (e.g. a container started with
/// testcontainers); else the test is skipped with the reason (a failure under `CI=true`).
pub async fn resolve(test: &str, var: &str, start: impl std::future::Future<Output = Started>) -> Option<Service> {
    if let Ok(url) = std::env::var(var) {
        return Some(Service { url, origin: "environment", _container: None });
    }
    match start.await {
        Ok((url, node)) => Some(Service { url, origin: "testcontainers", _container: Some(node) }),
        Err(why) => unavailable(test, var, &why),
    }
}

/// The images the containers start: the versions CI tests against, each overridable by a
/// variable holding `name:tag`.
pub mod images {
    /// PostgreSQL (`BROKER_TEST_POSTGRES_IMAGE`).
    pub const POSTGRES: (&str, &str, &str) = ("BROKER_TEST_POSTGRES_IMAGE", "postgres", "15-alpine");
    /// RabbitMQ (`BROKER_TEST_RABBITMQ_IMAGE`).
    pub const RABBITMQ: (&str, &str, &str) = ("BROKER_TEST_RABBITMQ_IMAGE", "rabbitmq", "3.13-management");
    /// Apache Kafka in KRaft mode (`BROKER_TEST_KAFKA_IMAGE`).
    pub const KAFKA: (&str, &str, &str) = ("BROKER_TEST_KAFKA_IMAGE", "apache/kafka", "3.8.1");

    /// The image's name and tag: from its variable when set (`name:tag`), else the pinned one.
    pub fn chosen((var, name, tag): (&str, &str, &str)) -> (String, String) {
        match std::env::var(var) {
            Ok(v) => match v.rsplit_once(':').filter(|(_, t)| !t.contains('/')) {
                Some((n, t)) => (n.to_owned(), t.to_owned()),
                None => (v, "latest".to_owned()),
            },
            Err(_) => (name.to_owned(), tag.to_owned()),
        }
    }
}

#[cfg(not(feature = "containers"))]
async fn off() -> Started {
    Err("the `containers` feature of broker-testkit is off".into())
}

/// Starts `image` (as [`images::chosen`] names it) with testcontainers and builds the URL from
/// the container's host and its mapped port for `port`.
#[cfg(feature = "containers")]
pub async fn container<I>(
    image: I,
    pinned: (&str, &str, &str),
    what: &str,
    port: u16,
    url: impl Fn(&str, u16) -> String,
) -> Started
where
    I: testcontainers_modules::testcontainers::Image + 'static,
{
    use testcontainers_modules::testcontainers::ImageExt;
    use testcontainers_modules::testcontainers::runners::AsyncRunner;
    let (name, tag) = images::chosen(pinned);
    let node = image
        .with_name(name.clone())
        .with_tag(tag.clone())
        .start()
        .await
        .map_err(|e| format!("testcontainers could not start {what} ({name}:{tag}): {e}"))?;
    let host = node.get_host().await.map_err(|e| format!("the {what} container has no host: {e}"))?;
    let host_port =
        node.get_host_port_ipv4(port).await.map_err(|e| format!("the {what} container has no port: {e}"))?;
    Ok((url(&host.to_string(), host_port), Box::new(node)))
}

/// PostgreSQL: `BROKER_TEST_POSTGRES_URL` (e.g. `postgres://postgres@127.0.0.1:5432/test`), or a
/// container ([`images::POSTGRES`]). `None` means skipped (never under CI).
pub async fn postgres(test: &str) -> Option<Service> {
    #[cfg(feature = "containers")]
    let start = container(
        testcontainers_modules::postgres::Postgres::default(),
        images::POSTGRES,
        "PostgreSQL",
        5432,
        |h, p| format!("postgres://postgres:postgres@{h}:{p}/postgres"),
    );
    #[cfg(not(feature = "containers"))]
    let start = off();
    resolve(test, "BROKER_TEST_POSTGRES_URL", start).await
}

/// Kafka: `BROKER_TEST_KAFKA_BOOTSTRAP` (e.g. `127.0.0.1:9092`; `.ci/run` starts tansu there), or
/// a container ([`images::KAFKA`]). `None` means skipped (never under CI).
pub async fn kafka(test: &str) -> Option<Service> {
    #[cfg(feature = "containers")]
    let start = {
        use testcontainers_modules::kafka::apache::{KAFKA_PORT, Kafka};
        container(Kafka::default(), images::KAFKA, "Kafka", KAFKA_PORT.as_u16(), |h, p| format!("{h}:{p}"))
    };
    #[cfg(not(feature = "containers"))]
    let start = off();
    resolve(test, "BROKER_TEST_KAFKA_BOOTSTRAP", start).await
}

/// RabbitMQ: `BROKER_TEST_AMQP_URL` (e.g. `amqp://guest:guest@127.0.0.1:5672/%2f`), or a
/// container ([`images::RABBITMQ`]). `None` means skipped (never under CI).
pub async fn rabbitmq(test: &str) -> Option<Service> {
    #[cfg(feature = "containers")]
    let start =
        container(testcontainers_modules::rabbitmq::RabbitMq::default(), images::RABBITMQ, "RabbitMQ", 5672, |h, p| {
            format!("amqp://guest:guest@{h}:{p}/%2f")
        });
    #[cfg(not(feature = "containers"))]
    let start = off();
    resolve(test, "BROKER_TEST_AMQP_URL", start).await
}

/// A suffix unique to this process and call, for per-test tables, topics and queues.
pub fn unique_suffix() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    format!("{}_{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}
