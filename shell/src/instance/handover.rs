//! An instance handed from one shell process to the next (a takeover, see
//! [`crate::takeover`]), without stopping a service or dropping a request.
//!
//! The holder describes what runs ([`Instance::handover`]): each service's
//! pid, ports, release and log, each public port's listening socket. Once
//! the taker serves, the holder lets go ([`Instance::let_go`]: supervisors
//! detached, the processes left running; fronts drained, their last requests
//! answered), and at last stops its plugins, handing their exported state
//! over ([`Instance::export_plugins`]). Should the taker fail after that,
//! the holder takes everything back the way a taker takes it
//! ([`Instance::take_back`]).
//!
//! The taker goes the other way, in the order that keeps every request
//! served: [`Instance::adopt`] serves the handed sockets at once, routed to
//! the same internal ports (both shells accept from one queue meanwhile),
//! before it owns anything; [`Taken::supervise`] adopts the processes once
//! the keeper is its; [`Taken::hold_plugins`] parks new plugin requests in
//! the fronts until the holder's plugins are idle, and [`Taken::start_plugins`]
//! starts them here with their state; [`Taken::open`] opens the state
//! database once the holder has exited (sled is one process's) and becomes
//! the [`Instance`].

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use front::{Front, FrontConfig, Router, bind_http_inherited, bind_tcp_inherited};
use image_spec::ServiceName;
use image_spec::manifest::{Protocol, ServiceKind};
use tracing::{info, warn};

use super::{
    Held, Instance, InstanceConfig, ProcessParts, Runner, Service, UpgradeError, io_err,
    plugin_dir, plugin_service, plugin_state_path, read_manifest, read_tree, route_key, routes,
};
use crate::install::{BlobCache, Installed};
use crate::keeper::{KeeperLink, Kept, Reply, Request};
use crate::process::Running;
use crate::release::Releases;
use crate::state::State;
use crate::supervisor::{ProcessState, supervise, supervise_adopted};
use crate::takeover::{HandedFront, HandedService, Handover, handover_version};

/// How long a taker tries to open the state database its holder still holds.
pub const STATE_WAIT: Duration = Duration::from_secs(30);

/// How long a taker waits for its requests in flight on the holder's plugins.
pub const PLUGIN_IDLE_WAIT: Duration = Duration::from_secs(10);

impl Instance {
    /// What this instance hands over: its state, and each public port's
    /// listening socket in [`Handover::fronts`] order.
    pub fn handover(
        &self,
        keeper_token: String,
    ) -> Result<(Handover, Vec<std::net::TcpListener>), UpgradeError> {
        let (_, generation) = self.recorded()?;
        let services = self
            .services
            .iter()
            .map(|(name, s)| {
                let status = s.process.status();
                let (pid, uptime) = match status.state {
                    ProcessState::Running { pid, since } => (Some(pid), since.elapsed()),
                    _ => (None, Duration::ZERO),
                };
                HandedService {
                    name: name.clone(),
                    commit: s.installed.commit,
                    tree: s.installed.tree.id(),
                    release: s.installed.dir.clone(),
                    pid,
                    plugin: s.process.plugin().is_some(),
                    ports: s.ports.clone(),
                    data: s.data.clone(),
                    log: s.log.clone(),
                    uptime_ms: u64::try_from(uptime.as_millis()).unwrap_or(u64::MAX),
                }
            })
            .collect();
        let mut fronts = Vec::new();
        let mut listeners = Vec::new();
        for ((service, port), front) in &self.fronts {
            let http = self
                .services
                .get(service)
                .and_then(|s| s.manifest.ports().iter().find(|p| &p.name == port))
                .is_none_or(|p| p.protocol == Protocol::Http);
            fronts.push(HandedFront {
                service: service.clone(),
                port: port.clone(),
                public: front.local_addr(),
                http,
            });
            listeners.push(front.listener().map_err(io_err(&self.config.root))?);
        }
        Ok((
            Handover {
                version: handover_version(),
                instance: self.config.name.clone(),
                generation,
                commands: None,
                keeper_token,
                services,
                fronts,
            },
            listeners,
        ))
    }

