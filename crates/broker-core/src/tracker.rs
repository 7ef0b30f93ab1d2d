//! Rasa's tracker stores, read side: what `broker export` reads (Rasa's `rasa export`).
//!
//! A [`TrackerStore`] lists the conversations it holds and streams their events, filtered by an
//! [`ExportQuery`], in *export order*: ascending timestamp, ties in the store's own order (row id,
//! or position in the stored tracker). Within one conversation that is exactly the order Rasa's
//! exporter publishes (it sorts each conversation's events by timestamp, stably); across
//! conversations it makes a resume point one number: every event before the first one that was
//! not delivered has a timestamp at most that one's, so `--minimum-timestamp T` loses nothing.
//!
//! [`export_event`] turns a stored event (Rasa's `event.as_dict()`, without `sender_id`) into the
//! event Rasa's exporter publishes: `sender_id` added as the *last* key, the timestamp offset by
//! `--offset-timestamps-by-seconds` as Python adds an `int` to it.
//!
//! Stores are configured from the `tracker_store:` section through [`TrackerStoreFactory`],
//! registered in the same [`Registry`](crate::Registry) as the backends.

use std::fmt;

use async_trait::async_trait;

use crate::codec::json::{self, Number, Value};
use crate::config::{ConfigError, Options, Warning};
use crate::error::{Error, Position};
use crate::event::{Event, EventError};

/// Which events to export (`rasa export`'s flags).
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct ExportQuery {
    /// Only events with `timestamp >= minimum_timestamp`.
    pub minimum_timestamp: Option<f64>,
    /// Only events with `timestamp < maximum_timestamp`.
    pub maximum_timestamp: Option<f64>,
    /// Only these conversations (distinct, sorted); `None`: all of them.
    pub conversation_ids: Option<Vec<String>>,
    /// How many events one [`StoredEvents::next_page`] returns at most.
    pub page_size: usize,
}

impl ExportQuery {
    /// All events, in pages of 5,000.
    pub fn all() -> ExportQuery {
        ExportQuery { page_size: 5_000, ..ExportQuery::default() }
    }

    /// Sets the lower bound (inclusive).
    pub fn minimum_timestamp(mut self, t: Option<f64>) -> ExportQuery {
        self.minimum_timestamp = t;
        self
    }

    /// Sets the upper bound (exclusive).
    pub fn maximum_timestamp(mut self, t: Option<f64>) -> ExportQuery {
        self.maximum_timestamp = t;
        self
    }

    /// Restricts the export to `ids` (sorted and made distinct here).
    pub fn conversation_ids(mut self, ids: Option<Vec<String>>) -> ExportQuery {
        self.conversation_ids = ids.map(|mut ids| {
            ids.sort();
            ids.dedup();
            ids
        });
        self
    }

    /// Sets the page size (at least 1).
    pub fn page_size(mut self, n: usize) -> ExportQuery {
        self.page_size = n.max(1);
        self
    }

    /// Whether an event at `timestamp` is inside the time range (Rasa's exporter: skipped when
    /// `timestamp < minimum` or `timestamp >= maximum`). Stores that cannot filter on the server
    /// use this, so the rule has one owner.
    pub fn admits_timestamp(&self, timestamp: f64) -> bool {
        !self.minimum_timestamp.is_some_and(|min| timestamp < min)
            && !self.maximum_timestamp.is_some_and(|max| timestamp >= max)
    }

    /// Whether the conversation `sender_id` is requested.
    pub fn admits_conversation(&self, sender_id: &str) -> bool {
        self.conversation_ids.as_ref().is_none_or(|ids| ids.binary_search_by(|id| id.as_str().cmp(sender_id)).is_ok())
    }
}

/// One event as a tracker store holds it.
#[derive(Clone, PartialEq)]
#[non_exhaustive]
pub struct StoredEvent {
    /// The conversation.
    pub sender_id: String,
    /// The event's `timestamp` (the store's export order is by it).
    pub timestamp: f64,
    /// The event as Rasa stored it: the JSON of `event.as_dict()`, without `sender_id`.
    pub data: Vec<u8>,
    /// Where it is in the store (a row id), for messages.
    pub position: Option<Position>,
}

impl StoredEvent {
    /// A stored event.
    pub fn new(sender_id: impl Into<String>, timestamp: f64, data: impl Into<Vec<u8>>) -> StoredEvent {
        StoredEvent { sender_id: sender_id.into(), timestamp, data: data.into(), position: None }
    }
}

impl fmt::Debug for StoredEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoredEvent")
            .field("sender_id", &self.sender_id)
            .field("timestamp", &self.timestamp)
            .field("bytes", &self.data.len())
            .finish()
    }
}

/// The events of an export, page by page.
#[async_trait]
pub trait StoredEvents: Send {
    /// The next events in export order; `Ok(None)` once all were returned. Each call is bounded
    /// by the store's timeouts.
    async fn next_page(&mut self) -> Result<Option<Vec<StoredEvent>>, Error>;
}

/// A tracker store to export from.
#[async_trait]
pub trait TrackerStore: Send + Sync + fmt::Debug {
    /// The type name (`"sql"`).
    fn name(&self) -> &'static str;

    /// Where the conversations are, for people; never includes secrets.
    fn describe(&self) -> String;

    /// The conversation ids in the store, sorted.
    async fn conversation_ids(&self) -> Result<Vec<String>, Error>;

    /// Streams the events `query` selects, in export order (see the module docs).
    async fn read(&self, query: &ExportQuery) -> Result<Box<dyn StoredEvents>, Error>;
}

