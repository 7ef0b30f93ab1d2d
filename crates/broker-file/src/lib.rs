//! The file event broker (`type: file`): one event per line, appended to a file, exactly as
//! Rasa's `FileEventBroker` writes it, with group writes and a delivery outcome per event.
//!
//! - **Format** (docs/rasa-compat.md §6): each event's Rasa encoding followed by `\n`; an existing file is
//!   appended to, never truncated; the default path is `rasa_event.log` in the working directory.
//! - **Delivery** (docs/contract.md §A): the shared driver ([`broker_core::delivery`]) hands a writer
//!   thread every queued event at once (up to `max_batch_events`); it writes them with one
//!   `write` and applies the fsync policy before they count as delivered. A failed write is cut
//!   back to the last whole line (and nothing more is written until that cut succeeds), so a
//!   reader never sees half an event from us; write errors (a full disk, a quota, EIO) make the
//!   events wait and retry with backoff while `is_ready()` is false. A write that hangs longer
//!   than `attempt_timeout` (default 10 s) counts as a failure too.
//! - **Consuming** (docs/contract.md §B): [`FileBackend::source`] tails from a byte offset, follows growth,
//!   skips blank lines and reports a malformed line (e.g. half-written by a crash) with its
//!   position without stopping.
//!
//! Options: `path`, `fsync` (`never` (default, like Rasa: written to the OS after each batch),
//! `batch` (fdatasync before confirming each batch), `interval` (fdatasync at most every
//! `fsync_interval` seconds, and on flush and close)), `fsync_interval` (default 1),
//! `max_batch_events` (default 4096), `max_event_bytes` (none by default), `linger_ms` (how long the
//! writer lets a partial batch grow under load, default 0.2), and the delivery options
//! `buffer_size`, `when_full`, `close_timeout`, and `attempt_timeout`.
//!
//! ```
//! use broker_core::{Backend, Event, EventBroker};
//! use broker_file::{FileBackend, FileConfig};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), broker_core::Error> {
//! let dir = tempfile::tempdir().expect("temp dir");
//! let path = dir.path().join("rasa_event.log");
//! let backend = FileBackend::new(FileConfig::new(&path));
//! let broker = backend.connect().await?;
//! let line = br#"{"sender_id": "a", "event": "restart", "timestamp": 1.5}"#;
//! broker.publish(Event::from_json(line).expect("valid")).await?.await?;
//! broker.close().await?;
//! assert_eq!(std::fs::read(&path).expect("written"), [&line[..], b"\n"].concat());
//! # Ok(())
//! # }
//! ```

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use broker_core::delivery::{self, Batch, BlockingSink, DriverOptions, Failure, Verdict};
use broker_core::{
    Backend, BackendFactory, ConfigError, Configured, DeliveryOptions, Error, EventBroker, EventSource, Options,
    Position, SourceOptions, async_trait,
};

mod source;

pub use source::{FileSource, MAX_LINE_BYTES};

const NAME: &str = "file";

/// The default `linger_ms`: 0.2 ms.
pub const DEFAULT_LINGER: Duration = Duration::from_micros(200);

/// The default path, as in Rasa.
pub const DEFAULT_PATH: &str = "rasa_event.log";

/// When the writer calls `fdatasync`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Fsync {
    /// Never: each batch is handed to the OS (Rasa's behaviour: `flush()` per event).
    #[default]
    Never,
    /// Before confirming each batch: a delivered event survives a power cut.
    Batch,
    /// At most once per interval while writing, and on flush and close.
    Interval(Duration),
}

/// Settings of the file backend.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct FileConfig {
    /// The file to append to.
    pub path: PathBuf,
    /// The fsync policy.
    pub fsync: Fsync,
    /// Most events written with one `write`.
    pub max_batch_events: usize,
    /// Events whose encoding is longer are rejected alone.
    pub max_event_bytes: Option<usize>,
    /// How long the writer waits after a partial batch before taking the next one, so a busy
    /// stream is written in large batches without a wake-up per event. An idle writer still
    /// takes a new event at once.
    pub linger: Duration,
    /// Buffer bound and policy, close deadline.
    pub delivery: DeliveryOptions,
    /// How long one write may take before the file counts as unavailable (`attempt_timeout`).
    pub attempt_timeout: Duration,
}

impl FileConfig {
    /// Defaults for `path`.
    pub fn new(path: impl Into<PathBuf>) -> FileConfig {
        FileConfig {
            path: path.into(),
            fsync: Fsync::Never,
            max_batch_events: 4096,
            max_event_bytes: None,
            linger: DEFAULT_LINGER,
            delivery: DeliveryOptions::default(),
            attempt_timeout: delivery::driver::DEFAULT_ATTEMPT_TIMEOUT,
        }
    }

    /// Sets the fsync policy.
    pub fn fsync(mut self, fsync: Fsync) -> FileConfig {
        self.fsync = fsync;
        self
    }

