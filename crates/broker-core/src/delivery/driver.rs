//! The one delivery loop every queued backend runs (docs/contract.md §A), over a [`Sink`].
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

use std::future::Future;
use std::task::Poll;
use std::time::{Duration, Instant};

use super::backoff::Backoff;
use super::call::{Call, CatchUnwind, call};
use super::pipeline::{self, Command, Inbox, QueuedBroker, Readiness};
use super::sink::{Batch, Failure, Record, Sink, Verdict};
use super::window::{Held, Sent, Window};
use crate::broker::{CloseReport, Settle};
use crate::config::{ConfigError, DeliveryOptions, Options};
use crate::error::Error;
use crate::event::Event;
use crate::metrics::Meter;

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
    /// Most events sent and awaiting confirmation at a time, for a sink that answers
    /// [`Verdict::Sent`] (publisher confirms); a batch never exceeds the room left.
    pub max_in_flight: usize,
    /// How long the oldest event in flight may wait for its confirmation before the backend is
    /// not ready and nothing more is sent (a service blocking publishers); the events stay in
    /// flight until confirmed, the link fails, or the close deadline passes.
    pub confirm_timeout: Duration,
    /// When set, events held while the sink fails are not kept: they fail at once (listed in
    /// the close report) with this reason, e.g. Rasa's `should_keep_unpublished_messages: false`.
    pub fail_while_away: Option<&'static str>,
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
            max_in_flight: 1000,
            confirm_timeout: DEFAULT_ATTEMPT_TIMEOUT,
            fail_while_away: None,
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

    /// Sets the window of a sink that confirms later: the most events in flight, and how long
    /// a confirmation may take before the backend counts as stalled.
    pub fn window(mut self, max_in_flight: usize, confirm_timeout: Duration) -> Self {
        self.max_in_flight = max_in_flight.max(1);
        self.confirm_timeout = confirm_timeout;
        self
    }

    /// Fails events at once while the sink fails, with `reason` (see
    /// [`DriverOptions::fail_while_away`]).
    pub fn fail_while_away(mut self, reason: Option<&'static str>) -> Self {
        self.fail_while_away = reason;
        self
    }

    /// Sets the idle ping interval.
    pub fn ping_interval(mut self, d: Option<Duration>) -> Self {
        self.ping_interval = d;
        self
    }
}

/// Starts a driver for `sink` on the current tokio runtime and returns the broker that feeds it.
/// `meter` is the backend's [`Meter`] (type name and destination, for metrics and spans), or
/// just its type name.
pub fn start<S: Sink>(
    meter: impl Into<Meter>,
    sink: S,
    delivery: DeliveryOptions,
    options: DriverOptions,
) -> QueuedBroker {
    let close_timeout = delivery.close_timeout;
    let (outbox, inbox) = pipeline::channel(meter, delivery);
    let meter = outbox.meter().clone();
    let (broker, ready) = QueuedBroker::new(outbox);
    // Every log line of the driver carries the backend and the destination: the span is at the
    // error level so that it is on whenever the driver's warnings are (default filter: warn).
    let span = tracing::error_span!("delivery", backend = meter.backend(), destination = meter.destination());
    let driver = Driver::new(meter, sink, inbox, ready, options, close_timeout);
    tokio::spawn(tracing::Instrument::instrument(driver.run(), span));
    broker
}

struct Driver<S> {
    backend: &'static str,
    meter: Meter,
    sink: S,
    inbox: Inbox,
    ready: Readiness,
    options: DriverOptions,
    close_timeout: Duration,
    /// Accepted events not settled yet, and flush markers.
    w: Window,
    backoff: Backoff,
    /// Failed attempts in a row (the span field `attempt` is this plus one).
    failures: u32,
    /// Set after a failed attempt: the sink recovers before the next one, not before `retry_at`.
    failure: Option<Failure>,
    retry_at: Option<Instant>,
    /// After a failure, the next attempt writes exactly the events that failed (a sink may check
    /// whether an attempt whose outcome was lost committed after all: it must see the same batch).
    retry_len: Option<usize>,
    /// No confirmation came within `confirm_timeout`: not ready, nothing more is sent.
    stalled: bool,
    /// The deadline of a close nobody asked for (every broker handle dropped).
    implicit_deadline: Option<Instant>,
    /// Why the sink is dead (it panicked).
    dead: Option<String>,
    undelivered: Vec<Event>,
}

