//! The vocabulary of an upgrade plan: what a shell will do, step by step, to
//! bring its instance to an image, and what it reports while it does it.
//!
//! A plan is computed by the shell's planner (a pure function) and is the one
//! description of an upgrade: `molt deploy --plan` prints it, the executor carries
//! out exactly its steps, and the portal stores it beside the step events. It
//! travels in [`crate::shell::ShellResponse::Plan`] and, as each step starts and
//! ends, in [`crate::shell::ShellResponse::Step`].
//!
//! Every step before [`Step::Record`] can be undone (see [`Step::undo`]); a
//! failure there runs the undo of every step done so far, newest first, so the
//! instance is exactly as before. `Record` is the commit point: once the new
//! state is recorded the upgrade has happened, and a failure of a later step
//! (draining, stopping the old generation, a `post_swap` hook) is reported and
//! kept.

use std::fmt;

use serde::{Deserialize, Serialize};

use image_spec::{CommitId, ServiceName};

use crate::shell::Strategy;

/// One step of an upgrade plan.
///
/// In JSON a step is an object keyed by its kind as the CLI spells it
/// ([`StepKind::as_str`]): `{"stop-old": {"service": "orders"}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Step {
    /// Fetch the blobs of the new commit that the instance's cache lacks.
    Fetch {
        /// The service.
        service: ServiceName,
        /// The commit fetched.
        commit: CommitId,
        /// Blobs to fetch.
        blobs: u64,
        /// Their bytes.
        bytes: u64,
    },
    /// Make the new release: the previous one copied with the diff applied, or
    /// (with `reuse`) a sealed release of this commit already on disk.
    Release {
        /// The service.
        service: ServiceName,
        /// The commit.
        commit: CommitId,
        /// A sealed release of this commit is on disk (a rollback): reused.
        reuse: bool,
    },
    /// Run the service's build command in its new release, then seal it.
    Build {
        /// The service.
        service: ServiceName,
        /// The commit built.
        commit: CommitId,
    },
    /// Start the new process beside the running one, on fresh internal ports,
    /// and wait until it is healthy. No traffic reaches it yet.
    Start {
        /// The service.
        service: ServiceName,
        /// The commit started.
        commit: CommitId,
        /// Runs on a copy of its data directory (`shadow-full`).
        copy_data: bool,
    },
    /// Hold the service's ports (new connections wait) and stop its old process
    /// first: it may not run twice (`overlap = false`).
    Hold {
        /// The service.
        service: ServiceName,
    },
    /// Run the service's `pre_swap` hook against its new release.
    PreSwap {
        /// The service.
        service: ServiceName,
    },
    /// Swap a plugin's library inside its host, its state handed over.
    SwapPlugin {
        /// The service.
        service: ServiceName,
        /// The commit swapped in.
        commit: CommitId,
    },
    /// Move these services' ports to their new processes, in one change of the
    /// routing table.
    Cutover {
        /// The services.
        services: Vec<ServiceName>,
    },
    /// Record the new installed state as this generation: the commit point.
    Record {
        /// The generation's number.
        generation: u64,
    },
    /// Wait until nothing is in flight on the old process (up to its stop grace).
    Drain {
        /// The service.
        service: ServiceName,
    },
    /// Stop the old process.
    StopOld {
        /// The service.
        service: ServiceName,
    },
    /// Stop a service the image no longer has and close its ports.
    Remove {
        /// The service.
        service: ServiceName,
    },
    /// Run the service's `post_swap` hook.
    PostSwap {
        /// The service.
        service: ServiceName,
    },
}

/// The kind of a step, without its details (fault injection, timings).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StepKind {
    /// [`Step::Fetch`].
    Fetch,
    /// [`Step::Release`].
    Release,
    /// [`Step::Build`].
    Build,
    /// [`Step::Start`].
    Start,
    /// [`Step::Hold`].
    Hold,
    /// [`Step::PreSwap`].
    PreSwap,
    /// [`Step::SwapPlugin`].
    SwapPlugin,
    /// [`Step::Cutover`].
    Cutover,
    /// [`Step::Record`].
    Record,
    /// [`Step::Drain`].
    Drain,
    /// [`Step::StopOld`].
    StopOld,
    /// [`Step::Remove`].
    Remove,
    /// [`Step::PostSwap`].
    PostSwap,
}

