//! The bounded hand-over between `publish` and a backend's writer, written once for all backends.
//!
//! [`Outbox`] is the caller's side: it implements the buffer bound and the `when_full` policy, the
//! closed state, flush markers and the close request. [`Inbox`] is the writer's side: it hands out
//! [`Command`]s in publish order, in batches, so a writer does one write/commit/produce round per
//! batch while every event keeps its own outcome.
//!
//! Closing does not travel through the bounded queue (a full queue behind a dead service would
//! hold it up): `close` records a [`CloseRequest`] beside the queue and wakes the writer, which
//! stops taking new events, delivers what is queued until the deadline and answers with the
//! [`CloseReport`]. The first close's result is kept, so a second `close` returns the same
//! undelivered events instead of a made-up clean report.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::sync::{Notify, mpsc, oneshot};

use crate::batch::{BatchPublished, BatchReceipt, Refused};
use crate::broker::{CloseReport, EventBroker, PublishOptions, Receipt, Settle};
use crate::config::{DeliveryOptions, WhenFull};
use crate::error::Error;
use crate::event::{Event, EventId};
use crate::metrics::Meter;

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
        event_of(self.id, &self.json)
    }

    /// Gives up on this event at a close deadline: fails its receipt with [`Error::Timeout`] and
    /// hands the event back in `into` for the close report.
    pub fn give_up(self, after: Duration, into: &mut Vec<Event>) {
        self.give_up_with(Error::Timeout(after), into);
    }

    /// Gives up on this event: fails its receipt with `error` and hands the event back in `into`
    /// for the close report.
    pub fn give_up_with(self, error: Error, into: &mut Vec<Event>) {
        if let Some(e) = self.to_event() {
            into.push(e);
        }
        self.settle.settle(Err(error));
    }

    /// Fails this event alone: the service refused it.
    pub fn reject(self, backend: &'static str, reason: impl Into<String>) {
        let event_id = self.id.to_string();
        self.settle.settle(Err(Error::Rejected { backend, event_id, reason: reason.into() }));
    }
}

/// The event of `id` parsed back from its encoding `json`.
pub(crate) fn event_of(id: EventId, json: &[u8]) -> Option<Event> {
    Event::from_json(json).ok().map(|e| e.with_id(id))
}

/// What the writer receives, in publish order.
#[derive(Debug)]
#[non_exhaustive]
pub enum Command {
    /// Deliver this event.
    Publish(Pending),
    /// Reply once every earlier event has its outcome.
    Flush(oneshot::Sender<()>),
}

/// A close asked for by [`Outbox::close`]: deliver what is queued until `deadline`, then answer.
#[derive(Debug)]
pub struct CloseRequest {
    /// When to give up.
    pub deadline: Instant,
    /// Where the report goes (taken by the writer that answers).
    pub reply: Option<oneshot::Sender<CloseReport>>,
}

/// What the two sides share besides the queue.
#[derive(Debug, Default)]
struct Shared {
    close: Mutex<Option<CloseRequest>>,
    wake: Notify,
    /// Set when the [`Inbox`] is dropped: nobody will answer a close.
    writer_gone: AtomicBool,
}

impl Shared {
    fn close(&self) -> std::sync::MutexGuard<'_, Option<CloseRequest>> {
        self.close.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The publishing side of a backend's queue.
#[derive(Debug)]
pub struct Outbox {
    meter: Meter,
    tx: mpsc::Sender<Command>,
    options: DeliveryOptions,
    closed: AtomicBool,
    shared: Arc<Shared>,
    /// The first close's outcome: what a later close returns again.
    closing: tokio::sync::Mutex<Option<Result<Vec<Event>, Error>>>,
}

/// The writer's side of a backend's queue.
#[derive(Debug)]
pub struct Inbox {
    rx: mpsc::Receiver<Command>,
    shared: Arc<Shared>,
}

/// A queue for a backend (its [`Meter`], or just its type name) with the bound and policy of
/// `options`.
pub fn channel(meter: impl Into<Meter>, options: DeliveryOptions) -> (Outbox, Inbox) {
    let meter = meter.into();
    let (tx, rx) = mpsc::channel(options.buffer_size.max(1));
    let shared = Arc::new(Shared::default());
    (
        Outbox {
            meter,
            tx,
            options,
            closed: AtomicBool::new(false),
            shared: shared.clone(),
            closing: tokio::sync::Mutex::new(None),
        },
        Inbox { rx, shared },
    )
}

impl Outbox {
    /// The delivery options in force.
    pub fn options(&self) -> &DeliveryOptions {
        &self.options
    }

