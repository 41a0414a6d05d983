//! The upgrade as the executor's runtime: each step of a plan carried out on the
//! instance, and each step's undo.
//!
//! [`Instance::survey`] gathers what the planner decides from (the running
//! services, and for each changed one its diff, the bytes to fetch and the
//! facts of its new `service.toml`); [`crate::plan::plan`] turns that into the
//! steps; [`Upgrade`] carries them out for [`crate::executor::execute`], holding
//! between steps what they made: staged and sealed releases, new processes
//! started but not yet serving, old processes replaced but not yet stopped, held
//! services' old releases, plugins' previous libraries. Each undo puts back what
//! its step changed, using what is held here.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use image_spec::{CommitId, ImageId, ImageName, ServiceName};
use repo_client::RepoClient;
use tracing::{info, warn};
use wire::plan::{Step, StepKind};

use super::{Instance, Progress, Service, UpgradeError, routes};
use crate::executor::{Done, Runtime};
use crate::install::{self, InstallContext, Installed, Made, Prepared};
use crate::plan::{Facts, Incoming, PortOffset, Running, Survey};
use crate::release::Staging;
use crate::state::{InstalledState, ServiceState};

/// What a survey found beside the planner's input: how to install each changed
/// service.
pub(super) type Preparations = BTreeMap<ServiceName, Prepared>;

impl Instance {
    /// How this instance numbers public ports, for the planner.
    pub(super) fn port_offset(&self) -> PortOffset {
        match self.config.public_ports {
            super::PublicPorts::Offset(off) => PortOffset::Add(off),
            super::PublicPorts::Ephemeral => PortOffset::Ephemeral,
        }
    }

    /// Gathers the planner's input for bringing the instance to `target`: asks
    /// the repository for each changed service's diff, and reads its new
    /// `service.toml` (fetching that one blob into the cache if needed).
    pub(super) async fn survey(
        &self,
        repo: &RepoClient,
        target: &BTreeMap<ServiceName, CommitId>,
        strategy: wire::shell::Strategy,
    ) -> Result<(Survey, Preparations), UpgradeError> {
        let offset = self.port_offset();
        let mut survey = Survey {
            strategy,
            generation: self.state.next_generation()?,
            running: BTreeMap::new(),
            target: BTreeMap::new(),
        };
        for (name, s) in &self.services {
            survey.running.insert(
                name.clone(),
                Running {
                    commit: s.installed.commit,
                    facts: Facts::of(&s.manifest, offset)?,
                },
            );
        }
        let logs = self.config.root.join("logs");
        let ctx = self.install_context(repo, &logs);
        let mut prepared = Preparations::new();
        for (name, commit) in target {
            let current = self.services.get(name);
            if let Some(s) = current.filter(|s| s.installed.commit == *commit) {
                survey.target.insert(
                    name.clone(),
                    Incoming {
                        commit: *commit,
                        facts: Facts::of(&s.manifest, offset)?,
                        fetch: None,
                    },
                );
                continue;
            }
            let installing = |e| UpgradeError::Install {
                service: name.clone(),
                source: Box::new(e),
            };
            let p = install::prepare(&ctx, name, *commit, current.map(|s| &s.installed), |id| {
                self.tree_of(&self.config.root, id).ok()
            })
            .await
            .map_err(installing)?;
            let manifest = install::manifest(&ctx, &p).await.map_err(installing)?;
            let fetch = match &p.source {
                install::Source::Sealed(_) => None,
                install::Source::Diff { .. } => {
                    let (missing, bytes) = p.missing(&self.cache);
                    Some((missing.len() as u64, bytes))
                }
            };
            survey.target.insert(
                name.clone(),
                Incoming {
                    commit: *commit,
                    facts: Facts::of(&manifest, offset)?,
                    fetch,
                },
            );
            prepared.insert(name.clone(), p);
        }
        Ok((survey, prepared))
    }

    pub(super) fn install_context<'a>(
        &'a self,
        repo: &'a RepoClient,
        logs: &'a std::path::Path,
    ) -> InstallContext<'a> {
        InstallContext {
            repo,
            cache: &self.cache,
            releases: &self.releases,
            instance: &self.config.name,
            logs,
        }
    }
}

