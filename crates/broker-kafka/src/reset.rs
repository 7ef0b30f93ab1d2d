//! The producer's side of librdkafka: delivery reports settle receipts (`Reports`), and an event
//! that failed for a reason not its own waits in `Shared::resend` until `reset` replaces the
//! producer and sends it again, in publish order.

use super::*;

/// State shared by the broker and the delivery reports of every producer it creates.
pub(crate) struct Shared {
    /// Metrics: `backend="kafka"`, `destination=<topic>`.
    pub(crate) meter: Meter,
    /// The last error librdkafka reported.
    pub(crate) last_error: Arc<LastError>,
    /// Set while closing: failed events are kept for the close report.
    pub(crate) closing: AtomicBool,
    pub(crate) undelivered: Mutex<Vec<Event>>,
    /// Cleared on "all brokers down", set by successful deliveries and probes.
    pub(crate) ready: AtomicBool,
    /// Events a producer failed for a reason that is not theirs (an unknown or fatal broker
    /// error, a purge during a reset): they go again, in publish order, through a new producer.
    pub(crate) resend: Mutex<Vec<Resend>>,
    pub(crate) reset_needed: AtomicBool,
    pub(crate) resetting: AtomicBool,
    /// How many times the producer was replaced.
    pub(crate) resets: AtomicU64,
}

impl Shared {
    pub(crate) fn new(meter: Meter) -> Shared {
        Shared {
            meter,
            last_error: Arc::default(),
            closing: AtomicBool::new(false),
            undelivered: Mutex::default(),
            ready: AtomicBool::new(true),
            resend: Mutex::default(),
            reset_needed: AtomicBool::new(false),
            resetting: AtomicBool::new(false),
            resets: AtomicU64::new(0),
        }
    }

    /// Records readiness (also as `broker_ready`; both each time, so they cannot disagree).
    pub(crate) fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Release);
        self.meter.ready(ready);
    }
}

/// What travels with each message to its delivery report.
pub(crate) struct Tracked {
    pub(crate) settle: Settle,
    /// Publish order, so re-sent events keep it.
    pub(crate) seq: u64,
    /// How many producer resets this event went through.
    pub(crate) attempts: u32,
}

pub(crate) struct Resend {
    pub(crate) payload: Vec<u8>,
    pub(crate) key: Option<Vec<u8>>,
    /// The message's headers as first sent (Rasa's and the event's own).
    pub(crate) headers: Option<OwnedHeaders>,
    pub(crate) tracked: Box<Tracked>,
}

/// After this many producer resets an event fails with the last error.
pub(crate) const MAX_RESETS_PER_EVENT: u32 = 5;

pub(crate) fn io_error(e: impl std::fmt::Display) -> Error {
    Error::Io { backend: NAME, operation: "producing".into(), reason: e.to_string(), cause: None }
}

/// Receives delivery reports on librdkafka's polling thread and settles receipts there.
pub(crate) struct Reports {
    pub(crate) shared: Arc<Shared>,
}

impl ClientContext for Reports {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        use rdkafka::config::RDKafkaLogLevel as L;
        match level {
            L::Emerg | L::Alert | L::Critical | L::Error => tracing::error!("librdkafka {fac}: {message}"),
            L::Warning => tracing::warn!("librdkafka {fac}: {message}"),
            L::Notice | L::Info => tracing::info!("librdkafka {fac}: {message}"),
            L::Debug => tracing::debug!("librdkafka {fac}: {message}"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.shared.last_error.record(&error, reason);
        match error.rdkafka_error_code() {
            Some(RDKafkaErrorCode::AllBrokersDown) => self.shared.set_ready(false),
            Some(RDKafkaErrorCode::BrokerTransportFailure) => {
                tracing::debug!("kafka: transport failure (librdkafka reconnects): {reason}");
                return;
            }
            _ => {}
        }
        tracing::warn!("kafka: {error}: {reason}");
    }

    fn stats(&self, statistics: rdkafka::Statistics) {
        crate::stats::record(self.shared.meter.destination(), &statistics);
        // What waits outside librdkafka: events to send again through a new producer.
        let waiting = self.shared.resend.lock().unwrap_or_else(PoisonError::into_inner).len();
        self.shared.meter.depth(statistics.msg_cnt as usize, waiting);
    }
}

impl ProducerContext for Reports {
    type DeliveryOpaque = Box<Tracked>;

