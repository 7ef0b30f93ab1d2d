//! `broker bridge --from FROM.yml --to TO.yml`: consume from the `event_broker:` of FROM and
//! publish to the `event_broker:` of TO, any pair of backends, at least once and in order.
//!
//! A consumed event is acknowledged at the source (Kafka offset, RabbitMQ ack, the checkpoint of
//! a file or SQL source) only once TO confirmed it, and acknowledgements go in consumption order:
//! the acknowledged part of the stream is always a prefix of what was delivered. Events filtered
//! out (`--events`, the time range) are acknowledged in their turn. An event TO rejects as its
//! own fault (too large, refused by the service) is appended and synced to the dead-letter file
//! (`--undelivered`) and only then acknowledged, so one bad event does not stop the stream and
//! none is lost; any other failure (TO unavailable past `close_timeout`) stops the bridge with
//! that event and everything after it unacknowledged: they come again at the next start. A
//! restart therefore repeats at most the events in flight (`WINDOW`) plus those confirmed since
//! the last checkpoint write (`CHECKPOINT_EVERY`, `CHECKPOINT_AFTER`). Repeats keep their event
//! id: Kafka sources carry it (`rasa-event-id`); for file and SQL sources it is derived from the
//! source and the event's position.
//!
//! Sources without a server-side position (file, SQL) keep theirs in `--checkpoint PATH`: the
//! source it belongs to and the position after the last acknowledged event, written atomically
//! (temporary file, fsync, rename). The bytes never change on the way: the event read is the
//! event published.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::Poll;
use std::time::{Duration, Instant};

use anyhow::anyhow;
use broker_core::json::{Number, Value};
use broker_core::tracker::ExportQuery;
use broker_core::{
    Backend, Error, EventBroker, EventId, EventSource, Outcome, PublishOptions, Receipt, Received, SourceOptions,
    StartFrom,
};
use indicatif::ProgressBar;

use crate::publish::Signals;
use crate::{Failure, code, connect_failure, progress};

/// Events published and not yet confirmed, at most.
const WINDOW: usize = 4_096;

/// The checkpoint is written once this many more events are acknowledged, or this long after an
/// acknowledgement it does not cover yet, and when the bridge stops.
const CHECKPOINT_EVERY: u64 = 1_024;
const CHECKPOINT_AFTER: Duration = Duration::from_millis(200);

/// RabbitMQ prefetch for the bridge: room for the whole window.
const PREFETCH: u16 = 8_192;

/// Rasa 3.6's event types, for a warning about a `--events` name none of them has.
const RASA_TYPES: &[&str] = &[
    "user",
    "bot",
    "action",
    "slot",
    "reset_slots",
    "restart",
    "rewind",
    "reminder",
    "cancel_reminder",
    "undo",
    "export",
    "followup",
    "pause",
    "resume",
    "agent",
    "active_loop",
    "loop_interrupted",
    "action_execution_rejected",
    "session_started",
    "user_featurization",
    "entities",
    "stack",
    "wrong_utterance",
    "wrong_action",
];

/// `broker bridge`'s arguments.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// The endpoints file of the source.
    #[arg(long, value_name = "FROM.yml")]
    pub(crate) from: PathBuf,
    /// The endpoints file of the destination.
    #[arg(long, value_name = "TO.yml")]
    pub(crate) to: PathBuf,
    /// Where a file or SQL source's position is kept (required for them; written atomically
    /// after confirmed events). A restart resumes there.
    #[arg(long, value_name = "PATH")]
    pub(crate) checkpoint: Option<PathBuf>,
    /// Kafka consumer group of the source.
    #[arg(long, default_value = "broker-bridge")]
    pub(crate) group: String,
    /// Start at the oldest stored event (a file or SQL source without a checkpoint starts
    /// there anyway).
    #[arg(long)]
    pub(crate) from_beginning: bool,
    /// Stop once caught up with what the source stores (file, SQL, Kafka).
    #[arg(long)]
    pub(crate) until_end: bool,
    /// Stop after this many events consumed.
    #[arg(long, value_name = "N")]
    pub(crate) limit: Option<u64>,
    /// Only these event types (comma-separated, e.g. user,bot,action); the others are
    /// acknowledged and skipped.
    #[arg(long, value_name = "TYPES")]
    pub(crate) events: Option<String>,
    /// Only events with a timestamp >= this.
    #[arg(long, value_name = "TIMESTAMP", allow_negative_numbers = true)]
    pub(crate) minimum_timestamp: Option<f64>,
    /// Only events with a timestamp < this.
    #[arg(long, value_name = "TIMESTAMP", allow_negative_numbers = true)]
    pub(crate) maximum_timestamp: Option<f64>,
    /// The dead-letter file: events TO rejected as their own fault, in Rasa's bytes. Default: a
    /// new undelivered-YYYYMMDDTHHMMSSZ.jsonl in the working directory, named on stderr.
    #[arg(long, value_name = "PATH")]
    pub(crate) undelivered: Option<PathBuf>,
    /// Serve Prometheus metrics at http://ADDR/metrics and /ready while bridging.
    #[arg(long, value_name = "ADDR")]
    pub(crate) metrics_addr: Option<std::net::SocketAddr>,
}

