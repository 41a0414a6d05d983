//! The in-place upgrade end to end: a real repository, real builds (cargo) and real
//! processes (Python and Rust sample services) behind the shell's fronts on
//! 127.0.0.1, and HTTP traffic from the test.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use image_spec::{CommitId, InstanceName, ServiceName};
use molt_e2e::{TestCluster, copy_example, get, get_once, push_main, write_file};
use shell::instance::{Instance, InstanceConfig, PublicPorts, UpgradeError};
use tokio::io::BufReader;
use tokio::net::TcpStream;

fn svc(s: &str) -> ServiceName {
    ServiceName::new(s).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_place_upgrades_rebuild_only_what_changed_and_roll_back_on_failure() {
    let cluster = TestCluster::start().await;
    let (hello_dir, orders_dir) = (cluster.path("hello"), cluster.path("orders"));
    copy_example("hello", &hello_dir);
    copy_example("orders", &orders_dir);
    let dev = cluster.repo_client("user/ada/developer").await;
    let hello_v1 = dev
        .push(&hello_dir, &push_main("hello"), |_| {})
        .await
        .unwrap();
    let orders_v1 = dev
        .push(&orders_dir, &push_main("orders v1"), |_| {})
        .await
        .unwrap();
    let target = |orders: CommitId| {
        BTreeMap::from([(svc("hello"), hello_v1.commit), (svc("orders"), orders)])
    };

    let shell_repo = cluster.repo_client("shell/dev-1").await;
    let config = InstanceConfig {
        name: InstanceName::new("dev-1").unwrap(),
        root: cluster.path("instance"),
        public_ports: PublicPorts::Ephemeral,
        public_ip: shell::instance::LOOPBACK,
    };
    let mut instance = Instance::open(config.clone()).await.unwrap();
    let report = instance
        .upgrade(&shell_repo, &target(orders_v1.commit), None, "v1")
        .await
        .unwrap();
    assert_eq!(report.restarted, [svc("hello"), svc("orders")]);
    let hello_addr = instance.public_addr(&svc("hello"), "main").unwrap();
    let orders_addr = instance.public_addr(&svc("orders"), "main").unwrap();
    let (code, body) = get_once(hello_addr, "/").await;
    assert_eq!(code, 200);
    assert!(body.contains("hello from molt"), "{body}");
    let (_, body) = get_once(orders_addr, "/").await;
    assert!(body.contains("\"version\":\"1\""), "{body}");
    let hello_pid = instance.pid(&svc("hello")).unwrap();

    // v2 of orders, upgraded under steady keep-alive load.
    let main_rs = std::fs::read_to_string(orders_dir.join("src/main.rs")).unwrap();
    let v2_src = main_rs.replace(
        "const VERSION: &str = \"1\";",
        "const VERSION: &str = \"2\";",
    );
    write_file(&orders_dir, "src/main.rs", v2_src.as_bytes());
    let orders_v2 = dev
        .push(&orders_dir, &push_main("orders v2"), |_| {})
        .await
        .unwrap();
    let running = Arc::new(AtomicBool::new(true));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let load = {
        let (running, ok, failed) = (running.clone(), ok.clone(), failed.clone());
        tokio::spawn(async move {
            let mut conn = BufReader::new(TcpStream::connect(orders_addr).await.unwrap());
            let mut versions = std::collections::BTreeSet::new();
            while running.load(Ordering::Relaxed) {
                match get(&mut conn, "/").await {
                    Ok((200, body)) => {
                        ok.fetch_add(1, Ordering::Relaxed);
                        if let Some(v) = body.split("\"version\":\"").nth(1) {
                            versions.insert(v.chars().next().unwrap_or('?'));
                        }
                    }
                    _ => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        conn = BufReader::new(TcpStream::connect(orders_addr).await.unwrap());
                    }
                }
            }
            versions
        })
    };
    // The load is running before the upgrade starts...
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while ok.load(Ordering::Relaxed) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the load never started"
        );
        tokio::task::yield_now().await;
    }
    let before = ok.load(Ordering::Relaxed);
    let report = instance
        .upgrade(&shell_repo, &target(orders_v2.commit), None, "v2")
        .await
        .unwrap();
    // ...and requests were answered while it ran.
    let during = ok.load(Ordering::Relaxed) - before;
    // Let a few requests reach the new version, then stop the load.
    let (_, body) = get_once(orders_addr, "/").await;
    assert!(body.contains("\"version\":\"2\""), "{body}");
    running.store(false, Ordering::Relaxed);
    let versions = load.await.unwrap();
    assert_eq!(report.restarted, [svc("orders")]);
    assert_eq!(report.unchanged, [svc("hello")]);
    assert_eq!(
        instance.pid(&svc("hello")),
        Some(hello_pid),
        "hello was restarted"
    );
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "requests failed during the upgrade"
    );
    assert!(during > 0, "no request was answered during the upgrade");
    assert!(
        versions.contains(&'1') || versions.contains(&'2'),
        "{versions:?}"
    );
    let generation = report.generation.unwrap();

    // A broken build: refused, v2 keeps serving, nothing recorded.
    write_file(&orders_dir, "src/main.rs", b"fn main() { not rust }");
    let broken = dev
        .push(&orders_dir, &push_main("broken"), |_| {})
        .await
        .unwrap();
    let err = instance
        .upgrade(&shell_repo, &target(broken.commit), None, "broken")
        .await
        .unwrap_err();
    assert!(matches!(err, UpgradeError::Install { .. }), "{err}");
    assert!(err.to_string().contains("error"), "{err}");
    assert_eq!(instance.commits()[&svc("orders")], orders_v2.commit);
    let (_, body) = get_once(orders_addr, "/").await;
    assert!(body.contains("\"version\":\"2\""), "{body}");

    // A release that builds but never becomes healthy: rolled back, v2 serves.
    write_file(
        &orders_dir,
        "src/main.rs",
        b"fn main() { std::process::exit(1) }",
    );
    let manifest = std::fs::read_to_string(orders_dir.join("service.toml")).unwrap();
    write_file(
        &orders_dir,
        "service.toml",
        manifest
            .replace("start_grace = \"20s\"", "start_grace = \"10m\"")
            .as_bytes(),
    );
    let sick = dev
        .push(&orders_dir, &push_main("sick"), |_| {})
        .await
        .unwrap();
    let err = instance
        .upgrade(&shell_repo, &target(sick.commit), None, "sick")
        .await
        .unwrap_err();
    // A process that exits while starting fails the upgrade at once, with its
    // exit status (not after its ten-minute start grace).
    assert!(
        matches!(&err, UpgradeError::Exited { status, .. } if status.contains("exit status: 1")),
        "{err}"
    );
    let (_, body) = get_once(orders_addr, "/").await;
    assert!(body.contains("\"version\":\"2\""), "{body}");
    assert_eq!(instance.commits()[&svc("orders")], orders_v2.commit);

    // A release whose process runs but fails its health check: rolled back, the
    // old hello keeps serving with its pid, and the error carries the log tail.
    let hello_manifest = std::fs::read_to_string(hello_dir.join("service.toml")).unwrap();
    write_file(
        &hello_dir,
        "service.toml",
        hello_manifest
            .replace("http = \"/healthz\"", "command = [\"false\"]")
            .replace("start_grace = \"10s\"", "start_grace = \"1s\"")
            .as_bytes(),
    );
    let failing = dev
        .push(&hello_dir, &push_main("failing health"), |_| {})
        .await
        .unwrap();
    let mut failing_target = target(orders_v2.commit);
    failing_target.insert(svc("hello"), failing.commit);
    let err = instance
        .upgrade(&shell_repo, &failing_target, None, "failing health")
        .await
        .unwrap_err();
    let UpgradeError::Unhealthy {
        service, log_tail, ..
    } = &err
    else {
        panic!("expected an unhealthy release: {err}");
    };
    assert_eq!(service, &svc("hello"));
    assert!(log_tail.contains("hello: listening on"), "{log_tail}");
    assert_eq!(instance.pid(&svc("hello")), Some(hello_pid));
    assert_eq!(instance.commits()[&svc("hello")], hello_v1.commit);
    let (code, body) = get_once(hello_addr, "/").await;
    assert_eq!(code, 200);
    assert!(body.contains("hello from molt"), "{body}");

    // A restarted shell comes back to the recorded generation.
    instance.shutdown().await;
    let state = shell::state::State::open(&cluster.path("instance/state")).unwrap();
    assert_eq!(state.generations().unwrap().len() as u64, generation);
    drop(state);
    let instance = Instance::open(config).await.unwrap();
    assert_eq!(instance.commits()[&svc("orders")], orders_v2.commit);
    let addr = instance.public_addr(&svc("orders"), "main").unwrap();
    let (_, body) = get_once(addr, "/").await;
    assert!(body.contains("\"version\":\"2\""), "{body}");
    instance.shutdown().await;
}

