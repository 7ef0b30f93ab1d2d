//! The consuming side (docs/contract.md §B): one named queue, manual acks, a prefetch window, and a
//! reconnect when the broker goes away (unacknowledged messages come again: at-least-once).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use amqprs::channel::{
    BasicAckArguments, BasicConsumeArguments, BasicQosArguments, BasicRejectArguments, Channel, ConsumerMessage,
};
use amqprs::connection::Connection;
use broker_core::backoff::Backoff;
use broker_core::{Error, Event, EventSource, Position, Received, SourceOptions, async_trait};
use tokio::sync::mpsc;

use crate::config::{NAME, PikaConfig};
use crate::writer::{declare_exchange, declare_topology, open};

/// What a [`PikaSource`] reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum QueueKind {
    /// A configured queue: the topology is declared (so a consumer may start before the first
    /// publish), then the queue is consumed with acks.
    Configured(String),
    /// An existing queue, checked with a passive declare, consumed with acks.
    Existing(String),
    /// A private queue bound to the exchange: live events only, nothing taken from anyone.
    Private,
}

struct Consumer {
    connection: Connection,
    channel: Channel,
    rx: mpsc::UnboundedReceiver<ConsumerMessage>,
    /// Positions handed out on this channel and not yet acknowledged.
    unacked: HashSet<u64>,
    /// Which subscription this is (0 for the first): delivery tags start at 1 on every channel,
    /// so a position carries it in its top 16 bits and an ack from an earlier channel is told apart.
    generation: u64,
}

const TAG_BITS: u32 = 48;

/// Reads one queue of a RabbitMQ backend.
///
/// Each event's position is its `DeliveryTag`; after a reconnect the top 16 bits count the
/// subscription (tags restart at 1 on every channel), so an ack for an event of a closed channel
/// acknowledges nothing and that event comes again. Call `close` to make acks land before exit.
pub struct PikaSource {
    config: Arc<PikaConfig>,
    kind: QueueKind,
    /// The queue read (a private queue's name is the server's, known once declared).
    queue: String,
    options: SourceOptions,
    consumer: Option<Consumer>,
    /// Without `follow`: the messages the queue held at open that are still to come.
    remaining: Option<u64>,
    backoff: Backoff,
    subscriptions: u64,
    /// `broker_consumer_lag_events{backend="pika", destination=<queue>}`: the messages ready in
    /// the queue, as RabbitMQ counts them (queue.declare-ok), refreshed every [`LAG_EVERY`].
    lag: metrics::Gauge,
    lag_at: Instant,
}

/// How often the consumer asks RabbitMQ how many messages wait in its queue.
const LAG_EVERY: Duration = Duration::from_secs(5);

impl std::fmt::Debug for PikaSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PikaSource").field("queue", &self.queue).finish_non_exhaustive()
    }
}

/// Without `follow`, the stream also ends after this long without a message.
const IDLE_END: Duration = Duration::from_secs(1);

impl PikaSource {
    pub(crate) async fn open(
        config: Arc<PikaConfig>,
        kind: QueueKind,
        options: SourceOptions,
    ) -> Result<PikaSource, Error> {
        let backoff = Backoff::new(Duration::from_millis(100), config.retry_delay.max(Duration::from_millis(100)));
        let queue = match &kind {
            QueueKind::Configured(q) | QueueKind::Existing(q) => q.clone(),
            QueueKind::Private => String::new(),
        };
        // A private queue's lag is labelled with the exchange it is bound to.
        let destination = if queue.is_empty() { config.exchange.clone() } else { queue.clone() };
        let labels = [("backend", NAME.to_owned()), ("destination", destination)];
        let lag = metrics::gauge!(broker_core::metrics::names::CONSUMER_LAG, &labels);
        let mut source = PikaSource {
            config,
            kind,
            queue,
            options,
            consumer: None,
            remaining: None,
            backoff,
            subscriptions: 0,
            lag,
            lag_at: Instant::now(),
        };
        let count = source.subscribe().await?;
        // A private queue starts empty: without `follow` it ends after an idle second instead.
        if !source.options.follow && source.kind != QueueKind::Private {
            source.remaining = Some(count);
        }
        Ok(source)
    }

    /// [`PikaSource::subscribe_unbounded`] within twice the connection timeout.
    async fn subscribe(&mut self) -> Result<u64, Error> {
        let limit = self.config.target.connection_timeout * 2;
        match tokio::time::timeout(limit, self.subscribe_unbounded()).await {
            Ok(r) => r,
            Err(_) => Err(Error::Unavailable {
                backend: NAME,
                reason: format!("{}: subscribing took longer than {limit:?}", self.config.target.describe()),
                cause: None,
            }),
        }
    }

