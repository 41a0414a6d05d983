//! `molt keeper` as a shell starts it: a real process holding real services.
//! Its owner's connection ending (a shell killed with `kill -9`) stops every
//! service and the keeper; the keeper killed with `kill -9` takes its
//! services with it. Either way no service is left that nobody supervises.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::MOLT;
use shell::keeper::{self, Hello, KEEPER_VERSION, KeeperClient, SpawnSpec};

/// Alive, and not a zombie.
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit_once(") ")
                .is_some_and(|(_, rest)| !rest.starts_with('Z'))
        })
        .unwrap_or(false)
}

fn wait_until(what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "{what} within 20 s");
        std::thread::sleep(Duration::from_millis(20));
    }
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
