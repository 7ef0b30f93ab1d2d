//! What every backend records, through the [`metrics`] facade: nothing happens until the program
//! installs a recorder (the CLI's `--metrics-addr` installs a Prometheus one; a library user
//! installs any). Recorded in one place each: the receipt ([`crate::Receipt::metered`]:
//! [`crate::broker::Settle`] records the outcome and latency), the queue (accepted), the delivery driver (queue
//! depth, events held, retries, reconnects, close reports) and readiness. Every metric has the
//! label `backend` (the type name, never a secret).
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

use std::time::Instant;

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
}

/// One event accepted by `publish` (queued for the writer).
pub fn accepted(backend: &'static str) {
    metrics::counter!(names::ACCEPTED, "backend" => backend).increment(1);
}

pub(crate) fn settled(backend: &'static str, since: Instant, outcome: &Result<(), &Error>) {
    match outcome {
        Ok(()) => {
            metrics::counter!(names::DELIVERED, "backend" => backend).increment(1);
            metrics::histogram!(names::DELIVERY_SECONDS, "backend" => backend).record(since.elapsed().as_secs_f64());
        }
        Err(Error::Rejected { .. }) => metrics::counter!(names::REJECTED, "backend" => backend).increment(1),
        Err(_) => metrics::counter!(names::FAILED, "backend" => backend).increment(1),
    }
}

/// `n` events put back for another attempt.
pub fn retried(backend: &'static str, n: usize) {
    metrics::counter!(names::RETRIED, "backend" => backend).increment(n as u64);
}

/// `n` events listed in a close report.
pub fn undelivered(backend: &'static str, n: usize) {
    if n > 0 {
        metrics::counter!(names::UNDELIVERED, "backend" => backend).increment(n as u64);
    }
}

/// A recovery after a failure (a reconnect, a producer reset).
pub fn reconnected(backend: &'static str) {
    metrics::counter!(names::RECONNECTS, "backend" => backend).increment(1);
}

/// The queue before the writer and what the writer holds.
pub fn depth(backend: &'static str, buffer: usize, held: usize) {
    metrics::gauge!(names::BUFFER, "backend" => backend).set(buffer as f64);
    metrics::gauge!(names::HELD, "backend" => backend).set(held as f64);
}

/// Readiness.
pub fn ready(backend: &'static str, ready: bool) {
    metrics::gauge!(names::READY, "backend" => backend).set(if ready { 1.0 } else { 0.0 });
}
