//! PostgreSQL stops and starts in the middle of 20,000 events: every event arrives, once.
//!
//! The test takes the commands from `BROKER_TEST_POSTGRES_STOP` and `BROKER_TEST_POSTGRES_START`
//! (`.ci/run` sets them), or stops and starts its own container. This file is its own test binary,
//! so no other test shares the outage.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use broker_core::Backend;
use broker_sql::{SqlBackend, SqlConfig, TableName};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_restart_loses_nothing() {
    let Some((service, restart)) =
        broker_testkit::services::postgres_to_restart("a_postgres_restart_loses_nothing").await
    else {
        return;
    };
    const N: u64 = 20_000;
    let table = format!("restart_{}", broker_testkit::services::unique_suffix());
    let config = SqlConfig::postgres_url(&service.url)
        .table(TableName::new(&table).unwrap())
        .retry_max_delay(Duration::from_millis(500));
    let backend = SqlBackend::new(config);
    let broker = backend.connect().await.unwrap();

    let broker: std::sync::Arc<dyn broker_core::EventBroker> = std::sync::Arc::from(broker);
    // The outage runs beside the publisher: events keep coming while the database is away.
    let (third, at_third) = tokio::sync::oneshot::channel::<()>();
    let outage = {
        let broker = broker.clone();
        tokio::spawn(async move {
            at_third.await.unwrap();
            restart.stop().await.unwrap();
            tokio::time::sleep(Duration::from_millis(1500)).await;
            let ready_during = broker.is_ready().await;
            restart.start().await.unwrap();
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
            // A tracker's pace, not a flood: the outage lands in the middle of the stream.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    assert!(!outage.await.unwrap(), "is_ready tells the truth during the outage");
    let mut failed = 0;
    for r in receipts {
        if r.await.is_err() {
            failed += 1;
        }
    }
    assert_eq!(failed, 0, "every accepted event is delivered");
    assert!(broker.is_ready().await);
    broker.close().await.unwrap();
    eprintln!("20,000 events across a restart in {:?}", started.elapsed());

    let (client, conn) = tokio_postgres::connect(&service.url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    let rows = client.query(&format!("SELECT sender_id, data FROM \"{table}\" ORDER BY id"), &[]).await.unwrap();
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut last_seq: HashMap<String, i64> = HashMap::new();
    for row in &rows {
        let data: String = row.get(1);
        let event = broker_core::Event::from_json(data.as_bytes()).unwrap();
        let seq = broker_testkit::seq_of(&event).unwrap() as i64;
        let sender = event.sender_id().unwrap().to_owned();
        let prev = last_seq.insert(sender.clone(), seq).unwrap_or(-1);
        assert!(seq > prev, "order per sender kept: {sender} {prev} then {seq}");
        *seen.entry(data).or_default() += 1;
    }
    let duplicates: usize = seen.values().filter(|&&n| n > 1).count();
    assert_eq!(rows.len() as u64, N, "count ({duplicates} duplicated)");
    for seq in 0..N {
        let want = String::from_utf8(broker_testkit::user_event(&format!("s{}", seq % 50), seq).to_json()).unwrap();
        assert_eq!(seen.get(&want), Some(&1), "event {seq} exactly once, byte for byte");
    }
    client.batch_execute(&format!("DROP TABLE \"{table}\"")).await.unwrap();
}
