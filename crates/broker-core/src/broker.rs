//! The publishing and consuming contracts (docs/contract.md §A and §B).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use async_trait::async_trait;
use tokio::sync::oneshot;

use crate::batch::{BatchPublished, BatchReceipt, Refused, Slots, gone};
use crate::error::{Error, Position};
use crate::event::{Event, EventId};
use crate::metrics::Meter;

/// An event the service has confirmed: Kafka delivery report with `acks=all`, RabbitMQ publisher
/// confirm, SQL commit, file write (and fsync per policy).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Delivered {
    /// The event's id.
    pub id: EventId,
    /// Where it landed, when the backend knows (file offset, partition/offset, row id).
    pub position: Option<Position>,
}

impl Delivered {
    /// A confirmation for `id` at `position`.
    pub fn new(id: EventId, position: Option<Position>) -> Delivered {
        Delivered { id, position }
    }
}

/// The outcome of one published event.
pub type Outcome = Result<Delivered, Error>;

/// The promise of one event's outcome, returned by [`EventBroker::publish`].
///
/// Awaiting it is optional: dropping it does not cancel the delivery, and [`EventBroker::flush`]
/// waits for every outstanding event either way.
#[derive(Debug)]
#[must_use = "a receipt tells whether the event was delivered; drop it explicitly if you do not care"]
pub struct Receipt {
    id: EventId,
    rx: ReceiptInner,
}

#[derive(Debug)]
enum ReceiptInner {
    Pending(oneshot::Receiver<Outcome>),
    Ready(Option<Outcome>),
}

impl Receipt {
    /// A receipt and the sender that settles it, not measured (see [`Receipt::metered`]).
    pub fn channel(id: EventId) -> (Receipt, Settle) {
        let (tx, rx) = oneshot::channel();
        (Receipt { id, rx: ReceiptInner::Pending(rx) }, Settle { id, to: To::One(tx), metered: None })
    }

    /// A receipt for an event published through `meter`'s broker, and the sender that settles
    /// it: its outcome and latency (from now) are recorded when settled ([`crate::metrics`]). The
    /// caller counts it accepted once it is queued ([`crate::metrics::Meter::accepted`]).
    pub fn metered(meter: &Meter, id: EventId) -> (Receipt, Settle) {
        let (tx, rx) = oneshot::channel();
        let metered = Some((meter.clone(), Instant::now()));
        (Receipt { id, rx: ReceiptInner::Pending(rx) }, Settle { id, to: To::One(tx), metered })
    }

    /// A receipt that is already settled.
    pub fn ready(id: EventId, outcome: Outcome) -> Receipt {
        Receipt { id, rx: ReceiptInner::Ready(Some(outcome)) }
    }

    /// The id of the event this receipt is for.
    pub fn id(&self) -> EventId {
        self.id
    }
}

impl Future for Receipt {
    type Output = Outcome;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Outcome> {
        let this = self.get_mut();
        match &mut this.rx {
            ReceiptInner::Ready(o) => Poll::Ready(o.take().unwrap_or(Err(Error::Closed))),
            ReceiptInner::Pending(rx) => Pin::new(rx).poll(cx).map(|r| r.unwrap_or_else(|_| Err(gone()))),
        }
    }
}

/// The sending half of a [`Receipt`] (or of one event's place in a [`BatchReceipt`]), held by
/// the backend until the outcome is known. Dropped without an outcome, it reports that the
/// backend stopped before knowing it.
#[derive(Debug)]
pub struct Settle {
    id: EventId,
    to: To,
    /// The broker's meter and the time of `publish`, for the metrics.
    metered: Option<(Meter, Instant)>,
}

#[derive(Debug)]
pub(crate) enum To {
    One(oneshot::Sender<Outcome>),
    Slot(Arc<Slots>, usize),
    Settled,
}

impl Settle {
    /// The settle of event `id`, slot `index` of a batch.
    pub(crate) fn slot(id: EventId, slots: &Arc<Slots>, index: usize, metered: Option<(Meter, Instant)>) -> Settle {
        Settle { id, to: To::Slot(slots.clone(), index), metered }
    }

    /// The event's id.
    pub fn id(&self) -> EventId {
        self.id
    }

    /// Reports the outcome. A dropped receipt is fine: nobody was waiting.
    pub fn settle(mut self, outcome: Outcome) {
        match self.take_to(&outcome) {
            To::One(tx) => {
                let _ = tx.send(outcome);
            }
            To::Slot(slots, index) => slots.fill(index, outcome),
            To::Settled => {}
        }
    }

