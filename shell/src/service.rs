//! The shell's command service: `upgrade`, `plan`, `status`, `logs`, `rollback`
//! and `pull` over QUIC.
//!
//! [`bind`] opens the instance (starting its recorded generation), then serves
//! commands from the portal and from users with the deployer or admin grant.
//! Upgrades run one at a time: a second waits for the first, and `status` (which
//! never waits) shows how many are queued. A rollback upgrades to the previous
//! generation's commits, whose releases are still on disk (nothing is fetched or
//! built). Pulls are for development and quality instances; staging and
//! production refuse them. The shell reaches the repository with
//! its own `shell/<instance>` certificate, which may only read.
//!
//! Commands come over the shell's own listener, over the connection it dials
//! to a portal ([`crate::attach`]), or both. A staging or production shell
//! attached to a portal takes upgrades, rollbacks and pulls from the portal
//! only, so its queue, approvals and audit cannot be bypassed. An upgrade or
//! rollback that carries a deployment id is done once per id
//! ([`crate::deployment`]).
//!
//! A shell whose services a keeper holds can be replaced by a new shell
//! process without stopping them: [`take_over`] on the new one, the holder's
//! side answering on the instance's takeover socket (`service/takeover.rs`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use image_spec::{CommitId, ImageName, ServiceName};
use repo_client::RepoClient;
use tokio::sync::Mutex;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, info, info_span, warn};
use wire::repo::{ErrorKind, RemoteError};
use wire::shell::{
    InstanceStatus, LogSource, Overlay, Overlays, Progress, ShellReply, ShellRequest,
    ShellResponse, UpgradeSummary,
};
use wire::{
    BiStream, Client, Credentials, DEFAULT_FRAME_LIMIT, Handler, Identity, Server, WireError,
};

use crate::attach::Attach;
use crate::deployment::{self, Claim, Deployments};
use crate::instance::{
    Instance, InstanceConfig, Lifecycle, Strategy, UpgradeError, UpgradeOptions,
};
use crate::state::{DeploymentOp, OutcomeKey};
use wire::plan::StepEvent;

mod takeover;

pub use takeover::{
    ASK_WAIT, DRAIN_GRACE, EXPORT_WAIT, OFFER_WAIT, READY_WAIT, RELEASED_WAIT, TAKE_BACK_WAIT,
    WAIT_OVERRIDE, take_over,
};
pub use wire::shell::Stage;

/// How to run a shell.
#[derive(Debug, Clone)]
pub struct ShellConfig {
    /// The instance.
    pub instance: InstanceConfig,
    /// Its stage.
    pub stage: Stage,
    /// The repository server.
    pub repo: SocketAddr,
    /// The shell's certificate (`shell/<instance>`), key and CA.
    pub credentials: Credentials,
    /// Where to serve commands (UDP); `None`: only over the portal's
    /// connection (then `portal` is required).
    pub listen: Option<SocketAddr>,
    /// The portal to dial and take commands from over that connection; a
    /// staging or production shell with a portal takes deployments only from
    /// it.
    pub portal: Option<SocketAddr>,
    /// Labels the shell registers with at the portal (`region=eu`).
    pub labels: BTreeMap<String, String>,
    /// The strategy upgrades use unless a request names one.
    pub strategy: Strategy,
}

/// Why a shell could not start.
#[derive(Debug, thiserror::Error)]
pub enum ShellError {
    /// The instance could not be opened.
    #[error(transparent)]
    Instance(#[from] UpgradeError),
    /// The endpoint could not be set up.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// The credentials are not this instance's shell.
    #[error("these credentials are for `{found}`; this shell needs `shell/{instance}`")]
    WrongIdentity {
        /// The identity in the certificate.
        found: Identity,
        /// The instance.
        instance: String,
    },
    /// Neither a listener nor a portal: nobody could send the shell a command.
    #[error(
        "the shell of `{instance}` has nowhere to take commands from: give it an address to listen on, a portal, or both"
    )]
    NowhereToServe {
        /// The instance.
        instance: String,
    },
    /// No shell serves the instance to take over from.
    #[error(
        "no shell to take over from at `{path}` ({source}): is `molt shell` running there, with its keeper?"
    )]
    NoHolder {
        /// The takeover socket.
        path: PathBuf,
        /// Why it could not be reached.
        source: std::io::Error,
    },
    /// The keeper could not be joined.
    #[error(transparent)]
    Keeper(#[from] crate::keeper::KeeperError),
    /// The takeover failed; the shell that holds the instance serves on.
    #[error(transparent)]
    Takeover(#[from] crate::takeover::TakeoverError),
    /// The shell has no listener of its own (it takes commands over its
    /// portal's connection only).
    #[error(
        "the shell of `{instance}` has no listener of its own; it takes commands from its portal"
    )]
    NoListener {
        /// The instance.
        instance: String,
    },
}

