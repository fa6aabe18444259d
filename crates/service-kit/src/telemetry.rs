//! Tracing init: JSON lines by default, human-readable on a terminal, `RUST_LOG` filter.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. Output goes to stderr: JSON unless stderr is a
/// terminal or `LOG_FORMAT=pretty`; `LOG_FORMAT=json` forces JSON. `RUST_LOG` filters
/// (default `info`). Calling it twice is harmless.
pub fn init_tracing(service: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let pretty = match std::env::var("LOG_FORMAT").as_deref() {
        Ok("json") => false,
        Ok("pretty") => true,
        _ => std::io::stderr().is_terminal(),
    };
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let result =
        if pretty { builder.try_init() } else { builder.json().flatten_event(true).try_init() };
    if result.is_ok() {
        tracing::info!(service, version = env!("CARGO_PKG_VERSION"), "starting");
    }
}