    /// Lets go of the instance after a taker took it: every supervisor ends
    /// leaving its process running, then every front stops accepting and
    /// answers its last requests (what is still open after `grace` is cut;
    /// returns how many). Only the plugins still run here afterwards.
    pub async fn let_go(&mut self, grace: Duration) -> usize {
        self.reaper.stop();
        for (name, service) in std::mem::take(&mut self.services) {
            match service.process {
                Runner::Process(p) => {
                    p.detach().await;
                }
                process @ Runner::Plugin { .. } => {
                    self.services.insert(name, Service { process, ..service });
                }
            }
        }
        let mut drains = tokio::task::JoinSet::new();
        for (_, front) in std::mem::take(&mut self.fronts) {
            drains.spawn(front.drain(grace));
        }
        let mut cut = 0;
        while let Some(n) = drains.join_next().await {
            cut += n.unwrap_or(0);
        }
        cut
    }

    /// Stops the plugins left after [`Instance::let_go`] and returns their
    /// exported state by service (one whose export fails is left out, and
    /// said).
    pub async fn export_plugins(&mut self) -> BTreeMap<ServiceName, Vec<u8>> {
        let mut states = BTreeMap::new();
        for (name, service) in std::mem::take(&mut self.services) {
            match service.process {
                Runner::Plugin { host, .. } => match host.stop_exporting().await {
                    Ok(state) => {
                        states.insert(name, state);
                    }
                    Err(e) => {
                        warn!(service = %name, error = %e, "could not export the plugin's state for the shell taking over; it starts without it")
                    }
                },
                process => process.stop().await,
            }
        }
        states
    }

    /// Serves again what [`Instance::let_go`] let go, when the taker failed
    /// after the keeper's release and the keeper is this shell's again: the
    /// fronts on its own copies of the `listeners` it offered, the processes
    /// supervised again by pid, the plugins that were exported (`exported`)
    /// started anew with their state — those never exported serve on.
    pub async fn take_back(
        &mut self,
        handover: &Handover,
        listeners: Vec<std::net::TcpListener>,
        link: &Arc<KeeperLink>,
        exported: Option<BTreeMap<ServiceName, Vec<u8>>>,
    ) -> Result<(), UpgradeError> {
        let sockets = listeners.into_iter().map(OwnedFd::from).collect();
        let mut taken = Instance::adopt(self.config.clone(), handover, sockets)?;
        taken.supervise(link).await?;
        match exported {
            Some(states) => taken.start_plugins(states).await,
            // Still running here; their routes lead to their hosts.
            None => taken.adopting.clear(),
        }
        for (name, why) in &taken.failed {
            warn!(service = %name, %why, "not serving after the takeover failed");
        }
        self.fronts = taken.fronts;
        self.router = taken.router;
        self.services.extend(taken.services);
        self.reaper = crate::reaper::Reaper::start();
        Ok(())
    }