    /// Reports each outcome, like [`Settle::settle`] on each in turn; consecutive events of one
    /// batch ([`BatchReceipt::settles`](crate::BatchReceipt::settles)) take its lock and wake
    /// its receipt once, not once per event.
    pub fn settle_all(settled: Vec<(Settle, Outcome)>) {
        let mut settled = settled.into_iter();
        while let Some((mut settle, outcome)) = settled.next() {
            match settle.take_to(&outcome) {
                To::One(tx) => {
                    let _ = tx.send(outcome);
                }
                To::Slot(slots, index) => slots.fill_run((index, outcome), &mut settled),
                To::Settled => {}
            }
        }
    }

    /// Its slot's index when it is a slot of `slots`.
    pub(crate) fn slot_index_in(&self, slots: &Arc<Slots>) -> Option<usize> {
        match &self.to {
            To::Slot(s, index) if Arc::ptr_eq(s, slots) => Some(*index),
            _ => None,
        }
    }

    /// Records `outcome` in the metrics and takes where it goes: from here on it is settled
    /// (dropping it reports nothing more).
    pub(crate) fn take_to(&mut self, outcome: &Outcome) -> To {
        if let Some((meter, since)) = self.metered.take() {
            meter.settled(since, &outcome.as_ref().map(|_| ()));
        }
        std::mem::replace(&mut self.to, To::Settled)
    }

    /// Reports success at `position`.
    pub fn delivered(self, position: Option<Position>) {
        let id = self.id;
        self.settle(Ok(Delivered { id, position }));
    }
}

impl Drop for Settle {
    fn drop(&mut self) {
        if matches!(self.to, To::Settled) {
            return;
        }
        // Dropped without an outcome: it failed, for the metrics too. A receipt learns it from
        // its closed channel; a batch's slot is filled here.
        let error = gone();
        if let Some((meter, since)) = self.metered.take() {
            meter.settled(since, &Err(&error));
        }
        if let To::Slot(slots, index) = std::mem::replace(&mut self.to, To::Settled) {
            slots.fill(index, Err(error));
        }
    }
}

/// What `close` could not deliver, so nothing is lost silently (docs/contract.md §A.6).
#[derive(Debug, Default)]
#[non_exhaustive]
pub struct CloseReport {
    /// Events not delivered before the deadline or that failed during close, in publish order.
    pub undelivered: Vec<Event>,
    /// Events not delivered yet but kept in a disk spool (not lost: they go out later).
    pub spooled: u64,
}

impl CloseReport {
    /// A report listing `undelivered`.
    pub fn new(undelivered: Vec<Event>) -> CloseReport {
        CloseReport { undelivered, spooled: 0 }
    }

    /// The same, saying that `events` are kept in a disk spool.
    pub fn with_spooled(mut self, events: u64) -> CloseReport {
        self.spooled = events;
        self
    }

    /// Whether everything was delivered.
    pub fn is_clean(&self) -> bool {
        self.undelivered.is_empty() && self.spooled == 0
    }
}

/// Per-event publishing options, for [`EventBroker::publish_with`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PublishOptions {
    /// Extra message headers for this event (e.g. `rasa export`'s `rasa-export-process-id`),
    /// after the backend's own. Backends whose messages have no headers (file, SQL) ignore them.
    pub headers: Vec<(String, String)>,
}

impl PublishOptions {
    /// Adds the header `name: value`.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> PublishOptions {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Adds `headers`.
    pub fn headers(mut self, headers: impl IntoIterator<Item = (String, String)>) -> PublishOptions {
        self.headers.extend(headers);
        self
    }
}

/// Publishes events to one destination.
///
/// The contract every implementation keeps:
/// - **Outcome per event.** Each accepted event's [`Receipt`] resolves exactly once: delivered
///   (confirmed by the service) or failed with a reason. Nothing is dropped and merely logged.
/// - **No round trip per event.** `publish` returns once the event is accepted into a bounded
///   buffer; batching happens behind it. Awaiting the receipt is the caller's choice.
/// - **Order.** Events of one `sender_id` are delivered in publish order, also across retries.
/// - **Bounded memory.** A full buffer blocks `publish` (back-pressure) or fails it with
///   [`Error::BufferFull`], as configured. Never a silent drop.
/// - **Close.** `close` flushes within the configured deadline and returns what it could not
///   deliver; `publish` after `close` fails with [`Error::Closed`]; a second `close` returns what
///   the first could not deliver.
/// - **Accounting.** Every accepted event ends in exactly one of: delivered; rejected as its own
///   fault ([`Error::Rejected`]); or listed in [`CloseReport::undelivered`], in publish order.
/// - **Poison events** fail alone ([`Error::Rejected`]); the events around them go on.
/// - **Cancellation.** Dropping a `publish` future before it returns means the event may or may
///   not have been accepted; once it returned a receipt, the event will be delivered or reported.
#[async_trait]
pub trait EventBroker: Send + Sync {
    /// The backend's type name (`"file"`, `"kafka"`, ...).
    fn backend(&self) -> &'static str;

