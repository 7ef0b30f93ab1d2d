//! Backends by name: the `type:` of `endpoints.yml` mapped to a factory.
//!
//! A third-party crate adds a backend by implementing [`BackendFactory`] and registering it; no
//! fork needed. Registration is an explicit call, so what a program supports is visible in its
//! `main`.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;

use crate::broker::{EventBroker, EventSource, SourceOptions};
use crate::config::{ConfigError, Location, Options, Warning};
use crate::error::Error;

/// A configured backend: options validated, nothing connected yet.
#[async_trait]
pub trait Backend: Send + Sync + fmt::Debug {
    /// The type name (`"file"`).
    fn name(&self) -> &'static str;

    /// Where events go, for people (`"file rasa_event.log"`); never includes secrets.
    fn describe(&self) -> String;

    /// How long `close` waits for delivery (`close_timeout`), for callers that bound their own
    /// waits by it (the CLI stops reading when a publish is blocked this long).
    fn close_timeout(&self) -> std::time::Duration {
        crate::config::DeliveryOptions::default().close_timeout
    }

    /// Connects and returns a broker ready to publish.
    async fn connect(&self) -> Result<Box<dyn EventBroker>, Error>;

    /// Opens a consumer.
    async fn source(&self, options: &SourceOptions) -> Result<Box<dyn EventSource>, Error>;

    /// What the service says it is (product and version, e.g. `PostgreSQL 15.19`), asked over a
    /// short connection of its own, for `broker check`; `None` when the protocol does not tell
    /// (the default).
    async fn server_version(&self) -> Result<Option<String>, Error> {
        Ok(None)
    }
}

/// Builds a [`Backend`] from its options.
pub trait BackendFactory: Send + Sync {
    /// The type name it answers to (matched case-insensitively).
    fn name(&self) -> &'static str;

    /// Validates `options` (no I/O) and returns the backend with any warnings.
    fn configure(&self, options: Options) -> Result<Configured, ConfigError>;
}

/// A backend and the warnings its configuration produced.
#[derive(Debug)]
#[non_exhaustive]
pub struct Configured {
    /// The backend.
    pub backend: Box<dyn Backend>,
    /// Warnings to show the user.
    pub warnings: Vec<Warning>,
}

impl Configured {
    /// A backend with warnings.
    pub fn new(backend: Box<dyn Backend>, warnings: Vec<Warning>) -> Configured {
        Configured { backend, warnings }
    }
}

/// Type names mapped to factories.
#[derive(Clone, Default)]
pub struct Registry {
    factories: Vec<Arc<dyn BackendFactory>>,
    /// Names we know but that this build cannot build, with what to do about it (typically "enable
    /// the cargo feature `kafka`").
    disabled: Vec<(&'static str, &'static str)>,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registry").field("names", &self.names()).finish()
    }
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Registry {
        Registry::default()
    }

    /// Adds (or replaces) a backend under its name.
    pub fn register(&mut self, factory: impl BackendFactory + 'static) -> &mut Registry {
        let name = factory.name();
        self.factories.retain(|f| !f.name().eq_ignore_ascii_case(name));
        self.disabled.retain(|(n, _)| !n.eq_ignore_ascii_case(name));
        self.factories.push(Arc::new(factory));
        self
    }

    /// Records that `name` is a known type this build leaves out, and what to do about it
    /// (`"enable the cargo feature `kafka` of broker-config"`), for the error message.
    pub fn note_disabled(&mut self, name: &'static str, remedy: &'static str) -> &mut Registry {
        if self.get(name).is_none() {
            self.disabled.push((name, remedy));
        }
        self
    }

    /// The registered names.
    pub fn names(&self) -> Vec<&'static str> {
        self.factories.iter().map(|f| f.name()).collect()
    }

    /// The factory for `name`, case-insensitively.
    pub fn get(&self, name: &str) -> Option<&dyn BackendFactory> {
        self.factories.iter().find(|f| f.name().eq_ignore_ascii_case(name)).map(|f| f.as_ref())
    }

    /// Configures the backend `name` with `options`. An unknown name is an error that lists the
    /// registered names, or names the cargo feature for a known but disabled one.
    pub fn configure(&self, name: &str, at: Location, options: Options) -> Result<Configured, ConfigError> {
        if let Some(f) = self.get(name) {
            return f.configure(options);
        }
        if let Some((n, remedy)) = self.disabled.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)) {
            return Err(
                ConfigError::new(at, Some("type"), format!("the {n} event broker is not built in")).with_hint(*remedy)
            );
        }
        let names = self.names();
        let hint = match crate::config::did_you_mean(name, &names) {
            Some(m) => format!("did you mean {m:?}? registered types: {}", names.join(", ")),
            None => format!("registered types: {}", names.join(", ")),
        };
        Err(ConfigError::new(at, Some("type"), format!("unknown event broker type {name:?}")).with_hint(hint))
    }
}
