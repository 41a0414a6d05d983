//! What the benchmarks share: their settings from the environment, and a
//! generated service of many files.

use std::path::Path;

use crate::{TestCluster, write_file, write_service};

/// The setting `name` from the environment, or `default`.
pub fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Waits (30 s at most) for a line starting with `prefix` in the log file
/// `log` of a child process, and returns the rest of that line.
pub async fn wait_for_line(
    log: &Path,
    prefix: &str,
) -> Result<String, Box<dyn std::error::Error + Send + Sync>> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let text = std::fs::read_to_string(log)?;
        if let Some(rest) = text.lines().find_map(|l| l.strip_prefix(prefix)) {
            return Ok(rest.to_owned());
        }
        if std::time::Instant::now() > deadline {
            return Err(format!("no line `{prefix}…` in {}: {text}", log.display()).into());
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// One small file of [`generate_service`]'s service of `files` files: the
/// one in the middle.
pub fn middle_file(files: usize) -> String {
    let small = files.saturating_sub(6).max(1);
    let i = small / 2;
    format!("src/m{}/f{i}.rs", i % 100)
}

/// Deterministic pseudo-random bytes (xorshift from `seed`).
pub fn fill(seed: u64, buf: &mut [u8]) {
    let mut x = seed | 1;
    for chunk in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let v = x.to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
}

/// A service `bench` of `files` files, ~`total` bytes: five large binaries
/// holding half the bytes, the rest many small sources (`src/mN/fI.rs`).
pub fn generate_service(root: &Path, files: usize, total: u64) {
    write_service(root, "bench", &[]);
    let large = 5.min(files);
    let small = files.saturating_sub(large + 1);
    let large_size = total / 2 / large.max(1) as u64;
    let small_size = (total / 2) / small.max(1) as u64;
    let mut buf = Vec::new();
    for i in 0..large {
        buf.resize(
            usize::try_from(large_size).expect("a file fits in memory"),
            0,
        );
        fill(2 * (i as u64 + 1), &mut buf);
        write_file(root, &format!("bin/large{i}.bin"), &buf);
    }
    for i in 0..small {
        buf.resize(
            usize::try_from(small_size).expect("a file fits in memory"),
            0,
        );
        fill(2 * (1000 + i as u64), &mut buf);
        write_file(root, &format!("src/m{}/f{i}.rs", i % 100), &buf);
    }
}

/// Reads and discards one stream, then answers with the byte count.
struct Sink;

impl wire::Handler for Sink {
    async fn handle(&self, _peer: std::sync::Arc<wire::Identity>, mut s: wire::BiStream) {
        let mut buf = vec![0u8; 1 << 20];
        let mut n = 0u64;
        while let Ok(Some(k)) = s.recv.read(&mut buf).await {
            n += k as u64;
        }
        let _ = s.send.write_all(&n.to_le_bytes()).await;
        let _ = s.send.finish();
    }
}

/// The time `bytes` take over `streams` streams of one QUIC connection on
/// 127.0.0.1, to a server that only counts them: the transport's ceiling
/// here.
pub async fn quic_throughput(
    cluster: &TestCluster,
    bytes: u64,
    streams: u64,
) -> Result<std::time::Duration, Box<dyn std::error::Error>> {
    let server = wire::Server::bind("127.0.0.1:0".parse()?, &cluster.credentials("portal"))?;
    let addr = server.local_addr()?;
    let stop = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(server.serve(std::sync::Arc::new(Sink), stop.clone()));
    let client = wire::Client::new(&cluster.credentials("user/b/admin"), addr)?;
    let conn = client.connect(addr, &wire::Identity::Portal).await?;
    let chunk = vec![7u8; 1 << 20];
    let per_stream = bytes / streams;
    let t = std::time::Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..streams {
        let conn = conn.clone();
        let chunk = chunk.clone();
        tasks.spawn(async move {
            let mut s = conn.open().await?;
            let mut left = per_stream;
            while left > 0 {
                let n = left.min(chunk.len() as u64) as usize;
                s.send.write_all(&chunk[..n]).await?;
                left -= n as u64;
            }
            s.send.finish()?;
            let mut got = [0u8; 8];
            s.recv.read_exact(&mut got).await?;
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(u64::from_le_bytes(got))
        });
    }
    let mut total = 0;
    while let Some(r) = tasks.join_next().await {
        total += r?.map_err(|e| e.to_string())?;
    }
    let elapsed = t.elapsed();
    if total != per_stream * streams {
        return Err(format!("the sink counted {total} bytes of {}", per_stream * streams).into());
    }
    conn.close();
    stop.cancel();
    task.await?;
    Ok(elapsed)
}

/// [`quic_throughput`] over one stream.
pub async fn quic_ceiling(
    cluster: &TestCluster,
    bytes: u64,
) -> Result<std::time::Duration, Box<dyn std::error::Error>> {
    quic_throughput(cluster, bytes, 1).await
}

/// An `rsync --daemon` serving a directory as module `m` on 127.0.0.1; stopped
/// when dropped.
pub struct RsyncDaemon {
    child: std::process::Child,
    /// Its TCP port.
    pub port: u16,
}

impl RsyncDaemon {
    /// Serves `dir`, its configuration and pid file in `work`.
    pub fn start(dir: &Path, work: &Path) -> Result<Self, Box<dyn std::error::Error>> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let conf = work.join("rsyncd.conf");
        std::fs::write(
            &conf,
            format!(
                "use chroot = no\nuid = root\ngid = root\nmax connections = 0\n\
                 pid file = {}\n[m]\npath = {}\nread only = yes\n",
                work.join("rsyncd.pid").display(),
                dir.display()
            ),
        )?;
        let child = std::process::Command::new("rsync")
            .args(["--daemon", "--no-detach", "--address=127.0.0.1"])
            .arg(format!("--port={port}"))
            .arg(format!("--config={}", conf.display()))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot run rsync ({e}); install it: apt-get install -y rsync"))?;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if std::time::Instant::now() > deadline {
                return Err("rsync --daemon did not listen".into());
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        Ok(Self { child, port })
    }

    /// `rsync -a` of the module into `dst`, not yet waited for.
    pub fn pull(&self, dst: &Path) -> std::io::Result<std::process::Child> {
        std::process::Command::new("rsync")
            .arg("-a")
            .arg(format!("rsync://127.0.0.1:{}/m/", self.port))
            .arg(dst)
            .spawn()
    }
}

impl Drop for RsyncDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
