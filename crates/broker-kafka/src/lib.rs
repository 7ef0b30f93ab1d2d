//! The Kafka event broker (`type: kafka`) on rdkafka (librdkafka built from source with TLS).
//!
//! - **Configuration** (rasa-compat §3): `url` (a comma-separated string or a list), `topic`
//!   (`rasa_core_events`), `client_id`, `partition_by_sender`, `security_protocol` (PLAINTEXT,
//!   SASL_PLAINTEXT (Rasa's default), SSL, SASL_SSL; any case), `sasl_username`,
//!   `sasl_password`, `sasl_mechanism` (PLAIN, SCRAM-SHA-256, SCRAM-SHA-512, OAUTHBEARER, GSSAPI
//!   with the `gssapi` feature), `ssl_cafile`, `ssl_certfile`, `ssl_keyfile`, `ssl_check_hostname`
//!   (on unless explicitly `false`), `queue_size`. Ours: `create_topic` (+ `partitions`,
//!   `replication_factor`), `message_timeout` (seconds; 0, the default, waits through outages),
//!   `max_event_bytes`, a `librdkafka:` mapping of extra settings passed through as given, and the
//!   delivery options.
//! - **Messages**: value = the Rasa encoding; key = `sender_id` with `partition_by_sender`;
//!   headers `RASA_ENVIRONMENT` (the variable, or `RASA_ENVIRONMENT_NOT_SET`) and `rasa-event-id`
//!   (the event's stable id, for consumers that drop duplicates).
//! - **Delivery** (contracts §A): `acks=all` with idempotence, so order per key survives retries;
//!   each event's receipt is settled from its delivery report (no future per message); librdkafka's
//!   queue is the bounded buffer (`when_full: block` waits for room without blocking the caller's
//!   thread; `error` fails at once); an oversize event fails alone; `close` flushes within the
//!   deadline, then purges and returns what was not delivered.
//! - **Consuming** (contracts §B): a consumer group; from the beginning, or from the group's
//!   committed offset; an offset is committed once its event was handed over and acknowledged.
//!
//! ```no_run
//! use broker_core::{Backend, Event, EventBroker};
//! use broker_kafka::{KafkaBackend, KafkaConfig};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), broker_core::Error> {
//! let config = KafkaConfig::plaintext("127.0.0.1:9092", "rasa_core_events").partition_by_sender(true);
//! let broker = KafkaBackend::new(config).connect().await?;
//! let line = br#"{"sender_id": "a", "event": "restart", "timestamp": 1.5}"#;
//! let delivered = broker.publish(Event::from_json(line).expect("valid")).await?.await?;
//! println!("at {:?}", delivered.position);
//! broker.close().await?;
//! # Ok(())
//! # }
//! ```

mod config;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use broker_core::{
    Backend, BackendFactory, CloseReport, ConfigError, Configured, Error, Event, EventBroker, EventId, EventSource,
    Position, Receipt, Received, Settle, SourceOptions, StartFrom, async_trait,
};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, PurgeConfig, ThreadedProducer};
use rdkafka::{ClientContext, Offset, TopicPartitionList};

use config::NAME;
pub use config::{DEFAULT_TOPIC, KafkaConfig, Sasl, SecurityProtocol};

/// The header carrying the event's stable id.
pub const EVENT_ID_HEADER: &str = "rasa-event-id";

/// How long to wait between attempts when librdkafka's queue is full.
const FULL_WAIT: Duration = Duration::from_millis(2);

/// A configured Kafka backend.
#[derive(Debug, Clone)]
pub struct KafkaBackend {
    config: KafkaConfig,
}

impl KafkaBackend {
    /// A backend with `config`.
    pub fn new(config: KafkaConfig) -> KafkaBackend {
        KafkaBackend { config }
    }

    /// The settings.
    pub fn config(&self) -> &KafkaConfig {
        &self.config
    }
}

/// Factory for `type: kafka`.
#[derive(Debug, Default, Clone, Copy)]
pub struct KafkaFactory;

