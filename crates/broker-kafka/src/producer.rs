//! `KafkaBroker`: publishing into librdkafka's queue (the bounded buffer), flush, readiness and
//! close with the accounting rule.

use super::*;

/// A connected Kafka broker (what [`KafkaBackend::open`] returns; `connect` boxes it).
pub struct KafkaBroker {
    /// The producer; replaced (under the write lock) after an error that is not an event's.
    pub(crate) producer: Arc<RwLock<Arc<KafkaProducer>>>,
    pub(crate) shared: Arc<Shared>,
    pub(crate) config: KafkaConfig,
    pub(crate) environment: Arc<str>,
    pub(crate) closed: Arc<AtomicBool>,
    pub(crate) seq: AtomicU64,
    /// What the first close could not deliver, for a second close.
    pub(crate) close_result: tokio::sync::Mutex<Option<Vec<Event>>>,
}

impl Drop for KafkaBroker {
    /// Dropped without `close`: the supervisor stops, and the producer with its threads goes
    /// with the last handle (librdkafka purges what it still holds).
    fn drop(&mut self) {
        self.closed.store(true, Ordering::Release);
    }
}

/// `RASA_ENVIRONMENT` as Rasa sends it.
pub(crate) fn rasa_environment() -> String {
    std::env::var("RASA_ENVIRONMENT").unwrap_or_else(|_| "RASA_ENVIRONMENT_NOT_SET".to_owned())
}

/// Rasa's headers, then the event's own (`PublishOptions::headers`).
pub(crate) fn headers(environment: &str, id: &str, extra: &[(String, String)]) -> OwnedHeaders {
    let mut headers = OwnedHeaders::new_with_capacity(2 + extra.len())
        .insert(Header { key: "RASA_ENVIRONMENT", value: Some(environment.as_bytes()) })
        .insert(Header { key: EVENT_ID_HEADER, value: Some(id.as_bytes()) });
    for (k, v) in extra {
        headers = headers.insert(Header { key: k, value: Some(v.as_bytes()) });
    }
    headers
}

impl std::fmt::Debug for KafkaBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaBroker").field("topic", &self.config.topic).finish_non_exhaustive()
    }
}

impl KafkaBroker {
    /// How many times the producer was replaced after an error that was not an event's own
    /// (an unknown or fatal broker error); the affected events went again, in order.
    pub fn producer_resets(&self) -> u64 {
        self.shared.resets.load(Ordering::Relaxed)
    }

    fn current(&self) -> Arc<KafkaProducer> {
        self.producer.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Whether events wait to go again through a new producer.
    fn resending(&self) -> bool {
        self.shared.resetting.load(Ordering::Acquire)
            || self.shared.reset_needed.load(Ordering::Acquire)
            || !self.shared.resend.lock().unwrap_or_else(PoisonError::into_inner).is_empty()
    }
}

#[async_trait]
impl EventBroker for KafkaBroker {
    fn backend(&self) -> &'static str {
        NAME
    }