    /// Sets the size limit per event.
    pub fn max_event_bytes(mut self, bytes: usize) -> FileConfig {
        self.max_event_bytes = Some(bytes);
        self
    }

    /// Sets the delivery options.
    pub fn delivery(mut self, delivery: DeliveryOptions) -> FileConfig {
        self.delivery = delivery;
        self
    }

    /// The option keys `type: file` accepts.
    pub const KEYS: &'static [&'static str] = &[
        "path",
        "fsync",
        "fsync_interval",
        "max_batch_events",
        "max_event_bytes",
        "linger_ms",
        "buffer_size",
        "when_full",
        "close_timeout",
        "attempt_timeout",
    ];

    /// Reads the options of an `event_broker:` section.
    pub fn from_options(mut options: Options) -> Result<(FileConfig, Vec<broker_core::Warning>), ConfigError> {
        let path = options.take_str("path")?.unwrap_or_else(|| DEFAULT_PATH.to_owned());
        if path.is_empty() {
            return Err(ConfigError::new(options.location("path"), Some("path"), "the path is empty"));
        }
        let mut config = FileConfig::new(path);
        let interval = options.take_seconds("fsync_interval")?;
        config.fsync = match options.take_choice("fsync", &["never", "batch", "interval"])? {
            None | Some("never") => Fsync::Never,
            Some("batch") => Fsync::Batch,
            _ => Fsync::Interval(interval.unwrap_or(Duration::from_secs(1))),
        };
        if interval.is_some() && !matches!(config.fsync, Fsync::Interval(_)) {
            options.warn("fsync_interval", "`fsync_interval` only applies with `fsync: interval`");
        }
        if let Some(n) = options.take_usize("max_batch_events")? {
            if n == 0 {
                return Err(ConfigError::new(
                    options.location("max_batch_events"),
                    Some("max_batch_events"),
                    "must be at least 1",
                ));
            }
            config.max_batch_events = n;
        }
        config.max_event_bytes = options.take_usize("max_event_bytes")?;
        if let Some(ms) = options.take_seconds("linger_ms")? {
            // take_seconds validates a non-negative number; the unit here is milliseconds.
            config.linger = ms / 1000;
        }
        config.delivery = DeliveryOptions::take(&mut options)?;
        config.attempt_timeout = DriverOptions::default().take(&mut options)?.attempt_timeout;
        let warnings = options.finish(NAME, FileConfig::KEYS)?;
        Ok((config, warnings))
    }
}

/// A configured file backend.
#[derive(Debug, Clone)]
pub struct FileBackend {
    config: FileConfig,
}

impl FileBackend {
    /// A backend writing to `config.path`.
    pub fn new(config: FileConfig) -> FileBackend {
        FileBackend { config }
    }

    /// The settings.
    pub fn config(&self) -> &FileConfig {
        &self.config
    }

    /// Metrics and spans: `backend="file"`, `destination=<path>`.
    fn meter(&self) -> broker_core::metrics::Meter {
        broker_core::metrics::Meter::new(NAME, self.config.path.display().to_string())
    }
}

/// Factory for `type: file`.
#[derive(Debug, Default, Clone, Copy)]
pub struct FileFactory;

impl BackendFactory for FileFactory {
    fn name(&self) -> &'static str {
        NAME
    }

    fn configure(&self, options: Options) -> Result<Configured, ConfigError> {
        let (config, warnings) = FileConfig::from_options(options)?;
        Ok(Configured::new(Box::new(FileBackend::new(config)), warnings))
    }
}

fn open_error(path: &Path, err: io::Error) -> Error {
    Error::Unavailable {
        backend: NAME,
        reason: format!("cannot open {} for appending: {err}", path.display()),
        cause: Some(Arc::new(err)),
    }
}

#[async_trait]
impl Backend for FileBackend {
    fn name(&self) -> &'static str {
        NAME
    }

    fn describe(&self) -> String {
        format!("file {}", self.config.path.display())
    }

    fn close_timeout(&self) -> std::time::Duration {
        self.config.delivery.close_timeout
    }

    #[tracing::instrument(name = "connect", level = "error", skip_all, fields(backend = NAME, destination = %self.config.path.display()))]
    async fn connect(&self) -> Result<Box<dyn EventBroker>, Error> {
        let path = self.config.path.clone();
        let mut file =
            OpenOptions::new().append(true).create(true).read(true).open(&path).map_err(|e| open_error(&path, e))?;
        end_with_newline(&mut file).map_err(|e| open_error(&path, e))?;
        let sink = FileSink {
            file,
            path: path.display().to_string(),
            fsync: self.config.fsync,
            buf: Vec::with_capacity(1 << 20),
            dirty: false,
            last_sync: Instant::now(),
            cut_at: None,
        };
        let sink = delivery::on_thread("broker-file-writer", sink)?;
        let ping = match self.config.fsync {
            Fsync::Interval(every) => Some(every),
            _ => None,
        };
        let options = DriverOptions::default()
            .batch_size(self.config.max_batch_events)
            .max_event_bytes(self.config.max_event_bytes)
            .attempt_timeout(self.config.attempt_timeout)
            .retry(Duration::from_millis(50), Duration::from_secs(5))
            .linger(self.config.linger)
            .ping_interval(ping);
        Ok(Box::new(delivery::start(self.meter(), sink, self.config.delivery.clone(), options)))
    }

    async fn source(&self, options: &SourceOptions) -> Result<Box<dyn EventSource>, Error> {
        FileSource::open(&self.config.path, options).map(|s| Box::new(s) as Box<dyn EventSource>)
    }
}

