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

mod classify;
mod config;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use broker_core::backoff::Backoff;
use broker_core::{
    Backend, BackendFactory, CloseReport, ConfigError, Configured, Error, Event, EventBroker, EventId, EventSource,
    Position, PublishOptions, Receipt, Received, Settle, SourceOptions, StartFrom, async_trait,
};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
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

/// The last error librdkafka reported on a client (an SSL handshake or SASL failure), so a
/// connection failure can say why instead of only "timed out".
#[derive(Default)]
struct LastError(Mutex<Option<String>>);

impl LastError {
    fn record(&self, error: &KafkaError, reason: &str) {
        let mut last = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        // "All brokers are down" follows the error that says why (an SSL or SASL failure): keep that.
        if last.is_some() && error.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown) {
            return;
        }
        *last = Some(format!("{error}: {reason}"));
    }

    /// `what`, with the last reported error when there is one.
    fn explain(&self, what: impl std::fmt::Display) -> String {
        match self.0.lock().unwrap_or_else(PoisonError::into_inner).take() {
            Some(last) => format!("{what} (last broker error: {last})"),
            None => what.to_string(),
        }
    }
}

/// The admin client's context: records errors like the producer's.
struct AdminContext(Arc<LastError>);

impl ClientContext for AdminContext {
    fn error(&self, error: KafkaError, reason: &str) {
        self.0.record(&error, reason);
        tracing::warn!("kafka: {error}: {reason}");
    }
}

/// State shared by the broker and the delivery reports of every producer it creates.
#[derive(Default)]
struct Shared {
    /// The last error librdkafka reported.
    last_error: Arc<LastError>,
    /// Set while closing: failed events are kept for the close report.
    closing: AtomicBool,
    undelivered: Mutex<Vec<Event>>,
    /// Cleared on "all brokers down", set by successful deliveries and probes.
    ready: AtomicBool,
    /// Events a producer failed for a reason that is not theirs (an unknown or fatal broker
    /// error, a purge during a reset): they go again, in publish order, through a new producer.
    resend: Mutex<Vec<Resend>>,
    reset_needed: AtomicBool,
    resetting: AtomicBool,
    /// How many times the producer was replaced.
    resets: AtomicU64,
}

/// What travels with each message to its delivery report.
struct Tracked {
    settle: Settle,
    /// Publish order, so re-sent events keep it.
    seq: u64,
    /// How many producer resets this event went through.
    attempts: u32,
}

struct Resend {
    payload: Vec<u8>,
    key: Option<Vec<u8>>,
    /// The message's headers as first sent (Rasa's and the event's own).
    headers: Option<OwnedHeaders>,
    tracked: Box<Tracked>,
}

/// After this many producer resets an event fails with the last error.
const MAX_RESETS_PER_EVENT: u32 = 5;

fn io_error(e: impl std::fmt::Display) -> Error {
    Error::Io { backend: NAME, operation: "producing".into(), reason: e.to_string(), cause: None }
}

/// Receives delivery reports on librdkafka's polling thread and settles receipts there.
struct Reports {
    shared: Arc<Shared>,
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
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.shared.last_error.record(&error, reason);
        match error.rdkafka_error_code() {
            Some(RDKafkaErrorCode::AllBrokersDown) => self.shared.ready.store(false, Ordering::Release),
            Some(RDKafkaErrorCode::BrokerTransportFailure) => {
                tracing::debug!("kafka: transport failure (librdkafka reconnects): {reason}");
                return;
            }
            _ => {}
        }
        tracing::warn!("kafka: {error}: {reason}");
    }
}

impl ProducerContext for Reports {
    type DeliveryOpaque = Box<Tracked>;

