//! The Kafka event broker (`type: kafka`) on rdkafka (librdkafka built from source with TLS).
//!
//! - **Configuration** (docs/rasa-compat.md §3): `url` (a comma-separated string or a list), `topic`
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
//! - **Delivery** (docs/contract.md §A): `acks=all` with idempotence, so order per key survives retries;
//!   each event's receipt is settled from its delivery report (no future per message); librdkafka's
//!   queue is the bounded buffer (`when_full: block` waits for room without blocking the caller's
//!   thread; `error` fails at once); an oversize event fails alone; `close` flushes within the
//!   deadline, then purges and returns what was not delivered.
//! - **Consuming** (docs/contract.md §B): a consumer group; from the beginning, or from the group's
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
//!
//! ## Features
//!
#![doc = document_features::document_features!()]

mod classify;
mod config;
mod producer;
mod reset;
mod source;
mod stats;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use broker_core::backoff::Backoff;
use broker_core::metrics::Meter;
use broker_core::{
    Backend, BackendFactory, CloseReport, ConfigError, Configured, Error, Event, EventBroker, EventId, EventSource,
    Position, PublishOptions, Receipt, Received, Settle, SourceOptions, StartFrom, async_trait,
};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext, PurgeConfig};
use rdkafka::{ClientContext, Offset, TopicPartitionList};

use config::NAME;
pub use config::{DEFAULT_TOPIC, KafkaConfig, Sasl, SecurityProtocol};
pub use producer::KafkaBroker;
use producer::{headers, rasa_environment};
use reset::{KafkaProducer, Resend, Shared, Tracked, new_producer, reset};
pub use source::KafkaSource;

/// The header carrying the event's stable id.
pub const EVENT_ID_HEADER: &str = "rasa-event-id";

/// How long to wait between attempts when librdkafka's queue is full.
pub(crate) const FULL_WAIT: Duration = Duration::from_millis(2);

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

pub(crate) fn unavailable(what: impl std::fmt::Display) -> Error {
    Error::Unavailable { backend: NAME, reason: what.to_string(), cause: None }
}

/// The last error librdkafka reported on a client (an SSL handshake or SASL failure), so a
/// connection failure can say why instead of only "timed out", and whether it was a refusal.
#[derive(Default)]
pub(crate) struct LastError(Mutex<Option<(String, bool)>>);

impl LastError {
    fn record(&self, error: &KafkaError, reason: &str) {
        let mut last = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        // "All brokers are down" follows the error that says why (an SSL or SASL failure): keep that.
        if last.is_some() && error.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown) {
            return;
        }
        let denied = matches!(
            error.rdkafka_error_code(),
            Some(
                RDKafkaErrorCode::Authentication
                    | RDKafkaErrorCode::SaslAuthenticationFailed
                    | RDKafkaErrorCode::SSL
                    | RDKafkaErrorCode::TopicAuthorizationFailed
                    | RDKafkaErrorCode::ClusterAuthorizationFailed
            )
        ) || reason.contains("SSL handshake failed")
            || reason.contains("certificate verify failed")
            || reason.contains("SASL authentication error");
        *last = Some((format!("{error}: {reason}"), denied));
    }

    /// `what` as an error, with the last reported error when there is one: [`Error::Denied`]
    /// when the broker refused our credentials or certificates, else [`Error::Unavailable`].
    pub(crate) fn error(&self, what: impl std::fmt::Display) -> Error {
        match self.0.lock().unwrap_or_else(PoisonError::into_inner).take() {
            Some((last, true)) => {
                Error::Denied { backend: NAME, reason: format!("{what} (last broker error: {last})"), cause: None }
            }
            Some((last, false)) => unavailable(format!("{what} (last broker error: {last})")),
            None => unavailable(what),
        }
    }
}

/// The admin client's context: records errors like the producer's.
pub(crate) struct AdminContext(Arc<LastError>);

impl ClientContext for AdminContext {
    fn error(&self, error: KafkaError, reason: &str) {
        self.0.record(&error, reason);
        tracing::warn!("kafka: {error}: {reason}");
    }

    /// The admin client lives for one request: its statistics say nothing.
    fn stats(&self, _: rdkafka::Statistics) {}
}

impl rdkafka::consumer::ConsumerContext for AdminContext {}

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
    let results = admin
        .create_topics([&topic], &opts)
        .await
        .map_err(|e| last_error.error(format!("{}: creating topic {}: {e}", config.bootstrap, config.topic)))?;
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

    fn close_timeout(&self) -> std::time::Duration {
        self.config.delivery.close_timeout
    }

    async fn connect(&self) -> Result<Box<dyn EventBroker>, Error> {
        Ok(Box::new(self.open().await?))
    }

    async fn source(&self, options: &SourceOptions) -> Result<Box<dyn EventSource>, Error> {
        // Opening fetches metadata (blocking): off the async threads.
        let (config, options) = (self.config.clone(), options.clone());
        let source =
            tokio::task::spawn_blocking(move || KafkaSource::open(&config, &options)).await.map_err(unavailable)??;
        Ok(Box::new(source))
    }

    /// Kafka's protocol gives no product version through librdkafka: the cluster's brokers, from
    /// a metadata request (`Kafka cluster of 1 broker: 1 at 127.0.0.1:9092`).
    async fn server_version(&self) -> Result<Option<String>, Error> {
        let last_error = Arc::new(LastError::default());
        let client: BaseConsumer<AdminContext> = self
            .config
            .client_config()
            .create_with_context(AdminContext(last_error.clone()))
            .map_err(|e| unavailable(format!("{}: {e}", self.config.bootstrap)))?;
        let metadata = tokio::task::spawn_blocking(move || client.fetch_metadata(None, Duration::from_secs(10)))
            .await
            .map_err(unavailable)?
            .map_err(|e| last_error.error(format!("{}: {e}", self.config.bootstrap)))?;
        let brokers: Vec<String> =
            metadata.brokers().iter().map(|b| format!("{} at {}:{}", b.id(), b.host(), b.port())).collect();
        let plural = if brokers.len() == 1 { "" } else { "s" };
        Ok(Some(format!("Kafka cluster of {} broker{plural}: {}", brokers.len(), brokers.join(", "))))
    }
}

impl KafkaBackend {
    /// Creates the topic when configured, checks that the broker answers, and starts the
    /// producer; the typed broker (`connect` boxes it).
    #[tracing::instrument(name = "connect", level = "error", skip_all, fields(backend = NAME, destination = %self.config.topic))]
    pub async fn open(&self) -> Result<KafkaBroker, Error> {
        let shared = Arc::new(Shared::new(Meter::new(NAME, self.config.topic.clone())));
        ensure_topic(&self.config, &shared.last_error).await?;
        let producer = Arc::new(new_producer(&self.config, &shared)?);
        reset::hasten_producer_id(&producer, &self.config.topic);
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
            Err(e) => return Err(shared.last_error.error(format!("{}: {e}", self.config.bootstrap))),
        }
        shared.set_ready(true);
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

/// The README's examples, compiled as doc tests so they stay true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
