//! docs/contract.md §E: RabbitMQ itself is restarted twice while 20,000 events are published; every
//! accepted event must arrive (duplicates are counted and reported), in order per sender. The
//! stop and start commands come from `BROKER_TEST_RABBITMQ_STOP` / `BROKER_TEST_RABBITMQ_START`
//! (`.ci/run` sets them on this machine); with a container, its own stop and start. Its own test
//! binary, so no other test sees the restarts.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use broker_core::{ConfigValue, EventBroker};
use broker_pika::PikaBackend;

async fn run(what: &str, step: impl std::future::Future<Output = Result<(), String>>) {
    let started = Instant::now();
    step.await.unwrap_or_else(|e| panic!("{what}: {e}"));
    println!("restart test: {what} took {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_restarts_lose_no_event() {
    let Some((service, restart)) =
        broker_testkit::services::rabbitmq_to_restart("rabbitmq_restarts_lose_no_event").await
    else {
        return;
    };
    const N: u64 = 20_000;
    const SENDERS: u64 = 20;
    let (config, q, x) = common::fresh_config(
        &service.url,
        &[("retry_delay_in_seconds", ConfigValue::Float(1.0)), ("buffer_size", ConfigValue::Int(2000))],
    );
    let backend = PikaBackend::new(config);
    let broker = Arc::new(backend.open().await.expect("connect"));
    let progress = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let publisher = {
        let broker = broker.clone();
        let progress = progress.clone();
        tokio::spawn(async move {
            let mut receipts = Vec::with_capacity(N as usize);
            for i in 0..N {
                let sender = format!("restart-{}", i % SENDERS);
                receipts
                    .push(broker.publish(broker_testkit::user_event(&sender, i / SENDERS)).await.expect("accepted"));
                progress.store(i + 1, std::sync::atomic::Ordering::Relaxed);
                if i % 100 == 99 {
                    // A tracker's pace (1,000 events/s): RabbitMQ takes seconds to stop and
                    // keeps confirming meanwhile, and both restarts must land mid-stream.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            receipts
        })
    };
    for (round, at) in [(1, 3_000), (2, 12_000)] {
        // Stop once `at` events were accepted (bounded wait), so both restarts land mid-stream.
        for _ in 0..6000 {
            if progress.load(std::sync::atomic::Ordering::Relaxed) >= at {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let published = progress.load(std::sync::atomic::Ordering::Relaxed);
        println!("restart test: stopping RabbitMQ after {published} events were accepted");
        assert!(published < N, "restart {round} must land mid-stream");
        run(&format!("stop {round}"), restart.stop()).await;
        assert!(
            common::becomes_ready(broker.as_ref(), false, Duration::from_secs(2)).await,
            "is_ready must turn false while RabbitMQ is down"
        );
        tokio::time::sleep(Duration::from_millis(1000)).await;
        run(&format!("start {round}"), restart.start()).await;
    }
    let receipts = publisher.await.expect("publisher");
    let mut failed = 0;
    for r in receipts {
        if tokio::time::timeout(Duration::from_secs(60), r).await.expect("outcome in time").is_err() {
            failed += 1;
        }
    }
    assert_eq!(failed, 0, "every accepted event is confirmed after the restarts");
    broker.close().await.expect("close");
    let seen = common::consume_distinct(&backend, N as usize, Duration::from_secs(60)).await;
    println!("restart test: {} of {N} distinct events, {} duplicates", seen.distinct, seen.duplicates);
    assert_eq!(seen.distinct, N as usize, "no event lost");
    for (sender, seqs) in &seen.order {
        assert!(seqs.iter().copied().eq(0..N / SENDERS), "order of {sender}");
    }
    common::cleanup(&service.url, &[&q], &[&x]).await;
}
