//! The consumer checks of the conformance suite: what every [`EventSource`](broker_core::EventSource)
//! must do whatever the backend.

use std::time::{Duration, Instant};

use broker_core::{SourceOptions, StartFrom};

use crate::{Target, connect, seq_of, user_event};

/// `next` under a storm of `timeout(50 µs, next())` while the events are being published, each
/// drop cancelling it wherever it waits: every event still comes exactly once, in order, and the
/// storm really cancelled some calls.
pub async fn next_survives_cancellation(t: &dyn Target) {
    let backend: std::sync::Arc<dyn broker_core::Backend> = t.fresh().await.into();
    let n = 300;
    let mut source = backend.source(&SourceOptions::from(StartFrom::Beginning)).await.expect("open a source");
    let publisher = {
        let backend = backend.clone();
        tokio::spawn(async move {
            let broker = connect(backend.as_ref()).await;
            for seq in 0..n {
                broker.publish(user_event("storm", seq)).await.expect("publish").await.expect("delivered");
                if seq % 25 == 0 {
                    // Gaps in the stream, so the consumer waits (and is cancelled) there too.
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
            broker.close().await.expect("close");
        })
    };
    let (mut seqs, mut cancelled) = (Vec::new(), 0u64);
    let deadline = Instant::now() + t.consume_timeout() * 2;
    while seqs.len() < n as usize && Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_micros(50), source.next()).await {
            Ok(Ok(Some(r))) => {
                seqs.push(seq_of(&r.event).expect("a seq"));
                source.ack(&r).await.expect("ack");
            }
            Ok(Ok(None)) => panic!("{}: a following source ended after {} events", t.name(), seqs.len()),
            Ok(Err(e)) => panic!("{}: consuming failed after {} events: {e}", t.name(), seqs.len()),
            Err(_) => cancelled += 1,
        }
    }
    publisher.await.expect("the publisher");
    assert!(cancelled > 0, "{}: the storm never cancelled a call", t.name());
    assert_eq!(seqs, (0..n).collect::<Vec<_>>(), "{}: every event once, in order ({cancelled} cancelled)", t.name());
    let _ = source.close().await;
}

/// A source that does not follow hands over everything stored, then ends.
pub async fn a_source_that_does_not_follow_ends(t: &dyn Target) {
    let backend = t.fresh().await;
    let n = 50;
    crate::scenario::publish(backend.as_ref(), "end", 0, n).await;
    let options = SourceOptions::from(StartFrom::Beginning).follow(false);
    let mut source = backend.source(&options).await.expect("open a source");
    let mut seqs = Vec::new();
    loop {
        match tokio::time::timeout(t.consume_timeout(), source.next()).await {
            Err(_) => panic!("{}: no end within {:?} after {} events", t.name(), t.consume_timeout(), seqs.len()),
            Ok(Ok(Some(r))) => {
                seqs.push(seq_of(&r.event).expect("a seq"));
                source.ack(&r).await.expect("ack");
            }
            Ok(Ok(None)) => break,
            Ok(Err(e)) => panic!("{}: consuming failed after {} events: {e}", t.name(), seqs.len()),
        }
        assert!(seqs.len() <= n as usize, "{}: more events than were published", t.name());
    }
    assert_eq!(seqs, (0..n).collect::<Vec<_>>(), "{}: everything stored, then the end", t.name());
    let _ = source.close().await;
}
