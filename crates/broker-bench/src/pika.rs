//! `broker-bench pika`: the RabbitMQ backend against amqprs alone, publishing with confirms and
//! the same window of 1,000 unconfirmed messages, and against the pattern of one publish awaiting
//! its confirm at a time (amqprs, window 1). Same topology and properties everywhere: a
//! non-durable fanout exchange, one durable queue, persistent messages with a `message_id`.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use amqprs::callbacks::ChannelCallback;
use amqprs::channel::{
    BasicPublishArguments, Channel, ConfirmSelectArguments, ExchangeDeclareArguments, ExchangeDeleteArguments,
    QueueBindArguments, QueueDeclareArguments, QueueDeleteArguments,
};
use amqprs::connection::{Connection, OpenConnectionArguments};
use amqprs::{Ack, BasicProperties, Cancel, CloseChannel, Nack, Return};
use anyhow::{Context, Result, bail};
use broker_core::async_trait;
use broker_pika::{PikaBackend, PikaConfig};
use tokio::sync::{Notify, Semaphore};

use crate::{Plan, dataset, peak_rss_mib, publish_through, result, run_plan};

/// Unconfirmed messages allowed at a time by the `pika-raw` baseline.
const WINDOW: usize = 1000;

/// The pika backend's default `max_inflight`, which `pika-ours` runs with.
const OURS_DEFAULT: usize = 5000;

/// `BROKER_TEST_AMQP_URL`'s host, port and credentials (default: guest on 127.0.0.1:5672).
fn target() -> broker_pika::AmqpTarget {
    let url = std::env::var("BROKER_TEST_AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let options = broker_core::Options::from_pairs([
        ("url", broker_core::ConfigValue::Str(url)),
        ("queues", broker_core::ConfigValue::Str("unused".into())),
    ]);
    PikaConfig::from_options(options).expect("BROKER_TEST_AMQP_URL is a valid AMQP URI").0.target
}

pub(crate) fn bench(events: u64, runs: usize) -> Result<()> {
    let one_by_one = (events / 20).max(1000);
    run_plan(
        Plan {
            backend: "pika",
            describe: format!(
                "{events} events to one durable queue through a fanout exchange, RabbitMQ at {}",
                target().describe()
            ),
            variants: vec![
                ("pika-raw", events),
                ("pika-raw-w100", events),
                ("pika-raw-w5000", events),
                ("pika-raw-w20000", events),
                ("pika-ours", events),
                ("pika-ours-w20000", events),
                ("pika-one-by-one", one_by_one),
            ],
            rates: vec![],
            comparisons: vec![
                ("pika-ours", "pika-raw", 0.9),
                ("pika-ours", "pika-raw-w100", 0.9),
                ("pika-ours", "pika-raw-w5000", 0.9),
                ("pika-ours", "pika-raw-w20000", 0.9),
                ("pika-ours-w20000", "pika-raw-w20000", 0.9),
                ("pika-ours", "pika-one-by-one", 8.0),
            ],
            note: "raw: amqprs with publisher confirms, serde_json bodies, a window of 1000 unconfirmed (raw-wN: N, the sweep for the best raw window); ours: the pika backend (its default max_inflight 5000; ours-wN: N); one-by-one: amqprs awaiting each confirm before the next publish",
        },
        runs,
    )
}

pub(crate) fn run(variant: &str, n: u64) -> Result<serde_json::Value> {
    let queue = format!("bench-{variant}-{}", std::process::id());
    let exchange = format!("bench-x-{variant}-{}", std::process::id());
    let t = target();
    let r = match variant {
        "pika-ours" => ours(variant, &t, &queue, &exchange, n, OURS_DEFAULT),
        other if other.starts_with("pika-ours-w") => {
            let window = other["pika-ours-w".len()..].parse().with_context(|| format!("window of {other}"))?;
            ours(variant, &t, &queue, &exchange, n, window)
        }
        "pika-raw" => raw(variant, &t, &queue, &exchange, n, WINDOW),
        "pika-one-by-one" => raw(variant, &t, &queue, &exchange, n, 1),
        other if other.starts_with("pika-raw-w") => {
            let window = other["pika-raw-w".len()..].parse().with_context(|| format!("window of {other}"))?;
            raw(variant, &t, &queue, &exchange, n, window)
        }
        other => bail!("unknown variant {other}"),
    };
    cleanup(&t, &queue, &exchange)?;
    r
}

/// Our pika backend with `max_inflight` = `window`.
fn ours(
    variant: &str,
    t: &broker_pika::AmqpTarget,
    queue: &str,
    exchange: &str,
    n: u64,
    window: usize,
) -> Result<serde_json::Value> {
    let mut config =
        PikaConfig::new(t.host.clone(), t.port, t.username.clone(), t.password.expose(), vec![queue.into()])
            .exchange(exchange);
    config.target.vhost = t.vhost.clone();
    config.max_inflight = window;
    publish_through(variant, Box::new(PikaBackend::new(config)), dataset(n))
}

fn cleanup(t: &broker_pika::AmqpTarget, queue: &str, exchange: &str) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        let (connection, channel) = open(t).await?;
        let _ = channel.queue_delete(QueueDeleteArguments::new(queue)).await;
        let _ = channel.exchange_delete(ExchangeDeleteArguments::new(exchange)).await;
        let _ = connection.close().await;
        Ok(())
    })
}

