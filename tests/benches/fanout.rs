//! Benchmark: one ~100 MB service installed on 1, 10 and 30 instances at
//! once from one repository server, next to the loopback QUIC ceiling and to
//! N parallel `rsync -a` of the same files from an rsync daemon, in one run;
//! with the repository server's memory.
//!
//! 1. Starts `molt repo-server` as its own process (`MOLT_BENCH_MOLT`, default
//!    `target/release/molt`), so its VmRSS is its own, and pushes a generated
//!    service of 10,000 files / ~100 MB (`MOLT_BENCH_FILES`, `MOLT_BENCH_MB`).
//! 2. The QUIC ceiling: 256 MiB over one connection on 127.0.0.1.
//! 3. For each N (`MOLT_BENCH_FANOUT`, default `1,10,30`): N instances, each
//!    with its own blob cache and releases and its own connection, install
//!    the service at once (`shell::install::install`: fetch every blob,
//!    verified, and assemble the release) — wall time and aggregate MB/s; the
//!    server's VmRSS sampled every 20 ms (peak) and 2 s after (settled); then
//!    N `rsync -a` from an rsync daemon into N empty directories at once.
//!
//! Run: `scripts/bench-fanout` (builds molt, installs rsync if missing) or
//! `cargo bench -p molt-e2e --bench fanout`.

use std::error::Error;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use image_spec::{InstanceName, ServiceName};
use molt_e2e::bench::{RsyncDaemon, env_or, generate_service, quic_ceiling, wait_for_line};
use molt_e2e::{TestCluster, push_main};
use repo_client::RepoClient;
use shell::install::{BlobCache, InstallContext, install};
use shell::release::Releases;

type Res<T> = Result<T, Box<dyn Error>>;

/// `molt repo-server` in its own process.
struct ChildRepo {
    child: tokio::process::Child,
    pid: u32,
    addr: std::net::SocketAddr,
}

impl ChildRepo {
    async fn start(cluster: &TestCluster, molt: &Path) -> Res<Self> {
        let dir = cluster.path("child-repo");
        let certs = dir.join("certs");
        cluster
            .credentials("repo-server")
            .write(&certs, "repo-server")?;
        let config = dir.join("molt.toml");
        std::fs::write(
            &config,
            "repo = \"127.0.0.1:1\"\ncert = \"certs/repo-server.crt\"\n\
             key = \"certs/repo-server.key\"\nca = \"certs/ca.crt\"\n\n[repo_server]\n\
             data = \"data\"\nlisten = \"127.0.0.1:0\"\ncert = \"certs/repo-server.crt\"\n\
             key = \"certs/repo-server.key\"\n",
        )?;
        let log = dir.join("repo.log");
        let child = tokio::process::Command::new(molt)
            .arg("--config")
            .arg(&config)
            .arg("repo-server")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .kill_on_drop(true)
            .spawn()?;
        let pid = child.id().ok_or("the repository server exited at once")?;
        let addr = wait_for_line(&log, "repository server listening on ")
            .await
            .map_err(|e| e.to_string())?
            .split_whitespace()
            .next()
            .ok_or("no address")?
            .parse()?;
        Ok(Self { child, pid, addr })
    }

    fn rss_kib(&self) -> u64 {
        status_kib(self.pid, "VmRSS").unwrap_or(0)
    }

    /// Bytes the server has read through system calls (`rchar`) and from the
    /// block device (`read_bytes`: what the page cache did not hold).
    fn reads(&self) -> (u64, u64) {
        let text = std::fs::read_to_string(format!("/proc/{}/io", self.pid)).unwrap_or_default();
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0)
        };
        (field("rchar:"), field("read_bytes:"))
    }
}

fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// CPU seconds (user + system) process `pid` has used so far.
fn cpu_secs(pid: u32) -> f64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces): state is the
    // first, utime and stime the 12th and 13th.
    let rest = text.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