impl BackendFactory for KafkaFactory {
    fn name(&self) -> &'static str {
        NAME
    }

    fn configure(&self, options: broker_core::Options) -> Result<Configured, ConfigError> {
        let (config, warnings) = KafkaConfig::from_options(options)?;
        Ok(Configured::new(Box::new(KafkaBackend::new(config)), warnings))
    }
}

fn unavailable(what: impl std::fmt::Display) -> Error {
    Error::Unavailable { backend: NAME, reason: what.to_string(), cause: None }
}

/// Receives delivery reports on librdkafka's polling thread and settles receipts there.
struct Reports {
    /// Set while closing: failed events are kept for the close report.
    closing: AtomicBool,
    undelivered: Mutex<Vec<Event>>,
    /// Cleared on "all brokers down", set on every successful delivery.
    ready: AtomicBool,
}

impl ClientContext for Reports {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        use rdkafka::config::RDKafkaLogLevel as L;
        match level {
            L::Emerg | L::Alert | L::Critical | L::Error => tracing::error!("librdkafka {fac}: {message}"),
            L::Warning => tracing::warn!("librdkafka {fac}: {message}"),
            L::Notice | L::Info => tracing::info!("librdkafka {fac}: {message}"),
            L::Debug => tracing::debug!("librdkafka {fac}: {message}"),
        }
        if std::env::var_os("BROKER_KAFKA_TRACE").is_some() {
            eprintln!("librdkafka {level:?} {fac}: {message}");
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if matches!(error.rdkafka_error_code(), Some(RDKafkaErrorCode::AllBrokersDown)) {
            self.ready.store(false, Ordering::Release);
        }
        if matches!(error.rdkafka_error_code(), Some(RDKafkaErrorCode::BrokerTransportFailure)) {
            tracing::debug!("kafka: transport failure (librdkafka reconnects): {reason}");
            return;
        }
        tracing::warn!("kafka: {error}: {reason}");
    }
}

impl ProducerContext for Reports {
    type DeliveryOpaque = Box<Settle>;

    fn delivery(&self, result: &DeliveryResult<'_>, settle: Box<Settle>) {
        match result {
            Ok(m) => {
                self.ready.store(true, Ordering::Release);
                settle.delivered(Some(Position::Partition { partition: m.partition(), offset: m.offset() }));
            }
            Err((e, m)) => {
                let event_id = settle.id().to_string();
                let error = match e.rdkafka_error_code() {
                    Some(RDKafkaErrorCode::MessageSizeTooLarge) | Some(RDKafkaErrorCode::InvalidMessage) => {
                        Error::Rejected { backend: NAME, event_id, reason: e.to_string() }
                    }
                    Some(RDKafkaErrorCode::PurgeQueue) | Some(RDKafkaErrorCode::PurgeInflight) => {
                        if self.closing.load(Ordering::Acquire) {
                            if let Some(event) = m.payload().and_then(|p| Event::from_json(p).ok()) {
                                self.undelivered
                                    .lock()
                                    .unwrap_or_else(PoisonError::into_inner)
                                    .push(event.with_id(settle.id()));
                            }
                        }
                        Error::Timeout(Duration::ZERO)
                    }
                    _ => Error::Io { backend: NAME, operation: "producing".into(), reason: e.to_string(), cause: None },
                };
                settle.settle(Err(error));
            }
        }
    }
}

struct KafkaBroker {
    producer: Arc<ThreadedProducer<Reports>>,
    config: KafkaConfig,
    environment: String,
    closed: AtomicBool,
}

/// `RASA_ENVIRONMENT` as Rasa sends it.
fn rasa_environment() -> String {
    std::env::var("RASA_ENVIRONMENT").unwrap_or_else(|_| "RASA_ENVIRONMENT_NOT_SET".to_owned())
}

