//! Cross-crate tests live in `tests/`: `endpoints.yml` through the registry to real backends, a
//! third-party backend registered by name, and the real-service harness of docs/contract.md §E.
//!
//! The guide for backend authors is compiled here, so its example backend cannot rot.

#[doc = include_str!("../../docs/writing-a-backend.md")]
pub mod writing_a_backend {}
