//! Reads the `event_broker:` section of Rasa's `endpoints.yml` and builds the matching backend.
//!
//! Parsing happens in two steps: first the YAML becomes a generic section (the `type` and the
//! other keys as [`Options`], each with its file, line and column, environment variables
//! interpolated as Rasa does); then the backend registered under that type validates its own
//! options. Everything is validated before any connection is opened.
//!
//! The rules (docs/rasa-compat.md §1): only `event_broker:` is read; a missing file, key or null section
//! means "no broker"; `store_type` wins over `type`; the type is case-insensitive and a missing
//! one means `pika`; `${VAR}` in an unquoted value is replaced by the variable (the result is a
//! string, and numeric strings work where numbers are expected), a quoted one stays literal, and an
//! unset variable is an error; YAML 1.2 booleans, checked strictly by each backend.
//!
//! One cargo feature per backend (`file` is on by default, `sql`, `kafka` and `pika` are opt-in); the in-memory
//! reference backend (`type: memory`) is always there.
//!
//! ```
//! let yaml = "event_broker:\n  type: FILE\n  path: events.log\n";
//! let section = broker_config::parse_str(yaml, None)?.expect("a broker is configured");
//! assert_eq!(section.type_name, "file");
//! let configured = broker_config::default_registry().configure(&section.type_name, section.type_at.clone(), section.options)?;
//! assert_eq!(configured.backend.describe(), "file events.log");
//! # Ok::<(), broker_core::ConfigError>(())
//! ```
//!
//! ## Features
//!
#![doc = document_features::document_features!()]

mod yaml;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use broker_core::{ConfigError, Configured, ConfiguredStore, Location, Options, Registry, Warning};

pub use broker_core::memory::MemoryFactory;

/// The `event_broker:` (or `tracker_store:`) section, before the backend reads its options.
#[derive(Debug)]
#[non_exhaustive]
pub struct BrokerSection {
    /// The backend type, lower-cased (`pika` when none was given).
    pub type_name: String,
    /// Where the type was given (or the section, when it was not).
    pub type_at: Location,
    /// The other keys.
    pub options: Options,
    /// Warnings about the section itself.
    pub warnings: Vec<Warning>,
}

/// Reads `path`. A missing file is `Ok(None)`: no broker configured.
pub fn read_file(path: &Path) -> Result<Option<BrokerSection>, ConfigError> {
    let Some(text) = read_text(path)? else { return Ok(None) };
    parse_with_env(&text, Some(path), &|name| std::env::var(name).ok())
}

