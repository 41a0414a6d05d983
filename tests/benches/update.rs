//! Benchmark: an instance taking a one-file change, next to rsync (daemon) and
//! OSTree (`pull-local` + hard-link `checkout`) taking the same change, in one
//! run, interleaved.
//!
//! 1. Generates a service of 10,000 files / ~100 MB (`MOLT_BENCH_FILES`,
//!    `MOLT_BENCH_MB`), pushes it to a real repository server on 127.0.0.1,
//!    and installs it on an instance (`shell::install::install`).
//! 2. Changes one small file in place and pushes again.
//! 3. Each trial (`MOLT_BENCH_TRIALS`, default 9; medians printed):
//!    - molt: the instance's update — ask the diff, fetch the changed blob,
//!      assemble and seal the new release (the v2 release and the changed
//!      blob are removed before each trial, untimed);
//!    - rsync: `rsync -a` from an `rsync --daemon` on 127.0.0.1 into a
//!      directory holding v1 (the changed file put back before each trial);
//!    - OSTree: `ostree pull-local` of v2 into a bare repository holding v1,
//!      then `ostree checkout -H` (hard links) of v2 (v2 and its objects
//!      pruned, its checkout removed before each trial).
//! 4. The whole deploy of the same change: the files with a runnable HTTP
//!    service beside them (`examples/hello`'s), on a running instance
//!    (`shell::instance::Instance::upgrade`: diff, fetch, new release, start
//!    the new process, health, cutover, record, stop the old), alternating
//!    between the two versions; medians of the same number of deploys.
//! 5. What one connection's handshake costs on the wire, and a one-shot
//!    client's connect → call → shutdown.
//!
//! Run: `scripts/bench-update` (installs rsync and ostree if missing) or
//! `cargo bench -p molt-e2e --bench update`.

use std::error::Error;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use image_spec::{InstanceName, ServiceName};
use molt_e2e::bench::{RsyncDaemon, env_or, generate_service, middle_file};
use molt_e2e::{TestCluster, copy_example, push_main, write_file};
use shell::install::{BlobCache, InstallContext, install};
use shell::release::Releases;

type Res<T> = Result<T, Box<dyn Error>>;

fn run(cmd: &mut Command) -> Res<String> {
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr)).into());
    }
    Ok(String::from_utf8(out.stdout)?)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ostree(repo: &Path) -> Command {
    let mut c = Command::new("ostree");
    c.arg(format!("--repo={}", repo.display()));
    c
}

fn row(what: &str, t: Duration, base: Duration) {
    println!(
        "{what:<58} {:>10.1} {:>10.2}",
        t.as_secs_f64() * 1e3,
        t.as_secs_f64() / base.as_secs_f64()
    );
}

