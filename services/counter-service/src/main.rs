//! `counter-service` entry point: parse flags (exit 64 when invalid), then run until SIGTERM.

use service_kit::shutdown::Shutdown;

/// Allocations above this many bytes get their own mapping, returned to the system when
/// freed. glibc's default raises the threshold after the first such free, and the heap then
/// keeps the pages of every large transient buffer (an epoch's genesis, sealed tombstones):
/// crdt-sync's growth bench measured 153 MB RSS after 1,000,000 increments with the
/// default and 23 MB at 300,000 (rising 3 MB per 100,000) with a fixed threshold.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD_BYTES: i32 = 128 * 1024;

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn tune_allocator() {
    // SAFETY: mallopt only sets allocator parameters; it runs before any other thread.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 2 * MMAP_THRESHOLD_BYTES);
    }
}

fn main() -> std::process::ExitCode {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    tune_allocator();
    let config: counter_service::Config = service_kit::config::parse_or_exit();
    config.validate_or_exit();
    service_kit::run_main("counter-service", async move {
        counter_service::run(config, Shutdown::on_signal()).await
    })
}