impl StepKind {
    /// Every kind, in the order a plan uses them.
    pub const ALL: [StepKind; 13] = [
        StepKind::Fetch,
        StepKind::Release,
        StepKind::Build,
        StepKind::Start,
        StepKind::Hold,
        StepKind::PreSwap,
        StepKind::SwapPlugin,
        StepKind::Cutover,
        StepKind::Record,
        StepKind::Drain,
        StepKind::StopOld,
        StepKind::Remove,
        StepKind::PostSwap,
    ];

    /// The kind's name as the CLI spells it (`stop-old`).
    pub fn as_str(self) -> &'static str {
        match self {
            StepKind::Fetch => "fetch",
            StepKind::Release => "release",
            StepKind::Build => "build",
            StepKind::Start => "start",
            StepKind::Hold => "hold",
            StepKind::PreSwap => "pre-swap",
            StepKind::SwapPlugin => "swap-plugin",
            StepKind::Cutover => "cutover",
            StepKind::Record => "record",
            StepKind::Drain => "drain",
            StepKind::StopOld => "stop-old",
            StepKind::Remove => "remove",
            StepKind::PostSwap => "post-swap",
        }
    }
}

impl fmt::Display for StepKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for StepKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        StepKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = StepKind::ALL.iter().map(|k| k.as_str()).collect();
                format!("unknown step `{s}` ({})", names.join(", "))
            })
    }
}

/// What undoes a step, should a later one (before the record) fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Undo {
    /// Nothing to undo: the step changed nothing the instance serves from
    /// (fetched blobs stay in the content-addressed cache; a sealed release
    /// stays on disk for the next attempt; a hook's effects are its own).
    Nothing,
    /// Remove the unsealed release being made.
    DropRelease,
    /// Stop the new process.
    StopNew,
    /// Start the old process again from its release and route its ports back.
    RestartOld,
    /// Swap the plugin's previous library back in, its state handed back.
    SwapBack,
    /// Route the ports back to the old processes (and close ports the old
    /// generation did not have).
    RouteBack,
    /// Past the commit point: not undone; a failure is reported and kept.
    Kept,
}

impl fmt::Display for Undo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Undo::Nothing => "nothing to undo",
            Undo::DropRelease => "remove the unsealed release",
            Undo::StopNew => "stop the new process",
            Undo::RestartOld => "start the old process again, route back",
            Undo::SwapBack => "swap the previous library back",
            Undo::RouteBack => "route back to the old processes",
            Undo::Kept => "kept (after the commit point)",
        })
    }
}

impl Step {
    /// The step's kind.
    pub fn kind(&self) -> StepKind {
        match self {
            Step::Fetch { .. } => StepKind::Fetch,
            Step::Release { .. } => StepKind::Release,
            Step::Build { .. } => StepKind::Build,
            Step::Start { .. } => StepKind::Start,
            Step::Hold { .. } => StepKind::Hold,
            Step::PreSwap { .. } => StepKind::PreSwap,
            Step::SwapPlugin { .. } => StepKind::SwapPlugin,
            Step::Cutover { .. } => StepKind::Cutover,
            Step::Record { .. } => StepKind::Record,
            Step::Drain { .. } => StepKind::Drain,
            Step::StopOld { .. } => StepKind::StopOld,
            Step::Remove { .. } => StepKind::Remove,
            Step::PostSwap { .. } => StepKind::PostSwap,
        }
    }

    /// The one service the step is about, if it is about one.
    pub fn service(&self) -> Option<&ServiceName> {
        match self {
            Step::Fetch { service, .. }
            | Step::Release { service, .. }
            | Step::Build { service, .. }
            | Step::Start { service, .. }
            | Step::Hold { service }
            | Step::PreSwap { service }
            | Step::SwapPlugin { service, .. }
            | Step::Drain { service }
            | Step::StopOld { service }
            | Step::Remove { service }
            | Step::PostSwap { service } => Some(service),
            Step::Cutover { .. } | Step::Record { .. } => None,
        }
    }

