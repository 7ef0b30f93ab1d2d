//! `broker-bench kafka`: the Kafka backend against an rdkafka producer with the same settings
//! (acks=all, idempotence, key = sender_id, the same headers), both confirming every event by its
//! delivery report.

// The closures handed to `send_all` return rdkafka's own `send` result (the record comes back).
#![allow(clippy::result_large_err)]

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use broker_kafka::{KafkaBackend, KafkaConfig};
use rdkafka::ClientContext;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};

use crate::{Plan, dataset, peak_rss_mib, publish_through, result, run_plan};

fn bootstrap() -> String {
    std::env::var("BROKER_TEST_KAFKA_BOOTSTRAP").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

pub(crate) fn bench(events: u64, runs: usize) -> Result<()> {
    run_plan(
        Plan {
            backend: "kafka",
            describe: format!(
                "{events} events, 1000 conversations keyed by sender_id, 6 partitions, broker at {}",
                bootstrap()
            ),
            variants: vec![
                ("kafka-raw", events),
                ("kafka-raw-default", events),
                ("kafka-ours", events),
                ("kafka-cli@1000", 1000),
                ("kafka-cli@50000", 50_000),
                ("kafka-cli@500000", 500_000),
            ],
            comparisons: vec![("kafka-ours", "kafka-raw", 0.8), ("kafka-ours", "kafka-raw-default", 0.7)],
            // 1,000 events in under 0.15 s, whole process.
            rates: vec![("kafka-cli@1000", 1000.0 / 0.15), ("kafka-cli@50000", 150_000.0)],
            note: "raw: rdkafka ThreadedProducer, a queue of 10,000 (ours' default buffer), serde_json values, delivery callbacks; raw-default: BaseProducer with librdkafka's default queue (100,000 messages), polled by the sending thread; ours: the kafka backend; cli@N: `broker publish` of N events to an existing topic, whole process; all acks=all, idempotence, linger 5 ms, key=sender_id, the same headers",
        },
        runs,
    )
}

fn create_topic(name: &str) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        let admin: AdminClient<DefaultClientContext> =
            rdkafka::ClientConfig::new().set("bootstrap.servers", bootstrap()).create()?;
        let topic = NewTopic::new(name, 6, TopicReplication::Fixed(1));
        let r = admin.create_topics([&topic], &AdminOptions::new()).await?;
        for t in r {
            t.map_err(|(t, e)| anyhow::anyhow!("creating {t}: {e}"))?;
        }
        Ok(())
    })
}

/// Runs `base` (the variant's name without an `@N` size) as `variant`.
pub(crate) fn run(base: &str, variant: &str, dir: &std::path::Path, n: u64) -> Result<serde_json::Value> {
    let topic = format!("bench-{}-{}", variant.replace('@', "-"), std::process::id());
    create_topic(&topic)?;
    match base {
        "kafka-cli" => {
            // The whole process against an existing topic: start-up, metadata, producer id,
            // publishing and the last delivery report.
            let endpoints = format!(
                "event_broker:\n  type: kafka\n  url: {}\n  topic: {topic}\n  security_protocol: PLAINTEXT\n",
                bootstrap()
            );
            Ok(crate::cli_publish(variant, dir, n, &endpoints)?.0)
        }
        "kafka-ours" => {
            let config = KafkaConfig::plaintext(bootstrap(), &topic).partition_by_sender(true);
            publish_through(variant, Box::new(KafkaBackend::new(config)), dataset(n))
        }
        "kafka-raw" => raw(variant, &topic, n),
        "kafka-raw-default" => raw_default(variant, &topic, n),
        other => bail!("unknown variant {other}"),
    }
}

/// Records each confirmed message's latency from the time stamp it carries.
struct Reports {
    latencies: Mutex<Vec<u64>>,
    failed: AtomicU64,
}

impl ClientContext for Reports {}

