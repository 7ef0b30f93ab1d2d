//! The native half of the Python package `rasa_event_brokers`: this project's backends behind
//! Rasa's event broker interface, so a Rasa assistant switches by changing one line of
//! `endpoints.yml` (`type: rasa_event_brokers.KafkaEventBroker`).
//!
//! Built by maturin into the extension module `rasa_event_brokers._native` (an abi3 wheel for
//! CPython >= 3.8); the Python classes around it live in `python/rasa_event_brokers/`. Nothing
//! here knows a backend: options go to [`broker_config::default_registry`], events to
//! [`broker_core::EventBroker`], and the delivery engine (batching, retries, close accounting)
//! is the Rust one. What this crate adds is the bridge:
//!
//! - **No round trip on Rasa's event loop.** `publish` is called synchronously once per event;
//!   it walks the dict once into the core's JSON tree (written later, off the Python thread, as
//!   the bytes `json.dumps` makes; anything but built-in types goes through `json.dumps` itself),
//!   hands it to the Rust pipeline and returns a receipt at once. Only a full buffer with
//!   `when_full: block` makes it wait (back-pressure, the GIL released, Python's signal handlers still run);
//!   `when_full: error` raises `BufferFullError` instead.
//! - **Outcomes.** Each receipt settles once (delivered, or failed with the reason); the broker
//!   counts settled receipts in publish order for `stats()`, without a task or a wake-up per event.
//! - **asyncio.** `from_endpoint_config`, `flush` and `close` run on a Tokio runtime owned by the
//!   module and resolve an asyncio future through `loop.call_soon_threadsafe`.
//! - **Logging.** `tracing` records go to Python's `logging` under `rasa_event_brokers.<crate>`,
//!   forwarded by one thread so no Rust lock is ever held while the GIL is taken.
//!
//! A Python user's view (the pytest suite in `tests/` runs this inside Rasa 3.6.21):
//!
//! ```python
//! from rasa.core.brokers.broker import EventBroker
//! from rasa.utils.endpoints import EndpointConfig
//!
//! broker = await EventBroker.create(EndpointConfig(type="rasa_event_brokers.FileEventBroker", path="events.log"))
//! receipt = broker.publish({"event": "bot", "sender_id": "default", "timestamp": 1528402837.6})
//! await receipt            # {"id": "...", "position": {"offset": 0}}
//! undelivered = await broker.close()   # [] when everything was delivered
//! ```
//!
//! There is no Rust API: the crate is a `cdylib` only and is not published to crates.io.

mod bridge;
mod broker;
mod convert;
mod encode;
mod logging;
mod receipt;

use pyo3::prelude::*;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The extension module `rasa_event_brokers._native`.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("BrokerError", py.get_type::<convert::BrokerError>())?;
    m.add("ConfigurationError", py.get_type::<convert::ConfigurationError>())?;
    m.add("InvalidEventError", py.get_type::<convert::InvalidEventError>())?;
    m.add("DeliveryError", py.get_type::<convert::DeliveryError>())?;
    m.add("BufferFullError", py.get_type::<convert::BufferFullError>())?;
    m.add("BrokerClosedError", py.get_type::<convert::BrokerClosedError>())?;
    m.add_class::<broker::NativeBroker>()?;
    m.add_class::<receipt::Receipt>()?;
    m.add_function(wrap_pyfunction!(broker::connect, m)?)?;
    m.add_function(wrap_pyfunction!(broker::validate, m)?)?;
    m.add_function(wrap_pyfunction!(bridge::shutdown, m)?)?;
    logging::install(py)?;
    Ok(())
}
