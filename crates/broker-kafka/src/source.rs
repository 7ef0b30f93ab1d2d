//! `KafkaSource`: a consumer group, polled in batches off the async threads.

use super::*;

/// A consumer-group reader. Offsets are committed for events acknowledged with `ack`.
pub struct KafkaSource {
    pub(crate) consumer: Arc<BaseConsumer<SourceContext>>,
    pub(crate) topic: String,
    pub(crate) follow: bool,
    pub(crate) buffered: std::collections::VecDeque<Polled>,
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
    Message { payload: Vec<u8>, partition: i32, offset: i64, id: Option<EventId> },
    Failed(String),
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
                consumer.assign(&tpl).map_err(|e| unavailable(format!("assigning {}: {e}", config.topic)))?;
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
                    Polled::Message { payload, partition, offset, id } => {
                        let position = Position::Partition { partition, offset };
                        match Event::from_json(&payload) {
                            Ok(event) => {
                                let event = match id {
                                    Some(id) => event.with_id(id),
                                    None => event,
                                };
                                Ok(Some(Received::new(
                                    event,
                                    payload,
                                    position,
                                    u64::try_from(offset.saturating_add(1)).ok(),
                                )))
                            }
                            Err(e) => {
                                // Skip past it for the group too: a bad message must not stop us.
                                self.commit(partition, offset);
                                Err(Error::Malformed { position, reason: e.to_string() })
                            }
                        }
                    }
                    Polled::Failed(e) => {
                        Err(Error::Io { backend: NAME, operation: "consuming".into(), reason: e, cause: None })
                    }
                };
            }
            let consumer = self.consumer.clone();
            // Polling blocks: do it off the async threads, a batch per hop.
            let batch = tokio::task::spawn_blocking(move || {
                let mut out = Vec::new();
                let mut wait = Duration::from_millis(200);
                while out.len() < 500 {
                    match consumer.poll(wait) {
                        None => break,
                        Some(Err(e)) => {
                            out.push(Polled::Failed(e.to_string()));
                            break;
                        }
                        Some(Ok(m)) => {
                            let id = m
                                .headers()
                                .and_then(|h| h.iter().find(|x| x.key == EVENT_ID_HEADER).and_then(|x| x.value))
                                .and_then(|v| std::str::from_utf8(v).ok())
                                .and_then(EventId::parse_hex);
                            out.push(Polled::Message {
                                payload: m.payload().map(<[u8]>::to_vec).unwrap_or_default(),
                                partition: m.partition(),
                                offset: m.offset(),
                                id,
                            });
                        }
                    }
                    wait = Duration::ZERO;
                }
                out
            })
            .await
            .map_err(unavailable)?;
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
            self.commit(partition, offset);
        }
        Ok(())
    }
}

impl KafkaSource {
    /// Marks `offset` as handed over; librdkafka commits it with the next auto-commit.
    fn commit(&self, partition: i32, offset: i64) {
        if let Err(e) = self.consumer.store_offset(&self.topic, partition, offset) {
            tracing::warn!("kafka: storing the offset {}/{partition}@{offset}: {e}", self.topic);
        }
    }
}
