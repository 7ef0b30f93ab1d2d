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
fn unavailable<T>(test: &str, var: &str, why: &str) -> Option<T> {
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

#[cfg(feature = "containers")]
pub mod containers;

#[cfg(not(feature = "containers"))]
async fn off<T>() -> Result<T, String> {
    Err("the `containers` feature of broker-testkit is off".into())
}

/// How a restart test stops and starts its service: the commands in two variables for a
/// service from the environment, the container's own stop and start for a container.
pub struct Restart(RestartBy);

enum RestartBy {
    Commands {
        stop: (String, String),
        start: (String, String),
    },
    #[cfg(feature = "containers")]
    Container(containers::Container),
}

impl std::fmt::Debug for Restart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Restart").finish_non_exhaustive()
    }
}

impl Restart {
    /// Stops the service (a command runs on a blocking thread and must succeed).
    pub async fn stop(&self) -> Result<(), String> {
        match &self.0 {
            RestartBy::Commands { stop, .. } => run_command(stop.clone()).await,
            #[cfg(feature = "containers")]
            RestartBy::Container(c) => c.stop().await,
        }
    }

    /// Starts the service again.
    pub async fn start(&self) -> Result<(), String> {
        match &self.0 {
            RestartBy::Commands { start, .. } => run_command(start.clone()).await,
            #[cfg(feature = "containers")]
            RestartBy::Container(c) => c.start().await,
        }
    }

    /// [`Restart::stop`] for a test without a runtime.
    pub fn stop_blocking(&self) -> Result<(), String> {
        blocking(self.stop())
    }

    /// [`Restart::start`] for a test without a runtime.
    pub fn start_blocking(&self) -> Result<(), String> {
        blocking(self.start())
    }
}

fn blocking(work: impl std::future::Future<Output = Result<(), String>>) -> Result<(), String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("no runtime: {e}"))?
        .block_on(work)
}

async fn run_command((var, command): (String, String)) -> Result<(), String> {
    let status = tokio::task::spawn_blocking(move || {
        std::process::Command::new("sh").arg("-c").arg(&command).status().map(|s| (s, command))
    })
    .await
    .map_err(|e| format!("{var}: {e}"))?;
    match status {
        Ok((s, _)) if s.success() => Ok(()),
        Ok((s, command)) => Err(format!("{var} ({command}) failed: {s}")),
        Err(e) => Err(format!("{var}: cannot run sh: {e}")),
    }
}

/// A service a test may stop and start (each restart test is its own test binary, so no other
/// test sees the outage): from `var` when it is set, with the commands in `stop_var` and
/// `start_var` (skipped without them); else a container of the test's own that `start` gives,
/// whose host port stays the same across the restart; else skipped (a failure under `CI=true`).
pub async fn resolve_restartable(
    test: &str,
    var: &str,
    (stop_var, start_var): (&str, &str),
    start: impl std::future::Future<Output = Result<(String, Restart), String>>,
) -> Option<(Service, Restart)> {
    if let Ok(url) = std::env::var(var) {
        let stop = self::var(test, stop_var)?;
        let start = self::var(test, start_var)?;
        let restart =
            Restart(RestartBy::Commands { stop: (stop_var.to_owned(), stop), start: (start_var.to_owned(), start) });
        return Some((Service { url, origin: "environment", _container: None }, restart));
    }
    match start.await {
        Ok((url, restart)) => Some((Service { url, origin: "testcontainers", _container: None }, restart)),
        Err(why) => unavailable(test, var, &why),
    }
}

#[cfg(feature = "containers")]
fn shared_started(c: Result<containers::Container, String>) -> Started {
    c.map(|c| (c.url.clone(), Box::new(c) as Box<dyn Any + Send>))
}

#[cfg(feature = "containers")]
fn own_started(c: Result<containers::Container, String>) -> Result<(String, Restart), String> {
    c.map(|c| (c.url.clone(), Restart(RestartBy::Container(c))))
}

#[cfg(feature = "containers")]
async fn postgres_container(fixed_port: bool) -> Result<containers::Container, String> {
    containers::container(
        testcontainers_modules::postgres::Postgres::default(),
        images::POSTGRES,
        "PostgreSQL",
        5432,
        fixed_port,
        |h, p| format!("postgres://postgres:postgres@{h}:{p}/postgres"),
    )
    .await
}

