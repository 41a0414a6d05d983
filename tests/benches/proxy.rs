//! Benchmark: the HTTP front (crate `front`) next to nginx and to no proxy at
//! all, in one run; what 20 shadow swaps under load cost; how long a plugin
//! swap pauses.
//!
//! 1. Pushes `examples/orders`, upgrades an instance to it (release build), and
//!    runs `wrk` (keep-alive, 2 threads, 32 connections) against orders
//!    (a) through a front of its own (`front::bind_http`, as the shell opens
//!    one for every `http` port), (b) through nginx as a reverse proxy with
//!    upstream keep-alive and `X-Forwarded-For` set to the peer (as the
//!    front sets it by default), (c)
//!    directly, in turn, three rounds (the machine's noise moves every path's
//!    rate by ±10% from one run to the next; a ratio within a round is
//!    steadier). Medians of requests/s and p50/p99 latency, and the
//!    front-to-nginx ratio of each round.
//! 2. Runs `wrk` through the instance's front while the instance makes 20 shadow
//!    swaps between two versions of orders: failed requests (non-2xx answers
//!    and socket errors) and p99 during the swaps, next to the steady p99.
//! 3. Builds `examples/counter`, serves it in a `PluginHost` under `wrk` load,
//!    swaps it 200 times between two versions: the pause of each swap.
//!
//! Needs `wrk` and `nginx` (Debian packages; `scripts/bench-proxy` installs
//! them). Run: `scripts/bench-proxy` or `cargo bench -p molt-e2e --bench proxy`.

use std::collections::BTreeMap;
use std::error::Error;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use front::{FrontConfig, Router};
use image_spec::{InstanceName, ServiceName};
use molt_e2e::{TestCluster, copy_example, push_main, set_version, write_file};
use shell::instance::{Instance, InstanceConfig, PublicPorts, Strategy};
use shell::plugin::{PluginHost, provide_sdk};

type Res<T> = Result<T, Box<dyn Error + Send + Sync>>;

/// What `wrk --latency` reported.
#[derive(Debug, Default, Clone, Copy)]
struct Wrk {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    requests: u64,
    failed: u64,
}

fn ms(value: &str) -> f64 {
    let (num, factor) = if let Some(v) = value.strip_suffix("us") {
        (v, 0.001)
    } else if let Some(v) = value.strip_suffix("ms") {
        (v, 1.0)
    } else if let Some(v) = value.strip_suffix('s') {
        (v, 1000.0)
    } else {
        (value, 1.0)
    };
    num.parse::<f64>().unwrap_or(f64::NAN) * factor
}

fn parse_wrk(out: &str) -> Wrk {
    let mut w = Wrk::default();
    for line in out.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["Requests/sec:", v] => w.rps = v.parse().unwrap_or(f64::NAN),
            ["50%", v] => w.p50_ms = ms(v),
            ["99%", v] => w.p99_ms = ms(v),
            [n, "requests", "in", ..] => w.requests = n.parse().unwrap_or(0),
            ["Non-2xx", "or", "3xx", "responses:", n] => w.failed += n.parse().unwrap_or(0),
            ["Socket", "errors:", rest @ ..] => {
                // connect N, read N, write N, timeout N
                w.failed += rest
                    .iter()
                    .filter_map(|t| t.trim_end_matches(',').parse::<u64>().ok())
                    .sum::<u64>();
            }
            _ => {}
        }
    }
    w
}

