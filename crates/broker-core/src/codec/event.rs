//! Tracker events: the JSON body Rasa publishes, with typed access.
//!
//! An [`Event`] *is* its ordered JSON object, so whatever we read is written back byte for byte:
//! unknown event types (Rasa Pro's `flow_started`, ...) and unknown fields pass through untouched.
//! Typed access goes through [`Event::typed`] (reading) and [`TypedEvent`] + [`Event::new`]
//! (building, in Rasa's key order). [`EventWriter`] writes an event's bytes straight from another
//! representation (a Python dict), without a tree.

use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::json::{self, Map, Number, Text, Value};

pub use super::writer::{ArrayWriter, EventWriter, ObjectWriter, ValueWriter};

/// A stable identity for one published event, carried by backends that have a place for it
/// (AMQP `message_id`, a Kafka header) so consumers can drop the duplicates that at-least-once
/// delivery may produce. Written as 32 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EventId(u128);

impl EventId {
    /// A new id, unique within this process and, with overwhelming probability, across processes:
    /// 64 random bits chosen once per process, then a counter.
    pub fn generate() -> EventId {
        static PREFIX: OnceLock<u64> = OnceLock::new();
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let prefix = *PREFIX.get_or_init(|| {
            // RandomState is seeded from the OS's random source; hashing the time and pid into it
            // gives a per-process random value without another dependency.
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u128(SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0));
            h.write_u32(std::process::id());
            h.finish()
        });
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        EventId(((prefix as u128) << 64) | n as u128)
    }

    /// The id from its 128-bit value.
    pub fn from_u128(v: u128) -> EventId {
        EventId(v)
    }

    /// The 128-bit value.
    pub fn as_u128(self) -> u128 {
        self.0
    }

    /// Parses 32 hex digits (the form [`fmt::Display`] writes).
    pub fn parse_hex(s: &str) -> Option<EventId> {
        if s.len() != 32 {
            return None;
        }
        u128::from_str_radix(s, 16).ok().map(EventId)
    }
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl fmt::Debug for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EventId({self})")
    }
}

/// One tracker event: `{"sender_id": ..., "event": ..., "timestamp": ..., ...}`.
///
/// Invariant: the body is a JSON object with a string `event` key.
///
/// An event read from bytes keeps its Rasa encoding and builds the tree only when asked
/// ([`Event::body`], [`Event::typed`]), so relaying JSON lines costs one pass; an event built from
/// a tree is encoded when published.
#[derive(Clone)]
pub struct Event {
    id: EventId,
    repr: Repr,
}

#[derive(Clone)]
enum Repr {
    Tree(Map),
    /// `event_type` and `sender_id` point into `json` when they are plain ASCII.
    Encoded {
        json: Vec<u8>,
        event_type: Text,
        sender_id: Option<Text>,
        tree: OnceLock<Map>,
    },
}

impl PartialEq for Event {
    /// Same id and same encoding.
    fn eq(&self, other: &Event) -> bool {
        self.id == other.id && self.to_json() == other.to_json()
    }
}

impl fmt::Debug for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Event")
            .field("id", &self.id)
            .field("sender_id", &self.sender_id())
            .field("event", &self.event_type())
            .finish_non_exhaustive()
    }
}

/// Why a JSON text or value is not an event.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum EventError {
    /// The text is not JSON.
    #[error("not valid JSON: {0}")]
    Json(#[from] json::ParseError),
    /// The JSON is not an object.
    #[error("an event must be a JSON object")]
    NotAnObject,
    /// The object has no string `event` key.
    #[error("an event needs a string \"event\" key (its type, e.g. \"user\")")]
    MissingType,
    /// A known event type whose field has the wrong JSON type.
    #[error("event type {event:?}: field {field:?} {problem}")]
    Field {
        /// The event type.
        event: String,
        /// The field.
        field: &'static str,
        /// What is wrong with it.
        problem: &'static str,
    },
}

