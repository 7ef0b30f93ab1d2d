//! [`SpooledBackend`]: any [`Backend`] behind the disk spool.
//!
//! `publish` encodes the event (id, headers, bytes) into a record, hands it to the spool's writer
//! thread and returns once the record is in the log (with `fsync: batch`, once it is on disk:
//! the thread appends what is waiting and syncs once for all of it, a group commit). The writer
//! passes each spooled event, in sequence order, to the forwarder task, which publishes it to the
//! backend and settles the caller's receipt with the backend's outcome: delivered, or rejected
//! as the event's own fault. Any other failure (the backend gave up, its connection is gone)
//! sends the event again, in order, after a backoff: a spooled event is never reported lost.
//! Confirmed sequences are acknowledged to the log in order, which deletes whole segments.
//!
//! On connect, what a previous process left in the spool is replayed first, in order. The
//! backend's own connect may fail (the service is down at start): publishing works anyway, and
//! the forwarder keeps trying to connect.
//!
//! `close` stops accepting, forwards within the backend's `close_timeout`, closes the backend,
//! and reports in [`CloseReport::spooled`] how many events are still in the spool (their
//! receipts fail with [`Error::Spooled`]): they go out at the next start.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use broker_core::backoff::Backoff;
use broker_core::{
    Backend, BatchPublished, BatchReceipt, CloseReport, Error, Event, EventBroker, EventId, EventSource,
    PublishOptions, Receipt, Refused, Settle, SourceOptions, WhenFull, async_trait,
};
use tokio::sync::{Notify, mpsc, oneshot};

use crate::log::{LogError, Record, SpoolLog};

/// When an event counts as spooled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Fsync {
    /// After `fdatasync` of the segment (one for all the events written together).
    #[default]
    Batch,
    /// Once written to the file (the kernel's cache): survives a process crash, not a power cut.
    Never,
}

/// The `spool:` settings.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct SpoolConfig {
    /// The spool directory (one process at a time).
    pub path: PathBuf,
    /// The most bytes the segments may hold; then `when_full` applies.
    pub max_bytes: u64,
    /// What a publish does when the spool is full: wait for room (`Block`) or fail at once.
    pub when_full: WhenFull,
    /// When an event counts as spooled.
    pub fsync: Fsync,
    /// The size at which a new segment starts.
    pub segment_bytes: u64,
}

impl SpoolConfig {
    /// A spool in `path` with the defaults: 1 GiB, block when full, fsync per batch, 64 MiB
    /// segments.
    pub fn new(path: impl Into<PathBuf>) -> SpoolConfig {
        SpoolConfig {
            path: path.into(),
            max_bytes: 1 << 30,
            when_full: WhenFull::Block,
            fsync: Fsync::Batch,
            segment_bytes: 64 << 20,
        }
    }
}

impl SpoolConfig {
    /// The keys of a `spool:` mapping.
    pub const KEYS: &'static [&'static str] = &["path", "max_bytes", "when_full", "fsync", "segment_bytes"];

    /// Reads a `spool:` mapping (`path` required; `max_bytes`, `when_full`: block | error,
    /// `fsync`: batch | never, `segment_bytes`), strictly: an unknown key is an error naming it.
    pub fn from_options(mut options: broker_core::Options) -> Result<SpoolConfig, broker_core::ConfigError> {
        let Some(path) = options.take_str("path")? else {
            return Err(broker_core::ConfigError::new(options.section.clone(), Some("spool.path"), "is required")
                .with_hint("a directory for this process's spool, e.g. /var/lib/rasa/spool"));
        };
        let mut config = SpoolConfig::new(path);
        if let Some(n) = options.take_u64("max_bytes")? {
            if n < 1 << 16 {
                return Err(broker_core::ConfigError::new(
                    options.location("max_bytes"),
                    Some("spool.max_bytes"),
                    format!("{n} is too small"),
                )
                .with_hint("at least 65536 bytes"));
            }
            config.max_bytes = n;
        }
        if let Some(w) = options.take_choice("when_full", &["block", "error"])? {
            config.when_full = if w == "error" { WhenFull::Error } else { WhenFull::Block };
        }
        if let Some(f) = options.take_choice("fsync", &["batch", "never"])? {
            config.fsync = if f == "never" { Fsync::Never } else { Fsync::Batch };
        }
        if let Some(n) = options.take_u64("segment_bytes")? {
            config.segment_bytes = n.max(4096);
        }
        // Several segments fit in the spool, so confirmed ones can always be deleted.
        config.segment_bytes = config.segment_bytes.min(config.max_bytes / 4).max(4096);
        options.finish_for("spool", Self::KEYS)?;
        Ok(config)
    }
}

