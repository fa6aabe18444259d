//! quorum-bench: safety-quorum measured on loopback beside its floors and beside etcd.
//!
//! In one run: the floors R (TCP round trip between two loopback sockets) and F (a 4 KiB
//! write + fdatasync in the temp dir the members use; F2, two of them in parallel, is what a
//! majority of members sharing that one disk must pay per commit), H (an HTTP round trip to `/healthz`);
//! engage commit latency (one client, then 64 concurrent), failover after SIGKILL of the
//! leader (time until the next engage commits on a survivor), trip-to-all-arms-stopped with
//! the real arm-controller, RSS after many committed entries; then the same put latency and
//! failover for a 3-member etcd (Debian's `etcd-server`) with comparable election settings.
//!
//! Build and run in release (`scripts/bench-safety.sh` does both):
//! `cargo build --release -p safety-quorum -p arm-controller --bins --examples &&
//!  target/release/examples/quorum-bench --json var/bench-safety.json`

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};
use testkit::{NatsServer, ServiceProcess, ServiceSpec, wait_until};

/// Bound on any wait for a cluster to settle.
const WAIT: Duration = Duration::from_secs(30);
/// Raft settings shared by both systems: 10 ms ticks, heartbeat 2 ticks, election 10 ticks.
const TICK_MS: u64 = 10;
const ELECTION_TICKS: u64 = 10;
const RAFT_HEARTBEAT_TICKS: u64 = 2;
/// Concurrent clients in the concurrent runs.
const CONCURRENCY: usize = 64;
/// A new write attempt starts this often while a failover is measured.
const FAILOVER_ATTEMPT_EVERY_MS: u64 = 5;

#[derive(Debug, Clone)]
struct Args {
    single: usize,
    concurrent: usize,
    failover_trials: usize,
    trip_trials: usize,
    arms: usize,
    entries: usize,
    etcd: bool,
    json: Option<PathBuf>,
    raft_store: String,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        single: 2_000,
        concurrent: 20_000,
        failover_trials: 50,
        trip_trials: 1_000,
        arms: 4,
        entries: 1_000_000,
        etcd: true,
        json: None,
        raft_store: "wal".into(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--single" => args.single = value()?.parse()?,
            "--concurrent" => args.concurrent = value()?.parse()?,
            "--failover-trials" => args.failover_trials = value()?.parse()?,
            "--trip-trials" => args.trip_trials = value()?.parse()?,
            "--arms" => args.arms = value()?.parse()?,
            "--entries" => args.entries = value()?.parse()?,
            "--no-etcd" => args.etcd = false,
            "--json" => args.json = Some(value()?.into()),
            "--raft-store" => args.raft_store = value()?,
            other => bail!("unknown flag {other}"),
        }
    }
    Ok(args)
}

/// Latency samples in seconds -> {n, p50_ms, p99_ms, max_ms}.
fn summary(samples: &mut [f64]) -> Value {
    samples.sort_by(f64::total_cmp);
    let pick = |q: f64| {
        if samples.is_empty() {
            return f64::NAN;
        }
        let at = ((samples.len() - 1) as f64 * q).round() as usize;
        samples[at] * 1e3
    };
    json!({
        "n": samples.len(),
        "p50_ms": round3(pick(0.5)),
        "p99_ms": round3(pick(0.99)),
        "max_ms": round3(pick(1.0)),
    })
}

fn round3(v: f64) -> f64 {
    (v * 1e3).round() / 1e3
}

fn ms(value: &Value, key: &str) -> String {
    value[key].as_f64().map_or("-".into(), |v| format!("{v:.3}"))
}

// ---------------------------------------------------------------------------------------
// Floors

/// R: 64-byte ping-pong between two loopback sockets (TCP_NODELAY), blocking I/O.
fn floor_tcp_round_trip(rounds: usize) -> anyhow::Result<Value> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let echo = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut stream, _) = listener.accept()?;
        stream.set_nodelay(true)?;
        let mut buf = [0u8; 64];
        while stream.read_exact(&mut buf).is_ok() {
            stream.write_all(&buf)?;
        }
        Ok(())
    });
    let mut stream = TcpStream::connect(addr)?;
    stream.set_nodelay(true)?;
    let mut buf = [7u8; 64];
    let mut samples = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let started = Instant::now();
        stream.write_all(&buf)?;
        stream.read_exact(&mut buf)?;
        samples.push(started.elapsed().as_secs_f64());
    }
    drop(stream);
    let _ = echo.join();
    Ok(summary(&mut samples))
}

