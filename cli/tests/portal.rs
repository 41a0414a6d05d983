//! The portal as the real binary: `molt portal` as a child process, shells as
//! child processes attached to it, and the CLI through its API — targets,
//! `molt deploy --target`, `molt deployments`, `molt deployment show -f`. The
//! portal is killed with SIGKILL in the middle of a deployment and started
//! again on the same data: the deployment is carried on from the shells'
//! reports and ends `succeeded`; nothing stays running.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{Cluster, MOLT, write};
use serde_json::Value;

/// A free port on 127.0.0.1 for UDP (QUIC) and one for TCP (HTTP).
fn free_ports() -> (SocketAddr, SocketAddr) {
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    (udp.local_addr().unwrap(), tcp.local_addr().unwrap())
}

/// Starts `molt portal` and waits for its first line.
fn start_portal(c: &Cluster, quic: SocketAddr, http: SocketAddr) -> Child {
    let mut child = Command::new(MOLT)
        .arg("--config")
        .arg(c.config())
        .arg("--repo")
        .arg(c.addr.unwrap().to_string())
        .args([
            "portal",
            "--listen",
            &quic.to_string(),
            "--http",
            &http.to_string(),
        ])
        .arg("--data")
        .arg(c.dir.path().join("portal-data"))
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    assert!(first.starts_with("portal: shells attach on"), "{first}");
    std::thread::spawn(move || for _ in lines {});
    child
}