/// A service that cannot run twice (`overlap = false`) is stopped before its new
/// release starts; when the new release fails, the old one is started again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_without_overlap_is_replaced_and_restored_on_failure() {
    let cluster = TestCluster::start().await;
    let dir = cluster.path("hello");
    copy_example("hello", &dir);
    let manifest = std::fs::read_to_string(dir.join("service.toml"))
        .unwrap()
        .replace("kind = \"process\"", "kind = \"process\"\noverlap = false")
        .replace("start_grace = \"10s\"", "start_grace = \"3s\"");
    write_file(&dir, "service.toml", manifest.as_bytes());
    let dev = cluster.repo_client("user/ada/developer").await;
    let v1 = dev.push(&dir, &push_main("v1"), |_| {}).await.unwrap();
    let shell_repo = cluster.repo_client("shell/qa-1").await;
    let mut instance = Instance::open(InstanceConfig {
        name: InstanceName::new("qa-1").unwrap(),
        root: cluster.path("instance"),
        public_ports: PublicPorts::Ephemeral,
        public_ip: shell::instance::LOOPBACK,
    })
    .await
    .unwrap();
    let target = |c: CommitId| BTreeMap::from([(svc("hello"), c)]);
    instance
        .upgrade(&shell_repo, &target(v1.commit), None, "v1")
        .await
        .unwrap();
    let addr = instance.public_addr(&svc("hello"), "main").unwrap();
    let v1_pid = instance.pid(&svc("hello")).unwrap();

    // v2: replaced (the old process is gone, the new one answers on the same port).
    write_file(
        &dir,
        "service.toml",
        manifest.replace("hello from molt", "hello v2").as_bytes(),
    );
    let v2 = dev.push(&dir, &push_main("v2"), |_| {}).await.unwrap();
    let report = instance
        .upgrade(&shell_repo, &target(v2.commit), None, "v2")
        .await
        .unwrap();
    assert_eq!(report.restarted, [svc("hello")]);
    assert_ne!(instance.pid(&svc("hello")), Some(v1_pid));
    let (code, body) = get_once(addr, "/").await;
    assert_eq!(code, 200);
    assert!(body.contains("hello v2"), "{body}");

    // v3 never becomes healthy: v2 was stopped first, so it is started again.
    write_file(&dir, "server.py", b"import sys\nsys.exit(1)\n");
    let v3 = dev.push(&dir, &push_main("v3"), |_| {}).await.unwrap();
    let err = instance
        .upgrade(&shell_repo, &target(v3.commit), None, "v3")
        .await
        .unwrap_err();
    assert!(matches!(err, UpgradeError::Exited { .. }), "{err}");
    assert_eq!(instance.commits()[&svc("hello")], v2.commit);
    let (code, body) = get_once(addr, "/").await;
    assert_eq!(code, 200);
    assert!(body.contains("hello v2"), "{body}");
    instance.shutdown().await;
}

