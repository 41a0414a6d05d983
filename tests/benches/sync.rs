//! Benchmark: pushing and fetching a change through molt, next to rsync on the same
//! change, and QUIC bulk throughput next to plain TCP — all in one run.
//!
//! 1. Generates a service of 10,000 files / ~100 MB (`MOLT_BENCH_FILES`,
//!    `MOLT_BENCH_MB`), starts a real repository server on 127.0.0.1 and pushes it.
//! 2. Changes one file and pushes again (only that blob travels).
//! 3. A second client asks for the diff and fetches the changed blobs.
//! 4. rsync -a --stats carries the same change between two local directories
//!    (once with its default whole-file mode for local copies, once with
//!    --no-whole-file, its delta algorithm).
//! 5. 256 MiB over one QUIC stream, over four QUIC streams, and over plain TCP.
//!
//! Run: `scripts/bench-sync` (installs rsync if missing) or
//! `cargo bench -p molt-e2e --bench sync`.

use std::error::Error;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use image_spec::{BlobId, ServiceName};
use molt_e2e::bench::{env_or, generate_service, middle_file, quic_throughput};
use molt_e2e::{TestCluster, push_main, write_file};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

type Res<T> = Result<T, Box<dyn Error>>;

fn rsync(src: &Path, dst: &Path, extra: &[&str]) -> Res<(u64, Duration)> {
    let t = Instant::now();
    let out = Command::new("rsync")
        .args(["-a", "--stats"])
        .args(extra)
        .arg(format!("{}/", src.display()))
        .arg(dst)
        .output()
        .map_err(|e| format!("cannot run rsync ({e}); install it: apt-get install -y rsync"))?;
    let elapsed = t.elapsed();
    if !out.status.success() {
        return Err(format!("rsync failed: {}", String::from_utf8_lossy(&out.stderr)).into());
    }
    let stats = String::from_utf8(out.stdout)?;
    let sent = stats
        .lines()
        .find_map(|l| l.strip_prefix("Total bytes sent: "))
        .ok_or("rsync printed no 'Total bytes sent'")?
        .replace(',', "")
        .trim()
        .parse()?;
    Ok((sent, elapsed))
}

async fn tcp_throughput(bytes: u64) -> Res<Duration> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = tokio::spawn(async move {
        let (mut sock, _) = listener.accept().await?;
        let mut buf = vec![0u8; 1 << 20];
        let mut n = 0u64;
        loop {
            let k = sock.read(&mut buf).await?;
            if k == 0 {
                break;
            }
            n += k as u64;
        }
        Ok::<_, std::io::Error>(n)
    });
    let chunk = vec![7u8; 1 << 20];
    let t = Instant::now();
    let mut sock = tokio::net::TcpStream::connect(addr).await?;
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        sock.write_all(&chunk[..n]).await?;
        left -= n as u64;
    }
    sock.shutdown().await?;
    let got = server.await??;
    let elapsed = t.elapsed();
    assert_eq!(got, bytes);
    Ok(elapsed)
}

fn row(what: &str, bytes: u64, t: Duration, baseline: Option<(u64, Duration)>) {
    let secs = t.as_secs_f64();
    let ratio = baseline
        .map(|(b, bt)| {
            format!(
                "{:>8.2} {:>8.2}",
                bytes as f64 / b.max(1) as f64,
                secs / bt.as_secs_f64()
            )
        })
        .unwrap_or_default();
    println!(
        "{what:<44} {bytes:>14} {:>10.1} {:>10.1} {ratio}",
        secs * 1e3,
        bytes as f64 / 1e6 / secs
    );
}