/// A consumed event waiting for its turn to be acknowledged.
struct Held {
    received: Received,
    state: State,
}

enum State {
    /// Filtered out: acknowledged in its turn.
    Filtered,
    /// Published; TO has not answered yet.
    Waiting(Receipt),
    /// TO's answer.
    Done(Outcome),
}

impl Held {
    /// Ready once the outcome is known (or there is none to wait for).
    fn poll_done(&mut self, cx: &mut std::task::Context<'_>) -> Poll<()> {
        if let State::Waiting(receipt) = &mut self.state {
            match Pin::new(receipt).poll(cx) {
                Poll::Ready(outcome) => self.state = State::Done(outcome),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(())
    }
}

/// Waits until the oldest held event has its outcome; never when nothing is held.
async fn front_done(held: &mut VecDeque<Held>) {
    match held.front_mut() {
        Some(front) => std::future::poll_fn(|cx| front.poll_done(cx)).await,
        None => std::future::pending().await,
    }
}

/// Where a file or SQL source stands, kept across runs.
struct Checkpoint {
    path: PathBuf,
    /// The source it belongs to (`describe()`, no secrets).
    source: String,
}

impl Checkpoint {
    /// The saved position, if any. A checkpoint of another source is an error.
    fn load(&self) -> Result<Option<u64>, Failure> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(Failure::new(
                    code::CONFIG,
                    anyhow!("cannot read the checkpoint {}: {e}", self.path.display()),
                ));
            }
        };
        let bad = |why: &str| {
            Failure::new(code::CONFIG, anyhow!("the checkpoint {} is not one of ours: {why}", self.path.display()))
        };
        let value = broker_core::json::parse(text.as_bytes()).map_err(|_| bad("not JSON"))?;
        let object = value.as_object().ok_or_else(|| bad("not a JSON object"))?;
        let source = object.get("source").and_then(Value::as_str).ok_or_else(|| bad("no source"))?;
        if source != self.source {
            return Err(Failure::new(
                code::CONFIG,
                anyhow!(
                    "the checkpoint {} belongs to the source {source:?}, not {:?}: give another --checkpoint, or \
                     --from-beginning to start over",
                    self.path.display(),
                    self.source
                ),
            ));
        }
        match object.get("next") {
            Some(Value::Number(Number::Int(n))) if *n >= 0 => Ok(Some(*n as u64)),
            _ => Err(bad("no position")),
        }
    }

    /// Replaces the checkpoint atomically.
    fn save(&self, next: u64) -> std::io::Result<()> {
        let dir = self.path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let name = self.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let tmp = dir.join(format!(".{name}.tmp"));
        {
            let mut f = File::create(&tmp)?;
            let mut line = b"{\"source\": ".to_vec();
            Value::String(self.source.clone()).write_rasa(&mut line);
            line.extend_from_slice(format!(", \"next\": {next}}}\n").as_bytes());
            f.write_all(&line)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, &self.path)?;
        // The rename itself survives a crash once the directory is synced.
        File::open(dir).and_then(|d| d.sync_all())
    }
}

/// The dead-letter file, opened at the first rejected event; each line synced before the event
/// is acknowledged.
struct DeadLetters {
    path: PathBuf,
    file: Option<File>,
}

impl DeadLetters {
    fn append(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        if self.file.is_none() {
            self.file = Some(OpenOptions::new().create(true).append(true).open(&self.path)?);
        }
        let Some(file) = self.file.as_mut() else { return Ok(()) };
        let mut line = Vec::with_capacity(bytes.len() + 1);
        line.extend_from_slice(bytes);
        line.push(b'\n');
        file.write_all(&line)?;
        file.sync_data()
    }
}

