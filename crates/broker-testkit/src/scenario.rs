//! The consumer scenarios only some backends have: a durable position to resume from, holes in
//! the positions, a long transaction elsewhere, rotation of the storage, a queue that reading
//! takes from.
//!
//! A [`Target`] opts in by returning a [`Scene`] whose [`Hooks`] can do these things to its fresh
//! backend; every hook it leaves out makes the scenarios that need it print `SKIPPED` with the
//! reason. A third-party backend gets the same scenarios by implementing the hooks it can.

use std::time::{Duration, Instant};

use broker_core::{Backend, EventSource, QueueChoice, Received, SourceOptions, StartFrom, async_trait};

use crate::{Target, connect, seq_of, user_event};

/// Why a scenario did not run.
pub type Skip = String;

/// A fresh backend and what can be done to it.
pub struct Scene {
    /// The backend, in a namespace of its own.
    pub backend: Box<dyn Backend>,
    /// Its hooks.
    pub hooks: Box<dyn Hooks>,
}

impl Scene {
    /// A backend with no hooks: every scenario is skipped.
    pub fn bare(backend: Box<dyn Backend>) -> Scene {
        Scene { backend, hooks: Box::new(NoHooks) }
    }
}

/// How the storage under a following source changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Rotation {
    /// Renamed away (logrotate's default); the next writer creates it again.
    Rename,
    /// Deleted; the next writer creates it again.
    Delete,
    /// Cut to nothing in place (logrotate's `copytruncate`).
    Truncate,
}

/// What a target can do to the backend of its [`Scene`]. Each hook defaults to "not supported".
#[async_trait]
pub trait Hooks: Send + Sync {
    /// Options for a source that keeps its place across sources, as a consumer that stores its
    /// position does: with `None` it starts at the oldest event, with `Some(r)` it continues
    /// after `r`, the last event acknowledged. Kafka: one consumer group; RabbitMQ: the
    /// configured queue; file and SQL: the position after `r`.
    fn resume(&self, _after: Option<&Received>) -> Result<SourceOptions, Skip> {
        Err("the target has no resume hook".into())
    }

    /// Leaves a permanent hole in the positions between the events written before and those
    /// written after (SQL: an insert that takes an id and rolls back).
    async fn gap(&self) -> Result<(), Skip> {
        Err("the target has no gap hook".into())
    }

    /// Opens a writing transaction elsewhere on the same server (another database) and keeps it
    /// open until the returned guard is dropped.
    async fn hold_elsewhere(&self) -> Result<Box<dyn Send + Sync>, Skip> {
        Err("the target has no hold_elsewhere hook".into())
    }

    /// Rotates the storage the backend writes to.
    async fn rotate(&self, _how: Rotation) -> Result<(), Skip> {
        Err("the target has no rotate hook".into())
    }

    /// How many events the configured queue holds now (RabbitMQ).
    async fn stored(&self) -> Result<u64, Skip> {
        Err("the target has no stored hook".into())
    }
}

/// [`Hooks::resume`] for a backend whose position is the caller's to keep and whose
/// [`StartFrom::Offset`] continues after it: a file's byte offset of the next line, a SQL row id.
pub fn resume_by_position(after: Option<&Received>) -> SourceOptions {
    let Some(r) = after else { return SourceOptions::from(StartFrom::Beginning) };
    let at = match (&r.position, r.next_offset) {
        (_, Some(next)) => next,
        (broker_core::Position::Row(id), None) => u64::try_from(*id).expect("row ids are positive"),
        (other, None) => panic!("no position to resume after in {other:?}"),
    };
    SourceOptions::from(StartFrom::Offset(at))
}

/// The hooks of a target that has none.
pub struct NoHooks;

impl Hooks for NoHooks {}

/// Publishes events `from..to` of `sender` through a new broker, waits for every receipt, closes.
pub(crate) async fn publish(backend: &dyn Backend, sender: &str, from: u64, to: u64) {
    let broker = connect(backend).await;
    let mut receipts = Vec::new();
    for seq in from..to {
        receipts.push(broker.publish(user_event(sender, seq)).await.expect("publish"));
    }
    for r in receipts {
        r.await.expect("delivered");
    }
    broker.close().await.expect("close");
}

/// The next `n` events of a following source (acknowledged) as (sender, seq), within the
/// target's consume timeout.
async fn take(t: &dyn Target, source: &mut Box<dyn EventSource>, n: usize) -> Vec<(String, u64)> {
    let got = crate::next_n(&t.name(), source, n, t.consume_timeout()).await;
    got.iter()
        .map(|r| (r.event.sender_id().unwrap_or_default().to_owned(), seq_of(&r.event).unwrap_or(u64::MAX)))
        .collect()
}

fn seqs(sender: &str, from: u64, to: u64) -> Vec<(String, u64)> {
    (from..to).map(|i| (sender.to_owned(), i)).collect()
}