    /// What undoes it.
    pub fn undo(&self) -> Undo {
        match self {
            Step::Fetch { .. } | Step::PreSwap { .. } | Step::Record { .. } => Undo::Nothing,
            Step::Release { reuse: true, .. } => Undo::Nothing,
            Step::Release { reuse: false, .. } => Undo::DropRelease,
            Step::Build { .. } => Undo::Nothing,
            Step::Start { .. } => Undo::StopNew,
            Step::Hold { .. } => Undo::RestartOld,
            Step::SwapPlugin { .. } => Undo::SwapBack,
            Step::Cutover { .. } => Undo::RouteBack,
            Step::Drain { .. } | Step::StopOld { .. } | Step::Remove { .. } => Undo::Kept,
            Step::PostSwap { .. } => Undo::Kept,
        }
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::Fetch {
                service,
                commit,
                blobs,
                bytes,
            } => write!(
                f,
                "fetch {service} {}: {blobs} blob{} ({})",
                commit.short(12),
                if *blobs == 1 { "" } else { "s" },
                ByteCount(*bytes)
            ),
            Step::Release {
                service,
                commit,
                reuse,
            } => {
                if *reuse {
                    write!(
                        f,
                        "release {service} {}: reuse it from disk",
                        commit.short(12)
                    )
                } else {
                    write!(
                        f,
                        "release {service} {}: link from the cache, copy the build's outputs",
                        commit.short(12)
                    )
                }
            }
            Step::Build { service, commit } => write!(f, "build {service} {}", commit.short(12)),
            Step::Start {
                service,
                commit,
                copy_data,
            } => write!(
                f,
                "start {service} {} beside the running one{}",
                commit.short(12),
                if *copy_data {
                    ", on a copy of its data"
                } else {
                    ""
                }
            ),
            Step::Hold { service } => {
                write!(f, "hold {service}: stop the old process, ports wait")
            }
            Step::PreSwap { service } => write!(f, "pre_swap hook of {service}"),
            Step::SwapPlugin { service, commit } => {
                write!(
                    f,
                    "swap plugin {service} to {}, state kept",
                    commit.short(12)
                )
            }
            Step::Cutover { services } => {
                let names: Vec<&str> = services.iter().map(ServiceName::as_str).collect();
                write!(f, "cutover: {}", names.join(", "))
            }
            Step::Record { generation } => write!(f, "record generation {generation}"),
            Step::Drain { service } => write!(f, "drain the old {service}"),
            Step::StopOld { service } => write!(f, "stop the old {service}"),
            Step::Remove { service } => write!(f, "remove {service}: the image does not have it"),
            Step::PostSwap { service } => write!(f, "post_swap hook of {service}"),
        }
    }
}

/// A byte count for people: `512 B`, `12.3 KiB`, `4.0 MiB`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteCount(pub u64);

impl fmt::Display for ByteCount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
        if self.0 < 1024 {
            return write!(f, "{} B", self.0);
        }
        let mut value = self.0 as f64 / 1024.0;
        let mut unit = 0;
        while value >= 1024.0 && unit + 1 < UNITS.len() {
            value /= 1024.0;
            unit += 1;
        }
        write!(f, "{value:.1} {}", UNITS[unit])
    }
}

/// What an upgrade does to one service; in JSON in kebab-case (`replace`,
/// `hold-and-replace`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    /// Same commit, left running.
    Unchanged,
    /// Same commit, started afresh (`shadow-full`).
    Restart,
    /// Not running now: installed and started.
    Add,
    /// A new commit, started beside the old process.
    Replace,
    /// A new commit; the old process stops first (`overlap = false`).
    HoldAndReplace,
    /// A new commit of a plugin, swapped inside its host.
    Swap,
    /// Not in the image: stopped.
    Remove,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Action::Unchanged => "unchanged",
            Action::Restart => "restart",
            Action::Add => "add",
            Action::Replace => "replace",
            Action::HoldAndReplace => "hold and replace",
            Action::Swap => "swap",
            Action::Remove => "remove",
        })
    }
}

/// One service in a plan: from which commit to which, and how.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServicePlan {
    /// The service.
    pub service: ServiceName,
    /// The commit running now, if any.
    pub from: Option<CommitId>,
    /// The commit it will run, if any.
    pub to: Option<CommitId>,
    /// What happens to it.
    pub action: Action,
}

