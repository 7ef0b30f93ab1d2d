//! The Kafka backend against a real Kafka-protocol broker (`BROKER_TEST_KAFKA_BOOTSTRAP`; CI
//! starts tansu on 127.0.0.1:9092), each test on topics of its own.

use std::collections::HashMap;
use std::time::Duration;

use broker_core::{Backend, Event, Position, SourceOptions, StartFrom, async_trait};
use broker_kafka::{KafkaBackend, KafkaConfig};
use broker_testkit::Target;
use broker_testkit::scenario::{Hooks, Scene, Skip};

fn topic(prefix: &str) -> String {
    format!("{prefix}-{}", broker_testkit::services::unique_suffix())
}

struct Kafka {
    bootstrap: String,
}

#[async_trait]
impl Target for Kafka {
    fn name(&self) -> String {
        "kafka (partition_by_sender)".into()
    }
    async fn fresh(&self) -> Box<dyn Backend> {
        // Order per sender needs the sender as the key: one conversation, one partition.
        let config = KafkaConfig::plaintext(&self.bootstrap, topic("conformance"))
            .partition_by_sender(true)
            .create_topic(3, 1)
            .max_event_bytes(64 * 1024);
        Box::new(KafkaBackend::new(config))
    }
    fn poison(&self) -> Option<Event> {
        Some(broker_testkit::oversized_event(100_000))
    }
    async fn scene(&self) -> Scene {
        let group = format!("g-{}", topic("scene"));
        Scene { backend: self.fresh().await, hooks: Box::new(GroupHooks { group }) }
    }
}

/// A Kafka consumer keeps its place as its group's committed offsets.
struct GroupHooks {
    group: String,
}

