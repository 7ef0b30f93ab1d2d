//! The Kafka broker restarts (sqlite storage, so it keeps its data) in the middle of 20,000
//! events: every event arrives, in order per sender; duplicates are counted and reported.
//!
//! The test starts its own broker on a free loopback port with `.ci/kafka-broker.sh` and the tansu
//! binary under `BROKER_TEST_TANSU_ROOT` (`.ci/run` sets it), and stops it by PID.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use broker_core::{Backend, EventBroker};
use broker_kafka::{KafkaBackend, KafkaConfig};
use common::Tansu;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_loses_nothing() {
    let Some(root) = Tansu::root("a_broker_restart_loses_nothing") else { return };
    let broker_process = std::sync::Arc::new(Tansu::new(root, None));
    broker_process.run(&["start", "sqlite"]);

    const N: u64 = 20_000;
    let bootstrap = format!("127.0.0.1:{}", broker_process.port);
    let config = KafkaConfig::plaintext(&bootstrap, "restart").partition_by_sender(true).create_topic(3, 1);
    let backend = KafkaBackend::new(config);
    let broker: std::sync::Arc<dyn EventBroker> = std::sync::Arc::from(backend.connect().await.unwrap());

    let (third, at_third) = tokio::sync::oneshot::channel::<()>();
    let restart = {
        let broker = broker.clone();
        let process = broker_process.clone();
        tokio::spawn(async move {
            at_third.await.unwrap();
            let p = process.clone();
            tokio::task::spawn_blocking(move || p.run(&["stop"])).await.unwrap();
            tokio::time::sleep(Duration::from_millis(1500)).await;
            let ready_during = broker.is_ready().await;
            tokio::task::spawn_blocking(move || process.run(&["start", "sqlite"])).await.unwrap();
            ready_during
        })
    };
    let mut third = Some(third);
    let mut receipts = Vec::with_capacity(N as usize);
    let started = Instant::now();
    for seq in 0..N {
        receipts.push(broker.publish(broker_testkit::user_event(&format!("s{}", seq % 50), seq)).await.unwrap());
        if seq == N / 3 {
            let _ = third.take().unwrap().send(());
        }
        if seq % 1000 == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    assert!(!restart.await.unwrap(), "is_ready tells the truth during the outage");
    let mut failed = Vec::new();
    for r in receipts {
        if let Err(e) = r.await {
            failed.push(e.to_string());
        }
    }
    assert!(failed.is_empty(), "{} events failed, first: {:?}", failed.len(), failed.first());
    broker.close().await.unwrap();
    eprintln!("20,000 events across a broker restart in {:?}", started.elapsed());

    let got = broker_testkit::consume(&backend, N as usize, Duration::from_secs(120)).await;
    let mut seen: HashMap<(String, u64), usize> = HashMap::new();
    let mut last: HashMap<String, i64> = HashMap::new();
    let mut out_of_order = 0;
    for r in &got {
        let sender = r.event.sender_id().unwrap().to_owned();
        let seq = broker_testkit::seq_of(&r.event).unwrap();
        let want = broker_testkit::user_event(&sender, seq).to_json();
        assert_eq!(r.raw, want, "content of event {seq}");
        *seen.entry((sender.clone(), seq)).or_default() += 1;
        let prev = last.insert(sender, seq as i64).unwrap_or(-1);
        if (seq as i64) <= prev {
            out_of_order += 1;
        }
    }
    let duplicates: usize = seen.values().map(|n| n - 1).sum();
    eprintln!("consumed {} messages: {} distinct events, {duplicates} duplicates", got.len(), seen.len());
    assert_eq!(seen.len() as u64, N, "every event arrived");
    assert_eq!(out_of_order, duplicates, "order per sender kept (apart from re-sent duplicates)");
}