/// Starts `molt shell` attached to the portal, with no listener of its own.
fn start_attached_shell(c: &Cluster, name: &str, portal: SocketAddr) -> Child {
    let out = c.molt(&["cert", "issue", "--role", "shell", "--name", name]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Command::new(MOLT)
        .env("XDG_CACHE_HOME", c.dir.path().join("cache"))
        .env("MOLT_RUN_DIR", c.dir.path().join("run"))
        .arg("--config")
        .arg(c.config())
        .arg("--repo")
        .arg(c.addr.unwrap().to_string())
        .args([
            "shell",
            "--instance",
            name,
            "--stage",
            "staging",
            "--portal",
        ])
        .arg(portal.to_string())
        .arg("--root")
        .arg(c.dir.path().join(name))
        .arg("--ephemeral-ports")
        .stderr(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap()
}

/// `molt ARGS` through the portal's API with the first admin's token.
fn through(c: &Cluster, http: SocketAddr, args: &[&str]) -> Output {
    let token = std::fs::read_to_string(c.dir.path().join("portal-data/admin.token")).unwrap();
    Command::new(MOLT)
        .env("MOLT_TOKEN", token.trim())
        .arg("--config")
        .arg(c.config())
        .arg("--portal-url")
        .arg(format!("http://{http}"))
        .args(args)
        .output()
        .unwrap()
}

fn through_json(c: &Cluster, http: SocketAddr, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.push("--json");
    let out = through(c, http, &all);
    assert!(
        out.status.success(),
        "molt {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn wait_for(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn copy_hello(dst: &Path) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/hello");
    for file in ["service.toml", "server.py"] {
        write(dst, file, &std::fs::read(src.join(file)).unwrap());
    }
}

#[test]
fn a_portal_killed_mid_deployment_carries_it_on_after_its_restart() {
    let c = Cluster::init();
    let (quic, http) = free_ports();
    let mut portal = start_portal(&c, quic, http);

    // Two images of `hello`; the second builds slowly, so the kill lands in it.
    let dir = c.dir.path().join("src/hello");
    copy_hello(&dir);
    let dir_s = dir.to_str().unwrap();
    c.molt_json(&["push", dir_s, "-m", "v1"]);
    c.molt_json(&["image", "create", "v1", "--set", "hello=main"]);
    let toml = std::fs::read_to_string(dir.join("service.toml")).unwrap();
    let slow =
        toml.replace("hello from molt", "hello v2") + "\n[build]\ncommand = [\"sleep\", \"3\"]\n";
    write(&dir, "service.toml", slow.as_bytes());
    c.molt_json(&["push", dir_s, "-m", "v2"]);
    c.molt_json(&["image", "create", "v2", "--set", "hello=main"]);

    let mut shells = [
        start_attached_shell(&c, "k-1", quic),
        start_attached_shell(&c, "k-2", quic),
    ];
    let target = through_json(
        &c,
        http,
        &[
            "target",
            "create",
            "t",
            "--stage",
            "staging",
            "--instances",
            "k-1,k-2",
            "--rollout",
            "one-by-one",
        ],
    );
    assert_eq!(target["stage"], "staging");
    wait_for("both shells online", || {
        let list = through_json(&c, http, &["instances"]);
        list.as_array()
            .unwrap()
            .iter()
            .filter(|i| i["online"] == true)
            .count()
            == 2
    });

    // v1 through the CLI, followed to its end.
    let done = through(&c, http, &["deploy", "v1", "--target", "t"]);
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    let followed = String::from_utf8_lossy(&done.stderr);
    assert!(
        followed.contains("k-1:") && followed.contains("deployment succeeded"),
        "{followed}"
    );

    // v2: queued, then the portal is killed while k-1 builds.
    let d = through_json(&c, http, &["deploy", "v2", "--target", "t", "--no-wait"]);
    let id = d["id"].as_u64().unwrap().to_string();
    wait_for("k-1 building", || {
        let events = through_json(&c, http, &["deployment", "show", &id]);
        events["instances"]["k-1"]["state"] == "running"
    });
    std::thread::sleep(Duration::from_millis(500));
    portal.kill().unwrap();
    portal.wait().unwrap();

    let mut portal = start_portal(&c, quic, http);
    let out = through(&c, http, &["deployment", "show", &id, "-f", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let d: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(d["state"], "succeeded", "{d}");
    for i in ["k-1", "k-2"] {
        assert_eq!(d["instances"][i]["state"], "succeeded", "{d}");
        assert_eq!(d["instances"][i]["generation"], 2, "{d}");
    }
    assert_eq!(
        through_json(&c, http, &["deployments", "--status", "running"]),
        Value::Array(vec![])
    );
    let history = through(&c, http, &["deployments", "--target", "t"]);
    let text = String::from_utf8_lossy(&history.stdout);
    assert!(text.contains("v2") && text.contains("succeeded"), "{text}");

    // k-1's shell replaced by a new one (molt shell takeover): it attaches
    // again under the same name and carries the portal's next deployment.
    let out = Command::new(MOLT)
        .env("XDG_CACHE_HOME", c.dir.path().join("cache"))
        .env("MOLT_RUN_DIR", c.dir.path().join("run"))
        .args(["shell", "takeover", "--instance", "k-1"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(shells[0].wait().unwrap().success(), "the old shell of k-1");
    let record: Value =
        serde_json::from_slice(&std::fs::read(c.dir.path().join("k-1/shell.json")).unwrap())
            .unwrap();
    let taker = record["pid"].as_u64().unwrap();
    assert_ne!(taker, u64::from(shells[0].id()));
    wait_for("k-1 online again", || {
        let list = through_json(&c, http, &["instances"]);
        list.as_array()
            .unwrap()
            .iter()
            .any(|i| i["name"] == "k-1" && i["online"] == true)
    });
    let d = through_json(&c, http, &["deploy", "v1", "--target", "t", "--no-wait"]);
    let id = d["id"].as_u64().unwrap().to_string();
    let out = through(&c, http, &["deployment", "show", &id, "-f", "--json"]);
    let d: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(d["state"], "succeeded", "{d}");
    assert_eq!(d["instances"]["k-1"]["generation"], 3, "{d}");

    common::kill_pid(taker as u32, "-9");
    for shell in &mut shells[1..] {
        shell.kill().unwrap();
        shell.wait().unwrap();
    }
    portal.kill().unwrap();
    portal.wait().unwrap();
}