    fn delivery(&self, result: &DeliveryResult<'_>, tracked: Box<Tracked>) {
        let shared = &self.shared;
        let (e, m) = match result {
            Ok(m) => {
                shared.ready.store(true, Ordering::Release);
                tracked.settle.delivered(Some(Position::Partition { partition: m.partition(), offset: m.offset() }));
                return;
            }
            Err((e, m)) => (e, m),
        };
        let code = e.rdkafka_error_code();
        if classify::events_fault(code) {
            let event_id = tracked.settle.id().to_string();
            tracked.settle.settle(Err(Error::Rejected { backend: NAME, event_id, reason: e.to_string() }));
            return;
        }
        let purged = matches!(code, Some(RDKafkaErrorCode::PurgeQueue) | Some(RDKafkaErrorCode::PurgeInflight));
        if shared.closing.load(Ordering::Acquire) {
            if let Some(event) = m.payload().and_then(|p| Event::from_json(p).ok()) {
                shared
                    .undelivered
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(event.with_id(tracked.settle.id()));
            }
            tracked.settle.settle(Err(if purged { Error::Timeout(Duration::ZERO) } else { io_error(e) }));
            return;
        }
        if tracked.attempts >= MAX_RESETS_PER_EVENT {
            tracked.settle.settle(Err(io_error(format!("{e} (after {} producer resets)", tracked.attempts))));
            return;
        }
        // Not this event's fault: it goes again, in order, through a new producer.
        if !purged {
            tracing::warn!("kafka: {e}; the producer is replaced and the event sent again");
        }
        let resend = Resend {
            payload: m.payload().unwrap_or_default().to_vec(),
            key: m.key().map(<[u8]>::to_vec),
            headers: m.headers().map(|h| h.detach()),
            tracked,
        };
        shared.resend.lock().unwrap_or_else(PoisonError::into_inner).push(resend);
        if !purged {
            shared.reset_needed.store(true, Ordering::Release);
        }
    }
}

type KafkaProducer = ThreadedProducer<Reports>;

/// A connected Kafka broker (what [`KafkaBackend::open`] returns; `connect` boxes it).
pub struct KafkaBroker {
    /// The producer; replaced (under the write lock) after an error that is not an event's.
    producer: Arc<RwLock<Arc<KafkaProducer>>>,
    shared: Arc<Shared>,
    config: KafkaConfig,
    environment: Arc<str>,
    closed: Arc<AtomicBool>,
    seq: AtomicU64,
    /// What the first close could not deliver, for a second close.
    close_result: tokio::sync::Mutex<Option<Vec<Event>>>,
}

impl Drop for KafkaBroker {
    /// Dropped without `close`: the supervisor stops, and the producer with its thread goes
    /// with the last handle (librdkafka purges what it still holds).
    fn drop(&mut self) {
        self.closed.store(true, Ordering::Release);
    }
}

/// `RASA_ENVIRONMENT` as Rasa sends it.
fn rasa_environment() -> String {
    std::env::var("RASA_ENVIRONMENT").unwrap_or_else(|_| "RASA_ENVIRONMENT_NOT_SET".to_owned())
}

/// Rasa's headers, then the event's own (`PublishOptions::headers`).
fn headers(environment: &str, id: &str, extra: &[(String, String)]) -> OwnedHeaders {
    let mut headers = OwnedHeaders::new_with_capacity(2 + extra.len())
        .insert(Header { key: "RASA_ENVIRONMENT", value: Some(environment.as_bytes()) })
        .insert(Header { key: EVENT_ID_HEADER, value: Some(id.as_bytes()) });
    for (k, v) in extra {
        headers = headers.insert(Header { key: k, value: Some(v.as_bytes()) });
    }
    headers
}

fn new_producer(config: &KafkaConfig, shared: &Arc<Shared>) -> Result<KafkaProducer, Error> {
    config
        .producer_config()
        .create_with_context(Reports { shared: shared.clone() })
        .map_err(|e| unavailable(format!("{}: {e}", config.bootstrap)))
}

