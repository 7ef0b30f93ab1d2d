//! The Kafka-protocol broker of a test's own: `broker_testkit::tansu`.
#![allow(unused_imports)]

pub use broker_testkit::tansu::{Tansu, free_port};