async fn ensure_topic(config: &KafkaConfig) -> Result<(), Error> {
    let Some((partitions, replication)) = config.create_topic else { return Ok(()) };
    let admin: AdminClient<DefaultClientContext> =
        config.client_config().create().map_err(|e| unavailable(format!("{}: {e}", config.bootstrap)))?;
    let topic = NewTopic::new(&config.topic, partitions, TopicReplication::Fixed(replication));
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let results = admin
        .create_topics([&topic], &opts)
        .await
        .map_err(|e| unavailable(format!("creating topic {}: {e}", config.topic)))?;
    for r in results {
        match r {
            Ok(_) => {}
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((t, code)) => return Err(unavailable(format!("creating topic {t}: {code}"))),
        }
    }
    Ok(())
}

#[async_trait]
impl Backend for KafkaBackend {
    fn name(&self) -> &'static str {
        NAME
    }

    fn describe(&self) -> String {
        format!("kafka {} topic {}", self.config.bootstrap, self.config.topic)
    }

    async fn connect(&self) -> Result<Box<dyn EventBroker>, Error> {
        ensure_topic(&self.config).await?;
        let context = Reports {
            closing: AtomicBool::new(false),
            undelivered: Mutex::new(Vec::new()),
            ready: AtomicBool::new(true),
        };
        let producer: ThreadedProducer<Reports> = self
            .config
            .producer_config()
            .create_with_context(context)
            .map_err(|e| unavailable(format!("{}: {e}", self.config.bootstrap)))?;
        let producer = Arc::new(producer);
        // Fail fast when nothing answers at start (Rasa waits; we say why).
        let probe = producer.clone();
        let topic = self.config.topic.clone();
        let timeout = Duration::from_secs(10);
        let metadata = tokio::task::spawn_blocking(move || probe.client().fetch_metadata(Some(&topic), timeout))
            .await
            .map_err(unavailable)?;
        match metadata {
            Ok(m) if m.topics().iter().any(|t| t.name() == self.config.topic && t.error().is_none()) => {}
            Ok(_) => {
                return Err(unavailable(format!(
                    "{}: topic {} does not exist (create it, or set `create_topic: true`)",
                    self.config.bootstrap, self.config.topic
                )));
            }
            Err(e) => return Err(unavailable(format!("{}: {e}", self.config.bootstrap))),
        }
        Ok(Box::new(KafkaBroker {
            producer,
            config: self.config.clone(),
            environment: rasa_environment(),
            closed: AtomicBool::new(false),
        }))
    }

    async fn source(&self, options: &SourceOptions) -> Result<Box<dyn EventSource>, Error> {
        KafkaSource::open(&self.config, options).map(|s| Box::new(s) as Box<dyn EventSource>)
    }
}

