//! A disk spool in front of any event broker: accepted events survive a long outage and a
//! process crash.
//!
//! [`SpooledBackend`] wraps any [`broker_core::Backend`]: `publish` returns once the event is in
//! an append-only log on disk ([`log::SpoolLog`]: segments of checksummed records in one
//! directory owned by one process, the position up to which the service confirmed them, and
//! recovery that cuts a torn last record instead of handing it out half); a forwarder sends the
//! events on in order and settles each receipt with the service's outcome. What is not
//! delivered at close stays in the spool and goes out first at the next start. In
//! `endpoints.yml`: a `spool:` mapping in `event_broker:` ([`SpoolConfig::from_options`]).
//!
//! ```
//! use broker_spool::log::SpoolLog;
//!
//! let dir = tempfile::tempdir().expect("a temporary directory");
//! let (mut log, recovery) = SpoolLog::open(dir.path(), 64 << 20)?;
//! assert_eq!(recovery.pending, 0);
//! let seq = log.append(br#"{"sender_id": "a", "event": "restart", "timestamp": 1.5}"#)?;
//! log.sync()?; // durable from here on
//! log.ack(seq + 1)?; // the service confirmed it
//! assert_eq!(log.pending_events(), 0);
//! # Ok::<(), broker_spool::log::LogError>(())
//! ```

mod config;
mod forward;
pub mod log;
mod queue;
mod record;
mod spooled;
mod writer;

pub use config::{Fsync, SpoolConfig};
pub use spooled::{SpoolStatus, SpooledBackend, status};
