//! Benchmark: what the portal costs — a one-service change through the portal
//! next to the same change sent straight to the shell, and 200 shells attached
//! to one portal: its memory per instance and the fan-out of one deployment —
//! all measured against a baseline in the same run.
//!
//! The portal runs as its own process (`molt portal`, from `MOLT_BENCH_MOLT`,
//! default `target/release/molt`), so its memory is read from
//! `/proc/PID/status` alone; the repository server and the shells run in this
//! process, each shell a real `shell::service::bind` with its own root, its own
//! listener and the connection it dials to the portal.
//!
//! 1. **Overhead.** One development shell runs `examples/hello`. For
//!    `MOLT_BENCH_TRIALS` trials (default 10), interleaved (the order flips every
//!    trial), the same kind of change (a new `GREETING` in `service.toml`, its
//!    own image each time) goes out
//!    - through the portal: `POST /api/v1/deployments`, then its event stream
//!      followed (as `molt deploy` does) until the deployment ends `succeeded`;
//!    - directly, as `molt deploy --instance` does: a deployer's connection to
//!      the shell's listener and `ShellRequest::Upgrade`, until it answers.
//!
//!    "served" is trigger → the first answer of the new greeting on the
//!    instance's public port (polled every millisecond from the trigger on),
//!    "done" trigger → the deployment ended (portal) or the upgrade answered
//!    (direct).
//! 2. **Fan-out.** `MOLT_BENCH_SHELLS` shells (default 200) attach to a fresh
//!    portal, each running `tiny` — a Perl one-liner that answers HTTP with its
//!    `VERSION` (a real supervised process behind a real front, health-checked
//!    by TCP). The portal's VmRSS is read before and after they attach. The
//!    first install goes straight to the shells, `MOLT_BENCH_INSTALL_AT_ONCE`
//!    (default 25) at a time. Then, `MOLT_BENCH_ROUNDS` times (default 2), a
//!    trivial change (`VERSION`) goes to all of them as one deployment with
//!    rollout `all` (trigger → the deployment `succeeded`, with the portal's
//!    own timestamps split into queue / plans / upgrades / end), and the next
//!    change straight to all shells at once over their listeners (trigger →
//!    every upgrade answered); after each, every instance is checked to serve
//!    the new version. Each phase prints the machine's UDP receive-buffer
//!    drops (`/proc/net/snmp`): every shell dials the repository when its
//!    upgrade fetches, so a rollout `all` is that many QUIC handshakes at once.
//!
//! Run: `scripts/bench-portal` (builds `molt` first), or `cargo bench -p
//! molt-e2e --bench portal` with `MOLT_BENCH_MOLT` naming a built `molt`.

use std::collections::BTreeMap;
use std::error::Error;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use image_spec::{Image, ImageName, ServiceName};
use molt_e2e::bench::{env_or, wait_for_line};
use molt_e2e::portal::Api;
use molt_e2e::{TestCluster, copy_example, push_main, version_of, write_file};
use serde_json::{Value, json};
use tokio::io::BufReader;
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use wire::shell::{ShellRequest, ShellResponse, Stage};
use wire::{Client, Identity};

type Res<T> = Result<T, Box<dyn Error + Send + Sync>>;

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

/// The median and the 90th percentile (nearest rank) of `values`.
fn median_p90(values: &[Duration]) -> (Duration, Duration) {
    let mut v = values.to_vec();
    v.sort();
    if v.is_empty() {
        return (Duration::ZERO, Duration::ZERO);
    }
    let p90 = v[(v.len() * 9).div_ceil(10).saturating_sub(1)];
    (v[v.len() / 2], p90)
}

fn main() -> Res<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(bench())
}

