//! `broker publish`: read JSON lines, publish them in order, and account for every event read.
//!
//! The run never hangs and never drops an event it read: when the input ends it closes with the
//! backend's `close_timeout`; when publishing has been blocked for longer than that (the service is
//! down and the buffer full) it stops reading and closes the same way; on SIGINT/SIGTERM it stops
//! reading and closes (a second signal exits at once). Every event read and not delivered
//! (rejected, failed, undelivered at close, never accepted, or of unknown outcome) is appended to
//! the undelivered file in its Rasa bytes, one per line, in publish order, so that
//! `broker publish FILE` later sends exactly those. The summary is printed on every path.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::future::Future;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::Poll;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use broker_core::{Backend, BatchReceipt, Error, Event, EventBroker, Outcome, PublishOptions};
use indicatif::ProgressBar;

use crate::{Failure, code, progress};

/// How many outcomes may be outstanding before the oldest is awaited; the broker's own buffer
/// bounds memory further down. Well above a backend's batch (the file's is 4,096), so the next
/// batch is published while one is written: at 4,096 the two took turns and a publish of 500k
/// events to a file took 0.80 s instead of 0.31 s. Cheap with one receipt per chunk.
const WINDOW: usize = 16_384;

/// Outstanding outcomes, at most, when accepted events are safe on disk (a spool): far more, so
/// that an outage of a few minutes is spooled whole rather than stopping the reading, and still a
/// bound on memory (the events' bytes are kept for the undelivered file until their outcome).
const DURABLE_WINDOW: usize = 262_144;

/// How long a publish with a spool waits for the oldest outcomes past `WINDOW` while the
/// service takes events (then it reads on).
const DURABLE_WAIT: Duration = Duration::from_millis(50);

/// Lines the reader thread hands over at once.
const CHUNK: usize = 512;

/// After close, how long the receipts still open may take to settle before they count as unknown.
const SETTLE_AFTER_CLOSE: Duration = Duration::from_secs(2);

/// What the reader found, in input order.
pub(crate) type Chunk = Vec<Item>;

/// What the reader found on one line (or in one stored event).
pub(crate) enum Item {
    /// An event, with the timestamp a resumed export would start from (NaN for input lines).
    Event(Event, f64),
    /// An invalid line skipped under `--skip-invalid`.
    Skipped(String),
    /// An invalid line or unreadable input that ends the run.
    Stop(String),
    /// The input ended. A reader that stops without it (a panic) is a failure, not an end.
    End,
}

/// Why reading stopped before the input ended.
enum Stop {
    /// Invalid or unreadable input.
    Input(String),
    /// `publish` refused an event (e.g. `when_full: error`, `raise_on_failure`).
    Refused(String),
    /// Publishing was blocked for longer than `close_timeout`.
    Blocked(Duration),
    /// SIGINT or SIGTERM.
    Signal,
}

/// SIGINT and SIGTERM as one stream.
pub(crate) struct Signals {
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
}

