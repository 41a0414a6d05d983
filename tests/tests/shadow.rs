//! The shadow strategy end to end: whole generations of two real services
//! (Python and Rust) started beside the running one and cut over at once, under
//! keep-alive HTTP load from the test; and the failures that must never reach
//! traffic (a failing health check, a failing `pre_swap` hook).

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use image_spec::{CommitId, InstanceName, ServiceName};
use molt_e2e::{
    Load, TestCluster, copy_example, get_once, push_main, set_version, version_of, write_file,
};
use repo_client::RepoClient;
use shell::instance::{Instance, InstanceConfig, PublicPorts, Strategy, UpgradeError};
use wire::shell::Phase;

fn svc(s: &str) -> ServiceName {
    ServiceName::new(s).unwrap()
}

/// The two examples in two versions each, pushed: (hello, orders) commits.
struct Versions {
    hello: [CommitId; 2],
    orders: [CommitId; 2],
}

async fn push_versions(cluster: &TestCluster, dev: &RepoClient) -> Versions {
    let (hello_dir, orders_dir) = (cluster.path("hello"), cluster.path("orders"));
    copy_example("hello", &hello_dir);
    copy_example("orders", &orders_dir);
    let toml = std::fs::read_to_string(hello_dir.join("service.toml")).unwrap();
    let main_rs = std::fs::read_to_string(orders_dir.join("src/main.rs")).unwrap();
    let mut hello = Vec::new();
    let mut orders = Vec::new();
    for v in ["1", "2"] {
        let greeting = format!("GREETING = \"hello v{v}\"");
        write_file(
            &hello_dir,
            "service.toml",
            toml.replace("GREETING = \"hello from molt\"", &greeting)
                .as_bytes(),
        );
        let version = format!("const VERSION: &str = \"{v}\";");
        write_file(
            &orders_dir,
            "src/main.rs",
            main_rs
                .replace("const VERSION: &str = \"1\";", &version)
                .as_bytes(),
        );
        let msg = push_main(&format!("v{v}"));
        hello.push(dev.push(&hello_dir, &msg, |_| {}).await.unwrap().commit);
        orders.push(dev.push(&orders_dir, &msg, |_| {}).await.unwrap().commit);
    }
    Versions {
        hello: [hello[0], hello[1]],
        orders: [orders[0], orders[1]],
    }
}

fn target(v: &Versions, i: usize) -> BTreeMap<ServiceName, CommitId> {
    BTreeMap::from([(svc("hello"), v.hello[i]), (svc("orders"), v.orders[i])])
}

async fn open(cluster: &TestCluster) -> Instance {
    Instance::open(InstanceConfig {
        name: InstanceName::new("prod-1").unwrap(),
        root: cluster.path("instance"),
        public_ports: PublicPorts::Ephemeral,
        public_ip: shell::instance::LOOPBACK,
    })
    .await
    .unwrap()
}

async fn shadow(
    instance: &mut Instance,
    repo: &RepoClient,
    target: &BTreeMap<ServiceName, CommitId>,
    reason: &str,
) -> Result<shell::instance::UpgradeReport, UpgradeError> {
    instance
        .upgrade_reporting(repo, target, None, reason, Strategy::Shadow, &|_, _| {})
        .await
}

/// An instance running v1 of both examples, by a shadow upgrade.
struct Running {
    cluster: TestCluster,
    dev: RepoClient,
    repo: RepoClient,
    v: Versions,
    instance: Instance,
    hello: SocketAddr,
    orders: SocketAddr,
}

