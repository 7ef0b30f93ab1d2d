//! The core of the tracker-event brokers: the event model, Rasa's exact JSON encoding, and the
//! delivery contract every backend keeps (docs/contract.md).
//!
//! - [`Event`]: one tracker event, kept as its ordered JSON body so it is written back byte for
//!   byte as Rasa wrote it; [`TypedEvent`] for typed access.
//! - [`EventBroker`] / [`EventSource`]: publishing with an outcome per event, and consuming.
//! - [`Error`]: the one error type, telling temporary failures from permanent ones.
//! - [`Registry`]: backend factories by `type` name, open to third-party backends.
//! - [`codec`]: Rasa's encoding ([`json`], [`event`]).
//! - [`delivery`]: what every backend shares to deliver: the bounded [`pipeline`], the
//!   [`delivery::driver`] over a backend's [`delivery::Sink`], [`backoff`], and the
//!   [`delivery::Layer`] seam for wrappers.
//! - [`memory`]: an in-memory reference backend.
//! - [`tracker`]: Rasa's tracker stores, read side ([`TrackerStore`]), for `broker export`.
//!
//! No backend-specific code lives here.
//!
//! ```
//! use broker_core::{Event, EventBroker, memory::MemoryBackend, Backend};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), broker_core::Error> {
//! let line = br#"{"sender_id": "default", "event": "bot", "timestamp": 1528402837.6, "text": "hi", "data": {}, "metadata": {}}"#;
//! let event = Event::from_json(line).expect("a valid event");
//! assert_eq!(event.to_json(), line); // byte-identical round trip
//!
//! let backend = MemoryBackend::new();
//! let broker = backend.connect().await?;
//! let receipt = broker.publish(event).await?; // accepted; delivery happens behind it
//! receipt.await?;                              // delivered (optional to wait)
//! broker.close().await?;
//! assert_eq!(backend.lines(), vec![line.to_vec()]);
//! # Ok(())
//! # }
//! ```

pub mod batch;
pub mod broker;
pub mod codec;
pub mod config;
pub mod delivery;
pub mod error;
pub mod memory;
pub mod metrics;
pub mod registry;
pub mod tracker;

pub use codec::{event, json};
pub use delivery::{backoff, pipeline};

pub use batch::{BatchPublished, BatchReceipt, Refused};
pub use broker::{
    CloseReport, Delivered, EventBroker, EventBrokerExt, EventSource, Outcome, PublishOptions, QueueChoice, Receipt,
    Received, Settle, SourceOptions, StartFrom,
};
pub use config::{ConfigError, ConfigValue, DeliveryOptions, Location, Options, Secret, Spanned, Warning, WhenFull};
pub use error::{Error, Position};
pub use event::{Event, EventError, EventId, EventWriter, TypedEvent};
pub use registry::{Backend, BackendFactory, Configured, Registry};
pub use tracker::{ConfiguredStore, ExportQuery, StoredEvent, StoredEvents, TrackerStore, TrackerStoreFactory};

/// Re-exported so backends and their users name the same `async_trait`.
pub use async_trait::async_trait;

/// The README's examples, compiled as doc tests so they stay true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
