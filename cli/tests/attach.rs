//! `molt shell --portal ADDR --label KEY=VALUE` with no `--listen`: the real
//! binary, as a child process, dials a stand-in portal (a `wire::Server` with
//! the cluster's portal certificate), registers with its labels, and stops on
//! SIGTERM.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::{Cluster, MOLT, signal};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use wire::portal::{Register, RegisterReply};
use wire::{BiStream, Credentials, DEFAULT_FRAME_LIMIT, Handler, Identity, Server};

/// Answers every registration with `Ok(())` and passes it on.
struct Portal(mpsc::UnboundedSender<(Identity, Register)>);

impl Handler for Portal {
    async fn handle(&self, peer: Arc<Identity>, mut stream: BiStream) {
        let register: Register = stream.read_request(DEFAULT_FRAME_LIMIT).await.unwrap();
        let reply: RegisterReply = Ok(());
        wire::codec::write_frame(&mut stream.send, &reply)
            .await
            .unwrap();
        stream.send.finish().unwrap();
        let _ = self.0.send(((*peer).clone(), register));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn molt_shell_with_a_portal_and_no_listener_registers_there() {
    let c = Cluster::init();
    // `molt init` issued the portal's certificate; the shell's is issued here.
    let out = c.molt(&["cert", "issue", "--role", "shell", "--name", "prod-7"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let certs = c.dir.path().join("certs");
    let credentials = Credentials::load(
        &certs.join("portal.crt"),
        &certs.join("portal.key"),
        &certs.join("ca.crt"),
    )
    .unwrap();
    let server = Server::bind("127.0.0.1:0".parse().unwrap(), &credentials).unwrap();
    let portal = server.local_addr().unwrap();
    let (tx, mut registered) = mpsc::unbounded_channel();
    let shutdown = CancellationToken::new();
    let serving = tokio::spawn(server.serve(Arc::new(Portal(tx)), shutdown.clone()));

    let mut shell = Command::new(MOLT)
        .env("MOLT_RUN_DIR", c.dir.path().join("run"))
        .arg("--config")
        .arg(c.config())
        .arg("--repo")
        .arg(c.addr.unwrap().to_string())
        .args(["shell", "--instance", "prod-7", "--stage", "production"])
        .args(["--portal", &portal.to_string()])
        .args(["--label", "region=eu", "--label", "tier=web"])
        .arg("--root")
        .arg(c.dir.path().join("prod-7"))
        .arg("--ephemeral-ports")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(shell.stderr.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    assert_eq!(
        first,
        format!("shell prod-7 attaching to the portal at {portal}")
    );
    let rest = std::thread::spawn(move || lines.map_while(Result::ok).collect::<Vec<_>>());

    let (peer, register) = tokio::time::timeout(Duration::from_secs(120), registered.recv())
        .await
        .expect("the shell registers")
        .unwrap();
    assert_eq!(peer.to_string(), "shell/prod-7");
    assert_eq!(register.instance.as_str(), "prod-7");
    assert_eq!(register.stage.to_string(), "production");
    let labels: Vec<(&str, &str)> = register
        .labels
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    assert_eq!(labels, [("region", "eu"), ("tier", "web")]);
    assert!(register.shell_version.starts_with("molt "));
    assert_eq!((register.image, register.generation), (None, 0));

    let status = tokio::task::spawn_blocking(move || signal(&mut shell, "-TERM"))
        .await
        .unwrap();
    assert!(status.success(), "{status}");
    let rest = rest.join().unwrap();
    assert_eq!(
        rest.last().map(String::as_str),
        Some("shell prod-7 stopped")
    );
    shutdown.cancel();
    serving.await.unwrap();
}
