//! The executor: carries out an [`UpgradePlan`] step by step on a [`Runtime`],
//! with an undo journal.
//!
//! Each step is reported as it starts and as it ends (with its time and, for a
//! fetch, its bytes). Every step done before the record is journaled; when a step
//! before the record fails (or the record itself), the journal runs backwards —
//! each done step's undo, newest first — so the routes, the processes and the
//! recorded state are exactly as before the upgrade. The record is the commit
//! point: a step after it that fails (a drain, stopping an old process, a
//! `post_swap` hook) is reported as a warning and the upgrade stands.
//!
//! The executor also moves the new generation through its phases on the
//! [`Lifecycle`]: `starting` at the first step that starts or swaps anything,
//! `healthy` once every new process and `pre_swap` hook has passed, `serving`
//! at the record (the previous generation `draining`, then `stopped`), or
//! `failed` on a rollback.
//!
//! The [`Runtime`] does the work; the real one drives processes, fronts and the
//! state database ([`crate::instance`]), and the tests here drive a model of
//! them to check, for every plan and every step a failure can follow, that the
//! journal leaves the instance exactly as it was.

use std::future::Future;
use std::time::Instant;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use wire::plan::{Step, StepEvent, StepKind, StepOutcome, StepTime, UpgradePlan};
use wire::shell::Phase;

use crate::lifecycle::Lifecycle;

/// What a step that succeeded reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Done {
    /// Bytes moved (a fetch).
    pub bytes: Option<u64>,
}

/// What carries out the steps.
pub trait Runtime {
    /// The error a step fails with.
    type Error: std::fmt::Display + Send;

    /// Carries out `step`. A step that fails must have changed nothing that its
    /// undo would not put back.
    fn run(&mut self, step: &Step) -> impl Future<Output = Result<Done, Self::Error>> + Send;

    /// Undoes `step`, which was done (see [`Step::undo`]). Best effort: what
    /// cannot be put back is logged.
    fn undo(&mut self, step: &Step) -> impl Future<Output = ()> + Send;

    /// The error for a failure injected after a step of `kind` (see [`Fault`]).
    fn injected(&self, kind: StepKind) -> Self::Error;

    /// The error for an upgrade cancelled before the step at `index`.
    fn cancelled(&self, index: usize) -> Self::Error;
}

/// A failure injected on purpose, to test and drill rollbacks: the upgrade fails
/// right after the first step of this kind is done, as if the next one failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    /// After which kind of step.
    pub after: StepKind,
}

/// Why an upgrade failed, and what the executor did about it.
#[derive(Debug)]
pub struct Failed<E> {
    /// The step that failed (its index in the plan).
    pub index: usize,
    /// Why.
    pub error: E,
}

/// What a finished upgrade did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Executed {
    /// Every step done, with its time.
    pub steps: Vec<StepTime>,
    /// Failures after the commit point, reported and kept.
    pub warnings: Vec<String>,
}

