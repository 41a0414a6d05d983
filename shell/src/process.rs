//! Service processes: starting one with its environment and logs, stopping it with
//! its stop signal and then SIGKILL, and deciding whether to restart it.
//!
//! A process's stdout and stderr go, through pumps owned by its [`Running`]
//! handle, into one [`RotatingLog`]: when the file passes its size limit it becomes
//! `NAME.1` (the older ones shift to `.2`, `.3`; the oldest is dropped).
//!
//! Every process the shell starts (services and builds) is owned by the shell:
//! it leads its own process group, so a Ctrl-C at the shell's terminal does not
//! reach it and a stop reaches its children too; and the kernel SIGKILLs it if
//! the shell dies, even by `kill -9`, so no orphan of a dead shell keeps running
//! beside the one that restarts.
//!
//! A shell that can be taken over ([`use_keeper`], `molt shell`) has its
//! services started by its keeper ([`crate::keeper`]) instead: the keeper is
//! their parent and writes their logs, and a [`Running`] is then the shell's
//! handle on a kept process — started, signalled and waited for through the
//! keeper, or adopted by the shell that takes over ([`Running::adopt`]).
//!
//! [`decide`] is the restart policy as a pure function of the policy, how the
//! process ended and how many times in a row it has failed: restarts back off
//! exponentially from 100 ms to 30 s.

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use image_spec::manifest::{Command, RestartPolicy, StopSignal};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::task::JoinSet;

use crate::keeper::KeeperLink;

/// Makes `cmd`'s process the shell's own (see the module docs).
///
/// `PR_SET_PDEATHSIG` fires when the thread that forked the child exits; the shell
/// spawns from its runtime's worker threads, which live as long as the shell.
pub(crate) fn owned_by_shell(cmd: &mut tokio::process::Command) {
    owned_by_this_process(cmd.as_std_mut());
}

/// Makes `cmd`'s process a group of its own that dies with this process (the
/// thread that spawns it must live as long as the process: see
/// [`owned_by_shell`]). The keeper ([`crate::keeper`]) spawns services so.
pub(crate) fn owned_by_this_process(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    cmd.process_group(0);
    let parent = std::process::id();
    // SAFETY: the closure runs in the child between fork and exec and only makes
    // async-signal-safe calls (prctl, getppid, _exit); it allocates nothing.
    #[allow(unsafe_code)]
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The shell died before prctl took effect: nobody will ever stop us.
            if u32::try_from(libc::getppid()).ok() != Some(parent) {
                libc::_exit(1);
            }
            Ok(())
        });
    }
}

/// The capabilities a build runs without, when the shell runs as root: to
/// write files regardless of their mode (`CAP_DAC_OVERRIDE`), to change the
/// mode of files it does not own (`CAP_FOWNER`), and to give files away
/// (`CAP_CHOWN`). The files a release shares with the blob cache are
/// read-only and owned by nobody, so without these a build cannot write them
/// or make them writable: it may add files, not change the commit's.
const BUILD_DROPS: [u32; 3] = [
    0, /* CHOWN */
    1, /* DAC_OVERRIDE */
    3, /* FOWNER */
];

