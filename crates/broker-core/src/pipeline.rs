//! The bounded hand-over between `publish` and a backend's writer, written once for all backends.
//!
//! [`Outbox`] is the caller's side: it implements the buffer bound and the `when_full` policy, the
//! closed state, flush markers and the close deadline. [`Inbox`] is the writer's side: it hands out
//! [`Command`]s in publish order, in batches, so a writer does one write/commit/produce round per
//! batch while every event keeps its own outcome.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use crate::broker::{CloseReport, EventBroker, Receipt, Settle};
use crate::config::{DeliveryOptions, WhenFull};
use crate::error::Error;
use crate::event::{Event, EventId};

/// An accepted event waiting for its writer, already in Rasa's encoding.
///
/// Encoding happens in `publish`, on the caller's thread: the event's many small allocations are
/// made and freed on one thread, the writer only moves bytes, and on a multi-core machine encoding
/// runs in parallel with writing.
#[derive(Debug)]
pub struct Pending {
    /// The event's id.
    pub id: EventId,
    /// Its Rasa encoding, without a newline.
    pub json: Vec<u8>,
    /// Its `sender_id`, when a string (Kafka key, SQL column).
    pub sender_id: Option<String>,
    /// Extra message headers given with this publish (`rasa export`'s process id); empty for most
    /// events. Backends without headers (file, SQL) ignore them.
    pub headers: Vec<(String, String)>,
    /// Settles its receipt.
    pub settle: Settle,
}

impl Pending {
    /// Encodes `event` for its writer.
    pub fn new(event: Event, settle: Settle) -> Pending {
        let id = event.id();
        let (json, sender_id) = event.into_parts();
        Pending { id, json, sender_id, headers: Vec::new(), settle }
    }

    /// The event again (parsed back from its encoding), for reports of what was not delivered.
    pub fn to_event(&self) -> Option<Event> {
        Event::from_json(&self.json).ok().map(|e| e.with_id(self.id))
    }

    /// Gives up on this event at a close deadline: fails its receipt with [`Error::Timeout`] and
    /// hands the event back in `into` for the close report.
    pub fn give_up(self, after: Duration, into: &mut Vec<Event>) {
        if let Some(e) = self.to_event() {
            into.push(e);
        }
        self.settle.settle(Err(Error::Timeout(after)));
    }

    /// Fails this event alone: the service refused it.
    pub fn reject(self, backend: &'static str, reason: impl Into<String>) {
        let event_id = self.id.to_string();
        self.settle.settle(Err(Error::Rejected { backend, event_id, reason: reason.into() }));
    }
}

/// What the writer receives, in publish order.
#[derive(Debug)]
#[non_exhaustive]
pub enum Command {
    /// Deliver this event.
    Publish(Pending),
    /// Reply once every earlier event has its outcome.
    Flush(oneshot::Sender<()>),
    /// Deliver what is queued until `deadline`, report the rest, then stop.
    Close {
        /// When to give up.
        deadline: Instant,
        /// Where the report goes.
        reply: oneshot::Sender<CloseReport>,
    },
}

/// The publishing side of a backend's queue.
#[derive(Debug)]
pub struct Outbox {
    backend: &'static str,
    tx: mpsc::Sender<Command>,
    options: DeliveryOptions,
    closed: AtomicBool,
    close_deadline: Arc<std::sync::Mutex<Option<Instant>>>,
}

/// The writer's side of a backend's queue.
#[derive(Debug)]
pub struct Inbox {
    rx: mpsc::Receiver<Command>,
    close_deadline: Arc<std::sync::Mutex<Option<Instant>>>,
}

/// A queue for `backend` with the bound and policy of `options`.
pub fn channel(backend: &'static str, options: DeliveryOptions) -> (Outbox, Inbox) {
    let (tx, rx) = mpsc::channel(options.buffer_size.max(1));
    let close_deadline = Arc::new(std::sync::Mutex::new(None));
    (
        Outbox { backend, tx, options, closed: AtomicBool::new(false), close_deadline: close_deadline.clone() },
        Inbox { rx, close_deadline },
    )
}

impl Outbox {
    /// The delivery options in force.
    pub fn options(&self) -> &DeliveryOptions {
        &self.options
    }

