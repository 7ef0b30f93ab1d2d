//! An in-memory reference backend (`type: memory`).
//!
//! It keeps the contract with the least machinery, so the conformance suite can be checked
//! against it, and users can test their own code without a service. Events live as long as the
//! [`MemoryBackend`] (and its clones) do.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Notify;

use crate::broker::{EventBroker, EventSource, Received, SourceOptions, StartFrom};
use crate::config::{ConfigError, DeliveryOptions, Options};
use crate::delivery::{self, Batch, DriverOptions, Sink, Verdict};
use crate::error::{Error, Position};
use crate::event::Event;
use crate::registry::{Backend, BackendFactory, Configured};

const NAME: &str = "memory";

#[derive(Debug, Default)]
struct Store {
    lines: Mutex<Vec<Vec<u8>>>,
    grew: Notify,
}

/// A shared in-memory event log. Clones share the same events.
#[derive(Debug, Clone)]
pub struct MemoryBackend {
    store: Arc<Store>,
    max_event_bytes: Option<usize>,
    delivery: DeliveryOptions,
    attempt_timeout: Duration,
    faults: Faults,
}

impl Default for MemoryBackend {
    fn default() -> Self {
        MemoryBackend {
            store: Arc::default(),
            max_event_bytes: None,
            delivery: DeliveryOptions::default(),
            attempt_timeout: delivery::driver::DEFAULT_ATTEMPT_TIMEOUT,
            faults: Faults::default(),
        }
    }
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

    /// Sets how long one write may take before it is abandoned (see
    /// [`DriverOptions::attempt_timeout`]).
    pub fn with_attempt_timeout(mut self, timeout: Duration) -> MemoryBackend {
        self.attempt_timeout = timeout;
        self
    }

    /// The switch for injected faults, shared by every broker this backend connects.
    pub fn faults(&self) -> Faults {
        self.faults.clone()
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
        backend.max_event_bytes = options.take_usize("max_event_bytes")?;
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

    fn close_timeout(&self) -> std::time::Duration {
        self.delivery.close_timeout
    }

    async fn connect(&self) -> Result<Box<dyn EventBroker>, Error> {
        let sink = MemorySink { store: self.store.clone(), faults: self.faults.clone() };
        let options = DriverOptions::default()
            .batch_size(256)
            .max_event_bytes(self.max_event_bytes)
            .attempt_timeout(self.attempt_timeout)
            .retry(Duration::from_millis(10), Duration::from_millis(200));
        Ok(Box::new(delivery::start(NAME, sink, self.delivery.clone(), options)))
    }

    async fn source(&self, options: &SourceOptions) -> Result<Box<dyn EventSource>, Error> {
        let len = self.store.lines.lock().unwrap_or_else(PoisonError::into_inner).len();
        let next = match options.start {
            StartFrom::Beginning => 0,
            StartFrom::Offset(n) => usize::try_from(n).unwrap_or(usize::MAX),
            _ => len,
        };
        Ok(Box::new(MemorySource { store: self.store.clone(), next, follow: options.follow }))
    }
}

/// A fault the memory backend's sink shows on purpose, so the delivery machinery can be tested
/// without a service (see [`MemoryBackend::faults`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Fault {
    /// Writes work.
    #[default]
    None,
    /// Every write fails with [`Error::Unavailable`] (a service that is down).
    Unavailable,
    /// Every write hangs and never answers (a black hole).
    BlackHole,
    /// The next write panics (a bug in a writer).
    Panic,
}

/// The switch for a memory backend's [`Fault`]; clones share it.
#[derive(Debug, Clone, Default)]
pub struct Faults(Arc<Mutex<Fault>>);

impl Faults {
    /// Sets the fault from now on.
    pub fn set(&self, fault: Fault) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = fault;
    }

    fn get(&self) -> Fault {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

struct MemorySink {
    store: Arc<Store>,
    faults: Faults,
}

#[async_trait]
impl Sink for MemorySink {
    async fn write(&mut self, batch: &Batch) -> Result<Vec<Verdict>, Error> {
        match self.faults.get() {
            Fault::None => {}
            Fault::Unavailable => {
                return Err(Error::Unavailable { backend: NAME, reason: "injected outage".into(), cause: None });
            }
            Fault::BlackHole => std::future::pending::<()>().await,
            Fault::Panic => {
                self.faults.set(Fault::None);
                panic!("injected panic in the memory writer");
            }
        }
        let verdicts = {
            let mut lines = self.store.lines.lock().unwrap_or_else(PoisonError::into_inner);
            batch
                .iter()
                .map(|r| {
                    lines.push(r.json.clone());
                    Verdict::Delivered(Some(Position::Offset(lines.len() as u64 - 1)))
                })
                .collect()
        };
        self.store.grew.notify_waiters();
        Ok(verdicts)
    }

    async fn ping(&mut self) -> Result<(), Error> {
        match self.faults.get() {
            Fault::Unavailable => {
                Err(Error::Unavailable { backend: NAME, reason: "injected outage".into(), cause: None })
            }
            Fault::BlackHole => std::future::pending().await,
            _ => Ok(()),
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