impl Event {
    /// Parses one JSON line (without its newline) into an event.
    pub fn from_json(bytes: &[u8]) -> Result<Event, EventError> {
        let mut json = Vec::with_capacity(bytes.len() + bytes.len() / 8);
        let top = json::transcode(bytes, &mut json).map_err(|e| {
            if e.message == "an event must be a JSON object" && json::parse(bytes).is_ok() {
                EventError::NotAnObject
            } else {
                EventError::Json(e)
            }
        })?;
        match top.event_type {
            // Legacy types are rewritten, and duplicates resolved, on the tree.
            _ if top.needs_tree => Event::from_value(json::parse(bytes)?),
            Some(ref t) if matches!(t.get(&json), "form" | "form_validation") => Event::from_value(json::parse(bytes)?),
            None => Err(EventError::MissingType),
            Some(event_type) => Ok(Event {
                id: EventId::generate(),
                repr: Repr::Encoded { json, event_type, sender_id: top.sender_id, tree: OnceLock::new() },
            }),
        }
    }

    /// An event from bytes that are already Rasa's encoding of an object whose `event` is
    /// `event_type` ([`EventWriter`] makes them).
    pub(crate) fn encoded(json: Vec<u8>, event_type: String, sender_id: Option<String>) -> Event {
        let (event_type, sender_id) = (Text::Owned(event_type), sender_id.map(Text::Owned));
        Event { id: EventId::generate(), repr: Repr::Encoded { json, event_type, sender_id, tree: OnceLock::new() } }
    }

    /// Makes an event from a parsed JSON value. Legacy Rasa 2 types are converted as Rasa 3 reads
    /// them: `form` becomes `active_loop`; `form_validation` with `validate` becomes
    /// `loop_interrupted` with `is_interrupted = not validate`.
    pub fn from_value(value: Value) -> Result<Event, EventError> {
        let Value::Object(mut body) = value else {
            return Err(EventError::NotAnObject);
        };
        match body.get("event").and_then(Value::as_str) {
            None => return Err(EventError::MissingType),
            Some("form") => {
                body.insert("event", "active_loop".into());
            }
            Some("form_validation") => {
                body.insert("event", "loop_interrupted".into());
                // Python: `not validate`; a missing or null `validate` is falsy.
                let validate = body.get("validate").is_some_and(python_truthy);
                if body.contains_key("validate") {
                    body.rename("validate", "is_interrupted");
                    body.insert("is_interrupted", Value::Bool(!validate));
                } else {
                    body.insert("is_interrupted", Value::Bool(!validate));
                }
            }
            Some(_) => {}
        }
        Ok(Event { id: EventId::generate(), repr: Repr::Tree(body) })
    }

    /// Builds an event of a known type in Rasa's key order: `sender_id`, `event`, `timestamp`,
    /// `metadata` (only when non-empty; `user` and `bot` always carry it, last), then the fields.
    pub fn new(sender_id: impl Into<String>, timestamp: f64, metadata: Map, typed: TypedEvent) -> Event {
        let mut body = Map::with_capacity(8);
        body.push_unique("sender_id", Value::String(sender_id.into()));
        body.push_unique("event", Value::String(typed.type_name().to_owned()));
        body.push_unique("timestamp", Value::Number(Number::Float(timestamp)));
        let metadata_last = matches!(typed, TypedEvent::User(_) | TypedEvent::Bot(_));
        if !metadata_last && !metadata.is_empty() {
            body.push_unique("metadata", Value::Object(metadata.clone()));
        }
        typed.write_fields(&mut body);
        if metadata_last {
            body.push_unique("metadata", Value::Object(metadata));
        }
        Event { id: EventId::generate(), repr: Repr::Tree(body) }
    }

    /// This event's id.
    pub fn id(&self) -> EventId {
        self.id
    }

    /// The same event with another id (used by backends that read the id back from a header).
    pub fn with_id(mut self, id: EventId) -> Event {
        self.id = id;
        self
    }

    /// The conversation id, when present and a string.
    pub fn sender_id(&self) -> Option<&str> {
        match &self.repr {
            Repr::Tree(body) => body.get("sender_id").and_then(Value::as_str),
            Repr::Encoded { json, sender_id, .. } => sender_id.as_ref().map(|t| t.get(json)),
        }
    }

    /// The type name (`"user"`, `"bot"`, `"flow_started"`, ...).
    pub fn event_type(&self) -> &str {
        match &self.repr {
            Repr::Tree(body) => body.get("event").and_then(Value::as_str).unwrap_or(""),
            Repr::Encoded { json, event_type, .. } => event_type.get(json),
        }
    }

    /// The timestamp in seconds, when present and a number.
    pub fn timestamp(&self) -> Option<f64> {
        self.body().get("timestamp").and_then(Value::as_f64)
    }