    async fn publish_with(&self, event: Event, options: PublishOptions) -> Result<Receipt, Error> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::Closed);
        }
        let id = event.id();
        let (receipt, settle) = Receipt::metered(&self.shared.meter, id);
        let (json, sender) = event.into_parts();
        let id_text = id.to_string();
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let mut tracked = Box::new(Tracked { settle, seq, attempts: 0 });
        loop {
            let sent = {
                // A reset holds the write side: no event slips into a producer being replaced.
                let producer = self.producer.read().unwrap_or_else(PoisonError::into_inner);
                let mut record: BaseRecord<'_, str, [u8], Box<Tracked>> = BaseRecord::with_opaque_to(
                    &self.config.topic,
                    tracked,
                )
                .payload(&json[..])
                .headers(headers(&self.environment, &id_text, &options.headers));
                if self.config.partition_by_sender {
                    if let Some(key) = sender.as_deref() {
                        record = record.key(key);
                    }
                }
                producer.send(record).map_err(|(e, record)| (e, record.delivery_opaque))
            };
            match sent {
                Ok(()) => {
                    self.shared.meter.accepted();
                    return Ok(receipt);
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    tracked = back;
                    if !self.config.blocks_when_full() {
                        let capacity =
                            self.config.queue_size.unwrap_or(self.config.delivery.buffer_size as u64) as usize;
                        return Err(Error::BufferFull { capacity });
                    }
                    if self.closed.load(Ordering::Acquire) {
                        return Err(Error::Closed);
                    }
                    // Back-pressure without blocking the caller's thread.
                    tokio::time::sleep(FULL_WAIT).await;
                }
                Err((e, back)) if classify::events_fault(e.rdkafka_error_code()) => {
                    // Accepted (it has a receipt) and refused at once as its own fault.
                    self.shared.meter.accepted();
                    let reason = e.to_string();
                    back.settle.settle(Err(Error::Rejected { backend: NAME, event_id: id_text.clone(), reason }));
                    return Ok(receipt);
                }
                Err((e, back)) => {
                    // Not the event's fault (a fatal idempotence error while a reset is pending,
                    // an unknown error): it waits in the resend list, in publish order, and goes
                    // through the new producer.
                    tracing::warn!("kafka: {e}; the event waits for the new producer");
                    let key = if self.config.partition_by_sender { sender.map(String::into_bytes) } else { None };
                    let resend = Resend {
                        payload: json,
                        key,
                        headers: Some(headers(&self.environment, &id_text, &options.headers)),
                        tracked: back,
                    };
                    self.shared.resend.lock().unwrap_or_else(PoisonError::into_inner).push(resend);
                    self.shared.reset_needed.store(true, Ordering::Release);
                    self.shared.meter.accepted();
                    self.shared.meter.retried(1);
                    return Ok(receipt);
                }
            }
        }
    }

    async fn flush(&self) -> Result<(), Error> {
        // Through resets too: until nothing is queued, in flight or waiting to go again. Not
        // rdkafka's `flush`: with the polling thread serving the delivery reports, its own poll
        // sleeps its full 100 ms interval, so every flush took at least 100 ms. Instead: wake the
        // broker threads (librdkafka's flush with no wait: lingering messages go now), then
        // watch the count of messages not yet reported, 1 ms at first, then up to every 10 ms.
        let mut wait = Duration::from_millis(1);
        loop {
            let producer = self.current();
            match producer.flush(Duration::ZERO) {
                Ok(()) | Err(KafkaError::Flush(RDKafkaErrorCode::OperationTimedOut)) => {}
                Err(e) => {
                    let reason = e.to_string();
                    return Err(Error::Io { backend: NAME, operation: "flushing".into(), reason, cause: None });
                }
            }
            if !self.resending() && producer.in_flight_count() == 0 {
                return Ok(());
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_millis(10));
        }
    }

    async fn is_ready(&self) -> bool {
        if self.closed.load(Ordering::Acquire) {
            return false;
        }
        let producer = self.current();
        let topic = self.config.topic.clone();
        let probe =
            tokio::task::spawn_blocking(move || producer.client().fetch_metadata(Some(&topic), Duration::from_secs(2)))
                .await;
        // A metadata round trip is the truth about the broker right now.
        let up = matches!(probe, Ok(Ok(_)));
        self.shared.set_ready(up);
        up
    }

    async fn close(&self) -> Result<CloseReport, Error> {
        let mut first = self.close_result.lock().await;
        if let Some(done) = first.as_ref() {
            // A second close says what the first could not deliver.
            return Ok(CloseReport::new(done.clone()));
        }
        let report = self.close_once().await?;
        *first = Some(report.undelivered.clone());
        Ok(report)
    }
}

impl KafkaBroker {
    #[tracing::instrument(
        name = "close",
        level = "error",
        skip_all,
        fields(backend = NAME, destination = %self.config.topic, undelivered = tracing::field::Empty)
    )]
    async fn close_once(&self) -> Result<CloseReport, Error> {
        self.closed.store(true, Ordering::Release);
        let deadline = self.config.delivery.close_timeout;
        if !matches!(tokio::time::timeout(deadline, self.flush()).await, Ok(Ok(()))) {
            // What is queued, in flight or waiting to go again at the deadline is handed back.
            self.shared.closing.store(true, Ordering::Release);
            let producer = self.current();
            tokio::task::spawn_blocking(move || {
                producer.purge(PurgeConfig::default().queue().inflight());
                let _ = producer.flush(Duration::from_secs(5));
            })
            .await
            .map_err(unavailable)?;
            let waiting = std::mem::take(&mut *self.shared.resend.lock().unwrap_or_else(PoisonError::into_inner));
            let mut undelivered = self.shared.undelivered.lock().unwrap_or_else(PoisonError::into_inner);
            for r in waiting {
                if let Ok(event) = Event::from_json(&r.payload) {
                    undelivered.push(event.with_id(r.tracked.settle.id()));
                }
                r.tracked.settle.settle(Err(Error::Timeout(deadline)));
            }
        }
        let undelivered = std::mem::take(&mut *self.shared.undelivered.lock().unwrap_or_else(PoisonError::into_inner));
        self.shared.meter.undelivered(undelivered.len());
        tracing::Span::current().record("undelivered", undelivered.len());
        // Closed: not ready, whatever the last delivery report said.
        self.shared.set_ready(false);
        Ok(CloseReport::new(undelivered))
    }
}
