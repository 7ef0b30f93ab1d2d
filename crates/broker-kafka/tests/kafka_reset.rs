//! The producer reset, made deterministic with librdkafka's mock cluster (no service needed):
//! produce requests fail with an unknown broker error (what tansu answered during a restart and
//! what made events fail before the reset existed); the broker replaces its producer and sends
//! the affected events again, in publish order, so every receipt ends delivered.

use std::time::Duration;

use broker_core::{EventBroker, Position};
use broker_kafka::{KafkaBackend, KafkaConfig};
use rdkafka::mocking::MockCluster;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_broker_errors_replace_the_producer_and_lose_nothing() {
    let cluster = MockCluster::new(1).expect("mock cluster");
    cluster.create_topic("reset", 1, 1).expect("topic");
    let backend = KafkaBackend::new(KafkaConfig::plaintext(cluster.bootstrap_servers(), "reset"));
    let broker = backend.open().await.expect("connect");
    let mut receipts = Vec::new();
    for seq in 0..50 {
        receipts.push(broker.publish(broker_testkit::user_event("r", seq)).await.unwrap());
    }
    broker.flush().await.unwrap();
    // The next produce requests fail with UNKNOWN (-1, "Unknown broker error").
    cluster.request_errors(RDKafkaApiKey::Produce, &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN; 3]);
    for seq in 50..200 {
        receipts.push(broker.publish(broker_testkit::user_event("r", seq)).await.unwrap());
    }
    let mut offsets = Vec::new();
    for (seq, r) in receipts.into_iter().enumerate() {
        let d = tokio::time::timeout(Duration::from_secs(60), r)
            .await
            .expect("an outcome in time")
            .unwrap_or_else(|e| panic!("event {seq} failed: {e}"));
        match d.position {
            Some(Position::Partition { offset, .. }) => offsets.push(offset),
            other => panic!("{other:?}"),
        }
    }
    assert!(broker.producer_resets() >= 1, "the injected errors must have replaced the producer");
    // One partition: offsets in publish order mean the re-sent events kept their order.
    assert!(offsets.windows(2).all(|w| w[0] < w[1]), "offsets follow publish order: {offsets:?}");
    assert!(broker.close().await.unwrap().is_clean());
}

/// Scenario 7: a fatal idempotence error (an out-of-order sequence number) injected while events
/// are published every millisecond: the producer is replaced, events published meanwhile wait
/// behind the ordered resend, and no receipt fails; the partition's offsets keep publish order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fatal_idempotence_error_fails_no_receipt() {
    let cluster = MockCluster::new(1).expect("mock cluster");
    cluster.create_topic("fatal", 1, 1).expect("topic");
    let backend = KafkaBackend::new(KafkaConfig::plaintext(cluster.bootstrap_servers(), "fatal"));
    let broker = backend.open().await.expect("connect");
    let mut receipts = Vec::new();
    for seq in 0..600 {
        if seq == 100 {
            cluster.request_errors(
                RDKafkaApiKey::Produce,
                &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER; 2],
            );
        }
        receipts.push(broker.publish(broker_testkit::user_event("f", seq)).await.unwrap());
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let mut offsets = Vec::new();
    for (seq, r) in receipts.into_iter().enumerate() {
        let d = tokio::time::timeout(Duration::from_secs(60), r)
            .await
            .expect("an outcome in time")
            .unwrap_or_else(|e| panic!("event {seq} failed: {e}"));
        match d.position {
            Some(Position::Partition { offset, .. }) => offsets.push(offset),
            other => panic!("{other:?}"),
        }
    }
    assert!(broker.producer_resets() >= 1, "the fatal error must have replaced the producer");
    assert!(offsets.windows(2).all(|w| w[0] < w[1]), "offsets follow publish order");
    assert!(broker.close().await.unwrap().is_clean());
}

/// An error that is the event's own (`InvalidRecord`, e.g. a null key on a compacted topic)
/// fails that event alone as `Rejected`: no producer reset, the events after it are delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_record_fails_alone_without_a_reset() {
    let cluster = MockCluster::new(1).expect("mock cluster");
    cluster.create_topic("invalid", 1, 1).expect("topic");
    let backend = KafkaBackend::new(KafkaConfig::plaintext(cluster.bootstrap_servers(), "invalid"));
    let broker = backend.open().await.expect("connect");
    broker.publish(broker_testkit::user_event("i", 0)).await.unwrap().await.expect("delivered");
    cluster.request_errors(RDKafkaApiKey::Produce, &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_INVALID_RECORD]);
    match broker.publish(broker_testkit::user_event("i", 1)).await.unwrap().await {
        Err(broker_core::Error::Rejected { .. }) => {}
        other => panic!("an invalid record is the event's own fault: {other:?}"),
    }
    for seq in 2..12 {
        broker.publish(broker_testkit::user_event("i", seq)).await.unwrap().await.expect("neighbours are delivered");
    }
    assert_eq!(broker.producer_resets(), 0, "no producer reset for an event's own fault");
    assert!(broker.close().await.unwrap().is_clean());
    assert!(broker.close().await.unwrap().is_clean(), "a second close agrees");
}

fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").map(|d| d.count()).unwrap_or(0)
}

/// Scenario 8: 50 brokers created and dropped without close leave no thread behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_brokers_leave_no_threads() {
    if !std::path::Path::new("/proc/self/task").exists() {
        broker_testkit::services::skip("dropped_brokers_leave_no_threads", "no /proc/self/task to count threads");
        return;
    }
    let cluster = MockCluster::new(1).expect("mock cluster");
    cluster.create_topic("drop", 1, 1).expect("topic");
    let backend = KafkaBackend::new(KafkaConfig::plaintext(cluster.bootstrap_servers(), "drop"));
    // One broker first, so threads that live as long as the process (tokio's blocking pool)
    // are counted in the baseline.
    drop(backend.open().await.expect("connect"));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = threads();
    for _ in 0..50 {
        let broker = backend.open().await.expect("connect");
        broker.publish(broker_testkit::user_event("d", 0)).await.unwrap().await.expect("delivered");
        drop(broker);
    }
    let t0 = std::time::Instant::now();
    let mut now = threads();
    while now > before + 8 && t0.elapsed() < Duration::from_secs(20) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        now = threads();
    }
    assert!(now <= before + 8, "{before} threads before 50 dropped brokers, {now} after (each has ~5)");
}
