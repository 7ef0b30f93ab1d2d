//! `KafkaSource`: a consumer group, polled in batches off the async threads.

use super::*;

/// A consumer-group reader. Per partition, the group's committed offset advances only past
/// events that were acknowledged with `ack` (or were malformed and skipped): an event handed
/// over and not acknowledged comes again after a restart, whatever was acknowledged after it.
///
/// `next` is cancel-safe: a poll in progress when its future is dropped (a `timeout`, a
/// `select!`) is kept and its messages come with the next call.
pub struct KafkaSource {
    pub(crate) consumer: Arc<BaseConsumer<SourceContext>>,
    pub(crate) topic: String,
    pub(crate) follow: bool,
    pub(crate) buffered: std::collections::VecDeque<Polled>,
    /// A poll on a blocking thread, kept across a cancelled `next`.
    pub(crate) polling: Option<tokio::task::JoinHandle<Vec<Polled>>>,
    /// Per partition: offsets handed over and not acknowledged, the highest handed over, and the
    /// last one stored for commit.
    pub(crate) partitions: std::collections::HashMap<i32, PartitionAcks>,
}

/// What the commit of one partition may cover.
#[derive(Debug, Default)]
pub(crate) struct PartitionAcks {
    unacked: std::collections::BTreeSet<i64>,
    handed: Option<i64>,
    stored: Option<i64>,
}

impl PartitionAcks {
    /// The highest offset below which everything handed over is acknowledged (what may be
    /// stored: librdkafka commits it + 1), if it moved past what was stored.
    fn advance(&mut self) -> Option<i64> {
        let done = match self.unacked.first() {
            Some(lowest) => lowest - 1,
            None => self.handed?,
        };
        if self.stored.is_some_and(|s| s >= done) || done < 0 {
            return None;
        }
        self.stored = Some(done);
        Some(done)
    }
}

/// The consumer's context: its statistics give the lag per partition ([`crate::stats`]).
pub(crate) struct SourceContext {
    topic: String,
}

impl ClientContext for SourceContext {
    fn stats(&self, statistics: rdkafka::Statistics) {
        crate::stats::record(&self.topic, &statistics);
    }
}

impl rdkafka::consumer::ConsumerContext for SourceContext {}

/// A message taken from librdkafka, not yet handed over.
pub(crate) enum Polled {
    Message {
        payload: Vec<u8>,
        partition: i32,
        offset: i64,
        id: Option<EventId>,
        key: Option<Vec<u8>>,
        headers: Vec<(String, Vec<u8>)>,
    },
    /// The error, and whether it says the topic or partition does not exist.
    Failed(String, bool),
}

impl KafkaSource {
    pub(crate) fn open(config: &KafkaConfig, options: &SourceOptions) -> Result<KafkaSource, Error> {
        let mut c = config.client_config();
        config.with_statistics(&mut c);
        c.set("group.id", options.group.as_deref().unwrap_or("broker-cli"));
        // Offsets are stored when an event is acknowledged (after it was handed over) and
        // committed by librdkafka every second and when the consumer closes.
        c.set("enable.auto.commit", "true");
        c.set("auto.commit.interval.ms", "1000");
        c.set("enable.auto.offset.store", "false");
        c.set("auto.offset.reset", "earliest");
        // A topic that does not exist yet is noticed within seconds, not librdkafka's 5 minutes.
        if !config.extra.iter().any(|(k, _)| k == "topic.metadata.refresh.interval.ms") {
            c.set("topic.metadata.refresh.interval.ms", "2000");
        }
        let context = SourceContext { topic: config.topic.clone() };
        let consumer: BaseConsumer<SourceContext> =
            c.create_with_context(context).map_err(|e| unavailable(format!("{}: {e}", config.bootstrap)))?;
        match options.start {
            StartFrom::Beginning | StartFrom::Offset(_) => {
                // Read every partition from the start (or the offset), still committing to the
                // group, so a later `Resume` goes on from here.
                let metadata = consumer
                    .fetch_metadata(Some(&config.topic), Duration::from_secs(10))
                    .map_err(|e| unavailable(format!("{}: {e}", config.bootstrap)))?;
                let mut tpl = TopicPartitionList::new();
                for t in metadata.topics().iter().filter(|t| t.name() == config.topic) {
                    for p in t.partitions() {
                        let offset = match options.start {
                            // Past every offset Kafka can hold: the end.
                            StartFrom::Offset(o) => i64::try_from(o).map_or(Offset::End, Offset::Offset),
                            _ => Offset::Beginning,
                        };
                        tpl.add_partition_offset(&config.topic, p.id(), offset)
                            .map_err(|e| unavailable(format!("assigning {}: {e}", config.topic)))?;
                    }
                }
                if tpl.count() == 0 {
                    // The topic does not exist yet: subscribe, and its partitions are read from
                    // their start once they appear (the group has no offsets for them).
                    tracing::info!("kafka: topic {} does not exist yet; waiting for it", config.topic);
                    consumer
                        .subscribe(&[&config.topic])
                        .map_err(|e| unavailable(format!("subscribing to {}: {e}", config.topic)))?;
                } else {
                    consumer.assign(&tpl).map_err(|e| unavailable(format!("assigning {}: {e}", config.topic)))?;
                }
            }
            _ => {
                consumer
                    .subscribe(&[&config.topic])
                    .map_err(|e| unavailable(format!("subscribing to {}: {e}", config.topic)))?;
            }
        }
        Ok(KafkaSource {
            consumer: Arc::new(consumer),
            topic: config.topic.clone(),
            follow: options.follow,
            buffered: Default::default(),
            polling: None,
            partitions: Default::default(),
        })
    }
}

