//! Benchmark: a one-file change of the Rust example, from the upgrade's trigger to
//! the new version served, step by step; and the new release next to `cp -a` of
//! the same release directory — all in one run.
//!
//! 1. Starts a real repository server on 127.0.0.1, pushes `examples/orders` and
//!    upgrades a fresh instance to it (a cold cargo build).
//! 2. `MOLT_BENCH_RUNS` times (default 5): changes `VERSION` in `src/main.rs`,
//!    pushes, upgrades, and GETs the public port until the new version answers.
//!    Each run prints fetch / copy / build / start / health / switch, the sum of
//!    those (trigger → switched), the whole upgrade call (with draining and
//!    stopping the old process and recording) and trigger → first answer of the
//!    new version.
//! 3. Times `cp -a` of the release the last run started from (build outputs
//!    included) and puts it next to that run's release creation.
//!
//! Run: `scripts/bench-upgrade` or `cargo bench -p molt-e2e --bench upgrade`.

use std::collections::BTreeMap;
use std::error::Error;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use image_spec::{InstanceName, ServiceName};
use molt_e2e::{TestCluster, copy_example, push_main, write_file};
use shell::instance::{Instance, InstanceConfig, PublicPorts, StepTimings};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

type Res<T> = Result<T, Box<dyn Error>>;

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

/// The version `orders` answers with on `addr`, if it answers.
async fn version(addr: std::net::SocketAddr) -> Option<String> {
    let mut conn = tokio::net::TcpStream::connect(addr).await.ok()?;
    conn.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .ok()?;
    let mut answer = String::new();
    conn.read_to_string(&mut answer).await.ok()?;
    let v = answer.split("\"version\":\"").nth(1)?;
    Some(v.split('"').next()?.to_owned())
}

fn du_bytes(dir: &Path) -> Res<u64> {
    let out = Command::new("du").arg("-sb").arg(dir).output()?;
    let text = String::from_utf8(out.stdout)?;
    Ok(text
        .split_whitespace()
        .next()
        .ok_or("du printed nothing")?
        .parse()?)
}

fn main() -> Res<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(bench())
}

async fn bench() -> Res<()> {
    let runs: usize = std::env::var("MOLT_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let cluster = TestCluster::start().await;
    let orders_dir = cluster.path("orders");
    copy_example("orders", &orders_dir);
    let orders = ServiceName::new("orders")?;
    let dev = cluster.repo_client("user/ada/developer").await;
    let shell_repo = cluster.repo_client("shell/bench").await;
    let mut instance = Instance::open(InstanceConfig {
        name: InstanceName::new("bench")?,
        root: cluster.path("instance"),
        public_ports: PublicPorts::Ephemeral,
        public_ip: shell::instance::LOOPBACK,
    })
    .await?;

    let v1 = dev.push(&orders_dir, &push_main("v1"), |_| {}).await?;
    let cold = Instant::now();
    instance
        .upgrade(
            &shell_repo,
            &BTreeMap::from([(orders.clone(), v1.commit)]),
            None,
            "v1",
        )
        .await?;
    println!(
        "first install of orders (cold cargo build): {} ms",
        ms(cold.elapsed())
    );
    let addr = instance
        .public_addr(&orders, "main")
        .ok_or("orders has no public port")?;

    println!(
        "\none-file change of orders (src/main.rs), trigger -> new version served, ms:\n\
         {:>3} {:>7} {:>7} {:>8} {:>7} {:>7} {:>7} {:>9} {:>9} {:>9}",
        "run",
        "fetch",
        "copy",
        "build",
        "start",
        "health",
        "switch",
        "switched",
        "upgrade",
        "served"
    );
    let main_rs = std::fs::read_to_string(orders_dir.join("src/main.rs"))?;
    let mut rows: Vec<(StepTimings, Duration, Duration)> = Vec::new();
    let mut base_release: Option<PathBuf> = None;
    for run in 1..=runs {
        let tag = format!("bench-{run}");
        let changed = main_rs.replace(
            "const VERSION: &str = \"1\";",
            &format!("const VERSION: &str = \"{tag}\";"),
        );
        if changed == main_rs {
            return Err("examples/orders/src/main.rs has no `const VERSION: &str = \"1\";`".into());
        }
        write_file(&orders_dir, "src/main.rs", changed.as_bytes());
        let pushed = dev.push(&orders_dir, &push_main(&tag), |_| {}).await?;
        // The release the upgrade copies from: the running one.
        base_release = instance.release_dir(&orders).map(Path::to_path_buf);
        let trigger = Instant::now();
        let report = instance
            .upgrade(
                &shell_repo,
                &BTreeMap::from([(orders.clone(), pushed.commit)]),
                None,
                &tag,
            )
            .await?;
        let upgrade = trigger.elapsed();
        let deadline = Instant::now() + Duration::from_secs(30);
        while version(addr).await.as_deref() != Some(tag.as_str()) {
            if Instant::now() > deadline {
                return Err(format!("{tag} never answered").into());
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let served = trigger.elapsed();
        let t = *report.steps.get(&orders).ok_or("no timings for orders")?;
        let switched = t.fetch + t.copy + t.build + t.start + t.health + t.switch;
        println!(
            "{run:>3} {:>7} {:>7} {:>8} {:>7} {:>7} {:>7} {:>9} {:>9} {:>9}",
            ms(t.fetch),
            ms(t.copy),
            ms(t.build),
            ms(t.start),
            ms(t.health),
            ms(t.switch),
            ms(switched),
            ms(upgrade),
            ms(served)
        );
        rows.push((t, switched, served));
    }
    let mut switched: Vec<Duration> = rows.iter().map(|r| r.1).collect();
    switched.sort();
    let mut served: Vec<Duration> = rows.iter().map(|r| r.2).collect();
    served.sort();
    println!(
        "median: switched {} ms, served {} ms (the upgrade call also drains and stops the old process and records)",
        ms(switched[switched.len() / 2]),
        ms(served[served.len() / 2])
    );

    // The last run's new release next to cp -a of the release it was made from.
    let base = base_release.ok_or("no release to copy")?;
    let last = rows.last().ok_or("no runs")?.0;
    let target = cluster.path("cp-a-copy");
    let started = Instant::now();
    let status = Command::new("cp")
        .arg("-a")
        .arg(&base)
        .arg(&target)
        .status()?;
    let cp = started.elapsed();
    if !status.success() {
        return Err("cp -a failed".into());
    }
    println!(
        "\nnew release of orders ({} KB with build outputs): molt {} ms (new release), cp -a {} ms: {:.2}x cp -a",
        du_bytes(&base)? / 1_000,
        ms(last.copy),
        ms(cp),
        last.copy.as_secs_f64() / cp.as_secs_f64()
    );
    instance.shutdown().await;
    Ok(())
}