/// F: overwrite one 4 KiB page and fdatasync, in `dir`.
fn floor_fsync(dir: &Path, rounds: usize) -> anyhow::Result<Value> {
    use std::os::unix::fs::FileExt as _;
    let path = dir.join("fsync-floor.bin");
    let file = std::fs::File::create(&path)?;
    let page = vec![0x5au8; 4096];
    file.write_all_at(&page, 0)?;
    file.sync_all()?;
    let mut samples = Vec::with_capacity(rounds);
    for i in 0..rounds {
        let offset = (i % 16) as u64 * 4096;
        let started = Instant::now();
        file.write_all_at(&page, offset)?;
        file.sync_data()?;
        samples.push(started.elapsed().as_secs_f64());
    }
    std::fs::remove_file(path)?;
    Ok(summary(&mut samples))
}

/// F2: two threads each overwrite one 4 KiB page of their own file and fdatasync, starting
/// together; a sample is the time until both are done. What a commit costs at least when the
/// members share one disk (as in this bench): a majority of three is two fdatasyncs.
fn floor_fsync_pair(dir: &Path, rounds: usize) -> anyhow::Result<Value> {
    use std::os::unix::fs::FileExt as _;
    let open = |name: &str| -> anyhow::Result<std::fs::File> {
        let file = std::fs::File::create(dir.join(name))?;
        file.write_all_at(&vec![0u8; 16 * 4096], 0)?;
        file.sync_all()?;
        Ok(file)
    };
    let (a, b) = (open("fsync-pair-a.bin")?, open("fsync-pair-b.bin")?);
    let start = Arc::new(std::sync::Barrier::new(2));
    let done = Arc::new(std::sync::Barrier::new(2));
    let other = {
        let (start, done) = (start.clone(), done.clone());
        std::thread::spawn(move || -> std::io::Result<()> {
            let page = vec![0xa5u8; 4096];
            for i in 0..rounds {
                start.wait();
                let written =
                    b.write_all_at(&page, (i % 16) as u64 * 4096).and_then(|()| b.sync_data());
                done.wait();
                written?;
            }
            Ok(())
        })
    };
    let page = vec![0x5au8; 4096];
    let mut samples = Vec::with_capacity(rounds);
    for i in 0..rounds {
        start.wait();
        let started = Instant::now();
        a.write_all_at(&page, (i % 16) as u64 * 4096)?;
        a.sync_data()?;
        done.wait();
        samples.push(started.elapsed().as_secs_f64());
    }
    other.join().map_err(|_| anyhow::anyhow!("fsync pair thread panicked"))??;
    std::fs::remove_file(dir.join("fsync-pair-a.bin"))?;
    std::fs::remove_file(dir.join("fsync-pair-b.bin"))?;
    Ok(summary(&mut samples))
}

/// F (append): append one 4 KiB page to a growing file and fdatasync (a WAL's pattern).
fn floor_fsync_append(dir: &Path, rounds: usize) -> anyhow::Result<Value> {
    let path = dir.join("fsync-floor-append.bin");
    let mut file = std::fs::File::create(&path)?;
    let page = vec![0xa5u8; 4096];
    let mut samples = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let started = Instant::now();
        file.write_all(&page)?;
        file.sync_data()?;
        samples.push(started.elapsed().as_secs_f64());
    }
    std::fs::remove_file(path)?;
    Ok(summary(&mut samples))
}

// ---------------------------------------------------------------------------------------
// A plain HTTP/1.1 client

/// One keep-alive HTTP/1.1 connection driven by blocking calls on the calling thread: each
/// request is one `write`, each response is read until its `Content-Length`. Beside reqwest
/// it shows what the bench's own client (a multi-threaded tokio runtime, a connection task
/// behind a channel) adds to every round trip, so the server's share can be read off.
struct PlainHttp {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl PlainHttp {
    fn connect(addr: SocketAddr) -> anyhow::Result<Self> {
        let stream = TcpStream::connect(addr)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        Ok(Self { stream, buf: Vec::with_capacity(4096) })
    }

