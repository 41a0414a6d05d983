//! The instance: its running generation, and the upgrade.
//!
//! An [`Instance`] owns, for each installed service, what runs it (a supervised
//! process, or a plugin host), its data directory (`$MOLT_DATA`, outside the
//! releases) and the fronts of its public ports, all routed by one [`Router`].
//! [`Instance::upgrade_with`] brings it to a set of commits the way DESIGN.md's
//! upgrade does: it surveys what runs and what must (`instance/upgrade.rs`),
//! has [`crate::plan::plan`] decide the exact steps for the [`Strategy`], and
//! has [`crate::executor::execute`] carry them out on
//! `instance/upgrade.rs`'s runtime, which undoes every done step on a failure
//! before the record. This module holds what the steps act on: starting a
//! service (process or plugin) and waiting for its health, its environment,
//! log and data directory, its public ports, draining, pruning, status.
//!
//! [`Instance::open`] starts what the recorded state says, from the sealed
//! releases (verified against their trees), so a restarted shell comes back to
//! exactly the recorded generation; a process that fails at boot stays
//! supervised and is reported, and an open that fails stops what it started.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use front::{Front, FrontConfig, Router, bind_http, bind_tcp};
use image_spec::manifest::{PortSpec, Protocol, ServiceKind};
use image_spec::{
    BlobId, CommitId, ImageId, ImageName, InstanceName, MANIFEST_FILE, ServiceManifest, ServiceName,
};
use repo_client::RepoClient;
use tracing::{info, warn};

use crate::env::ServiceEnv;
use crate::executor::{Fault, execute};
use crate::health::{self, HealthError};
use crate::install::{BlobCache, InstallError, Installed};
pub use crate::lifecycle::Lifecycle;
use crate::plan::PlanError;
use crate::plugin::PluginHost;
use crate::process::ProcessSpec;
use crate::release::{ReleaseError, Releases, verify};
use crate::state::{InstalledState, State, StateError};
use crate::supervisor::{Monitor, ProcessState, ProcessStatus, StopPlan, Supervised, supervise};
use wire::plan::{Action, Step, StepEvent, StepKind, StepTime, UpgradePlan};
pub use wire::shell::Strategy;

mod data;
mod handover;
mod hooks;
mod upgrade;

pub use handover::{PLUGIN_IDLE_WAIT, STATE_WAIT, Taken};

use upgrade::Upgrade;

/// How many releases of each service are kept on disk (besides the running and
/// the previous generation's, which are always kept).
pub const KEEP_RELEASES: usize = 5;

/// How many generations' process logs are kept per service (besides the
/// running process's).
pub const KEEP_LOGS: usize = 10;

/// How public ports are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublicPorts {
    /// The port in `service.toml` plus this offset (several instances on one host).
    Offset(u16),
    /// Any free port (tests); see [`Instance::public_addr`].
    Ephemeral,
}

/// How to run an instance.
#[derive(Debug, Clone)]
pub struct InstanceConfig {
    /// The instance's name.
    pub name: InstanceName,
    /// Its root directory (state, cache, releases, logs).
    pub root: PathBuf,
    /// How public ports are chosen.
    pub public_ports: PublicPorts,
    /// The address the public ports listen on ([`LOOPBACK`] unless the
    /// instance serves other hosts, e.g. `0.0.0.0`).
    pub public_ip: std::net::IpAddr,
}

/// The default address of public ports: this host only.
pub const LOOPBACK: std::net::IpAddr = std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

/// Why an instance could not open or upgrade.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    /// The recorded state could not be read or written.
    #[error(transparent)]
    State(#[from] StateError),
    /// A release could not be made or verified.
    #[error(transparent)]
    Release(#[from] ReleaseError),
    /// A recorded release is not what its tree says and could not be healed
    /// from the repository; it was not started.
    #[error("the release of `{service}` is corrupt ({files}) and could not be healed: {why}")]
    Corrupt {
        /// The service.
        service: ServiceName,
        /// The files that differ, named.
        files: String,
        /// Why healing failed.
        why: String,
    },
    /// Installing a service failed (fetch, release, build); nothing was started.
    #[error("service `{service}`: {source}")]
    Install {
        /// The service.
        service: ServiceName,
        /// What failed.
        source: Box<InstallError>,
    },
    /// A new process did not become healthy; every switched service went back.
    #[error(
        "service `{service}` did not become healthy (the shell expected it to listen on {listen}, given as $PORT): {source}\nlast lines of its log:\n{log_tail}"
    )]
    Unhealthy {
        /// The service.
        service: ServiceName,
        /// Where it was expected to listen (its first port).
        listen: String,
        /// The health check's verdict.
        source: Box<HealthError>,
        /// The last lines of its log.
        log_tail: String,
    },
    /// A new process exited while it was starting; every switched service
    /// went back.
    #[error(
        "service `{service}` exited while starting ({status})\nlast lines of its log:\n{log_tail}"
    )]
    Exited {
        /// The service.
        service: ServiceName,
        /// How it ended (`exit status: 3`).
        status: String,
        /// The last lines of its log.
        log_tail: String,
    },
    /// A file operation failed.
    #[error("`{path}`: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A release's `service.toml` is invalid.
    #[error("{0}")]
    Manifest(String),
    /// A plugin could not be loaded, started or swapped; the old one serves on.
    #[error("service `{service}`: {source}")]
    Plugin {
        /// The service.
        service: ServiceName,
        /// What failed.
        source: Box<crate::plugin::PluginError>,
    },
    /// The upgrade cannot be planned (two services on one public port, say);
    /// nothing was changed.
    #[error(transparent)]
    Plan(#[from] PlanError),
    /// The upgrade was cancelled (the shell is shutting down) before its
    /// record; what it had done was undone.
    #[error("the upgrade was cancelled (the shell is stopping); nothing changed")]
    Cancelled,
    /// A failure injected on purpose ([`UpgradeOptions::fault`]).
    #[error("a failure injected after the {after} step")]
    Injected {
        /// The kind of step it followed.
        after: StepKind,
    },
    /// A hook (`pre_swap`) failed; the new generation never took traffic.
    #[error("service `{service}`: its {hook} hook failed: {source}")]
    Hook {
        /// The service.
        service: ServiceName,
        /// Which hook.
        hook: String,
        /// How it failed (with its log's tail).
        source: Box<crate::build::BuildError>,
    },
}

/// One service of the running generation.
struct Service {
    installed: Installed,
    manifest: ServiceManifest,
    /// Internal port per port name.
    ports: BTreeMap<String, u16>,
    process: Runner,
    /// Until the process ran, and then until it was healthy.
    startup: (Duration, Duration),
    /// Its data directory (`$MOLT_DATA`), if it declares data.
    data: Option<PathBuf>,
    /// Where its process writes its output (a plugin: its host's notes).
    log: PathBuf,
    /// Why its start failed, for a process started at boot that did not get
    /// healthy (it stays supervised and is retried by its restart policy).
    failed_start: Option<String>,
}