    /// Connects, declares what its kind needs and starts consuming with manual acks. Returns the
    /// queue's message count.
    async fn subscribe_unbounded(&mut self) -> Result<u64, Error> {
        let target = &self.config.target;
        let shown =
            if self.kind == QueueKind::Private { "a private queue".to_owned() } else { format!("{:?}", self.queue) };
        let fail = |what: &str, e: amqprs::error::Error| Error::Unavailable {
            backend: NAME,
            reason: format!("{}: {what} {shown}: {e}", target.describe()),
            cause: None,
        };
        let (connection, channel) = open(target, "rasa-event-broker (consumer)").await?;
        // Handles basic.cancel (the queue was deleted): amqprs then ends the consumer's stream,
        // and `next` resubscribes instead of waiting forever.
        channel
            .register_callback(amqprs::callbacks::DefaultChannelCallback)
            .await
            .map_err(|e| fail("watching the channel of", e))?;
        let declared = match &self.kind {
            QueueKind::Configured(q) => {
                declare_topology(&channel, &self.config).await?;
                channel.queue_declare(amqprs::channel::QueueDeclareArguments::durable_client_named(q)).await
            }
            QueueKind::Existing(q) => {
                let args = amqprs::channel::QueueDeclareArguments::new(q).passive(true).finish();
                match channel.queue_declare(args).await {
                    Err(e) if e.to_string().contains("404") || e.to_string().contains("NOT_FOUND") => {
                        return Err(Error::Config(broker_core::ConfigError::new(
                            broker_core::Location::default(),
                            None,
                            format!("the queue {q:?} does not exist on {}", target.describe()),
                        )));
                    }
                    r => r,
                }
            }
            QueueKind::Private => {
                declare_exchange(&channel, &self.config).await?;
                let args = amqprs::channel::QueueDeclareArguments::exclusive_server_named().auto_delete(true).finish();
                let declared = channel.queue_declare(args).await;
                if let Ok(Some((name, _, _))) = &declared {
                    channel
                        .queue_bind(amqprs::channel::QueueBindArguments::new(name, &self.config.exchange, ""))
                        .await
                        .map_err(|e| fail("binding the private queue to the exchange of", e))?;
                    self.queue = name.clone();
                }
                declared
            }
        };
        let count = declared.map_err(|e| fail("declaring the queue", e))?.map_or(0, |(_, n, _)| u64::from(n));
        self.lag.set(count as f64);
        self.lag_at = Instant::now();
        channel
            .basic_qos(BasicQosArguments::new(0, self.options.prefetch.max(1), false))
            .await
            .map_err(|e| fail("setting the prefetch window on", e))?;
        let (_, rx) = channel
            .basic_consume_rx(BasicConsumeArguments::new(&self.queue, "").manual_ack(true).finish())
            .await
            .map_err(|e| fail("consuming", e))?;
        let generation = self.subscriptions % (1 << (64 - TAG_BITS));
        self.subscriptions += 1;
        self.consumer = Some(Consumer { connection, channel, rx, unacked: HashSet::new(), generation });
        Ok(count)
    }

    /// Asks RabbitMQ how many messages are ready in the queue (a passive declare, bounded by the
    /// connection timeout) and records it as the lag; a failure only leaves the last value.
    async fn refresh_lag(&mut self) {
        self.lag_at = Instant::now();
        let Some(consumer) = self.consumer.as_ref() else { return };
        let args = amqprs::channel::QueueDeclareArguments::new(&self.queue).passive(true).finish();
        match tokio::time::timeout(self.config.target.connection_timeout, consumer.channel.queue_declare(args)).await {
            Ok(Ok(Some((_, n, _)))) => self.lag.set(f64::from(n)),
            Ok(Ok(None)) => {}
            Ok(Err(e)) => tracing::debug!("pika: cannot count the messages in {:?}: {e}", self.queue),
            Err(_) => tracing::debug!("pika: no answer counting the messages in {:?}", self.queue),
        }
    }