    /// Sends one request (`body` as JSON when given) and returns the status and body.
    fn call(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> anyhow::Result<(u16, Vec<u8>)> {
        let mut request = format!("{method} {path} HTTP/1.1\r\nhost: bench\r\n");
        if let Some(body) = body {
            request.push_str(&format!(
                "content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            ));
        } else {
            request.push_str("\r\n");
        }
        self.stream.write_all(request.as_bytes())?;
        self.buf.clear();
        let mut chunk = [0u8; 4096];
        let header_end = loop {
            if let Some(at) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
            let n = self.stream.read(&mut chunk)?;
            anyhow::ensure!(n > 0, "connection closed before the response headers");
            self.buf.extend_from_slice(&chunk[..n]);
        };
        let head = std::str::from_utf8(&self.buf[..header_end])?;
        let status: u16 = head.get(9..12).context("short status line")?.parse()?;
        let length: usize = head
            .lines()
            .find_map(|l| {
                let (name, value) = l.split_once(':')?;
                name.eq_ignore_ascii_case("content-length").then(|| value.trim().parse().ok())?
            })
            .context("response without content-length")?;
        while self.buf.len() < header_end + length {
            let n = self.stream.read(&mut chunk)?;
            anyhow::ensure!(n > 0, "connection closed inside the response body");
            self.buf.extend_from_slice(&chunk[..n]);
        }
        Ok((status, self.buf[header_end..header_end + length].to_vec()))
    }

    /// POSTs `body` as JSON to `path` and fails unless the answer is 200.
    fn post_ok(&mut self, path: &str, body: &str) -> anyhow::Result<()> {
        let (status, answer) = self.call("POST", path, Some(body))?;
        anyhow::ensure!(
            status == 200,
            "POST {path} answered {status} {}",
            String::from_utf8_lossy(&answer)
        );
        Ok(())
    }
}

/// `rounds` sequential calls of `op` on one [`PlainHttp`] connection to `addr`, on a blocking
/// thread; returns the latency summary.
async fn plain_latency(
    addr: SocketAddr,
    rounds: usize,
    op: impl Fn(&mut PlainHttp, usize) -> anyhow::Result<()> + Send + 'static,
) -> anyhow::Result<Value> {
    tokio::task::spawn_blocking(move || {
        let mut http = PlainHttp::connect(addr)?;
        let mut samples = Vec::with_capacity(rounds);
        let started = Instant::now();
        for n in 0..rounds {
            let t = Instant::now();
            op(&mut http, n)?;
            samples.push(t.elapsed().as_secs_f64());
        }
        let secs = started.elapsed().as_secs_f64();
        let mut out = summary(&mut samples);
        out["per_s"] = json!((rounds as f64 / secs).round());
        Ok(out)
    })
    .await?
}

// ---------------------------------------------------------------------------------------
// safety-quorum

struct Quorum {
    nats: NatsServer,
    members: Vec<ServiceProcess>,
    http: reqwest::Client,
}

impl Quorum {
    async fn start(raft_store: &str) -> anyhow::Result<Self> {
        let binary = testkit::process::binary("safety-quorum")?;
        let nats = NatsServer::start()?;
        let peers: Vec<String> =
            (1..=3).map(|id| format!("{id}=127.0.0.1:{}", testkit::free_port())).collect();
        let mut members = Vec::new();
        for id in 1..=3u64 {
            let spec = ServiceSpec::new(&binary, nats.url())
                .args([
                    "--node-id".to_owned(),
                    id.to_string(),
                    "--peers".to_owned(),
                    peers.join(","),
                    "--tick-ms".to_owned(),
                    TICK_MS.to_string(),
                    "--election-ticks".to_owned(),
                    ELECTION_TICKS.to_string(),
                    "--raft-heartbeat-ticks".to_owned(),
                    RAFT_HEARTBEAT_TICKS.to_string(),
                ])
                .env("RUST_LOG", "warn")
                .env("RAFT_STORE", raft_store);
            members.push(ServiceProcess::start(spec)?);
        }
        for member in &mut members {
            member.wait_ready().await?;
        }
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(CONCURRENCY * 2)
            .timeout(Duration::from_secs(10))
            .build()?;
        let quorum = Self { nats, members, http };
        quorum.settled(&[0, 1, 2]).await?;
        Ok(quorum)
    }

    async fn view(&self, i: usize) -> Option<Value> {
        let (status, body) = self.members[i].get_json("/cluster").await.ok()?;
        (status == 200).then_some(body)
    }

    /// Waits until members `alive` agree on a leader among them and have applied its commit;
    /// returns the leader's index in `members`.
    async fn settled(&self, alive: &[usize]) -> anyhow::Result<usize> {
        wait_until("the safety cluster to settle", WAIT, || async {
            let mut views = Vec::new();
            for i in alive {
                views.push(self.view(*i).await?);
            }
            let leader = views[0]["leader"].as_u64()?;
            let commit =
                views.iter().find(|v| v["id"].as_u64() == Some(leader))?["commit"].as_u64()?;
            let agreed = views.iter().all(|v| {
                v["leader"].as_u64() == Some(leader)
                    && v["applied"].as_u64().is_some_and(|a| a >= commit)
            });
            let index = leader as usize - 1;
            (agreed && alive.contains(&index)).then_some(index)
        })
        .await
    }

    async fn engage(&self, i: usize, request_id: &str) -> anyhow::Result<(u16, Value)> {
        let body = json!({"reason": "bench", "source": "quorum-bench", "request_id": request_id});
        let resp = self.http.post(self.members[i].url("/estop")).json(&body).send().await?;
        let status = resp.status().as_u16();
        Ok((status, resp.json().await.unwrap_or(Value::Null)))
    }

    async fn clear(&self, i: usize, request_id: &str) -> anyhow::Result<u16> {
        let body = json!({"by": "bench", "request_id": request_id, "reason": "bench"});
        let resp = self.http.post(self.members[i].url("/estop/clear")).json(&body).send().await?;
        Ok(resp.status().as_u16())
    }
}

/// Runs `total` requests from `clients` concurrent clients; `op(n)` does request `n`.
async fn load<F, Fut>(clients: usize, total: usize, op: F) -> anyhow::Result<(Vec<f64>, f64)>
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send,
{
    let op = Arc::new(op);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let op = op.clone();
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            let mut samples = Vec::new();
            loop {
                let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if n >= total {
                    return anyhow::Ok(samples);
                }
                let t = Instant::now();
                op(n).await?;
                samples.push(t.elapsed().as_secs_f64());
            }
        }));
    }
    let mut all = Vec::with_capacity(total);
    for task in tasks {
        all.extend(task.await??);
    }
    Ok((all, started.elapsed().as_secs_f64()))
}