impl Signals {
    pub(crate) fn new() -> io::Result<Signals> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Ok(Signals { int: signal(SignalKind::interrupt())?, term: signal(SignalKind::terminate())? })
        }
        #[cfg(not(unix))]
        Ok(Signals {})
    }

    pub(crate) async fn recv(&mut self) {
        #[cfg(unix)]
        tokio::select! {
            _ = self.int.recv() => {}
            _ = self.term.recv() => {}
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Counts of a publish run, and the events not delivered, in publish order.
#[derive(Default)]
struct Tally {
    read: u64,
    delivered: u64,
    failed: u64,
    skipped: u64,
    /// Events of unknown outcome (a second signal, or a receipt still open after close).
    unknown: u64,
    /// Events not delivered yet but kept in the disk spool (sent at the next run).
    spooled: u64,
    first_failure: Option<String>,
    /// Rasa bytes of the events not delivered, in publish order.
    undelivered: Vec<Vec<u8>>,
    /// Rasa bytes of the events never accepted (reading stops at the first): they go after
    /// `undelivered` once the events accepted before them have their outcomes.
    refused: Vec<Vec<u8>>,
    /// The lowest resume timestamp of the events not delivered (an export resumes there).
    resume_at: Option<f64>,
    /// The resume timestamp of the last event read.
    last_read: Option<f64>,
}

impl Tally {
    fn settle(&mut self, event: impl FnOnce() -> (Vec<u8>, f64), outcome: Result<broker_core::Delivered, Error>) {
        match outcome {
            Ok(_) => self.delivered += 1,
            // Kept in the disk spool: not lost, and not to be published again by hand.
            Err(Error::Spooled { .. }) => self.spooled += 1,
            Err(e) => {
                self.failed += 1;
                if self.first_failure.is_none() {
                    self.first_failure = Some(e.to_string());
                }
                let (bytes, ts) = event();
                if matches!(e, Error::Rejected { .. }) {
                    // Its own fault: sending it again would fail again, so it does not hold the
                    // resume point back (it is in the undelivered file).
                    self.undelivered.push(bytes);
                } else {
                    self.undeliver(bytes, ts);
                }
            }
        }
    }

    /// Counts an event as not delivered.
    fn undeliver(&mut self, bytes: Vec<u8>, ts: f64) {
        self.note_resume(ts);
        self.undelivered.push(bytes);
    }

    /// Counts an event as never accepted.
    fn refuse(&mut self, (bytes, ts): (Vec<u8>, f64)) {
        self.note_resume(ts);
        self.refused.push(bytes);
    }

    fn note_resume(&mut self, ts: f64) {
        if !ts.is_nan() && self.resume_at.is_none_or(|r| ts < r) {
            self.resume_at = Some(ts);
        }
    }
}

/// Where an event's Rasa bytes are kept: a span of its chunk's buffer.
#[derive(Clone, Copy)]
struct Kept {
    chunk: u64,
    start: usize,
    end: usize,
    /// Where an export would resume to send it again (NaN: not an export).
    ts: f64,
}

/// The Rasa bytes of the events of each chunk whose events are not all settled yet, one buffer
/// per chunk (not one allocation per event), oldest first: receipts are awaited in publish
/// order, so a chunk's buffer goes once a later chunk's event settles. Copied on the publishing
/// thread, which has room to spare while the reader parses.
#[derive(Default)]
struct Buffers {
    first: u64,
    buffers: VecDeque<Vec<u8>>,
}

impl Buffers {
    /// The number the next chunk's buffer gets, and an empty buffer sized after the last one.
    fn next(&self) -> (u64, Vec<u8>) {
        let before = self.buffers.back().map_or(0, Vec::len);
        (self.first + self.buffers.len() as u64, Vec::with_capacity(before + before / 8 + 4096))
    }

    /// Keeps the buffer of the next chunk.
    fn push(&mut self, bytes: Vec<u8>) {
        self.buffers.push_back(bytes);
    }

    /// A copy of the event's bytes, and its resume timestamp.
    fn get(&self, k: Kept) -> (Vec<u8>, f64) {
        let buffer = usize::try_from(k.chunk - self.first).ok().and_then(|i| self.buffers.get(i));
        (buffer.and_then(|b| b.get(k.start..k.end)).map(<[u8]>::to_vec).unwrap_or_default(), k.ts)
    }

    /// Drops the buffers of the chunks before `chunk`.
    fn release_before(&mut self, chunk: u64) {
        while self.first < chunk && self.buffers.pop_front().is_some() {
            self.first += 1;
        }
    }
}

/// Reading and parsing run on their own thread, so on a multi-core machine they overlap with
/// publishing (which encodes nothing for events read from bytes) and with the backend's writer.
fn spawn_reader(
    inputs: Vec<Option<PathBuf>>,
    skip_invalid: bool,
    bar: ProgressBar,
) -> tokio::sync::mpsc::Receiver<Chunk> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Chunk>(8);
    std::thread::spawn(move || {
        let send = |chunk: Chunk| tx.blocking_send(chunk).is_ok();
        let stop = |why: String| vec![Item::Stop(why)];
        for input in inputs {
            let (name, reader): (String, Box<dyn Read>) = match &input {
                Some(p) => match File::open(p) {
                    Ok(f) => (p.display().to_string(), Box::new(f)),
                    Err(e) => {
                        send(stop(format!("cannot open {}: {e}", p.display())));
                        return;
                    }
                },
                None => ("<stdin>".into(), Box::new(io::stdin().lock())),
            };
            let mut reader = BufReader::with_capacity(1 << 18, reader);
            // A line that spans the end of the reader's buffer is put together here; the rest
            // are parsed where they lie in the buffer, without a copy.
            let mut carry = Vec::new();
            let mut line_no = 0u64;
            // Bytes read since the progress bar last heard (it is told once per chunk: it reads the
            // clock on every call).
            let mut unreported = 0u64;
            let new_chunk = || Vec::with_capacity(CHUNK);
            let mut chunk = new_chunk();
            loop {
                let buf = match reader.fill_buf() {
                    Ok(buf) => buf,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        chunk.push(Item::Stop(format!("reading {name}: {e}")));
                        send(chunk);
                        return;
                    }
                };
                let (text, used, end) = if buf.is_empty() {
                    if carry.is_empty() {
                        break;
                    }
                    (&carry[..], 0, true)
                } else {
                    match memchr::memchr(b'\n', buf) {
                        Some(i) if carry.is_empty() => (&buf[..i], i + 1, false),
                        Some(i) => {
                            carry.extend_from_slice(&buf[..i]);
                            (&carry[..], i + 1, false)
                        }
                        None => {
                            carry.extend_from_slice(buf);
                            let n = buf.len();
                            reader.consume(n);
                            continue;
                        }
                    }
                };
                line_no += 1;
                let read = text.len() as u64 + u64::from(!end);
                let text = text.strip_suffix(b"\r").unwrap_or(text);
                let item = if text.iter().all(u8::is_ascii_whitespace) {
                    None
                } else {
                    match Event::from_json(text) {
                        Ok(e) => Some(Item::Event(e, f64::NAN)),
                        Err(e) if skip_invalid => Some(Item::Skipped(format!("{name}:{line_no}: {e}"))),
                        Err(e) => {
                            chunk.push(Item::Stop(format!(
                                "{name}:{line_no}: invalid event: {e} (use --skip-invalid to skip such lines)"
                            )));
                            send(chunk);
                            return;
                        }
                    }
                };
                unreported += read;
                carry.clear();
                reader.consume(used);
                if end {
                    if let Some(item) = item {
                        chunk.push(item);
                    }
                    break;
                }
                let Some(item) = item else { continue };
                chunk.push(item);
                // A full chunk goes at once; so does a partial one when the next read would wait
                // for input (a slow pipe: events are published as they come, not 512 at a time).
                let ready = chunk.len() >= CHUNK || (reader.buffer().is_empty() && !chunk.is_empty());
                if ready {
                    bar.inc(std::mem::take(&mut unreported));
                    if !send(std::mem::replace(&mut chunk, new_chunk())) {
                        return;
                    }
                }
            }
            bar.inc(unreported);
            if !chunk.is_empty() && !send(chunk) {
                return;
            }
        }
        send(vec![Item::End]);
    });
    rx
}

