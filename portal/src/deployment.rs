//! Deployments: one attempt to bring a target to an image, as a record and as a
//! pure state machine.
//!
//! A deployment moves `queued → running → succeeded | failed | rolled-back`, or
//! to `cancelled` from `queued` or `running` ([`DeploymentState::apply`]). Every
//! other move is refused with a [`TransitionError`], so a store can apply a
//! transition atomically (compare the state it read, write the next) and two
//! writers can never both finish a deployment. *Stuck* is not a state: it is a
//! flag on a running deployment whose step has reported nothing for too long
//! ([`Deployment::stuck`]); a stuck deployment can still finish or be cancelled.
//!
//! `rolled-back` means the rollout failed on some instance and the portal brought
//! the instances it had already upgraded in this deployment back to where they
//! were; `failed` means it failed with nothing of it left to undo (the failing
//! instance's shell undoes its own upgrade).

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use image_spec::{InstanceName, TargetName, UserName};
use serde::{Deserialize, Serialize};
use wire::plan::{StepEvent, StepTime, UpgradePlan};
use wire::portal::DeploymentId;
use wire::shell::{ImageRef, Strategy};

use crate::target::Rollout;

/// Milliseconds since the Unix epoch, as the portal stamps its records.
pub type Millis = i64;

/// Now, in [`Millis`].
pub fn now_ms() -> Millis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as Millis)
        .unwrap_or(0)
}

/// Where a deployment is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeploymentState {
    /// Waiting for its turn (one deployment runs per target).
    Queued,
    /// Being carried out.
    Running,
    /// Every instance runs the image.
    Succeeded,
    /// It failed, with nothing to undo.
    Failed,
    /// It failed, and the instances it had upgraded were brought back.
    RolledBack,
    /// Someone cancelled it.
    Cancelled,
}

impl DeploymentState {
    /// Every state, in their order of life.
    pub const ALL: [DeploymentState; 6] = [
        DeploymentState::Queued,
        DeploymentState::Running,
        DeploymentState::Succeeded,
        DeploymentState::Failed,
        DeploymentState::RolledBack,
        DeploymentState::Cancelled,
    ];

    /// Is it over?
    pub fn is_final(self) -> bool {
        !matches!(self, DeploymentState::Queued | DeploymentState::Running)
    }

    /// The state after `transition`, or why that move is not allowed.
    pub fn apply(self, transition: Transition) -> Result<DeploymentState, TransitionError> {
        use DeploymentState as S;
        use Transition as T;
        match (self, transition) {
            (S::Queued, T::Start) => Ok(S::Running),
            (S::Queued | S::Running, T::Cancel) => Ok(S::Cancelled),
            (S::Running, T::Succeed) => Ok(S::Succeeded),
            (S::Running, T::Fail) => Ok(S::Failed),
            (S::Running, T::RollBack) => Ok(S::RolledBack),
            (from, transition) => Err(TransitionError { from, transition }),
        }
    }
}

impl fmt::Display for DeploymentState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DeploymentState::Queued => "queued",
            DeploymentState::Running => "running",
            DeploymentState::Succeeded => "succeeded",
            DeploymentState::Failed => "failed",
            DeploymentState::RolledBack => "rolled-back",
            DeploymentState::Cancelled => "cancelled",
        })
    }
}

impl FromStr for DeploymentState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        DeploymentState::ALL
            .into_iter()
            .find(|state| state.to_string() == s)
            .ok_or_else(|| {
                format!(
                    "unknown status `{s}` (queued, running, succeeded, failed, rolled-back or cancelled)"
                )
            })
    }
}

/// A move of a deployment's state machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Transition {
    /// Its turn came.
    Start,
    /// Every instance succeeded.
    Succeed,
    /// It failed with nothing to undo.
    Fail,
    /// It failed and the upgraded instances were brought back.
    RollBack,
    /// Someone cancelled it.
    Cancel,
}

/// A move the state machine does not allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a {from} deployment cannot {transition:?}")]
pub struct TransitionError {
    /// The state it was in.
    pub from: DeploymentState,
    /// The move asked for.
    pub transition: Transition,
}

/// Why a deployment was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Trigger {
    /// Someone asked for this image.
    Manual,
    /// A rollback to the image of an earlier deployment.
    Rollback {
        /// That deployment.
        of: DeploymentId,
    },
}

impl fmt::Display for Trigger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Trigger::Manual => f.write_str("manual"),
            Trigger::Rollback { of } => write!(f, "rollback of {of}"),
        }
    }
}

impl fmt::Display for DeployOptions {
    /// In plain words, only what is set: `strategy shadow, only shop-1,
    /// hooks skipped`, or `the target's settings`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if let Some(s) = self.strategy {
            parts.push(format!("strategy {s}"));
        }
        if let Some(r) = self.rollout {
            parts.push(format!("rollout {r}"));
        }
        if let Some(i) = &self.instance {
            parts.push(format!("only {i}"));
        }
        if self.skip_hooks {
            parts.push("hooks skipped".to_owned());
        }
        if parts.is_empty() {
            f.write_str("the target's settings")
        } else {
            f.write_str(&parts.join(", "))
        }
    }
}

