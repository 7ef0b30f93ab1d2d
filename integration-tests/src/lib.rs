//! Cross-crate tests live in `tests/`: `endpoints.yml` through the registry to real backends, a
//! third-party backend registered by name, and (as backends for services land) the real-service
//! harness of contracts §E.
