//! `kill -9` of a shell at each step of an upgrade, and what a restart finds.
//!
//! A real `molt shell` child process runs with `MOLT_CRASH_AT=POINT:N`, so it dies
//! by SIGKILL exactly when the upgrade from v1 to v2 reaches POINT (see
//! `shell::crash`). Restarted without it, the shell must come back to the recorded
//! state — v1, or v2 once the record is written, never a mix — with no half-made
//! release left, no process of the dead shell still running, and the same upgrade
//! working when asked again. Also here: a second upgrade waits for the first and
//! `status` shows it queued.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Cluster, MOLT, get, signal, start_shell, start_shell_with, write};

/// A service with a build step: the build takes a second, then leaves a mark
/// named after the commit outside the release, so a test can tell a build that
/// finished from one that was killed.
fn app(c: &Cluster, greeting: &str, build_secs: u32) {
    let dir = c.dir.path().join("app");
    let marks = c.dir.path().join("marks");
    std::fs::create_dir_all(&marks).unwrap();
    let server = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/hello/server.py");
    write(&dir, "server.py", &std::fs::read(server).unwrap());
    write(
        &dir,
        "service.toml",
        format!(
            r#"name = "app"
[build]
command = ["sh", "-c", "sleep {build_secs} && touch \"$MARKS/built-$MOLT_COMMIT\""]
timeout = "1m"
[run]
command = ["python3", "server.py"]
[[ports]]
port = 8080
protocol = "http"
[health]
http = "/healthz"
interval = "200ms"
start_grace = "10s"
[env]
GREETING = "{greeting}"
MARKS = "{}"
"#,
            marks.display()
        )
        .as_bytes(),
    );
}

/// Pushes the app with `greeting` and pins it as image `name`; returns its commit.
fn release(c: &Cluster, name: &str, greeting: &str, build_secs: u32) -> String {
    app(c, greeting, build_secs);
    let pushed = c.molt_json(&["push", c.dir.path().join("app").to_str().unwrap()]);
    c.molt_json(&["image", "create", name, "--set", "app=main"]);
    pushed["commit"].as_str().unwrap().to_owned()
}

fn status(c: &Cluster, target: &str) -> serde_json::Value {
    c.molt_json(&["status", "--instance", target])
}

/// The pids of every `server.py` whose environment names this instance.
fn service_pids(instance: &str) -> Vec<u32> {
    let needle = format!("MOLT_INSTANCE={instance}\0");
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let (Ok(env), Ok(cmdline)) = (
            std::fs::read(entry.path().join("environ")),
            std::fs::read(entry.path().join("cmdline")),
        ) else {
            continue;
        };
        let has = |hay: &[u8], needle: &[u8]| hay.windows(needle.len()).any(|w| w == needle);
        if has(&env, needle.as_bytes()) && has(&cmdline, b"server.py") {
            pids.push(pid);
        }
    }
    pids
}

fn greeting(c: &Cluster, target: &str) -> String {
    let s = status(c, target);
    let public = s["services"]["app"]["ports"]["main"].as_str().unwrap();
    let answer = get(&format!("http://{public}/")).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let body = answer.split("\r\n\r\n").nth(1).unwrap();
    let json: serde_json::Value = serde_json::from_str(body).unwrap();
    json["greeting"].as_str().unwrap().to_owned()
}

