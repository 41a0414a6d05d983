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
