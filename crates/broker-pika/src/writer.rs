//! The publishing side: a writer task owning one connection and one channel in confirm mode.
//!
//! Events arrive from the pipeline in publish order and get sequence numbers. Up to
//! `max_inflight` are published without waiting; RabbitMQ's confirms (`basic.ack`/`basic.nack`,
//! single or `multiple`) settle them by delivery tag. When the connection or channel goes, the
//! unconfirmed events go back to the head of the queue, the writer reconnects with backoff and
//! jitter, re-declares the topology and sends them again in order (at-least-once; each message
//! carries the event id as `message_id`). While disconnected nothing is read from the pipeline, so
//! its bound applies (`when_full`). A broker that stops confirming (a memory or disk alarm blocks
//! publishers, and amqprs never sees `connection.blocked`) is detected by `confirm_timeout`.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use amqprs::callbacks::{ChannelCallback, ConnectionCallback};
use amqprs::channel::{
    BasicPublishArguments, Channel, ConfirmSelectArguments, ExchangeDeclareArguments, QueueBindArguments,
    QueueDeclareArguments,
};
use amqprs::connection::{Connection, OpenConnectionArguments};
use amqprs::{Ack, BasicProperties, Cancel, Close, CloseChannel, FieldTable, Nack, Return};
use broker_core::delivery::{Batch, DriverOptions, Failure, Record, Sink, Verdict};
use broker_core::{Error, Position, async_trait};
use tokio::sync::mpsc;

use crate::config::{AmqpTarget, NAME, PikaConfig};

/// What the connection's and channel's callbacks tell the writer, tagged with the link they
/// belong to (signals from an old link are ignored).
#[derive(Debug)]
pub(crate) enum Signal {
    Ack { tag: u64, multiple: bool },
    Nack { tag: u64, multiple: bool },
    Returned { message_id: Option<String>, code: u16, text: String },
    Lost(String),
}

type Signals = mpsc::UnboundedSender<(u64, Signal)>;

struct Callbacks {
    link: u64,
    tx: Signals,
}

#[async_trait]
impl ConnectionCallback for Callbacks {
    async fn close(&mut self, _: &Connection, close: Close) -> Result<(), amqprs::error::Error> {
        let why = format!("RabbitMQ closed the connection: {} {}", close.reply_code(), close.reply_text());
        let _ = self.tx.send((self.link, Signal::Lost(why)));
        Ok(())
    }
    async fn blocked(&mut self, _: &Connection, reason: String) {
        tracing::warn!("pika: RabbitMQ blocks publishers: {reason}");
    }
    async fn unblocked(&mut self, _: &Connection) {}
    async fn secret_updated(&mut self, _: &Connection) {}
}

#[async_trait]
impl ChannelCallback for Callbacks {
    async fn close(&mut self, _: &Channel, close: CloseChannel) -> Result<(), amqprs::error::Error> {
        let why = format!("RabbitMQ closed the channel: {} {}", close.reply_code(), close.reply_text());
        let _ = self.tx.send((self.link, Signal::Lost(why)));
        Ok(())
    }
    async fn cancel(&mut self, _: &Channel, _: Cancel) -> Result<(), amqprs::error::Error> {
        Ok(())
    }
    async fn flow(&mut self, _: &Channel, active: bool) -> Result<bool, amqprs::error::Error> {
        Ok(active)
    }
    async fn publish_ack(&mut self, _: &Channel, ack: Ack) {
        let _ = self.tx.send((self.link, Signal::Ack { tag: ack.delivery_tag(), multiple: ack.mutiple() }));
    }
    async fn publish_nack(&mut self, _: &Channel, nack: Nack) {
        let _ = self.tx.send((self.link, Signal::Nack { tag: nack.delivery_tag(), multiple: nack.multiple() }));
    }
    async fn publish_return(&mut self, _: &Channel, ret: Return, props: BasicProperties, _: Vec<u8>) {
        let message_id = props.message_id().cloned();
        let signal = Signal::Returned { message_id, code: ret.reply_code(), text: ret.reply_text().clone() };
        let _ = self.tx.send((self.link, signal));
    }
}

