//! `molt watch` as a developer runs it: a real watcher on a temp directory,
//! a real repository server and a real development shell, all children.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use common::{Cluster, MOLT, get, signal, start_shell};

/// Saves `bytes` as `dir/rel` the way an editor's save lands at once: written
/// beside the watched directory, then renamed into place (a plain write
/// truncates first, and a scan on a loaded machine could read the file
/// empty between the two).
fn write(dir: &Path, rel: &str, bytes: &[u8]) {
    let staging = dir.parent().unwrap().join(".saves");
    std::fs::create_dir_all(&staging).unwrap();
    let tmp = staging.join(rel.replace('/', "_"));
    std::fs::write(&tmp, bytes).unwrap();
    let to = dir.join(rel);
    std::fs::create_dir_all(to.parent().unwrap()).unwrap();
    std::fs::rename(&tmp, &to).unwrap();
}

/// `molt watch DIR --instance TARGET --json`, its JSON lines on a channel.
fn watcher(c: &Cluster, dir: &Path, target: &str) -> (Child, Receiver<serde_json::Value>) {
    let mut child = Command::new(MOLT)
        .env("XDG_CACHE_HOME", c.dir.path().join("cache"))
        .arg("--config")
        .arg(c.config())
        .arg("--repo")
        .arg(c.addr.unwrap().to_string())
        .args(["--json", "watch"])
        .arg(dir)
        .args(["--instance", target])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let out = BufReader::new(child.stdout.take().unwrap());
    std::thread::spawn(move || {
        for line in out.lines().map_while(Result::ok) {
            let v: serde_json::Value =
                serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
            if tx.send(v).is_err() {
                break;
            }
        }
    });
    (child, rx)
}

/// A child killed when the test ends, passed or not (no shell outlives it).
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn next_cycle(rx: &Receiver<serde_json::Value>) -> serde_json::Value {
    rx.recv_timeout(Duration::from_secs(90))
        .expect("a cycle within 90 s")
}

/// No cycle for `quiet`.
fn no_cycle(rx: &Receiver<serde_json::Value>, quiet: Duration) {
    match rx.recv_timeout(quiet) {
        Err(RecvTimeoutError::Timeout) => {}
        other => panic!("an unexpected cycle: {other:?}"),
    }
}

fn greeting(url: &str) -> String {
    let answer = get(url).unwrap();
    let body = answer.split("\r\n\r\n").nth(1).unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
    v["greeting"].as_str().unwrap_or_default().to_owned()
}

fn manifest(greeting: &str) -> Vec<u8> {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/hello/service.toml");
    let toml = std::fs::read_to_string(example).unwrap();
    // A build that fails on a syntax error, as a compiler would.
    let toml = toml.replace(
        "[run]",
        "[build]\ncommand = [\"python3\", \"-m\", \"py_compile\", \"server.py\"]\n\n[run]",
    );
    toml.replace("hello from molt", greeting).into_bytes()
}