/// The backend name this layer reports errors under.
const NAME: &str = "spool";

/// Events the forwarder has at the backend, unconfirmed, at most.
const WINDOW: usize = 4_096;

/// The longest one publish to the backend may wait for room before the forwarder looks at its
/// other work (outcomes, the close deadline) again.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(1);

/// Acknowledged sequences are written to the log at most this often.
const ACK_EVERY: Duration = Duration::from_millis(100);

fn spool_error(e: LogError) -> Error {
    let temporary = e.is_temporary();
    let reason = e.to_string();
    if temporary {
        Error::Unavailable { backend: NAME, reason, cause: Some(Arc::new(e)) }
    } else {
        Error::Config(broker_core::ConfigError::new(Default::default(), Some("spool"), reason))
    }
}

/// An event's record: `id: u128 LE`, `headers: u16 LE` count, each `name` (u16 length + bytes)
/// and `value` (u32 length + bytes), then the event's bytes.
pub(crate) fn encode(event: &Event, options: &PublishOptions) -> Vec<u8> {
    let mut out = Vec::with_capacity(512);
    out.extend_from_slice(&event.id().as_u128().to_le_bytes());
    let headers = &options.headers[..options.headers.len().min(u16::MAX as usize)];
    out.extend_from_slice(&(headers.len() as u16).to_le_bytes());
    for (name, value) in headers {
        let name = &name.as_bytes()[..name.len().min(u16::MAX as usize)];
        out.extend_from_slice(&(name.len() as u16).to_le_bytes());
        out.extend_from_slice(name);
        let value = &value.as_bytes()[..value.len().min(u32::MAX as usize)];
        out.extend_from_slice(&(value.len() as u32).to_le_bytes());
        out.extend_from_slice(value);
    }
    event.write_json(&mut out);
    out
}

/// The event and options of a record; `None` when it is not one (it is then dropped, said).
pub(crate) fn decode(payload: &[u8]) -> Option<(Event, PublishOptions)> {
    let mut at = 0usize;
    let mut take = |n: usize| {
        let slice = payload.get(at..at + n)?;
        at += n;
        Some(slice)
    };
    let id = u128::from_le_bytes(take(16)?.try_into().ok()?);
    let count = u16::from_le_bytes(take(2)?.try_into().ok()?);
    let mut options = PublishOptions::default();
    for _ in 0..count {
        let n = u16::from_le_bytes(take(2)?.try_into().ok()?) as usize;
        let name = String::from_utf8(take(n)?.to_vec()).ok()?;
        let v = u32::from_le_bytes(take(4)?.try_into().ok()?) as usize;
        let value = String::from_utf8(take(v)?.to_vec()).ok()?;
        options = options.header(name, value);
    }
    let event = Event::from_json(payload.get(at..)?).ok()?.with_id(EventId::from_u128(id));
    Some((event, options))
}

/// One event on its way: spooled as `seq`, the caller's settle when it was published by this
/// process.
struct Forward {
    seq: u64,
    event: Event,
    options: PublishOptions,
    settle: Option<Settle>,
}

/// One event to append.
struct Item {
    payload: Vec<u8>,
    event: Event,
    options: PublishOptions,
    settle: Settle,
}

/// The writer's answer to an append: all spooled, or why not, with the events that were not
/// (the last ones) handed back.
type Appended = Result<(), (Error, Vec<Event>)>;

/// One append request as the writer handled it: the events appended (with their sequences),
/// why the rest were not, and where the answer goes.
type Request = (Vec<(u64, Item)>, Option<(Error, Vec<Event>)>, oneshot::Sender<Appended>);

/// What the writer thread is asked.
enum Cmd {
    Append { items: Vec<Item>, reply: oneshot::Sender<Appended> },
    Ack(u64),
    Close(oneshot::Sender<()>),
}

/// Counters the broker reads without asking the thread.
#[derive(Default)]
struct Shared {
    bytes: AtomicU64,
    pending: AtomicU64,
    closed: AtomicBool,
    connected: AtomicBool,
    /// Woken when bytes were freed (a blocked publish looks again).
    room: Notify,
}

/// [`Backend`] `inner` behind a disk spool.
#[derive(Debug)]
pub struct SpooledBackend {
    inner: Arc<dyn Backend>,
    config: SpoolConfig,
}

impl SpooledBackend {
    /// `inner` behind the spool `config` describes.
    pub fn new(inner: Box<dyn Backend>, config: SpoolConfig) -> SpooledBackend {
        SpooledBackend { inner: Arc::from(inner), config }
    }
}

