//! The conformance suite: one set of checks, written once against the [`EventBroker`] and
//! [`EventSource`](broker_core::EventSource) traits, that every backend runs from its own tests (ours and third-party ones).
//!
//! A backend implements [`Target`] (how to get a fresh, isolated backend: its own file, topic,
//! queue or table) and calls [`run_all`]. The consumer scenarios that need something only some
//! backends have (a position to resume from, holes in the ids, rotation, a queue that reading
//! takes from) run when the target's [`Target::scene`] supplies the [`scenario::Hooks`] for them. Each check panics with a precise message on failure, and
//! prints one line per check, including what it skipped and why.
//!
//! ```
//! use broker_core::{Backend, async_trait, memory::MemoryBackend};
//! use broker_testkit::Target;
//!
//! struct Memory;
//!
//! #[async_trait]
//! impl Target for Memory {
//!     fn name(&self) -> String { "memory".into() }
//!     async fn fresh(&self) -> Box<dyn Backend> {
//!         Box::new(MemoryBackend::new().with_max_event_bytes(64 * 1024))
//!     }
//!     fn poison(&self) -> Option<broker_core::Event> { Some(broker_testkit::oversized_event(100_000)) }
//! }
//!
//! # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
//! # async fn main() {
//! broker_testkit::run_all(&Memory).await;
//! # }
//! ```
//!
//! ## Features
//!
#![doc = document_features::document_features!()]

pub mod consumer;
pub mod faults;
pub mod proxy;
pub mod scenario;
pub mod services;
pub mod tansu;
pub mod tls;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use broker_core::json::{Map, Value};
use broker_core::{
    Backend, Error, Event, EventBroker, Received, SourceOptions, StartFrom, TypedEvent, async_trait, event::UserUttered,
};

/// The events of `data/rasa-events-sample.jsonl`, written by Rasa itself, one per line.
pub const RASA_SAMPLE: &str = include_str!("../data/rasa-events-sample.jsonl");

/// The sample's lines.
pub fn rasa_sample_lines() -> Vec<&'static str> {
    RASA_SAMPLE.lines().collect()
}

/// The sample as events.
pub fn rasa_sample_events() -> Vec<Event> {
    RASA_SAMPLE.lines().map(|l| Event::from_json(l.as_bytes()).expect("the Rasa sample parses")).collect()
}

/// A realistic `user` event of about 400 bytes for `sender`, carrying `seq` in its metadata so
/// order and completeness can be checked.
pub fn user_event(sender: &str, seq: u64) -> Event {
    let mut intent = Map::new();
    intent.insert("name", "book_table".into());
    intent.insert("confidence", 0.9876543210123.into());
    let mut entity = Map::new();
    entity.insert("entity", "cuisine".into());
    entity.insert("start", 41i64.into());
    entity.insert("end", 48i64.into());
    entity.insert("value", "italian".into());
    entity.insert("extractor", "DIETClassifier".into());
    let mut parse = Map::new();
    parse.insert("intent", intent.into());
    parse.insert("entities", Value::Array(vec![entity.into()]));
    parse.insert("text", "I'd like a table for 4 at an Italian place tonight".into());
    let mut metadata = Map::new();
    metadata.insert("seq", (seq as i64).into());
    metadata.insert("model_id", "f3a9c0de11".into());
    Event::new(
        sender,
        1_700_000_000.0 + seq as f64 / 1000.0,
        metadata,
        TypedEvent::User(UserUttered {
            text: Some("I'd like a table for 4 at an Italian place tonight".into()),
            parse_data: parse.into(),
            input_channel: Some("socketio".into()),
            message_id: Some(format!("{seq:032x}")),
        }),
    )
}