/// Kills the shell at `point` (its `nth` hit) during the upgrade v1 → v2 and
/// checks the restarted shell; `recorded_v2` says whether the point is past the
/// record of the new state.
fn crash_at(point: &str, nth: u32, recorded_v2: bool) {
    let c = Cluster::init();
    let v1 = release(&c, "v1", "one", 1);
    let v2 = release(&c, "v2", "two", 1);
    let name = format!("crash-{point}");
    let armed = format!("{point}:{nth}");
    let (mut shell, addr) = start_shell_with(&c, &name, "staging", &[("MOLT_CRASH_AT", &armed)]);
    let target = format!("{name}@{addr}");
    c.molt_json(&["deploy", "v1", "--instance", &target]);
    assert_eq!(greeting(&c, &target), "one");

    let mut deploy = deploy_in_background(&c, "v2", &target);
    let died = shell.wait().unwrap();
    let crashed = Instant::now();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        died.signal(),
        Some(9),
        "the shell was not killed at {point}"
    );
    // The client would notice the dead peer after QUIC's idle timeout; no need
    // to wait for that here.
    let _ = deploy.kill();
    let out = deploy.wait_with_output().unwrap();
    assert!(!out.status.success(), "the deploy survived the crash");

    // Restart without the crash point: the recorded generation comes back.
    let (mut shell, addr) = start_shell(&c, &name, "staging");
    let target = format!("{name}@{addr}");
    let s = status(&c, &target);
    let (image, commit, greet, generation) = if recorded_v2 {
        ("v2", &v2, "two", 2)
    } else {
        ("v1", &v1, "one", 1)
    };
    assert_eq!(s["image"]["name"], image, "{s}");
    assert_eq!(s["generation"], generation, "{s}");
    assert_eq!(s["services"]["app"]["commit"], commit.as_str(), "{s}");
    assert_eq!(greeting(&c, &target), greet);

    // No half-made release is left; every release left is whole.
    let releases = c.dir.path().join(&name).join("releases/app");
    for entry in std::fs::read_dir(&releases).unwrap() {
        let file = entry.unwrap().file_name().to_string_lossy().into_owned();
        assert!(!file.starts_with('.'), "left behind: {file}");
    }
    // Only the restarted shell's process runs: the dead shell's died with it.
    let pid = s["services"]["app"]["pid"].as_u64().unwrap() as u32;
    assert_eq!(service_pids(&name), [pid]);
    if point == "mid-build" {
        // The build (one second long) was killed with the shell: no mark.
        std::thread::sleep(Duration::from_secs(2).saturating_sub(crashed.elapsed()));
        assert!(!c.dir.path().join(format!("marks/built-{v2}")).exists());
    }

    // The interrupted upgrade goes through when asked again.
    c.molt_json(&["deploy", "v2", "--instance", &target]);
    assert_eq!(greeting(&c, &target), "two");
    assert_eq!(status(&c, &target)["image"]["name"], "v2");
    assert!(c.dir.path().join(format!("marks/built-{v2}")).exists());
    assert!(signal(&mut shell, "-TERM").success());
    assert_eq!(service_pids(&name), Vec::<u32>::new());
}

// v1's deploy passes each point once (it has no previous release to copy), so
// most points are armed for their second hit.

#[test]
fn kill_9_after_fetch_recovers_the_old_generation() {
    crash_at("after-fetch", 2, false);
}

#[test]
fn kill_9_mid_copy_recovers_the_old_generation() {
    crash_at("mid-copy", 1, false);
}

#[test]
fn kill_9_mid_build_recovers_the_old_generation_and_kills_the_build() {
    crash_at("mid-build", 2, false);
}

#[test]
fn kill_9_after_switch_recovers_the_old_generation() {
    crash_at("after-switch", 2, false);
}

#[test]
fn kill_9_before_record_recovers_the_old_generation() {
    crash_at("before-record", 2, false);
}

#[test]
fn kill_9_after_record_recovers_the_new_generation() {
    crash_at("after-record", 2, true);
}