/// `broker publish`'s arguments.
pub(crate) struct Args {
    pub(crate) files: Vec<PathBuf>,
    pub(crate) skip_invalid: bool,
    pub(crate) undelivered: Option<PathBuf>,
    pub(crate) metrics_addr: Option<std::net::SocketAddr>,
}

/// A run in progress: the broker, the receipts not awaited yet (with their events), the tally.
struct Run<'a> {
    broker: &'a dyn EventBroker,
    close_timeout: Duration,
    /// One receipt per chunk published, with where its events' bytes are, oldest first.
    pending: VecDeque<(BatchReceipt, Vec<Kept>)>,
    /// How many events `pending` holds.
    outstanding: usize,
    /// The Rasa bytes of the pending events.
    kept: Buffers,
    tally: Tally,
    signals: Signals,
    /// Headers for every event (`broker export` to RabbitMQ).
    options: PublishOptions,
    /// Events the disk spool still holds after close (of this run and earlier ones).
    spool_left: u64,
    /// Whether accepted events are safe on disk ([`EventBroker::durable`]).
    durable: bool,
}

impl Run<'_> {
    /// Publishes one chunk's events, numbered from `first`: in batches the broker accepts all or
    /// nothing ([`EventBroker::atomic_batch`]), so when a wait is given up (a signal, blocked for
    /// `close_timeout`) it is known which were accepted. `Err` says why reading must stop; the
    /// events not accepted are then undelivered.
    async fn publish(&mut self, events: Vec<Event>, spans: Vec<Kept>, first: u64) -> Result<(), Stop> {
        let atomic = self.broker.atomic_batch().max(1);
        let (mut events, mut spans) = (events.into_iter(), spans.into_iter());
        let mut first = first;
        loop {
            let batch: Vec<Event> = events.by_ref().take(atomic).collect();
            if batch.is_empty() {
                return Ok(());
            }
            let batch_spans: Vec<Kept> = spans.by_ref().take(batch.len()).collect();
            let number = first;
            first += batch.len() as u64;
            if let Err(stop) = self.publish_batch(batch, batch_spans, number).await {
                for k in spans {
                    self.tally.refuse(self.kept.get(k));
                }
                return Err(stop);
            }
        }
    }

    /// Publishes events numbered from `first` with one receipt.
    async fn publish_batch(&mut self, events: Vec<Event>, mut spans: Vec<Kept>, first: u64) -> Result<(), Stop> {
        // Accepted at once unless the buffer is full: only then are a timer and the signals
        // watched (a signal between chunks is seen by the caller's loop).
        let mut publish = std::pin::pin!(self.broker.publish_batch(events, self.options.clone()));
        let ready = std::future::poll_fn(|cx| Poll::Ready(publish.as_mut().poll(cx))).await;
        let published = match ready {
            Poll::Ready(p) => Ok(p),
            Poll::Pending => tokio::select! {
                biased;
                _ = self.signals.recv() => Err(Stop::Signal),
                r = tokio::time::timeout(self.close_timeout, publish) => r.map_err(|_| Stop::Blocked(self.close_timeout)),
            },
        };
        let published = match published {
            Ok(p) => p,
            Err(stop) => {
                // Given up while waiting for room: the batch is all or nothing, so none of it
                // was accepted.
                for k in &spans {
                    self.tally.refuse(self.kept.get(*k));
                }
                return Err(stop);
            }
        };
        let accepted = published.receipt.len();
        let mut stop = None;
        if let Some(refused) = published.refused {
            for k in spans.get(accepted..).unwrap_or_default() {
                self.tally.refuse(self.kept.get(*k));
            }
            let which = first + accepted as u64;
            stop = Some(Stop::Refused(format!("event {which}: publish refused: {}", refused.error)));
        }
        if accepted > 0 {
            spans.truncate(accepted);
            self.outstanding += spans.len();
            self.pending.push_back((published.receipt, spans));
        }
        if let Some(stop) = stop {
            return Err(stop);
        }
        while self.outstanding > WINDOW {
            if self.durable && self.outstanding <= DURABLE_WINDOW {
                // Accepted is safe (a disk spool): during an outage outcomes are counted as they
                // come, without waiting for them, so the reading goes on this side of
                // `DURABLE_WINDOW`; while the service takes events, the reading stays close
                // behind the deliveries (a short wait), so memory stays small.
                if self.settle_oldest_if_ready() {
                    continue;
                }
                if !self.broker.is_ready().await || !self.settle_oldest_within(DURABLE_WAIT).await? {
                    break;
                }
            } else {
                self.settle_oldest().await?;
            }
        }
        Ok(())
    }

    /// Tallies the oldest receipt's outcomes if they are all in; false when they are not.
    fn settle_oldest_if_ready(&mut self) -> bool {
        let Some((receipt, _)) = self.pending.front_mut() else { return false };
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        let Poll::Ready(outcomes) = Pin::new(receipt).poll(&mut cx) else { return false };
        let Some((_, spans)) = self.pending.pop_front() else { return false };
        self.tally_outcomes(outcomes.into_iter().map(Some), &spans);
        if let Some(last) = spans.last() {
            self.kept.release_before(last.chunk);
        }
        true
    }

    /// Waits up to `wait` for the oldest receipt's outcomes; true when they came (and were
    /// tallied).
    async fn settle_oldest_within(&mut self, wait: Duration) -> Result<bool, Stop> {
        let Some((mut receipt, spans)) = self.pending.pop_front() else { return Ok(false) };
        let outcomes = tokio::select! {
            biased;
            _ = self.signals.recv() => Err(Stop::Signal),
            r = tokio::time::timeout(wait, &mut receipt) => Ok(r.ok()),
        };
        match outcomes {
            Ok(Some(outcomes)) => {
                self.tally_outcomes(outcomes.into_iter().map(Some), &spans);
                if let Some(last) = spans.last() {
                    self.kept.release_before(last.chunk);
                }
                Ok(true)
            }
            Ok(None) => {
                self.pending.push_front((receipt, spans));
                Ok(false)
            }
            Err(stop) => {
                self.pending.push_front((receipt, spans));
                Err(stop)
            }
        }
    }

    /// Awaits the oldest receipt and tallies its outcomes.
    async fn settle_oldest(&mut self) -> Result<(), Stop> {
        let Some((mut receipt, spans)) = self.pending.pop_front() else { return Ok(()) };
        // Usually settled already: a timer and the signals only when it is not.
        let first = std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut receipt).poll(cx))).await;
        let outcomes = match first {
            Poll::Ready(o) => Ok(o),
            Poll::Pending => tokio::select! {
                biased;
                _ = self.signals.recv() => Err(Stop::Signal),
                r = tokio::time::timeout(self.close_timeout, &mut receipt) => r.map_err(|_| Stop::Blocked(self.close_timeout)),
            },
        };
        match outcomes {
            Ok(outcomes) => {
                self.tally_outcomes(outcomes.into_iter().map(Some), &spans);
                if let Some(last) = spans.last() {
                    self.kept.release_before(last.chunk);
                }
                Ok(())
            }
            Err(stop) => {
                self.pending.push_front((receipt, spans));
                Err(stop)
            }
        }
    }

    /// Tallies the outcomes of the events at `spans`; an event without one (`None`, or missing)
    /// is of unknown outcome and goes to the undelivered file.
    fn tally_outcomes(&mut self, outcomes: impl Iterator<Item = Option<Outcome>>, spans: &[Kept]) {
        self.outstanding = self.outstanding.saturating_sub(spans.len());
        let mut outcomes = outcomes.fuse();
        for k in spans {
            match outcomes.next().flatten() {
                Some(o) => self.tally.settle(|| self.kept.get(*k), o),
                None => {
                    self.tally.unknown += 1;
                    let (bytes, ts) = self.kept.get(*k);
                    self.tally.undeliver(bytes, ts);
                }
            }
        }
    }

    /// Closes the broker and settles every receipt. `signals` more signals stop the wait (what
    /// is still open then counts as unknown). Returns how many signals came meanwhile.
    async fn close(&mut self, mut signals: u32) -> u32 {
        let broker = self.broker;
        let mut got = 0;
        let mut close = std::pin::pin!(broker.close());
        let closed = loop {
            tokio::select! {
                biased;
                _ = self.signals.recv() => {
                    got += 1;
                    signals = signals.saturating_sub(1);
                    if signals == 0 {
                        self.give_up_pending();
                        return got;
                    }
                    eprintln!("broker: closing (another signal exits at once)");
                }
                r = &mut close => break r,
            }
        };
        match closed {
            Err(e) => {
                self.tally.first_failure.get_or_insert(format!("close failed: {e}"));
            }
            // The spool also holds events of earlier runs that are not delivered yet.
            Ok(report) => self.spool_left = report.spooled,
        }
        let until = Instant::now() + SETTLE_AFTER_CLOSE;
        while let Some((mut receipt, spans)) = self.pending.pop_front() {
            let left = until.saturating_duration_since(Instant::now());
            let settled = tokio::select! {
                biased;
                _ = self.signals.recv() => None,
                r = tokio::time::timeout(left, &mut receipt) => r.ok(),
            };
            match settled {
                Some(outcomes) => self.tally_outcomes(outcomes.into_iter().map(Some), &spans),
                None => {
                    self.pending.push_front((receipt, spans));
                    self.give_up_pending();
                    return got + 1;
                }
            }
        }
        got
    }

    /// Every receipt still open: the outcomes known so far are tallied; the others are unknown,
    /// written to the undelivered file (they may have been delivered too: never dropped,
    /// possibly duplicated).
    fn give_up_pending(&mut self) {
        for (mut receipt, spans) in std::mem::take(&mut self.pending) {
            let known = receipt.settled_so_far();
            self.tally_outcomes(known.into_iter(), &spans);
        }
    }
}