/// Makes `cmd` run without [`BUILD_DROPS`]: dropped from the bounding set (so
/// no program it runs gets them back, root or not) and from its own sets. A
/// shell that is not root has none of them to drop; a root shell without the
/// right to change its bounding set leaves them (see the comment inside).
pub(crate) fn without_file_override(cmd: &mut tokio::process::Command) {
    // SAFETY: the closure runs in the child between fork and exec and makes
    // only async-signal-safe system calls (geteuid, prctl, capget, capset) on
    // stack memory; it allocates nothing.
    #[allow(unsafe_code)]
    unsafe {
        cmd.pre_exec(|| {
            if libc::geteuid() != 0 {
                return Ok(());
            }
            for cap in BUILD_DROPS {
                if libc::prctl(libc::PR_CAPBSET_DROP, libc::c_ulong::from(cap), 0, 0, 0) != 0 {
                    let e = std::io::Error::last_os_error();
                    // Root without CAP_SETPCAP (some containers): the build
                    // keeps them, and the check after it still catches a
                    // write into a shared file.
                    if e.raw_os_error() != Some(libc::EPERM) {
                        return Err(e);
                    }
                }
            }
            #[repr(C)]
            struct Header {
                version: u32,
                pid: libc::c_int,
            }
            #[repr(C)]
            #[derive(Clone, Copy)]
            struct Data {
                effective: u32,
                permitted: u32,
                inheritable: u32,
            }
            const VERSION_3: u32 = 0x2008_0522;
            let mut header = Header {
                version: VERSION_3,
                pid: 0,
            };
            let mut data = [Data {
                effective: 0,
                permitted: 0,
                inheritable: 0,
            }; 2];
            if libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            for cap in BUILD_DROPS {
                let bit = !(1u32 << (cap % 32));
                let d = &mut data[(cap / 32) as usize];
                d.effective &= bit;
                d.permitted &= bit;
                d.inheritable &= bit;
            }
            if libc::syscall(libc::SYS_capset, &header, data.as_ptr()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Sends `signal` to the process group `pid` leads (see [`owned_by_shell`]).
pub(crate) fn signal_group(pid: u32, signal: i32) {
    if let Ok(pid) = i32::try_from(pid)
        && pid > 0
    {
        // SAFETY: kill(2) on a process group the shell created and whose leader it
        // has not reaped yet (so the id cannot have been reused), with a valid
        // signal number.
        #[allow(unsafe_code)]
        let _ = unsafe { libc::kill(-pid, signal) };
    }
}

/// How many rotated log files are kept besides the current one.
pub const LOG_GENERATIONS: u32 = 3;

/// Why a process could not be started or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// The program could not be started.
    #[error("cannot start `{command}`: {source}")]
    Spawn {
        /// The command line.
        command: String,
        /// Why.
        source: std::io::Error,
    },
    /// The log file could not be opened.
    #[error("log `{path}`: {source}")]
    Log {
        /// The log file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Waiting for the process failed.
    #[error("waiting for pid {pid}: {source}")]
    Wait {
        /// The process.
        pid: u32,
        /// Why.
        source: std::io::Error,
    },
}

/// A log file that rotates when it grows past a limit.
#[derive(Debug)]
pub struct RotatingLog {
    path: PathBuf,
    limit: u64,
    file: std::fs::File,
    size: u64,
}

impl RotatingLog {
    /// Opens (appending to) `path`, rotating past `limit` bytes.
    pub fn open(path: &Path, limit: u64) -> std::io::Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        let size = file.metadata()?.len();
        Ok(Self {
            path: path.to_owned(),
            limit,
            file,
            size,
        })
    }

    fn rotated(&self, n: u32) -> PathBuf {
        let mut name = self.path.as_os_str().to_owned();
        name.push(format!(".{n}"));
        PathBuf::from(name)
    }

    /// Appends `bytes`, rotating first if they would take the file past its limit.
    pub fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        use std::io::Write;
        if self.size > 0 && self.size + bytes.len() as u64 > self.limit {
            for n in (1..LOG_GENERATIONS).rev() {
                let from = self.rotated(n);
                if from.exists() {
                    std::fs::rename(&from, self.rotated(n + 1))?;
                }
            }
            std::fs::rename(&self.path, self.rotated(1))?;
            self.file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)?;
            self.size = 0;
        }
        self.file.write_all(bytes)?;
        self.size += bytes.len() as u64;
        Ok(())
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct ProcessSpec {
    /// The command, run in `dir`.
    pub command: Command,
    /// The working directory (the release).
    pub dir: PathBuf,
    /// The environment added to the shell's own.
    pub env: Vec<(String, String)>,
    /// Where stdout and stderr go.
    pub log: PathBuf,
    /// The log's rotation size.
    pub log_limit: u64,
}

/// A started process (see the module docs).
#[derive(Debug)]
pub struct Running {
    pid: u32,
    started: Instant,
    how: How,
}

/// Whose child the process is.
#[derive(Debug)]
enum How {
    /// The shell's, its output pumped by the shell.
    Child {
        child: tokio::process::Child,
        pumps: JoinSet<()>,
    },
    /// The keeper's.
    Kept {
        link: Arc<KeeperLink>,
        exit: Option<tokio::sync::oneshot::Receiver<crate::keeper::Exit>>,
        status: Option<ExitStatus>,
    },
}

/// The keeper this process's services are started by, once set.
static KEEPER: std::sync::OnceLock<Arc<KeeperLink>> = std::sync::OnceLock::new();

/// From now on, services are started by the keeper at the other end of
/// `link` (see the module docs); set once per process (`molt shell`), so a
/// second call changes nothing and says so.
pub fn use_keeper(link: Arc<KeeperLink>) -> bool {
    KEEPER.set(link).is_ok()
}

/// Whether process `pid` is alive (and not a zombie waiting to be reaped):
/// `/proc/PID/stat`'s state field.
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit_once(") ")
                .is_some_and(|(_, rest)| !rest.starts_with('Z'))
        })
        .unwrap_or(false)
}

/// The keeper services are started by, if one was set.
pub fn keeper() -> Option<&'static Arc<KeeperLink>> {
    KEEPER.get()
}