/// How a deployment is carried out; unset fields take the target's settings.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeployOptions {
    /// How each instance brings the new generation in.
    pub strategy: Option<Strategy>,
    /// How the rollout goes across the instances.
    pub rollout: Option<Rollout>,
    /// Only this instance of the target.
    pub instance: Option<InstanceName>,
    /// Leave out the services' `pre_swap` and `post_swap` hooks.
    pub skip_hooks: bool,
}

/// Where one instance is in a deployment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RunState {
    /// Not started.
    Pending,
    /// Its shell is upgrading it.
    Running,
    /// It runs the image.
    Succeeded,
    /// Its upgrade failed (its shell undid it).
    Failed,
    /// It had succeeded; the portal brought it back after another instance failed.
    RolledBack,
    /// The rollout halted before it.
    Skipped,
}

impl fmt::Display for RunState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RunState::Pending => "pending",
            RunState::Running => "running",
            RunState::Succeeded => "succeeded",
            RunState::Failed => "failed",
            RunState::RolledBack => "rolled-back",
            RunState::Skipped => "skipped",
        })
    }
}

/// One instance's part of a deployment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceRun {
    /// Where it is.
    pub state: RunState,
    /// The generation it ran before (what a rollback returns to).
    pub generation_before: Option<u64>,
    /// The generation the upgrade recorded (none when nothing changed).
    pub generation: Option<u64>,
    /// The steps its shell carried out, with their times.
    pub steps: Vec<StepTime>,
    /// When it started and ended.
    pub started: Option<Millis>,
    /// When it ended.
    pub finished: Option<Millis>,
    /// Why it failed, or what a rollback of it said.
    pub error: Option<String>,
}

impl InstanceRun {
    /// A run not started yet.
    pub fn pending() -> Self {
        Self {
            state: RunState::Pending,
            generation_before: None,
            generation: None,
            steps: Vec::new(),
            started: None,
            finished: None,
            error: None,
        }
    }
}

/// What a person asks for: a new deployment, before it has an id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewDeployment {
    /// The target.
    pub target: TargetName,
    /// The image.
    pub image: ImageRef,
    /// Who asked (the verified identity's user).
    pub requested_by: UserName,
    /// Why.
    pub trigger: Trigger,
    /// How.
    pub options: DeployOptions,
    /// The instances it covers, in rollout order.
    pub instances: Vec<InstanceName>,
}

/// A deployment's record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deployment {
    /// Its id.
    pub id: DeploymentId,
    /// The target.
    pub target: TargetName,
    /// The image.
    pub image: ImageRef,
    /// Who asked.
    pub requested_by: UserName,
    /// Why.
    pub trigger: Trigger,
    /// How.
    pub options: DeployOptions,
    /// Where it is.
    pub state: DeploymentState,
    /// A running deployment whose current step reported nothing for too long.
    pub stuck: bool,
    /// Someone asked to cancel it while it ran; it stops before the next instance.
    pub cancel_requested: bool,
    /// When it was asked for.
    pub created: Millis,
    /// When it started running.
    pub started: Option<Millis>,
    /// When it ended.
    pub finished: Option<Millis>,
    /// Why it failed or was cancelled.
    pub failure: Option<String>,
    /// The instances, in rollout order.
    pub order: Vec<InstanceName>,
    /// Each instance's part.
    pub instances: BTreeMap<InstanceName, InstanceRun>,
    /// The plan each instance showed before it moved.
    pub plans: BTreeMap<InstanceName, UpgradePlan>,
    /// When it last heard from a shell (what "stuck" is measured from).
    pub last_progress: Option<Millis>,
}

impl Deployment {
    /// The record of a new deployment given its id.
    pub fn new(id: DeploymentId, new: NewDeployment, created: Millis) -> Self {
        let instances = new
            .instances
            .iter()
            .map(|i| (i.clone(), InstanceRun::pending()))
            .collect();
        Self {
            id,
            target: new.target,
            image: new.image,
            requested_by: new.requested_by,
            trigger: new.trigger,
            options: new.options,
            state: DeploymentState::Queued,
            stuck: false,
            cancel_requested: false,
            created,
            started: None,
            finished: None,
            failure: None,
            order: new.instances,
            instances,
            plans: BTreeMap::new(),
            last_progress: None,
        }
    }

    /// Applies `transition` at time `at`: the state, and the times that go with it.
    pub fn apply(&mut self, transition: Transition, at: Millis) -> Result<(), TransitionError> {
        let next = self.state.apply(transition)?;
        self.state = next;
        match next {
            DeploymentState::Running => {
                self.started = Some(at);
                self.last_progress = Some(at);
            }
            DeploymentState::Queued => {}
            _ => {
                self.finished = Some(at);
                self.stuck = false;
                for run in self.instances.values_mut() {
                    if run.state == RunState::Pending {
                        run.state = RunState::Skipped;
                    }
                }
            }
        }
        Ok(())
    }
}