/// The command service: the instance, and everything a command needs.
pub(crate) struct ShellService {
    instance: Mutex<Instance>,
    root: std::path::PathBuf,
    name: String,
    stage: Stage,
    /// Whether the shell is attached to a portal (then a guarded stage takes
    /// deployments only from it).
    attached: bool,
    /// The outcomes of the portal's deployments, by id.
    deployments: Deployments,
    repo_addr: SocketAddr,
    client: Client,
    queued: AtomicU32,
    upgrading: AtomicBool,
    status: std::sync::Mutex<InstanceStatus>,
    strategy: Strategy,
    lifecycle: Arc<Lifecycle>,
    /// Each running service's log file, as of the last refresh.
    logs: std::sync::Mutex<BTreeMap<ServiceName, PathBuf>>,
    /// The upgrades running or queued, each an owned task.
    tasks: TaskTracker,
    /// Cancels the upgrades (at shutdown).
    cancel: CancellationToken,
    /// Set once the instance was handed to a shell that took over: nothing
    /// more is done here.
    handed: AtomicBool,
    /// Where this shell takes commands, if it listens.
    listen: Option<SocketAddr>,
}

fn remote(kind: ErrorKind, message: impl Into<String>) -> RemoteError {
    RemoteError::new(kind, message)
}

impl ShellService {
    /// A connection to the repository. A connection that fails is tried
    /// again twice after a jittered pause: when many instances upgrade at
    /// once, their handshakes arrive together and some are lost.
    async fn repo(&self) -> Result<RepoClient, RemoteError> {
        let mut backoff = crate::attach::Backoff::new(
            std::time::Duration::from_millis(300),
            std::time::Duration::from_secs(2),
        );
        let mut attempt = 1;
        loop {
            match RepoClient::connect(&self.client, self.repo_addr).await {
                Ok(repo) => return Ok(repo),
                Err(e) if attempt < REPO_ATTEMPTS => {
                    warn!(instance = %self.name, attempt, error = %e, "cannot reach the repository; trying again");
                    tokio::time::sleep(backoff.next_delay(crate::attach::random())).await;
                    attempt += 1;
                }
                Err(e) => {
                    return Err(remote(
                        ErrorKind::Internal,
                        format!("cannot reach the repository ({attempt} attempts): {e}"),
                    ));
                }
            }
        }
    }

    async fn image_target(
        &self,
        repo: &RepoClient,
        image: &ImageName,
    ) -> Result<(image_spec::ImageId, BTreeMap<ServiceName, CommitId>), RemoteError> {
        let as_remote = |e| match e {
            repo_client::ClientError::Remote(r) => r,
            other => remote(ErrorKind::Internal, other.to_string()),
        };
        let (id, image) = match repo.image(image).await.map_err(as_remote) {
            Ok(found) => (found.id, found.image),
            // Not a name: perhaps an image id, or an abbreviation of one.
            Err(e) if e.kind == ErrorKind::NotFound => {
                let Ok(prefix) = image.as_str().parse::<image_spec::IdPrefix>() else {
                    return Err(e);
                };
                let images = repo.images().await.map_err(as_remote)?;
                let id = prefix.resolve(images.iter().map(|r| r.id)).map_err(|r| {
                    remote(
                        ErrorKind::NotFound,
                        format!("no image is named `{image}`, and {r}"),
                    )
                })?;
                images
                    .into_iter()
                    .find(|r| r.id == id)
                    .map(|r| (r.id, r.image))
                    .expect("the id was resolved among these images")
            }
            Err(e) => return Err(e),
        };
        Ok((id, image.services().clone()))
    }

    /// The file of a service's log.
    fn log_path(&self, service: &ServiceName, source: LogSource) -> Result<PathBuf, RemoteError> {
        let dir = self.root.join("logs").join(service.as_str());
        let running = || {
            self.status()
                .services
                .get(service)
                .map(|s| s.commit)
                .ok_or_else(|| {
                    remote(
                        ErrorKind::NotFound,
                        format!("no service `{service}` runs on `{}`", self.name),
                    )
                })
        };
        Ok(match source {
            LogSource::Running => {
                running()?;
                let logs = self.logs.lock().unwrap_or_else(|p| p.into_inner());
                logs.get(service).cloned().ok_or_else(|| {
                    remote(
                        ErrorKind::NotFound,
                        format!("no service `{service}` runs on `{}`", self.name),
                    )
                })?
            }
            LogSource::Generation(n) => dir.join(format!("g{n}.log")),
            LogSource::Build => dir.join(format!("{}.build.log", running()?.short(12))),
        })
    }

    fn refresh(&self, instance: &Instance) {
        if let Ok(mut logs) = self.logs.lock() {
            *logs = instance.log_paths();
        }
        let (image, generation) = instance.recorded().unwrap_or((None, 0));
        let overlays = instance.overlays(generation).unwrap_or_default();
        if let Ok(mut s) = self.status.lock() {
            s.services = instance.describe();
            s.image = image.map(Into::into);
            s.generation = generation;
            s.overlays = overlays;
        }
    }

