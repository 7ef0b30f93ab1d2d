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
use std::time::{Duration, Instant};

use amqprs::callbacks::{ChannelCallback, ConnectionCallback};
use amqprs::channel::{
    BasicPublishArguments, Channel, ConfirmSelectArguments, ExchangeDeclareArguments, QueueBindArguments,
    QueueDeclareArguments,
};
use amqprs::connection::{Connection, OpenConnectionArguments};
use amqprs::{Ack, BasicProperties, Cancel, Close, CloseChannel, FieldTable, Nack, Return};
use broker_core::backoff::Backoff;
use broker_core::pipeline::{self, Command, Inbox, Pending, Readiness};
use broker_core::{CloseReport, Error, Event, Position, async_trait};
use tokio::sync::{mpsc, oneshot};

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

fn amqp_error(target: &AmqpTarget, e: amqprs::error::Error) -> Error {
    let text = e.to_string();
    let hint = if text.contains("403") || text.contains("ACCESS_REFUSED") {
        " (wrong user name or password?)"
    } else if text.contains("InvalidCertificate") || text.contains("UnknownIssuer") {
        " (the server certificate is not signed by the configured CA)"
    } else if text.contains("CertificateRequired") || text.contains("HandshakeFailure") {
        " (the server requires a client certificate: set certfile/keyfile or RABBITMQ_SSL_CLIENT_*)"
    } else {
        ""
    };
    Error::Unavailable { backend: NAME, reason: format!("{}: {text}{hint}", target.describe()), cause: None }
}

/// An open connection and confirm-mode channel.
pub(crate) struct Link {
    pub(crate) connection: Connection,
    pub(crate) channel: Channel,
}

/// Opens a connection (within `connection_timeout`) and a channel.
pub(crate) async fn open(target: &AmqpTarget, name: &str) -> Result<(Connection, Channel), Error> {
    let mut args = OpenConnectionArguments::new(&target.host, target.port, &target.username, target.password.expose());
    args.virtual_host(&target.vhost).heartbeat(target.heartbeat).connection_name(name);
    if target.tls {
        args.tls_adaptor(crate::tls::adaptor(target)?);
    }
    let connection = match tokio::time::timeout(target.connection_timeout, Connection::open(&args)).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return Err(amqp_error(target, e)),
        Err(_) => {
            return Err(Error::Unavailable {
                backend: NAME,
                reason: format!("{}: no answer within {:?}", target.describe(), target.connection_timeout),
                cause: None,
            });
        }
    };
    let channel = connection.open_channel(None).await.map_err(|e| amqp_error(target, e))?;
    Ok((connection, channel))
}

