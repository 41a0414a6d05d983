//! A shell boots past one bad service: the recorded generation comes back with
//! the others serving, the bad one shown failed and retried by its restart
//! policy, and the instance takes upgrades meanwhile.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use image_spec::{InstanceName, ServiceName};
use molt_e2e::{TestCluster, copy_example, get_once, push_main, version_of, write_file};
use shell::instance::{Instance, InstanceConfig, PublicPorts};

/// The instance these tests boot: `qa-1`, rooted in the cluster's `instance`.
fn qa_1(cluster: &TestCluster) -> InstanceConfig {
    InstanceConfig {
        name: InstanceName::new("qa-1").unwrap(),
        root: cluster.path("instance"),
        public_ports: PublicPorts::Ephemeral,
        public_ip: shell::instance::LOOPBACK,
    }
}

fn svc(s: &str) -> ServiceName {
    ServiceName::new(s).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_that_fails_at_boot_does_not_keep_the_others_down() {
    let cluster = TestCluster::start().await;
    let dev = cluster.repo_client("user/ada/developer").await;
    let repo = cluster.repo_client("shell/qa-1").await;
    // `flaky` is healthy only while the file `sick` does not exist.
    let sick = cluster.path("sick");
    let mut commits = BTreeMap::new();
    for (name, greeting, health) in [
        ("good", "good v1", None),
        ("flaky", "flaky v1", Some(&sick)),
    ] {
        let dir = cluster.path(&format!("src/{name}"));
        copy_example("hello", &dir);
        let toml = std::fs::read_to_string(dir.join("service.toml")).unwrap();
        let mut toml = toml
            .replace("name = \"hello\"", &format!("name = \"{name}\""))
            .replace("hello from molt", greeting)
            .replace("start_grace = \"10s\"", "start_grace = \"2s\"");
        if let Some(flag) = health {
            toml = toml.replace(
                "http = \"/healthz\"",
                &format!(
                    "command = [\"sh\", \"-c\", \"test ! -e {}\"]",
                    flag.display()
                ),
            );
        }
        write_file(&dir, "service.toml", toml.as_bytes());
        let pushed = dev.push(&dir, &push_main(greeting), |_| {}).await.unwrap();
        commits.insert(svc(name), pushed.commit);
    }
    let config = qa_1(&cluster);
    let mut instance = Instance::open(config.clone()).await.unwrap();
    instance.upgrade(&repo, &commits, None, "v1").await.unwrap();
    instance.shutdown().await;

    // The shell comes back while `flaky` cannot get healthy.
    std::fs::write(&sick, "").unwrap();
    let mut instance = Instance::open(config).await.unwrap();
    let good = instance.public_addr(&svc("good"), "main").unwrap();
    assert_eq!(version_of(&get_once(good, "/").await.1), "good v1");
    let status = instance.describe();
    let flaky = &status[&svc("flaky")];
    assert!(
        flaky.state.starts_with("failed at start") && flaky.state.contains("healthy"),
        "{flaky:?}"
    );
    assert!(status[&svc("good")].state == "running", "{status:?}");

    // It takes an upgrade meanwhile (here: good to a new commit).
    let dir = cluster.path("src/good");
    let toml = std::fs::read_to_string(dir.join("service.toml")).unwrap();
    write_file(
        &dir,
        "service.toml",
        toml.replace("good v1", "good v2").as_bytes(),
    );
    let v2 = dev.push(&dir, &push_main("good v2"), |_| {}).await.unwrap();
    let mut target = commits.clone();
    target.insert(svc("good"), v2.commit);
    let report = instance.upgrade(&repo, &target, None, "v2").await.unwrap();
    assert_eq!(report.restarted, [svc("good")]);
    assert_eq!(version_of(&get_once(good, "/").await.1), "good v2");

    // Once it can, its supervisor brings `flaky` back by its restart policy.
    std::fs::remove_file(&sick).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let status = instance.describe();
        let flaky = &status[&svc("flaky")];
        if flaky.state == "running" && flaky.health == "healthy" {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "flaky never came back: {flaky:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // (Its health command does not look at its port: wait for its answer.)
    let flaky = instance.public_addr(&svc("flaky"), "main").unwrap();
    while version_of(&get_once(flaky, "/").await.1) != "flaky v1" {
        assert!(
            tokio::time::Instant::now() < deadline,
            "flaky never answered"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let good_release = instance.release_dir(&svc("good")).unwrap().to_owned();
    let flaky_release = instance.release_dir(&svc("flaky")).unwrap().to_owned();
    let good_tree = instance.state().installed().unwrap().services[&svc("good")].tree;
    instance.shutdown().await;

    // An open that fails half way (good's stored tree is gone, found after
    // flaky started) stops what it started: nothing is left running.
    assert!(good_release.exists());
    std::fs::remove_file(cluster.path("instance/trees").join(good_tree.to_hex())).unwrap();
    let err = Instance::open(qa_1(&cluster)).await.unwrap_err();
    assert!(
        err.to_string().contains(&good_tree.to_hex().to_string()),
        "{err}"
    );
    // flaky was started (its process log for generation 2 was opened)…
    assert!(cluster.path("instance/logs/flaky/g2.log").exists());
    // …and no process runs from its release any more.
    let running_there: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| std::fs::read_link(e.path().join("cwd")).is_ok_and(|cwd| cwd == flaky_release))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        running_there.is_empty(),
        "pids {running_there:?} outlived the open"
    );
}

/// A recorded release found corrupt at boot — a byte flipped in the blob
/// cache (which the release shares), a file appended to, an executable
/// deleted — holds its service back in a plain open, naming the files; an open that may reach
/// the repository heals it (the cache's bad copies set aside, the blobs
/// fetched anew and verified, the files put back) and the service serves its
/// true bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_release_is_healed_from_the_repository_at_boot() {
    let cluster = TestCluster::start().await;
    let dev = cluster.repo_client("user/ada/developer").await;
    let repo = cluster.repo_client("shell/qa-1").await;
    let dir = cluster.path("src/hello");
    copy_example("hello", &dir);
    write_file(&dir, "tool.sh", b"#!/bin/sh\necho tool\n");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.join("tool.sh"), std::fs::Permissions::from_mode(0o755)).unwrap();
    let pushed = dev.push(&dir, &push_main("v1"), |_| {}).await.unwrap();
    let config = qa_1(&cluster);
    let mut instance = Instance::open(config.clone()).await.unwrap();
    instance
        .upgrade(
            &repo,
            &BTreeMap::from([(svc("hello"), pushed.commit)]),
            None,
            "v1",
        )
        .await
        .unwrap();
    let release = instance.release_dir(&svc("hello")).unwrap().to_owned();
    instance.shutdown().await;

    // server.py: a byte flipped in place in the cache's file (root may).
    let server = std::fs::read(dir.join("server.py")).unwrap();
    let cached = cluster
        .path("instance/cache")
        .join(image_spec::BlobId::of(&server).to_hex());
    let mut bytes = std::fs::read(&cached).unwrap();
    bytes[10] ^= 0x20;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&cached)
        .and_then(|mut f| std::io::Write::write_all(&mut f, &bytes))
        .unwrap();
    assert_eq!(
        std::fs::read(release.join("server.py")).unwrap(),
        bytes,
        "shared"
    );
    // service.toml: appended to; tool.sh: deleted.
    std::fs::OpenOptions::new()
        .append(true)
        .open(release.join("service.toml"))
        .and_then(|mut f| std::io::Write::write_all(&mut f, b"\n# tampered\n"))
        .unwrap();
    std::fs::remove_file(release.join("tool.sh")).unwrap();

    // Without a repository the shell still opens: the service is held back,
    // named with its files, and its bad bytes are not served.
    let instance = Instance::open(config.clone()).await.unwrap();
    let status = instance.describe();
    let text = &status[&svc("hello")].state;
    for name in [
        "held",
        "server.py",
        "service.toml",
        "tool.sh",
        "no repository",
    ] {
        assert!(text.contains(name), "{text}");
    }
    assert_eq!(instance.public_addr(&svc("hello"), "main"), None);
    instance.shutdown().await;
    // `molt fsck --root` names the same damage, and the cache blob, and
    // leaves the healing to the start (the repository has the bytes).
    let report = shell::fsck::fsck(&config.root, true).unwrap();
    let problems = report.problems.join("\n");
    for name in ["3 files of hello's release", "server.py", "tool.sh"] {
        assert!(problems.contains(name), "{problems}");
    }
    assert!(
        problems.contains(&format!(
            "cache blob {} is corrupt",
            cached.file_name().unwrap().to_str().unwrap()
        )),
        "{problems}"
    );
    assert!(!cached.exists(), "the repair set the corrupt blob aside");

    let client = wire::Client::new(&cluster.credentials("shell/qa-1"), cluster.repo_addr).unwrap();
    let instance = Instance::open_healing(config, Some((&client, cluster.repo_addr)))
        .await
        .unwrap();
    shell::release::verify(&release, &image_spec::scan_dir(&dir).unwrap().tree).unwrap();
    assert_eq!(
        std::fs::read(&cached).unwrap(),
        server,
        "the cache holds the true bytes"
    );
    let mode = std::fs::metadata(release.join("tool.sh"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o755);
    let addr = instance.public_addr(&svc("hello"), "main").unwrap();
    let (code, body) = get_once(addr, "/").await;
    assert_eq!(code, 200);
    assert_eq!(version_of(&body), "hello from molt");
    // The bad copy is kept aside, not served.
    assert!(
        cluster
            .path("instance/cache/.quarantine")
            .join(cached.file_name().unwrap())
            .exists()
    );
    instance.shutdown().await;
}