    /// The instance's status: fresh when no upgrade holds the instance, else as
    /// it was when the last one finished (status never waits).
    pub(crate) fn status(&self) -> InstanceStatus {
        if let Ok(instance) = self.instance.try_lock() {
            self.refresh(&instance);
        }
        let mut s = self
            .status
            .lock()
            .map(|s| s.clone())
            .unwrap_or_else(|p| p.into_inner().clone());
        s.queued = self.queued.load(Ordering::SeqCst);
        s.upgrading = self.upgrading.load(Ordering::SeqCst);
        let generations = self.lifecycle.snapshot();
        s.lifecycle = generations.phases();
        s.last_failure = generations.last_failure;
        s
    }

    async fn answer(
        self: &Arc<Self>,
        peer: &Identity,
        req: ShellRequest,
        progress: &Reporter,
    ) -> ShellReply {
        match req {
            ShellRequest::Status => Ok(ShellResponse::Status(self.status())),
            ShellRequest::Logs {
                service,
                source,
                tail,
                from,
                since,
            } => {
                let path = self.log_path(&service, source)?;
                let (text, next) = read_log(&path, tail, from, since).map_err(|e| {
                    remote(
                        ErrorKind::NotFound,
                        format!(
                            "no such log of `{service}` on `{}` ({}): {e}",
                            self.name,
                            path.display()
                        ),
                    )
                })?;
                Ok(ShellResponse::Logs { text, next })
            }
            ShellRequest::Plan {
                image,
                strategy,
                skip_hooks,
            } => {
                let repo = self.repo().await?;
                let (_, target) = self.image_target(&repo, &image).await?;
                let strategy = strategy.unwrap_or(self.strategy);
                let instance = self.instance.lock().await;
                let plan = instance
                    .plan_with(&repo, &target, strategy, skip_hooks)
                    .await
                    .map_err(|e| remote(ErrorKind::Invalid, e.to_string()))?;
                Ok(ShellResponse::Plan(plan))
            }
            ShellRequest::Upgrade {
                image,
                strategy,
                deployment,
                skip_hooks,
                keep_releases,
            } => {
                let key = deployment.map(|deployment| OutcomeKey {
                    deployment,
                    op: DeploymentOp::Upgrade,
                });
                self.once(key, progress, async |key| {
                    let repo = self.repo().await?;
                    let (id, target) = self.image_target(&repo, &image).await?;
                    self.spawn_upgrade(
                        repo,
                        Change::To(target, Some((image.clone(), id))),
                        format!("upgrade to {image}"),
                        UpgradeOptions {
                            strategy: strategy.unwrap_or(self.strategy),
                            skip_hooks,
                            keep_releases: keep_releases.map(|k| k as usize),
                            ..UpgradeOptions::default()
                        },
                        progress,
                        key,
                    )
                    .await
                })
                .await
            }
            ShellRequest::Rollback {
                strategy,
                to,
                deployment,
            } => {
                let key = deployment.map(|deployment| OutcomeKey {
                    deployment,
                    op: DeploymentOp::Rollback,
                });
                self.once(key, progress, async |key| {
                    let repo = self.repo().await?;
                    let strategy = strategy.unwrap_or(self.strategy);
                    self.spawn_upgrade(
                        repo,
                        Change::Back(to),
                        "rollback".to_owned(),
                        UpgradeOptions {
                            strategy,
                            ..UpgradeOptions::default()
                        },
                        progress,
                        key,
                    )
                    .await
                })
                .await
            }
            ShellRequest::Pull {
                service,
                rev,
                on_behalf_of,
            } => {
                self.takes_pulls("pulls")?;
                let by = person(peer, on_behalf_of)?;
                let repo = self.repo().await?;
                let commit = repo.resolve(&service, &rev).await.map_err(|e| match e {
                    repo_client::ClientError::Remote(r) => r,
                    other => remote(ErrorKind::Internal, other.to_string()),
                })?;
                let reason = format!("pull {service}@{rev} by {by}");
                let overlay = Overlay {
                    commit,
                    rev,
                    by,
                    since: image_spec::Timestamp::now(),
                };
                self.spawn_overlay_change(repo, Change::Pull(service, overlay), reason, progress)
                    .await
            }
            ShellRequest::Reset {
                service,
                on_behalf_of,
            } => {
                self.takes_pulls("resets")?;
                let by = person(peer, on_behalf_of)?;
                let repo = self.repo().await?;
                let reason = match &service {
                    Some(service) => format!("reset {service} to the image by {by}"),
                    None => format!("reset to the image by {by}"),
                };
                self.spawn_overlay_change(repo, Change::Reset(service), reason, progress)
                    .await
            }
        }
    }

    /// A pull or reset: an upgrade with the instance's own strategy, outside
    /// any deployment.
    async fn spawn_overlay_change(
        self: &Arc<Self>,
        repo: RepoClient,
        change: Change,
        reason: String,
        progress: &Reporter,
    ) -> ShellReply {
        let options = UpgradeOptions {
            strategy: self.strategy,
            ..UpgradeOptions::default()
        };
        self.spawn_upgrade(repo, change, reason, options, progress, None)
            .await
    }

    /// Refuses `what` (pulls, resets) on a staging or production instance:
    /// those take images only.
    fn takes_pulls(&self, what: &str) -> Result<(), RemoteError> {
        match self.stage.is_guarded() {
            true => Err(remote(
                ErrorKind::PermissionDenied,
                format!(
                    "`{}` is a {} instance: it takes images (molt deploy), not {what}",
                    self.name, self.stage
                ),
            )),
            false => Ok(()),
        }
    }