/// Declares Rasa's topology on `channel`: a non-durable fanout exchange and durable queues
/// bound to it with the routing key `""`.
pub(crate) async fn declare_topology(channel: &Channel, config: &PikaConfig) -> Result<(), Error> {
    let fail = |what: String, e: amqprs::error::Error| Error::Unavailable {
        backend: NAME,
        reason: format!("{}: {what}: {e}", config.target.describe()),
        cause: None,
    };
    channel
        .exchange_declare(ExchangeDeclareArguments::new(&config.exchange, "fanout").durable(false).finish())
        .await
        .map_err(|e| fail(format!("declaring the fanout exchange {:?} (non-durable, as Rasa)", config.exchange), e))?;
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

/// An event published and waiting for its confirm.
struct Flight {
    seq: u64,
    pending: Pending,
    sent_at: Instant,
}

/// An event waiting to be (re)sent.
struct Queued {
    seq: u64,
    pending: Pending,
}

pub(crate) struct Writer {
    config: Arc<PikaConfig>,
    ready: Readiness,
    signals_tx: Signals,
    signals: mpsc::UnboundedReceiver<(u64, Signal)>,
    link: Option<Link>,
    link_id: u64,
    /// Unconfirmed events by delivery tag: `inflight[i]` has tag `base_tag + i`; `None` once
    /// settled out of order.
    inflight: VecDeque<Option<Flight>>,
    base_tag: u64,
    /// Events to send before anything new from the pipeline (after a reconnect), in order.
    queue: VecDeque<Queued>,
    /// Message ids RabbitMQ returned as unroutable; their confirm fails them.
    returned: HashSet<String>,
    flushes: VecDeque<(u64, oneshot::Sender<()>)>,
    next_seq: u64,
    backoff: Backoff,
    reconnect_at: Option<Instant>,
    stalled: bool,
    closing: Option<(Instant, oneshot::Sender<CloseReport>)>,
    /// The close deadline once known (from `close` or the Close command); reconnects keep it.
    close_at: Option<Instant>,
    properties: BasicProperties,
    /// `max_event_bytes`, lowered to RabbitMQ's `max_message_size` once a channel close reveals it.
    max_bytes: u64,
}

const TICK: Duration = Duration::from_millis(200);

impl Writer {
    pub(crate) fn new(
        config: Arc<PikaConfig>,
        ready: Readiness,
        link: Link,
        link_id: u64,
        signals_tx: Signals,
        signals: mpsc::UnboundedReceiver<(u64, Signal)>,
    ) -> Writer {
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
        let first = Duration::from_millis(100).min(config.retry_delay.max(Duration::from_millis(10)));
        let backoff = Backoff::new(first, config.retry_delay.max(first));
        Writer {
            ready,
            signals_tx,
            signals,
            link: Some(link),
            link_id,
            inflight: VecDeque::new(),
            base_tag: 1,
            queue: VecDeque::new(),
            returned: HashSet::new(),
            flushes: VecDeque::new(),
            next_seq: 0,
            backoff,
            reconnect_at: None,
            stalled: false,
            closing: None,
            close_at: None,
            properties,
            max_bytes: config.max_event_bytes,
            config,
        }
    }

    fn room(&self) -> usize {
        if self.link.is_none() || self.stalled {
            return 0;
        }
        self.config.max_inflight.saturating_sub(self.inflight.len())
    }

    pub(crate) async fn run(mut self, mut inbox: Inbox) {
        let mut batch = Vec::with_capacity(256);
        loop {
            if self.closing.is_some() && self.inflight.is_empty() && self.queue.is_empty() && inbox.is_finished() {
                return self.finish(&mut inbox).await;
            }
            if let Some(d) = inbox.close_requested() {
                self.close_at = Some(self.close_at.map_or(d, |c| c.min(d)));
                // Nothing new is accepted; the close is reached once what was queued before it
                // has been read (publish order), as if it were the last command.
                inbox.close();
                if self.closing.is_none() && inbox.is_finished() {
                    if let Some(reply) = inbox.take_close_reply() {
                        self.closing = Some((d, reply));
                    }
                }
            }
            if self.close_at.is_some_and(|d| Instant::now() >= d) {
                return self.finish(&mut inbox).await;
            }
            self.send_queued().await;
            // Read the pipeline when there is room for new events, or to fail them at once
            // (keep_unpublished false during an outage), or to find the Close command once
            // close was called (nothing new can be accepted then, so this stays bounded).
            let drop_mode = self.link.is_none() && !self.config.keep_unpublished;
            // A closed, drained inbox answers at once: reading it would spin and starve the
            // tasks that bring the last confirms.
            let read = !inbox.is_finished() && ((self.queue.is_empty() && self.room() > 0) || drop_mode);
            let max = if drop_mode { 256 } else { self.room().min(256) };
            let wake = self.reconnect_at.map_or(Instant::now() + TICK, |r| r.min(Instant::now() + TICK));
            batch.clear();
            tokio::select! {
                biased;
                Some((link, signal)) = self.signals.recv() => {
                    if link == self.link_id {
                        self.on_signal(signal);
                    }
                }
                n = inbox.recv_batch(&mut batch, max), if read => {
                    if n == 0 && inbox.is_finished() && inbox.close_requested().is_none() {
                        // Every handle is gone without close: deliver what we hold, then stop.
                        let report = self.finish_pending(Instant::now() + self.config.delivery.close_timeout).await;
                        if !report.is_clean() {
                            tracing::error!("pika: {} events undelivered after the broker was dropped", report.undelivered.len());
                        }
                        return;
                    }
                    for cmd in batch.drain(..) {
                        self.on_command(cmd).await;
                    }
                }
                _ = tokio::time::sleep_until(wake.into()) => self.on_tick().await,
            }
            self.answer_flushes();
        }
    }

    async fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::Publish(p) => {
                let seq = self.next_seq;
                self.next_seq += 1;
                if p.json.len() as u64 > self.max_bytes {
                    self.reject_oversize(p);
                } else if self.link.is_none() && !self.config.keep_unpublished {
                    p.settle.settle(Err(Error::Unavailable {
                        backend: NAME,
                        reason: "RabbitMQ is not connected (should_keep_unpublished_messages: false)".into(),
                        cause: None,
                    }));
                } else if self.queue.is_empty() && self.room() > 0 {
                    self.send(Queued { seq, pending: p }).await;
                } else {
                    self.queue.push_back(Queued { seq, pending: p });
                }
            }
            Command::Flush(tx) => self.flushes.push_back((self.next_seq, tx)),
            _ => {}
        }
    }

    fn reject_oversize(&self, p: Pending) {
        let len = p.json.len();
        let limit = if self.max_bytes < self.config.max_event_bytes {
            format!("RabbitMQ's max_message_size {}", self.max_bytes)
        } else {
            format!("max_event_bytes {}", self.max_bytes)
        };
        p.reject(NAME, format!("{len} bytes is over {limit}"));
    }

    /// Publishes one event on the live link (the caller checked there is one with room).
    async fn send(&mut self, q: Queued) {
        if q.pending.json.len() as u64 > self.max_bytes {
            return self.reject_oversize(q.pending);
        }
        if let Some((k, _)) = q.pending.headers.iter().find(|(k, _)| k.is_empty() || k.len() > 255) {
            let reason = format!(
                "the header name {:?}... is {} bytes; AMQP allows 1 to 255",
                k.chars().take(16).collect::<String>(),
                k.len()
            );
            return q.pending.reject(NAME, reason);
        }
        let Some(link) = &self.link else {
            self.queue.push_front(q);
            return;
        };
        let mut props = self.properties.clone();
        props.with_message_id(&q.pending.id.to_string());
        if !self.config.headers.is_empty() || !q.pending.headers.is_empty() {
            let mut table = FieldTable::new();
            for (k, v) in self.config.headers.iter().chain(q.pending.headers.iter()) {
                if let Ok(name) = k.clone().try_into() {
                    table.insert(name, v.clone().into());
                }
            }
            props.with_headers(table);
        }
        let mut args = BasicPublishArguments::new(&self.config.exchange, "");
        args.mandatory(true);
        match link.channel.basic_publish(props, q.pending.json.clone(), args).await {
            Ok(()) => {
                self.inflight.push_back(Some(Flight { seq: q.seq, pending: q.pending, sent_at: Instant::now() }));
            }
            Err(e) => {
                self.queue.push_front(q);
                self.on_lost(format!("publishing failed: {e}"));
            }
        }
    }

    async fn send_queued(&mut self) {
        while self.room() > 0 {
            let Some(q) = self.queue.pop_front() else { break };
            self.send(q).await;
        }
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
            Signal::Lost(why) => self.on_lost(why),
        }
    }

    fn confirm(&mut self, tag: u64, multiple: bool, ack: bool) {
        if self.stalled {
            self.stalled = false;
            tracing::info!("pika: RabbitMQ confirms again");
        }
        if self.link.is_some() {
            self.ready.set(true);
            self.backoff.reset();
        }
        let settle = |w: &mut Writer, f: Flight, tag: u64| {
            let id = f.pending.id.to_string();
            if !w.returned.is_empty() && w.returned.remove(&id) {
                f.pending.reject(
                    NAME,
                    format!(
                        "unroutable: no queue is bound to the exchange {:?} (returned by RabbitMQ)",
                        w.config.exchange
                    ),
                );
            } else if ack {
                f.pending.settle.delivered(Some(Position::DeliveryTag(tag)));
            } else {
                f.pending.settle.settle(Err(Error::Io {
                    backend: NAME,
                    operation: "publishing".into(),
                    reason: "RabbitMQ refused the message (basic.nack): a queue may be full (x-overflow: reject-publish) or the broker failed internally".into(),
                    cause: None,
                }));
            }
        };
        if tag < self.base_tag {
            return;
        }
        if multiple {
            while self.base_tag <= tag {
                let Some(slot) = self.inflight.pop_front() else { break };
                let t = self.base_tag;
                self.base_tag += 1;
                if let Some(f) = slot {
                    settle(self, f, t);
                }
            }
        } else {
            let i = (tag - self.base_tag) as usize;
            if let Some(f) = self.inflight.get_mut(i).and_then(Option::take) {
                settle(self, f, tag);
            }
        }
        while matches!(self.inflight.front(), Some(None)) {
            self.inflight.pop_front();
            self.base_tag += 1;
        }
    }

    /// The link is gone: unconfirmed events go back to the head of the queue (or fail, with
    /// `should_keep_unpublished_messages: false`), and a reconnect is scheduled.
    fn on_lost(&mut self, why: String) {
        let Some(link) = self.link.take() else { return };
        self.ready.set(false);
        self.link_id += 1;
        // RabbitMQ closes the channel on a message over its max_message_size: learn the limit, so
        // that event fails alone instead of closing every channel it is sent on.
        if let Some(limit) = server_size_limit(&why) {
            self.max_bytes = self.max_bytes.min(limit);
        }
        let unconfirmed: Vec<Flight> = self.inflight.drain(..).flatten().collect();
        tracing::warn!("pika: {why}; {} unconfirmed events will be re-sent after reconnecting", unconfirmed.len());
        self.base_tag = 1;
        self.returned.clear();
        self.stalled = false;
        for f in unconfirmed.into_iter().rev() {
            if self.config.keep_unpublished {
                self.queue.push_front(Queued { seq: f.seq, pending: f.pending });
            } else {
                f.pending.settle.settle(Err(Error::Io {
                    backend: NAME,
                    operation: "publishing".into(),
                    reason: format!(
                        "{why} before RabbitMQ confirmed the message (should_keep_unpublished_messages: false)"
                    ),
                    cause: None,
                }));
            }
        }
        self.reconnect_at = Some(Instant::now() + self.backoff.next_delay());
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(1), link.connection.close()).await;
        });
    }

    async fn on_tick(&mut self) {
        if let Some(link) = &self.link {
            if !link.connection.is_open() || !link.channel.is_open() {
                self.on_lost("the connection to RabbitMQ closed".into());
            }
        }
        if self.link.is_none() {
            if self.reconnect_at.is_some_and(|r| Instant::now() >= r) {
                self.reconnect().await;
            }
            return;
        }
        let oldest = self.inflight.iter().flatten().next().map(|f| f.sent_at);
        if let Some(sent) = oldest {
            if !self.stalled && sent.elapsed() >= self.config.confirm_timeout {
                self.stalled = true;
                self.ready.set(false);
                tracing::warn!(
                    "pika: no publisher confirm for {:?} ({} unconfirmed): RabbitMQ may be blocking publishers (memory or disk alarm); new events wait",
                    self.config.confirm_timeout,
                    self.inflight.iter().flatten().count()
                );
            }
        }
    }

    async fn reconnect(&mut self) {
        let id = self.link_id + 1;
        // While closing, an attempt may not outlast the close deadline.
        let attempt = open_link(&self.config, id, &self.signals_tx);
        let opened = match self.close_at {
            Some(deadline) => match tokio::time::timeout_at(deadline.into(), attempt).await {
                Ok(r) => r,
                Err(_) => Err(Error::Timeout(self.config.delivery.close_timeout)),
            },
            None => attempt.await,
        };
        match opened {
            Ok(link) => {
                // The backoff is reset by the first confirm on this link, not here: a link that
                // drops right after each reconnect is retried ever more slowly.
                self.link_id = id;
                self.link = Some(link);
                self.reconnect_at = None;
                self.ready.set(true);
                tracing::info!(
                    "pika: reconnected to {}; re-sending {} events",
                    self.config.target.describe(),
                    self.queue.len()
                );
            }
            Err(e) => {
                self.link_id = id;
                let delay = self.backoff.next_delay();
                tracing::warn!("pika: reconnecting failed: {e}; next attempt in {delay:?}");
                self.reconnect_at = Some(Instant::now() + delay);
            }
        }
    }

    fn lowest_unsettled(&self) -> u64 {
        self.inflight
            .iter()
            .flatten()
            .next()
            .map(|f| f.seq)
            .or_else(|| self.queue.front().map(|q| q.seq))
            .unwrap_or(self.next_seq)
    }

    fn answer_flushes(&mut self) {
        if self.flushes.is_empty() {
            return;
        }
        let low = self.lowest_unsettled();
        while self.flushes.front().is_some_and(|(barrier, _)| *barrier <= low) {
            if let Some((_, tx)) = self.flushes.pop_front() {
                let _ = tx.send(());
            }
        }
    }

    /// Waits for outstanding confirms until `deadline`, then gives up on what is left.
    async fn finish_pending(&mut self, deadline: Instant) -> CloseReport {
        while !(self.inflight.is_empty() && self.queue.is_empty()) && Instant::now() < deadline {
            self.send_queued().await;
            let wake = (Instant::now() + TICK).min(deadline);
            tokio::select! {
                Some((link, signal)) = self.signals.recv() => {
                    if link == self.link_id {
                        self.on_signal(signal);
                    }
                }
                _ = tokio::time::sleep_until(wake.into()) => self.on_tick().await,
            }
            self.answer_flushes();
        }
        let after = self.config.delivery.close_timeout;
        let mut undelivered: Vec<Event> = Vec::new();
        for f in self.inflight.drain(..).flatten() {
            f.pending.give_up(after, &mut undelivered);
        }
        for q in self.queue.drain(..) {
            q.pending.give_up(after, &mut undelivered);
        }
        CloseReport::new(undelivered)
    }

    async fn finish(mut self, inbox: &mut Inbox) {
        let (deadline, reply) = match self.closing.take() {
            Some((d, r)) => (d, Some(r)),
            None => (inbox.close_requested().unwrap_or_else(Instant::now), None),
        };
        let mut report = self.finish_pending(deadline).await;
        // Publishes that raced with close, and the Close command itself when it was still queued.
        let queued_close =
            pipeline::drain_undelivered(inbox, self.config.delivery.close_timeout, &mut report.undelivered);
        let reply = reply.or(queued_close);
        for (_, tx) in self.flushes.drain(..) {
            let _ = tx.send(());
        }
        self.ready.set(false);
        // The report first: closing the link may wait on a broker that stopped answering.
        if let Some(r) = reply {
            let _ = r.send(report);
        }
        if let Some(link) = self.link.take() {
            let _ = tokio::time::timeout(Duration::from_secs(2), link.channel.close()).await;
            let _ = tokio::time::timeout(Duration::from_secs(2), link.connection.close()).await;
        }
    }
}