/// An upgrade being carried out (see the module docs).
pub(super) struct Upgrade<'a> {
    pub(super) instance: &'a mut Instance,
    pub(super) repo: &'a RepoClient,
    pub(super) prepared: Preparations,
    /// The services of the target.
    pub(super) target: BTreeSet<ServiceName>,
    pub(super) image: Option<(ImageName, ImageId)>,
    pub(super) reason: &'a str,
    pub(super) progress: Progress<'a>,
    /// Blobs fetched for each service's new release.
    fetched: BTreeMap<ServiceName, std::collections::BTreeSet<image_spec::BlobId>>,
    /// Releases staged, waiting for their build.
    staged: BTreeMap<ServiceName, (Staging, Installed)>,
    /// Releases sealed, ready to start.
    releases: BTreeMap<ServiceName, Installed>,
    /// New processes started, not yet serving.
    fresh: BTreeMap<ServiceName, Service>,
    /// Old processes a cutover replaced, still running.
    old: BTreeMap<ServiceName, Service>,
    /// Services whose ports a cutover opened (they had none).
    opened: BTreeSet<ServiceName>,
    /// Held services: the release, data and log their stopped old process
    /// had.
    held: BTreeMap<ServiceName, (Installed, Option<PathBuf>, PathBuf)>,
    /// Plugins swapped: the release each ran before.
    swapped: BTreeMap<ServiceName, Installed>,
    /// Each new process's startup: (until it ran, until it was healthy).
    pub(super) startup: BTreeMap<ServiceName, (std::time::Duration, std::time::Duration)>,
    /// The generation's number, for data copies.
    generation: u64,
    /// The overlays the generation records.
    pub(super) overlays: crate::state::Overlays,
}

impl<'a> Upgrade<'a> {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        instance: &'a mut Instance,
        repo: &'a RepoClient,
        prepared: Preparations,
        target: BTreeSet<ServiceName>,
        image: Option<(ImageName, ImageId)>,
        reason: &'a str,
        generation: u64,
        progress: Progress<'a>,
    ) -> Self {
        Self {
            instance,
            repo,
            prepared,
            target,
            image,
            reason,
            progress,
            overlays: crate::state::Overlays::new(),
            fetched: BTreeMap::new(),
            staged: BTreeMap::new(),
            releases: BTreeMap::new(),
            fresh: BTreeMap::new(),
            old: BTreeMap::new(),
            opened: BTreeSet::new(),
            held: BTreeMap::new(),
            swapped: BTreeMap::new(),
            startup: BTreeMap::new(),
            generation,
        }
    }

    fn prepared(&self, service: &ServiceName) -> Result<&Prepared, UpgradeError> {
        self.prepared
            .get(service)
            .ok_or_else(|| UpgradeError::Manifest(format!("no survey for `{service}`")))
    }

    /// The release a new process of `service` starts from: the one this upgrade
    /// made, or (restarting an unchanged service) the one running.
    fn release_of(&self, service: &ServiceName) -> Result<Installed, UpgradeError> {
        self.releases
            .get(service)
            .or_else(|| self.instance.services.get(service).map(|s| &s.installed))
            .cloned()
            .ok_or_else(|| UpgradeError::Manifest(format!("no release of `{service}` to start")))
    }

    fn installing(
        service: &ServiceName,
    ) -> impl FnOnce(install::InstallError) -> UpgradeError + '_ {
        move |e| UpgradeError::Install {
            service: service.clone(),
            source: Box::new(e),
        }
    }

    async fn cutover(&mut self, services: &[ServiceName]) -> Result<(), UpgradeError> {
        // Ports the services do not have yet open first: they hold until the
        // routing table below points them somewhere.
        let mut opened = Vec::new();
        for name in services {
            let Some(new) = self.fresh.get(name) else {
                return Err(UpgradeError::Manifest(format!("`{name}` was not started")));
            };
            if self.instance.has_fronts(name) {
                continue;
            }
            if let Err(e) = self.instance.open_fronts(name, new).await {
                for n in opened {
                    self.instance.close_fronts(&n).await;
                }
                return Err(e);
            }
            opened.push(name.clone());
        }
        // Every service moves in one change of the routing table.
        let mut changes = Vec::new();
        for name in services {
            if let Some(new) = self.fresh.get(name) {
                changes.extend(routes(name, new));
            }
        }
        self.instance.router.set(changes);
        for name in services {
            let Some(new) = self.fresh.remove(name) else {
                continue;
            };
            if let Some(old) = self.instance.services.insert(name.clone(), new) {
                self.old.insert(name.clone(), old);
            }
        }
        self.opened.extend(opened);
        crate::crash::point("after-switch");
        Ok(())
    }

    async fn route_back(&mut self, services: &[ServiceName]) {
        let mut changes = Vec::new();
        for name in services {
            match self.old.get(name) {
                Some(old) => changes.extend(routes(name, old)),
                // Held (its old process is stopped): hold again until the
                // hold's undo starts it.
                None => {
                    if let Some(new) = self.instance.services.get(name) {
                        changes.extend(routes(name, new).into_iter().map(|(k, _)| (k, None)));
                    }
                }
            }
        }
        self.instance.router.set(changes);
        for name in services.iter().rev() {
            if self.opened.remove(name) {
                self.instance.close_fronts(name).await;
            }
            let new = match self.old.remove(name) {
                Some(old) => self.instance.services.insert(name.clone(), old),
                None => self.instance.services.remove(name),
            };
            if let Some(new) = new {
                self.fresh.insert(name.clone(), new);
            }
        }
    }

    fn record(&mut self, generation: u64) -> Result<(), UpgradeError> {
        let instance = &mut *self.instance;
        let kept = |n: &ServiceName| self.target.contains(n);
        let state = InstalledState {
            image: self.image.clone(),
            services: instance
                .services
                .iter()
                .filter(|(n, _)| kept(n))
                .map(|(n, s)| {
                    (
                        n.clone(),
                        ServiceState {
                            commit: s.installed.commit,
                            tree: s.installed.tree.id(),
                            release: s.installed.dir.clone(),
                        },
                    )
                })
                .collect(),
        };
        let data: crate::state::DataDirs = instance
            .services
            .iter()
            .filter(|(n, _)| kept(n))
            .filter_map(|(n, s)| Some((n.clone(), s.data.clone()?)))
            .collect();
        crate::crash::point("before-record");
        instance
            .state
            .record_generation(generation, &state, self.reason, &data, &self.overlays)?;
        instance.data_dirs = data;
        crate::crash::point("after-record");
        Ok(())
    }
}

