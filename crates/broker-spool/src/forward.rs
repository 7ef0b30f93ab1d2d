//! The spool's forwarder: publishes spooled events to the backend in sequence order, in batches
//! the backend takes all or nothing, settles each caller's receipt with the backend's outcome,
//! and tells the writer which sequences are confirmed.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use broker_core::backoff::Backoff;
use broker_core::{Backend, BatchReceipt, CloseReport, Error, EventBroker, Outcome, Settle};
use tokio::sync::{mpsc, oneshot};

use crate::queue::Queue;
use crate::spooled::{Forward, NAME, Shared};
use crate::writer::Cmd;

/// Events the forwarder has at the backend, unconfirmed, at most.
const WINDOW: usize = 8_192;

/// Events in one publish to the backend, at most (fewer when its `atomic_batch` is smaller).
const BATCH: usize = 2_048;

/// The longest one publish to the backend may wait for room before the forwarder looks at its
/// other work (outcomes, the close deadline) again.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(1);

/// Events the forwarder holds in memory, waiting to be sent, at most; those spooled beyond are
/// read back from the log when their turn comes.
pub(crate) const IN_MEMORY: usize = 65_536;

/// The longest one connect of the backend may take before the forwarder tries again.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// The longest the backend's readiness may take to say.
const READY_TIMEOUT: Duration = Duration::from_millis(200);

/// The spool's metrics (and the backend's readiness) are recorded at least this often.
const RECORD_EVERY: Duration = Duration::from_secs(1);

/// Acknowledged sequences are written to the log at most this often.
const ACK_EVERY: Duration = Duration::from_millis(100);

/// Publishes spooled events to the backend, in order, and settles their receipts.
pub(crate) struct Forwarder {
    inner: Arc<dyn Backend>,
    shared: Arc<Shared>,
    cmd: mpsc::Sender<Cmd>,
    /// Spooled, not sent yet (or to be sent again), in order.
    queue: Queue,
    /// Sent, with the backend's receipt, in order.
    inflight: VecDeque<(Vec<Forward>, BatchReceipt)>,
    /// Events in `inflight`.
    inflight_events: usize,
    /// The first sequence not confirmed, when it moved since the log was told.
    acked: Option<u64>,
    /// What a previous process left, not queued yet: it goes before everything in `queue`
    /// that is not lower.
    replay: std::ops::Range<u64>,
}

/// Why the sending stopped.
enum Sent {
    /// The window is full or the queue is empty, or the backend has no room now.
    Waiting,
    /// The connection is no good: connect again.
    Reconnect,
}

impl Forwarder {
    pub(crate) fn new(
        inner: Arc<dyn Backend>,
        shared: Arc<Shared>,
        cmd: mpsc::Sender<Cmd>,
        replay: std::ops::Range<u64>,
    ) -> Forwarder {
        Forwarder {
            inner,
            shared,
            cmd,
            queue: Queue::default(),
            inflight: VecDeque::new(),
            inflight_events: 0,
            acked: None,
            replay,
        }
    }

    /// Takes in what the writer spooled; beyond [`IN_MEMORY`] waiting, only its place is kept.
    fn take_in(&mut self, mut spooled: Vec<Forward>) {
        let room = IN_MEMORY.saturating_sub(self.queue.len());
        for f in spooled.iter_mut().skip(room) {
            f.body = None;
        }
        self.queue.push_back(spooled);
    }

