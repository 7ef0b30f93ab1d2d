//! A real resource alarm: RabbitMQ blocks publishing connections (it stops reading from them) when
//! its memory watermark is crossed. amqprs never receives `connection.blocked`, so the backend
//! must see the stall by its confirm timeout: not ready, back-pressure, and every event delivered
//! once the alarm clears. The commands come from `BROKER_TEST_RABBITMQ_ALARM_ON` / `_OFF`
//! (`.ci/run` sets them). Its own test binary: the alarm blocks every publisher on the broker.

mod common;

use std::time::Duration;

use broker_core::{ConfigValue, Error, EventBroker};
use broker_pika::PikaBackend;

struct Alarm {
    off: String,
}

fn sh(command: &str) {
    let status = std::process::Command::new("sh").args(["-c", command]).status().expect("run the command");
    assert!(status.success(), "{command} failed: {status}");
}

impl Drop for Alarm {
    fn drop(&mut self) {
        // Never leave the shared broker blocked, whatever happened in the test.
        let _ = std::process::Command::new("sh").args(["-c", &self.off]).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_alarm_is_seen_as_a_stall_and_applies_back_pressure() {
    let Some(service) = broker_testkit::services::rabbitmq("a_memory_alarm_is_seen_as_a_stall").await else { return };
    let (Ok(on), Ok(off)) =
        (std::env::var("BROKER_TEST_RABBITMQ_ALARM_ON"), std::env::var("BROKER_TEST_RABBITMQ_ALARM_OFF"))
    else {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI=true needs BROKER_TEST_RABBITMQ_ALARM_ON and BROKER_TEST_RABBITMQ_ALARM_OFF"
        );
        eprintln!("SKIPPED: BROKER_TEST_RABBITMQ_ALARM_ON/_OFF are not set");
        return;
    };
    let (config, q, x) = common::fresh_config(
        &service.url,
        &[
            ("confirm_timeout", ConfigValue::Int(1)),
            ("max_inflight", ConfigValue::Int(50)),
            ("buffer_size", ConfigValue::Int(100)),
            ("when_full", ConfigValue::Str("error".into())),
        ],
    );
    let broker = PikaBackend::new(config).open().await.expect("connect");
    broker.publish(broker_testkit::user_event("alarm", 0)).await.unwrap().await.expect("delivered before the alarm");

    let alarm = Alarm { off: off.clone() };
    sh(&on);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut receipts = Vec::new();
    let mut full = false;
    for seq in 1..20_000 {
        match broker.publish(broker_testkit::user_event("alarm", seq)).await {
            Ok(r) => receipts.push(r),
            Err(Error::BufferFull { .. }) => {
                full = true;
                break;
            }
            Err(e) => panic!("{e}"),
        }
        if seq % 50 == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    assert!(full, "a blocked broker pushes back once the window and the buffer are full");
    println!("alarm: {} events accepted before the buffer was full", receipts.len());
    assert!(
        common::becomes_ready(&broker, false, Duration::from_secs(5)).await,
        "not ready while RabbitMQ does not confirm"
    );
    sh(&off);
    drop(alarm);
    for r in receipts {
        tokio::time::timeout(Duration::from_secs(60), r).await.expect("in time").expect("delivered after the alarm");
    }
    assert!(common::becomes_ready(&broker, true, Duration::from_secs(5)).await, "ready again");
    broker.close().await.unwrap();
    common::cleanup(&service.url, &[&q], &[&x]).await;
}
