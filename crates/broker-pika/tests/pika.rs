//! The RabbitMQ backend against the real RabbitMQ (`BROKER_TEST_AMQP_URL`; `.ci/run` uses the
//! machine's on 127.0.0.1:5672), each test on a queue and exchange of its own.

mod common;

use std::sync::Mutex;
use std::time::Duration;

use amqprs::channel::{ExchangeDeclareArguments, QueueDeclareArguments};
use broker_core::{Backend, ConfigValue, Error, Event, EventBroker, Position};
use broker_pika::PikaBackend;
use broker_testkit::Target;
use broker_testkit::scenario::{Hooks, Scene, Skip};
use common::{cleanup, fresh_config, get, raw};

struct Rabbit {
    url: String,
    made: Mutex<Vec<(String, String)>>,
}

#[broker_core::async_trait]
impl Target for Rabbit {
    fn name(&self) -> String {
        "pika".into()
    }
    async fn fresh(&self) -> Box<dyn Backend> {
        let (config, q, x) = fresh_config(&self.url, &[("max_event_bytes", ConfigValue::Int(64 * 1024))]);
        self.made.lock().unwrap().push((q, x));
        Box::new(PikaBackend::new(config))
    }
    fn poison(&self) -> Option<Event> {
        Some(broker_testkit::oversized_event(100_000))
    }
    async fn scene(&self) -> Scene {
        let (config, queue, x) = fresh_config(&self.url, &[("max_event_bytes", ConfigValue::Int(64 * 1024))]);
        self.made.lock().unwrap().push((queue.clone(), x));
        Scene {
            backend: Box::new(PikaBackend::new(config)),
            hooks: Box::new(QueueHooks { url: self.url.clone(), queue }),
        }
    }
}

/// A RabbitMQ consumer's place is its queue: what it has not acknowledged is still there.
struct QueueHooks {
    url: String,
    queue: String,
}