/// Calls the keeper off the async runtime.
async fn keeper_call(
    link: &Arc<KeeperLink>,
    request: crate::keeper::Request,
) -> Result<crate::keeper::Reply, crate::keeper::KeeperError> {
    let link = link.clone();
    tokio::task::spawn_blocking(move || link.call(&request))
        .await
        .unwrap_or_else(|e| {
            Err(crate::keeper::KeeperError::Refused(format!(
                "the call to the keeper failed: {e}"
            )))
        })
}

/// How a stop went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stopped {
    /// The exit status.
    pub status: ExitStatus,
    /// `true` if the grace ran out and SIGKILL was needed.
    pub killed: bool,
}

/// The time now as a log line's stamp: RFC 3339 in UTC with milliseconds
/// (`2026-12-01T22:40:15.123Z`), so stamps sort as text.
pub fn stamp_now() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = i64::try_from(now.as_secs()).unwrap_or(i64::MAX);
    let whole = image_spec::Timestamp::from_unix_seconds(secs).to_string();
    format!(
        "{}.{:03}Z",
        whole.trim_end_matches('Z'),
        now.subsec_millis()
    )
}

/// The length of a stamp made by [`stamp_now`].
pub const STAMP_LEN: usize = 24;

/// Splits a line written by [`LineStamper`] into its stamp and the rest; `None`
/// for a line without a stamp (a note written otherwise, an old log).
pub fn split_stamp(line: &str) -> Option<(&str, &str)> {
    let stamp = line.get(..STAMP_LEN)?;
    let rest = line.get(STAMP_LEN..)?.strip_prefix(' ')?;
    (stamp.ends_with('Z') && stamp.as_bytes().get(10) == Some(&b'T')).then_some((stamp, rest))
}

/// Cuts output into lines and stamps each one with the time it was read.
#[derive(Debug, Default)]
pub struct LineStamper {
    partial: Vec<u8>,
}

impl LineStamper {
    /// A line longer than this is cut and stamped in pieces.
    pub const MAX_LINE: usize = 64 << 10;

    /// Appends to `out` every line `bytes` completes, each as `STAMP line\n`;
    /// keeps the unfinished rest for the next call.
    pub fn feed(&mut self, bytes: &[u8], stamp: &str, out: &mut Vec<u8>) {
        let mut rest = bytes;
        while let Some(end) = rest.iter().position(|b| *b == b'\n') {
            self.partial.extend_from_slice(&rest[..end]);
            self.emit(stamp, out);
            rest = &rest[end + 1..];
        }
        self.partial.extend_from_slice(rest);
        if self.partial.len() >= Self::MAX_LINE {
            self.emit(stamp, out);
        }
    }

