//! Rasa's codec: the JSON model that keeps Python's `json.dumps` bytes ([`json`]) and the event
//! types built on it ([`event`]).

pub mod event;
pub mod json;
mod writer;