#[broker_core::async_trait]
impl Hooks for QueueHooks {
    fn resume(&self, _after: Option<&broker_core::Received>) -> Result<broker_core::SourceOptions, Skip> {
        Ok(broker_core::SourceOptions::default())
    }
    async fn stored(&self) -> Result<u64, Skip> {
        Ok(common::depth(&self.url, &self.queue).await)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pika_conforms() {
    let Some(service) = broker_testkit::services::rabbitmq("pika_conforms").await else { return };
    let target = Rabbit { url: service.url.clone(), made: Mutex::default() };
    broker_testkit::run_all(&target).await;
    let made = target.made.lock().unwrap().clone();
    for (q, x) in made {
        cleanup(&service.url, &[&q], &[&x]).await;
    }
}

/// Rasa's topology and message properties, checked on what RabbitMQ holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topology_and_messages_are_rasas() {
    let Some(service) = broker_testkit::services::rabbitmq("topology_and_messages_are_rasas").await else { return };
    let (q1, q2, x) = (common::name("q"), common::name("q"), common::name("x"));
    let mut config = common::config_with(&service.url, &[&q1, &q2], &x, &[]);
    config.app_id = None;
    let config = config.header("rasa-export-process-id", "0123456789abcdef0123456789abcdef");
    let broker = PikaBackend::new(config.clone()).open().await.expect("connect");
    let events = broker_testkit::rasa_sample_events();
    let first_id = events[0].id();
    for e in events.iter().take(5).cloned() {
        broker.publish(e).await.unwrap().await.expect("confirmed");
    }
    let extra = vec![("x-trace".to_owned(), "abc".to_owned())];
    broker.publish_with_headers(events[5].clone(), extra).await.unwrap().await.expect("confirmed");
    broker.close().await.unwrap();

    let (connection, channel) = raw(&service.url).await;
    for q in [&q1, &q2] {
        let got = get(&channel, q, 6).await;
        assert_eq!(got.len(), 6, "fanout: each bound queue gets every event");
        for (g, line) in got.iter().zip(broker_testkit::rasa_sample_lines()) {
            assert_eq!(g.body, line.as_bytes(), "body = Rasa's bytes");
            assert_eq!(g.properties.delivery_mode(), Some(2), "persistent");
            assert_eq!(g.properties.content_type(), None, "no content type");
            assert_eq!(g.properties.app_id(), None, "no app_id without RASA_ENVIRONMENT");
            let id = g.properties.message_id().expect("message_id");
            assert_eq!(id.len(), 32);
            assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));
        }
        assert_eq!(got[0].properties.message_id(), Some(&first_id.to_string()));
        let headers = format!("{:?}", got[5].properties.headers());
        assert!(headers.contains("rasa-export-process-id") && headers.contains("x-trace"), "{headers}");
    }
    // The exchange is a non-durable fanout and the queues are durable: declaring them otherwise
    // is refused by RabbitMQ (PRECONDITION_FAILED), which proves how they were declared.
    let durable_exchange = ExchangeDeclareArguments::new(&x, "fanout").durable(true).finish();
    assert!(channel.exchange_declare(durable_exchange).await.is_err(), "the exchange must be non-durable");
    let channel = connection.open_channel(None).await.unwrap();
    assert!(channel.exchange_declare(ExchangeDeclareArguments::new(&x, "fanout")).await.is_ok());
    assert!(channel.queue_declare(QueueDeclareArguments::new(&q1)).await.is_err(), "the queue must be durable");
    let _ = connection.close().await;

    // Our consumer hands the headers over, sorted by name, values as their bytes.
    let backend = PikaBackend::new(config);
    let broker = backend.open().await.expect("connect");
    let extra = vec![("x-trace".to_owned(), "def".to_owned())];
    broker.publish_with_headers(events[0].clone(), extra).await.unwrap().await.expect("confirmed");
    broker.close().await.unwrap();
    let mut source = backend.source(&broker_core::SourceOptions::default()).await.expect("a source on q1");
    let r = tokio::time::timeout(Duration::from_secs(10), source.next()).await.expect("a message").unwrap().unwrap();
    assert_eq!(
        r.headers,
        vec![
            ("rasa-export-process-id".to_owned(), b"0123456789abcdef0123456789abcdef".to_vec()),
            ("x-trace".to_owned(), b"def".to_vec()),
        ]
    );
    assert_eq!(r.key, None);
    source.ack(&r).await.unwrap();
    let _ = source.close().await;
    cleanup(&service.url, &[&q1, &q2], &[&x]).await;
}

/// The consumer Rasa's documentation shows, in Python with pika, reads our messages unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_pika_consumer_reads_our_messages() {
    let Some(service) = broker_testkit::services::rabbitmq("a_python_pika_consumer_reads_our_messages").await else {
        return;
    };
    if !broker_testkit::services::python_module("a_python_pika_consumer_reads_our_messages", "pika") {
        return;
    }
    let (mut config, q, x) = fresh_config(&service.url, &[]);
    config.app_id = Some("staging".into());
    let broker = PikaBackend::new(config.clone()).open().await.expect("connect");
    let lines = broker_testkit::rasa_sample_lines();
    for e in broker_testkit::rasa_sample_events() {
        drop(broker.publish(e).await.unwrap());
    }
    broker.flush().await.unwrap();
    broker.close().await.unwrap();
    let script = r#"
import sys, pika
url, queue, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
connection = pika.BlockingConnection(pika.URLParameters(url))
channel = connection.channel()
out = sys.stdout.buffer
count = 0
for method, properties, body in channel.consume(queue, inactivity_timeout=10):
    if method is None:
        break
    assert properties.delivery_mode == 2 and properties.app_id == "staging", properties
    assert properties.content_type is None, properties
    out.write(body + b"\n")
    channel.basic_ack(method.delivery_tag)
    count += 1
    if count == n:
        break
