//! librdkafka's statistics (`statistics.interval.ms`, 5 s unless set in the `librdkafka:`
//! mapping) as metrics, labelled `backend="kafka"` and `destination=<topic>`:
//!
//! | name | kind | what |
//! |---|---|---|
//! | `broker_kafka_queue_events` | gauge | messages in the producer's queues (librdkafka's `msg_cnt`) |
//! | `broker_kafka_queue_bytes` | gauge | their size (`msg_size`) |
//! | `broker_kafka_rtt_seconds` | gauge | mean request round trip per Kafka broker (label `broker`, `host:port`), over the last interval with requests |
//! | `broker_consumer_lag_events` | gauge | a consumer's lag per partition (label `partition`), where Kafka reports it |
//!
//! With each report the producer also sets the shared `broker_buffer_events` (librdkafka's
//! `msg_cnt`: queued and in flight) and `broker_held_events` (events waiting to go again through
//! a new producer).

use broker_core::metrics::names::CONSUMER_LAG;
use rdkafka::Statistics;

/// The statistics interval when none is configured.
pub(crate) const INTERVAL_MS: &str = "5000";

/// Messages in the producer's queues.
pub const QUEUE_EVENTS: &str = "broker_kafka_queue_events";
/// Their size in bytes.
pub const QUEUE_BYTES: &str = "broker_kafka_queue_bytes";
/// Mean request round trip per broker.
pub const RTT_SECONDS: &str = "broker_kafka_rtt_seconds";

/// Records one statistics report of a client reading or writing `topic`.
pub(crate) fn record(topic: &str, stats: &Statistics) {
    let labels = [("backend", super::NAME.to_owned()), ("destination", topic.to_owned())];
    if stats.client_type == "producer" {
        metrics::gauge!(QUEUE_EVENTS, &labels).set(stats.msg_cnt as f64);
        metrics::gauge!(QUEUE_BYTES, &labels).set(stats.msg_size as f64);
    }
    for broker in stats.brokers.values().filter(|b| b.nodeid >= 0) {
        // A window without requests says nothing (its mean is 0): the gauge keeps the last one.
        if let Some(rtt) = broker.rtt.as_ref().filter(|w| w.cnt > 0) {
            let labels = [labels[0].clone(), labels[1].clone(), ("broker", broker.nodename.clone())];
            metrics::gauge!(RTT_SECONDS, &labels).set(rtt.avg as f64 / 1e6);
        }
    }
    if stats.client_type == "consumer" {
        let partitions = stats.topics.get(topic).into_iter().flat_map(|t| t.partitions.values());
        // Partition -1 is librdkafka's internal one; a lag of -1 means not known yet.
        for p in partitions.filter(|p| p.partition >= 0 && p.consumer_lag >= 0) {
            let labels = [labels[0].clone(), labels[1].clone(), ("partition", p.partition.to_string())];
            metrics::gauge!(CONSUMER_LAG, &labels).set(p.consumer_lag as f64);
        }
    }
}
