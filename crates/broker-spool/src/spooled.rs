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

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use broker_core::metrics::SpoolMeter;
use broker_core::{
    Backend, BatchPublished, BatchReceipt, CloseReport, Error, Event, EventBroker, EventId, EventSource,
    PublishOptions, Receipt, Refused, Settle, SourceOptions, WhenFull, async_trait,
};
use tokio::sync::{Notify, mpsc, oneshot};

use crate::config::{Fsync, SpoolConfig};
use crate::forward::Forwarder;
use crate::log::{LogError, SpoolLog};
use crate::record::{decode, encoded_len};
use crate::writer::{self, Cmd};

/// The backend name this layer reports errors under.
pub(crate) const NAME: &str = "spool";

pub(crate) fn spool_error(e: LogError) -> Error {
    let temporary = e.is_temporary();
    let reason = e.to_string();
    if temporary {
        Error::Io { backend: NAME, operation: "spooling".into(), reason, cause: Some(Arc::new(e)) }
    } else {
        Error::Config(broker_core::ConfigError::new(Default::default(), Some("spool"), reason))
    }
}

/// One spooled event on its way to the backend: its sequence, the event with the options it was
/// published with (shared by the events of one publish) while the forwarder holds it in memory
/// (`None` once sent, or while far behind: it is read back from the log when needed), and the
/// caller's settle when it was published by this process (a replayed one has none).
pub(crate) struct Forward {
    pub(crate) seq: u64,
    pub(crate) body: Option<(Event, Arc<PublishOptions>)>,
    pub(crate) settle: Option<Settle>,
}

impl Forward {
    /// An event published by this process, before the writer gives it its sequence.
    pub(crate) fn new(event: Event, options: &Arc<PublishOptions>, settle: Settle) -> Forward {
        Forward { seq: 0, body: Some((event, options.clone())), settle: Some(settle) }
    }

    /// The event, when held in memory (its settle is dropped: the caller is told otherwise).
    pub(crate) fn into_event(self) -> Option<Event> {
        self.body.map(|(e, _)| e)
    }
}

/// Counters the broker reads without asking the writer thread.
pub(crate) struct Shared {
    pub(crate) bytes: AtomicU64,
    /// Bytes promised to appends on their way to the writer ([`Room`]): with `bytes`, what
    /// `max_bytes` is checked against, so publishers at once cannot pass it together.
    pub(crate) reserved: AtomicU64,
    pub(crate) pending: AtomicU64,
    pub(crate) closed: AtomicBool,
    pub(crate) connected: AtomicBool,
    /// Woken when bytes were freed (a blocked publish looks again).
    pub(crate) room: Notify,
    /// When the oldest event waiting was spooled (set by the writer).
    pub(crate) oldest: Mutex<Option<Instant>>,
    pub(crate) meter: SpoolMeter,
}

impl Shared {
    fn new(meter: SpoolMeter) -> Shared {
        Shared {
            bytes: AtomicU64::new(0),
            reserved: AtomicU64::new(0),
            pending: AtomicU64::new(0),
            closed: AtomicBool::new(false),
            connected: AtomicBool::new(false),
            room: Notify::new(),
            oldest: Mutex::new(None),
            meter,
        }
    }