/// `undelivered-<UTC timestamp>.jsonl` in the working directory.
pub(crate) fn default_undelivered_path() -> PathBuf {
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rest) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(i64::try_from(days).unwrap_or(0));
    PathBuf::from(format!(
        "undelivered-{y:04}{m:02}{d:02}T{:02}{:02}{:02}Z.jsonl",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    ))
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// Appends `events` to `path`, one Rasa encoding per line, and syncs it.
pub(crate) fn write_undelivered(path: &Path, events: &[Vec<u8>]) -> io::Result<()> {
    let file = OpenOptions::new().create(true).append(true).open(path)?;
    let mut out = io::BufWriter::new(file);
    for e in events {
        out.write_all(e)?;
        out.write_all(b"\n")?;
    }
    out.into_inner().map_err(io::IntoInnerError::into_error)?.sync_all()
}

pub(crate) async fn publish(backend: &dyn Backend, args: Args) -> Result<u8, Failure> {
    let Args { files, skip_invalid, undelivered, metrics_addr } = args;
    let inputs: Vec<Option<PathBuf>> = if files.is_empty() {
        vec![None]
    } else {
        files.iter().map(|f| Some(f.clone()).filter(|p| p.as_path() != Path::new("-"))).collect()
    };
    let total: Option<u64> =
        inputs.iter().map(|i| i.as_ref().and_then(|p| std::fs::metadata(p).ok()).map(|m| m.len())).sum::<Option<u64>>();
    let job = Job { undelivered, metrics_addr, options: PublishOptions::default(), total_bytes: total };
    let done = drive(backend, job, |bar| spawn_reader(inputs, skip_invalid, bar)).await?;
    Ok(done.code)
}