    /// Accepts `event` for delivery. Errors here mean the event was not accepted
    /// ([`Error::Closed`], [`Error::BufferFull`]); delivery failures come through the receipt.
    async fn publish(&self, event: Event) -> Result<Receipt, Error> {
        self.publish_with(event, PublishOptions::default()).await
    }

    /// [`EventBroker::publish`] with per-event options (message headers). Works the same through
    /// `dyn EventBroker` and through layers.
    async fn publish_with(&self, event: Event, options: PublishOptions) -> Result<Receipt, Error>;

    /// Accepts `events` for delivery in order, each with `options`, and gives one receipt for
    /// their outcomes (still one per event, in order): for bulk publishers, which would otherwise
    /// spend more on receipts than on events. The events not accepted are handed back in
    /// [`BatchPublished::refused`] with the reason, so none is lost.
    ///
    /// Queued backends accept a batch that fits in their buffer (`buffer_size`) all at once or
    /// not at all; cancelling the call then accepts nothing. A larger batch is accepted in parts,
    /// and one cancelled midway may have accepted its first parts. This default publishes each
    /// event on its own (a clone of each is kept until it is accepted, to hand it back).
    ///
    /// [`EventBroker::atomic_batch`] says how many events a call may hold to be all or nothing.
    async fn publish_batch(&self, events: Vec<Event>, options: PublishOptions) -> BatchPublished {
        let mut receipts = Vec::with_capacity(events.len());
        let mut events = events.into_iter();
        while let Some(event) = events.next() {
            match self.publish_with(event.clone(), options.clone()).await {
                Ok(r) => receipts.push(r),
                Err(error) => {
                    let events = std::iter::once(event).chain(events).collect();
                    let refused = Some(Refused { error, events });
                    return BatchPublished { receipt: BatchReceipt::from_receipts(receipts), refused };
                }
            }
        }
        BatchPublished { receipt: BatchReceipt::from_receipts(receipts), refused: None }
    }

    /// The most events [`EventBroker::publish_batch`] accepts all at once or not at all, so that
    /// cancelling the call accepts none of them: a caller that may give up waiting (a deadline,
    /// a signal) sends batches of at most this many to know exactly what was accepted. 1 for the
    /// default `publish_batch`, which publishes one event at a time.
    fn atomic_batch(&self) -> usize {
        1
    }

    /// Whether an accepted event survives a crash of this process (it is in a disk spool before
    /// `publish` returns), so a caller need not keep it until its outcome to hand it back. False
    /// by default.
    fn durable(&self) -> bool {
        false
    }

    /// Waits until every event accepted before this call has its outcome.
    async fn flush(&self) -> Result<(), Error>;

    /// Whether the broker can deliver now (connected, not closed). Tells the truth during outages.
    async fn is_ready(&self) -> bool;

    /// Flushes with the configured deadline, then releases the connection.
    async fn close(&self) -> Result<CloseReport, Error>;
}

impl std::fmt::Debug for dyn EventBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "EventBroker({})", self.backend())
    }
}

/// Conveniences on top of [`EventBroker`].
#[async_trait]
pub trait EventBrokerExt: EventBroker {
    /// Publishes and waits for this one event's outcome (a round trip: use only when needed).
    async fn publish_confirmed(&self, event: Event) -> Result<Delivered, Error> {
        self.publish(event).await?.await
    }
}

impl<T: EventBroker + ?Sized> EventBrokerExt for T {}

/// Where a consumer starts.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum StartFrom {
    /// The backend's natural resume point: a Kafka group's committed offset, the end of a file or
    /// table, the head of a RabbitMQ queue.
    #[default]
    Resume,
    /// The oldest event still stored.
    Beginning,
    /// A backend-specific position: a byte offset (file), the row id after which to start (SQL),
    /// the same offset in every partition of the topic (Kafka; past a partition's end it is out
    /// of range there and the consumer's `auto.offset.reset`, earliest, applies). A RabbitMQ
    /// queue has no positions: it is read from its head.
    Offset(u64),
}