    /// Whether `close` was called (or the writer is gone).
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire) || self.tx.is_closed()
    }

    /// Hands `event` to the writer, applying the buffer policy.
    pub async fn publish(&self, event: Event) -> Result<Receipt, Error> {
        self.publish_with(event, PublishOptions::default()).await
    }

    /// Like [`Outbox::publish`], with per-event options (extra message headers).
    pub async fn publish_with(&self, event: Event, options: PublishOptions) -> Result<Receipt, Error> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::Closed);
        }
        let (receipt, settle) = Receipt::metered(&self.meter, event.id());
        let mut pending = Pending::new(event, settle);
        pending.headers = options.headers;
        let cmd = Command::Publish(pending);
        match self.options.when_full {
            WhenFull::Block => self.tx.send(cmd).await.map_err(|_| Error::Closed)?,
            WhenFull::Error => self.tx.try_send(cmd).map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => Error::BufferFull { capacity: self.options.buffer_size },
                mpsc::error::TrySendError::Closed(_) => Error::Closed,
            })?,
        }
        self.meter.accepted();
        Ok(receipt)
    }

    /// Hands `events` to the writer in order, with one receipt for all their outcomes
    /// ([`EventBroker::publish_batch`]). Room for up to `buffer_size` events is taken at once
    /// (all or none, cancel-safe); a larger batch goes in parts of that size.
    pub async fn publish_batch_with(&self, events: Vec<Event>, options: PublishOptions) -> BatchPublished {
        let n = events.len();
        let (receipt, slots) = BatchReceipt::shared(n);
        let refuse = |error: Error, events: Vec<Event>, accepted: usize| {
            slots.truncate(accepted);
            Some(Refused { error, events })
        };
        if self.closed.load(Ordering::Acquire) {
            return BatchPublished { refused: refuse(Error::Closed, events, 0), receipt };
        }
        let since = Instant::now();
        let mut events = events.into_iter();
        let mut accepted = 0;
        while accepted < n {
            let part = (n - accepted).min(self.options.buffer_size.max(1));
            let permits = match self.options.when_full {
                WhenFull::Block => self.tx.reserve_many(part).await.map_err(|_| Error::Closed),
                WhenFull::Error => self.tx.try_reserve_many(part).map_err(|e| match e {
                    mpsc::error::TrySendError::Full(()) => Error::BufferFull { capacity: self.options.buffer_size },
                    mpsc::error::TrySendError::Closed(()) => Error::Closed,
                }),
            };
            let permits = match permits {
                Ok(p) => p,
                Err(error) => return BatchPublished { refused: refuse(error, events.collect(), accepted), receipt },
            };
            for (permit, event) in permits.zip(events.by_ref()) {
                let settle = Settle::slot(event.id(), &slots, accepted, Some((self.meter.clone(), since)));
                let mut pending = Pending::new(event, settle);
                pending.headers.clone_from(&options.headers);
                permit.send(Command::Publish(pending));
                self.meter.accepted();
                accepted += 1;
            }
        }
        BatchPublished { receipt, refused: None }
    }

    /// Waits until every event accepted before the call has its outcome.
    pub async fn flush(&self) -> Result<(), Error> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(Command::Flush(tx)).await.map_err(|_| Error::Closed)?;
        rx.await.map_err(|_| Error::Closed)
    }

    /// Closes once: later publishes fail, queued events are delivered until the configured
    /// deadline, and what was not delivered is returned. A second call returns the same
    /// undelivered events as the first (waiting for it if it is still running).
    pub async fn close(&self) -> Result<CloseReport, Error> {
        let mut closing = self.closing.lock().await;
        if let Some(done) = closing.as_ref() {
            return done.clone().map(CloseReport::new);
        }
        self.closed.store(true, Ordering::Release);
        let timeout = self.options.close_timeout;
        let (reply, rx) = oneshot::channel();
        *self.shared.close() = Some(CloseRequest { deadline: Instant::now() + timeout, reply: Some(reply) });
        self.shared.wake.notify_one();
        if self.shared.writer_gone.load(Ordering::Acquire) {
            self.shared.close().take();
        }
        // The writer owns the deadline; the grace covers a writer finishing its last attempt.
        let result = match tokio::time::timeout(timeout + Duration::from_secs(2), rx).await {
            Ok(Ok(report)) => Ok(report.undelivered),
            Ok(Err(_)) => Err(writer_gone(self.meter.backend())),
            Err(_) => Err(Error::Timeout(timeout)),
        };
        *closing = Some(result.clone());
        result.map(CloseReport::new)
    }

    #[cfg(test)]
    fn close_now_for_test(&self) {
        self.closed.store(true, Ordering::Release);
    }

    /// The backend this queue belongs to.
    pub fn backend(&self) -> &'static str {
        self.meter.backend()
    }

    /// What this queue records through.
    pub fn meter(&self) -> &Meter {
        &self.meter
    }
}

