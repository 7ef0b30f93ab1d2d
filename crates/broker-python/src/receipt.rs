//! The Python `Receipt`: one event's outcome, shared by the Python object and the broker's
//! counts.
//!
//! The Rust [`broker_core::Receipt`] is a one-shot future: whoever awaits it takes it out of
//! the slot and puts the outcome in (or puts the receipt back if it stops waiting first), and
//! wakes the others. So `done()`, `result()`, `await` and the broker's counting can all ask, in any
//! order, and each sees the same outcome.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use broker_core::{EventId, Outcome};
use pyo3::exceptions::{PyTimeoutError, PyValueError};
use pyo3::prelude::*;
use tokio::sync::Notify;

use crate::bridge;
use crate::convert;

/// One event's outcome, settled once.
#[derive(Debug)]
pub(crate) struct Slot {
    id: EventId,
    receipt: Mutex<Option<broker_core::Receipt>>,
    outcome: OnceLock<Outcome>,
    settled: Notify,
}

/// Puts a taken receipt back when its awaiter stops before the outcome (a timeout).
struct Taken<'a> {
    slot: &'a Slot,
    receipt: Option<broker_core::Receipt>,
}

impl Drop for Taken<'_> {
    fn drop(&mut self) {
        if let Some(r) = self.receipt.take() {
            if let Ok(mut guard) = self.slot.receipt.lock() {
                *guard = Some(r);
            }
            self.slot.settled.notify_waiters();
        }
    }
}

impl Slot {
    pub(crate) fn new(receipt: broker_core::Receipt) -> Arc<Slot> {
        Arc::new(Slot {
            id: receipt.id(),
            receipt: Mutex::new(Some(receipt)),
            outcome: OnceLock::new(),
            settled: Notify::new(),
        })
    }

    fn settle(&self, outcome: Outcome) -> &Outcome {
        let _ = self.outcome.set(outcome);
        self.settled.notify_waiters();
        self.outcome.get().expect("just set")
    }

    /// The outcome if it is known now, without waiting.
    pub(crate) fn poll_now(&self) -> Option<&Outcome> {
        if let Some(o) = self.outcome.get() {
            return Some(o);
        }
        let mut guard = self.receipt.try_lock().ok()?;
        let receipt = guard.as_mut()?;
        let mut cx = Context::from_waker(Waker::noop());
        match Pin::new(receipt).poll(&mut cx) {
            Poll::Ready(outcome) => {
                guard.take();
                drop(guard);
                Some(self.settle(outcome))
            }
            Poll::Pending => None,
        }
    }

    /// Waits for the outcome.
    pub(crate) async fn wait(&self) -> &Outcome {
        loop {
            let notified = self.settled.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(o) = self.outcome.get() {
                return o;
            }
            let taken = self.receipt.lock().ok().and_then(|mut g| g.take());
            match taken {
                Some(receipt) => {
                    let mut taken = Taken { slot: self, receipt: Some(receipt) };
                    let outcome = taken.receipt.as_mut().expect("held").await;
                    taken.receipt = None;
                    return self.settle(outcome);
                }
                None => notified.await,
            }
        }
    }
}

/// The outcome of one published event: `done()`, `result(timeout=None)`, or `await receipt`.
#[pyclass(module = "rasa_event_brokers", frozen)]
pub(crate) struct Receipt {
    slot: Arc<Slot>,
}

impl Receipt {
    pub(crate) fn new(slot: Arc<Slot>) -> Receipt {
        Receipt { slot }
    }
}

fn outcome_to_py(py: Python<'_>, outcome: &Outcome) -> PyResult<PyObject> {
    match outcome {
        Ok(d) => Ok(convert::delivered(py, d)?.into_any().unbind()),
        Err(e) => Err(convert::broker_error(py, e)),
    }
}

#[pymethods]
impl Receipt {
    /// The event's id (32 hex digits), as in the logs and in `DeliveryError` messages.
    #[getter]
    fn id(&self) -> String {
        self.slot.id.to_string()
    }

    /// Whether the outcome is known.
    fn done(&self) -> bool {
        self.slot.poll_now().is_some()
    }

    /// The outcome, waiting for it (at most `timeout` seconds; `None`: as long as it takes):
    /// `{"id": ..., "position": ...}` when delivered, else raises `DeliveryError`. Blocks the
    /// calling thread, with the GIL released; from a coroutine, `await receipt` instead.
    #[pyo3(signature = (timeout=None))]
    fn result(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<PyObject> {
        if let Some(o) = self.slot.poll_now() {
            return outcome_to_py(py, o);
        }
        let wait = match timeout {
            Some(t) if !(t >= 0.0 && t.is_finite()) => {
                return Err(PyValueError::new_err(format!("timeout must be a number of seconds >= 0, not {t}")));
            }
            // Beyond what a Duration holds: as long as it takes.
            Some(t) => Duration::try_from_secs_f64(t).ok(),
            None => None,
        };
        let rt = bridge::runtime()?;
        let slot = self.slot.clone();
        let got = py.allow_threads(move || {
            rt.block_on(async move {
                match wait {
                    Some(d) => tokio::time::timeout(d, slot.wait()).await.is_ok(),
                    None => {
                        slot.wait().await;
                        true
                    }
                }
            })
        });
        match (got, self.slot.outcome.get()) {
            (true, Some(o)) => outcome_to_py(py, o),
            _ => Err(PyTimeoutError::new_err(format!(
                "event {} has no outcome after {} s",
                self.slot.id,
                timeout.unwrap_or_default()
            ))),
        }
    }

    fn __await__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        if let Some(outcome) = self.slot.poll_now() {
            // Settled: an already-done future, no task.
            let future = py.import("asyncio")?.call_method0("get_running_loop")?.call_method0("create_future")?;
            match outcome_to_py(py, outcome) {
                Ok(v) => future.call_method1("set_result", (v,))?,
                Err(e) => future.call_method1("set_exception", (e.into_value(py),))?,
            };
            return future.call_method0("__await__");
        }
        let slot = self.slot.clone();
        let future = bridge::awaitable(
            py,
            async move {
                slot.wait().await;
                slot
            },
            |py, slot: Arc<Slot>| outcome_to_py(py, slot.outcome.get().expect("waited")),
        )?;
        future.call_method0("__await__")
    }

    fn __repr__(&self) -> String {
        let state = match self.slot.outcome.get() {
            None => "pending".to_owned(),
            Some(Ok(_)) => "delivered".to_owned(),
            Some(Err(e)) => format!("failed: {e}"),
        };
        format!("<Receipt {} {state}>", self.slot.id)
    }
}
