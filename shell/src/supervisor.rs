//! Keeping one service process running by its restart policy.
//!
//! [`supervise`] starts the process and owns it in one task: when it exits, the
//! restart policy ([`crate::process::decide`]) says whether and after what backoff
//! to start it again; when the supervisor is told to stop, it stops the process
//! with its stop signal and grace. Each change is published on a `watch` channel as
//! a [`ProcessStatus`] (state, pid, restarts, health), which `status` and tests
//! read.
//!
//! With a [`Monitor`], the supervisor also watches the running process's health:
//! it waits for the first passing probe (within the start grace), then probes
//! every interval; after `retries` failed probes in a row the process counts as
//! failed — it is stopped like any stop, and the restart policy decides, as if
//! it had exited with an error.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use image_spec::manifest::HealthCheck;

use image_spec::manifest::{RestartPolicy, StopSignal};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::health;
use crate::process::{Decision, ProcessSpec, Running, decide};

/// Where a supervised process is in its life.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProcessState {
    /// Running with this pid.
    Running {
        /// The process id.
        pid: u32,
        /// When it started.
        since: Instant,
    },
    /// Exited; waiting out the backoff before the next start.
    Backoff {
        /// The pause before the restart.
        after: Duration,
    },
    /// Exited and, by its restart policy, stays down.
    Exited {
        /// How it ended (`exit status: 1`, `signal: 9`), or why it could not start.
        reason: String,
    },
    /// Stopped by the supervisor.
    Stopped,
}

/// What a supervisor publishes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessStatus {
    /// The state.
    pub state: ProcessState,
    /// How many times the process was started again.
    pub restarts: u32,
    /// What the health probes say about the running process.
    pub health: Health,
    /// How the last process ended (`exit status: 3`, `unhealthy: …`), once one
    /// has: a start that is waiting for health fails on it at once.
    pub last_exit: Option<String>,
}

/// The health of a supervised process, by its probes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// Not probed healthy yet (starting, or no monitor).
    Unknown,
    /// The last probe passed.
    Healthy,
    /// The last `failures` probes failed (the last one for `reason`).
    Failing {
        /// Failed probes in a row.
        failures: u32,
        /// Why the last one failed.
        reason: String,
    },
}

impl std::fmt::Display for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Health::Unknown => f.write_str("unknown"),
            Health::Healthy => f.write_str("healthy"),
            Health::Failing { failures, reason } => {
                write!(f, "failing ({failures} in a row): {reason}")
            }
        }
    }
}

/// How to watch a running process's health.
#[derive(Debug, Clone)]
pub struct Monitor {
    /// The check from `service.toml`.
    pub check: HealthCheck,
    /// The process's internal port per port name.
    pub ports: BTreeMap<String, u16>,
    /// Where a command probe runs.
    pub dir: PathBuf,
}

/// How the supervisor stops the process.
#[derive(Debug, Clone, Copy)]
pub struct StopPlan {
    /// The first signal.
    pub signal: StopSignal,
    /// How long before SIGKILL.
    pub grace: Duration,
}

