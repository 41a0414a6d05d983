//! Deployment outcomes: how a shell answers an upgrade or rollback that carries
//! the portal's deployment id, so that asking again is always safe.
//!
//! The portal sends each upgrade or rollback with its [`DeploymentId`]. When its
//! connection is cut, or the portal restarts, it does not know what became of
//! the request; it sends the same request again. This module makes that repeat
//! harmless, per (deployment id, operation) — an [`OutcomeKey`]:
//!
//! - an operation that **ended** is answered from its recorded outcome (the
//!   [`UpgradeSummary`], or the error), at once, without doing anything again;
//! - an operation **running now** in this shell is waited for, and its result
//!   is the answer (a second one is never started);
//! - an operation the shell **never saw**, or one a crash or shutdown
//!   interrupted before it recorded a generation, runs (again).
//!
//! The outcomes live in the instance's state ([`State::record_outcome`]). When
//! an operation takes the instance it is marked [`DeploymentOutcome::Running`]
//! with the last recorded generation; when it ends, its outcome replaces the
//! mark, written while it still holds the instance. A mark found without a
//! running operation means the shell died in between: if a generation was
//! recorded after the mark's, it is that operation's (one operation holds the
//! instance at a time), and the outcome is rebuilt from it; if none was, the
//! operation was undone by the restart and runs again. So a shell killed after
//! its record and before it answered still reports success, and a rollback is
//! never applied twice.
//!
//! An operation stopped by the shell's own shutdown is not an outcome: like one
//! cut short by `kill -9`, it runs when asked again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;
use tracing::warn;
use wire::portal::DeploymentId;
use wire::repo::{ErrorKind, RemoteError};
use wire::shell::UpgradeSummary;

use crate::state::{DeploymentOutcome, Generation, OutcomeKey, State, StateError};

/// What an operation ended with.
pub type Outcome = Result<UpgradeSummary, RemoteError>;

/// The operations running now, each with the channel its result will be
/// published on.
type InFlight = HashMap<OutcomeKey, watch::Receiver<Option<Outcome>>>;

/// The shell's table of deployment outcomes (see the module docs).
#[derive(Debug)]
pub(crate) struct Deployments {
    state: State,
    running: Arc<Mutex<InFlight>>,
}

/// What to do with a request that carries a deployment id.
#[derive(Debug)]
pub(crate) enum Claim {
    /// It ended: answer with this.
    Done(Outcome),
    /// It runs now: wait for its outcome ([`wait`]).
    Running(watch::Receiver<Option<Outcome>>),
    /// Run it; the claim holds the place until it is [finished](Run::finish)
    /// or dropped.
    Run(Run),
}

/// The right to run one deployment's operation: while it lives, every other
/// request with the same key waits for it.
#[derive(Debug)]
pub(crate) struct Run {
    key: OutcomeKey,
    result: watch::Sender<Option<Outcome>>,
    running: Arc<Mutex<InFlight>>,
}

impl Run {
    /// Publishes the outcome to whoever waits (record it first).
    pub(crate) fn finish(self, outcome: Outcome) {
        // Nobody may be waiting; that is fine.
        let _ = self.result.send(Some(outcome));
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        running.remove(&self.key);
    }
}

/// Waits for the operation another request runs. If it ends without an
/// outcome (its task was torn down at shutdown), says so: asking again runs it.
pub(crate) async fn wait(mut rx: watch::Receiver<Option<Outcome>>) -> Outcome {
    match rx.wait_for(Option::is_some).await {
        Ok(outcome) => outcome.clone().unwrap_or_else(|| {
            Err(RemoteError::new(
                ErrorKind::Internal,
                "the operation ended without an outcome",
            ))
        }),
        Err(_) => Err(RemoteError::new(
            ErrorKind::Internal,
            "the operation this request waited for was interrupted; ask again",
        )),
    }
}

impl Deployments {
    /// The table over the instance's state.
    pub(crate) fn new(state: State) -> Self {
        Self {
            state,
            running: Arc::default(),
        }
    }