    async fn resubscribe(&mut self) -> Result<(), Error> {
        loop {
            match self.subscribe().await {
                Ok(_) => {
                    self.backoff.reset();
                    return Ok(());
                }
                Err(e) if !self.options.follow => return Err(e),
                Err(e) => {
                    let delay = self.backoff.next_delay();
                    tracing::warn!("pika: consumer: {e}; retrying in {delay:?}");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }
}

#[async_trait]
impl EventSource for PikaSource {
    fn backend(&self) -> &'static str {
        NAME
    }

    async fn next(&mut self) -> Result<Option<Received>, Error> {
        loop {
            if self.remaining == Some(0) {
                return Ok(None);
            }
            if self.consumer.is_none() {
                self.resubscribe().await?;
            }
            if self.lag_at.elapsed() >= LAG_EVERY {
                self.refresh_lag().await;
            }
            let Some(consumer) = self.consumer.as_mut() else { continue };
            let msg = if self.options.follow {
                // Woken at least every LAG_EVERY, so an idle consumer's lag stays current.
                match tokio::time::timeout(LAG_EVERY, consumer.rx.recv()).await {
                    Ok(m) => m,
                    Err(_) => continue,
                }
            } else {
                match tokio::time::timeout(IDLE_END, consumer.rx.recv()).await {
                    Ok(m) => m,
                    Err(_) => return Ok(None),
                }
            };
            let Some(msg) = msg else {
                // The channel or connection closed: unacked messages will come again.
                if self.kind == QueueKind::Private {
                    tracing::warn!(
                        "pika: lost the private queue; reconnecting (events published meanwhile are not shown)"
                    );
                } else {
                    tracing::warn!("pika: consumer lost its channel on {:?}; reconnecting", self.queue);
                }
                if let Some(c) = self.consumer.take() {
                    drop(c.channel);
                    let _ = tokio::time::timeout(Duration::from_secs(1), c.connection.close()).await;
                }
                if !self.options.follow {
                    return Ok(None);
                }
                continue;
            };
            let (Some(deliver), Some(raw)) = (msg.deliver, msg.content) else { continue };
            let tag = deliver.delivery_tag();
            if let Some(r) = self.remaining.as_mut() {
                *r = r.saturating_sub(1);
            }
            let position = Position::DeliveryTag((consumer.generation << TAG_BITS) | tag);
            match Event::from_json(&raw) {
                Ok(event) => {
                    let event = match msg
                        .basic_properties
                        .as_ref()
                        .and_then(|p| p.message_id())
                        .and_then(|m| broker_core::EventId::parse_hex(m))
                    {
                        Some(id) => event.with_id(id),
                        None => event,
                    };
                    consumer.unacked.insert((consumer.generation << TAG_BITS) | tag);
                    let headers = headers_of(msg.basic_properties.as_ref());
                    return Ok(Some(Received::new(event, raw, position, None).with_message(None, headers)));
                }
                Err(e) => {
                    // Not ours to keep in the prefetch window forever: rejected without requeue
                    // (dead-lettered when the queue has a dead-letter exchange), and reported.
                    let _ = consumer.channel.basic_reject(BasicRejectArguments::new(tag, false)).await;
                    return Err(Error::Malformed {
                        position,
                        reason: format!("{e} (rejected without requeue from queue {:?})", self.queue),
                    });
                }
            }
        }
    }

    /// Closes the channel (which waits for RabbitMQ's close-ok, so every ack sent before it was
    /// processed) and the connection.
    async fn close(&mut self) -> Result<(), Error> {
        self.remaining = Some(0);
        if let Some(c) = self.consumer.take() {
            let closed = tokio::time::timeout(Duration::from_secs(5), c.channel.close()).await;
            let _ = tokio::time::timeout(Duration::from_secs(5), c.connection.close()).await;
            if !matches!(closed, Ok(Ok(()))) {
                return Err(Error::Io {
                    backend: NAME,
                    operation: format!("closing the consumer of {:?}", self.queue),
                    reason: "RabbitMQ did not confirm the channel close; unacknowledged events will come again".into(),
                    cause: None,
                });
            }
        }
        Ok(())
    }

    async fn ack(&mut self, received: &Received) -> Result<(), Error> {
        let Position::DeliveryTag(position) = received.position else { return Ok(()) };
        let Some(consumer) = self.consumer.as_mut() else { return Ok(()) };
        // A position from a channel that has since closed: RabbitMQ delivers that message again.
        if !consumer.unacked.remove(&position) {
            return Ok(());
        }
        let tag = position & ((1 << TAG_BITS) - 1);
        consumer.channel.basic_ack(BasicAckArguments::new(tag, false)).await.map_err(|e| Error::Io {
            backend: NAME,
            operation: format!("acknowledging delivery tag {tag}"),
            reason: e.to_string(),
            cause: None,
        })
    }
}

/// A message's AMQP headers as name and bytes, sorted by name (amqprs hands the table over
/// unordered): a string or byte array as its bytes, any other value as its text.
fn headers_of(properties: Option<&amqprs::BasicProperties>) -> Vec<(String, Vec<u8>)> {
    let Some(table) = properties.and_then(|p| p.headers()) else { return Vec::new() };
    let mut headers: Vec<(String, Vec<u8>)> = table
        .as_ref()
        .iter()
        .map(|(name, value)| {
            let bytes = match value {
                amqprs::FieldValue::S(s) => s.as_ref().as_bytes().to_vec(),
                amqprs::FieldValue::x(b) => Vec::<u8>::from(b.clone()),
                other => other.to_string().into_bytes(),
            };
            (name.as_ref().clone(), bytes)
        })
        .collect();
    headers.sort();
    headers
}