/// An amqprs error as ours: refused credentials or certificates are [`Error::Denied`] (trying
/// again will not help), anything else [`Error::Unavailable`].
fn amqp_error(target: &AmqpTarget, e: amqprs::error::Error) -> Error {
    let text = e.to_string();
    let denied = if text.contains("403") || text.contains("ACCESS_REFUSED") {
        Some(" (wrong user name or password?)")
    } else if text.contains("NotValidForName") || text.contains("not valid for name") {
        Some(" (the server certificate is not for this host name)")
    } else if text.contains("InvalidCertificate")
        || text.contains("UnknownIssuer")
        || text.contains("invalid peer certificate")
    {
        Some(" (the server certificate is not signed by the configured CA)")
    } else if text.contains("CertificateRequired") || text.contains("HandshakeFailure") {
        Some(" (the server requires a client certificate: set certfile/keyfile or RABBITMQ_SSL_CLIENT_*)")
    } else if text.contains("NOT_ALLOWED") && text.contains("vhost") {
        Some(" (the user may not use this virtual host)")
    } else {
        None
    };
    let reason = format!("{}: {text}{}", target.describe(), denied.unwrap_or(""));
    match denied {
        Some(_) => Error::Denied { backend: NAME, reason, cause: None },
        None => Error::Unavailable { backend: NAME, reason, cause: None },
    }
}

/// A failed `Connection::open`. amqprs does not announce `authentication_failure_close`, so
/// RabbitMQ answers a refused login by dropping the connection during the handshake: a reset
/// there is reported as a probable refusal ([`Error::Denied`]), as Python's pika does
/// (`ProbableAuthenticationError`).
fn login_error(target: &AmqpTarget, e: amqprs::error::Error) -> Error {
    let text = e.to_string();
    if text.contains("reset by peer") {
        let reason = format!(
            "{}: {text} (RabbitMQ dropped the connection during login: probably a wrong user name or password, or a user without access to the virtual host {:?})",
            target.describe(),
            target.vhost
        );
        return Error::Denied { backend: NAME, reason, cause: None };
    }
    amqp_error(target, e)
}

/// Whether an error is a refusal for sure (not a probable one): retrying cannot help.
fn surely_denied(e: &Error) -> bool {
    matches!(e, Error::Denied { reason, .. } if !reason.contains("probably"))
}

/// An open connection and confirm-mode channel.
pub(crate) struct Link {
    pub(crate) connection: Connection,
    pub(crate) channel: Channel,
}

/// Opens a connection (within `connection_timeout`) and a channel (within it too).
pub(crate) async fn open(target: &AmqpTarget, name: &str) -> Result<(Connection, Channel), Error> {
    let connection = connect_only(target, name).await?;
    let channel = match tokio::time::timeout(target.connection_timeout, connection.open_channel(None)).await {
        Ok(r) => r.map_err(|e| amqp_error(target, e))?,
        Err(_) => return Err(no_answer(target)),
    };
    Ok((connection, channel))
}

fn no_answer(target: &AmqpTarget) -> Error {
    Error::Unavailable {
        backend: NAME,
        reason: format!("{}: no answer within {:?}", target.describe(), target.connection_timeout),
        cause: None,
    }
}

/// Opens a connection (the AMQP handshake) within `connection_timeout`.
pub(crate) async fn connect_only(target: &AmqpTarget, name: &str) -> Result<Connection, Error> {
    let mut args = OpenConnectionArguments::new(&target.host, target.port, &target.username, target.password.expose());
    args.virtual_host(&target.vhost).heartbeat(target.heartbeat).connection_name(name);
    if target.tls {
        args.tls_adaptor(crate::tls::adaptor(target)?);
    }
    match tokio::time::timeout(target.connection_timeout, Connection::open(&args)).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => Err(login_error(target, e)),
        Err(_) => Err(no_answer(target)),
    }
}