#[async_trait]
impl Backend for SpooledBackend {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn describe(&self) -> String {
        format!("{} (spool {})", self.inner.describe(), self.config.path.display())
    }

    fn close_timeout(&self) -> Duration {
        self.inner.close_timeout()
    }

    async fn connect(&self) -> Result<Box<dyn EventBroker>, Error> {
        let config = self.config.clone();
        let opened =
            tokio::task::spawn_blocking(move || SpoolLog::open(&config.path, config.segment_bytes)).await.map_err(
                |e| Error::Unavailable { backend: NAME, reason: format!("opening the spool: {e}"), cause: None },
            )?;
        let (mut log, recovery) = opened.map_err(spool_error)?;
        if recovery.torn_records > 0 {
            tracing::warn!(
                "spool {}: {} torn record(s) cut ({} bytes): a crash mid-write; the events before them are kept",
                self.config.path.display(),
                recovery.torn_records,
                recovery.torn_bytes
            );
        }
        let replay: Vec<Record> = log.pending().map_err(spool_error)?;
        let shared = Arc::new(Shared::default());
        shared.bytes.store(log.bytes(), Ordering::Relaxed);
        shared.pending.store(log.pending_events(), Ordering::Relaxed);
        let (forward_tx, forward_rx) = mpsc::unbounded_channel::<Forward>();
        let mut replayed = 0u64;
        for record in replay {
            match decode(&record.payload) {
                Some((event, options)) => {
                    replayed += 1;
                    let _ = forward_tx.send(Forward { seq: record.seq, event, options, settle: None });
                }
                None => tracing::warn!("spool: record {} is not an event; dropped", record.seq),
            }
        }
        if replayed > 0 {
            tracing::info!("spool {}: replaying {replayed} events a previous process left", self.config.path.display());
        }
        let (cmd_tx, cmd_rx) = mpsc::channel::<Cmd>(1024);
        let writer_shared = shared.clone();
        let fsync = self.config.fsync;
        std::thread::Builder::new()
            .name("spool-writer".into())
            .spawn(move || writer(log, cmd_rx, forward_tx, writer_shared, fsync))
            .map_err(|e| Error::Unavailable {
                backend: NAME,
                reason: format!("starting the spool writer: {e}"),
                cause: None,
            })?;
        let (close_tx, close_rx) = oneshot::channel();
        let forwarder = Forwarder {
            inner: self.inner.clone(),
            shared: shared.clone(),
            cmd: cmd_tx.clone(),
            queue: VecDeque::new(),
            inflight: VecDeque::new(),
            acked: None,
        };
        let done = tokio::spawn(forwarder.run(forward_rx, close_rx));
        Ok(Box::new(SpooledBroker {
            backend: self.inner.name(),
            config: self.config.clone(),
            shared,
            cmd: cmd_tx,
            close: Mutex::new(Some((close_tx, done))),
            close_timeout: self.inner.close_timeout(),
            left: Mutex::new(0),
        }))
    }

    async fn source(&self, options: &SourceOptions) -> Result<Box<dyn EventSource>, Error> {
        self.inner.source(options).await
    }

    async fn server_version(&self) -> Result<Option<String>, Error> {
        self.inner.server_version().await
    }
}

