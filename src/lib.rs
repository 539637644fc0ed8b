//! The workspace's root package. It publishes nothing; it exists so that cargo builds and runs
//! the end-to-end tests in `tests/` and the examples in `examples/`, which use the published
//! crates (`watchkeeper`, `watchkeeper-testkit`) exactly as a service author would.
