//! A real `nats-server` with JetStream on a free loopback port and a temp store dir,
//! killed on drop, restartable on the same port and store.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::wait::wait_until_blocking;

/// How long a started server may take to accept connections.
pub const START_TIMEOUT_MS: u64 = 10_000;

/// Hint printed when the binary is missing.
pub const INSTALL_HINT: &str =
    "nats-server not found: run scripts/test.sh (installs it) or `apt-get install nats-server`";

/// A running (or stopped) nats-server owned by a test.
#[derive(Debug)]
pub struct NatsServer {
    binary: PathBuf,
    port: u16,
    store: tempfile::TempDir,
    child: Option<Child>,
}

/// Finds `nats-server` (`NATS_SERVER` env, then PATH, then /usr/bin and /usr/sbin).
pub fn find_binary() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("NATS_SERVER") {
        return Ok(PathBuf::from(path));
    }
    let path_dirs = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path_dirs)
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/sbin")])
        .map(|dir| dir.join("nats-server"))
        .find(|p| p.is_file())
        .ok_or_else(|| anyhow::anyhow!(INSTALL_HINT))
}

impl NatsServer {
    /// Starts a server with JetStream and waits until it accepts connections.
    pub fn start() -> anyhow::Result<Self> {
        let binary = find_binary()?;
        let store = tempfile::Builder::new().prefix("keel-nats-").tempdir()?;
        let mut server = Self { binary, port: crate::free_port(), store, child: None };
        server.spawn()?;
        Ok(server)
    }

    /// `nats://127.0.0.1:<port>`
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The client port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The JetStream store directory.
    pub fn store_dir(&self) -> &Path {
        self.store.path()
    }

    /// True while the process runs.
    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// SIGKILLs the server (no-op when already stopped).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port and store; waits until it accepts connections.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        self.spawn()
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let child = Command::new(&self.binary)
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string(), "-js", "-sd"])
            .arg(self.store.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|err| anyhow::anyhow!("cannot start {}: {err}", self.binary.display()))?;
        self.child = Some(child);
        let port = self.port;
        let started = wait_until_blocking(
            "nats-server to accept connections",
            Duration::from_millis(START_TIMEOUT_MS),
            || {
                TcpStream::connect_timeout(
                    &([127, 0, 0, 1], port).into(),
                    Duration::from_millis(100),
                )
                .ok()
            },
        );
        if let Err(err) = started {
            self.kill();
            return Err(err);
        }
        Ok(())
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}