    /// Whether `close` was called.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire) || self.tx.is_closed()
    }

    /// Hands `event` to the writer, applying the buffer policy.
    pub async fn publish(&self, event: Event) -> Result<Receipt, Error> {
        self.publish_with_headers(event, Vec::new()).await
    }

    /// Like [`Outbox::publish`], with extra message headers for this event (for backends whose
    /// messages carry headers).
    pub async fn publish_with_headers(&self, event: Event, headers: Vec<(String, String)>) -> Result<Receipt, Error> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::Closed);
        }
        let (receipt, settle) = Receipt::channel(event.id());
        let mut pending = Pending::new(event, settle);
        pending.headers = headers;
        let cmd = Command::Publish(pending);
        match self.options.when_full {
            WhenFull::Block => self.tx.send(cmd).await.map_err(|_| Error::Closed)?,
            WhenFull::Error => self.tx.try_send(cmd).map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => Error::BufferFull { capacity: self.options.buffer_size },
                mpsc::error::TrySendError::Closed(_) => Error::Closed,
            })?,
        }
        Ok(receipt)
    }

    /// Hands an already accepted event on (a router splitting one queue into several keeps the
    /// event's receipt). Waits for room whatever the policy: the event was accepted upstream.
    pub async fn forward(&self, pending: Pending) -> Result<(), Pending> {
        self.tx.send(Command::Publish(pending)).await.map_err(|e| match e.0 {
            Command::Publish(p) => p,
            _ => unreachable!("we sent a Publish"),
        })
    }

    /// Waits until every event accepted before the call has its outcome.
    pub async fn flush(&self) -> Result<(), Error> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(Command::Flush(tx)).await.map_err(|_| Error::Closed)?;
        rx.await.map_err(|_| Error::Closed)
    }

    /// Closes once: later publishes fail, queued events are delivered until the configured
    /// deadline, and what was not delivered is returned. A second call returns an empty report.
    pub async fn close(&self) -> Result<CloseReport, Error> {
        if self.closed.swap(true, Ordering::AcqRel) {
            return Ok(CloseReport::default());
        }
        let timeout = self.options.close_timeout;
        let deadline = Instant::now() + timeout;
        // A writer busy retrying (the service is down) sees this before it reaches the Close
        // command, and stops retrying at the deadline.
        *self.close_deadline.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(deadline);
        let (reply, rx) = oneshot::channel();
        let send = self.tx.send(Command::Close { deadline, reply });
        match tokio::time::timeout(timeout + Duration::from_millis(100), send).await {
            Ok(Ok(())) => {}
            // The writer is gone: nothing is queued anywhere we could reach.
            Ok(Err(_)) => return Ok(CloseReport::default()),
            Err(_) => return Err(Error::Timeout(timeout)),
        }
        // The writer owns the deadline; the extra second covers a writer stuck in a system call.
        match tokio::time::timeout(timeout + Duration::from_secs(1), rx).await {
            Ok(Ok(report)) => Ok(report),
            Ok(Err(_)) => Ok(CloseReport::default()),
            Err(_) => Err(Error::Timeout(timeout)),
        }
    }

    /// The backend this queue belongs to.
    pub fn backend(&self) -> &'static str {
        self.backend
    }
}

impl Inbox {
    /// Waits for commands and appends up to `max` of them to `batch`. Returns 0 when every
    /// [`Outbox`] is gone.
    pub async fn recv_batch(&mut self, batch: &mut Vec<Command>, max: usize) -> usize {
        self.rx.recv_many(batch, max.max(1)).await
    }

    /// The blocking form of [`Inbox::recv_batch`], for writers on their own thread.
    pub fn blocking_recv_batch(&mut self, batch: &mut Vec<Command>, max: usize) -> usize {
        let Some(first) = self.rx.blocking_recv() else { return 0 };
        batch.push(first);
        let mut n = 1;
        while n < max {
            match self.rx.try_recv() {
                Ok(cmd) => {
                    batch.push(cmd);
                    n += 1;
                }
                Err(_) => break,
            }
        }
        n
    }