fn wrk_spawn(addr: SocketAddr, secs: u32) -> Res<Child> {
    Ok(Command::new("wrk")
        .args(["-t2", "-c32", &format!("-d{secs}s"), "--latency"])
        .arg(format!("http://{addr}/"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?)
}

fn wrk_wait(child: Child) -> Res<Wrk> {
    let out = child.wait_with_output()?;
    if !out.status.success() {
        return Err(format!("wrk failed: {}", String::from_utf8_lossy(&out.stderr)).into());
    }
    Ok(parse_wrk(&String::from_utf8_lossy(&out.stdout)))
}

async fn wrk(addr: SocketAddr, secs: u32) -> Res<Wrk> {
    let child = wrk_spawn(addr, secs)?;
    tokio::task::spawn_blocking(move || wrk_wait(child)).await?
}

fn free_port() -> Res<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// nginx as a keep-alive reverse proxy to `backend`; returns it and its address.
fn nginx(dir: &Path, backend: SocketAddr) -> Res<(Child, SocketAddr)> {
    let port = free_port()?;
    std::fs::create_dir_all(dir.join("logs"))?;
    let conf = dir.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "worker_processes 2;\npid {dir}/nginx.pid;\nerror_log {dir}/logs/error.log;\n\
             events {{ worker_connections 1024; }}\n\
             http {{\n  access_log off;\n\
               client_body_temp_path {dir}/body; proxy_temp_path {dir}/proxy;\n\
               fastcgi_temp_path {dir}/fcgi; uwsgi_temp_path {dir}/uwsgi; scgi_temp_path {dir}/scgi;\n\
               upstream app {{ server {backend}; keepalive 64; }}\n\
               server {{\n    listen 127.0.0.1:{port};\n\
                 location / {{ proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection \"\";\n\
                   proxy_set_header X-Forwarded-For $remote_addr; }}\n\
               }}\n}}\n",
            dir = dir.display()
        ),
    )?;
    let child = Command::new("nginx")
        .arg("-c")
        .arg(&conf)
        .arg("-p")
        .arg(dir)
        .args(["-g", "daemon off;"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    for _ in 0..100 {
        if std::net::TcpStream::connect(addr).is_ok() {
            return Ok((child, addr));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err("nginx did not start".into())
}

/// How many times each path is measured.
const ROUNDS: usize = 3;

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Each figure's median over `runs`; failures summed.
fn median_run(runs: &[Wrk]) -> Wrk {
    let of = |f: fn(&Wrk) -> f64| median(&runs.iter().map(f).collect::<Vec<_>>());
    Wrk {
        rps: of(|w| w.rps),
        p50_ms: of(|w| w.p50_ms),
        p99_ms: of(|w| w.p99_ms),
        requests: runs.iter().map(|w| w.requests).sum(),
        failed: runs.iter().map(|w| w.failed).sum(),
    }
}

fn percentile(sorted: &[Duration], p: usize) -> Duration {
    sorted[(sorted.len() * p / 100).min(sorted.len() - 1)]
}

fn main() -> Res<()> {
    for tool in ["wrk", "nginx"] {
        if Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .map(|s| !s.success())
            .unwrap_or(true)
        {
            return Err(
                format!("`{tool}` is not installed (scripts/bench-proxy installs it)").into(),
            );
        }
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(bench())
}

async fn bench() -> Res<()> {
    let cluster = TestCluster::start().await;
    let orders_dir = cluster.path("orders");
    copy_example("orders", &orders_dir);
    let dev = cluster.repo_client("user/ada/developer").await;
    let repo = cluster.repo_client("shell/bench").await;
    let v1 = dev.push(&orders_dir, &push_main("v1"), |_| {}).await?;
    set_version(&orders_dir.join("src/main.rs"), "2");
    let v2 = dev.push(&orders_dir, &push_main("v2"), |_| {}).await?;
    let orders = ServiceName::new("orders")?;
    let to = |c| BTreeMap::from([(orders.clone(), c)]);
    let mut instance = Instance::open(InstanceConfig {
        name: InstanceName::new("bench")?,
        root: cluster.path("instance"),
        public_ports: PublicPorts::Ephemeral,
        public_ip: shell::instance::LOOPBACK,
    })
    .await?;
    // Build both versions once, so the swaps below reuse their releases.
    instance.upgrade(&repo, &to(v2.commit), None, "v2").await?;
    instance.upgrade(&repo, &to(v1.commit), None, "v1").await?;
    let direct = instance.backend_addr(&orders, "main").ok_or("no backend")?;
    // The front on its own, in front of the same process as nginx.
    let router = Router::new();
    router.set([("orders/main".to_owned(), Some(direct))]);
    let alone = front::bind_http(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        router.route("orders/main"),
        Duration::from_secs(5),
        &FrontConfig::default(),
    )
    .await?;
    let (mut nginx, via_nginx) = nginx(&cluster.path("nginx"), direct)?;

    println!(
        "keep-alive GET / on examples/orders: wrk -t2 -c32 -d5s --latency, {ROUNDS} rounds \
         of front, nginx, direct in turn (1 s of warm-up each first); medians over the rounds\n"
    );
    let paths = [
        ("through the front", alone.local_addr()),
        ("through nginx", via_nginx),
        ("direct", direct),
    ];
    for (_, addr) in paths {
        wrk(addr, 1).await?;
    }
    let mut runs: Vec<Vec<Wrk>> = vec![Vec::new(); paths.len()];
    for _ in 0..ROUNDS {
        for (i, (_, addr)) in paths.iter().enumerate() {
            runs[i].push(wrk(*addr, 5).await?);
        }
    }
    // SIGTERM, so the master takes its workers down with it.
    let _ = Command::new("kill")
        .args(["-TERM", &nginx.id().to_string()])
        .status();
    let _ = nginx.wait();
    alone.shutdown().await;
    let rows: Vec<(&str, Wrk)> = paths
        .iter()
        .zip(&runs)
        .map(|((name, _), r)| (*name, median_run(r)))
        .collect();
    println!(
        "{:<28} {:>12} {:>10} {:>10} {:>10} {:>12}",
        "path", "requests/s", "p50 ms", "p99 ms", "failed", "rps / direct"
    );
    let base = rows[2].1.rps;
    for (name, w) in &rows {
        println!(
            "{name:<28} {:>12.0} {:>10.3} {:>10.3} {:>10} {:>12.2}",
            w.rps,
            w.p50_ms,
            w.p99_ms,
            w.failed,
            w.rps / base
        );
    }
    let per_round = |f: fn(&Wrk) -> f64| -> Vec<f64> {
        runs[0]
            .iter()
            .zip(&runs[1])
            .map(|(a, b)| f(a) / f(b))
            .collect()
    };
    let show = |v: &[f64]| {
        v.iter()
            .map(|r| format!("{r:.2}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let rps = per_round(|w| w.rps);
    let p99 = per_round(|w| w.p99_ms);
    println!(
        "\nfront vs nginx, each round: requests/s {} (median {:.2}x); p99 {} (median {:.2}x)",
        show(&rps),
        median(&rps),
        show(&p99),
        median(&p99)
    );
    let steady = rows[0].1;

    // 20 shadow swaps under the same load, through the instance's own front.
    let front = instance
        .public_addr(&orders, "main")
        .ok_or("no public port")?;
    let load = wrk_spawn(front, 8)?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut swap_times = Vec::new();
    for swap in 0..20 {
        let commit = if swap % 2 == 0 { v2.commit } else { v1.commit };
        let started = std::time::Instant::now();
        instance
            .upgrade_reporting(
                &repo,
                &to(commit),
                None,
                "swap",
                Strategy::Shadow,
                &|_, _| {},
            )
            .await?;
        swap_times.push(started.elapsed());
    }
    let swaps = tokio::task::spawn_blocking(move || wrk_wait(load)).await??;
    swap_times.sort();
    println!(
        "\n20 shadow swaps of orders under the same load (wrk -d8s, swaps in the first {:.1} s):",
        swap_times.iter().sum::<Duration>().as_secs_f64() + 0.5
    );
    println!(
        "  {} requests, {} failed; p99 {:.3} ms during swaps vs {:.3} ms steady ({:.2}x); one swap p50 {:?}, max {:?}",
        swaps.requests,
        swaps.failed,
        swaps.p99_ms,
        steady.p99_ms,
        swaps.p99_ms / steady.p99_ms,
        percentile(&swap_times, 50),
        swap_times[swap_times.len() - 1]
    );
    instance.shutdown().await;

    // Plugin swaps under load.
    let build = cluster.path("counter");
    copy_example("counter", &build);
    provide_sdk(&build)?;
    let lib_src = std::fs::read_to_string(build.join("src/lib.rs"))?;
    let mut libs = Vec::new();
    for v in ["1", "2"] {
        write_file(
            &build,
            "src/lib.rs",
            lib_src
                .replace(
                    "const VERSION: &str = \"1\";",
                    &format!("const VERSION: &str = \"{v}\";"),
                )
                .as_bytes(),
        );
        let ok = Command::new("cargo")
            .args(["build", "--release", "--offline", "--quiet"])
            .current_dir(&build)
            .env_remove("CARGO_TARGET_DIR")
            .status()?
            .success();
        if !ok {
            return Err("building examples/counter failed".into());
        }
        let lib = build.join(format!("v{v}.so"));
        std::fs::copy(build.join("target/release/libcounter.so"), &lib)?;
        libs.push(lib);
    }
    let host = PluginHost::start("counter", &libs[0], &cluster.path("loaded"), None).await?;
    let plugin_steady = wrk(host.local_addr(), 3).await?;
    let load = wrk_spawn(host.local_addr(), 6)?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut pauses = Vec::new();
    for i in 0..200 {
        pauses.push(host.swap(&libs[(i + 1) % 2]).await?.pause);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let during = tokio::task::spawn_blocking(move || wrk_wait(load)).await??;
    host.shutdown().await;
    pauses.sort();
    println!(
        "\nplugin (examples/counter served in-process): {:.0} requests/s steady, p99 {:.3} ms",
        plugin_steady.rps, plugin_steady.p99_ms
    );
    println!(
        "  200 swaps under wrk load: pause p50 {} us, p99 {} us, max {} us; {} requests, {} failed, p99 {:.3} ms",
        percentile(&pauses, 50).as_micros(),
        percentile(&pauses, 99).as_micros(),
        pauses[pauses.len() - 1].as_micros(),
        during.requests,
        during.failed,
        during.p99_ms
    );
    Ok(())
}
