//! The harness every integration test uses: real `nats-server` processes, real service
//! binaries (started, waited on, SIGKILLed, restarted on the same data dir), and a
//! loopback TCP proxy that cuts, restores and delays one link.
//!
//! Missing engines: in CI (`CI=true`) a missing `nats-server` or Docker engine is a test
//! failure; elsewhere [`require`] prints why the test is skipped and returns `None`.

pub mod conformance;
pub mod nats;
pub mod ports;
pub mod process;
pub mod proxy;
pub mod wait;

pub use nats::NatsServer;
pub use ports::free_port;
pub use process::{ServiceProcess, ServiceSpec};
pub use proxy::Proxy;
pub use wait::wait_until;

/// True when running in CI (`CI=true`), where every missing prerequisite is a failure.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Unwraps a prerequisite: `Ok` passes through; `Err` panics in CI and otherwise prints
/// `skipped: <test>: <reason>` to stderr and returns `None`.
pub fn require<T>(test: &str, prerequisite: anyhow::Result<T>) -> Option<T> {
    match prerequisite {
        Ok(value) => Some(value),
        Err(err) if in_ci() => panic!("{test}: prerequisite missing in CI: {err:#}"),
        Err(err) => {
            eprintln!("skipped: {test}: {err:#}");
            None
        }
    }
}
