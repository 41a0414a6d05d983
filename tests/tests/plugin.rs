//! Plugin services end to end: the sample `counter` plugin built by cargo (as a
//! shell builds it), loaded into a [`PluginHost`] in this process, served over
//! HTTP on loopback, and swapped between versions under keep-alive load.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use molt_e2e::{copy_example, get, get_once, write_file};
use shell::plugin::{PluginError, PluginHost, provide_sdk};
use tokio::io::BufReader;
use tokio::net::TcpStream;

/// Builds `examples/counter` with its source edited by `edit`, in `dir` (one
/// build directory for every variant, so later builds are incremental), and
/// copies the library out as `NAME.so`.
fn build(dir: &Path, name: &str, edit: impl Fn(&str) -> String) -> PathBuf {
    let src = dir.join("src");
    if !src.exists() {
        copy_example("counter", dir);
        provide_sdk(dir).unwrap();
        std::fs::write(
            dir.join("lib.rs.orig"),
            std::fs::read(src.join("lib.rs")).unwrap(),
        )
        .unwrap();
    }
    let original = std::fs::read_to_string(dir.join("lib.rs.orig")).unwrap();
    write_file(dir, "src/lib.rs", edit(&original).as_bytes());
    let out = std::process::Command::new("cargo")
        .args(["build", "--release", "--offline", "--quiet"])
        .current_dir(dir)
        .env_remove("CARGO_TARGET_DIR")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lib = dir.join(format!("{name}.so"));
    std::fs::copy(dir.join("target/release/libcounter.so"), &lib).unwrap();
    lib
}

fn version(v: &str) -> impl Fn(&str) -> String + '_ {
    move |src: &str| {
        src.replace(
            "const VERSION: &str = \"1\";",
            &format!("const VERSION: &str = \"{v}\";"),
        )
    }
}

fn field<'a>(body: &'a str, name: &str) -> &'a str {
    let rest = body.split(&format!("\"{name}\":")).nth(1).unwrap_or("");
    rest.trim_start_matches('"')
        .split(['"', ',', '}'])
        .next()
        .unwrap_or("")
}