    /// Decides what a request with `key` gets (see the module docs).
    pub(crate) fn claim(&self, key: OutcomeKey) -> Result<Claim, StateError> {
        // One lock over the in-flight table and the record: a run removes
        // itself only after its outcome is recorded, so a request sees it
        // either running or done.
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(rx) = running.get(&key) {
            return Ok(Claim::Running(rx.clone()));
        }
        match self.state.outcome(key)? {
            Some(DeploymentOutcome::Done(outcome)) => return Ok(Claim::Done(outcome)),
            Some(DeploymentOutcome::Running { after }) => {
                let generations = self.state.generations()?;
                if let Some(outcome) = recovered(key.deployment, after, &generations) {
                    let outcome = Ok(outcome);
                    self.state
                        .record_outcome(key, &DeploymentOutcome::Done(outcome.clone()))?;
                    return Ok(Claim::Done(outcome));
                }
            }
            None => {}
        }
        let (result, rx) = watch::channel(None);
        running.insert(key, rx);
        Ok(Claim::Run(Run {
            key,
            result,
            running: self.running.clone(),
        }))
    }

    /// Marks `key` as holding the instance, with `after` the last recorded
    /// generation; call it once the operation holds the instance, before it
    /// changes anything.
    pub(crate) fn mark_running(&self, key: OutcomeKey, after: u64) -> Result<(), StateError> {
        self.state
            .record_outcome(key, &DeploymentOutcome::Running { after })
    }

    /// Records how `key` ended, unless it was stopped by the shell's shutdown
    /// (`interrupted`) without succeeding. A failure to write is logged: the
    /// operation itself is over, and a mark left running is resolved from the
    /// generations when asked again.
    pub(crate) fn record(&self, key: OutcomeKey, outcome: &Outcome, interrupted: bool) {
        if interrupted && outcome.is_err() {
            return;
        }
        if let Err(e) = self
            .state
            .record_outcome(key, &DeploymentOutcome::Done(outcome.clone()))
        {
            warn!(%key, error = %e, "could not record a deployment's outcome");
        }
    }
}