connection.close()
"#;
    let output = std::process::Command::new("python3")
        .args(["-c", script, &service.url, &q, &lines.len().to_string()])
        .output()
        .expect("run python3");
    assert!(output.status.success(), "python: {}", String::from_utf8_lossy(&output.stderr));
    let got: Vec<&[u8]> = output.stdout.split(|b| *b == b'\n').filter(|l| !l.is_empty()).collect();
    let want: Vec<&[u8]> = lines.iter().map(|l| l.as_bytes()).collect();
    assert_eq!(got, want, "pika reads Rasa's bytes, in order");
    cleanup(&service.url, &[&q], &[&x]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_failures_are_clear_and_quick() {
    let Some(service) = broker_testkit::services::rabbitmq("connection_failures_are_clear_and_quick").await else {
        return;
    };
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let started = std::time::Instant::now();
    let closed = format!("amqp://guest:guest@127.0.0.1:{port}");
    let (config, ..) = fresh_config(
        &closed,
        &[("connection_attempts", ConfigValue::Int(1)), ("retry_delay_in_seconds", ConfigValue::Int(0))],
    );
    let err = PikaBackend::new(config).connect().await.expect_err("a closed port fails");
    let text = err.to_string();
    assert!(text.contains("cannot connect") && text.contains(&port.to_string()), "{text}");
    assert!(err.is_temporary(), "a closed port may open later: {err:?}");
    assert!(started.elapsed() < Duration::from_secs(5));

    let t = common::config_with(&service.url, &["q"], "x", &[]).target;
    let wrong = format!("amqp://{}:wrong-password-123@{}:{}/%2f", t.username, t.host, t.port);
    let (config, ..) = fresh_config(&wrong, &[("connection_attempts", ConfigValue::Int(1))]);
    let err = PikaBackend::new(config).connect().await.expect_err("a wrong password fails");
    let text = err.to_string();
    assert!(text.contains("cannot connect") && !text.contains("wrong-password-123"), "{text}");
    assert!(matches!(err, Error::Denied { .. }) && !err.is_temporary(), "a refused password is permanent: {err:?}");
}

/// A connection cut by the network (a proxy on loopback): unconfirmed and new events wait, are
/// re-sent in order after the reconnect, and `is_ready` tells the truth meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_loses_nothing_and_is_reported_by_is_ready() {
    let Some(service) = broker_testkit::services::rabbitmq("an_outage_loses_nothing").await else { return };
    let proxy = common::proxy(&service.url).await;
    let (config, q, x) = fresh_config(
        &common::proxied_url(&proxy, &service.url),
        &[("retry_delay_in_seconds", ConfigValue::Float(0.5))],
    );
    let backend = PikaBackend::new(config);
    let broker = std::sync::Arc::new(backend.open().await.expect("connect"));
    let mut receipts = Vec::new();
    for seq in 0..500 {
        receipts.push(broker.publish(broker_testkit::user_event("outage", seq)).await.unwrap());
    }
    proxy.refuse().await;
    for seq in 500..1000 {
        receipts.push(broker.publish(broker_testkit::user_event("outage", seq)).await.unwrap());
    }
    assert!(
        common::becomes_ready(broker.as_ref(), false, Duration::from_secs(1)).await,
        "is_ready must be false while RabbitMQ is unreachable"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!broker.is_ready().await);
    proxy.restore();
    for r in receipts {
        tokio::time::timeout(Duration::from_secs(30), r).await.expect("in time").expect("delivered after the outage");
    }
    assert!(broker.is_ready().await, "ready again");
    broker.close().await.unwrap();
    let seen = common::consume_distinct(&backend, 1000, Duration::from_secs(30)).await;
    println!("outage: {} distinct events, {} duplicates", seen.distinct, seen.duplicates);
    assert_eq!(seen.distinct, 1000, "every event arrived");
    assert!(seen.order["outage"].iter().copied().eq(0..1000), "in publish order (first copies)");
    cleanup(&service.url, &[&q], &[&x]).await;
}