/// What this machine's disk writes durably, in MB/s: `mb` MiB with `dd`,
/// synced before it ends (the ceiling for installs, which sync what they
/// fetch).
fn durable_write_mbs(dir: &Path, mb: u64) -> Res<f64> {
    let file = dir.join("dd-probe");
    let t = Instant::now();
    let status = std::process::Command::new("dd")
        .arg("if=/dev/zero")
        .arg(format!("of={}", file.display()))
        .args(["bs=1M", &format!("count={mb}"), "conv=fsync", "status=none"])
        .status()?;
    let elapsed = t.elapsed();
    std::fs::remove_file(&file)?;
    if !status.success() {
        return Err("dd failed".into());
    }
    Ok((mb << 20) as f64 / 1e6 / elapsed.as_secs_f64())
}

/// N instances installing `commit` at once; the wall time.
async fn fan_out(
    cluster: &TestCluster,
    repo: std::net::SocketAddr,
    n: usize,
    commit: image_spec::CommitId,
    root: &Path,
) -> Res<Duration> {
    let mut clients = Vec::new();
    for i in 0..n {
        let client = wire::Client::new(&cluster.credentials(&format!("shell/fan-{i}")), repo)?;
        let repo = RepoClient::connect(&client, repo).await?;
        clients.push((client, repo));
    }
    let service = ServiceName::new("bench")?;
    let t = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (i, (client, repo)) in clients.into_iter().enumerate() {
        let dir = root.join(format!("fan-{i}"));
        let service = service.clone();
        tasks.spawn(async move {
            let cache = BlobCache::open(&dir.join("cache"))?;
            let (releases, _) = Releases::open(&dir.join("releases"))?;
            let instance = InstanceName::new(&format!("fan-{i}"))?;
            let logs = dir.join("logs");
            let ctx = InstallContext {
                repo: &repo,
                cache: &cache,
                releases: &releases,
                instance: &instance,
                logs: &logs,
            };
            install(&ctx, &service, commit, None).await?;
            drop(client);
            Ok::<_, Box<dyn Error + Send + Sync>>(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done?.map_err(|e| e.to_string())?;
    }
    Ok(t.elapsed())
}

/// N `rsync -a` from a daemon serving `src` into empty directories at once.
fn rsync_fan_out(src: &Path, work: &Path, n: usize) -> Res<Duration> {
    let daemon = RsyncDaemon::start(src, work)?;
    let t = Instant::now();
    let children: Vec<_> = (0..n)
        .map(|i| daemon.pull(&work.join(format!("rsync-{i}"))))
        .collect::<Result<_, _>>()?;
    for mut c in children {
        if !c.wait()?.success() {
            return Err("an rsync failed".into());
        }
    }
    let took = t.elapsed();
    drop(daemon);
    for i in 0..n {
        let _ = std::fs::remove_dir_all(work.join(format!("rsync-{i}")));
    }
    Ok(took)
}

struct Row {
    n: usize,
    molt: Duration,
    rsync: Duration,
    peak: u64,
    settled: u64,
    /// What the server read for the fan-out: through system calls, and from
    /// the disk.
    read: (u64, u64),
    /// CPU seconds the shells (this process) and the server used.
    cpu: (f64, f64),
}

#[tokio::main]
async fn main() -> Res<()> {
    let files = env_or("MOLT_BENCH_FILES", 10_000);
    let mb = env_or("MOLT_BENCH_MB", 100) as u64;
    let fanout: Vec<usize> = std::env::var("MOLT_BENCH_FANOUT")
        .unwrap_or_else(|_| "1,10,30".into())
        .split(',')
        .filter_map(|n| n.trim().parse().ok())
        .collect();
    let molt = std::env::var_os("MOLT_BENCH_MOLT")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/molt"));
    if !molt.is_file() {
        return Err(format!(
            "no molt binary at {} (cargo build --release -p molt, or set MOLT_BENCH_MOLT)",
            molt.display()
        )
        .into());
    }
    let cluster = TestCluster::start().await;
    let src = cluster.path("src");
    eprintln!("generating {files} files, ~{mb} MB ...");
    generate_service(&src, files, mb * 1_000_000);
    let server = ChildRepo::start(&cluster, &molt).await?;
    let dev = wire::Client::new(&cluster.credentials("user/ada/developer"), server.addr)?;
    let dev = RepoClient::connect(&dev, server.addr).await?;
    let pushed = dev.push(&src, &push_main("v1"), |_| {}).await?;
    let bytes = pushed.bytes_sent;
    let rss_idle = server.rss_kib();

    let ceiling = quic_ceiling(&cluster, 256 << 20).await?;
    let ceiling_mbs = (256u64 << 20) as f64 / 1e6 / ceiling.as_secs_f64();

    let work = cluster.path("work");
    std::fs::create_dir_all(&work)?;
    let disk_mbs = durable_write_mbs(&work, 256)?;
    let mut rows = Vec::new();
    for n in fanout {
        eprintln!("{n} instance(s) at once ...");
        let peak = Arc::new(AtomicU64::new(0));
        let done = Arc::new(AtomicBool::new(false));
        let sampler = {
            let (peak, done, pid) = (peak.clone(), done.clone(), server.pid);
            tokio::spawn(async move {
                while !done.load(Ordering::Relaxed) {
                    peak.fetch_max(status_kib(pid, "VmRSS").unwrap_or(0), Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
        };
        let reads_before = server.reads();
        let cpu_before = (cpu_secs(std::process::id()), cpu_secs(server.pid));
        let molt_t = fan_out(&cluster, server.addr, n, pushed.commit, &work).await?;
        let cpu = (
            cpu_secs(std::process::id()) - cpu_before.0,
            cpu_secs(server.pid) - cpu_before.1,
        );
        let reads_after = server.reads();
        done.store(true, Ordering::Relaxed);
        sampler.await?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let settled = server.rss_kib();
        for i in 0..n {
            let _ = std::fs::remove_dir_all(work.join(format!("fan-{i}")));
        }
        let rsync_t = rsync_fan_out(&src, &work, n)?;
        rows.push(Row {
            n,
            molt: molt_t,
            rsync: rsync_t,
            peak: peak.load(Ordering::Relaxed),
            settled,
            read: (
                reads_after.0 - reads_before.0,
                reads_after.1 - reads_before.1,
            ),
            cpu,
        });
    }

    println!();
    println!(
        "fan-out: one service of {files} files, {:.1} MB, installed on N instances at once; 127.0.0.1",
        bytes as f64 / 1e6
    );
    println!("loopback QUIC ceiling (one connection, 256 MiB): {ceiling_mbs:.0} MB/s");
    println!(
        "durable disk writes here (dd 256 MiB, conv=fsync): {disk_mbs:.0} MB/s — an install makes \
         every byte durable, rsync does not"
    );
    println!("repository server VmRSS idle after the push: {rss_idle} KiB");
    println!();
    println!(
        "{:>3} {:>10} {:>9} {:>9} {:>10} {:>9} {:>9} {:>12} {:>14} {:>10} {:>10}",
        "N",
        "molt ms",
        "MB/s",
        "/ceiling",
        "rsync ms",
        "MB/s",
        "/rsync",
        "peak KiB",
        "settled KiB",
        "read MB",
        "disk MB"
    );
    for r in &rows {
        let total = bytes as f64 * r.n as f64 / 1e6;
        let (ours, theirs) = (total / r.molt.as_secs_f64(), total / r.rsync.as_secs_f64());
        println!(
            "{:>3} {:>10.0} {:>9.0} {:>9.2} {:>10.0} {:>9.0} {:>9.2} {:>12} {:>14} {:>10.1} {:>10.1}",
            r.n,
            r.molt.as_secs_f64() * 1e3,
            ours,
            ours / ceiling_mbs,
            r.rsync.as_secs_f64() * 1e3,
            theirs,
            ours / theirs,
            r.peak,
            r.settled,
            r.read.0 as f64 / 1e6,
            r.read.1 as f64 / 1e6
        );
    }
    println!(
        "(read MB: what the server read to serve the N instances; disk MB: what of it came \
         from the disk rather than the page cache)"
    );
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!();
    println!("CPU during the fan-out ({cores} cores here):");
    println!(
        "{:>3} {:>12} {:>12} {:>14}",
        "N", "shells s", "server s", "cores busy"
    );
    for r in &rows {
        println!(
            "{:>3} {:>12.1} {:>12.1} {:>14.2}",
            r.n,
            r.cpu.0,
            r.cpu.1,
            (r.cpu.0 + r.cpu.1) / r.molt.as_secs_f64()
        );
    }
    println!("(goals: >= 0.70 of the ceiling, >= 0.5 of N parallel rsync)");
    drop(server.child);
    Ok(())
}