async fn quorum_latency(
    q: &Arc<Quorum>,
    leader: usize,
    clients: usize,
    total: usize,
    tag: &str,
) -> anyhow::Result<Value> {
    let quorum = q.clone();
    let tag = tag.to_owned();
    let (mut samples, secs) = load(clients, total, move |n| {
        let quorum = quorum.clone();
        let id = format!("{tag}-{n}");
        async move {
            let (status, body) = quorum.engage(leader, &id).await?;
            anyhow::ensure!(status == 200, "engage answered {status} {body}");
            Ok(())
        }
    })
    .await?;
    let mut out = summary(&mut samples);
    out["per_s"] = json!((total as f64 / secs).round());
    Ok(out)
}

/// Starts `attempt` every [`FAILOVER_ATTEMPT_EVERY_MS`] (earlier attempts keep running, so a
/// request parked on the dead leader costs nothing) and returns when the first succeeds.
async fn first_success<F, Fut>(attempt: F) -> anyhow::Result<Duration>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool> + Send + 'static,
{
    let started = Instant::now();
    let (done_tx, mut done_rx) = tokio::sync::mpsc::channel::<()>(1);
    let mut attempts = tokio::task::JoinSet::new();
    loop {
        let done = done_tx.clone();
        let future = attempt();
        attempts.spawn(async move {
            if future.await {
                let _ = done.try_send(());
            }
        });
        tokio::select! {
            _ = done_rx.recv() => {
                let took = started.elapsed();
                attempts.abort_all();
                return Ok(took);
            }
            _ = tokio::time::sleep(Duration::from_millis(FAILOVER_ATTEMPT_EVERY_MS)) => {}
        }
        anyhow::ensure!(started.elapsed() < WAIT, "no commit after the leader was killed");
    }
}

async fn quorum_failover(q: &mut Quorum, trials: usize) -> anyhow::Result<Value> {
    let mut samples = Vec::new();
    for trial in 0..trials {
        let leader = q.settled(&[0, 1, 2]).await?;
        let survivor = (leader + 1) % 3;
        q.members[leader].sigkill();
        let url = q.members[survivor].url("/estop");
        let body = json!({"reason": "bench", "source": "quorum-bench", "request_id": format!("failover-{trial}")});
        let took = first_success(|| {
            let request = q.http.post(&url).json(&body).send();
            async move { request.await.is_ok_and(|r| r.status() == 200) }
        })
        .await?;
        samples.push(took.as_secs_f64());
        eprintln!(
            "    failover trial {trial}: killed member {} -> committed on {} after {took:?}",
            leader + 1,
            survivor + 1
        );
        q.members[leader].restart()?;
        q.members[leader].wait_ready().await?;
    }
    q.settled(&[0, 1, 2]).await?;
    Ok(summary(&mut samples))
}

