//! The one delivery loop every queued backend runs (contracts §A), over a [`Sink`].
//!
//! The driver takes commands from the [`Inbox`] in publish order and owns: batching (up to
//! `batch_size`, lingering after a partial batch), `max_event_bytes`, flush markers, retries of
//! temporary failures with [`Backoff`] and jitter (in order, the failed events first), a timeout
//! on every call into the sink, truthful readiness, idle pings, and the close: deliver until the
//! deadline, then list what is left.
//!
//! **The accounting rule.** Every accepted event ends in exactly one of: delivered; rejected as
//! its own fault; or listed in the [`CloseReport`], in publish order. Events are never handed to
//! the sink by value: the driver keeps each one until its verdict, so a sink that fails, hangs or
//! panics cannot lose one. After a panic the driver stops writing; what it holds and what comes
//! after fails at once and is listed in the close report.

use std::any::Any;
use std::collections::VecDeque;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::backoff::Backoff;
use super::pipeline::{self, Command, Inbox, Pending, QueuedBroker, Readiness, event_of};
use super::sink::{Batch, Failure, Record, Sink, Verdict};
use crate::broker::{CloseReport, Settle};
use crate::config::{ConfigError, DeliveryOptions, Options};
use crate::error::Error;
use crate::event::Event;

/// How the driver runs one backend's sink.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct DriverOptions {
    /// Most events per [`Sink::write`].
    pub batch_size: usize,
    /// Events whose encoding is longer are rejected alone, before the sink sees them.
    pub max_event_bytes: Option<usize>,
    /// The longest a single sink call (write, recover, ping) may take; then it is abandoned, the
    /// backend is not ready, and its events wait for the next attempt.
    pub attempt_timeout: Duration,
    /// The first delay after a failure; it doubles (with jitter) up to `retry_max`.
    pub retry_first: Duration,
    /// The longest delay between attempts.
    pub retry_max: Duration,
    /// How long to let a batch grow after a partial one, under load.
    pub linger: Duration,
    /// How often an idle driver pings the sink, so readiness tells the truth between events.
    pub ping_interval: Option<Duration>,
}

impl Default for DriverOptions {
    fn default() -> Self {
        DriverOptions {
            batch_size: 500,
            max_event_bytes: None,
            attempt_timeout: DEFAULT_ATTEMPT_TIMEOUT,
            retry_first: Duration::from_millis(100),
            retry_max: Duration::from_secs(5),
            linger: Duration::ZERO,
            ping_interval: None,
        }
    }
}

/// The default [`DriverOptions::attempt_timeout`]: 10 seconds.
pub const DEFAULT_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

impl DriverOptions {
    /// The option keys [`DriverOptions::take`] reads (for a backend's list of known keys).
    pub const KEYS: &'static [&'static str] = &["attempt_timeout"];

    /// Reads `attempt_timeout` (seconds, more than 0) from `options`.
    pub fn take(mut self, options: &mut Options) -> Result<Self, ConfigError> {
        let at = options.location("attempt_timeout");
        if let Some(t) = options.take_seconds("attempt_timeout")? {
            if t.is_zero() {
                return Err(ConfigError::new(at, Some("attempt_timeout"), "must be more than 0 seconds"));
            }
            self.attempt_timeout = t;
        }
        Ok(self)
    }

    /// Sets the batch size (at least 1).
    pub fn batch_size(mut self, n: usize) -> Self {
        self.batch_size = n.max(1);
        self
    }

    /// Sets the size limit per event.
    pub fn max_event_bytes(mut self, max: Option<usize>) -> Self {
        self.max_event_bytes = max;
        self
    }

    /// Sets the attempt timeout.
    pub fn attempt_timeout(mut self, d: Duration) -> Self {
        self.attempt_timeout = d;
        self
    }

    /// Sets the retry delays: the first, and the longest.
    pub fn retry(mut self, first: Duration, max: Duration) -> Self {
        self.retry_first = first;
        self.retry_max = max.max(first);
        self
    }

    /// Sets the linger after a partial batch.
    pub fn linger(mut self, d: Duration) -> Self {
        self.linger = d;
        self
    }

    /// Sets the idle ping interval.
    pub fn ping_interval(mut self, d: Option<Duration>) -> Self {
        self.ping_interval = d;
        self
    }
}