impl<S: Sink> Driver<S> {
    fn new(
        meter: Meter,
        sink: S,
        inbox: Inbox,
        ready: Readiness,
        options: DriverOptions,
        close_timeout: Duration,
    ) -> Driver<S> {
        let backoff = Backoff::new(options.retry_first, options.retry_max);
        let backend = meter.backend();
        Driver {
            backend,
            meter,
            sink,
            inbox,
            ready,
            close_timeout,
            w: Window::new(backend, options.batch_size, options.max_event_bytes),
            backoff,
            failures: 0,
            failure: None,
            retry_at: None,
            retry_len: None,
            stalled: false,
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
            if self.failure.is_some() {
                self.fail_while_away();
            }
            self.meter.depth(self.inbox.queued(), self.w.held.len() + self.w.sent.len());
            self.w.answer_flushes();
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return self.finish().await;
            }
            if self.w.is_empty() {
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
            if !self.w.sent.is_empty() {
                // Events in flight (a sink that confirms later): send more while the window
                // has room, else wait for confirmations.
                if self.retry_at.is_some_and(|at| Instant::now() >= at) {
                    self.retry_at = None;
                }
                if self.can_send() {
                    self.attempt(deadline).await;
                } else {
                    self.await_confirmations().await;
                }
                self.w.answer_flushes();
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
            self.w.answer_flushes();
            // A busy stream (events arrived while the batch was written) lingers so the next batch
            // is a full one; a caller awaiting each receipt sends nothing meanwhile and never waits.
            let busy = self.inbox.queued() > 0;
            let idle_window = self.w.sent.is_empty();
            if partial
                && busy
                && idle_window
                && self.failure.is_none()
                && !self.options.linger.is_zero()
                && deadline.is_none()
            {
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

    /// With [`DriverOptions::fail_while_away`], events held while the sink is failing fail now.
    fn fail_while_away(&mut self) {
        let (Some(why), Some(failure)) = (self.options.fail_while_away, &self.failure) else { return };
        if self.w.is_empty() {
            return;
        }
        let error = Error::Unavailable {
            backend: self.backend,
            reason: format!("{failure}; the event is not kept ({why})"),
            cause: None,
        };
        self.w.give_up(&error, &mut self.undelivered);
    }

    /// A sink with events in flight may send more: the window has room, it is confirming, and
    /// no retry is waiting.
    fn can_send(&self) -> bool {
        !self.w.records.is_empty()
            && self.w.sent.len() < self.options.max_in_flight
            && !self.stalled
            && self.failure.is_none()
            && self.retry_at.is_none_or(|at| Instant::now() >= at)
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
            self.w.on_command(cmd);
        }
        if received.is_none() {
            self.idle_check().await;
        }
    }

    /// While idle: gets the sink back if it failed (once its backoff has passed), then pings
    /// it, and records the result. A close requested meanwhile cuts the call at its deadline.
    async fn idle_check(&mut self) {
        let limit = self.options.attempt_timeout;
        if self.failure.is_some() {
            if self.retry_at.is_some_and(|at| Instant::now() < at) {
                return;
            }
            if let Some(failure) = self.failure.take() {
                let recovered = tokio::select! {
                    biased;
                    r = call(self.sink.recover(&failure), limit) => r,
                    _ = until_close_deadline(&self.inbox) => Call::TimedOut(limit),
                };
                if !self.succeeded(recovered) {
                    return;
                }
                self.meter.reconnected();
            }
        }
        let pinged = tokio::select! {
            biased;
            r = call(self.sink.ping(), limit) => r,
            _ = until_close_deadline(&self.inbox) => Call::TimedOut(limit),
        };
        if self.succeeded(pinged) {
            self.ready.set_for(&self.meter, true);
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

    /// Waits until `until` (or the deadline), waking early when a close is requested, or when
    /// events arrive that must fail at once ([`DriverOptions::fail_while_away`]).
    async fn pause(&mut self, until: Instant, deadline: Option<Instant>) {
        let until = deadline.map_or(until, |d| d.min(until));
        let mut cmds = Vec::new();
        let fail_new = self.options.fail_while_away.is_some() && self.failure.is_some();
        if deadline.is_some() {
            tokio::time::sleep_until(until.into()).await;
        } else {
            let inbox = &mut self.inbox;
            // Either way, a close request wakes it.
            let woken = async {
                if fail_new {
                    inbox.recv_batch(&mut cmds, 256).await;
                } else {
                    inbox.close_signal().await;
                }
            };
            tokio::select! {
                _ = tokio::time::sleep_until(until.into()) => {}
                _ = woken => {}
            }
        }
        for cmd in cmds {
            self.w.on_command(cmd);
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
    #[tracing::instrument(name = "reconnect", level = "info", skip_all, fields(attempt = self.failures + 1))]
    async fn recover(&mut self, failure: Failure, deadline: Option<Instant>) -> bool {
        let limit = self.limit(deadline);
        let recovered = tokio::select! {
            biased;
            r = call(self.sink.recover(&failure), limit) => r,
            _ = until_close_deadline(&self.inbox) => Call::TimedOut(limit),
        };
        let ok = self.succeeded(recovered);
        if ok {
            self.meter.reconnected();
        }
        ok
    }

    fn failed(&mut self, failure: Failure) {
        self.ready.set_for(&self.meter, false);
        self.stalled = false;
        let delay = self.backoff.next_delay();
        let held = self.w.held.len() + self.w.sent.len();
        self.failures = self.failures.saturating_add(1);
        tracing::warn!(held, attempt = self.failures, "{failure}; trying again in {delay:?}");
        self.meter.retried(held);
        self.failure = Some(failure);
        self.retry_at = Some(Instant::now() + delay);
        self.fail_while_away();
    }

    /// The next batch: a run of events not marked `alone`, or one that is; never more than the
    /// room left for events in flight.
    fn next_batch_len(&self) -> usize {
        let room = self.options.max_in_flight.saturating_sub(self.w.sent.len()).max(1);
        match self.w.held.front() {
            None => 0,
            Some(h) if h.alone => 1,
            Some(_) => {
                let max = self.retry_len.unwrap_or(self.options.batch_size).min(self.options.batch_size).min(room);
                self.w.held.iter().take(max).take_while(|h| !h.alone).count()
            }
        }
    }

    /// Writes the next batch and settles what it can. Returns whether the batch was partial.
    #[tracing::instrument(
        name = "write",
        level = "debug",
        skip_all,
        fields(events = tracing::field::Empty, attempt = self.failures + 1, in_flight = self.w.sent.len())
    )]
    async fn attempt(&mut self, deadline: Option<Instant>) -> bool {
        let n = self.next_batch_len();
        if n == 0 {
            return false;
        }
        tracing::Span::current().record("events", n);
        if tracing::enabled!(tracing::Level::DEBUG) {
            let ids: Vec<String> = self.w.records.iter().take(n).map(|r| r.id.to_string()).collect();
            tracing::debug!(ids = ?ids, "writing");
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
                vec![Verdict::Retry(self.io_error(why)); n]
            }
            Call::Done(Err(e)) => vec![Verdict::Retry(e); n],
            Call::TimedOut(d) => {
                self.w.requeue(records.into_iter().zip(held).collect());
                self.w.abandon_sent();
                self.retry_len = Some(n);
                self.failed(Failure::TimedOut(d));
                return false;
            }
            Call::Panicked(m) => {
                self.w.requeue(records.into_iter().zip(held).collect());
                self.die(m);
                return false;
            }
        };
        let mut again: Vec<(Record, Held)> = Vec::new();
        let mut retry_error = None;
        let mut sent_now = 0;
        let now = Instant::now();
        for ((record, mut h), verdict) in records.into_iter().zip(held).zip(verdicts) {
            match verdict {
                Verdict::Delivered(position) => h.settle.delivered(position),
                Verdict::Rejected(reason) => self.reject(&record, h.settle, reason),
                Verdict::Suspect(reason) if alone => self.reject(&record, h.settle, reason),
                Verdict::Suspect(_) => {
                    h.alone = true;
                    again.push((record, h));
                }
                Verdict::Sent => {
                    sent_now += 1;
                    self.w.sent.push_back(Sent { record, held: h, at: now });
                }
                Verdict::Retry(e) => {
                    retry_error.get_or_insert(e);
                    again.push((record, h));
                }
            }
        }
        let requeued = again.len();
        self.w.requeue(again);
        match retry_error {
            Some(e) => {
                // The attempt failed: what was in flight on the same link goes back too.
                self.w.abandon_sent();
                self.retry_len = Some(requeued);
                self.failed(Failure::Failed(e));
            }
            None => {
                self.retry_len = None;
                // A batch only sent (to be confirmed later) proves nothing yet: readiness and the
                // backoff follow its confirmations.
                if sent_now < n && !self.stalled {
                    self.ready.set_for(&self.meter, true);
                    self.backoff.reset();
                    self.failures = 0;
                }
            }
        }
        n < self.options.batch_size
    }

    /// Events in flight and no room to send: waits for the sink's confirmations, for new events
    /// when there is room, for a retry to be due, for the confirm timeout, or the close deadline.
    #[tracing::instrument(name = "confirm", level = "debug", skip_all, fields(in_flight = self.w.sent.len()))]
    async fn await_confirmations(&mut self) {
        let now = Instant::now();
        let oldest = self.w.sent.front().map_or(now, |s| s.at);
        let mut wake =
            if self.stalled { now + self.options.confirm_timeout } else { oldest + self.options.confirm_timeout };
        let room = self.w.sent.len() < self.options.max_in_flight && !self.stalled;
        // A retry due later lets an event be sent then (only if there is room to send it).
        if let Some(at) = self.retry_at.filter(|at| *at > now && room && !self.w.records.is_empty()) {
            wake = wake.min(at);
        }
        // The deadline of a close nobody asked for (every handle dropped) too.
        if let Some(d) = self.implicit_deadline {
            wake = wake.min(d.max(now));
        }
        let want_more = room && self.w.records.is_empty() && !self.inbox.is_finished();
        let mut cmds = Vec::new();
        let max = self.options.batch_size;
        let inbox = &mut self.inbox;
        // New events to send (a close request wakes it too), or the close deadline.
        let inbox_wake = async {
            if want_more {
                inbox.recv_batch(&mut cmds, max).await;
            } else {
                until_close_deadline(inbox).await;
            }
        };
        let confirmed = tokio::select! {
            biased;
            r = CatchUnwind(self.sink.confirmed()) => Some(r),
            _ = tokio::time::sleep_until(wake.into()) => None,
            _ = inbox_wake => None,
        };
        for cmd in cmds {
            self.w.on_command(cmd);
        }
        match confirmed {
            Some(Ok(Ok(verdicts))) if !verdicts.is_empty() => self.settle_confirmed(verdicts),
            Some(Ok(Ok(_))) => {
                let e = self.io_error("the sink confirmed nothing".into());
                self.w.abandon_sent();
                self.failed(Failure::Failed(e));
            }
            Some(Ok(Err(e))) => {
                self.w.abandon_sent();
                self.failed(Failure::Failed(e));
            }
            Some(Err(m)) => {
                self.w.abandon_sent();
                self.die(m);
            }
            None => {
                let waited = self.w.sent.front().map(|s| s.at.elapsed());
                if !self.stalled && waited.is_some_and(|w| w >= self.options.confirm_timeout) {
                    self.stalled = true;
                    self.ready.set_for(&self.meter, false);
                    tracing::warn!(
                        in_flight = self.w.sent.len(),
                        "no confirmation for {:?}: the service may be blocking publishers; new events wait",
                        self.options.confirm_timeout
                    );
                }
            }
        }
    }

    /// Settles the oldest events in flight with the sink's confirmations.
    fn settle_confirmed(&mut self, verdicts: Vec<Verdict>) {
        if self.stalled {
            self.stalled = false;
            tracing::info!("confirmations again");
        }
        let mut retry = None;
        let mut again = Vec::new();
        let mut delivered = false;
        for verdict in verdicts {
            let Some(Sent { record, held, .. }) = self.w.sent.pop_front() else {
                tracing::warn!("the sink confirmed more events than were in flight");
                break;
            };
            match verdict {
                Verdict::Delivered(position) => {
                    delivered = true;
                    held.settle.delivered(position);
                }
                Verdict::Rejected(reason) | Verdict::Suspect(reason) => self.reject(&record, held.settle, reason),
                Verdict::Retry(e) => {
                    // Refused for now (e.g. a full queue): sent again after a backoff. Events
                    // sent after it may land first.
                    retry.get_or_insert(e);
                    again.push((record, held));
                }
                Verdict::Sent => {
                    retry.get_or_insert(self.io_error("the sink confirmed an event as Sent".into()));
                    again.push((record, held));
                }
            }
        }
        self.w.requeue(again);
        match retry {
            Some(e) => {
                let delay = self.backoff.next_delay();
                tracing::warn!("{e}; sending it again in {delay:?}");
                self.ready.set_for(&self.meter, false);
                self.retry_at = Some(Instant::now() + delay);
            }
            None if delivered => {
                self.ready.set_for(&self.meter, true);
                self.backoff.reset();
                self.failures = 0;
            }
            None => {}
        }
    }

    fn io_error(&self, reason: String) -> Error {
        Error::Io { backend: self.backend, operation: "writing".into(), reason, cause: None }
    }

    fn reject(&self, record: &Record, settle: Settle, reason: String) {
        let event_id = record.id.to_string();
        settle.settle(Err(Error::Rejected { backend: self.backend, event_id, reason }));
    }

    /// The sink panicked: stop writing; everything held now or accepted later fails at once and is
    /// listed in the close report.
    fn die(&mut self, message: String) {
        tracing::error!("the writer panicked: {message}; its events are reported undelivered");
        self.ready.set_for(&self.meter, false);
        self.dead = Some(message);
        self.give_up_held();
    }

    fn dead_error(&self) -> Error {
        let why = self.dead.clone().unwrap_or_default();
        self.io_error(format!("the writer panicked: {why}"))
    }

    /// Fails every held event into the close report, in order: a timeout at the close deadline,
    /// or the panic of a dead sink.
    fn give_up_held(&mut self) {
        let error = if self.dead.is_some() { self.dead_error() } else { Error::Timeout(self.close_timeout) };
        self.w.give_up(&error, &mut self.undelivered);
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
    #[tracing::instrument(name = "close", level = "info", skip_all, fields(undelivered = tracing::field::Empty))]
    async fn finish(mut self) {
        self.give_up_held();
        let reply = pipeline::drain_undelivered(&mut self.inbox, self.close_timeout, &mut self.undelivered);
        for (_, tx) in self.w.flushes.drain(..) {
            let _ = tx.send(());
        }
        self.ready.set_for(&self.meter, false);
        if self.dead.is_none() {
            let _ = call(self.sink.close(), Duration::from_secs(1)).await;
        }
        self.meter.undelivered(self.undelivered.len());
        tracing::Span::current().record("undelivered", self.undelivered.len());
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