/// A running supervisor: its status and the way to stop it.
///
/// Dropping it stops the process too (the supervisor is told to stop and does
/// so in the background, stop signal then SIGKILL); [`Supervised::stop`] does
/// the same and waits for it.
#[derive(Debug)]
pub struct Supervised {
    status: watch::Receiver<ProcessStatus>,
    stop: CancellationToken,
    detach: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl Drop for Supervised {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Supervised {
    /// The latest status.
    pub fn status(&self) -> ProcessStatus {
        self.status.borrow().clone()
    }

    /// A receiver of every status change.
    pub fn watch(&self) -> watch::Receiver<ProcessStatus> {
        self.status.clone()
    }

    /// Ends the supervision and leaves the process running: for a process the
    /// keeper holds, handed to the shell that takes over (a process of the
    /// shell's own would die with its handle).
    pub async fn detach(mut self) -> ProcessStatus {
        self.detach.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        self.status.borrow().clone()
    }

    /// Stops the process (stop signal, then SIGKILL after the grace) and waits for
    /// the supervisor to finish.
    pub async fn stop(mut self) -> ProcessStatus {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        self.status.borrow().clone()
    }
}

/// Starts supervising `spec` (see the module docs).
pub fn supervise(
    spec: ProcessSpec,
    policy: RestartPolicy,
    plan: StopPlan,
    monitor: Option<Monitor>,
) -> Supervised {
    start_supervising(None, spec, policy, plan, monitor)
}

/// Supervises `running`, a process of `spec` that another shell started (a
/// takeover: [`Running::adopt`]), as if this supervisor had started it.
pub fn supervise_adopted(
    running: Running,
    spec: ProcessSpec,
    policy: RestartPolicy,
    plan: StopPlan,
    monitor: Option<Monitor>,
) -> Supervised {
    start_supervising(Some(running), spec, policy, plan, monitor)
}

fn start_supervising(
    first: Option<Running>,
    spec: ProcessSpec,
    policy: RestartPolicy,
    plan: StopPlan,
    monitor: Option<Monitor>,
) -> Supervised {
    let (tx, rx) = watch::channel(ProcessStatus {
        state: ProcessState::Backoff {
            after: Duration::ZERO,
        },
        restarts: 0,
        health: Health::Unknown,
        last_exit: None,
    });
    let stop = CancellationToken::new();
    let detach = CancellationToken::new();
    let ends = Ends {
        stop: stop.clone(),
        detach: detach.clone(),
    };
    let task = tokio::spawn(run(first, spec, policy, plan, monitor, tx, ends));
    Supervised {
        status: rx,
        stop,
        detach,
        task: Some(task),
    }
}

/// What ends a supervisor: a stop (the process is stopped) or a detach (it
/// is left running).
struct Ends {
    stop: CancellationToken,
    detach: CancellationToken,
}

/// How a running process stopped running.
enum End {
    /// The supervisor was told to stop.
    Stop,
    /// The supervisor was told to let go of it.
    Detach,
    /// The process exited.
    Exited(Result<std::process::ExitStatus, crate::process::ProcessError>),
    /// Its health probes failed `retries` times in a row.
    Unhealthy(String),
}

async fn run(
    mut first: Option<Running>,
    spec: ProcessSpec,
    policy: RestartPolicy,
    plan: StopPlan,
    monitor: Option<Monitor>,
    tx: watch::Sender<ProcessStatus>,
    ends: Ends,
) {
    let Ends { stop, detach } = ends;
    let mut restarts = 0u32;
    let mut failures = 0u32;
    let mut last_exit: Option<String> = None;
    loop {
        let publish = |state, last_exit: &Option<String>| {
            let _ = tx.send(ProcessStatus {
                state,
                restarts,
                health: Health::Unknown,
                last_exit: last_exit.clone(),
            });
        };
        let started = match first.take() {
            Some(adopted) => Ok(adopted),
            None => Running::start(&spec).await,
        };
        let mut running = match started {
            Ok(r) => r,
            Err(e) => {
                warn!(error = %e, "cannot start the service");
                let reason = e.to_string();
                publish(
                    ProcessState::Exited {
                        reason: reason.clone(),
                    },
                    &Some(reason),
                );
                return;
            }
        };
        let pid = running.pid();
        info!(pid, restarts, "service started");
        publish(
            ProcessState::Running {
                pid,
                since: Instant::now(),
            },
            &last_exit,
        );
        let end = tokio::select! {
            () = stop.cancelled() => End::Stop,
            () = detach.cancelled() => End::Detach,
            exited = running.wait() => End::Exited(exited),
            reason = watch_health(monitor.as_ref(), &tx) => End::Unhealthy(reason),
        };
        let (success, reason) = match end {
            End::Stop => {
                match running.stop(plan.signal, plan.grace).await {
                    Ok(s) => info!(pid, killed = s.killed, "service stopped"),
                    Err(e) => warn!(pid, error = %e, "stopping the service failed"),
                }
                publish(ProcessState::Stopped, &last_exit);
                return;
            }
            End::Detach => {
                info!(pid, "supervision handed over; the process runs on");
                return;
            }
            End::Exited(Ok(status)) => (status.success(), status.to_string()),
            End::Exited(Err(e)) => (false, e.to_string()),
            End::Unhealthy(reason) => {
                warn!(pid, %reason, "service unhealthy; stopping it");
                if let Err(e) = running.stop(plan.signal, plan.grace).await {
                    warn!(pid, error = %e, "stopping the service failed");
                }
                (false, format!("unhealthy: {reason}"))
            }
        };
        failures = if success { 0 } else { failures + 1 };
        last_exit = Some(reason.clone());
        match decide(policy, success, failures) {
            Decision::StayDown => {
                info!(pid, %reason, "service ended; policy keeps it down");
                publish(ProcessState::Exited { reason }, &last_exit);
                // Stay until told to stop, so the status remains readable.
                stop.cancelled().await;
                return;
            }
            Decision::Restart { after } => {
                warn!(pid, %reason, ?after, "service ended; restarting");
                publish(ProcessState::Backoff { after }, &last_exit);
                tokio::select! {
                    () = stop.cancelled() => {
                        publish(ProcessState::Stopped, &last_exit);
                        return;
                    }
                    () = tokio::time::sleep(after) => {}
                }
                restarts += 1;
            }
        }
    }
}

/// How much longer than the start grace the supervisor waits for a starting
/// process's first passing probe (see [`watch_health`]).
pub const VERDICT_MARGIN: Duration = Duration::from_millis(500);

/// Watches a running process's health (see the module docs); returns why it
/// became unhealthy. Never returns without a monitor.
async fn watch_health(monitor: Option<&Monitor>, tx: &watch::Sender<ProcessStatus>) -> String {
    let Some(m) = monitor else {
        return std::future::pending().await;
    };
    let set = |health: Health| tx.send_modify(|s| s.health = health);
    // An upgrade that starts a process waits for its health itself, within
    // the start grace; this verdict comes [`VERDICT_MARGIN`] later, so such a
    // start that never gets healthy is reported as unhealthy, not as an exit
    // this supervisor caused (the two would otherwise race).
    let check = HealthCheck {
        start_grace: m.check.start_grace + VERDICT_MARGIN,
        ..m.check.clone()
    };
    if let Err(e) = health::wait_healthy(&check, &m.ports, &m.dir).await {
        return e.to_string();
    }
    set(Health::Healthy);
    probe_every_interval(m, &set, true).await
}

/// Probes every interval, telling `set` what the probes say. With
/// `give_up`, returns once `retries` probes failed in a row (why); else
/// probes for ever.
async fn probe_every_interval(m: &Monitor, set: &impl Fn(Health), give_up: bool) -> String {
    let mut failures = 0u32;
    loop {
        tokio::time::sleep(m.check.interval).await;
        match health::probe(&m.check.probe, &m.ports, &m.dir, m.check.timeout).await {
            Ok(()) => {
                if failures > 0 {
                    info!(failures, "service healthy again");
                    set(Health::Healthy);
                }
                failures = 0;
            }
            Err(e) => {
                failures += 1;
                warn!(failures, error = %e, "health probe failed");
                set(Health::Failing {
                    failures,
                    reason: e.to_string(),
                });
                if give_up && failures >= m.check.retries.max(1) {
                    return format!("{failures} health probes failed in a row, the last: {e}");
                }
            }
        }
    }
}

/// The health of something the shell serves itself (a plugin), probed every
/// interval by a task this handle owns: dropping it stops the probes.
#[derive(Debug)]
pub struct HealthWatch {
    health: watch::Receiver<Health>,
    task: JoinHandle<()>,
}

impl HealthWatch {
    /// Starts probing `monitor`'s target, which passed its start check.
    pub fn start(monitor: Monitor) -> Self {
        let (tx, health) = watch::channel(Health::Healthy);
        let task = tokio::spawn(async move {
            let set = |h: Health| {
                let _ = tx.send(h);
            };
            probe_every_interval(&monitor, &set, false).await;
        });
        Self { health, task }
    }

    /// What the probes say now.
    pub fn health(&self) -> Health {
        self.health.borrow().clone()
    }
}

impl Drop for HealthWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image_spec::manifest::Command;

    fn spec(dir: &std::path::Path, script: &str) -> ProcessSpec {
        ProcessSpec {
            command: Command::try_from(vec!["sh".to_owned(), "-c".to_owned(), script.to_owned()])
                .unwrap(),
            dir: dir.to_owned(),
            env: vec![],
            log: dir.join("svc.log"),
            log_limit: 1 << 20,
        }
    }

    const PLAN: StopPlan = StopPlan {
        signal: StopSignal::Term,
        grace: Duration::from_secs(5),
    };

    /// Waits (bounded) until the status satisfies `pred`.
    async fn until(
        rx: &mut watch::Receiver<ProcessStatus>,
        pred: impl Fn(&ProcessStatus) -> bool,
    ) -> ProcessStatus {
        tokio::time::timeout(Duration::from_secs(30), rx.wait_for(|s| pred(s)))
            .await
            .expect("status reached in time")
            .expect("supervisor alive")
            .clone()
    }

    /// A takeover, supervisor side: a kept process adopted by a new
    /// supervisor, let go by it (still running), adopted again, and restarted
    /// by its policy when it dies.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_kept_process_is_adopted_detached_and_adopted_again() {
        use crate::keeper::{Hello, KEEPER_VERSION, KeeperLink, Request};
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("keeper.sock");
        let s = socket.clone();
        let keeper = std::thread::spawn(move || crate::keeper::serve(&s, "token".into()));
        while !socket.exists() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let link = KeeperLink::connect(
            &socket,
            &Hello::Owner {
                version: KEEPER_VERSION,
                token: "token".into(),
            },
        )
        .unwrap();
        let svc = spec(dir.path(), "exec sleep 60");
        let running = Running::start_kept(&link, &svc).await.unwrap();
        let pid = running.pid();
        let alive = |pid: u32| std::path::Path::new(&format!("/proc/{pid}")).exists();

        let first = supervise_adopted(running, svc.clone(), RestartPolicy::Always, PLAN, None);
        let mut rx = first.watch();
        let s = until(&mut rx, |s| matches!(s.state, ProcessState::Running { .. })).await;
        assert!(matches!(s.state, ProcessState::Running { pid: p, .. } if p == pid));
        first.detach().await;
        assert!(alive(pid), "a detached process must run on");

        let again = Running::adopt_with(&link, pid, Instant::now());
        let second = supervise_adopted(again, svc, RestartPolicy::Always, PLAN, None);
        let mut rx = second.watch();
        let l = link.clone();
        tokio::task::spawn_blocking(move || {
            l.call(&Request::Signal {
                pid,
                signal: libc::SIGKILL,
            })
        })
        .await
        .unwrap()
        .unwrap();
        let s = until(&mut rx, |s| {
            s.restarts == 1 && matches!(s.state, ProcessState::Running { .. })
        })
        .await;
        assert!(matches!(s.state, ProcessState::Running { pid: p, .. } if p != pid));
        assert!(s.last_exit.unwrap().contains("signal"));
        assert_eq!(second.stop().await.state, ProcessState::Stopped);
        drop(link);
        keeper.join().unwrap().unwrap();
    }