#[test]
fn saves_serve_bursts_batch_bad_builds_keep_the_old_version_and_staging_refuses() {
    let c = Cluster::init();
    let dir = c.dir.path().join("hello");
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/hello");
    let server = std::fs::read(example.join("server.py")).unwrap();
    write(&dir, "server.py", &server);
    write(&dir, ".moltignore", b"__pycache__/\n*.pyc\nscratch/\n");
    write(&dir, "service.toml", &manifest("hello v1"));
    let (shell, addr) = start_shell(&c, "dev-1", "development");
    let mut shell = Reaped(shell);
    let target = format!("dev-1@{addr}");

    // The first cycle serves what the directory holds.
    let (watch, rx) = watcher(&c, &dir, &target);
    let mut watch = Reaped(watch);
    let first = next_cycle(&rx);
    assert_eq!(first["ok"], true, "{first}");
    let status = c.molt_json(&["status", "--instance", &target]);
    let public = status["services"]["hello"]["ports"]["main"]
        .as_str()
        .unwrap()
        .to_owned();
    let url = format!("http://{public}/");
    assert_eq!(greeting(&url), "hello v1");
    // It went to the developer's own branch, never main.
    let log = c.molt(&["log", "hello", "--branch", "main"]);
    assert!(!log.status.success(), "main was pushed to");

    // A save serves the new version, and says how long it took.
    write(&dir, "service.toml", &manifest("hello v2"));
    let cycle = next_cycle(&rx);
    assert_eq!(cycle["ok"], true, "{cycle}");
    assert!(cycle["save_to_serving_ms"].as_u64().unwrap() > 0, "{cycle}");
    assert!(cycle["bytes_sent"].as_u64().unwrap() > 0, "{cycle}");
    assert_eq!(
        cycle["changed"],
        serde_json::json!(["service.toml"]),
        "{cycle}"
    );
    assert_eq!(greeting(&url), "hello v2");

    // A burst of 50 saves in 200 ms: one or two cycles, the last content serves.
    let t = Instant::now();
    for i in 0..50 {
        write(&dir, "service.toml", &manifest(&format!("burst {i}")));
        std::thread::sleep(Duration::from_millis(4));
    }
    assert!(t.elapsed() < Duration::from_secs(2));
    let mut cycles = vec![next_cycle(&rx)];
    while greeting(&url) != "burst 49" {
        cycles.push(next_cycle(&rx));
    }
    no_cycle(&rx, Duration::from_secs(2));
    assert!((1..=2).contains(&cycles.len()), "{cycles:?}");
    assert!(cycles.iter().all(|c| c["ok"] == true), "{cycles:?}");

    // An ignored file, and a save that changes no content: nothing happens.
    write(&dir, "scratch/notes.txt", b"not part of the service");
    write(&dir, "service.toml", &manifest("burst 49"));
    no_cycle(&rx, Duration::from_secs(3));

    // A syntax error: the build fails, its error is shown, the old version
    // serves; the next good save recovers.
    write(&dir, "server.py", b"def broken(:\n");
    let failed = next_cycle(&rx);
    assert_eq!(failed["ok"], false, "{failed}");
    assert!(
        failed["error"].as_str().unwrap().contains("SyntaxError"),
        "{failed}"
    );
    // Its place, as `file:line:col` in the watched directory, for editors.
    let at = &failed["locations"][0];
    assert_eq!(
        at["file"].as_str().unwrap(),
        dir.join("server.py").to_str().unwrap(),
        "{failed}"
    );
    assert_eq!(
        (at["line"].as_u64(), at["col"].as_u64()),
        (Some(1), Some(12)),
        "{failed}"
    );
    assert!(
        at["message"].as_str().unwrap().starts_with("SyntaxError"),
        "{failed}"
    );
    assert_eq!(greeting(&url), "burst 49");
    write(&dir, "server.py", &server);
    let recovered = next_cycle(&rx);
    assert_eq!(recovered["ok"], true, "{recovered}");
    assert_eq!(greeting(&url), "burst 49");

    // Ctrl-C stops it cleanly.
    assert!(signal(&mut watch.0, "-INT").success());

    // A staging instance refuses, and the watch ends with that refusal.
    let (staging, staging_addr) = start_shell(&c, "stage-1", "staging");
    let mut staging = Reaped(staging);
    let out = Command::new(MOLT)
        .env("XDG_CACHE_HOME", c.dir.path().join("cache"))
        .arg("--config")
        .arg(c.config())
        .arg("--repo")
        .arg(c.addr.unwrap().to_string())
        .arg("watch")
        .arg(&dir)
        .args(["--instance", &format!("stage-1@{staging_addr}")])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not pulls"), "{err}");
    signal(&mut staging.0, "-TERM");
    signal(&mut shell.0, "-TERM");
}

/// `molt ARGS` with `config`'s identity.
fn molt_as(c: &Cluster, config: &Path, args: &[&str]) -> std::process::Output {
    Command::new(MOLT)
        .env("XDG_CACHE_HOME", c.dir.path().join("cache"))
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .unwrap()
}

