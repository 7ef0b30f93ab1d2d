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
