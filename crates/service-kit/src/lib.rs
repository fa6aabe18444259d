//! What every Keel service shares: the common flags, tracing, `/healthz` `/readyz`
//! `/metrics`, the NATS connection, graceful shutdown, the JSON error type and bearer-token
//! authentication ([`auth`]).
//!
//! A service's `main.rs` parses its config with [`config::parse_or_exit`], calls
//! [`telemetry::init_tracing`], and hands a router built on [`http::base_router`] to
//! [`http::serve`] together with [`shutdown::signal`].

pub mod auth;
pub mod config;
pub mod error;
pub mod http;
pub mod metrics;
pub mod nats;
pub mod readiness;
pub mod shutdown;
pub mod telemetry;

pub use config::CommonArgs;
pub use error::{ApiError, ApiJson};
pub use readiness::{ComponentState, Readiness, Role};

use std::path::Path;

/// Runs a service's async `main` on a multi-threaded runtime and turns its outcome into
/// the process exit code: 0 on a clean shutdown, 1 on a runtime failure (logged).
pub fn run_main<F>(service: &'static str, main: F) -> std::process::ExitCode
where
    F: std::future::Future<Output = anyhow::Result<()>>,
{
    telemetry::init_tracing(service);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("{service}: cannot start the runtime: {err}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(main) {
        Ok(()) => {
            tracing::info!(service, "stopped");
            std::process::ExitCode::SUCCESS
        }
        Err(err) => {
            tracing::error!(service, error = format!("{err:#}"), "failed");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Creates the data dir (and parents) or exits 64 naming it: an unusable data dir is a
/// configuration error, reported before any port is bound.
pub fn ensure_data_dir(dir: &Path) {
    if let Err(err) = std::fs::create_dir_all(dir) {
        config::exit_invalid(&format!("--data-dir {}: {err}", dir.display()));
    }
}
