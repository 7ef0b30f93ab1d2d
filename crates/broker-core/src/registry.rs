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
use crate::tracker::{ConfiguredStore, TrackerStoreFactory};

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

/// Type names mapped to factories: event brokers (`event_broker:`) and tracker stores
/// (`tracker_store:`, read by `broker export`).
#[derive(Clone, Default)]
pub struct Registry {
    brokers: Named<dyn BackendFactory>,
    stores: Named<dyn TrackerStoreFactory>,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registry").field("names", &self.names()).field("tracker_stores", &self.stores.names()).finish()
    }
}

/// Factories of one kind by name.
struct Named<F: ?Sized> {
    factories: Vec<Arc<F>>,
    /// Names we know but that this build cannot build, with what to do about it (typically "enable
    /// the cargo feature `kafka`").
    disabled: Vec<(&'static str, &'static str)>,
}

impl<F: ?Sized> Default for Named<F> {
    fn default() -> Self {
        Named { factories: Vec::new(), disabled: Vec::new() }
    }
}

impl<F: ?Sized> Clone for Named<F> {
    fn clone(&self) -> Self {
        Named { factories: self.factories.clone(), disabled: self.disabled.clone() }
    }
}

/// What a [`Named`] needs of a factory.
trait HasName {
    fn type_name(&self) -> &'static str;
}

impl HasName for dyn BackendFactory {
    fn type_name(&self) -> &'static str {
        self.name()
    }
}

impl HasName for dyn TrackerStoreFactory {
    fn type_name(&self) -> &'static str {
        self.name()
    }
}

impl<F: ?Sized + HasName> Named<F> {
    fn register(&mut self, factory: Arc<F>) {
        let name = factory.type_name();
        self.factories.retain(|f| !f.type_name().eq_ignore_ascii_case(name));
        self.disabled.retain(|(n, _)| !n.eq_ignore_ascii_case(name));
        self.factories.push(factory);
    }

    fn note_disabled(&mut self, name: &'static str, remedy: &'static str) {
        if self.get(name).is_none() {
            self.disabled.push((name, remedy));
        }
    }

    fn names(&self) -> Vec<&'static str> {
        self.factories.iter().map(|f| f.type_name()).collect()
    }

    fn get(&self, name: &str) -> Option<&F> {
        self.factories.iter().find(|f| f.type_name().eq_ignore_ascii_case(name)).map(|f| f.as_ref())
    }

    /// The factory for `name`, or the error for a disabled or unknown one (`what`: "event
    /// broker", "tracker store").
    fn find(&self, name: &str, at: Location, what: &str) -> Result<&F, ConfigError> {
        if let Some(f) = self.get(name) {
            return Ok(f);
        }
        if let Some((n, remedy)) = self.disabled.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)) {
            return Err(
                ConfigError::new(at, Some("type"), format!("the {n} {what} is not built in")).with_hint(*remedy)
            );
        }
        let names = self.names();
        let hint = match crate::config::did_you_mean(name, &names) {
            Some(m) => format!("did you mean {m:?}? registered types: {}", names.join(", ")),
            None => format!("registered types: {}", names.join(", ")),
        };
        Err(ConfigError::new(at, Some("type"), format!("unknown {what} type {name:?}")).with_hint(hint))
    }
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Registry {
        Registry::default()
    }

    /// Adds (or replaces) a backend under its name.
    pub fn register(&mut self, factory: impl BackendFactory + 'static) -> &mut Registry {
        self.brokers.register(Arc::new(factory));
        self
    }

    /// Records that `name` is a known type this build leaves out, and what to do about it
    /// (`"enable the cargo feature `kafka` of broker-config"`), for the error message.
    pub fn note_disabled(&mut self, name: &'static str, remedy: &'static str) -> &mut Registry {
        self.brokers.note_disabled(name, remedy);
        self
    }

    /// The registered names.
    pub fn names(&self) -> Vec<&'static str> {
        self.brokers.names()
    }

    /// The factory for `name`, case-insensitively.
    pub fn get(&self, name: &str) -> Option<&dyn BackendFactory> {
        self.brokers.get(name)
    }

    /// Configures the backend `name` with `options`. An unknown name is an error that lists the
    /// registered names, or names the cargo feature for a known but disabled one.
    pub fn configure(&self, name: &str, at: Location, options: Options) -> Result<Configured, ConfigError> {
        self.brokers.find(name, at, "event broker")?.configure(options)
    }

    /// Adds (or replaces) a tracker store under its name.
    pub fn register_tracker_store(&mut self, factory: impl TrackerStoreFactory + 'static) -> &mut Registry {
        self.stores.register(Arc::new(factory));
        self
    }

    /// [`note_disabled`](Registry::note_disabled) for a tracker store type.
    pub fn note_disabled_tracker_store(&mut self, name: &'static str, remedy: &'static str) -> &mut Registry {
        self.stores.note_disabled(name, remedy);
        self
    }

    /// The registered tracker store names.
    pub fn tracker_store_names(&self) -> Vec<&'static str> {
        self.stores.names()
    }

    /// Configures the tracker store `name` with `options`, with the same errors as
    /// [`configure`](Registry::configure).
    pub fn configure_tracker_store(
        &self,
        name: &str,
        at: Location,
        options: Options,
    ) -> Result<ConfiguredStore, ConfigError> {
        self.stores.find(name, at, "tracker store")?.configure(options)
    }
}