#[tokio::main]
async fn main() -> Res<()> {
    let files = env_or("MOLT_BENCH_FILES", 10_000);
    let mb = env_or("MOLT_BENCH_MB", 100) as u64;
    let cluster = TestCluster::start().await;
    let src = cluster.path("src");
    eprintln!("generating {files} files, ~{mb} MB ...");
    generate_service(&src, files, mb * 1_000_000);
    let rsync_dst = cluster.path("rsync-dst");
    rsync(&src, &rsync_dst, &[])?;

    let repo = cluster.repo_client("user/ada/developer").await;
    let t = Instant::now();
    let first = repo.push(&src, &push_main("initial"), |_| {}).await?;
    let initial = t.elapsed();

    // Change one small file in place (same size, new bytes).
    let changed = &middle_file(files);
    let mut bytes = std::fs::read(src.join(changed))?;
    for b in bytes.iter_mut().take(64) {
        *b = b.wrapping_add(1);
    }
    write_file(&src, changed, &bytes);

    let wire_before = repo.connection().quinn().stats().udp_tx.bytes;
    let t = Instant::now();
    let second = repo.push(&src, &push_main("one file"), |_| {}).await?;
    let change_push = t.elapsed();
    let push_wire = repo.connection().quinn().stats().udp_tx.bytes - wire_before;

    let other = cluster.repo_client("shell/bench").await;
    let fetch_dir = cluster.path("fetch");
    std::fs::create_dir_all(&fetch_dir)?;
    let rx_before = other.connection().quinn().stats().udp_rx.bytes;
    let t = Instant::now();
    let diff = other
        .diff(
            &ServiceName::new("bench")?,
            Some(first.commit),
            second.commit,
        )
        .await?;
    let needed: Vec<BlobId> = diff.needed_blobs().into_iter().collect();
    let fetched = other.fetch_blobs_to(&needed, &fetch_dir).await?;
    let fetch = t.elapsed();
    let fetch_wire = other.connection().quinn().stats().udp_rx.bytes - rx_before;
    let diff_frame = wire::codec::encode_frame(&diff, usize::MAX)?.len() as u64;

    let (rsync_whole, rsync_whole_t) = rsync(&src, &rsync_dst, &[])?;
    // Undo and redo the change so the delta run has the same work to do.
    let rsync_delta_dst = cluster.path("rsync-delta");
    std::fs::create_dir_all(&rsync_delta_dst)?;
    rsync(&rsync_dst, &rsync_delta_dst, &[])?;
    let mut undo = bytes.clone();
    for b in undo.iter_mut().take(64) {
        *b = b.wrapping_sub(1);
    }
    std::fs::write(rsync_delta_dst.join(changed), &undo)?;
    let (rsync_delta, rsync_delta_t) = rsync(&src, &rsync_delta_dst, &["--no-whole-file"])?;

    let bulk: u64 = 256 << 20;
    let quic1 = quic_throughput(&cluster, bulk, 1).await?;
    let quic4 = quic_throughput(&cluster, bulk, 4).await?;
    let tcp = tcp_throughput(bulk).await?;

    println!();
    println!(
        "sync benchmark: {} files, {:.1} MB, one {}-byte file changed, release build, 127.0.0.1",
        first.files,
        first.bytes_sent as f64 / 1e6,
        bytes.len()
    );
    println!();
    println!(
        "{:<44} {:>14} {:>10} {:>10} {:>8} {:>8}",
        "step", "bytes", "ms", "MB/s", "bytes/rs", "time/rs"
    );
    row(
        "molt initial push (blob bytes)",
        first.bytes_sent,
        initial,
        None,
    );
    row(
        "molt push of the change (blob bytes)",
        second.bytes_sent,
        change_push,
        Some((rsync_whole, rsync_whole_t)),
    );
    row(
        "molt push of the change (all bytes on the wire)",
        push_wire,
        change_push,
        Some((rsync_whole, rsync_whole_t)),
    );
    row(
        "molt diff + fetch by a 2nd client (blob bytes)",
        fetched,
        fetch,
        Some((rsync_whole, rsync_whole_t)),
    );
    row(
        "molt diff + fetch (all bytes received)",
        fetch_wire,
        fetch,
        Some((rsync_whole, rsync_whole_t)),
    );
    row(
        "rsync -a, same change (bytes sent)",
        rsync_whole,
        rsync_whole_t,
        None,
    );
    row(
        "rsync -a --no-whole-file (bytes sent)",
        rsync_delta,
        rsync_delta_t,
        None,
    );
    println!(
        "(the diff message itself: {diff_frame} bytes; bytes/rs and time/rs compare with rsync -a)"
    );
    println!();
    println!(
        "{:<44} {:>14} {:>10} {:>10} {:>17}",
        "bulk transfer", "bytes", "ms", "MB/s", "time / tcp"
    );
    for (what, t) in [
        ("QUIC, 1 stream", quic1),
        ("QUIC, 4 streams", quic4),
        ("plain TCP, 1 connection", tcp),
    ] {
        let secs = t.as_secs_f64();
        println!(
            "{what:<44} {bulk:>14} {:>10.1} {:>10.1} {:>17.2}",
            secs * 1e3,
            bulk as f64 / 1e6 / secs,
            secs / tcp.as_secs_f64()
        );
    }
    Ok(())
}