impl Service {
    fn backend(&self, port: &str) -> Option<SocketAddr> {
        self.ports
            .get(port)
            .map(|p| SocketAddr::from(([127, 0, 0, 1], *p)))
    }
}

/// Told each step of an upgrade as it happens: the service it is about (if any)
/// and what is happening.
pub type Progress<'a> = &'a (dyn Fn(Option<&ServiceName>, &str) + Send + Sync);

/// What runs a service: a supervised child process, or a plugin library
/// served inside the shell.
enum Runner {
    /// A child process.
    Process(Supervised),
    /// A plugin, served on a loopback port by the shell itself.
    Plugin {
        /// Its host (which swaps libraries in place).
        host: PluginHost,
        /// When it was loaded first.
        since: std::time::Instant,
        /// Its health check, probed every interval.
        health: crate::supervisor::HealthWatch,
    },
}

impl Runner {
    /// Stops the process, or unloads the plugin.
    async fn stop(self) {
        match self {
            Runner::Process(p) => {
                p.stop().await;
            }
            Runner::Plugin { host, .. } => host.shutdown().await,
        }
    }

    /// The process's status; a plugin runs in the shell's own process.
    fn status(&self) -> ProcessStatus {
        match self {
            Runner::Process(p) => p.status(),
            Runner::Plugin { since, health, .. } => ProcessStatus {
                state: ProcessState::Running {
                    pid: std::process::id(),
                    since: *since,
                },
                restarts: 0,
                health: health.health(),
                last_exit: None,
            },
        }
    }

    fn plugin(&self) -> Option<&PluginHost> {
        match self {
            Runner::Plugin { host, .. } => Some(host),
            Runner::Process(_) => None,
        }
    }
}

/// What an upgrade did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UpgradeReport {
    /// Services started anew (changed or added).
    pub restarted: Vec<ServiceName>,
    /// Services left running untouched.
    pub unchanged: Vec<ServiceName>,
    /// Services stopped because the target no longer has them.
    pub removed: Vec<ServiceName>,
    /// The generation recorded (none if nothing changed).
    pub generation: Option<u64>,
    /// Where each restarted service's upgrade spent its time.
    pub steps: BTreeMap<ServiceName, StepTimings>,
    /// The plan carried out.
    pub plan: UpgradePlan,
    /// Every step done, in order, with its time.
    pub timeline: Vec<StepTime>,
    /// Failures after the commit point, reported and kept.
    pub warnings: Vec<String>,
}

/// How an upgrade runs.
#[derive(Debug, Clone, Default)]
pub struct UpgradeOptions {
    /// The strategy.
    pub strategy: Strategy,
    /// A failure to inject, to test and drill rollbacks (none in normal use).
    pub fault: Option<Fault>,
    /// Cancels the upgrade: no step before the record starts once it fires,
    /// and what was done is undone.
    pub cancel: tokio_util::sync::CancellationToken,
    /// Leave out the services' `pre_swap` and `post_swap` hooks.
    pub skip_hooks: bool,
    /// Keep at least this many releases of each service afterwards (at least
    /// [`KEEP_RELEASES`]), so a rollback that far back reuses them.
    pub keep_releases: Option<usize>,
    /// The overlays the new generation records: the services it runs at
    /// another commit than its image's, who pulled them and when (empty for
    /// an upgrade to an image).
    pub overlays: crate::state::Overlays,
}

/// Where one service's upgrade spent its time, step by step.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StepTimings {
    /// Diff and fetch of the missing blobs.
    pub fetch: Duration,
    /// The new release: files linked from the blob cache, the previous
    /// build's outputs copied.
    pub copy: Duration,
    /// The build command.
    pub build: Duration,
    /// From starting the process until it runs.
    pub start: Duration,
    /// From running until the first passing health probe.
    pub health: Duration,
    /// Switching its fronts to it.
    pub switch: Duration,
}

/// A running instance (see the module docs).
pub struct Instance {
    config: InstanceConfig,
    state: State,
    releases: Releases,
    cache: BlobCache,
    services: BTreeMap<ServiceName, Service>,
    fronts: BTreeMap<(ServiceName, String), Front>,
    /// Where each front sends new work.
    router: Router,
    /// The latest generations' phases, shared with whoever reports status.
    lifecycle: Arc<Lifecycle>,
    /// The data directories recorded with the current generation.
    data_dirs: crate::state::DataDirs,
    /// Deletes old releases and data directories in the background.
    reaper: crate::reaper::Reaper,
    /// Held (read) by an upgrade while it fetches into and links from the
    /// blob cache, (write) by the reaper's sweep of it.
    cache_lock: Arc<tokio::sync::RwLock<()>>,
    /// Recorded services not started at boot because their release is
    /// corrupt and could not be healed then (no repository): the others
    /// serve meanwhile, and the next upgrade heals and starts these first.
    held: BTreeMap<ServiceName, Held>,
}

/// A recorded service held back at boot (see [`Instance`]'s `held`).
#[derive(Debug)]
struct Held {
    installed: Installed,
    /// Why: the files that differ and why they could not be healed.
    why: String,
}

impl std::fmt::Debug for Instance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Instance")
            .field("name", &self.config.name)
            .field("services", &self.services.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> UpgradeError + '_ {
    move |source| UpgradeError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Appends a stamped note of the shell's to a service's log (a plugin has no
/// process of its own to write there).
fn note(log: &Path, text: &str) {
    use std::io::Write;
    let line = format!("{} molt: {text}\n", crate::process::stamp_now());
    let written = log
        .parent()
        .map_or(Ok(()), std::fs::create_dir_all)
        .and_then(|()| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)
        })
        .and_then(|mut f| f.write_all(line.as_bytes()));
    if let Err(e) = written {
        warn!(log = %log.display(), error = %e, "could not write to a service's log");
    }
}

/// A free loopback port, found by binding port 0 and letting it go.
fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The routing table's key for a service's port.
fn route_key(service: &ServiceName, port: &str) -> String {
    format!("{service}/{port}")
}

/// A service's routes: each of its ports to its process's internal port.
fn routes(name: &ServiceName, service: &Service) -> Vec<(String, Option<SocketAddr>)> {
    service
        .manifest
        .ports()
        .iter()
        .map(|p| (route_key(name, &p.name), service.backend(&p.name)))
        .collect()
}

