//! The layer seam: one generic way to wrap what a backend returns, so cross-cutting features
//! (`raise_on_failure`, metrics, a disk spool) are wrappers, not edits in each backend.
//!
//! A [`Layer`] wraps an [`EventBroker`] (and, when it cares, an [`EventSource`]). [`Layered`] is a
//! [`Backend`] whose `connect` and `source` apply its layers, innermost first, so a factory (or a
//! user) adds a layer with [`Layered::new`]`(backend).with(layer)` without the backend knowing.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;

use crate::broker::{CloseReport, EventBroker, EventSource, PublishOptions, Receipt, SourceOptions};
use crate::error::Error;
use crate::event::Event;
use crate::registry::Backend;

/// Wraps brokers (and sources) of any backend.
pub trait Layer: Send + Sync + fmt::Debug + 'static {
    /// Wraps a connected broker.
    fn wrap_broker(&self, inner: Box<dyn EventBroker>) -> Box<dyn EventBroker>;

    /// Wraps an opened source; by default the source is left as it is.
    fn wrap_source(&self, inner: Box<dyn EventSource>) -> Box<dyn EventSource> {
        inner
    }
}

/// A backend with layers around what it returns.
#[derive(Debug)]
pub struct Layered {
    inner: Box<dyn Backend>,
    layers: Vec<Arc<dyn Layer>>,
}

impl Layered {
    /// `backend` with no layers yet.
    pub fn new(backend: Box<dyn Backend>) -> Layered {
        Layered { inner: backend, layers: Vec::new() }
    }

    /// Adds `layer` around the layers added before.
    pub fn with(mut self, layer: impl Layer) -> Layered {
        self.layers.push(Arc::new(layer));
        self
    }

    /// The wrapped backend.
    pub fn inner(&self) -> &dyn Backend {
        self.inner.as_ref()
    }
}

#[async_trait]
impl Backend for Layered {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }

    fn close_timeout(&self) -> std::time::Duration {
        self.inner.close_timeout()
    }

    async fn connect(&self) -> Result<Box<dyn EventBroker>, Error> {
        let mut broker = self.inner.connect().await?;
        for layer in &self.layers {
            broker = layer.wrap_broker(broker);
        }
        Ok(broker)
    }

    async fn source(&self, options: &SourceOptions) -> Result<Box<dyn EventSource>, Error> {
        let mut source = self.inner.source(options).await?;
        for layer in &self.layers {
            source = layer.wrap_source(source);
        }
        Ok(source)
    }
}

/// Rasa's `raise_on_failure: true`: a publish fails at once with [`Error::Unavailable`] while the
/// broker is not ready, instead of queueing behind an outage.
#[derive(Debug, Clone, Copy, Default)]
pub struct RaiseOnFailure;

impl Layer for RaiseOnFailure {
    fn wrap_broker(&self, inner: Box<dyn EventBroker>) -> Box<dyn EventBroker> {
        Box::new(RaisingBroker { inner })
    }
}

struct RaisingBroker {
    inner: Box<dyn EventBroker>,
}

#[async_trait]
impl EventBroker for RaisingBroker {
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }
    async fn publish_with(&self, event: Event, options: PublishOptions) -> Result<Receipt, Error> {
        if !self.inner.is_ready().await {
            return Err(Error::Unavailable {
                backend: self.inner.backend(),
                reason: "not connected (raise_on_failure: true)".into(),
                cause: None,
            });
        }
        self.inner.publish_with(event, options).await
    }
    async fn flush(&self) -> Result<(), Error> {
        self.inner.flush().await
    }
    async fn is_ready(&self) -> bool {
        self.inner.is_ready().await
    }
    async fn close(&self) -> Result<CloseReport, Error> {
        self.inner.close().await
    }
}
