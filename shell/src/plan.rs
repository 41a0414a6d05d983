//! The upgrade planner: a pure function from what the instance runs and what it
//! must run to the exact, ordered steps of the upgrade.
//!
//! [`plan`] takes a [`Survey`] — the running services and the target's, each
//! with the facts of its `service.toml` that decide how it is brought in, the
//! bytes each one needs fetched, the strategy and the generation number the
//! upgrade would record — and returns an [`UpgradePlan`]. It does no I/O and
//! reads no clock: the same survey always gives the same plan, so `molt deploy
//! --plan` shows exactly what the upgrade will do, and the executor
//! ([`crate::executor`]) carries out exactly those steps.
//!
//! The shape of a plan:
//! 1. for every changed service: fetch (unless its sealed release is on disk),
//!    make the release, build it (if it has a build command) — nothing runs yet;
//! 2. by strategy — *in place*: service by service, start the new process
//!    beside the old one (or hold the ports and stop the old one first when it
//!    may not overlap), its `pre_swap` hook, and its own cutover; a plugin is
//!    swapped inside its host. *Shadow*: every new process starts beside the
//!    running generation, every `pre_swap` hook runs, then one cutover moves them
//!    all; plugins swap right after it; services that may not overlap are held,
//!    stopped and started last;
//! 3. the record — the commit point;
//! 4. the old processes drain and stop, removed services stop, `post_swap` hooks.

use std::collections::{BTreeMap, BTreeSet};

use image_spec::manifest::ServiceKind;
use image_spec::{CommitId, ServiceManifest, ServiceName};
use wire::plan::{Action, ServicePlan, Step, UpgradePlan};
use wire::shell::Strategy;

/// The facts of a service's `service.toml` that decide how it is upgraded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Facts {
    /// A plugin (served inside the shell) rather than a process.
    pub plugin: bool,
    /// May run twice at once (`overlap`).
    pub overlap: bool,
    /// Has a build command.
    pub build: bool,
    /// Declares data directories.
    pub data: bool,
    /// Has a `pre_swap` hook.
    pub pre_swap: bool,
    /// Has a `post_swap` hook.
    pub post_swap: bool,
    /// Its public ports: (port name, public port number).
    pub public_ports: Vec<(String, u16)>,
}

impl Facts {
    /// The facts of `manifest`, with its public ports moved by `offset`.
    pub fn of(manifest: &ServiceManifest, offset: PortOffset) -> Result<Self, PlanError> {
        let public_ports = manifest
            .ports()
            .iter()
            .map(|p| Ok((p.name.clone(), offset.apply(p.port)?)))
            .collect::<Result<_, PlanError>>()?;
        Ok(Self {
            plugin: matches!(manifest.kind(), ServiceKind::Plugin { .. }),
            overlap: manifest.overlap(),
            build: manifest.build().is_some(),
            data: !manifest.data().is_empty(),
            pre_swap: manifest.hooks().pre_swap.is_some(),
            post_swap: manifest.hooks().post_swap.is_some(),
            public_ports,
        })
    }
}

/// How public ports are numbered on an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortOffset {
    /// The manifest's port plus this offset.
    Add(u16),
    /// Any free port: never in conflict.
    Ephemeral,
}

impl PortOffset {
    /// The public port for the manifest's `port`.
    pub fn apply(self, port: u16) -> Result<u16, PlanError> {
        match self {
            PortOffset::Add(off) => port
                .checked_add(off)
                .ok_or(PlanError::PortOverflow { port, offset: off }),
            // Each front binds port 0; 0 never conflicts (see `conflicts`).
            PortOffset::Ephemeral => Ok(0),
        }
    }
}

/// A service running now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Running {
    /// Its commit.
    pub commit: CommitId,
    /// Its manifest's facts.
    pub facts: Facts,
}

/// A service of the target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Incoming {
    /// The commit it must run.
    pub commit: CommitId,
    /// The facts of that commit's manifest.
    pub facts: Facts,
    /// What must be fetched for it: `None` when a sealed release of the commit
    /// is on disk (or it runs already); else (blobs, bytes) the cache lacks.
    pub fetch: Option<(u64, u64)>,
}

/// Everything the planner decides from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Survey {
    /// The strategy.
    pub strategy: Strategy,
    /// The number the new generation would be recorded as.
    pub generation: u64,
    /// The services running now.
    pub running: BTreeMap<ServiceName, Running>,
    /// The services the instance must run.
    pub target: BTreeMap<ServiceName, Incoming>,
}