/// Counts of a bridge run.
#[derive(Default)]
struct Tally {
    consumed: u64,
    delivered: u64,
    filtered: u64,
    rejected: u64,
    malformed: u64,
    /// Left in TO's disk spool (acknowledged: the spool sends them).
    spooled: u64,
    acked: u64,
    first_failure: Option<String>,
}

/// Why the bridge stopped early.
enum Stop {
    Signal,
    Failed,
    Source(String),
}

/// A stable id for an event of a source that carries none: the source and the position.
fn derived_id(source: &str, received: &Received) -> EventId {
    // FNV-1a, 128 bits: stable across runs and builds (std's hashers promise neither).
    let mut h: u128 = 0x6c62272e07bb014262b821756295c58d;
    let position = received.position.to_string();
    for b in source.bytes().chain([0]).chain(position.bytes()) {
        h ^= u128::from(b);
        h = h.wrapping_mul(0x0000000001000000000000000000013B);
    }
    EventId::from_u128(h)
}

/// The bridge's state while it runs.
struct Bridge<'a> {
    source: Box<dyn EventSource>,
    broker: &'a dyn EventBroker,
    held: VecDeque<Held>,
    tally: Tally,
    checkpoint: Option<Checkpoint>,
    dead: DeadLetters,
    /// The position after the last acknowledged event (file, SQL).
    next_position: Option<u64>,
    /// `(acknowledged events, when)` at the last checkpoint write.
    saved_at: (u64, Instant),
    /// How long one acknowledgement may take.
    ack_timeout: Duration,
}

impl Bridge<'_> {
    /// Acknowledges the settled front of `held`, in order. `Err(())`: an event failed for a
    /// reason that is not its own, or could not be acknowledged or dead-lettered; it and what
    /// follows stay unacknowledged.
    async fn settle_front(&mut self) -> Result<(), ()> {
        while let Some(front) = self.held.front_mut() {
            if std::future::poll_fn(|cx| Poll::Ready(front.poll_done(cx))).await.is_pending() {
                break;
            }
            match &front.state {
                State::Filtered => {}
                // Delivered, or kept in TO's disk spool (durable; it goes out from there).
                State::Done(Ok(_) | Err(Error::Spooled { .. })) => {}
                State::Done(Err(e @ Error::Rejected { .. })) => {
                    let e = e.to_string();
                    if let Err(w) = self.dead.append(&front.received.event.to_json()) {
                        let why = format!("writing the dead-letter file {}: {w}", self.dead.path.display());
                        self.tally.first_failure.get_or_insert(why);
                        return Err(());
                    }
                    self.tally.first_failure.get_or_insert(e);
                }
                State::Done(Err(e)) => {
                    self.tally.first_failure.get_or_insert_with(|| e.to_string());
                    return Err(());
                }
                State::Waiting(_) => break,
            }
            let ack = tokio::time::timeout(self.ack_timeout, self.source.ack(&front.received)).await;
            match ack {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    self.tally.first_failure.get_or_insert_with(|| format!("acknowledging at the source: {e}"));
                    return Err(());
                }
                Err(_) => {
                    let why = format!("acknowledging at the source: no answer within {:?}", self.ack_timeout);
                    self.tally.first_failure.get_or_insert(why);
                    return Err(());
                }
            }
            let Some(done) = self.held.pop_front() else { break };
            match done.state {
                State::Filtered => self.tally.filtered += 1,
                State::Done(Ok(_)) => self.tally.delivered += 1,
                State::Done(Err(Error::Spooled { .. })) => self.tally.spooled += 1,
                _ => self.tally.rejected += 1,
            }
            self.tally.acked += 1;
            if done.received.next_offset.is_some() {
                self.next_position = done.received.next_offset;
            }
        }
        self.save_checkpoint(false)
    }

    /// Writes the checkpoint when due (`force`: whenever it moved).
    fn save_checkpoint(&mut self, force: bool) -> Result<(), ()> {
        let (Some(c), Some(next)) = (&self.checkpoint, self.next_position) else { return Ok(()) };
        let moved = self.tally.acked > self.saved_at.0;
        let due = self.tally.acked - self.saved_at.0 >= CHECKPOINT_EVERY
            || (moved && self.saved_at.1.elapsed() >= CHECKPOINT_AFTER);
        if !(moved && (force || due)) {
            return Ok(());
        }
        self.saved_at = (self.tally.acked, Instant::now());
        c.save(next).map_err(|e| {
            self.tally.first_failure.get_or_insert_with(|| format!("writing the checkpoint {}: {e}", c.path.display()));
        })
    }

    /// Whether a checkpoint write is owed (acknowledgements it does not cover yet).
    fn checkpoint_owed(&self) -> bool {
        self.checkpoint.is_some() && self.tally.acked > self.saved_at.0
    }
}