/// Replaces the producer: publishers wait on the lock, the old producer's queue is purged into
/// the resend list, and everything there goes again, in publish order, through a new producer.
fn reset(producer: &RwLock<Arc<KafkaProducer>>, shared: &Arc<Shared>, config: &KafkaConfig, environment: &str) {
    let mut guard = producer.write().unwrap_or_else(PoisonError::into_inner);
    shared.resetting.store(true, Ordering::Release);
    shared.reset_needed.store(false, Ordering::Release);
    guard.purge(PurgeConfig::default().queue().inflight());
    let _ = guard.flush(Duration::from_secs(10));
    let fresh = match new_producer(config, shared) {
        Ok(p) => Arc::new(p),
        Err(e) => {
            tracing::error!("kafka: cannot create a new producer: {e}");
            shared.reset_needed.store(true, Ordering::Release);
            shared.resetting.store(false, Ordering::Release);
            return;
        }
    };
    let mut pending = std::mem::take(&mut *shared.resend.lock().unwrap_or_else(PoisonError::into_inner));
    pending.sort_by_key(|r| r.tracked.seq);
    tracing::warn!("kafka: new producer; sending {} events again, in order", pending.len());
    for r in pending {
        let id = r.tracked.settle.id().to_string();
        let mut tracked = r.tracked;
        tracked.attempts += 1;
        let sent_headers = r.headers.unwrap_or_else(|| headers(environment, &id, &[]));
        loop {
            let mut record: BaseRecord<'_, [u8], [u8], Box<Tracked>> =
                BaseRecord::with_opaque_to(&config.topic, tracked)
                    .payload(&r.payload[..])
                    .headers(sent_headers.clone());
            if let Some(k) = r.key.as_deref() {
                record = record.key(k);
            }
            match fresh.send(record) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), record)) => {
                    tracked = record.delivery_opaque;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err((e, record)) => {
                    record.delivery_opaque.settle.settle(Err(io_error(e)));
                    break;
                }
            }
        }
    }
    *guard = fresh;
    shared.resets.fetch_add(1, Ordering::Relaxed);
    shared.resetting.store(false, Ordering::Release);
}

async fn ensure_topic(config: &KafkaConfig, last_error: &Arc<LastError>) -> Result<(), Error> {
    let Some((partitions, replication)) = config.create_topic else { return Ok(()) };
    let admin: AdminClient<AdminContext> = config
        .client_config()
        .create_with_context(AdminContext(last_error.clone()))
        .map_err(|e| unavailable(format!("{}: {e}", config.bootstrap)))?;
    let topic = NewTopic::new(&config.topic, partitions, TopicReplication::Fixed(replication));
    let opts = AdminOptions::new()
        .operation_timeout(Some(Duration::from_secs(10)))
        .request_timeout(Some(Duration::from_secs(10)));
    let results = admin.create_topics([&topic], &opts).await.map_err(|e| {
        unavailable(last_error.explain(format!("{}: creating topic {}: {e}", config.bootstrap, config.topic)))
    })?;
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
        Ok(Box::new(self.open().await?))
    }

    async fn source(&self, options: &SourceOptions) -> Result<Box<dyn EventSource>, Error> {
        KafkaSource::open(&self.config, options).map(|s| Box::new(s) as Box<dyn EventSource>)
    }
}