/// Trip-to-all-arms-stopped: from sending the engage to every arm's status reading
/// `safe_stop` (one poller per arm, back to back).
async fn trip_to_stop(q: &Quorum, trials: usize, arms: usize) -> anyhow::Result<Value> {
    let binary = testkit::process::binary("arm-controller")?;
    let spec = ServiceSpec::new(binary, q.nats.url())
        .args(["--arm-count".to_owned(), arms.to_string(), "--node-id".into(), "bench-arms".into()])
        .env("RUST_LOG", "warn");
    let mut controller = ServiceProcess::start(spec)?;
    controller.wait_ready().await?;
    let http = reqwest::Client::builder().pool_max_idle_per_host(arms * 2).build()?;
    let ids: Vec<String> = (1..=arms).map(|i| format!("arm-{i:03}")).collect();
    let urls: Vec<String> =
        ids.iter().map(|arm| controller.url(&format!("/arms/{arm}/status"))).collect();
    let all_in = |state: &'static str| {
        let http = http.clone();
        let urls = urls.clone();
        async move {
            wait_until(&format!("every arm {state}"), WAIT, || {
                let http = http.clone();
                let urls = urls.clone();
                async move {
                    for url in &urls {
                        let body: Value = http.get(url).send().await.ok()?.json().await.ok()?;
                        if body["state"] != state {
                            return None;
                        }
                    }
                    Some(())
                }
            })
            .await
        }
    };
    // The latency runs left the e-stop engaged.
    anyhow::ensure!(q.clear(0, "trip-bench-start").await? == 200, "clear refused");
    all_in("running").await?;
    let mut samples = Vec::new();
    for trial in 0..trials {
        let member = trial % 3;
        let started = Instant::now();
        // One poller walks the arms back to back until each has read `safe_stop` once.
        let poller = {
            let http = http.clone();
            let urls = urls.clone();
            tokio::spawn(async move {
                let mut pending: Vec<&String> = urls.iter().collect();
                while !pending.is_empty() && started.elapsed() < WAIT {
                    let mut still = Vec::new();
                    for url in pending {
                        let stopped = match http.get(url).send().await {
                            Ok(resp) => resp
                                .json::<Value>()
                                .await
                                .is_ok_and(|body| body["state"] == "safe_stop"),
                            Err(_) => false,
                        };
                        if !stopped {
                            still.push(url);
                        }
                    }
                    pending = still;
                }
                started.elapsed()
            })
        };
        let (status, body) = q.engage(member, &format!("trip-{trial}")).await?;
        anyhow::ensure!(status == 200, "engage answered {status} {body}");
        let worst = poller.await?;
        anyhow::ensure!(worst < WAIT, "arms did not stop");
        samples.push(worst.as_secs_f64());
        anyhow::ensure!(q.clear(member, &format!("trip-clear-{trial}")).await? == 200);
        all_in("running").await?;
    }
    Ok(summary(&mut samples))
}

/// Bytes of the raft store files under a member's data dir (the WAL's two files or redb's).
fn dir_bytes(dir: &std::path::Path) -> u64 {
    let file = |p: PathBuf| std::fs::metadata(p).map_or(0, |md| md.len());
    file(dir.join("raft.redb"))
        + file(dir.join("raft-wal/raft-wal-0"))
        + file(dir.join("raft-wal/raft-wal-1"))
}

fn rss_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches(" kB")
        .parse()
        .ok()
}

async fn quorum_memory(q: &Arc<Quorum>, leader: usize, entries: usize) -> anyhow::Result<Value> {
    let before: Vec<Option<u64>> = q.members.iter().map(|m| m.pid().and_then(rss_kb)).collect();
    let quorum = q.clone();
    let (_, secs) = load(CONCURRENCY, entries, move |n| {
        let quorum = quorum.clone();
        let id = format!("mem-{n}");
        async move {
            let (status, body) = quorum.engage(leader, &id).await?;
            anyhow::ensure!(status == 200, "engage answered {status} {body}");
            Ok(())
        }
    })
    .await?;
    let view = q.view(leader).await.context("leader view")?;
    let after: Vec<Option<u64>> = q.members.iter().map(|m| m.pid().and_then(rss_kb)).collect();
    let store_bytes: Vec<u64> =
        q.members.iter().map(|m| dir_bytes(&m.data_dir().join("data"))).collect();
    Ok(json!({
        "entries": entries,
        "seconds": round3(secs),
        "commit_index": view["commit"],
        "rss_kb_before": before,
        "rss_kb_after": after,
        "store_bytes": store_bytes,
    }))
}

// ---------------------------------------------------------------------------------------
// etcd

struct Etcd {
    binary: PathBuf,
    dir: tempfile::TempDir,
    names: Vec<String>,
    client: Vec<SocketAddr>,
    peer: Vec<SocketAddr>,
    children: Vec<Option<Child>>,
    http: reqwest::Client,
}