/// What happened in a deployment, in order: its stream of events.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Its number in the deployment's stream, from 1.
    pub seq: u64,
    /// When.
    pub at: Millis,
    /// The instance it is about, if any.
    pub instance: Option<InstanceName>,
    /// What.
    pub kind: EventKind,
}

/// What an event says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EventKind {
    /// The deployment's state changed.
    State(DeploymentState),
    /// An instance's part changed.
    Instance(RunState),
    /// A step of an instance's upgrade started, ended, failed or was undone.
    Step(StepEvent),
    /// A line for people (the shell's progress notes, the portal's own).
    Log(String),
}

#[cfg(test)]
mod tests {
    use super::*;
    use DeploymentState as S;
    use Transition as T;

    const TRANSITIONS: [Transition; 5] = [T::Start, T::Succeed, T::Fail, T::RollBack, T::Cancel];

    #[test]
    fn options_read_as_words_naming_only_what_is_set() {
        assert_eq!(
            DeployOptions::default().to_string(),
            "the target's settings"
        );
        let set = DeployOptions {
            strategy: Some(Strategy::Shadow),
            rollout: Some(Rollout::Canary),
            instance: Some(InstanceName::new("shop-1").unwrap()),
            skip_hooks: true,
        };
        assert_eq!(
            set.to_string(),
            "strategy shadow, rollout canary, only shop-1, hooks skipped"
        );
    }

    #[test]
    fn queued_starts_or_is_cancelled() {
        assert_eq!(S::Queued.apply(T::Start), Ok(S::Running));
        assert_eq!(S::Queued.apply(T::Cancel), Ok(S::Cancelled));
        for t in [T::Succeed, T::Fail, T::RollBack] {
            assert_eq!(
                S::Queued.apply(t),
                Err(TransitionError {
                    from: S::Queued,
                    transition: t
                })
            );
        }
    }

    #[test]
    fn running_ends_one_of_four_ways() {
        assert_eq!(S::Running.apply(T::Succeed), Ok(S::Succeeded));
        assert_eq!(S::Running.apply(T::Fail), Ok(S::Failed));
        assert_eq!(S::Running.apply(T::RollBack), Ok(S::RolledBack));
        assert_eq!(S::Running.apply(T::Cancel), Ok(S::Cancelled));
        assert!(S::Running.apply(T::Start).is_err(), "no second start");
    }

    #[test]
    fn final_states_accept_nothing() {
        for state in [S::Succeeded, S::Failed, S::RolledBack, S::Cancelled] {
            assert!(state.is_final());
            for t in TRANSITIONS {
                assert!(state.apply(t).is_err(), "{state} accepted {t:?}");
            }
        }
        assert!(!S::Queued.is_final());
        assert!(!S::Running.is_final());
    }

    #[test]
    fn states_read_back_as_written() {
        for state in S::ALL {
            assert_eq!(state.to_string().parse::<S>(), Ok(state));
            assert_eq!(
                serde_json::to_value(state).unwrap(),
                serde_json::Value::String(state.to_string())
            );
        }
        assert!("done".parse::<S>().is_err());
    }

    fn record() -> Deployment {
        let a = InstanceName::new("a").unwrap();
        let b = InstanceName::new("b").unwrap();
        Deployment::new(
            DeploymentId(1),
            NewDeployment {
                target: TargetName::new("shop").unwrap(),
                image: ImageRef {
                    name: image_spec::ImageName::new("shop-1").unwrap(),
                    id: image_spec::ImageId::from_bytes([1; 32]),
                },
                requested_by: UserName::new("ada").unwrap(),
                trigger: Trigger::Manual,
                options: DeployOptions::default(),
                instances: vec![a, b],
            },
            10,
        )
    }

    #[test]
    fn a_record_keeps_its_times_and_skips_what_never_ran() {
        let mut d = record();
        assert_eq!(d.state, S::Queued);
        d.apply(T::Start, 20).unwrap();
        assert_eq!(
            (d.state, d.started, d.finished),
            (S::Running, Some(20), None)
        );
        d.instances
            .get_mut(&InstanceName::new("a").unwrap())
            .unwrap()
            .state = RunState::Failed;
        d.stuck = true;
        d.apply(T::Fail, 30).unwrap();
        assert_eq!((d.state, d.finished, d.stuck), (S::Failed, Some(30), false));
        let b = &d.instances[&InstanceName::new("b").unwrap()];
        assert_eq!(b.state, RunState::Skipped);
        // A refused move changes nothing.
        let before = d.clone();
        assert!(d.apply(T::Succeed, 40).is_err());
        assert_eq!(d, before);
    }
}