/// The endpoints file's text; `Ok(None)` when it does not exist.
fn read_text(path: &Path) -> Result<Option<String>, ConfigError> {
    match std::fs::read_to_string(path) {
        Ok(t) => Ok(Some(t)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => {
            let at = Location { file: Some(Arc::new(path.to_owned())), line: 0, column: 0 };
            Err(ConfigError::new(at, None, format!("cannot read the endpoints file: {e}")))
        }
    }
}

/// Parses endpoints YAML text, interpolating from the process environment.
pub fn parse_str(text: &str, file: Option<&Path>) -> Result<Option<BrokerSection>, ConfigError> {
    parse_with_env(text, file, &|name| std::env::var(name).ok())
}

/// Parses endpoints YAML text with `env` as the environment (for tests and embedding).
pub fn parse_with_env(
    text: &str,
    file: Option<&Path>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<BrokerSection>, ConfigError> {
    parse_section(text, file, env, EVENT_BROKER)
}

/// The `event_broker:` section's name.
const EVENT_BROKER: &str = "event_broker";
/// The `tracker_store:` section's name.
const TRACKER_STORE: &str = "tracker_store";

/// The `tracker_store:` section of endpoints YAML text (what `broker export` reads), by the
/// same rules as `event_broker:`; a section without a type is Rasa's in-memory store
/// (`type_name` `in_memory`). `Ok(None)`: no such section.
pub fn parse_tracker_store(
    text: &str,
    file: Option<&Path>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<BrokerSection>, ConfigError> {
    parse_section(text, file, env, TRACKER_STORE)
}

/// Reads `path` and builds its tracker store through `registry`, with the section's warnings
/// first. `Ok(None)`: the file or the section is missing.
pub fn load_tracker_store(path: &Path, registry: &Registry) -> Result<Option<ConfiguredStore>, ConfigError> {
    let Some(text) = read_text(path)? else { return Ok(None) };
    let Some(section) = parse_tracker_store(&text, Some(path), &|name| std::env::var(name).ok())? else {
        return Ok(None);
    };
    if section.type_name == IN_MEMORY {
        return Err(ConfigError::new(
            section.type_at,
            Some("type"),
            "the in-memory tracker store has nothing to export",
        )
        .with_hint(format!(
            "Rasa keeps it in its own process only; export needs a persistent store: {}",
            registry.tracker_store_names().join(", ")
        )));
    }
    let mut configured = registry.configure_tracker_store(&section.type_name, section.type_at, section.options)?;
    let mut warnings = section.warnings;
    warnings.append(&mut configured.warnings);
    configured.warnings = warnings;
    Ok(Some(configured))
}

/// Rasa's name for a tracker store section without a type.
const IN_MEMORY: &str = "in_memory";

fn parse_section(
    text: &str,
    file: Option<&Path>,
    env: &dyn Fn(&str) -> Option<String>,
    name: &str,
) -> Result<Option<BrokerSection>, ConfigError> {
    let file: Option<Arc<PathBuf>> = file.map(|p| Arc::new(p.to_owned()));
    let top_at = Location { file: file.clone(), line: 1, column: 1 };
    let Some(root) = yaml::parse(text, &file)? else { return Ok(None) };
    let yaml::Node::Map(entries, _) = root else {
        return Err(ConfigError::new(top_at, None, "the endpoints file must be a mapping of sections"));
    };
    let Some((key, section)) = entries.into_iter().find(|(k, _)| k.key_text() == Some(name)) else {
        return Ok(None);
    };
    let section_at = key.at().clone();
    let entries = match section {
        yaml::Node::Map(entries, _) => entries,
        yaml::Node::Scalar { ref value, plain: true, .. }
            if matches!(value.as_str(), "" | "~" | "null" | "Null" | "NULL") =>
        {
            return Ok(None);
        }
        other => {
            return Err(ConfigError::new(other.at().clone(), Some(name), "must be a mapping of settings"));
        }
    };
    let mut warnings = Vec::new();
    let mut type_value = None;
    let mut store_type_value = None;
    let mut options = Vec::new();
    for (k, v) in &entries {
        let Some(key) = k.key_text() else {
            return Err(ConfigError::new(k.at().clone(), None, "keys must be plain strings"));
        };
        let value = yaml::to_value(v, env)?;
        match key {
            "type" => type_value = Some(value),
            "store_type" => store_type_value = Some(value),
            _ => options.push((key.to_owned(), k.at().clone(), value)),
        }
    }
    if let (Some(t), Some(_)) = (&type_value, &store_type_value) {
        warnings.push(Warning { at: t.at.clone(), message: "`type` is ignored because `store_type` is set".into() });
    }
    let chosen = store_type_value.or(type_value);
    let (type_name, type_at) = match chosen {
        None => (None, section_at.clone()),
        Some(s) => match s.value {
            broker_core::ConfigValue::Null => (None, s.at),
            broker_core::ConfigValue::Str(t) => (Some(t.to_ascii_lowercase()), s.at),
            _ => {
                let examples = if name == EVENT_BROKER { "kafka, pika, sql, file" } else { "sql, redis" };
                return Err(ConfigError::new(
                    s.at,
                    Some("type"),
                    format!("the type must be a string (e.g. {examples})"),
                ));
            }
        },
    };
    // Rasa: a broker section without a type is a RabbitMQ (pika) broker; a tracker store
    // without one is the in-memory store (`type: in_memory` is not a name Rasa knows: it loads
    // it as a module path and falls back to the in-memory store too).
    let type_name = type_name.unwrap_or_else(|| if name == EVENT_BROKER { "pika" } else { IN_MEMORY }.to_owned());
    Ok(Some(BrokerSection { type_name, type_at, options: Options::with_key_locations(options, section_at), warnings }))
}

/// The backends this build has, registered by name; known types that are left out are noted so
/// the error says what is missing.
pub fn default_registry() -> Registry {
    let mut registry = Registry::new();
    registry.register(MemoryFactory);
    #[cfg(feature = "file")]
    registry.register(broker_file::FileFactory);
    #[cfg(not(feature = "file"))]
    registry.note_disabled(
        "file",
        "enable the cargo feature `file` (of broker-config, or of broker-cli for the `broker` command)",
    );
    #[cfg(feature = "kafka")]
    registry.register(broker_kafka::KafkaFactory);
    #[cfg(not(feature = "kafka"))]
    registry.note_disabled(
        "kafka",
        "enable the cargo feature `kafka` (of broker-config, or of broker-cli for the `broker` command)",
    );
    #[cfg(feature = "pika")]
    registry.register(broker_pika::PikaFactory);
    #[cfg(not(feature = "pika"))]
    registry.note_disabled(
        "pika",
        "enable the cargo feature `pika` (of broker-config, or of broker-cli for the `broker` command)",
    );
    #[cfg(feature = "sql")]
    registry.register(broker_sql::SqlFactory).register_tracker_store(broker_sql::SqlTrackerStoreFactory);
    #[cfg(not(feature = "sql"))]
    registry
        .note_disabled(
            "sql",
            "enable the cargo feature `sql` (of broker-config, or of broker-cli for the `broker` command)",
        )
        .note_disabled_tracker_store(
            "sql",
            "enable the cargo feature `sql` (of broker-config, or of broker-cli for the `broker` command)",
        );
    #[cfg(feature = "redis")]
    registry.register_tracker_store(broker_redis::RedisTrackerStoreFactory);
    #[cfg(not(feature = "redis"))]
    registry.note_disabled_tracker_store(
        "redis",
        "enable the cargo feature `redis` (of broker-config, or of broker-cli for the `broker` command)",
    );
    registry
}

/// Builds the backend of a section through `registry`; the section's warnings come first. A
/// `spool:` mapping (any backend, third-party ones included) puts the backend behind a disk
/// spool (`broker_spool::SpooledBackend`).
pub fn configure(section: BrokerSection, registry: &Registry) -> Result<Configured, ConfigError> {
    let mut options = section.options;
    let spool = take_spool(&mut options)?;
    let mut configured = registry.configure(&section.type_name, section.type_at, options)?;
    if let Some(spool) = spool {
        configured.backend = spool.wrap(configured.backend);
    }
    let mut warnings = section.warnings;
    warnings.append(&mut configured.warnings);
    configured.warnings = warnings;
    Ok(configured)
}

/// A `spool:` section's settings, ready to wrap a backend.
struct Spool(#[cfg(feature = "spool")] broker_spool::SpoolConfig);

impl Spool {
    fn wrap(self, backend: Box<dyn broker_core::Backend>) -> Box<dyn broker_core::Backend> {
        #[cfg(feature = "spool")]
        return Box::new(broker_spool::SpooledBackend::new(backend, self.0));
        #[cfg(not(feature = "spool"))]
        backend
    }
}

/// Takes the `spool:` mapping out of a backend's options.
fn take_spool(options: &mut Options) -> Result<Option<Spool>, ConfigError> {
    if !options.contains("spool") {
        return Ok(None);
    }
    let at = options.location("spool");
    let Some(value) = options.take_value("spool") else { return Ok(None) };
    let broker_core::ConfigValue::Map(entries) = value.value else {
        return Err(ConfigError::new(at, Some("spool"), "must be a mapping (path, max_bytes, when_full, fsync)"));
    };
    #[cfg(feature = "spool")]
    {
        let config = broker_spool::SpoolConfig::from_options(Options::new(entries, at))?;
        Ok(Some(Spool(config)))
    }
    #[cfg(not(feature = "spool"))]
    {
        let _ = entries;
        Err(ConfigError::new(at, Some("spool"), "the disk spool is not built in").with_hint(
            "enable the cargo feature `spool` (of broker-config, or of broker-cli for the `broker` command)",
        ))
    }
}

/// The `spool:` settings of the `event_broker:` section in `path`, without building the
/// backend (for `broker spool status`). `Ok(None)`: no broker or no spool configured.
#[cfg(feature = "spool")]
pub fn load_spool(path: &Path) -> Result<Option<broker_spool::SpoolConfig>, ConfigError> {
    let Some(mut section) = read_file(path)? else { return Ok(None) };
    Ok(take_spool(&mut section.options)?.map(|s| s.0))
}

/// Reads `path` and builds its backend. `Ok(None)`: no broker configured.
pub fn load(path: &Path, registry: &Registry) -> Result<Option<Configured>, ConfigError> {
    read_file(path)?.map(|s| configure(s, registry)).transpose()
}

/// The README's examples, compiled as doc tests so they stay true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
