//! The Kafka broker restarts (sqlite storage, so it keeps its data) in the middle of 20,000
//! events: every event arrives, in order per sender; duplicates are counted and reported.
//!
//! The test starts its own broker on 127.0.0.1:19094 with `.ci/kafka-broker.sh` and the tansu
//! binary under `BROKER_TEST_TANSU_ROOT` (`.ci/run` sets it), and stops it by PID.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use broker_core::{Backend, EventBroker};
use broker_kafka::{KafkaBackend, KafkaConfig};

const PORT: &str = "19094";

struct Broker {
    dir: tempfile::TempDir,
    root: String,
}

impl Broker {
    fn script() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.ci/kafka-broker.sh")
    }

    fn run(&self, args: &[&str]) {
        let out = Command::new("bash")
            .arg(Self::script())
            .args(args)
            .env("TANSU_ROOT", &self.root)
            .env("KAFKA_DIR", self.dir.path())
            .env("KAFKA_PORT", PORT)
            .output()
            .expect("run kafka-broker.sh");
        assert!(
            out.status.success(),
            "kafka-broker.sh {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(Self::script())
            .arg("stop")
            .env("TANSU_ROOT", &self.root)
            .env("KAFKA_DIR", self.dir.path())
            .env("KAFKA_PORT", PORT)
            .output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "open (issue 5): passes 3 of 3 runs since the producer reset landed, but the reset path \
            (after tansu's occasional unknown broker error on restart) has no deterministic test \
            yet; run with --ignored (BROKER_TEST_TANSU_ROOT=/opt/tansu)"]
async fn a_broker_restart_loses_nothing() {
    let Ok(root) = std::env::var("BROKER_TEST_TANSU_ROOT") else {
        assert!(std::env::var("CI").as_deref() != Ok("true"), "CI=true needs BROKER_TEST_TANSU_ROOT");
        eprintln!("SKIPPED a_broker_restart_loses_nothing: BROKER_TEST_TANSU_ROOT is not set");
        return;
    };
    let broker_process = Broker { dir: tempfile::tempdir().unwrap(), root };
    broker_process.run(&["start", "sqlite"]);

    const N: u64 = 20_000;
    let bootstrap = format!("127.0.0.1:{PORT}");
    let config = KafkaConfig::plaintext(&bootstrap, "restart").partition_by_sender(true).create_topic(3, 1);
    let backend = KafkaBackend::new(config);
    let broker: std::sync::Arc<dyn EventBroker> = std::sync::Arc::from(backend.connect().await.unwrap());

    let (third, at_third) = tokio::sync::oneshot::channel::<()>();
    let restart = {
        let broker = broker.clone();
        let dir = broker_process.dir.path().to_owned();
        let root = broker_process.root.clone();
        tokio::spawn(async move {
            at_third.await.unwrap();
            let run = move |arg: &'static str| {
                let (dir, root) = (dir.clone(), root.clone());
                move || {
                    let out = Command::new("bash")
                        .arg(Broker::script())
                        .args(arg.split(' '))
                        .env("TANSU_ROOT", root)
                        .env("KAFKA_DIR", dir)
                        .env("KAFKA_PORT", PORT)
                        .output()
                        .unwrap();
                    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
                }
            };
            tokio::task::spawn_blocking(run("stop")).await.unwrap();
            tokio::time::sleep(Duration::from_millis(1500)).await;
            let ready_during = broker.is_ready().await;
            tokio::task::spawn_blocking(run("start sqlite")).await.unwrap();
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