/// The state database damaged while the shell is down (deleted, or its file
/// cut short, which sled would otherwise take for an older database): the
/// shell comes back on the generation it recorded last, from its journal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_state_database_comes_back_on_the_last_recorded_generation() {
    let cluster = TestCluster::start().await;
    let dev = cluster.repo_client("user/ada/developer").await;
    let repo = cluster.repo_client("shell/qa-1").await;
    let dir = cluster.path("src/hello");
    copy_example("hello", &dir);
    let config = qa_1(&cluster);
    let mut instance = Instance::open(config.clone()).await.unwrap();
    for v in ["v1", "v2"] {
        let manifest = std::fs::read_to_string(dir.join("service.toml")).unwrap();
        let next = manifest.replace("hello from molt", &format!("hello {v}"));
        write_file(&dir, "service.toml", next.as_bytes());
        let pushed = dev.push(&dir, &push_main(v), |_| {}).await.unwrap();
        instance
            .upgrade(
                &repo,
                &BTreeMap::from([(svc("hello"), pushed.commit)]),
                None,
                v,
            )
            .await
            .unwrap();
        write_file(&dir, "service.toml", manifest.as_bytes());
    }
    let generations = instance.state().generations().unwrap();
    assert_eq!(generations.len(), 2);
    instance.shutdown().await;

    let state = config.root.join("state");
    let pristine = cluster.path("pristine-state");
    molt_e2e::damage::copy_dir(&state, &pristine);
    let db = state.join("db");
    let len = std::fs::metadata(&db).unwrap().len();
    for (what, damage) in [
        (
            "deleted",
            Box::new(|| std::fs::remove_dir_all(&state).unwrap()) as Box<dyn Fn()>,
        ),
        (
            "cut to half",
            Box::new(|| molt_e2e::damage::cut(&db, len / 2)),
        ),
    ] {
        let _ = std::fs::remove_dir_all(&state);
        molt_e2e::damage::copy_dir(&pristine, &state);
        damage();
        let instance = Instance::open(config.clone()).await.unwrap();
        assert_eq!(
            instance.state().generations().unwrap(),
            generations,
            "{what}"
        );
        let addr = instance.public_addr(&svc("hello"), "main").unwrap();
        let (code, body) = get_once(addr, "/").await;
        assert_eq!(
            (code, version_of(&body)),
            (200, "hello v2".to_owned()),
            "{what}"
        );
        instance.shutdown().await;
    }
}