/// An instance root moved elsewhere comes back from its new place: the state
/// records its paths relative to the root, so the releases and data
/// directories it names are found where the root is now, and the next upgrade
/// copies its release from there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_root_moved_elsewhere_serves_and_upgrades_from_there() {
    let cluster = TestCluster::start().await;
    let dir = cluster.path("hello");
    copy_example("hello", &dir);
    let manifest = std::fs::read_to_string(dir.join("service.toml"))
        .unwrap()
        .replace(
            "kind = \"process\"",
            "kind = \"process\"\ndata = [\"data\"]",
        );
    write_file(&dir, "service.toml", manifest.as_bytes());
    let dev = cluster.repo_client("user/ada/developer").await;
    let v1 = dev.push(&dir, &push_main("v1"), |_| {}).await.unwrap();
    let shell_repo = cluster.repo_client("shell/dev-1").await;
    let config = |root: &str| InstanceConfig {
        name: InstanceName::new("dev-1").unwrap(),
        root: cluster.path(root),
        public_ports: PublicPorts::Ephemeral,
        public_ip: shell::instance::LOOPBACK,
    };
    let target = |c: CommitId| BTreeMap::from([(svc("hello"), c)]);
    let mut instance = Instance::open(config("before")).await.unwrap();
    instance
        .upgrade(&shell_repo, &target(v1.commit), None, "v1")
        .await
        .unwrap();
    instance.shutdown().await;

    std::fs::rename(cluster.path("before"), cluster.path("after")).unwrap();
    let after = cluster.path("after");
    let mut instance = Instance::open(config("after")).await.unwrap();
    assert_eq!(instance.commits()[&svc("hello")], v1.commit);
    assert!(
        instance
            .release_dir(&svc("hello"))
            .unwrap()
            .starts_with(&after)
    );
    let addr = instance.public_addr(&svc("hello"), "main").unwrap();
    let (code, body) = get_once(addr, "/").await;
    assert_eq!(code, 200);
    assert!(body.contains("hello from molt"), "{body}");

    write_file(
        &dir,
        "service.toml",
        manifest.replace("hello from molt", "hello v2").as_bytes(),
    );
    let v2 = dev.push(&dir, &push_main("v2"), |_| {}).await.unwrap();
    instance
        .upgrade(&shell_repo, &target(v2.commit), None, "v2")
        .await
        .unwrap();
    let (code, body) = get_once(addr, "/").await;
    assert_eq!(code, 200);
    assert!(body.contains("hello v2"), "{body}");
    instance.shutdown().await;

    // Every path the state gives back is inside the root where it is now.
    let state = shell::state::State::open(&after.join("state")).unwrap();
    let generations = state.generations().unwrap();
    assert_eq!(generations.len(), 2);
    for g in &generations {
        let release = &g.state.services[&svc("hello")].release;
        assert!(
            release.starts_with(&after) && release.is_dir(),
            "{release:?}"
        );
        let data = state.data_dirs(g.number).unwrap();
        assert!(data[&svc("hello")].starts_with(&after), "{data:?}");
    }
    assert!(!cluster.path("before").exists());
    // The stored trees: each whole under its id, no temporary file beside them.
    let mut trees = 0;
    for entry in std::fs::read_dir(after.join("trees")).unwrap() {
        let entry = entry.unwrap();
        let tree = image_spec::Tree::decode(&std::fs::read(entry.path()).unwrap()).unwrap();
        assert_eq!(entry.file_name().to_string_lossy(), tree.id().to_hex());
        trees += 1;
    }
    assert_eq!(trees, 2);
}