#[tokio::main]
async fn main() -> Res<()> {
    let files = env_or("MOLT_BENCH_FILES", 10_000);
    let mb = env_or("MOLT_BENCH_MB", 100) as u64;
    let trials = env_or("MOLT_BENCH_TRIALS", 9).max(1);
    let cluster = TestCluster::start().await;
    let work = cluster.path("work");
    std::fs::create_dir_all(&work)?;
    let v1_dir = cluster.path("v1");
    eprintln!("generating {files} files, ~{mb} MB ...");
    generate_service(&v1_dir, files, mb * 1_000_000);
    let changed = &middle_file(files);
    let v1_bytes = std::fs::read(v1_dir.join(changed))?;
    let mut v2_bytes = v1_bytes.clone();
    for b in v2_bytes.iter_mut().take(64) {
        *b = b.wrapping_add(1);
    }
    let v2_dir = cluster.path("v2");
    run(Command::new("cp").arg("-a").arg(&v1_dir).arg(&v2_dir))?;
    write_file(&v2_dir, changed, &v2_bytes);

    // molt: the repository holds v1 and v2; the instance runs v1.
    let dev = cluster.repo_client("user/ada/developer").await;
    let v1 = dev.push(&v1_dir, &push_main("v1"), |_| {}).await?;
    let v2 = dev.push(&v2_dir, &push_main("v2"), |_| {}).await?;
    let root = cluster.path("instance");
    let cache = BlobCache::open(&root.join("cache"))?;
    let (releases, _) = Releases::open(&root.join("releases"))?;
    let shell_repo = cluster.repo_client("shell/bench").await;
    let instance = InstanceName::new("bench")?;
    let logs = root.join("logs");
    let ctx = InstallContext {
        repo: &shell_repo,
        cache: &cache,
        releases: &releases,
        instance: &instance,
        logs: &logs,
    };
    let service = ServiceName::new("bench")?;
    eprintln!("installing v1 on the instance ...");
    let installed = install(&ctx, &service, v1.commit, None).await?.release;
    let changed_blob = image_spec::BlobId::of(&v2_bytes);

    // rsync: a daemon serving v2; a directory holding v1.
    let daemon = RsyncDaemon::start(&v2_dir, &work)?;
    let rsync_dst = cluster.path("rsync-dst");
    run(Command::new("cp").arg("-a").arg(&v1_dir).arg(&rsync_dst))?;

    // OSTree: v1 and v2 committed to an archive repository; a bare one holding
    // v1, checked out.
    let server = work.join("ostree-server");
    let client = work.join("ostree-client");
    run(ostree(&server).args(["init", "--mode=archive"]))?;
    run(ostree(&client).args(["init", "--mode=bare"]))?;
    for (branch, dir) in [("v1", &v1_dir), ("v2", &v2_dir)] {
        run(ostree(&server)
            .args(["commit", "--branch", branch, "--tree"])
            .arg(format!("dir={}", dir.display())))?;
    }
    run(ostree(&client).arg("pull-local").arg(&server).arg("v1"))?;
    run(ostree(&client)
        .args(["checkout", "-H", "v1"])
        .arg(work.join("ostree-v1")))?;
    let ostree_v2 = work.join("ostree-v2");

    let mut molt_t = Vec::new();
    let mut molt_fetch = Vec::new();
    let mut molt_release = Vec::new();
    let mut rsync_t = Vec::new();
    let mut ostree_t = Vec::new();
    for trial in 0..trials {
        eprintln!("trial {}/{trials} ...", trial + 1);
        // molt.
        let v2_release = releases.dir(&service, &v2.commit);
        if v2_release.exists() {
            run(Command::new("rm").arg("-rf").arg(&v2_release))?;
        }
        let _ = std::fs::remove_file(cache.path(&changed_blob));
        sync_disk();
        let t = Instant::now();
        let report = install(&ctx, &service, v2.commit, Some(&installed)).await?;
        molt_t.push(t.elapsed());
        assert_eq!(report.fetched_blobs, 1);
        molt_fetch.push(report.timings.fetch);
        molt_release.push(report.timings.copy);

        // rsync.
        std::fs::write(rsync_dst.join(changed), &v1_bytes)?;
        sync_disk();
        let t = Instant::now();
        if !daemon.pull(&rsync_dst)?.wait()?.success() {
            return Err("rsync failed".into());
        }
        rsync_t.push(t.elapsed());
        assert_eq!(std::fs::read(rsync_dst.join(changed))?, v2_bytes);

        // OSTree.
        if ostree_v2.exists() {
            run(Command::new("rm").arg("-rf").arg(&ostree_v2))?;
        }
        let _ = run(ostree(&client).args(["refs", "--delete", "v2"]));
        run(ostree(&client).args(["prune", "--refs-only", "--depth=0"]))?;
        sync_disk();
        let t = Instant::now();
        run(ostree(&client).arg("pull-local").arg(&server).arg("v2"))?;
        run(ostree(&client)
            .args(["checkout", "-H", "v2"])
            .arg(&ostree_v2))?;
        ostree_t.push(t.elapsed());
        assert_eq!(std::fs::read(ostree_v2.join(changed))?, v2_bytes);
    }

    // The whole deploy: the same files and change, as a service that runs.
    let mut commits = Vec::new();
    for (v, src) in [("w1", &v1_dir), ("w2", &v2_dir)] {
        let dir = cluster.path(&format!("whole-{v}"));
        run(Command::new("cp").arg("-a").arg(src).arg(&dir))?;
        copy_example("hello", &dir);
        commits.push(dev.push(&dir, &push_main(v), |_| {}).await?.commit);
    }
    let hello = ServiceName::new("hello")?;
    let mut running = shell::instance::Instance::open(shell::instance::InstanceConfig {
        name: InstanceName::new("whole")?,
        root: cluster.path("whole-instance"),
        public_ports: shell::instance::PublicPorts::Ephemeral,
        public_ip: shell::instance::LOOPBACK,
    })
    .await?;
    let target = |c| std::collections::BTreeMap::from([(hello.clone(), c)]);
    running
        .upgrade(&shell_repo, &target(commits[0]), None, "w1")
        .await?;
    let mut deploy_t = Vec::new();
    for trial in 0..trials {
        eprintln!("deploy {}/{trials} ...", trial + 1);
        let commit = commits[(trial + 1) % 2];
        sync_disk();
        let t = Instant::now();
        running
            .upgrade(&shell_repo, &target(commit), None, "bench")
            .await?;
        deploy_t.push(t.elapsed());
    }
    running.shutdown().await;

    // A one-shot client: what its handshake sends and receives, and connect →
    // one call → shutdown.
    let mut oneshot = Vec::new();
    let mut handshake = (0, 0);
    for _ in 0..trials {
        let creds = cluster.credentials("user/ada/developer");
        let t = Instant::now();
        let client = wire::Client::new(&creds, cluster.repo_addr)?;
        let repo = repo_client::RepoClient::connect(&client, cluster.repo_addr).await?;
        let stats = repo.connection().quinn().stats();
        handshake = (stats.udp_tx.bytes, stats.udp_rx.bytes);
        repo.images().await?;
        repo.connection().close();
        client.shutdown().await;
        oneshot.push(t.elapsed());
    }

    let (molt_m, rsync_m, ostree_m) = (median(molt_t), median(rsync_t), median(ostree_t));
    println!();
    println!(
        "instance update: {files} files, ~{mb} MB, one {}-byte file changed; medians of {trials} interleaved trials, 127.0.0.1",
        v2_bytes.len()
    );
    println!();
    println!("{:<58} {:>10} {:>10}", "", "ms", "/ rsync");
    row("molt: diff + fetch + new release (sealed)", molt_m, rsync_m);
    row("  of which diff + fetch", median(molt_fetch), rsync_m);
    row("  of which the new release", median(molt_release), rsync_m);
    row("rsync -a from rsync --daemon", rsync_m, rsync_m);
    row("ostree pull-local + checkout -H", ostree_m, rsync_m);
    println!(
        "molt / OSTree: {:.2}   (goal: <= 0.5 of OSTree's time, <= rsync's)",
        molt_m.as_secs_f64() / ostree_m.as_secs_f64()
    );
    row(
        "whole deploy on a running instance (start, health, cutover)",
        median(deploy_t),
        rsync_m,
    );
    println!();
    println!(
        "one-shot client: connect + hello + one call + shutdown: {:.1} ms median; handshake + hello: {} bytes sent, {} received",
        median(oneshot).as_secs_f64() * 1e3,
        handshake.0,
        handshake.1
    );
    Ok(())
}

/// Writes dirty pages out, so one trial's writeback does not land in the next.
fn sync_disk() {
    let _ = Command::new("sync").status();
}
