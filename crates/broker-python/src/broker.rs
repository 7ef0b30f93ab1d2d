//! `connect`/`validate` and the native broker behind each Python broker class.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use broker_core::{ConfigError, Event, EventBroker, Options, PublishOptions};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};
use tokio::sync::{mpsc, watch};

use crate::receipt::{Receipt, Slot};
use crate::{bridge, convert};

/// Builds `type_name`'s backend from `(key, value)` options, checking them (no I/O).
fn configure(py: Python<'_>, type_name: &str, options: &Bound<'_, PyList>) -> PyResult<broker_core::Configured> {
    let mut pairs = Vec::with_capacity(options.len());
    for item in options.iter() {
        let (key, value): (String, Bound<'_, PyAny>) = item.extract()?;
        let value = convert::config_value(&key, &value).map_err(|e| convert::config_error(py, &e))?;
        pairs.push((key, value));
    }
    let registry = broker_config::default_registry();
    let configured = registry
        .configure(type_name, Default::default(), Options::from_pairs(pairs))
        .map_err(|e: ConfigError| convert::config_error(py, &e))?;
    Ok(configured)
}

/// Checks the options of `type_name` as `broker check` does, without connecting; returns the
/// warnings and where events would go.
#[pyfunction]
pub(crate) fn validate<'py>(
    py: Python<'py>,
    type_name: &str,
    options: &Bound<'py, PyList>,
) -> PyResult<(String, Vec<String>)> {
    let configured = configure(py, type_name, options)?;
    Ok((configured.backend.describe(), configured.warnings.iter().map(ToString::to_string).collect()))
}

/// Checks the options, then connects on the runtime; returns an asyncio future of a
/// [`NativeBroker`]. The configuration's warnings are logged (`rasa_event_brokers`).
#[pyfunction]
pub(crate) fn connect<'py>(
    py: Python<'py>,
    type_name: &str,
    options: &Bound<'py, PyList>,
) -> PyResult<Bound<'py, PyAny>> {
    let configured = configure(py, type_name, options)?;
    for w in &configured.warnings {
        tracing::warn!(target: "broker_python", "{w}");
    }
    let backend = configured.backend;
    bridge::awaitable(
        py,
        async move {
            let describe = backend.describe();
            let close_timeout = backend.close_timeout();
            backend.connect().await.map(|b| (Arc::<dyn EventBroker>::from(b), describe, close_timeout))
        },
        |py, connected| match connected {
            Ok((broker, describe, close_timeout)) => {
                Ok(Py::new(py, NativeBroker::start(broker, describe, close_timeout)?)?.into_any())
            }
            Err(e) => Err(convert::broker_error(py, &e)),
        },
    )
}

/// Delivery counters, kept by the settling task.
#[derive(Debug, Default)]
struct Counters {
    accepted: AtomicU64,
    refused: AtomicU64,
    delivered: AtomicU64,
    rejected: AtomicU64,
    failed: AtomicU64,
    undelivered: AtomicU64,
}

/// A connected broker: the Rust [`EventBroker`] and the task that settles its receipts in
/// publish order.
#[pyclass(module = "rasa_event_brokers", frozen)]
pub(crate) struct NativeBroker {
    broker: Arc<dyn EventBroker>,
    describe: String,
    close_timeout: Duration,
    settling: mpsc::UnboundedSender<Arc<Slot>>,
    /// How many receipts the settling task has settled.
    settled: watch::Receiver<u64>,
    counters: Arc<Counters>,
}

impl NativeBroker {
    fn start(broker: Arc<dyn EventBroker>, describe: String, close_timeout: Duration) -> PyResult<NativeBroker> {
        let (settling, mut queue) = mpsc::unbounded_channel::<Arc<Slot>>();
        let (settled_tx, settled) = watch::channel(0u64);
        let counters = Arc::new(Counters::default());
        let c = counters.clone();
        bridge::runtime()?.spawn(async move {
            let mut n = 0u64;
            while let Some(slot) = queue.recv().await {
                let counter = match slot.wait().await {
                    Ok(_) => &c.delivered,
                    Err(broker_core::Error::Rejected { .. }) => &c.rejected,
                    Err(_) => &c.failed,
                };
                counter.fetch_add(1, Ordering::Relaxed);
                n += 1;
                settled_tx.send_replace(n);
            }
        });
        Ok(NativeBroker { broker, describe, close_timeout, settling, settled, counters })
    }

