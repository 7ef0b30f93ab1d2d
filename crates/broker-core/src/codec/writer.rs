//! An event written in Rasa's encoding as it is walked, without a tree.
//!
//! For callers whose events arrive in another representation (a Python dict, a database row) and
//! must leave as the bytes `json.dumps` makes: [`EventWriter`] appends each field straight to the
//! event's bytes, so publishing costs one pass and one buffer instead of a [`Map`] of owned
//! strings that is encoded later. The output is well-formed by construction: a key is written
//! with its value (an entry whose [`ValueWriter`] is dropped unused is left out) and every object
//! or array is closed when its writer is dropped, also when the caller gives up half way (a
//! writer leaked with `mem::forget` makes [`EventWriter::finish`] fail).
//!
//! ```
//! use broker_core::event::EventWriter;
//!
//! let mut w = EventWriter::new();
//! w.field("sender_id").str("default");
//! w.field("event").str("bot");
//! w.field("timestamp").float(1528402837.6);
//! {
//!     let mut metadata = w.field("metadata").object();
//!     metadata.key("utter_action").str("utter_greet");
//!     metadata.key("ids").array().item().int(7);
//! }
//! let event = w.finish().unwrap();
//! assert_eq!(event.event_type(), "bot");
//! assert_eq!(event.sender_id(), Some("default"));
//! assert_eq!(
//!     event.to_json(),
//!     br#"{"sender_id": "default", "event": "bot", "timestamp": 1528402837.6, "metadata": {"utter_action": "utter_greet", "ids": [7]}}"#
//! );
//! ```
//!
//! [`Map`]: crate::json::Map

use super::event::{Event, EventError};
use super::json::{self, Number};

/// Writes one event object field by field; [`EventWriter::finish`] makes the [`Event`].
///
/// The keys of one object must be distinct, as a dict's are: a key written twice is written twice
/// (Python's `json.loads` keeps the last value, and so do [`Event::event_type`] and
/// [`Event::sender_id`]).
#[derive(Debug)]
pub struct EventWriter {
    out: Vec<u8>,
    empty: bool,
    /// Objects and arrays begun and not closed (only `mem::forget` can leave one open).
    open: usize,
    event_type: Option<String>,
    sender_id: Option<String>,
}

impl Default for EventWriter {
    fn default() -> Self {
        EventWriter::new()
    }
}

impl EventWriter {
    /// An empty event object.
    pub fn new() -> EventWriter {
        let mut out = Vec::with_capacity(512);
        out.push(b'{');
        EventWriter { out, empty: true, open: 0, event_type: None, sender_id: None }
    }

    /// The top-level field `key`, written with the value the returned writer writes (left out
    /// when it writes none). A string `event` or `sender_id` is kept for the event's accessors.
    pub fn field<'w>(&'w mut self, key: &'w str) -> ValueWriter<'w> {
        let capture = match key {
            "event" => Some(&mut self.event_type),
            "sender_id" => Some(&mut self.sender_id),
            _ => None,
        };
        ValueWriter { out: &mut self.out, empty: &mut self.empty, open: &mut self.open, key: Some(key), capture }
    }

    /// The event. Fails with [`EventError::MissingType`] when no string `event` field was
    /// written, and with [`EventError::Json`] when an object or array writer was forgotten
    /// (`mem::forget`) instead of dropped. Rasa 2's `form` and `form_validation` types are
    /// converted as [`Event::from_value`] converts them.
    pub fn finish(mut self) -> Result<Event, EventError> {
        if self.open != 0 {
            let message = "an object or array was never closed (its writer was forgotten)";
            return Err(EventError::Json(json::ParseError { message, offset: self.out.len() }));
        }
        self.out.push(b'}');
        match self.event_type {
            None => Err(EventError::MissingType),
            Some(t) if t == "form" || t == "form_validation" => Event::from_value(json::parse(&self.out)?),
            Some(event_type) => Ok(Event::encoded(self.out, event_type, self.sender_id)),
        }
    }
}

/// Writes one JSON value (an object entry or an array item) with one of its methods. Dropped
/// without writing, the entry or item is left out.
#[derive(Debug)]
pub struct ValueWriter<'a> {
    out: &'a mut Vec<u8>,
    empty: &'a mut bool,
    open: &'a mut usize,
    key: Option<&'a str>,
    capture: Option<&'a mut Option<String>>,
}

