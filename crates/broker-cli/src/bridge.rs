//! `broker bridge --from FROM.yml --to TO.yml`: consume from the `event_broker:` of FROM and
//! publish to the `event_broker:` of TO, any pair of backends, at least once and in order.
//!
//! A consumed event is acknowledged at the source (Kafka offset, RabbitMQ ack, the checkpoint of
//! a file or SQL source) only once TO confirmed it, and acknowledgements go in consumption order:
//! the acknowledged part of the stream is always a prefix of what was delivered. Events filtered
//! out (`--events`, the time range) are acknowledged in their turn. An event TO rejects as its
//! own fault (too large, refused by the service) is written to the dead-letter file
//! (`--undelivered`) and then acknowledged, so one bad event does not stop the stream; any other
//! failure (TO unavailable past `close_timeout`) stops the bridge with that event and everything
//! after it unacknowledged: they come again at the next start. A restart therefore repeats at most
//! the events in flight (`WINDOW`) plus those confirmed since the last checkpoint write
//! (`CHECKPOINT_EVERY`); the event ids stay the same where the source carries them (Kafka's
//! `rasa-event-id`).
//!
//! Sources without a server-side position (file, SQL) keep theirs in `--checkpoint PATH`: the
//! position after the last acknowledged event, written atomically (temporary file, fsync,
//! rename). The bytes never change on the way: the event read is the event published.

use std::collections::VecDeque;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::Poll;
use std::time::{Duration, Instant};

use anyhow::anyhow;
use broker_core::tracker::ExportQuery;
use broker_core::{Error, EventBroker, Outcome, PublishOptions, Receipt, Received, SourceOptions, StartFrom};

use crate::publish::Signals;
use crate::{Failure, code, connect_failure, progress};

/// Events published and not yet confirmed, at most.
const WINDOW: usize = 4_096;

/// The checkpoint is written once this many more events are acknowledged (or `CHECKPOINT_AFTER`
/// passed), and when the bridge stops.
const CHECKPOINT_EVERY: u64 = 1_024;
const CHECKPOINT_AFTER: Duration = Duration::from_millis(200);

/// RabbitMQ prefetch for the bridge: room for the whole window.
const PREFETCH: u16 = 8_192;

/// `broker bridge`'s arguments.
pub(crate) struct Args {
    pub(crate) from: PathBuf,
    pub(crate) to: PathBuf,
    pub(crate) checkpoint: Option<PathBuf>,
    pub(crate) group: String,
    pub(crate) from_beginning: bool,
    pub(crate) until_end: bool,
    pub(crate) limit: Option<u64>,
    pub(crate) events: Option<String>,
    pub(crate) minimum_timestamp: Option<f64>,
    pub(crate) maximum_timestamp: Option<f64>,
    pub(crate) undelivered: Option<PathBuf>,
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

/// Waits until the oldest held event has its outcome; at once when nothing is held.
async fn front_done(held: &mut VecDeque<Held>) {
    if let Some(front) = held.front_mut() {
        std::future::poll_fn(|cx| front.poll_done(cx)).await;
    }
}

/// Where a file or SQL source stands, kept across runs.
struct Checkpoint {
    path: PathBuf,
    backend: &'static str,
}

impl Checkpoint {
    /// The saved position, if any. A checkpoint of another backend type is an error.
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
        let backend = object.get("backend").and_then(|v| v.as_str()).ok_or_else(|| bad("no backend"))?;
        if backend != self.backend {
            return Err(Failure::new(
                code::CONFIG,
                anyhow!("the checkpoint {} belongs to a {backend} source, not {}", self.path.display(), self.backend),
            ));
        }
        match object.get("next") {
            Some(broker_core::json::Value::Number(broker_core::json::Number::Int(n))) if *n >= 0 => Ok(Some(*n as u64)),
            _ => Err(bad("no position")),
        }
    }