    /// Starts serving a handed-over instance (see the module docs): the
    /// fronts on the handed `sockets` (in [`Handover::fronts`] order), routed
    /// to the services' internal ports. Nothing is owned yet: dropping the
    /// result closes only this process's copies of the sockets.
    pub fn adopt(
        config: InstanceConfig,
        handover: &Handover,
        sockets: Vec<OwnedFd>,
    ) -> Result<Taken, UpgradeError> {
        if handover.instance != config.name {
            return Err(UpgradeError::Manifest(format!(
                "the running shell serves `{}`, not `{}`",
                handover.instance, config.name
            )));
        }
        if sockets.len() != handover.fronts.len() {
            return Err(UpgradeError::Manifest(format!(
                "{} listening sockets came for {} public ports",
                sockets.len(),
                handover.fronts.len()
            )));
        }
        let mut services = BTreeMap::new();
        for handed in &handover.services {
            let manifest = read_manifest(&handed.release)?;
            let tree = read_tree(&config.root, &handed.release, handed.tree)?;
            services.insert(
                handed.name.clone(),
                Adopting {
                    installed: Installed {
                        commit: handed.commit,
                        tree,
                        dir: handed.release.clone(),
                    },
                    manifest,
                    handed: handed.clone(),
                },
            );
        }
        let router = Router::new();
        for (name, s) in &services {
            router.set(s.manifest.ports().iter().map(|p| {
                let port = s.handed.ports.get(&p.name);
                let backend = port.map(|p| std::net::SocketAddr::from(([127, 0, 0, 1], *p)));
                (route_key(name, &p.name), backend)
            }));
        }
        let mut fronts = BTreeMap::new();
        for (handed, socket) in handover.fronts.iter().zip(sockets) {
            let listener = std::net::TcpListener::from(socket);
            let bound = listener.local_addr().map_err(io_err(&config.root))?;
            if bound != handed.public {
                return Err(UpgradeError::Manifest(format!(
                    "the socket handed for {}/{} listens on {bound}, not {}",
                    handed.service, handed.port, handed.public
                )));
            }
            let hold = services
                .get(&handed.service)
                .map_or(Duration::from_secs(5), |s| s.manifest.health().start_grace);
            let route = router.route(route_key(&handed.service, &handed.port));
            let front = match handed.http {
                true => bind_http_inherited(listener, route, hold, &FrontConfig::default()),
                false => bind_tcp_inherited(listener, route, hold, &FrontConfig::default()),
            }
            .map_err(io_err(&config.root))?;
            fronts.insert((handed.service.clone(), handed.port.clone()), front);
        }
        info!(instance = %config.name, fronts = fronts.len(), services = services.len(), "serving the handed-over ports");
        Ok(Taken {
            config,
            generation: handover.generation,
            adopting: services,
            services: BTreeMap::new(),
            failed: BTreeMap::new(),
            fronts,
            router,
        })
    }
}

/// A handed service not yet supervised here.
struct Adopting {
    installed: Installed,
    manifest: image_spec::ServiceManifest,
    handed: HandedService,
}

/// An instance being taken over: serving, not yet owning its state (see the
/// module docs).
pub struct Taken {
    config: InstanceConfig,
    generation: u64,
    adopting: BTreeMap<ServiceName, Adopting>,
    services: BTreeMap<ServiceName, Service>,
    /// Plugins that did not start here, and why.
    failed: BTreeMap<ServiceName, String>,
    fronts: BTreeMap<(ServiceName, String), Front>,
    router: Router,
}

impl std::fmt::Debug for Taken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Taken")
            .field("name", &self.config.name)
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

/// Which of the keeper's children runs a handed service: its handed pid if
/// the keeper still has it, else the newest child with its label (the holder
/// restarted it meanwhile), else none (it is started anew).
fn pick_pid(handed: &HandedService, children: &[Kept]) -> Option<u32> {
    let label = handed.log.display().to_string();
    if let Some(pid) = handed.pid
        && children.iter().any(|k| k.pid == pid)
    {
        return Some(pid);
    }
    children
        .iter()
        .filter(|k| k.label == label)
        .map(|k| k.pid)
        .max()
}