impl Etcd {
    async fn start(tmp: &Path) -> anyhow::Result<Self> {
        let binary = PathBuf::from("/usr/bin/etcd");
        anyhow::ensure!(binary.is_file(), "etcd not installed (apt-get install etcd-server)");
        let addr = |_| SocketAddr::from(([127, 0, 0, 1], testkit::free_port()));
        let mut etcd = Self {
            binary,
            dir: tempfile::Builder::new().prefix("etcd-bench-").tempdir_in(tmp)?,
            names: (1..=3).map(|i| format!("e{i}")).collect(),
            client: (0..3).map(addr).collect(),
            peer: (0..3).map(addr).collect(),
            children: vec![None, None, None],
            http: reqwest::Client::builder()
                .pool_max_idle_per_host(CONCURRENCY * 2)
                .timeout(Duration::from_secs(10))
                .build()?,
        };
        for i in 0..3 {
            etcd.spawn(i)?;
        }
        etcd.settled(&[0, 1, 2]).await?;
        Ok(etcd)
    }

    fn spawn(&mut self, i: usize) -> anyhow::Result<()> {
        let cluster: Vec<String> =
            (0..3).map(|j| format!("{}=http://{}", self.names[j], self.peer[j])).collect();
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("{}.log", self.names[i])))?;
        let child = Command::new(&self.binary)
            .args(["--name", &self.names[i]])
            .arg("--data-dir")
            .arg(self.dir.path().join(&self.names[i]))
            .args(["--listen-client-urls", &format!("http://{}", self.client[i])])
            .args(["--advertise-client-urls", &format!("http://{}", self.client[i])])
            .args(["--listen-peer-urls", &format!("http://{}", self.peer[i])])
            .args(["--initial-advertise-peer-urls", &format!("http://{}", self.peer[i])])
            .args(["--initial-cluster", &cluster.join(",")])
            .args(["--initial-cluster-state", "new", "--initial-cluster-token", "keel-bench"])
            .args(["--heartbeat-interval", &(TICK_MS * RAFT_HEARTBEAT_TICKS).to_string()])
            .args(["--election-timeout", &(TICK_MS * ELECTION_TICKS).to_string()])
            .args(["--pre-vote", "--log-level", "error"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        self.children[i] = Some(child);
        Ok(())
    }

    fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.children[i].take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    async fn status(&self, i: usize) -> Option<(u64, u64, u64)> {
        let url = format!("http://{}/v3/maintenance/status", self.client[i]);
        let body: Value =
            self.http.post(url).json(&json!({})).send().await.ok()?.json().await.ok()?;
        let num = |v: &Value| v.as_str().and_then(|s| s.parse::<u64>().ok());
        Some((num(&body["header"]["member_id"])?, num(&body["leader"])?, num(&body["raftIndex"])?))
    }

    async fn settled(&self, alive: &[usize]) -> anyhow::Result<usize> {
        wait_until("the etcd cluster to settle", WAIT, || async {
            let mut views = Vec::new();
            for i in alive {
                views.push((*i, self.status(*i).await?));
            }
            let leader = views[0].1.1;
            if leader == 0 || !views.iter().all(|(_, (_, l, _))| *l == leader) {
                return None;
            }
            let (index, (_, _, leader_raft)) =
                *views.iter().find(|(_, (id, _, _))| *id == leader)?;
            views.iter().all(|(_, (_, _, r))| *r + 2 >= leader_raft).then_some(index)
        })
        .await
    }

    async fn put(&self, i: usize, key: &str) -> anyhow::Result<()> {
        use base64_lite::encode;
        let url = format!("http://{}/v3/kv/put", self.client[i]);
        let body = json!({"key": encode(key.as_bytes()), "value": encode(b"engaged")});
        let resp = self.http.post(url).json(&body).send().await?;
        let status = resp.status();
        let answer: Value = resp.json().await.unwrap_or(Value::Null);
        anyhow::ensure!(
            status.is_success() && answer.get("header").is_some(),
            "put: {status} {answer}"
        );
        Ok(())
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for i in 0..3 {
            self.kill(i);
        }
    }
}

/// Standard base64 for the etcd gateway's byte fields (no extra dependency for 20 lines).
mod base64_lite {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