    #[tokio::test]
    async fn a_crashing_service_is_restarted_with_backoff() {
        let dir = tempfile::tempdir().unwrap();
        let sup = supervise(
            spec(dir.path(), "exit 3"),
            RestartPolicy::OnFailure,
            PLAN,
            None,
        );
        let mut rx = sup.watch();
        let s = until(&mut rx, |s| s.restarts >= 2).await;
        assert!(s.restarts >= 2);
        assert_eq!(sup.stop().await.state, ProcessState::Stopped);
    }

    #[tokio::test]
    async fn never_means_it_stays_down_and_on_failure_ignores_success() {
        let dir = tempfile::tempdir().unwrap();
        for (policy, script) in [
            (RestartPolicy::Never, "exit 3"),
            (RestartPolicy::OnFailure, "exit 0"),
        ] {
            let sup = supervise(spec(dir.path(), script), policy, PLAN, None);
            let mut rx = sup.watch();
            let s = until(&mut rx, |s| matches!(s.state, ProcessState::Exited { .. })).await;
            assert_eq!(s.restarts, 0, "{policy:?}");
            sup.stop().await;
        }
    }

    /// A supervised `sleep 60`, once it runs: the handle, its status and pid.
    async fn sleeper(dir: &std::path::Path) -> (Supervised, watch::Receiver<ProcessStatus>, u32) {
        let sup = supervise(
            spec(dir, "exec sleep 60"),
            RestartPolicy::Always,
            PLAN,
            None,
        );
        let mut rx = sup.watch();
        let s = until(&mut rx, |s| matches!(s.state, ProcessState::Running { .. })).await;
        let ProcessState::Running { pid, .. } = s.state else {
            unreachable!()
        };
        (sup, rx, pid)
    }