/// Carries out `plan` on `runtime` (see the module docs), telling `observe`
/// every step's events; `lifecycle` gets the generation's phases. Once
/// `cancel` fires, no step before the record starts: the journal runs
/// backwards instead (a step running then finishes first); from the record on,
/// the upgrade completes.
pub async fn execute<R: Runtime>(
    runtime: &mut R,
    plan: &UpgradePlan,
    lifecycle: &Lifecycle,
    fault: Option<Fault>,
    cancel: &CancellationToken,
    observe: &(dyn Fn(&StepEvent) + Send + Sync),
) -> Result<Executed, Failed<R::Error>> {
    let of = plan.steps.len() as u32;
    let event = |index: usize, step: &Step, outcome: StepOutcome| {
        let e = StepEvent {
            index: index as u32,
            of,
            step: step.clone(),
            outcome,
        };
        info!(step = %e, "upgrade step");
        observe(&e);
    };
    let commit = plan.commit_point();
    let number = plan.generation;
    // After this step, every new process and hook of the generation has passed.
    let healthy_after = plan.steps.iter().rposition(|s| {
        matches!(
            s.kind(),
            StepKind::Start | StepKind::PreSwap | StepKind::SwapPlugin | StepKind::Hold
        )
    });
    let mut started = false;
    let mut fault = fault;
    let mut done = Executed::default();
    let mut journal: Vec<usize> = Vec::new();
    for (index, step) in plan.steps.iter().enumerate() {
        // A step up to and including the record fails the upgrade; after it,
        // a failure is kept as a warning.
        let before_commit = commit.is_none_or(|c| index <= c);
        if let Some(n) = number
            && !started
            && (matches!(
                step.kind(),
                StepKind::Start | StepKind::Hold | StepKind::SwapPlugin | StepKind::PreSwap
            ) || (step.kind() == StepKind::Record))
        {
            started = true;
            lifecycle.begin(n);
            if step.kind() == StepKind::Record {
                // Nothing to start (only removals): healthy at once.
                lifecycle.set(n, Phase::Healthy);
            }
        }
        let clock = Instant::now();
        let result = if before_commit && cancel.is_cancelled() {
            Err(runtime.cancelled(index))
        } else {
            event(index, step, StepOutcome::Started);
            runtime.run(step).await
        };
        let failure = match result {
            Ok(d) => {
                let ms = millis(clock);
                let outcome = StepOutcome::Done {
                    millis: ms,
                    bytes: d.bytes,
                };
                event(index, step, outcome);
                done.steps.push(StepTime {
                    step: step.clone(),
                    millis: ms,
                    bytes: d.bytes,
                });
                if before_commit {
                    journal.push(index);
                }
                if let Some(n) = number {
                    if Some(index) == healthy_after {
                        lifecycle.set(n, Phase::Healthy);
                    }
                    if step.kind() == StepKind::Record {
                        lifecycle.serving(n);
                    }
                }
                match fault {
                    Some(f) if f.after == step.kind() => {
                        fault = None;
                        // The step is done; the failure is the next thing that
                        // happens, so after the record it is kept.
                        let error = runtime.injected(step.kind());
                        Some((error, commit.is_none_or(|c| index < c), 0))
                    }
                    _ => None,
                }
            }
            Err(error) => Some((error, before_commit, millis(clock))),
        };
        let Some((error, fatal, ms)) = failure else {
            continue;
        };
        event(
            index,
            step,
            StepOutcome::Failed {
                millis: ms,
                error: error.to_string(),
            },
        );
        if !fatal {
            warn!(step = %step, error = %error, "a step after the record failed; kept");
            done.warnings.push(format!("{step}: {error}"));
            continue;
        }
        warn!(step = %step, error = %error, "upgrade step failed; undoing what was done");
        for &j in journal.iter().rev() {
            let undone = &plan.steps[j];
            let clock = Instant::now();
            runtime.undo(undone).await;
            event(
                j,
                undone,
                StepOutcome::Undone {
                    millis: millis(clock),
                },
            );
        }
        if let Some(n) = number {
            lifecycle.fail(n, &format!("{step}: {error}"));
        }
        return Err(Failed { index, error });
    }
    if let Some(n) = number {
        lifecycle.retire_previous(n);
    }
    Ok(done)
}