    /// The metadata object, when present.
    pub fn metadata(&self) -> Option<&Map> {
        self.body().get("metadata").and_then(Value::as_object)
    }

    /// The whole JSON body (parsed on first use for an event read from bytes).
    pub fn body(&self) -> &Map {
        match &self.repr {
            Repr::Tree(body) => body,
            Repr::Encoded { json, tree, .. } => tree.get_or_init(|| match json::parse(json) {
                Ok(Value::Object(m)) => m,
                // Our own encoding of an object always parses back to an object.
                _ => Map::new(),
            }),
        }
    }

    /// Consumes the event, giving its body.
    pub fn into_body(self) -> Map {
        match self.repr {
            Repr::Tree(body) => body,
            Repr::Encoded { json, mut tree, .. } => tree.take().unwrap_or_else(|| match json::parse(&json) {
                Ok(Value::Object(m)) => m,
                _ => Map::new(),
            }),
        }
    }

    /// Appends the Rasa encoding of the body (no newline) to `out`.
    pub fn write_json(&self, out: &mut Vec<u8>) {
        match &self.repr {
            Repr::Tree(body) => body.write_rasa(out),
            Repr::Encoded { json, .. } => out.extend_from_slice(json),
        }
    }

    /// The length of [`Event::to_json`], without a copy when the event was read from bytes.
    pub fn json_len(&self) -> usize {
        match &self.repr {
            Repr::Tree(_) => self.to_json().len(),
            Repr::Encoded { json, .. } => json.len(),
        }
    }

    /// The Rasa encoding of the body (no newline): the exact bytes every Rasa backend stores.
    pub fn to_json(&self) -> Vec<u8> {
        match &self.repr {
            Repr::Tree(body) => {
                let mut out = Vec::with_capacity(512);
                body.write_rasa(&mut out);
                out
            }
            Repr::Encoded { json, .. } => json.clone(),
        }
    }

    /// Consumes the event, giving its encoding and its `sender_id` (what a backend sends),
    /// without copying when the event was read from bytes.
    pub fn into_parts(self) -> (Vec<u8>, Option<String>) {
        match self.repr {
            Repr::Tree(mut body) => {
                let mut out = Vec::with_capacity(512);
                body.write_rasa(&mut out);
                let sender = match body.remove("sender_id") {
                    Some(Value::String(s)) => Some(s),
                    _ => None,
                };
                (out, sender)
            }
            Repr::Encoded { json, sender_id, .. } => {
                let sender = sender_id.map(|t| t.into_string(&json));
                (json, sender)
            }
        }
    }

    /// Reads the event as a typed value. Unknown types give [`TypedEvent::Other`]; a known type
    /// whose field has the wrong JSON type is an error. Fields the typed form does not know stay
    /// in [`Event::body`].
    pub fn typed(&self) -> Result<TypedEvent, EventError> {
        TypedEvent::read(self.event_type(), self.body())
    }
}

/// Python's truthiness for JSON values, used where Rasa applies `not` to a field.
fn python_truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(Number::Int(i)) => *i != 0,
        Value::Number(Number::Float(f)) => *f != 0.0,
        Value::Number(Number::Big(_)) => true,
        Value::String(s) => !s.is_empty(),
        Value::Utf16(u) => !u.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(m) => !m.is_empty(),
    }
}

/// `user`: a message from the user.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct UserUttered {
    /// The text.
    pub text: Option<String>,
    /// The NLU parse (intent, entities, ...), free-form.
    pub parse_data: Value,
    /// The channel name.
    pub input_channel: Option<String>,
    /// The channel's message id.
    pub message_id: Option<String>,
}

/// `bot`: a message from the bot.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct BotUttered {
    /// The text.
    pub text: Option<String>,
    /// Buttons, attachments, custom payloads, free-form.
    pub data: Value,
}

/// `action`: an action was executed.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ActionExecuted {
    /// The action name.
    pub name: Option<String>,
    /// The policy that predicted it.
    pub policy: Option<String>,
    /// The prediction's confidence.
    pub confidence: Option<f64>,
    /// The text of an end-to-end action.
    pub action_text: Option<String>,
    /// Whether rules hide this turn.
    pub hide_rule_turn: bool,
}

