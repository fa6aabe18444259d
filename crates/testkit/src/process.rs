//! Our service binaries as real child processes: start with flags and env, wait for
//! `/readyz`, SIGKILL, SIGTERM, and restart on the same data dir and ports.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::wait::wait_until;

/// How long a service may take to become ready.
pub const READY_TIMEOUT_MS: u64 = 30_000;

/// Path of a workspace binary built next to the running test (`target/<profile>/<name>`).
/// Integration tests of the binary's own package should prefer `env!("CARGO_BIN_EXE_<name>")`.
pub fn binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .ok_or_else(|| anyhow::anyhow!("cannot find the target dir from {}", exe.display()))?;
    let path = profile_dir.join(name);
    anyhow::ensure!(
        path.is_file(),
        "{} not built: run `cargo build --workspace --bins` (scripts/test.sh does)",
        path.display()
    );
    Ok(path)
}

/// What to start: a binary with its flags and environment.
#[derive(Debug, Clone)]
pub struct ServiceSpec {
    /// The executable.
    pub binary: PathBuf,
    /// Flags besides `--http-addr`, `--data-dir`, `--nats-url` (added by testkit).
    pub args: Vec<String>,
    /// Extra environment.
    pub env: Vec<(String, String)>,
    /// NATS URL passed as `--nats-url`.
    pub nats_url: String,
}

impl ServiceSpec {
    /// A spec for `binary` talking to `nats_url`.
    pub fn new(binary: impl Into<PathBuf>, nats_url: impl Into<String>) -> Self {
        Self { binary: binary.into(), args: Vec::new(), env: Vec::new(), nats_url: nats_url.into() }
    }

    /// Adds flags.
    pub fn args<I: IntoIterator<Item = S>, S: Into<String>>(mut self, args: I) -> Self {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Adds an environment variable.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }
}

/// A running service owned by a test; killed on drop. Its data dir lives as long as it.
#[derive(Debug)]
pub struct ServiceProcess {
    spec: ServiceSpec,
    http_port: u16,
    data_dir: tempfile::TempDir,
    child: Option<Child>,
    http: reqwest::Client,
}

impl ServiceProcess {
    /// Starts the service on a free HTTP port and a fresh data dir (does not wait).
    pub fn start(spec: ServiceSpec) -> anyhow::Result<Self> {
        let data_dir = tempfile::Builder::new().prefix("keel-svc-").tempdir()?;
        let mut svc = Self {
            spec,
            http_port: crate::free_port(),
            data_dir,
            child: None,
            http: reqwest::Client::builder().timeout(Duration::from_secs(30)).build()?,
        };
        svc.spawn()?;
        Ok(svc)
    }

    /// `http://127.0.0.1:<port>`
    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    /// `base_url() + path`
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url())
    }

    /// The service's data dir (kept across restarts).
    pub fn data_dir(&self) -> &Path {
        self.data_dir.path()
    }

    /// The log file holding the service's stderr (appended across restarts).
    pub fn log_path(&self) -> PathBuf {
        self.data_dir.path().join("service.log")
    }

    /// The last lines of the service's log, for failure messages.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// An HTTP client for tests.
    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// GET `path`, returning status and JSON body (Null when not JSON).
    pub async fn get_json(&self, path: &str) -> anyhow::Result<(u16, serde_json::Value)> {
        let resp = self.http.get(self.url(path)).send().await?;
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await?;
        Ok((status, serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null)))
    }

    /// Sends `method path` with a JSON body, returning status and JSON body.
    pub async fn send_json(
        &self,
        method: reqwest::Method,
        path: &str,
        body: &serde_json::Value,
    ) -> anyhow::Result<(u16, serde_json::Value)> {
        let resp = self.http.request(method, self.url(path)).json(body).send().await?;
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await?;
        Ok((status, serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null)))
    }

    /// Waits until `/readyz` answers 200; fails with the log tail if it does not in time
    /// or the process exits.
    pub async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let url = self.url("/readyz");
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                anyhow::bail!("service exited with {status} before ready:\n{}", self.log_tail(20));
            }
            if let Ok(resp) = self.http.get(&url).timeout(Duration::from_millis(500)).send().await
                && resp.status().is_success()
            {
                return Ok(());
            }
            if started.elapsed() > Duration::from_millis(READY_TIMEOUT_MS) {
                anyhow::bail!(
                    "service not ready after {READY_TIMEOUT_MS} ms:\n{}",
                    self.log_tail(20)
                );
            }
            tokio::time::sleep(Duration::from_millis(crate::wait::POLL_INTERVAL_MS)).await;
        }
    }

    /// SIGKILLs the process and reaps it.
    pub fn sigkill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends SIGTERM and waits up to `timeout` for the exit status (SIGKILL after that).
    pub async fn sigterm(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let mut child = self.child.take().ok_or_else(|| anyhow::anyhow!("not running"))?;
        kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM)?;
        let status = wait_until("the service to exit after SIGTERM", timeout, || {
            std::future::ready(child.try_wait().ok().flatten())
        })
        .await;
        match status {
            Ok(status) => Ok(status),
            Err(err) => {
                let _ = child.kill();
                let _ = child.wait();
                Err(err)
            }
        }
    }

    /// Starts the process again with the same spec, data dir and port (after a kill).
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.sigkill();
        self.spawn()
    }

    /// Waits for the process to exit by itself and returns its status.
    pub async fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let child = self.child.as_mut().ok_or_else(|| anyhow::anyhow!("not running"))?;
        let status = wait_until("the service to exit", timeout, || {
            std::future::ready(child.try_wait().ok().flatten())
        })
        .await?;
        self.child = None;
        Ok(status)
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let log = File::options().create(true).append(true).open(self.log_path())?;
        let mut cmd = Command::new(&self.spec.binary);
        cmd.arg("--http-addr")
            .arg(format!("127.0.0.1:{}", self.http_port))
            .arg("--data-dir")
            .arg(self.data_dir.path().join("data"))
            .arg("--nats-url")
            .arg(&self.spec.nats_url)
            .args(&self.spec.args)
            .env("LOG_FORMAT", "json")
            .envs(self.spec.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        let child = cmd
            .spawn()
            .map_err(|err| anyhow::anyhow!("cannot start {}: {err}", self.spec.binary.display()))?;
        self.child = Some(child);
        Ok(())
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        self.sigkill();
    }
}

/// Runs `binary args...` to completion (for config-error tests) and returns its status
/// and stderr.
pub fn run_to_exit(binary: &Path, args: &[&str]) -> anyhow::Result<(ExitStatus, String)> {
    let out = Command::new(binary).args(args).stdin(Stdio::null()).output()?;
    Ok((out.status, String::from_utf8_lossy(&out.stderr).into_owned()))
}
