//! `molt shell takeover`: a new shell process takes an instance over from
//! the running one — public ports, running services, a plugin's state —
//! without a failed request; a takeover that fails leaves the old shell
//! serving; a shell killed between takeovers leaves no service behind.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::time::{Duration, Instant};

use common::{Cluster, MOLT, alive, get, kill_pid, start_shell_args, wait_until, write};

fn copy_example(name: &str, to: &Path) {
    let from = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples")
        .join(name);
    for entry in walk(&from) {
        let rel = entry.strip_prefix(&from).unwrap();
        if rel.starts_with("target") {
            continue;
        }
        write(to, rel.to_str().unwrap(), &std::fs::read(&entry).unwrap());
    }
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// `molt shell takeover --instance NAME --root ROOT` with `env`.
fn takeover(c: &Cluster, name: &str, env: &[(&str, &str)]) -> Output {
    Command::new(MOLT)
        .env("XDG_CACHE_HOME", c.dir.path().join("cache"))
        .env("MOLT_RUN_DIR", c.dir.path().join("run"))
        .envs(env.iter().copied())
        .args(["shell", "takeover", "--instance", name, "--root"])
        .arg(c.dir.path().join(name))
        .output()
        .unwrap()
}

/// `molt shell takeover` that must succeed: the new shell's pid.
fn takes_over(c: &Cluster, name: &str) -> u32 {
    let out = takeover(c, name, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    shell_pid(c, name)
}

/// The pid the instance's running shell recorded.
fn shell_pid(c: &Cluster, name: &str) -> u32 {
    let text = std::fs::read(c.dir.path().join(name).join("shell.json")).unwrap();
    let record: serde_json::Value = serde_json::from_slice(&text).unwrap();
    record["pid"].as_u64().unwrap() as u32
}

/// One answer read off a keep-alive connection: its status, whether it says
/// `Connection: close`, and its body.
fn response(conn: &mut BufReader<TcpStream>) -> std::io::Result<(u16, bool, Vec<u8>)> {
    let mut line = String::new();
    if conn.read_line(&mut line)? == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line {line:?}")))?;
    let (mut len, mut close) = (0usize, false);
    loop {
        line.clear();
        if conn.read_line(&mut line)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let l = line.trim().to_ascii_lowercase();
        if l.is_empty() {
            break;
        }
        if let Some(v) = l.strip_prefix("content-length:") {
            len = v.trim().parse().unwrap_or(0);
        }
        close |= l == "connection: close";
    }
    let mut body = vec![0u8; len];
    conn.read_exact(&mut body)?;
    Ok((status, close, body))
}

/// What a load client saw.
#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    failed: AtomicU64,
}

/// Asks `GET path` on keep-alive connections until `stop` (a new connection
/// when told to close, or for every request with `fresh`), counting 2xx
/// answers and everything else.
fn keep_asking(addr: SocketAddr, path: &str, fresh: bool, stop: &AtomicBool, tally: &Tally) {
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
    'connections: while !stop.load(SeqCst) {
        let Ok(stream) = TcpStream::connect(addr) else {
            tally.failed.fetch_add(1, SeqCst);
            continue;
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut conn = BufReader::new(stream);
        while !stop.load(SeqCst) {
            let asked = conn.get_mut().write_all(request.as_bytes());
            match (asked, response(&mut conn)) {
                (Ok(()), Ok((status, close, _))) if (200..300).contains(&status) => {
                    tally.ok.fetch_add(1, SeqCst);
                    if close || fresh {
                        continue 'connections;
                    }
                }
                _ => {
                    tally.failed.fetch_add(1, SeqCst);
                    continue 'connections;
                }
            }
        }
    }
}

/// Deploys hello (a process) and counter (a plugin) to a development shell
/// and returns the shell, its command target and the public addresses.
fn deployed(c: &Cluster) -> (std::process::Child, String, SocketAddr, SocketAddr) {
    copy_example("hello", &c.dir.path().join("hello"));
    copy_example("counter", &c.dir.path().join("counter"));
    for s in ["hello", "counter"] {
        c.molt_json(&["push", c.dir.path().join(s).to_str().unwrap()]);
    }
    c.molt_json(&[
        "image",
        "create",
        "demo-1",
        "--set",
        "hello=main",
        "--set",
        "counter=main",
    ]);
    let (shell, addr) = start_shell_args(c, "dev-1", "development", &[], &[]);
    let target = format!("dev-1@{addr}");
    c.molt_json(&["deploy", "demo-1", "--instance", &target]);
    let status = c.molt_json(&["status", "--instance", &target]);
    let public = |s: &str| -> SocketAddr {
        status["services"][s]["ports"]["main"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap()
    };
    (shell, target, public("hello"), public("counter"))
}

fn hits(counter: SocketAddr) -> u64 {
    let answer = get(&format!("http://{counter}/")).unwrap();
    let (_, body) = answer.split_once("\r\n\r\n").unwrap();
    let v: serde_json::Value = serde_json::from_str(body.trim()).unwrap();
    v["hits"].as_u64().unwrap()
}

/// Under keep-alive load and a stream of new connections on a process
/// service and a plugin, ten takeovers in a row: no request fails, every
/// process keeps its pid, the plugin's state (its hit count) is exact; then
/// the shell killed with `kill -9` leaves no service and no keeper behind.
#[test]
fn ten_takeovers_under_load_fail_no_request_and_keep_every_service() {
    let c = Cluster::init();
    let (mut first, target, hello, counter) = deployed(&c);
    let status = c.molt_json(&["status", "--instance", &target]);
    let pid = status["services"]["hello"]["pid"].as_u64().unwrap() as u32;
    let before = hits(counter);

    let stop = Arc::new(AtomicBool::new(false));
    let (web, plugin) = (Arc::new(Tally::default()), Arc::new(Tally::default()));
    let mut load = Vec::new();
    for i in 0..5 {
        let (stop, web) = (stop.clone(), web.clone());
        load.push(std::thread::spawn(move || {
            keep_asking(hello, "/", i == 0, &stop, &web)
        }));
    }
    for i in 0..2 {
        let (stop, plugin) = (stop.clone(), plugin.clone());
        load.push(std::thread::spawn(move || {
            keep_asking(counter, "/", i == 0, &stop, &plugin)
        }));
    }
    std::thread::sleep(Duration::from_millis(300));
    let mut previous = first.id();
    for round in 1..=10 {
        let out = takeover(&c, "dev-1", &[]);
        assert!(
            out.status.success(),
            "takeover {round}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let now = shell_pid(&c, "dev-1");
        assert_ne!(now, previous, "takeover {round}: the same shell");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains(&format!("taken over by pid {now}")),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
        wait_until("the old shell to exit", 30, || !alive(previous));
        let status = c.molt_json(&["status", "--instance", &target]);
        assert_eq!(
            status["services"]["hello"]["pid"].as_u64(),
            Some(u64::from(pid)),
            "takeover {round}: hello was restarted"
        );
        assert_eq!(
            status["services"]["counter"]["pid"].as_u64(),
            Some(u64::from(now))
        );
        previous = now;
    }
    // The first shell was this test's child: it exited on its own.
    assert!(first.wait().unwrap().success());
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, SeqCst);
    for t in load {
        t.join().unwrap();
    }
    let (ok, failed) = (web.ok.load(SeqCst), web.failed.load(SeqCst));
    let (pok, pfailed) = (plugin.ok.load(SeqCst), plugin.failed.load(SeqCst));
    eprintln!("hello: {ok} answered, {failed} failed; counter: {pok} answered, {pfailed} failed");
    assert!(ok > 100 && pok > 100, "too little load: {ok}, {pok}");
    assert_eq!(failed, 0, "requests to the process failed");
    assert_eq!(pfailed, 0, "requests to the plugin failed");
    // Every hit counted once, across ten hand-overs of the plugin's state.
    assert_eq!(hits(counter), before + pok + 1);

    // kill -9 of the shell between takeovers: the keeper stops the services
    // and exits; nothing is left running.
    let shell = shell_pid(&c, "dev-1");
    let keeper = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .unwrap()
        .rsplit_once(") ")
        .unwrap()
        .1
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u32>()
        .unwrap();
    assert!(
        std::fs::read_to_string(format!("/proc/{keeper}/cmdline"))
            .unwrap()
            .contains("keeper")
    );
    kill_pid(shell, "-9");
    wait_until("the service to stop", 20, || !alive(pid));
    wait_until("the keeper to exit", 20, || !alive(keeper));
    assert!(
        get(&format!("http://{hello}/")).is_err(),
        "hello still answers"
    );
}

/// hello deployed to a development shell started with `env`: the shell, its
/// command target, hello's pid and its public URL.
struct HelloShell {
    shell: std::process::Child,
    target: String,
    pid: u64,
    url: String,
}

fn hello_shell(c: &Cluster, env: &[(&str, &str)]) -> HelloShell {
    copy_example("hello", &c.dir.path().join("hello"));
    c.molt_json(&["push", c.dir.path().join("hello").to_str().unwrap()]);
    c.molt_json(&["image", "create", "demo-1", "--set", "hello=main"]);
    let (shell, addr) = start_shell_args(c, "dev-1", "development", env, &[]);
    let target = format!("dev-1@{addr}");
    c.molt_json(&["deploy", "demo-1", "--instance", &target]);
    let status = c.molt_json(&["status", "--instance", &target]);
    let pid = status["services"]["hello"]["pid"].as_u64().unwrap();
    let url = format!(
        "http://{}/",
        status["services"]["hello"]["ports"]["main"]
            .as_str()
            .unwrap()
    );
    HelloShell {
        shell,
        target,
        pid,
        url,
    }
}

/// A takeover that fails leaves the old shell serving, untouched: the new
/// shell killed with `kill -9` halfway (it serves the handed sockets and
/// joined the keeper, and has not said so yet), and a new shell refusing
/// state of a newer version. A shell takes over from the previous version.
#[test]
fn a_takeover_that_fails_leaves_the_old_shell_serving() {
    let c = Cluster::init();
    let HelloShell {
        mut shell,
        target,
        pid,
        url,
    } = hello_shell(&c, &[]);
    let serving = |who: &str| {
        assert!(get(&url).unwrap().contains("hello from molt"), "{who}");
        let status = c.molt_json(&["status", "--instance", &target]);
        assert_eq!(
            status["services"]["hello"]["pid"].as_u64(),
            Some(pid),
            "{who}"
        );
    };

    // Killed halfway.
    let out = takeover(&c, "dev-1", &[("MOLT_CRASH_AT", "takeover-before-ready")]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("serves on"), "{err}");
    assert!(alive(shell.id()), "the old shell died");
    assert_eq!(shell_pid(&c, "dev-1"), shell.id());
    serving("after a new shell died halfway");

    // The previous release's state is taken: a shell claiming version 2
    // takes over from this one (version 1) …
    let out = takeover(&c, "dev-1", &[("MOLT_HANDOVER_VERSION", "2")]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(shell.wait().unwrap().success());
    let newer = shell_pid(&c, "dev-1");
    serving("after a takeover by the next version");

    // … and a shell of version 1 refuses that newer state, by name.
    let out = takeover(&c, "dev-1", &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("newer than this shell's 1"), "{err}");
    assert!(alive(newer));
    assert_eq!(shell_pid(&c, "dev-1"), newer);
    serving("after a refused takeover");

    // The shell takes commands as before.
    c.molt_json(&["deploy", "demo-1", "--instance", &target]);

    // Two takeovers at once (by the next version, which takes version 2):
    // however they interleave, one shell serves at the end, the same
    // service under it, and a takeover that lost says who serves.
    let runs: Vec<_> = (0..2)
        .map(|_| {
            Command::new(MOLT)
                .env("XDG_CACHE_HOME", c.dir.path().join("cache"))
                .env("MOLT_RUN_DIR", c.dir.path().join("run"))
                .env("MOLT_HANDOVER_VERSION", "3")
                .args(["shell", "takeover", "--instance", "dev-1", "--root"])
                .arg(c.dir.path().join("dev-1"))
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outs: Vec<Output> = runs
        .into_iter()
        .map(|r| r.wait_with_output().unwrap())
        .collect();
    assert!(outs.iter().any(|o| o.status.success()), "neither took over");
    for o in outs.iter().filter(|o| !o.status.success()) {
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("serves"), "{err}");
    }
    wait_until("the shell before them to exit", 30, || !alive(newer));
    let last = shell_pid(&c, "dev-1");
    let root = c.dir.path().join("dev-1");
    wait_until("one shell left", 30, || shells_of(&root) == vec![last]);
    serving("after two takeovers at once");

    kill_pid(last, "-TERM");
    wait_until("the shell to stop", 30, || !alive(last));
    wait_until("the service to stop", 20, || !alive(pid as u32));
}

/// The live `molt shell` processes of the instance at `root` (not the
/// `molt shell takeover` commands).
fn shells_of(root: &Path) -> Vec<u32> {
    let root = root.to_str().unwrap();
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let is_shell = args.iter().skip(1).any(|a| a == "shell")
            && !args.iter().any(|a| a == "takeover")
            && args.iter().any(|a| a == root);
        if is_shell && alive(pid) {
            pids.push(pid);
        }
    }
    pids
}

/// A taker that stays silent after the offer, and bytes that are no
/// message at all, change nothing: the old shell waits its time
/// (`MOLT_TAKEOVER_WAIT_MS`, shortened here), closes the conversation and
/// serves on; a real takeover works afterwards.
#[test]
fn a_silent_taker_times_out_and_garbage_is_refused_the_old_shell_serves_on() {
    use shell::takeover::{ToHolder, ToTaker};
    let c = Cluster::init();
    let HelloShell {
        mut shell,
        target,
        pid,
        url,
    } = hello_shell(&c, &[("MOLT_TAKEOVER_WAIT_MS", "1500")]);
    let socket = c.dir.path().join("dev-1/takeover.sock");

    // Garbage: a frame that announces more than any message may be.
    let mut junk = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    junk.write_all(&[0xff; 64]).unwrap();
    junk.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut rest = Vec::new();
    let _ = junk.read_to_end(&mut rest);
    assert!(rest.is_empty(), "the holder answered garbage");

    // A taker that asks, takes the offer (with the sockets) and says nothing.
    let silent = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    shell::fdpass::send(&silent, &ToHolder::Ask { version: 1 }, &[]).unwrap();
    let (offer, sockets): (ToTaker, _) = shell::fdpass::recv(&silent).unwrap();
    let ToTaker::Offer(handover) = offer else {
        panic!("no offer: {offer:?}")
    };
    assert_eq!(handover.services.len(), 1);
    assert_eq!(handover.services[0].pid, Some(pid as u32));
    assert_eq!(sockets.len(), handover.fronts.len());
    let started = Instant::now();
    // The holder gives up: the conversation ends.
    silent
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let ended = shell::fdpass::recv::<ToTaker>(&silent);
    assert!(ended.is_err(), "{ended:?}");
    assert!(started.elapsed() >= Duration::from_millis(1000));
    drop(sockets);
    assert!(get(&url).unwrap().contains("hello from molt"));
    let status = c.molt_json(&["status", "--instance", &target]);
    assert_eq!(status["services"]["hello"]["pid"].as_u64(), Some(pid));
    assert_eq!(shell_pid(&c, "dev-1"), shell.id());

    // And a real takeover goes through.
    let now = takes_over(&c, "dev-1");
    assert!(shell.wait().unwrap().success());
    assert!(get(&url).unwrap().contains("hello from molt"));
    let status = c.molt_json(&["status", "--instance", &target]);
    assert_eq!(status["services"]["hello"]["pid"].as_u64(), Some(pid));
    kill_pid(now, "-TERM");
    wait_until("the shell to stop", 30, || !alive(now));
}

/// A new shell that dies after the old one let go (the keeper released, the
/// fronts drained, the supervisors detached, and in the second case the
/// plugin's state exported): the keeper is the old shell's again, and it
/// takes everything back — the same process, the plugin with its state —
/// and serves on; a takeover afterwards goes through.
#[test]
fn a_new_shell_dying_after_the_old_one_let_go_gets_everything_handed_back() {
    let c = Cluster::init();
    let (mut shell, target, hello, counter) = deployed(&c);
    let status = c.molt_json(&["status", "--instance", &target]);
    let pid = status["services"]["hello"]["pid"].as_u64().unwrap();
    let mut seen = hits(counter);
    for point in ["takeover-after-release", "takeover-before-done"] {
        let out = takeover(&c, "dev-1", &[("MOLT_CRASH_AT", point)]);
        assert!(!out.status.success(), "{point}");
        assert!(alive(shell.id()), "{point}: the old shell died");
        assert_eq!(shell_pid(&c, "dev-1"), shell.id());
        assert!(
            get(&format!("http://{hello}/"))
                .unwrap()
                .contains("hello from molt")
        );
        let status = c.molt_json(&["status", "--instance", &target]);
        assert_eq!(
            status["services"]["hello"]["pid"].as_u64(),
            Some(pid),
            "{point}"
        );
        assert_eq!(
            status["services"]["counter"]["health"], "healthy",
            "{point}"
        );
        // The plugin's state came back with it: the count goes on.
        let now = hits(counter);
        assert_eq!(now, seen + 1, "{point}");
        seen = now;
    }
    let now = takes_over(&c, "dev-1");
    assert!(shell.wait().unwrap().success());
    assert_eq!(hits(counter), seen + 1);
    let status = c.molt_json(&["status", "--instance", &target]);
    assert_eq!(status["services"]["hello"]["pid"].as_u64(), Some(pid));
    kill_pid(now, "-TERM");
    wait_until("the shell to stop", 30, || !alive(now));
    wait_until("the service to stop", 20, || !alive(pid as u32));
}
