//! Replacing a running shell with a new one: `molt shell takeover`.
//!
//! A running `molt shell` records how it was started (its pid, working
//! directory and arguments) in `ROOT/shell.json`, and registers its root by
//! instance name in the run directory ([`run_dir`]). `molt shell takeover
//! --instance I` reads that, starts the same command line with `--takeover`
//! (this binary: a new release of molt takes over from the old one), detached
//! from the caller with its output appended to `ROOT/logs/shell.log`, and
//! waits for the new shell's one line on standard output that it took over.
//! The new shell tells systemd it is the service's main process now
//! ([`notify`]), so a unit's `ExecReload=` can run the command.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

/// What the new shell prints on standard output once it took over.
pub(crate) const TOOK_OVER: &str = "took over";

/// The variable naming the run directory.
pub(crate) const RUN_DIR: &str = "MOLT_RUN_DIR";

/// How long `molt shell takeover` waits for the new shell.
const TAKEOVER_WAIT: Duration = Duration::from_secs(180);

/// How a running shell was started.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ShellRecord {
    /// Its process id.
    pub(crate) pid: u32,
    /// Its instance.
    pub(crate) instance: String,
    /// Its root directory, absolute.
    pub(crate) root: PathBuf,
    /// The directory it was started in.
    pub(crate) cwd: PathBuf,
    /// Its arguments (without the program, without `--takeover`).
    pub(crate) args: Vec<String>,
}

/// Where shells register their roots by instance name: `$MOLT_RUN_DIR`, else
/// `$XDG_RUNTIME_DIR/molt`, else `/tmp/molt-UID`.
pub(crate) fn run_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os(RUN_DIR) {
        return dir.into();
    }
    if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR") {
        return Path::new(&dir).join("molt");
    }
    // The owner of /proc/self is this process's user.
    let uid = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata("/proc/self").map_or(0, |m| m.uid())
    };
    PathBuf::from(format!("/tmp/molt-{uid}"))
}

fn record_path(root: &Path) -> PathBuf {
    root.join("shell.json")
}

/// Records this process as the running shell of `instance` at `root`.
pub(crate) fn record(instance: &str, root: &Path) -> Result<()> {
    let root = std::path::absolute(root)
        .with_context(|| format!("cannot make `{}` absolute", root.display()))?;
    let record = ShellRecord {
        pid: std::process::id(),
        instance: instance.to_owned(),
        root: root.clone(),
        cwd: std::env::current_dir().context("cannot read the working directory")?,
        args: std::env::args()
            .skip(1)
            .filter(|a| a != "--takeover")
            .collect(),
    };
    let text = serde_json::to_vec_pretty(&record)?;
    let path = record_path(&root);
    shell::durable::write_file(&path, &text)
        .with_context(|| format!("cannot write `{}`", path.display()))?;
    let dir = run_dir();
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot make `{}`", dir.display()))?;
    let registered = dir.join(format!("{instance}.json"));
    shell::durable::write_file(&registered, &text)
        .with_context(|| format!("cannot write `{}`", registered.display()))?;
    Ok(())
}

/// Tells systemd (when it started this process with `NOTIFY_SOCKET`) the
/// `state` lines, e.g. `READY=1` or `MAINPID=…`; silent without it.
pub(crate) fn notify(state: &str) {
    let Some(socket) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let socket = socket.to_string_lossy().into_owned();
    let sent = (|| -> std::io::Result<()> {
        let sock = std::os::unix::net::UnixDatagram::unbound()?;
        match socket.strip_prefix('@') {
            Some(name) => {
                use std::os::linux::net::SocketAddrExt;
                let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
                sock.send_to_addr(state.as_bytes(), &addr)?;
            }
            None => {
                sock.send_to(state.as_bytes(), &socket)?;
            }
        }
        Ok(())
    })();
    if let Err(e) = sent {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
}

/// `molt shell takeover --instance I [--root R]` (see the module docs).
pub(crate) async fn takeover(instance: &str, root: Option<PathBuf>, json: bool) -> Result<()> {
    let path = match &root {
        Some(root) => record_path(root),
        None => run_dir().join(format!("{instance}.json")),
    };
    let text = std::fs::read(&path).with_context(|| {
        format!(
            "no shell of `{instance}` is registered at `{}`: is it running? (give its --root)",
            path.display()
        )
    })?;
    let record: ShellRecord = serde_json::from_slice(&text)
        .with_context(|| format!("`{}` is not a shell's record", path.display()))?;
    if record.instance != instance {
        bail!(
            "`{}` records the shell of `{}`, not `{instance}`",
            path.display(),
            record.instance
        );
    }
    if !shell::process::alive(record.pid) {
        bail!(
            "the shell of `{instance}` (pid {}) is not running: start it with molt shell",
            record.pid
        );
    }
    let logs = record.root.join("logs");
    std::fs::create_dir_all(&logs).with_context(|| format!("cannot make `{}`", logs.display()))?;
    let log_path = logs.join("shell.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("cannot open `{}`", log_path.display()))?;
    let exe = std::env::current_exe().context("cannot find this program")?;
    let mut child = {
        use std::os::unix::process::CommandExt;
        std::process::Command::new(&exe)
            .args(&record.args)
            .arg("--takeover")
            .current_dir(&record.cwd)
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start `{}`", exe.display()))?
    };
    let pid = child.id();
    let stdout = child
        .stdout
        .take()
        .context("no output from the new shell")?;
    let said = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        let mut reader = std::io::BufReader::new(stdout);
        loop {
            line.clear();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => return false,
                Ok(_) if line.trim() == TOOK_OVER => return true,
                Ok(_) => {}
            }
        }
    });
    let took_over = tokio::time::timeout(TAKEOVER_WAIT, said)
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or(false);
    if !took_over {
        let _ = child.kill();
        let status = child.wait().map(|s| s.to_string()).unwrap_or_default();
        let tail = shell::build::tail(&log_path, 20);
        // Another takeover may have replaced the shell meanwhile: name the
        // one that serves now.
        let serving = std::fs::read(record_path(&record.root))
            .ok()
            .and_then(|t| serde_json::from_slice::<ShellRecord>(&t).ok())
            .map_or(record.pid, |r| r.pid);
        let who = match serving == record.pid {
            true => format!("the running shell (pid {serving}) serves on"),
            false => format!(
                "meanwhile pid {serving} took over from pid {} (another takeover), and serves",
                record.pid
            ),
        };
        bail!(
            "the new shell did not take over ({status}); {who}.\nlast lines of {}:\n{tail}",
            log_path.display()
        );
    }
    if json {
        println!(
            "{}",
            serde_json::json!({ "instance": instance, "pid": pid, "previous": record.pid })
        );
    } else {
        println!(
            "shell of {instance}: taken over by pid {pid}; pid {} handed over and exits",
            record.pid
        );
    }
    Ok(())
}