async fn bench() -> Res<()> {
    let trials = env_or("MOLT_BENCH_TRIALS", 10);
    let shells = env_or("MOLT_BENCH_SHELLS", 200);
    let rounds = env_or("MOLT_BENCH_ROUNDS", 2);
    let molt = std::env::var_os("MOLT_BENCH_MOLT")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/molt"));
    if !molt.is_file() {
        return Err(format!(
            "no molt binary at {} (cargo build --release -p molt, or set MOLT_BENCH_MOLT)",
            molt.display()
        )
        .into());
    }
    let cluster = TestCluster::start().await;
    let overhead = if trials > 0 {
        Some(overhead(&cluster, &molt, trials).await?)
    } else {
        None
    };
    let fanout = if shells > 0 {
        Some(fanout(&cluster, &molt, shells, rounds).await?)
    } else {
        None
    };

    println!("\n== summary ==");
    if let Some(o) = overhead {
        o.print();
    }
    if let Some(f) = fanout {
        f.print();
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// The portal as a child process

/// `molt portal` running in its own process, on fresh ports and data.
struct ChildPortal {
    child: tokio::process::Child,
    pid: u32,
    quic: SocketAddr,
    api: Api,
}

impl ChildPortal {
    async fn start(cluster: &TestCluster, molt: &Path, name: &str) -> Res<Self> {
        let dir = cluster.path(name);
        let certs = dir.join("certs");
        cluster.credentials("portal").write(&certs, "portal")?;
        let config = dir.join("molt.toml");
        std::fs::write(
            &config,
            format!(
                "repo = \"{}\"\ncert = \"certs/portal.crt\"\nkey = \"certs/portal.key\"\n\
                 ca = \"certs/ca.crt\"\n\n[portal_server]\ndata = \"data\"\n\
                 listen = \"127.0.0.1:0\"\nhttp = \"127.0.0.1:0\"\n\
                 cert = \"certs/portal.crt\"\nkey = \"certs/portal.key\"\n",
                cluster.repo_addr
            ),
        )?;
        let log = dir.join("portal.log");
        let child = tokio::process::Command::new(molt)
            .arg("--config")
            .arg(&config)
            .arg("portal")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .kill_on_drop(true)
            .spawn()?;
        let pid = child.id().ok_or("the portal exited at once")?;
        // "portal: shells attach on ADDR (QUIC); API on http://ADDR (data in …)"
        let line = wait_for_line(&log, "portal: shells attach on").await?;
        let quic = line
            .split_whitespace()
            .next()
            .ok_or("no QUIC address")?
            .parse::<SocketAddr>()?;
        let http = line
            .split("http://")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .ok_or("no HTTP address")?
            .parse::<SocketAddr>()?;
        let token = std::fs::read_to_string(dir.join("data").join(portal::ADMIN_TOKEN_FILE))?
            .trim()
            .to_owned();
        Ok(Self {
            child,
            pid,
            quic,
            api: Api {
                addr: http,
                token: Some(token),
                headers: Vec::new(),
                tls: None,
            },
        })
    }

    /// A field of `/proc/PID/status` in KiB (`VmRSS`, `VmHWM`).
    fn status_kib(&self, field: &str) -> Res<u64> {
        proc_status_kib(self.pid, field)
    }

    /// The portal's CPU time so far (user + system).
    fn cpu(&self) -> Res<Duration> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid))?;
        // Fields after the command name (which ends with the last ')').
        let rest = stat.rsplit(')').next().ok_or("bad /proc stat")?;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // utime and stime are fields 14 and 15 of the whole line: 11 and 12 here.
        let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
        Ok(Duration::from_millis(ticks * 10))
    }

    fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

fn proc_status_kib(pid: u32, field: &str) -> Res<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with(&format!("{field}:")))
        .ok_or_else(|| format!("no {field} in /proc/{pid}/status"))?;
    Ok(line.split_whitespace().nth(1).ok_or("no value")?.parse()?)
}

/// UDP datagrams the kernel dropped for want of receive buffer space, so far
/// (machine-wide, `/proc/net/snmp`).
fn udp_rcvbuf_errors() -> u64 {
    let snmp = std::fs::read_to_string("/proc/net/snmp").unwrap_or_default();
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp:"));
    let (Some(names), Some(values)) = (udp.next(), udp.next()) else {
        return 0;
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "RcvbufErrors")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

/// Datagrams dropped so far at the UDP socket bound to local `port`
/// (`/proc/net/udp`, last column).
fn udp_socket_drops(port: u16) -> u64 {
    let mut total = 0;
    for table in ["/proc/net/udp", "/proc/net/udp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let local_port = fields
                .get(1)
                .and_then(|a| a.rsplit(':').next())
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            if local_port == Some(port) {
                total += fields.last().and_then(|d| d.parse().ok()).unwrap_or(0);
            }
        }
    }
    total
}