pub(crate) async fn bridge(args: Args) -> Result<u8, Failure> {
    let from = crate::resolve_backend(Some(&args.from)).map_err(Failure::config)?;
    let to = crate::resolve_backend(Some(&args.to)).map_err(Failure::config)?;
    if from.describe() == to.describe() {
        return Err(Failure::config(anyhow!(
            "--from and --to are the same ({}): the bridge would feed itself",
            from.describe()
        )));
    }
    let types = match args.events.as_deref() {
        None => None,
        Some(s) => {
            let types: Vec<String> = s.split(',').map(|t| t.trim().to_owned()).filter(|t| !t.is_empty()).collect();
            if types.is_empty() {
                return Err(Failure::config(anyhow!(
                    "--events {s:?} names no event type (e.g. --events user,bot,action)"
                )));
            }
            for t in types.iter().filter(|t| !RASA_TYPES.contains(&t.as_str())) {
                eprintln!(
                    "warning: --events: {t:?} is not one of Rasa's event types; events of it pass only if a source has them"
                );
            }
            Some(types)
        }
    };
    if let (Some(min), Some(max)) = (args.minimum_timestamp, args.maximum_timestamp)
        && max < min
    {
        return Err(Failure::config(anyhow!(
            "the maximum timestamp {max} is smaller than the minimum timestamp {min}: nothing would pass"
        )));
    }
    let range = ExportQuery::all().minimum_timestamp(args.minimum_timestamp).maximum_timestamp(args.maximum_timestamp);
    let ranged = args.minimum_timestamp.is_some() || args.maximum_timestamp.is_some();
    let keeps_position = matches!(from.name(), "file" | "sql");
    let checkpoint = match (&args.checkpoint, keeps_position) {
        (Some(path), true) => Some(Checkpoint { path: path.clone(), source: from.describe() }),
        (None, true) => {
            return Err(Failure::config(anyhow!(
                "a {} source keeps no position of its own: give --checkpoint PATH (it is where a restart resumes)",
                from.name()
            )));
        }
        (Some(_), false) => {
            eprintln!("warning: --checkpoint is not used: a {} source keeps its position itself", from.name());
            None
        }
        (None, false) => None,
    };
    let saved = match &checkpoint {
        Some(c) if !args.from_beginning => c.load()?,
        _ => None,
    };
    let start = match (args.from_beginning, saved) {
        (true, _) => StartFrom::Beginning,
        (false, Some(next)) => StartFrom::Offset(next),
        // A file or SQL source seen for the first time is read from its start: a bridge is for
        // moving what is there too.
        (false, None) if keeps_position => StartFrom::Beginning,
        (false, None) => StartFrom::Resume,
    };
    let mut options = SourceOptions::from(start).group(args.group.clone()).follow(!args.until_end);
    options.prefetch = PREFETCH;
    let metrics = match args.metrics_addr {
        Some(addr) => Some((addr, crate::serve::install().map_err(Failure::config)?)),
        None => None,
    };
    let mut signals =
        Signals::new().map_err(|e| Failure::new(code::UNDELIVERED, anyhow!("cannot watch signals: {e}")))?;
    let broker: std::sync::Arc<dyn EventBroker> = match to.connect().await {
        Ok(b) => b.into(),
        Err(e) => return Err(connect_failure(to.as_ref(), e)),
    };
    let source = match from.source(&options).await {
        Ok(s) => s,
        Err(e) => {
            let _ = broker.close().await;
            return Err(connect_failure(from.as_ref(), e));
        }
    };
    if let Some((addr, handle)) = metrics {
        let ready = crate::serve::Readiness::Broker(broker.clone());
        crate::serve::serve(addr, handle, ready).await.map_err(Failure::config)?;
    }
    eprintln!("broker: bridging {} -> {}", from.describe(), to.describe());
    let bar = progress(None);
    let started = Instant::now();
    let dead = DeadLetters {
        path: args.undelivered.clone().unwrap_or_else(crate::publish::default_undelivered_path),
        file: None,
    };
    let close_timeout = to.close_timeout();
    let mut b = Bridge {
        source,
        broker: broker.as_ref(),
        held: VecDeque::new(),
        tally: Tally::default(),
        checkpoint,
        dead,
        next_position: None,
        saved_at: (0, Instant::now()),
        ack_timeout: close_timeout.max(Duration::from_secs(1)),
    };
    let derive_ids = keeps_position.then(|| from.describe());
    let stop = run(&mut b, &mut signals, &bar, &args, types.as_deref(), ranged.then_some(&range), derive_ids).await;
    finish(b, stop, &mut signals, bar, started, from.as_ref(), to.as_ref()).await
}