/// How to consume.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SourceOptions {
    /// Where to start.
    pub start: StartFrom,
    /// Keep waiting for new events at the end (true), or end the stream there (false).
    pub follow: bool,
    /// Kafka consumer group.
    pub group: Option<String>,
    /// How many unacknowledged events may be outstanding (RabbitMQ prefetch).
    pub prefetch: u16,
    /// Which queue to read, for services where reading a queue takes its messages away from
    /// every other consumer of it (RabbitMQ); the others ignore it.
    pub queue: QueueChoice,
}

/// Which queue a source reads where reading takes messages away (RabbitMQ).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum QueueChoice {
    /// The backend's configured queue (RabbitMQ: the first of `queues`), consumed with acks:
    /// what a consumer that owns the events does.
    #[default]
    Configured,
    /// This existing queue, consumed with acks (it is not created).
    Named(String),
    /// A private, exclusive, auto-deleted queue bound to the exchange: events published from now
    /// on, taking nothing from anyone (what `broker tail` shows by default). It has no history,
    /// so [`StartFrom::Beginning`] and [`StartFrom::Offset`] are configuration errors.
    Private,
}

impl Default for SourceOptions {
    fn default() -> Self {
        SourceOptions {
            start: StartFrom::Resume,
            follow: true,
            group: None,
            prefetch: 256,
            queue: QueueChoice::Configured,
        }
    }
}

impl SourceOptions {
    /// Options starting at `start`, following growth.
    pub fn from(start: StartFrom) -> SourceOptions {
        SourceOptions { start, ..SourceOptions::default() }
    }

    /// Sets whether to follow growth.
    pub fn follow(mut self, follow: bool) -> SourceOptions {
        self.follow = follow;
        self
    }

    /// Sets the consumer group.
    pub fn group(mut self, group: impl Into<String>) -> SourceOptions {
        self.group = Some(group.into());
        self
    }

    /// Sets which queue to read (RabbitMQ).
    pub fn queue(mut self, queue: QueueChoice) -> SourceOptions {
        self.queue = queue;
        self
    }
}

/// One consumed event.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Received {
    /// The event.
    pub event: Event,
    /// The bytes exactly as stored (Rasa's encoding when we or Rasa wrote them).
    pub raw: Vec<u8>,
    /// Where it was read.
    pub position: Position,
    /// Where the next event starts (a byte offset for files), for resuming.
    pub next_offset: Option<u64>,
    /// The message key, where messages have one (Kafka: `sender_id` with `partition_by_sender`).
    pub key: Option<Vec<u8>>,
    /// The message headers, where messages have them (Kafka headers, AMQP headers), in order.
    pub headers: Vec<(String, Vec<u8>)>,
}

impl Received {
    /// A consumed event, with no key or headers.
    pub fn new(event: Event, raw: Vec<u8>, position: Position, next_offset: Option<u64>) -> Received {
        Received { event, raw, position, next_offset, key: None, headers: Vec::new() }
    }

    /// The same, with the message's key and headers.
    pub fn with_message(mut self, key: Option<Vec<u8>>, headers: Vec<(String, Vec<u8>)>) -> Received {
        self.key = key;
        self.headers = headers;
        self
    }
}

/// Reads events back from a backend (docs/contract.md §B).
///
/// A malformed message yields `Err(Error::Malformed { position, .. })` for that message only; the
/// next call goes on after it, so a bad message never stops a consumer silently.
#[async_trait]
pub trait EventSource: Send {
    /// The backend's type name.
    fn backend(&self) -> &'static str;

    /// The next event, waiting for one when following. `Ok(None)`: the stream ended (not
    /// following and at the end, or closed).
    async fn next(&mut self) -> Result<Option<Received>, Error>;

    /// Acknowledges an event handed over by `next` (RabbitMQ ack, Kafka commit). Backends whose
    /// position is the caller's to keep (file, SQL) do nothing.
    async fn ack(&mut self, _received: &Received) -> Result<(), Error> {
        Ok(())
    }

    /// Ends consuming cleanly: acknowledgements sent so far reach the service before the
    /// connection closes (RabbitMQ would otherwise deliver those events again). Dropping a source
    /// without `close` is allowed; unacknowledged events then come again.
    async fn close(&mut self) -> Result<(), Error> {
        Ok(())
    }
}