/// The writer thread: appends, syncs (group commit), hands spooled events to the forwarder in
/// order, and records acknowledgements.
fn writer(
    mut log: SpoolLog,
    mut rx: mpsc::Receiver<Cmd>,
    forward: mpsc::UnboundedSender<Forward>,
    shared: Arc<Shared>,
    fsync: Fsync,
) {
    while let Some(first) = rx.blocking_recv() {
        let mut batch = vec![first];
        while batch.len() < 4096 {
            match rx.try_recv() {
                Ok(cmd) => batch.push(cmd),
                Err(_) => break,
            }
        }
        // Per request: the events appended (with their sequences) and the reply.
        let mut requests: Vec<Request> = Vec::new();
        let mut failed: Option<String> = None;
        let mut close = None;
        for cmd in batch {
            match cmd {
                Cmd::Append { items, reply } => {
                    let mut done = Vec::with_capacity(items.len());
                    let mut error: Option<(Error, Vec<Event>)> = None;
                    let mut items = items.into_iter();
                    for item in items.by_ref() {
                        if let Some(why) = &failed {
                            let e = Error::Unavailable { backend: NAME, reason: why.clone(), cause: None };
                            error = Some((e, vec![item.event]));
                            break;
                        }
                        match log.append(&item.payload) {
                            Ok(seq) => done.push((seq, item)),
                            Err(e) => {
                                failed = Some(e.to_string());
                                error = Some((spool_error(e), vec![item.event]));
                                break;
                            }
                        }
                    }
                    if let Some((_, back)) = error.as_mut() {
                        back.extend(items.map(|i| i.event));
                    }
                    requests.push((done, error, reply));
                }
                Cmd::Ack(upto) => {
                    if let Err(e) = log.ack(upto) {
                        tracing::warn!("spool: recording confirmed events failed (they may be sent again): {e}");
                    }
                }
                Cmd::Close(reply) => close = Some(reply),
            }
        }
        let synced = match fsync {
            Fsync::Batch => log.sync(),
            Fsync::Never => log.flush(),
        };
        for (done, error, reply) in requests {
            match &synced {
                Ok(()) => {
                    for (seq, item) in done {
                        // The forwarder first, so it sees events in sequence order.
                        let Item { event, options, settle, .. } = item;
                        let _ = forward.send(Forward { seq, event, options, settle: Some(settle) });
                    }
                    let _ = reply.send(match error {
                        None => Ok(()),
                        Some(e) => Err(e),
                    });
                }
                Err(e) => {
                    // Written but maybe not durable: the events stay in the log (replayed by the
                    // next process if they made it to disk), the callers are told they were not
                    // spooled and get them back.
                    let why = format!("syncing the spool: {e}");
                    let mut back: Vec<Event> = done.into_iter().map(|(_, i)| i.event).collect();
                    if let Some((_, rest)) = error {
                        back.extend(rest);
                    }
                    let _ = reply.send(Err((Error::Unavailable { backend: NAME, reason: why, cause: None }, back)));
                }
            }
        }
        shared.bytes.store(log.bytes(), Ordering::Relaxed);
        shared.pending.store(log.pending_events(), Ordering::Relaxed);
        shared.room.notify_waiters();
        if let Some(reply) = close {
            let _ = log.sync();
            drop(log); // releases the directory's lock before saying so
            let _ = reply.send(());
            return;
        }
    }
}

/// Publishes spooled events to the backend, in order, and settles their receipts.
struct Forwarder {
    inner: Arc<dyn Backend>,
    shared: Arc<Shared>,
    cmd: mpsc::Sender<Cmd>,
    /// Spooled, not sent yet (or to be sent again), in order.
    queue: VecDeque<Forward>,
    /// Sent, with the backend's receipt, in order.
    inflight: VecDeque<(Forward, Receipt)>,
    /// The first sequence not confirmed, when it moved since the log was told.
    acked: Option<u64>,
}

