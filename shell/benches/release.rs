//! Benchmark: making a new release (copy of the previous one, mtimes and modes
//! kept) next to `cp -a` of the same directory, in the same run.
//!
//! The release is synthetic but shaped like a built service: 2,000 source files
//! and 8,000 build outputs, ~120 MB in all (`MOLT_BENCH_FILES`, `MOLT_BENCH_MB`).
//! Page cache warm; median of `MOLT_BENCH_RUNS` (default 5) runs.
//! Run: `scripts/bench-release` or `cargo bench -p shell --bench release`.

use std::error::Error;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use shell::release::copy_tree;

type Res<T> = Result<T, Box<dyn Error>>;

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn generate(root: &Path, files: usize, total: u64) -> Res<()> {
    let per = usize::try_from(total / files.max(1) as u64)?;
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut buf = vec![0u8; per];
    for i in 0..files {
        for b in buf.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        let rel = if i % 5 == 0 {
            format!("src/m{}/f{i}.rs", i % 40)
        } else {
            format!("target/release/deps/d{}/o{i}.rlib", i % 80)
        };
        let path = root.join(rel);
        std::fs::create_dir_all(path.parent().ok_or("no parent")?)?;
        std::fs::write(path, &buf)?;
    }
    Ok(())
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() -> Res<()> {
    let files = env_or("MOLT_BENCH_FILES", 10_000);
    let mb = env_or("MOLT_BENCH_MB", 120) as u64;
    let runs = env_or("MOLT_BENCH_RUNS", 5).max(1);
    let tmp = tempfile::tempdir()?;
    let src = tmp.path().join("release");
    eprintln!("generating a release of {files} files, ~{mb} MB ...");
    generate(&src, files, mb * 1_000_000)?;
    // Warm the cache.
    let stats = copy_tree(&src, &tmp.path().join("warm"))?;

    let mut ours = Vec::new();
    let mut cp = Vec::new();
    for i in 0..runs {
        let dst = tmp.path().join(format!("ours{i}"));
        let t = Instant::now();
        copy_tree(&src, &dst)?;
        ours.push(t.elapsed());
        let dst = tmp.path().join(format!("cp{i}"));
        let t = Instant::now();
        let status = Command::new("cp").arg("-a").arg(&src).arg(&dst).status()?;
        cp.push(t.elapsed());
        if !status.success() {
            return Err("cp -a failed".into());
        }
        std::fs::remove_dir_all(tmp.path().join(format!("ours{i}")))?;
        std::fs::remove_dir_all(tmp.path().join(format!("cp{i}")))?;
    }
    let (ours, cp) = (median(ours), median(cp));
    println!();
    println!(
        "release copy benchmark: {} files, {:.1} MB, page cache warm, median of {runs} runs",
        stats.files,
        stats.bytes as f64 / 1e6
    );
    println!(
        "{:<34} {:>10} {:>10} {:>12}",
        "tool", "ms", "MB/s", "time / cp -a"
    );
    for (name, t) in [("shell::release::copy_tree", ours), ("cp -a", cp)] {
        let s = t.as_secs_f64();
        println!(
            "{name:<34} {:>10.1} {:>10.0} {:>12.2}",
            s * 1e3,
            stats.bytes as f64 / 1e6 / s,
            s / cp.as_secs_f64()
        );
    }
    Ok(())
}
