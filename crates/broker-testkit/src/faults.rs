//! The fault suite: the delivery contract under real faults (docs/contract.md §A.5, §A.6, §A.8), run by
//! every backend like the conformance suite, third-party ones included.
//!
//! A backend implements [`FaultTarget`]: a fresh backend whose service can be made to fail through
//! an [`Outage`] (for network services a [`crate::proxy::Proxy`] between the backend and the real
//! service; for the memory backend its injected faults), plus a second backend that reads the same
//! destination directly. [`run_all`] runs the scenarios; each asserts numbers:
//!
//! 1. [`unreachable_for_the_whole_run`]: 2,000 events published with their receipts dropped while
//!    the service is down; `close` with a 2 s deadline returns within 3 s and lists all 2,000,
//!    in publish order.
//! 2. [`black_hole_mid_stream`]: the service stops answering (no RST); `is_ready()` turns false
//!    within the attempt timeout; once it answers again every event is delivered, first seen in
//!    publish order, none lost.
//! 3. [`outage_then_recovery`]: refused connections for a while, then back: every event
//!    delivered, first seen in order, none rejected.
//!
//! Duplicates (at-least-once) are counted and printed; a target whose
//! [`FaultTarget::exactly_once`] is true may have none.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use broker_core::{Backend, Error, EventBroker, Receipt, SourceOptions, StartFrom, async_trait};

use crate::{seq_of, user_event};

/// How a fault target is to be set up.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct FaultOptions {
    /// The backend's `close_timeout`.
    pub close_timeout: Duration,
    /// The backend's attempt timeout (statement, write, confirm).
    pub attempt_timeout: Duration,
}

impl Default for FaultOptions {
    fn default() -> Self {
        FaultOptions { close_timeout: Duration::from_secs(2), attempt_timeout: Duration::from_secs(2) }
    }
}

/// A switch that breaks the service a backend talks to.
#[async_trait]
pub trait Outage: Send + Sync {
    /// The service refuses connections and drops the open ones (it is down).
    async fn refuse(&self);
    /// The service stops answering without closing anything (a black hole).
    async fn black_hole(&self);
    /// The service works again.
    async fn restore(&self);
}

#[async_trait]
impl Outage for crate::proxy::Proxy {
    async fn refuse(&self) {
        crate::proxy::Proxy::refuse(self).await;
    }
    async fn black_hole(&self) {
        crate::proxy::Proxy::black_hole(self);
    }
    async fn restore(&self) {
        crate::proxy::Proxy::restore(self);
    }
}

/// One fresh backend under fault, the switch for its service, and a reader of what landed.
pub struct Faulty {
    /// The backend whose service the outage breaks.
    pub backend: Box<dyn Backend>,
    /// The switch.
    pub outage: Box<dyn Outage>,
    /// A backend reading the same destination directly (not through the outage).
    pub reader: Box<dyn Backend>,
}

/// A backend under fault tests.
#[async_trait]
pub trait FaultTarget: Send + Sync {
    /// Its name in the output.
    fn name(&self) -> String;

    /// A backend in a fresh namespace, set up with `options`, behind a working outage switch.
    async fn fresh(&self, options: &FaultOptions) -> Faulty;

    /// Whether the backend promises no duplicates across outages (SQL checks whether a batch
    /// whose outcome was lost committed); otherwise at-least-once is checked.
    fn exactly_once(&self) -> bool {
        false
    }
}

/// Checks that `got` holds `0..n`, first seen in order, and counts the copies beyond the first;
/// with `exactly_once` there may be none.
fn check_delivered(t: &dyn FaultTarget, got: &[u64], n: u64) -> usize {
    let mut seen = std::collections::HashSet::new();
    let first: Vec<u64> = got.iter().copied().filter(|s| seen.insert(*s)).collect();
    assert_eq!(first, (0..n).collect::<Vec<_>>(), "every event, first seen in publish order");
    let duplicates = got.len() - first.len();
    if t.exactly_once() {
        assert_eq!(duplicates, 0, "{} promises no duplicates", t.name());
    }
    duplicates
}

async fn publish_n(broker: &dyn EventBroker, sender: &str, range: std::ops::Range<u64>) -> Vec<Receipt> {
    let mut receipts = Vec::with_capacity((range.end - range.start) as usize);
    for seq in range {
        receipts.push(broker.publish(user_event(sender, seq)).await.expect("publish accepted"));
    }
    receipts
}

/// Per sender, the `seq`s read back from `reader` (from the beginning, until the end), each
/// acknowledged once read (a queue with a prefetch window sends no more until acked).
pub async fn stored(reader: &dyn Backend) -> BTreeMap<String, Vec<u64>> {
    let mut source =
        reader.source(&SourceOptions::from(StartFrom::Beginning).follow(false)).await.expect("open a reader");
    let mut out: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, source.next()).await {
            Ok(Ok(Some(r))) => {
                source.ack(&r).await.expect("acknowledge a read event");
                out.entry(r.event.sender_id().unwrap_or_default().to_owned())
                    .or_default()
                    .push(seq_of(&r.event).unwrap_or(u64::MAX));
            }
            Ok(Ok(None)) => break,
            Ok(Err(e)) => panic!("reading back failed: {e}"),
            Err(_) => panic!("reading back took over 60 s"),
        }
    }
    let _ = source.close().await;
    out
}