fn maps() -> String {
    std::fs::read_to_string("/proc/self/maps").unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_counter_keeps_its_state_across_50_swaps_under_load_and_bad_libraries_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let build_dir = tmp.path().join("counter");
    let v1 = build(&build_dir, "v1", version("1"));
    let v2 = build(&build_dir, "v2", version("2"));
    let wrong_abi = build(&build_dir, "abi", |src| {
        version("abi")(src).replace(
            "export_plugin!(Counter);",
            "#[unsafe(no_mangle)]\npub extern \"C\" fn molt_plugin_entry() -> *const molt_plugin_sdk::PluginTable {\n    static T: molt_plugin_sdk::PluginTable = molt_plugin_sdk::table::<Counter>(999);\n    &T\n}",
        )
    });
    let refusing = build(&build_dir, "refusing", |src| {
        version("refusing")(src).replace(
            "        let mut hits = 0;",
            "        if state.is_some() {\n            return Err(\"this version refuses old state\".into());\n        }\n        let mut hits = 0;",
        )
    });

    let loads = tmp.path().join("loaded");
    let host = PluginHost::start("counter", &v1, &loads, None)
        .await
        .unwrap();
    let addr = host.local_addr();
    let (code, body) = get_once(addr, "/healthz").await;
    assert_eq!((code, body.as_str()), (200, "ok\n"));
    // Some state besides the counter: a key.
    {
        let mut c = TcpStream::connect(addr).await.unwrap();
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        c.write_all(b"PUT /kv/colour HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nConnection: close\r\n\r\nteal")
            .await
            .unwrap();
        let mut answer = String::new();
        c.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 204"), "{answer}");
    }

    // One keep-alive client counting hits while the library is swapped 50 times.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let client = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut conn = BufReader::new(TcpStream::connect(addr).await.unwrap());
            let mut hits = Vec::new();
            let mut versions = std::collections::BTreeSet::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let (code, body) = get(&mut conn, "/").await.unwrap();
                assert_eq!(code, 200, "{body}");
                hits.push(field(&body, "hits").parse::<u64>().unwrap());
                versions.insert(field(&body, "version").to_owned());
            }
            (hits, versions)
        })
    };
    let mut pauses = Vec::new();
    let mut unloaded = Vec::new();
    for swap in 0..50 {
        tokio::time::sleep(Duration::from_millis(5)).await;
        unloaded.push(host.loaded_path().await);
        let next = if swap % 2 == 0 { &v2 } else { &v1 };
        pauses.push(host.swap(next).await.unwrap().pause);
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (hits, versions) = client.await.unwrap();
    // Every answer counted on from the one before: no swap lost or reset state.
    assert!(hits.len() > 50, "only {} answers", hits.len());
    for pair in hits.windows(2) {
        assert_eq!(pair[1], pair[0] + 1, "hits jumped: {pair:?}");
    }
    let want: std::collections::BTreeSet<String> = ["1", "2"].map(String::from).into();
    assert_eq!(versions, want);
    let (_, body) = get_once(addr, "/kv/colour").await;
    assert_eq!(body, "teal");
    pauses.sort();
    eprintln!(
        "plugin swap pause: p50 {:?}, p99 {:?}, max {:?}",
        pauses[pauses.len() / 2],
        pauses[pauses.len() * 99 / 100],
        pauses[pauses.len() - 1]
    );

    // The old libraries are really gone from the process; the current one is not.
    let mapped = maps();
    for old in &unloaded {
        assert!(
            !mapped.contains(old.to_str().unwrap()),
            "{} is still mapped",
            old.display()
        );
    }
    assert!(mapped.contains(host.loaded_path().await.to_str().unwrap()));

    // A panicking request is a 500; the plugin serves on.
    let (code, body) = get_once(addr, "/panic").await;
    assert_eq!(code, 500);
    assert!(body.contains("counter was asked to panic"), "{body}");
    let (code, _) = get_once(addr, "/").await;
    assert_eq!(code, 200);

    // A library of another ABI is refused, as is one whose create fails; the
    // running plugin serves on with its state.
    let before = field(&get_once(addr, "/").await.1, "hits")
        .parse::<u64>()
        .unwrap();
    let err = host.swap(&wrong_abi).await.unwrap_err();
    assert!(matches!(err, PluginError::Abi { found: 999, .. }), "{err}");
    let err = host.swap(&refusing).await.unwrap_err();
    assert!(err.to_string().contains("refuses old state"), "{err}");
    let (_, body) = get_once(addr, "/").await;
    assert_eq!(field(&body, "hits").parse::<u64>().unwrap(), before + 1);
    assert_eq!(field(&body, "version"), "1");
    // The refused libraries were unloaded and their copies deleted: the only
    // load left, in memory and on disk, is the one serving.
    let current = host.loaded_path().await;
    let loads_dir = loads.to_str().unwrap();
    for line in maps().lines().filter(|l| l.contains(loads_dir)) {
        assert!(
            line.contains(current.to_str().unwrap()),
            "a refused library is still mapped: {line}"
        );
    }
    let copies: Vec<_> = std::fs::read_dir(&loads).unwrap().flatten().collect();
    assert_eq!(copies.len(), 1, "{copies:?}");

    host.shutdown().await;
    assert!(
        std::fs::read_dir(&loads).unwrap().next().is_none(),
        "load copies left behind"
    );

    // A host dropped without a shutdown stops serving and unloads too.
    let dropped = PluginHost::start("counter", &v1, &loads, None)
        .await
        .unwrap();
    let addr = dropped.local_addr();
    assert_eq!(get_once(addr, "/").await.0, 200);
    drop(dropped);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(addr).await.is_ok() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "a dropped host still serves"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    while std::fs::read_dir(&loads).unwrap().next().is_some() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "a dropped host stayed loaded"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A plugin service deployed like any service: pushed, built by the shell (with
/// the SDK it provides), served on its public port through the HTTP front, and
/// upgraded by swapping the library in place — state kept, no request failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_serves_a_plugin_service_and_upgrades_it_keeping_its_state() {
    use image_spec::{InstanceName, ServiceName};
    use molt_e2e::{TestCluster, push_main};
    use shell::instance::{Instance, InstanceConfig, PublicPorts, Strategy};
    use std::collections::BTreeMap;

    let cluster = TestCluster::start().await;
    let dir = cluster.path("counter");
    copy_example("counter", &dir);
    let dev = cluster.repo_client("user/ada/developer").await;
    let repo = cluster.repo_client("shell/dev-1").await;
    let v1 = dev.push(&dir, &push_main("v1"), |_| {}).await.unwrap();
    let src = std::fs::read_to_string(dir.join("src/lib.rs")).unwrap();
    write_file(&dir, "src/lib.rs", version("2")(&src).as_bytes());
    let v2 = dev.push(&dir, &push_main("v2"), |_| {}).await.unwrap();
    let counter = ServiceName::new("counter").unwrap();
    let mut instance = Instance::open(InstanceConfig {
        name: InstanceName::new("dev-1").unwrap(),
        root: cluster.path("instance"),
        public_ports: PublicPorts::Ephemeral,
        public_ip: shell::instance::LOOPBACK,
    })
    .await
    .unwrap();
    let to = |c| BTreeMap::from([(counter.clone(), c)]);
    instance
        .upgrade(&repo, &to(v1.commit), None, "v1")
        .await
        .unwrap();
    let public = instance.public_addr(&counter, "main").unwrap();
    let (code, body) = get_once(public, "/").await;
    assert_eq!((code, field(&body, "version")), (200, "1"), "{body}");
    // It runs inside the shell: its pid is ours; its health check is probed.
    assert_eq!(instance.pid(&counter), Some(std::process::id()));
    assert_eq!(instance.describe()[&counter].health, "healthy");
    // Its log holds the shell's notes about it.
    let log = std::fs::read_to_string(cluster.path("instance/logs/counter/g1.log")).unwrap();
    assert!(
        log.contains("molt: plugin") && log.contains("loaded, healthy"),
        "{log}"
    );

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let client = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut conn = BufReader::new(TcpStream::connect(public).await.unwrap());
            let mut hits = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let (code, body) = get(&mut conn, "/").await.unwrap();
                assert_eq!(code, 200, "{body}");
                hits.push(field(&body, "hits").parse::<u64>().unwrap());
            }
            hits
        })
    };
    // In place, then in a shadow generation, then back: each a library swap.
    for (commit, strategy, version) in [
        (v2.commit, Strategy::InPlace, "2"),
        (v1.commit, Strategy::Shadow, "1"),
        (v2.commit, Strategy::Shadow, "2"),
    ] {
        let report = instance
            .upgrade_reporting(&repo, &to(commit), None, "swap", strategy, &|_, _| {})
            .await
            .unwrap();
        assert_eq!(report.restarted, std::slice::from_ref(&counter));
        let (_, body) = get_once(public, "/").await;
        assert_eq!(field(&body, "version"), version, "{body}");
    }
    // A failure right after the swap, in either strategy: the previous library
    // is swapped back, its state handed back (the hits keep counting up).
    for strategy in [Strategy::InPlace, Strategy::Shadow] {
        let options = shell::instance::UpgradeOptions {
            strategy,
            fault: Some(shell::executor::Fault {
                after: wire::plan::StepKind::SwapPlugin,
            }),
            ..shell::instance::UpgradeOptions::default()
        };
        let err = instance
            .upgrade_with(
                &repo,
                &to(v1.commit),
                None,
                "fault",
                options,
                &|_, _| {},
                &|_| {},
            )
            .await
            .unwrap_err();
        assert!(
            matches!(err, shell::instance::UpgradeError::Injected { .. }),
            "{err}"
        );
        assert_eq!(instance.commits()[&counter], v2.commit);
        let (_, body) = get_once(public, "/").await;
        assert_eq!(field(&body, "version"), "2", "{strategy}: {body}");
    }
    // Hooks: a failing pre_swap keeps the running library; a passing one runs
    // with the host's port before the swap, and post_swap after it.
    let marks = cluster.path("marks");
    std::fs::create_dir_all(&marks).unwrap();
    let toml = std::fs::read_to_string(dir.join("service.toml")).unwrap();
    let m = marks.display();
    let mut hooked = Vec::new();
    for hooks in [
        format!(
            "pre_swap = {{ command = [\"sh\", \"-c\", \"echo $PORT > {m}/refused; exit 5\"] }}"
        ),
        format!(
            "pre_swap = {{ command = [\"sh\", \"-c\", \"echo $PORT > {m}/pre\"] }}\n\
             post_swap = {{ command = [\"sh\", \"-c\", \"echo $PORT > {m}/post\"] }}"
        ),
    ] {
        write_file(
            &dir,
            "service.toml",
            format!("{toml}\n[hooks]\n{hooks}\n").as_bytes(),
        );
        hooked.push(
            dev.push(&dir, &push_main("hooks"), |_| {})
                .await
                .unwrap()
                .commit,
        );
    }
    let host_port = instance
        .backend_addr(&counter, "main")
        .unwrap()
        .port()
        .to_string();
    let err = instance
        .upgrade_reporting(
            &repo,
            &to(hooked[0]),
            None,
            "hook",
            Strategy::Shadow,
            &|_, _| {},
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, shell::instance::UpgradeError::Hook { .. }),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(marks.join("refused"))
            .unwrap()
            .trim(),
        host_port
    );
    assert_eq!(instance.commits()[&counter], v2.commit);
    let report = instance
        .upgrade_reporting(
            &repo,
            &to(hooked[1]),
            None,
            "hook",
            Strategy::InPlace,
            &|_, _| {},
        )
        .await
        .unwrap();
    assert_eq!(report.restarted, std::slice::from_ref(&counter));
    for mark in ["pre", "post"] {
        let port = std::fs::read_to_string(marks.join(mark)).unwrap();
        assert_eq!(port.trim(), host_port, "{mark}");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let hits = client.await.unwrap();
    assert!(hits.len() > 3);
    for pair in hits.windows(2) {
        assert!(pair[1] > pair[0], "the count went back: {pair:?}");
    }
    // The recorded state names the new release; a restarted shell reloads it,
    // with the state the shutdown exported.
    let (_, body) = get_once(public, "/").await;
    let before: u64 = field(&body, "hits").parse().unwrap();
    instance.shutdown().await;
    let config = || InstanceConfig {
        name: InstanceName::new("dev-1").unwrap(),
        root: cluster.path("instance"),
        public_ports: PublicPorts::Ephemeral,
        public_ip: shell::instance::LOOPBACK,
    };
    let kept = cluster.path("instance/plugins/counter.state");
    assert!(kept.exists());
    let instance = Instance::open(config()).await.unwrap();
    let public = instance.public_addr(&counter, "main").unwrap();
    let (_, body) = get_once(public, "/").await;
    assert_eq!(field(&body, "version"), "2");
    assert_eq!(
        field(&body, "hits").parse::<u64>().unwrap(),
        before + 1,
        "{body}"
    );
    assert!(!kept.exists(), "kept state is taken up once");

    // State the plugin refuses is an error that keeps the file for the operator.
    instance.shutdown().await;
    std::fs::write(&kept, b"xx").unwrap();
    let err = Instance::open(config()).await.unwrap_err();
    assert!(
        matches!(err, shell::instance::UpgradeError::Plugin { .. }),
        "{err}"
    );
    assert_eq!(std::fs::read(&kept).unwrap(), b"xx");
    std::fs::remove_file(&kept).unwrap();
    let instance = Instance::open(config()).await.unwrap();
    let public = instance.public_addr(&counter, "main").unwrap();
    assert_eq!(field(&get_once(public, "/").await.1, "hits"), "1");
    instance.shutdown().await;
}