/// Everything an upgrade will do, in order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpgradePlan {
    /// The strategy.
    pub strategy: Strategy,
    /// The generation it records, if it changes anything.
    pub generation: Option<u64>,
    /// Every service of the instance or the image, by name.
    pub services: Vec<ServicePlan>,
    /// The steps, in the order they run.
    pub steps: Vec<Step>,
}

impl UpgradePlan {
    /// Does the plan change nothing?
    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    /// The index of the record step (the commit point), if any.
    pub fn commit_point(&self) -> Option<usize> {
        self.steps.iter().position(|s| s.kind() == StepKind::Record)
    }

    /// Services with this action.
    pub fn with_action(&self, action: Action) -> impl Iterator<Item = &ServiceName> {
        self.services
            .iter()
            .filter(move |s| s.action == action)
            .map(|s| &s.service)
    }

    /// Bytes the plan fetches.
    pub fn fetch_bytes(&self) -> u64 {
        self.steps
            .iter()
            .map(|s| match s {
                Step::Fetch { bytes, .. } => *bytes,
                _ => 0,
            })
            .sum()
    }
}

/// How a step went, as it happens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StepOutcome {
    /// It started.
    Started,
    /// It finished, in `millis` ms, having moved `bytes` (a fetch).
    Done {
        /// How long it took.
        millis: u64,
        /// Bytes moved, for a fetch.
        bytes: Option<u64>,
    },
    /// It failed after `millis` ms.
    Failed {
        /// How long it ran.
        millis: u64,
        /// Why.
        error: String,
    },
    /// It was undone (after a later failure), in `millis` ms.
    Undone {
        /// How long the undo took.
        millis: u64,
    },
}

/// One step's event, as the executor reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepEvent {
    /// The step's index in its plan.
    pub index: u32,
    /// How many steps the plan has.
    pub of: u32,
    /// The step.
    pub step: Step,
    /// What happened.
    pub outcome: StepOutcome,
}

impl fmt::Display for StepEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{}/{}] {}", self.index + 1, self.of, self.step)?;
        match &self.outcome {
            StepOutcome::Started => Ok(()),
            StepOutcome::Done { millis, bytes } => {
                write!(f, " … done in {}", Millis(*millis))?;
                if let Some(b) = bytes {
                    write!(f, ", {} fetched", ByteCount(*b))?;
                }
                Ok(())
            }
            StepOutcome::Failed { millis, error } => {
                write!(f, " … FAILED after {}: {error}", Millis(*millis))
            }
            StepOutcome::Undone { millis } => write!(f, " … undone in {}", Millis(*millis)),
        }
    }
}

/// A duration in milliseconds for people: `12 ms`, `1.4 s`.
struct Millis(u64);

impl fmt::Display for Millis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 < 1000 {
            write!(f, "{} ms", self.0)
        } else {
            write!(f, "{:.1} s", self.0 as f64 / 1000.0)
        }
    }
}