impl Survey {
    /// Leaves the incoming services' `pre_swap` and `post_swap` hooks out of
    /// the plan (an upgrade asked to skip them).
    pub fn skip_hooks(&mut self) {
        for incoming in self.target.values_mut() {
            incoming.facts.pre_swap = false;
            incoming.facts.post_swap = false;
        }
    }
}

/// Why no plan can be made; nothing was changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// Two services of the target want the same public port.
    #[error("services `{a}` and `{b}` both want public port {port}")]
    PortConflict {
        /// The port.
        port: u16,
        /// One service.
        a: ServiceName,
        /// The other.
        b: ServiceName,
    },
    /// A service's port plus the instance's offset is past 65535.
    #[error("port {port} plus the instance's port offset {offset} is past 65535")]
    PortOverflow {
        /// The manifest's port.
        port: u16,
        /// The offset.
        offset: u16,
    },
}

/// How one service is brought in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum How {
    /// A new process beside the old one (or the first one).
    Beside,
    /// The old process stops first; its ports hold meanwhile.
    Held,
    /// Swapped inside its plugin host.
    Swap,
}

/// The plan for `survey` (see the module docs).
pub fn plan(survey: &Survey) -> Result<UpgradePlan, PlanError> {
    conflicts(&survey.target)?;
    let full = survey.strategy == Strategy::ShadowFull;
    let mut services = Vec::new();
    // The services that change, with how; in name order.
    let mut changing: Vec<(&ServiceName, &Incoming, How)> = Vec::new();
    for (name, incoming) in &survey.target {
        let running = survey.running.get(name);
        let same = running.is_some_and(|r| r.commit == incoming.commit);
        let how = match running {
            Some(r) if r.facts.plugin && incoming.facts.plugin => How::Swap,
            Some(r) if !r.facts.overlap => How::Held,
            _ => How::Beside,
        };
        let action = match (running, same, how) {
            (None, _, _) => Action::Add,
            // shadow-full restarts what is unchanged too (a plugin keeps its host).
            (Some(_), true, How::Swap) => Action::Unchanged,
            (Some(_), true, _) if full => Action::Restart,
            (Some(_), true, _) => Action::Unchanged,
            (Some(_), false, How::Swap) => Action::Swap,
            (Some(_), false, How::Held) => Action::HoldAndReplace,
            (Some(_), false, How::Beside) => Action::Replace,
        };
        if action != Action::Unchanged {
            changing.push((name, incoming, how));
        }
        services.push(ServicePlan {
            service: name.clone(),
            from: running.map(|r| r.commit),
            to: Some(incoming.commit),
            action,
        });
    }
    let removed: Vec<&ServiceName> = survey
        .running
        .keys()
        .filter(|n| !survey.target.contains_key(*n))
        .collect();
    for name in &removed {
        services.push(ServicePlan {
            service: (*name).clone(),
            from: survey.running.get(*name).map(|r| r.commit),
            to: None,
            action: Action::Remove,
        });
    }
    services.sort_by(|a, b| a.service.cmp(&b.service));
    if changing.is_empty() && removed.is_empty() {
        return Ok(UpgradePlan {
            strategy: survey.strategy,
            generation: None,
            services,
            steps: Vec::new(),
        });
    }

    let mut steps = Vec::new();
    // 1. Fetch, release, build: nothing runs yet.
    for (name, incoming, _) in &changing {
        let new_commit = survey
            .running
            .get(*name)
            .is_none_or(|r| r.commit != incoming.commit);
        if !new_commit {
            continue;
        }
        let service = (*name).clone();
        let commit = incoming.commit;
        if let Some((blobs, bytes)) = incoming.fetch {
            steps.push(Step::Fetch {
                service: service.clone(),
                commit,
                blobs,
                bytes,
            });
        }
        let reuse = incoming.fetch.is_none();
        steps.push(Step::Release {
            service: service.clone(),
            commit,
            reuse,
        });
        if !reuse && incoming.facts.build {
            steps.push(Step::Build { service, commit });
        }
    }

    // 2. Bring the new processes in.
    let start = |name: &ServiceName, incoming: &Incoming| Step::Start {
        service: name.clone(),
        commit: incoming.commit,
        copy_data: full && incoming.facts.data,
    };
    let pre_swap = |steps: &mut Vec<Step>, name: &ServiceName, incoming: &Incoming| {
        if incoming.facts.pre_swap {
            steps.push(Step::PreSwap {
                service: name.clone(),
            });
        }
    };
    // Old processes that keep running until the record, then drain and stop.
    let mut replaced: Vec<ServiceName> = Vec::new();
    match survey.strategy {
        Strategy::InPlace => {
            for (name, incoming, how) in &changing {
                let name = *name;
                match how {
                    How::Swap => {
                        pre_swap(&mut steps, name, incoming);
                        steps.push(Step::SwapPlugin {
                            service: name.clone(),
                            commit: incoming.commit,
                        });
                    }
                    How::Held => {
                        steps.push(Step::Hold {
                            service: name.clone(),
                        });
                        steps.push(start(name, incoming));
                        pre_swap(&mut steps, name, incoming);
                        steps.push(Step::Cutover {
                            services: vec![name.clone()],
                        });
                    }
                    How::Beside => {
                        steps.push(start(name, incoming));
                        pre_swap(&mut steps, name, incoming);
                        steps.push(Step::Cutover {
                            services: vec![name.clone()],
                        });
                        if survey.running.contains_key(name) {
                            replaced.push(name.clone());
                        }
                    }
                }
            }
        }
        Strategy::Shadow | Strategy::ShadowFull => {
            let beside: Vec<_> = changing
                .iter()
                .filter(|(_, _, how)| *how == How::Beside)
                .collect();
            for (name, incoming, _) in &beside {
                steps.push(start(name, incoming));
            }
            for (name, incoming, _) in &beside {
                pre_swap(&mut steps, name, incoming);
            }
            for (name, incoming, how) in &changing {
                if *how == How::Swap {
                    pre_swap(&mut steps, name, incoming);
                }
            }
            if !beside.is_empty() {
                steps.push(Step::Cutover {
                    services: beside.iter().map(|(n, _, _)| (*n).clone()).collect(),
                });
            }
            replaced.extend(
                beside
                    .iter()
                    .filter(|(n, _, _)| survey.running.contains_key(*n))
                    .map(|(n, _, _)| (*n).clone()),
            );
            for (name, incoming, how) in &changing {
                if *how == How::Swap {
                    steps.push(Step::SwapPlugin {
                        service: (*name).clone(),
                        commit: incoming.commit,
                    });
                }
            }
            for (name, incoming, how) in &changing {
                if *how == How::Held {
                    steps.push(Step::Hold {
                        service: (*name).clone(),
                    });
                    steps.push(start(name, incoming));
                    pre_swap(&mut steps, name, incoming);
                    steps.push(Step::Cutover {
                        services: vec![(*name).clone()],
                    });
                }
            }
        }
    }

    // 3. The commit point.
    steps.push(Step::Record {
        generation: survey.generation,
    });

    // 4. The old generation goes; hooks that follow a swap.
    for name in &replaced {
        steps.push(Step::Drain {
            service: name.clone(),
        });
        steps.push(Step::StopOld {
            service: name.clone(),
        });
    }
    for name in removed {
        steps.push(Step::Remove {
            service: name.clone(),
        });
    }
    for (name, incoming, _) in &changing {
        if incoming.facts.post_swap {
            steps.push(Step::PostSwap {
                service: (*name).clone(),
            });
        }
    }
    Ok(UpgradePlan {
        strategy: survey.strategy,
        generation: Some(survey.generation),
        services,
        steps,
    })
}

