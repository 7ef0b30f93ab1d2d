//! A real resource alarm: RabbitMQ blocks publishing connections (it stops reading from them) when
//! its memory watermark is crossed. amqprs never receives `connection.blocked`, so the backend
//! must see the stall by its confirm timeout: not ready, back-pressure, and every event delivered
//! once the alarm clears. Also RabbitMQ's `max_message_size`, which closes the channel of a
//! publisher that goes over it: the event must fail alone. Both change the broker's settings for
//! a moment through `BROKER_TEST_RABBITMQCTL` (the `rabbitmqctl` command line to use; `.ci/run`
//! sets it), so they live in a test binary of their own.

mod common;

use std::time::Duration;

use broker_core::{ConfigValue, Error, EventBroker};
use broker_pika::PikaBackend;

/// The two tests change one broker: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Runs `rabbitmqctl ARGS` through `BROKER_TEST_RABBITMQCTL`.
fn ctl(ctl: &str, args: &str) {
    let command = format!("{ctl} {args}");
    let status = std::process::Command::new("sh").args(["-c", &command]).status().expect("run rabbitmqctl");
    assert!(status.success(), "{command} failed: {status}");
}

/// Undoes a setting when dropped: never leave the shared broker changed, whatever happens.
struct Restore(String);

impl Drop for Restore {
    fn drop(&mut self) {
        let _ = std::process::Command::new("sh").args(["-c", &self.0]).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_alarm_is_seen_as_a_stall_and_applies_back_pressure() {
    let Some(service) = broker_testkit::services::rabbitmq("a_memory_alarm_is_seen_as_a_stall").await else { return };
    let Some(rabbitmqctl) =
        broker_testkit::services::var("a_memory_alarm_is_seen_as_a_stall", "BROKER_TEST_RABBITMQCTL")
    else {
        return;
    };
    let _serial = SERIAL.lock().await;
    let off = "-q set_vm_memory_high_watermark 0.4";
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

    let alarm = Restore(format!("{rabbitmqctl} {off}"));
    ctl(&rabbitmqctl, "-q set_vm_memory_high_watermark 0.0000001");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (receipts, full) = common::publish_until_full(&broker, "alarm", 20_000).await;
    assert!(full, "a blocked broker pushes back once the window and the buffer are full");
    println!("alarm: {} events accepted before the buffer was full", receipts.len());
    assert!(
        common::becomes_ready(&broker, false, Duration::from_secs(5)).await,
        "not ready while RabbitMQ does not confirm"
    );
    ctl(&rabbitmqctl, off);
    drop(alarm);
    for r in receipts {
        tokio::time::timeout(Duration::from_secs(60), r).await.expect("in time").expect("delivered after the alarm");
    }
    assert!(common::becomes_ready(&broker, true, Duration::from_secs(5)).await, "ready again");
    broker.close().await.unwrap();
    common::cleanup(&service.url, &[&q], &[&x]).await;
}

/// RabbitMQ closes the channel of a message over its `max_message_size`; the backend learns the
/// limit from the close, fails that event alone, and its neighbours are delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_over_rabbitmqs_size_limit_fails_alone() {
    let Some(service) = broker_testkit::services::rabbitmq("a_message_over_rabbitmqs_size_limit").await else { return };
    let Some(rabbitmqctl) =
        broker_testkit::services::var("a_message_over_rabbitmqs_size_limit", "BROKER_TEST_RABBITMQCTL")
    else {
        return;
    };
    let _serial = SERIAL.lock().await;
    // The limit applies to channels opened after it is set; 128 MiB is RabbitMQ 3.x's default.
    let restore = Restore(format!("{rabbitmqctl} -q eval 'application:set_env(rabbit, max_message_size, 134217728).'"));
    ctl(&rabbitmqctl, "-q eval 'application:set_env(rabbit, max_message_size, 65536).'");
    let (config, q, x) = common::fresh_config(&service.url, &[]);
    let backend = PikaBackend::new(config);
    let broker = backend.open().await.expect("connect");
    let before = broker.publish(broker_testkit::user_event("big", 0)).await.unwrap();
    let big = broker.publish(broker_testkit::oversized_event(100_000)).await.unwrap();
    let after = broker.publish(broker_testkit::user_event("big", 1)).await.unwrap();
    let within = Duration::from_secs(30);
    tokio::time::timeout(within, before).await.expect("in time").expect("the event before is delivered");
    match tokio::time::timeout(within, big).await.expect("in time") {
        Err(Error::Rejected { reason, .. }) => assert!(reason.contains("max_message_size 65536"), "{reason}"),
        other => panic!("the oversize event must fail alone: {other:?}"),
    }
    tokio::time::timeout(within, after).await.expect("in time").expect("the event after is delivered");
    // Later ones fail at once, without closing the channel again.
    match broker.publish(broker_testkit::oversized_event(100_000)).await.unwrap().await {
        Err(Error::Rejected { .. }) => {}
        other => panic!("{other:?}"),
    }
    broker.publish(broker_testkit::user_event("big", 2)).await.unwrap().await.expect("delivered");
    drop(restore);
    broker.close().await.unwrap();
    let seen = common::consume_distinct(&backend, 3, Duration::from_secs(10)).await;
    assert_eq!(seen.order["big"], vec![0, 1, 2]);
    common::cleanup(&service.url, &[&q], &[&x]).await;
}