/// Scenario 1 (see the module docs).
pub async fn unreachable_for_the_whole_run(t: &dyn FaultTarget) {
    const N: u64 = 2000;
    let options = FaultOptions::default();
    let f = t.fresh(&options).await;
    let broker = f.backend.connect().await.expect("connect while the service is up");
    f.outage.refuse().await;
    drop(publish_n(broker.as_ref(), "down", 0..N).await);
    let started = Instant::now();
    let report = broker.close().await.expect("close reports, even when nothing could be delivered");
    let took = started.elapsed();
    assert!(took < options.close_timeout + Duration::from_secs(1), "close took {took:?}");
    let seqs: Vec<u64> = report.undelivered.iter().filter_map(seq_of).collect();
    // The service back for the reader (which may reach it through the same switch, as a Kafka
    // client does through the advertised address); the closed broker sends nothing more.
    f.outage.restore().await;
    let delivered = stored(f.reader.as_ref()).await.remove("down").unwrap_or_default();
    // An event may have gone out just before the cut; everything else is in the report.
    let mut all = delivered.clone();
    all.extend(&seqs);
    assert_eq!(all, (0..N).collect::<Vec<_>>(), "delivered + undelivered = every event, in publish order");
    assert!(seqs.len() as u64 >= N - 10, "{} undelivered of {N} (the service was down)", seqs.len());
    match broker.close().await {
        Ok(again) => assert_eq!(again.undelivered.len(), seqs.len(), "a second close lists the same events"),
        Err(e) => panic!("a second close fails where the first reported: {e}"),
    }
}

/// Scenario 2 (see the module docs).
pub async fn black_hole_mid_stream(t: &dyn FaultTarget) {
    const N: u64 = 200;
    let options = FaultOptions::default();
    let f = t.fresh(&options).await;
    let broker = f.backend.connect().await.expect("connect");
    for r in publish_n(broker.as_ref(), "hole", 0..N).await {
        r.await.expect("delivered before the black hole");
    }
    f.outage.black_hole().await;
    let during = publish_n(broker.as_ref(), "hole", N..2 * N).await;
    let started = Instant::now();
    while broker.is_ready().await {
        let waited = started.elapsed();
        assert!(waited < options.attempt_timeout + Duration::from_secs(5), "still ready after {waited:?} of silence");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let noticed = started.elapsed();
    f.outage.restore().await;
    for r in during {
        match tokio::time::timeout(Duration::from_secs(60), r).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("an event sent into the black hole failed instead of waiting: {e}"),
            Err(_) => panic!("an event sent into the black hole was not delivered 60 s after the service came back"),
        }
    }
    assert!(broker.close().await.expect("close").is_clean());
    let got = stored(f.reader.as_ref()).await.remove("hole").unwrap_or_default();
    let duplicates = check_delivered(t, &got, 2 * N);
    println!("faults {}: black hole noticed after {noticed:?}; {duplicates} duplicates", t.name());
}

/// Scenario 3 (see the module docs).
pub async fn outage_then_recovery(t: &dyn FaultTarget) {
    const N: u64 = 500;
    let options = FaultOptions::default();
    let f = t.fresh(&options).await;
    let broker = f.backend.connect().await.expect("connect");
    let first = publish_n(broker.as_ref(), "back", 0..N).await;
    f.outage.refuse().await;
    let second = publish_n(broker.as_ref(), "back", N..2 * N).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    f.outage.restore().await;
    for r in first.into_iter().chain(second) {
        match tokio::time::timeout(Duration::from_secs(60), r).await {
            Ok(Ok(_)) => {}
            Ok(Err(e @ Error::Rejected { .. })) => panic!("an outage rejected an event: {e}"),
            Ok(Err(e)) => panic!("an event failed during an outage instead of waiting: {e}"),
            Err(_) => panic!("not delivered 60 s after the service came back"),
        }
    }
    assert!(broker.close().await.expect("close").is_clean());
    let got = stored(f.reader.as_ref()).await.remove("back").unwrap_or_default();
    let duplicates = check_delivered(t, &got, 2 * N);
    println!("faults {}: outage and recovery, {duplicates} duplicates", t.name());
}

/// Runs every scenario, printing one line each.
pub async fn run_all(t: &dyn FaultTarget) {
    let name = t.name();
    macro_rules! check {
        ($f:ident) => {{
            let started = Instant::now();
            $f(t).await;
            println!("faults {name}: {} ok ({:?})", stringify!($f), started.elapsed());
        }};
    }
    check!(unreachable_for_the_whole_run);
    check!(black_hole_mid_stream);
    check!(outage_then_recovery);
}
