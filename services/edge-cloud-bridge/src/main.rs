//! `edge-cloud-bridge` entry point: parse flags (exit 64 when invalid), then run until SIGTERM.

use service_kit::shutdown::Shutdown;

fn main() -> std::process::ExitCode {
    let config: edge_cloud_bridge::Config = service_kit::config::parse_or_exit();
    config.validate_or_exit();
    service_kit::run_main("edge-cloud-bridge", async move {
        edge_cloud_bridge::run(config, Shutdown::on_signal()).await
    })
}