fn millis(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    //! The executor over a model of an instance: routes, processes, plugins and
    //! the recorded state as plain data.

    use std::collections::{BTreeMap, BTreeSet};

    use image_spec::{CommitId, ServiceName};
    use proptest::prelude::*;
    use wire::shell::Strategy;

    use super::*;
    use crate::plan::{Facts, Incoming, Running, Survey, plan};

    /// A process: its service, commit and a number unique to it.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
    struct Proc {
        commit: u8,
        id: u32,
    }

    /// What can be observed of an instance.
    #[derive(Debug, Clone, PartialEq, Eq)]
    struct Observed {
        /// Where each service's ports send traffic: the commit behind them.
        routes: BTreeMap<String, u8>,
        /// Running processes: (service, commit).
        processes: BTreeSet<(String, u8)>,
        /// Plugins: service → commit loaded.
        plugins: BTreeMap<String, u8>,
        /// The recorded state and generation.
        recorded: (BTreeMap<String, u8>, u64),
    }

    /// The model instance.
    #[derive(Debug, Clone)]
    struct Model {
        target: BTreeMap<String, u8>,
        next_id: u32,
        serving: BTreeMap<String, Proc>,
        plugins: BTreeMap<String, u8>,
        routes: BTreeMap<String, Option<u32>>,
        fresh: BTreeMap<String, Proc>,
        old: BTreeMap<String, Proc>,
        held: BTreeMap<String, Proc>,
        swapped: BTreeMap<String, u8>,
        staged: BTreeSet<String>,
        recorded: (BTreeMap<String, u8>, u64),
        /// Every step and undo, in order.
        log: Vec<String>,
        /// Fail this step index (counting runs), as a real step may.
        fail_run: Option<usize>,
        runs: usize,
    }

    #[derive(Debug)]
    struct ModelError(String);
    impl std::fmt::Display for ModelError {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(&self.0)
        }
    }

    fn key(s: &ServiceName) -> String {
        s.to_string()
    }

    impl Model {
        fn new(running: &Started) -> Self {
            let mut m = Model {
                target: BTreeMap::new(),
                next_id: 0,
                serving: BTreeMap::new(),
                plugins: BTreeMap::new(),
                routes: BTreeMap::new(),
                fresh: BTreeMap::new(),
                old: BTreeMap::new(),
                held: BTreeMap::new(),
                swapped: BTreeMap::new(),
                staged: BTreeSet::new(),
                recorded: (BTreeMap::new(), 0),
                log: Vec::new(),
                fail_run: None,
                runs: 0,
            };
            for (name, (commit, plugin)) in running {
                if *plugin {
                    m.plugins.insert(key(name), *commit);
                } else {
                    let p = m.spawn(*commit);
                    m.routes.insert(key(name), Some(p.id));
                    m.serving.insert(key(name), p);
                }
                m.recorded.0.insert(key(name), *commit);
            }
            m.recorded.1 = 1;
            m
        }

        fn spawn(&mut self, commit: u8) -> Proc {
            self.next_id += 1;
            Proc {
                commit,
                id: self.next_id,
            }
        }

        fn observe(&self) -> Observed {
            let all = self
                .serving
                .iter()
                .chain(&self.fresh)
                .chain(&self.old)
                .map(|(n, p)| (n.clone(), p.commit))
                .collect();
            let by_id: BTreeMap<u32, u8> = self
                .serving
                .values()
                .chain(self.fresh.values())
                .chain(self.old.values())
                .map(|p| (p.id, p.commit))
                .collect();
            Observed {
                routes: self
                    .routes
                    .iter()
                    .filter_map(|(n, id)| Some((n.clone(), *by_id.get(&(*id)?)?)))
                    .collect(),
                processes: all,
                plugins: self.plugins.clone(),
                recorded: self.recorded.clone(),
            }
        }
    }

    impl Runtime for Model {
        type Error = ModelError;

        async fn run(&mut self, step: &Step) -> Result<Done, ModelError> {
            self.runs += 1;
            if self.fail_run == Some(self.runs - 1) {
                return Err(ModelError(format!("{} failed", step.kind())));
            }
            self.log.push(format!("do {}", step.kind()));
            match step {
                Step::Fetch { bytes, .. } => {
                    return Ok(Done {
                        bytes: Some(*bytes),
                    });
                }
                Step::Release { service, reuse, .. } => {
                    if !reuse {
                        self.staged.insert(key(service));
                    }
                }
                Step::Build { service, .. } => {
                    self.staged.remove(&key(service));
                }
                Step::Start { service, .. } => {
                    let commit = self.target[&key(service)];
                    let p = self.spawn(commit);
                    self.fresh.insert(key(service), p);
                }
                Step::Hold { service } => {
                    self.routes.insert(key(service), None);
                    let old = self.serving.remove(&key(service)).expect("held runs");
                    self.held.insert(key(service), old);
                }
                Step::PreSwap { .. } | Step::PostSwap { .. } | Step::Drain { .. } => {}
                Step::SwapPlugin { service, .. } => {
                    let commit = self.target[&key(service)];
                    let before = self.plugins.insert(key(service), commit).expect("plugin");
                    self.swapped.insert(key(service), before);
                }
                Step::Cutover { services } => {
                    for s in services {
                        let new = self.fresh.remove(&key(s)).expect("started");
                        self.routes.insert(key(s), Some(new.id));
                        if let Some(old) = self.serving.insert(key(s), new) {
                            self.old.insert(key(s), old);
                        }
                    }
                }
                Step::Record { generation } => {
                    let mut state: BTreeMap<String, u8> = self
                        .serving
                        .iter()
                        .map(|(n, p)| (n.clone(), p.commit))
                        .collect();
                    state.extend(self.plugins.clone());
                    // Removed services are still running at the record.
                    state.retain(|n, _| self.target.contains_key(n));
                    self.recorded = (state, *generation);
                }
                Step::StopOld { service } => {
                    self.old.remove(&key(service));
                }
                Step::Remove { service } => {
                    self.serving.remove(&key(service));
                    self.plugins.remove(&key(service));
                    self.routes.remove(&key(service));
                }
            }
            Ok(Done::default())
        }

        async fn undo(&mut self, step: &Step) {
            self.log.push(format!("undo {}", step.kind()));
            match step {
                Step::Release { service, .. } => {
                    self.staged.remove(&key(service));
                }
                Step::Start { service, .. } => {
                    self.fresh.remove(&key(service));
                }
                Step::Hold { service } => {
                    let old = self.held.remove(&key(service)).expect("held");
                    // Started again: a new process of the old commit.
                    let p = self.spawn(old.commit);
                    self.routes.insert(key(service), Some(p.id));
                    self.serving.insert(key(service), p);
                }
                Step::SwapPlugin { service, .. } => {
                    let before = self.swapped.remove(&key(service)).expect("swapped");
                    self.plugins.insert(key(service), before);
                }
                Step::Cutover { services } => {
                    for s in services {
                        let new = self.serving.remove(&key(s)).expect("switched");
                        match self.old.remove(&key(s)) {
                            Some(old) => {
                                self.routes.insert(key(s), Some(old.id));
                                self.serving.insert(key(s), old);
                            }
                            None => {
                                self.routes.remove(&key(s));
                            }
                        }
                        self.fresh.insert(key(s), new);
                    }
                }
                _ => {}
            }
        }

        fn injected(&self, kind: StepKind) -> ModelError {
            ModelError(format!("injected after {kind}"))
        }

        fn cancelled(&self, index: usize) -> ModelError {
            ModelError(format!("cancelled before step {index}"))
        }
    }

    fn svc(n: &str) -> ServiceName {
        ServiceName::new(n).unwrap()
    }

    /// One service of a case: (running commit and whether a plugin, overlap,
    /// target commit or gone, pre_swap hook, post_swap hook).
    type Case = (Option<(u8, bool)>, bool, Option<u8>, bool, bool);

    /// The instance as the model starts it: commit and plugin-ness per service.
    type Started = BTreeMap<ServiceName, (u8, bool)>;

    /// An instance and a target, and a strategy's number.
    fn case() -> impl proptest::strategy::Strategy<Value = (Vec<Case>, u8)> {
        (
            prop::collection::vec(
                (
                    prop::option::of((1u8..4, any::<bool>())),
                    any::<bool>(),
                    prop::option::of(1u8..4),
                    any::<bool>(),
                    any::<bool>(),
                ),
                1..5,
            ),
            0u8..3,
        )
    }

    fn setup(services: &[Case], strategy: u8) -> (Survey, Started, BTreeMap<String, u8>) {
        let strategy =
            [Strategy::InPlace, Strategy::Shadow, Strategy::ShadowFull][strategy as usize % 3];
        let mut running = BTreeMap::new();
        let mut survey = Survey {
            strategy,
            generation: 2,
            running: BTreeMap::new(),
            target: BTreeMap::new(),
        };
        let mut target = BTreeMap::new();
        for (i, (now, overlap, to, pre, post)) in services.iter().enumerate() {
            let name = svc(&format!("s{i}"));
            let plugin = now.is_some_and(|(_, p)| p);
            let facts = Facts {
                plugin,
                overlap: *overlap,
                build: true,
                data: false,
                pre_swap: *pre,
                post_swap: *post,
                public_ports: vec![("http".into(), 1000 + i as u16)],
            };
            if let Some((commit, plugin)) = now {
                running.insert(name.clone(), (*commit, *plugin));
                survey.running.insert(
                    name.clone(),
                    Running {
                        commit: CommitId::from_bytes([*commit; 32]),
                        facts: facts.clone(),
                    },
                );
            }
            if let Some(to) = to {
                target.insert(name.to_string(), *to);
                survey.target.insert(
                    name,
                    Incoming {
                        commit: CommitId::from_bytes([*to; 32]),
                        facts,
                        fetch: Some((1, 10)),
                    },
                );
            }
        }
        (survey, running, target)
    }

    fn run_model(model: &mut Model, plan: &UpgradePlan, fault: Option<Fault>) -> bool {
        let lifecycle = Lifecycle::default();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(execute(
            model,
            plan,
            &lifecycle,
            fault,
            &CancellationToken::new(),
            &|_| {},
        ))
        .is_ok()
    }

    proptest! {
        /// A failure after any prefix of steps before the record leaves routes,
        /// processes, plugins and the record exactly as before; after the record,
        /// exactly as a successful upgrade leaves them.
        #[test]
        fn a_failure_after_any_prefix_leaves_the_old_or_the_new_instance(
            (services, strategy) in case()
        ) {
            let (survey, running, target) = setup(&services, strategy);
            let plan = plan(&survey).unwrap();
            let fresh = || {
                let mut m = Model::new(&running);
                m.target = target.clone();
                m
            };
            let before = fresh().observe();
            let mut ok = fresh();
            prop_assert!(run_model(&mut ok, &plan, None));
            let after = ok.observe();
            if !plan.is_empty() {
                prop_assert_eq!(after.recorded.1, 2);
                let want: BTreeMap<String, u8> = target.clone();
                prop_assert_eq!(&after.recorded.0, &want);
            }
            let commit = plan.commit_point().unwrap_or(usize::MAX);
            for k in 0..plan.steps.len() {
                // The step itself fails…
                let mut m = fresh();
                m.fail_run = Some(k);
                let succeeded = run_model(&mut m, &plan, None);
                let seen = m.observe();
                if k <= commit {
                    prop_assert!(!succeeded);
                    prop_assert_eq!(&seen, &before, "failing step {}: {:?}", k, m.log);
                    prop_assert!(m.staged.is_empty(), "an unsealed release stayed: {:?}", m.log);
                } else {
                    // Past the commit point: the target's services serve as
                    // after a success (a removal that failed leaves its process
                    // running, unrecorded, and is reported).
                    prop_assert!(succeeded);
                    let of_target = |o: &Observed| -> BTreeMap<String, u8> {
                        o.routes
                            .iter()
                            .filter(|(n, _)| target.contains_key(*n))
                            .map(|(n, c)| (n.clone(), *c))
                            .collect()
                    };
                    prop_assert_eq!(of_target(&seen), of_target(&after));
                    prop_assert_eq!(&seen.recorded, &after.recorded);
                }
                // …or the one after it does (a fault injected after step k).
                let kind = plan.steps[k].kind();
                let first = plan.steps.iter().position(|s| s.kind() == kind).unwrap();
                if first == k {
                    let mut m = fresh();
                    let succeeded = run_model(&mut m, &plan, Some(Fault { after: kind }));
                    let seen = m.observe();
                    if k < commit {
                        prop_assert!(!succeeded);
                        prop_assert_eq!(&seen, &before, "fault after {}: {:?}", kind, m.log);
                    } else {
                        prop_assert!(succeeded);
                        prop_assert_eq!(&seen.recorded, &after.recorded);
                    }
                }
            }
        }
    }

    #[test]
    fn the_journal_runs_backwards_and_phases_go_in_order() {
        let services = [
            (Some((1, false)), true, Some(2), true, false),
            (Some((1, false)), false, Some(2), false, false),
        ];
        let (survey, running, target) = setup(&services, 0);
        let plan = plan(&survey).unwrap();
        let mut m = Model::new(&running);
        m.target = target;
        let cutover = plan
            .steps
            .iter()
            .rposition(|s| s.kind() == StepKind::Cutover)
            .unwrap();
        m.fail_run = Some(cutover);
        let lifecycle = Lifecycle::default();
        let mut phases = lifecycle.subscribe();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let events = std::sync::Mutex::new(Vec::new());
        let err = rt
            .block_on(execute(
                &mut m,
                &plan,
                &lifecycle,
                None,
                &CancellationToken::new(),
                &|e| events.lock().unwrap().push(e.clone()),
            ))
            .unwrap_err();
        assert_eq!(err.index, cutover);
        let done: Vec<String> = m
            .log
            .iter()
            .filter(|l| l.starts_with("do"))
            .cloned()
            .collect();
        let undone: Vec<String> = m
            .log
            .iter()
            .filter(|l| l.starts_with("undo"))
            .map(|l| l.replace("undo", "do"))
            .collect();
        let mut reversed = done.clone();
        reversed.reverse();
        assert_eq!(undone, reversed, "{:?}", m.log);
        // Every step started, then ended once; the undone ones were reported.
        let events = events.into_inner().unwrap();
        let failed = events
            .iter()
            .filter(|e| matches!(e.outcome, StepOutcome::Failed { .. }))
            .count();
        assert_eq!(failed, 1);
        let undone = events
            .iter()
            .filter(|e| matches!(e.outcome, StepOutcome::Undone { .. }))
            .count();
        assert_eq!(undone, cutover);
        // The phases: starting; healthy (every start had passed before the
        // failing cutover); failed.
        let history = phases.borrow_and_update().history(2);
        assert_eq!(history, [Phase::Starting, Phase::Healthy, Phase::Failed]);
    }

    #[test]
    fn a_cancel_stops_before_the_record_and_undoes_what_was_done() {
        let services = [
            (Some((1, false)), true, Some(2), false, false),
            (None, true, Some(1), false, false),
        ];
        let (survey, running, target) = setup(&services, 0);
        let plan = plan(&survey).unwrap();
        let commit = plan.commit_point().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        for at in 0..plan.steps.len() {
            let mut m = Model::new(&running);
            m.target = target.clone();
            let before = m.observe();
            let cancel = CancellationToken::new();
            let lifecycle = Lifecycle::default();
            // Cancelled while step `at` runs (as a shutdown would).
            let result = rt.block_on(execute(&mut m, &plan, &lifecycle, None, &cancel, &|e| {
                if e.index as usize == at && e.outcome == StepOutcome::Started {
                    cancel.cancel();
                }
            }));
            if at < commit {
                let failed = result.unwrap_err();
                assert_eq!(failed.index, at + 1, "{:?}", m.log);
                assert!(failed.error.0.contains("cancelled"));
                assert_eq!(
                    m.observe(),
                    before,
                    "cancelled during step {at}: {:?}",
                    m.log
                );
            } else {
                // From the record on, the upgrade completes.
                assert!(result.is_ok(), "cancelled during step {at}");
                assert_eq!(m.observe().recorded.1, 2);
            }
        }
    }

    #[test]
    fn a_successful_upgrade_publishes_every_phase_in_order() {
        let services = [(Some((1, false)), true, Some(2), false, true)];
        let (survey, running, target) = setup(&services, 1);
        let plan = plan(&survey).unwrap();
        let mut m = Model::new(&running);
        m.target = target;
        let lifecycle = Lifecycle::default();
        lifecycle.opened(1);
        assert!(run_model_with(&mut m, &plan, &lifecycle));
        let seen = lifecycle.subscribe().borrow().clone();
        assert_eq!(
            seen.history(2),
            [Phase::Starting, Phase::Healthy, Phase::Serving]
        );
        assert_eq!(
            seen.history(1),
            [Phase::Serving, Phase::Draining, Phase::Stopped]
        );
    }

    fn run_model_with(model: &mut Model, plan: &UpgradePlan, lifecycle: &Lifecycle) -> bool {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(execute(
            model,
            plan,
            lifecycle,
            None,
            &CancellationToken::new(),
            &|_| {},
        ))
        .is_ok()
    }
}
