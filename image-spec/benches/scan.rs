//! Benchmark: `scan_dir` against `b3sum` on the same files, in the same run.
//!
//! Generates a service-like tree (10,000 files, about 200 MB: many small sources
//! and a few large binaries), warms the page cache, then times
//! - `scan_dir` (walk, `.moltignore`, hashing on all cores, building the tree);
//! - `b3sum` over the same file list, as one process (its default);
//! - `b3sum` split across one process per core (what `xargs -P` would do);
//!
//! and prints MB/s, files/s and each tool's time as a ratio to `scan_dir`'s.
//! It also checks that both computed the same hashes.
//!
//! Run with `scripts/bench-scan` (installs `b3sum` if missing), or
//! `cargo bench -p image-spec --bench scan`. Environment:
//! `MOLT_BENCH_FILES` (default 10000), `MOLT_BENCH_MB` (default 200),
//! `MOLT_BENCH_RUNS` (default 5; the median is reported).

use std::collections::BTreeMap;
use std::error::Error;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use image_spec::{BlobId, scan_dir};

type Res<T> = Result<T, Box<dyn Error>>;

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A small deterministic generator, so every run scans the same bytes.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// Writes `files` files totalling about `total` bytes: 10 large files hold half the
/// bytes, the rest are small files of varied sizes in 100 directories.
fn generate(root: &Path, files: usize, total: u64) -> Res<Vec<PathBuf>> {
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    let large = 10.min(files);
    let small = files - large;
    let large_size = total / 2 / large.max(1) as u64;
    let small_avg = (total / 2) / small.max(1) as u64;
    let mut paths = Vec::with_capacity(files);
    let mut buf = Vec::new();
    for i in 0..files {
        let (rel, size) = if i < large {
            (format!("bin/blob{i}.bin"), large_size)
        } else {
            // Sizes spread from 0 to 2x the average.
            let size = rng.next() % (2 * small_avg + 1);
            (format!("src/m{}/file{i}.rs", i % 100), size)
        };
        let path = root.join(rel);
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir)?;
        }
        buf.resize(usize::try_from(size)?, 0);
        rng.fill(&mut buf);
        fs::write(&path, &buf)?;
        paths.push(path);
    }
    fs::write(root.join("service.toml"), "name = \"bench\"\n")?;
    paths.push(root.join("service.toml"));
    Ok(paths)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn time_runs(runs: usize, mut f: impl FnMut() -> Res<()>) -> Res<Duration> {
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = Instant::now();
        f()?;
        times.push(t.elapsed());
    }
    Ok(median(times))
}

/// Runs `b3sum` over `files` split into `procs` concurrent processes; returns the
/// hashes it printed, by path.
fn b3sum(files: &[PathBuf], procs: usize) -> Res<BTreeMap<PathBuf, String>> {
    let chunk = files.len().div_ceil(procs.max(1));
    let children = files
        .chunks(chunk.max(1))
        .map(|part| {
            Command::new("b3sum")
                .args(part)
                .stdout(std::process::Stdio::piped())
                .spawn()
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("cannot run b3sum ({e}); install it: apt-get install -y b3sum"))?;
    let mut out = BTreeMap::new();
    for child in children {
        let output = child.wait_with_output()?;
        if !output.status.success() {
            return Err(format!("b3sum failed: {}", output.status).into());
        }
        for line in String::from_utf8(output.stdout)?.lines() {
            let (hash, path) = line.split_once("  ").ok_or("unexpected b3sum output")?;
            out.insert(PathBuf::from(path), hash.to_owned());
        }
    }
    Ok(out)
}

fn main() -> Res<()> {
    let files = env_or("MOLT_BENCH_FILES", 10_000);
    let mb = env_or("MOLT_BENCH_MB", 200);
    let runs = env_or("MOLT_BENCH_RUNS", 5).max(1);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());

    let dir = tempfile::tempdir()?;
    let root = dir.path().join("svc");
    eprintln!(
        "generating {files} files, ~{mb} MB in {} ...",
        root.display()
    );
    let paths = generate(&root, files, mb as u64 * 1_000_000)?;
    let bytes: u64 = paths
        .iter()
        .map(|p| fs::metadata(p).map(|m| m.len()))
        .sum::<Result<u64, _>>()?;
    let n = paths.len();

    // Warm the page cache so every tool reads from memory, then check agreement.
    let scanned = scan_dir(&root)?;
    let reference = b3sum(&paths, cores)?;
    let mut checked = 0usize;
    for e in scanned.tree.entries() {
        let hash = reference
            .get(&e.path().under(&root))
            .ok_or_else(|| format!("b3sum did not hash {}", e.path()))?;
        if hash.parse::<BlobId>()? != e.blob() {
            return Err(format!("hash mismatch for {}", e.path()).into());
        }
        checked += 1;
    }
    if checked != n {
        return Err(format!("scan found {checked} files, expected {n}").into());
    }

    let ours = time_runs(runs, || {
        let s = scan_dir(&root)?;
        std::hint::black_box(s.tree.id());
        Ok(())
    })?;
    let single = time_runs(runs, || b3sum(&paths, 1).map(drop))?;
    let multi = time_runs(runs, || b3sum(&paths, cores).map(drop))?;

    let mbytes = bytes as f64 / 1e6;
    println!();
    println!(
        "scan benchmark: {n} files, {mbytes:.1} MB, {cores} cores, page cache warm, median of {runs} runs"
    );
    println!("hashes agree with b3sum for all {checked} files");
    println!();
    println!(
        "{:<28} {:>10} {:>10} {:>12} {:>16}",
        "tool", "time ms", "MB/s", "files/s", "time / scan_dir"
    );
    for (name, t) in [
        ("scan_dir (molt)", ours),
        ("b3sum, 1 process", single),
        (&*format!("b3sum, {cores} processes"), multi),
    ] {
        let secs = t.as_secs_f64();
        println!(
            "{:<28} {:>10.1} {:>10.0} {:>12.0} {:>16.2}",
            name,
            secs * 1e3,
            mbytes / secs,
            n as f64 / secs,
            secs / ours.as_secs_f64()
        );
    }
    Ok(())
}
