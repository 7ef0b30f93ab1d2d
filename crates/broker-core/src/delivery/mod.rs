//! The delivery machinery every backend shares (docs/contract.md §A), written once.
//!
//! - [`pipeline`]: the bounded queue between `publish` and a writer ([`pipeline::Outbox`],
//!   [`pipeline::Inbox`]), flush markers, the close request, [`pipeline::QueuedBroker`].
//! - [`driver`]: the one delivery loop over a [`Sink`]: batches, flush/close in publish order,
//!   the close deadline, `max_event_bytes`, retries with backoff, a timeout on every attempt,
//!   readiness, and the close report (the accounting rule).
//! - [`sink`]: what a backend implements: [`Sink::write`] a batch and say per event
//!   [`Verdict::Delivered`], [`Verdict::Retry`], [`Verdict::Rejected`] or [`Verdict::Suspect`].
//! - [`blocking`]: the blocking twin ([`BlockingSink`]) for thread-based clients.
//! - [`backoff`]: exponential backoff with jitter.
//! - [`layer`]: the seam for wrappers around any backend ([`Layer`], [`Layered`]).
//!
//! ```
//! use broker_core::delivery::{self, Batch, DriverOptions, Sink, Verdict};
//! use broker_core::{DeliveryOptions, Error, Event, EventBroker, Position, async_trait};
//!
//! /// A sink that keeps lines in memory.
//! struct Lines(Vec<Vec<u8>>);
//!
//! #[async_trait]
//! impl Sink for Lines {
//!     async fn write(&mut self, batch: &Batch) -> Result<Vec<Verdict>, Error> {
//!         Ok(batch
//!             .iter()
//!             .map(|r| {
//!                 self.0.push(r.json.clone());
//!                 Verdict::Delivered(Some(Position::Offset(self.0.len() as u64 - 1)))
//!             })
//!             .collect())
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Error> {
//! let broker = delivery::start("lines", Lines(Vec::new()), DeliveryOptions::default(), DriverOptions::default());
//! let event = Event::from_json(br#"{"sender_id": "a", "event": "restart", "timestamp": 1.0}"#).expect("valid");
//! let delivered = broker.publish(event).await?.await?;
//! assert_eq!(delivered.position, Some(Position::Offset(0)));
//! assert!(broker.close().await?.is_clean());
//! # Ok(())
//! # }
//! ```

pub mod backoff;
pub mod blocking;
mod call;
pub mod driver;
pub mod layer;
pub mod pipeline;
pub mod sink;
mod window;

pub use blocking::{BlockingSink, on_thread};
pub use driver::{DriverOptions, start};
pub use layer::{Layer, Layered, RaiseOnFailure};
pub use sink::{Batch, Failure, Record, Sink, Verdict};