impl Forwarder {
    async fn run(
        mut self,
        mut rx: mpsc::UnboundedReceiver<Forward>,
        mut close: oneshot::Receiver<Duration>,
    ) -> CloseReport {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
        let mut broker: Option<Box<dyn EventBroker>> = None;
        let mut deadline: Option<Instant> = None;
        let mut last_ack = Instant::now();
        let mut input_open = true;
        loop {
            // Everything the writer handed over is in the queue before anything is decided.
            while input_open {
                match rx.try_recv() {
                    Ok(f) => self.queue.push_back(f),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => input_open = false,
                }
            }
            // Connected, or trying to be.
            if broker.is_none() {
                match self.inner.connect().await {
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
            let Some(b) = broker.as_ref() else { continue };
            // Send while there is room in the window.
            let mut reconnect = false;
            while self.inflight.len() < WINDOW {
                let Some(f) = self.queue.pop_front() else { break };
                // Bounded: a backend whose buffer is full and whose service is down would hold
                // the forwarder (and close) here for ever.
                let publish = b.publish_with(f.event.clone(), f.options.clone());
                match tokio::time::timeout(PUBLISH_TIMEOUT, publish).await {
                    Ok(Ok(receipt)) => self.inflight.push_back((f, receipt)),
                    Ok(Err(e @ Error::Rejected { .. })) => {
                        // Its own fault, said at once.
                        self.confirmed(f.seq);
                        if let Some(s) = f.settle {
                            s.settle(Err(e));
                        }
                    }
                    Ok(Err(e)) => {
                        tracing::warn!("spool: the backend refused a publish ({e}); connecting again");
                        self.queue.push_front(f);
                        reconnect = true;
                        break;
                    }
                    Err(_) => {
                        self.queue.push_front(f);
                        break;
                    }
                }
            }
            if reconnect {
                // Everything in flight is sent again on the new connection, in order.
                let mut again: VecDeque<Forward> = self.inflight.drain(..).map(|(f, _)| f).collect();
                again.append(&mut self.queue);
                self.queue = again;
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
            if deadline.is_some() && self.queue.is_empty() && self.inflight.is_empty() {
                break;
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                break;
            }
            let until = deadline.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                biased;
                t = &mut close, if deadline.is_none() => {
                    deadline = Some(Instant::now() + t.unwrap_or_default());
                }
                f = rx.recv(), if input_open => match f {
                    Some(f) => self.queue.push_back(f),
                    None => input_open = false,
                },
                outcome = async {
                    match self.inflight.front_mut() {
                        Some((_, receipt)) => receipt.await,
                        None => std::future::pending().await,
                    }
                } => {
                    let Some((f, _)) = self.inflight.pop_front() else { continue };
                    match outcome {
                        Ok(delivered) => {
                            self.confirmed(f.seq);
                            if let Some(s) = f.settle { s.settle(Ok(delivered)); }
                        }
                        Err(e @ Error::Rejected { .. }) => {
                            // Its own fault: sending it again would fail again.
                            self.confirmed(f.seq);
                            if let Some(s) = f.settle { s.settle(Err(e)); }
                        }
                        Err(e) => {
                            // The backend gave up on it: everything from here is sent again, in
                            // order, on a new connection.
                            tracing::warn!("spool: not delivered ({e}); sending again from event {}", f.seq);
                            let mut again: VecDeque<Forward> = std::iter::once(f).chain(self.inflight.drain(..).map(|(f, _)| f)).collect();
                            again.append(&mut self.queue);
                            self.queue = again;
                            if let Some(old) = broker.take() {
                                let _ = tokio::time::timeout(PUBLISH_TIMEOUT, old.close()).await;
                            }
                            let delay = backoff.next_delay();
                            if self.wait(delay, &mut rx, &mut close, &mut deadline, &mut input_open).await {
                                break;
                            }
                        }
                    }
                }
                _ = tokio::time::sleep_until(until.into()) => {}
                _ = tokio::time::sleep(ACK_EVERY), if self.acked.is_some() => {}
            }
        }
        self.flush_ack().await;
        if let Some(b) = broker.take() {
            let _ = b.close().await;
        }
        // What is left stays in the spool: its receipts say so.
        let left = self.queue.len() + self.inflight.len();
        for f in self.inflight.drain(..).map(|(f, _)| f).chain(self.queue.drain(..)) {
            if let Some(s) = f.settle {
                s.settle(Err(Error::Spooled { backend: NAME }));
            }
        }
        // And what is still arriving from the writer.
        rx.close();
        let mut late = 0;
        while let Ok(f) = rx.try_recv() {
            late += 1;
            if let Some(s) = f.settle {
                s.settle(Err(Error::Spooled { backend: NAME }));
            }
        }
        let (tx, closed) = oneshot::channel();
        if self.cmd.send(Cmd::Close(tx)).await.is_ok() {
            let _ = closed.await;
        }
        CloseReport::default().with_spooled((left + late) as u64)
    }

    /// Sleeps `delay` while taking in new events and a close request; true once the close
    /// deadline has passed.
    async fn wait(
        &mut self,
        delay: Duration,
        rx: &mut mpsc::UnboundedReceiver<Forward>,
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
                    Some(f) => self.queue.push_back(f),
                    None => *input_open = false,
                },
                _ = tokio::time::sleep_until(wake.into()) => {}
            }
        }
    }

    fn confirmed(&mut self, seq: u64) {
        // In order: the window's front is the lowest sequence out.
        let next = self.inflight.front().map_or_else(|| self.queue.front().map_or(seq + 1, |f| f.seq), |(f, _)| f.seq);
        self.acked = Some(next.max(seq + 1));
    }

    async fn flush_ack(&mut self) {
        if let Some(upto) = self.acked.take() {
            let _ = self.cmd.send(Cmd::Ack(upto)).await;
        }
    }
}

/// The broker a [`SpooledBackend`] connects.
struct SpooledBroker {
    backend: &'static str,
    config: SpoolConfig,
    shared: Arc<Shared>,
    cmd: mpsc::Sender<Cmd>,
    close: Mutex<Option<(oneshot::Sender<Duration>, tokio::task::JoinHandle<CloseReport>)>>,
    close_timeout: Duration,
    /// What the first close left in the spool.
    left: Mutex<u64>,
}

/// Bytes a record takes beyond its payload (length, checksum, sequence).
const RECORD_OVERHEAD: u64 = 16;