    /// Runs `run` once per deployment: with no key, simply runs it; with one,
    /// answers from the recorded outcome, waits for the same deployment's
    /// operation running now, or runs it and records how it ended
    /// ([`crate::deployment`]).
    async fn once(
        self: &Arc<Self>,
        key: Option<OutcomeKey>,
        progress: &Reporter,
        run: impl AsyncFnOnce(Option<OutcomeKey>) -> ShellReply,
    ) -> ShellReply {
        let Some(key) = key else {
            return run(None).await;
        };
        let note = |step: String| {
            let _ = progress.send(Update::Progress(Progress {
                service: None,
                step,
            }));
        };
        let claim = self.deployments.claim(key).map_err(|e| {
            remote(
                ErrorKind::Internal,
                format!("cannot read the outcome of the {key}: {e}"),
            )
        })?;
        let outcome = match claim {
            Claim::Done(outcome) => {
                info!(%key, "answered from its recorded outcome");
                note(format!("the {key} already ran here; its outcome follows"));
                outcome
            }
            Claim::Running(rx) => {
                info!(%key, "already running: waiting for its outcome");
                note(format!("the {key} is running here; waiting for it"));
                deployment::wait(rx).await
            }
            Claim::Run(claimed) => {
                let outcome = match run(Some(key)).await {
                    Ok(ShellResponse::Upgraded(summary)) => Ok(summary),
                    Ok(other) => Err(remote(
                        ErrorKind::Internal,
                        format!("an upgrade answered {other:?}"),
                    )),
                    Err(e) => Err(e),
                };
                // Recorded inside the run already once it held the instance;
                // here too for what failed before (the repository, the image).
                self.deployments
                    .record(key, &outcome, self.cancel.is_cancelled());
                claimed.finish(outcome.clone());
                outcome
            }
        };
        outcome.map(ShellResponse::Upgraded)
    }

    /// Runs an upgrade as a task the service owns, not as part of the command's
    /// stream: a requester that goes away, or a server closing its connections
    /// at shutdown, cannot abort it half way; at shutdown it is cancelled at its
    /// next step before the record and undone ([`Bound::serve`]).
    async fn spawn_upgrade(
        self: &Arc<Self>,
        repo: RepoClient,
        change: Change,
        reason: String,
        options: UpgradeOptions,
        progress: &Reporter,
        deployment: Option<OutcomeKey>,
    ) -> ShellReply {
        let service = self.clone();
        let progress = progress.clone();
        let task = self.tasks.spawn(
            async move {
                service
                    .run_upgrade(&repo, change, &reason, options, &progress, deployment)
                    .await
            }
            .in_current_span(),
        );
        task.await.unwrap_or_else(|e| {
            Err(remote(
                ErrorKind::Internal,
                format!("the upgrade task failed: {e}"),
            ))
        })
    }

    /// Runs one upgrade at a time: waits (visibly queued) for the instance.
    /// With a deployment, marks it running once it holds the instance and
    /// records its outcome before letting go of it.
    async fn run_upgrade(
        &self,
        repo: &RepoClient,
        change: Change,
        reason: &str,
        options: UpgradeOptions,
        progress: &Reporter,
        deployment: Option<OutcomeKey>,
    ) -> ShellReply {
        let report = |service: Option<&ServiceName>, step: &str| {
            // The requester may be gone; the upgrade goes on without it.
            let _ = progress.send(Update::Progress(Progress {
                service: service.cloned(),
                step: step.to_owned(),
            }));
        };
        let observe = |event: &StepEvent| {
            let _ = progress.send(Update::Step(event.clone()));
        };
        self.queued.fetch_add(1, Ordering::SeqCst);
        let mut instance = match self.instance.try_lock() {
            Ok(instance) => instance,
            Err(_) => {
                report(None, "queued: another upgrade is running");
                self.instance.lock().await
            }
        };
        self.queued.fetch_sub(1, Ordering::SeqCst);
        if self.handed.load(Ordering::SeqCst) {
            return Err(remote(
                ErrorKind::Internal,
                "this shell handed its instance to a new shell meanwhile; send the command again",
            ));
        }
        if let Some(key) = deployment {
            let after = instance
                .recorded()
                .map_err(|e| remote(ErrorKind::Internal, e.to_string()))?
                .1;
            self.deployments.mark_running(key, after).map_err(|e| {
                remote(
                    ErrorKind::Internal,
                    format!("cannot record that the {key} started: {e}"),
                )
            })?;
        }
        self.upgrading.store(true, Ordering::SeqCst);
        let change_named = matches!(change, Change::Back(_));
        let mut reason = reason.to_owned();
        let result = match self
            .resolve_change(&instance, repo, change, &mut reason)
            .await
        {
            Ok((target, image, overlays)) => {
                if change_named {
                    report(None, &reason);
                }
                let options = UpgradeOptions {
                    cancel: self.cancel.clone(),
                    overlays,
                    ..options
                };
                instance
                    .upgrade_with(repo, &target, image, &reason, options, &report, &observe)
                    .await
                    .map_err(|e| remote(ErrorKind::Invalid, e.to_string()))
            }
            Err(e) => Err(e),
        };
        self.upgrading.store(false, Ordering::SeqCst);
        self.refresh(&instance);
        let outcome = result.map(|report| UpgradeSummary {
            restarted: report.restarted,
            unchanged: report.unchanged,
            removed: report.removed,
            generation: report.generation,
            steps: report.timeline,
            warnings: report.warnings,
            reason,
            image: instance
                .recorded()
                .ok()
                .and_then(|(i, _)| i)
                .map(|(n, _)| n),
        });
        if let Some(key) = deployment {
            // Written while the instance is still held: no other operation
            // can record a generation between this one's and its outcome.
            self.deployments
                .record(key, &outcome, self.cancel.is_cancelled());
        }
        outcome.map(ShellResponse::Upgraded)
    }