/// Old releases and data directories are pruned in the background: the
/// upgrade that makes one too many moves the oldest out of the way before it
/// returns and the reaper deletes it after, while the next upgrades go on;
/// the kept releases stay whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_releases_are_pruned_in_the_background_while_upgrades_go_on() {
    let cluster = TestCluster::start().await;
    let dir = cluster.path("hello");
    copy_example("hello", &dir);
    let manifest = std::fs::read_to_string(dir.join("service.toml")).unwrap();
    let dev = cluster.repo_client("user/ada/developer").await;
    let shell_repo = cluster.repo_client("shell/dev-1").await;
    let config = InstanceConfig {
        name: InstanceName::new("dev-1").unwrap(),
        root: cluster.path("instance"),
        public_ports: PublicPorts::Ephemeral,
        public_ip: shell::instance::LOOPBACK,
    };
    let mut instance = Instance::open(config).await.unwrap();
    let releases = cluster.path("instance/releases/hello");
    let sealed = || -> Vec<String> {
        std::fs::read_dir(&releases)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| !n.starts_with('.'))
            .collect()
    };
    let mut commits = Vec::new();
    let total = shell::instance::KEEP_RELEASES + 4;
    for i in 0..total {
        write_file(
            &dir,
            "service.toml",
            manifest
                .replace("hello from molt", &format!("hello {i}"))
                .as_bytes(),
        );
        let pushed = dev.push(&dir, &push_main("v"), |_| {}).await.unwrap();
        instance
            .upgrade(
                &shell_repo,
                &BTreeMap::from([(svc("hello"), pushed.commit)]),
                None,
                "v",
            )
            .await
            .unwrap();
        commits.push(pushed.commit);
        // Never more sealed releases than kept, as soon as the upgrade returns.
        assert!(
            sealed().len() <= shell::instance::KEEP_RELEASES.max(2),
            "{:?}",
            sealed()
        );
    }
    instance.pruned().await;
    let mut left = std::fs::read_dir(&releases)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect::<Vec<_>>();
    left.sort();
    let mut newest: Vec<String> = commits[total - shell::instance::KEEP_RELEASES..]
        .iter()
        .map(|c| c.to_hex())
        .collect();
    newest.sort();
    assert_eq!(left, newest, "only the newest, nothing retired left");
    // The blob cache was swept of what only the pruned releases used: every
    // blob left is linked by a kept release, fewer than all ever fetched
    // (each version's service.toml, and server.py and .moltignore once).
    let cache: Vec<std::fs::Metadata> = std::fs::read_dir(cluster.path("instance/cache"))
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_name().len() == 64)
        .map(|e| e.metadata().unwrap())
        .collect();
    use std::os::unix::fs::MetadataExt;
    assert!(
        cache.iter().all(|m| m.nlink() > 1),
        "a blob no release links was kept"
    );
    assert_eq!(cache.len(), shell::instance::KEEP_RELEASES + 2);
    let addr = instance.public_addr(&svc("hello"), "main").unwrap();
    let (_, body) = get_once(addr, "/").await;
    assert!(body.contains(&format!("hello {}", total - 1)), "{body}");
    // The kept releases are whole: the previous one serves again.
    instance
        .upgrade(
            &shell_repo,
            &BTreeMap::from([(svc("hello"), commits[total - 2])]),
            None,
            "back",
        )
        .await
        .unwrap();
    let (_, body) = get_once(addr, "/").await;
    assert!(body.contains(&format!("hello {}", total - 2)), "{body}");
    instance.shutdown().await;
}
