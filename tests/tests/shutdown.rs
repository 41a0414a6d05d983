//! A shell told to stop in the middle of an upgrade: the upgrade is an owned
//! task, not part of the command's stream, so the server closing its
//! connections cannot abort it half way; it is cancelled at its next step,
//! undoes what it did, and only then does the shell stop its services.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use image_spec::{ImageName, InstanceName, ServiceName};
use molt_e2e::{TestCluster, copy_example, push_main, write_file};
use shell::instance::{Instance, InstanceConfig, PublicPorts, Strategy};
use shell::service::{ShellConfig, Stage};
use tokio_util::sync::CancellationToken;
use wire::plan::{StepKind, StepOutcome};
use wire::shell::{ShellRequest, ShellResponse, Update};
use wire::{Client, Identity};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_during_an_upgrade_cancels_it_cleanly() {
    let cluster = TestCluster::start().await;
    let dev = cluster.repo_client("user/ada/developer").await;
    let admin = cluster.repo_client("user/root/admin").await;
    let dir = cluster.path("src/hello");
    copy_example("hello", &dir);
    let v1 = dev.push(&dir, &push_main("v1"), |_| {}).await.unwrap();
    // v2 builds slowly: the shutdown comes while it builds.
    let toml = std::fs::read_to_string(dir.join("service.toml")).unwrap();
    write_file(
        &dir,
        "service.toml",
        format!("{toml}\n[build]\ncommand = [\"sleep\", \"2\"]\n").as_bytes(),
    );
    let v2 = dev.push(&dir, &push_main("v2"), |_| {}).await.unwrap();
    let hello = ServiceName::new("hello").unwrap();
    for (name, commit) in [("one", v1.commit), ("two", v2.commit)] {
        let image = image_spec::Image::new(
            ImageName::new(name).unwrap(),
            String::new(),
            BTreeMap::from([(hello.clone(), commit)]),
        )
        .unwrap();
        admin.create_image(image).await.unwrap();
    }

    let instance = InstanceConfig {
        name: InstanceName::new("qa-1").unwrap(),
        root: cluster.path("instance"),
        public_ports: PublicPorts::Ephemeral,
        public_ip: shell::instance::LOOPBACK,
    };
    let bound = shell::service::bind(ShellConfig {
        instance: instance.clone(),
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
                instance: instance.name.clone(),
            },
        )
        .await
        .unwrap();
    let deploy = |image: &str| ShellRequest::Upgrade {
        image: ImageName::new(image).unwrap(),
        strategy: None,
        deployment: None,
        skip_hooks: false,
        keep_releases: None,
    };
    let done = wire::shell::call(&conn, &deploy("one"), |_| {})
        .await
        .unwrap();
    assert!(matches!(done, Ok(ShellResponse::Upgraded(_))), "{done:?}");

    // Deploy two; when its build starts, stop the shell.
    let stopping = shutdown.clone();
    let reply = wire::shell::call(&conn, &deploy("two"), move |update| {
        if let Update::Step(e) = update
            && e.step.kind() == StepKind::Build
            && e.outcome == StepOutcome::Started
        {
            stopping.cancel();
        }
    })
    .await;
    // The command's stream may be cut by the shutdown; either way the shell
    // stops only once the upgrade has been undone.
    if let Ok(Ok(answer)) = &reply {
        panic!("the upgrade should not have completed: {answer:?}");
    }
    tokio::time::timeout(std::time::Duration::from_secs(60), serving)
        .await
        .expect("the shell stopped")
        .unwrap();

    // Restarted, the instance is exactly generation 1: image one, and no
    // half-made release (v2's build finished before the cancel took effect:
    // its sealed release stays for the next attempt).
    let reopened = Instance::open(instance).await.unwrap();
    assert_eq!(reopened.commits()[&hello], v1.commit);
    let (image, generation) = reopened.recorded().unwrap();
    assert_eq!(generation, 1);
    assert_eq!(image.unwrap().0.as_str(), "one");
    let mut releases: Vec<String> = std::fs::read_dir(cluster.path("instance/releases/hello"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    releases.sort();
    let mut sealed = vec![v1.commit.to_string(), v2.commit.to_string()];
    sealed.sort();
    assert_eq!(releases, sealed);
    reopened.shutdown().await;
}