    fn delivery(&self, result: &DeliveryResult<'_>, tracked: Box<Tracked>) {
        let shared = &self.shared;
        let (e, m) = match result {
            Ok(m) => {
                shared.set_ready(true);
                tracked.settle.delivered(Some(Position::Partition { partition: m.partition(), offset: m.offset() }));
                return;
            }
            Err((e, m)) => (e, m),
        };
        let code = e.rdkafka_error_code();
        if classify::events_fault(code) {
            let event_id = tracked.settle.id().to_string();
            tracked.settle.settle(Err(Error::Rejected { backend: NAME, event_id, reason: e.to_string() }));
            return;
        }
        let purged = matches!(code, Some(RDKafkaErrorCode::PurgeQueue) | Some(RDKafkaErrorCode::PurgeInflight));
        if shared.closing.load(Ordering::Acquire) {
            if let Some(event) = m.payload().and_then(|p| Event::from_json(p).ok()) {
                shared
                    .undelivered
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(event.with_id(tracked.settle.id()));
            }
            tracked.settle.settle(Err(if purged { Error::Timeout(Duration::ZERO) } else { io_error(e) }));
            return;
        }
        if tracked.attempts >= MAX_RESETS_PER_EVENT {
            tracked.settle.settle(Err(io_error(format!("{e} (after {} producer resets)", tracked.attempts))));
            return;
        }
        // Not this event's fault: it goes again, in order, through a new producer.
        if !purged {
            tracing::warn!("kafka: {e}; the producer is replaced and the event sent again");
        }
        let resend = Resend {
            payload: m.payload().unwrap_or_default().to_vec(),
            key: m.key().map(<[u8]>::to_vec),
            headers: m.headers().map(|h| h.detach()),
            tracked,
        };
        shared.resend.lock().unwrap_or_else(PoisonError::into_inner).push(resend);
        shared.meter.retried(1);
        if !purged {
            shared.reset_needed.store(true, Ordering::Release);
        }
    }
}

/// A `BaseProducer` whose delivery reports a thread of its own serves, like rdkafka's
/// `ThreadedProducer`, but in 10 ms polls: dropping it joins that thread within 10 ms, where the
/// `ThreadedProducer`'s 100 ms poll made every drop (a CLI's exit, an async worker) wait up to
/// 100 ms. A delivery report still ends the poll at once.
pub(crate) struct KafkaProducer {
    inner: Arc<BaseProducer<Reports>>,
    stop: Arc<AtomicBool>,
    poller: Option<std::thread::JoinHandle<()>>,
}

/// How long one poll of the delivery-report thread may wait: the most a drop waits for it.
const POLL_SLICE: Duration = Duration::from_millis(10);

impl std::ops::Deref for KafkaProducer {
    type Target = BaseProducer<Reports>;
    fn deref(&self) -> &BaseProducer<Reports> {
        &self.inner
    }
}

impl Drop for KafkaProducer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(poller) = self.poller.take() {
            let _ = poller.join();
        }
        // Then the `BaseProducer` purges what is left (nothing after `close`) and is destroyed.
    }
}

pub(crate) fn new_producer(config: &KafkaConfig, shared: &Arc<Shared>) -> Result<KafkaProducer, Error> {
    let inner: Arc<BaseProducer<Reports>> = Arc::new(
        config
            .producer_config()
            .create_with_context(Reports { shared: shared.clone() })
            .map_err(|e| unavailable(format!("{}: {e}", config.bootstrap)))?,
    );
    let stop = Arc::new(AtomicBool::new(false));
    let (producer, stopped) = (inner.clone(), stop.clone());
    let poller = std::thread::Builder::new()
        .name("broker-kafka-poll".into())
        .spawn(move || {
            while !stopped.load(Ordering::Acquire) {
                producer.poll(POLL_SLICE);
            }
        })
        .map_err(|e| unavailable(format!("{}: no thread for delivery reports: {e}", config.bootstrap)))?;
    Ok(KafkaProducer { inner, stop, poller: Some(poller) })
}