impl<'a> ValueWriter<'a> {
    /// The separator and the key; then the value is written to the returned buffer.
    fn begin(self, captured: Option<&str>) -> (&'a mut Vec<u8>, &'a mut usize) {
        if !std::mem::take(self.empty) {
            self.out.extend_from_slice(b", ");
        }
        if let Some(key) = self.key {
            json::write_str(key, self.out);
            self.out.extend_from_slice(b": ");
        }
        if let Some(c) = self.capture {
            *c = captured.map(str::to_owned);
        }
        (self.out, self.open)
    }

    /// `null`.
    pub fn null(self) {
        self.begin(None).0.extend_from_slice(b"null");
    }

    /// `true` or `false`.
    pub fn bool(self, b: bool) {
        self.begin(None).0.extend_from_slice(if b { b"true" } else { b"false" });
    }

    /// An integer.
    pub fn int(self, i: i64) {
        self.number(&Number::Int(i));
    }

    /// A float in Python's `repr` form (`1.0`, `1e+16`, `NaN`).
    pub fn float(self, f: f64) {
        json::write_float(f, self.begin(None).0);
    }

    /// A number as [`Number::write_python`] writes it.
    pub fn number(self, n: &Number) {
        n.write_python(self.begin(None).0);
    }

    /// A string, with Python's `ensure_ascii` escaping.
    pub fn str(self, s: &str) {
        json::write_str(s, self.begin(Some(s)).0);
    }

    /// An object, closed when the returned writer is dropped.
    pub fn object(self) -> ObjectWriter<'a> {
        ObjectWriter(self.open_container(b'{', b'}'))
    }

    /// An array, closed when the returned writer is dropped.
    pub fn array(self) -> ArrayWriter<'a> {
        ArrayWriter(self.open_container(b'[', b']'))
    }

    fn open_container(self, start: u8, close: u8) -> Open<'a> {
        let (out, open) = self.begin(None);
        out.push(start);
        *open += 1;
        Open { out, open, empty: true, close }
    }
}

/// A nested object or array being written: closed with its bracket when dropped.
#[derive(Debug)]
struct Open<'a> {
    out: &'a mut Vec<u8>,
    open: &'a mut usize,
    empty: bool,
    close: u8,
}

impl Open<'_> {
    fn value<'w>(&'w mut self, key: Option<&'w str>) -> ValueWriter<'w> {
        ValueWriter { out: self.out, empty: &mut self.empty, open: self.open, key, capture: None }
    }
}

impl Drop for Open<'_> {
    fn drop(&mut self) {
        self.out.push(self.close);
        *self.open -= 1;
    }
}

/// Writes the entries of a nested object; closes it with `}` when dropped.
#[derive(Debug)]
pub struct ObjectWriter<'a>(Open<'a>);

impl ObjectWriter<'_> {
    /// The entry `key`, written with the value the returned writer writes.
    pub fn key<'w>(&'w mut self, key: &'w str) -> ValueWriter<'w> {
        self.0.value(Some(key))
    }
}

/// Writes the items of an array; closes it with `]` when dropped.
#[derive(Debug)]
pub struct ArrayWriter<'a>(Open<'a>);

