//! The flags every service takes (CONTRACT.md "Every service") and the exit-64 rule for
//! invalid configuration.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;

/// Exit code for invalid configuration (BSD `EX_USAGE`), used before any port is bound.
pub const EXIT_CONFIG: i32 = 64;

/// Upper bound on any request body a service accepts unless it sets its own.
pub const BODY_LIMIT_BYTES_DEFAULT: usize = 64 * 1024;
/// Upper bound on the time one HTTP request may take before it is answered 503.
pub const REQUEST_TIMEOUT_MS_DEFAULT: u64 = 10_000;

/// Flags shared by every service; flatten them into the service's own `clap` struct.
#[derive(Debug, Clone, clap::Args)]
pub struct CommonArgs {
    /// NATS server URL.
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222", value_parser = parse_nats_url)]
    pub nats_url: String,

    /// Address the HTTP API listens on.
    #[arg(long, env = "HTTP_ADDR", default_value = "127.0.0.1:8080")]
    pub http_addr: SocketAddr,

    /// Directory for this instance's redb files, logs and snapshots.
    #[arg(long, env = "DATA_DIR", default_value = "./var/data")]
    pub data_dir: PathBuf,

    /// Stable id of this instance.
    #[arg(long, env = "NODE_ID", default_value = "node-1", value_parser = parse_node_id)]
    pub node_id: String,

    /// Largest request body accepted, in bytes.
    #[arg(long, env = "BODY_LIMIT_BYTES", default_value_t = BODY_LIMIT_BYTES_DEFAULT,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=64 * 1024 * 1024))]
    pub body_limit_bytes: usize,

    /// Time limit for one HTTP request, in milliseconds.
    #[arg(long, env = "REQUEST_TIMEOUT_MS", default_value_t = REQUEST_TIMEOUT_MS_DEFAULT,
          value_parser = clap::value_parser!(u64).range(1..=600_000))]
    pub request_timeout_ms: u64,
}

/// Longest node id accepted.
pub const NODE_ID_LEN_MAX: usize = 64;

/// Accepts a comma-separated list of `nats://`, `tls://`, `ws://` or `wss://` URLs with a
/// host and port.
pub fn parse_nats_url(raw: &str) -> Result<String, String> {
    for url in raw.split(',') {
        let rest = ["nats://", "tls://", "ws://", "wss://"]
            .iter()
            .find_map(|scheme| url.trim().strip_prefix(scheme))
            .ok_or_else(|| format!("{url:?} must start with nats://, tls://, ws:// or wss://"))?;
        let host_port = rest.rsplit('@').next().unwrap_or(rest).trim_end_matches('/');
        let (host, port) =
            host_port.rsplit_once(':').ok_or_else(|| format!("{url:?} needs a host and a port"))?;
        if host.is_empty() || port.parse::<u16>().is_err() {
            return Err(format!("{url:?} needs a host and a port"));
        }
    }
    Ok(raw.to_owned())
}

fn parse_node_id(raw: &str) -> Result<String, String> {
    if raw.is_empty() || raw.len() > NODE_ID_LEN_MAX {
        return Err(format!("must be 1..={NODE_ID_LEN_MAX} characters"));
    }
    if !raw.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
        return Err("may only contain ASCII letters, digits, '-' and '_'".to_owned());
    }
    Ok(raw.to_owned())
}

/// Parses the command line; on `--help`/`--version` prints and exits 0, on any invalid
/// flag prints one line naming the problem and exits [`EXIT_CONFIG`].
pub fn parse_or_exit<T: Parser>() -> T {
    parse_from_or_exit(std::env::args_os())
}

/// As [`parse_or_exit`], from the given arguments.
pub fn parse_from_or_exit<T, I, A>(args: I) -> T
where
    T: Parser,
    I: IntoIterator<Item = A>,
    A: Into<std::ffi::OsString> + Clone,
{
    match T::try_parse_from(args) {
        Ok(config) => config,
        Err(err) => match err.kind() {
            clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => {
                let _ = err.print();
                std::process::exit(0)
            }
            _ => exit_invalid(&one_line(&err.to_string())),
        },
    }
}

/// Prints `invalid configuration: <reason>` on one line to stderr and exits 64.
pub fn exit_invalid(reason: &str) -> ! {
    eprintln!("invalid configuration: {}", one_line(reason));
    std::process::exit(EXIT_CONFIG)
}

fn one_line(text: &str) -> String {
    let first = text.lines().map(str::trim).find(|l| !l.is_empty()).unwrap_or("");
    first.trim_start_matches("error: ").to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Parser)]
    struct Cfg {
        #[command(flatten)]
        common: CommonArgs,
    }

    #[test]
    fn defaults_run_on_one_laptop() {
        let cfg = Cfg::try_parse_from(["svc"]).unwrap();
        assert_eq!(cfg.common.nats_url, "nats://127.0.0.1:4222");
        assert_eq!(cfg.common.http_addr.port(), 8080);
        assert_eq!(cfg.common.body_limit_bytes, BODY_LIMIT_BYTES_DEFAULT);
    }

    #[test]
    fn bad_values_are_refused_with_a_reason() {
        let err = Cfg::try_parse_from(["svc", "--http-addr", "nowhere"]).unwrap_err();
        assert!(one_line(&err.to_string()).contains("--http-addr"), "{err}");
        assert!(Cfg::try_parse_from(["svc", "--node-id", "a b"]).is_err());
        assert!(Cfg::try_parse_from(["svc", "--node-id", ""]).is_err());
        assert!(Cfg::try_parse_from(["svc", "--request-timeout-ms", "0"]).is_err());
        assert!(Cfg::try_parse_from(["svc", "--nats-url", "http://x:1"]).is_err());
        assert!(Cfg::try_parse_from(["svc", "--nats-url", "nats://x"]).is_err());
        assert!(Cfg::try_parse_from(["svc", "--nats-url", "nats://a:1,tls://u:p@b:2"]).is_ok());
    }

    #[test]
    fn one_line_keeps_the_first_meaningful_line() {
        assert_eq!(one_line("error: bad thing\n\nFor more information"), "bad thing");
    }
}