    /// Records the spool's state in its metrics.
    pub(crate) fn record(&self) {
        let oldest = *self.oldest.lock().unwrap_or_else(PoisonError::into_inner);
        let age = oldest.map_or(0.0, |t| t.elapsed().as_secs_f64());
        self.meter.state(self.pending.load(Ordering::Relaxed), self.bytes.load(Ordering::Relaxed), age);
    }
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
        log.set_durable(matches!(self.config.fsync, Fsync::Batch));
        if recovery.torn_records > 0 {
            tracing::warn!(
                "spool {}: {} torn record(s) cut ({} bytes): a crash mid-write; the events before them are kept",
                self.config.path.display(),
                recovery.torn_records,
                recovery.torn_bytes
            );
        }
        // What a previous process left is read back from the log as the forwarder gets to it.
        let replay = log.acked()..log.next_seq();
        if !replay.is_empty() {
            tracing::info!(
                "spool {}: replaying {} events a previous process left",
                self.config.path.display(),
                log.pending_events()
            );
        }
        let meter = SpoolMeter::new(self.inner.name(), self.config.path.display().to_string());
        let shared = Arc::new(Shared::new(meter));
        shared.bytes.store(log.bytes(), Ordering::Relaxed);
        shared.pending.store(log.pending_events(), Ordering::Relaxed);
        shared.record();
        let (forward_tx, forward_rx) = mpsc::unbounded_channel::<Vec<Forward>>();
        let (cmd_tx, cmd_rx) = mpsc::channel::<Cmd>(1024);
        let writer_shared = shared.clone();
        let fsync = self.config.fsync;
        std::thread::Builder::new()
            .name("spool-writer".into())
            .spawn(move || writer::run(log, cmd_rx, forward_tx, writer_shared, fsync))
            .map_err(|e| Error::Unavailable {
                backend: NAME,
                reason: format!("starting the spool writer: {e}"),
                cause: None,
            })?;
        let (close_tx, close_rx) = oneshot::channel();
        let forwarder = Forwarder::new(self.inner.clone(), shared.clone(), cmd_tx.clone(), replay);
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
    /// Waits for (or, with `when_full: error`, fails without) room for an event of `bytes`;
    /// one that can never fit is rejected.
    async fn room_for(&self, bytes: u64, id: EventId) -> Result<Room<'_>, Error> {
        let need = bytes + RECORD_OVERHEAD;
        if need > self.largest() {
            return Err(too_big(need, self.largest(), id));
        }
        self.room_for_bytes(need).await
    }

    /// The largest record the spool takes: within `max_bytes` and the log's record limit.
    fn largest(&self) -> u64 {
        self.config.max_bytes.min(crate::log::MAX_RECORD as u64 + RECORD_OVERHEAD)
    }

    /// Waits for (or, with `when_full: error`, fails without) room for `need` more bytes, and
    /// holds it until the append is answered (the writer counts it in `bytes` before that).
    async fn room_for_bytes(&self, need: u64) -> Result<Room<'_>, Error> {
        loop {
            let room = self.shared.room.notified();
            // After `room` exists, so a close in between is seen here or wakes it.
            if self.shared.closed.load(Ordering::Relaxed) {
                return Err(Error::Closed);
            }
            let max = self.config.max_bytes;
            let reserved = self.shared.reserved.fetch_update(Ordering::AcqRel, Ordering::Acquire, |r| {
                let used = self.shared.bytes.load(Ordering::Acquire).saturating_add(r);
                (used.saturating_add(need) <= max).then_some(r + need)
            });
            if reserved.is_ok() {
                return Ok(Room { shared: &self.shared, bytes: need });
            }
            match self.config.when_full {
                WhenFull::Block => room.await,
                _ => {
                    return Err(Error::BufferFull {
                        capacity: usize::try_from(self.config.max_bytes).unwrap_or(usize::MAX),
                    });
                }
            }
        }
    }
}

/// Room held in the spool for an append on its way; given back when dropped (by then the writer
/// counts what it spooled in `bytes`).
struct Room<'a> {
    shared: &'a Shared,
    bytes: u64,
}

impl Drop for Room<'_> {
    fn drop(&mut self) {
        self.shared.reserved.fetch_sub(self.bytes, Ordering::AcqRel);
        // A failed append gave its room back without filling it.
        self.shared.room.notify_waiters();
    }
}