/// Declares Rasa's topology on `channel`: a non-durable fanout exchange and durable queues
/// bound to it with the routing key `""`.
/// Declares Rasa's fanout exchange (non-durable, as Rasa does) on `channel`.
pub(crate) async fn declare_exchange(channel: &Channel, config: &PikaConfig) -> Result<(), Error> {
    channel
        .exchange_declare(ExchangeDeclareArguments::new(&config.exchange, "fanout").durable(false).finish())
        .await
        .map_err(|e| Error::Unavailable {
            backend: NAME,
            reason: format!(
                "{}: declaring the fanout exchange {:?} (non-durable, as Rasa): {e}",
                config.target.describe(),
                config.exchange
            ),
            cause: None,
        })
}

pub(crate) async fn declare_topology(channel: &Channel, config: &PikaConfig) -> Result<(), Error> {
    let fail = |what: String, e: amqprs::error::Error| Error::Unavailable {
        backend: NAME,
        reason: format!("{}: {what}: {e}", config.target.describe()),
        cause: None,
    };
    declare_exchange(channel, config).await?;
    for q in &config.queues {
        channel
            .queue_declare(QueueDeclareArguments::durable_client_named(q))
            .await
            .map_err(|e| fail(format!("declaring the durable queue {q:?}"), e))?;
        channel
            .queue_bind(QueueBindArguments::new(q, &config.exchange, ""))
            .await
            .map_err(|e| fail(format!("binding the queue {q:?} to {:?}", config.exchange), e))?;
    }
    Ok(())
}

/// Opens a publishing link: connection, channel, callbacks, topology, confirm mode, and a watcher
/// that reports a network failure. The whole of it may take twice `connection_timeout`.
async fn open_link(config: &PikaConfig, link_id: u64, tx: &Signals) -> Result<Link, Error> {
    let limit = config.target.connection_timeout * 2;
    match tokio::time::timeout(limit, open_link_unbounded(config, link_id, tx)).await {
        Ok(r) => r,
        Err(_) => Err(Error::Unavailable {
            backend: NAME,
            reason: format!(
                "{}: opening a channel and declaring the topology took over {limit:?}",
                config.target.describe()
            ),
            cause: None,
        }),
    }
}

async fn open_link_unbounded(config: &PikaConfig, link_id: u64, tx: &Signals) -> Result<Link, Error> {
    let (connection, channel) = open(&config.target, "rasa-event-broker (publisher)").await?;
    let target = &config.target;
    connection
        .register_callback(Callbacks { link: link_id, tx: tx.clone() })
        .await
        .map_err(|e| amqp_error(target, e))?;
    channel.register_callback(Callbacks { link: link_id, tx: tx.clone() }).await.map_err(|e| amqp_error(target, e))?;
    declare_topology(&channel, config).await?;
    channel.confirm_select(ConfirmSelectArguments::default()).await.map_err(|e| amqp_error(target, e))?;
    let watcher = connection.clone();
    let tx = tx.clone();
    tokio::spawn(async move {
        let network = watcher.listen_network_io_failure().await;
        let why =
            if network { "the network connection to RabbitMQ failed" } else { "the connection to RabbitMQ closed" };
        let _ = tx.send((link_id, Signal::Lost(why.into())));
    });
    if !connection.is_open() {
        return Err(Error::Unavailable {
            backend: NAME,
            reason: format!("{}: closed at once", target.describe()),
            cause: None,
        });
    }
    Ok(Link { connection, channel })
}