impl ArrayWriter<'_> {
    /// The next item, written with the value the returned writer writes.
    pub fn item(&mut self) -> ValueWriter<'_> {
        self.0.value(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::json::{Map, Value};

    /// The same content through the tree, for comparison.
    fn tree_bytes(v: &Value) -> Vec<u8> {
        let mut out = Vec::new();
        v.write_rasa(&mut out);
        out
    }

    #[test]
    fn writes_what_the_tree_writes() {
        let mut w = EventWriter::new();
        w.field("event").str("user");
        w.field("text").str("h\u{e9}llo \"you\"\n\u{1F600}");
        w.field("timestamp").float(1e16);
        w.field("n").int(-12);
        w.field("big").number(&Number::Big("18446744073709551616".into()));
        w.field("nan").float(f64::NAN);
        w.field("ok").bool(true);
        w.field("none").null();
        {
            let mut parse_data = w.field("parse_data").object();
            let mut entities = parse_data.key("entities").array();
            entities.item().object().key("start").int(0);
            entities.item().array();
            entities.item().str("x");
            drop(entities);
            parse_data.key("empty").object();
        }
        let event = w.finish().unwrap();

        let mut m = Map::new();
        m.insert("event", "user".into());
        m.insert("text", "h\u{e9}llo \"you\"\n\u{1F600}".into());
        m.insert("timestamp", 1e16.into());
        m.insert("n", (-12i64).into());
        m.insert("big", Value::Number(Number::Big("18446744073709551616".into())));
        m.insert("nan", f64::NAN.into());
        m.insert("ok", true.into());
        m.insert("none", Value::Null);
        let mut entity = Map::new();
        entity.insert("start", 0i64.into());
        let mut pd = Map::new();
        pd.insert("entities", vec![Value::Object(entity), Value::Array(vec![]), "x".into()].into());
        pd.insert("empty", Map::new().into());
        m.insert("parse_data", pd.into());
        assert_eq!(event.to_json(), tree_bytes(&Value::Object(m)));
        assert_eq!(event.event_type(), "user");
        assert_eq!(event.sender_id(), None);
        assert_eq!(event.body().get("n"), Some(&Value::from(-12i64)));
    }

    #[test]
    fn an_unused_value_is_left_out_and_the_last_string_counts() {
        let mut w = EventWriter::new();
        let _ = w.field("first");
        w.field("sender_id").str("a");
        let _ = w.field("sender_id");
        w.field("event").str("bot");
        w.field("list").array().item();
        let e = w.finish().unwrap();
        assert_eq!(e.to_json(), br#"{"sender_id": "a", "event": "bot", "list": []}"#);
        assert_eq!(e.sender_id(), Some("a"));
        let mut w = EventWriter::new();
        w.field("sender_id").str("a");
        w.field("event").str("bot");
        w.field("sender_id").null();
        assert_eq!(w.finish().unwrap().sender_id(), None);
        // A nested `event` key is not the type.
        let mut w = EventWriter::new();
        w.field("metadata").object().key("event").str("bot");
        assert_eq!(w.finish().unwrap_err(), EventError::MissingType);
        let mut w = EventWriter::new();
        w.field("event").str("bot");
        w.field("event").int(1);
        assert_eq!(w.finish().unwrap_err(), EventError::MissingType);
    }

    fn write_value(v: &Value, w: ValueWriter<'_>) {
        match v {
            Value::Null => w.null(),
            Value::Bool(b) => w.bool(*b),
            Value::Number(n) => w.number(n),
            Value::String(s) => w.str(s),
            Value::Utf16(_) => unreachable!("not in the sample"),
            Value::Array(items) => {
                let mut a = w.array();
                for item in items {
                    write_value(item, a.item());
                }
            }
            Value::Object(m) => {
                let mut o = w.object();
                for (k, v) in m.iter() {
                    write_value(v, o.key(k));
                }
            }
        }
    }

    #[test]
    fn every_event_rasa_wrote_comes_out_byte_for_byte() {
        let sample = include_str!("../../tests/data/rasa-events-sample.jsonl");
        let mut n = 0;
        for line in sample.lines().filter(|l| !l.trim().is_empty()) {
            let read = Event::from_json(line.as_bytes()).unwrap();
            let mut w = EventWriter::new();
            for (k, v) in read.body().iter() {
                write_value(v, w.field(k));
            }
            let written = w.finish().unwrap();
            assert_eq!(written.to_json(), line.as_bytes());
            assert_eq!((written.event_type(), written.sender_id()), (read.event_type(), read.sender_id()));
            n += 1;
        }
        assert!(n > 100);
    }

    #[test]
    fn a_forgotten_container_fails_the_event() {
        let mut w = EventWriter::new();
        w.field("event").str("bot");
        std::mem::forget(w.field("data").object());
        assert!(matches!(w.finish(), Err(EventError::Json(_))));
    }

    #[test]
    fn legacy_types_are_converted() {
        let mut w = EventWriter::new();
        w.field("event").str("form");
        w.field("name").str("f");
        let e = w.finish().unwrap();
        assert_eq!(e.event_type(), "active_loop");
        assert_eq!(e.to_json(), br#"{"event": "active_loop", "name": "f"}"#);
    }
}