async fn open(t: &broker_pika::AmqpTarget) -> Result<(Connection, Channel)> {
    let mut args = OpenConnectionArguments::new(&t.host, t.port, &t.username, t.password.expose());
    args.virtual_host(&t.vhost);
    let connection = Connection::open(&args).await.context("connecting to RabbitMQ")?;
    let channel = connection.open_channel(None).await?;
    Ok((connection, channel))
}

/// Confirms by delivery tag, for the raw publisher.
struct Confirms {
    state: Mutex<State>,
    permits: Arc<Semaphore>,
    done: Notify,
}

#[derive(Default)]
struct State {
    /// Send time of each unconfirmed message: `sent[i]` has tag `base + i`.
    sent: VecDeque<Option<Instant>>,
    base: u64,
    confirmed: u64,
    nacked: u64,
    latencies: Vec<u64>,
}

struct Callback(Arc<Confirms>);

impl Confirms {
    fn settle(&self, tag: u64, multiple: bool, ack: bool) {
        let mut s = self.state.lock().expect("lock");
        let mut settled = 0usize;
        let mut take = |s: &mut State, i: usize| {
            if let Some(t) = s.sent.get_mut(i).and_then(Option::take) {
                s.latencies.push(t.elapsed().as_nanos() as u64 / 1000);
                settled += 1;
            }
        };
        if multiple {
            let upto = (tag + 1).saturating_sub(s.base) as usize;
            for i in 0..upto.min(s.sent.len()) {
                take(&mut s, i);
            }
        } else if tag >= s.base {
            let i = (tag - s.base) as usize;
            take(&mut s, i);
        }
        while matches!(s.sent.front(), Some(None)) {
            s.sent.pop_front();
            s.base += 1;
        }
        if ack {
            s.confirmed += settled as u64;
        } else {
            s.nacked += settled as u64;
        }
        drop(s);
        self.permits.add_permits(settled);
        self.done.notify_one();
    }
}

#[async_trait]
impl ChannelCallback for Callback {
    async fn close(&mut self, _: &Channel, _: CloseChannel) -> Result<(), amqprs::error::Error> {
        Ok(())
    }
    async fn cancel(&mut self, _: &Channel, _: Cancel) -> Result<(), amqprs::error::Error> {
        Ok(())
    }
    async fn flow(&mut self, _: &Channel, active: bool) -> Result<bool, amqprs::error::Error> {
        Ok(active)
    }
    async fn publish_ack(&mut self, _: &Channel, ack: Ack) {
        self.0.settle(ack.delivery_tag(), ack.mutiple(), true);
    }
    async fn publish_nack(&mut self, _: &Channel, nack: Nack) {
        self.0.settle(nack.delivery_tag(), nack.multiple(), false);
    }
    async fn publish_return(&mut self, _: &Channel, _: Return, _: BasicProperties, _: Vec<u8>) {}
}

/// amqprs alone: serde_json bodies, confirms, at most `window` unconfirmed.
fn raw(
    variant: &str,
    t: &broker_pika::AmqpTarget,
    queue: &str,
    exchange: &str,
    n: u64,
    window: usize,
) -> Result<serde_json::Value> {
    let values: Vec<serde_json::Value> =
        dataset(n).iter().map(|e| serde_json::from_slice(&e.to_json()).context("dataset")).collect::<Result<_>>()?;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(async move {
        let (connection, channel) = open(t).await?;
        channel.exchange_declare(ExchangeDeclareArguments::new(exchange, "fanout").durable(false).finish()).await?;
        channel.queue_declare(QueueDeclareArguments::durable_client_named(queue)).await?;
        channel.queue_bind(QueueBindArguments::new(queue, exchange, "")).await?;
        let confirms = Arc::new(Confirms {
            state: Mutex::new(State { base: 1, latencies: Vec::with_capacity(n as usize), ..State::default() }),
            permits: Arc::new(Semaphore::new(window)),
            done: Notify::new(),
        });
        channel.register_callback(Callback(confirms.clone())).await?;
        channel.confirm_select(ConfirmSelectArguments::default()).await?;
        let started = Instant::now();
        for (i, v) in values.iter().enumerate() {
            confirms.permits.acquire().await?.forget();
            let body = serde_json::to_vec(v)?;
            let mut props = BasicProperties::default();
            props.with_delivery_mode(amqprs::DELIVERY_MODE_PERSISTENT).with_message_id(&format!("{i:032x}"));
            confirms.state.lock().expect("lock").sent.push_back(Some(Instant::now()));
            let mut args = BasicPublishArguments::new(exchange, "");
            args.mandatory(true);
            channel.basic_publish(props, body, args).await?;
        }
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            let (confirmed, nacked) = {
                let s = confirms.state.lock().expect("lock");
                (s.confirmed, s.nacked)
            };
            if confirmed + nacked >= n {
                if nacked > 0 {
                    bail!("{nacked} messages were nacked");
                }
                break;
            }
            if Instant::now() >= deadline {
                bail!("only {confirmed} of {n} confirmed in time");
            }
            let _ = tokio::time::timeout(Duration::from_millis(50), confirms.done.notified()).await;
        }
        let elapsed = started.elapsed();
        let latencies = std::mem::take(&mut confirms.state.lock().expect("lock").latencies);
        let _ = connection.close().await;
        Ok(result(variant, n, elapsed, latencies, peak_rss_mib()))
    })
}