#[async_trait]
impl EventBroker for KafkaBroker {
    fn backend(&self) -> &'static str {
        NAME
    }

    async fn publish(&self, event: Event) -> Result<Receipt, Error> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::Closed);
        }
        let id = event.id();
        let (receipt, settle) = Receipt::channel(id);
        let (json, sender) = event.into_parts();
        let id_text = id.to_string();
        let mut settle = Box::new(settle);
        loop {
            let headers = OwnedHeaders::new_with_capacity(2)
                .insert(Header { key: "RASA_ENVIRONMENT", value: Some(self.environment.as_bytes()) })
                .insert(Header { key: EVENT_ID_HEADER, value: Some(id_text.as_bytes()) });
            let mut record: BaseRecord<'_, str, [u8], Box<Settle>> =
                BaseRecord::with_opaque_to(&self.config.topic, settle).payload(&json[..]).headers(headers);
            if self.config.partition_by_sender {
                if let Some(key) = sender.as_deref() {
                    record = record.key(key);
                }
            }
            match self.producer.send(record) {
                Ok(()) => return Ok(receipt),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), record)) => {
                    settle = record.delivery_opaque;
                    if !self.config.blocks_when_full() {
                        return Err(Error::BufferFull {
                            capacity: self.config.queue_size.unwrap_or(self.config.delivery.buffer_size as u64)
                                as usize,
                        });
                    }
                    if self.closed.load(Ordering::Acquire) {
                        return Err(Error::Closed);
                    }
                    // Back-pressure without blocking the caller's thread.
                    tokio::time::sleep(FULL_WAIT).await;
                }
                Err((e, record)) => {
                    let error = match e.rdkafka_error_code() {
                        Some(RDKafkaErrorCode::MessageSizeTooLarge) => {
                            Error::Rejected { backend: NAME, event_id: id_text.clone(), reason: e.to_string() }
                        }
                        _ => Error::Io {
                            backend: NAME,
                            operation: "producing".into(),
                            reason: e.to_string(),
                            cause: None,
                        },
                    };
                    record.delivery_opaque.settle(Err(error));
                    return Ok(receipt);
                }
            }
        }
    }

    async fn flush(&self) -> Result<(), Error> {
        let producer = self.producer.clone();
        let result = tokio::task::spawn_blocking(move || producer.flush(Duration::from_secs(3600)))
            .await
            .map_err(unavailable)?;
        result.map_err(|e| Error::Io {
            backend: NAME,
            operation: "flushing".into(),
            reason: e.to_string(),
            cause: None,
        })
    }

    async fn is_ready(&self) -> bool {
        if self.closed.load(Ordering::Acquire) {
            return false;
        }
        let producer = self.producer.clone();
        let topic = self.config.topic.clone();
        let probe =
            tokio::task::spawn_blocking(move || producer.client().fetch_metadata(Some(&topic), Duration::from_secs(2)))
                .await;
        // A metadata round trip is the truth about the broker right now.
        let up = matches!(probe, Ok(Ok(_)));
        self.producer.context().ready.store(up, Ordering::Release);
        up
    }

    async fn close(&self) -> Result<CloseReport, Error> {
        if self.closed.swap(true, Ordering::AcqRel) {
            return Ok(CloseReport::default());
        }
        let producer = self.producer.clone();
        let deadline = self.config.delivery.close_timeout;
        tokio::task::spawn_blocking(move || {
            if producer.flush(deadline).is_err() {
                // What is still queued or in flight at the deadline is handed back.
                producer.context().closing.store(true, Ordering::Release);
                producer.purge(PurgeConfig::default().queue().inflight());
                let _ = producer.flush(Duration::from_secs(5));
            }
        })
        .await
        .map_err(unavailable)?;
        let undelivered =
            std::mem::take(&mut *self.producer.context().undelivered.lock().unwrap_or_else(PoisonError::into_inner));
        Ok(CloseReport::new(undelivered))
    }
}

/// A consumer-group reader. Offsets are committed for events acknowledged with `ack`.
pub struct KafkaSource {
    consumer: Arc<BaseConsumer>,
    topic: String,
    follow: bool,
    buffered: std::collections::VecDeque<Polled>,
}

/// A message taken from librdkafka, not yet handed over.
enum Polled {
    Message { payload: Vec<u8>, partition: i32, offset: i64, id: Option<EventId> },
    Failed(String),
}