/// An event bigger than the whole spool.
fn too_big(need: u64, max_bytes: u64, id: EventId) -> Error {
    Error::Rejected {
        backend: NAME,
        event_id: id.to_string(),
        reason: format!(
            "{need} bytes do not fit in the spool (at most {max_bytes} bytes a record: max_bytes, and 256 MiB)"
        ),
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
        let _room = self.room_for(encoded_len(&event, &options) as u64, event.id()).await?;
        let (receipt, settle) = Receipt::channel(event.id());
        let (reply, spooled) = oneshot::channel();
        let options = Arc::new(options);
        let items = vec![Forward::new(event, &options, settle)];
        self.cmd.send(Cmd::Append { items, reply }).await.map_err(|_| Error::Closed)?;
        match spooled.await {
            Ok(Ok(())) => Ok(receipt),
            Ok(Err((e, _))) => Err(e),
            Err(_) => Err(Error::Closed),
        }
    }

    async fn publish_batch(&self, events: Vec<Event>, options: PublishOptions) -> BatchPublished {
        let options = Arc::new(options);
        let n = events.len();
        let (mut receipt, settles) = BatchReceipt::settles(events.iter().map(Event::id));
        let mut items = events.into_iter().zip(settles).map(|(event, settle)| Forward::new(event, &options, settle));
        // In parts of at most a quarter of the spool, each waiting for its room, so a batch
        // larger than a small spool still goes in.
        let part_bytes = self.config.max_bytes / 4;
        let mut accepted = 0;
        let mut next: Option<Forward> = None;
        loop {
            let mut part = Vec::with_capacity(n - accepted.min(n));
            let mut bytes = 0;
            while let Some(item) = next.take().or_else(|| items.next()) {
                let size = item.body.as_ref().map_or(0, |(e, _)| encoded_len(e, &options)) as u64 + RECORD_OVERHEAD;
                if size > self.largest() && part.is_empty() {
                    // It can never fit: rejected for its own fault, the others go on.
                    if let Some(settle) = item.settle {
                        let id = settle.id();
                        settle.settle(Err(too_big(size, self.largest(), id)));
                    }
                    accepted += 1;
                    continue;
                }
                if !part.is_empty() && (size > self.largest() || bytes + size > part_bytes) {
                    next = Some(item);
                    break;
                }
                bytes += size;
                part.push(item);
            }
            if part.is_empty() {
                return BatchPublished { receipt, refused: None };
            }
            let count = part.len();
            let answer = match self.room_for_bytes(bytes).await {
                Err(e) => Err((e, part.into_iter().filter_map(Forward::into_event).collect())),
                Ok(_room) => {
                    let (reply, spooled) = oneshot::channel();
                    match self.cmd.send(Cmd::Append { items: part, reply }).await {
                        Ok(()) => spooled.await.unwrap_or_else(|_| Err((Error::Closed, Vec::new()))),
                        Err(mpsc::error::SendError(Cmd::Append { items, .. })) => {
                            Err((Error::Closed, items.into_iter().filter_map(Forward::into_event).collect()))
                        }
                        Err(_) => Err((Error::Closed, Vec::new())),
                    }
                }
            };
            match answer {
                Ok(()) => accepted += count,
                Err((error, mut back)) => {
                    // Not accepted: this part's events handed back, and the rest of the batch.
                    accepted += count - back.len().min(count);
                    back.extend(next.take().and_then(Forward::into_event));
                    back.extend(items.filter_map(Forward::into_event));
                    receipt.truncate(accepted.min(n));
                    return BatchPublished { receipt, refused: Some(Refused { error, events: back }) };
                }
            }
        }
    }

    /// A batch goes to the log in one request, all or nothing, up to this size. Cancelled while
    /// the log syncs, a batch is spooled (and delivered) all the same: a caller that then lists
    /// it as not accepted has duplicates, never a loss.
    fn atomic_batch(&self) -> usize {
        match self.config.fsync {
            Fsync::Batch => 4_096,
            Fsync::Never => 512,
        }
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
    use crate::config::Fsync;
    use crate::record::encode;
    use broker_core::memory::{Fault, MemoryBackend};

    fn event(i: u64) -> Event {
        Event::from_json(
            format!(r#"{{"sender_id": "s", "event": "action", "timestamp": {i}.5, "name": "a{i}"}}"#).as_bytes(),
        )
        .expect("an event")
    }

    /// A service that is down behind a spool of `max_bytes` with `when_full: error`.
    fn down_behind_a_spool_that_errs_when_full(max_bytes: u64) -> (tempfile::TempDir, SpooledBackend) {
        let dir = tempfile::tempdir().unwrap();
        let down = MemoryBackend::new()
            .with_delivery(broker_core::DeliveryOptions::default().close_timeout(Duration::from_millis(100)));
        down.faults().set(Fault::Unavailable);
        let mut config = SpoolConfig::new(dir.path());
        config.max_bytes = max_bytes;
        config.when_full = WhenFull::Error;
        (dir, SpooledBackend::new(Box::new(down), config))
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
    async fn an_outage_longer_than_memory_is_read_back_from_the_log_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let memory = MemoryBackend::new();
        let backend = SpooledBackend::new(Box::new(memory.clone()), SpoolConfig::new(dir.path()));
        let broker = backend.connect().await.unwrap();
        memory.faults().set(Fault::Unavailable);
        let n = crate::forward::IN_MEMORY as u64 + 5_000;
        let mut receipts = Vec::new();
        for chunk in (0..n).collect::<Vec<_>>().chunks(4096) {
            let published =
                broker.publish_batch(chunk.iter().map(|i| event(*i)).collect(), PublishOptions::default()).await;
            assert!(published.refused.is_none());
            receipts.push(published.receipt);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        memory.faults().set(Fault::None);
        for r in receipts {
            let outcomes = tokio::time::timeout(Duration::from_secs(60), r).await.expect("delivered in time");
            assert!(outcomes.iter().all(Result::is_ok));
        }
        assert!(broker.close().await.unwrap().is_clean());
        let lines = memory.lines();
        let expected: Vec<Vec<u8>> = (0..n).map(|i| event(i).to_json()).collect();
        assert_eq!(lines.len(), expected.len(), "each once");
        assert!(lines == expected, "in order");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_spool_fails_publishes_when_told_to() {
        let (dir, backend) = down_behind_a_spool_that_errs_when_full(8 << 10);
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
        // Nothing already spooled was touched.
        let (mut log, recovery) = SpoolLog::open(dir.path(), 1 << 20).unwrap();
        assert_eq!((log.pending_events(), recovery.torn_records), (accepted, 0));
        let kept: Vec<Vec<u8>> =
            log.pending().unwrap().iter().map(|r| decode(&r.payload).unwrap().0.to_json()).collect();
        assert!(kept == (0..accepted).map(|i| event(i).to_json()).collect::<Vec<_>>(), "the same events, in order");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn publishers_at_once_do_not_pass_max_bytes_together() {
        let (dir, backend) = down_behind_a_spool_that_errs_when_full(16 << 10);
        let broker: Arc<dyn EventBroker> = Arc::from(backend.connect().await.unwrap());
        let tasks: Vec<_> = (0..16u64)
            .map(|t| {
                let broker = broker.clone();
                tokio::spawn(async move {
                    let mut accepted = 0u64;
                    for i in 0..1000 {
                        match broker.publish(event(t * 1000 + i)).await {
                            Ok(receipt) => {
                                drop(receipt);
                                accepted += 1;
                            }
                            Err(Error::BufferFull { .. }) => break,
                            Err(e) => panic!("{e}"),
                        }
                    }
                    accepted
                })
            })
            .collect();
        let mut accepted = 0;
        for t in tasks {
            accepted += t.await.unwrap();
        }
        assert_eq!(broker.close().await.unwrap().spooled, accepted);
        let (log, _) = SpoolLog::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(log.pending_events(), accepted);
        assert!(log.bytes() <= 16 << 10, "{} bytes spooled, max_bytes {}", log.bytes(), 16 << 10);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_spool_blocks_publishes_until_there_is_room() {
        let dir = tempfile::tempdir().unwrap();
        let memory = MemoryBackend::new();
        memory.faults().set(Fault::Unavailable);
        let mut config = SpoolConfig::new(dir.path());
        config.max_bytes = 8 << 10;
        let backend = SpooledBackend::new(Box::new(memory.clone()), config);
        let broker = backend.connect().await.unwrap();
        let mut receipts = Vec::new();
        let mut i = 0;
        // Publishes go in until the spool is full; then one waits.
        let blocked = loop {
            match tokio::time::timeout(Duration::from_millis(300), broker.publish(event(i))).await {
                Ok(r) => receipts.push(r.unwrap()),
                Err(_) => break i,
            }
            i += 1;
            assert!(i < 1000, "never blocked");
        };
        assert!(blocked > 10);
        // The service comes back: room is made as the spool empties, and the waiting publish goes in.
        memory.faults().set(Fault::None);
        let last = tokio::time::timeout(Duration::from_secs(10), broker.publish(event(blocked))).await;
        receipts.push(last.expect("room came back").unwrap());
        for r in receipts {
            r.await.unwrap();
        }
        assert!(broker.close().await.unwrap().is_clean());
        let lines: Vec<Vec<u8>> = (0..=blocked).map(|i| event(i).to_json()).collect();
        assert_eq!(memory.lines(), lines, "each once, in order");
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
    async fn a_batch_bigger_than_the_spool_goes_in_parts_and_an_event_too_big_fails_alone() {
        let dir = tempfile::tempdir().unwrap();
        let memory = MemoryBackend::new();
        let mut config = SpoolConfig::new(dir.path());
        config.max_bytes = 64 << 10;
        let backend = SpooledBackend::new(Box::new(memory.clone()), config);
        let broker = backend.connect().await.unwrap();
        let big = Event::from_json(
            format!(r#"{{"sender_id": "s", "event": "bot", "text": "{}"}}"#, "x".repeat(70_000)).as_bytes(),
        )
        .unwrap();
        let mut events: Vec<Event> = (0..4000).map(event).collect();
        events.insert(2000, big);
        let total: usize = events.iter().map(|e| e.to_json().len()).sum();
        assert!(total > 4 * (64 << 10), "the batch is several times the spool");
        let published = broker.publish_batch(events, PublishOptions::default()).await;
        assert!(published.refused.is_none(), "{:?}", published.refused.map(|r| r.error));
        let outcomes = tokio::time::timeout(Duration::from_secs(20), published.receipt).await.expect("settled");
        assert_eq!(outcomes.len(), 4001);
        assert!(
            matches!(&outcomes[2000], Err(Error::Rejected { reason, .. }) if reason.contains("do not fit in the spool"))
        );
        assert_eq!(outcomes.iter().filter(|o| o.is_ok()).count(), 4000);
        assert!(broker.close().await.unwrap().is_clean());
        let lines: Vec<Vec<u8>> = (0..4000).map(|i| event(i).to_json()).collect();
        assert_eq!(memory.lines(), lines, "every other event, once, in order");
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