/// Connects with Rasa's `connection_attempts` and `retry_delay_in_seconds`, for `connect()`.
/// Each attempt has a link id of its own (returned with the link), so a failed attempt's late
/// signals never reach the live link.
pub(crate) async fn first_link(config: &PikaConfig, tx: &Signals) -> Result<(Link, u64), Error> {
    let mut attempt = 1;
    loop {
        match open_link(config, u64::from(attempt), tx).await {
            Ok(link) => return Ok((link, u64::from(attempt))),
            // Refused credentials or certificates: the next attempt would be refused too.
            Err(e) if surely_denied(&e) => return Err(e),
            Err(e) if attempt >= config.connection_attempts => return Err(e),
            Err(e) => {
                tracing::warn!(
                    "{e} (attempt {attempt} of {}; next in {:?})",
                    config.connection_attempts,
                    config.retry_delay
                );
                tokio::time::sleep(config.retry_delay).await;
                attempt += 1;
            }
        }
    }
}

/// The limit in RabbitMQ's "message size N is larger than configured max size M" channel error.
fn server_size_limit(why: &str) -> Option<u64> {
    let rest = &why[why.find("larger than configured max size ")? + "larger than configured max size ".len()..];
    rest.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
}

/// One message sent on the live link, by delivery tag, and its outcome once confirmed.
struct Slot {
    message_id: String,
    outcome: Option<Verdict>,
}

/// The RabbitMQ writer as a windowed [`Sink`]: [`Sink::write`] publishes (answering
/// [`Verdict::Sent`]), [`Sink::confirmed`] turns publisher confirms into verdicts in tag order,
/// [`Sink::recover`] reconnects and declares the topology again. The driver owns the window,
/// the resend after a lost link, the confirm timeout, `should_keep_unpublished_messages` and
/// the close.
pub(crate) struct PikaSink {
    config: Arc<PikaConfig>,
    signals_tx: Signals,
    signals: mpsc::UnboundedReceiver<(u64, Signal)>,
    link: Option<Link>,
    link_id: u64,
    /// Messages sent on the live link: `slots[i]` has delivery tag `base_tag + i`.
    slots: VecDeque<Slot>,
    base_tag: u64,
    /// Message ids RabbitMQ returned as unroutable; their confirm rejects them.
    returned: HashSet<String>,
    /// Why the live link is gone, once a callback said so.
    lost: Option<String>,
    properties: BasicProperties,
    /// `max_event_bytes`, lowered to RabbitMQ's `max_message_size` once a channel close reveals it.
    max_bytes: u64,
}

/// How often a wait for confirms also checks that the link is still open.
const CHECK_EVERY: Duration = Duration::from_millis(200);

impl PikaSink {
    pub(crate) fn new(
        config: Arc<PikaConfig>,
        link: Link,
        link_id: u64,
        signals_tx: Signals,
        signals: mpsc::UnboundedReceiver<(u64, Signal)>,
    ) -> PikaSink {
        let mut properties = BasicProperties::default();
        properties.with_delivery_mode(amqprs::DELIVERY_MODE_PERSISTENT);
        match &config.app_id {
            // An AMQP short string: the configuration checks the length; never panic here.
            Some(app) if app.len() <= 255 => {
                properties.with_app_id(app);
            }
            Some(_) => tracing::warn!("pika: RASA_ENVIRONMENT is over 255 bytes; app_id left out"),
            None => {}
        }
        PikaSink {
            signals_tx,
            signals,
            link: Some(link),
            link_id,
            slots: VecDeque::new(),
            base_tag: 1,
            returned: HashSet::new(),
            lost: None,
            properties,
            max_bytes: config.max_event_bytes,
            config,
        }
    }

    /// How the driver runs this sink: a window of `max_inflight`, `confirm_timeout`, Rasa's
    /// `retry_delay_in_seconds` as the longest backoff, and `should_keep_unpublished_messages`.
    pub(crate) fn driver_options(config: &PikaConfig) -> DriverOptions {
        let first = Duration::from_millis(100).min(config.retry_delay.max(Duration::from_millis(10)));
        let keep = (!config.keep_unpublished).then_some("should_keep_unpublished_messages: false");
        DriverOptions::default()
            .batch_size((config.max_inflight / 4).clamp(1, 256))
            .max_event_bytes(usize::try_from(config.max_event_bytes).ok())
            // Opening a link is bounded by twice connection_timeout (open_link).
            .attempt_timeout(config.target.connection_timeout * 2 + Duration::from_secs(1))
            .retry(first, config.retry_delay.max(first))
            .ping_interval(Some(CHECK_EVERY))
            .window(config.max_inflight, config.confirm_timeout)
            .fail_while_away(keep)
    }

