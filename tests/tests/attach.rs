//! Shells dial out: a shell given a portal's address connects to it, registers,
//! and serves the commands the portal sends over that connection; it comes
//! back after the portal restarts; each deployment id is done once, also
//! across a restart of the shell; and an attached production shell takes
//! deployments only from the portal.
//!
//! The portal here is a minimal stand-in made of `wire::Server` and a handler
//! that keeps each shell's connection and answers `Register` — real QUIC, real
//! certificates from the test cluster's CA.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use image_spec::{ImageName, InstanceName, ServiceName};
use molt_e2e::{TestCluster, copy_example, push_main};
use shell::instance::{InstanceConfig, PublicPorts, Strategy};
use shell::service::{Bound, ShellConfig, ShellError, Stage};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use wire::portal::{DeploymentId, Register, RegisterReply};
use wire::repo::ErrorKind;
use wire::shell::{
    InstanceStatus, ShellReply, ShellRequest, ShellResponse, Update, UpgradeSummary,
};
use wire::{BiStream, Client, DEFAULT_FRAME_LIMIT, Handler, Identity, Server};

/// How long a test waits for something that should happen before calling it
/// a failure (never a measurement).
const PATIENCE: Duration = Duration::from_secs(120);

/// A shell's registration, as the stand-in portal saw it.
struct Registered {
    /// Who the shell's certificate says it is.
    peer: Identity,
    /// What it sent.
    register: Register,
    /// The connection it dialled, to send commands back on.
    conn: quinn::Connection,
}

/// The stand-in portal's handler: keeps each admitted connection and answers
/// every `Register` with `Ok(())`.
struct Recorder {
    /// The last admitted connection of each peer.
    conns: Mutex<BTreeMap<String, quinn::Connection>>,
    registered: mpsc::UnboundedSender<Registered>,
}

impl Handler for Recorder {
    fn connected(&self, peer: &Arc<Identity>, conn: &quinn::Connection) {
        self.conns
            .lock()
            .unwrap()
            .insert(peer.to_string(), conn.clone());
    }

    async fn handle(&self, peer: Arc<Identity>, mut stream: BiStream) {
        let register: Register = stream.read_request(DEFAULT_FRAME_LIMIT).await.unwrap();
        let reply: RegisterReply = Ok(());
        wire::codec::write_frame(&mut stream.send, &reply)
            .await
            .unwrap();
        stream.send.finish().unwrap();
        let conn = self.conns.lock().unwrap()[&peer.to_string()].clone();
        let _ = self.registered.send(Registered {
            peer: (*peer).clone(),
            register,
            conn,
        });
    }
}

/// A running stand-in portal.
struct TestPortal {
    addr: SocketAddr,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    registered: mpsc::UnboundedReceiver<Registered>,
}

impl TestPortal {
    async fn start(cluster: &TestCluster, addr: SocketAddr) -> Self {
        let credentials = cluster.credentials("portal");
        // A stopped endpoint lets go of its socket in its driver task, a
        // moment after `serve` returns: binding the same address again is
        // retried until that happened.
        let deadline = tokio::time::Instant::now() + PATIENCE;
        let server = loop {
            match Server::bind(addr, &credentials) {
                Ok(server) => break server,
                Err(wire::WireError::Bind { source, .. })
                    if source.kind() == std::io::ErrorKind::AddrInUse
                        && tokio::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("cannot bind the portal: {e}"),
            }
        };
        let addr = server.local_addr().unwrap();
        let (tx, registered) = mpsc::unbounded_channel();
        let handler = Arc::new(Recorder {
            conns: Mutex::default(),
            registered: tx,
        });
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(server.serve(handler, shutdown.clone()));
        Self {
            addr,
            shutdown,
            task,
            registered,
        }
    }

    /// The next registration.
    async fn registration(&mut self) -> Registered {
        tokio::time::timeout(PATIENCE, self.registered.recv())
            .await
            .expect("a shell registers")
            .expect("the portal runs")
    }

