//! A published dict as an [`Event`] without `json.dumps`: the dict is walked once into the
//! core's JSON tree, which the backend later writes in Rasa's encoding (the bytes `json.dumps`
//! makes: the core's encoding tests hold it to that), off the Python thread.
//!
//! Only the exact built-in types are walked (`dict`, `list`, `tuple`, `str`, `int`, `float`,
//! `bool`, `None`, and dict keys that are `str`). Anything else (a subclass such as an `IntEnum`,
//! a non-string key, a string with a lone surrogate, nesting deeper than [`MAX_DEPTH`]) makes the
//! whole event go through `json.dumps` instead, so the bytes are what Rasa's classes send. The one
//! exception: a dict whose keys collide once `json.dumps` turns them into strings (`{1: "a", "1":
//! "b"}`) is written with the key once, as Python's `json.loads` would read it back.

use broker_core::Event;
use broker_core::json::{Map, Number, Value};
use pyo3::prelude::*;
use pyo3::sync::GILOnceCell;
use pyo3::types::{PyBool, PyBytes, PyDict, PyFloat, PyInt, PyList, PyString, PyTuple};

use crate::convert;

/// Deeper than this, `json.dumps` decides (it raises for cycles).
const MAX_DEPTH: usize = 64;

static DUMPS: GILOnceCell<PyObject> = GILOnceCell::new();

/// The event of a published object: walked when it is made of built-in types, else from
/// `json.dumps(obj)` (whose errors, a `TypeError` for an object it cannot encode, are raised).
pub(crate) fn event(obj: &Bound<'_, PyAny>) -> PyResult<Event> {
    let tree = if obj.is_exact_instance_of::<PyDict>() { walk(obj, 0) } else { None };
    let made = match tree {
        Some(value) => Event::from_value(value),
        None => {
            let py = obj.py();
            let dumps = DUMPS.get_or_try_init(py, || Ok::<_, PyErr>(py.import("json")?.getattr("dumps")?.unbind()))?;
            let text = dumps.bind(py).call1((obj,))?;
            let bytes = text.call_method1("encode", ("utf-8", "surrogatepass"))?;
            let bytes = bytes.downcast::<PyBytes>()?;
            Event::from_json(bytes.as_bytes())
        }
    };
    made.map_err(|e| convert::InvalidEventError::new_err(e.to_string()))
}

fn walk(obj: &Bound<'_, PyAny>, depth: usize) -> Option<Value> {
    if depth > MAX_DEPTH {
        return None;
    }
    if obj.is_none() {
        return Some(Value::Null);
    }
    if obj.is_exact_instance_of::<PyString>() {
        let s = obj.downcast::<PyString>().ok()?;
        return s.to_cow().ok().map(|c| Value::String(c.into_owned()));
    }
    if obj.is_exact_instance_of::<PyBool>() {
        return Some(Value::Bool(obj.is_truthy().ok()?));
    }
    if obj.is_exact_instance_of::<PyInt>() {
        return Some(Value::Number(match obj.extract::<i64>() {
            Ok(i) => Number::Int(i),
            Err(_) => Number::Big(obj.str().ok()?.to_cow().ok()?.into()),
        }));
    }
    if obj.is_exact_instance_of::<PyFloat>() {
        return Some(Value::Number(Number::Float(obj.downcast::<PyFloat>().ok()?.value())));
    }
    if obj.is_exact_instance_of::<PyDict>() {
        let dict = obj.downcast::<PyDict>().ok()?;
        let mut map = Map::with_capacity(dict.len());
        for (k, v) in dict.iter() {
            if !k.is_exact_instance_of::<PyString>() {
                return None;
            }
            let key = k.downcast::<PyString>().ok()?.to_cow().ok()?.into_owned();
            // Distinct: the keys of a dict whose keys are all exact `str`.
            map.push_new(key, walk(&v, depth + 1)?);
        }
        return Some(Value::Object(map));
    }
    if obj.is_exact_instance_of::<PyList>() || obj.is_exact_instance_of::<PyTuple>() {
        let items = obj.try_iter().ok()?.map(|v| walk(&v.ok()?, depth + 1));
        return items.collect::<Option<Vec<_>>>().map(Value::Array);
    }
    None
}
