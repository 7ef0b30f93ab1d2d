//! The Tokio runtime the module owns, and Rust futures delivered to asyncio.
//!
//! A Rust future runs on the runtime; its result is converted under the GIL, on one thread kept
//! for that (the runtime's workers never wait for the GIL), and handed to the caller's event loop
//! with `loop.call_soon_threadsafe`, which sets an asyncio future (unless it
//! was cancelled meanwhile).
//!
//! Every call into Python from a Rust thread goes through [`with_python`]: once interpreter
//! shutdown has begun (Python's `atexit` calls [`shutdown`]) it calls nothing, and `shutdown`
//! waits for the calls under way. A Rust thread that takes the GIL after finalization has begun
//! is ended by CPython with `pthread_exit`, which aborts the process when it unwinds Rust frames
//! (`call_soon_threadsafe` releases the GIL to write to the loop's socket, so the main thread can
//! finish `asyncio.run` and start finalizing in that very moment).

use std::future::Future;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::sync::GILOnceCell;
use tokio::runtime::Runtime;

static RUNTIME: OnceLock<Result<Runtime, String>> = OnceLock::new();
static SHUTTING_DOWN: AtomicBool = AtomicBool::new(false);
/// Calls into Python under way from Rust threads.
static IN_PYTHON: AtomicUsize = AtomicUsize::new(0);
static RESOLVE: GILOnceCell<PyObject> = GILOnceCell::new();
/// Work for the thread that calls into Python on behalf of the runtime.
type Call = Box<dyn FnOnce(Python<'_>) + Send>;
static CALLS: OnceLock<Result<std::sync::mpsc::Sender<Call>, String>> = OnceLock::new();

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

/// Called from Python's `atexit`, before finalization: no more calls into Python from Rust
/// threads, and the ones under way finish first (at most 2 s, with the GIL released for them).
#[pyfunction]
pub(crate) fn shutdown(py: Python<'_>) {
    SHUTTING_DOWN.store(true, Ordering::SeqCst);
    py.allow_threads(|| {
        let deadline = Instant::now() + Duration::from_secs(2);
        while IN_PYTHON.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
    });
}

/// Hands `call` to the one thread that takes the GIL for the runtime, so the runtime's workers
/// (the writers, the client libraries' I/O) never wait for the GIL while Rasa holds it.
fn call_python(call: Call) -> PyResult<()> {
    // The thread ends only at interpreter shutdown, when nobody waits for results any more.
    let _ = calls()?.send(call);
    Ok(())
}

/// The channel to the thread of [`call_python`], started on first use.
fn calls() -> PyResult<&'static std::sync::mpsc::Sender<Call>> {
    let calls = CALLS.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel::<Call>();
        std::thread::Builder::new()
            .name("rasa-event-brokers-py".into())
            .spawn(move || {
                while let Ok(call) = rx.recv() {
                    if with_python(call).is_none() {
                        return;
                    }
                }
            })
            .map(|_| tx)
            .map_err(|e| e.to_string())
    });
    calls.as_ref().map_err(|e| PyRuntimeError::new_err(format!("cannot start a thread: {e}")))
}

/// Runs `f` with the GIL from a Rust thread, unless interpreter shutdown has begun (`None`).
pub(crate) fn with_python<R>(f: impl for<'py> FnOnce(Python<'py>) -> R) -> Option<R> {
    IN_PYTHON.fetch_add(1, Ordering::SeqCst);
    let out = if SHUTTING_DOWN.load(Ordering::SeqCst) { None } else { Some(Python::with_gil(f)) };
    IN_PYTHON.fetch_sub(1, Ordering::SeqCst);
    out
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
    let rt = runtime()?;
    // Started now, so a failure to start it is the caller's exception.
    calls()?;
    rt.spawn(async move {
        let output = fut.await;
        let _ = call_python(Box::new(move |py| {
            let (exc, value) = match convert(py, output) {
                Ok(v) => (py.None(), v),
                Err(e) => (e.into_value(py).into_any(), py.None()),
            };
            // A closed loop raises: nobody is waiting any more.
            let _ = event_loop.bind(py).call_method1("call_soon_threadsafe", (resolve, target, exc, value));
        }));
    });
    Ok(py_future)
}
