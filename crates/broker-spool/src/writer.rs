//! The spool's writer thread: appends what publishers hand it, syncs once for all of it (a group
//! commit), then passes the spooled events to the forwarder in sequence order, and records the
//! forwarder's acknowledgements.

use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};
use std::time::Instant;

use broker_core::{Error, Event};
use tokio::sync::{mpsc, oneshot};

use crate::config::Fsync;
use crate::log::{LogError, Record, SpoolLog};
use crate::record::encode_into;
use crate::spooled::{Forward, NAME, Shared, spool_error};

/// Requests taken from the channel at once, at most (one sync for all of them).
const GROUP: usize = 4_096;

/// The writer's answer to an append: all spooled, or why not, with the events that were not
/// (the last ones) handed back.
pub(crate) type Appended = Result<(), (Error, Vec<Event>)>;

/// What the writer thread is asked.
pub(crate) enum Cmd {
    /// Append these events (each with the options it was published with), in order. Each item's
    /// record is encoded here, on the writer thread, straight into the log's buffer; the item
    /// gets its sequence and goes on to the forwarder as it is.
    Append { items: Vec<Forward>, reply: oneshot::Sender<Appended> },
    /// Every sequence below this one is confirmed.
    Ack(u64),
    /// Up to `max` records from sequence `from` on (events the forwarder does not hold in
    /// memory: replayed, sent again, or spooled while it was far behind).
    Read { from: u64, max: usize, reply: oneshot::Sender<Result<Vec<Record>, LogError>> },
    /// Write out (and sync, with `fsync: batch`), release the directory, say so.
    Close(oneshot::Sender<()>),
}

/// One append request as handled: the events appended (as they go to the forwarder), why the
/// rest were not, and where the answer goes.
struct Request {
    done: Vec<Forward>,
    error: Option<(Error, Vec<Event>)>,
    reply: oneshot::Sender<Appended>,
}

/// Runs until [`Cmd::Close`] or until every sender is gone.
pub(crate) fn run(
    mut log: SpoolLog,
    mut rx: mpsc::Receiver<Cmd>,
    forward: mpsc::UnboundedSender<Vec<Forward>>,
    shared: Arc<Shared>,
    fsync: Fsync,
) {
    let mut batch = Vec::with_capacity(GROUP);
    // When each run of sequences was spooled (the first sequence of a group, the time), for the
    // oldest waiting event's age; what a previous process left counts from now.
    let mut spooled_at: std::collections::VecDeque<(u64, Instant)> = std::collections::VecDeque::new();
    if log.pending_events() > 0 {
        spooled_at.push_back((log.acked(), Instant::now()));
    }
    while let Some(first) = rx.blocking_recv() {
        batch.push(first);
        while batch.len() < GROUP {
            match rx.try_recv() {
                Ok(cmd) => batch.push(cmd),
                Err(_) => break,
            }
        }
        let mut requests: Vec<Request> = Vec::new();
        // Once an append failed, the later ones in this group are not tried (the log rolled
        // back to its last good record).
        let mut failed: Option<String> = None;
        let mut close = None;
        for cmd in batch.drain(..) {
            match cmd {
                Cmd::Append { mut items, reply } => {
                    let mut error: Option<Error> = None;
                    let mut appended = 0;
                    for f in items.iter_mut() {
                        if let Some(why) = &failed {
                            error = Some(Error::Io {
                                backend: NAME,
                                operation: "spooling".into(),
                                reason: why.clone(),
                                cause: None,
                            });
                            break;
                        }
                        let Some((event, options)) = f.body.as_ref() else {
                            // Not one publishes make: refused, never dropped unsaid.
                            error = Some(Error::Io {
                                backend: NAME,
                                operation: "spooling".into(),
                                reason: "an event without its bytes".into(),
                                cause: None,
                            });
                            break;
                        };
                        match log.append_with(|out| encode_into(event, options, out)) {
                            Ok(seq) => {
                                f.seq = seq;
                                appended += 1;
                            }
                            Err(e) => {
                                failed = Some(e.to_string());
                                error = Some(spool_error(e));
                                break;
                            }
                        }
                    }
                    // The one that failed and those after it are handed back, in order.
                    let rest = items.split_off(appended);
                    let error = error.map(|e| (e, rest.into_iter().filter_map(Forward::into_event).collect()));
                    requests.push(Request { done: items, error, reply });
                }
                Cmd::Ack(upto) => {
                    if let Err(e) = log.ack(upto) {
                        tracing::warn!("spool: recording confirmed events failed (they may be sent again): {e}");
                    }
                }
                Cmd::Read { from, max, reply } => {
                    let _ = reply.send(log.read_from(from, max));
                }
                Cmd::Close(reply) => close = Some(reply),
            }
        }
        let synced = match fsync {
            Fsync::Batch => log.sync(),
            Fsync::Never => log.flush(),
        };
        if requests.iter().any(|r| !r.done.is_empty()) {
            let first = requests.iter().find_map(|r| r.done.first()).map_or(0, |f| f.seq);
            spooled_at.push_back((first, Instant::now()));
        }
        // A failed write or sync rolled the log back to its last good write: what is below
        // `good` is in the log, what is not was never spooled (its sequence is used again).
        let good = log.next_seq();
        let sync_error = synced.err().map(|e| format!("syncing the spool: {e}"));
        // Counted before the answers: a publisher gives its room back once answered.
        shared.bytes.store(log.bytes(), Ordering::Release);
        for Request { mut done, error, reply } in requests {
            let dropped = done.split_off(done.partition_point(|f| f.seq < good));
            // The forwarder first, so it sees events in sequence order.
            if !done.is_empty() {
                let _ = forward.send(done);
            }
            if dropped.is_empty() && error.is_none() {
                let _ = reply.send(Ok(()));
                continue;
            }
            let (error, rest) = match error {
                Some((e, rest)) => (e, rest),
                None => {
                    let why = sync_error.clone().unwrap_or_else(|| "the spool rolled a failed write back".into());
                    (Error::Io { backend: NAME, operation: "spooling".into(), reason: why, cause: None }, Vec::new())
                }
            };
            // Handed back: the events rolled back, then those never tried, in order.
            let mut back: Vec<Event> = dropped.into_iter().filter_map(Forward::into_event).collect();
            back.extend(rest);
            let _ = reply.send(Err((error, back)));
        }
        // The runs wholly confirmed (or rolled back) are forgotten.
        while spooled_at.get(1).is_some_and(|(first, _)| *first <= log.acked())
            || (log.pending_events() == 0 && !spooled_at.is_empty())
        {
            spooled_at.pop_front();
        }
        *shared.oldest.lock().unwrap_or_else(PoisonError::into_inner) = spooled_at.front().map(|(_, at)| *at);
        shared.pending.store(log.pending_events(), Ordering::Relaxed);
        shared.room.notify_waiters();
        shared.record();
        if let Some(reply) = close {
            // `fsync: never` syncs nothing, at close neither (the kernel writes it out).
            let _ = match fsync {
                Fsync::Batch => log.sync(),
                Fsync::Never => log.flush(),
            };
            drop(log); // releases the directory's lock before saying so
            let _ = reply.send(());
            // Appends that came after the close are handed back, not spooled.
            rx.close();
            while let Ok(cmd) = rx.try_recv() {
                if let Cmd::Append { items, reply, .. } = cmd {
                    let _ =
                        reply.send(Err((Error::Closed, items.into_iter().filter_map(Forward::into_event).collect())));
                }
            }
            return;
        }
    }
}