/// The `i`-th event of a realistic mix (user, bot, action, slot, as a tracker produces them;
/// about 400 bytes on average) spread over `senders` conversations. For benchmarks.
pub fn mixed_event(i: u64, senders: u64) -> Event {
    let sender = format!("{:032x}", i % senders.max(1));
    let ts = 1_700_000_000.0 + i as f64 / 1000.0;
    let mut metadata = Map::new();
    metadata.insert("seq", (i as i64).into());
    metadata.insert("model_id", "f3a9c0de11".into());
    metadata.insert("assistant_id", "placeholder_default".into());
    match i % 4 {
        0 => user_event(&sender, i),
        1 => {
            let mut button = Map::new();
            button.insert("title", "Italian".into());
            button.insert("payload", "/inform{\"cuisine\": \"italian\"}".into());
            let mut data = Map::new();
            data.insert("buttons", Value::Array(vec![button.into()]));
            Event::new(
                &sender,
                ts,
                metadata,
                TypedEvent::Bot(broker_core::event::BotUttered {
                    text: Some("Which cuisine would you like? We have Italian, Thai and Mexican tonight.".into()),
                    data: data.into(),
                }),
            )
        }
        2 => Event::new(
            &sender,
            ts,
            metadata,
            TypedEvent::Action(broker_core::event::ActionExecuted {
                name: Some("utter_ask_cuisine".into()),
                policy: Some("policy_1_TEDPolicy".into()),
                confidence: Some(0.9987654321),
                action_text: None,
                hide_rule_turn: false,
            }),
        ),
        _ => Event::new(
            &sender,
            ts,
            metadata,
            TypedEvent::Slot { name: Some("cuisine".into()), value: "italian".into() },
        ),
    }
}

/// An event whose encoding is larger than `bytes`.
pub fn oversized_event(bytes: usize) -> Event {
    let mut md = Map::new();
    md.insert("padding", "x".repeat(bytes).into());
    Event::new("poison", 1.0, md, TypedEvent::Restart)
}

/// The `seq` a [`user_event`] carries.
pub fn seq_of(event: &Event) -> Option<u64> {
    event.metadata()?.get("seq")?.as_f64().map(|f| f as u64)
}

/// A backend under test.
#[async_trait]
pub trait Target: Send + Sync {
    /// Its name in the output.
    fn name(&self) -> String;

    /// A backend in a fresh namespace of its own (file, topic, queue, table), so checks never see
    /// each other's events.
    async fn fresh(&self) -> Box<dyn Backend>;

    /// An event this backend refuses (e.g. over its size limit); `None` skips the poison check.
    fn poison(&self) -> Option<Event> {
        None
    }

    /// How long to wait for consumed events.
    fn consume_timeout(&self) -> Duration {
        Duration::from_secs(30)
    }

    /// A fresh backend with the [`scenario::Hooks`] this target can apply to it, for the
    /// consumer scenarios only some backends have. The default has none: they are skipped.
    async fn scene(&self) -> scenario::Scene {
        scenario::Scene::bare(self.fresh().await)
    }
}

/// Reads `n` events from the beginning of `backend`, or fails after `timeout`.
pub async fn consume(backend: &dyn Backend, n: usize, timeout: Duration) -> Vec<Received> {
    let mut source = backend.source(&SourceOptions::from(StartFrom::Beginning)).await.expect("open a source");
    next_n(backend.name(), &mut source, n, timeout).await
}

/// The next `n` events of `source`, each acknowledged, or a failure naming `what` after
/// `timeout` or when the source ends or fails first.
pub async fn next_n(
    what: &str,
    source: &mut Box<dyn broker_core::EventSource>,
    n: usize,
    timeout: Duration,
) -> Vec<Received> {
    let deadline = Instant::now() + timeout;
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, source.next()).await {
            Err(_) => panic!("{what}: consumed {} of {n} events before the {timeout:?} timeout", out.len()),
            Ok(Ok(Some(r))) => {
                source.ack(&r).await.expect("ack");
                out.push(r);
            }
            Ok(Ok(None)) => panic!("{what}: the source ended after {} of {n} events", out.len()),
            Ok(Err(e)) => panic!("{what}: consuming failed after {} events: {e}", out.len()),
        }
    }
    out
}