/// Builds a [`TrackerStore`] from the options of a `tracker_store:` section.
pub trait TrackerStoreFactory: Send + Sync {
    /// The type name it answers to (matched case-insensitively).
    fn name(&self) -> &'static str;

    /// Validates `options` (no I/O) and returns the store with any warnings.
    fn configure(&self, options: Options) -> Result<ConfiguredStore, ConfigError>;
}

/// A tracker store and the warnings its configuration produced.
#[derive(Debug)]
#[non_exhaustive]
pub struct ConfiguredStore {
    /// The store.
    pub store: Box<dyn TrackerStore>,
    /// Warnings to show the user.
    pub warnings: Vec<Warning>,
}

impl ConfiguredStore {
    /// A store with warnings.
    pub fn new(store: Box<dyn TrackerStore>, warnings: Vec<Warning>) -> ConfiguredStore {
        ConfiguredStore { store, warnings }
    }
}

/// What Rasa's exporter publishes for a stored event: `data` in Rasa's encoding with `sender_id`
/// set last (a `sender_id` already in `data` keeps its place, as a Python `dict` update does),
/// and the timestamp plus `offset_seconds` when given (an integer timestamp stays an integer,
/// a float one gets the float sum).
pub fn export_event(stored: &StoredEvent, offset_seconds: Option<i64>) -> Result<Event, EventError> {
    let event = Event::from_json(&stored.data)?;
    if offset_seconds.is_none() && event.sender_id().is_none() {
        // Fast path: the encoding ends with `}`; `sender_id` goes just before it.
        let mut line = event.to_json();
        if line.last() == Some(&b'}') {
            line.pop();
            line.extend_from_slice(if line.len() > 1 { b", \"sender_id\": " } else { b"\"sender_id\": " });
            json::write_str(&stored.sender_id, &mut line);
            line.push(b'}');
            return Event::from_json(&line);
        }
    }
    let mut body = event.into_body();
    body.insert("sender_id", Value::String(stored.sender_id.clone()));
    if let Some(offset) = offset_seconds {
        let shifted = match body.get("timestamp") {
            // Python's ints do not overflow: a sum past i64 is written as the exact integer.
            Some(Value::Number(Number::Int(t))) => Some(match t.checked_add(offset) {
                Some(t) => Value::Number(Number::Int(t)),
                None => Value::Number(Number::Big((i128::from(*t) + i128::from(offset)).to_string().into())),
            }),
            Some(v) => v.as_f64().map(|t| Value::Number(Number::Float(t + offset as f64))),
            None => None,
        };
        if let Some(t) = shifted {
            body.insert("timestamp", t);
        }
    }
    Event::from_value(Value::Object(body))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exported(data: &str, sender: &str, offset: Option<i64>) -> String {
        let e = export_event(&StoredEvent::new(sender, 0.0, data.as_bytes()), offset).expect("an event");
        String::from_utf8(e.to_json()).expect("ascii")
    }

    #[test]
    fn sender_id_goes_last_in_rasa_encoding() {
        assert_eq!(
            exported(r#"{"event":"bot","timestamp":1.5,"text":"h\u00e9","data":{}}"#, "ü", None),
            r#"{"event": "bot", "timestamp": 1.5, "text": "h\u00e9", "data": {}, "sender_id": "\u00fc"}"#
        );
        let e = export_event(&StoredEvent::new("a", 0.0, &b"{\"event\": \"restart\", \"timestamp\": 2}"[..]), None)
            .expect("event");
        assert_eq!(e.sender_id(), Some("a"));
        assert_eq!(e.event_type(), "restart");
    }

    #[test]
    fn an_existing_sender_id_keeps_its_place() {
        assert_eq!(
            exported(r#"{"sender_id": "old", "event": "restart", "timestamp": 1.0}"#, "new", None),
            r#"{"sender_id": "new", "event": "restart", "timestamp": 1.0}"#
        );
    }

    #[test]
    fn offsets_add_as_python_does() {
        assert_eq!(
            exported(r#"{"event": "restart", "timestamp": 1528402837.6}"#, "a", Some(-3600)),
            format!(r#"{{"event": "restart", "timestamp": {}, "sender_id": "a"}}"#, 1528402837.6f64 - 3600.0)
        );
        assert_eq!(
            exported(r#"{"event": "restart", "timestamp": 10}"#, "a", Some(5)),
            r#"{"event": "restart", "timestamp": 15, "sender_id": "a"}"#
        );
        assert_eq!(exported(r#"{"event": "restart"}"#, "a", Some(5)), r#"{"event": "restart", "sender_id": "a"}"#);
        assert_eq!(
            exported(r#"{"event": "restart", "timestamp": 9223372036854775807}"#, "a", Some(1)),
            r#"{"event": "restart", "timestamp": 9223372036854775808, "sender_id": "a"}"#
        );
    }

    #[test]
    fn the_time_range_is_half_open() {
        let q = ExportQuery::all().minimum_timestamp(Some(10.0)).maximum_timestamp(Some(20.0));
        assert!(!q.admits_timestamp(9.999));
        assert!(q.admits_timestamp(10.0));
        assert!(q.admits_timestamp(19.999));
        assert!(!q.admits_timestamp(20.0));
        let q = ExportQuery::all().conversation_ids(Some(vec!["b".into(), "a".into(), "b".into()]));
        assert_eq!(q.conversation_ids.as_deref(), Some(&["a".to_owned(), "b".to_owned()][..]));
        assert!(q.admits_conversation("a") && !q.admits_conversation("c"));
        assert!(ExportQuery::all().admits_conversation("anything"));
    }
}