/// The paths of the files a verification found bad, for messages.
fn files_of(bad: &[(image_spec::TreeEntry, crate::release::ReleaseError)]) -> String {
    bad.iter()
        .map(|(e, _)| e.path().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

fn read_manifest(release: &Path) -> Result<ServiceManifest, UpgradeError> {
    let path = release.join(MANIFEST_FILE);
    let text = std::fs::read_to_string(&path).map_err(io_err(&path))?;
    ServiceManifest::parse(&text)
        .map_err(|e| UpgradeError::Manifest(format!("{}: {e}", path.display())))
}

/// What a service's process is started and supervised with.
struct ProcessParts {
    spec: ProcessSpec,
    stop: StopPlan,
    monitor: Monitor,
}

impl ProcessParts {
    /// The parts for a process service (a plugin has none: an error).
    fn of(
        instance: &InstanceName,
        name: &ServiceName,
        installed: &Installed,
        manifest: &ServiceManifest,
        ports: &BTreeMap<String, u16>,
        data: Option<&Path>,
        log: &Path,
    ) -> Result<Self, UpgradeError> {
        let ServiceKind::Process { command } = manifest.kind() else {
            return Err(UpgradeError::Manifest(format!(
                "service `{name}` is a plugin, not a process"
            )));
        };
        let env = ServiceEnv {
            instance,
            service: name,
            commit: installed.commit,
            manifest,
            ports: Some(ports),
            data,
        }
        .vars();
        Ok(Self {
            spec: ProcessSpec {
                command: command.clone(),
                dir: installed.dir.clone(),
                env,
                log: log.to_owned(),
                log_limit: 10 << 20,
            },
            stop: StopPlan {
                signal: manifest.stop().signal,
                grace: manifest.stop().grace,
            },
            monitor: Monitor {
                check: manifest.health().clone(),
                ports: ports.clone(),
                dir: installed.dir.clone(),
            },
        })
    }
}

/// The tree recorded for a release, from the instance's tree store
/// (`ROOT/trees/<id>`, written when the release was installed; decoding
/// checks it).
fn read_tree(
    root: &Path,
    release: &Path,
    id: image_spec::TreeId,
) -> Result<image_spec::Tree, UpgradeError> {
    let path = root.join("trees").join(id.to_hex());
    let bytes = std::fs::read(&path).map_err(io_err(&path))?;
    let tree = image_spec::Tree::decode(&bytes).map_err(|e| {
        UpgradeError::Manifest(format!(
            "stored tree for `{}` is corrupt: {e}",
            release.display()
        ))
    })?;
    if tree.id() != id {
        return Err(UpgradeError::Manifest(format!(
            "stored tree for `{}` is not tree {id}",
            release.display()
        )));
    }
    Ok(tree)
}

/// Where a plugin's state waits between a shutdown (or a takeover) and the
/// next start.
fn plugin_state_path(root: &Path, name: &ServiceName) -> PathBuf {
    root.join("plugins").join(format!("{name}.state"))
}

/// Where a plugin service's loaded copies of its library live.
fn plugin_dir(root: &Path, name: &ServiceName) -> PathBuf {
    root.join("plugins").join(name.as_str())
}

/// Loads a plugin service's library (copied under `dir`) into a new host
/// with `state`, if any, and waits until it answers its health check. Every
/// port of the service leads to the host.
async fn plugin_service(
    dir: &Path,
    name: &ServiceName,
    installed: Installed,
    manifest: ServiceManifest,
    library: &image_spec::RelPath,
    log: PathBuf,
    state: Option<Vec<u8>>,
) -> Result<Service, UpgradeError> {
    let started = std::time::Instant::now();
    let built = installed.dir.join(library.as_str());
    let host = PluginHost::start(name.as_str(), &built, dir, state)
        .await
        .map_err(|source| UpgradeError::Plugin {
            service: name.clone(),
            source: Box::new(source),
        })?;
    let host_addr = host.local_addr();
    let port = host_addr.port();
    let ports: BTreeMap<String, u16> = manifest
        .ports()
        .iter()
        .map(|p| (p.name.clone(), port))
        .collect();
    let start = started.elapsed();
    if let Err(source) = health::wait_healthy(manifest.health(), &ports, &installed.dir).await {
        host.shutdown().await;
        return Err(UpgradeError::Unhealthy {
            service: name.clone(),
            listen: host_addr.to_string(),
            source: Box::new(source),
            log_tail: String::new(),
        });
    }
    info!(service = %name, commit = %installed.commit, "plugin healthy");
    note(
        &log,
        &format!(
            "plugin {} loaded, healthy, serving on {host_addr} inside the shell",
            installed.commit.short(12)
        ),
    );
    let health = crate::supervisor::HealthWatch::start(Monitor {
        check: manifest.health().clone(),
        ports: ports.clone(),
        dir: installed.dir.clone(),
    });
    Ok(Service {
        installed,
        manifest,
        ports,
        process: Runner::Plugin {
            host,
            since: started,
            health,
        },
        startup: (start, started.elapsed() - start),
        data: None,
        log,
        failed_start: None,
    })
}

impl Instance {
    /// Opens the instance at `config.root` and starts what its recorded state
    /// says; a recorded release found corrupt is held back, not started (see
    /// [`Instance::open_healing`]).
    pub async fn open(config: InstanceConfig) -> Result<Self, UpgradeError> {
        Self::open_healing(config, None).await
    }

    /// [`Instance::open`], healing a recorded release found corrupt from the
    /// repository at `repo` (reached with the client, only if needed): the
    /// blobs of the files that differ are taken out of the blob cache (which
    /// may share their bad bytes), fetched anew and verified, put back in
    /// place of the bad files, and the release verified again before its
    /// service starts. The bad bytes never serve: a release that cannot be
    /// healed now (no repository, or it cannot be reached) is held back, its
    /// service not started and shown held by `status`, while the others serve;
    /// the next upgrade heals and starts it before anything else.
    pub async fn open_healing(
        config: InstanceConfig,
        repo: Option<(&wire::Client, SocketAddr)>,
    ) -> Result<Self, UpgradeError> {
        let root = &config.root;
        let state = State::open(&root.join("state"))?;
        let (releases, removed) = Releases::open(&root.join("releases"))?;
        for r in removed {
            info!(release = %r.display(), "removed a half-made release");
        }
        let cache = BlobCache::open(&root.join("cache")).map_err(io_err(&root.join("cache")))?;
        let mut instance = Self {
            config,
            state,
            releases,
            cache,
            services: BTreeMap::new(),
            fronts: BTreeMap::new(),
            router: Router::new(),
            lifecycle: Arc::default(),
            data_dirs: Default::default(),
            reaper: crate::reaper::Reaper::start(),
            cache_lock: Arc::default(),
            held: BTreeMap::new(),
        };
        // What was started before a failure is stopped again: nothing is left
        // running by an open that failed.
        match instance.start_recorded(repo).await {
            Ok(()) => {
                for retired in instance.releases.retired() {
                    instance.reaper.remove(retired);
                }
                instance.prune_data();
                Ok(instance)
            }
            Err(e) => {
                instance.shutdown().await;
                Err(e)
            }
        }
    }

    /// Starts the recorded generation. A process that does not get healthy (or
    /// exits) at boot does not stop the others: it stays under its supervisor,
    /// retried by its restart policy, and `status` shows it failed.
    async fn start_recorded(
        &mut self,
        repo: Option<(&wire::Client, SocketAddr)>,
    ) -> Result<(), UpgradeError> {
        let recorded = self.state.installed()?;
        let (_, generation) = self.recorded()?;
        self.data_dirs = self.state.data_dirs(generation)?;
        let mut connected = None;
        for (name, s) in &recorded.services {
            let tree = self.tree_of(&s.release, s.tree)?;
            let installed = Installed {
                commit: s.commit,
                tree,
                dir: s.release.clone(),
            };
            if let Err(e) = self.heal(name, &installed, repo, &mut connected).await {
                // The bad bytes never serve, and the others still do: this
                // one waits for the next upgrade, which heals it first.
                tracing::error!(service = %name, error = %e, "holding back a corrupt release");
                self.held.insert(
                    name.clone(),
                    Held {
                        installed,
                        why: e.to_string(),
                    },
                );
                continue;
            }
            self.start_recorded_service(name, installed, generation)
                .await?;
        }
        if let Some(c) = connected {
            c.connection().close();
        }
        if generation > 0 {
            self.lifecycle.opened(generation);
        }
        Ok(())
    }

    /// Starts a recorded service at boot (or once healed) and opens its
    /// public ports.
    async fn start_recorded_service(
        &mut self,
        name: &ServiceName,
        installed: Installed,
        generation: u64,
    ) -> Result<(), UpgradeError> {
        let log = self.log_path(name, generation);
        let service = self.start_at_boot(name, installed, log).await?;
        self.expose(name, &service).await?;
        self.services.insert(name.clone(), service);
        Ok(())
    }

    /// Heals and starts the services held back at boot, before an upgrade
    /// plans anything; the first that cannot be healed fails the upgrade,
    /// naming its files.
    async fn heal_held(&mut self, repo: &RepoClient) -> Result<(), UpgradeError> {
        let names: Vec<ServiceName> = self.held.keys().cloned().collect();
        let (_, generation) = self.recorded()?;
        for name in names {
            let Some(held) = self.held.remove(&name) else {
                continue;
            };
            let dir = held.installed.dir.clone();
            let (d, t) = (dir.clone(), held.installed.tree.clone());
            let bad = tokio::task::spawn_blocking(move || crate::release::verify_all(&d, &t))
                .await
                .map_err(|e| io_err(&dir)(std::io::Error::other(e)))?;
            let healed = match bad.is_empty() {
                true => Ok(()),
                false => self.repair(&name, &held.installed, &bad, repo).await,
            };
            if let Err(e) = healed {
                self.held.insert(name, held);
                return Err(e);
            }
            info!(service = %name, "healed a release held back at boot; starting it");
            self.start_recorded_service(&name, held.installed, generation)
                .await?;
        }
        Ok(())
    }

    /// Verifies a recorded release (on a blocking thread: it reads every
    /// byte) and heals what differs from the repository (see
    /// [`Instance::open_healing`]), connecting to it the first time one is
    /// needed (`connected`).
    async fn heal(
        &self,
        name: &ServiceName,
        installed: &Installed,
        repo: Option<(&wire::Client, SocketAddr)>,
        connected: &mut Option<RepoClient>,
    ) -> Result<(), UpgradeError> {
        let dir = &installed.dir;
        let (d, t) = (dir.to_owned(), installed.tree.clone());
        let bad = tokio::task::spawn_blocking(move || crate::release::verify_all(&d, &t))
            .await
            .map_err(|e| io_err(dir)(std::io::Error::other(e)))?;
        if bad.is_empty() {
            return Ok(());
        }
        let corrupt = |why: String| UpgradeError::Corrupt {
            service: name.clone(),
            files: files_of(&bad),
            why,
        };
        let Some((client, addr)) = repo else {
            return Err(corrupt(format!(
                "{} (no repository to heal it from)",
                bad[0].1
            )));
        };
        if connected.is_none() {
            *connected = Some(
                RepoClient::connect(client, addr)
                    .await
                    .map_err(|e| corrupt(format!("cannot reach the repository: {e}")))?,
            );
        }
        let repo = connected.as_ref().expect("connected just above");
        self.repair(name, installed, &bad, repo).await
    }

    /// Heals the files `bad` of a recorded release from the repository: the
    /// blobs of the files that differ are taken out of the blob cache (which
    /// may share their bad bytes), fetched anew and verified, put back in
    /// place of the bad files, and the release verified again.
    async fn repair(
        &self,
        name: &ServiceName,
        installed: &Installed,
        bad: &[(image_spec::TreeEntry, crate::release::ReleaseError)],
        repo: &RepoClient,
    ) -> Result<(), UpgradeError> {
        let dir = &installed.dir;
        let files = files_of(bad);
        warn!(service = %name, %files, "a recorded release is corrupt; healing it");
        let corrupt = |why: String| UpgradeError::Corrupt {
            service: name.clone(),
            files: files.clone(),
            why,
        };
        let mut blobs: Vec<BlobId> = bad
            .iter()
            .filter(|(e, _)| e.link_target().is_none())
            .map(|(e, _)| e.blob())
            .collect();
        blobs.sort();
        blobs.dedup();
        for id in &blobs {
            self.cache
                .quarantine(id)
                .map_err(|e| corrupt(format!("cannot set the cache's copy aside: {e}")))?;
        }
        repo.fetch_blobs_to(&blobs, self.cache.dir())
            .await
            .map_err(|e| corrupt(format!("cannot fetch the files anew: {e}")))?;
        for (entry, _) in bad {
            crate::release::restore(dir, entry, &self.cache.path(&entry.blob()))
                .map_err(|e| corrupt(e.to_string()))?;
        }
        let (d, t) = (dir.to_owned(), installed.tree.clone());
        tokio::task::spawn_blocking(move || verify(&d, &t))
            .await
            .map_err(|e| io_err(dir)(std::io::Error::other(e)))?
            .map_err(|e| corrupt(e.to_string()))?;
        info!(service = %name, %files, "healed the release from the repository");
        Ok(())
    }

    /// The tree recorded for a release, from the instance's tree store
    /// (`ROOT/trees/<id>`, written when the release was installed; decoding checks
    /// it).
    fn tree_of(
        &self,
        release: &Path,
        id: image_spec::TreeId,
    ) -> Result<image_spec::Tree, UpgradeError> {
        read_tree(&self.config.root, release, id)
    }

    /// Stores a release's tree as `ROOT/trees/<id>`, durably
    /// ([`crate::durable::write_file`]), before anything records the release: a
    /// power loss never leaves a recorded release whose tree is missing or cut
    /// short, so `Instance::open` can always verify it.
    fn store_tree(&self, tree: &image_spec::Tree) -> Result<(), UpgradeError> {
        let dir = self.config.root.join("trees");
        if !dir.is_dir() {
            std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
            // The new directory's own entry, too.
            crate::durable::sync_dir(&self.config.root).map_err(io_err(&self.config.root))?;
        }
        let path = dir.join(tree.id().to_hex());
        crate::durable::write_file(&path, &tree.encode()).map_err(io_err(&path))
    }

    /// The instance's state database (a handle sharing it).
    pub fn state(&self) -> &State {
        &self.state
    }

    /// The generations' lifecycle, as a handle that stays readable while an
    /// upgrade holds the instance.
    pub fn lifecycle(&self) -> Arc<Lifecycle> {
        self.lifecycle.clone()
    }

    /// The public address of a service's port.
    pub fn public_addr(&self, service: &ServiceName, port: &str) -> Option<SocketAddr> {
        self.fronts
            .get(&(service.clone(), port.to_owned()))
            .map(Front::local_addr)
    }

    /// Where a service's port sends new work now: its process's internal address
    /// (benchmarks compare the front with a direct connection).
    pub fn backend_addr(&self, service: &ServiceName, port: &str) -> Option<SocketAddr> {
        self.router.get(&route_key(service, port))
    }

    /// The pid of a service's process, if running.
    pub fn pid(&self, service: &ServiceName) -> Option<u32> {
        self.services
            .get(service)
            .and_then(|s| match s.process.status().state {
                ProcessState::Running { pid, .. } => Some(pid),
                _ => None,
            })
    }

    /// The release directory a service runs from.
    pub fn release_dir(&self, service: &ServiceName) -> Option<&Path> {
        self.services
            .get(service)
            .map(|s| s.installed.dir.as_path())
    }

    /// The installed commit of each service.
    pub fn commits(&self) -> BTreeMap<ServiceName, CommitId> {
        self.services
            .iter()
            .map(|(n, s)| (n.clone(), s.installed.commit))
            .collect()
    }

    /// Where the processes of a service in generation `generation` write their
    /// output: `ROOT/logs/<service>/g<generation>.log` (every line stamped).
    pub(crate) fn log_path(&self, name: &ServiceName, generation: u64) -> PathBuf {
        self.config
            .root
            .join("logs")
            .join(name.as_str())
            .join(format!("g{generation}.log"))
    }

    /// Where each running service writes its output now.
    pub fn log_paths(&self) -> BTreeMap<ServiceName, PathBuf> {
        self.services
            .iter()
            .map(|(n, s)| (n.clone(), s.log.clone()))
            .collect()
    }

    /// The data directory a service uses unless told otherwise: the one it has
    /// now, else the one recorded, else `ROOT/data/<service>/live`.
    fn data_dir(&self, name: &ServiceName) -> PathBuf {
        self.services
            .get(name)
            .and_then(|s| s.data.clone())
            .or_else(|| self.data_dirs.get(name).cloned())
            .unwrap_or_else(|| {
                self.config
                    .root
                    .join("data")
                    .join(name.as_str())
                    .join("live")
            })
    }

    /// Starts a service's process from its release on the data directory
    /// `data` (default: [`Instance::data_dir`]), its output to `log`, and waits
    /// until it is healthy.
    async fn start_on(
        &self,
        name: &ServiceName,
        installed: Installed,
        data: Option<PathBuf>,
        log: PathBuf,
    ) -> Result<Service, UpgradeError> {
        self.start_service(name, installed, data, log, false).await
    }

    /// [`Instance::start_on`] at boot: a process that fails its start keeps
    /// running under its supervisor (which retries it by its restart policy)
    /// and is returned marked failed.
    async fn start_at_boot(
        &self,
        name: &ServiceName,
        installed: Installed,
        log: PathBuf,
    ) -> Result<Service, UpgradeError> {
        self.start_service(name, installed, None, log, true).await
    }

    async fn start_service(
        &self,
        name: &ServiceName,
        installed: Installed,
        data: Option<PathBuf>,
        log: PathBuf,
        keep_failed: bool,
    ) -> Result<Service, UpgradeError> {
        let manifest = read_manifest(&installed.dir)?;
        let data = if manifest.data().is_empty() {
            None
        } else {
            let dir = data.unwrap_or_else(|| self.data_dir(name));
            for path in manifest.data() {
                let sub = dir.join(path.as_str());
                std::fs::create_dir_all(&sub).map_err(io_err(&sub))?;
            }
            Some(dir)
        };
        let mut ports = BTreeMap::new();
        for p in manifest.ports() {
            let port = free_port().map_err(io_err(&installed.dir))?;
            ports.insert(p.name.clone(), port);
        }
        if let ServiceKind::Plugin { library } = manifest.kind() {
            let library = library.clone();
            return self
                .start_plugin(name, installed, manifest, &library, log)
                .await;
        }
        let parts = ProcessParts::of(
            &self.config.name,
            name,
            &installed,
            &manifest,
            &ports,
            data.as_deref(),
            &log,
        )?;
        let started = std::time::Instant::now();
        let process = Runner::Process(supervise(
            parts.spec,
            manifest.restart(),
            parts.stop,
            Some(parts.monitor),
        ));
        if let Runner::Process(p) = &process {
            let _ = p
                .watch()
                .wait_for(|s| !matches!(s.state, ProcessState::Backoff { .. }))
                .await;
        }
        let start = started.elapsed();
        // Healthy within the start grace — or a failure at once if the process
        // exits meanwhile.
        let exited = async {
            let Runner::Process(p) = &process else {
                return std::future::pending().await;
            };
            let mut watch = p.watch();
            match watch.wait_for(|s| s.last_exit.is_some()).await {
                Ok(s) => s.last_exit.clone().unwrap_or_default(),
                Err(_) => "its supervisor ended".to_owned(),
            }
        };
        let listen = format!(
            "127.0.0.1:{}",
            manifest
                .ports()
                .first()
                .and_then(|p| ports.get(&p.name))
                .map_or("-".to_owned(), |p| p.to_string())
        );
        let failed = tokio::select! {
            healthy = health::wait_healthy(manifest.health(), &ports, &installed.dir) => {
                healthy.err().map(|source| UpgradeError::Unhealthy {
                    service: name.clone(),
                    listen: listen.clone(),
                    source: Box::new(source),
                    log_tail: String::new(),
                })
            }
            status = exited => Some(UpgradeError::Exited {
                service: name.clone(),
                status,
                log_tail: String::new(),
            }),
        };
        let mut failed_start = None;
        if let Some(mut err) = failed {
            if keep_failed {
                warn!(service = %name, error = %err, "failed to start at boot; its supervisor retries it by its restart policy");
                failed_start = Some(err.to_string());
            } else {
                process.stop().await;
                let tail = crate::build::tail(&log, crate::build::TAIL_LINES);
                if let UpgradeError::Unhealthy { log_tail, .. }
                | UpgradeError::Exited { log_tail, .. } = &mut err
                {
                    *log_tail = tail;
                }
                return Err(err);
            }
        } else {
            info!(service = %name, commit = %installed.commit, "service healthy");
        }
        Ok(Service {
            installed,
            manifest,
            ports,
            process,
            startup: (start, started.elapsed() - start),
            data,
            log,
            failed_start,
        })
    }

    /// Loads a plugin service's library into a new host and waits until it
    /// answers its health check. Every port of the service leads to the host.
    async fn start_plugin(
        &self,
        name: &ServiceName,
        installed: Installed,
        manifest: ServiceManifest,
        library: &image_spec::RelPath,
        log: PathBuf,
    ) -> Result<Service, UpgradeError> {
        // The state a shutdown kept, taken up once and then removed; if the
        // plugin cannot take it, it stays for the operator and the start fails.
        let state_path = self.plugin_state_path(name);
        let kept = match std::fs::read(&state_path) {
            Ok(state) => Some(state),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                return Err(UpgradeError::Plugin {
                    service: name.clone(),
                    source: Box::new(crate::plugin::PluginError::Io {
                        path: state_path,
                        source: e,
                    }),
                });
            }
        };
        let resumed = kept.is_some();
        let service = plugin_service(
            &self.plugin_dir(name),
            name,
            installed,
            manifest,
            library,
            log,
            kept,
        )
        .await?;
        if resumed {
            info!(service = %name, "plugin resumed the state its last shutdown kept");
            if let Err(e) = std::fs::remove_file(&state_path) {
                warn!(service = %name, error = %e, "could not remove the taken-up plugin state");
            }
        }
        Ok(service)
    }

    /// Where a plugin service's loaded copies of its library live.
    fn plugin_dir(&self, name: &ServiceName) -> PathBuf {
        plugin_dir(&self.config.root, name)
    }

    /// Swaps a running plugin service to the library of `installed` in place,
    /// keeping its state and its port; returns the release it ran before.
    async fn swap_plugin(
        &mut self,
        name: &ServiceName,
        installed: Installed,
    ) -> Result<Installed, UpgradeError> {
        let manifest = read_manifest(&installed.dir)?;
        let ServiceKind::Plugin { library } = manifest.kind() else {
            return Err(UpgradeError::Manifest(format!(
                "service `{name}` is no longer a plugin"
            )));
        };
        let built = installed.dir.join(library.as_str());
        let service = self
            .services
            .get_mut(name)
            .ok_or_else(|| UpgradeError::Manifest(format!("service `{name}` is not running")))?;
        let host = service
            .process
            .plugin()
            .ok_or_else(|| UpgradeError::Manifest(format!("service `{name}` is not a plugin")))?;
        let swapped = host
            .swap(&built)
            .await
            .map_err(|source| UpgradeError::Plugin {
                service: name.clone(),
                source: Box::new(source),
            })?;
        info!(service = %name, pause = ?swapped.pause, "plugin swapped in place");
        note(
            &service.log,
            &format!(
                "plugin swapped to {}, its state handed over, dispatch paused {:?}",
                installed.commit.short(12),
                swapped.pause
            ),
        );
        service.manifest = manifest;
        Ok(std::mem::replace(&mut service.installed, installed))
    }

    /// Where a port of a service listens publicly: the manifest's port plus
    /// the offset (past 65535 is refused, never clamped), on the public address.
    fn public_port(&self, spec: &PortSpec) -> Result<SocketAddr, UpgradeError> {
        let port = self.port_offset().apply(spec.port)?;
        Ok(SocketAddr::new(self.config.public_ip, port))
    }

    /// Routes a service's public ports to it (one change of the routing table),
    /// and opens the fronts of ports that have none yet.
    async fn expose(&mut self, name: &ServiceName, service: &Service) -> Result<(), UpgradeError> {
        self.router.set(routes(name, service));
        self.open_fronts(name, service).await
    }

    /// Opens the fronts of a service's ports that have none yet (they follow its
    /// routes).
    async fn open_fronts(
        &mut self,
        name: &ServiceName,
        service: &Service,
    ) -> Result<(), UpgradeError> {
        for spec in service.manifest.ports() {
            let key = (name.clone(), spec.name.clone());
            if self.fronts.contains_key(&key) {
                continue;
            }
            let public = self.public_port(spec)?;
            let hold = service.manifest.health().start_grace;
            let route = self.router.route(route_key(name, &spec.name));
            let front = match spec.protocol {
                Protocol::Http => bind_http(public, route, hold, &FrontConfig::default()).await,
                Protocol::Tcp => bind_tcp(public, route, hold, &FrontConfig::default()).await,
            }
            .map_err(io_err(&self.config.root))?;
            info!(service = %name, port = %spec.name, addr = %front.local_addr(), "public port open");
            self.fronts.insert(key, front);
        }
        Ok(())
    }

    /// Brings the instance to `target` (see the module docs).
    pub async fn upgrade(
        &mut self,
        repo: &RepoClient,
        target: &BTreeMap<ServiceName, CommitId>,
        image: Option<(ImageName, ImageId)>,
        reason: &str,
    ) -> Result<UpgradeReport, UpgradeError> {
        self.upgrade_reporting(repo, target, image, reason, Strategy::InPlace, &|_, _| {})
            .await
    }

    /// The exact plan of bringing the instance to `target` with `strategy`. It
    /// starts, stops and records nothing; it may fetch the new commits'
    /// `service.toml` into the blob cache, to know how each service comes in.
    pub async fn plan(
        &self,
        repo: &RepoClient,
        target: &BTreeMap<ServiceName, CommitId>,
        strategy: Strategy,
    ) -> Result<UpgradePlan, UpgradeError> {
        self.plan_with(repo, target, strategy, false).await
    }

    /// [`Instance::plan`], leaving out the hooks when `skip_hooks` (as an
    /// upgrade with [`UpgradeOptions::skip_hooks`] does).
    pub async fn plan_with(
        &self,
        repo: &RepoClient,
        target: &BTreeMap<ServiceName, CommitId>,
        strategy: Strategy,
        skip_hooks: bool,
    ) -> Result<UpgradePlan, UpgradeError> {
        let (mut survey, _) = self.survey(repo, target, strategy).await?;
        if skip_hooks {
            survey.skip_hooks();
        }
        Ok(crate::plan::plan(&survey)?)
    }

    /// [`Instance::upgrade`] with a strategy, telling `progress` each step's
    /// events as text.
    pub async fn upgrade_reporting(
        &mut self,
        repo: &RepoClient,
        target: &BTreeMap<ServiceName, CommitId>,
        image: Option<(ImageName, ImageId)>,
        reason: &str,
        strategy: Strategy,
        progress: Progress<'_>,
    ) -> Result<UpgradeReport, UpgradeError> {
        let options = UpgradeOptions {
            strategy,
            ..UpgradeOptions::default()
        };
        let observe = |e: &StepEvent| progress(e.step.service(), &e.to_string());
        self.upgrade_with(repo, target, image, reason, options, progress, &observe)
            .await
    }

    /// Brings the instance to `target`: surveys it, plans the upgrade
    /// ([`crate::plan`]) and carries the plan out ([`crate::executor`]);
    /// `observe` gets every step's events, `progress` the notes between them (a
    /// data copy's progress).
    #[allow(clippy::too_many_arguments)]
    #[tracing::instrument(skip_all, fields(instance = %self.config.name, strategy = %options.strategy))]
    pub async fn upgrade_with(
        &mut self,
        repo: &RepoClient,
        target: &BTreeMap<ServiceName, CommitId>,
        image: Option<(ImageName, ImageId)>,
        reason: &str,
        options: UpgradeOptions,
        progress: Progress<'_>,
        observe: &(dyn Fn(&StepEvent) + Send + Sync),
    ) -> Result<UpgradeReport, UpgradeError> {
        // No sweep of the blob cache while this upgrade fetches into it and
        // links from it.
        let _cache = self.cache_lock.clone().read_owned().await;
        self.heal_held(repo).await?;
        let (mut survey, prepared) = self.survey(repo, target, options.strategy).await?;
        if options.skip_hooks {
            survey.skip_hooks();
        }
        let plan = crate::plan::plan(&survey)?;
        let mut report = UpgradeReport {
            unchanged: plan.with_action(Action::Unchanged).cloned().collect(),
            plan: plan.clone(),
            ..UpgradeReport::default()
        };
        if plan.is_empty() {
            return Ok(report);
        }
        let generation = self.state.allocate_generation()?;
        if plan.generation != Some(generation) {
            return Err(UpgradeError::Manifest(format!(
                "the plan was made for generation {:?}, the next is {generation}",
                plan.generation
            )));
        }
        let lifecycle = self.lifecycle.clone();
        let mut upgrade = Upgrade::new(
            self,
            repo,
            prepared,
            target.keys().cloned().collect(),
            image,
            reason,
            generation,
            progress,
        );
        upgrade.overlays = options.overlays.clone();
        let result = execute(
            &mut upgrade,
            &plan,
            &lifecycle,
            options.fault,
            &options.cancel,
            observe,
        )
        .await;
        let startup = std::mem::take(&mut upgrade.startup);
        drop(upgrade);
        let executed = match result {
            Ok(executed) => executed,
            Err(failed) => {
                self.prune_data();
                return Err(failed.error);
            }
        };
        report.generation = Some(generation);
        for s in &plan.services {
            match s.action {
                Action::Unchanged => {}
                Action::Remove => report.removed.push(s.service.clone()),
                Action::Restart
                | Action::Add
                | Action::Replace
                | Action::HoldAndReplace
                | Action::Swap => report.restarted.push(s.service.clone()),
            }
        }
        for t in &executed.steps {
            let took = Duration::from_millis(t.millis);
            let services = match &t.step {
                Step::Cutover { services } => services.clone(),
                other => other.service().cloned().into_iter().collect(),
            };
            for name in services {
                let timings = report.steps.entry(name).or_default();
                match t.step.kind() {
                    StepKind::Fetch => timings.fetch = took,
                    StepKind::Release => timings.copy = took,
                    StepKind::Build => timings.build = took,
                    StepKind::Cutover | StepKind::SwapPlugin => timings.switch = took,
                    _ => {}
                }
            }
        }
        for (name, (start, health)) in startup {
            let timings = report.steps.entry(name).or_default();
            (timings.start, timings.health) = (start, health);
        }
        report.timeline = executed.steps;
        report.warnings = executed.warnings;
        self.prune(options.keep_releases.unwrap_or(0).max(KEEP_RELEASES));
        self.prune_data();
        Ok(report)
    }

    /// The services and image of the generation before the current one, if any:
    /// what a rollback goes back to.
    pub fn previous(&self) -> Result<Option<InstalledState>, UpgradeError> {
        let generations = self.state.generations()?;
        Ok(generations
            .len()
            .checked_sub(2)
            .map(|i| generations[i].state.clone()))
    }

    /// The generation a rollback goes to, with its recorded state: `to`, or
    /// the one before the current. The current generation, or one never
    /// recorded, is refused with the numbers there are.
    pub fn rollback_target(&self, to: Option<u64>) -> Result<(u64, InstalledState), UpgradeError> {
        let generations = self.state.generations()?;
        let current = generations.last().map(|g| g.number);
        let numbers = || {
            generations
                .iter()
                .map(|g| g.number.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let found = match to {
            None => generations.len().checked_sub(2).map(|i| &generations[i]),
            Some(n) => generations.iter().find(|g| g.number == n),
        };
        match (found, to) {
            (Some(g), _) if Some(g.number) != current => Ok((g.number, g.state.clone())),
            (Some(g), _) => Err(UpgradeError::Manifest(format!(
                "generation {} is the one running; recorded generations: {}",
                g.number,
                numbers()
            ))),
            (None, None) => Err(UpgradeError::Manifest(
                "there is no previous generation to roll back to".into(),
            )),
            (None, Some(n)) => Err(UpgradeError::Manifest(format!(
                "there is no generation {n} to roll back to; recorded generations: {} (failed ones are never recorded)",
                numbers()
            ))),
        }
    }

    /// Waits (up to the service's stop grace) until the old process's fronts have
    /// no connection or request left on it.
    async fn drain(&self, name: &ServiceName, old: &Service) {
        let deadline = tokio::time::Instant::now() + old.manifest.stop().grace;
        for ((svc, port), front) in &self.fronts {
            if svc != name {
                continue;
            }
            let Some(backend) = old.backend(port) else {
                continue;
            };
            while front.busy(backend) > 0 && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            front.forget(backend);
        }
    }

    /// Each service as `status` reports it.
    pub fn describe(&self) -> BTreeMap<ServiceName, wire::shell::ServiceStatus> {
        let held = self.held.iter().map(|(name, h)| {
            (
                name.clone(),
                wire::shell::ServiceStatus {
                    commit: h.installed.commit,
                    pid: None,
                    state: format!(
                        "held: its release is corrupt, healed and started by the next deploy: {}",
                        h.why
                    ),
                    health: "unknown".to_owned(),
                    uptime_secs: None,
                    restarts: 0,
                    ports: BTreeMap::new(),
                },
            )
        });
        self.services
            .iter()
            .map(|(name, s)| {
                let status = s.process.status();
                let (pid, uptime, state) = match &status.state {
                    ProcessState::Running { pid, since } => {
                        (Some(*pid), Some(since.elapsed()), "running".to_owned())
                    }
                    ProcessState::Backoff { after } => {
                        (None, None, format!("restarting in {after:?}"))
                    }
                    ProcessState::Exited { reason } => (None, None, format!("exited: {reason}")),
                    ProcessState::Stopped => (None, None, "stopped".to_owned()),
                };
                // Failed at boot and not healthy since: say so, first.
                let state = match &s.failed_start {
                    Some(why) if status.health != crate::supervisor::Health::Healthy => {
                        format!("failed at start ({state}; retried by its restart policy): {why}")
                    }
                    _ => state,
                };
                let ports = self
                    .fronts
                    .iter()
                    .filter(|((svc, _), _)| svc == name)
                    .map(|((_, port), f)| (port.clone(), f.local_addr().to_string()))
                    .collect();
                (
                    name.clone(),
                    wire::shell::ServiceStatus {
                        commit: s.installed.commit,
                        pid,
                        state,
                        health: status.health.to_string(),
                        uptime_secs: uptime.map(|u| u.as_secs()),
                        restarts: status.restarts,
                        ports,
                    },
                )
            })
            .chain(held)
            .collect()
    }

    /// The overlays of generation `number` (the current one: of
    /// [`Instance::recorded`]'s): its services pulled at another commit than
    /// its image's.
    pub fn overlays(&self, number: u64) -> Result<crate::state::Overlays, UpgradeError> {
        Ok(self.state.overlays(number)?)
    }

    /// The recorded image and the last generation's number.
    pub fn recorded(&self) -> Result<(Option<(ImageName, ImageId)>, u64), UpgradeError> {
        let image = self.state.installed()?.image;
        let generation = self.state.generations()?.last().map_or(0, |g| g.number);
        Ok((image, generation))
    }

    /// Keeps the newest `keep` releases of each service, and always the
    /// running and the previous generation's (for an instant rollback). The
    /// others are moved out of the way now and deleted in the background.
    fn prune(&self, keep: usize) {
        let mut protect: Vec<PathBuf> = self
            .services
            .values()
            .map(|s| s.installed.dir.clone())
            .collect();
        if let Ok(Some(previous)) = self.previous() {
            protect.extend(previous.services.values().map(|s| s.release.clone()));
        }
        for name in self.services.keys() {
            match self.releases.prune(name, keep, &protect) {
                Ok(retired) => {
                    for r in retired {
                        info!(service = %name, release = %r.display(), "pruning an old release");
                        self.reaper.remove(r);
                    }
                }
                Err(e) => warn!(service = %name, error = %e, "could not prune old releases"),
            }
            self.prune_logs(name);
        }
        // Then the blobs those releases alone linked.
        self.reaper
            .sweep(self.cache.clone(), self.cache_lock.clone());
    }

    /// Waits until the old releases and data directories pruned so far are
    /// deleted (they are out of the way already; this is for tests and tools
    /// that measure the disk).
    pub async fn pruned(&self) {
        self.reaper.idle().await;
    }

    /// Keeps the process logs of a service's newest [`KEEP_LOGS`] generations
    /// (and always the running process's).
    fn prune_logs(&self, name: &ServiceName) {
        let dir = self.config.root.join("logs").join(name.as_str());
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return;
        };
        // g<N>.log and its rotations g<N>.log.1 …, by N.
        let generation_of = |file: &str| -> Option<u64> {
            file.strip_prefix('g')?.split_once(".log")?.0.parse().ok()
        };
        let running = self
            .services
            .get(name)
            .and_then(|s| generation_of(s.log.file_name()?.to_str()?));
        let mut logs: Vec<(u64, PathBuf)> = entries
            .flatten()
            .filter_map(|e| Some((generation_of(e.file_name().to_str()?)?, e.path())))
            .collect();
        let mut numbers: Vec<u64> = logs.iter().map(|(n, _)| *n).collect();
        numbers.sort_unstable();
        numbers.dedup();
        let oldest_kept = numbers
            .len()
            .checked_sub(KEEP_LOGS)
            .map_or(0, |i| numbers[i]);
        logs.retain(|(n, _)| *n < oldest_kept && Some(*n) != running);
        for (_, path) in logs {
            if let Err(e) = std::fs::remove_file(&path) {
                warn!(log = %path.display(), error = %e, "could not prune an old log");
            }
        }
    }

    /// Removes the data directories no generation needs: those of neither the
    /// current nor the previous generation (a rollback's), nor in use. A copy
    /// left by a failed or interrupted full shadow goes too.
    fn prune_data(&self) {
        let mut keep: Vec<PathBuf> = self.data_dirs.values().cloned().collect();
        keep.extend(self.services.values().filter_map(|s| s.data.clone()));
        // The previous recorded generation's (numbers have gaps where a
        // generation failed).
        let Ok(generations) = self.state.generations() else {
            return;
        };
        if let Some(previous) = generations.len().checked_sub(2).map(|i| &generations[i]) {
            match self.state.data_dirs(previous.number) {
                Ok(dirs) => keep.extend(dirs.into_values()),
                Err(_) => return,
            }
        }
        let root = self.config.root.join("data");
        let Ok(services) = std::fs::read_dir(&root) else {
            return;
        };
        for service in services.flatten() {
            let Ok(slots) = std::fs::read_dir(service.path()) else {
                continue;
            };
            for slot in slots.flatten() {
                let path = slot.path();
                if slot.file_name() == "live" || keep.contains(&path) {
                    continue;
                }
                if slot
                    .file_name()
                    .to_str()
                    .is_some_and(crate::reaper::is_retired)
                {
                    // Left retired by a stop or a crash.
                    self.reaper.remove(path);
                    continue;
                }
                match crate::reaper::retire(&path) {
                    Ok(retired) => {
                        info!(dir = %path.display(), "pruning a data directory no generation needs");
                        self.reaper.remove(retired);
                    }
                    Err(e) => {
                        warn!(dir = %path.display(), error = %e, "could not prune a data directory")
                    }
                }
            }
        }
    }

    /// Does the service have public ports open?
    fn has_fronts(&self, name: &ServiceName) -> bool {
        self.fronts.keys().any(|(s, _)| s == name)
    }

    /// Closes every public port of a service.
    async fn close_fronts(&mut self, name: &ServiceName) {
        let keys: Vec<_> = self
            .fronts
            .keys()
            .filter(|(s, _)| s == name)
            .cloned()
            .collect();
        self.router
            .set(keys.iter().map(|(svc, port)| (route_key(svc, port), None)));
        for k in keys {
            if let Some(f) = self.fronts.remove(&k) {
                f.shutdown().await;
            }
        }
    }

    /// Stops every process and closes every port.
    pub async fn shutdown(mut self) {
        self.stop_all().await;
    }

    /// [`Instance::shutdown`] through a reference (the shell's command service
    /// holds its instance behind a lock): afterwards nothing runs.
    pub async fn stop_all(&mut self) {
        self.reaper.stop();
        for (_, front) in std::mem::take(&mut self.fronts) {
            front.shutdown().await;
        }
        for (name, service) in std::mem::take(&mut self.services) {
            match service.process {
                Runner::Plugin { host, .. } => self.keep_plugin_state(&name, host).await,
                process => process.stop().await,
            }
        }
    }

    /// Where a plugin's state waits between a shutdown and the next start.
    fn plugin_state_path(&self, name: &ServiceName) -> PathBuf {
        plugin_state_path(&self.config.root, name)
    }

    /// Stops a plugin and writes its exported state where its next start finds
    /// it, so a plugin's state survives a shell restart as it survives a swap.
    async fn keep_plugin_state(&self, name: &ServiceName, host: PluginHost) {
        let path = self.plugin_state_path(name);
        let state = match host.stop_exporting().await {
            Ok(state) => state,
            Err(e) => {
                warn!(service = %name, error = %e, "could not export the plugin's state; it is lost");
                return;
            }
        };
        // Durable before the shell says it is kept: file and directory synced.
        match crate::durable::write_file(&path, &state) {
            Ok(()) => {
                info!(service = %name, bytes = state.len(), "plugin state kept for the next start")
            }
            Err(e) => {
                warn!(service = %name, error = %e, path = %path.display(), "could not write the plugin's state; it is lost")
            }
        }
    }
}