    /// What `change` brings the instance to: each service's commit, the
    /// image, and the overlays the new generation records. `reason` is made
    /// exact (a rollback names the generation it goes back to).
    async fn resolve_change(
        &self,
        instance: &Instance,
        repo: &RepoClient,
        change: Change,
        reason: &mut String,
    ) -> Result<(Commits, Option<(ImageName, image_spec::ImageId)>, Overlays), RemoteError> {
        let internal = |e: UpgradeError| remote(ErrorKind::Internal, e.to_string());
        let (image, last) = instance.recorded().map_err(internal)?;
        Ok(match change {
            Change::To(target, image) => (target, image, Overlays::new()),
            Change::Pull(service, overlay) => {
                let mut overlays = instance.overlays(last).map_err(internal)?;
                let base = self.image_commits(repo, image.as_ref()).await?;
                let mut target = instance.commits();
                target.insert(service.clone(), overlay.commit);
                match base.get(&service) == Some(&overlay.commit) {
                    true => overlays.remove(&service),
                    false => {
                        // A pull of what already runs, by the same person and
                        // revision, keeps the overlay's start.
                        let since = overlays
                            .get(&service)
                            .filter(|o| o.commit == overlay.commit && o.by == overlay.by)
                            .map_or(overlay.since, |o| o.since);
                        overlays.insert(service, Overlay { since, ..overlay })
                    }
                };
                (target, image, overlays)
            }
            Change::Reset(service) => {
                let Some((name, _)) = &image else {
                    return Err(remote(
                        ErrorKind::Invalid,
                        format!(
                            "`{}` runs no image: there is nothing to reset to (deploy an image first)",
                            self.name
                        ),
                    ));
                };
                let base = self.image_commits(repo, image.as_ref()).await?;
                let mut overlays = instance.overlays(last).map_err(internal)?;
                let mut target = instance.commits();
                match service {
                    Some(service) => {
                        if !target.contains_key(&service) && !base.contains_key(&service) {
                            return Err(remote(
                                ErrorKind::NotFound,
                                format!(
                                    "no service `{service}` runs on `{}` or is in its image `{name}`",
                                    self.name
                                ),
                            ));
                        }
                        match base.get(&service) {
                            Some(commit) => target.insert(service.clone(), *commit),
                            None => target.remove(&service),
                        };
                        overlays.remove(&service);
                    }
                    None => {
                        target = base;
                        overlays.clear();
                    }
                }
                (target, image, overlays)
            }
            Change::Back(to) => {
                let (number, earlier) = instance
                    .rollback_target(to)
                    .map_err(|e| remote(ErrorKind::Invalid, e.to_string()))?;
                *reason = match &earlier.image {
                    Some((name, _)) => {
                        format!("rollback to generation {number} (image {name})")
                    }
                    None => format!("rollback to generation {number}"),
                };
                let target = earlier
                    .services
                    .iter()
                    .map(|(n, s)| (n.clone(), s.commit))
                    .collect();
                let overlays = instance.overlays(number).map_err(internal)?;
                (target, earlier.image, overlays)
            }
        })
    }

    /// The commits of the instance's image (none: no image, no commits).
    async fn image_commits(
        &self,
        repo: &RepoClient,
        image: Option<&(ImageName, image_spec::ImageId)>,
    ) -> Result<Commits, RemoteError> {
        match image {
            Some((name, _)) => Ok(self.image_target(repo, name).await?.1),
            None => Ok(Commits::new()),
        }
    }

    /// Why `peer` may not send `req` to this shell beyond the grant check: a
    /// staging or production shell attached to a portal takes deployments
    /// only from it.
    fn guard(&self, peer: &Identity, req: &ShellRequest) -> Result<(), RemoteError> {
        let deploys = matches!(
            req,
            ShellRequest::Upgrade { .. }
                | ShellRequest::Rollback { .. }
                | ShellRequest::Pull { .. }
                | ShellRequest::Reset { .. }
        );
        if deploys && self.attached && self.stage.is_guarded() && *peer != Identity::Portal {
            return Err(remote(
                ErrorKind::PermissionDenied,
                format!(
                    "`{}` is a {} instance attached to a portal: deploy through the portal \
                     (upgrades, rollbacks and pulls sent straight to it are refused)",
                    self.name, self.stage
                ),
            ));
        }
        Ok(())
    }
}