/// Refuses a target in which two services want the same public port.
fn conflicts(target: &BTreeMap<ServiceName, Incoming>) -> Result<(), PlanError> {
    let mut seen: BTreeMap<u16, &ServiceName> = BTreeMap::new();
    for (name, incoming) in target {
        let ports: BTreeSet<u16> = incoming
            .facts
            .public_ports
            .iter()
            .map(|(_, p)| *p)
            .filter(|p| *p != 0)
            .collect();
        for port in ports {
            if let Some(other) = seen.insert(port, name) {
                return Err(PlanError::PortConflict {
                    port,
                    a: other.clone(),
                    b: name.clone(),
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use wire::plan::StepKind;

    fn svc(n: &str) -> ServiceName {
        ServiceName::new(n).unwrap()
    }
    fn c(n: u8) -> CommitId {
        CommitId::from_bytes([n; 32])
    }
    fn facts(port: u16) -> Facts {
        Facts {
            plugin: false,
            overlap: true,
            build: false,
            data: false,
            pre_swap: false,
            post_swap: false,
            public_ports: vec![("http".into(), port)],
        }
    }
    fn running(commit: u8, facts: Facts) -> Running {
        Running {
            commit: c(commit),
            facts,
        }
    }
    fn incoming(commit: u8, facts: Facts) -> Incoming {
        Incoming {
            commit: c(commit),
            facts,
            fetch: Some((2, 300)),
        }
    }
    /// The steps as short strings: `kind` or `kind:service`.
    fn shape(plan: &UpgradePlan) -> Vec<String> {
        plan.steps
            .iter()
            .map(|s| match (s, s.service()) {
                (Step::Cutover { services }, _) => format!(
                    "cutover:{}",
                    services
                        .iter()
                        .map(ServiceName::as_str)
                        .collect::<Vec<_>>()
                        .join("+")
                ),
                (_, Some(service)) => format!("{}:{service}", s.kind()),
                (_, None) => s.kind().to_string(),
            })
            .collect()
    }

    /// a (unchanged), b (changed, built), c (new), gone (removed).
    fn survey(strategy: Strategy) -> Survey {
        let built = Facts {
            build: true,
            ..facts(81)
        };
        Survey {
            strategy,
            generation: 7,
            running: BTreeMap::from([
                (svc("a"), running(1, facts(80))),
                (svc("b"), running(2, built.clone())),
                (svc("gone"), running(3, facts(83))),
            ]),
            target: BTreeMap::from([
                (
                    svc("a"),
                    Incoming {
                        fetch: None,
                        ..incoming(1, facts(80))
                    },
                ),
                (svc("b"), incoming(9, built)),
                (svc("c"), incoming(4, facts(82))),
            ]),
        }
    }

    #[test]
    fn in_place_goes_service_by_service_and_records_before_the_old_ones_stop() {
        let p = plan(&survey(Strategy::InPlace)).unwrap();
        assert_eq!(
            shape(&p),
            [
                "fetch:b",
                "release:b",
                "build:b",
                "fetch:c",
                "release:c",
                "start:b",
                "cutover:b",
                "start:c",
                "cutover:c",
                "record",
                "drain:b",
                "stop-old:b",
                "remove:gone",
            ]
        );
        assert_eq!(p.generation, Some(7));
        assert_eq!(p.fetch_bytes(), 600);
        let actions: Vec<(String, Action)> = p
            .services
            .iter()
            .map(|s| (s.service.to_string(), s.action))
            .collect();
        assert_eq!(
            actions,
            [
                ("a".into(), Action::Unchanged),
                ("b".into(), Action::Replace),
                ("c".into(), Action::Add),
                ("gone".into(), Action::Remove),
            ]
        );
        let b = &p.services[1];
        assert_eq!((b.from, b.to), (Some(c(2)), Some(c(9))));
    }

    #[test]
    fn shadow_starts_everything_before_one_cutover() {
        let p = plan(&survey(Strategy::Shadow)).unwrap();
        assert_eq!(
            shape(&p),
            [
                "fetch:b",
                "release:b",
                "build:b",
                "fetch:c",
                "release:c",
                "start:b",
                "start:c",
                "cutover:b+c",
                "record",
                "drain:b",
                "stop-old:b",
                "remove:gone",
            ]
        );
    }

    #[test]
    fn shadow_full_restarts_the_unchanged_too_on_copies_of_their_data() {
        let mut s = survey(Strategy::ShadowFull);
        for facts in [
            &mut s.running.get_mut(&svc("a")).unwrap().facts,
            &mut s.target.get_mut(&svc("a")).unwrap().facts,
        ] {
            facts.data = true;
        }
        let p = plan(&s).unwrap();
        assert_eq!(
            shape(&p),
            [
                "fetch:b",
                "release:b",
                "build:b",
                "fetch:c",
                "release:c",
                "start:a",
                "start:b",
                "start:c",
                "cutover:a+b+c",
                "record",
                "drain:a",
                "stop-old:a",
                "drain:b",
                "stop-old:b",
                "remove:gone",
            ]
        );
        assert_eq!(p.services[0].action, Action::Restart);
        assert!(p.steps.contains(&Step::Start {
            service: svc("a"),
            commit: c(1),
            copy_data: true
        }));
        // The plan for shadow-full with nothing changed still restarts everything;
        // the other strategies do nothing.
        s.target.remove(&svc("c"));
        s.target.get_mut(&svc("b")).unwrap().commit = c(2);
        s.running.remove(&svc("gone"));
        assert!(!plan(&s).unwrap().is_empty());
        s.strategy = Strategy::Shadow;
        let nothing = plan(&s).unwrap();
        assert!(nothing.is_empty());
        assert_eq!(nothing.generation, None);
    }

    #[test]
    fn held_services_stop_first_and_go_last_in_a_shadow() {
        let mut s = survey(Strategy::InPlace);
        s.running.get_mut(&svc("b")).unwrap().facts.overlap = false;
        s.target.get_mut(&svc("c")).unwrap().facts.pre_swap = true;
        s.target.get_mut(&svc("b")).unwrap().facts.post_swap = true;
        let p = plan(&s).unwrap();
        assert_eq!(
            shape(&p)[5..],
            [
                "hold:b",
                "start:b",
                "cutover:b",
                "start:c",
                "pre-swap:c",
                "cutover:c",
                "record",
                "remove:gone",
                "post-swap:b",
            ]
        );
        assert_eq!(p.services[1].action, Action::HoldAndReplace);
        s.strategy = Strategy::Shadow;
        let p = plan(&s).unwrap();
        assert_eq!(
            shape(&p)[5..],
            [
                "start:c",
                "pre-swap:c",
                "cutover:c",
                "hold:b",
                "start:b",
                "cutover:b",
                "record",
                "remove:gone",
                "post-swap:b",
            ]
        );
    }

    #[test]
    fn plugins_swap_in_their_host() {
        let plugin = Facts {
            plugin: true,
            build: true,
            pre_swap: true,
            ..facts(90)
        };
        let mut s = Survey {
            strategy: Strategy::Shadow,
            generation: 2,
            running: BTreeMap::from([
                (svc("p"), running(1, plugin.clone())),
                (svc("q"), running(1, facts(91))),
            ]),
            target: BTreeMap::from([
                (svc("p"), incoming(2, plugin)),
                (svc("q"), incoming(2, facts(91))),
            ]),
        };
        let p = plan(&s).unwrap();
        assert_eq!(
            shape(&p),
            [
                "fetch:p",
                "release:p",
                "build:p",
                "fetch:q",
                "release:q",
                "start:q",
                "pre-swap:p",
                "cutover:q",
                "swap-plugin:p",
                "record",
                "drain:q",
                "stop-old:q",
            ]
        );
        assert_eq!(p.services[0].action, Action::Swap);
        s.strategy = Strategy::InPlace;
        assert_eq!(
            shape(&plan(&s).unwrap())[5..7],
            ["pre-swap:p", "swap-plugin:p"]
        );
        // Asked to skip the hooks: the same plan without them.
        let mut with_post = s.clone();
        with_post
            .target
            .values_mut()
            .for_each(|i| i.facts.post_swap = true);
        let hooked = shape(&plan(&with_post).unwrap());
        assert!(
            hooked.iter().any(|s| s.starts_with("post-swap")),
            "{hooked:?}"
        );
        with_post.skip_hooks();
        let skipped = shape(&plan(&with_post).unwrap());
        let expected: Vec<_> = hooked
            .iter()
            .filter(|s| !s.starts_with("pre-swap") && !s.starts_with("post-swap"))
            .cloned()
            .collect();
        assert_eq!(skipped, expected);
    }

    #[test]
    fn a_rollback_reuses_releases_and_shows_the_downgrade() {
        let mut s = survey(Strategy::InPlace);
        s.target.remove(&svc("c"));
        s.running.remove(&svc("gone"));
        let b = s.target.get_mut(&svc("b")).unwrap();
        b.commit = c(1);
        b.fetch = None;
        let p = plan(&s).unwrap();
        assert_eq!(
            shape(&p),
            [
                "release:b",
                "start:b",
                "cutover:b",
                "record",
                "drain:b",
                "stop-old:b"
            ]
        );
        assert!(p.steps.contains(&Step::Release {
            service: svc("b"),
            commit: c(1),
            reuse: true
        }));
        assert_eq!(
            (p.services[1].from, p.services[1].to),
            (Some(c(2)), Some(c(1)))
        );
        assert!(p.steps.iter().all(|s| s.kind() != StepKind::Build));
    }

    #[test]
    fn two_services_on_one_public_port_are_refused_by_name() {
        let mut s = survey(Strategy::InPlace);
        s.target.get_mut(&svc("c")).unwrap().facts.public_ports = vec![("web".into(), 81)];
        assert_eq!(
            plan(&s),
            Err(PlanError::PortConflict {
                port: 81,
                a: svc("b"),
                b: svc("c")
            })
        );
        // Ephemeral ports (0) never conflict.
        for t in s.target.values_mut() {
            t.facts.public_ports = vec![("http".into(), 0)];
        }
        assert!(plan(&s).is_ok());
    }

    #[test]
    fn a_port_past_65535_is_refused() {
        assert_eq!(
            PortOffset::Add(3000).apply(65000),
            Err(PlanError::PortOverflow {
                port: 65000,
                offset: 3000
            })
        );
        assert_eq!(PortOffset::Add(1000).apply(8080), Ok(9080));
    }
}
