//! An event broker on Redis Streams, written as a third-party crate would write one: it depends
//! on `broker-core` only (and `broker-testkit` for its tests), and gets batching, retries, the
//! close deadline, readiness and the close report from the shared delivery driver.
//!
//! Each event is one stream entry, `XADD <stream> * data <Rasa's JSON bytes>`; a batch is one
//! pipelined round trip. The source reads entries with `XREAD` from a background task, so
//! dropping `next()` loses nothing. A position is the entry id `ms-seq` as `ms * 65536 + seq`,
//! and [`StartFrom::Offset`] continues after such a position.
//!
//! ```yaml
//! event_broker:
//!   type: redis-streams
//!   url: 127.0.0.1:6379
//!   stream: rasa_events
//! ```
//!
//! ```no_run
//! use broker_core::{Backend, Event, EventBroker};
//! use broker_example_redis::RedisStreamsBackend;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), broker_core::Error> {
//! let backend = RedisStreamsBackend::new("127.0.0.1:6379", "rasa_events");
//! let broker = backend.connect().await?;
//! let line = br#"{"sender_id": "a", "event": "restart", "timestamp": 1.5}"#;
//! broker.publish(Event::from_json(line).expect("valid")).await?.await?;
//! broker.close().await?;
//! # Ok(())
//! # }
//! ```

mod resp;

use std::time::Duration;

use broker_core::delivery::{self, Batch, DriverOptions, Failure, Sink, Verdict};
use broker_core::{
    Backend, BackendFactory, ConfigError, Configured, DeliveryOptions, Error, Event, EventBroker, EventSource, Options,
    Position, Received, SourceOptions, StartFrom, async_trait,
};
use resp::{Conn, Reply, encode};
use tokio::sync::mpsc;

/// The type name in `endpoints.yml`.
pub const NAME: &str = "redis-streams";

/// How long one connect or command may take (plus the block time of a blocking read).
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

fn unavailable(reason: impl Into<String>) -> Error {
    Error::Unavailable { backend: NAME, reason: reason.into(), cause: None }
}

/// `type: redis-streams`: `url` (`host:port`, default `127.0.0.1:6379`), `stream` (default
/// `rasa_events`), and the delivery keys every backend has.
#[derive(Debug, Clone, Copy)]
pub struct RedisStreamsFactory;

impl BackendFactory for RedisStreamsFactory {
    fn name(&self) -> &'static str {
        NAME
    }
    fn configure(&self, mut options: Options) -> Result<Configured, ConfigError> {
        let addr = options.take_str("url")?.unwrap_or_else(|| "127.0.0.1:6379".into());
        let stream = options.take_str("stream")?.unwrap_or_else(|| "rasa_events".into());
        let delivery = DeliveryOptions::take(&mut options)?;
        let driver = DriverOptions::default().take(&mut options)?;
        let known = [&["url", "stream"][..], DeliveryOptions::KEYS, DriverOptions::KEYS].concat();
        let warnings = options.finish(NAME, &known)?;
        let backend = RedisStreamsBackend { addr, stream, delivery, driver };
        Ok(Configured::new(Box::new(backend), warnings))
    }
}

/// A Redis stream as an event broker.
#[derive(Debug, Clone)]
pub struct RedisStreamsBackend {
    addr: String,
    stream: String,
    delivery: DeliveryOptions,
    driver: DriverOptions,
}

impl RedisStreamsBackend {
    /// The stream `stream` on the Redis at `addr` (`host:port`), with the default delivery settings.
    pub fn new(addr: impl Into<String>, stream: impl Into<String>) -> RedisStreamsBackend {
        RedisStreamsBackend {
            addr: addr.into(),
            stream: stream.into(),
            delivery: DeliveryOptions::default(),
            driver: DriverOptions::default(),
        }
    }

    /// With these delivery settings (buffer, `when_full`, `close_timeout`).
    pub fn delivery(mut self, delivery: DeliveryOptions) -> RedisStreamsBackend {
        self.delivery = delivery;
        self
    }

    /// With these driver settings (attempt timeout, batch size, `max_event_bytes`).
    pub fn driver(mut self, driver: DriverOptions) -> RedisStreamsBackend {
        self.driver = driver;
        self
    }
}