/// Who a pull or reset is for: a user is themselves (naming anyone else is
/// refused); the portal must name the person it acts for.
fn person(peer: &Identity, on_behalf_of: Option<String>) -> Result<String, RemoteError> {
    match (peer, on_behalf_of) {
        (Identity::User { name, .. }, None) => Ok(name.to_string()),
        (Identity::User { name, .. }, Some(other)) if name.to_string() == other => Ok(other),
        (Identity::User { name, .. }, Some(other)) => Err(remote(
            ErrorKind::PermissionDenied,
            format!("`{name}` may not pull or reset on behalf of `{other}`"),
        )),
        (Identity::Portal, Some(person)) if !person.is_empty() => Ok(person),
        (Identity::Portal, _) => Err(remote(
            ErrorKind::Invalid,
            "the portal pulls and resets on a person's behalf: name them (on_behalf_of)",
        )),
        (other, _) => Err(remote(
            ErrorKind::PermissionDenied,
            format!("`{other}` may not pull or reset"),
        )),
    }
}

/// How many times a shell tries to reach the repository for one command.
const REPO_ATTEMPTS: u32 = 3;

/// What a running command reports before its answer.
enum Update {
    /// A note.
    Progress(Progress),
    /// A step's event.
    Step(StepEvent),
}

/// Where an upgrade's steps go while it runs: to the stream that asked for it.
type Reporter = mpsc::UnboundedSender<Update>;

/// Each service's commit.
type Commits = BTreeMap<ServiceName, CommitId>;

/// What an upgrade changes to.
enum Change {
    /// These commits (and the image they come from).
    To(
        Commits,
        Option<(image_spec::ImageName, image_spec::ImageId)>,
    ),
    /// One service to one commit (its overlay), the others as they are.
    Pull(ServiceName, Overlay),
    /// One service (`None`: every service) back to the image's commit.
    Reset(Option<ServiceName>),
    /// An earlier generation: this one, or the one before the current.
    Back(Option<u64>),
}

/// Most bytes of log one answer carries.
const LOG_CHUNK: u64 = 1 << 20;

/// The last `tail` lines of the log at `path`, or what follows offset `from`
/// (from the start if the file was rotated and is now shorter); and the offset to
/// continue from. With `since`, only the lines stamped at or after it (a line
/// without a stamp goes with the one before it).
pub fn read_log(
    path: &std::path::Path,
    tail: u32,
    from: Option<u64>,
    since: Option<i64>,
) -> std::io::Result<(String, u64)> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = std::fs::File::open(path)?;
    let len = file.metadata()?.len();
    let (text, next) = match from {
        Some(off) => {
            let start = if off > len { 0 } else { off };
            file.seek(SeekFrom::Start(start))?;
            let mut buf = Vec::new();
            file.take(LOG_CHUNK).read_to_end(&mut buf)?;
            let next = start + buf.len() as u64;
            (String::from_utf8_lossy(&buf).into_owned(), next)
        }
        None => {
            let start = len.saturating_sub(LOG_CHUNK);
            file.seek(SeekFrom::Start(start))?;
            let mut buf = Vec::new();
            file.read_to_end(&mut buf)?;
            let text = String::from_utf8_lossy(&buf);
            let text = match since {
                Some(t) => lines_since(&text, t),
                None => text.into_owned(),
            };
            let lines: Vec<&str> = text.lines().collect();
            let keep = lines[lines.len().saturating_sub(tail as usize)..].join("\n");
            return Ok((keep, len));
        }
    };
    Ok(match since {
        Some(t) => (lines_since(&text, t), next),
        None => (text, next),
    })
}

/// The lines of `text` stamped at or after `since` (seconds since the epoch);
/// a line without a stamp goes with the one before it.
pub fn lines_since(text: &str, since: i64) -> String {
    let threshold = image_spec::Timestamp::from_unix_seconds(since).to_string();
    // Stamps and the threshold are RFC 3339 in UTC: they compare as text.
    let threshold = threshold.trim_end_matches('Z');
    let mut keep = false;
    let mut out = String::new();
    for line in text.split_inclusive('\n') {
        if let Some((stamp, _)) = crate::process::split_stamp(line) {
            keep = stamp[..19] >= *threshold;
        }
        if keep {
            out.push_str(line);
        }
    }
    out
}

/// Sends one progress frame; false once the requester is gone.
async fn forward(stream: &mut BiStream, update: Update) -> bool {
    let frame: ShellReply = Ok(match update {
        Update::Progress(p) => ShellResponse::Progress(p),
        Update::Step(e) => ShellResponse::Step(e),
    });
    wire::codec::write_frame(&mut stream.send, &frame)
        .await
        .is_ok()
}

/// The command service as the wire server's handler: each stream gets a hold
/// of the service, so an upgrade can run as a task of its own.
struct Commands(Arc<ShellService>);

impl Handler for Commands {
    async fn handle(&self, peer: Arc<Identity>, stream: BiStream) {
        self.0.handle(peer, stream).await;
    }
}