/// Metadata requests in the producer's first 200 ms, so the idempotent producer gets its id as
/// soon as the partition leader's connection is up.
///
/// librdkafka asks for the producer id only from a broker it learned from metadata (not from a
/// bootstrap connection); when none is connected yet, its state machine retries after a fixed
/// 500 ms, and every message waits for the id. It also re-runs that state machine on each
/// metadata response, so a response that arrives after the leader's connection came up (~40 ms on
/// loopback) gets the id at once: the first events are delivered ~0.45 s sooner. One request every
/// 5 ms (one at a time: a slower answer spaces them out), so the id comes within ~5 ms of the
/// connection. The thread holds only a weak handle and ends after forty requests.
pub(crate) fn hasten_producer_id(producer: &Arc<KafkaProducer>, topic: &str) {
    let producer = Arc::downgrade(producer);
    let topic = topic.to_owned();
    let spawned = std::thread::Builder::new().name("broker-kafka-pid".into()).spawn(move || {
        for _ in 0..40 {
            std::thread::sleep(Duration::from_millis(5));
            let Some(p) = producer.upgrade() else { return };
            let _ = p.client().fetch_metadata(Some(&topic), Duration::from_secs(1));
        }
    });
    if let Err(e) = spawned {
        tracing::debug!("kafka: no thread to hasten the producer id ({e}); librdkafka's own timer does it");
    }
}

/// Replaces the producer: publishers wait on the lock, the old producer's queue is purged into
/// the resend list, and everything there goes again, in publish order, through a new producer.
#[tracing::instrument(
    name = "reconnect",
    level = "error",
    skip_all,
    fields(backend = NAME, destination = %config.topic, attempt = shared.resets.load(Ordering::Relaxed) + 1)
)]
pub(crate) fn reset(
    producer: &RwLock<Arc<KafkaProducer>>,
    shared: &Arc<Shared>,
    config: &KafkaConfig,
    environment: &str,
) {
    let mut guard = producer.write().unwrap_or_else(PoisonError::into_inner);
    shared.resetting.store(true, Ordering::Release);
    shared.meter.reconnected();
    shared.reset_needed.store(false, Ordering::Release);
    guard.purge(PurgeConfig::default().queue().inflight());
    let _ = guard.flush(Duration::from_secs(10));
    let fresh = match new_producer(config, shared) {
        Ok(p) => {
            let p = Arc::new(p);
            hasten_producer_id(&p, &config.topic);
            p
        }
        Err(e) => {
            tracing::error!("kafka: cannot create a new producer: {e}");
            shared.reset_needed.store(true, Ordering::Release);
            shared.resetting.store(false, Ordering::Release);
            return;
        }
    };
    let mut pending = std::mem::take(&mut *shared.resend.lock().unwrap_or_else(PoisonError::into_inner));
    pending.sort_by_key(|r| r.tracked.seq);
    tracing::warn!("kafka: new producer; sending {} events again, in order", pending.len());
    for r in pending {
        let id = r.tracked.settle.id().to_string();
        let mut tracked = r.tracked;
        tracked.attempts += 1;
        let sent_headers = r.headers.unwrap_or_else(|| headers(environment, &id, &[]));
        loop {
            let mut record: BaseRecord<'_, [u8], [u8], Box<Tracked>> =
                BaseRecord::with_opaque_to(&config.topic, tracked)
                    .payload(&r.payload[..])
                    .headers(sent_headers.clone());
            if let Some(k) = r.key.as_deref() {
                record = record.key(k);
            }
            match fresh.send(record) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), record)) => {
                    tracked = record.delivery_opaque;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err((e, record)) => {
                    record.delivery_opaque.settle.settle(Err(io_error(e)));
                    break;
                }
            }
        }
    }
    *guard = fresh;
    shared.resets.fetch_add(1, Ordering::Relaxed);
    shared.resetting.store(false, Ordering::Release);
}