/// UDP receive-buffer drops since `Drops::now`: machine-wide, and at the
/// repository's and the portal's sockets.
struct Drops {
    all: u64,
    repo: (u16, u64),
    portal: (u16, u64),
}

impl Drops {
    fn now(repo: SocketAddr, portal: SocketAddr) -> Self {
        Self {
            all: udp_rcvbuf_errors(),
            repo: (repo.port(), udp_socket_drops(repo.port())),
            portal: (portal.port(), udp_socket_drops(portal.port())),
        }
    }

    fn since(&self) -> String {
        let all = udp_rcvbuf_errors() - self.all;
        let repo = udp_socket_drops(self.repo.0) - self.repo.1;
        let portal = udp_socket_drops(self.portal.0) - self.portal.1;
        format!("UDP receive-buffer drops {all}: {repo} at the repository, {portal} at the portal")
    }
}

/// The soft limit of open files of this process.
fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

// ---------------------------------------------------------------------------
// Shells, images, requests

/// A real shell: its own root, a listener of its own and the portal's connection.
struct BenchShell {
    name: String,
    listen: SocketAddr,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

async fn start_shell(cluster: &TestCluster, portal: SocketAddr, name: &str) -> Res<BenchShell> {
    let config = shell::service::ShellConfig {
        instance: shell::instance::InstanceConfig {
            name: name.parse()?,
            root: cluster.path(&format!("instances/{name}")),
            public_ports: shell::instance::PublicPorts::Ephemeral,
            public_ip: shell::instance::LOOPBACK,
        },
        stage: Stage::Development,
        repo: cluster.repo_addr,
        credentials: cluster.credentials(&format!("shell/{name}")),
        listen: Some("127.0.0.1:0".parse()?),
        portal: Some(portal),
        labels: BTreeMap::new(),
        strategy: Stage::Development.default_strategy(),
    };
    let bound = shell::service::bind(config).await?;
    let listen = bound.local_addr()?;
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    let task = tokio::spawn(async move {
        bound.serve(stop).await;
    });
    Ok(BenchShell {
        name: name.to_owned(),
        listen,
        shutdown,
        task,
    })
}

async fn stop_shells(shells: Vec<BenchShell>) {
    for s in &shells {
        s.shutdown.cancel();
    }
    for s in shells {
        let _ = s.task.await;
    }
}

/// Makes image `name` of one service at `commit`.
async fn make_image(
    cluster: &TestCluster,
    name: &str,
    service: &str,
    commit: image_spec::CommitId,
) -> Res<()> {
    let admin = cluster.repo_client("user/root/admin").await;
    let image = Image::new(
        ImageName::new(name)?,
        String::new(),
        BTreeMap::from([(ServiceName::new(service)?, commit)]),
    )?;
    admin.create_image(image).await?;
    Ok(())
}

/// The direct path, as `molt deploy --instance` takes it: connect as a
/// deployer, send the upgrade, wait for its answer.
async fn deploy_direct(client: &Client, shell: &BenchShell, image: &str) -> Res<()> {
    let conn = client
        .connect(
            shell.listen,
            &Identity::Shell {
                instance: shell.name.parse()?,
            },
        )
        .await?;
    let req = ShellRequest::Upgrade {
        image: ImageName::new(image)?,
        strategy: None,
        deployment: None,
        skip_hooks: false,
        keep_releases: None,
    };
    let answer = wire::shell::call(&conn, &req, |_| {}).await?;
    conn.close();
    match answer {
        Ok(ShellResponse::Upgraded(_)) => Ok(()),
        other => Err(format!("{}: upgrade to {image} answered {other:?}", shell.name).into()),
    }
}

/// Sends `image` straight to every shell, `at_once` at a time, each from a
/// client of its own (its own UDP socket, as that many `molt deploy
/// --instance` processes would); how long until every upgrade answered. Any
/// failure is an error naming them.
async fn deploy_all_direct(
    deployer: &wire::Credentials,
    shells: &Arc<Vec<BenchShell>>,
    image: &str,
    at_once: usize,
) -> Res<Duration> {
    let permits = Arc::new(tokio::sync::Semaphore::new(at_once));
    let trigger = Instant::now();
    let mut all = JoinSet::new();
    for i in 0..shells.len() {
        let (deployer, shells, image) = (deployer.clone(), shells.clone(), image.to_owned());
        let permits = permits.clone();
        all.spawn(async move {
            let _permit = permits.acquire_owned().await?;
            let client = Client::new(&deployer, shells[i].listen)?;
            deploy_direct(&client, &shells[i], &image).await
        });
    }
    let mut failures = Vec::new();
    while let Some(done) = all.join_next().await {
        match done {
            Ok(Ok(())) => {}
            Ok(Err(e)) => failures.push(e.to_string()),
            Err(e) => failures.push(e.to_string()),
        }
    }
    let took = trigger.elapsed();
    if failures.is_empty() {
        Ok(took)
    } else {
        let shown: Vec<&str> = failures.iter().take(5).map(String::as_str).collect();
        Err(format!(
            "{} of {} direct upgrades to {image} failed after {} ms, e.g.: {}",
            failures.len(),
            shells.len(),
            ms(took),
            shown.join("; ")
        )
        .into())
    }
}

/// The public address of `service`'s first port on `shell`, as its status says.
async fn public_addr(client: &Client, shell: &BenchShell, service: &str) -> Res<SocketAddr> {
    let conn = client
        .connect(
            shell.listen,
            &Identity::Shell {
                instance: shell.name.parse()?,
            },
        )
        .await?;
    let answer = wire::shell::call(&conn, &ShellRequest::Status, |_| {}).await?;
    conn.close();
    let Ok(ShellResponse::Status(status)) = answer else {
        return Err(format!("{}: status answered {answer:?}", shell.name).into());
    };
    let addr = status
        .services
        .get(&ServiceName::new(service)?)
        .and_then(|s| s.ports.values().next())
        .ok_or_else(|| format!("{}: {service} has no public port", shell.name))?;
    Ok(addr.parse()?)
}

/// The body of one GET on a new connection, if it answers 200.
async fn get_body(addr: SocketAddr) -> Option<String> {
    let mut conn = BufReader::new(TcpStream::connect(addr).await.ok()?);
    match molt_e2e::get(&mut conn, "/").await {
        Ok((200, body)) => Some(body),
        _ => None,
    }
}

/// Polls `addr` every millisecond until `served(body)`; the time from `since`.
async fn until_served(
    addr: SocketAddr,
    since: Instant,
    served: impl Fn(&str) -> bool,
) -> Res<Duration> {
    let deadline = since + Duration::from_secs(120);
    loop {
        if let Some(body) = get_body(addr).await
            && served(&body)
        {
            return Ok(since.elapsed());
        }
        if Instant::now() > deadline {
            return Err(format!("{addr} never served the new version").into());
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Creates a deployment of `image` to `target`; its id.
async fn post_deployment(api: &Api, target: &str, image: &str) -> Res<u64> {
    let (status, d) = api
        .call(
            "POST",
            "/api/v1/deployments",
            Some(&json!({ "target": target, "image": image })),
        )
        .await;
    if status != 201 && status != 200 {
        return Err(format!("POST /api/v1/deployments: {status} {d}").into());
    }
    d["id"]
        .as_u64()
        .ok_or_else(|| format!("no id in {d}").into())
}

/// Follows deployment `id`'s event stream (as `molt deploy` does) until it
/// ends, then reads its record: it must have succeeded.
async fn until_ended(api: &Api, id: u64) -> Res<Value> {
    api.stream_events(id, None, usize::MAX).await;
    let (status, d) = api
        .call("GET", &format!("/api/v1/deployments/{id}"), None)
        .await;
    match (status, d["state"].as_str()) {
        (200, Some("succeeded")) => Ok(d),
        _ => {
            let failure: String = d["failure"]
                .as_str()
                .unwrap_or("")
                .chars()
                .take(600)
                .collect();
            Err(format!(
                "deployment {id} did not succeed: {status} {}: {failure}",
                d["state"]
            )
            .into())
        }
    }
}

// ---------------------------------------------------------------------------
// 1. Overhead: one change through the portal vs straight to the shell

struct Overhead {
    trials: usize,
    portal_served: Vec<Duration>,
    portal_done: Vec<Duration>,
    direct_served: Vec<Duration>,
    direct_done: Vec<Duration>,
}

impl Overhead {
    fn print(&self) {
        let (ps, ps90) = median_p90(&self.portal_served);
        let (pd, pd90) = median_p90(&self.portal_done);
        let (ds, ds90) = median_p90(&self.direct_served);
        let (dd, dd90) = median_p90(&self.direct_done);
        println!(
            "portal overhead, one-service change on one instance (hello), {} interleaved trials, ms:",
            self.trials
        );
        println!(
            "  {:<22} {:>9} {:>9} {:>9} {:>9} {:>13} {:>15}",
            "", "portal", "p90", "direct", "p90", "portal/direct", "portal-direct"
        );
        for (what, p, p90, d, d90) in [
            ("trigger -> served", ps, ps90, ds, ds90),
            ("trigger -> done", pd, pd90, dd, dd90),
        ] {
            println!(
                "  {what:<22} {:>9} {:>9} {:>9} {:>9} {:>12.2}x {:>15}",
                ms(p),
                ms(p90),
                ms(d),
                ms(d90),
                p.as_secs_f64() / d.as_secs_f64(),
                format!("{:+.1}", (p.as_secs_f64() - d.as_secs_f64()) * 1000.0)
            );
        }
    }
}

const HELLO: &str = "hello";

async fn overhead(cluster: &TestCluster, molt: &Path, trials: usize) -> Res<Overhead> {
    println!("== portal overhead: {trials} trials ==");
    // Every image up front: one warm-up, then one per trial and path.
    let dev = cluster.repo_client("user/ada/developer").await;
    let src = cluster.path("src/hello");
    copy_example(HELLO, &src);
    let toml = std::fs::read_to_string(src.join("service.toml"))?;
    if !toml.contains("hello from molt") {
        return Err("examples/hello/service.toml has no `hello from molt` greeting".into());
    }
    for k in 0..=2 * trials {
        let greeting = format!("overhead {k}");
        write_file(
            &src,
            "service.toml",
            toml.replace("hello from molt", &greeting).as_bytes(),
        );
        let pushed = dev.push(&src, &push_main(&greeting), |_| {}).await?;
        make_image(cluster, &format!("ov-{k}"), HELLO, pushed.commit).await?;
    }

    let portal = ChildPortal::start(cluster, molt, "portal-overhead").await?;
    let api = portal.api.clone();
    api.post(
        "/api/v1/targets",
        json!({ "name": "ov", "stage": "development", "instances": ["ov-1"],
                "settings": { "rollout": "all" } }),
    )
    .await;
    let shell = start_shell(cluster, portal.quic, "ov-1").await?;
    wait_online(&api, 1, Duration::from_secs(60)).await?;
    let deployer = Client::new(&cluster.credentials("user/ada/deployer"), cluster.repo_addr)?;

    // Warm-up (the first install): through the portal.
    let id = post_deployment(&api, "ov", "ov-0").await?;
    until_ended(&api, id).await?;
    let addr = public_addr(&deployer, &shell, HELLO).await?;

    let mut o = Overhead {
        trials,
        portal_served: Vec::new(),
        portal_done: Vec::new(),
        direct_served: Vec::new(),
        direct_done: Vec::new(),
    };
    println!(
        "{:>5} {:>14} {:>12} {:>14} {:>12}",
        "trial", "portal served", "portal done", "direct served", "direct done"
    );
    let mut next = 1;
    for trial in 1..=trials {
        let portal_first = trial % 2 == 1;
        let mut row = [Duration::ZERO; 4];
        for path in 0..2 {
            let through_portal = (path == 0) == portal_first;
            let image = format!("ov-{next}");
            let greeting = format!("overhead {next}");
            next += 1;
            let trigger = Instant::now();
            let served = until_served(addr, trigger, |b| version_of(b) == greeting);
            if through_portal {
                let deploy = async {
                    let id = post_deployment(&api, "ov", &image).await?;
                    until_ended(&api, id).await?;
                    Res::Ok(trigger.elapsed())
                };
                let (served, done) = tokio::join!(served, deploy);
                row[0] = served?;
                row[1] = done?;
            } else {
                let deploy = async {
                    deploy_direct(&deployer, &shell, &image).await?;
                    Res::Ok(trigger.elapsed())
                };
                let (served, done) = tokio::join!(served, deploy);
                row[2] = served?;
                row[3] = done?;
            }
        }
        println!(
            "{trial:>5} {:>14} {:>12} {:>14} {:>12}",
            ms(row[0]),
            ms(row[1]),
            ms(row[2]),
            ms(row[3])
        );
        o.portal_served.push(row[0]);
        o.portal_done.push(row[1]);
        o.direct_served.push(row[2]);
        o.direct_done.push(row[3]);
    }
    o.print();
    stop_shells(vec![shell]).await;
    portal.stop().await;
    Ok(o)
}

/// Waits until the portal lists at least `n` instances online.
async fn wait_online(api: &Api, n: usize, timeout: Duration) -> Res<Duration> {
    let started = Instant::now();
    loop {
        let (status, list) = api.call("GET", "/api/v1/instances", None).await;
        let online = list
            .as_array()
            .into_iter()
            .flatten()
            .filter(|i| i["online"] == true)
            .count();
        if status == 200 && online >= n {
            return Ok(started.elapsed());
        }
        if started.elapsed() > timeout {
            return Err(format!("only {online} of {n} instances came online").into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ---------------------------------------------------------------------------
// 2. Fan-out: N shells on one portal

/// A Perl HTTP server that answers every request with `$VERSION`.
const TINY_SERVER: &str = r#"use IO::Socket::INET;
my $s = IO::Socket::INET->new(LocalAddr => "127.0.0.1", LocalPort => $ENV{PORT},
    Listen => 128, ReuseAddr => 1) or die "cannot listen on $ENV{PORT}: $!";
while (my $c = $s->accept) {
    while (my $line = <$c>) { last if $line =~ /^\r?\n$/ }
    my $body = "{\"version\":\"$ENV{VERSION}\"}\n";
    print $c "HTTP/1.1 200 OK\r\nContent-Length: " . length($body)
        . "\r\nConnection: close\r\n\r\n$body";
    close $c;
}
"#;

fn tiny_manifest(version: &str) -> String {
    format!(
        "name = \"tiny\"\n[run]\ncommand = [\"perl\", \"server.pl\"]\n\
         [[ports]]\nport = 8080\n[health]\ntcp = true\ninterval = \"5s\"\n\
         [env]\nVERSION = \"{version}\"\n[stop]\ngrace = \"2s\"\n"
    )
}

struct Fanout {
    shells: usize,
    rss_empty: u64,
    rss_attached: u64,
    rss_after: u64,
    hwm: u64,
    attach: Duration,
    first_install: Duration,
    portal: Vec<Duration>,
    direct: Vec<Duration>,
    failures: Vec<String>,
}

impl Fanout {
    fn print(&self) {
        let n = self.shells as f64;
        println!("{} shells on one portal:", self.shells);
        println!(
            "  portal VmRSS: {} KiB alone, {} KiB with {} attached, {} KiB after the deployments (VmHWM {} KiB)",
            self.rss_empty, self.rss_attached, self.shells, self.rss_after, self.hwm
        );
        println!(
            "  memory per connected instance: {:.1} KiB attached, {:.1} KiB after deploying",
            self.rss_attached.saturating_sub(self.rss_empty) as f64 / n,
            self.rss_after.saturating_sub(self.rss_empty) as f64 / n
        );
        println!(
            "  all attached in {} ms; first install to all (cold, direct, batched) {} ms",
            ms(self.attach),
            ms(self.first_install)
        );
        let (p, p90) = median_p90(&self.portal);
        let (d, d90) = median_p90(&self.direct);
        println!(
            "  trivial change to all {}, ms: portal (rollout all) median {} p90 {} | direct in parallel median {} p90 {} | portal/direct {:.2}x",
            self.shells,
            ms(p),
            ms(p90),
            ms(d),
            ms(d90),
            p.as_secs_f64() / d.as_secs_f64()
        );
        if !self.failures.is_empty() {
            println!(
                "  FAILED (not in the figures above): {}",
                self.failures.join(", ")
            );
        }
    }
}

/// The portal's own timestamps of deployment `d`: queue, plans, upgrades and
/// the end, in ms.
fn phases(d: &Value) -> String {
    let at = |v: &Value| v.as_i64();
    let created = at(&d["created"]).unwrap_or(0);
    let started = at(&d["started"]).unwrap_or(created);
    let finished = at(&d["finished"]).unwrap_or(started);
    let runs: Vec<&Value> = d["instances"]
        .as_object()
        .map(|m| m.values().collect())
        .unwrap_or_default();
    let first = runs.iter().filter_map(|r| at(&r["started"])).min();
    let last_start = runs.iter().filter_map(|r| at(&r["started"])).max();
    let last = runs.iter().filter_map(|r| at(&r["finished"])).max();
    match (first, last_start, last) {
        (Some(first), Some(last_start), Some(last)) => format!(
            "queued {} ms, plans {} ms, upgrades {} ms (last one began after {} ms), end {} ms",
            started - created,
            first - started,
            last - first,
            last_start - first,
            finished - last
        ),
        _ => "no instance timings".to_owned(),
    }
}

/// Checks that every instance serves `version`.
async fn check_all_serve(addrs: &[SocketAddr], version: &str) -> Res<()> {
    let mut wrong = Vec::new();
    for addr in addrs {
        match get_body(*addr).await {
            Some(body) if version_of(&body) == version => {}
            other => wrong.push(format!("{addr}: {other:?}")),
        }
    }
    if wrong.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{} instances do not serve {version}: {}",
            wrong.len(),
            wrong.join("; ")
        )
        .into())
    }
}

async fn fanout(cluster: &TestCluster, molt: &Path, n: usize, rounds: usize) -> Res<Fanout> {
    println!("\n== {n} shells on one portal, {rounds} rounds ==");
    if let Some(limit) = open_files_limit() {
        let need = n as u64 * 24 + 512;
        println!("open-file limit {limit} (about {need} wanted)");
        if limit < need {
            println!("warning: the open-file limit may be too low; raise it with `ulimit -n`");
        }
    }
    let dev = cluster.repo_client("user/ada/developer").await;
    let src = cluster.path("src/tiny");
    write_file(&src, "server.pl", TINY_SERVER.as_bytes());
    for k in 0..=2 * rounds {
        let version = format!("v{k}");
        write_file(&src, "service.toml", tiny_manifest(&version).as_bytes());
        let pushed = dev.push(&src, &push_main(&version), |_| {}).await?;
        make_image(cluster, &format!("fan-{k}"), "tiny", pushed.commit).await?;
    }

    let portal = ChildPortal::start(cluster, molt, "portal-fanout").await?;
    let api = portal.api.clone();
    let names: Vec<String> = (0..n).map(|i| format!("f-{i:03}")).collect();
    api.post(
        "/api/v1/targets",
        json!({ "name": "fleet", "stage": "development", "instances": names,
                "settings": { "rollout": "all" } }),
    )
    .await;
    let rss_empty = portal.status_kib("VmRSS")?;
    println!(
        "portal (pid {}) alone: VmRSS {rss_empty} KiB, {} fds",
        portal.pid,
        portal.open_fds()
    );

    let started = Instant::now();
    let mut shells = Vec::with_capacity(n);
    for name in &names {
        shells.push(start_shell(cluster, portal.quic, name).await?);
    }
    println!("{n} shells opened in {} ms", ms(started.elapsed()));
    wait_online(&api, n, Duration::from_secs(600)).await?;
    let attach = started.elapsed();
    let rss_attached = portal.status_kib("VmRSS")?;
    println!(
        "all {n} online after {} ms: portal VmRSS {rss_attached} KiB ({:.1} KiB per instance), {} fds; bench process VmRSS {} KiB",
        ms(attach),
        rss_attached.saturating_sub(rss_empty) as f64 / n as f64,
        portal.open_fds(),
        proc_status_kib(std::process::id(), "VmRSS")?
    );

    // The first install (cold: every blob fetched, every process started),
    // straight to the shells, `MOLT_BENCH_INSTALL_AT_ONCE` at a time.
    let at_once = env_or("MOLT_BENCH_INSTALL_AT_ONCE", 25).max(1);
    let deployer_creds = cluster.credentials("user/ada/deployer");
    let deployer = Client::new(&deployer_creds, cluster.repo_addr)?;
    let shells = Arc::new(shells);
    let drops = Drops::now(cluster.repo_addr, portal.quic);
    let first_install = deploy_all_direct(&deployer_creds, &shells, "fan-0", at_once).await?;
    println!(
        "first install, direct, {at_once} at a time: {} ms ({})",
        ms(first_install),
        drops.since()
    );
    let mut addrs = Vec::with_capacity(n);
    for shell in shells.iter() {
        addrs.push(public_addr(&deployer, shell, "tiny").await?);
    }
    check_all_serve(&addrs, "v0").await?;

    let mut portal_times = Vec::new();
    let mut direct_times = Vec::new();
    let mut failures = Vec::new();
    let mut k = 1;
    for round in 1..=rounds {
        // Through the portal: one deployment, rollout all.
        let image = format!("fan-{k}");
        let cpu = portal.cpu()?;
        let drops = Drops::now(cluster.repo_addr, portal.quic);
        let trigger = Instant::now();
        let id = post_deployment(&api, "fleet", &image).await?;
        let d = until_ended(&api, id).await;
        let took = trigger.elapsed();
        match d {
            Ok(d) => {
                println!(
                    "round {round}: portal, {image} to all {n}: {} ms ({}; portal CPU {} ms; {})",
                    ms(took),
                    phases(&d),
                    ms(portal.cpu()? - cpu),
                    drops.since()
                );
                check_all_serve(&addrs, &format!("v{k}")).await?;
                portal_times.push(took);
            }
            Err(e) => {
                println!(
                    "round {round}: portal, {image} to all {n} FAILED after {} ms ({}): {e}",
                    ms(took),
                    drops.since()
                );
                failures.push(format!("portal round {round}"));
            }
        }
        k += 1;

        // Directly: every shell at once over its own listener.
        let image = format!("fan-{k}");
        let drops = Drops::now(cluster.repo_addr, portal.quic);
        match deploy_all_direct(&deployer_creds, &shells, &image, n).await {
            Ok(took) => {
                println!(
                    "round {round}: direct, {image} to all {n} at once: {} ms ({})",
                    ms(took),
                    drops.since()
                );
                check_all_serve(&addrs, &format!("v{k}")).await?;
                direct_times.push(took);
            }
            Err(e) => {
                println!(
                    "round {round}: direct, {image} to all {n} FAILED ({}): {e}",
                    drops.since()
                );
                failures.push(format!("direct round {round}"));
            }
        }
        k += 1;
    }
    let rss_after = portal.status_kib("VmRSS")?;
    let hwm = portal.status_kib("VmHWM")?;
    let f = Fanout {
        shells: n,
        rss_empty,
        rss_attached,
        rss_after,
        hwm,
        attach,
        first_install,
        portal: portal_times,
        direct: direct_times,
        failures,
    };
    f.print();
    let shells = Arc::try_unwrap(shells).map_err(|_| "the shells are still shared")?;
    stop_shells(shells).await;
    portal.stop().await;
    Ok(f)
}
