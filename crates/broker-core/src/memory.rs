//! An in-memory reference backend (`type: memory`).
//!
//! It keeps the contract with the least machinery, so the conformance suite can be checked
//! against it, and users can test their own code without a service. Events live as long as the
//! [`MemoryBackend`] (and its clones) do.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use async_trait::async_trait;
use tokio::sync::Notify;

use crate::broker::{CloseReport, EventBroker, EventSource, Received, SourceOptions, StartFrom};
use crate::config::{ConfigError, DeliveryOptions, Options};
use crate::error::{Error, Position};
use crate::event::Event;
use crate::pipeline::{self, Command, Inbox, QueuedBroker};
use crate::registry::{Backend, BackendFactory, Configured};

const NAME: &str = "memory";

#[derive(Debug, Default)]
struct Store {
    lines: Mutex<Vec<Vec<u8>>>,
    grew: Notify,
}

/// A shared in-memory event log. Clones share the same events.
#[derive(Debug, Clone, Default)]
pub struct MemoryBackend {
    store: Arc<Store>,
    max_event_bytes: Option<usize>,
    delivery: DeliveryOptions,
}

impl MemoryBackend {
    /// An empty log with default delivery options.
    pub fn new() -> MemoryBackend {
        MemoryBackend::default()
    }

    /// Events larger than `bytes` (encoded) are rejected, like a broker's message size limit.
    pub fn with_max_event_bytes(mut self, bytes: usize) -> MemoryBackend {
        self.max_event_bytes = Some(bytes);
        self
    }

    /// Sets the delivery options.
    pub fn with_delivery(mut self, delivery: DeliveryOptions) -> MemoryBackend {
        self.delivery = delivery;
        self
    }

    /// The stored lines (Rasa encoding, no newline), in order.
    pub fn lines(&self) -> Vec<Vec<u8>> {
        self.store.lines.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }
}

/// Factory for `type: memory` (options: `max_event_bytes` and the delivery options).
#[derive(Debug, Default, Clone, Copy)]
pub struct MemoryFactory;

impl BackendFactory for MemoryFactory {
    fn name(&self) -> &'static str {
        NAME
    }

    fn configure(&self, mut options: Options) -> Result<Configured, ConfigError> {
        let mut backend = MemoryBackend::new();
        backend.max_event_bytes = options.take_u64("max_event_bytes")?.map(|n| n as usize);
        backend.delivery = DeliveryOptions::take(&mut options)?;
        let mut known = vec!["max_event_bytes"];
        known.extend_from_slice(DeliveryOptions::KEYS);
        let warnings = options.finish(NAME, &known)?;
        Ok(Configured::new(Box::new(backend), warnings))
    }
}

#[async_trait]
impl Backend for MemoryBackend {
    fn name(&self) -> &'static str {
        NAME
    }

    fn describe(&self) -> String {
        "memory (in-process)".into()
    }

    async fn connect(&self) -> Result<Box<dyn EventBroker>, Error> {
        let (outbox, inbox) = pipeline::channel(NAME, self.delivery.clone());
        tokio::spawn(write_loop(inbox, self.store.clone(), self.max_event_bytes));
        // Memory never becomes unavailable: only closing makes it not ready.
        let (broker, _ready) = QueuedBroker::new(outbox);
        Ok(Box::new(broker))
    }

    async fn source(&self, options: &SourceOptions) -> Result<Box<dyn EventSource>, Error> {
        let len = self.store.lines.lock().unwrap_or_else(PoisonError::into_inner).len();
        let next = match options.start {
            StartFrom::Beginning => 0,
            StartFrom::Offset(n) => n as usize,
            _ => len,
        };
        Ok(Box::new(MemorySource { store: self.store.clone(), next, follow: options.follow }))
    }
}

async fn write_loop(mut inbox: Inbox, store: Arc<Store>, max: Option<usize>) {
    let mut batch = Vec::with_capacity(256);
    loop {
        batch.clear();
        if inbox.recv_batch(&mut batch, 256).await == 0 {
            return;
        }
        let mut close = None;
        for cmd in batch.drain(..) {
            match cmd {
                Command::Publish(mut p) => {
                    if let Some(m) = max.filter(|m| p.json.len() > *m) {
                        let reason = format!("{} bytes is over max_event_bytes {m}", p.json.len());
                        p.reject(NAME, reason);
                        continue;
                    }
                    let index = {
                        let mut lines = store.lines.lock().unwrap_or_else(PoisonError::into_inner);
                        lines.push(std::mem::take(&mut p.json));
                        lines.len() - 1
                    };
                    store.grew.notify_waiters();
                    p.settle.delivered(Some(Position::Offset(index as u64)));
                }
                Command::Flush(tx) => {
                    let _ = tx.send(());
                }
                Command::Close { deadline, reply } => close = Some((deadline, reply)),
                #[allow(unreachable_patterns)]
                _ => {}
            }
        }
        if let Some((deadline, reply)) = close {
            // Memory writes never wait, so whatever is still queued is written unless the
            // deadline already passed.
            let mut undelivered = Vec::new();
            let after = deadline.saturating_duration_since(Instant::now());
            if Instant::now() >= deadline {
                pipeline::drain_undelivered(&mut inbox, after, &mut undelivered);
            } else {
                inbox.close();
                while let Some(cmd) = inbox.try_recv() {
                    if let Command::Publish(mut p) = cmd {
                        store.lines.lock().unwrap_or_else(PoisonError::into_inner).push(std::mem::take(&mut p.json));
                        p.settle.delivered(None);
                    }
                }
                store.grew.notify_waiters();
            }
            let _ = reply.send(CloseReport::new(undelivered));
            return;
        }
    }
}

struct MemorySource {
    store: Arc<Store>,
    next: usize,
    follow: bool,
}

#[async_trait]
impl EventSource for MemorySource {
    fn backend(&self) -> &'static str {
        NAME
    }

    async fn next(&mut self) -> Result<Option<Received>, Error> {
        loop {
            let notified = self.store.grew.notified();
            let line = self.store.lines.lock().unwrap_or_else(PoisonError::into_inner).get(self.next).cloned();
            if let Some(raw) = line {
                let index = self.next;
                self.next += 1;
                let event = Event::from_json(&raw).map_err(|e| Error::Malformed {
                    position: Position::Offset(index as u64),
                    reason: e.to_string(),
                })?;
                return Ok(Some(Received::new(event, raw, Position::Offset(index as u64), Some(self.next as u64))));
            }
            if !self.follow {
                return Ok(None);
            }
            notified.await;
        }
    }
}