    /// Stops serving and closes every connection.
    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap();
    }
}

/// Sends `req` over the shell's connection to the portal.
async fn send(conn: &quinn::Connection, req: &ShellRequest) -> ShellReply {
    wire::shell::call_on(conn, "the shell", req, |_| {})
        .await
        .unwrap()
}

async fn status(conn: &quinn::Connection) -> InstanceStatus {
    match send(conn, &ShellRequest::Status).await {
        Ok(ShellResponse::Status(s)) => s,
        other => panic!("expected a status, got {other:?}"),
    }
}

fn summary(reply: ShellReply) -> UpgradeSummary {
    match reply {
        Ok(ShellResponse::Upgraded(s)) => s,
        other => panic!("expected an upgrade's summary, got {other:?}"),
    }
}

fn upgrade(image: &str, deployment: u64) -> ShellRequest {
    ShellRequest::Upgrade {
        image: ImageName::new(image).unwrap(),
        strategy: None,
        deployment: Some(DeploymentId(deployment)),
        skip_hooks: false,
        keep_releases: None,
    }
}

fn rollback(deployment: u64) -> ShellRequest {
    ShellRequest::Rollback {
        strategy: None,
        to: None,
        deployment: Some(DeploymentId(deployment)),
    }
}

/// Pushes the `hello` example twice (versions one and two) and makes the
/// images `one` and `two` of them.
async fn two_images(cluster: &TestCluster) {
    let dev = cluster.repo_client("user/ada/developer").await;
    let admin = cluster.repo_client("user/root/admin").await;
    let dir = cluster.path("src/hello");
    copy_example("hello", &dir);
    let hello = ServiceName::new("hello").unwrap();
    for name in ["one", "two"] {
        let server = dir.join("server.py");
        let src = std::fs::read_to_string(&server).unwrap();
        std::fs::write(&server, format!("{src}\n# version {name}\n")).unwrap();
        let pushed = dev.push(&dir, &push_main(name), |_| {}).await.unwrap();
        let image = image_spec::Image::new(
            ImageName::new(name).unwrap(),
            String::new(),
            BTreeMap::from([(hello.clone(), pushed.commit)]),
        )
        .unwrap();
        admin.create_image(image).await.unwrap();
    }
}

fn config(
    cluster: &TestCluster,
    name: &str,
    stage: Stage,
    listen: Option<SocketAddr>,
    portal: Option<SocketAddr>,
) -> ShellConfig {
    ShellConfig {
        instance: InstanceConfig {
            name: InstanceName::new(name).unwrap(),
            root: cluster.path(&format!("instances/{name}")),
            public_ports: PublicPorts::Ephemeral,
            public_ip: shell::instance::LOOPBACK,
        },
        stage,
        repo: cluster.repo_addr,
        credentials: cluster.credentials(&format!("shell/{name}")),
        listen,
        portal,
        labels: BTreeMap::from([("region".to_owned(), "eu".to_owned())]),
        strategy: Strategy::InPlace,
    }
}

/// A shell serving until its token is cancelled.
struct RunningShell {
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<shell::service::Served>,
}

impl RunningShell {
    fn start(bound: Bound) -> Self {
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(bound.serve(shutdown.clone()));
        Self { shutdown, task }
    }