/// A storm of `timeout(50 µs, next())` with acks while events are published, stopped halfway
/// with one event received and not acknowledged; a new source resuming after the last
/// acknowledged event then sees every event from the unacknowledged one on, in order. Events
/// acknowledged before may come again (at least once), none may be missing.
pub async fn storm_then_resume_sees_every_unacked_event(t: &dyn Target) -> Result<(), Skip> {
    let scene = t.scene().await;
    let first = scene.hooks.resume(None)?;
    let backend: std::sync::Arc<dyn Backend> = scene.backend.into();
    let n = 300u64;
    let mut source = backend.source(&first).await.expect("open a source");
    let publisher = {
        let backend = backend.clone();
        tokio::spawn(async move {
            for chunk in 0..10 {
                publish(backend.as_ref(), "resume", chunk * 30, chunk * 30 + 30).await;
                // A pause between chunks, so the consumer catches up and waits (and is
                // cancelled there) however fast the backend hands events over.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let (mut last_acked, mut unacked, mut cancelled) = (None::<Received>, None::<u64>, 0u64);
    let mut acked = 0u64;
    let deadline = Instant::now() + t.consume_timeout() * 2;
    while unacked.is_none() && Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_micros(50), source.next()).await {
            Ok(Ok(Some(r))) => {
                let seq = seq_of(&r.event).expect("a seq");
                assert_eq!(seq, acked, "{}: in order under the storm", t.name());
                if acked == n / 2 {
                    unacked = Some(seq);
                } else {
                    source.ack(&r).await.expect("ack");
                    acked += 1;
                    last_acked = Some(r);
                }
            }
            Ok(Ok(None)) => panic!("{}: a following source ended after {acked} events", t.name()),
            Ok(Err(e)) => panic!("{}: consuming failed after {acked} events: {e}", t.name()),
            Err(_) => cancelled += 1,
        }
    }
    let unacked = unacked.unwrap_or_else(|| panic!("{}: only {acked} events before the deadline", t.name()));
    assert!(cancelled > 0, "{}: the storm never cancelled a call", t.name());
    source.close().await.expect("close the first source");
    drop(source);
    publisher.await.expect("the publisher");

    let mut resumed = backend.source(&scene.hooks.resume(last_acked.as_ref())?).await.expect("resume");
    let (mut again, mut next) = (0u64, unacked);
    let deadline = Instant::now() + t.consume_timeout();
    while next < n {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, resumed.next()).await {
            Err(_) => panic!("{}: resumed up to {next} of {n} within {:?}", t.name(), t.consume_timeout()),
            Ok(Ok(Some(r))) => {
                let seq = seq_of(&r.event).expect("a seq");
                resumed.ack(&r).await.expect("ack");
                if seq < next {
                    again += 1;
                } else {
                    assert_eq!(seq, next, "{}: resumed in order, nothing skipped after {unacked}", t.name());
                    next += 1;
                }
            }
            Ok(Ok(None)) => panic!("{}: the resumed source ended at {next}", t.name()),
            Ok(Err(e)) => panic!("{}: the resumed source failed at {next}: {e}", t.name()),
        }
    }
    let _ = resumed.close().await;
    println!("conformance {}: resumed at {unacked} ({cancelled} calls cancelled, {again} seen again)", t.name());
    Ok(())
}

/// Events 0-2, a permanent hole, events 3-5: a source that does not follow hands over all six and
/// only then ends; a following one hands over all six.
pub async fn a_gap_never_ends_or_cuts_a_stream(t: &dyn Target) -> Result<(), Skip> {
    let scene = t.scene().await;
    let backend = scene.backend.as_ref();
    publish(backend, "gap", 0, 3).await;
    scene.hooks.gap().await?;
    publish(backend, "gap", 3, 6).await;
    let mut source = backend.source(&SourceOptions::from(StartFrom::Beginning).follow(false)).await.expect("open");
    let mut got = Vec::new();
    loop {
        match tokio::time::timeout(t.consume_timeout(), source.next()).await {
            Err(_) => panic!("{}: no end within {:?} after {got:?}", t.name(), t.consume_timeout()),
            Ok(Ok(Some(r))) => got.push(seq_of(&r.event).expect("a seq")),
            Ok(Ok(None)) => break,
            Ok(Err(e)) => panic!("{}: consuming failed after {got:?}: {e}", t.name()),
        }
        assert!(got.len() <= 6, "{}: more events than were written: {got:?}", t.name());
    }
    assert_eq!(got, vec![0, 1, 2, 3, 4, 5], "{}: everything on both sides of the gap, then the end", t.name());
    let mut following = backend.source(&SourceOptions::from(StartFrom::Beginning)).await.expect("open");
    assert_eq!(take(t, &mut following, 6).await, seqs("gap", 0, 6));
    Ok(())
}

/// A writing transaction held open elsewhere on the server while a hole appears under a
/// following source: the events after the hole come within 5 s, not when that transaction ends.
pub async fn a_long_transaction_elsewhere_delays_a_gap_only_briefly(t: &dyn Target) -> Result<(), Skip> {
    let scene = t.scene().await;
    let backend = scene.backend.as_ref();
    publish(backend, "long", 0, 1).await;
    let mut source = backend.source(&SourceOptions::from(StartFrom::Beginning)).await.expect("open");
    assert_eq!(take(t, &mut source, 1).await, seqs("long", 0, 1));
    let guard = scene.hooks.hold_elsewhere().await?;
    scene.hooks.gap().await?;
    publish(backend, "long", 1, 2).await;
    let started = Instant::now();
    let next = tokio::time::timeout(Duration::from_secs(10), source.next()).await;
    let waited = started.elapsed();
    drop(guard);
    let next = next.unwrap_or_else(|_| panic!("{}: the gap was not passed in 10 s", t.name()));
    let next = next.expect("consume").expect("following: no end");
    assert_eq!(seq_of(&next.event), Some(1), "{}", t.name());
    assert!(waited < Duration::from_secs(5), "{}: the gap held the consumer for {waited:?}", t.name());
    Ok(())
}

/// A following source across each [`Rotation`]: what the next writer writes (more than before)
/// is read from its start, nothing skipped or repeated.
pub async fn a_following_source_survives_rotation(t: &dyn Target) -> Result<(), Skip> {
    for how in [Rotation::Rename, Rotation::Delete, Rotation::Truncate] {
        let scene = t.scene().await;
        let backend = scene.backend.as_ref();
        publish(backend, "old", 0, 3).await;
        let mut source = backend.source(&SourceOptions::from(StartFrom::Beginning)).await.expect("open");
        assert_eq!(take(t, &mut source, 3).await, seqs("old", 0, 3), "{how:?}");
        // The next writer starts at once: the source may never see the storage missing or short.
        scene.hooks.rotate(how).await?;
        publish(backend, "new", 0, 10).await;
        assert_eq!(take(t, &mut source, 10).await, seqs("new", 0, 10), "{}: after {how:?}", t.name());
        let _ = source.close().await;
    }
    Ok(())
}

/// A source opened from now on storage that does not exist yet reads it from its start once it
/// appears: its first events are not skipped.
pub async fn late_storage_is_read_from_its_start(t: &dyn Target) -> Result<(), Skip> {
    let scene = t.scene().await;
    let backend = scene.backend.as_ref();
    scene.hooks.rotate(Rotation::Delete).await?;
    let mut source = backend.source(&SourceOptions::default()).await.expect("open on missing storage");
    tokio::time::sleep(Duration::from_millis(100)).await;
    publish(backend, "late", 0, 4).await;
    assert_eq!(take(t, &mut source, 4).await, seqs("late", 0, 4), "{}", t.name());
    Ok(())
}

/// Looking at live events through a private queue leaves the configured queue as it was: every
/// event seen there is still in it, for its real consumer.
pub async fn looking_leaves_the_configured_queue_alone(t: &dyn Target) -> Result<(), Skip> {
    let scene = t.scene().await;
    let backend = scene.backend.as_ref();
    let before = scene.hooks.stored().await?;
    let mut look = backend.source(&SourceOptions::default().queue(QueueChoice::Private)).await.expect("private");
    publish(backend, "look", 0, 20).await;
    assert_eq!(take(t, &mut look, 20).await, seqs("look", 0, 20), "{}: the private view", t.name());
    look.close().await.expect("close the private view");
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut after = scene.hooks.stored().await?;
    while after != before + 20 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        after = scene.hooks.stored().await?;
    }
    assert_eq!(after, before + 20, "{}: the configured queue holds every event looked at", t.name());
    let mut owner = backend.source(&SourceOptions::default()).await.expect("the configured queue");
    assert_eq!(take(t, &mut owner, 20).await, seqs("look", 0, 20), "{}: its consumer gets them", t.name());
    owner.close().await.expect("close");
    Ok(())
}

/// Runs every scenario, printing one line each (`SKIPPED` with the reason for those the target
/// has no hooks for).
pub async fn run_all(t: &dyn Target) {
    let name = t.name();
    macro_rules! scenario {
        ($f:ident) => {{
            let started = Instant::now();
            match $f(t).await {
                Ok(()) => println!("conformance {name}: {} ok ({:?})", stringify!($f), started.elapsed()),
                Err(why) => println!("conformance {name}: {} SKIPPED: {why}", stringify!($f)),
            }
        }};
    }
    scenario!(storm_then_resume_sees_every_unacked_event);
    scenario!(a_gap_never_ends_or_cuts_a_stream);
    scenario!(a_long_transaction_elsewhere_delays_a_gap_only_briefly);
    scenario!(a_following_source_survives_rotation);
    scenario!(late_storage_is_read_from_its_start);
    scenario!(looking_leaves_the_configured_queue_alone);
}
