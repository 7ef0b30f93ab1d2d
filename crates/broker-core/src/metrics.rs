//! What every backend records, through the [`metrics`] facade: nothing happens until the program
//! installs a recorder (the CLI's `--metrics-addr` installs a Prometheus one; a library user
//! installs any, **before** connecting: a [`Meter`] registers its handles once, when the broker
//! starts). Recorded in one place each: the receipt ([`crate::Receipt::metered`]:
//! [`crate::broker::Settle`] records the outcome and latency), the queue (accepted), the delivery
//! driver (queue depth, events held, retries, reconnects, close reports) and readiness. Every
//! metric has the labels `backend` (the type name) and `destination` (topic, queue or exchange,
//! database, file path; never a URL, never a secret).
//!
//! | name | kind | what |
//! |---|---|---|
//! | `broker_events_accepted_total` | counter | events accepted by `publish` |
//! | `broker_events_delivered_total` | counter | events the service confirmed |
//! | `broker_events_rejected_total` | counter | events refused as their own fault |
//! | `broker_events_failed_total` | counter | events that failed for another reason (timed out at close, the service away with `should_keep_unpublished_messages: false`, a dead writer) |
//! | `broker_events_retried_total` | counter | events put back for another attempt after a failure |
//! | `broker_events_undelivered_total` | counter | events listed in a close report |
//! | `broker_delivery_seconds` | histogram | publish to confirmation, per delivered event |
//! | `broker_buffer_events` | gauge | events queued between `publish` and the writer |
//! | `broker_held_events` | gauge | events the writer holds (being written, in flight, waiting to retry) |
//! | `broker_reconnects_total` | counter | recoveries after a failure (reconnects, producer resets) |
//! | `broker_ready` | gauge | 1 when the last attempt worked, else 0 |
//! | `broker_consumer_lag_events` | gauge | a consumer's lag, where the service reports it (Kafka: per `partition`; RabbitMQ: messages ready in the queue) |
//! | `broker_spool_events` | gauge | events in the disk spool the service has not confirmed ([`SpoolMeter`]; `destination` is the spool's directory) |
//! | `broker_spool_bytes` | gauge | bytes of the spool's segments |
//! | `broker_spool_oldest_age_seconds` | gauge | how long the oldest event waiting has been in the spool (0 when none waits; for what a previous process left, since this one started) |
//! | `broker_spool_replayed_events_total` | counter | events a previous process left in the spool, sent by this one |
//!
//! Backends may add their own (Kafka: librdkafka's queue depth and round trips).

use std::sync::Arc;
use std::time::Instant;

use metrics::{Counter, Gauge, Histogram};

use crate::error::Error;

/// The metric names (see the module docs).
pub mod names {
    /// Events accepted by `publish`.
    pub const ACCEPTED: &str = "broker_events_accepted_total";
    /// Events the service confirmed.
    pub const DELIVERED: &str = "broker_events_delivered_total";
    /// Events refused as their own fault.
    pub const REJECTED: &str = "broker_events_rejected_total";
    /// Events that failed for another reason.
    pub const FAILED: &str = "broker_events_failed_total";
    /// Events put back for another attempt.
    pub const RETRIED: &str = "broker_events_retried_total";
    /// Events listed in a close report.
    pub const UNDELIVERED: &str = "broker_events_undelivered_total";
    /// Publish to confirmation, seconds.
    pub const DELIVERY_SECONDS: &str = "broker_delivery_seconds";
    /// Events queued before the writer.
    pub const BUFFER: &str = "broker_buffer_events";
    /// Events the writer holds.
    pub const HELD: &str = "broker_held_events";
    /// Recoveries after a failure.
    pub const RECONNECTS: &str = "broker_reconnects_total";
    /// Readiness, 0 or 1.
    pub const READY: &str = "broker_ready";
    /// A consumer's lag in events (per partition where the service has partitions), recorded
    /// by the backends whose service reports it.
    pub const CONSUMER_LAG: &str = "broker_consumer_lag_events";
    /// Events in a disk spool, not confirmed yet.
    pub const SPOOL_EVENTS: &str = "broker_spool_events";
    /// Bytes of a disk spool's segments.
    pub const SPOOL_BYTES: &str = "broker_spool_bytes";
    /// Age of the oldest event waiting in a disk spool, seconds.
    pub const SPOOL_OLDEST_AGE: &str = "broker_spool_oldest_age_seconds";
    /// Events a previous process left in a disk spool, sent by this one.
    pub const SPOOL_REPLAYED: &str = "broker_spool_replayed_events_total";
}

/// The handles of one disk spool (labelled `backend`, the backend behind it, and
/// `destination`, the spool's directory).
///
/// ```
/// use broker_core::metrics::SpoolMeter;
/// let meter = SpoolMeter::new("kafka", "/var/lib/rasa/spool");
/// meter.state(12, 4096, 1.5); // a no-op until a recorder is installed
/// ```
#[derive(Clone)]
pub struct SpoolMeter {
    events: Gauge,
    bytes: Gauge,
    oldest: Gauge,
    replayed: Counter,
}

