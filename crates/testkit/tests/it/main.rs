//! testkit's own integration tests: the harness pieces against real processes.

mod docker;
mod nats;
mod proxy;