/// One step's time, as kept in an upgrade's summary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepTime {
    /// The step.
    pub step: Step,
    /// How long it took.
    pub millis: u64,
    /// Bytes moved, for a fetch.
    pub bytes: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_kinds_parse_back_from_their_names() {
        for kind in StepKind::ALL {
            assert_eq!(kind.as_str().parse::<StepKind>(), Ok(kind));
        }
        let err = "explode".parse::<StepKind>().unwrap_err();
        assert!(err.contains("explode") && err.contains("stop-old"), "{err}");
    }

    #[test]
    fn only_steps_before_the_record_are_undone() {
        let s = ServiceName::new("a").unwrap();
        let c = CommitId::from_bytes([1; 32]);
        assert_eq!(
            Step::Start {
                service: s.clone(),
                commit: c,
                copy_data: false
            }
            .undo(),
            Undo::StopNew
        );
        assert_eq!(Step::Drain { service: s.clone() }.undo(), Undo::Kept);
        assert_eq!(
            Step::Release {
                service: s,
                commit: c,
                reuse: true
            }
            .undo(),
            Undo::Nothing
        );
    }

    /// One step of every kind.
    fn every_step() -> Vec<Step> {
        let service = ServiceName::new("orders").unwrap();
        let commit = CommitId::from_bytes([7; 32]);
        vec![
            Step::Fetch {
                service: service.clone(),
                commit,
                blobs: 3,
                bytes: 4096,
            },
            Step::Release {
                service: service.clone(),
                commit,
                reuse: false,
            },
            Step::Build {
                service: service.clone(),
                commit,
            },
            Step::Start {
                service: service.clone(),
                commit,
                copy_data: true,
            },
            Step::Hold {
                service: service.clone(),
            },
            Step::PreSwap {
                service: service.clone(),
            },
            Step::SwapPlugin {
                service: service.clone(),
                commit,
            },
            Step::Cutover {
                services: vec![service.clone()],
            },
            Step::Record { generation: 4 },
            Step::Drain {
                service: service.clone(),
            },
            Step::StopOld {
                service: service.clone(),
            },
            Step::Remove {
                service: service.clone(),
            },
            Step::PostSwap { service },
        ]
    }

    /// Steps stay externally tagged, keyed by the kind's CLI name, and come back
    /// unchanged through JSON and through the wire's bincode frames.
    #[test]
    fn steps_round_trip_through_json_and_bincode_keyed_by_their_cli_name() {
        use crate::codec::{DEFAULT_FRAME_LIMIT, decode_payload, encode_frame};
        let steps = every_step();
        let kinds: Vec<StepKind> = steps.iter().map(Step::kind).collect();
        assert_eq!(kinds, StepKind::ALL, "one step of every kind, in order");
        for step in steps {
            let json = serde_json::to_value(&step).unwrap();
            let object = json.as_object().unwrap();
            let keys: Vec<&String> = object.keys().collect();
            assert_eq!(keys, [step.kind().as_str()], "{json}");
            assert_eq!(serde_json::from_value::<Step>(json).unwrap(), step);
            assert_eq!(
                serde_json::to_value(step.kind()).unwrap(),
                step.kind().as_str()
            );

            let frame = encode_frame(&step, DEFAULT_FRAME_LIMIT).unwrap();
            assert_eq!(decode_payload::<Step>(&frame[4..]).unwrap(), step);
        }
        // bincode names a variant by its index, not its name: the rename left
        // the wire format as it was (`StopOld` is variant 10).
        let stop = Step::StopOld {
            service: ServiceName::new("a").unwrap(),
        };
        let frame = encode_frame(&stop, DEFAULT_FRAME_LIMIT).unwrap();
        assert_eq!(&frame[4..], [10, 1, b'a']);
    }

    #[test]
    fn plans_and_events_read_in_the_clis_spelling() {
        let plan = UpgradePlan {
            strategy: Strategy::ShadowFull,
            generation: Some(2),
            services: vec![ServicePlan {
                service: ServiceName::new("a").unwrap(),
                from: None,
                to: Some(CommitId::from_bytes([1; 32])),
                action: Action::HoldAndReplace,
            }],
            steps: vec![Step::PreSwap {
                service: ServiceName::new("a").unwrap(),
            }],
        };
        let json = serde_json::to_value(&plan).unwrap();
        assert_eq!(json["strategy"], "shadow-full");
        assert_eq!(json["services"][0]["action"], "hold-and-replace");
        assert_eq!(json["steps"][0]["pre-swap"]["service"], "a");
        assert_eq!(serde_json::from_value::<UpgradePlan>(json).unwrap(), plan);
        for action in [
            Action::Unchanged,
            Action::Add,
            Action::Replace,
            Action::Swap,
        ] {
            assert_eq!(serde_json::to_value(action).unwrap(), action.to_string());
        }
        let done = StepOutcome::Done {
            millis: 5,
            bytes: None,
        };
        assert_eq!(
            serde_json::to_value(&done).unwrap(),
            serde_json::json!({ "done": { "millis": 5, "bytes": null } })
        );
        assert_eq!(serde_json::to_value(Undo::RouteBack).unwrap(), "route-back");
    }

    #[test]
    fn byte_counts_read_well() {
        assert_eq!(ByteCount(0).to_string(), "0 B");
        assert_eq!(ByteCount(1023).to_string(), "1023 B");
        assert_eq!(ByteCount(1536).to_string(), "1.5 KiB");
        assert_eq!(ByteCount(5 << 20).to_string(), "5.0 MiB");
    }
}
