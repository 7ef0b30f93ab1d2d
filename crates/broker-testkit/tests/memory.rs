//! The in-memory reference backend passes the conformance suite and the fault suite (its faults
//! injected), and keeps the accounting rule when its writer panics or hangs.

use std::time::Duration;

use broker_core::memory::{Fault, MemoryBackend};
use broker_core::{Backend, DeliveryOptions, Error, Event, async_trait};
use broker_testkit::faults::{FaultOptions, FaultTarget, Faulty};
use broker_testkit::{Target, seq_of, user_event};

struct Memory;

#[async_trait]
impl Target for Memory {
    fn name(&self) -> String {
        "memory".into()
    }
    async fn fresh(&self) -> Box<dyn Backend> {
        Box::new(MemoryBackend::new().with_max_event_bytes(64 * 1024))
    }
    fn poison(&self) -> Option<Event> {
        Some(broker_testkit::oversized_event(100_000))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_backend_conforms() {
    broker_testkit::run_all(&Memory).await;
}

/// The memory backend's outage: its injected faults.
struct MemoryOutage(broker_core::memory::Faults);

#[async_trait]
impl broker_testkit::faults::Outage for MemoryOutage {
    async fn refuse(&self) {
        self.0.set(Fault::Unavailable);
    }
    async fn black_hole(&self) {
        self.0.set(Fault::BlackHole);
    }
    async fn restore(&self) {
        self.0.set(Fault::None);
    }
}

#[async_trait]
impl FaultTarget for Memory {
    fn name(&self) -> String {
        "memory".into()
    }
    fn exactly_once(&self) -> bool {
        true
    }
    async fn fresh(&self, options: &FaultOptions) -> Faulty {
        let delivery = DeliveryOptions::default().close_timeout(options.close_timeout);
        let backend = MemoryBackend::new().with_delivery(delivery).with_attempt_timeout(options.attempt_timeout);
        Faulty {
            outage: Box::new(MemoryOutage(backend.faults())),
            reader: Box::new(backend.clone()),
            backend: Box::new(backend),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_backend_keeps_the_contract_under_faults() {
    broker_testkit::faults::run_all(&Memory).await;
}

/// Scenario 6: a writer that panics. Its events, and those published after, fail at once and are
/// listed by close, in publish order; a second close lists them again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_that_panics_loses_nothing() {
    let backend = MemoryBackend::new();
    let broker = backend.connect().await.unwrap();
    broker.publish(user_event("p", 0)).await.unwrap().await.expect("delivered before the panic");
    backend.faults().set(Fault::Panic);
    let mut receipts = Vec::new();
    for seq in 1..=100 {
        receipts.push(broker.publish(user_event("p", seq)).await.unwrap());
    }
    for r in receipts {
        match r.await {
            Err(Error::Io { reason, .. }) => assert!(reason.contains("panicked"), "{reason}"),
            other => panic!("an event of a dead writer fails saying why: {other:?}"),
        }
    }
    assert!(!broker.is_ready().await, "a dead writer is not ready");
    let report = broker.close().await.unwrap();
    let seqs: Vec<u64> = report.undelivered.iter().filter_map(seq_of).collect();
    assert_eq!(seqs, (1..=100).collect::<Vec<_>>(), "every event of the dead writer is listed, in order");
    let again = broker.close().await.unwrap();
    assert_eq!(again.undelivered.len(), 100, "a second close lists them too");
    assert_eq!(backend.lines().len(), 1);
}

/// A close that times out (writer stuck in a black hole) still lists the events, and a second
/// close after it lists the same ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_close_lists_the_events_and_a_second_close_agrees() {
    let delivery = DeliveryOptions::default().close_timeout(Duration::from_millis(500));
    let backend = MemoryBackend::new().with_delivery(delivery).with_attempt_timeout(Duration::from_secs(30));
    backend.faults().set(Fault::BlackHole);
    let broker = backend.connect().await.unwrap();
    for seq in 0..50 {
        drop(broker.publish(user_event("t", seq)).await.unwrap());
    }
    let started = std::time::Instant::now();
    let report = broker.close().await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the close deadline bounds a hung write: {:?}",
        started.elapsed()
    );
    assert_eq!(report.undelivered.iter().filter_map(seq_of).collect::<Vec<_>>(), (0..50).collect::<Vec<_>>());
    assert_eq!(broker.close().await.unwrap().undelivered.len(), 50);
}

/// Dropping brokers without close leaves no writer task behind: the driver ends when the
/// last handle goes, after delivering what it held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_broker_still_delivers_what_it_accepted() {
    let backend = MemoryBackend::new();
    for round in 0..50u64 {
        let broker = backend.connect().await.unwrap();
        drop(broker.publish(user_event("d", round)).await.unwrap());
    }
    let t0 = std::time::Instant::now();
    while backend.lines().len() < 50 {
        assert!(t0.elapsed() < Duration::from_secs(5), "{} of 50 delivered after drop", backend.lines().len());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