/// Consumes, publishes and acknowledges until the end, the limit, a signal or a failure.
async fn run(
    b: &mut Bridge<'_>,
    signals: &mut Signals,
    bar: &ProgressBar,
    args: &Args,
    types: Option<&[String]>,
    range: Option<&ExportQuery>,
    derive_ids: Option<String>,
) -> Option<Stop> {
    let close_timeout = b.ack_timeout;
    let mut backoff = broker_core::backoff::Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    loop {
        if b.settle_front().await.is_err() {
            return Some(Stop::Failed);
        }
        if args.limit.is_some_and(|l| b.tally.consumed >= l) {
            return None;
        }
        // A full window waits for the oldest outcome (or a signal) before reading more.
        if b.held.len() >= WINDOW {
            tokio::select! {
                biased;
                _ = signals.recv() => return Some(Stop::Signal),
                r = tokio::time::timeout(close_timeout, front_done(&mut b.held)) => {
                    if r.is_err() {
                        let why = format!("the destination confirmed nothing for {close_timeout:?}");
                        b.tally.first_failure.get_or_insert(why);
                        return Some(Stop::Failed);
                    }
                }
            }
            continue;
        }
        // Reading waits; meanwhile outcomes are acknowledged as they come and the checkpoint is
        // written when owed (sources' `next` may be cancelled without losing an event).
        let owed = b.checkpoint_owed();
        let next = tokio::select! {
            biased;
            _ = signals.recv() => return Some(Stop::Signal),
            _ = front_done(&mut b.held) => continue,
            _ = tokio::time::sleep(CHECKPOINT_AFTER), if owed => {
                if b.save_checkpoint(true).is_err() {
                    return Some(Stop::Failed);
                }
                continue;
            }
            n = b.source.next() => n,
        };
        let mut received = match next {
            Ok(Some(r)) => r,
            Ok(None) => return None,
            Err(e @ Error::Malformed { .. }) => {
                b.tally.malformed += 1;
                bar.suspend(|| eprintln!("broker: skipping {e}"));
                continue;
            }
            Err(e) if e.is_temporary() && !args.until_end => {
                let delay = backoff.next_delay();
                bar.suspend(|| eprintln!("broker: {e}; trying again in {delay:.1?}"));
                tokio::select! {
                    biased;
                    _ = signals.recv() => return Some(Stop::Signal),
                    _ = tokio::time::sleep(delay) => {}
                }
                continue;
            }
            Err(e) => return Some(Stop::Source(format!("consuming: {e}"))),
        };
        backoff.reset();
        b.tally.consumed += 1;
        if let Some(source) = &derive_ids {
            received.event = received.event.clone().with_id(derived_id(source, &received));
        }
        let event = &received.event;
        let wanted = types.is_none_or(|t| t.iter().any(|t| t == event.event_type()))
            && range.is_none_or(|r| event.timestamp().is_some_and(|ts| r.admits_timestamp(ts)));
        let state = if wanted {
            let publish = b.broker.publish_with(received.event.clone(), PublishOptions::default());
            let accepted = tokio::select! {
                biased;
                _ = signals.recv() => None,
                r = tokio::time::timeout(close_timeout, publish) => Some(r),
            };
            match accepted {
                None => return Some(Stop::Signal),
                Some(Ok(Ok(receipt))) => State::Waiting(receipt),
                Some(Ok(Err(e))) => {
                    b.tally.first_failure.get_or_insert_with(|| format!("publish refused: {e}"));
                    return Some(Stop::Failed);
                }
                Some(Err(_)) => {
                    let why = format!("publishing has been blocked for {close_timeout:?}");
                    b.tally.first_failure.get_or_insert(why);
                    return Some(Stop::Failed);
                }
            }
        } else {
            State::Filtered
        };
        b.held.push_back(Held { received, state });
        if b.tally.consumed % 512 == 0 {
            bar.set_position(b.tally.consumed);
        }
    }
}