    /// The close deadline, once `close` was called: a writer that retries gives up at it.
    pub fn close_deadline(&self) -> Option<Instant> {
        *self.close_deadline.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Takes what is queued right now without waiting (used while closing).
    pub fn try_recv(&mut self) -> Option<Command> {
        self.rx.try_recv().ok()
    }

    /// Refuses further commands; queued ones can still be taken.
    pub fn close(&mut self) {
        self.rx.close();
    }
}

/// Whether a backend's writer can deliver right now; the writer sets it, `is_ready` reads it.
#[derive(Debug, Clone)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    /// Records whether the last attempt to deliver worked.
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::Release);
    }

    /// The last recorded state.
    pub fn get(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// An [`EventBroker`] that is an [`Outbox`] plus the writer's [`Readiness`]: what a backend built
/// on this pipeline hands to its users.
#[derive(Debug)]
pub struct QueuedBroker {
    outbox: Outbox,
    ready: Readiness,
}

impl QueuedBroker {
    /// A broker over `outbox`, ready until the writer says otherwise through the returned handle.
    pub fn new(outbox: Outbox) -> (QueuedBroker, Readiness) {
        let ready = Readiness(Arc::new(AtomicBool::new(true)));
        (QueuedBroker { outbox, ready: ready.clone() }, ready)
    }

    /// Publishes with extra message headers for this event (see [`Outbox::publish_with_headers`]).
    pub async fn publish_with_headers(&self, event: Event, headers: Vec<(String, String)>) -> Result<Receipt, Error> {
        self.outbox.publish_with_headers(event, headers).await
    }
}

#[async_trait]
impl EventBroker for QueuedBroker {
    fn backend(&self) -> &'static str {
        self.outbox.backend()
    }
    async fn publish(&self, event: Event) -> Result<Receipt, Error> {
        self.outbox.publish(event).await
    }
    async fn flush(&self) -> Result<(), Error> {
        self.outbox.flush().await
    }
    async fn is_ready(&self) -> bool {
        !self.outbox.is_closed() && self.ready.get()
    }
    async fn close(&self) -> Result<CloseReport, Error> {
        self.outbox.close().await
    }
}

/// Fails every queued event with `reason`-less [`Error::Timeout`] and collects them, for a writer
/// whose close deadline passed. Flush markers are answered. The first close request still queued
/// is returned, for a writer that reached its deadline before reading it (dropping it answers
/// with an empty report); later ones get empty reports.
pub fn drain_undelivered(
    inbox: &mut Inbox,
    after: Duration,
    into: &mut Vec<Event>,
) -> Option<oneshot::Sender<CloseReport>> {
    inbox.close();
    let mut first_close = None;
    while let Some(cmd) = inbox.try_recv() {
        match cmd {
            Command::Publish(p) => p.give_up(after, into),
            Command::Flush(tx) => {
                let _ = tx.send(());
            }
            Command::Close { reply, .. } if first_close.is_none() => first_close = Some(reply),
            Command::Close { reply, .. } => {
                let _ = reply.send(CloseReport::default());
            }
        }
    }
    first_close
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Event;

    fn event() -> Event {
        Event::from_json(br#"{"sender_id": "a", "event": "restart", "timestamp": 1.0}"#).unwrap()
    }

    fn options(buffer_size: usize, when_full: WhenFull) -> DeliveryOptions {
        DeliveryOptions { buffer_size, when_full, close_timeout: Duration::from_millis(200) }
    }

    #[tokio::test]
    async fn a_full_buffer_fails_at_once_with_the_error_policy() {
        let (outbox, _inbox) = channel("test", options(2, WhenFull::Error));
        let _a = outbox.publish(event()).await.unwrap();
        let _b = outbox.publish(event()).await.unwrap();
        match outbox.publish(event()).await {
            Err(Error::BufferFull { capacity: 2 }) => {}
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_full_buffer_blocks_with_the_block_policy() {
        let (outbox, mut inbox) = channel("test", options(1, WhenFull::Block));
        let _a = outbox.publish(event()).await.unwrap();
        let blocked = tokio::time::timeout(Duration::from_millis(50), outbox.publish(event())).await;
        assert!(blocked.is_err(), "the second publish waits for room");
        let mut batch = Vec::new();
        assert_eq!(inbox.recv_batch(&mut batch, 10).await, 1);
        assert!(tokio::time::timeout(Duration::from_millis(500), outbox.publish(event())).await.is_ok());
    }

    #[tokio::test]
    async fn close_without_a_writer_times_out_and_publish_after_close_fails() {
        let (outbox, _inbox) = channel("test", options(4, WhenFull::Block));
        assert!(matches!(outbox.close().await, Err(Error::Timeout(_))));
        assert!(matches!(outbox.publish(event()).await, Err(Error::Closed)));
        assert!(outbox.close().await.unwrap().is_clean(), "a second close is a no-op");
    }
}
