//! `molt up` as a new user runs it: from an empty directory, a whole cluster that
//! serves the examples; Ctrl-C stops everything; a second run reuses the state.

#![allow(clippy::unwrap_used)]

mod common;

use common::{MOLT, get, succeeded};

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// A running `molt up` and the lines it has printed.
struct Up {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Up {
    /// `molt up --ephemeral-ports ARGS` in `cwd`.
    fn start(cwd: &Path, args: &[&str]) -> Self {
        let mut child = Command::new(MOLT)
            .current_dir(cwd)
            .env("XDG_CACHE_HOME", cwd.join("cache"))
            .env_remove("MOLT_CONFIG")
            .env_remove("MOLT_REPO")
            .args(["up", "--ephemeral-ports"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let (tx, lines) = mpsc::channel();
        let out = BufReader::new(child.stdout.take().unwrap());
        std::thread::spawn(move || {
            for line in out.lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Reads lines until one starts with `prefix` (cargo builds the Rust example
    /// twice on the first run, so the deadline is generous).
    fn wait_for(&mut self, prefix: &str) {
        self.wait_until(prefix, |line| line.starts_with(prefix));
    }

    /// Reads lines until `done` holds for one (`what` names it if none comes).
    fn wait_until(&mut self, what: &str, done: impl Fn(&str) -> bool) {
        loop {
            match self.lines.recv_timeout(Duration::from_secs(300)) {
                Ok(line) => {
                    let found = done(&line);
                    self.seen.push(line);
                    if found {
                        return;
                    }
                }
                Err(e) => panic!(
                    "no {what} line ({e}); output so far:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// With `--json`: every line seen, each a JSON object with an `event`.
    fn events(&self) -> Vec<serde_json::Value> {
        self.seen
            .iter()
            .map(|line| {
                let v: serde_json::Value =
                    serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
                assert!(v["event"].is_string(), "no event: {line}");
                v
            })
            .collect()
    }

    /// The URL lines: (instance, service) → URL.
    fn urls(&self) -> BTreeMap<(String, String), String> {
        self.seen
            .iter()
            .filter_map(|l| {
                let mut words = l.split_whitespace();
                let (instance, service, url) = (words.next()?, words.next()?, words.next()?);
                url.starts_with("http://")
                    .then(|| ((instance.to_owned(), service.to_owned()), url.to_owned()))
            })
            .collect()
    }

    /// SIGINT, as Ctrl-C sends; returns whether it exited successfully.
    fn interrupt(mut self) -> (bool, Vec<String>) {
        let pid = self.child.id().to_string();
        assert!(
            Command::new("kill")
                .args(["-INT", &pid])
                .status()
                .unwrap()
                .success()
        );
        let status = self.child.wait().unwrap();
        let rest: Vec<String> = self.lines.iter().collect();
        self.seen.extend(rest);
        (status.success(), std::mem::take(&mut self.seen))
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn molt_json(dir: &Path, args: &[&str]) -> serde_json::Value {
    let out = succeeded(
        Command::new(MOLT)
            .env("XDG_CACHE_HOME", dir.join("cache"))
            .arg("--config")
            .arg(dir.join("molt-local/molt.toml"))
            .arg("--json")
            .args(args),
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// POST `body` as JSON to `path` at `addr` (`IP:PORT`): the whole answer.
fn post_json(addr: &str, path: &str, body: &serde_json::Value) -> String {
    use std::io::{Read, Write};
    let body = body.to_string();
    let mut conn = std::net::TcpStream::connect(addr).unwrap();
    write!(
        conn,
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut answer = String::new();
    conn.read_to_string(&mut answer).unwrap();
    answer
}

/// GET `path` at `addr` with a bearer token: the answer's body.
fn get_with_token(addr: &str, path: &str, token: &str) -> String {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect(addr).unwrap();
    write!(
        conn,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n\
         Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    conn.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    answer
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default()
}

/// The `hits` count in an answer of the counter plugin.
fn hits(answer: &str) -> u64 {
    let rest = answer
        .split("\"hits\":")
        .nth(1)
        .unwrap_or_else(|| panic!("no hits: {answer}"));
    rest.trim_start()
        .split([',', '}'])
        .next()
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no hits count: {answer}"))
}

/// The URLs of a `ready` event: (instance, service) → URL.
fn ready_urls(ready: &serde_json::Value) -> BTreeMap<(String, String), String> {
    let mut urls = BTreeMap::new();
    for instance in ready["instances"].as_array().unwrap() {
        let name = instance["name"].as_str().unwrap();
        for (service, ports) in instance["services"].as_object().unwrap() {
            for url in ports.as_object().unwrap().values() {
                let url = url.as_str().unwrap().to_owned();
                urls.insert((name.to_owned(), service.clone()), url);
            }
        }
    }
    urls
}

#[test]
fn molt_up_serves_the_examples_stops_on_ctrl_c_and_comes_back() {
    let dir = tempfile::tempdir().unwrap();
    // The first run with --json: one event a line, every one of them JSON.
    let mut up = Up::start(dir.path(), &["--json"]);
    up.wait_until("ready event", |line| line.contains("\"event\":\"ready\""));
    let events = up.events();
    let kinds: Vec<&str> = events
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        [
            "cluster",
            "portal",
            "shell",
            "shell",
            "shell",
            "login",
            "target",
            "target",
            "target",
            "pushed",
            "pushed",
            "pushed",
            "image",
            "deploying",
            "deployed",
            "deploying",
            "deployed",
            "ready"
        ]
    );
    assert_eq!(events[0]["created"], true);
    assert_eq!(events[12]["name"], "up-1");
    assert_eq!(events[14]["target"], "staging");
    assert_eq!(events[14]["deployment"]["state"], "succeeded");
    assert_eq!(events[16]["deployment"]["target"], "prod");
    let ready = &events[17];
    assert_eq!(ready["portal"], events[1]["url"]);
    assert!(
        events[1]["https"]
            .as_str()
            .unwrap()
            .starts_with("https://127.0.0.1:"),
        "{}",
        events[1]
    );
    // The admin's login, made once: written 0600, and it logs in.
    let login = &events[5];
    let file = Path::new(login["file"].as_str().unwrap());
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let password = std::fs::read_to_string(file).unwrap();
    assert_eq!(password.trim(), login["password"]);
    let portal = events[1]["url"]
        .as_str()
        .unwrap()
        .trim_start_matches("http://");
    let answer = post_json(
        portal,
        "/api/v1/login",
        &serde_json::json!({ "user": "admin", "password": password.trim() }),
    );
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("molt_session="), "{answer}");
    assert_eq!(ready["instances"][2]["name"], "prod");
    assert_eq!(ready["instances"][2]["image"]["name"], "up-1");
    let urls = ready_urls(ready);
    let keys: Vec<(&str, &str)> = urls.keys().map(|(i, s)| (i.as_str(), s.as_str())).collect();
    assert_eq!(
        keys,
        [
            ("prod", "counter"),
            ("prod", "hello"),
            ("prod", "orders"),
            ("staging", "counter"),
            ("staging", "hello"),
            ("staging", "orders")
        ],
        "{}",
        up.seen.join("\n")
    );
    for ((instance, service), url) in &urls {
        let body = get(url).unwrap();
        assert!(body.starts_with("HTTP/1.1 200"), "{body}");
        assert!(
            body.contains(&format!("\"service\": \"{service}\""))
                || body.contains(&format!("\"service\":\"{service}\"")),
            "{body}"
        );
        if service == "orders" {
            assert!(
                body.contains(&format!("\"instance\":\"{instance}\"")),
                "{body}"
            );
        }
    }
    // The user's copies of the examples, the config and one image.
    assert!(
        dir.path()
            .join("molt-local/examples/orders/src/main.rs")
            .exists()
    );
    let images = molt_json(dir.path(), &["image", "list"]);
    assert_eq!(images.as_array().unwrap().len(), 1, "{images}");
    let status = molt_json(dir.path(), &["status", "--instance", "staging"]);
    assert_eq!(status["image"]["name"], "up-1");
    let pid = status["services"]["orders"]["pid"].as_u64().unwrap();
    assert!(Path::new(&format!("/proc/{pid}")).exists());
    let dev = molt_json(dir.path(), &["status", "--instance", "dev"]);
    assert_eq!(dev["services"], serde_json::json!({}));
    // The portal knows the targets, their instances online, and its history.
    let targets = molt_json(dir.path(), &["target", "list"]);
    let names: Vec<&str> = targets
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["dev", "prod", "staging"]);
    let prod = &targets[1];
    assert_eq!(
        (
            prod["image"]["name"].as_str(),
            prod["instances"][0]["online"].as_bool()
        ),
        (Some("up-1"), Some(true))
    );
    let history = molt_json(dir.path(), &["deployments"]);
    assert_eq!(history.as_array().unwrap().len(), 2, "{history}");
    assert!(
        history
            .as_array()
            .unwrap()
            .iter()
            .all(|d| d["state"] == "succeeded")
    );
    // Production attached to the portal takes deployments only from it.
    let direct = Command::new(MOLT)
        .env("XDG_CACHE_HOME", dir.path().join("cache"))
        .arg("--config")
        .arg(dir.path().join("molt-local/molt.toml"))
        .args(["deploy", "up-1", "--instance", "prod"])
        .output()
        .unwrap();
    assert!(!direct.status.success());
    let err = String::from_utf8_lossy(&direct.stderr);
    assert!(err.contains("portal"), "{err}");
    // Production takes nothing directly; the development instance takes a pull.
    let refused = Command::new(MOLT)
        .env("XDG_CACHE_HOME", dir.path().join("cache"))
        .arg("--config")
        .arg(dir.path().join("molt-local/molt.toml"))
        .args(["pull", "hello", "--instance", "prod"])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    // Refused twice over: production takes images only, and only from the
    // portal it is attached to; the portal guard answers first.
    assert!(err.contains("deploy through the portal"), "{err}");
    let pulled = molt_json(dir.path(), &["pull", "hello", "--instance", "dev"]);
    assert_eq!(pulled["restarted"], serde_json::json!(["hello"]));

    // `molt watch --instance dev`: dev is an instance of the portal's target
    // dev, so each save goes through the portal, which keeps the run and its
    // cycles in the target's history.
    let hello = dir.path().join("molt-local/examples/hello");
    let original = std::fs::read_to_string(hello.join("service.toml")).unwrap();
    let mut watch = Command::new(MOLT)
        .env("XDG_CACHE_HOME", dir.path().join("cache"))
        .arg("--config")
        .arg(dir.path().join("molt-local/molt.toml"))
        .args(["--json", "watch"])
        .arg(&hello)
        .args(["--instance", "dev"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut cycles = BufReader::new(watch.stdout.take().unwrap()).lines();
    let mut next_cycle =
        || -> serde_json::Value { serde_json::from_str(&cycles.next().unwrap().unwrap()).unwrap() };
    let first = next_cycle();
    assert_eq!(first["ok"], true, "{first}");
    std::fs::write(
        hello.join("service.toml"),
        original.replace("hello from molt", "hello, watched"),
    )
    .unwrap();
    let second = next_cycle();
    assert_eq!(second["ok"], true, "{second}");
    let dev = molt_json(dir.path(), &["status", "--instance", "dev"]);
    assert_eq!(dev["overlays"]["hello"]["rev"], "dev/admin", "{dev}");
    assert!(
        get(dev["services"]["hello"]["ports"]["main"]
            .as_str()
            .map(|a| format!("http://{a}/"))
            .as_deref()
            .unwrap())
        .unwrap()
        .contains("hello, watched")
    );
    assert!(common::signal(&mut watch, "-INT").success());
    let token = std::fs::read_to_string(dir.path().join("molt-local/portal/admin.token")).unwrap();
    let runs = get_with_token(portal, "/api/v1/targets/dev/watches", token.trim());
    let runs: serde_json::Value = serde_json::from_str(&runs).unwrap();
    assert_eq!(runs[0]["cycles"], 2, "{runs}");
    assert_eq!(runs[0]["branch"], "dev/admin", "{runs}");
    assert!(
        runs[0]["ended"].as_i64().is_some(),
        "Ctrl-C ends the run: {runs}"
    );
    std::fs::write(hello.join("service.toml"), &original).unwrap();
    // A pull through the portal brings main back.
    let pulled = molt_json(dir.path(), &["pull", "hello", "--target", "dev"]);
    assert_eq!(pulled["ok"], true, "{pulled}");
    assert_eq!(
        pulled["instances"]["dev"]["summary"]["restarted"],
        serde_json::json!(["hello"])
    );

    // The counter plugin counts; its count will outlive the restart below.
    let counter = &urls[&("prod".to_owned(), "counter".to_owned())];
    let hits_before = hits(&get(counter).unwrap());

    // Ctrl-C stops everything: the exit is clean, ports close, processes end.
    let (ok, lines) = up.interrupt();
    assert!(ok, "{}", lines.join("\n"));
    assert!(
        lines.iter().any(|l| l.contains("\"event\":\"stopped\"")),
        "{}",
        lines.join("\n")
    );
    for url in urls.values() {
        assert!(get(url).is_err(), "{url} still answers");
    }
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "orders (pid {pid}) outlived molt up"
    );

    // A second run reuses the state: no new push, image or deploy; the recorded
    // generations come back.
    // Text this time, for people.
    let mut again = Up::start(dir.path(), &[]);
    again.wait_for("molt up: ready");
    assert!(
        again.seen[0].starts_with("reusing the cluster"),
        "{}",
        again.seen.join("\n")
    );
    assert!(!again.seen.iter().any(|l| l.starts_with("deploying")));
    let urls = again.urls();
    // Six from the first run's deploys, and dev's pulled hello.
    assert_eq!(urls.len(), 7, "{}", again.seen.join("\n"));
    let dev_hello = &urls[&("dev".to_owned(), "hello".to_owned())];
    assert!(get(dev_hello).unwrap().contains("hello from molt"));
    let orders = &urls[&("prod".to_owned(), "orders".to_owned())];
    assert!(get(orders).unwrap().contains("\"version\":\"1\""));
    let images = molt_json(dir.path(), &["image", "list"]);
    assert_eq!(images.as_array().unwrap().len(), 1, "{images}");
    let status = molt_json(dir.path(), &["status", "--instance", "prod"]);
    assert_eq!(status["generation"], 1);
    // The plugin took up the state it exported at Ctrl-C.
    let counter = &urls[&("prod".to_owned(), "counter".to_owned())];
    assert_eq!(hits(&get(counter).unwrap()), hits_before + 1);
    let (ok, lines) = again.interrupt();
    assert!(ok, "{}", lines.join("\n"));
}