#[async_trait]
impl EventSource for KafkaSource {
    fn backend(&self) -> &'static str {
        NAME
    }

    async fn next(&mut self) -> Result<Option<Received>, Error> {
        let mut idle_polls = 0u32;
        loop {
            if let Some(item) = self.buffered.pop_front() {
                return match item {
                    Polled::Message { payload, partition, offset, id, key, headers } => {
                        let position = Position::Partition { partition, offset };
                        let acks = self.partitions.entry(partition).or_default();
                        acks.handed = Some(acks.handed.map_or(offset, |h| h.max(offset)));
                        match Event::from_json(&payload) {
                            Ok(event) => {
                                acks.unacked.insert(offset);
                                let event = match id {
                                    Some(id) => event.with_id(id),
                                    None => event,
                                };
                                let next = u64::try_from(offset.saturating_add(1)).ok();
                                Ok(Some(Received::new(event, payload, position, next).with_message(key, headers)))
                            }
                            Err(e) => {
                                // Skipped for the group too (a bad message must not stop us),
                                // once everything before it is acknowledged.
                                self.store(partition);
                                Err(Error::Malformed { position, reason: e.to_string() })
                            }
                        }
                    }
                    // A topic or partition that does not exist (yet): while following, wait
                    // for it to appear, as a tail of a file that is not there yet does.
                    Polled::Failed(e, true) if self.follow => {
                        tracing::warn!("kafka: {e}; waiting for it to appear");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        continue;
                    }
                    Polled::Failed(e, _) => {
                        Err(Error::Io { backend: NAME, operation: "consuming".into(), reason: e, cause: None })
                    }
                };
            }
            let consumer = self.consumer.clone();
            // Polling blocks: do it off the async threads, a batch per hop. The handle stays in
            // `self` until it is done, so a dropped `next` loses nothing.
            let polling = self.polling.get_or_insert_with(|| {
                tokio::task::spawn_blocking(move || {
                    let mut out = Vec::new();
                    let mut wait = Duration::from_millis(200);
                    while out.len() < 500 {
                        match consumer.poll(wait) {
                            None => break,
                            Some(Err(e)) => {
                                let unknown = matches!(
                                    e.rdkafka_error_code(),
                                    Some(
                                        RDKafkaErrorCode::UnknownTopic
                                            | RDKafkaErrorCode::UnknownPartition
                                            | RDKafkaErrorCode::UnknownTopicOrPartition
                                    )
                                );
                                out.push(Polled::Failed(e.to_string(), unknown));
                                break;
                            }
                            Some(Ok(m)) => {
                                let id = m
                                    .headers()
                                    .and_then(|h| h.iter().find(|x| x.key == EVENT_ID_HEADER).and_then(|x| x.value))
                                    .and_then(|v| std::str::from_utf8(v).ok())
                                    .and_then(EventId::parse_hex);
                                let headers = m
                                    .headers()
                                    .map(|h| {
                                        h.iter()
                                            .map(|x| {
                                                (x.key.to_owned(), x.value.map(<[u8]>::to_vec).unwrap_or_default())
                                            })
                                            .collect()
                                    })
                                    .unwrap_or_default();
                                out.push(Polled::Message {
                                    payload: m.payload().map(<[u8]>::to_vec).unwrap_or_default(),
                                    partition: m.partition(),
                                    offset: m.offset(),
                                    id,
                                    key: m.key().map(<[u8]>::to_vec),
                                    headers,
                                });
                            }
                        }
                        wait = Duration::ZERO;
                    }
                    out
                })
            });
            let batch = polling.await;
            self.polling = None;
            let batch = batch.map_err(unavailable)?;
            if batch.is_empty() {
                idle_polls += 1;
                if !self.follow && idle_polls >= 10 {
                    return Ok(None);
                }
            }
            self.buffered.extend(batch);
        }
    }

    async fn ack(&mut self, received: &Received) -> Result<(), Error> {
        if let Position::Partition { partition, offset } = received.position {
            if let Some(acks) = self.partitions.get_mut(&partition) {
                acks.unacked.remove(&offset);
            }
            self.store(partition);
        }
        Ok(())
    }
}

impl KafkaSource {
    /// Stores for commit what `partition` may commit now (librdkafka commits it with the next
    /// auto-commit and at close).
    fn store(&mut self, partition: i32) {
        let Some(offset) = self.partitions.get_mut(&partition).and_then(PartitionAcks::advance) else { return };
        if let Err(e) = self.consumer.store_offset(&self.topic, partition, offset) {
            tracing::warn!("kafka: storing the offset {}/{partition}@{offset}: {e}", self.topic);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::PartitionAcks;

    #[test]
    fn a_partition_commits_only_below_its_lowest_unacked_offset() {
        let mut p = PartitionAcks::default();
        for o in 5..=9 {
            p.unacked.insert(o);
            p.handed = Some(o);
        }
        // 7 and 9 acknowledged first: 5 is not, nothing may be committed.
        p.unacked.remove(&7);
        p.unacked.remove(&9);
        assert_eq!(p.advance(), Some(4));
        p.unacked.remove(&5);
        assert_eq!(p.advance(), Some(5), "6 is still out");
        assert_eq!(p.advance(), None, "nothing new");
        p.unacked.remove(&6);
        assert_eq!(p.advance(), Some(7), "8 is still out");
        p.unacked.remove(&8);
        assert_eq!(p.advance(), Some(9));
        assert_eq!(p.advance(), None, "never stored twice");
    }
}