async fn running_v1() -> Running {
    let cluster = TestCluster::start().await;
    let dev = cluster.repo_client("user/ada/developer").await;
    let repo = cluster.repo_client("shell/prod-1").await;
    let v = push_versions(&cluster, &dev).await;
    let mut instance = open(&cluster).await;
    shadow(&mut instance, &repo, &target(&v, 0), "v1")
        .await
        .unwrap();
    let hello = instance.public_addr(&svc("hello"), "main").unwrap();
    let orders = instance.public_addr(&svc("orders"), "main").unwrap();
    Running {
        cluster,
        dev,
        repo,
        v,
        instance,
        hello,
        orders,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_shadow_swaps_under_load_fail_no_request_and_roll_back_without_a_build() {
    let Running {
        cluster,
        dev: _,
        repo,
        v,
        mut instance,
        hello,
        orders,
    } = running_v1().await;
    let loads = [Load::start(hello), Load::start(orders)];

    for swap in 1..=20 {
        let report = shadow(&mut instance, &repo, &target(&v, swap % 2), "swap")
            .await
            .unwrap();
        assert_eq!(report.restarted, [svc("hello"), svc("orders")]);
        // Each swap is seen by a fresh request, on both services.
        let want = if swap % 2 == 1 { "2" } else { "1" };
        assert_eq!(
            version_of(&get_once(hello, "/").await.1),
            format!("hello v{want}")
        );
        assert_eq!(version_of(&get_once(orders, "/").await.1), want);
    }
    let mut answered = 0;
    for load in loads {
        let (ok, failed, seen) = load.finish().await;
        assert_eq!(failed, 0, "requests failed during the swaps");
        answered += ok;
        let allowed: BTreeSet<String> = ["hello v1", "hello v2", "1", "2"]
            .into_iter()
            .map(String::from)
            .collect();
        assert!(seen.is_subset(&allowed), "{seen:?}");
    }
    assert!(answered > 20, "the load barely ran: {answered}");

    // Each generation's processes logged to their own file, stamped; only the
    // newest generations' logs are kept.
    let logs: BTreeSet<String> = std::fs::read_dir(cluster.path("instance/logs/hello"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|f| f.starts_with('g'))
        .collect();
    assert_eq!(logs.len(), shell::instance::KEEP_LOGS, "{logs:?}");
    assert!(
        logs.contains("g21.log") && !logs.contains("g11.log"),
        "{logs:?}"
    );
    let log = std::fs::read_to_string(cluster.path("instance/logs/hello/g21.log")).unwrap();
    let first = log.lines().next().unwrap();
    assert!(
        first.starts_with("20") && first.contains("Z hello: listening on"),
        "{first}"
    );

    // The lifecycle: the last generation serves, the one before it stopped.
    let lifecycle = instance.lifecycle().snapshot();
    let phases: Vec<(u64, Phase)> = lifecycle
        .phases()
        .iter()
        .map(|g| (g.number, g.phase))
        .collect();
    assert_eq!(phases[1..], [(20, Phase::Stopped), (21, Phase::Serving)]);

    // Back to the previous generation: its releases are on disk, nothing is built.
    let previous = instance.previous().unwrap().unwrap();
    let back: BTreeMap<ServiceName, CommitId> = previous
        .services
        .iter()
        .map(|(n, s)| (n.clone(), s.commit))
        .collect();
    let started = Instant::now();
    let report = shadow(&mut instance, &repo, &back, "rollback")
        .await
        .unwrap();
    let took = started.elapsed();
    assert_eq!(report.restarted.len(), 2);
    for (name, t) in &report.steps {
        assert_eq!(t.build, Duration::ZERO, "{name} was built again");
    }
    assert_eq!(
        version_of(&get_once(orders, "/").await.1),
        "2",
        "generation 21 ran v1 (even swap), so the one before it ran v2"
    );
    eprintln!("shadow rollback took {took:?}");
    instance.shutdown().await;
}

/// hello with its `service.toml` edited by `edit`, pushed.
async fn hello_variant(
    cluster: &TestCluster,
    dev: &RepoClient,
    edit: impl Fn(&str) -> String,
) -> CommitId {
    let dir = cluster.path("hello");
    let toml = std::fs::read_to_string(dir.join("service.toml")).unwrap();
    write_file(&dir, "service.toml", edit(&toml).as_bytes());
    let pushed = dev.push(&dir, &push_main("variant"), |_| {}).await.unwrap();
    write_file(&dir, "service.toml", toml.as_bytes());
    pushed.commit
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_that_fails_health_or_its_pre_swap_hook_never_takes_traffic() {
    let Running {
        cluster,
        dev,
        repo,
        v,
        mut instance,
        hello,
        orders,
    } = running_v1().await;
    let pids = (
        instance.pid(&svc("hello")).unwrap(),
        instance.pid(&svc("orders")).unwrap(),
    );
    let loads = [Load::start(hello), Load::start(orders)];

    // A generation whose hello never passes its health check.
    let sick = hello_variant(&cluster, &dev, |t| {
        t.replace("http = \"/healthz\"", "command = [\"false\"]")
            .replace("start_grace = \"10s\"", "start_grace = \"1s\"")
            .replace("hello v2", "sick")
    })
    .await;
    let mut sick_target = target(&v, 1);
    sick_target.insert(svc("hello"), sick);
    let err = shadow(&mut instance, &repo, &sick_target, "sick")
        .await
        .unwrap_err();
    assert!(matches!(err, UpgradeError::Unhealthy { .. }), "{err}");
    let lifecycle = instance.lifecycle().snapshot();
    let last = lifecycle.generations.last().unwrap();
    assert_eq!(last.number, 2);
    // It started and failed: it never became healthy, let alone served.
    assert_eq!(last.phases, [Phase::Starting, Phase::Failed]);
    let why = lifecycle.last_failure.unwrap();
    assert!(why.contains("hello") && why.contains("healthy"), "{why}");

    // A generation whose pre_swap hook fails (a migration, say).
    let marks = cluster.path("marks");
    std::fs::create_dir_all(&marks).unwrap();
    let hooked = |exit: u8| {
        let marks = marks.clone();
        move |t: &str| {
            format!(
                "{}\n[hooks]\npre_swap = {{ command = [\"sh\", \"-c\", \"echo $PORT > {}/hook-{exit}; exit {exit}\"] }}\n",
                t.replace("hello v2", "hooked"),
                marks.display()
            )
        }
    };
    let refused = hello_variant(&cluster, &dev, hooked(3)).await;
    let mut hook_target = target(&v, 1);
    hook_target.insert(svc("hello"), refused);
    let err = shadow(&mut instance, &repo, &hook_target, "hook")
        .await
        .unwrap_err();
    assert!(matches!(err, UpgradeError::Hook { .. }), "{err}");
    assert!(err.to_string().contains("pre_swap"), "{err}");
    // The hook ran against the shadow: it saw the new process's port.
    let port: u16 = std::fs::read_to_string(marks.join("hook-3"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_ne!(port, hello.port());

    // Through both, the old generation served every request, untouched.
    assert_eq!(
        (
            instance.pid(&svc("hello")).unwrap(),
            instance.pid(&svc("orders")).unwrap()
        ),
        pids
    );
    for load in loads {
        let (ok, failed, seen) = load.finish().await;
        assert_eq!(failed, 0);
        assert!(ok > 0);
        assert!(
            seen.iter().all(|s| s == "hello v1" || s == "1"),
            "a failed generation answered: {seen:?}"
        );
    }

    // A passing hook lets the generation in.
    let accepted = hello_variant(&cluster, &dev, hooked(0)).await;
    let mut ok_target = target(&v, 1);
    ok_target.insert(svc("hello"), accepted);
    shadow(&mut instance, &repo, &ok_target, "hook ok")
        .await
        .unwrap();
    assert!(marks.join("hook-0").exists());
    assert_eq!(version_of(&get_once(hello, "/").await.1), "hooked");
    assert_eq!(version_of(&get_once(orders, "/").await.1), "2");

    // In place, the same: a failing hook leaves the running process serving...
    let serving = instance.pid(&svc("hello")).unwrap();
    let mut failing = target(&v, 1);
    failing.insert(svc("hello"), hello_variant(&cluster, &dev, hooked(4)).await);
    let err = instance
        .upgrade_reporting(&repo, &failing, None, "hook", Strategy::InPlace, &|_, _| {})
        .await
        .unwrap_err();
    assert!(matches!(err, UpgradeError::Hook { .. }), "{err}");
    assert!(marks.join("hook-4").exists());
    assert_eq!(instance.pid(&svc("hello")), Some(serving));
    assert_eq!(version_of(&get_once(hello, "/").await.1), "hooked");
    // ... and a passing one runs against the new process, then post_swap after it.
    let both = hello_variant(&cluster, &dev, |t| {
        let m = marks.display();
        format!(
            "{}\n[hooks]\npre_swap = {{ command = [\"sh\", \"-c\", \"echo $PORT > {m}/pre\"] }}\n\
             post_swap = {{ command = [\"sh\", \"-c\", \"echo $PORT > {m}/post\"] }}\n",
            t.replace("hello v2", "in place")
        )
    })
    .await;
    let mut passing = target(&v, 1);
    passing.insert(svc("hello"), both);
    instance
        .upgrade_reporting(&repo, &passing, None, "hook", Strategy::InPlace, &|_, _| {})
        .await
        .unwrap();
    let new_port = instance.backend_addr(&svc("hello"), "main").unwrap().port();
    for mark in ["pre", "post"] {
        let port = std::fs::read_to_string(marks.join(mark)).unwrap();
        assert_eq!(port.trim(), new_port.to_string(), "{mark}");
    }
    assert_eq!(version_of(&get_once(hello, "/").await.1), "in place");
    instance.shutdown().await;
}

/// The environment of process `pid`, as `NAME=VALUE` strings.
fn environ(pid: u32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/environ"))
        .unwrap()
        .split(|b| *b == 0)
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}

fn data_dir_of(pid: u32) -> std::path::PathBuf {
    let var = environ(pid)
        .into_iter()
        .find_map(|v| v.strip_prefix("MOLT_DATA=").map(std::path::PathBuf::from));
    var.unwrap_or_else(|| panic!("pid {pid} has no MOLT_DATA"))
}

/// `shadow-full`: the unchanged services start afresh too, and every service
/// with data runs on a copy of it, so the new generation is a complete copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_shadow_restarts_everything_on_copies_of_the_data() {
    let cluster = TestCluster::start().await;
    let dev = cluster.repo_client("user/ada/developer").await;
    let repo = cluster.repo_client("shell/prod-1").await;
    let (hello_dir, orders_dir) = (cluster.path("hello"), cluster.path("orders"));
    copy_example("hello", &hello_dir);
    copy_example("orders", &orders_dir);
    let toml = std::fs::read_to_string(hello_dir.join("service.toml")).unwrap();
    write_file(
        &hello_dir,
        "service.toml",
        toml.replace("kind = \"process\"", "kind = \"process\"\ndata = [\"db\"]")
            .as_bytes(),
    );
    let hello = dev
        .push(&hello_dir, &push_main("hello"), |_| {})
        .await
        .unwrap();
    let orders_v1 = dev
        .push(&orders_dir, &push_main("v1"), |_| {})
        .await
        .unwrap();
    set_version(&orders_dir.join("src/main.rs"), "2");
    let orders_v2 = dev
        .push(&orders_dir, &push_main("v2"), |_| {})
        .await
        .unwrap();
    let target =
        |orders: CommitId| BTreeMap::from([(svc("hello"), hello.commit), (svc("orders"), orders)]);
    let mut instance = open(&cluster).await;
    shadow(&mut instance, &repo, &target(orders_v1.commit), "v1")
        .await
        .unwrap();
    let hello_pid = instance.pid(&svc("hello")).unwrap();
    let live = data_dir_of(hello_pid);
    assert_eq!(live, cluster.path("instance/data/hello/live"));
    assert!(live.join("db").is_dir());
    std::fs::write(live.join("db/note.txt"), "written by generation 1").unwrap();

    let steps = std::sync::Mutex::new(Vec::new());
    let report = instance
        .upgrade_reporting(
            &repo,
            &target(orders_v2.commit),
            None,
            "full",
            Strategy::ShadowFull,
            &|s, step| {
                steps
                    .lock()
                    .unwrap()
                    .push(format!("{}: {step}", s.map_or("-", |s| s.as_str())))
            },
        )
        .await
        .unwrap();
    // hello did not change, and still started afresh, on a copy of its data.
    assert_eq!(report.restarted, [svc("hello"), svc("orders")]);
    assert!(report.unchanged.is_empty());
    let new_pid = instance.pid(&svc("hello")).unwrap();
    assert_ne!(new_pid, hello_pid);
    let copy = data_dir_of(new_pid);
    assert_eq!(copy, cluster.path("instance/data/hello/g2"));
    assert_eq!(
        std::fs::read_to_string(copy.join("db/note.txt")).unwrap(),
        "written by generation 1"
    );
    let steps = steps.into_inner().unwrap().join("\n");
    assert!(steps.contains("hello: data copied:"), "{steps}");
    // The previous generation's data stays for a rollback.
    assert!(live.join("db/note.txt").exists());

    // A restarted shell gives hello the data of the recorded generation.
    instance.shutdown().await;
    let instance = open(&cluster).await;
    let pid = instance.pid(&svc("hello")).unwrap();
    assert_eq!(data_dir_of(pid), copy);
    instance.shutdown().await;
}