    /// Appends what is left as a last line, if anything is.
    pub fn finish(&mut self, stamp: &str, out: &mut Vec<u8>) {
        if !self.partial.is_empty() {
            self.emit(stamp, out);
        }
    }

    fn emit(&mut self, stamp: &str, out: &mut Vec<u8>) {
        out.extend_from_slice(stamp.as_bytes());
        out.push(b' ');
        out.append(&mut self.partial);
        out.push(b'\n');
    }
}

async fn pump(mut from: impl AsyncRead + Unpin, log: Arc<Mutex<RotatingLog>>) {
    let mut buf = vec![0u8; 16 << 10];
    let mut lines = LineStamper::default();
    let mut out = Vec::new();
    loop {
        out.clear();
        let ended = match from.read(&mut buf).await {
            Ok(0) | Err(_) => {
                lines.finish(&stamp_now(), &mut out);
                true
            }
            Ok(n) => {
                lines.feed(&buf[..n], &stamp_now(), &mut out);
                false
            }
        };
        if !out.is_empty() {
            let Ok(mut log) = log.lock() else { return };
            if log.write(&out).is_err() {
                return;
            }
        }
        if ended {
            return;
        }
    }
}

impl Running {
    /// Starts `spec`: through the keeper if one is set ([`use_keeper`]),
    /// else as the shell's own child.
    pub async fn start(spec: &ProcessSpec) -> Result<Self, ProcessError> {
        match keeper() {
            Some(link) => Self::start_kept(link, spec).await,
            None => Self::start_child(spec),
        }
    }

    /// Starts `spec` as a child of the keeper at `link`.
    pub(crate) async fn start_kept(
        link: &Arc<KeeperLink>,
        spec: &ProcessSpec,
    ) -> Result<Self, ProcessError> {
        let request = crate::keeper::Request::Spawn(crate::keeper::SpawnSpec {
            program: spec.command.program().to_owned(),
            args: spec.command.args().to_vec(),
            dir: spec.dir.clone(),
            env: spec.env.clone(),
            log: spec.log.clone(),
            log_limit: spec.log_limit,
            label: spec.log.display().to_string(),
        });
        let failed = |e: crate::keeper::KeeperError| ProcessError::Spawn {
            command: spec.command.to_string(),
            source: std::io::Error::other(e.to_string()),
        };
        match keeper_call(link, request).await.map_err(failed)? {
            crate::keeper::Reply::Spawned { pid } => {
                Ok(Self::adopt_with(link, pid, Instant::now()))
            }
            other => Err(failed(crate::keeper::KeeperError::Unexpected(Box::new(
                other,
            )))),
        }
    }

    /// Takes over the supervision of `pid`, a child of the keeper running
    /// since `since` (a shell taking over from another).
    pub fn adopt(pid: u32, since: Instant) -> Result<Self, ProcessError> {
        let link = keeper().ok_or_else(|| ProcessError::Wait {
            pid,
            source: std::io::Error::other("no keeper holds the services of this shell"),
        })?;
        Ok(Self::adopt_with(link, pid, since))
    }

    pub(crate) fn adopt_with(link: &Arc<KeeperLink>, pid: u32, since: Instant) -> Self {
        Self {
            pid,
            started: since,
            how: How::Kept {
                exit: Some(link.exit_of(pid)),
                link: link.clone(),
                status: None,
            },
        }
    }

