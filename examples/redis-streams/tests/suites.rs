//! The example backend runs the shared conformance suite, its consumer scenarios and the fault
//! suite on the real Redis (`BROKER_TEST_REDIS_ADDR`, e.g. `127.0.0.1:6379`; `.ci/run` sets it),
//! exactly as a backend of another crate would.

use broker_core::delivery::DriverOptions;
use broker_core::{Backend, DeliveryOptions, Event, Received, SourceOptions, async_trait};
use broker_example_redis::RedisStreamsBackend;
use broker_testkit::Target;
use broker_testkit::faults::{FaultOptions, FaultTarget, Faulty};
use broker_testkit::proxy::Proxy;
use broker_testkit::scenario::{Hooks, Rotation, Scene, Skip};
use broker_testkit::services::{Service, resolve};

async fn redis(test: &str) -> Option<Service> {
    // No container for this example: the variable, else skipped (a failure under CI=true).
    resolve(test, "BROKER_TEST_REDIS_ADDR", async { Err("this example starts no container".to_owned()) }).await
}

fn stream() -> String {
    format!("example-{}", broker_testkit::services::unique_suffix())
}

struct Redis {
    addr: String,
    streams: std::sync::Mutex<Vec<String>>,
}

impl Redis {
    fn new(addr: &str) -> Redis {
        Redis { addr: addr.to_owned(), streams: Default::default() }
    }

    fn stream(&self) -> String {
        let name = stream();
        self.streams.lock().unwrap().push(name.clone());
        name
    }

    /// Deletes the streams the tests made.
    async fn cleanup(&self) {
        let names: Vec<String> = self.streams.lock().unwrap().drain(..).collect();
        for name in names {
            command(&self.addr, &["DEL", &name, &format!("{name}.1")]).await;
        }
    }
}

/// Runs one Redis command on a connection of its own and returns the first reply line.
async fn command(addr: &str, args: &[&str]) -> String {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let mut wire = format!("*{}\r\n", args.len());
    for a in args {
        wire.push_str(&format!("${}\r\n{a}\r\n", a.len()));
    }
    let stream = tokio::time::timeout(std::time::Duration::from_secs(5), tokio::net::TcpStream::connect(addr))
        .await
        .expect("connect in time")
        .expect("connect to Redis");
    let mut stream = tokio::io::BufReader::new(stream);
    stream.get_mut().write_all(wire.as_bytes()).await.expect("send");
    let mut line = String::new();
    tokio::time::timeout(std::time::Duration::from_secs(5), stream.read_line(&mut line))
        .await
        .expect("an answer in time")
        .expect("read");
    assert!(!line.starts_with('-'), "Redis refused {args:?}: {line}");
    line
}

#[async_trait]
impl Target for Redis {
    fn name(&self) -> String {
        "redis-streams (example)".into()
    }
    async fn fresh(&self) -> Box<dyn Backend> {
        let driver = DriverOptions::default().max_event_bytes(Some(64 * 1024));
        Box::new(RedisStreamsBackend::new(&self.addr, self.stream()).driver(driver))
    }
    fn poison(&self) -> Option<Event> {
        Some(broker_testkit::oversized_event(100_000))
    }
    async fn scene(&self) -> Scene {
        let name = self.stream();
        let driver = DriverOptions::default().max_event_bytes(Some(64 * 1024));
        let backend = Box::new(RedisStreamsBackend::new(&self.addr, &name).driver(driver));
        Scene { backend, hooks: Box::new(ById { addr: self.addr.clone(), stream: name }) }
    }
}

/// A Redis Streams consumer keeps the id of the last entry it handled; the stream can be
/// renamed away, deleted or trimmed to nothing under it (new entries get later ids).
struct ById {
    addr: String,
    stream: String,
}

#[async_trait]
impl Hooks for ById {
    fn resume(&self, after: Option<&Received>) -> Result<SourceOptions, Skip> {
        Ok(broker_testkit::scenario::resume_by_position(after))
    }
    async fn rotate(&self, how: Rotation) -> Result<(), Skip> {
        let s = self.stream.as_str();
        match how {
            Rotation::Rename => command(&self.addr, &["RENAME", s, &format!("{s}.1")]).await,
            Rotation::Delete => command(&self.addr, &["DEL", s]).await,
            Rotation::Truncate => command(&self.addr, &["XTRIM", s, "MAXLEN", "0"]).await,
            other => return Err(format!("{other:?} has no Redis counterpart here")),
        };
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_streams_conforms() {
    let Some(service) = redis("redis_streams_conforms").await else { return };
    let target = Redis::new(&service.url);
    broker_testkit::run_all(&target).await;
    target.cleanup().await;
}

#[async_trait]
impl FaultTarget for Redis {
    fn name(&self) -> String {
        "redis-streams (example)".into()
    }
    async fn fresh(&self, options: &FaultOptions) -> Faulty {
        let name = self.stream();
        let proxy = Proxy::start(&self.addr).await.expect("start the proxy");
        let delivery = DeliveryOptions::default().close_timeout(options.close_timeout);
        let driver = DriverOptions::default().attempt_timeout(options.attempt_timeout);
        let via = format!("127.0.0.1:{}", proxy.port());
        Faulty {
            backend: Box::new(RedisStreamsBackend::new(via, &name).delivery(delivery).driver(driver)),
            outage: Box::new(proxy),
            reader: Box::new(RedisStreamsBackend::new(&self.addr, &name)),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_streams_keeps_the_contract_under_faults() {
    let Some(service) = redis("redis_streams_keeps_the_contract_under_faults").await else { return };
    let target = Redis::new(&service.url);
    broker_testkit::faults::run_all(&target).await;
    target.cleanup().await;
}