impl SpooledBroker {
    /// Waits for (or, with `when_full: error`, fails without) room for `bytes` more in the spool.
    async fn room_for(&self, bytes: u64, id: EventId) -> Result<(), Error> {
        if self.shared.closed.load(Ordering::Relaxed) {
            return Err(Error::Closed);
        }
        let need = bytes + RECORD_OVERHEAD;
        if need > self.config.max_bytes {
            return Err(Error::Rejected {
                backend: NAME,
                event_id: id.to_string(),
                reason: format!("{need} bytes do not fit in a spool of max_bytes {}", self.config.max_bytes),
            });
        }
        loop {
            let room = self.shared.room.notified();
            // After `room` exists, so a close in between is seen here or wakes it.
            if self.shared.closed.load(Ordering::Relaxed) {
                return Err(Error::Closed);
            }
            if self.shared.bytes.load(Ordering::Relaxed) + need <= self.config.max_bytes {
                return Ok(());
            }
            match self.config.when_full {
                WhenFull::Block => room.await,
                _ => {
                    return Err(Error::BufferFull {
                        capacity: usize::try_from(self.config.max_bytes).unwrap_or(usize::MAX),
                    });
                }
            }
            if self.shared.closed.load(Ordering::Relaxed) {
                return Err(Error::Closed);
            }
        }
    }
}

impl std::fmt::Debug for SpooledBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpooledBroker").field("backend", &self.backend).field("spool", &self.config.path).finish()
    }
}

