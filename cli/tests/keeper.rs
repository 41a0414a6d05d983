//! `molt keeper` as a shell starts it: a real process holding real services.
//! Its owner's connection ending (a shell killed with `kill -9`) stops every
//! service and the keeper; the keeper killed with `kill -9` takes its
//! services with it. Either way no service is left that nobody supervises.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::time::Duration;

use common::{Cluster, MOLT, alive, get, start_shell_args, write};
use shell::keeper::{self, Hello, KEEPER_VERSION, KeeperClient, SpawnSpec};

fn wait_until(what: &str, done: impl Fn() -> bool) {
    common::wait_until(what, 20, done);
}

fn sleeper(dir: &Path, label: &str) -> SpawnSpec {
    SpawnSpec {
        program: "sh".into(),
        args: vec!["-c".into(), "exec sleep 300".into()],
        dir: dir.to_owned(),
        env: Vec::new(),
        log: dir.join(format!("{label}.log")),
        log_limit: 1 << 20,
        label: label.into(),
    }
}

/// A keeper started as the shell starts it, and its owner.
fn start(dir: &Path) -> (std::process::Child, KeeperClient) {
    let socket = dir.join("keeper.sock");
    let (token, child) = keeper::start(Path::new(MOLT), &socket, &dir.join("keeper.log")).unwrap();
    let owner = KeeperClient::connect(
        &socket,
        &Hello::Owner {
            version: KEEPER_VERSION,
            token,
        },
    )
    .unwrap();
    assert_eq!(owner.welcome().0, child.id());
    (child, owner)
}

#[test]
fn a_lost_owner_stops_the_keeper_and_its_services() {
    let dir = tempfile::tempdir().unwrap();
    let (mut keeper, mut owner) = start(dir.path());
    let a = owner.spawn(sleeper(dir.path(), "a")).unwrap();
    let b = owner.spawn(sleeper(dir.path(), "b")).unwrap();
    assert!(alive(a) && alive(b));
    // The owner is gone, as a shell killed with kill -9 is.
    drop(owner);
    let status = keeper.wait().unwrap();
    assert!(status.success(), "{status}");
    assert!(!alive(a) && !alive(b), "a service outlived its keeper");
    assert!(!dir.path().join("keeper.sock").exists());
}

#[test]
fn a_keeper_killed_takes_its_services_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let (mut keeper, mut owner) = start(dir.path());
    let a = owner.spawn(sleeper(dir.path(), "a")).unwrap();
    assert!(alive(a));
    keeper.kill().unwrap();
    keeper.wait().unwrap();
    wait_until("the service to die with its keeper", || !alive(a));
    // The owner hears the keeper is gone.
    assert!(owner.wait_event(Duration::from_secs(5)).is_err());
}

/// The parent of a process (from /proc/PID/stat).
fn parent_of(pid: u32) -> u32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let (_, rest) = stat.rsplit_once(") ").unwrap();
    rest.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// `molt shell` (a keeper by default): the services are the keeper's children, not the
/// shell's; the shell killed with `kill -9`, the keeper stops them and exits.
#[test]
fn a_shell_with_a_keeper_killed_with_kill_9_leaves_no_service_running() {
    let c = Cluster::init();
    let hello = c.dir.path().join("hello");
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/hello");
    for f in ["service.toml", "server.py", ".moltignore"] {
        write(&hello, f, &std::fs::read(example.join(f)).unwrap());
    }
    c.molt_json(&["push", hello.to_str().unwrap()]);
    c.molt_json(&["image", "create", "demo-1", "--set", "hello=main"]);
    let (mut shell, addr) = start_shell_args(&c, "dev-1", "development", &[], &[]);
    let target = format!("dev-1@{addr}");
    c.molt_json(&["deploy", "demo-1", "--instance", &target]);
    let status = c.molt_json(&["status", "--instance", &target]);
    let pid = status["services"]["hello"]["pid"].as_u64().unwrap() as u32;
    let url = format!(
        "http://{}/",
        status["services"]["hello"]["ports"]["main"]
            .as_str()
            .unwrap()
    );
    assert!(get(&url).unwrap().contains("hello from molt"));
    let keeper = parent_of(pid);
    assert_ne!(keeper, shell.id(), "the service is the shell's own child");
    assert!(
        std::fs::read_to_string(format!("/proc/{keeper}/cmdline"))
            .unwrap()
            .contains("keeper"),
        "the service's parent is not the keeper"
    );
    assert!(c.dir.path().join("dev-1/keeper.sock").exists());

    shell.kill().unwrap();
    shell.wait().unwrap();
    wait_until("the service to stop", || !alive(pid));
    wait_until("the keeper to exit", || !alive(keeper));
    assert!(get(&url).is_err(), "the port still answers");
}
