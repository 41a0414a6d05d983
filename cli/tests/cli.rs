//! The `molt` binary as a user runs it: `molt init`, a real `molt repo-server` child
//! process on 127.0.0.1, pushes, logs, diffs, images, SIGTERM and `kill -9`.

#![allow(clippy::unwrap_used)]

mod common;

use common::{Cluster, MOLT, start_shell, write};

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn service(dir: &Path, name: &str) {
    write(
        dir,
        "service.toml",
        format!("name = \"{name}\"\n[run]\ncommand = [\"./run\"]\n[[ports]]\nport = 8080\n")
            .as_bytes(),
    );
}

#[test]
fn init_writes_a_cluster_with_private_keys_0600() {
    use std::os::unix::fs::PermissionsExt;
    let c = Cluster::init();
    for key in ["ca.key", "admin.key", "repo-server.key", "portal.key"] {
        let mode = std::fs::metadata(c.dir.path().join("certs").join(key))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{key}");
    }
    // A second init in the same place refuses to overwrite the cluster.
    let out = Command::new(MOLT)
        .arg("init")
        .arg(c.dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("exists already"));
}

#[test]
fn push_log_diff_and_images_from_the_binary() {
    let c = Cluster::init();
    let svc = c.dir.path().join("orders");
    service(&svc, "orders");
    write(&svc, "src/main.rs", b"fn main() {}");
    write(&svc, "data.bin", &vec![1u8; 50_000]);
    let dir = svc.to_str().unwrap();

    let first = c.molt_json(&["push", dir, "-m", "first"]);
    assert_eq!(first["service"], "orders");
    assert_eq!(first["created"], true);
    assert_eq!(first["files"], 3);
    assert_eq!(first["blobs_sent"], 3);

    let again = c.molt_json(&["push", dir]);
    assert_eq!(again["created"], false);
    assert_eq!(again["blobs_sent"], 0);
    assert_eq!(again["bytes_sent"], 0);
    assert_eq!(again["commit"], first["commit"]);
    let text = c.molt(&["push", dir]);
    assert!(String::from_utf8_lossy(&text.stdout).contains("nothing to push"));

    write(&svc, "src/main.rs", b"fn main() { v2() }");
    let second = c.molt_json(&["push", dir, "-m", "second"]);
    assert_eq!(second["blobs_sent"], 1);
    assert_eq!(second["bytes_sent"], 18);

    let log = c.molt_json(&["log", "orders"]);
    let commits: Vec<&str> = log
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["commit"].as_str().unwrap())
        .collect();
    assert_eq!(
        commits,
        [
            second["commit"].as_str().unwrap(),
            first["commit"].as_str().unwrap()
        ]
    );
    assert_eq!(log[0]["author"], "admin");

    let short = &first["commit"].as_str().unwrap()[..10];
    let diff = c.molt_json(&["diff", "orders", short, "main"]);
    let changes = diff["changes"].as_array().unwrap();
    assert_eq!(changes.len(), 1);
    assert_eq!(changes[0]["change"], "modified");
    assert_eq!(changes[0]["path"], "src/main.rs");

    let img = c.molt_json(&[
        "image",
        "create",
        "shop-1",
        "--set",
        &format!("orders={short}"),
    ]);
    assert_eq!(img["services"]["orders"], first["commit"]);
    let img2 = c.molt_json(&[
        "image",
        "create",
        "shop-2",
        "--from",
        "shop-1",
        "--set",
        "orders=main",
    ]);
    assert_eq!(img2["services"]["orders"], second["commit"]);
    let shown = c.molt_json(&["image", "show", "shop-1"]);
    assert_eq!(shown["id"], img["id"]);
    // The repository recorded who created it: the CLI's user, from its certificate.
    assert_eq!(shown["created"]["author"], "admin");
    assert_eq!(shown["created"]["by"], "user/admin/admin");
    assert_eq!(img["created"], shown["created"]);
    let list = c.molt_json(&["image", "list"]);
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["shop-1", "shop-2"]);

    // Errors are clear and exit non-zero.
    let dup = c.molt(&["image", "create", "shop-1", "--set", "orders=main"]);
    assert!(!dup.status.success());
    assert!(String::from_utf8_lossy(&dup.stderr).contains("immutable"));
    let bad = c.molt(&["push", c.dir.path().join("nowhere").to_str().unwrap()]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("service.toml"));
}