#[async_trait]
impl EventBroker for SpooledBroker {
    fn backend(&self) -> &'static str {
        self.backend
    }

    async fn publish_with(&self, event: Event, options: PublishOptions) -> Result<Receipt, Error> {
        let payload = encode(&event, &options);
        self.room_for(payload.len() as u64, event.id()).await?;
        let (receipt, settle) = Receipt::channel(event.id());
        let (reply, spooled) = oneshot::channel();
        let items = vec![Item { payload, event, options, settle }];
        self.cmd.send(Cmd::Append { items, reply }).await.map_err(|_| Error::Closed)?;
        match spooled.await {
            Ok(Ok(())) => Ok(receipt),
            Ok(Err((e, _))) => Err(e),
            Err(_) => Err(Error::Closed),
        }
    }

    async fn publish_batch(&self, events: Vec<Event>, options: PublishOptions) -> BatchPublished {
        let payloads: Vec<Vec<u8>> = events.iter().map(|e| encode(e, &options)).collect();
        let need: u64 = payloads.iter().map(|p| p.len() as u64 + RECORD_OVERHEAD).sum();
        let first = events.first().map(Event::id).unwrap_or_else(EventId::generate);
        if let Err(error) = self.room_for(need.saturating_sub(RECORD_OVERHEAD), first).await {
            return BatchPublished {
                receipt: BatchReceipt::from_receipts(Vec::new()),
                refused: Some(Refused { error, events }),
            };
        }
        let mut receipts = Vec::with_capacity(events.len());
        let mut items = Vec::with_capacity(events.len());
        for (event, payload) in events.into_iter().zip(payloads) {
            let (receipt, settle) = Receipt::channel(event.id());
            receipts.push(receipt);
            items.push(Item { payload, event, options: options.clone(), settle });
        }
        let (reply, spooled) = oneshot::channel();
        let answer = match self.cmd.send(Cmd::Append { items, reply }).await {
            Ok(()) => spooled.await.unwrap_or_else(|_| Err((Error::Closed, Vec::new()))),
            Err(mpsc::error::SendError(Cmd::Append { items, .. })) => {
                Err((Error::Closed, items.into_iter().map(|i| i.event).collect()))
            }
            Err(_) => Err((Error::Closed, Vec::new())),
        };
        match answer {
            Ok(()) => BatchPublished { receipt: BatchReceipt::from_receipts(receipts), refused: None },
            Err((error, events)) => {
                receipts.truncate(receipts.len().saturating_sub(events.len()));
                BatchPublished {
                    receipt: BatchReceipt::from_receipts(receipts),
                    refused: Some(Refused { error, events }),
                }
            }
        }
    }

    /// A batch goes to the log in one request, all or nothing, up to this size. Cancelled while
    /// the log syncs, a batch is spooled (and delivered) all the same: a caller that then lists
    /// it as not accepted has duplicates, never a loss.
    fn atomic_batch(&self) -> usize {
        4_096
    }

    fn durable(&self) -> bool {
        true
    }

    async fn flush(&self) -> Result<(), Error> {
        let deadline = Instant::now() + self.close_timeout;
        while self.shared.pending.load(Ordering::Relaxed) > 0 {
            if Instant::now() >= deadline {
                return Err(Error::Timeout(self.close_timeout));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }

    async fn is_ready(&self) -> bool {
        !self.shared.closed.load(Ordering::Relaxed) && self.shared.connected.load(Ordering::Relaxed)
    }

    async fn close(&self) -> Result<CloseReport, Error> {
        self.shared.closed.store(true, Ordering::Relaxed);
        self.shared.room.notify_waiters();
        let taken = self.close.lock().unwrap_or_else(PoisonError::into_inner).take();
        let Some((tx, done)) = taken else {
            // A second close says what the first one found.
            let spooled = *self.left.lock().unwrap_or_else(PoisonError::into_inner);
            return Ok(CloseReport::default().with_spooled(spooled));
        };
        let _ = tx.send(self.close_timeout);
        let report = done.await.map_err(|e| Error::Unavailable {
            backend: NAME,
            reason: format!("the spool forwarder failed: {e}"),
            cause: None,
        })?;
        *self.left.lock().unwrap_or_else(PoisonError::into_inner) = report.spooled;
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use broker_core::memory::{Fault, MemoryBackend};

    fn event(i: u64) -> Event {
        Event::from_json(
            format!(r#"{{"sender_id": "s", "event": "action", "timestamp": {i}.5, "name": "a{i}"}}"#).as_bytes(),
        )
        .expect("an event")
    }

    #[test]
    fn records_keep_id_headers_and_bytes() {
        let e = event(1);
        let options = PublishOptions::default().header("rasa-export-process-id", "abc").header("x", "");
        let (back, back_options) = decode(&encode(&e, &options)).expect("decodes");
        assert_eq!(back, e);
        assert_eq!(back_options, options);
        assert!(decode(b"short").is_none());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn events_are_delivered_through_the_spool_and_the_spool_empties() {
        let dir = tempfile::tempdir().unwrap();
        let memory = MemoryBackend::new();
        let backend = SpooledBackend::new(Box::new(memory.clone()), SpoolConfig::new(dir.path()));
        let broker = backend.connect().await.unwrap();
        let mut receipts = Vec::new();
        for i in 0..1000 {
            receipts.push(broker.publish(event(i)).await.unwrap());
        }
        for r in receipts {
            r.await.unwrap();
        }
        let report = broker.close().await.unwrap();
        assert!(report.is_clean(), "{report:?}");
        let lines: Vec<Vec<u8>> = (0..1000).map(|i| event(i).to_json()).collect();
        assert_eq!(memory.lines(), lines);
        let (log, recovery) = SpoolLog::open(dir.path(), 1 << 20).unwrap();
        assert_eq!((recovery.pending, log.pending_events()), (0, 0), "nothing left in the spool");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_outage_keeps_events_in_the_spool_for_the_next_process() {
        let dir = tempfile::tempdir().unwrap();
        let down = MemoryBackend::new()
            .with_delivery(broker_core::DeliveryOptions::default().close_timeout(Duration::from_millis(300)));
        down.faults().set(Fault::Unavailable);
        let backend = SpooledBackend::new(Box::new(down.clone()), SpoolConfig::new(dir.path()));
        let broker = backend.connect().await.unwrap();
        let mut receipts = Vec::new();
        for i in 0..200 {
            receipts.push(broker.publish(event(i)).await.unwrap());
        }
        let report = broker.close().await.unwrap();
        assert_eq!(report.spooled, 200, "{report:?}");
        for r in receipts {
            assert!(matches!(r.await, Err(Error::Spooled { .. })));
        }
        assert!(down.lines().is_empty());
        // The next process, with the service back: the spool goes out first, in order.
        let up = MemoryBackend::new();
        let backend = SpooledBackend::new(Box::new(up.clone()), SpoolConfig::new(dir.path()));
        let broker = backend.connect().await.unwrap();
        broker.publish(event(200)).await.unwrap().await.unwrap();
        let report = broker.close().await.unwrap();
        assert!(report.is_clean(), "{report:?}");
        let lines: Vec<Vec<u8>> = (0..=200).map(|i| event(i).to_json()).collect();
        assert_eq!(up.lines(), lines);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_spool_fails_publishes_when_told_to() {
        let dir = tempfile::tempdir().unwrap();
        let down = MemoryBackend::new()
            .with_delivery(broker_core::DeliveryOptions::default().close_timeout(Duration::from_millis(100)));
        down.faults().set(Fault::Unavailable);
        let mut config = SpoolConfig::new(dir.path());
        config.max_bytes = 8 << 10;
        config.when_full = WhenFull::Error;
        let backend = SpooledBackend::new(Box::new(down), config);
        let broker = backend.connect().await.unwrap();
        let mut accepted = 0;
        let mut refused = None;
        for i in 0..1000 {
            match broker.publish(event(i)).await {
                Ok(_) => accepted += 1,
                Err(e) => {
                    refused = Some(e);
                    break;
                }
            }
        }
        assert!(matches!(refused, Some(Error::BufferFull { .. })), "{refused:?}");
        assert!(accepted > 10);
        let report = broker.close().await.unwrap();
        assert_eq!(report.spooled, accepted);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_outage_in_the_middle_is_ridden_out_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let memory = MemoryBackend::new();
        let backend = SpooledBackend::new(Box::new(memory.clone()), SpoolConfig::new(dir.path()));
        let broker = backend.connect().await.unwrap();
        let mut receipts = Vec::new();
        for i in 0..100 {
            receipts.push(broker.publish(event(i)).await.unwrap());
        }
        memory.faults().set(Fault::Unavailable);
        for i in 100..300 {
            receipts.push(broker.publish(event(i)).await.unwrap());
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        memory.faults().set(Fault::None);
        for r in receipts {
            r.await.unwrap();
        }
        assert!(broker.close().await.unwrap().is_clean());
        let lines: Vec<Vec<u8>> = (0..300).map(|i| event(i).to_json()).collect();
        assert_eq!(memory.lines(), lines);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_event_rejected_as_its_own_fault_fails_alone_and_leaves_the_spool() {
        let dir = tempfile::tempdir().unwrap();
        let memory = MemoryBackend::new().with_max_event_bytes(80);
        let backend = SpooledBackend::new(Box::new(memory.clone()), SpoolConfig::new(dir.path()));
        let broker = backend.connect().await.unwrap();
        let big = Event::from_json(
            format!(r#"{{"sender_id": "s", "event": "bot", "text": "{}"}}"#, "x".repeat(200)).as_bytes(),
        )
        .unwrap();
        let a = broker.publish(event(1)).await.unwrap();
        let b = broker.publish(big).await.unwrap();
        let c = broker.publish(event(2)).await.unwrap();
        a.await.unwrap();
        assert!(matches!(b.await, Err(Error::Rejected { .. })));
        c.await.unwrap();
        assert!(broker.close().await.unwrap().is_clean());
        let (log, _) = SpoolLog::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(log.pending_events(), 0, "the rejected event is not kept for a replay");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_spool_smaller_than_the_traffic_keeps_flowing() {
        // Ten times max_bytes go through: confirmed segments, the live one too, are deleted.
        let dir = tempfile::tempdir().unwrap();
        let memory = MemoryBackend::new();
        let mut config = SpoolConfig::new(dir.path());
        config.max_bytes = 64 << 10;
        config.when_full = WhenFull::Block;
        config.fsync = Fsync::Never; // one publish at a time: a sync each would only be slow
        let backend = SpooledBackend::new(Box::new(memory.clone()), config);
        let broker = backend.connect().await.unwrap();
        let n = 10 * (64 << 10) / event(0).to_json().len() as u64;
        for i in 0..n {
            let publish = broker.publish(event(i));
            drop(tokio::time::timeout(Duration::from_secs(10), publish).await.expect("never stuck").unwrap());
        }
        assert!(broker.close().await.unwrap().is_clean());
        assert_eq!(memory.lines().len() as u64, n);
        assert_eq!(broker.close().await.unwrap().spooled, 0, "a second close agrees");
    }
}

/// What a spool directory holds, for `broker spool status`.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct SpoolStatus {
    /// Events not confirmed yet.
    pub events: u64,
    /// Bytes in segments.
    pub bytes: u64,
    /// The `timestamp` of the oldest event waiting, when it has one.
    pub oldest_timestamp: Option<f64>,
    /// Records cut at open because they were torn (a crash mid-write).
    pub torn_records: u64,
}

/// Reads the spool in `config.path` (taking its lock for the moment: a process using it makes
/// this fail with [`LogError::Locked`]). A directory that does not exist is an empty spool.
pub fn status(config: &SpoolConfig) -> Result<SpoolStatus, LogError> {
    if !config.path.exists() {
        return Ok(SpoolStatus { events: 0, bytes: 0, oldest_timestamp: None, torn_records: 0 });
    }
    let (mut log, recovery) = SpoolLog::open(&config.path, config.segment_bytes)?;
    let oldest = log.first_pending()?.and_then(|r| decode(&r.payload)).and_then(|(e, _)| e.timestamp());
    Ok(SpoolStatus {
        events: log.pending_events(),
        bytes: log.bytes(),
        oldest_timestamp: oldest,
        torn_records: recovery.torn_records,
    })
}