/// A release found corrupt at boot with no repository to heal it from: the
/// shell starts and serves its other services; the next deploy heals the held
/// one from the repository and starts it, before anything else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_held_back_at_boot_is_healed_and_started_by_the_next_deploy() {
    let cluster = TestCluster::start().await;
    let dev = cluster.repo_client("user/ada/developer").await;
    let repo = cluster.repo_client("shell/qa-1").await;
    let mut target = BTreeMap::new();
    for (name, port) in [("hello", 8080), ("other", 8081)] {
        let dir = cluster.path(&format!("src/{name}"));
        copy_example("hello", &dir);
        let manifest = std::fs::read_to_string(dir.join("service.toml")).unwrap();
        let manifest = manifest
            .replace("name = \"hello\"", &format!("name = \"{name}\""))
            .replace("port = 8080", &format!("port = {port}"));
        write_file(&dir, "service.toml", manifest.as_bytes());
        let pushed = dev.push(&dir, &push_main("v1"), |_| {}).await.unwrap();
        target.insert(svc(name), pushed.commit);
    }
    let config = qa_1(&cluster);
    let mut instance = Instance::open(config.clone()).await.unwrap();
    instance.upgrade(&repo, &target, None, "v1").await.unwrap();
    let release = instance.release_dir(&svc("hello")).unwrap().to_owned();
    instance.shutdown().await;
    std::fs::OpenOptions::new()
        .append(true)
        .open(release.join("server.py"))
        .and_then(|mut f| std::io::Write::write_all(&mut f, b"\nraise SystemExit(3)\n"))
        .unwrap();

    let mut instance = Instance::open(config.clone()).await.unwrap();
    assert!(instance.describe()[&svc("hello")].state.starts_with("held"));
    assert_eq!(instance.public_addr(&svc("hello"), "main"), None);
    let other = instance.public_addr(&svc("other"), "main").unwrap();
    assert_eq!(
        get_once(other, "/").await.0,
        200,
        "the others serve meanwhile"
    );

    // The same target again: nothing to change, but the held one is healed
    // and started first.
    instance
        .upgrade(&repo, &target, None, "again")
        .await
        .unwrap();
    assert!(
        !instance.describe()[&svc("hello")].state.starts_with("held"),
        "{:?}",
        instance.describe()
    );
    let addr = instance.public_addr(&svc("hello"), "main").unwrap();
    let (code, body) = get_once(addr, "/").await;
    assert_eq!(
        (code, version_of(&body)),
        (200, "hello from molt".to_owned())
    );
    assert!(
        !std::fs::read_to_string(release.join("server.py"))
            .unwrap()
            .contains("SystemExit(3)")
    );
    instance.shutdown().await;
}
