//! A disk spool in front of any event broker (issue: "accepted events survive a long outage and
//! a process crash").
//!
//! Work in progress. What is here is the on-disk part, [`log::SpoolLog`]: append-only segments
//! of checksummed records in one directory owned by one process (an advisory lock the kernel
//! drops when the process dies), the position up to which the service confirmed them, and
//! recovery that cuts a torn last record instead of handing it out half. The layer that puts it
//! in front of a backend (`spool:` in `event_broker:`, replay on start, forwarding in order,
//! `broker spool status`) builds on it.
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

pub mod log;
mod spooled;

pub use spooled::{Fsync, SpoolConfig, SpooledBackend};
