//! Values across the boundary: Python option values to [`ConfigValue`], outcomes and events to
//! Python objects, [`Error`] and [`ConfigError`] to the package's exceptions.

use broker_core::{ConfigError, ConfigValue, Delivered, Error, Event, Location, Position, Spanned};
use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyFloat, PyInt, PyList, PyString, PyTuple};

create_exception!(
    rasa_event_brokers,
    BrokerError,
    PyException,
    "Base class of the errors of a broker once it is configured."
);
create_exception!(
    rasa_event_brokers,
    ConfigurationError,
    PyValueError,
    "The broker's configuration is invalid (the message names the key, the value and what is allowed). Trying again will not help."
);
create_exception!(
    rasa_event_brokers,
    InvalidEventError,
    PyValueError,
    "What was published is not an event (not a JSON object with a string `event` key)."
);
create_exception!(
    rasa_event_brokers,
    DeliveryError,
    BrokerError,
    "An event was not delivered; `temporary` tells whether trying again later can help."
);
create_exception!(
    rasa_event_brokers,
    BufferFullError,
    DeliveryError,
    "The buffer is full and `when_full` is `error`: the event was not accepted. Temporary."
);
create_exception!(
    rasa_event_brokers,
    BrokerClosedError,
    DeliveryError,
    "The broker is closed: the event was not accepted."
);

/// The Python exception for a configuration error, with `key`, `message` and `hint`
/// attributes beside the message `broker check` prints.
pub(crate) fn config_error(py: Python<'_>, e: &ConfigError) -> PyErr {
    let err = ConfigurationError::new_err(e.to_string());
    let value = err.value(py);
    let _ = value.setattr("key", e.key.clone());
    let _ = value.setattr("reason", e.message.clone());
    let _ = value.setattr("hint", e.hint.clone());
    err
}

/// The Python exception for a broker error; `temporary` says whether trying again can help.
pub(crate) fn broker_error(py: Python<'_>, e: &Error) -> PyErr {
    let err = match e {
        Error::Config(c) => return config_error(py, c),
        Error::BufferFull { .. } => BufferFullError::new_err(e.to_string()),
        Error::Closed => BrokerClosedError::new_err(e.to_string()),
        _ => DeliveryError::new_err(e.to_string()),
    };
    let _ = err.value(py).setattr("temporary", e.is_temporary());
    err
}

/// Option values nested deeper than this are refused (a self-referencing list would otherwise
/// recurse until the stack overflows).
const MAX_OPTION_DEPTH: usize = 32;

/// A Python option value as a configuration value, or a [`ConfigError`] naming `key`.
pub(crate) fn config_value(key: &str, value: &Bound<'_, PyAny>) -> Result<ConfigValue, ConfigError> {
    option_value(key, value, 0)
}

fn option_value(key: &str, value: &Bound<'_, PyAny>, depth: usize) -> Result<ConfigValue, ConfigError> {
    if depth > MAX_OPTION_DEPTH {
        return Err(ConfigError::new(
            Location::default(),
            Some(key),
            format!("nested deeper than {MAX_OPTION_DEPTH} levels"),
        ));
    }
    let at = Location::default;
    let unsupported = || {
        let kind = value.get_type().name().map(|n| n.to_string()).unwrap_or_else(|_| "?".into());
        ConfigError::new(at(), Some(key), format!("a value of Python type {kind} cannot be an option"))
            .with_hint("use None, bool, int, float, str, a list or a dict")
    };
    if value.is_none() {
        return Ok(ConfigValue::Null);
    }
    // bool before int: Python's bool is an int.
    if let Ok(b) = value.downcast::<PyBool>() {
        return Ok(ConfigValue::Bool(b.is_true()));
    }
    if value.is_instance_of::<PyInt>() {
        return value
            .extract::<i64>()
            .map(ConfigValue::Int)
            .map_err(|_| ConfigError::new(at(), Some(key), format!("{value} does not fit in 64 bits")));
    }
    if let Ok(f) = value.downcast::<PyFloat>() {
        return Ok(ConfigValue::Float(f.value()));
    }
    if let Ok(s) = value.downcast::<PyString>() {
        return s.to_cow().map(|s| ConfigValue::Str(s.into_owned())).map_err(|_| unsupported());
    }
    if value.is_instance_of::<PyList>() || value.is_instance_of::<PyTuple>() {
        let mut items = Vec::new();
        for item in value.try_iter().map_err(|_| unsupported())? {
            let item = item.map_err(|_| unsupported())?;
            items.push(Spanned { value: option_value(key, &item, depth + 1)?, at: at() });
        }
        return Ok(ConfigValue::List(items));
    }
    if let Ok(d) = value.downcast::<PyDict>() {
        let mut entries = Vec::new();
        for (k, v) in d.iter() {
            let k: String =
                k.extract().map_err(|_| ConfigError::new(at(), Some(key), "mapping keys must be strings"))?;
            let v = option_value(&k, &v, depth + 1)?;
            entries.push((k, Spanned { value: v, at: at() }));
        }
        return Ok(ConfigValue::Map(entries));
    }
    Err(unsupported())
}

/// `{"id": "<hex>", "position": {...} | None}` for a delivered event.
pub(crate) fn delivered<'py>(py: Python<'py>, d: &Delivered) -> PyResult<Bound<'py, PyDict>> {
    let out = PyDict::new(py);
    out.set_item("id", d.id.to_string())?;
    let position = PyDict::new(py);
    match &d.position {
        None => {
            out.set_item("position", py.None())?;
            return Ok(out);
        }
        Some(Position::Line { line, offset }) => {
            position.set_item("line", line)?;
            position.set_item("offset", offset)?;
        }
        Some(Position::Offset(o)) => position.set_item("offset", o)?,
        Some(Position::Partition { partition, offset }) => {
            position.set_item("partition", partition)?;
            position.set_item("offset", offset)?;
        }
        Some(Position::Row(id)) => position.set_item("row_id", id)?,
        Some(Position::DeliveryTag(t)) => position.set_item("delivery_tag", t)?,
        Some(other) => position.set_item("description", other.to_string())?,
    }
    out.set_item("position", position)?;
    Ok(out)
}

/// Events as the dicts Rasa published (parsed from their Rasa encoding by Python's `json`).
pub(crate) fn events<'py>(py: Python<'py>, events: &[Event]) -> PyResult<Bound<'py, PyList>> {
    let loads = py.import("json")?.getattr("loads")?;
    let out = PyList::empty(py);
    for e in events {
        let text = String::from_utf8_lossy(&e.to_json()).into_owned();
        out.append(loads.call1((text,))?)?;
    }
    Ok(out)
}