    /// Starts `spec` as the shell's own child.
    fn start_child(spec: &ProcessSpec) -> Result<Self, ProcessError> {
        let log =
            RotatingLog::open(&spec.log, spec.log_limit).map_err(|source| ProcessError::Log {
                path: spec.log.clone(),
                source,
            })?;
        let log = Arc::new(Mutex::new(log));
        let mut command = tokio::process::Command::new(spec.command.program());
        owned_by_shell(&mut command);
        let mut child = command
            .args(spec.command.args())
            .current_dir(&spec.dir)
            .envs(spec.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| ProcessError::Spawn {
                command: spec.command.to_string(),
                source,
            })?;
        let pid = child.id().unwrap_or(0);
        let mut pumps = JoinSet::new();
        if let Some(out) = child.stdout.take() {
            pumps.spawn(pump(out, log.clone()));
        }
        if let Some(err) = child.stderr.take() {
            pumps.spawn(pump(err, log));
        }
        Ok(Self {
            pid,
            started: Instant::now(),
            how: How::Child { child, pumps },
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// How long it has been running.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// Waits until the process exits on its own.
    pub async fn wait(&mut self) -> Result<ExitStatus, ProcessError> {
        let pid = self.pid;
        match &mut self.how {
            How::Child { child, pumps } => {
                let status = child
                    .wait()
                    .await
                    .map_err(|source| ProcessError::Wait { pid, source })?;
                while pumps.join_next().await.is_some() {}
                Ok(status)
            }
            How::Kept { exit, status, .. } => {
                if let Some(done) = status {
                    return Ok(*done);
                }
                let Some(rx) = exit.as_mut() else {
                    return Err(ProcessError::Wait {
                        pid,
                        source: std::io::Error::other("its keeper is gone"),
                    });
                };
                let got = rx.await;
                *exit = None;
                let done = got
                    .map_err(|_| ProcessError::Wait {
                        pid,
                        source: std::io::Error::other("its keeper is gone"),
                    })?
                    .status();
                *status = Some(done);
                Ok(done)
            }
        }
    }

    /// Sends `signal` to its process group, waits up to `grace` for the process to
    /// exit, then SIGKILLs the group.
    pub async fn stop(
        mut self,
        signal: StopSignal,
        grace: Duration,
    ) -> Result<Stopped, ProcessError> {
        let pid = self.pid;
        let killed = match &mut self.how {
            How::Child { child, .. } => {
                signal_group(pid, signal.number());
                match tokio::time::timeout(grace, child.wait()).await {
                    Ok(_) => false,
                    Err(_) => {
                        signal_group(pid, libc::SIGKILL);
                        let _ = child.start_kill();
                        true
                    }
                }
            }
            How::Kept { link, .. } => {
                let link = link.clone();
                let send = |signal: i32| {
                    keeper_call(&link, crate::keeper::Request::Signal { pid, signal })
                };
                // Refused: it has exited already; the wait says how.
                let _ = send(signal.number()).await;
                match tokio::time::timeout(grace, self.wait()).await {
                    Ok(_) => false,
                    Err(_) => {
                        let _ = send(libc::SIGKILL).await;
                        true
                    }
                }
            }
        };
        let status = self.wait().await?;
        Ok(Stopped { status, killed })
    }
}

/// What to do after a process exited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Start it again after this pause.
    Restart {
        /// The backoff before the restart.
        after: Duration,
    },
    /// Leave it stopped.
    StayDown,
}

/// The first restart's backoff.
pub const BACKOFF_START: Duration = Duration::from_millis(100);
/// The longest backoff.
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// The restart policy (see the module docs). `failures` counts the failed exits in
/// a row, this one included.
pub fn decide(policy: RestartPolicy, success: bool, failures: u32) -> Decision {
    let restart = match policy {
        RestartPolicy::Always => true,
        RestartPolicy::OnFailure => !success,
        RestartPolicy::Never => false,
    };
    if !restart {
        return Decision::StayDown;
    }
    let exp = failures.saturating_sub(1).min(20);
    let after = BACKOFF_START.saturating_mul(1u32 << exp).min(BACKOFF_MAX);
    Decision::Restart { after }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    #[test]
    fn every_line_is_stamped_and_partial_lines_wait_for_their_end() {
        let mut lines = LineStamper::default();
        let mut out = Vec::new();
        lines.feed(b"one\ntw", "T1", &mut out);
        assert_eq!(out, b"T1 one\n");
        lines.feed(b"o\nthree", "T2", &mut out);
        assert_eq!(out, b"T1 one\nT2 two\n");
        lines.finish("T3", &mut out);
        assert_eq!(out, b"T1 one\nT2 two\nT3 three\n");
        // A line without end is cut, never held without bound.
        let mut out = Vec::new();
        lines.feed(&vec![b'x'; LineStamper::MAX_LINE + 10], "T4", &mut out);
        assert_eq!(out.len(), LineStamper::MAX_LINE + 10 + 4);
        let stamp = stamp_now();
        assert_eq!(stamp.len(), STAMP_LEN, "{stamp}");
        let line = format!("{stamp} héllo");
        assert_eq!(split_stamp(&line), Some((stamp.as_str(), "héllo")));
        assert_eq!(split_stamp("Traceback (most recent call last):"), None);
        assert!(
            stamp.ends_with('Z') && stamp.as_bytes()[10] == b'T',
            "{stamp}"
        );
    }

    /// Waits (up to 10 s) until the log at `log` holds `text`.
    async fn until_logged(log: &Path, text: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !std::fs::read_to_string(log)
            .unwrap_or_default()
            .contains(text)
        {
            assert!(Instant::now() < deadline, "`{text}` never came to the log");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn spec(dir: &Path, script: &str) -> ProcessSpec {
        ProcessSpec {
            command: Command::try_from(vec!["sh".to_owned(), "-c".to_owned(), script.to_owned()])
                .unwrap(),
            dir: dir.to_owned(),
            env: vec![("GREETING".into(), "hello".into())],
            log: dir.join("logs/svc.log"),
            log_limit: 1 << 20,
        }
    }

    #[tokio::test]
    async fn output_goes_to_the_log_and_sigterm_stops() {
        let dir = tempfile::tempdir().unwrap();
        let running = Running::start(&spec(
            dir.path(),
            "echo $GREETING; echo oops >&2; exec sleep 30",
        ))
        .await
        .unwrap();
        assert!(running.pid() > 0);
        // Wait for the output to land (bounded), then stop.
        let log = dir.path().join("logs/svc.log");
        until_logged(&log, "oops").await;
        let stopped = running
            .stop(StopSignal::Term, Duration::from_secs(10))
            .await
            .unwrap();
        assert!(!stopped.killed);
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(text.contains("hello") && text.contains("oops"), "{text}");
    }

    /// A kept process: started through a real keeper (in this process, on a
    /// thread), its output in its log, stopped by signal — killed after the
    /// grace if it ignores it —, and adopted by a second link that takes
    /// over from the first.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn kept_processes_start_stop_and_are_adopted_through_the_keeper() {
        use crate::keeper::{Hello, KEEPER_VERSION, Request};
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("keeper.sock");
        let s = socket.clone();
        let keeper = std::thread::spawn(move || crate::keeper::serve(&s, "token".into()));
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            assert!(Instant::now() < deadline);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let hello = |successor: bool| match successor {
            false => Hello::Owner {
                version: KEEPER_VERSION,
                token: "token".into(),
            },
            true => Hello::Successor {
                version: KEEPER_VERSION,
                token: "token".into(),
            },
        };
        let link = KeeperLink::connect(&socket, &hello(false)).unwrap();
        let running =
            Running::start_kept(&link, &spec(dir.path(), "echo $GREETING; exec sleep 30"))
                .await
                .unwrap();
        let log = dir.path().join("logs/svc.log");
        until_logged(&log, "hello").await;
        let stopped = running
            .stop(StopSignal::Term, Duration::from_secs(10))
            .await
            .unwrap();
        assert!(!stopped.killed);
        assert_eq!(stopped.status.signal(), Some(libc::SIGTERM));

        let stubborn = Running::start_kept(
            &link,
            &spec(dir.path(), "trap '' TERM; while true; do sleep 0.05; done"),
        )
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let stopped = stubborn
            .stop(StopSignal::Term, Duration::from_millis(300))
            .await
            .unwrap();
        assert!(stopped.killed);

        // Taken over: the successor adopts the process by its pid.
        let kept = Running::start_kept(&link, &spec(dir.path(), "exec sleep 30"))
            .await
            .unwrap();
        let pid = kept.pid();
        let next = KeeperLink::connect(&socket, &hello(true)).unwrap();
        assert_eq!(
            next.welcome().1.iter().map(|k| k.pid).collect::<Vec<_>>(),
            [pid]
        );
        let link2 = link.clone();
        tokio::task::spawn_blocking(move || link2.call(&Request::Release))
            .await
            .unwrap()
            .unwrap();
        drop(kept);
        drop(link);
        let mut adopted = Running::adopt_with(&next, pid, Instant::now());
        assert_eq!(adopted.pid(), pid);
        let exited = tokio::spawn(async move { adopted.wait().await });
        let n = next.clone();
        tokio::task::spawn_blocking(move || {
            n.call(&Request::Signal {
                pid,
                signal: libc::SIGKILL,
            })
        })
        .await
        .unwrap()
        .unwrap();
        let status = exited.await.unwrap().unwrap();
        assert_eq!(status.signal(), Some(libc::SIGKILL));
        drop(next);
        keeper.join().unwrap().unwrap();
    }

    #[tokio::test]
    async fn a_process_ignoring_its_stop_signal_is_killed_after_the_grace() {
        let dir = tempfile::tempdir().unwrap();
        let running = Running::start(&spec(
            dir.path(),
            "trap '' TERM; echo ready; while true; do sleep 1; done",
        ))
        .await
        .unwrap();
        let log = dir.path().join("logs/svc.log");
        until_logged(&log, "ready").await;
        let stopped = running
            .stop(StopSignal::Term, Duration::from_millis(200))
            .await
            .unwrap();
        assert!(stopped.killed);
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(stopped.status.signal(), Some(9));
    }

    #[tokio::test]
    async fn a_missing_program_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = spec(dir.path(), "");
        s.command = Command::try_from(vec!["/nonexistent/server".to_owned()]).unwrap();
        let err = Running::start(&s).await.unwrap_err();
        assert!(err.to_string().contains("/nonexistent/server"), "{err}");
    }

    #[test]
    fn logs_rotate_and_keep_three_generations() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("svc.log");
        let mut log = RotatingLog::open(&path, 100).unwrap();
        for i in 0..10u8 {
            log.write(&[b'a' + i; 60]).unwrap();
        }
        assert_eq!(std::fs::read(&path).unwrap(), vec![b'j'; 60]);
        assert_eq!(
            std::fs::read(dir.path().join("svc.log.1")).unwrap(),
            vec![b'i'; 60]
        );
        assert_eq!(
            std::fs::read(dir.path().join("svc.log.3")).unwrap(),
            vec![b'g'; 60]
        );
        assert!(!dir.path().join("svc.log.4").exists());
    }

    #[test]
    fn restart_decisions_and_backoff() {
        use RestartPolicy::*;
        assert_eq!(decide(Never, false, 1), Decision::StayDown);
        assert_eq!(decide(OnFailure, true, 0), Decision::StayDown);
        assert_eq!(
            decide(OnFailure, false, 1),
            Decision::Restart {
                after: BACKOFF_START
            }
        );
        assert_eq!(
            decide(Always, true, 0),
            Decision::Restart {
                after: BACKOFF_START
            }
        );
        assert_eq!(
            decide(Always, false, 4),
            Decision::Restart {
                after: Duration::from_millis(800)
            }
        );
        assert_eq!(
            decide(OnFailure, false, 50),
            Decision::Restart { after: BACKOFF_MAX }
        );
    }
}
