//! `safety-quorum` entry point: parse flags (exit 64 when invalid), then run until SIGTERM.

use service_kit::shutdown::Shutdown;

fn main() -> std::process::ExitCode {
    let config: safety_quorum::Config = service_kit::config::parse_or_exit();
    config.validate_or_exit();
    service_kit::run_main("safety-quorum", async move {
        safety_quorum::run(config, Shutdown::on_signal()).await
    })
}