async fn connect(backend: &dyn Backend) -> Arc<dyn EventBroker> {
    Arc::from(backend.connect().await.expect("connect"))
}

fn by_sender(lines: impl IntoIterator<Item = Vec<u8>>) -> BTreeMap<String, Vec<Vec<u8>>> {
    let mut map: BTreeMap<String, Vec<Vec<u8>>> = BTreeMap::new();
    for raw in lines {
        let sender = Event::from_json(&raw).ok().and_then(|e| e.sender_id().map(str::to_owned)).unwrap_or_default();
        map.entry(sender).or_default().push(raw);
    }
    map
}

/// Publishes Rasa's sample and reads it back: the same bytes, in order per sender, and the typed
/// event re-encodes to the stored bytes.
pub async fn round_trip_is_byte_exact(t: &dyn Target) {
    let backend = t.fresh().await;
    let broker = connect(backend.as_ref()).await;
    let mut receipts = Vec::new();
    for e in rasa_sample_events() {
        receipts.push(broker.publish(e).await.expect("publish"));
    }
    for r in receipts {
        r.await.expect("delivered");
    }
    let lines = rasa_sample_lines();
    let got = consume(backend.as_ref(), lines.len(), t.consume_timeout()).await;
    for r in &got {
        assert_eq!(r.event.to_json(), r.raw, "a consumed event re-encodes to its stored bytes");
    }
    let want = by_sender(lines.iter().map(|l| l.as_bytes().to_vec()));
    let have = by_sender(got.into_iter().map(|r| r.raw));
    assert_eq!(have, want, "consumed bytes equal Rasa's, in order per sender");
    assert!(broker.close().await.expect("close").is_clean());
}

/// Interleaved senders, published without waiting: each sender's events arrive in order.
pub async fn order_per_sender(t: &dyn Target) {
    const SENDERS: u64 = 10;
    const PER: u64 = 100;
    let backend = t.fresh().await;
    let broker = connect(backend.as_ref()).await;
    for seq in 0..PER {
        for s in 0..SENDERS {
            drop(broker.publish(user_event(&format!("sender-{s}"), seq)).await.expect("publish"));
        }
    }
    broker.flush().await.expect("flush");
    let got = consume(backend.as_ref(), (SENDERS * PER) as usize, t.consume_timeout()).await;
    let mut seqs: HashMap<String, Vec<u64>> = HashMap::new();
    for r in got {
        seqs.entry(r.event.sender_id().unwrap_or_default().to_owned())
            .or_default()
            .push(seq_of(&r.event).unwrap_or(u64::MAX));
    }
    assert_eq!(seqs.len(), SENDERS as usize);
    for (sender, s) in seqs {
        assert_eq!(s, (0..PER).collect::<Vec<_>>(), "order of {sender}");
    }
    broker.close().await.expect("close");
}

/// 50 tasks publish at once through one broker; every event arrives exactly once.
pub async fn concurrent_publishers_lose_nothing(t: &dyn Target) {
    const TASKS: u64 = 50;
    const PER: u64 = 100;
    let backend = t.fresh().await;
    let broker = connect(backend.as_ref()).await;
    let mut tasks = Vec::new();
    for task in 0..TASKS {
        let broker = broker.clone();
        tasks.push(tokio::spawn(async move {
            let mut receipts = Vec::new();
            for seq in 0..PER {
                receipts.push(broker.publish(user_event(&format!("task-{task}"), seq)).await.expect("publish"));
            }
            for r in receipts {
                r.await.expect("delivered");
            }
        }));
    }
    for task in tasks {
        task.await.expect("publisher task");
    }
    let got = consume(backend.as_ref(), (TASKS * PER) as usize, t.consume_timeout()).await;
    let mut seen: HashMap<(String, u64), usize> = HashMap::new();
    for r in got {
        *seen
            .entry((r.event.sender_id().unwrap_or_default().to_owned(), seq_of(&r.event).unwrap_or(u64::MAX)))
            .or_default() += 1;
    }
    assert_eq!(seen.len(), (TASKS * PER) as usize, "distinct events");
    assert!(seen.values().all(|&n| n == 1), "no duplicates");
    broker.close().await.expect("close");
}

