//! A shell reaches the repository for each command; when the first handshake
//! is lost (many instances upgrading at once, or the repository restarting),
//! it tries again after a jittered pause instead of failing the deployment.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use image_spec::{ImageName, InstanceName, ServiceName};
use molt_e2e::{TestCluster, copy_example, push_main};
use shell::instance::{InstanceConfig, PublicPorts, Strategy};
use shell::service::{ShellConfig, Stage};
use tokio_util::sync::CancellationToken;
use wire::shell::{ShellRequest, ShellResponse};
use wire::{Client, Identity};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repository_back_within_a_moment_does_not_fail_the_command() {
    let mut cluster = TestCluster::start().await;
    let dev = cluster.repo_client("user/ada/developer").await;
    let admin = cluster.repo_client("user/root/admin").await;
    let dir = cluster.path("src/hello");
    copy_example("hello", &dir);
    let pushed = dev.push(&dir, &push_main("v1"), |_| {}).await.unwrap();
    let image = image_spec::Image::new(
        ImageName::new("one").unwrap(),
        String::new(),
        BTreeMap::from([(ServiceName::new("hello").unwrap(), pushed.commit)]),
    )
    .unwrap();
    admin.create_image(image).await.unwrap();
    drop((dev, admin));

    let bound = shell::service::bind(ShellConfig {
        instance: InstanceConfig {
            name: InstanceName::new("qa-1").unwrap(),
            root: cluster.path("instance"),
            public_ports: PublicPorts::Ephemeral,
            public_ip: shell::instance::LOOPBACK,
        },
        stage: Stage::Quality,
        repo: cluster.repo_addr,
        credentials: cluster.credentials("shell/qa-1"),
        listen: Some("127.0.0.1:0".parse().unwrap()),
        portal: None,
        labels: BTreeMap::new(),
        strategy: Strategy::InPlace,
    })
    .await
    .unwrap();
    let addr = bound.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let serving = tokio::spawn(bound.serve(shutdown.clone()));
    let client = Client::new(&cluster.credentials("user/ops/deployer"), addr).unwrap();
    let conn = client
        .connect(
            addr,
            &Identity::Shell {
                instance: InstanceName::new("qa-1").unwrap(),
            },
        )
        .await
        .unwrap();

    // The repository is down when the command arrives and stays down longer
    // than one handshake may take (`CONNECT_TIMEOUT`, 2 s): the first attempt
    // fails for sure, a later one finds it back.
    cluster.stop_repo().await;
    let plan = ShellRequest::Plan {
        image: ImageName::new("one").unwrap(),
        strategy: None,
        skip_hooks: false,
    };
    let asking = {
        let conn = conn.clone();
        tokio::spawn(async move { wire::shell::call(&conn, &plan, |_| {}).await })
    };
    tokio::time::sleep(wire::endpoint::CONNECT_TIMEOUT + Duration::from_millis(500)).await;
    cluster.restart_repo().await;
    let answer = asking.await.unwrap().unwrap();
    assert!(matches!(answer, Ok(ShellResponse::Plan(_))), "{answer:?}");

    conn.close();
    client.shutdown().await;
    shutdown.cancel();
    serving.await.unwrap();
}