/// What a [`drive`] run is given besides its input.
pub(crate) struct Job {
    /// `--undelivered`.
    pub(crate) undelivered: Option<PathBuf>,
    /// `--metrics-addr`.
    pub(crate) metrics_addr: Option<std::net::SocketAddr>,
    /// Options (headers) for every event.
    pub(crate) options: PublishOptions,
    /// The input's size, for the progress bar (`None`: a spinner with the count).
    pub(crate) total_bytes: Option<u64>,
}

/// How a [`drive`] run ended.
pub(crate) struct Done {
    /// The exit code.
    pub(crate) code: u8,
    /// Where an export resumes to send what was not delivered (or not read): the lowest resume
    /// timestamp of the events not delivered, else that of the last event read when the run
    /// stopped early; `None` when everything was delivered.
    pub(crate) resume_at: Option<f64>,
}

/// Connects, publishes what `start` reads (it is started once connected, with the progress
/// bar), closes, writes the undelivered file and prints the summary: the one publish loop of
/// `broker publish` and `broker export`.
pub(crate) async fn drive(
    backend: &dyn Backend,
    job: Job,
    start: impl FnOnce(ProgressBar) -> tokio::sync::mpsc::Receiver<Chunk>,
) -> Result<Done, Failure> {
    let Job { undelivered, metrics_addr, options, total_bytes } = job;
    // Before anything is recorded.
    let metrics = match metrics_addr {
        Some(addr) => Some((addr, crate::serve::install().map_err(|e| Failure::new(code::CONFIG, e))?)),
        None => None,
    };
    let signals =
        Signals::new().map_err(|e| Failure::new(code::UNDELIVERED, anyhow::anyhow!("cannot watch signals: {e}")))?;
    let broker: std::sync::Arc<dyn EventBroker> = match backend.connect().await {
        Ok(b) => b.into(),
        Err(e) => {
            eprintln!("broker: read 0 events, delivered 0, failed 0, undelivered 0 (nothing was published)");
            return Err(crate::connect_failure(backend, e));
        }
    };
    if let Some((addr, handle)) = metrics {
        let ready = crate::serve::Readiness::Broker(broker.clone());
        crate::serve::serve(addr, handle, ready).await.map_err(|e| Failure::new(code::CONFIG, e))?;
    }
    let bar = progress(total_bytes);
    let started = Instant::now();
    let mut run = Run {
        broker: broker.as_ref(),
        close_timeout: backend.close_timeout(),
        pending: VecDeque::new(),
        outstanding: 0,
        kept: Buffers::default(),
        tally: Tally::default(),
        signals,
        options,
        spool_left: 0,
        durable: broker.durable(),
    };
    let mut stop: Option<Stop> = None;
    let mut chunks = start(bar.clone());
    // With a spool, chunks parsed meanwhile go into one publish (one sync for all of them).
    let gather = if run.durable { run.broker.atomic_batch().max(1) } else { CHUNK };

    'chunks: loop {
        let chunk = tokio::select! {
            biased;
            _ = run.signals.recv() => {
                stop = Some(Stop::Signal);
                break 'chunks;
            }
            c = chunks.recv() => c,
        };
        let Some(mut items) = chunk else {
            stop = Some(Stop::Input("the input reader stopped before the end (it failed)".into()));
            break;
        };
        let room = gather.max(items.len());
        let (mut events, mut spans) = (Vec::with_capacity(room), Vec::with_capacity(room));
        let mut input_stop = None;
        let mut ended = false;
        loop {
            let (chunk, mut bytes) = run.kept.next();
            for item in items {
                match item {
                    Item::Event(e, ts) => {
                        let start = bytes.len();
                        e.write_json(&mut bytes);
                        spans.push(Kept { chunk, start, end: bytes.len(), ts });
                        events.push(e);
                        if !ts.is_nan() {
                            run.tally.last_read = Some(ts);
                        }
                    }
                    Item::Skipped(why) => {
                        run.tally.skipped += 1;
                        bar.suspend(|| eprintln!("skipped {why}"));
                    }
                    Item::Stop(why) => {
                        input_stop = Some(Stop::Input(why));
                        break;
                    }
                    Item::End => ended = true,
                }
            }
            run.kept.push(bytes);
            if input_stop.is_some() || ended || events.len() + CHUNK > gather {
                break;
            }
            // Chunks the reader has parsed meanwhile go in the same publish, up to `gather`.
            match chunks.try_recv() {
                Ok(next) => items = next,
                Err(_) => break,
            }
        }
        let first = run.tally.read + 1;
        run.tally.read += events.len() as u64;
        if let Err(why) = run.publish(events, spans, first).await {
            stop = Some(why);
            break 'chunks;
        }
        if input_stop.is_some() {
            stop = input_stop;
            break 'chunks;
        }
        if ended {
            break 'chunks;
        }
        bar.set_message(format!("{} events", run.tally.read));
    }
    // Stops the reader if it is still going.
    drop(chunks);
    let signalled = matches!(stop, Some(Stop::Signal));
    match &stop {
        Some(Stop::Signal) => bar.suspend(|| {
            eprintln!("broker: interrupted: stopped reading; closing (a second signal exits at once)")
        }),
        Some(Stop::Blocked(d)) => bar.suspend(|| {
            eprintln!("broker: publishing has been blocked for {d:?} (the service is not taking events): stopped reading; closing")
        }),
        _ => {}
    }
    // After a signal, one more exits at once; otherwise the first one means "stop", the second
    // "exit now".
    let late_signals = run.close(if signalled { 1 } else { 2 }).await;
    // The events never accepted come after every event accepted before them.
    let refused = std::mem::take(&mut run.tally.refused);
    run.tally.undelivered.extend(refused);
    bar.finish_and_clear();
    let Run { mut tally, spool_left, .. } = run;
    tally.spooled = tally.spooled.max(spool_left);
    let file = (!tally.undelivered.is_empty()).then(|| undelivered.clone().unwrap_or_else(default_undelivered_path));
    let written = match &file {
        Some(path) => match write_undelivered(path, &tally.undelivered) {
            Ok(()) => Ok(Some(path.clone())),
            Err(e) => Err(format!("writing the undelivered events to {}: {e}", path.display())),
        },
        None => Ok(None),
    };
    let secs = started.elapsed().as_secs_f64();
    let rate = if secs > 0.0 { tally.delivered as f64 / secs } else { 0.0 };
    let mut summary = format!(
        "broker: read {} events, delivered {}, failed {}, undelivered {}",
        tally.read,
        tally.delivered,
        tally.failed,
        tally.undelivered.len()
    );
    if let Ok(Some(path)) = &written {
        summary.push_str(&format!(" (written to {})", path.display()));
    }
    if tally.unknown > 0 {
        summary
            .push_str(&format!(", of which {} of unknown outcome (they may have been delivered too)", tally.unknown));
    }
    if tally.skipped > 0 {
        summary.push_str(&format!(", skipped {} invalid lines", tally.skipped));
    }
    if tally.spooled > 0 {
        summary.push_str(&format!(
            ", {} wait in the disk spool (sent when the service is back: at the next run)",
            tally.spooled
        ));
    }
    summary.push_str(&format!(" in {secs:.2} s ({rate:.0} events/s) to {}", backend.describe()));
    eprintln!("{summary}");
    if let Some(first) = &tally.first_failure {
        eprintln!("broker: first failure: {first}");
    }
    if let Err(why) = &written {
        eprintln!("error: {why}");
    }
    let stopped = stop.is_some();
    if let Some(Stop::Input(why) | Stop::Refused(why)) = stop {
        eprintln!("error: {why}");
    }
    let resume_at = tally.resume_at.or(if stopped { tally.last_read } else { None });
    if signalled || late_signals > 0 {
        return Ok(Done { code: code::INTERRUPTED, resume_at });
    }
    let clean = tally.undelivered.is_empty() && tally.spooled == 0 && written.is_ok() && !stopped;
    Ok(Done { code: if clean { code::OK } else { code::UNDELIVERED }, resume_at })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
        assert_eq!(civil_from_days(20_788), (2026, 12, 1));
    }

    #[test]
    fn reading_stdin_line_splitting_handles_crlf() {
        let data = b"a\r\nb\n";
        let mut r = BufReader::new(&data[..]);
        let mut line = Vec::new();
        r.read_until(b'\n', &mut line).unwrap();
        let text = line.strip_suffix(b"\n").unwrap_or(&line);
        assert_eq!(text.strip_suffix(b"\r").unwrap_or(text), b"a");
    }
}