/// A crash can leave half a line at the end. Starting our first event on a fresh line keeps it
/// readable; the broken fragment stays as its own (malformed) line for readers to report.
fn end_with_newline(file: &mut File) -> io::Result<()> {
    let len = file.metadata()?.len();
    if len == 0 {
        return Ok(());
    }
    let mut last = [0u8; 1];
    file.seek(SeekFrom::Start(len - 1))?;
    file.read_exact(&mut last)?;
    if last[0] != b'\n' {
        tracing::warn!(
            "the last line of the event file was incomplete (a crash while writing?); starting on a new line"
        );
        file.write_all(b"\n")?;
    }
    Ok(())
}

/// The file's writing side, on its own thread (see [`broker_core::delivery::blocking`]).
struct FileSink {
    file: File,
    path: String,
    fsync: Fsync,
    buf: Vec<u8>,
    dirty: bool,
    last_sync: Instant,
    /// A failed write could not be cut back: the file ends with part of a batch at `cut_at`,
    /// and nothing more is written until it is cut.
    cut_at: Option<u64>,
}

/// Whether trying again can help: a full disk, a quota, an I/O error may go away; nothing
/// about a write error is an event's own fault, so every one is retried.
fn write_error(path: &str, err: io::Error) -> Error {
    let hint = match err.raw_os_error() {
        Some(28) => " (no space left: waiting for room)",
        Some(122) => " (disk quota exceeded: waiting for room)",
        Some(5) => " (I/O error: retrying)",
        _ => "",
    };
    Error::Io {
        backend: NAME,
        operation: format!("writing {path}{hint}"),
        reason: err.to_string(),
        cause: Some(Arc::new(err)),
    }
}

impl FileSink {
    /// Writes the batch with one call and applies the fsync policy; returns the batch's offset.
    fn write_batch(&mut self) -> io::Result<u64> {
        self.cut_torn()?;
        let before = self.file.seek(SeekFrom::End(0))?;
        if let Err(err) = self.file.write_all(&self.buf) {
            // Cut a partial write back so the file keeps ending on a whole line.
            if self.file.set_len(before).is_err() {
                self.cut_at = Some(before);
            }
            return Err(err);
        }
        self.dirty = true;
        match self.fsync {
            Fsync::Never => {}
            Fsync::Batch => self.sync()?,
            Fsync::Interval(every) => {
                if self.last_sync.elapsed() >= every {
                    self.sync()?;
                }
            }
        }
        // With O_APPEND other writers may have appended too; our batch ends where we are now.
        let end = self.file.stream_position()?;
        Ok(end - self.buf.len() as u64)
    }

    /// Cuts what a failed write left behind, before anything else is written.
    fn cut_torn(&mut self) -> io::Result<()> {
        if let Some(at) = self.cut_at {
            self.file.set_len(at)?;
            self.cut_at = None;
        }
        Ok(())
    }

    fn sync(&mut self) -> io::Result<()> {
        self.file.sync_data()?;
        self.dirty = false;
        self.last_sync = Instant::now();
        Ok(())
    }
}

impl BlockingSink for FileSink {
    fn write(&mut self, batch: &Batch) -> Result<Vec<Verdict>, Error> {
        self.buf.clear();
        let mut starts = Vec::with_capacity(batch.len());
        for r in batch.iter() {
            starts.push(self.buf.len() as u64);
            self.buf.extend_from_slice(&r.json);
            self.buf.push(b'\n');
        }
        let at = self.write_batch().map_err(|e| write_error(&self.path, e))?;
        Ok(starts.into_iter().map(|s| Verdict::Delivered(Some(Position::Offset(at + s)))).collect())
    }

    fn recover(&mut self, _failure: &Failure) -> Result<(), Error> {
        self.cut_torn().map_err(|e| write_error(&self.path, e))
    }

    fn ping(&mut self) -> Result<(), Error> {
        // Between events: an interval policy's last batch reaches the disk.
        if self.dirty && matches!(self.fsync, Fsync::Interval(_)) {
            self.sync().map_err(|e| write_error(&self.path, e))?;
        }
        Ok(())
    }

    fn close(&mut self) {
        if self.dirty && self.fsync != Fsync::Never {
            if let Err(err) = self.sync() {
                tracing::error!("fsync {}: {err}", self.path);
            }
        }
    }
}

/// The README's examples, compiled as doc tests so they stay true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
