//! Helpers shared by the RabbitMQ tests: configs on per-test queues and exchanges, a raw amqprs
//! client to look at what landed (and to clean up), and a TCP proxy on loopback that can cut or
//! stall the connection to the real RabbitMQ.
#![allow(dead_code)]

use std::time::Duration;

use amqprs::channel::{BasicGetArguments, Channel, ExchangeDeleteArguments, QueueDeleteArguments};
use amqprs::connection::{Connection, OpenConnectionArguments};
use broker_core::{ConfigValue, Options};
use broker_pika::PikaConfig;
pub use broker_testkit::proxy::Proxy;

/// A unique name for this test's queue or exchange.
pub fn name(prefix: &str) -> String {
    format!("{prefix}-{}", broker_testkit::services::unique_suffix())
}

/// `url` with extra keys, read like an `event_broker:` section.
pub fn config_with(url: &str, queues: &[&str], exchange: &str, extra: &[(&str, ConfigValue)]) -> PikaConfig {
    let mut pairs = vec![
        ("url".to_owned(), ConfigValue::Str(url.into())),
        (
            "queues".to_owned(),
            ConfigValue::List(
                queues
                    .iter()
                    .map(|q| broker_core::Spanned { value: ConfigValue::Str((*q).into()), at: Default::default() })
                    .collect(),
            ),
        ),
        ("exchange_name".to_owned(), ConfigValue::Str(exchange.into())),
    ];
    pairs.extend(extra.iter().map(|(k, v)| ((*k).to_owned(), v.clone())));
    PikaConfig::from_options_with_env(Options::from_pairs(pairs), &|_| None).expect("valid config").0
}

/// A config on a fresh queue and exchange of its own.
pub fn fresh_config(url: &str, extra: &[(&str, ConfigValue)]) -> (PikaConfig, String, String) {
    let queue = name("q");
    let exchange = name("x");
    (config_with(url, &[&queue], &exchange, extra), queue, exchange)
}

/// A raw amqprs connection to the service at `url`.
pub async fn raw(url: &str) -> (Connection, Channel) {
    let t = config_with(url, &["unused"], "unused", &[]).target;
    let mut args = OpenConnectionArguments::new(&t.host, t.port, &t.username, t.password.expose());
    args.virtual_host(&t.vhost);
    let connection = Connection::open(&args).await.expect("raw connection");
    let channel = connection.open_channel(None).await.expect("raw channel");
    (connection, channel)
}

/// A message as it sits in a queue.
pub struct Got {
    pub body: Vec<u8>,
    pub properties: amqprs::BasicProperties,
}

/// Takes up to `n` messages from `queue` with basic.get (auto-ack), waiting up to 10 s.
pub async fn get(channel: &Channel, queue: &str, n: usize) -> Vec<Got> {
    let mut out = Vec::new();
    for _ in 0..1000 {
        if out.len() >= n {
            break;
        }
        match channel.basic_get(BasicGetArguments::new(queue).no_ack(true).finish()).await.expect("basic.get") {
            Some((_, properties, body)) => out.push(Got { body, properties }),
            None => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
    out
}

/// Deletes the queues and exchanges a test made.
pub async fn cleanup(url: &str, queues: &[&str], exchanges: &[&str]) {
    let (connection, channel) = raw(url).await;
    for q in queues {
        let _ = channel.queue_delete(QueueDeleteArguments::new(q)).await;
    }
    for x in exchanges {
        let _ = channel.exchange_delete(ExchangeDeleteArguments::new(x)).await;
    }
    let _ = channel.close().await;
    let _ = connection.close().await;
}

/// The shared loopback proxy (`broker_testkit::proxy`) in front of the real RabbitMQ of `url`.
pub async fn proxy(url: &str) -> Proxy {
    let t = config_with(url, &["unused"], "unused", &[]).target;
    Proxy::start(&format!("{}:{}", t.host, t.port)).await.expect("start the proxy")
}

/// The service URL with the proxy's port.
pub fn proxied_url(proxy: &Proxy, url: &str) -> String {
    let t = config_with(url, &["unused"], "unused", &[]).target;
    format!("amqp://{}:{}@127.0.0.1:{}/%2f", t.username, t.password.expose(), proxy.port())
}

/// What a consumer saw of events published as [`broker_testkit::user_event`]s.
#[derive(Debug, Default)]
pub struct Seen {
    /// Per sender, each `seq` in the order first seen.
    pub order: std::collections::BTreeMap<String, Vec<u64>>,
    /// Copies beyond the first (at-least-once delivery after a reconnect).
    pub duplicates: usize,
    /// Distinct events.
    pub distinct: usize,
}

/// Reads `backend`'s queue (acking each message) until `n` distinct events arrived or `timeout`.
pub async fn consume_distinct(backend: &dyn broker_core::Backend, n: usize, timeout: Duration) -> Seen {
    use broker_core::{SourceOptions, StartFrom};
    let mut source = backend.source(&SourceOptions::from(StartFrom::Beginning)).await.expect("open a source");
    let deadline = std::time::Instant::now() + timeout;
    let mut seen = Seen::default();
    let mut ids = std::collections::HashSet::new();
    while seen.distinct < n {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let r = match tokio::time::timeout(left, source.next()).await {
            Ok(Ok(Some(r))) => r,
            Ok(other) => panic!("the source stopped after {} distinct events: {other:?}", seen.distinct),
            Err(_) => break,
        };
        source.ack(&r).await.expect("ack");
        let sender = r.event.sender_id().unwrap_or_default().to_owned();
        let seq = broker_testkit::seq_of(&r.event).expect("a seq");
        if ids.insert((sender.clone(), seq)) {
            seen.distinct += 1;
            seen.order.entry(sender).or_default().push(seq);
        } else {
            seen.duplicates += 1;
        }
    }
    seen
}

/// Whether `broker.is_ready()` becomes `want` within `within` (polled every 20 ms).
pub async fn becomes_ready(broker: &dyn broker_core::EventBroker, want: bool, within: Duration) -> bool {
    let deadline = std::time::Instant::now() + within;
    loop {
        if broker.is_ready().await == want {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Publishes `user_event(sender, 1..max)` until the broker refuses one with `BufferFull` (a
/// `when_full: error` broker that cannot deliver); returns the accepted receipts and whether it
/// filled up. Pauses now and then so the writer can take what it has room for.
pub async fn publish_until_full(
    broker: &dyn broker_core::EventBroker,
    sender: &str,
    max: u64,
) -> (Vec<broker_core::Receipt>, bool) {
    let mut receipts = Vec::new();
    for seq in 1..max {
        match broker.publish(broker_testkit::user_event(sender, seq)).await {
            Ok(r) => receipts.push(r),
            Err(broker_core::Error::BufferFull { .. }) => return (receipts, true),
            Err(e) => panic!("{e}"),
        }
        if seq % 50 == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    (receipts, false)
}

/// How many messages `queue` holds now (declaring it durable, as Rasa does, if it is missing).
pub async fn depth(url: &str, queue: &str) -> u64 {
    let (connection, channel) = raw(url).await;
    let declared = channel
        .queue_declare(amqprs::channel::QueueDeclareArguments::new(queue).durable(true).finish())
        .await
        .expect("queue.declare")
        .expect("a declare-ok");
    let _ = channel.close().await;
    let _ = connection.close().await;
    u64::from(declared.1)
}