    #[tokio::test]
    async fn stopping_ends_the_process() {
        let dir = tempfile::tempdir().unwrap();
        let (sup, _, pid) = sleeper(dir.path()).await;
        assert_eq!(sup.stop().await.state, ProcessState::Stopped);
        // The process is gone (reaped): signalling it fails.
        #[allow(unsafe_code)]
        // SAFETY: kill with signal 0 only checks whether the pid exists.
        let alive = unsafe { libc::kill(pid as i32, 0) } == 0;
        assert!(!alive, "pid {pid} still exists");
    }

    #[tokio::test]
    async fn dropping_the_handle_stops_the_process() {
        let dir = tempfile::tempdir().unwrap();
        let (sup, mut rx, pid) = sleeper(dir.path()).await;
        drop(sup);
        // The supervisor goes on alone just long enough to stop it.
        let s = until(&mut rx, |s| s.state == ProcessState::Stopped).await;
        assert_eq!(s.state, ProcessState::Stopped);
        let gone = tokio::time::timeout(Duration::from_secs(30), async {
            // SAFETY: kill with signal 0 only checks whether the pid exists.
            #[allow(unsafe_code)]
            while unsafe { libc::kill(pid as i32, 0) } == 0 {
                tokio::task::yield_now().await;
            }
        })
        .await;
        assert!(gone.is_ok(), "pid {pid} outlived its dropped supervisor");
    }