    /// Replaces the checkpoint atomically.
    fn save(&self, next: u64) -> std::io::Result<()> {
        let dir = self.path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let name = self.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let tmp = dir.join(format!(".{name}.tmp"));
        {
            let mut f = std::fs::File::create(&tmp)?;
            writeln!(f, "{{\"backend\": \"{}\", \"next\": {next}}}", self.backend)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, &self.path)?;
        // The rename itself survives a crash once the directory is synced.
        std::fs::File::open(dir).and_then(|d| d.sync_all())
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
    acked: u64,
    first_failure: Option<String>,
    /// The dead-letter lines (rejected events), in order.
    dead: Vec<Vec<u8>>,
}

/// What is still open when the bridge stops.
enum Stop {
    Signal,
    Failed,
    Source(String),
}

pub(crate) async fn bridge(args: Args) -> Result<u8, Failure> {
    let from = crate::resolve_backend(Some(&args.from)).map_err(Failure::config)?;
    let to = crate::resolve_backend(Some(&args.to)).map_err(Failure::config)?;
    let types: Option<Vec<String>> =
        args.events.as_deref().map(|s| s.split(',').map(|t| t.trim().to_owned()).filter(|t| !t.is_empty()).collect());
    let range = ExportQuery::all().minimum_timestamp(args.minimum_timestamp).maximum_timestamp(args.maximum_timestamp);
    let ranged = args.minimum_timestamp.is_some() || args.maximum_timestamp.is_some();
    let keeps_position = matches!(from.name(), "file" | "sql");
    let checkpoint = match (&args.checkpoint, keeps_position) {
        (Some(path), true) => Some(Checkpoint { path: path.clone(), backend: from.name() }),
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
    let mut source = match from.source(&options).await {
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
    let mut tally = Tally::default();
    let mut held: VecDeque<Held> = VecDeque::new();
    let mut next_position: Option<u64> = None;
    let mut saved_at = (tally.acked, Instant::now());
    let mut stop: Option<Stop> = None;
    let close_timeout = to.close_timeout();

    // Acknowledges the settled front of `held`, in order. `Err(())`: an event failed for a reason
    // that is not its own; it and what follows stay unacknowledged.
    macro_rules! settle_front {
        () => {{
            let mut result = Ok(());
            while let Some(front) = held.front_mut() {
                let ready = std::future::poll_fn(|cx| Poll::Ready(front.poll_done(cx))).await;
                if ready.is_pending() {
                    break;
                }
                match &front.state {
                    State::Filtered => tally.filtered += 1,
                    State::Done(Ok(_)) => tally.delivered += 1,
                    State::Done(Err(e @ Error::Rejected { .. })) => {
                        tally.rejected += 1;
                        tally.first_failure.get_or_insert_with(|| e.to_string());
                        tally.dead.push(front.received.event.to_json());
                    }
                    State::Done(Err(e)) => {
                        tally.first_failure.get_or_insert_with(|| e.to_string());
                        result = Err(());
                        break;
                    }
                    State::Waiting(_) => break,
                }
                let Some(Held { received, .. }) = held.pop_front() else { break };
                if let Err(e) = source.ack(&received).await {
                    tally.first_failure.get_or_insert_with(|| format!("acknowledging at the source: {e}"));
                    result = Err(());
                    break;
                }
                tally.acked += 1;
                if received.next_offset.is_some() {
                    next_position = received.next_offset;
                }
            }
            if let (Some(c), Some(next)) = (&checkpoint, next_position) {
                if tally.acked - saved_at.0 >= CHECKPOINT_EVERY
                    || (tally.acked > saved_at.0 && saved_at.1.elapsed() >= CHECKPOINT_AFTER)
                {
                    if let Err(e) = c.save(next) {
                        tally
                            .first_failure
                            .get_or_insert_with(|| format!("writing the checkpoint {}: {e}", c.path.display()));
                        result = Err(());
                    }
                    saved_at = (tally.acked, Instant::now());
                }
            }
            result
        }};
    }

    let mut backoff = broker_core::backoff::Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    while stop.is_none() {
        if settle_front!().is_err() {
            stop = Some(Stop::Failed);
            break;
        }
        if args.limit.is_some_and(|l| tally.consumed >= l) {
            break;
        }
        // A full window waits for the oldest outcome (or a signal) before reading more.
        if held.len() >= WINDOW {
            tokio::select! {
                biased;
                _ = signals.recv() => stop = Some(Stop::Signal),
                r = tokio::time::timeout(close_timeout, front_done(&mut held)) => {
                    if r.is_err() {
                        tally.first_failure.get_or_insert_with(|| format!("{} confirmed nothing for {close_timeout:?}", to.describe()));
                        stop = Some(Stop::Failed);
                    }
                }
            }
            continue;
        }
        let next = tokio::select! {
            biased;
            _ = signals.recv() => { stop = Some(Stop::Signal); break; }
            n = source.next() => n,
        };
        let received = match next {
            Ok(Some(r)) => r,
            Ok(None) => break,
            Err(e @ Error::Malformed { .. }) => {
                tally.malformed += 1;
                bar.suspend(|| eprintln!("broker: skipping {e}"));
                continue;
            }
            Err(e) if e.is_temporary() && !args.until_end => {
                let delay = backoff.next_delay();
                bar.suspend(|| eprintln!("broker: {e}; trying again in {delay:.1?}"));
                tokio::select! {
                    biased;
                    _ = signals.recv() => stop = Some(Stop::Signal),
                    _ = tokio::time::sleep(delay) => {}
                }
                continue;
            }
            Err(e) => {
                stop = Some(Stop::Source(format!("consuming from {}: {e}", from.describe())));
                break;
            }
        };
        backoff.reset();
        tally.consumed += 1;
        let event = &received.event;
        let wanted = types.as_ref().is_none_or(|t| t.iter().any(|t| t == event.event_type()))
            && (!ranged || event.timestamp().is_some_and(|ts| range.admits_timestamp(ts)));
        let state = if wanted {
            let publish = broker.publish_with(received.event.clone(), PublishOptions::default());
            let accepted = tokio::select! {
                biased;
                _ = signals.recv() => None,
                r = tokio::time::timeout(close_timeout, publish) => Some(r),
            };
            match accepted {
                None => {
                    stop = Some(Stop::Signal);
                    break;
                }
                Some(Ok(Ok(receipt))) => State::Waiting(receipt),
                Some(Ok(Err(e))) => {
                    tally.first_failure.get_or_insert_with(|| format!("publish refused: {e}"));
                    stop = Some(Stop::Failed);
                    break;
                }
                Some(Err(_)) => {
                    tally
                        .first_failure
                        .get_or_insert_with(|| format!("publishing has been blocked for {close_timeout:?}"));
                    stop = Some(Stop::Failed);
                    break;
                }
            }
        } else {
            State::Filtered
        };
        held.push_back(Held { received, state });
        if tally.consumed % 512 == 0 {
            bar.set_position(tally.consumed);
        }
    }
    if matches!(stop, Some(Stop::Signal)) {
        bar.suspend(|| {
            eprintln!(
                "broker: interrupted: stopped reading; delivering what is in flight (a second signal exits at once)"
            )
        });
    }
    // Deliver what is in flight, then acknowledge what was confirmed.
    let closed = tokio::select! {
        biased;
        _ = signals.recv() => None,
        r = broker.close() => Some(r),
    };
    match closed {
        Some(Ok(_)) => {}
        Some(Err(e)) => {
            tally.first_failure.get_or_insert_with(|| format!("close failed: {e}"));
        }
        None => stop = Some(Stop::Signal),
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    while !held.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        if tokio::time::timeout(left, front_done(&mut held)).await.is_err() {
            break;
        }
        if settle_front!().is_err() {
            if stop.is_none() {
                stop = Some(Stop::Failed);
            }
            break;
        }
    }
    let unacked = held.len() as u64;
    if let (Some(c), Some(next)) = (&checkpoint, next_position)
        && let Err(e) = c.save(next)
    {
        tally.first_failure.get_or_insert_with(|| format!("writing the checkpoint {}: {e}", c.path.display()));
    }
    drop(held);
    let source_closed = source.close().await;
    bar.finish_and_clear();
    let dead_file = (!tally.dead.is_empty())
        .then(|| args.undelivered.clone().unwrap_or_else(crate::publish::default_undelivered_path));
    let dead_written = match &dead_file {
        Some(path) => {
            crate::publish::write_undelivered(path, &tally.dead).map_err(|e| format!("writing {}: {e}", path.display()))
        }
        None => Ok(()),
    };
    let secs = started.elapsed().as_secs_f64();
    let rate = if secs > 0.0 { tally.delivered as f64 / secs } else { 0.0 };
    let mut summary = format!(
        "broker: consumed {} events, delivered {}, filtered out {}, rejected {}",
        tally.consumed, tally.delivered, tally.filtered, tally.rejected
    );
    if let Some(path) = &dead_file {
        summary.push_str(&format!(" (written to {})", path.display()));
    }
    if unacked > 0 {
        summary.push_str(&format!(", {unacked} left unacknowledged at the source (they come again)"));
    }
    if tally.malformed > 0 {
        summary.push_str(&format!(", skipped {} malformed", tally.malformed));
    }
    summary.push_str(&format!(" in {secs:.2} s ({rate:.0} events/s) from {} to {}", from.describe(), to.describe()));
    eprintln!("{summary}");
    if let Some(first) = &tally.first_failure {
        eprintln!("broker: first failure: {first}");
    }
    if let Err(why) = &dead_written {
        eprintln!("error: {why}");
    }
    if let Err(e) = &source_closed {
        eprintln!("error: closing the source: {e}");
    }
    match stop {
        Some(Stop::Signal) => Ok(code::INTERRUPTED),
        Some(Stop::Source(why)) => Err(Failure::new(code::UNDELIVERED, anyhow!(why))),
        Some(Stop::Failed) => Ok(code::UNDELIVERED),
        None => {
            let clean = tally.first_failure.is_none()
                && tally.rejected == 0
                && unacked == 0
                && dead_written.is_ok()
                && source_closed.is_ok();
            Ok(if clean { code::OK } else { code::UNDELIVERED })
        }
    }
}