    /// Waits until the settling task has settled every receipt accepted so far (at most
    /// `limit`: a receipt can outlive a flush only if its backend broke its contract).
    fn caught_up(&self, limit: Duration) -> impl std::future::Future<Output = ()> + Send + 'static {
        let target = self.counters.accepted.load(Ordering::Acquire);
        let mut settled = self.settled.clone();
        async move {
            let _ = tokio::time::timeout(limit, settled.wait_for(|n| *n >= target)).await;
        }
    }
}

#[pymethods]
impl NativeBroker {
    /// The backend's type name.
    #[getter]
    fn backend(&self) -> &'static str {
        self.broker.backend()
    }

    /// Where events go, for people (never a secret).
    #[getter]
    fn describe(&self) -> &str {
        &self.describe
    }

    /// Hands one event (its JSON bytes, `json.dumps` of the dict) to the pipeline; returns its
    /// receipt. Waits only when the buffer is full and `when_full` is `block`.
    #[pyo3(signature = (json, headers=None))]
    fn publish(&self, py: Python<'_>, json: &[u8], headers: Option<&Bound<'_, PyDict>>) -> PyResult<Receipt> {
        let event = Event::from_json(json).map_err(|e| convert::InvalidEventError::new_err(e.to_string()))?;
        let mut options = PublishOptions::default();
        if let Some(h) = headers {
            for (k, v) in h.iter() {
                options = options.header(k.str()?.to_cow()?.into_owned(), v.str()?.to_cow()?.into_owned());
            }
        }
        let rt = bridge::runtime()?;
        let broker = &self.broker;
        let accepted = py.allow_threads(|| rt.block_on(broker.publish_with(event, options)));
        match accepted {
            Ok(receipt) => {
                let slot = Slot::new(receipt);
                self.counters.accepted.fetch_add(1, Ordering::Release);
                // The settling task ends only when this broker is dropped.
                let _ = self.settling.send(slot.clone());
                Ok(Receipt::new(slot))
            }
            Err(e) => {
                self.counters.refused.fetch_add(1, Ordering::Relaxed);
                Err(convert::broker_error(py, &e))
            }
        }
    }

    /// Whether the broker can deliver now (connected, not closed); asks for at most 2 s.
    fn is_ready(&self, py: Python<'_>) -> PyResult<bool> {
        let rt = bridge::runtime()?;
        let broker = &self.broker;
        Ok(py.allow_threads(|| {
            rt.block_on(async {
                tokio::time::timeout(Duration::from_secs(2), broker.is_ready()).await.unwrap_or(false)
            })
        }))
    }

    /// An asyncio future that resolves once every event accepted before the call has its
    /// outcome.
    fn flush<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let broker = self.broker.clone();
        let caught_up = self.caught_up(Duration::from_secs(5));
        bridge::awaitable(
            py,
            async move {
                let r = broker.flush().await;
                caught_up.await;
                r
            },
            |py, r| r.map(|()| py.None()).map_err(|e| convert::broker_error(py, &e)),
        )
    }

    /// An asyncio future of the events `close` could not deliver (dicts, in publish order).
    fn close<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let broker = self.broker.clone();
        let counters = self.counters.clone();
        let caught_up = self.caught_up(self.close_timeout + Duration::from_secs(5));
        bridge::awaitable(
            py,
            async move {
                let r = broker.close().await;
                caught_up.await;
                r
            },
            move |py, r| match r {
                Ok(report) => {
                    counters.undelivered.fetch_add(report.undelivered.len() as u64, Ordering::Relaxed);
                    Ok(convert::events(py, &report.undelivered)?.into_any().unbind())
                }
                Err(e) => Err(convert::broker_error(py, &e)),
            },
        )
    }

    /// The delivery counters: `accepted`, `refused` (publish raised), `delivered`, `rejected`
    /// (refused by the service as the event's own fault), `failed`, `pending` (accepted, no
    /// outcome yet) and `undelivered` (listed by `close`).
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let c = &self.counters;
        let out = PyDict::new(py);
        let accepted = c.accepted.load(Ordering::Acquire);
        let settled = *self.settled.borrow();
        out.set_item("accepted", accepted)?;
        out.set_item("refused", c.refused.load(Ordering::Relaxed))?;
        out.set_item("delivered", c.delivered.load(Ordering::Relaxed))?;
        out.set_item("rejected", c.rejected.load(Ordering::Relaxed))?;
        out.set_item("failed", c.failed.load(Ordering::Relaxed))?;
        out.set_item("pending", accepted.saturating_sub(settled))?;
        out.set_item("undelivered", c.undelivered.load(Ordering::Relaxed))?;
        Ok(out)
    }

    fn __repr__(&self) -> String {
        format!("<NativeBroker {}>", self.describe)
    }
}
