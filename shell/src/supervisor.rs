//! Keeping one service process running by its restart policy.
//!
//! [`supervise`] starts the process and owns it in one task: when it exits, the
//! restart policy ([`crate::process::decide`]) says whether and after what backoff
//! to start it again; when the supervisor is told to stop, it stops the process
//! with its stop signal and grace. Each change is published on a `watch` channel as
//! a [`ProcessStatus`] (state, pid, restarts), which `status` and tests read.

use std::time::Duration;

use image_spec::manifest::{RestartPolicy, StopSignal};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::process::{Decision, ProcessSpec, Running, decide};

/// Where a supervised process is in its life.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProcessState {
    /// Running with this pid.
    Running {
        /// The process id.
        pid: u32,
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
#[derive(Debug)]
pub struct Supervised {
    status: watch::Receiver<ProcessStatus>,
    stop: CancellationToken,
    task: JoinHandle<()>,
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

    /// Stops the process (stop signal, then SIGKILL after the grace) and waits for
    /// the supervisor to finish.
    pub async fn stop(self) -> ProcessStatus {
        self.stop.cancel();
        let _ = self.task.await;
        self.status.borrow().clone()
    }
}

/// Starts supervising `spec` (see the module docs).
pub fn supervise(spec: ProcessSpec, policy: RestartPolicy, plan: StopPlan) -> Supervised {
    let (tx, rx) = watch::channel(ProcessStatus {
        state: ProcessState::Backoff {
            after: Duration::ZERO,
        },
        restarts: 0,
    });
    let stop = CancellationToken::new();
    let task = tokio::spawn(run(spec, policy, plan, tx, stop.clone()));
    Supervised {
        status: rx,
        stop,
        task,
    }
}

async fn run(
    spec: ProcessSpec,
    policy: RestartPolicy,
    plan: StopPlan,
    tx: watch::Sender<ProcessStatus>,
    stop: CancellationToken,
) {
    let mut restarts = 0u32;
    let mut failures = 0u32;
    loop {
        let publish = |state| {
            let _ = tx.send(ProcessStatus { state, restarts });
        };
        let mut running = match Running::start(&spec) {
            Ok(r) => r,
            Err(e) => {
                warn!(error = %e, "cannot start the service");
                publish(ProcessState::Exited {
                    reason: e.to_string(),
                });
                return;
            }
        };
        let pid = running.pid();
        info!(pid, restarts, "service started");
        publish(ProcessState::Running { pid });
        let exited = tokio::select! {
            () = stop.cancelled() => {
                match running.stop(plan.signal, plan.grace).await {
                    Ok(s) => info!(pid, killed = s.killed, "service stopped"),
                    Err(e) => warn!(pid, error = %e, "stopping the service failed"),
                }
                publish(ProcessState::Stopped);
                return;
            }
            exited = running.wait() => exited,
        };
        let (success, reason) = match &exited {
            Ok(status) => (status.success(), status.to_string()),
            Err(e) => (false, e.to_string()),
        };
        failures = if success { 0 } else { failures + 1 };
        match decide(policy, success, failures) {
            Decision::StayDown => {
                info!(pid, %reason, "service exited; policy keeps it down");
                publish(ProcessState::Exited { reason });
                // Stay until told to stop, so the status remains readable.
                stop.cancelled().await;
                return;
            }
            Decision::Restart { after } => {
                warn!(pid, %reason, ?after, "service exited; restarting");
                publish(ProcessState::Backoff { after });
                tokio::select! {
                    () = stop.cancelled() => {
                        publish(ProcessState::Stopped);
                        return;
                    }
                    () = tokio::time::sleep(after) => {}
                }
                restarts += 1;
            }
        }
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

    #[tokio::test]
    async fn a_crashing_service_is_restarted_with_backoff() {
        let dir = tempfile::tempdir().unwrap();
        let sup = supervise(spec(dir.path(), "exit 3"), RestartPolicy::OnFailure, PLAN);
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
            let sup = supervise(spec(dir.path(), script), policy, PLAN);
            let mut rx = sup.watch();
            let s = until(&mut rx, |s| matches!(s.state, ProcessState::Exited { .. })).await;
            assert_eq!(s.restarts, 0, "{policy:?}");
            sup.stop().await;
        }
    }

    #[tokio::test]
    async fn stopping_ends_the_process() {
        let dir = tempfile::tempdir().unwrap();
        let sup = supervise(
            spec(dir.path(), "exec sleep 60"),
            RestartPolicy::Always,
            PLAN,
        );
        let mut rx = sup.watch();
        let s = until(&mut rx, |s| matches!(s.state, ProcessState::Running { .. })).await;
        let ProcessState::Running { pid } = s.state else {
            unreachable!()
        };
        assert_eq!(sup.stop().await.state, ProcessState::Stopped);
        // The process is gone (reaped): signalling it fails.
        #[allow(unsafe_code)]
        // SAFETY: kill with signal 0 only checks whether the pid exists.
        let alive = unsafe { libc::kill(pid as i32, 0) } == 0;
        assert!(!alive, "pid {pid} still exists");
    }

    #[tokio::test]
    async fn a_program_that_cannot_start_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = spec(dir.path(), "");
        s.command = Command::try_from(vec!["/nonexistent/svc".to_owned()]).unwrap();
        let sup = supervise(s, RestartPolicy::Always, PLAN);
        let mut rx = sup.watch();
        let st = until(&mut rx, |s| matches!(s.state, ProcessState::Exited { .. })).await;
        let ProcessState::Exited { reason } = st.state else {
            unreachable!()
        };
        assert!(reason.contains("/nonexistent/svc"), "{reason}");
    }
}