/// Delivers what is in flight, acknowledges what was confirmed, saves the checkpoint, closes the
/// source and prints the summary. A second signal stops the waiting at once.
async fn finish(
    mut b: Bridge<'_>,
    mut stop: Option<Stop>,
    signals: &mut Signals,
    bar: ProgressBar,
    started: Instant,
    from: &dyn Backend,
    to: &dyn Backend,
) -> Result<u8, Failure> {
    let mut interrupted = matches!(stop, Some(Stop::Signal));
    if interrupted {
        bar.suspend(|| {
            eprintln!(
                "broker: interrupted: stopped reading; delivering what is in flight (a second signal exits at once)"
            )
        });
    }
    let closed = tokio::select! {
        biased;
        _ = signals.recv() => None,
        r = b.broker.close() => Some(r),
    };
    let gave_up = closed.is_none();
    match closed {
        Some(Ok(_)) => {}
        Some(Err(e)) => {
            b.tally.first_failure.get_or_insert_with(|| format!("close failed: {e}"));
        }
        None => interrupted = true,
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    while !b.held.is_empty() && !gave_up {
        let left = deadline.saturating_duration_since(Instant::now());
        let ready = tokio::select! {
            biased;
            _ = signals.recv() => { interrupted = true; break; }
            r = tokio::time::timeout(left, front_done(&mut b.held)) => r,
        };
        if ready.is_err() {
            break;
        }
        if b.settle_front().await.is_err() {
            if stop.is_none() {
                stop = Some(Stop::Failed);
            }
            break;
        }
    }
    let unacked = b.held.len() as u64;
    let saved = b.save_checkpoint(true);
    b.held.clear();
    let source_closed = tokio::time::timeout(b.ack_timeout, b.source.close()).await;
    bar.finish_and_clear();
    let tally = &b.tally;
    let secs = started.elapsed().as_secs_f64();
    let rate = if secs > 0.0 { tally.delivered as f64 / secs } else { 0.0 };
    let mut summary = format!(
        "broker: consumed {} events, delivered {}, filtered out {}, rejected {}",
        tally.consumed, tally.delivered, tally.filtered, tally.rejected
    );
    if tally.rejected > 0 {
        summary.push_str(&format!(" (written to {})", b.dead.path.display()));
    }
    if unacked > 0 {
        summary.push_str(&format!(", {unacked} left unacknowledged at the source (they come again)"));
    }
    if tally.malformed > 0 {
        summary.push_str(&format!(", skipped {} malformed", tally.malformed));
    }
    if tally.spooled > 0 {
        summary.push_str(&format!(", {} wait in the destination's disk spool", tally.spooled));
    }
    summary.push_str(&format!(" in {secs:.2} s ({rate:.0} events/s) from {} to {}", from.describe(), to.describe()));
    eprintln!("{summary}");
    if let Some(first) = &tally.first_failure {
        eprintln!("broker: first failure: {first}");
    }
    let source_closed = match source_closed {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => Err(format!("no answer within {:?}", b.ack_timeout)),
    };
    if let Err(e) = &source_closed {
        eprintln!("error: closing the source: {e}");
    }
    if interrupted {
        return Ok(code::INTERRUPTED);
    }
    match stop {
        Some(Stop::Signal) => Ok(code::INTERRUPTED),
        Some(Stop::Source(why)) => Err(Failure::new(code::UNDELIVERED, anyhow!(why))),
        Some(Stop::Failed) => Ok(code::UNDELIVERED),
        None => {
            let clean = tally.first_failure.is_none()
                && tally.rejected == 0
                && unacked == 0
                && saved.is_ok()
                && source_closed.is_ok();
            Ok(if clean { code::OK } else { code::UNDELIVERED })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_ids_are_stable_and_differ_by_position() {
        let event = broker_core::Event::from_json(br#"{"event": "restart"}"#).unwrap();
        let at = |row| Received::new(event.clone(), Vec::new(), broker_core::Position::Row(row), Some(row as u64));
        assert_eq!(derived_id("sql t", &at(1)), derived_id("sql t", &at(1)));
        assert_ne!(derived_id("sql t", &at(1)), derived_id("sql t", &at(2)));
        assert_ne!(derived_id("sql t", &at(1)), derived_id("sql u", &at(1)));
        assert_eq!(derived_id("sql t", &at(1)).to_string(), "95f02bf8d65939389000f8c5db72a99b", "fixed across builds");
    }
}
