//! The runner: takes queued deployments in turn and carries each out across its
//! target's instances.
//!
//! The store decides what runs ([`Store::claim_next`]: one per target, FIFO, at
//! most `max_running` in all). For each deployment the runner:
//!
//! 1. asks every instance for its exact plan and stores them (what the
//!    deployment showed before anything moved);
//! 2. goes through the rollout's waves ([`Rollout::waves`]); each instance is
//!    sent the upgrade with the deployment's id, and its steps and notes are
//!    journalled as they come; a canary must stay healthy for the target's
//!    canary time before the rest follow;
//! 3. halts at the first failure (or a cancel asked for between waves), rolls
//!    back the instances this deployment upgraded, and records which and why.
//!
//! **Nothing stays stuck.** A command that loses its connection is sent again
//! once the shell is back: the shell answers a repeated deployment id with what
//! that upgrade did ([`wire::portal`]). A portal that stops (or is killed) leaves
//! its running deployments `running` in the store, and the next start drives
//! them again the same way, skipping the instances already done. A step that
//! reports nothing for `stuck_after` marks the deployment stuck (a flag, not a
//! state); a stuck deployment can be cancelled.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use image_spec::InstanceName;
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, info, info_span, warn};
use wire::portal::DeploymentId;
use wire::shell::{ShellRequest, ShellResponse, Strategy, Update};

use crate::deployment::{Deployment, EventKind, InstanceRun, RunState, Transition, now_ms};
use crate::journal::Journal;
use crate::shells::Shells;
use crate::store::Store;
use crate::target::Rollout;

/// How the runner works.
#[derive(Debug, Clone)]
pub struct RunnerConfig {
    /// Most deployments running at once, across targets.
    pub max_running: usize,
    /// A running deployment that hears nothing for this long is marked stuck.
    pub stuck_after: Duration,
}

impl Default for RunnerConfig {
    fn default() -> Self {
        Self {
            max_running: 4,
            stuck_after: Duration::from_secs(600),
        }
    }
}

/// How often the runner looks at the queue without being woken, and how often
/// a wait for an offline shell looks for a cancel.
const TICK: Duration = Duration::from_secs(1);

/// How many instances are asked for their plan at once.
const PLANS_AT_ONCE: usize = 32;

/// The runner (see the module docs).
pub struct Runner {
    store: Arc<dyn Store>,
    shells: Arc<Shells>,
    journal: Arc<Journal>,
    config: RunnerConfig,
    wake: Notify,
    tasks: TaskTracker,
}

impl std::fmt::Debug for Runner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runner").finish_non_exhaustive()
    }
}

/// Why an instance's part stopped the rollout.
#[derive(Debug, Clone)]
enum Halt {
    /// It failed: why.
    Failed(String),
    /// Someone cancelled the deployment.
    Cancelled,
}

/// How a deployment ended.
enum Ended {
    Succeeded,
    Failed(String),
    RolledBack(String),
    Cancelled(String),
}

impl Runner {
    /// A runner over the portal's parts.
    pub fn new(
        store: Arc<dyn Store>,
        shells: Arc<Shells>,
        journal: Arc<Journal>,
        config: RunnerConfig,
    ) -> Self {
        Self {
            store,
            shells,
            journal,
            config,
            wake: Notify::new(),
            tasks: TaskTracker::new(),
        }
    }

