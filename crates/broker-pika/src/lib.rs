//! The RabbitMQ event broker (`type: pika`, and a section with no `type`) on amqprs, with
//! publisher confirms.
//!
//! - **Configuration** (docs/rasa-compat.md §4): `url` (a host, or an `amqp://`/`amqps://` URI parsed by
//!   us, `%` escapes decoded), `username`, `password`, `port` (a number or numeric string),
//!   `queues` (a list or one name; Rasa's default with a warning), `exchange_name`,
//!   `connection_attempts`, `retry_delay_in_seconds`, `should_keep_unpublished_messages`,
//!   `raise_on_failure`; TLS from `amqps://` (CA from the query's `cacertfile`/`cafile`, or the
//!   `cafile` key) or from `RABBITMQ_SSL_CLIENT_CERTIFICATE` + `RABBITMQ_SSL_CLIENT_KEY`. Ours:
//!   `max_inflight`, `confirm_timeout`, `max_event_bytes` and the delivery options.
//! - **Topology and messages** as Rasa: a non-durable fanout exchange, durable queues bound with
//!   `""`, declared again after every reconnect; body = the Rasa encoding, `delivery_mode` 2,
//!   `app_id` = `RASA_ENVIRONMENT` when set, no content type, `message_id` = the event's id,
//!   published `mandatory`; extra headers per broker ([`PikaConfig::header`]) or per event
//!   ([`PikaBroker::publish_with_headers`]).
//! - **Delivery** (docs/contract.md §A): confirms tracked by delivery tag (`multiple` too), a window
//!   of `max_inflight` unconfirmed messages; when the connection drops, unconfirmed and new events
//!   wait (bounded by `buffer_size`) and are re-sent in order after reconnecting with backoff and
//!   jitter; `is_ready` is false meanwhile, and while RabbitMQ stops confirming
//!   (`confirm_timeout`: a blocked broker).
//! - **Consuming** (docs/contract.md §B): [`PikaSource`] reads the first queue with manual acks and a
//!   prefetch window.
//!
//! ```no_run
//! use broker_core::{Backend, Event, EventBroker};
//! use broker_pika::{PikaBackend, PikaConfig};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), broker_core::Error> {
//! let config = PikaConfig::new("127.0.0.1", 5672, "guest", "guest", vec!["rasa_core_events".into()]);
//! let broker = PikaBackend::new(config).connect().await?;
//! let line = br#"{"sender_id": "a", "event": "restart", "timestamp": 1.5}"#;
//! broker.publish(Event::from_json(line).expect("valid")).await?.await?; // confirmed by RabbitMQ
//! broker.close().await?;
//! # Ok(())
//! # }
//! ```

mod config;
mod source;
mod tls;
mod writer;

use std::sync::Arc;

use broker_core::delivery::{Layer, RaiseOnFailure};
use broker_core::{
    Backend, BackendFactory, CloseReport, ConfigError, Configured, Error, Event, EventBroker, EventSource, Location,
    PublishOptions, QueueChoice, Receipt, SourceOptions, StartFrom, async_trait,
};

use config::NAME;
pub use config::{AmqpTarget, DEFAULT_EXCHANGE, DEFAULT_QUEUE, MAX_INFLIGHT_LIMIT, PikaConfig};
pub use source::PikaSource;
use source::QueueKind;

/// A configured RabbitMQ backend.
#[derive(Debug, Clone)]
pub struct PikaBackend {
    config: Arc<PikaConfig>,
}

impl PikaBackend {
    /// A backend with `config`.
    pub fn new(config: PikaConfig) -> PikaBackend {
        PikaBackend { config: Arc::new(config) }
    }

    /// The settings.
    pub fn config(&self) -> &PikaConfig {
        &self.config
    }

    /// Metrics and spans: `backend="pika"`, `destination=<exchange>` (the fanout exchange every
    /// event goes to).
    fn meter(&self) -> broker_core::metrics::Meter {
        broker_core::metrics::Meter::new(NAME, self.config.exchange.clone())
    }

    /// Connects (Rasa's `connection_attempts` × `retry_delay_in_seconds`), declares the topology
    /// and starts the writer; the typed broker, for [`PikaBroker::publish_with_headers`].
    #[tracing::instrument(name = "connect", level = "error", skip_all, fields(backend = NAME, destination = %self.config.exchange))]
    pub async fn open(&self) -> Result<PikaBroker, Error> {
        self.config.validate()?;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let (link, link_id) = writer::first_link(&self.config, &tx).await?;
        let sink = writer::PikaSink::new(self.config.clone(), link, link_id, tx, rx);
        let options = writer::PikaSink::driver_options(&self.config);
        let queued = broker_core::delivery::start(self.meter(), sink, self.config.delivery.clone(), options);
        let mut inner: Box<dyn EventBroker> = Box::new(queued);
        if self.config.raise_on_failure {
            inner = RaiseOnFailure.wrap_broker(inner);
        }
        Ok(PikaBroker { inner })
    }
}

