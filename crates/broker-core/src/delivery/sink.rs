//! What a backend implements to run on the [driver](super::driver): write a batch and say, per
//! event, what happened.

use std::ops::Deref;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::error::{Error, Position};
use crate::event::EventId;

/// One event as a sink sees it: its id, its Rasa bytes, its key and headers. The driver keeps the
/// receipt, so a sink can never settle (or lose) an event itself.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Record {
    /// The event's id (message id, header, duplicate check).
    pub id: EventId,
    /// Its Rasa encoding, without a newline.
    pub json: Vec<u8>,
    /// Its `sender_id`, when a string.
    pub sender_id: Option<String>,
    /// Extra message headers given with this publish.
    pub headers: Vec<(String, String)>,
}

/// The events of one attempt, in publish order. Cheap to share ([`Batch::share`]) with a thread
/// that writes them, while the driver keeps them for a retry or the close report.
#[derive(Debug, Clone)]
pub struct Batch(Arc<Vec<Record>>);

impl Batch {
    /// A batch of `records`.
    pub fn new(records: Vec<Record>) -> Batch {
        Batch(Arc::new(records))
    }

    /// Another handle to the same records.
    pub fn share(&self) -> Batch {
        self.clone()
    }

    /// The records back (copied only when another handle still holds them).
    pub fn into_records(self) -> Vec<Record> {
        Arc::try_unwrap(self.0).unwrap_or_else(|shared| (*shared).clone())
    }
}

impl Deref for Batch {
    type Target = [Record];
    fn deref(&self) -> &[Record] {
        &self.0
    }
}

/// What became of one event of a batch.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Verdict {
    /// The service confirmed it (committed, written, acknowledged), at `position` if known.
    Delivered(Option<Position>),
    /// Not the event's fault (the service is away, read-only, full, locked, slow): the driver
    /// tries it again after a backoff, in order, until it works or the close deadline passes.
    Retry(Error),
    /// The event's own fault (invalid for the service, too large): it fails alone, for good.
    Rejected(String),
    /// The service refused a group of events that contains this one without saying which (a
    /// data error on a multi-row statement): the driver writes it on its own to find out. Alone,
    /// a suspect is rejected.
    Suspect(String),
    /// Sent and not confirmed yet (a service that confirms later, like RabbitMQ's publisher
    /// confirms): the outcome comes from [`Sink::confirmed`], in the order the events were sent.
    /// The driver keeps up to [`DriverOptions::max_in_flight`] events sent at a time.
    ///
    /// [`DriverOptions::max_in_flight`]: crate::delivery::DriverOptions::max_in_flight
    Sent,
}

/// Why the driver asks a sink to recover before trying again.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Failure {
    /// The last attempt returned this error (or `Retry` verdicts with it).
    Failed(Error),
    /// The last attempt did not finish within the attempt timeout and was abandoned: its outcome
    /// is unknown, and a connection it used may be in the middle of a request.
    TimedOut(Duration),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Failed(e) => e.fmt(f),
            Failure::TimedOut(d) => write!(f, "no answer within {d:?}"),
        }
    }
}

/// A backend's writing side, run by the driver.
///
/// The driver owns everything else: the queue, batching, `max_event_bytes`, flush and close in
/// publish order, the close deadline, retries with backoff and jitter, a timeout on every call,
/// readiness, and the close report. A sink only writes.
#[async_trait]
pub trait Sink: Send + 'static {
    /// Writes `batch` (in publish order) and says what happened to each event, one [`Verdict`]
    /// per event in the same order. `Err` means none of the batch is known to be written and
    /// every event is to be tried again (a lost connection): the same as `Retry` for each.
    ///
    /// A sink that confirms some events and not others must keep the order of each
    /// `sender_id`: an event after a retried one of the same sender is retried too.
    async fn write(&mut self, batch: &Batch) -> Result<Vec<Verdict>, Error>;

    /// Waits for the outcome of the oldest events answered [`Verdict::Sent`] and returns it, one
    /// verdict per event, in the order they were sent (at least one; a prefix of those in
    /// flight). `Err` means the link they were sent on is gone: every event in flight is sent
    /// again after [`Sink::recover`], which must forget them (at-least-once).
    ///
    /// Must be cancel-safe: the driver drops it to send more events, or at the close deadline.
    /// A sink that never answers `Sent` need not implement it.
    async fn confirmed(&mut self) -> Result<Vec<Verdict>, Error> {
        Err(Error::Io {
            backend: "sink",
            operation: "confirming".into(),
            reason: "the sink answered Verdict::Sent but does not implement Sink::confirmed".into(),
            cause: None,
        })
    }

    /// Called after a failed or abandoned attempt, before the next one: re-establish what the
    /// failure broke (reconnect, roll back, cut a torn write). An error means the service is
    /// still away; the driver backs off and calls it again.
    async fn recover(&mut self, _failure: &Failure) -> Result<(), Error> {
        Ok(())
    }

    /// Checks that the service answers, while idle (see [`crate::delivery::DriverOptions::ping_interval`]).
    async fn ping(&mut self) -> Result<(), Error> {
        Ok(())
    }

    /// Releases the connection after the last write.
    async fn close(&mut self) {}
}