/// Starts a driver for `sink` on the current tokio runtime and returns the broker that feeds it.
pub fn start<S: Sink>(
    backend: &'static str,
    sink: S,
    delivery: DeliveryOptions,
    options: DriverOptions,
) -> QueuedBroker {
    let close_timeout = delivery.close_timeout;
    let (outbox, inbox) = pipeline::channel(backend, delivery);
    let (broker, ready) = QueuedBroker::new(outbox);
    let driver = Driver::new(backend, sink, inbox, ready, options, close_timeout);
    tokio::spawn(driver.run());
    broker
}

/// One accepted event held by the driver until its verdict.
struct Held {
    seq: u64,
    settle: Settle,
    /// Write it on its own (it was in a batch the service refused).
    alone: bool,
}

/// The events accepted and not settled yet, in publish order (records and receipts side by side),
/// and the flush markers waiting behind them. Apart from the sink, so the driver can take new
/// events while the sink writes.
struct Window {
    backend: &'static str,
    batch_size: usize,
    max_event_bytes: Option<usize>,
    records: VecDeque<Record>,
    held: VecDeque<Held>,
    flushes: VecDeque<(u64, oneshot::Sender<()>)>,
    next_seq: u64,
}

impl Window {
    /// Takes queued commands until one batch waits beyond `in_flight` events being written.
    fn take_beyond(&mut self, inbox: &mut Inbox, in_flight: usize) {
        let room = (self.batch_size + in_flight).saturating_sub(self.held.len());
        if room == 0 {
            return;
        }
        let mut cmds = Vec::with_capacity(room.min(4096));
        inbox.try_recv_batch(&mut cmds, room);
        for cmd in cmds {
            self.on_command(cmd);
        }
    }

    fn take(&mut self, inbox: &mut Inbox) {
        self.take_beyond(inbox, 0);
    }

    fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::Publish(p) => self.accept(p),
            Command::Flush(tx) => {
                if self.held.is_empty() {
                    let _ = tx.send(());
                } else {
                    self.flushes.push_back((self.next_seq, tx));
                }
            }
        }
    }

    fn accept(&mut self, p: Pending) {
        if let Some(max) = self.max_event_bytes.filter(|m| p.json.len() > *m) {
            let len = p.json.len();
            p.reject(self.backend, format!("{len} bytes is over max_event_bytes {max}"));
            return;
        }
        let Pending { id, json, sender_id, headers, settle } = p;
        self.records.push_back(Record { id, json, sender_id, headers });
        self.held.push_back(Held { seq: self.next_seq, settle, alone: false });
        self.next_seq += 1;
    }

    fn answer_flushes(&mut self) {
        let low = self.held.front().map_or(self.next_seq, |h| h.seq);
        while self.flushes.front().is_some_and(|(barrier, _)| *barrier <= low) {
            if let Some((_, tx)) = self.flushes.pop_front() {
                let _ = tx.send(());
            }
        }
    }
}

enum Call<T> {
    Done(T),
    TimedOut(Duration),
    Panicked(String),
}

/// Polls a boxed future, turning a panic inside it into a value.
struct CatchUnwind<'a, T>(Pin<Box<dyn Future<Output = T> + Send + 'a>>);

impl<T> Future for CatchUnwind<'_, T> {
    type Output = Result<T, Box<dyn Any + Send>>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let fut = self.0.as_mut();
        match std::panic::catch_unwind(AssertUnwindSafe(|| fut.poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(v)) => Poll::Ready(Ok(v)),
            Err(payload) => Poll::Ready(Err(payload)),
        }
    }
}