impl ShellService {
    /// Serves one command stream from `peer`: the same for the shell's own
    /// listener and for the streams its portal opens.
    pub(crate) async fn handle(self: &Arc<Self>, peer: Arc<Identity>, mut stream: BiStream) {
        let req: ShellRequest = match stream.read_request(DEFAULT_FRAME_LIMIT).await {
            Ok(r) => r,
            Err(e) => {
                stream.refuse(&e);
                return;
            }
        };
        let span = info_span!("command", instance = %self.name, %peer, ?req);
        let (progress, mut steps) = mpsc::unbounded_channel();
        let reply = async {
            if !wire::shell::allowed(&peer, &req) {
                return Err(remote(
                    ErrorKind::PermissionDenied,
                    match &*peer {
                        Identity::User { .. } => format!(
                            "`{peer}` may pull, reset, and read status and logs, but not \
                             upgrade or roll back (developers bring single services onto \
                             development and quality instances)"
                        ),
                        _ => format!("`{peer}` may not command shells"),
                    },
                ));
            }
            self.guard(&peer, &req)?;
            self.answer(&peer, req, &progress).await
        }
        .instrument(span);
        // Forward each step as a progress frame while the command runs; a
        // requester that went away does not stop the command.
        let mut reply = std::pin::pin!(reply);
        let mut forwarding = true;
        let reply = loop {
            tokio::select! {
                reply = &mut reply => break reply,
                Some(step) = steps.recv(), if forwarding => {
                    forwarding = forward(&mut stream, step).await;
                }
            }
        };
        while let Ok(step) = steps.try_recv() {
            if !forwarding {
                break;
            }
            forwarding = forward(&mut stream, step).await;
        }
        if let Err(e) = &reply {
            warn!(instance = %self.name, error = %e, "command failed");
        }
        if wire::codec::write_frame(&mut stream.send, &reply)
            .await
            .is_ok()
        {
            let _ = stream.send.finish();
        }
    }
}

/// A shell bound to its address (if it has one), with its instance running.
pub struct Bound {
    server: Option<Server>,
    attach: Option<Attach>,
    service: Arc<ShellService>,
    /// The takeover socket, listening from the moment the shell is bound
    /// (when a keeper holds its services).
    takeover: Option<tokio::net::UnixListener>,
}

impl std::fmt::Debug for Bound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bound").finish_non_exhaustive()
    }
}

/// Refuses a configuration no shell could serve with.
fn check(config: &ShellConfig) -> Result<(), ShellError> {
    let name = config.instance.name.to_string();
    if config.credentials.identity
        != (Identity::Shell {
            instance: config.instance.name.clone(),
        })
    {
        return Err(ShellError::WrongIdentity {
            found: config.credentials.identity.clone(),
            instance: name,
        });
    }
    if config.listen.is_none() && config.portal.is_none() {
        return Err(ShellError::NowhereToServe { instance: name });
    }
    Ok(())
}

/// The listener (if any) and the portal's link (if any).
type Endpoints = (Option<Server>, Option<Attach>);

fn endpoints(config: &ShellConfig) -> Result<Endpoints, ShellError> {
    let server = config
        .listen
        .map(|addr| Server::bind(addr, &config.credentials))
        .transpose()?;
    let attach = config
        .portal
        .map(|portal| {
            Attach::new(
                portal,
                &config.credentials,
                config.instance.name.clone(),
                config.stage,
                config.labels.clone(),
            )
        })
        .transpose()?;
    Ok((server, attach))
}

/// Opens the instance (starting its recorded generation) and binds the endpoint
/// (the listener, the client that dials the portal, or both).
pub async fn bind(config: ShellConfig) -> Result<Bound, ShellError> {
    check(&config)?;
    let (server, attach) = endpoints(&config)?;
    let client = Client::new(&config.credentials, config.repo)?;
    let instance =
        Instance::open_healing(config.instance.clone(), Some((&client, config.repo))).await?;
    Ok(build(config, server, attach, client, instance).await)
}

/// Binds the endpoint for an instance taken over: the old shell's listener
/// goes away with it, so its address is tried again for a while.
async fn assemble(config: ShellConfig, instance: Instance) -> Result<Bound, ShellError> {
    let deadline = std::time::Instant::now() + crate::instance::STATE_WAIT;
    let (server, attach) = loop {
        match endpoints(&config) {
            Ok(e) => break e,
            Err(e) if std::time::Instant::now() >= deadline => return Err(e),
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
        }
    };
    let client = Client::new(&config.credentials, config.repo)?;
    Ok(build(config, server, attach, client, instance).await)
}

