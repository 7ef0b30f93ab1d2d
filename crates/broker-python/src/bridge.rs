//! The Tokio runtime the module owns, and Rust futures delivered to asyncio.
//!
//! A Rust future runs on the runtime; its result is converted under the GIL and handed to the
//! caller's event loop with `loop.call_soon_threadsafe`, which sets an asyncio future (unless it
//! was cancelled meanwhile). After interpreter shutdown has begun (Python's `atexit` calls
//! [`shutdown`]) results are dropped instead: taking the GIL then could hang the runtime thread.

use std::future::Future;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::sync::GILOnceCell;
use tokio::runtime::Runtime;

static RUNTIME: OnceLock<Result<Runtime, String>> = OnceLock::new();
static SHUTTING_DOWN: AtomicBool = AtomicBool::new(false);
static RESOLVE: GILOnceCell<PyObject> = GILOnceCell::new();

/// The module's runtime: two worker threads (the writers and the client libraries' I/O; the
/// Python thread only enqueues).
pub(crate) fn runtime() -> PyResult<&'static Runtime> {
    let rt = RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("rasa-event-brokers")
            .enable_all()
            .build()
            .map_err(|e| e.to_string())
    });
    rt.as_ref().map_err(|e| PyRuntimeError::new_err(format!("cannot start the Tokio runtime: {e}")))
}

/// Whether interpreter shutdown has begun.
pub(crate) fn shutting_down() -> bool {
    SHUTTING_DOWN.load(Ordering::Acquire)
}

/// Called from Python's `atexit`: stop handing results and log records to Python.
#[pyfunction]
pub(crate) fn shutdown() {
    SHUTTING_DOWN.store(true, Ordering::Release);
}

fn resolver(py: Python<'_>) -> PyResult<&PyObject> {
    RESOLVE.get_or_try_init(py, || {
        let code = c"def resolve(fut, exc, value):\n    if fut.done():\n        return\n    if exc is not None:\n        fut.set_exception(exc)\n    else:\n        fut.set_result(value)\n";
        let module = PyModule::from_code(py, code, c"rasa_event_brokers/_resolve.py", c"rasa_event_brokers._resolve")?;
        Ok(module.getattr("resolve")?.unbind())
    })
}

/// Runs `fut` on the runtime and returns an asyncio future of the running loop that gets
/// `convert(output)`. Must be called from a thread with a running event loop.
pub(crate) fn awaitable<'py, F, T, C>(py: Python<'py>, fut: F, convert: C) -> PyResult<Bound<'py, PyAny>>
where
    F: Future<Output = T> + Send + 'static,
    T: Send + 'static,
    C: FnOnce(Python<'_>, T) -> PyResult<PyObject> + Send + 'static,
{
    let resolve = resolver(py)?.clone_ref(py);
    let event_loop = py.import("asyncio")?.call_method0("get_running_loop")?;
    let py_future = event_loop.call_method0("create_future")?;
    let (event_loop, target) = (event_loop.unbind(), py_future.clone().unbind());
    runtime()?.spawn(async move {
        let output = fut.await;
        if shutting_down() {
            return;
        }
        Python::with_gil(|py| {
            let (exc, value) = match convert(py, output) {
                Ok(v) => (py.None(), v),
                Err(e) => (e.into_value(py).into_any(), py.None()),
            };
            // A closed loop raises: nobody is waiting any more.
            let _ = event_loop.bind(py).call_method1("call_soon_threadsafe", (resolve, target, exc, value));
        });
    });
    Ok(py_future)
}