/// An entry id `ms-seq` as one number, and back.
fn position_of(id: &[u8]) -> Option<u64> {
    let (ms, seq) = std::str::from_utf8(id).ok()?.split_once('-')?;
    Some(ms.parse::<u64>().ok()?.checked_mul(65_536)? + seq.parse::<u64>().ok()?.min(65_535))
}

fn id_of(position: u64) -> String {
    format!("{}-{}", position / 65_536, position % 65_536)
}

/// The writing side: one pipelined `XADD` per event of a batch.
struct StreamSink {
    addr: String,
    stream: String,
    conn: Option<Conn>,
}

impl StreamSink {
    async fn conn(&mut self) -> Result<&mut Conn, Error> {
        if self.conn.is_none() {
            self.conn = Some(Conn::open(&self.addr, CALL_TIMEOUT).await.map_err(unavailable)?);
        }
        Ok(self.conn.as_mut().expect("just opened"))
    }
}

#[async_trait]
impl Sink for StreamSink {
    async fn write(&mut self, batch: &Batch) -> Result<Vec<Verdict>, Error> {
        let mut commands = Vec::new();
        for r in batch.iter() {
            encode(&mut commands, &[b"XADD", self.stream.as_bytes(), b"*", b"data", &r.json]);
        }
        let conn = self.conn().await?;
        let replies = match conn.call(&commands, batch.len(), Duration::ZERO).await {
            Ok(replies) => replies,
            Err(e) => {
                self.conn = None;
                return Err(unavailable(e));
            }
        };
        Ok(replies
            .into_iter()
            .map(|reply| match reply {
                Reply::Bulk(Some(id)) => Verdict::Delivered(position_of(&id).map(Position::Offset)),
                Reply::Error(e) => Verdict::Rejected(format!("Redis refused the entry: {e}")),
                other => Verdict::Rejected(format!("unexpected reply to XADD: {other:?}")),
            })
            .collect())
    }

    async fn recover(&mut self, _failure: &Failure) -> Result<(), Error> {
        self.conn = None;
        self.conn().await.map(|_| ())
    }

    async fn ping(&mut self) -> Result<(), Error> {
        let mut command = Vec::new();
        encode(&mut command, &[b"PING"]);
        let result = self.conn().await?.call(&command, 1, Duration::ZERO).await;
        result.map(|_| ()).map_err(|e| {
            self.conn = None;
            unavailable(e)
        })
    }
}

#[async_trait]
impl Backend for RedisStreamsBackend {
    fn name(&self) -> &'static str {
        NAME
    }
    fn describe(&self) -> String {
        format!("redis-streams {} stream {}", self.addr, self.stream)
    }
    async fn connect(&self) -> Result<Box<dyn EventBroker>, Error> {
        let mut sink = StreamSink { addr: self.addr.clone(), stream: self.stream.clone(), conn: None };
        sink.conn().await?; // fail fast when Redis is not there
        let meter = broker_core::metrics::Meter::new(NAME, self.stream.clone());
        Ok(Box::new(delivery::start(meter, sink, self.delivery.clone(), self.driver.clone())))
    }
    async fn source(&self, options: &SourceOptions) -> Result<Box<dyn EventSource>, Error> {
        let mut conn = Conn::open(&self.addr, CALL_TIMEOUT).await.map_err(unavailable)?;
        let after = match options.start {
            StartFrom::Beginning => "0-0".to_owned(),
            StartFrom::Offset(p) => id_of(p),
            // Resume, and whatever later variants mean: from the newest entry on.
            _ => {
                let mut command = Vec::new();
                encode(&mut command, &[b"XREVRANGE", self.stream.as_bytes(), b"+", b"-", b"COUNT", b"1"]);
                match conn.call(&command, 1, Duration::ZERO).await.map_err(unavailable)?.pop() {
                    Some(Reply::Array(Some(entries))) => match entries.first() {
                        Some(Reply::Array(Some(entry))) => match entry.first() {
                            Some(Reply::Bulk(Some(id))) => String::from_utf8_lossy(id).into_owned(),
                            _ => "0-0".to_owned(),
                        },
                        _ => "0-0".to_owned(),
                    },
                    _ => "0-0".to_owned(),
                }
            }
        };
        let (tx, rx) = mpsc::channel(256);
        let reader = Reader { addr: self.addr.clone(), stream: self.stream.clone(), follow: options.follow, after };
        let task = tokio::spawn(reader.run(conn, tx));
        Ok(Box::new(StreamSource { rx, task }))
    }
}