/// The outcome of an operation marked running `after` a generation whose
/// shell died before recording how it ended: the first generation recorded
/// after `after` is its own. `None`: it recorded none.
fn recovered(
    deployment: DeploymentId,
    after: u64,
    generations: &[Generation],
) -> Option<UpgradeSummary> {
    let index = generations.iter().position(|g| g.number > after)?;
    let new = &generations[index];
    let old = index.checked_sub(1).map(|i| &generations[i].state.services);
    let mut summary = UpgradeSummary {
        generation: Some(new.number),
        reason: new.reason.clone(),
        image: new.state.image.as_ref().map(|(name, _)| name.clone()),
        warnings: vec![format!(
            "the shell stopped after recording generation {} and before answering deployment {deployment}; \
             this outcome was read from the recorded generation",
            new.number
        )],
        ..UpgradeSummary::default()
    };
    for (name, service) in &new.state.services {
        let before = old.and_then(|old| old.get(name));
        if before.is_some_and(|b| b.commit == service.commit) {
            summary.unchanged.push(name.clone());
        } else {
            summary.restarted.push(name.clone());
        }
    }
    if let Some(old) = old {
        summary.removed = old
            .keys()
            .filter(|name| !new.state.services.contains_key(*name))
            .cloned()
            .collect();
    }
    Some(summary)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{DeploymentOp, InstalledState, ServiceState};
    use image_spec::{CommitId, ServiceName, TreeId};

    fn key(id: u64) -> OutcomeKey {
        OutcomeKey {
            deployment: DeploymentId(id),
            op: DeploymentOp::Upgrade,
        }
    }

    fn with(root: &std::path::Path, services: &[(&str, u8)]) -> InstalledState {
        let mut state = InstalledState::default();
        for (name, n) in services {
            state.services.insert(
                ServiceName::new(name).unwrap(),
                ServiceState {
                    commit: CommitId::from_bytes([*n; 32]),
                    tree: TreeId::from_bytes([*n; 32]),
                    release: root.join(format!("releases/{name}/{n}")),
                },
            );
        }
        state
    }

    #[tokio::test]
    async fn a_key_runs_once_and_is_answered_from_then_on() {
        let dir = tempfile::tempdir().unwrap();
        let table = Deployments::new(State::open(&dir.path().join("state")).unwrap());
        let Claim::Run(run) = table.claim(key(1)).unwrap() else {
            panic!("a new key runs");
        };
        // While it runs, the same key waits; another key runs.
        let Claim::Running(rx) = table.claim(key(1)).unwrap() else {
            panic!("a running key is waited for");
        };
        assert!(matches!(table.claim(key(2)).unwrap(), Claim::Run(_)));
        let waiter = tokio::spawn(wait(rx));
        let summary = UpgradeSummary {
            generation: Some(1),
            ..UpgradeSummary::default()
        };
        table.record(key(1), &Ok(summary.clone()), false);
        run.finish(Ok(summary.clone()));
        assert_eq!(waiter.await.unwrap(), Ok(summary.clone()));
        let Claim::Done(done) = table.claim(key(1)).unwrap() else {
            panic!("an ended key is answered");
        };
        assert_eq!(done, Ok(summary));

        // A run dropped without an outcome leaves its waiters told so, and
        // the key free to run again.
        let Claim::Run(run) = table.claim(key(3)).unwrap() else {
            panic!("a new key runs");
        };
        let Claim::Running(rx) = table.claim(key(3)).unwrap() else {
            panic!("a running key is waited for");
        };
        drop(run);
        assert!(wait(rx).await.is_err());
        assert!(matches!(table.claim(key(3)).unwrap(), Claim::Run(_)));

        // A failure stopped by the shutdown is not recorded; one that ended
        // on its own is.
        let failed: Outcome = Err(RemoteError::new(ErrorKind::Invalid, "cancelled"));
        table.record(key(4), &failed, true);
        assert!(matches!(table.claim(key(4)).unwrap(), Claim::Run(_)));
        table.record(key(5), &failed, false);
        assert!(matches!(table.claim(key(5)).unwrap(), Claim::Done(Err(_))));
    }

    #[test]
    fn a_mark_left_running_is_resolved_from_the_generations() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let state = State::open(&root.join("state")).unwrap();
        state
            .record(&with(root, &[("a", 1), ("b", 1), ("c", 1)]), "one")
            .unwrap();
        let table = Deployments::new(state.clone());

        // Marked after generation 1 and nothing recorded since: it runs again.
        table.mark_running(key(7), 1).unwrap();
        let Claim::Run(run) = table.claim(key(7)).unwrap() else {
            panic!("an interrupted operation that recorded nothing runs again");
        };
        drop(run);

        // Generation 2 recorded after the mark: it is the operation's.
        state
            .record(
                &with(root, &[("a", 1), ("b", 2), ("d", 1)]),
                "upgrade to two",
            )
            .unwrap();
        state.record(&with(root, &[("a", 3)]), "later").unwrap();
        let Claim::Done(Ok(summary)) = table.claim(key(7)).unwrap() else {
            panic!("a recorded generation is the outcome");
        };
        assert_eq!(summary.generation, Some(2));
        assert_eq!(summary.reason, "upgrade to two");
        let names = |v: &[ServiceName]| v.iter().map(|s| s.as_str().to_owned()).collect::<Vec<_>>();
        assert_eq!(names(&summary.restarted), ["b", "d"]);
        assert_eq!(names(&summary.unchanged), ["a"]);
        assert_eq!(names(&summary.removed), ["c"]);
        // And it is recorded as done.
        assert!(matches!(
            state.outcome(key(7)).unwrap(),
            Some(DeploymentOutcome::Done(Ok(_)))
        ));
    }
}