impl KafkaBackend {
    /// Creates the topic when configured, checks that the broker answers, and starts the
    /// producer; the typed broker (`connect` boxes it).
    pub async fn open(&self) -> Result<KafkaBroker, Error> {
        let shared = Arc::new(Shared { ready: AtomicBool::new(true), ..Shared::default() });
        ensure_topic(&self.config, &shared.last_error).await?;
        let producer = Arc::new(new_producer(&self.config, &shared)?);
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
            Err(e) => return Err(unavailable(shared.last_error.explain(format!("{}: {e}", self.config.bootstrap)))),
        }
        let broker = KafkaBroker {
            producer: Arc::new(RwLock::new(producer)),
            shared,
            config: self.config.clone(),
            environment: rasa_environment().into(),
            closed: Arc::new(AtomicBool::new(false)),
            seq: AtomicU64::new(0),
            close_result: tokio::sync::Mutex::new(None),
        };
        // The supervisor that replaces the producer when a delivery report asks for it.
        let (producer, shared, config, environment, closed) = (
            broker.producer.clone(),
            broker.shared.clone(),
            broker.config.clone(),
            broker.environment.clone(),
            broker.closed.clone(),
        );
        tokio::spawn(async move {
            let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
            while !closed.load(Ordering::Acquire) {
                tokio::time::sleep(Duration::from_millis(50)).await;
                if !shared.reset_needed.load(Ordering::Acquire) {
                    backoff.reset();
                    continue;
                }
                tokio::time::sleep(backoff.next_delay()).await;
                let (p, s, c, e) = (producer.clone(), shared.clone(), config.clone(), environment.clone());
                let _ = tokio::task::spawn_blocking(move || reset(&p, &s, &c, &e)).await;
            }
            // Dropping a producer joins its thread and flushes: not on an async worker.
            drop(tokio::task::spawn_blocking(move || drop(producer)));
        });
        Ok(broker)
    }
}

impl std::fmt::Debug for KafkaBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaBroker").field("topic", &self.config.topic).finish_non_exhaustive()
    }
}

impl KafkaBroker {
    /// How many times the producer was replaced after an error that was not an event's own
    /// (an unknown or fatal broker error); the affected events went again, in order.
    pub fn producer_resets(&self) -> u64 {
        self.shared.resets.load(Ordering::Relaxed)
    }

    fn current(&self) -> Arc<KafkaProducer> {
        self.producer.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Whether events wait to go again through a new producer.
    fn resending(&self) -> bool {
        self.shared.resetting.load(Ordering::Acquire)
            || self.shared.reset_needed.load(Ordering::Acquire)
            || !self.shared.resend.lock().unwrap_or_else(PoisonError::into_inner).is_empty()
    }
}

#[async_trait]
impl EventBroker for KafkaBroker {
    fn backend(&self) -> &'static str {
        NAME
    }