fn panic_message(payload: &(dyn Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

/// Runs `fut` for at most `limit`, catching a panic.
async fn call<'a, T>(fut: Pin<Box<dyn Future<Output = T> + Send + 'a>>, limit: Duration) -> Call<T> {
    match tokio::time::timeout(limit, CatchUnwind(fut)).await {
        Ok(Ok(v)) => Call::Done(v),
        Ok(Err(payload)) => Call::Panicked(panic_message(payload.as_ref())),
        Err(_) => Call::TimedOut(limit),
    }
}

struct Driver<S> {
    backend: &'static str,
    sink: S,
    inbox: Inbox,
    ready: Readiness,
    options: DriverOptions,
    close_timeout: Duration,
    /// Accepted events not settled yet, and flush markers.
    w: Window,
    backoff: Backoff,
    /// Set after a failed attempt: the sink recovers before the next one, not before `retry_at`.
    failure: Option<Failure>,
    retry_at: Option<Instant>,
    /// After a failure, the next attempt writes exactly the events that failed (a sink may check
    /// whether an attempt whose outcome was lost committed after all: it must see the same batch).
    retry_len: Option<usize>,
    /// The deadline of a close nobody asked for (every broker handle dropped).
    implicit_deadline: Option<Instant>,
    /// Why the sink is dead (it panicked).
    dead: Option<String>,
    undelivered: Vec<Event>,
}

impl<S: Sink> Driver<S> {
    fn new(
        backend: &'static str,
        sink: S,
        inbox: Inbox,
        ready: Readiness,
        options: DriverOptions,
        close_timeout: Duration,
    ) -> Driver<S> {
        let backoff = Backoff::new(options.retry_first, options.retry_max);
        Driver {
            backend,
            sink,
            inbox,
            ready,
            close_timeout,
            w: Window {
                backend,
                batch_size: options.batch_size,
                max_event_bytes: options.max_event_bytes,
                records: VecDeque::new(),
                held: VecDeque::new(),
                flushes: VecDeque::new(),
                next_seq: 0,
            },
            backoff,
            failure: None,
            retry_at: None,
            retry_len: None,
            implicit_deadline: None,
            dead: None,
            undelivered: Vec::new(),
            options,
        }
    }

    fn deadline(&self) -> Option<Instant> {
        match (self.inbox.close_requested(), self.implicit_deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    async fn run(mut self) {
        loop {
            let deadline = self.deadline();
            if self.inbox.close_requested().is_some() {
                // Nothing new is accepted once close was called; what is queued is still ours.
                self.inbox.close();
            }
            if self.dead.is_some() {
                if self.dead_loop().await {
                    return self.finish().await;
                }
                continue;
            }
            self.take_queued();
            self.answer_flushes();
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return self.finish().await;
            }
            if self.w.records.is_empty() {
                if deadline.is_some() && self.inbox.is_finished() {
                    return self.finish().await;
                }
                if self.inbox.is_finished() && self.implicit_deadline.is_none() {
                    // Every handle is gone without a close: nothing more can come.
                    return self.finish().await;
                }
                self.wait_for_work().await;
                continue;
            }
            if let Some(at) = self.retry_at {
                if Instant::now() < at {
                    self.pause(at, deadline).await;
                    continue;
                }
                self.retry_at = None;
            }
            if let Some(failure) = self.failure.take() {
                if !self.recover(failure, deadline).await {
                    continue;
                }
            }
            let partial = self.attempt(deadline).await;
            self.answer_flushes();
            // A busy stream (events arrived while the batch was written) lingers so the next batch
            // is a full one; a caller awaiting each receipt sends nothing meanwhile and never waits.
            let busy = self.inbox.queued() > 0;
            if partial && busy && self.failure.is_none() && !self.options.linger.is_zero() && deadline.is_none() {
                self.linger().await;
            }
        }
    }

    /// Moves queued commands into the held window, up to one batch.
    fn take_queued(&mut self) {
        self.w.take(&mut self.inbox);
        if self.inbox.is_finished() && self.inbox.close_requested().is_none() && self.implicit_deadline.is_none() {
            self.implicit_deadline = Some(Instant::now() + self.close_timeout);
        }
    }

    fn on_command(&mut self, cmd: Command) {
        self.w.on_command(cmd);
    }

    fn answer_flushes(&mut self) {
        self.w.answer_flushes();
    }

    /// Nothing held: waits for commands, a close, or the idle ping.
    async fn wait_for_work(&mut self) {
        let mut cmds = Vec::new();
        let max = self.options.batch_size;
        let received = match self.options.ping_interval {
            Some(every) => {
                tokio::select! {
                    n = self.inbox.recv_batch(&mut cmds, max) => Some(n),
                    _ = tokio::time::sleep(every) => None,
                }
            }
            None => Some(self.inbox.recv_batch(&mut cmds, max).await),
        };
        for cmd in cmds {
            self.on_command(cmd);
        }
        if received.is_none() {
            self.idle_check().await;
        }
    }

    /// While idle: gets the sink back if it failed, then pings it, and records the result.
    async fn idle_check(&mut self) {
        let limit = self.options.attempt_timeout;
        if let Some(failure) = self.failure.take() {
            let recovered = call(self.sink.recover(&failure), limit).await;
            if !self.succeeded(recovered) {
                return;
            }
        }
        let pinged = call(self.sink.ping(), limit).await;
        if self.succeeded(pinged) {
            self.ready.set(true);
            self.retry_at = None;
        }
    }

    /// Records the outcome of a recover or ping: a failure schedules a retry, a panic kills the
    /// sink. True when the call worked.
    fn succeeded(&mut self, outcome: Call<Result<(), Error>>) -> bool {
        match outcome {
            Call::Done(Ok(())) => return true,
            Call::Done(Err(e)) => self.failed(Failure::Failed(e)),
            Call::TimedOut(d) => self.failed(Failure::TimedOut(d)),
            Call::Panicked(m) => self.die(m),
        }
        false
    }

    /// Waits until `until` (or the deadline), waking early when a close is requested.
    async fn pause(&mut self, until: Instant, deadline: Option<Instant>) {
        let until = deadline.map_or(until, |d| d.min(until));
        if deadline.is_some() {
            tokio::time::sleep_until(until.into()).await;
        } else {
            tokio::select! {
                _ = tokio::time::sleep_until(until.into()) => {}
                _ = self.inbox.close_signal() => {}
            }
        }
    }

    /// Lets a busy stream fill the next batch (tokio's timer rounds a sub-millisecond linger up
    /// to its next tick).
    async fn linger(&mut self) {
        if self.inbox.queued() + self.w.records.len() < self.options.batch_size {
            tokio::time::sleep(self.options.linger).await;
        }
    }

    /// The time a call may take: the attempt timeout, but never past the close deadline.
    fn limit(&self, deadline: Option<Instant>) -> Duration {
        let limit = self.options.attempt_timeout;
        deadline.map_or(limit, |d| limit.min(d.saturating_duration_since(Instant::now())))
    }

    /// Asks the sink to recover from `failure`; false when it is still away.
    async fn recover(&mut self, failure: Failure, deadline: Option<Instant>) -> bool {
        let limit = self.limit(deadline);
        let recovered = tokio::select! {
            biased;
            r = call(self.sink.recover(&failure), limit) => r,
            _ = until_close_deadline(&self.inbox) => Call::TimedOut(limit),
        };
        self.succeeded(recovered)
    }

    fn failed(&mut self, failure: Failure) {
        self.ready.set(false);
        let delay = self.backoff.next_delay();
        tracing::warn!(backend = self.backend, held = self.w.held.len(), "{failure}; trying again in {delay:?}");
        self.failure = Some(failure);
        self.retry_at = Some(Instant::now() + delay);
    }

    /// The next batch: a run of events not marked `alone`, or one that is.
    fn next_batch_len(&self) -> usize {
        match self.w.held.front() {
            None => 0,
            Some(h) if h.alone => 1,
            Some(_) => {
                let max = self.retry_len.unwrap_or(self.options.batch_size).min(self.options.batch_size);
                self.w.held.iter().take(max).take_while(|h| !h.alone).count()
            }
        }
    }

    /// Writes the next batch and settles what it can. Returns whether the batch was partial.
    async fn attempt(&mut self, deadline: Option<Instant>) -> bool {
        let n = self.next_batch_len();
        if n == 0 {
            return false;
        }
        let alone = n == 1 && self.w.held.front().is_some_and(|h| h.alone);
        let batch = Batch::new(self.w.records.drain(..n).collect());
        let limit = self.limit(deadline);
        let result = {
            // While the sink writes, the next events are taken in (on a thread-backed sink the
            // two run at once); they wait behind this batch.
            let mut write = std::pin::pin!(call(self.sink.write(&batch), limit));
            let started = std::future::poll_fn(|cx| Poll::Ready(write.as_mut().poll(cx))).await;
            match started {
                Poll::Ready(r) => r,
                Poll::Pending => {
                    if deadline.is_none() {
                        self.w.take_beyond(&mut self.inbox, n);
                    }
                    // A close requested meanwhile cuts the attempt at its deadline.
                    tokio::select! {
                        biased;
                        r = &mut write => r,
                        _ = until_close_deadline(&self.inbox) => Call::TimedOut(limit),
                    }
                }
            }
        };
        let records = batch.into_records();
        let held: Vec<Held> = self.w.held.drain(..n).collect();
        let verdicts = match result {
            Call::Done(Ok(v)) if v.len() == n => v,
            Call::Done(Ok(v)) => {
                let why = format!("the sink returned {} verdicts for {n} events", v.len());
                vec![
                    Verdict::Retry(Error::Io {
                        backend: self.backend,
                        operation: "writing".into(),
                        reason: why,
                        cause: None
                    });
                    n
                ]
            }
            Call::Done(Err(e)) => vec![Verdict::Retry(e); n],
            Call::TimedOut(d) => {
                self.put_back(records, held);
                self.retry_len = Some(n);
                self.failed(Failure::TimedOut(d));
                return false;
            }
            Call::Panicked(m) => {
                self.put_back(records, held);
                self.die(m);
                return false;
            }
        };
        let mut again: Vec<(Record, Held)> = Vec::new();
        let mut retry_error = None;
        for ((record, mut h), verdict) in records.into_iter().zip(held).zip(verdicts) {
            match verdict {
                Verdict::Delivered(position) => h.settle.delivered(position),
                Verdict::Rejected(reason) => self.reject(&record, h.settle, reason),
                Verdict::Suspect(reason) if alone => self.reject(&record, h.settle, reason),
                Verdict::Suspect(_) => {
                    h.alone = true;
                    again.push((record, h));
                }
                Verdict::Retry(e) => {
                    retry_error.get_or_insert(e);
                    again.push((record, h));
                }
            }
        }
        let (records, held): (Vec<Record>, Vec<Held>) = again.into_iter().unzip();
        let requeued = records.len();
        self.put_back(records, held);
        match retry_error {
            Some(e) => {
                self.retry_len = Some(requeued);
                self.failed(Failure::Failed(e));
            }
            None => {
                self.retry_len = None;
                self.ready.set(true);
                self.backoff.reset();
            }
        }
        n < self.options.batch_size
    }

    fn reject(&self, record: &Record, settle: Settle, reason: String) {
        let event_id = record.id.to_string();
        settle.settle(Err(Error::Rejected { backend: self.backend, event_id, reason }));
    }

    /// Puts events back at the head of the window, in their order.
    fn put_back(&mut self, records: Vec<Record>, held: Vec<Held>) {
        for (r, h) in records.into_iter().rev().zip(held.into_iter().rev()) {
            self.w.records.push_front(r);
            self.w.held.push_front(h);
        }
    }

    /// The sink panicked: stop writing; everything held now or accepted later fails at once and is
    /// listed in the close report.
    fn die(&mut self, message: String) {
        tracing::error!(backend = self.backend, "the writer panicked: {message}; its events are reported undelivered");
        self.ready.set(false);
        self.dead = Some(message);
        self.give_up_held();
    }

    fn dead_error(&self) -> Error {
        let why = self.dead.clone().unwrap_or_default();
        Error::Io {
            backend: self.backend,
            operation: "writing".into(),
            reason: format!("the writer panicked: {why}"),
            cause: None,
        }
    }

    /// Fails every held event into the close report, in order: a timeout at the close deadline,
    /// or the panic of a dead sink.
    fn give_up_held(&mut self) {
        let error = if self.dead.is_some() { self.dead_error() } else { Error::Timeout(self.close_timeout) };
        for (record, h) in self.w.records.drain(..).zip(self.w.held.drain(..)) {
            if let Some(e) = event_of(record.id, &record.json) {
                self.undelivered.push(e);
            }
            h.settle.settle(Err(error.clone()));
        }
        self.answer_flushes();
    }

    /// A dead driver fails what comes in until a close is requested or every handle is gone.
    /// Returns true when it is time to finish.
    async fn dead_loop(&mut self) -> bool {
        let mut cmds = Vec::new();
        let n = self.inbox.recv_batch(&mut cmds, 256).await;
        let error = self.dead_error();
        for cmd in cmds {
            match cmd {
                Command::Publish(p) => p.give_up_with(error.clone(), &mut self.undelivered),
                Command::Flush(tx) => {
                    let _ = tx.send(());
                }
            }
        }
        n == 0 && (self.inbox.close_requested().is_some() || self.inbox.is_finished())
    }

    /// Lists what is left, releases the sink, and answers the close.
    async fn finish(mut self) {
        self.give_up_held();
        let reply = pipeline::drain_undelivered(&mut self.inbox, self.close_timeout, &mut self.undelivered);
        for (_, tx) in self.w.flushes.drain(..) {
            let _ = tx.send(());
        }
        self.ready.set(false);
        if self.dead.is_none() {
            let _ = call(self.sink.close(), Duration::from_secs(1)).await;
        }
        let report = CloseReport::new(std::mem::take(&mut self.undelivered));
        match reply {
            Some(reply) => {
                if let Err(report) = reply.send(report) {
                    log_unreported(self.backend, &report);
                }
            }
            None => log_unreported(self.backend, &report),
        }
    }
}

/// Ready at the close deadline, once a close is requested.
async fn until_close_deadline(inbox: &Inbox) {
    inbox.close_signal().await;
    if let Some(d) = inbox.close_requested() {
        tokio::time::sleep_until(d.into()).await;
    }
}

fn log_unreported(backend: &'static str, report: &CloseReport) {
    if !report.is_clean() {
        tracing::error!(
            backend,
            undelivered = report.undelivered.len(),
            "the broker was dropped without close(); {} events were not delivered",
            report.undelivered.len()
        );
    }
}