/// `should_keep_unpublished_messages: false` and `raise_on_failure: true` do what they say.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_unpublished_false_and_raise_on_failure() {
    let Some(service) = broker_testkit::services::rabbitmq("keep_unpublished_false_and_raise_on_failure").await else {
        return;
    };
    let proxy = common::proxy(&service.url).await;
    let (config, q, x) = fresh_config(
        &common::proxied_url(&proxy, &service.url),
        &[
            ("should_keep_unpublished_messages", ConfigValue::Bool(false)),
            ("raise_on_failure", ConfigValue::Bool(true)),
            ("retry_delay_in_seconds", ConfigValue::Float(0.3)),
        ],
    );
    let broker = PikaBackend::new(config).open().await.expect("connect");
    broker.publish(broker_testkit::user_event("k", 0)).await.unwrap().await.expect("delivered while up");
    proxy.refuse().await;
    let mut raised = false;
    for seq in 1..200 {
        match broker.publish(broker_testkit::user_event("k", seq)).await {
            Err(Error::Unavailable { reason, .. }) => {
                assert!(reason.contains("raise_on_failure"), "{reason}");
                raised = true;
                break;
            }
            Ok(r) => {
                // Accepted before the writer saw the cut: it fails rather than waits.
                if let Ok(out) = tokio::time::timeout(Duration::from_secs(5), r).await {
                    assert!(out.is_err() || seq < 5, "event {seq} after the cut: {out:?}");
                }
            }
            Err(other) => panic!("{other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(raised, "publish must fail while disconnected with raise_on_failure");
    proxy.restore();
    assert!(common::becomes_ready(&broker, true, Duration::from_secs(5)).await, "reconnects");
    broker.publish(broker_testkit::user_event("k", 999)).await.unwrap().await.expect("delivered after");
    broker.close().await.unwrap();
    cleanup(&service.url, &[&q], &[&x]).await;
}

/// A broker that stops reading and confirming (what a memory or disk alarm does to publishers;
/// amqprs never receives `connection.blocked`): after `confirm_timeout` it is not ready, new
/// events wait (here `when_full: error` shows the back-pressure), and all are confirmed later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_broker_is_detected_by_confirm_timeouts() {
    let Some(service) = broker_testkit::services::rabbitmq("a_stalled_broker_is_detected").await else { return };
    let proxy = common::proxy(&service.url).await;
    let (config, q, x) = fresh_config(
        &common::proxied_url(&proxy, &service.url),
        &[
            ("confirm_timeout", ConfigValue::Float(0.5)),
            ("max_inflight", ConfigValue::Int(50)),
            ("buffer_size", ConfigValue::Int(100)),
            ("when_full", ConfigValue::Str("error".into())),
        ],
    );
    let broker = PikaBackend::new(config).open().await.expect("connect");
    broker.publish(broker_testkit::user_event("s", 0)).await.unwrap().await.expect("delivered");
    proxy.black_hole();
    let (receipts, full) = common::publish_until_full(&broker, "s", 1000).await;
    assert!(full, "a bounded window and buffer push back");
    // Window (50) + buffer (100), plus the few whose confirms were already on the wire.
    assert!(receipts.len() <= 200, "bounded by window + buffer: {} accepted", receipts.len());
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(!broker.is_ready().await, "not ready once confirms stop");
    proxy.restore();
    for r in receipts {
        tokio::time::timeout(Duration::from_secs(30), r).await.expect("in time").expect("delivered");
    }
    assert!(broker.is_ready().await);
    broker.close().await.unwrap();
    cleanup(&service.url, &[&q], &[&x]).await;
}

/// Delivery tags are the position of a confirmed event; unroutable messages (no queue bound)
/// fail alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirms_carry_tags_and_unroutable_messages_fail() {
    let Some(service) = broker_testkit::services::rabbitmq("confirms_carry_tags").await else { return };
    let (config, q, x) = fresh_config(&service.url, &[]);
    let broker = PikaBackend::new(config).open().await.expect("connect");
    let d = broker.publish(broker_testkit::user_event("t", 0)).await.unwrap().await.unwrap();
    assert_eq!(d.position, Some(Position::DeliveryTag(1)));
    // Unbind by deleting the queue: the exchange now routes nowhere.
    cleanup(&service.url, &[&q], &[]).await;
    match broker.publish(broker_testkit::user_event("t", 1)).await.unwrap().await {
        Err(Error::Rejected { reason, .. }) => assert!(reason.contains("unroutable"), "{reason}"),
        other => panic!("an unroutable message must be rejected: {other:?}"),
    }
    broker.close().await.unwrap();
    cleanup(&service.url, &[], &[&x]).await;
}