    /// Handles the signals already waiting, without blocking.
    fn drain_signals(&mut self) {
        while let Ok((link, signal)) = self.signals.try_recv() {
            if link == self.link_id {
                self.on_signal(signal);
            }
        }
    }

    /// The live link, or why there is none.
    fn live(&mut self) -> Result<&Link, Error> {
        if self.lost.is_none() {
            if let Some(link) = &self.link {
                if !link.connection.is_open() || !link.channel.is_open() {
                    self.lost = Some("the connection to RabbitMQ closed".into());
                }
            }
        }
        let unavailable = |reason: String| Error::Unavailable { backend: NAME, reason, cause: None };
        match (&self.lost, &self.link) {
            (Some(why), _) => Err(unavailable(format!("{}: {why}", self.config.target.describe()))),
            (None, None) => Err(unavailable(format!("{}: not connected", self.config.target.describe()))),
            (None, Some(link)) => Ok(link),
        }
    }

    /// Why this record cannot be sent at all (its own fault), if so.
    fn refuse(&self, r: &Record) -> Option<String> {
        if r.json.len() as u64 > self.max_bytes {
            let limit = if self.max_bytes < self.config.max_event_bytes {
                format!("RabbitMQ's max_message_size {}", self.max_bytes)
            } else {
                format!("max_event_bytes {}", self.max_bytes)
            };
            return Some(format!("{} bytes is over {limit}", r.json.len()));
        }
        let (k, _) = r.headers.iter().find(|(k, _)| k.is_empty() || k.len() > 255)?;
        Some(format!(
            "the header name {:?}... is {} bytes; AMQP allows 1 to 255",
            k.chars().take(16).collect::<String>(),
            k.len()
        ))
    }

    fn properties(&self, message_id: &str, r: &Record) -> BasicProperties {
        let mut props = self.properties.clone();
        props.with_message_id(message_id);
        if !self.config.headers.is_empty() || !r.headers.is_empty() {
            let mut table = FieldTable::new();
            for (k, v) in self.config.headers.iter().chain(r.headers.iter()) {
                if let Ok(name) = k.clone().try_into() {
                    table.insert(name, v.clone().into());
                }
            }
            props.with_headers(table);
        }
        props
    }

    fn on_signal(&mut self, signal: Signal) {
        match signal {
            Signal::Ack { tag, multiple } => self.confirm(tag, multiple, true),
            Signal::Nack { tag, multiple } => self.confirm(tag, multiple, false),
            Signal::Returned { message_id, code, text } => {
                tracing::warn!("pika: RabbitMQ returned a message as unroutable: {code} {text}");
                if let Some(id) = message_id {
                    self.returned.insert(id);
                }
            }
            Signal::Lost(why) => {
                // RabbitMQ closes the channel on a message over its max_message_size: learn the
                // limit, so that event fails alone instead of closing every channel it is sent on.
                if let Some(limit) = server_size_limit(&why) {
                    self.max_bytes = self.max_bytes.min(limit);
                }
                self.lost.get_or_insert(why);
            }
        }
    }

    /// Records the outcome of the message with `tag` (and, with `multiple`, of every earlier one
    /// not confirmed yet).
    fn confirm(&mut self, tag: u64, multiple: bool, ack: bool) {
        if tag < self.base_tag {
            return;
        }
        let Ok(last) = usize::try_from(tag - self.base_tag) else { return };
        if last >= self.slots.len() {
            return; // not a tag of ours
        }
        let first = if multiple { 0 } else { last };
        for i in first..=last {
            let t = self.base_tag + i as u64;
            let slot = &mut self.slots[i];
            if slot.outcome.is_some() {
                continue;
            }
            slot.outcome = Some(if !self.returned.is_empty() && self.returned.remove(&slot.message_id) {
                Verdict::Rejected(format!(
                    "unroutable: no queue is bound to the exchange {:?} (returned by RabbitMQ)",
                    self.config.exchange
                ))
            } else if ack {
                Verdict::Delivered(Some(Position::DeliveryTag(t)))
            } else {
                Verdict::Retry(Error::Io {
                    backend: NAME,
                    operation: "publishing".into(),
                    reason: "RabbitMQ refused the message (basic.nack): a queue may be full (x-overflow: reject-publish) or the broker failed internally".into(),
                    cause: None,
                })
            });
        }
    }

