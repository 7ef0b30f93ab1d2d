//! `connect`/`validate` and the native broker behind each Python broker class.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use broker_core::{ConfigError, EventBroker, Options, PublishOptions};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use crate::receipt::{Receipt, Slot};
use crate::{bridge, convert, encode};

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
/// [`NativeBroker`]. The configuration's warnings are logged by the options as they are read
/// (`rasa_event_brokers.broker_core`).
#[pyfunction]
pub(crate) fn connect<'py>(
    py: Python<'py>,
    type_name: &str,
    options: &Bound<'py, PyList>,
) -> PyResult<Bound<'py, PyAny>> {
    let configured = configure(py, type_name, options)?;
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
                Ok(Py::new(py, NativeBroker::new(broker, describe, close_timeout))?.into_any())
            }
            Err(e) => Err(convert::broker_error(py, &e)),
        },
    )
}

/// Delivery counters.
#[derive(Debug, Default)]
struct Counters {
    accepted: AtomicU64,
    refused: AtomicU64,
    undelivered: AtomicU64,
}

/// The receipts not yet counted, in publish order, and the counts of the settled ones. Settled
/// receipts are counted from the front: on each publish (so the queue stays as short as the
/// backend's buffer), on `stats()`, and after `flush`/`close`. No task, no wake-up per event.
#[derive(Debug, Default)]
struct Outcomes {
    queue: VecDeque<Arc<Slot>>,
    delivered: u64,
    rejected: u64,
    failed: u64,
}

impl Outcomes {
    /// Counts the settled receipts at the front.
    fn count_settled(&mut self) {
        while let Some(front) = self.queue.front() {
            let Some(outcome) = front.poll_now() else { break };
            match outcome {
                Ok(_) => self.delivered += 1,
                Err(broker_core::Error::Rejected { .. }) => self.rejected += 1,
                Err(_) => self.failed += 1,
            }
            self.queue.pop_front();
        }
    }
}

/// A connected broker: the Rust [`EventBroker`] and the outcomes of what it accepted.
#[pyclass(module = "rasa_event_brokers", frozen)]
pub(crate) struct NativeBroker {
    broker: Arc<dyn EventBroker>,
    describe: String,
    close_timeout: Duration,
    counters: Arc<Counters>,
    outcomes: Arc<Mutex<Outcomes>>,
}

/// Waits (at most `limit`) until the first `target` receipts (all, when `None`) are settled
/// and counted: after a flush or close they are, unless a backend broke its contract.
async fn count_until(outcomes: Arc<Mutex<Outcomes>>, target: Option<u64>, limit: Duration) {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let front = {
            let Ok(mut o) = outcomes.lock() else { return };
            o.count_settled();
            if target.is_some_and(|t| o.delivered + o.rejected + o.failed >= t) {
                return;
            }
            match o.queue.front() {
                Some(f) => f.clone(),
                None => return,
            }
        };
        if tokio::time::timeout_at(deadline, front.wait()).await.is_err() {
            return;
        }
    }
}

impl NativeBroker {
    fn new(broker: Arc<dyn EventBroker>, describe: String, close_timeout: Duration) -> NativeBroker {
        NativeBroker { broker, describe, close_timeout, counters: Arc::default(), outcomes: Arc::default() }
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

    /// Hands one event (a dict) to the pipeline; returns its receipt. Waits only when the
    /// buffer is full and `when_full` is `block`, with the GIL released.
    #[pyo3(signature = (event, headers=None))]
    fn publish(
        &self,
        py: Python<'_>,
        event: &Bound<'_, PyAny>,
        headers: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<Receipt> {
        let event = encode::event(event)?;
        let mut options = PublishOptions::default();
        if let Some(h) = headers {
            for (k, v) in h.iter() {
                options = options.header(k.str()?.to_cow()?.into_owned(), v.str()?.to_cow()?.into_owned());
            }
        }
        let rt = bridge::runtime()?;
        // Accepted at once when the buffer has room (the usual case): no GIL release, no
        // blocking. Otherwise the same future is waited for with the GIL released.
        let mut accepting = {
            let _entered = rt.enter();
            self.broker.publish_with(event, options)
        };
        let first = {
            let _entered = rt.enter();
            accepting.as_mut().poll(&mut Context::from_waker(Waker::noop()))
        };
        let accepted = match first {
            Poll::Ready(r) => r,
            // A full buffer with `when_full: block`: wait for room with the GIL released, in
            // slices, so Python's signal handlers still run: a handler's exception (the second
            // Ctrl-C under asyncio.run) ends the wait and the event is not accepted.
            Poll::Pending => loop {
                let slice = py.allow_threads(|| {
                    rt.block_on(async { tokio::time::timeout(Duration::from_millis(100), &mut accepting).await })
                });
                match slice {
                    Ok(r) => break r,
                    Err(_) => py.check_signals()?,
                }
            },
        };
        match accepted {
            Ok(receipt) => {
                let slot = Slot::new(receipt);
                self.counters.accepted.fetch_add(1, Ordering::Relaxed);
                if let Ok(mut o) = self.outcomes.lock() {
                    o.queue.push_back(slot.clone());
                    o.count_settled();
                }
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
        let outcomes = self.outcomes.clone();
        let target = self.counters.accepted.load(Ordering::Relaxed);
        bridge::awaitable(
            py,
            async move {
                let r = broker.flush().await;
                count_until(outcomes, Some(target), Duration::from_secs(5)).await;
                r
            },
            |py, r| r.map(|()| py.None()).map_err(|e| convert::broker_error(py, &e)),
        )
    }

    /// An asyncio future of the events `close` could not deliver (dicts, in publish order).
    fn close<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let broker = self.broker.clone();
        let counters = self.counters.clone();
        let (outcomes, limit) = (self.outcomes.clone(), self.close_timeout + Duration::from_secs(5));
        bridge::awaitable(
            py,
            async move {
                let r = broker.close().await;
                count_until(outcomes, None, limit).await;
                r
            },
            move |py, r| match r {
                Ok(report) => {
                    // A second close reports the same events again: not counted twice.
                    counters.undelivered.store(report.undelivered.len() as u64, Ordering::Relaxed);
                    Ok(convert::events(py, &report.undelivered)?.into_any().unbind())
                }
                Err(e) => Err(convert::broker_error(py, &e)),
            },
        )
    }

    /// The delivery counters: `accepted`, `refused` (not accepted: the buffer full with
    /// `when_full: error`, or the broker closed; an invalid event is not counted), `delivered`,
    /// `rejected` (refused by the service as the event's own fault), `failed` (every other
    /// failure, the events `close` hands back included), `pending` (accepted, no outcome yet,
    /// counted in publish order) and `undelivered` (listed by `close`, also in `failed`).
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let c = &self.counters;
        let out = PyDict::new(py);
        let (delivered, rejected, failed, pending) = match self.outcomes.lock() {
            Ok(mut o) => {
                o.count_settled();
                (o.delivered, o.rejected, o.failed, o.queue.len())
            }
            Err(_) => (0, 0, 0, 0),
        };
        out.set_item("accepted", c.accepted.load(Ordering::Relaxed))?;
        out.set_item("refused", c.refused.load(Ordering::Relaxed))?;
        out.set_item("delivered", delivered)?;
        out.set_item("rejected", rejected)?;
        out.set_item("failed", failed)?;
        out.set_item("pending", pending)?;
        out.set_item("undelivered", c.undelivered.load(Ordering::Relaxed))?;
        Ok(out)
    }

    fn __repr__(&self) -> String {
        format!("<NativeBroker {}>", self.describe)
    }
}