impl Runtime for Upgrade<'_> {
    type Error = UpgradeError;

    async fn run(&mut self, step: &Step) -> Result<Done, UpgradeError> {
        let progress = self.progress;
        match step {
            Step::Fetch { service, .. } => {
                let logs = self.instance.config.root.join("logs");
                let ctx = self.instance.install_context(self.repo, &logs);
                let p = self.prepared(service)?;
                let (fetched, bytes) = install::fetch(&ctx, p)
                    .await
                    .map_err(Self::installing(service))?;
                self.fetched
                    .insert(service.clone(), fetched.into_iter().collect());
                return Ok(Done { bytes: Some(bytes) });
            }
            Step::Release { service, .. } => {
                let fresh = self.fetched.remove(service).unwrap_or_default();
                let logs = self.instance.config.root.join("logs");
                let ctx = self.instance.install_context(self.repo, &logs);
                let p = self.prepared(service)?;
                let (made, _, _) = install::make_release_healing(&ctx, p, &fresh)
                    .await
                    .map_err(Self::installing(service))?;
                self.instance.store_tree(&p.tree)?;
                match made {
                    Made::Sealed(i) => {
                        self.releases.insert(service.clone(), i);
                    }
                    Made::Staged(stage, i) => {
                        self.staged.insert(service.clone(), (stage, i));
                    }
                }
            }
            Step::Build { service, .. } => {
                let (stage, installed) = self.staged.remove(service).ok_or_else(|| {
                    UpgradeError::Manifest(format!("no staged release of `{service}` to build"))
                })?;
                let logs = self.instance.config.root.join("logs");
                let ctx = self.instance.install_context(self.repo, &logs);
                let sealed = install::build_and_seal(&ctx, service, stage, installed)
                    .await
                    .map_err(Self::installing(service))?;
                self.releases.insert(service.clone(), sealed);
            }
            Step::Start {
                service, copy_data, ..
            } => {
                let installed = self.release_of(service)?;
                let data = self
                    .instance
                    .data_copy(*copy_data, self.generation, service, &installed, progress)
                    .await?;
                let log = self.instance.log_path(service, self.generation);
                let new = self
                    .instance
                    .start_on(service, installed, data, log)
                    .await?;
                self.startup.insert(service.clone(), new.startup);
                self.fresh.insert(service.clone(), new);
            }
            Step::Hold { service } => {
                let held: Vec<_> = self
                    .instance
                    .fronts
                    .keys()
                    .filter(|(svc, _)| svc == service)
                    .map(|(svc, port)| (super::route_key(svc, port), None))
                    .collect();
                self.instance.router.set(held);
                if let Some(old) = self.instance.services.remove(service) {
                    let kept = (old.installed.clone(), old.data.clone(), old.log.clone());
                    old.process.stop().await;
                    self.held.insert(service.clone(), kept);
                }
            }
            Step::PreSwap { service } => match self.fresh.get(service) {
                Some(new) => {
                    self.instance
                        .pre_swap(service, new.hook_target(), progress)
                        .await?
                }
                None => {
                    let installed = self.release_of(service)?;
                    self.instance
                        .plugin_pre_swap(service, &installed, progress)
                        .await?
                }
            },
            Step::SwapPlugin { service, .. } => {
                let installed = self.release_of(service)?;
                let previous = self.instance.swap_plugin(service, installed).await?;
                self.swapped.insert(service.clone(), previous);
            }
            Step::Cutover { services } => self.cutover(services).await?,
            Step::Record { generation } => self.record(*generation)?,
            Step::Drain { service } => {
                if let Some(old) = self.old.get(service) {
                    self.instance.drain(service, old).await;
                }
            }
            Step::StopOld { service } => {
                if let Some(old) = self.old.remove(service) {
                    old.process.stop().await;
                }
            }
            Step::Remove { service } => {
                if let Some(gone) = self.instance.services.remove(service) {
                    self.instance.close_fronts(service).await;
                    gone.process.stop().await;
                }
            }
            Step::PostSwap { service } => self.instance.post_swap_one(service).await?,
        }
        Ok(Done::default())
    }

    async fn undo(&mut self, step: &Step) {
        match step {
            Step::Release { service, .. } => {
                if let Some((stage, _)) = self.staged.remove(service)
                    && let Err(e) = stage.abandon()
                {
                    warn!(service = %service, error = %e, "could not remove an unsealed release");
                }
            }
            Step::Start { service, .. } => {
                if let Some(new) = self.fresh.remove(service) {
                    new.process.stop().await;
                }
            }
            Step::Hold { service } => {
                let Some((installed, data, log)) = self.held.remove(service) else {
                    return;
                };
                match self.instance.start_on(service, installed, data, log).await {
                    Ok(old) => {
                        if let Err(e) = self.instance.expose(service, &old).await {
                            warn!(service = %service, error = %e, "could not reopen the ports of the previous release");
                        }
                        self.instance.services.insert(service.clone(), old);
                        info!(service = %service, "the previous release runs again");
                    }
                    Err(e) => {
                        warn!(service = %service, error = %e, "the previous release did not come back")
                    }
                }
            }
            Step::SwapPlugin { service, .. } => {
                if let Some(previous) = self.swapped.remove(service)
                    && let Err(e) = self.instance.swap_plugin(service, previous).await
                {
                    warn!(service = %service, error = %e, "could not swap a plugin back");
                }
            }
            Step::Cutover { services } => self.route_back(services).await,
            Step::Fetch { .. }
            | Step::Build { .. }
            | Step::PreSwap { .. }
            | Step::Record { .. }
            | Step::Drain { .. }
            | Step::StopOld { .. }
            | Step::Remove { .. }
            | Step::PostSwap { .. } => {}
        }
    }

    fn injected(&self, kind: StepKind) -> UpgradeError {
        UpgradeError::Injected { after: kind }
    }

    fn cancelled(&self, _index: usize) -> UpgradeError {
        UpgradeError::Cancelled
    }
}
