//! What every Keel service binary must do (CONTRACT.md "Every service"), as one check
//! each service's integration tests run against its real binary.

use std::time::Duration;

use crate::{NatsServer, ServiceProcess, ServiceSpec, wait_until};

/// How long a service may take to exit after SIGTERM.
pub const SIGTERM_EXIT_TIMEOUT_MS: u64 = 5_000;
/// How long a service may take to notice NATS went away or came back.
pub const NATS_STATE_TIMEOUT_MS: u64 = 15_000;

async fn nats_state(svc: &ServiceProcess) -> Option<(u16, String)> {
    let (status, body) = svc.get_json("/readyz").await.ok()?;
    Some((status, body["components"]["nats"].as_str()?.to_owned()))
}

/// Starts `binary` (with `args`) against a real nats-server and checks, in order: it
/// becomes ready; `/healthz` is 200; `/metrics` is Prometheus text; `/readyz` lists
/// `nats: ok`; when nats-server is killed `/readyz` shows `nats: disconnected` while the
/// service stays ready and answers; after nats-server restarts on the same port the
/// component is `ok` again; SIGTERM exits 0 within [`SIGTERM_EXIT_TIMEOUT_MS`].
pub async fn service_lifecycle(binary: &str, args: &[&str]) -> anyhow::Result<()> {
    let Some(mut nats) = crate::require("service_lifecycle", NatsServer::start()) else {
        return Ok(());
    };
    let spec = ServiceSpec::new(binary, nats.url()).args(args.iter().copied());
    let mut svc = ServiceProcess::start(spec)?;
    svc.wait_ready().await?;

    let (status, body) = svc.get_json("/healthz").await?;
    anyhow::ensure!(status == 200, "/healthz answered {status} {body}");
    let metrics = svc.http().get(svc.url("/metrics")).send().await?;
    anyhow::ensure!(metrics.status() == 200, "/metrics answered {}", metrics.status());
    let (status, body) = svc.get_json("/no/such/route").await?;
    anyhow::ensure!(
        status == 404 && body["error"] == "not_found",
        "unknown route: {status} {body}"
    );

    // A body over the limit is refused by its declared length, at once, with a JSON error:
    // only the headers are sent (a client racing a body into a closing socket could see a
    // reset instead of the answer, which is not what this checks).
    let (status, body) = declared_oversize(svc.base_url().trim_start_matches("http://"))?;
    anyhow::ensure!(
        status == 413 && body.contains("body_too_large"),
        "oversized body: {status} {body}"
    );

    let timeout = Duration::from_millis(NATS_STATE_TIMEOUT_MS);
    wait_until("nats: ok", timeout, || async {
        nats_state(&svc).await.filter(|(s, n)| *s == 200 && n == "ok")
    })
    .await?;

    nats.kill();
    wait_until("nats: disconnected while still ready", timeout, || async {
        nats_state(&svc).await.filter(|(s, n)| *s == 200 && n == "disconnected")
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", svc.log_tail(20)))?;
    let (status, _) = svc.get_json("/healthz").await?;
    anyhow::ensure!(status == 200, "service stopped answering without NATS");

    nats.restart()?;
    wait_until("nats: ok after nats-server restarted", timeout, || async {
        nats_state(&svc).await.filter(|(s, n)| *s == 200 && n == "ok")
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", svc.log_tail(20)))?;

    let status = svc.sigterm(Duration::from_millis(SIGTERM_EXIT_TIMEOUT_MS)).await?;
    anyhow::ensure!(status.success(), "SIGTERM exit status {status}\n{}", svc.log_tail(20));
    Ok(())
}

/// Sends only the headers of a POST declaring a 10 MB body and reads the answer.
fn declared_oversize(addr: &str) -> anyhow::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect(addr)?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        conn,
        "POST /readyz HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: 10485760\r\n\r\n"
    )?;
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match conn.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
            Err(err) if answer.is_empty() => return Err(err.into()),
            Err(_) => break,
        }
        if answer.windows(4).any(|w| w == b"\r\n\r\n") && answer.ends_with(b"}") {
            break;
        }
    }
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    Ok((status, text))
}

/// Runs `binary` with an invalid flag value and checks it exits 64 with a one-line reason
/// on stderr that names the flag.
pub fn invalid_flag_exits_64(binary: &str, args: &[&str], names: &str) -> anyhow::Result<()> {
    let (status, stderr) = crate::process::run_to_exit(binary.as_ref(), args)?;
    anyhow::ensure!(status.code() == Some(64), "exit {status}, stderr: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    anyhow::ensure!(lines.len() == 1, "expected one line of reason, got: {stderr}");
    anyhow::ensure!(lines[0].contains(names), "reason {:?} does not name {names:?}", lines[0]);
    Ok(())
}
