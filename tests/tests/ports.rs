//! Public ports: the address they listen on, and the port numbers the planner
//! refuses before anything binds.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use image_spec::{CommitId, InstanceName, ServiceName};
use molt_e2e::{TestCluster, copy_example, get_once, push_main, write_file};
use repo_client::RepoClient;
use shell::instance::{Instance, InstanceConfig, PublicPorts, UpgradeError};
use shell::plan::PlanError;

fn svc(s: &str) -> ServiceName {
    ServiceName::new(s).unwrap()
}

/// Pushes the hello example as `name`.
async fn hello_as(cluster: &TestCluster, dev: &RepoClient, name: &str) -> CommitId {
    let dir = cluster.path(&format!("src/{name}"));
    copy_example("hello", &dir);
    let toml = std::fs::read_to_string(dir.join("service.toml")).unwrap();
    write_file(
        &dir,
        "service.toml",
        toml.replace("name = \"hello\"", &format!("name = \"{name}\""))
            .as_bytes(),
    );
    dev.push(&dir, &push_main(name), |_| {})
        .await
        .unwrap()
        .commit
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_ports_listen_where_told_and_impossible_ports_are_refused() {
    let cluster = TestCluster::start().await;
    let dev = cluster.repo_client("user/ada/developer").await;
    let repo = cluster.repo_client("shell/qa-1").await;
    let one = hello_as(&cluster, &dev, "one").await;
    let two = hello_as(&cluster, &dev, "two").await;
    let config = |dir: &str, ports: PublicPorts, ip: IpAddr| InstanceConfig {
        name: InstanceName::new("qa-1").unwrap(),
        root: cluster.path(dir),
        public_ports: ports,
        public_ip: ip,
    };

    // On another loopback address: served there, not on 127.0.0.1.
    let other = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
    let mut instance = Instance::open(config("a", PublicPorts::Ephemeral, other))
        .await
        .unwrap();
    instance
        .upgrade(&repo, &BTreeMap::from([(svc("one"), one)]), None, "one")
        .await
        .unwrap();
    let addr = instance.public_addr(&svc("one"), "main").unwrap();
    assert_eq!(addr.ip(), other);
    assert_eq!(get_once(addr, "/").await.0, 200);
    assert!(
        tokio::net::TcpStream::connect(("127.0.0.1", addr.port()))
            .await
            .is_err()
    );
    instance.shutdown().await;

    // 8080 plus an offset of 60000 is past 65535: refused, nothing started.
    let mut instance = Instance::open(config(
        "b",
        PublicPorts::Offset(60000),
        shell::instance::LOOPBACK,
    ))
    .await
    .unwrap();
    let err = instance
        .upgrade(&repo, &BTreeMap::from([(svc("one"), one)]), None, "one")
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            UpgradeError::Plan(PlanError::PortOverflow {
                port: 8080,
                offset: 60000
            })
        ),
        "{err}"
    );
    assert!(instance.commits().is_empty());

    // Two services on one public port: refused by name before anything binds.
    let err = instance
        .plan(
            &repo,
            &BTreeMap::from([(svc("one"), one), (svc("two"), two)]),
            shell::instance::Strategy::InPlace,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, UpgradeError::Plan(PlanError::PortOverflow { .. })),
        "{err}"
    );
    instance.shutdown().await;
    let mut instance = Instance::open(config(
        "c",
        PublicPorts::Offset(20000),
        shell::instance::LOOPBACK,
    ))
    .await
    .unwrap();
    let err = instance
        .upgrade(
            &repo,
            &BTreeMap::from([(svc("one"), one), (svc("two"), two)]),
            None,
            "both",
        )
        .await
        .unwrap_err();
    assert!(
        matches!(
            &err,
            UpgradeError::Plan(PlanError::PortConflict { port: 28080, a, b })
                if a == &svc("one") && b == &svc("two")
        ),
        "{err}"
    );
    assert!(err.to_string().contains("`one` and `two`"), "{err}");
    assert!(instance.commits().is_empty());
    instance.shutdown().await;
}