/// A developer (the developer grant) pulls their branch onto a development
/// instance that runs an image: the service shows as an overlay (who, which
/// branch and commit, since when) until `molt reset` brings it back to the
/// image; a rollback to the overlaid generation brings the overlay back too.
/// The developer may not deploy, nor pull onto staging.
#[test]
fn a_developers_pull_is_an_overlay_until_reset_and_developers_only_pull_onto_dev_and_qa() {
    let c = Cluster::init();
    let dir = c.dir.path().join("hello");
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/hello");
    write(
        &dir,
        "server.py",
        &std::fs::read(example.join("server.py")).unwrap(),
    );
    write(&dir, "service.toml", &manifest("from the image"));
    c.molt_json(&["push", dir.to_str().unwrap()]);
    c.molt_json(&["image", "create", "demo-1", "--set", "hello=main"]);
    let (shell, addr) = start_shell(&c, "dev-1", "development");
    let mut shell = Reaped(shell);
    let target = format!("dev-1@{addr}");
    c.molt_json(&["deploy", "demo-1", "--instance", &target]);
    let status = c.molt_json(&["status", "--instance", &target]);
    assert_eq!(status["overlays"], serde_json::json!({}), "{status}");
    let public = status["services"]["hello"]["ports"]["main"]
        .as_str()
        .unwrap()
        .to_owned();
    let url = format!("http://{public}/");
    assert_eq!(greeting(&url), "from the image");

    // Ada, a developer, pushes her branch and pulls it.
    let out = c.molt(&[
        "cert",
        "issue",
        "--role",
        "user",
        "--name",
        "ada",
        "--grant",
        "developer",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ada = c.dir.path().join("ada.toml");
    std::fs::write(
        &ada,
        format!(
            "repo = \"{}\"\ncert = \"certs/user-ada.crt\"\nkey = \"certs/user-ada.key\"\nca = \"certs/ca.crt\"\n",
            c.addr.unwrap()
        ),
    )
    .unwrap();
    write(&dir, "service.toml", &manifest("ada's change"));
    let out = molt_as(
        &c,
        &ada,
        &[
            "--json",
            "push",
            dir.to_str().unwrap(),
            "--branch",
            "dev/ada",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pushed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let commit = pushed["commit"].as_str().unwrap().to_owned();
    let before = image_spec::Timestamp::now().as_unix_seconds();
    let out = molt_as(&c, &ada, &["pull", "hello@dev/ada", "--instance", &target]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(greeting(&url), "ada's change");

    let status = c.molt_json(&["status", "--instance", &target]);
    let overlay = &status["overlays"]["hello"];
    assert_eq!(overlay["by"], "ada", "{status}");
    assert_eq!(overlay["rev"], "dev/ada", "{status}");
    assert_eq!(overlay["commit"], commit.as_str(), "{status}");
    assert!(overlay["since"].as_i64().unwrap() >= before - 1, "{status}");
    assert_eq!(status["image"]["name"], "demo-1", "{status}");
    let shown = c.molt(&["status", "--instance", &target]);
    let shown = String::from_utf8_lossy(&shown.stdout);
    assert!(shown.contains("overlay: dev/ada pulled by ada"), "{shown}");

    // A developer may not deploy.
    let out = molt_as(&c, &ada, &["deploy", "demo-1", "--instance", &target]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("may pull, reset"), "{err}");

    // Reset returns to the image, and the overlay is gone.
    let out = molt_as(&c, &ada, &["reset", "hello", "--instance", &target]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(greeting(&url), "from the image");
    let status = c.molt_json(&["status", "--instance", &target]);
    assert_eq!(status["overlays"], serde_json::json!({}), "{status}");

    // Rolling back to the overlaid generation brings its overlay back.
    c.molt_json(&["rollback", "--instance", &target]);
    assert_eq!(greeting(&url), "ada's change");
    let status = c.molt_json(&["status", "--instance", &target]);
    assert_eq!(status["overlays"]["hello"]["by"], "ada", "{status}");
    // Reset of everything, as the deployer.
    c.molt_json(&["reset", "--instance", &target]);
    assert_eq!(greeting(&url), "from the image");

    // Staging refuses the developer's pull.
    let (staging, staging_addr) = start_shell(&c, "stage-1", "staging");
    let mut staging = Reaped(staging);
    let staging_target = format!("stage-1@{staging_addr}");
    let out = molt_as(
        &c,
        &ada,
        &["pull", "hello@dev/ada", "--instance", &staging_target],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not pulls"), "{err}");
    let out = molt_as(&c, &ada, &["reset", "--instance", &staging_target]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not resets"), "{err}");
    signal(&mut staging.0, "-TERM");
    signal(&mut shell.0, "-TERM");
}
