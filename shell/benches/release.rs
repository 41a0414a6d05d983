//! Benchmark: making the new release of a large service with one file changed
//! (`Releases::assemble` + seal: unchanged files hard-linked from the blob
//! cache, the changed one linked from its just-fetched blob) next to `cp -al`
//! and `cp -a` of the previous release, in the same run.
//!
//! The service: 20,000 files, ~1 GB (`MOLT_BENCH_FILES`, `MOLT_BENCH_MB`), no
//! build outputs. Page cache warm; median of `MOLT_BENCH_RUNS` (default 5).
//! `cp -a` runs for services of 200 MB at most, or with `MOLT_BENCH_CP_A=1`.
//! Run: `scripts/bench-release` or `cargo bench -p shell --bench release`.

use std::collections::BTreeSet;
use std::error::Error;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use image_spec::{BlobId, CommitId, ServiceName, Tree, TreeEntry, scan_dir};
use shell::release::{Releases, Sources};

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
        let path = root.join(format!("src/m{}/f{i}.rs", i % 100));
        std::fs::create_dir_all(path.parent().ok_or("no parent")?)?;
        std::fs::write(path, &buf)?;
    }
    Ok(())
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn cp(args: &[&str], src: &Path, dst: &Path) -> Res<Duration> {
    let t = Instant::now();
    let ok = Command::new("cp").args(args).arg(src).arg(dst).status()?;
    if !ok.success() {
        return Err("cp failed".into());
    }
    Ok(t.elapsed())
}

fn main() -> Res<()> {
    let files = env_or("MOLT_BENCH_FILES", 20_000);
    let mb = env_or("MOLT_BENCH_MB", 1_000) as u64;
    let runs = env_or("MOLT_BENCH_RUNS", 5).max(1);
    // A full copy of a large service takes minutes on a slow disk: only
    // when asked (MOLT_BENCH_CP_A=1), or for a service of 200 MB at most.
    let full_copy = env_or("MOLT_BENCH_CP_A", usize::from(mb <= 200)) == 1;
    let tmp = tempfile::tempdir()?;
    let src = tmp.path().join("src");
    eprintln!("generating a service of {files} files, ~{mb} MB ...");
    generate(&src, files, mb * 1_000_000)?;
    let v1 = scan_dir(&src)?.tree;
    // The blob cache holds every blob (as after the first install's fetch).
    let cache = tmp.path().join("cache");
    std::fs::create_dir_all(&cache)?;
    for e in v1.entries() {
        let dst = cache.join(e.blob().to_hex());
        if !dst.exists() {
            std::fs::hard_link(e.path().under(&src), dst)?;
        }
    }
    // Stamped as a fetch would (so linking checks stamps, not bytes).
    let blobs = shell::cache::BlobCache::open(&cache)?;
    let ids: Vec<BlobId> = v1.entries().iter().map(|e| e.blob()).collect();
    blobs.stamp_fetched(&ids);
    let verified = |id: &BlobId, m: &std::fs::Metadata| blobs.verified(id, m);
    let (releases, _) = Releases::open(&tmp.path().join("releases"))?;
    let service = ServiceName::new("bench")?;
    let blob_path = |id: &BlobId| cache.join(id.to_hex());
    let all: BTreeSet<BlobId> = v1.entries().iter().map(|e| e.blob()).collect();
    let r1 = releases
        .assemble(
            &service,
            &CommitId::from_bytes([1; 32]),
            &v1,
            None,
            &Sources {
                cache: &blob_path,
                verified: &verified,
                fresh: &all,
            },
        )?
        .seal()?;

    // v2: one file changed, its new blob just fetched.
    let changed = &v1.entries()[files / 2];
    let bytes = b"one changed file".repeat(64);
    let blob = BlobId::of(&bytes);
    std::fs::write(cache.join(blob.to_hex()), &bytes)?;
    blobs.stamp_fetched(&[blob]);
    let mut entries: Vec<TreeEntry> = v1.entries().to_vec();
    entries[files / 2] = TreeEntry::file(changed.path().clone(), false, bytes.len() as u64, blob);
    let v2 = Tree::new(entries)?;
    let fresh = BTreeSet::from([blob]);
    let v2_commit = CommitId::from_bytes([2; 32]);

    let (mut ours, mut linked, mut copied) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..runs {
        eprintln!("run {}/{runs} ...", i + 1);
        let _ = std::fs::remove_dir_all(releases.dir(&service, &v2_commit));
        let t = Instant::now();
        let stage = releases.assemble(
            &service,
            &v2_commit,
            &v2,
            Some((&r1, &v1)),
            &Sources {
                cache: &blob_path,
                verified: &verified,
                fresh: &fresh,
            },
        )?;
        let stats = stage.copied();
        stage.seal()?;
        ours.push(t.elapsed());
        assert_eq!(stats.linked as usize, files);

        let dst = tmp.path().join("cp-al");
        let _ = std::fs::remove_dir_all(&dst);
        linked.push(cp(&["-al"], &r1, &dst)?);
        if full_copy {
            let dst = tmp.path().join("cp-a");
            let _ = std::fs::remove_dir_all(&dst);
            copied.push(cp(&["-a"], &r1, &dst)?);
        }
    }
    let (ours, linked) = (median(ours), median(linked));
    println!();
    println!(
        "new release, {files} files, ~{mb} MB, one file changed; medians of {runs} runs, page cache warm"
    );
    println!("{:<52} {:>10} {:>10}", "", "ms", "/ cp -al");
    let mut rows = vec![
        ("molt: Releases::assemble + seal", ours),
        ("cp -al (hard links, no check)", linked),
    ];
    if full_copy {
        rows.push(("cp -a (a full copy: the old way)", median(copied)));
    }
    for (what, t) in rows {
        println!(
            "{what:<52} {:>10.1} {:>10.2}",
            t.as_secs_f64() * 1e3,
            t.as_secs_f64() / linked.as_secs_f64()
        );
    }
    println!("(goal: molt within 2x of cp -al)");
    Ok(())
}