    #[tokio::test]
    async fn a_process_that_turns_unhealthy_is_restarted_and_watched_again() {
        let dir = tempfile::tempdir().unwrap();
        let flag = dir.path().join("healthy");
        std::fs::write(&flag, "").unwrap();
        let monitor = Monitor {
            check: HealthCheck {
                probe: image_spec::manifest::Probe::Command(
                    Command::try_from(vec!["test".to_owned(), "-f".into(), "healthy".into()])
                        .unwrap(),
                ),
                interval: Duration::from_millis(50),
                timeout: Duration::from_secs(5),
                retries: 3,
                start_grace: Duration::from_secs(20),
            },
            ports: BTreeMap::new(),
            dir: dir.path().to_owned(),
        };
        let sup = supervise(
            spec(dir.path(), "exec sleep 60"),
            RestartPolicy::Always,
            PLAN,
            Some(monitor),
        );
        let mut rx = sup.watch();
        let first = until(&mut rx, |s| s.health == Health::Healthy).await;
        let ProcessState::Running { pid: first_pid, .. } = first.state else {
            panic!("healthy but not running: {first:?}")
        };
        assert_eq!(first.restarts, 0);
        // Probes start failing: reported, then after three the process is replaced.
        std::fs::remove_file(&flag).unwrap();
        until(&mut rx, |s| {
            matches!(s.health, Health::Failing { failures: 1.., .. })
        })
        .await;
        let restarted = until(&mut rx, |s| s.restarts == 1).await;
        assert_eq!(restarted.health, Health::Unknown);
        std::fs::write(&flag, "").unwrap();
        let again = until(&mut rx, |s| s.health == Health::Healthy).await;
        let ProcessState::Running { pid, .. } = again.state else {
            panic!("healthy but not running: {again:?}")
        };
        assert_ne!(pid, first_pid);
        assert_eq!(again.restarts, 1);
        // The replaced process is gone.
        #[allow(unsafe_code)]
        // SAFETY: kill with signal 0 only checks whether the pid exists.
        let alive = unsafe { libc::kill(first_pid as i32, 0) } == 0;
        assert!(!alive, "pid {first_pid} still exists");
        sup.stop().await;
    }

    #[tokio::test]
    async fn a_program_that_cannot_start_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = spec(dir.path(), "");
        s.command = Command::try_from(vec!["/nonexistent/svc".to_owned()]).unwrap();
        let sup = supervise(s, RestartPolicy::Always, PLAN, None);
        let mut rx = sup.watch();
        let st = until(&mut rx, |s| matches!(s.state, ProcessState::Exited { .. })).await;
        let ProcessState::Exited { reason } = st.state else {
            unreachable!()
        };
        assert!(reason.contains("/nonexistent/svc"), "{reason}");
    }
}