    pub fn encode(bytes: &[u8]) -> String {
        let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
        for chunk in bytes.chunks(3) {
            let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    }
}

async fn etcd_latency(
    e: &Arc<Etcd>,
    leader: usize,
    clients: usize,
    total: usize,
    tag: &str,
) -> anyhow::Result<Value> {
    let etcd = e.clone();
    let tag = tag.to_owned();
    let (mut samples, secs) = load(clients, total, move |n| {
        let etcd = etcd.clone();
        let key = format!("/bench/{tag}/{n}");
        async move { etcd.put(leader, &key).await }
    })
    .await?;
    let mut out = summary(&mut samples);
    out["per_s"] = json!((total as f64 / secs).round());
    Ok(out)
}

async fn etcd_failover(e: &mut Etcd, trials: usize) -> anyhow::Result<Value> {
    let mut samples = Vec::new();
    for trial in 0..trials {
        let leader = e.settled(&[0, 1, 2]).await?;
        let survivor = (leader + 1) % 3;
        e.kill(leader);
        let url = format!("http://{}/v3/kv/put", e.client[survivor]);
        let key = format!("/bench/failover/{trial}");
        let body = json!({"key": base64_lite::encode(key.as_bytes()), "value": base64_lite::encode(b"engaged")});
        let took = first_success(|| {
            let request = e.http.post(&url).timeout(WAIT).json(&body).send();
            async move {
                match request.await {
                    Ok(resp) if resp.status().is_success() => {
                        resp.json::<Value>().await.is_ok_and(|v| v.get("header").is_some())
                    }
                    _ => false,
                }
            }
        })
        .await?;
        samples.push(took.as_secs_f64());
        e.spawn(leader)?;
    }
    e.settled(&[0, 1, 2]).await?;
    Ok(summary(&mut samples))
}

// ---------------------------------------------------------------------------------------

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let tmp = tempfile::Builder::new().prefix("quorum-bench-").tempdir()?;
    let mut report = json!({"args": format!("{args:?}")});

    eprintln!("floors ...");
    report["floor_tcp_round_trip"] = floor_tcp_round_trip(10_000)?;
    progress(&args, &report, "floor_tcp_round_trip")?;
    report["floor_fsync_4k"] = floor_fsync(tmp.path(), 2_000)?;
    progress(&args, &report, "floor_fsync_4k")?;
    report["floor_fsync_append_4k"] = floor_fsync_append(tmp.path(), 2_000)?;
    progress(&args, &report, "floor_fsync_append_4k")?;
    report["floor_fsync_4k_pair"] = floor_fsync_pair(tmp.path(), 2_000)?;
    progress(&args, &report, "floor_fsync_4k_pair")?;

    eprintln!("safety-quorum: starting 3 members ...");
    let quorum = Quorum::start(&args.raft_store).await?;
    let leader = quorum.settled(&[0, 1, 2]).await?;
    {
        let health = quorum.members[leader].url("/healthz");
        let http = quorum.http.clone();
        let (mut samples, _) = load(1, 2_000, move |_| {
            let http = http.clone();
            let url = health.clone();
            async move {
                http.get(url).send().await?.bytes().await?;
                Ok(())
            }
        })
        .await?;
        report["floor_http_round_trip"] = summary(&mut samples);
        progress(&args, &report, "floor_http_round_trip")?;
    }
    let leader_addr: SocketAddr = quorum.members[leader].base_url()["http://".len()..].parse()?;
    report["floor_http_round_trip_plain"] = plain_latency(leader_addr, 2_000, |http, _| {
        let (status, _) = http.call("GET", "/healthz", None)?;
        anyhow::ensure!(status == 200, "healthz answered {status}");
        Ok(())
    })
    .await?;
    progress(&args, &report, "floor_http_round_trip_plain")?;
    report["quorum_engage_single_plain"] = plain_latency(leader_addr, args.single, |http, n| {
        let body =
            format!(r#"{{"reason":"bench","source":"quorum-bench","request_id":"plain-{n}"}}"#);
        http.post_ok("/estop", &body)
    })
    .await?;
    progress(&args, &report, "quorum_engage_single_plain")?;
    let q = Arc::new(quorum);
    eprintln!("safety-quorum: commit latency ...");
    report["quorum_engage_single"] = quorum_latency(&q, leader, 1, args.single, "single").await?;
    progress(&args, &report, "quorum_engage_single")?;
    report["quorum_engage_64"] =
        quorum_latency(&q, leader, CONCURRENCY, args.concurrent, "c64").await?;
    let follower = (leader + 1) % 3;
    report["quorum_engage_single_via_follower"] =
        quorum_latency(&q, follower, 1, args.single / 2, "via-follower").await?;
    eprintln!("safety-quorum: trip to all arms stopped, {} trials ...", args.trip_trials);
    report["quorum_trip_to_all_arms_stopped"] =
        trip_to_stop(&q, args.trip_trials, args.arms).await?;
    let mut quorum = Arc::into_inner(q).context("quorum still shared")?;
    eprintln!("safety-quorum: failover, {} trials ...", args.failover_trials);
    report["quorum_failover"] = quorum_failover(&mut quorum, args.failover_trials).await?;
    progress(&args, &report, "quorum_failover")?;
    let leader = quorum.settled(&[0, 1, 2]).await?;
    let q = Arc::new(quorum);
    eprintln!("safety-quorum: memory after {} entries ...", args.entries);
    report["quorum_memory"] = quorum_memory(&q, leader, args.entries).await?;
    progress(&args, &report, "quorum_memory")?;
    drop(q);

    if args.etcd {
        eprintln!("etcd: starting 3 members ...");
        let etcd = Etcd::start(tmp.path()).await?;
        let leader = etcd.settled(&[0, 1, 2]).await?;
        let e = Arc::new(etcd);
        eprintln!("etcd: put latency ...");
        report["etcd_put_single"] = etcd_latency(&e, leader, 1, args.single, "single").await?;
        progress(&args, &report, "etcd_put_single")?;
        report["etcd_put_single_plain"] =
            plain_latency(e.client[leader], args.single, |http, n| {
                use base64_lite::encode;
                let key = encode(format!("plain-{n}").as_bytes());
                let body = format!(r#"{{"key":"{key}","value":"{}"}}"#, encode(b"engaged"));
                http.post_ok("/v3/kv/put", &body)
            })
            .await?;
        progress(&args, &report, "etcd_put_single_plain")?;
        report["etcd_put_64"] =
            etcd_latency(&e, leader, CONCURRENCY, args.concurrent, "c64").await?;
        let mut etcd = Arc::into_inner(e).context("etcd still shared")?;
        eprintln!("etcd: failover, {} trials ...", args.failover_trials);
        report["etcd_failover"] = etcd_failover(&mut etcd, args.failover_trials).await?;
        progress(&args, &report, "etcd_failover")?;
    }

    report["floor_fsync_4k_end"] = floor_fsync(tmp.path(), 2_000)?;
    progress(&args, &report, "floor_fsync_4k_end")?;
    report["floor_fsync_4k_pair_end"] = floor_fsync_pair(tmp.path(), 2_000)?;
    progress(&args, &report, "floor_fsync_4k_pair_end")?;
    report["floor_tcp_round_trip_end"] = floor_tcp_round_trip(10_000)?;
    progress(&args, &report, "floor_tcp_round_trip_end")?;
    print_table(&report);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)?;
    }
    Ok(())
}