/// What a new user trips on when making an image: a service the repository
/// does not have, and two services on one public port (which would pass here
/// and fail at deploy with the port in use). Both are refused, clearly.
#[test]
fn image_create_names_a_missing_service_and_a_shared_port() {
    let c = Cluster::init();
    let out = c.molt(&["image", "create", "shop-1", "--set", "nosvc=main"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("the repository has no service `nosvc`"),
        "{err}"
    );
    assert!(!err.contains("neither a branch"), "{err}");

    // `service` writes port 8080 for both.
    for name in ["orders", "payments"] {
        let dir = c.dir.path().join(name);
        service(&dir, name);
        c.molt_json(&["push", dir.to_str().unwrap()]);
    }
    let out = c.molt(&[
        "image",
        "create",
        "shop-1",
        "--set",
        "orders=main",
        "--set",
        "payments=main",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("services `orders` and `payments` both want public port 8080"),
        "{err}"
    );
    assert!(
        c.molt_json(&["image", "list"])
            .as_array()
            .unwrap()
            .is_empty()
    );
}

/// With `--json`, a failure is a JSON document on stdout too, whatever failed:
/// the arguments, the configuration, the repository, a shell, the local files.
#[test]
fn with_json_every_failure_is_a_json_document() {
    let c = Cluster::init();
    let nowhere = c.dir.path().join("nowhere");
    let cases: [(&[&str], &str); 7] = [
        (
            &["image", "create", "x", "--set", "nosvc=main"],
            "no service `nosvc`",
        ),
        (&["image", "show", "nope"], "no image named `nope`"),
        (&["push", nowhere.to_str().unwrap()], "nowhere"),
        (
            &["status", "--instance", "dev-9"],
            "unknown instance `dev-9`",
        ),
        (
            &[
                "deploy",
                "x",
                "--instance",
                "a@127.0.0.1:1",
                "--strategy",
                "blue",
            ],
            "in-place, shadow or shadow-full",
        ),
        (&["cert", "issue", "--role", "wizard"], "wizard"),
        (&["init", c.dir.path().to_str().unwrap()], "exists already"),
    ];
    for (args, says) in cases {
        let mut all = args.to_vec();
        all.push("--json");
        let out = c.molt(&all);
        assert!(!out.status.success(), "{args:?}");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let doc: serde_json::Value = serde_json::from_str(&stdout).unwrap_or_else(|e| {
            panic!("{args:?}: stdout is not one JSON document ({e}): {stdout}")
        });
        let error = doc["error"].as_str().unwrap_or_else(|| panic!("{doc}"));
        assert!(error.contains(says), "{args:?}: {doc}");
        assert!(doc["causes"].is_array(), "{doc}");
    }
    // Without a configuration at all.
    let empty = tempfile::tempdir().unwrap();
    let out = Command::new(MOLT)
        .current_dir(empty.path())
        .env_remove("MOLT_CONFIG")
        .args(["image", "list", "--json"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        doc["error"]
            .as_str()
            .unwrap()
            .contains("no molt configuration"),
        "{doc}"
    );
}

/// Without `--config` or `$MOLT_CONFIG`, molt reads `./molt.toml`, else the
/// `./molt-local/molt.toml` that `molt up` writes; with neither, it says how to
/// get one and warns that `molt init` makes another cluster.
#[test]
fn without_a_config_molt_finds_the_one_molt_up_wrote() {
    let c = Cluster::init();
    let cwd = tempfile::tempdir().unwrap();
    let molt = |args: &[&str]| {
        Command::new(MOLT)
            .current_dir(cwd.path())
            .env("XDG_CACHE_HOME", cwd.path().join("cache"))
            .env_remove("MOLT_CONFIG")
            .arg("--repo")
            .arg(c.addr.unwrap().to_string())
            .args(args)
            .output()
            .unwrap()
    };
    let out = molt(&["image", "list"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("./molt.toml") && err.contains("./molt-local/molt.toml"),
        "{err}"
    );
    assert!(
        err.contains("molt init") && err.contains("molt up"),
        "{err}"
    );

    // The cluster's directory where `molt up` keeps its state.
    std::os::unix::fs::symlink(c.dir.path(), cwd.path().join("molt-local")).unwrap();
    let out = molt(&["image", "list", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let images: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(images, serde_json::json!([]));

    // ./molt.toml comes first.
    write(cwd.path(), "molt.toml", b"repo = 1\n");
    let out = molt(&["image", "list"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("invalid configuration `molt.toml`"), "{err}");
}

#[test]
fn a_shell_certificate_cannot_push() {
    let c = Cluster::init();
    let out = c.molt(&[
        "cert", "issue", "--role", "shell", "--name", "dev-1", "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let issued: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(issued["identity"], "shell/dev-1");
    // A config for the shell's identity.
    let shell_config = c.dir.path().join("shell.toml");
    std::fs::write(
        &shell_config,
        format!(
            "repo = \"{}\"\ncert = \"certs/shell-dev-1.crt\"\nkey = \"certs/shell-dev-1.key\"\nca = \"certs/ca.crt\"\n",
            c.addr.unwrap()
        ),
    )
    .unwrap();
    let svc = c.dir.path().join("orders");
    service(&svc, "orders");
    let out = Command::new(MOLT)
        .env("XDG_CACHE_HOME", c.dir.path().join("cache"))
        .arg("--config")
        .arg(&shell_config)
        .args(["push", svc.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("`shell/dev-1` may not push"), "{err}");
}

#[test]
fn sigterm_stops_the_server_gracefully() {
    let mut c = Cluster::init();
    let status = c.signal("-TERM");
    assert!(status.success(), "{status:?}");
}

/// `kill -9` of the server in the middle of a push: after a restart no partial commit
/// is visible, no temporary blob is left, and the push can simply be run again.
#[test]
fn kill_9_during_a_push_leaves_the_store_consistent() {
    let mut c = Cluster::init();
    let svc = c.dir.path().join("big");
    service(&svc, "big");
    for i in 0..40 {
        write(&svc, &format!("blob{i}.bin"), &vec![i as u8; 2_000_000]);
    }
    let mut push = Command::new(MOLT)
        .env("XDG_CACHE_HOME", c.dir.path().join("cache"))
        .arg("--config")
        .arg(c.config())
        .arg("--repo")
        .arg(c.addr.unwrap().to_string())
        .args(["push", svc.to_str().unwrap(), "--json"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();

    // Wait until the server is receiving blob bytes, then kill it.
    let blobs = c.dir.path().join("repo").join("blobs");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let receiving = std::fs::read_dir(blobs.join("tmp"))
            .map(|d| d.count() > 0)
            .unwrap_or(false)
            || std::fs::read_dir(&blobs)
                .map(|d| d.count() > 2)
                .unwrap_or(false);
        if receiving {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the push never started uploading"
        );
        // Polling a condition with a deadline; the pause only spares the CPU.
        std::thread::sleep(Duration::from_millis(2));
    }
    c.signal("-9");
    // The user gives up on the stalled push (a client only notices a dead server
    // at its idle timeout).
    let _ = push.kill();
    let pushed = push.wait().unwrap();
    // The push may have finished before the kill landed; either outcome is allowed,
    // but never a partial one.
    c.start_server();
    let log = c.molt(&["log", "big", "--json"]);
    if pushed.success() {
        assert!(log.status.success());
    } else {
        assert!(!log.status.success(), "a failed push left a branch behind");
        assert!(String::from_utf8_lossy(&log.stderr).contains("no branch big/main"));
    }
    // No temporary blob survives the restart.
    assert_eq!(std::fs::read_dir(blobs.join("tmp")).unwrap().count(), 0);
    // Pushing again completes, sending only what the server lacks.
    let retry = c.molt_json(&["push", svc.to_str().unwrap()]);
    assert_eq!(retry["files"], 41);
    let log = c.molt_json(&["log", "big"]);
    assert_eq!(log.as_array().unwrap().len(), 1);
    // Every stored blob is intact: each file's bytes hash to its name.
    let mut checked = 0;
    for shard in std::fs::read_dir(&blobs).unwrap() {
        let shard = shard.unwrap().path();
        if shard.ends_with("tmp") {
            continue;
        }
        for f in std::fs::read_dir(&shard).unwrap() {
            let f = f.unwrap().path();
            let hash = blake3::hash(&std::fs::read(&f).unwrap()).to_hex();
            assert_eq!(f.file_name().unwrap().to_str().unwrap(), hash.as_str());
            checked += 1;
        }
    }
    assert_eq!(checked, 41);
    let again = c.molt_json(&["push", svc.to_str().unwrap()]);
    assert_eq!(again["created"], false);
}

/// `molt shell`, `molt deploy`, `molt status`, `molt rollback` and `molt pull` as
/// a deployer uses them.
#[test]
fn deploy_an_image_to_a_shell_and_read_its_status() {
    let c = Cluster::init();
    let out = c.molt(&["cert", "issue", "--role", "shell", "--name", "dev-1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let hello = c.dir.path().join("hello");
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/hello");
    for f in ["service.toml", "server.py", ".moltignore"] {
        write(&hello, f, &std::fs::read(example.join(f)).unwrap());
    }
    c.molt_json(&["push", hello.to_str().unwrap()]);
    let image = c.molt_json(&["image", "create", "demo-1", "--set", "hello=main"]);

    let (mut shell, addr) = start_shell(&c, "dev-1", "staging");
    let target = format!("dev-1@{addr}");

    // An image is named by its name, or by its id or an abbreviation of it.
    let id = image["id"].as_str().unwrap();
    let by_id = c.molt_json(&["deploy", &id[..10], "--instance", &target, "--plan"]);
    assert_eq!(by_id["services"][0]["service"], "hello");
    assert_eq!(by_id["services"][0]["action"], "add");
    let out = c.molt(&["deploy", "0123456789ab", "--instance", &target, "--plan"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no image is named `0123456789ab`"), "{err}");

    // The plan is exactly what the deploy then does, step by step.
    let plan = c.molt_json(&["deploy", "demo-1", "--instance", &target, "--plan"]);
    assert_eq!(plan["generation"], 1);
    let planned: Vec<serde_json::Value> = plan["steps"].as_array().unwrap().clone();
    let kinds: Vec<String> = planned
        .iter()
        .map(|s| s.as_object().unwrap().keys().next().unwrap().clone())
        .collect();
    assert_eq!(kinds, ["fetch", "release", "start", "cutover", "record"]);
    let (done, shown) = c.molt_json_steps(&["deploy", "demo-1", "--instance", &target]);
    assert_eq!(done["restarted"], serde_json::json!(["hello"]));
    assert_eq!(done["generation"], 1);
    let carried: Vec<serde_json::Value> = done["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["step"].clone())
        .collect();
    assert_eq!(carried, planned);
    assert!(done["steps"][0]["bytes"].as_u64().unwrap() > 0, "{done}");
    assert!(
        shown.contains("[5/5] record generation 1 … done in"),
        "{shown}"
    );
    // Printed for people: every service from → to, every step with its undo.
    let out = c.molt(&["deploy", "demo-1", "--instance", &target, "--plan"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("nothing to do"), "{text}");
    let out = c.molt(&[
        "deploy",
        "demo-1",
        "--instance",
        &target,
        "--plan",
        "--strategy",
        "shadow-full",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("hello") && text.contains("restart"), "{text}");
    assert!(
        text.contains("cutover: hello") && text.contains("undo: route back to the old processes"),
        "{text}"
    );

    let status = c.molt_json(&["status", "--instance", &target]);
    assert_eq!(status["instance"], "dev-1");
    assert_eq!(status["image"]["name"], "demo-1");
    assert_eq!(status["image"]["id"], image["id"]);
    let svc = &status["services"]["hello"];
    assert_eq!(svc["state"], "running");
    let public = svc["ports"]["main"].as_str().unwrap().to_owned();
    assert!(svc["uptime_secs"].is_u64(), "{svc}");
    // The supervisor's own probes report it healthy (within a deadline: they run
    // beside the deploy's).
    let deadline = Instant::now() + Duration::from_secs(20);
    while c.molt_json(&["status", "--instance", &target])["services"]["hello"]["health"]
        != "healthy"
    {
        assert!(Instant::now() < deadline, "never reported healthy");
        std::thread::sleep(Duration::from_millis(100));
    }
    // The service answers on its public port.
    let mut conn = std::net::TcpStream::connect(&public).unwrap();
    use std::io::{Read, Write};
    conn.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut body = String::new();
    conn.read_to_string(&mut body).unwrap();
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    assert!(body.contains("hello from molt"), "{body}");

    // The service's log, through the shell (its output reaches the log file
    // asynchronously, so ask until it is there, within a deadline).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = c.molt(&["logs", "hello", "--instance", &target, "--lines", "1000"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let log = String::from_utf8_lossy(&out.stdout).into_owned();
        if log.contains("hello: listening on 127.0.0.1:") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the log never showed the start: {log}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // Deploying the same image again changes nothing.
    let again = c.molt_json(&["deploy", "demo-1", "--instance", &target]);
    assert_eq!(again["unchanged"], serde_json::json!(["hello"]));

    // A new version, then a rollback to the previous generation.
    write(
        &hello,
        "service.toml",
        &std::fs::read_to_string(hello.join("service.toml"))
            .unwrap()
            .replace("hello from molt", "hello v2")
            .into_bytes(),
    );
    c.molt_json(&["push", hello.to_str().unwrap()]);
    c.molt_json(&["image", "create", "demo-2", "--set", "hello=main"]);
    let (v2, steps) = c.molt_json_steps(&["deploy", "demo-2", "--instance", &target]);
    assert_eq!(v2["generation"], 2);
    // The steps were shown as they happened, on stderr.
    for step in [
        "dev-1: [1/7] fetch hello",
        "blob (",
        "B fetched",
        "dev-1: [3/7] start hello",
        "cutover: hello … done in",
        "dev-1: [5/7] record generation 2 … done in",
        "dev-1: [6/7] drain the old hello … done in",
        "dev-1: [7/7] stop the old hello … done in",
    ] {
        assert!(steps.contains(step), "no `{step}` in:\n{steps}");
    }
    let (back, steps) = c.molt_json_steps(&["rollback", "--instance", &target]);
    assert!(
        steps.contains(": reuse it from disk … done in") && !steps.contains("fetch hello"),
        "{steps}"
    );
    assert_eq!(back["restarted"], serde_json::json!(["hello"]));
    assert_eq!(back["generation"], 3);
    // A rollback names where it went; --to picks any earlier generation.
    assert_eq!(back["reason"], "rollback to generation 1 (image demo-1)");
    assert_eq!(back["image"], "demo-1");
    let out = c.molt(&["rollback", "--instance", &target, "--to", "3"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("generation 3 is the one running"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = c.molt(&["rollback", "--instance", &target, "--to", "99"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no generation 99") && err.contains("1, 2, 3"),
        "{err}"
    );
    let to_two = c.molt_json(&["rollback", "--instance", &target, "--to", "2"]);
    assert_eq!(to_two["reason"], "rollback to generation 2 (image demo-2)");
    assert_eq!(to_two["generation"], 4);
    let out = c.molt(&["rollback", "--instance", &target, "--to", "3"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("rollback to generation 3 (image demo-1)"),
        "{text}"
    );
    let status = c.molt_json(&["status", "--instance", &target]);
    assert_eq!(status["image"]["name"], "demo-1");
    assert_eq!(status["image"]["id"], image["id"]);
    assert_eq!(status["services"]["hello"]["commit"], svc["commit"]);

    // Logs: one file per generation's processes, every line stamped; the
    // running one by default, another generation's on request, as JSON lines.
    let out = c.molt(&[
        "logs",
        "hello",
        "--instance",
        &target,
        "--lines",
        "1000",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(!lines.is_empty());
    assert!(
        lines
            .iter()
            .all(|l| l["time"].as_str().is_some_and(|t| t.ends_with('Z')))
    );
    let out = c.molt(&[
        "logs",
        "hello",
        "--instance",
        &target,
        "--generation",
        "2",
        "--since",
        "1h",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("hello: listening on"), "{text}");
    for (args, why) in [
        (vec!["--generation", "99"], "no such log"),
        (vec!["--since", "10x"], "the unit is s, m, h or d"),
    ] {
        let mut all = vec!["logs", "hello", "--instance", &target];
        all.extend(args);
        let out = c.molt(&all);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(why), "{err}");
    }
    let out = c.molt(&["logs", "nosvc", "--instance", &target]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("no service `nosvc` runs"));

    // A staging instance takes images, not pulls.
    let out = c.molt(&["pull", "hello@main", "--instance", &target]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not pulls"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A development instance takes pulls.
    let (mut dev_shell, dev_addr) = start_shell(&c, "dev-2", "development");
    let pulled = c.molt_json(&["pull", "hello", "--instance", &format!("dev-2@{dev_addr}")]);
    assert_eq!(pulled["restarted"], serde_json::json!(["hello"]));
    assert!(
        Command::new("kill")
            .args(["-TERM", &dev_shell.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    assert!(dev_shell.wait().unwrap().success());

    // A developer may not deploy (only pull and reset, on dev and QA).
    let out = c.molt(&[
        "cert",
        "issue",
        "--role",
        "user",
        "--name",
        "dev",
        "--grant",
        "developer",
    ]);
    assert!(out.status.success());
    let dev_config = c.dir.path().join("dev.toml");
    std::fs::write(
        &dev_config,
        "repo = \"127.0.0.1:1\"\ncert = \"certs/user-dev.crt\"\nkey = \"certs/user-dev.key\"\nca = \"certs/ca.crt\"\n",
    )
    .unwrap();
    let out = Command::new(MOLT)
        .arg("--config")
        .arg(&dev_config)
        .args(["deploy", "demo-1", "--instance", &target])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not upgrade or roll back"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // SIGTERM stops the shell and its services cleanly.
    assert!(
        Command::new("kill")
            .args(["-TERM", &shell.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    assert!(shell.wait().unwrap().success());
    assert!(
        std::net::TcpStream::connect(&public).is_err(),
        "the public port is still open"
    );
}

/// Production instances swap whole generations by default; `--strategy` picks
/// per deploy, and `status` shows the generations' phases.
#[test]
fn production_deploys_in_shadow_by_default_and_status_shows_the_lifecycle() {
    let c = Cluster::init();
    let hello = c.dir.path().join("hello");
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/hello");
    for f in ["service.toml", "server.py", ".moltignore"] {
        write(&hello, f, &std::fs::read(example.join(f)).unwrap());
    }
    c.molt_json(&["push", hello.to_str().unwrap()]);
    c.molt_json(&["image", "create", "one", "--set", "hello=main"]);
    let toml = std::fs::read_to_string(hello.join("service.toml")).unwrap();
    write(
        &hello,
        "service.toml",
        toml.replace("hello from molt", "hello two").as_bytes(),
    );
    c.molt_json(&["push", hello.to_str().unwrap()]);
    c.molt_json(&["image", "create", "two", "--set", "hello=main"]);

    let (mut shell, addr) = start_shell(&c, "prod-1", "production");
    let target = format!("prod-1@{addr}");
    let (_, steps) = c.molt_json_steps(&["deploy", "one", "--instance", &target]);
    assert!(steps.contains("cutover: hello … done"), "{steps}");
    let status = c.molt_json(&["status", "--instance", &target]);
    assert_eq!(status["strategy"], "shadow");
    assert_eq!(
        status["lifecycle"],
        serde_json::json!([{ "number": 1, "phase": "serving" }])
    );
    // In place when asked; the lifecycle follows.
    let (_, steps) = c.molt_json_steps(&[
        "deploy",
        "two",
        "--instance",
        &target,
        "--strategy",
        "in-place",
    ]);
    assert!(steps.contains("record generation 2"), "{steps}");
    let status = c.molt_json(&["status", "--instance", &target]);
    assert_eq!(
        status["lifecycle"],
        serde_json::json!([
            { "number": 1, "phase": "stopped" },
            { "number": 2, "phase": "serving" }
        ])
    );
    let out = c.molt(&["deploy", "one", "--instance", &target, "--strategy", "blue"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("in-place, shadow or shadow-full"));
    // A full shadow restarts every service, here back to image one.
    let (done, steps) =
        c.molt_json_steps(&["deploy", "one", "--instance", &target, "--shadow", "full"]);
    assert_eq!(done["restarted"], serde_json::json!(["hello"]));
    assert!(steps.contains("record generation 3"), "{steps}");
    let steps = done["steps"].as_array().unwrap();
    assert!(
        steps.iter().any(|t| t["step"]["release"]["reuse"] == true),
        "image one's release is on disk: {done}"
    );
    assert!(
        steps
            .iter()
            .any(|t| t["step"]["start"]["service"] == "hello"),
        "{done}"
    );
    let out = c.molt(&[
        "deploy",
        "one",
        "--instance",
        &target,
        "--strategy",
        "in-place",
        "--shadow",
        "full",
    ]);
    assert!(!out.status.success());
    assert!(common::signal(&mut shell, "-TERM").success());
}

/// `molt fsck` on a stopped repository whose index was deleted and one of
/// whose blobs was damaged: the check names both and changes nothing; the
/// repair rebuilds the index and quarantines the blob; the next push sends the
/// blob again, and the check then finds nothing wrong.
#[test]
fn fsck_names_a_damaged_repository_and_the_repair_and_a_push_restore_it() {
    let mut c = Cluster::init();
    let svc = c.dir.path().join("hello");
    service(&svc, "hello");
    write(&svc, "data.txt", b"the bytes a flip will damage");
    c.molt_json(&["push", svc.to_str().unwrap()]);
    assert!(c.signal("-TERM").success());

    let repo = c.dir.path().join("repo");
    let damaged = blake3::hash(b"the bytes a flip will damage").to_hex();
    let blob = repo
        .join("blobs")
        .join(&damaged[..2])
        .join(damaged.as_str());
    let mut bytes = std::fs::read(&blob).unwrap();
    bytes[0] ^= 1;
    std::fs::write(&blob, &bytes).unwrap();
    std::fs::remove_dir_all(repo.join("meta")).unwrap();

    let config = c.config();
    let fsck = |args: &[&str]| {
        let out = Command::new(MOLT)
            .arg("--config")
            .arg(&config)
            .arg("fsck")
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (code, out) = fsck(&[]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains(&format!("blob {damaged} is corrupt")), "{out}");
    assert!(out.contains("index:"), "{out}");
    assert!(out.contains("molt fsck --repair"), "{out}");
    assert_eq!(
        std::fs::read(&blob).unwrap(),
        bytes,
        "a check changes nothing"
    );

    // The repair keeps the branch (the journal has it) but not the blob's bytes.
    let (code, out) = fsck(&["--repair"]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("rebuilt the index"), "{out}");
    assert!(
        out.contains(&format!("quarantined blob {damaged}")),
        "{out}"
    );
    assert!(!blob.exists());

    c.start_server();
    let log = c.molt_json(&["log", "hello"]);
    assert_eq!(log.as_array().unwrap().len(), 1, "{log}");
    // The next push that holds the file: the server asks for the blob it lost.
    write(&svc, "more.txt", b"a change beside it");
    let again = c.molt_json(&["push", svc.to_str().unwrap()]);
    assert_eq!(again["created"], true, "{again}");
    assert_eq!(
        blake3::hash(&std::fs::read(&blob).unwrap()).to_hex(),
        damaged
    );
    assert!(c.signal("-TERM").success());
    let (code, out) = fsck(&[]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("nothing is wrong"), "{out}");
}