/// docs/contract.md §B: manual acks and a prefetch window. No more than `prefetch` unacknowledged
/// events are handed out; an acked one makes room; unacked ones come again to the next consumer;
/// a message that is not an event is reported with its delivery tag and the stream goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_consumer_acks_manually_within_a_prefetch_window() {
    let Some(service) = broker_testkit::services::rabbitmq("the_consumer_acks_manually").await else { return };
    let (config, q, x) = fresh_config(&service.url, &[]);
    let backend = PikaBackend::new(config);
    let broker = backend.open().await.expect("connect");
    for seq in 0..10 {
        broker.publish(broker_testkit::user_event("c", seq)).await.unwrap().await.unwrap();
    }
    // Not an event, published by someone else into the same queue.
    let (connection, channel) = raw(&service.url).await;
    channel
        .basic_publish(
            amqprs::BasicProperties::default(),
            b"not json".to_vec(),
            amqprs::channel::BasicPublishArguments::new("", &q),
        )
        .await
        .unwrap();
    broker.publish(broker_testkit::user_event("c", 10)).await.unwrap().await.unwrap();
    broker.close().await.unwrap();

    let mut options = broker_core::SourceOptions::from(broker_core::StartFrom::Beginning);
    options.prefetch = 4;
    let mut source = backend.source(&options).await.unwrap();
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(source.next().await.unwrap().expect("an event"));
    }
    let seqs: Vec<u64> = held.iter().filter_map(|r| broker_testkit::seq_of(&r.event)).collect();
    assert_eq!(seqs, vec![0, 1, 2, 3]);
    assert!(
        tokio::time::timeout(Duration::from_millis(700), source.next()).await.is_err(),
        "a fifth event must wait while 4 are unacknowledged (prefetch 4)"
    );
    source.ack(&held[0]).await.unwrap();
    let fifth =
        tokio::time::timeout(Duration::from_secs(5), source.next()).await.expect("room after an ack").unwrap().unwrap();
    assert_eq!(broker_testkit::seq_of(&fifth.event), Some(4));
    drop(source); // 1, 2, 3 and 4 were not acknowledged: they go back to the queue

    let mut source = backend.source(&options).await.unwrap();
    let mut got = Vec::new();
    let mut malformed = None;
    // The bad message came on another connection, so it may land after event 10.
    while got.len() < 10 || malformed.is_none() {
        match tokio::time::timeout(Duration::from_secs(5), source.next()).await.expect("in time") {
            Ok(Some(r)) => {
                source.ack(&r).await.unwrap();
                got.push(broker_testkit::seq_of(&r.event).unwrap());
            }
            Err(Error::Malformed { position, reason }) => malformed = Some((position, reason)),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(got, (1..=10).collect::<Vec<_>>(), "unacked events come again, in order");
    let (position, reason) = malformed.expect("the bad message is reported");
    assert!(matches!(position, Position::DeliveryTag(_)), "{position:?}");
    assert!(reason.contains("rejected without requeue"), "{reason}");
    let _ = connection.close().await;
    cleanup(&service.url, &[&q], &[&x]).await;
}

/// docs/contract.md §A.6: closing while RabbitMQ is unreachable gives up at the deadline and hands back
/// every event it could not deliver, in publish order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_during_an_outage_reports_what_was_not_delivered() {
    let Some(service) = broker_testkit::services::rabbitmq("close_during_an_outage").await else { return };
    let proxy = common::proxy(&service.url).await;
    let (config, q, x) =
        fresh_config(&common::proxied_url(&proxy, &service.url), &[("close_timeout", ConfigValue::Float(1.0))]);
    let broker = PikaBackend::new(config).open().await.expect("connect");
    broker.publish(broker_testkit::user_event("z", 0)).await.unwrap().await.expect("delivered while up");
    proxy.refuse().await;
    assert!(common::becomes_ready(&broker, false, Duration::from_secs(2)).await);
    let mut receipts = Vec::new();
    for seq in 1..=10 {
        receipts.push(broker.publish(broker_testkit::user_event("z", seq)).await.unwrap());
    }
    let started = std::time::Instant::now();
    let report = broker.close().await.expect("close returns a report");
    assert!(started.elapsed() < Duration::from_secs(5), "close keeps its deadline: {:?}", started.elapsed());
    let seqs: Vec<u64> = report.undelivered.iter().filter_map(broker_testkit::seq_of).collect();
    assert_eq!(seqs, (1..=10).collect::<Vec<_>>(), "the undelivered events, in order");
    for r in receipts {
        assert!(matches!(r.await, Err(Error::Timeout(_))));
    }
    drop(proxy);
    cleanup(&service.url, &[&q], &[&x]).await;
}