    /// Looks at the queue now (a deployment was queued or cancelled).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Drives the deployments left running by an earlier run, then takes queued
    /// ones as their turn comes, until `shutdown`. Deployments in progress at
    /// shutdown stay `running` and are resumed by the next run.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        match self.store.running().await {
            Ok(running) => {
                for d in running {
                    info!(deployment = %d.id, target = %d.target, "resuming a running deployment");
                    self.spawn(d, &shutdown);
                }
            }
            Err(e) => warn!(error = %e, "cannot read the running deployments"),
        }
        loop {
            loop {
                match self
                    .store
                    .claim_next(self.config.max_running, now_ms())
                    .await
                {
                    Ok(Some(d)) => {
                        self.journal
                            .note(d.id, None, EventKind::State(d.state))
                            .await;
                        self.spawn(d, &shutdown);
                    }
                    Ok(None) => break,
                    Err(e) => {
                        warn!(error = %e, "cannot claim the next deployment");
                        break;
                    }
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = self.wake.notified() => {}
                () = tokio::time::sleep(TICK) => {}
            }
        }
        self.tasks.close();
        self.tasks.wait().await;
    }

    fn spawn(self: &Arc<Self>, d: Deployment, shutdown: &CancellationToken) {
        let span =
            info_span!("deployment", deployment = %d.id, target = %d.target, image = %d.image.name);
        let me = self.clone();
        let shutdown = shutdown.clone();
        self.tasks.spawn(
            async move {
                let id = d.id;
                let target = d.target.clone();
                let ended = tokio::select! {
                    // Left running: the next start resumes it.
                    () = shutdown.cancelled() => return,
                    ended = me.clone().carry_out(d) => ended,
                };
                let (transition, failure) = match ended {
                    Ended::Succeeded => (Transition::Succeed, None),
                    Ended::Failed(why) => (Transition::Fail, Some(why)),
                    Ended::RolledBack(why) => (Transition::RollBack, Some(why)),
                    Ended::Cancelled(why) => (Transition::Cancel, Some(why)),
                };
                match me.store.transition(id, transition, failure, now_ms()).await {
                    Ok(d) => {
                        info!(state = %d.state, "deployment ended");
                        me.journal.note(id, None, EventKind::State(d.state)).await;
                    }
                    Err(e) => warn!(error = %e, "cannot record the end of the deployment"),
                }
                if let Ok(Some(t)) = me.store.target(&target).await
                    && let Err(e) = me
                        .store
                        .prune(&target, t.settings.keep_history as usize)
                        .await
                {
                    warn!(error = %e, "cannot prune the target's history");
                }
                me.wake();
            }
            .instrument(span),
        );
    }

    async fn carry_out(self: Arc<Self>, d: Deployment) -> Ended {
        let target = match self.store.target(&d.target).await {
            Ok(Some(t)) => t,
            Ok(None) => return Ended::Failed(format!("target `{}` no longer exists", d.target)),
            Err(e) => return Ended::Failed(e.to_string()),
        };
        let strategy = d.options.strategy.or(target.settings.strategy);
        let rollout = d.options.rollout.unwrap_or(target.settings.rollout);
        let progress = Arc::new(AtomicI64::new(now_ms()));
        let watchdog = CancellationToken::new();
        let _stop_watchdog = watchdog.clone().drop_guard();
        tokio::spawn(self.clone().watch_stuck(d.id, progress.clone(), watchdog));

        if d.order.is_empty() {
            return Ended::Failed(format!("target `{}` has no instances", d.target));
        }
        // 1. The plans, shown before anything moves.
        if d.plans.len() < d.order.len() {
            let mut plans = d.plans.clone();
            // Asked of the instances at once, a bounded number at a time.
            let asking = Arc::new(tokio::sync::Semaphore::new(PLANS_AT_ONCE));
            let mut asked = JoinSet::new();
            for instance in d.order.iter().filter(|i| !plans.contains_key(*i)) {
                let req = ShellRequest::Plan {
                    image: d.image.name.clone(),
                    strategy,
                    skip_hooks: d.options.skip_hooks,
                };
                let (me, instance, progress) = (self.clone(), instance.clone(), progress.clone());
                let asking = asking.clone();
                let id = d.id;
                asked.spawn(
                    async move {
                        let _permit = asking.acquire_owned().await;
                        let answer = me.ask(id, &instance, &req, true, &progress).await;
                        (instance, answer)
                    }
                    .in_current_span(),
                );
            }
            while let Some(done) = asked.join_next().await {
                let (instance, answer) = match done {
                    Ok(done) => done,
                    Err(e) => return Ended::Failed(format!("planning failed: {e}")),
                };
                match answer {
                    Ok(ShellResponse::Plan(plan)) => {
                        plans.insert(instance, plan);
                    }
                    Ok(other) => {
                        return Ended::Failed(format!(
                            "{instance} answered the plan with {other:?}"
                        ));
                    }
                    Err(Halt::Failed(why)) => {
                        return Ended::Failed(format!("planning on {instance}: {why}"));
                    }
                    Err(Halt::Cancelled) => {
                        return Ended::Cancelled("cancelled while planning".into());
                    }
                }
            }
            if let Err(e) = self.store.put_plans(d.id, plans).await {
                return Ended::Failed(e.to_string());
            }
        }
        // 2. The rollout, wave by wave.
        let waves = rollout.waves(&d.order);
        for (n, wave) in waves.iter().enumerate() {
            match self.store.deployment(d.id).await {
                Ok(Some(now)) if now.cancel_requested => {
                    return self.halt(d.id, strategy, Halt::Cancelled).await;
                }
                Ok(_) => {}
                Err(e) => return Ended::Failed(e.to_string()),
            }
            // At most `parallel` instances of a wave upgrade at once; after a
            // failure, those not started yet are left alone (skipped).
            let slots = Arc::new(tokio::sync::Semaphore::new(
                target.settings.parallel.max(1) as usize
            ));
            let halted = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let mut running = JoinSet::new();
            for instance in wave {
                let me = self.clone();
                let d = d.clone();
                let instance = instance.clone();
                let progress = progress.clone();
                let keep = target.settings.keep_rollback;
                let (slots, halted) = (slots.clone(), halted.clone());
                running.spawn(
                    async move {
                        let _slot = slots.acquire_owned().await;
                        if halted.load(Ordering::SeqCst) {
                            return Ok(());
                        }
                        let done = me.upgrade(&d, &instance, strategy, keep, &progress).await;
                        if done.is_err() {
                            halted.store(true, Ordering::SeqCst);
                        }
                        done
                    }
                    .in_current_span(),
                );
            }
            let mut halt = None;
            while let Some(done) = running.join_next().await {
                let result =
                    done.unwrap_or_else(|e| Err(Halt::Failed(format!("task failed: {e}"))));
                if let Err(h) = result {
                    halt.get_or_insert(h);
                }
            }
            if let Some(h) = halt {
                return self.halt(d.id, strategy, h).await;
            }
            let canary_time = Duration::from_secs(target.settings.canary_secs);
            if rollout == Rollout::Canary
                && n == 0
                && waves.len() > 1
                && let Err(h) = self
                    .watch_canary(d.id, &wave[0], canary_time, &progress)
                    .await
            {
                return self.halt(d.id, strategy, h).await;
            }
        }
        Ended::Succeeded
    }

    /// Sends `req` to `instance`, waiting for it to be attached and sending
    /// again after a lost connection (the shell answers a repeat with the first
    /// answer). While waiting, a cancel of the deployment ends it when
    /// `cancellable`.
    async fn ask(
        &self,
        id: DeploymentId,
        instance: &InstanceName,
        req: &ShellRequest,
        cancellable: bool,
        progress: &AtomicI64,
    ) -> Result<ShellResponse, Halt> {
        let mut said_offline = false;
        loop {
            if !self.shells.wait_online(instance, TICK).await {
                if cancellable
                    && let Ok(Some(d)) = self.store.deployment(id).await
                    && d.cancel_requested
                {
                    return Err(Halt::Cancelled);
                }
                if !said_offline {
                    said_offline = true;
                    self.journal
                        .note(
                            id,
                            Some(instance),
                            EventKind::Log(format!("{instance} is offline; waiting for it")),
                        )
                        .await;
                }
                continue;
            }
            let (tx, mut rx) = mpsc::unbounded_channel();
            let call = self.shells.call(instance, req, move |update| {
                let kind = match update {
                    Update::Progress(p) => EventKind::Log(p.to_string()),
                    Update::Step(e) => EventKind::Step(e.clone()),
                };
                // The receiver lives until the call ends.
                let _ = tx.send(kind);
            });
            let record = async {
                while let Some(kind) = rx.recv().await {
                    progress.store(now_ms(), Ordering::Relaxed);
                    let mut batch = vec![(Some(instance.clone()), kind)];
                    while let Ok(kind) = rx.try_recv() {
                        batch.push((Some(instance.clone()), kind));
                    }
                    self.journal.record(id, batch).await;
                }
            };
            let (answer, ()) = tokio::join!(call, record);
            progress.store(now_ms(), Ordering::Relaxed);
            match answer {
                Ok(Ok(response)) => return Ok(response),
                Ok(Err(remote)) => return Err(Halt::Failed(remote.message)),
                Err(e) => {
                    said_offline = false;
                    self.journal
                        .note(
                            id,
                            Some(instance),
                            EventKind::Log(format!(
                                "lost {instance} ({e}); asking again once it is back"
                            )),
                        )
                        .await;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    /// The current record of `instance`'s part.
    async fn run_of(&self, id: DeploymentId, instance: &InstanceName) -> Result<InstanceRun, Halt> {
        match self.store.deployment(id).await {
            Ok(Some(d)) => Ok(d
                .instances
                .get(instance)
                .cloned()
                .unwrap_or_else(InstanceRun::pending)),
            Ok(None) => Err(Halt::Failed(format!("deployment {id} disappeared"))),
            Err(e) => Err(Halt::Failed(e.to_string())),
        }
    }

    async fn put_run(&self, id: DeploymentId, instance: &InstanceName, run: &InstanceRun) {
        if let Err(e) = self.store.put_run(id, instance.clone(), run.clone()).await {
            warn!(%instance, error = %e, "cannot record the instance's part");
        }
        self.journal
            .note(id, Some(instance), EventKind::Instance(run.state))
            .await;
    }

    /// Brings one instance to the deployment's image (or learns that it already
    /// did), asking its shell to keep the releases a rollback of the target
    /// may need.
    async fn upgrade(
        &self,
        d: &Deployment,
        instance: &InstanceName,
        strategy: Option<Strategy>,
        keep_rollback: u32,
        progress: &AtomicI64,
    ) -> Result<(), Halt> {
        let mut run = self.run_of(d.id, instance).await?;
        match run.state {
            RunState::Succeeded => return Ok(()),
            RunState::Failed => {
                return Err(Halt::Failed(format!(
                    "{instance}: {}",
                    run.error.unwrap_or_default()
                )));
            }
            RunState::Pending | RunState::Skipped => {
                let ShellResponse::Status(status) = self
                    .ask(d.id, instance, &ShellRequest::Status, true, progress)
                    .await?
                else {
                    return Err(Halt::Failed(format!(
                        "{instance} did not answer its status"
                    )));
                };
                run.generation_before = Some(status.generation);
                run.state = RunState::Running;
                run.started = Some(now_ms());
                self.put_run(d.id, instance, &run).await;
            }
            RunState::Running | RunState::RolledBack => {}
        }
        let req = ShellRequest::Upgrade {
            image: d.image.name.clone(),
            strategy,
            deployment: Some(d.id),
            skip_hooks: d.options.skip_hooks,
            // The releases of the current deployment, the one before, and of
            // every one a rollback may go back to: a rollback reuses them.
            keep_releases: Some(keep_rollback.saturating_add(2)),
        };
        let answer = self.ask(d.id, instance, &req, false, progress).await;
        run.finished = Some(now_ms());
        match answer {
            Ok(ShellResponse::Upgraded(summary)) => {
                run.state = RunState::Succeeded;
                run.generation = summary.generation;
                run.steps = summary.steps;
                self.put_run(d.id, instance, &run).await;
                Ok(())
            }
            Ok(other) => {
                let why = format!("unexpected answer {other:?}");
                run.state = RunState::Failed;
                run.error = Some(why.clone());
                self.put_run(d.id, instance, &run).await;
                Err(Halt::Failed(format!("{instance}: {why}")))
            }
            Err(Halt::Failed(why)) => {
                run.state = RunState::Failed;
                run.error = Some(why.clone());
                self.put_run(d.id, instance, &run).await;
                Err(Halt::Failed(format!("{instance}: {why}")))
            }
            Err(Halt::Cancelled) => Err(Halt::Cancelled),
        }
    }

    /// Keeps asking the canary's status for `time`: every service must run and
    /// none may fail its health checks.
    async fn watch_canary(
        &self,
        id: DeploymentId,
        canary: &InstanceName,
        time: Duration,
        progress: &AtomicI64,
    ) -> Result<(), Halt> {
        self.journal
            .note(
                id,
                Some(canary),
                EventKind::Log(format!(
                    "canary {canary}: watching its health for {} s",
                    time.as_secs()
                )),
            )
            .await;
        let until = tokio::time::Instant::now() + time;
        loop {
            let ShellResponse::Status(status) = self
                .ask(id, canary, &ShellRequest::Status, true, progress)
                .await?
            else {
                return Err(Halt::Failed(format!("{canary} did not answer its status")));
            };
            for (service, s) in &status.services {
                if !s.state.starts_with("running") || s.health.starts_with("failing") {
                    return Err(Halt::Failed(format!(
                        "canary {canary}: {service} is {} ({})",
                        s.state, s.health
                    )));
                }
            }
            if tokio::time::Instant::now() >= until {
                return Ok(());
            }
            tokio::time::sleep(TICK.min(until - tokio::time::Instant::now())).await;
        }
    }

    /// Halts a rollout: brings back the instances this deployment upgraded,
    /// newest first, and says how it ended.
    async fn halt(&self, id: DeploymentId, strategy: Option<Strategy>, why: Halt) -> Ended {
        let reason = match &why {
            Halt::Failed(why) => why.clone(),
            Halt::Cancelled => "cancelled".to_owned(),
        };
        let d = match self.store.deployment(id).await {
            Ok(Some(d)) => d,
            Ok(None) => return Ended::Failed(reason),
            Err(e) => return Ended::Failed(format!("{reason}; {e}")),
        };
        let progress = AtomicI64::new(now_ms());
        let mut rolled_back = Vec::new();
        let mut problems = Vec::new();
        for instance in d.order.iter().rev() {
            let Some(run) = d.instances.get(instance) else {
                continue;
            };
            if run.state != RunState::Succeeded || run.generation.is_none() {
                continue;
            }
            let mut run = run.clone();
            let to = match run.generation_before {
                Some(g) if g > 0 => g,
                _ => {
                    problems.push(format!("{instance} ran nothing before; left as it is"));
                    continue;
                }
            };
            let req = ShellRequest::Rollback {
                strategy,
                to: Some(to),
                deployment: Some(id),
            };
            match self.ask(id, instance, &req, false, &progress).await {
                Ok(ShellResponse::Upgraded(_)) => {
                    run.state = RunState::RolledBack;
                    self.put_run(id, instance, &run).await;
                    rolled_back.push(instance.to_string());
                }
                Ok(other) => problems.push(format!("{instance}: rollback answered {other:?}")),
                Err(h) => {
                    let e = match h {
                        Halt::Failed(e) => e,
                        Halt::Cancelled => "cancelled".into(),
                    };
                    run.error = Some(format!("rollback failed: {e}"));
                    self.put_run(id, instance, &run).await;
                    problems.push(format!("{instance}: rollback failed: {e}"));
                }
            }
        }
        let mut message = reason;
        if !rolled_back.is_empty() {
            message.push_str(&format!("; rolled back {}", rolled_back.join(", ")));
        }
        for p in problems {
            message.push_str("; ");
            message.push_str(&p);
        }
        match (why, rolled_back.is_empty()) {
            (Halt::Cancelled, _) => Ended::Cancelled(message),
            (Halt::Failed(_), true) => Ended::Failed(message),
            (Halt::Failed(_), false) => Ended::RolledBack(message),
        }
    }

    /// Marks the deployment stuck while nothing is heard for `stuck_after`.
    async fn watch_stuck(
        self: Arc<Self>,
        id: DeploymentId,
        progress: Arc<AtomicI64>,
        stop: CancellationToken,
    ) {
        let stuck_ms = self.config.stuck_after.as_millis() as i64;
        let every = (self.config.stuck_after / 4).min(TICK);
        let mut stuck = false;
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(every) => {}
            }
            let now = now_ms();
            let idle = now - progress.load(Ordering::Relaxed);
            let is_stuck = idle >= stuck_ms;
            if is_stuck != stuck {
                stuck = is_stuck;
                if let Err(e) = self.store.set_stuck(id, stuck, now).await {
                    warn!(error = %e, "cannot mark the deployment stuck");
                }
                let note = if stuck {
                    format!("stuck: no progress for {} s", idle / 1000)
                } else {
                    "progress again".to_owned()
                };
                self.journal.note(id, None, EventKind::Log(note)).await;
            }
        }
    }
}