#[cfg(feature = "containers")]
async fn rabbitmq_container(fixed_port: bool) -> Result<containers::Container, String> {
    containers::container(
        testcontainers_modules::rabbitmq::RabbitMq::default(),
        images::RABBITMQ,
        "RabbitMQ",
        5672,
        fixed_port,
        |h, p| format!("amqp://guest:guest@{h}:{p}/%2f"),
    )
    .await
}

#[cfg(feature = "containers")]
async fn kafka_container() -> Result<containers::Container, String> {
    use testcontainers_modules::kafka::apache::{KAFKA_PORT, Kafka};
    containers::container(Kafka::default(), images::KAFKA, "Kafka", KAFKA_PORT.as_u16(), false, |h, p| {
        format!("{h}:{p}")
    })
    .await
}

#[cfg(feature = "containers")]
macro_rules! shared_container {
    ($start:expr) => {{
        static CELL: tokio::sync::OnceCell<Result<containers::Container, String>> = tokio::sync::OnceCell::const_new();
        async { shared_started(containers::shared(&CELL, $start).await) }
    }};
}

/// PostgreSQL: `BROKER_TEST_POSTGRES_URL` (e.g. `postgres://postgres@127.0.0.1:5432/test`), or a
/// container ([`images::POSTGRES`]) shared by the test binary. `None` means skipped (never under CI).
pub async fn postgres(test: &str) -> Option<Service> {
    #[cfg(feature = "containers")]
    let start = shared_container!(postgres_container(false));
    #[cfg(not(feature = "containers"))]
    let start = off();
    resolve(test, "BROKER_TEST_POSTGRES_URL", start).await
}

/// PostgreSQL that the test stops and starts: `BROKER_TEST_POSTGRES_URL` with
/// `BROKER_TEST_POSTGRES_STOP` / `_START`, or a container of its own.
pub async fn postgres_to_restart(test: &str) -> Option<(Service, Restart)> {
    #[cfg(feature = "containers")]
    let start = async { own_started(postgres_container(true).await) };
    #[cfg(not(feature = "containers"))]
    let start = off();
    resolve_restartable(
        test,
        "BROKER_TEST_POSTGRES_URL",
        ("BROKER_TEST_POSTGRES_STOP", "BROKER_TEST_POSTGRES_START"),
        start,
    )
    .await
}

/// Kafka: `BROKER_TEST_KAFKA_BOOTSTRAP` (e.g. `127.0.0.1:9092`; `.ci/run` starts tansu there), or
/// a container ([`images::KAFKA`]) shared by the test binary. `None` means skipped (never under CI).
pub async fn kafka(test: &str) -> Option<Service> {
    #[cfg(feature = "containers")]
    let start = shared_container!(kafka_container());
    #[cfg(not(feature = "containers"))]
    let start = off();
    resolve(test, "BROKER_TEST_KAFKA_BOOTSTRAP", start).await
}

/// RabbitMQ: `BROKER_TEST_AMQP_URL` (e.g. `amqp://guest:guest@127.0.0.1:5672/%2f`), or a
/// container ([`images::RABBITMQ`]) shared by the test binary. `None` means skipped (never under CI).
pub async fn rabbitmq(test: &str) -> Option<Service> {
    #[cfg(feature = "containers")]
    let start = shared_container!(rabbitmq_container(false));
    #[cfg(not(feature = "containers"))]
    let start = off();
    resolve(test, "BROKER_TEST_AMQP_URL", start).await
}

/// RabbitMQ that the test stops and starts: `BROKER_TEST_AMQP_URL` with
/// `BROKER_TEST_RABBITMQ_STOP` / `_START`, or a container of its own.
pub async fn rabbitmq_to_restart(test: &str) -> Option<(Service, Restart)> {
    #[cfg(feature = "containers")]
    let start = async { own_started(rabbitmq_container(true).await) };
    #[cfg(not(feature = "containers"))]
    let start = off();
    resolve_restartable(
        test,
        "BROKER_TEST_AMQP_URL",
        ("BROKER_TEST_RABBITMQ_STOP", "BROKER_TEST_RABBITMQ_START"),
        start,
    )
    .await
}

/// A suffix unique to this process and call, for per-test tables, topics and queues.
pub fn unique_suffix() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    format!("{}_{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}
