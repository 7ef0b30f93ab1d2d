//! Rust `tracing` records to Python `logging`, under `rasa_event_brokers.<crate>`
//! (`rasa_event_brokers.broker_pika`, ...).
//!
//! The layer only formats a record and queues it (bounded: when Python is too slow to take them,
//! records are counted and dropped, never waited for); one thread takes the GIL and calls
//! `logging.getLogger(name).log(level, message)`. So a Rust thread never waits for the GIL while
//! holding a lock. Which records are made is `RASA_EVENT_BROKERS_LOG` (an `EnvFilter`, default
//! `info`); Python's own levels and handlers decide what is shown.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError, sync_channel};

use pyo3::prelude::*;
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::{Context, Layer};
use tracing_subscriber::prelude::*;

use crate::bridge;

/// One record on its way to Python.
struct Record {
    logger: String,
    level: u8,
    message: String,
}

static DROPPED: AtomicU64 = AtomicU64::new(0);

struct ToPython {
    queue: SyncSender<Record>,
}

/// `message key=value ...`.
#[derive(Default)]
struct Message(String, String);

impl Visit for Message {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.0.push_str(value);
        } else {
            let _ = write!(self.1, " {}={value:?}", field.name());
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.0, "{value:?}");
        } else {
            let _ = write!(self.1, " {}={value:?}", field.name());
        }
    }
}

fn python_level(level: &Level) -> u8 {
    match *level {
        Level::ERROR => 40,
        Level::WARN => 30,
        Level::INFO => 20,
        _ => 10,
    }
}

impl<S: Subscriber> Layer<S> for ToPython {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        if bridge::shutting_down() {
            return;
        }
        let meta = event.metadata();
        let mut message = Message::default();
        event.record(&mut message);
        let crate_name = meta.target().split("::").next().unwrap_or("rust");
        let record = Record {
            logger: format!("rasa_event_brokers.{crate_name}"),
            level: python_level(meta.level()),
            message: message.0 + &message.1,
        };
        if let Err(TrySendError::Full(_)) = self.queue.try_send(record) {
            DROPPED.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Installs the layer as the process's `tracing` subscriber (unless another extension already
/// installed one) and starts the forwarding thread.
pub(crate) fn install(_py: Python<'_>) -> PyResult<()> {
    let (queue, records) = sync_channel::<Record>(4096);
    // Directives add to the default `info` (`broker_pika=debug` keeps the others at info).
    let filter = EnvFilter::builder()
        .with_default_directive(tracing::level_filters::LevelFilter::INFO.into())
        .with_env_var("RASA_EVENT_BROKERS_LOG")
        .from_env_lossy();
    let subscriber = tracing_subscriber::registry().with(ToPython { queue }.with_filter(filter));
    if tracing::subscriber::set_global_default(subscriber).is_err() {
        return Ok(());
    }
    std::thread::Builder::new()
        .name("rasa-event-brokers-log".into())
        .spawn(move || {
            while let Ok(record) = records.recv() {
                let forwarded = bridge::with_python(|py| {
                    let dropped = DROPPED.swap(0, Ordering::Relaxed);
                    let log = |name: &str, level: u8, message: &str| -> PyResult<()> {
                        let logger = py.import("logging")?.call_method1("getLogger", (name,))?;
                        logger.call_method1("log", (level, message))?;
                        Ok(())
                    };
                    if dropped > 0 {
                        let _ = log(
                            "rasa_event_brokers",
                            30,
                            &format!("{dropped} log records were dropped (Python logging fell behind)"),
                        );
                    }
                    let _ = log(&record.logger, record.level, &record.message);
                });
                if forwarded.is_none() {
                    return;
                }
            }
        })
        .map_err(|e| pyo3::exceptions::PyRuntimeError::new_err(format!("cannot start the log thread: {e}")))?;
    Ok(())
}