    async fn publish_with(&self, event: Event, options: PublishOptions) -> Result<Receipt, Error> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::Closed);
        }
        let id = event.id();
        let (receipt, settle) = Receipt::channel(id);
        let (json, sender) = event.into_parts();
        let id_text = id.to_string();
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let mut tracked = Box::new(Tracked { settle, seq, attempts: 0 });
        loop {
            let sent = {
                // A reset holds the write side: no event slips into a producer being replaced.
                let producer = self.producer.read().unwrap_or_else(PoisonError::into_inner);
                let mut record: BaseRecord<'_, str, [u8], Box<Tracked>> = BaseRecord::with_opaque_to(
                    &self.config.topic,
                    tracked,
                )
                .payload(&json[..])
                .headers(headers(&self.environment, &id_text, &options.headers));
                if self.config.partition_by_sender {
                    if let Some(key) = sender.as_deref() {
                        record = record.key(key);
                    }
                }
                producer.send(record).map_err(|(e, record)| (e, record.delivery_opaque))
            };
            match sent {
                Ok(()) => return Ok(receipt),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    tracked = back;
                    if !self.config.blocks_when_full() {
                        let capacity =
                            self.config.queue_size.unwrap_or(self.config.delivery.buffer_size as u64) as usize;
                        return Err(Error::BufferFull { capacity });
                    }
                    if self.closed.load(Ordering::Acquire) {
                        return Err(Error::Closed);
                    }
                    // Back-pressure without blocking the caller's thread.
                    tokio::time::sleep(FULL_WAIT).await;
                }
                Err((e, back)) if classify::events_fault(e.rdkafka_error_code()) => {
                    let reason = e.to_string();
                    back.settle.settle(Err(Error::Rejected { backend: NAME, event_id: id_text.clone(), reason }));
                    return Ok(receipt);
                }
                Err((e, back)) => {
                    // Not the event's fault (a fatal idempotence error while a reset is pending,
                    // an unknown error): it waits in the resend list, in publish order, and goes
                    // through the new producer.
                    tracing::warn!("kafka: {e}; the event waits for the new producer");
                    let key = if self.config.partition_by_sender { sender.map(String::into_bytes) } else { None };
                    let resend = Resend {
                        payload: json,
                        key,
                        headers: Some(headers(&self.environment, &id_text, &options.headers)),
                        tracked: back,
                    };
                    self.shared.resend.lock().unwrap_or_else(PoisonError::into_inner).push(resend);
                    self.shared.reset_needed.store(true, Ordering::Release);
                    return Ok(receipt);
                }
            }
        }
    }

    async fn flush(&self) -> Result<(), Error> {
        // Through resets too: until nothing is queued, in flight or waiting to go again.
        loop {
            let producer = self.current();
            let flushed = tokio::task::spawn_blocking(move || producer.flush(Duration::from_secs(3600)))
                .await
                .map_err(unavailable)?;
            flushed.map_err(|e| Error::Io {
                backend: NAME,
                operation: "flushing".into(),
                reason: e.to_string(),
                cause: None,
            })?;
            if !self.resending() && self.current().in_flight_count() == 0 {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn is_ready(&self) -> bool {
        if self.closed.load(Ordering::Acquire) {
            return false;
        }
        let producer = self.current();
        let topic = self.config.topic.clone();
        let probe =
            tokio::task::spawn_blocking(move || producer.client().fetch_metadata(Some(&topic), Duration::from_secs(2)))
                .await;
        // A metadata round trip is the truth about the broker right now.
        let up = matches!(probe, Ok(Ok(_)));
        self.shared.ready.store(up, Ordering::Release);
        up
    }

    async fn close(&self) -> Result<CloseReport, Error> {
        let mut first = self.close_result.lock().await;
        if let Some(done) = first.as_ref() {
            // A second close says what the first could not deliver.
            return Ok(CloseReport::new(done.clone()));
        }
        let report = self.close_once().await?;
        *first = Some(report.undelivered.clone());
        Ok(report)
    }
}

impl KafkaBroker {
    async fn close_once(&self) -> Result<CloseReport, Error> {
        self.closed.store(true, Ordering::Release);
        let deadline = self.config.delivery.close_timeout;
        if !matches!(tokio::time::timeout(deadline, self.flush()).await, Ok(Ok(()))) {
            // What is queued, in flight or waiting to go again at the deadline is handed back.
            self.shared.closing.store(true, Ordering::Release);
            let producer = self.current();
            tokio::task::spawn_blocking(move || {
                producer.purge(PurgeConfig::default().queue().inflight());
                let _ = producer.flush(Duration::from_secs(5));
            })
            .await
            .map_err(unavailable)?;
            let waiting = std::mem::take(&mut *self.shared.resend.lock().unwrap_or_else(PoisonError::into_inner));
            let mut undelivered = self.shared.undelivered.lock().unwrap_or_else(PoisonError::into_inner);
            for r in waiting {
                if let Ok(event) = Event::from_json(&r.payload) {
                    undelivered.push(event.with_id(r.tracked.settle.id()));
                }
                r.tracked.settle.settle(Err(Error::Timeout(deadline)));
            }
        }
        let undelivered = std::mem::take(&mut *self.shared.undelivered.lock().unwrap_or_else(PoisonError::into_inner));
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
                            // Past every offset Kafka can hold: the end.
                            StartFrom::Offset(o) => i64::try_from(o).map_or(Offset::End, Offset::Offset),
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
                                Ok(Some(Received::new(
                                    event,
                                    payload,
                                    position,
                                    u64::try_from(offset.saturating_add(1)).ok(),
                                )))
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