impl std::fmt::Debug for SpoolMeter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpoolMeter").finish_non_exhaustive()
    }
}

impl SpoolMeter {
    /// Registers the handles with the recorder installed now (none: every call is a no-op).
    pub fn new(backend: &'static str, directory: impl Into<String>) -> SpoolMeter {
        let labels = [("backend", backend.to_owned()), ("destination", directory.into())];
        SpoolMeter {
            events: metrics::gauge!(names::SPOOL_EVENTS, &labels),
            bytes: metrics::gauge!(names::SPOOL_BYTES, &labels),
            oldest: metrics::gauge!(names::SPOOL_OLDEST_AGE, &labels),
            replayed: metrics::counter!(names::SPOOL_REPLAYED, &labels),
        }
    }

    /// What the spool holds now: events waiting, bytes, the oldest one's age in seconds.
    pub fn state(&self, events: u64, bytes: u64, oldest_age: f64) {
        self.events.set(events as f64);
        self.bytes.set(bytes as f64);
        self.oldest.set(oldest_age);
    }

    /// `n` events of a previous process sent.
    pub fn replayed(&self, n: u64) {
        self.replayed.increment(n);
    }
}

/// The handles one broker records through, labelled `backend` and `destination`; cheap to
/// clone. Registered once (at [`Meter::new`]), so recording costs no lookup per event.
///
/// ```
/// use broker_core::metrics::Meter;
/// let meter = Meter::new("kafka", "rasa_events");
/// assert_eq!((meter.backend(), meter.destination()), ("kafka", "rasa_events"));
/// meter.accepted(); // a no-op until a recorder is installed
/// ```
#[derive(Clone)]
pub struct Meter(Arc<Handles>);

struct Handles {
    backend: &'static str,
    destination: String,
    accepted: Counter,
    delivered: Counter,
    rejected: Counter,
    failed: Counter,
    retried: Counter,
    undelivered: Counter,
    delivery: Histogram,
    buffer: Gauge,
    held: Gauge,
    reconnects: Counter,
    ready: Gauge,
}

impl std::fmt::Debug for Meter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Meter").field("backend", &self.0.backend).field("destination", &self.0.destination).finish()
    }
}

impl Meter {
    /// Registers the handles of `backend` writing to `destination` with the recorder installed
    /// now (none: every call is a no-op).
    pub fn new(backend: &'static str, destination: impl Into<String>) -> Meter {
        let destination: String = destination.into();
        let labels = [("backend", backend.to_owned()), ("destination", destination.clone())];
        let counter = |name: &'static str| metrics::counter!(name, &labels);
        let gauge = |name: &'static str| metrics::gauge!(name, &labels);
        Meter(Arc::new(Handles {
            backend,
            accepted: counter(names::ACCEPTED),
            delivered: counter(names::DELIVERED),
            rejected: counter(names::REJECTED),
            failed: counter(names::FAILED),
            retried: counter(names::RETRIED),
            undelivered: counter(names::UNDELIVERED),
            delivery: metrics::histogram!(names::DELIVERY_SECONDS, &labels),
            buffer: gauge(names::BUFFER),
            held: gauge(names::HELD),
            reconnects: counter(names::RECONNECTS),
            ready: gauge(names::READY),
            destination,
        }))
    }

    /// The backend's type name.
    pub fn backend(&self) -> &'static str {
        self.0.backend
    }

    /// The destination label.
    pub fn destination(&self) -> &str {
        &self.0.destination
    }

    /// One event accepted by `publish` (queued for the writer).
    pub fn accepted(&self) {
        self.0.accepted.increment(1);
    }

    pub(crate) fn settled(&self, since: Instant, outcome: &Result<(), &Error>) {
        match outcome {
            Ok(()) => {
                self.0.delivered.increment(1);
                self.0.delivery.record(since.elapsed().as_secs_f64());
            }
            Err(Error::Rejected { .. }) => self.0.rejected.increment(1),
            Err(_) => self.0.failed.increment(1),
        }
    }

    /// `n` events put back for another attempt.
    pub fn retried(&self, n: usize) {
        self.0.retried.increment(n as u64);
    }

    /// `n` events listed in a close report.
    pub fn undelivered(&self, n: usize) {
        if n > 0 {
            self.0.undelivered.increment(n as u64);
        }
    }

    /// A recovery after a failure (a reconnect, a producer reset).
    pub fn reconnected(&self) {
        self.0.reconnects.increment(1);
    }

    /// The queue before the writer and what the writer holds.
    pub fn depth(&self, buffer: usize, held: usize) {
        self.0.buffer.set(buffer as f64);
        self.0.held.set(held as f64);
    }

    /// Readiness.
    pub fn ready(&self, ready: bool) {
        self.0.ready.set(if ready { 1.0 } else { 0.0 });
    }
}

/// A meter for `backend` with no destination (what [`crate::delivery::start`] and
/// [`crate::pipeline::channel`] make of a bare type name).
impl From<&'static str> for Meter {
    fn from(backend: &'static str) -> Meter {
        Meter::new(backend, "")
    }
}