impl KafkaSource {
    fn open(config: &KafkaConfig, options: &SourceOptions) -> Result<KafkaSource, Error> {
        let mut c = config.client_config();
        c.set("group.id", options.group.as_deref().unwrap_or("broker-cli"));
        // Offsets are stored when an event is acknowledged (after it was handed over) and
        // committed by librdkafka every second and when the consumer closes.
        c.set("enable.auto.commit", "true");
        c.set("auto.commit.interval.ms", "1000");
        c.set("enable.auto.offset.store", "false");
        c.set("auto.offset.reset", "earliest");
        let consumer: BaseConsumer = c.create().map_err(|e| unavailable(format!("{}: {e}", config.bootstrap)))?;
        match options.start {
            StartFrom::Beginning | StartFrom::Offset(_) => {
                // Read every partition from the start (or the offset), still committing to the
                // group, so a later `Resume` goes on from here.
                let metadata = consumer
                    .fetch_metadata(Some(&config.topic), Duration::from_secs(10))
                    .map_err(|e| unavailable(format!("{}: {e}", config.bootstrap)))?;
                let mut tpl = TopicPartitionList::new();
                for t in metadata.topics().iter().filter(|t| t.name() == config.topic) {
                    for p in t.partitions() {
                        let offset = match options.start {
                            StartFrom::Offset(o) => Offset::Offset(o as i64),
                            _ => Offset::Beginning,
                        };
                        tpl.add_partition_offset(&config.topic, p.id(), offset)
                            .map_err(|e| unavailable(format!("assigning {}: {e}", config.topic)))?;
                    }
                }
                consumer.assign(&tpl).map_err(|e| unavailable(format!("assigning {}: {e}", config.topic)))?;
            }
            _ => {
                consumer
                    .subscribe(&[&config.topic])
                    .map_err(|e| unavailable(format!("subscribing to {}: {e}", config.topic)))?;
            }
        }
        Ok(KafkaSource {
            consumer: Arc::new(consumer),
            topic: config.topic.clone(),
            follow: options.follow,
            buffered: Default::default(),
        })
    }
}

#[async_trait]
impl EventSource for KafkaSource {
    fn backend(&self) -> &'static str {
        NAME
    }

    async fn next(&mut self) -> Result<Option<Received>, Error> {
        let mut idle_polls = 0u32;
        loop {
            if let Some(item) = self.buffered.pop_front() {
                return match item {
                    Polled::Message { payload, partition, offset, id } => {
                        let position = Position::Partition { partition, offset };
                        match Event::from_json(&payload) {
                            Ok(event) => {
                                let event = match id {
                                    Some(id) => event.with_id(id),
                                    None => event,
                                };
                                Ok(Some(Received::new(event, payload, position, Some(offset as u64 + 1))))
                            }
                            Err(e) => {
                                // Skip past it for the group too: a bad message must not stop us.
                                self.commit(partition, offset);
                                Err(Error::Malformed { position, reason: e.to_string() })
                            }
                        }
                    }
                    Polled::Failed(e) => {
                        Err(Error::Io { backend: NAME, operation: "consuming".into(), reason: e, cause: None })
                    }
                };
            }
            let consumer = self.consumer.clone();
            // Polling blocks: do it off the async threads, a batch per hop.
            let batch = tokio::task::spawn_blocking(move || {
                let mut out = Vec::new();
                let mut wait = Duration::from_millis(200);
                while out.len() < 500 {
                    match consumer.poll(wait) {
                        None => break,
                        Some(Err(e)) => {
                            out.push(Polled::Failed(e.to_string()));
                            break;
                        }
                        Some(Ok(m)) => {
                            let id = m
                                .headers()
                                .and_then(|h| h.iter().find(|x| x.key == EVENT_ID_HEADER).and_then(|x| x.value))
                                .and_then(|v| std::str::from_utf8(v).ok())
                                .and_then(EventId::parse_hex);
                            out.push(Polled::Message {
                                payload: m.payload().map(<[u8]>::to_vec).unwrap_or_default(),
                                partition: m.partition(),
                                offset: m.offset(),
                                id,
                            });
                        }
                    }
                    wait = Duration::ZERO;
                }
                out
            })
            .await
            .map_err(unavailable)?;
            if batch.is_empty() {
                idle_polls += 1;
                if !self.follow && idle_polls >= 10 {
                    return Ok(None);
                }
            }
            self.buffered.extend(batch);
        }
    }

    async fn ack(&mut self, received: &Received) -> Result<(), Error> {
        if let Position::Partition { partition, offset } = received.position {
            self.commit(partition, offset);
        }
        Ok(())
    }
}

impl KafkaSource {
    /// Marks `offset` as handed over; librdkafka commits it with the next auto-commit.
    fn commit(&self, partition: i32, offset: i64) {
        if let Err(e) = self.consumer.store_offset(&self.topic, partition, offset) {
            tracing::warn!("kafka: storing the offset {}/{partition}@{offset}: {e}", self.topic);
        }
    }
}