impl Taken {
    /// Supervises the handed processes here (the keeper is this shell's
    /// now): each keeps its pid; one that is gone is started anew by its
    /// supervisor, and its exit meanwhile is not lost (the keeper told this
    /// shell as successor).
    pub async fn supervise(&mut self, link: &Arc<KeeperLink>) -> Result<(), UpgradeError> {
        let l = link.clone();
        let children = match tokio::task::spawn_blocking(move || l.call(&Request::List)).await {
            Ok(Ok(Reply::Children(children))) => children,
            Ok(Ok(other)) => {
                return Err(UpgradeError::Manifest(format!(
                    "the keeper answered a listing with {other:?}"
                )));
            }
            Ok(Err(e)) => return Err(UpgradeError::Manifest(format!("the keeper: {e}"))),
            Err(e) => return Err(UpgradeError::Manifest(format!("the keeper call: {e}"))),
        };
        let names: Vec<ServiceName> = self
            .adopting
            .iter()
            .filter(|(_, a)| !a.handed.plugin)
            .map(|(n, _)| n.clone())
            .collect();
        for name in names {
            let Some(a) = self.adopting.remove(&name) else {
                continue;
            };
            let parts = ProcessParts::of(
                &self.config.name,
                &name,
                &a.installed,
                &a.manifest,
                &a.handed.ports,
                a.handed.data.as_deref(),
                &a.handed.log,
            )?;
            let since = Instant::now()
                .checked_sub(Duration::from_millis(a.handed.uptime_ms))
                .unwrap_or_else(Instant::now);
            let policy = a.manifest.restart();
            let process = match pick_pid(&a.handed, &children) {
                Some(pid) => {
                    info!(service = %name, pid, "supervising the handed-over process");
                    supervise_adopted(
                        Running::adopt_with(link, pid, since),
                        parts.spec,
                        policy,
                        parts.stop,
                        Some(parts.monitor),
                    )
                }
                None => {
                    warn!(service = %name, "its process was gone at the takeover; starting it anew");
                    supervise(parts.spec, policy, parts.stop, Some(parts.monitor))
                }
            };
            self.services.insert(
                name,
                Service {
                    installed: a.installed,
                    manifest: a.manifest,
                    ports: a.handed.ports,
                    process: Runner::Process(process),
                    startup: (Duration::ZERO, Duration::ZERO),
                    data: a.handed.data,
                    log: a.handed.log,
                    failed_start: None,
                },
            );
        }
        Ok(())
    }