/// Prints one result as it lands and saves everything so far (a later failure keeps it).
fn progress(args: &Args, report: &Value, key: &str) -> anyhow::Result<()> {
    eprintln!("  {key}: {}", report[key]);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(report)?)?;
    }
    Ok(())
}

fn print_table(r: &Value) {
    println!("| measure | n | p50 ms | p99 ms | max ms | per s |");
    println!("|---|---|---|---|---|---|");
    for (label, key) in [
        ("floor R: TCP round trip, loopback, 64 B", "floor_tcp_round_trip"),
        ("floor F: 4 KiB overwrite + fdatasync", "floor_fsync_4k"),
        ("floor F: 4 KiB append + fdatasync", "floor_fsync_append_4k"),
        ("floor F (again, after the runs): 4 KiB overwrite + fdatasync", "floor_fsync_4k_end"),
        (
            "floor F2: two 4 KiB overwrites + fdatasyncs in parallel (one disk)",
            "floor_fsync_4k_pair",
        ),
        ("floor F2 (again, after the runs)", "floor_fsync_4k_pair_end"),
        ("floor H: HTTP GET /healthz round trip", "floor_http_round_trip"),
        ("floor H, plain client: HTTP GET /healthz round trip", "floor_http_round_trip_plain"),
        ("safety-quorum engage, 1 client (to leader)", "quorum_engage_single"),
        ("safety-quorum engage, 1 plain client (to leader)", "quorum_engage_single_plain"),
        ("safety-quorum engage, 64 clients (to leader)", "quorum_engage_64"),
        ("safety-quorum engage, 1 client (via follower)", "quorum_engage_single_via_follower"),
        ("etcd put, 1 client (to leader)", "etcd_put_single"),
        ("etcd put, 1 plain client (to leader)", "etcd_put_single_plain"),
        ("etcd put, 64 clients (to leader)", "etcd_put_64"),
        ("safety-quorum failover (SIGKILL leader -> engage committed)", "quorum_failover"),
        ("etcd failover (SIGKILL leader -> put committed)", "etcd_failover"),
        ("trip -> every arm safe_stop", "quorum_trip_to_all_arms_stopped"),
    ] {
        let v = &r[key];
        if v.is_null() {
            continue;
        }
        let per_s = v["per_s"].as_f64().map_or("-".into(), |p| format!("{p}"));
        println!(
            "| {label} | {} | {} | {} | {} | {per_s} |",
            v["n"],
            ms(v, "p50_ms"),
            ms(v, "p99_ms"),
            ms(v, "max_ms")
        );
    }
    println!("\nmemory: {}", r["quorum_memory"]);
}