    /// Stops it and waits until it has (its attachment included).
    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(PATIENCE, self.task)
            .await
            .expect("the shell stops")
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shell_dials_registers_serves_the_portal_and_comes_back() {
    let cluster = TestCluster::start().await;
    two_images(&cluster).await;
    let mut portal = TestPortal::start(&cluster, "127.0.0.1:0".parse().unwrap()).await;
    let name = InstanceName::new("prod-1").unwrap();

    // A shell with a portal and no listener of its own.
    let bound = shell::service::bind(config(
        &cluster,
        "prod-1",
        Stage::Production,
        None,
        Some(portal.addr),
    ))
    .await
    .unwrap();
    assert!(matches!(
        bound.local_addr(),
        Err(ShellError::NoListener { .. })
    ));
    assert_eq!(bound.portal(), Some(portal.addr));
    let shell = RunningShell::start(bound);

    // It registers with the right fields, presenting its own certificate.
    let first = portal.registration().await;
    assert_eq!(
        first.peer,
        Identity::Shell {
            instance: name.clone()
        }
    );
    assert_eq!(
        first.register,
        Register {
            instance: name.clone(),
            stage: Stage::Production,
            labels: BTreeMap::from([("region".to_owned(), "eu".to_owned())]),
            shell_version: format!("molt {}", env!("CARGO_PKG_VERSION")),
            image: None,
            generation: 0,
        }
    );
    let conn = first.conn;

    // The portal's commands over the shell's connection: status, then an
    // upgrade (with its steps reported on the way).
    let s = status(&conn).await;
    assert_eq!((s.instance.as_str(), s.generation), ("prod-1", 0));
    let mut steps = 0;
    let one = wire::shell::call_on(&conn, "prod-1", &upgrade("one", 1), |u| {
        if let Update::Step(_) = u {
            steps += 1;
        }
    })
    .await
    .unwrap();
    let one = summary(one);
    assert!(steps > 0);
    assert_eq!(one.generation, Some(1));
    assert_eq!(one.image.as_ref().map(ImageName::as_str), Some("one"));

    // Asked again with the same id: the same answer, nothing done again.
    assert_eq!(summary(send(&conn, &upgrade("one", 1)).await), one);
    assert_eq!(status(&conn).await.generation, 1);

    // A rollback asked twice rolls back once.
    let two = summary(send(&conn, &upgrade("two", 2)).await);
    assert_eq!(two.generation, Some(2));
    let back = summary(send(&conn, &rollback(3)).await);
    assert_eq!(back.generation, Some(3));
    assert_eq!(back.image.as_ref().map(ImageName::as_str), Some("one"));
    assert_eq!(summary(send(&conn, &rollback(3)).await), back);
    assert_eq!(status(&conn).await.generation, 3);

    // The same id sent twice at once: the second waits for the first's run
    // and gets its answer; one generation is recorded.
    let (started_tx, started) = tokio::sync::oneshot::channel();
    let mut started_tx = Some(started_tx);
    let first_run = {
        let conn = conn.clone();
        tokio::spawn(async move {
            wire::shell::call_on(&conn, "prod-1", &upgrade("two", 4), |u| {
                if let (Update::Step(_), Some(tx)) = (u, started_tx.take()) {
                    let _ = tx.send(());
                }
            })
            .await
            .unwrap()
        })
    };
    started.await.unwrap();
    let mut notes = Vec::new();
    let second = wire::shell::call_on(&conn, "prod-1", &upgrade("two", 4), |u| {
        if let Update::Progress(p) = u {
            notes.push(p.step.clone());
        }
    })
    .await
    .unwrap();
    let four = summary(first_run.await.unwrap());
    assert_eq!(summary(second), four);
    assert_eq!(four.generation, Some(4));
    assert!(
        notes.iter().any(|n| n.contains("deployment 4")),
        "the second request says what it waits for: {notes:?}"
    );
    assert_eq!(status(&conn).await.generation, 4);

    // The portal stops and comes back on the same address: the shell
    // registers again, with what it runs now, and a repeated id is answered.
    drop(conn);
    let addr = portal.addr;
    portal.stop().await;
    let mut portal = TestPortal::start(&cluster, addr).await;
    let again = portal.registration().await;
    assert_eq!(again.register.generation, 4);
    assert_eq!(
        again.register.image.map(|i| i.name.as_str().to_owned()),
        Some("two".to_owned())
    );
    assert_eq!(summary(send(&again.conn, &upgrade("two", 4)).await), four);

    // The shell restarts: its outcomes are durable. Deployment 1 (an
    // upgrade to image one) is answered as it was, and nothing changes.
    shell.stop().await;
    let shell = RunningShell::start(
        shell::service::bind(config(
            &cluster,
            "prod-1",
            Stage::Production,
            None,
            Some(addr),
        ))
        .await
        .unwrap(),
    );
    let restarted = portal.registration().await;
    assert_eq!(restarted.register.generation, 4);
    assert_eq!(
        summary(send(&restarted.conn, &upgrade("one", 1)).await),
        one
    );
    assert_eq!(summary(send(&restarted.conn, &rollback(3)).await), back);
    let s = status(&restarted.conn).await;
    assert_eq!(s.generation, 4);
    assert_eq!(
        s.image.map(|i| i.name.as_str().to_owned()),
        Some("two".to_owned())
    );

    shell.stop().await;
    portal.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attached_production_shell_takes_deployments_only_from_the_portal() {
    let cluster = TestCluster::start().await;
    two_images(&cluster).await;
    let mut portal = TestPortal::start(&cluster, "127.0.0.1:0".parse().unwrap()).await;
    let bound = shell::service::bind(config(
        &cluster,
        "prod-2",
        Stage::Production,
        Some("127.0.0.1:0".parse().unwrap()),
        Some(portal.addr),
    ))
    .await
    .unwrap();
    let addr = bound.local_addr().unwrap();
    let shell = RunningShell::start(bound);
    let attached = portal.registration().await;

    // A deployer (and an admin) straight to the shell's own listener.
    for who in ["user/ops/deployer", "user/root/admin"] {
        let client = Client::new(&cluster.credentials(who), addr).unwrap();
        let direct = client
            .connect(
                addr,
                &Identity::Shell {
                    instance: InstanceName::new("prod-2").unwrap(),
                },
            )
            .await
            .unwrap();
        let call =
            async |req: ShellRequest| wire::shell::call(&direct, &req, |_| {}).await.unwrap();
        let pull = ShellRequest::Pull {
            service: ServiceName::new("hello").unwrap(),
            rev: "main".into(),
            on_behalf_of: None,
        };
        let reset = ShellRequest::Reset {
            service: None,
            on_behalf_of: None,
        };
        for req in [upgrade("one", 1), rollback(2), pull, reset] {
            let refused = call(req.clone()).await.unwrap_err();
            assert_eq!(refused.kind, ErrorKind::PermissionDenied, "{req:?}");
            assert!(
                refused.message.contains("deploy through the portal"),
                "{}",
                refused.message
            );
        }
        // Without a deployment id too.
        let plain = ShellRequest::Upgrade {
            image: ImageName::new("one").unwrap(),
            strategy: None,
            deployment: None,
            skip_hooks: false,
            keep_releases: None,
        };
        assert_eq!(
            call(plain).await.unwrap_err().kind,
            ErrorKind::PermissionDenied
        );
        // Reading stays allowed: status and the plan.
        let Ok(ShellResponse::Status(s)) = call(ShellRequest::Status).await else {
            panic!("status is allowed");
        };
        assert_eq!((s.generation, s.services.len()), (0, 0), "nothing changed");
        let plan = call(ShellRequest::Plan {
            image: ImageName::new("one").unwrap(),
            strategy: None,
            skip_hooks: false,
        })
        .await;
        assert!(matches!(plan, Ok(ShellResponse::Plan(_))), "{plan:?}");
        direct.close();
        client.shutdown().await;
    }
    // Nothing was recorded for the refused ids: the portal's own deployment 1
    // runs.
    assert_eq!(status(&attached.conn).await.generation, 0);
    let done = summary(send(&attached.conn, &upgrade("one", 1)).await);
    assert_eq!(done.generation, Some(1));

    shell.stop().await;
    portal.stop().await;
}

#[tokio::test]
async fn a_shell_needs_a_listener_or_a_portal() {
    let cluster = TestCluster::start().await;
    let err = shell::service::bind(config(&cluster, "lonely", Stage::Quality, None, None))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ShellError::NowhereToServe { instance } if instance == "lonely"),
        "{err}"
    );
    // Nothing was opened.
    assert!(!cluster.path("instances/lonely").exists());
}