    /// Parks new requests to the plugins in the fronts (their routes have no
    /// backend for a moment) and waits until none of this shell's requests
    /// is in flight on the holder's plugins (at most [`PLUGIN_IDLE_WAIT`]).
    pub async fn hold_plugins(&self) {
        let plugins: Vec<&Adopting> = self.adopting.values().filter(|a| a.handed.plugin).collect();
        if plugins.is_empty() {
            return;
        }
        self.router.set(plugins.iter().flat_map(|a| {
            a.manifest
                .ports()
                .iter()
                .map(|p| (route_key(&a.handed.name, &p.name), None))
                .collect::<Vec<_>>()
        }));
        let deadline = Instant::now() + PLUGIN_IDLE_WAIT;
        loop {
            let busy: usize = plugins
                .iter()
                .flat_map(|a| {
                    a.handed.ports.iter().filter_map(|(port, internal)| {
                        let front = self.fronts.get(&(a.handed.name.clone(), port.clone()))?;
                        Some(front.busy(std::net::SocketAddr::from(([127, 0, 0, 1], *internal))))
                    })
                })
                .sum();
            if busy == 0 {
                return;
            }
            if Instant::now() >= deadline {
                warn!(
                    busy,
                    "requests still in flight on the old shell's plugins; going on"
                );
                return;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// Starts the handed plugins here, each with its exported state (one
    /// without starts afresh, and is said), and routes their ports to them.
    /// One that cannot start is held until the next upgrade, its state kept
    /// where a start takes it up (`ROOT/plugins/SERVICE.state`): the others
    /// serve meanwhile.
    pub async fn start_plugins(&mut self, mut states: BTreeMap<ServiceName, Vec<u8>>) {
        let names: Vec<ServiceName> = self.adopting.keys().cloned().collect();
        for name in names {
            let Some(a) = self.adopting.remove(&name) else {
                continue;
            };
            let ServiceKind::Plugin { library } = a.manifest.kind() else {
                continue;
            };
            let library = library.clone();
            let state = states.remove(&name);
            if state.is_none() {
                warn!(service = %name, "no state came for the plugin; it starts afresh");
            }
            let started = plugin_service(
                &plugin_dir(&self.config.root, &name),
                &name,
                a.installed,
                a.manifest,
                &library,
                a.handed.log,
                state.clone(),
            )
            .await;
            match started {
                Ok(service) => {
                    self.router.set(routes(&name, &service));
                    self.services.insert(name, service);
                }
                Err(e) => {
                    tracing::error!(service = %name, error = %e, "the plugin did not start in the new shell; held until the next upgrade");
                    if let Some(state) = state {
                        let path = plugin_state_path(&self.config.root, &name);
                        if let Err(e) = crate::durable::write_file(&path, &state) {
                            warn!(service = %name, error = %e, "could not keep the plugin's state; it is lost");
                        }
                    }
                    self.failed
                        .insert(name, format!("it did not start in the new shell: {e}"));
                }
            }
        }
    }

    /// Becomes the [`Instance`]: opens its state database — trying again
    /// until the holder has exited and let go of it, at most [`STATE_WAIT`] —
    /// its releases and blob cache. A recorded service not handed over (held
    /// back at the holder's boot) stays held until the next upgrade.
    pub async fn open(self) -> Result<Instance, UpgradeError> {
        let root = self.config.root.clone();
        let deadline = Instant::now() + STATE_WAIT;
        let state = loop {
            let dir = root.join("state");
            match tokio::task::spawn_blocking(move || State::open(&dir)).await {
                Ok(Ok(state)) => break state,
                Ok(Err(e)) if Instant::now() >= deadline => return Err(e.into()),
                Err(e) if Instant::now() >= deadline => {
                    return Err(io_err(&root)(std::io::Error::other(e)));
                }
                _ => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        };
        let (releases, _) = Releases::open(&root.join("releases"))?;
        let cache = BlobCache::open(&root.join("cache")).map_err(io_err(&root.join("cache")))?;
        let mut instance = Instance {
            config: self.config,
            state,
            releases,
            cache,
            services: self.services,
            fronts: self.fronts,
            router: self.router,
            lifecycle: Arc::default(),
            data_dirs: Default::default(),
            reaper: crate::reaper::Reaper::start(),
            cache_lock: Arc::default(),
            held: BTreeMap::new(),
        };
        let (_, generation) = instance.recorded()?;
        if generation != self.generation {
            warn!(
                recorded = generation,
                handed = self.generation,
                "the handed-over generation is not the recorded one"
            );
        }
        instance.data_dirs = instance.state.data_dirs(generation)?;
        for (name, s) in instance.state.installed()?.services {
            if instance.services.contains_key(&name) {
                continue;
            }
            let tree = instance.tree_of(&s.release, s.tree)?;
            let why = self.failed.get(&name).cloned().unwrap_or_else(|| {
                "it was not running in the shell this one took over from".into()
            });
            instance.held.insert(
                name,
                Held {
                    installed: Installed {
                        commit: s.commit,
                        tree,
                        dir: s.release,
                    },
                    why,
                },
            );
        }
        if generation > 0 {
            instance.lifecycle.opened(generation);
        }
        Ok(instance)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handed(pid: Option<u32>, log: &str) -> HandedService {
        HandedService {
            name: ServiceName::new("hello").unwrap(),
            commit: image_spec::CommitId::from_bytes([1; 32]),
            tree: image_spec::TreeId::from_bytes([2; 32]),
            release: "/r".into(),
            pid,
            plugin: false,
            ports: BTreeMap::new(),
            data: None,
            log: log.into(),
            uptime_ms: 0,
        }
    }

    fn kept(pid: u32, label: &str) -> Kept {
        Kept {
            pid,
            label: label.into(),
        }
    }

    #[test]
    fn a_handed_pid_is_kept_a_restarted_one_found_by_its_log_a_lost_one_started() {
        let children = [
            kept(10, "/l/a.log"),
            kept(12, "/l/b.log"),
            kept(15, "/l/b.log"),
        ];
        assert_eq!(pick_pid(&handed(Some(10), "/l/a.log"), &children), Some(10));
        // Restarted by the holder after its offer: the newest with its log.
        assert_eq!(pick_pid(&handed(Some(11), "/l/b.log"), &children), Some(15));
        // Waiting for a restart when offered.
        assert_eq!(pick_pid(&handed(None, "/l/b.log"), &children), Some(15));
        assert_eq!(pick_pid(&handed(Some(20), "/l/c.log"), &children), None);
    }
}