/// A consumer whose connection drops resubscribes; an ack for a message of the old channel acks
/// nothing on the new one (delivery tags restart at 1 per channel), so that message comes again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_from_a_closed_channel_ack_nothing() {
    let Some(service) = broker_testkit::services::rabbitmq("acks_from_a_closed_channel").await else { return };
    let proxy = common::proxy(&service.url).await;
    let (config, q, x) = fresh_config(&common::proxied_url(&proxy, &service.url), &[]);
    let backend = PikaBackend::new(config);
    let broker = backend.open().await.expect("connect");
    for seq in 0..2 {
        broker.publish(broker_testkit::user_event("g", seq)).await.unwrap().await.unwrap();
    }
    broker.close().await.unwrap();
    // Prefetch 1: only event 0 is out on the first channel.
    let mut options = broker_core::SourceOptions::from(broker_core::StartFrom::Beginning);
    options.prefetch = 1;
    let mut source = backend.source(&options).await.unwrap();
    let old = source.next().await.unwrap().unwrap();
    assert_eq!(old.position, Position::DeliveryTag(1));
    proxy.refuse().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.restore();
    // The new channel delivers with tags from 1 again (event 1, or event 0 once RabbitMQ has
    // requeued it: which comes first depends on when it sees the old connection go).
    let again = tokio::time::timeout(Duration::from_secs(10), source.next()).await.expect("in time").unwrap().unwrap();
    assert_ne!(again.position, old.position, "positions of different channels differ");
    source.ack(&old).await.expect("a stale ack is a no-op");
    drop(source); // nothing acked on the new channel: both events stay queued
    let seen = common::consume_distinct(&backend, 2, Duration::from_secs(10)).await;
    let mut seqs = seen.order["g"].clone();
    seqs.sort_unstable();
    assert_eq!(seqs, vec![0, 1], "the stale ack acknowledged nothing");
    cleanup(&service.url, &[&q], &[&x]).await;
}

/// A queue deleted under a following consumer (RabbitMQ sends basic.cancel): the consumer
/// resubscribes, which declares the topology again, and goes on receiving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_queue_does_not_hang_a_following_consumer() {
    let Some(service) = broker_testkit::services::rabbitmq("a_deleted_queue").await else { return };
    let (config, q, x) = fresh_config(&service.url, &[]);
    let backend = PikaBackend::new(config);
    let mut source =
        backend.source(&broker_core::SourceOptions::from(broker_core::StartFrom::Beginning)).await.unwrap();
    cleanup(&service.url, &[&q], &[]).await;
    let waiting = tokio::spawn(async move {
        let r = source.next().await;
        (source, r)
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let broker = backend.open().await.expect("connect");
    // The consumer re-declared the queue and its binding; the event reaches it.
    let mut delivered = false;
    for seq in 0..20 {
        broker.publish(broker_testkit::user_event("d", seq)).await.unwrap().await.unwrap();
        if waiting.is_finished() {
            delivered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(delivered, "the consumer must not hang after basic.cancel");
    let (mut source, r) = waiting.await.unwrap();
    assert!(r.unwrap().is_some());
    source.close().await.unwrap();
    broker.close().await.unwrap();
    cleanup(&service.url, &[&q], &[&x]).await;
}