impl Hooks for GroupHooks {
    fn resume(&self, after: Option<&broker_core::Received>) -> Result<SourceOptions, Skip> {
        let start = if after.is_some() { StartFrom::Resume } else { StartFrom::Beginning };
        Ok(SourceOptions::from(start).group(&self.group))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_conforms() {
    let Some(service) = broker_testkit::services::kafka("kafka_conforms").await else { return };
    broker_testkit::run_all(&Kafka { bootstrap: service.url.clone() }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_key_always_lands_on_the_same_partition() {
    let Some(service) = broker_testkit::services::kafka("the_same_key_always_lands_on_the_same_partition").await else {
        return;
    };
    let config = KafkaConfig::plaintext(&service.url, topic("keys")).partition_by_sender(true).create_topic(6, 1);
    let backend = KafkaBackend::new(config);
    let broker = backend.connect().await.unwrap();
    let mut receipts = Vec::new();
    for seq in 0..600 {
        let sender = format!("conversation-{}", seq % 30);
        receipts.push((sender.clone(), broker.publish(broker_testkit::user_event(&sender, seq)).await.unwrap()));
    }
    let mut partitions: HashMap<String, std::collections::BTreeSet<i32>> = HashMap::new();
    for (sender, r) in receipts {
        match r.await.unwrap().position {
            Some(Position::Partition { partition, .. }) => {
                partitions.entry(sender).or_default().insert(partition);
            }
            other => panic!("no partition in the delivery report: {other:?}"),
        }
    }
    broker.close().await.unwrap();
    assert_eq!(partitions.len(), 30);
    assert!(partitions.values().all(|p| p.len() == 1), "{partitions:?}");
    let used: std::collections::BTreeSet<i32> = partitions.values().flatten().copied().collect();
    assert!(used.len() > 1, "30 keys over 6 partitions use more than one: {used:?}");

    // The consumer sees each message where the report said, with the key's partition.
    let got = broker_testkit::consume(&backend, 600, Duration::from_secs(30)).await;
    for r in got {
        let Position::Partition { partition, .. } = r.position else { panic!() };
        assert!(partitions[r.event.sender_id().unwrap()].contains(&partition));
    }
}

/// Rasa's sample has events with `sender_id: ""`: an empty key must stay on one partition too
/// (librdkafka's default partitioner spreads empty keys at random, which broke their order).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_sender_id_keeps_one_partition() {
    let Some(service) = broker_testkit::services::kafka("an_empty_sender_id_keeps_one_partition").await else {
        return;
    };
    let config = KafkaConfig::plaintext(&service.url, topic("empty-key")).partition_by_sender(true).create_topic(6, 1);
    let broker = KafkaBackend::new(config).connect().await.unwrap();
    let mut partitions = std::collections::BTreeSet::new();
    for seq in 0..30 {
        let d = broker.publish(broker_testkit::user_event("", seq)).await.unwrap().await.unwrap();
        let Some(Position::Partition { partition, .. }) = d.position else { panic!("{:?}", d.position) };
        partitions.insert(partition);
        // Past librdkafka's sticky window, so a random partitioner would move on.
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    broker.close().await.unwrap();
    assert_eq!(partitions.len(), 1, "one partition for the empty key: {partitions:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_topic_or_broker_fails_at_connect_saying_so() {
    let Some(service) = broker_testkit::services::kafka("a_missing_topic_or_broker_fails_at_connect_saying_so").await
    else {
        return;
    };
    let err = KafkaBackend::new(KafkaConfig::plaintext(&service.url, topic("missing")))
        .connect()
        .await
        .expect_err("must fail");
    assert!(err.to_string().contains("does not exist"), "{err}");

    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let started = std::time::Instant::now();
    let err = KafkaBackend::new(KafkaConfig::plaintext(format!("127.0.0.1:{port}"), "t"))
        .connect()
        .await
        .expect_err("must fail");
    assert!(err.to_string().contains("cannot connect"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(15));
}

/// What Rasa's users consume with: Python's confluent-kafka reads our messages unchanged, with
/// the key and the RASA_ENVIRONMENT header.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_confluent_kafka_consumer_reads_our_messages() {
    let Some(service) = broker_testkit::services::kafka("a_python_confluent_kafka_consumer_reads_our_messages").await
    else {
        return;
    };
    if !broker_testkit::services::python_module(
        "a_python_confluent_kafka_consumer_reads_our_messages",
        "confluent_kafka",
    ) {
        return;
    }
    let name = topic("python");
    let config = KafkaConfig::plaintext(&service.url, &name).partition_by_sender(true).create_topic(1, 1);
    let broker = KafkaBackend::new(config).connect().await.unwrap();
    let events = broker_testkit::rasa_sample_events();
    let mut receipts = Vec::new();
    for e in events.clone() {
        receipts.push(broker.publish(e).await.unwrap());
    }
    for r in receipts {
        r.await.unwrap();
    }
    broker.close().await.unwrap();
    let script = r#"
import sys, json
from confluent_kafka import Consumer
c = Consumer({"bootstrap.servers": sys.argv[1], "group.id": "python-check", "auto.offset.reset": "earliest"})
c.subscribe([sys.argv[2]])
want, got, empty = int(sys.argv[3]), 0, 0
while got < want and empty < 60:
    m = c.poll(1.0)
    if m is None:
        empty += 1
        continue
    if m.error():
        raise SystemExit(str(m.error()))
    headers = dict(m.headers() or [])
    print(json.dumps({"key": (m.key() or b"").decode(), "env": headers.get("RASA_ENVIRONMENT", b"").decode(), "value": m.value().decode()}))
    got += 1
c.close()
"#;
    let out = std::process::Command::new("python3")
        .args(["-c", script, &service.url, &name, &events.len().to_string()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<serde_like::Line> = String::from_utf8(out.stdout).unwrap().lines().map(serde_like::parse).collect();
    assert_eq!(lines.len(), events.len());
    let want = std::env::var("RASA_ENVIRONMENT").unwrap_or_else(|_| "RASA_ENVIRONMENT_NOT_SET".into());
    for (line, sample) in lines.iter().zip(broker_testkit::rasa_sample_lines()) {
        assert_eq!(line.value, sample, "the value is Rasa's encoding");
        let sender = Event::from_json(sample.as_bytes()).unwrap().sender_id().unwrap_or_default().to_owned();
        assert_eq!(line.key, sender);
        assert_eq!(line.env, want);
    }
}

/// Reads the three string fields of the Python script's output lines with our own JSON parser.
mod serde_like {
    pub struct Line {
        pub key: String,
        pub env: String,
        pub value: String,
    }
    pub fn parse(text: &str) -> Line {
        let v = broker_core::json::parse(text.as_bytes()).unwrap();
        let m = v.as_object().unwrap();
        let s = |k: &str| m.get(k).and_then(|v| v.as_str()).unwrap().to_owned();
        Line { key: s("key"), env: s("env"), value: s("value") }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_resumes_from_its_committed_offset() {
    let Some(service) = broker_testkit::services::kafka("a_group_resumes_from_its_committed_offset").await else {
        return;
    };
    let name = topic("resume");
    let backend =
        KafkaBackend::new(KafkaConfig::plaintext(&service.url, &name).partition_by_sender(true).create_topic(2, 1));
    let broker = backend.connect().await.unwrap();
    for seq in 0..10 {
        broker.publish(broker_testkit::user_event("r", seq)).await.unwrap().await.unwrap();
    }
    let group = format!("g-{name}");
    let opts = SourceOptions::from(StartFrom::Beginning).group(&group);
    let mut source = backend.source(&opts).await.unwrap();
    for _ in 0..6 {
        let r = tokio::time::timeout(Duration::from_secs(30), source.next()).await.unwrap().unwrap().unwrap();
        source.ack(&r).await.unwrap();
    }
    drop(source);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut resumed = backend.source(&SourceOptions::from(StartFrom::Resume).group(&group)).await.unwrap();
    let mut seqs = Vec::new();
    for _ in 0..4 {
        let r = tokio::time::timeout(Duration::from_secs(30), resumed.next()).await.unwrap().unwrap().unwrap();
        seqs.push(broker_testkit::seq_of(&r.event).unwrap());
        resumed.ack(&r).await.unwrap();
    }
    assert_eq!(seqs, vec![6, 7, 8, 9]);
    broker.close().await.unwrap();
}

/// Acknowledged out of order: the group's offset stops at the lowest event not acknowledged, so
/// after a restart that event (and those after it) come again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unacknowledged_event_comes_again_after_later_ones_were_acknowledged() {
    let Some(service) = broker_testkit::services::kafka("an_unacknowledged_event_comes_again").await else {
        return;
    };
    let name = topic("unacked");
    let backend = KafkaBackend::new(KafkaConfig::plaintext(&service.url, &name).create_topic(1, 1));
    let broker = backend.connect().await.unwrap();
    for seq in 0..10 {
        broker.publish(broker_testkit::user_event("u", seq)).await.unwrap().await.unwrap();
    }
    let group = format!("g-{name}");
    let mut source = backend.source(&SourceOptions::from(StartFrom::Beginning).group(&group)).await.unwrap();
    for _ in 0..10 {
        let r = tokio::time::timeout(Duration::from_secs(30), source.next()).await.unwrap().unwrap().unwrap();
        if broker_testkit::seq_of(&r.event) != Some(3) {
            source.ack(&r).await.unwrap();
        }
    }
    drop(source);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut resumed = backend.source(&SourceOptions::from(StartFrom::Resume).group(&group)).await.unwrap();
    let r = tokio::time::timeout(Duration::from_secs(30), resumed.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(broker_testkit::seq_of(&r.event), Some(3), "the event never acknowledged comes first");
    broker.close().await.unwrap();
}