/// `reminder`: a reminder was scheduled.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ReminderScheduled {
    /// The intent to trigger.
    pub intent: Option<String>,
    /// When, ISO 8601.
    pub date_time: Option<String>,
    /// Entities to add, free-form.
    pub entities: Value,
    /// The reminder's name.
    pub name: Option<String>,
    /// Whether a user message cancels it.
    pub kill_on_user_msg: bool,
}

/// Every event type of Rasa 3.6 with its own fields; `Other` for anything else.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum TypedEvent {
    /// `user`.
    User(UserUttered),
    /// `user_featurization`.
    UserFeaturization {
        /// Whether the text (not the intent) is used for featurization.
        use_text_for_featurization: Option<bool>,
    },
    /// `entities`.
    Entities {
        /// The entities, free-form.
        entities: Value,
    },
    /// `bot`.
    Bot(BotUttered),
    /// `slot`.
    Slot {
        /// The slot.
        name: Option<String>,
        /// Its value, free-form.
        value: Value,
    },
    /// `restart`.
    Restart,
    /// `rewind`.
    Rewind,
    /// `reset_slots`.
    ResetSlots,
    /// `reminder`.
    Reminder(ReminderScheduled),
    /// `cancel_reminder`.
    CancelReminder,
    /// `undo`.
    Undo,
    /// `export`.
    Export,
    /// `followup`.
    Followup {
        /// The action to run.
        name: Option<String>,
    },
    /// `pause`.
    Pause,
    /// `resume`.
    Resume,
    /// `action`.
    Action(ActionExecuted),
    /// `agent`.
    Agent {
        /// The text.
        text: Option<String>,
        /// Free-form data.
        data: Value,
    },
    /// `active_loop` (legacy `form` reads as this).
    ActiveLoop {
        /// The loop, or `None` to deactivate.
        name: Option<String>,
    },
    /// `loop_interrupted` (legacy `form_validation` reads as this).
    LoopInterrupted {
        /// Whether the loop was interrupted.
        is_interrupted: bool,
    },
    /// `action_execution_rejected`.
    ActionExecutionRejected {
        /// The action.
        name: Option<String>,
        /// The policy.
        policy: Option<String>,
        /// The confidence.
        confidence: Option<f64>,
    },
    /// `session_started`.
    SessionStarted,
    /// Any other type (Rasa Pro's, a custom one): the body carries everything.
    Other(String),
}

fn opt_str(event: &str, body: &Map, field: &'static str) -> Result<Option<String>, EventError> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Utf16(u)) => Ok(Some(String::from_utf16_lossy(u))),
        Some(_) => Err(EventError::Field { event: event.to_owned(), field, problem: "must be a string or null" }),
    }
}

fn opt_f64(event: &str, body: &Map, field: &'static str) -> Result<Option<f64>, EventError> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_f64().map(Some).ok_or_else(|| EventError::Field {
            event: event.to_owned(),
            field,
            problem: "must be a number or null",
        }),
    }
}

fn opt_bool(event: &str, body: &Map, field: &'static str) -> Result<Option<bool>, EventError> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(EventError::Field { event: event.to_owned(), field, problem: "must be a boolean" }),
    }
}

fn any(body: &Map, field: &str) -> Value {
    body.get(field).cloned().unwrap_or(Value::Null)
}

fn s(v: &Option<String>) -> Value {
    v.clone().into()
}

fn f(v: Option<f64>) -> Value {
    v.into()
}

impl TypedEvent {
    /// The type name Rasa writes in `event`.
    pub fn type_name(&self) -> &str {
        match self {
            TypedEvent::User(_) => "user",
            TypedEvent::UserFeaturization { .. } => "user_featurization",
            TypedEvent::Entities { .. } => "entities",
            TypedEvent::Bot(_) => "bot",
            TypedEvent::Slot { .. } => "slot",
            TypedEvent::Restart => "restart",
            TypedEvent::Rewind => "rewind",
            TypedEvent::ResetSlots => "reset_slots",
            TypedEvent::Reminder(_) => "reminder",
            TypedEvent::CancelReminder => "cancel_reminder",
            TypedEvent::Undo => "undo",
            TypedEvent::Export => "export",
            TypedEvent::Followup { .. } => "followup",
            TypedEvent::Pause => "pause",
            TypedEvent::Resume => "resume",
            TypedEvent::Action(_) => "action",
            TypedEvent::Agent { .. } => "agent",
            TypedEvent::ActiveLoop { .. } => "active_loop",
            TypedEvent::LoopInterrupted { .. } => "loop_interrupted",
            TypedEvent::ActionExecutionRejected { .. } => "action_execution_rejected",
            TypedEvent::SessionStarted => "session_started",
            TypedEvent::Other(name) => name,
        }
    }