fn writer_gone(backend: &'static str) -> Error {
    Error::Io {
        backend,
        operation: "closing".into(),
        reason: "the writer stopped without reporting what it could not deliver".into(),
        cause: None,
    }
}

impl Inbox {
    /// Waits for commands and appends up to `max` of them to `batch`. Returns early (with 0 new
    /// commands) when a close is requested; returns 0 when every [`Outbox`] is gone too, which
    /// [`Inbox::is_finished`] tells apart.
    pub async fn recv_batch(&mut self, batch: &mut Vec<Command>, max: usize) -> usize {
        if self.close_requested().is_some() {
            return self.try_recv_batch(batch, max);
        }
        tokio::select! {
            biased;
            n = self.rx.recv_many(batch, max.max(1)) => n,
            _ = self.shared.wake.notified() => {
                // Keep the wake-up for the next waiter too: the close request stays visible.
                self.shared.wake.notify_one();
                0
            }
        }
    }

    /// Appends what is queued right now (up to `max`) without waiting.
    pub fn try_recv_batch(&mut self, batch: &mut Vec<Command>, max: usize) -> usize {
        let mut n = 0;
        while n < max.max(1) {
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

    /// How many commands are queued now.
    pub fn queued(&self) -> usize {
        self.rx.len()
    }

    /// Whether nothing more can come: every [`Outbox`] is gone (or the queue was closed) and
    /// nothing is queued.
    pub fn is_finished(&self) -> bool {
        self.rx.is_closed() && self.rx.is_empty()
    }

    /// The close deadline, once `close` was called: a writer that retries gives up at it.
    pub fn close_requested(&self) -> Option<Instant> {
        self.shared.close().as_ref().map(|r| r.deadline)
    }

    /// Takes the reply of a requested close (once): the writer that answers it.
    pub fn take_close_reply(&mut self) -> Option<oneshot::Sender<CloseReport>> {
        self.shared.close().as_mut().and_then(|r| r.reply.take())
    }

    /// A future that is ready once a close is requested (for a writer's `select!`).
    pub async fn close_signal(&self) {
        loop {
            let notified = self.shared.wake.notified();
            if self.close_requested().is_some() {
                return;
            }
            notified.await;
            self.shared.wake.notify_one();
        }
    }

    /// Takes what is queued right now without waiting (used while closing).
    pub fn try_recv(&mut self) -> Option<Command> {
        self.rx.try_recv().ok()
    }

    /// Refuses further commands (publishes waiting for room fail with [`Error::Closed`]); queued
    /// ones can still be taken.
    pub fn close(&mut self) {
        self.rx.close();
    }
}

impl Drop for Inbox {
    fn drop(&mut self) {
        self.shared.writer_gone.store(true, Ordering::Release);
        // A close waiting for an answer learns at once that none will come.
        self.shared.close().take();
    }
}

/// Whether a backend's writer can deliver right now; the writer sets it, `is_ready` reads it.
#[derive(Debug, Clone)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    /// A new flag, ready.
    pub fn new() -> Readiness {
        Readiness(Arc::new(AtomicBool::new(true)))
    }

    /// Records whether the last attempt to deliver worked.
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::Release);
    }

    /// Records readiness and reports it as `broker_ready` through `meter`.
    pub fn set_for(&self, meter: &Meter, ready: bool) {
        self.set(ready);
        meter.ready(ready);
    }

    /// The last recorded state.
    pub fn get(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

impl Default for Readiness {
    fn default() -> Self {
        Readiness::new()
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
        let ready = Readiness::new();
        (QueuedBroker { outbox, ready: ready.clone() }, ready)
    }

    /// Publishes with extra message headers for this event.
    pub async fn publish_with_headers(&self, event: Event, headers: Vec<(String, String)>) -> Result<Receipt, Error> {
        self.outbox.publish_with(event, PublishOptions::default().headers(headers)).await
    }
}

#[async_trait]
impl EventBroker for QueuedBroker {
    fn backend(&self) -> &'static str {
        self.outbox.backend()
    }
    async fn publish_with(&self, event: Event, options: PublishOptions) -> Result<Receipt, Error> {
        self.outbox.publish_with(event, options).await
    }
    async fn publish_batch(&self, events: Vec<Event>, options: PublishOptions) -> BatchPublished {
        self.outbox.publish_batch_with(events, options).await
    }
    fn atomic_batch(&self) -> usize {
        self.outbox.options().buffer_size.max(1)
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

/// Closes `inbox` and fails every queued event with [`Error::Timeout`], collecting them, for a
/// writer whose close deadline passed. Flush markers are answered. Returns the reply of the
/// close request, if one was made and not answered yet.
pub fn drain_undelivered(
    inbox: &mut Inbox,
    after: Duration,
    into: &mut Vec<Event>,
) -> Option<oneshot::Sender<CloseReport>> {
    inbox.close();
    while let Some(cmd) = inbox.try_recv() {
        match cmd {
            Command::Publish(p) => p.give_up(after, into),
            Command::Flush(tx) => {
                let _ = tx.send(());
            }
        }
    }
    inbox.take_close_reply()
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
    async fn close_without_a_writer_times_out_and_a_second_close_says_the_same() {
        let (outbox, _inbox) = channel("test", options(4, WhenFull::Block));
        assert!(matches!(outbox.close().await, Err(Error::Timeout(_))));
        assert!(matches!(outbox.publish(event()).await, Err(Error::Closed)));
        assert!(matches!(outbox.close().await, Err(Error::Timeout(_))), "never a made-up clean report");
    }

    fn settle_all(batch: Vec<Command>) -> Vec<crate::event::EventId> {
        batch
            .into_iter()
            .map(|c| match c {
                Command::Publish(p) => {
                    let id = p.id;
                    p.settle.delivered(None);
                    id
                }
                Command::Flush(_) => panic!("no flush was asked for"),
            })
            .collect()
    }

    #[tokio::test]
    async fn a_batch_is_queued_in_order_and_its_receipt_gives_each_outcome() {
        let (outbox, mut inbox) = channel("test", options(10, WhenFull::Block));
        let events: Vec<Event> = (0..3).map(|_| event()).collect();
        let ids: Vec<_> = events.iter().map(Event::id).collect();
        let published = outbox.publish_batch_with(events, PublishOptions::default().header("h", "v")).await;
        assert!(published.refused.is_none());
        assert_eq!(published.receipt.len(), 3);
        let mut batch = Vec::new();
        assert_eq!(inbox.recv_batch(&mut batch, 10).await, 3);
        assert!(
            batch.iter().all(|c| matches!(c, Command::Publish(p) if p.headers == [("h".to_owned(), "v".to_owned())]))
        );
        assert_eq!(settle_all(batch), ids, "queued in publish order");
        let outcomes = published.receipt.await;
        assert_eq!(outcomes.iter().map(|o| o.as_ref().unwrap().id).collect::<Vec<_>>(), ids);
    }

    #[tokio::test]
    async fn a_batch_without_room_is_refused_whole_with_its_events_handed_back() {
        let (outbox, inbox) = channel("test", options(4, WhenFull::Error));
        let _a = outbox.publish(event()).await.unwrap();
        let events: Vec<Event> = (0..4).map(|_| event()).collect();
        let ids: Vec<_> = events.iter().map(Event::id).collect();
        let published = outbox.publish_batch_with(events, PublishOptions::default()).await;
        let refused = published.refused.expect("no room for 4 more");
        assert!(matches!(refused.error, Error::BufferFull { capacity: 4 }));
        assert_eq!(refused.events.iter().map(Event::id).collect::<Vec<_>>(), ids, "handed back, in order");
        assert!(published.receipt.is_empty());
        assert!(published.receipt.await.is_empty());
        assert_eq!(inbox.queued(), 1, "none of the batch was queued");

        outbox.close_now_for_test();
        let published = outbox.publish_batch_with(vec![event()], PublishOptions::default()).await;
        assert!(matches!(published.refused, Some(Refused { error: Error::Closed, ref events }) if events.len() == 1));
    }

    #[tokio::test]
    async fn a_batch_larger_than_the_buffer_goes_in_parts_and_the_writer_gone_fails_what_it_held() {
        let (outbox, mut inbox) = channel("test", options(2, WhenFull::Block));
        let events: Vec<Event> = (0..5).map(|_| event()).collect();
        let ids: Vec<_> = events.iter().map(Event::id).collect();
        let writer = tokio::spawn(async move {
            let mut got = Vec::new();
            while got.len() < 4 {
                let mut batch = Vec::new();
                inbox.recv_batch(&mut batch, 10).await;
                got.extend(settle_all(batch));
            }
            // The fifth stays queued when the writer goes.
            let mut batch = Vec::new();
            inbox.recv_batch(&mut batch, 10).await;
            drop(batch);
            got
        });
        let published = outbox.publish_batch_with(events, PublishOptions::default()).await;
        assert!(published.refused.is_none());
        let outcomes = published.receipt.await;
        assert_eq!(writer.await.unwrap(), ids[..4]);
        assert!(outcomes[..4].iter().all(Result::is_ok));
        assert!(matches!(&outcomes[4], Err(Error::Io { .. })), "a dropped event fails, never hangs: {:?}", outcomes[4]);
    }

    #[tokio::test]
    async fn close_of_a_dead_writer_is_an_error_not_a_clean_report() {
        let (outbox, inbox) = channel("test", options(4, WhenFull::Block));
        drop(inbox);
        assert!(matches!(outbox.close().await, Err(Error::Io { .. })));
    }
}