/// Events whose receipts were dropped are still delivered by `close`.
pub async fn close_flushes(t: &dyn Target) {
    const N: u64 = 2000;
    let backend = t.fresh().await;
    let broker = connect(backend.as_ref()).await;
    for seq in 0..N {
        drop(broker.publish(user_event("closer", seq)).await.expect("publish"));
    }
    let report = broker.close().await.expect("close");
    assert!(report.is_clean(), "{} undelivered", report.undelivered.len());
    let got = consume(backend.as_ref(), N as usize, t.consume_timeout()).await;
    let seqs: Vec<u64> = got.iter().filter_map(|r| seq_of(&r.event)).collect();
    assert_eq!(seqs, (0..N).collect::<Vec<_>>());
}

/// After `close`, `publish` fails with [`Error::Closed`]; a second `close` is a clean no-op;
/// `is_ready` is true before and false after.
pub async fn close_is_final_and_idempotent(t: &dyn Target) {
    let backend = t.fresh().await;
    let broker = connect(backend.as_ref()).await;
    assert!(broker.is_ready().await, "ready after connect");
    broker.publish(user_event("a", 0)).await.expect("publish").await.expect("delivered");
    assert!(broker.close().await.expect("close").is_clean());
    assert!(!broker.is_ready().await, "not ready after close");
    match broker.publish(user_event("a", 1)).await {
        Err(Error::Closed) => {}
        other => panic!("publish after close must fail with Closed, got {other:?}"),
    }
    assert!(broker.close().await.expect("second close").is_clean());
}

/// An event the backend refuses fails alone; its neighbours are delivered.
pub async fn poison_event_fails_alone(t: &dyn Target) -> Result<(), String> {
    let Some(poison) = t.poison() else {
        return Err("the target declares no poison event".into());
    };
    let backend = t.fresh().await;
    let broker = connect(backend.as_ref()).await;
    let before = broker.publish(user_event("p", 0)).await.expect("publish");
    let bad = broker.publish(poison).await;
    let after = broker.publish(user_event("p", 1)).await.expect("publish");
    before.await.expect("the event before the poison is delivered");
    match bad {
        Err(Error::Rejected { .. }) => {}
        Ok(receipt) => match receipt.await {
            Err(Error::Rejected { .. }) => {}
            other => panic!("the poison event must be rejected, got {other:?}"),
        },
        Err(other) => panic!("the poison event must be rejected, got {other:?}"),
    }
    after.await.expect("the event after the poison is delivered");
    let got = consume(backend.as_ref(), 2, t.consume_timeout()).await;
    assert_eq!(got.iter().filter_map(|r| seq_of(&r.event)).collect::<Vec<_>>(), vec![0, 1]);
    broker.close().await.expect("close");
    Ok(())
}

/// Runs every check, printing one line each.
pub async fn run_all(t: &dyn Target) {
    let name = t.name();
    macro_rules! check {
        ($f:ident) => {{
            let started = Instant::now();
            $f(t).await;
            println!("conformance {name}: {} ok ({:?})", stringify!($f), started.elapsed());
        }};
    }
    check!(round_trip_is_byte_exact);
    check!(order_per_sender);
    check!(concurrent_publishers_lose_nothing);
    check!(close_flushes);
    check!(close_is_final_and_idempotent);
    {
        use consumer::{a_source_that_does_not_follow_ends, next_survives_cancellation};
        check!(next_survives_cancellation);
        check!(a_source_that_does_not_follow_ends);
    }
    match poison_event_fails_alone(t).await {
        Ok(()) => println!("conformance {name}: poison_event_fails_alone ok"),
        Err(why) => println!("conformance {name}: poison_event_fails_alone SKIPPED: {why}"),
    }
    scenario::run_all(t).await;
}

/// The README's examples, compiled as doc tests so they stay true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