    pub(crate) async fn run(
        mut self,
        mut rx: mpsc::UnboundedReceiver<Vec<Forward>>,
        mut close: oneshot::Receiver<Duration>,
    ) -> CloseReport {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
        let mut broker: Option<Box<dyn EventBroker>> = None;
        let mut deadline: Option<Instant> = None;
        let mut last_ack = Instant::now();
        let mut input_open = true;
        let mut recorded = Instant::now();
        loop {
            // The metrics' ages move while nothing else does; readiness is the backend's.
            if recorded.elapsed() >= RECORD_EVERY {
                self.shared.record();
                if let Some(b) = broker.as_deref() {
                    let ready = tokio::time::timeout(READY_TIMEOUT, b.is_ready()).await.unwrap_or(false);
                    self.shared.connected.store(ready, Ordering::Relaxed);
                }
                recorded = Instant::now();
            }
            // Everything the writer handed over is in the queue before anything is decided.
            while input_open {
                match rx.try_recv() {
                    Ok(f) => self.take_in(f),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => input_open = false,
                }
            }
            // Connected, or trying to be.
            if broker.is_none() {
                let connect = tokio::time::timeout(CONNECT_TIMEOUT, self.inner.connect());
                match connect.await.unwrap_or(Err(Error::Timeout(CONNECT_TIMEOUT))) {
                    Ok(b) => {
                        broker = Some(b);
                        self.shared.connected.store(true, Ordering::Relaxed);
                        backoff.reset();
                    }
                    Err(e) => {
                        self.shared.connected.store(false, Ordering::Relaxed);
                        let delay = backoff.next_delay();
                        tracing::warn!("spool: {e}; connecting again in {delay:.1?} (events wait in the spool)");
                        if self.wait(delay, &mut rx, &mut close, &mut deadline, &mut input_open).await {
                            break;
                        }
                        continue;
                    }
                }
            }
            let Some(b) = broker.as_deref() else { continue };
            if let Sent::Reconnect = self.send(b).await {
                self.shared.connected.store(false, Ordering::Relaxed);
                self.requeue_inflight(None);
                if let Some(old) = broker.take() {
                    let _ = tokio::time::timeout(PUBLISH_TIMEOUT, old.close()).await;
                }
                let delay = backoff.next_delay();
                if self.wait(delay, &mut rx, &mut close, &mut deadline, &mut input_open).await {
                    break;
                }
                continue;
            }
            if self.acked.is_some() && last_ack.elapsed() >= ACK_EVERY {
                self.flush_ack().await;
                last_ack = Instant::now();
            }
            if deadline.is_some() && self.queue.is_empty() && self.inflight.is_empty() && self.replay.is_empty() {
                break;
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                break;
            }
            let until =
                deadline.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600)).min(recorded + RECORD_EVERY);
            let room = self.inflight_events < WINDOW && !(self.queue.is_empty() && self.replay.is_empty());
            tokio::select! {
                biased;
                t = &mut close, if deadline.is_none() => {
                    deadline = Some(Instant::now() + t.unwrap_or_default());
                }
                f = rx.recv(), if input_open => match f {
                    Some(f) => self.take_in(f),
                    None => input_open = false,
                },
                outcomes = async {
                    match self.inflight.front_mut() {
                        Some((_, receipt)) => receipt.await,
                        None => std::future::pending().await,
                    }
                } => {
                    let Some((batch, _)) = self.inflight.pop_front() else { continue };
                    self.inflight_events -= batch.len();
                    if !self.settle(batch, outcomes) {
                        // The backend gave up on one: from it on, everything is sent again, in
                        // order, on a new connection.
                        self.shared.connected.store(false, Ordering::Relaxed);
                        if let Some(old) = broker.take() {
                            let _ = tokio::time::timeout(PUBLISH_TIMEOUT, old.close()).await;
                        }
                        let delay = backoff.next_delay();
                        if self.wait(delay, &mut rx, &mut close, &mut deadline, &mut input_open).await {
                            break;
                        }
                    }
                }
                // The backend had no room: look again soon.
                _ = tokio::time::sleep(Duration::from_millis(5)), if room => {}
                _ = tokio::time::sleep_until(until.into()) => {}
                _ = tokio::time::sleep(ACK_EVERY), if self.acked.is_some() => {}
            }
        }
        self.finish(broker, rx).await
    }

    /// Publishes from the queue while the window has room.
    async fn send(&mut self, b: &dyn EventBroker) -> Sent {
        let atomic = b.atomic_batch().clamp(1, BATCH);
        while self.inflight_events < WINDOW {
            let max = atomic.min(WINDOW - self.inflight_events);
            self.next_replayed(max);
            let Some(front) = self.queue.front() else { break };
            if front.body.is_none() {
                if let Err(e) = self.read_back(max).await {
                    tracing::warn!("spool: reading spooled events back failed ({e}); trying again");
                    return Sent::Waiting;
                }
                continue;
            }
            let options = front.body.as_ref().map(|(_, o)| o.clone()).unwrap_or_default();
            // One publish holds events with the same options, as many as the backend takes
            // all or nothing (so a timeout below accepted none of them).
            let n = self.queue.batch_len(max, |f| f.body.as_ref().is_some_and(|(_, o)| Arc::ptr_eq(o, &options)));
            let mut batch = self.queue.take(n);
            // The events move to the backend; what must be sent again is read back from the log.
            let events = batch.iter_mut().filter_map(|f| f.body.take().map(|(e, _)| e)).collect();
            // Bounded: a backend whose buffer is full and whose service is down would hold the
            // forwarder (and close) here for ever.
            let published =
                match tokio::time::timeout(PUBLISH_TIMEOUT, b.publish_batch(events, (*options).clone())).await {
                    Ok(p) => p,
                    Err(_) => {
                        // Cancelled, so none of them was accepted.
                        self.requeue_front(batch);
                        return Sent::Waiting;
                    }
                };
            let accepted = published.receipt.len().min(batch.len());
            let mut rest = batch.split_off(accepted);
            if !batch.is_empty() {
                self.inflight_events += batch.len();
                self.inflight.push_back((batch, published.receipt));
            }
            let Some(refused) = published.refused else { continue };
            // The events handed back are the bodies of `rest`, in order.
            for (f, e) in rest.iter_mut().zip(refused.events) {
                f.body = Some((e, options.clone()));
            }
            let mut rest = rest.into_iter();
            match refused.error {
                e @ Error::Rejected { .. } => {
                    // The first one not accepted is refused for its own fault: said at once.
                    if let Some(f) = rest.next() {
                        let seq = f.seq;
                        settle_rejected(f, e);
                        self.requeue_front(rest.collect());
                        self.confirmed(seq);
                    }
                }
                Error::BufferFull { .. } => {
                    self.requeue_front(rest.collect());
                    return Sent::Waiting;
                }
                e => {
                    tracing::warn!("spool: the backend refused a publish ({e}); connecting again");
                    self.requeue_front(rest.collect());
                    return Sent::Reconnect;
                }
            }
        }
        Sent::Waiting
    }

    /// Queues the next `max` sequences a previous process left, when they come before
    /// everything queued.
    fn next_replayed(&mut self, max: usize) {
        if self.replay.is_empty() || self.queue.front().is_some_and(|f| f.seq < self.replay.start) {
            return;
        }
        let end = self.replay.end.min(self.replay.start + max as u64);
        self.queue.push_front((self.replay.start..end).map(|seq| Forward { seq, body: None, settle: None }).collect());
        self.replay.start = end;
    }

    /// Reads back from the log the events at the front of the queue that are not in memory,
    /// up to `max`. A sequence the log does not have (or not as an event) is lost to corruption:
    /// said, and confirmed so that it does not hold the rest back.
    async fn read_back(&mut self, max: usize) -> Result<(), Error> {
        let Some(from) = self.queue.front().map(|f| f.seq) else { return Ok(()) };
        let (reply, read) = oneshot::channel();
        self.cmd.send(Cmd::Read { from, max, reply }).await.map_err(|_| Error::Closed)?;
        let records = read.await.map_err(|_| Error::Closed)?.map_err(crate::spooled::spool_error)?;
        let last = records.last().map_or(from, |r| r.seq);
        let mut records = records.into_iter().peekable();
        let mut options: Option<Arc<broker_core::PublishOptions>> = None;
        let mut lost = Vec::new();
        for (i, f) in self.queue.iter_mut().enumerate() {
            if f.seq > last || i >= max {
                break;
            }
            if f.body.is_some() {
                continue;
            }
            while records.next_if(|r| r.seq < f.seq).is_some() {}
            let decoded = records.next_if(|r| r.seq == f.seq).and_then(|r| crate::record::decode(&r.payload));
            match decoded {
                Some((event, o)) => {
                    let shared = match &options {
                        Some(last) if **last == o => last.clone(),
                        _ => Arc::new(o),
                    };
                    options = Some(shared.clone());
                    f.body = Some((event, shared));
                }
                None => lost.push(f.seq),
            }
        }
        if lost.is_empty() && self.queue.front().is_some_and(|f| f.body.is_none()) {
            // Not even the first one is in the log.
            lost.extend(self.queue.front().map(|f| f.seq));
        }
        if !lost.is_empty() {
            tracing::error!(
                "spool: {} spooled event(s) from sequence {} are not in the log (corrupt or removed): lost",
                lost.len(),
                lost[0]
            );
            for f in self.queue.remove(&lost) {
                if let Some(s) = f.settle {
                    s.settle(Err(Error::Io {
                        backend: NAME,
                        operation: "reading back".into(),
                        reason: format!("spooled event {} is no longer in the spool (corrupt or removed)", f.seq),
                        cause: None,
                    }));
                }
            }
            if let Some(seq) = lost.last() {
                self.confirmed(*seq);
            }
        }
        Ok(())
    }

    /// Settles one batch's outcomes in order; false when the backend gave up on one of them
    /// (it, the rest and everything in flight are then queued again).
    fn settle(&mut self, batch: Vec<Forward>, outcomes: Vec<Outcome>) -> bool {
        let mut outcomes = outcomes.into_iter();
        let replayed = batch.iter().filter(|f| f.settle.is_none()).count();
        let mut batch = batch.into_iter();
        let mut last = None;
        // The callers' receipts are told together (one lock per batch of theirs).
        let mut delivered = Vec::with_capacity(batch.len());
        while let Some(f) = batch.next() {
            let outcome = outcomes.next().unwrap_or_else(|| {
                Err(Error::Unavailable { backend: NAME, reason: "no outcome from the backend".into(), cause: None })
            });
            match outcome {
                Ok(d) => {
                    last = Some(f.seq);
                    if let Some(s) = f.settle {
                        delivered.push((s, Ok(d)));
                    }
                }
                // Its own fault: sending it again would fail again.
                Err(e @ Error::Rejected { .. }) => {
                    last = Some(f.seq);
                    settle_rejected(f, e);
                }
                Err(e) => {
                    Settle::settle_all(delivered);
                    tracing::warn!("spool: not delivered ({e}); sending again from event {}", f.seq);
                    let again: Vec<Forward> = std::iter::once(f).chain(batch).collect();
                    let not_sent = again.iter().filter(|f| f.settle.is_none()).count();
                    self.shared.meter.replayed((replayed - not_sent.min(replayed)) as u64);
                    self.requeue_inflight(Some(again));
                    if let Some(seq) = last {
                        self.confirmed(seq);
                    }
                    return false;
                }
            }
        }
        Settle::settle_all(delivered);
        if let Some(seq) = last {
            self.confirmed(seq);
        }
        self.shared.meter.replayed(replayed as u64);
        true
    }

    /// Puts `batch` back at the front of the queue.
    fn requeue_front(&mut self, batch: Vec<Forward>) {
        self.queue.push_front(batch);
    }

    /// Puts `first` (what was left of the batch being settled) and everything in flight back at
    /// the front of the queue, in order.
    fn requeue_inflight(&mut self, first: Option<Vec<Forward>>) {
        for (batch, _) in self.inflight.drain(..).rev() {
            self.queue.push_front(batch);
        }
        self.queue.push_front(first.unwrap_or_default());
        self.inflight_events = 0;
    }

    /// `seq` is settled: the log may forget everything before the lowest sequence still out.
    fn confirmed(&mut self, seq: u64) {
        let replay = (!self.replay.is_empty()).then_some(self.replay.start);
        let out = [
            self.inflight.front().and_then(|(b, _)| b.first()).map(|f| f.seq),
            self.queue.front().map(|f| f.seq),
            replay,
        ]
        .into_iter()
        .flatten()
        .min();
        let upto = out.unwrap_or(seq + 1);
        if self.acked.is_none_or(|a| upto > a) {
            self.acked = Some(upto);
        }
    }

    /// Sleeps `delay` while taking in new events and a close request; true once the close
    /// deadline has passed.
    async fn wait(
        &mut self,
        delay: Duration,
        rx: &mut mpsc::UnboundedReceiver<Vec<Forward>>,
        close: &mut oneshot::Receiver<Duration>,
        deadline: &mut Option<Instant>,
        input_open: &mut bool,
    ) -> bool {
        let until = Instant::now() + delay;
        loop {
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return true;
            }
            let wake = deadline.map_or(until, |d| d.min(until));
            if Instant::now() >= until {
                return false;
            }
            tokio::select! {
                biased;
                t = &mut *close, if deadline.is_none() => *deadline = Some(Instant::now() + t.unwrap_or_default()),
                f = rx.recv(), if *input_open => match f {
                    Some(f) => self.take_in(f),
                    None => *input_open = false,
                },
                _ = tokio::time::sleep_until(wake.into()) => {}
            }
        }
    }

    async fn flush_ack(&mut self) {
        if let Some(upto) = self.acked.take() {
            let _ = self.cmd.send(Cmd::Ack(upto)).await;
        }
    }

    /// After the close deadline: the backend is closed (delivering what it can), what it
    /// confirmed in order is acknowledged, the writer is stopped, and the rest stays in the
    /// spool, its receipts saying so.
    async fn finish(
        mut self,
        broker: Option<Box<dyn EventBroker>>,
        mut rx: mpsc::UnboundedReceiver<Vec<Forward>>,
    ) -> CloseReport {
        if let Some(b) = broker {
            // Its own deadline, and a grace for its last attempt.
            let _ = tokio::time::timeout(self.inner.close_timeout() + Duration::from_secs(2), b.close()).await;
        }
        // What the close delivered is confirmed, up to the first event without a good outcome.
        let mut kept: Vec<Forward> = Vec::new();
        let mut last = None;
        for (batch, mut receipt) in std::mem::take(&mut self.inflight) {
            let mut known = receipt.settled_so_far().into_iter();
            for f in batch {
                let outcome = if kept.is_empty() { known.next().flatten() } else { None };
                match outcome {
                    Some(o @ (Ok(_) | Err(Error::Rejected { .. }))) => {
                        last = Some(f.seq);
                        if let Some(s) = f.settle {
                            s.settle(o);
                        }
                    }
                    _ => kept.push(f),
                }
            }
        }
        self.inflight_events = 0;
        self.queue.push_front(kept);
        if let Some(seq) = last {
            self.confirmed(seq);
        }
        self.flush_ack().await;
        // The writer syncs and stops; what it handed over meanwhile is in the spool too.
        let (tx, closed) = oneshot::channel();
        if self.cmd.send(Cmd::Close(tx)).await.is_ok() {
            let _ = closed.await;
        }
        while let Some(late) = rx.recv().await {
            self.queue.push_back(late);
        }
        let left = self.queue.len() as u64 + (self.replay.end - self.replay.start);
        for f in self.queue.take_all() {
            if let Some(s) = f.settle {
                s.settle(Err(Error::Spooled { backend: NAME }));
            }
        }
        CloseReport::default().with_spooled(left)
    }
}

/// Settles an event the backend rejected for its own fault; one a previous process spooled has
/// no caller to tell, so it is logged.
fn settle_rejected(f: Forward, e: Error) {
    match f.settle {
        Some(s) => s.settle(Err(e)),
        None => tracing::error!("spool: replayed event {} rejected by the backend and dropped: {e}", f.seq),
    }
}