    fn read(event: &str, b: &Map) -> Result<TypedEvent, EventError> {
        Ok(match event {
            "user" => TypedEvent::User(UserUttered {
                text: opt_str(event, b, "text")?,
                parse_data: any(b, "parse_data"),
                input_channel: opt_str(event, b, "input_channel")?,
                message_id: opt_str(event, b, "message_id")?,
            }),
            "user_featurization" => TypedEvent::UserFeaturization {
                use_text_for_featurization: opt_bool(event, b, "use_text_for_featurization")?,
            },
            "entities" => TypedEvent::Entities { entities: any(b, "entities") },
            "bot" => TypedEvent::Bot(BotUttered { text: opt_str(event, b, "text")?, data: any(b, "data") }),
            "slot" => TypedEvent::Slot { name: opt_str(event, b, "name")?, value: any(b, "value") },
            "restart" => TypedEvent::Restart,
            "rewind" => TypedEvent::Rewind,
            "reset_slots" => TypedEvent::ResetSlots,
            "reminder" => TypedEvent::Reminder(ReminderScheduled {
                intent: opt_str(event, b, "intent")?,
                date_time: opt_str(event, b, "date_time")?,
                entities: any(b, "entities"),
                name: opt_str(event, b, "name")?,
                kill_on_user_msg: opt_bool(event, b, "kill_on_user_msg")?.unwrap_or(true),
            }),
            "cancel_reminder" => TypedEvent::CancelReminder,
            "undo" => TypedEvent::Undo,
            "export" => TypedEvent::Export,
            "followup" => TypedEvent::Followup { name: opt_str(event, b, "name")? },
            "pause" => TypedEvent::Pause,
            "resume" => TypedEvent::Resume,
            "action" => TypedEvent::Action(ActionExecuted {
                name: opt_str(event, b, "name")?,
                policy: opt_str(event, b, "policy")?,
                confidence: opt_f64(event, b, "confidence")?,
                action_text: opt_str(event, b, "action_text")?,
                hide_rule_turn: opt_bool(event, b, "hide_rule_turn")?.unwrap_or(false),
            }),
            "agent" => TypedEvent::Agent { text: opt_str(event, b, "text")?, data: any(b, "data") },
            "active_loop" => TypedEvent::ActiveLoop { name: opt_str(event, b, "name")? },
            "loop_interrupted" => {
                TypedEvent::LoopInterrupted { is_interrupted: opt_bool(event, b, "is_interrupted")?.unwrap_or(false) }
            }
            "action_execution_rejected" => TypedEvent::ActionExecutionRejected {
                name: opt_str(event, b, "name")?,
                policy: opt_str(event, b, "policy")?,
                confidence: opt_f64(event, b, "confidence")?,
            },
            "session_started" => TypedEvent::SessionStarted,
            other => TypedEvent::Other(other.to_owned()),
        })
    }

