//! The process-wide Prometheus recorder behind `/metrics`.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// How often histogram samples are folded into their summaries. Without upkeep the
/// recorder keeps every sample until `/metrics` is scraped (unbounded memory when nobody
/// scrapes).
pub const UPKEEP_INTERVAL_MS: u64 = 5_000;

/// Whether [`prometheus`] has built the recorder in this process.
#[cfg(test)]
pub(crate) fn installed() -> bool {
    HANDLE.get().is_some()
}

/// Installs the Prometheus recorder on first call and returns its handle; later calls
/// (other routers in the same test process) share it.
pub fn prometheus() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            // Another recorder may already be installed (a test binary); the handle still
            // renders what this recorder sees, so ignore the error.
            let _ = metrics::set_global_recorder(recorder);
            let upkeep = handle.clone();
            let spawned =
                std::thread::Builder::new().name("metrics-upkeep".into()).spawn(move || {
                    loop {
                        std::thread::sleep(std::time::Duration::from_millis(UPKEEP_INTERVAL_MS));
                        upkeep.run_upkeep();
                    }
                });
            if let Err(err) = spawned {
                tracing::warn!(error = %err, "cannot start metrics upkeep");
            }
            handle
        })
        .clone()
}
