//! What the benchmarks share: their settings from the environment, and a
//! generated service of many files.

use std::path::Path;

use crate::{write_file, write_service};

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
