//! The `spool:` settings ([`SpoolConfig`]) and when an event counts as spooled ([`Fsync`]).

use std::path::PathBuf;

use broker_core::WhenFull;

/// When an event counts as spooled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Fsync {
    /// After `fdatasync` of the segment (one for all the events written together).
    #[default]
    Batch,
    /// Once written to the file (the kernel's cache): survives a process crash, not a power cut.
    Never,
}

/// The `spool:` settings.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct SpoolConfig {
    /// The spool directory (one process at a time).
    pub path: PathBuf,
    /// The most bytes the segments may hold; then `when_full` applies.
    pub max_bytes: u64,
    /// What a publish does when the spool is full: wait for room (`Block`) or fail at once.
    pub when_full: WhenFull,
    /// When an event counts as spooled.
    pub fsync: Fsync,
    /// The size at which a new segment starts.
    pub segment_bytes: u64,
}

impl SpoolConfig {
    /// A spool in `path` with the defaults: 1 GiB, block when full, fsync per batch, 64 MiB
    /// segments.
    pub fn new(path: impl Into<PathBuf>) -> SpoolConfig {
        SpoolConfig {
            path: path.into(),
            max_bytes: 1 << 30,
            when_full: WhenFull::Block,
            fsync: Fsync::Batch,
            segment_bytes: 64 << 20,
        }
    }
}

impl SpoolConfig {
    /// The keys of a `spool:` mapping.
    pub const KEYS: &'static [&'static str] = &["path", "max_bytes", "when_full", "fsync", "segment_bytes"];

    /// Reads a `spool:` mapping (`path` required; `max_bytes`, `when_full`: block | error,
    /// `fsync`: batch | never, `segment_bytes`), strictly: an unknown key is an error naming it.
    pub fn from_options(mut options: broker_core::Options) -> Result<SpoolConfig, broker_core::ConfigError> {
        let Some(path) = options.take_str("path")? else {
            return Err(broker_core::ConfigError::new(options.section.clone(), Some("spool.path"), "is required")
                .with_hint("a directory for this process's spool, e.g. /var/lib/rasa/spool"));
        };
        let mut config = SpoolConfig::new(path);
        if let Some(n) = options.take_u64("max_bytes")? {
            if n < 1 << 16 {
                return Err(broker_core::ConfigError::new(
                    options.location("max_bytes"),
                    Some("spool.max_bytes"),
                    format!("{n} is too small"),
                )
                .with_hint("at least 65536 bytes"));
            }
            config.max_bytes = n;
        }
        if let Some(w) = options.take_choice("when_full", &["block", "error"])? {
            config.when_full = if w == "error" { WhenFull::Error } else { WhenFull::Block };
        }
        if let Some(f) = options.take_choice("fsync", &["batch", "never"])? {
            config.fsync = if f == "never" { Fsync::Never } else { Fsync::Batch };
        }
        if let Some(n) = options.take_u64("segment_bytes")? {
            config.segment_bytes = n.max(4096);
        }
        // Several segments fit in the spool, so confirmed ones can always be deleted.
        config.segment_bytes = config.segment_bytes.min(config.max_bytes / 4).max(4096);
        options.finish_for("spool", Self::KEYS)?;
        Ok(config)
    }
}