async fn build(
    config: ShellConfig,
    server: Option<Server>,
    attach: Option<Attach>,
    client: Client,
    instance: Instance,
) -> Bound {
    let name = config.instance.name.to_string();
    let root = config.instance.root.clone();
    let status = InstanceStatus {
        instance: name.clone(),
        stage: config.stage.to_string(),
        image: None,
        services: BTreeMap::new(),
        queued: 0,
        upgrading: false,
        generation: 0,
        strategy: config.strategy,
        lifecycle: Vec::new(),
        last_failure: None,
        overlays: Overlays::new(),
    };
    let lifecycle = instance.lifecycle();
    let deployments = Deployments::new(instance.state().clone());
    let service = Arc::new(ShellService {
        instance: Mutex::new(instance),
        root,
        name,
        stage: config.stage,
        attached: attach.is_some(),
        deployments,
        repo_addr: config.repo,
        client,
        queued: AtomicU32::new(0),
        upgrading: AtomicBool::new(false),
        status: std::sync::Mutex::new(status),
        strategy: config.strategy,
        lifecycle,
        logs: std::sync::Mutex::default(),
        tasks: TaskTracker::new(),
        cancel: CancellationToken::new(),
        handed: AtomicBool::new(false),
        listen: server.as_ref().and_then(|s| s.local_addr().ok()),
    });
    service.refresh(&*service.instance.lock().await);
    let takeover = match crate::process::keeper() {
        Some(_) => takeover::listen(&service.root),
        None => None,
    };
    Bound {
        server,
        attach,
        service,
        takeover,
    }
}

/// How [`Bound::serve`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Served {
    /// Shut down: every service was stopped.
    Stopped,
    /// Handed over to a shell that took over: every service runs on.
    HandedOver,
}

impl Bound {
    /// The command address actually bound; [`ShellError::NoListener`] for a
    /// shell that takes commands only from its portal.
    pub fn local_addr(&self) -> Result<SocketAddr, ShellError> {
        match &self.server {
            Some(server) => Ok(server.local_addr()?),
            None => Err(ShellError::NoListener {
                instance: self.service.name.clone(),
            }),
        }
    }

    /// The portal the shell attaches to, if any.
    pub fn portal(&self) -> Option<SocketAddr> {
        self.attach.as_ref().map(Attach::portal)
    }

    /// Serves until `shutdown` — on its listener, and over the connection it
    /// keeps to its portal ([`crate::attach`]) — then stops every service
    /// process; or until a new shell took the instance over (a shell whose
    /// services a keeper holds listens for that: [`take_over`]), leaving
    /// them running.
    ///
    /// At shutdown: an upgrade in progress is cancelled — it starts no further
    /// step before its record and undoes what it did (one past its record
    /// completes) — and waited for; then every service stops.
    pub async fn serve(self, shutdown: CancellationToken) -> Served {
        info!(
            instance = %self.service.name,
            stage = %self.service.stage,
            portal = ?self.attach.as_ref().map(Attach::portal),
            "shell serving"
        );
        let service = self.service;
        let cancel = service.cancel.clone();
        // Cancelled at shutdown, and by a takeover.
        let stop = shutdown.child_token();
        let commands = Arc::new(Commands(service.clone()));
        let listening = async {
            if let Some(server) = self.server {
                server.serve(commands, stop.clone()).await;
            }
        };
        let attached = async {
            if let Some(attach) = self.attach {
                attach.run(service.clone(), stop.clone()).await;
            }
        };
        let held = async {
            match self.takeover {
                Some(listener) => takeover::hold(listener, service.clone(), stop.clone()).await,
                None => false,
            }
        };
        let (_, _, handed, ()) = tokio::join!(listening, attached, held, async {
            stop.cancelled().await;
            cancel.cancel();
        });
        service.tasks.close();
        service.tasks.wait().await;
        if handed {
            info!(instance = %service.name, "handed over; the services run on");
            return Served::HandedOver;
        }
        service.instance.lock().await.stop_all().await;
        Served::Stopped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_follow_and_stages_parse() {
        assert!("production".parse::<Stage>().is_ok());
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("service.log");
        std::fs::write(&log, "one\ntwo\nthree\n").unwrap();
        let (text, next) = read_log(&log, 2, None, None).unwrap();
        assert_eq!((text.as_str(), next), ("two\nthree", 14));
        std::fs::write(&log, "one\ntwo\nthree\nfour\n").unwrap();
        assert_eq!(
            read_log(&log, 2, Some(next), None).unwrap(),
            ("four\n".to_owned(), 19)
        );
        // After a rotation the file is shorter: follow from its start.
        std::fs::write(&log, "new\n").unwrap();
        assert_eq!(
            read_log(&log, 2, Some(19), None).unwrap(),
            ("new\n".to_owned(), 4)
        );
        // --since keeps the lines stamped at or after it, with their
        // unstamped continuation lines.
        std::fs::write(
            &log,
            "2026-12-01T10:00:00.000Z old\n\
             2026-12-01T10:05:00.000Z new\n\
             traceback line\n\
             2026-12-01T10:06:30.500Z newer\n",
        )
        .unwrap();
        let since = 1_796_119_500; // 2026-12-01T10:05:00Z
        assert_eq!(
            image_spec::Timestamp::from_unix_seconds(since).to_string(),
            "2026-12-01T10:05:00Z"
        );
        let (text, _) = read_log(&log, 10, None, Some(since)).unwrap();
        assert_eq!(
            text,
            "2026-12-01T10:05:00.000Z new\ntraceback line\n2026-12-01T10:06:30.500Z newer"
        );
        assert!("prod".parse::<Stage>().is_err());
    }
}
