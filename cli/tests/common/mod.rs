//! What the `molt` binary's tests share: a cluster made by `molt init` with a real
//! `molt repo-server` child process, shells started as child processes, and a
//! plain HTTP GET.

#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

pub const MOLT: &str = env!("CARGO_BIN_EXE_molt");

/// A cluster made by `molt init` in a temp dir, with its repository server running.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub server: Option<Child>,
    pub addr: Option<SocketAddr>,
}

impl Cluster {
    pub fn init() -> Self {
        let dir = tempfile::tempdir().unwrap();
        succeeded(Command::new(MOLT).args(["init"]).arg(dir.path()));
        let mut c = Self {
            dir,
            server: None,
            addr: None,
        };
        c.start_server();
        c
    }

    pub fn config(&self) -> PathBuf {
        self.dir.path().join("molt.toml")
    }

    /// Starts `molt repo-server` and waits for its "listening on" line.
    pub fn start_server(&mut self) {
        let listen = self
            .addr
            .map_or_else(|| "127.0.0.1:0".to_owned(), |a| a.to_string());
        let mut child = Command::new(MOLT)
            .arg("--config")
            .arg(self.config())
            .args(["repo-server", "--listen", &listen])
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let mut lines = BufReader::new(stderr).lines();
        let first = lines.next().unwrap().unwrap();
        let addr = first
            .strip_prefix("repository server listening on ")
            .and_then(|rest| rest.split(' ').next())
            .unwrap_or_else(|| panic!("unexpected first line: {first}"));
        self.addr = Some(addr.parse().unwrap());
        // Keep draining stderr so the server never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        self.server = Some(child);
    }

    pub fn molt(&self, args: &[&str]) -> Output {
        Command::new(MOLT)
            .env("XDG_CACHE_HOME", self.dir.path().join("cache"))
            .arg("--config")
            .arg(self.config())
            .arg("--repo")
            .arg(self.addr.unwrap().to_string())
            .args(args)
            .output()
            .unwrap()
    }

    pub fn molt_json(&self, args: &[&str]) -> serde_json::Value {
        self.molt_json_steps(args).0
    }

    /// `molt --json ARGS`: its JSON document and its stderr (where an upgrade
    /// shows its steps).
    pub fn molt_json_steps(&self, args: &[&str]) -> (serde_json::Value, String) {
        let mut all = args.to_vec();
        all.push("--json");
        let out = self.molt(&all);
        assert!(
            out.status.success(),
            "molt {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        (
            serde_json::from_slice(&out.stdout).unwrap(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    pub fn signal(&mut self, sig: &str) -> std::process::ExitStatus {
        let mut child = self.server.take().unwrap();
        let ok = Command::new("kill")
            .args([sig, &child.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
        child.wait().unwrap()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some(mut c) = self.server.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn write(dir: &Path, rel: &str, bytes: &[u8]) {
    let p = dir.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, bytes).unwrap();
}

/// Starts `molt shell` for instance `name` (issuing its certificate) and returns
/// the child and its command address.
pub fn start_shell(c: &Cluster, name: &str, stage: &str) -> (Child, String) {
    start_shell_with(c, name, stage, &[])
}

/// [`start_shell`] with extra environment variables.
pub fn start_shell_with(
    c: &Cluster,
    name: &str,
    stage: &str,
    env: &[(&str, &str)],
) -> (Child, String) {
    start_shell_args(c, name, stage, env, &[])
}

/// [`start_shell_with`] with extra arguments for `molt shell`.
pub fn start_shell_args(
    c: &Cluster,
    name: &str,
    stage: &str,
    env: &[(&str, &str)],
    args: &[&str],
) -> (Child, String) {
    if !c
        .dir
        .path()
        .join(format!("certs/shell-{name}.crt"))
        .exists()
    {
        let out = c.molt(&["cert", "issue", "--role", "shell", "--name", name]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut shell = Command::new(MOLT)
        .env("XDG_CACHE_HOME", c.dir.path().join("cache"))
        .env("MOLT_RUN_DIR", c.dir.path().join("run"))
        .envs(env.iter().copied())
        .arg("--config")
        .arg(c.config())
        .arg("--repo")
        .arg(c.addr.unwrap().to_string())
        .args([
            "shell",
            "--instance",
            name,
            "--stage",
            stage,
            "--listen",
            "127.0.0.1:0",
        ])
        .arg("--root")
        .arg(c.dir.path().join(name))
        .arg("--ephemeral-ports")
        .args(args)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(shell.stderr.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    let addr = first
        .strip_prefix(&format!("shell {name} listening on "))
        .unwrap_or_else(|| panic!("unexpected first line: {first}"))
        .to_owned();
    std::thread::spawn(move || for _ in lines {});
    (shell, addr)
}

/// GET `url` (`http://ADDR/PATH`): the whole answer, or why there is none.
pub fn get(url: &str) -> std::io::Result<String> {
    let rest = url.strip_prefix("http://").unwrap();
    let (addr, path) = rest.split_once('/').unwrap_or((rest, ""));
    let mut conn = std::net::TcpStream::connect(addr)?;
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        conn,
        "GET /{path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )?;
    let mut answer = String::new();
    conn.read_to_string(&mut answer)?;
    Ok(answer)
}

/// Sends `signal` (e.g. `-TERM`) to `child` with kill(1) and reaps it.
pub fn signal(child: &mut Child, signal: &str) -> std::process::ExitStatus {
    assert!(
        Command::new("kill")
            .args([signal, &child.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    child.wait().unwrap()
}

/// Runs `cmd`, asserts it succeeded (showing its stderr if not), returns its output.
pub fn succeeded(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Alive, and not a zombie.
pub fn alive(pid: u32) -> bool {
    shell::process::alive(pid)
}

/// Waits until `done`, at most `secs` seconds (then fails, naming `what`).
pub fn wait_until(what: &str, secs: u64, done: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    while !done() {
        assert!(
            std::time::Instant::now() < deadline,
            "{what} within {secs} s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sends `signal` (e.g. `-TERM`, `-9`) to process `pid` with kill(1).
pub fn kill_pid(pid: u32, signal: &str) {
    assert!(
        Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .unwrap()
            .success(),
        "kill {signal} {pid}"
    );
}
