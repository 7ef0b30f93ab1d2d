//! A published dict as an [`Event`] without `json.dumps`: the dict is walked once, writing Rasa's
//! encoding (the bytes `json.dumps` makes: the core's encoding tests hold it to that) straight
//! into the event's buffer with the core's [`EventWriter`]; strings are read in place.
//!
//! Only the exact built-in types are walked (`dict`, `list`, `tuple`, `str`, `int`, `float`,
//! `bool`, `None`, and dict keys that are `str`). Anything else (a subclass such as an `IntEnum`,
//! a non-string key, a string with a lone surrogate, nesting deeper than [`MAX_DEPTH`]) makes the
//! whole event go through `json.dumps` instead, so the bytes are what Rasa's classes send. The one
//! exception: a dict whose keys collide once `json.dumps` turns them into strings (`{1: "a", "1":
//! "b"}`) is written with the key once, as Python's `json.loads` would read it back.

use std::borrow::Cow;

use broker_core::Event;
use broker_core::event::{EventWriter, ValueWriter};
use broker_core::json::Number;
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
    let walked = match obj.downcast_exact::<PyDict>() {
        Ok(dict) => walk_event(dict),
        Err(_) => None,
    };
    let made = match walked {
        Some(made) => made,
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

/// The event's bytes written as the dict is walked (`None`: not made of built-in types only).
fn walk_event(dict: &Bound<'_, PyDict>) -> Option<Result<Event, broker_core::EventError>> {
    let mut w = EventWriter::new();
    for (k, v) in dict.iter() {
        let key = text(&k)?;
        walk(&v, w.field(&key), 1)?;
    }
    Some(w.finish())
}

/// Writes `obj` with `w`; `None` when it is not made of built-in types only.
fn walk(obj: &Bound<'_, PyAny>, w: ValueWriter<'_>, depth: usize) -> Option<()> {
    if depth > MAX_DEPTH {
        return None;
    }
    if obj.is_none() {
        w.null();
    } else if obj.is_exact_instance_of::<PyString>() {
        w.str(&text(obj)?);
    } else if obj.is_exact_instance_of::<PyBool>() {
        w.bool(obj.is_truthy().ok()?);
    } else if obj.is_exact_instance_of::<PyInt>() {
        match obj.extract::<i64>() {
            Ok(i) => w.int(i),
            Err(_) => w.number(&Number::Big(obj.str().ok()?.to_cow().ok()?.into())),
        }
    } else if let Ok(f) = obj.downcast_exact::<PyFloat>() {
        w.float(f.value());
    } else if let Ok(dict) = obj.downcast_exact::<PyDict>() {
        let mut object = w.object();
        for (k, v) in dict.iter() {
            let key = text(&k)?;
            walk(&v, object.key(&key), depth + 1)?;
        }
    } else if obj.is_exact_instance_of::<PyList>() || obj.is_exact_instance_of::<PyTuple>() {
        let mut array = w.array();
        for item in obj.try_iter().ok()? {
            walk(&item.ok()?, array.item(), depth + 1)?;
        }
    } else {
        return None;
    }
    Some(())
}

/// The text of an exact `str` (`None` for anything else, and for a string with a lone
/// surrogate, which is not UTF-8), borrowed from the string object: CPython keeps the UTF-8 form
/// with the object, and an ASCII string's UTF-8 form is its own storage, so nothing is copied.
#[cfg(not(windows))]
fn text<'a>(obj: &'a Bound<'_, PyAny>) -> Option<Cow<'a, str>> {
    if !obj.is_exact_instance_of::<PyString>() {
        return None;
    }
    let mut size: pyo3::ffi::Py_ssize_t = 0;
    // SAFETY: `obj` is a live `str` and the GIL is held (a `Bound` proves both). The buffer
    // CPython returns belongs to the string object and lives until the object is freed, which
    // the borrow of `obj` outlasts; `size` is its length in bytes, and its bytes are UTF-8:
    // CPython's own encoder wrote them, and it fails (NULL) for the one thing that is not
    // encodable, a lone surrogate.
    #[allow(unsafe_code)]
    unsafe {
        let p = ffi::PyUnicode_AsUTF8AndSize(obj.as_ptr(), &mut size);
        if p.is_null() {
            // A lone surrogate: UnicodeEncodeError, which `json.dumps` handles instead.
            drop(PyErr::take(obj.py()));
            return None;
        }
        let bytes = std::slice::from_raw_parts(p.cast::<u8>(), usize::try_from(size).ok()?);
        Some(Cow::Borrowed(std::str::from_utf8_unchecked(bytes)))
    }
}

/// The text of an exact `str` (`None` for anything else, and for a lone surrogate). On Windows an
/// abi3 module links against `python3.dll`, which exports `PyUnicode_AsUTF8AndSize` only from
/// 3.10: the limited API's copy instead.
#[cfg(windows)]
fn text<'a>(obj: &'a Bound<'_, PyAny>) -> Option<Cow<'a, str>> {
    obj.downcast_exact::<PyString>().ok()?.to_cow().ok().map(|c| Cow::Owned(c.into_owned()))
}

#[cfg(not(windows))]
#[allow(unsafe_code)]
mod ffi {
    use pyo3::ffi::{Py_ssize_t, PyObject};
    use std::os::raw::c_char;

    // Exported by every CPython since 3.3 with this signature, and part of the limited API since
    // 3.10; pyo3 declares it only for builds that require 3.10, and this wheel is for 3.8+.
    unsafe extern "C" {
        pub(super) fn PyUnicode_AsUTF8AndSize(unicode: *mut PyObject, size: *mut Py_ssize_t) -> *const c_char;
    }
}