fn deploy_in_background(c: &Cluster, image: &str, target: &str) -> Child {
    Command::new(MOLT)
        .env("XDG_CACHE_HOME", c.dir.path().join("cache"))
        .arg("--config")
        .arg(c.config())
        .args(["--json", "deploy", image, "--instance", target])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Polls `status` until `pred` holds, within a deadline.
fn wait_status(c: &Cluster, target: &str, what: &str, pred: impl Fn(&serde_json::Value) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = status(c, target);
        if pred(&s) {
            return;
        }
        assert!(Instant::now() < deadline, "never saw {what}: {s}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_second_upgrade_waits_in_the_queue_and_status_shows_it() {
    let c = Cluster::init();
    release(&c, "v1", "one", 3);
    release(&c, "v2", "two", 1);
    let (mut shell, addr) = start_shell(&c, "queue", "staging");
    let target = format!("queue@{addr}");

    let first = deploy_in_background(&c, "v1", &target);
    wait_status(&c, &target, "the first upgrade running", |s| {
        s["upgrading"] == true
    });
    let second = deploy_in_background(&c, "v2", &target);
    // v1's build takes three seconds: the second upgrade is seen waiting.
    wait_status(&c, &target, "the second upgrade queued", |s| {
        s["upgrading"] == true && s["queued"] == 1
    });
    let first = first.wait_with_output().unwrap();
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let second = second.wait_with_output().unwrap();
    assert!(
        second.status.success(),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );
    let steps = String::from_utf8_lossy(&second.stderr);
    assert!(
        steps.contains("queue: queued: another upgrade is running"),
        "{steps}"
    );
    let first: serde_json::Value = serde_json::from_slice(&first.stdout).unwrap();
    let second: serde_json::Value = serde_json::from_slice(&second.stdout).unwrap();
    // They ran one after the other, in order.
    assert_eq!(
        (first["generation"].clone(), second["generation"].clone()),
        (1.into(), 2.into())
    );
    let s = status(&c, &target);
    assert_eq!(
        (s["queued"].clone(), s["upgrading"].clone()),
        (0.into(), false.into())
    );
    assert_eq!(s["image"]["name"], "v2");
    assert_eq!(greeting(&c, &target), "two");
    assert!(signal(&mut shell, "-TERM").success());
}

/// Pruning runs in the background after an upgrade: a shell killed while it
/// deletes an old release comes back serving its recorded generation, the
/// half-deleted release (out of the way since it was retired) is deleted after
/// the restart, and upgrades go on.
#[test]
fn kill_9_mid_prune_leaves_a_consistent_instance() {
    let c = Cluster::init();
    let name = "crash-mid-prune";
    let (mut shell, addr) =
        start_shell_with(&c, name, "staging", &[("MOLT_CRASH_AT", "mid-prune")]);
    let target = format!("{name}@{addr}");
    // Five releases are kept besides the running and the previous one: the
    // seventh upgrade prunes the first release, and the shell dies doing it —
    // in the background, so after that upgrade answered, or just before, or
    // (the next one's deploy already sent) with the next one refused.
    let mut deployed = 0;
    let mut succeeded = 0;
    let died = loop {
        deployed += 1;
        assert!(deployed <= 9, "the shell never pruned");
        let image = format!("v{deployed}");
        release(&c, &image, &format!("hello {deployed}"), 0);
        let ok = Command::new(MOLT)
            .args(["deploy", &image, "--instance", &target, "--json"])
            .env("MOLT_CONFIG", c.config())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            succeeded = deployed;
        }
        if let Some(status) = shell.try_wait().unwrap() {
            break status;
        }
    };
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(died.signal(), Some(9));

    let (mut shell, addr) = start_shell(&c, name, "staging");
    let target = format!("{name}@{addr}");
    let s = status(&c, &target);
    // The prune runs after the record: the recorded upgrade is the last that
    // answered, or the one whose answer the kill cut off.
    let recorded: u32 = s["image"]["name"]
        .as_str()
        .and_then(|n| n.strip_prefix('v'))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{s}"));
    assert!(
        recorded == succeeded || recorded == succeeded + 1,
        "recorded v{recorded}, last answered v{succeeded}: {s}"
    );
    assert_eq!(greeting(&c, &target), format!("hello {recorded}"));
    let releases = c.dir.path().join(name).join("releases/app");
    let leftovers = || -> Vec<String> {
        std::fs::read_dir(&releases)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with('.'))
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !leftovers().is_empty() {
        assert!(Instant::now() < deadline, "left behind: {:?}", leftovers());
        std::thread::sleep(Duration::from_millis(100));
    }
    // Upgrades and rollbacks go on.
    c.molt_json(&["rollback", "--instance", &target]);
    assert_eq!(greeting(&c, &target), format!("hello {}", recorded - 1));
    assert!(signal(&mut shell, "-TERM").success());
}