/// Reads the stream in the background and hands the entries over in order.
struct Reader {
    addr: String,
    stream: String,
    follow: bool,
    after: String,
}

impl Reader {
    async fn run(mut self, conn: Conn, tx: mpsc::Sender<Result<Received, Error>>) {
        let mut conn = Some(conn);
        let mut backoff = broker_core::backoff::Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        loop {
            let mut command = Vec::new();
            let stream = self.stream.as_bytes();
            if self.follow {
                encode(
                    &mut command,
                    &[b"XREAD", b"COUNT", b"500", b"BLOCK", b"1000", b"STREAMS", stream, self.after.as_bytes()],
                );
            } else {
                encode(&mut command, &[b"XREAD", b"COUNT", b"500", b"STREAMS", stream, self.after.as_bytes()]);
            }
            let c = match conn.as_mut() {
                Some(c) => c,
                None => match Conn::open(&self.addr, CALL_TIMEOUT).await {
                    Ok(c) => conn.insert(c),
                    Err(e) => {
                        tracing::warn!("redis-streams source: {e}; reconnecting");
                        tokio::time::sleep(backoff.next_delay()).await;
                        continue;
                    }
                },
            };
            let reply = match c.call(&command, 1, Duration::from_secs(1)).await {
                Ok(mut replies) => replies.pop(),
                Err(e) => {
                    tracing::warn!("redis-streams source: {e}; reconnecting");
                    conn = None;
                    tokio::time::sleep(backoff.next_delay()).await;
                    continue;
                }
            };
            backoff.reset();
            // [[stream, [[id, [field, value, ...]], ...]]], or nil when there is nothing new.
            let entries = match reply {
                Some(Reply::Array(Some(mut streams))) if !streams.is_empty() => match streams.swap_remove(0) {
                    Reply::Array(Some(mut pair)) if pair.len() == 2 => pair.pop(),
                    _ => None,
                },
                Some(Reply::Error(e)) => {
                    let _ = tx.send(Err(unavailable(format!("XREAD failed: {e}")))).await;
                    return;
                }
                _ => None,
            };
            let Some(Reply::Array(Some(entries))) = entries else {
                if self.follow {
                    continue;
                }
                return; // not following and nothing more: the stream ends
            };
            for entry in entries {
                let Reply::Array(Some(mut parts)) = entry else { continue };
                let (Some(Reply::Array(Some(fields))), Some(Reply::Bulk(Some(id)))) = (parts.pop(), parts.pop()) else {
                    continue;
                };
                self.after = String::from_utf8_lossy(&id).into_owned();
                let at = position_of(&id).unwrap_or(0);
                let item = received(at, fields);
                if tx.send(item).await.is_err() {
                    return; // the source was closed or dropped
                }
            }
        }
    }
}

/// The entry's `data` field as a consumed event.
fn received(at: u64, fields: Vec<Reply>) -> Result<Received, Error> {
    let position = Position::Offset(at);
    let mut fields = fields.into_iter();
    while let (Some(name), Some(value)) = (fields.next(), fields.next()) {
        if let (Reply::Bulk(Some(name)), Reply::Bulk(Some(raw))) = (name, value) {
            if name == b"data" {
                return match Event::from_json(&raw) {
                    Ok(event) => Ok(Received::new(event, raw, position, Some(at))),
                    Err(e) => Err(Error::Malformed { position, reason: e.to_string() }),
                };
            }
        }
    }
    Err(Error::Malformed { position, reason: "the entry has no data field".into() })
}

/// The consuming side: what the background reader handed over, in order.
struct StreamSource {
    rx: mpsc::Receiver<Result<Received, Error>>,
    task: tokio::task::JoinHandle<()>,
}

#[async_trait]
impl EventSource for StreamSource {
    fn backend(&self) -> &'static str {
        NAME
    }
    async fn next(&mut self) -> Result<Option<Received>, Error> {
        // Receiving from a channel is cancel-safe: an entry is either handed over or still queued.
        self.rx.recv().await.transpose()
    }
    async fn close(&mut self) -> Result<(), Error> {
        self.task.abort();
        Ok(())
    }
}

impl Drop for StreamSource {
    fn drop(&mut self) {
        self.task.abort();
    }
}
