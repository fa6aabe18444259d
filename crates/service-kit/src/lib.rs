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

/// Allocations above this many bytes get their own mapping, returned to the system when
/// freed. glibc's default raises the threshold after the first such free, and the heap then
/// keeps the pages of every large transient buffer (snapshots, a counter epoch's genesis):
/// crdt-sync's growth bench measured 153 MB RSS after 1,000,000 increments with the default
/// and 23 MB at 300,000 with a fixed threshold; arm-controller at three times the case-study
/// event rate on a log of 1,000,000 events grew to 78 MB (docs/BENCHMARKS.md).
pub const MMAP_THRESHOLD_BYTES: usize = 128 * 1024;

/// Fixes glibc's mmap and trim thresholds ([`MMAP_THRESHOLD_BYTES`]); a no-op elsewhere.
/// [`run_main`] calls it before any thread starts.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[allow(unsafe_code)]
    // SAFETY: mallopt only sets allocator parameters; called before the runtime's threads.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES as i32);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 2 * MMAP_THRESHOLD_BYTES as i32);
    }
}

/// Caps glibc's malloc arenas at `max` (its default is 8 per core: a thread that allocated
/// in an arena of its own keeps that arena's freed pages, so a process whose threads take
/// turns building large transient buffers holds several heaps' worth). A no-op elsewhere.
/// Call it before any thread starts, i.e. before [`run_main`]. counter-service caps them at
/// 2 (docs/BENCHMARKS.md, counter-service: RSS after 1,000,000 increments).
pub fn limit_malloc_arenas(max: usize) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[allow(unsafe_code)]
    // SAFETY: mallopt only sets an allocator parameter; called before any other thread.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, max.clamp(1, i32::MAX as usize) as i32);
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let _ = max;
}

/// Runs a service's async `main` on a multi-threaded runtime and turns its outcome into
/// the process exit code: 0 on a clean shutdown, 1 on a runtime failure (logged).
pub fn run_main<F>(service: &'static str, main: F) -> std::process::ExitCode
where
    F: std::future::Future<Output = anyhow::Result<()>>,
{
    tune_allocator();
    telemetry::init_tracing(service);
    // Installed before any of the service's threads, so that no metric handle is taken
    // from the facade's no-op recorder.
    crate::metrics::registry();
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[test]
    fn the_metrics_recorder_is_built_before_the_service_runs() {
        // One process per test (nextest), so nothing built the recorder before this call.
        let built = Arc::new(AtomicBool::new(false));
        let seen = built.clone();
        super::run_main("test", async move {
            seen.store(crate::metrics::installed(), Ordering::SeqCst);
            Ok(())
        });
        assert!(built.load(Ordering::SeqCst), "the recorder was not built before main ran");
    }
}
