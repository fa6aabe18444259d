//! `counter-service` entry point: parse flags (exit 64 when invalid), then run until SIGTERM.

use service_kit::shutdown::Shutdown;

fn main() -> std::process::ExitCode {
    // `run_main` fixes glibc's mmap threshold (service_kit::tune_allocator) before any
    // thread starts: an epoch's large transient buffers go back to the system.
    let config: counter_service::Config = service_kit::config::parse_or_exit();
    config.validate_or_exit();
    service_kit::limit_malloc_arenas(counter_service::MALLOC_ARENAS_MAX);
    service_kit::run_main("counter-service", async move {
        counter_service::run(config, Shutdown::on_signal()).await
    })
}