    fn write_fields(&self, b: &mut Map) {
        match self {
            TypedEvent::User(u) => {
                b.push_unique("text", s(&u.text));
                b.push_unique("parse_data", u.parse_data.clone());
                b.push_unique("input_channel", s(&u.input_channel));
                b.push_unique("message_id", s(&u.message_id));
            }
            TypedEvent::UserFeaturization { use_text_for_featurization } => {
                b.push_unique("use_text_for_featurization", (*use_text_for_featurization).into());
            }
            TypedEvent::Entities { entities } => b.push_unique("entities", entities.clone()),
            TypedEvent::Bot(m) => {
                b.push_unique("text", s(&m.text));
                b.push_unique("data", m.data.clone());
            }
            TypedEvent::Slot { name, value } => {
                b.push_unique("name", s(name));
                b.push_unique("value", value.clone());
            }
            TypedEvent::Reminder(r) => {
                b.push_unique("intent", s(&r.intent));
                b.push_unique("date_time", s(&r.date_time));
                b.push_unique("entities", r.entities.clone());
                b.push_unique("name", s(&r.name));
                b.push_unique("kill_on_user_msg", r.kill_on_user_msg.into());
            }
            TypedEvent::Followup { name } => b.push_unique("name", s(name)),
            TypedEvent::Action(a) => {
                b.push_unique("name", s(&a.name));
                b.push_unique("policy", s(&a.policy));
                b.push_unique("confidence", f(a.confidence));
                b.push_unique("action_text", s(&a.action_text));
                b.push_unique("hide_rule_turn", a.hide_rule_turn.into());
            }
            TypedEvent::Agent { text, data } => {
                b.push_unique("text", s(text));
                b.push_unique("data", data.clone());
            }
            TypedEvent::ActiveLoop { name } => b.push_unique("name", s(name)),
            TypedEvent::LoopInterrupted { is_interrupted } => b.push_unique("is_interrupted", (*is_interrupted).into()),
            TypedEvent::ActionExecutionRejected { name, policy, confidence } => {
                b.push_unique("name", s(name));
                b.push_unique("policy", s(policy));
                b.push_unique("confidence", f(*confidence));
            }
            TypedEvent::Restart
            | TypedEvent::Rewind
            | TypedEvent::ResetSlots
            | TypedEvent::CancelReminder
            | TypedEvent::Undo
            | TypedEvent::Export
            | TypedEvent::Pause
            | TypedEvent::Resume
            | TypedEvent::SessionStarted
            | TypedEvent::Other(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_in_rasa_key_order() {
        let e = Event::new(
            "default",
            1528402837.6,
            Map::new(),
            TypedEvent::Bot(BotUttered { text: Some("hi".into()), data: Value::Object(Map::new()) }),
        );
        assert_eq!(
            String::from_utf8(e.to_json()).unwrap(),
            r#"{"sender_id": "default", "event": "bot", "timestamp": 1528402837.6, "text": "hi", "data": {}, "metadata": {}}"#
        );
        let mut md = Map::new();
        md.insert("k", 1i64.into());
        let e = Event::new("s", 1.0, md, TypedEvent::Slot { name: Some("a".into()), value: Value::Null });
        assert_eq!(
            String::from_utf8(e.to_json()).unwrap(),
            r#"{"sender_id": "s", "event": "slot", "timestamp": 1.0, "metadata": {"k": 1}, "name": "a", "value": null}"#
        );
    }

    #[test]
    fn legacy_form_events_are_written_as_rasa_3_does() {
        let e = Event::from_json(br#"{"sender_id": "a", "event": "form", "timestamp": 1.0, "name": "f"}"#).unwrap();
        assert_eq!(e.to_json(), br#"{"sender_id": "a", "event": "active_loop", "timestamp": 1.0, "name": "f"}"#);
        let e =
            Event::from_json(br#"{"sender_id": "a", "event": "form_validation", "timestamp": 1.0, "validate": false}"#)
                .unwrap();
        assert_eq!(
            e.to_json(),
            br#"{"sender_id": "a", "event": "loop_interrupted", "timestamp": 1.0, "is_interrupted": true}"#
        );
        assert_eq!(e.typed().unwrap(), TypedEvent::LoopInterrupted { is_interrupted: true });
    }

    #[test]
    fn unknown_types_and_fields_pass_through() {
        let line = br#"{"sender_id": "a", "user_id": "u", "event": "flow_started", "timestamp": 2, "flow_id": "x", "extra": [1]}"#;
        let e = Event::from_json(line).unwrap();
        assert_eq!(e.to_json(), line);
        assert_eq!(e.typed().unwrap(), TypedEvent::Other("flow_started".into()));
    }

    #[test]
    fn rejects_non_events() {
        assert_eq!(Event::from_json(b"[1]"), Err(EventError::NotAnObject));
        assert_eq!(Event::from_json(br#"{"sender_id": "a"}"#), Err(EventError::MissingType));
        assert!(matches!(
            Event::from_json(br#"{"event": "slot", "name": 3}"#).unwrap().typed(),
            Err(EventError::Field { .. })
        ));
    }

    #[test]
    fn ids_are_unique_and_hex() {
        let a = EventId::generate();
        let b = EventId::generate();
        assert_ne!(a, b);
        assert_eq!(EventId::parse_hex(&a.to_string()), Some(a));
    }
}