impl ProducerContext for Reports {
    type DeliveryOpaque = Box<Instant>;
    fn delivery(&self, result: &DeliveryResult<'_>, sent: Box<Instant>) {
        match result {
            Ok(_) => self.latencies.lock().map(|mut l| l.push(sent.elapsed().as_nanos() as u64 / 1000)).unwrap_or(()),
            Err(_) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// One message as ours sends it: the payload, the key (`sender_id`) and Rasa's headers.
type Record<'a> = BaseRecord<'a, str, [u8], Box<Instant>>;

/// The dataset as serde_json values (what a plain client would hold).
fn values(n: u64) -> Result<Vec<serde_json::Value>> {
    dataset(n).iter().map(|e| serde_json::from_slice(&e.to_json()).context("dataset")).collect()
}

fn raw_config() -> rdkafka::ClientConfig {
    let mut c = rdkafka::ClientConfig::new();
    c.set("bootstrap.servers", bootstrap())
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("message.timeout.ms", "0");
    c
}

fn reports(n: u64) -> Reports {
    Reports { latencies: Mutex::new(Vec::with_capacity(n as usize)), failed: AtomicU64::new(0) }
}

/// Sends every value with `send` (serde_json payload, key, headers as ours); while librdkafka's
/// queue is full, calls `full` and tries again; calls `every_1000` after each thousand sends.
fn send_all(
    topic: &str,
    values: &[serde_json::Value],
    send: impl for<'r> Fn(Record<'r>) -> Result<(), (rdkafka::error::KafkaError, Record<'r>)>,
    full: impl Fn(),
    every_1000: impl Fn(),
) -> Result<()> {
    let environment = "RASA_ENVIRONMENT_NOT_SET";
    for (i, v) in values.iter().enumerate() {
        let payload = serde_json::to_vec(v)?;
        let key = v["sender_id"].as_str().unwrap_or_default().to_owned();
        let id = format!("{i:032x}");
        let mut opaque = Box::new(Instant::now());
        loop {
            let headers = OwnedHeaders::new_with_capacity(2)
                .insert(Header { key: "RASA_ENVIRONMENT", value: Some(environment) })
                .insert(Header { key: "rasa-event-id", value: Some(id.as_str()) });
            let record = BaseRecord::with_opaque_to(topic, opaque).payload(&payload[..]).key(&key[..]).headers(headers);
            match send(record) {
                Ok(()) => break,
                Err((
                    rdkafka::error::KafkaError::MessageProduction(rdkafka::types::RDKafkaErrorCode::QueueFull),
                    r,
                )) => {
                    opaque = r.delivery_opaque;
                    full();
                }
                Err((e, _)) => bail!("send: {e}"),
            }
        }
        if i % 1000 == 999 {
            every_1000();
        }
    }
    Ok(())
}

/// The result of a raw run once `producer` flushed: every message must be confirmed.
fn finish<P: Producer<Reports>>(variant: &str, n: u64, started: Instant, producer: &P) -> Result<serde_json::Value> {
    producer.flush(Duration::from_secs(120))?;
    let elapsed = started.elapsed();
    let failed = producer.context().failed.load(Ordering::Relaxed);
    if failed > 0 {
        bail!("{failed} messages failed");
    }
    let lat = std::mem::take(&mut *producer.context().latencies.lock().map_err(|_| anyhow::anyhow!("poisoned"))?);
    if lat.len() as u64 != n {
        bail!("{} delivery reports for {n} messages", lat.len());
    }
    Ok(result(variant, n, elapsed, lat, peak_rss_mib()))
}

/// rdkafka's `ThreadedProducer` with a queue of 10,000 (ours' default buffer), sleeping 1 ms
/// while it is full.
fn raw(variant: &str, topic: &str, n: u64) -> Result<serde_json::Value> {
    let values = values(n)?;
    let producer: ThreadedProducer<Reports> =
        raw_config().set("queue.buffering.max.messages", "10000").create_with_context(reports(n))?;
    let started = Instant::now();
    send_all(topic, &values, |r| producer.send(r), || std::thread::sleep(Duration::from_millis(1)), || {})?;
    finish(variant, n, started, &producer)
}

/// The limit of a plain client: a `BaseProducer` with librdkafka's default queue sizes and the
/// same acks, idempotence, keys and headers as ours, polled for delivery reports by the sending
/// thread itself (every 1,000 sends, and while the queue is full) instead of a polling thread.
fn raw_default(variant: &str, topic: &str, n: u64) -> Result<serde_json::Value> {
    let values = values(n)?;
    let producer: BaseProducer<Reports> = raw_config().create_with_context(reports(n))?;
    let started = Instant::now();
    send_all(
        topic,
        &values,
        |r| producer.send(r),
        || producer.poll(Duration::from_millis(1)),
        || producer.poll(Duration::ZERO),
    )?;
    finish(variant, n, started, &producer)
}