    /// The outcomes known at the head of the window, in tag order.
    fn take_settled(&mut self) -> Vec<Verdict> {
        let mut out = Vec::new();
        while self.slots.front().is_some_and(|s| s.outcome.is_some()) {
            if let Some(Slot { outcome: Some(v), .. }) = self.slots.pop_front() {
                out.push(v);
            }
            self.base_tag += 1;
        }
        out
    }
}

#[async_trait]
impl Sink for PikaSink {
    async fn write(&mut self, batch: &Batch) -> Result<Vec<Verdict>, Error> {
        self.drain_signals();
        self.live()?;
        let mut verdicts = Vec::with_capacity(batch.len());
        for r in batch.iter() {
            if let Some(reason) = self.refuse(r) {
                verdicts.push(Verdict::Rejected(reason));
                continue;
            }
            let message_id = r.id.to_string();
            let props = self.properties(&message_id, r);
            let mut args = BasicPublishArguments::new(&self.config.exchange, "");
            args.mandatory(true);
            let link = self.live()?;
            if let Err(e) = link.channel.basic_publish(props, r.json.clone(), args).await {
                self.lost.get_or_insert(format!("publishing failed: {e}"));
                return Err(self.live().err().unwrap_or_else(|| amqp_error(&self.config.target, e)));
            }
            self.slots.push_back(Slot { message_id, outcome: None });
            verdicts.push(Verdict::Sent);
        }
        Ok(verdicts)
    }

    async fn confirmed(&mut self) -> Result<Vec<Verdict>, Error> {
        loop {
            let settled = self.take_settled();
            if !settled.is_empty() {
                return Ok(settled);
            }
            self.live()?;
            // Cancel-safe: a signal is handled as soon as it is received.
            tokio::select! {
                signal = self.signals.recv() => match signal {
                    Some((link, signal)) if link == self.link_id => self.on_signal(signal),
                    Some(_) => {}
                    None => {
                        self.lost.get_or_insert_with(|| "the confirm channel closed".into());
                    }
                },
                _ = tokio::time::sleep(CHECK_EVERY) => {}
            }
        }
    }

    async fn recover(&mut self, _failure: &Failure) -> Result<(), Error> {
        if let Some(link) = self.link.take() {
            let why = self.lost.take().unwrap_or_else(|| "the last attempt failed".into());
            tracing::warn!(
                "pika: {why}; {} unconfirmed events will be sent again after reconnecting",
                self.slots.len()
            );
            tokio::spawn(async move {
                let _ = tokio::time::timeout(Duration::from_secs(1), link.connection.close()).await;
            });
        }
        self.lost = None;
        self.slots.clear();
        self.base_tag = 1;
        self.returned.clear();
        self.link_id += 1;
        let link = open_link(&self.config, self.link_id, &self.signals_tx).await?;
        tracing::info!("pika: reconnected to {}", self.config.target.describe());
        self.link = Some(link);
        Ok(())
    }

    async fn ping(&mut self) -> Result<(), Error> {
        self.drain_signals();
        self.live().map(|_| ())
    }

    async fn close(&mut self) {
        if let Some(link) = self.link.take() {
            let _ = tokio::time::timeout(Duration::from_millis(500), link.channel.close()).await;
            let _ = tokio::time::timeout(Duration::from_millis(500), link.connection.close()).await;
        }
    }
}