/// Factory for `type: pika` (and for a section without a type).
#[derive(Debug, Default, Clone, Copy)]
pub struct PikaFactory;

impl BackendFactory for PikaFactory {
    fn name(&self) -> &'static str {
        NAME
    }

    fn configure(&self, options: broker_core::Options) -> Result<Configured, ConfigError> {
        let (config, warnings) = PikaConfig::from_options(options)?;
        Ok(Configured::new(Box::new(PikaBackend::new(config)), warnings))
    }
}

#[async_trait]
impl Backend for PikaBackend {
    fn name(&self) -> &'static str {
        NAME
    }

    fn describe(&self) -> String {
        format!(
            "pika {} exchange {} queues {}",
            self.config.target.describe(),
            self.config.exchange,
            self.config.queues.join(",")
        )
    }

    fn close_timeout(&self) -> std::time::Duration {
        self.config.delivery.close_timeout
    }

    async fn connect(&self) -> Result<Box<dyn EventBroker>, Error> {
        Ok(Box::new(self.open().await?))
    }

    /// Reads the queue `options.queue` names: by default the first configured queue (consumed
    /// with acks); [`QueueChoice::Private`] for a private view of the exchange that takes nothing.
    async fn source(&self, options: &SourceOptions) -> Result<Box<dyn EventSource>, Error> {
        self.config.validate()?;
        let kind = match &options.queue {
            QueueChoice::Named(q) if self.config.queues.contains(q) => QueueKind::Configured(q.clone()),
            QueueChoice::Named(q) => QueueKind::Existing(q.clone()),
            QueueChoice::Private => {
                if !matches!(options.start, StartFrom::Resume) {
                    return Err(Error::Config(ConfigError::new(
                        Location::default(),
                        None,
                        "a private RabbitMQ queue holds only events published after it was made: it cannot \
                         start from the beginning or an offset; consume a queue for that (`broker tail \
                         --consume [QUEUE]`, which takes its events away from other consumers)",
                    )));
                }
                QueueKind::Private
            }
            _ => QueueKind::Configured(self.config.queues.first().cloned().unwrap_or_else(|| DEFAULT_QUEUE.to_owned())),
        };
        Ok(Box::new(PikaSource::open(self.config.clone(), kind, options.clone()).await?))
    }

    /// The product and version RabbitMQ announces when a connection opens.
    async fn server_version(&self) -> Result<Option<String>, Error> {
        self.config.validate()?;
        let target = &self.config.target;
        // The handshake is all it takes (no channel); `connect_only` bounds it.
        let connection = writer::connect_only(target, "broker check").await?;
        let properties = connection.server_properties();
        let version = format!("{} {}", properties.product(), properties.version());
        let _ = tokio::time::timeout(target.connection_timeout, connection.close()).await;
        Ok(Some(version))
    }
}

/// A connected RabbitMQ broker.
#[derive(Debug)]
pub struct PikaBroker {
    /// The queued broker, inside the `raise_on_failure` layer when that is on.
    inner: Box<dyn EventBroker>,
}

impl PikaBroker {
    /// Publishes `event` with extra message headers (e.g. `rasa-export-process-id`), after the
    /// broker's own headers. The same as [`EventBroker::publish_with`] with those headers.
    pub async fn publish_with_headers(&self, event: Event, headers: Vec<(String, String)>) -> Result<Receipt, Error> {
        self.inner.publish_with(event, PublishOptions::default().headers(headers)).await
    }
}

#[async_trait]
impl EventBroker for PikaBroker {
    fn backend(&self) -> &'static str {
        NAME
    }
    async fn publish_with(&self, event: Event, options: PublishOptions) -> Result<Receipt, Error> {
        self.inner.publish_with(event, options).await
    }
    async fn flush(&self) -> Result<(), Error> {
        self.inner.flush().await
    }
    async fn is_ready(&self) -> bool {
        self.inner.is_ready().await
    }
    async fn close(&self) -> Result<CloseReport, Error> {
        self.inner.close().await
    }
}

/// The README's examples, compiled as doc tests so they stay true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
