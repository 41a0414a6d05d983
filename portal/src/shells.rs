//! The shells attached to the portal: the QUIC side of the portal.
//!
//! Shells dial the portal with their `shell/<instance>` certificates
//! ([`wire::portal`]). [`Shells`] is the server's handler: it keeps each shell's
//! connection as it is admitted, accepts its [`Register`] (refusing one that
//! names another instance than its certificate), records the instance online,
//! and records it offline with its last-seen time when the connection ends. The
//! runner sends shell commands over those connections with [`Shells::call`]; a
//! newer connection of the same instance replaces an older one.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use image_spec::InstanceName;
use tokio::sync::watch;
use tracing::{info, warn};
use wire::plan::{StepKind, StepOutcome};
use wire::portal::{Register, RegisterReply};
use wire::repo::{ErrorKind, RemoteError};
use wire::shell::{ShellReply, ShellRequest, Update};
use wire::{BiStream, DEFAULT_FRAME_LIMIT, Handler, Identity, WireError};

use crate::deployment::now_ms;
use crate::store::Store;
use crate::target::InstanceRecord;

/// Why a command could not reach a shell.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The instance's shell is not attached.
    #[error("instance `{0}` is offline")]
    Offline(InstanceName),
    /// The connection failed during the command.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// The connection was cut during the command (an injected fault): any
    /// answer that was already on its way is dropped with it.
    #[error("the connection to `{0}` was cut")]
    Cut(InstanceName),
}

struct Attached {
    conn: quinn::Connection,
    registered: Option<Register>,
}

/// The attached shells (see the module docs).
pub struct Shells {
    store: Arc<dyn Store>,
    attached: Mutex<HashMap<InstanceName, Attached>>,
    /// Bumped whenever a shell registers or goes away.
    changes: watch::Sender<u64>,
    /// A one-shot fault for tests: cut this instance's connection the moment
    /// its shell reports this step done (see [`Shells::cut_after`]).
    fault: Mutex<Option<(InstanceName, StepKind)>>,
}

impl std::fmt::Debug for Shells {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shells").finish_non_exhaustive()
    }
}

impl Shells {
    /// No shell attached yet.
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self {
            store,
            attached: Mutex::new(HashMap::new()),
            changes: watch::channel(0).0,
            fault: Mutex::new(None),
        }
    }

    fn attached(&self) -> std::sync::MutexGuard<'_, HashMap<InstanceName, Attached>> {
        // The map holds connections only; a panic elsewhere leaves it usable.
        self.attached.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The registered connection of `instance`, if it is attached.
    fn connection(&self, instance: &InstanceName) -> Option<quinn::Connection> {
        self.attached()
            .get(instance)
            .filter(|a| a.registered.is_some())
            .map(|a| a.conn.clone())
    }

    /// Is `instance`'s shell attached and registered?
    pub fn is_online(&self, instance: &InstanceName) -> bool {
        self.connection(instance).is_some()
    }

    /// Closes `instance`'s connection (its shell dials again): for an operator
    /// who wants a shell to re-register, and for tests of lost connections.
    pub fn disconnect(&self, instance: &InstanceName) -> bool {
        match self.attached().get(instance) {
            Some(a) => {
                a.conn
                    .close(wire::endpoint::code::OK, b"disconnected by the portal");
                true
            }
            None => false,
        }
    }

    /// Waits until `instance` is attached, at most `timeout`; whether it is.
    pub async fn wait_online(&self, instance: &InstanceName, timeout: Duration) -> bool {
        let mut changes = self.changes.subscribe();
        let wait = async {
            loop {
                if self.is_online(instance) {
                    return;
                }
                if changes.changed().await.is_err() {
                    return;
                }
            }
        };
        let _ = tokio::time::timeout(timeout, wait).await;
        self.is_online(instance)
    }

    /// Fault injection for tests: the next time `instance`'s shell reports a
    /// step of `kind` done, its connection is closed at once — before the
    /// shell's answer can arrive (a connection lost after the shell recorded
    /// its generation but before it reported).
    pub fn cut_after(&self, instance: InstanceName, kind: StepKind) {
        *self.fault.lock().unwrap_or_else(|p| p.into_inner()) = Some((instance, kind));
    }

    /// Sends one shell command to `instance` over the connection its shell
    /// made, passing each progress and step report to `on_update`.
    pub async fn call(
        &self,
        instance: &InstanceName,
        req: &ShellRequest,
        mut on_update: impl FnMut(Update<'_>),
    ) -> Result<ShellReply, CallError> {
        let conn = self
            .connection(instance)
            .ok_or_else(|| CallError::Offline(instance.clone()))?;
        let peer = format!("shell/{instance}");
        let mut cut = false;
        let updates = |update: Update<'_>| {
            on_update(update);
            if let Update::Step(e) = update
                && matches!(e.outcome, StepOutcome::Done { .. })
            {
                let mut fault = self.fault.lock().unwrap_or_else(|p| p.into_inner());
                if fault
                    .as_ref()
                    .is_some_and(|(i, k)| i == instance && *k == e.step.kind())
                {
                    *fault = None;
                    cut = true;
                    conn.close(wire::endpoint::code::OK, b"cut by an injected fault");
                }
            }
        };
        let answer = wire::shell::call_on(&conn, &peer, req, updates).await;
        if cut {
            return Err(CallError::Cut(instance.clone()));
        }
        Ok(answer?)
    }

    async fn register(&self, peer: &Identity, conn_id: usize, reg: Register) -> RegisterReply {
        let Identity::Shell { instance } = peer else {
            return Err(RemoteError::new(
                ErrorKind::PermissionDenied,
                format!("`{peer}` is not a shell; only shells attach to the portal"),
            ));
        };
        if *instance != reg.instance {
            return Err(RemoteError::new(
                ErrorKind::PermissionDenied,
                format!(
                    "this certificate is the shell of `{instance}`; it cannot register `{}`",
                    reg.instance
                ),
            ));
        }
        let record = InstanceRecord {
            name: reg.instance.clone(),
            stage: reg.stage,
            labels: reg.labels.clone(),
            shell_version: reg.shell_version.clone(),
            image: reg.image.clone(),
            generation: reg.generation,
            online: true,
            last_seen: now_ms(),
        };
        self.store.put_instance(record).await.map_err(|e| {
            RemoteError::new(
                ErrorKind::Internal,
                format!("cannot record the instance: {e}"),
            )
        })?;
        {
            let mut attached = self.attached();
            match attached.get_mut(instance) {
                Some(a) if a.conn.stable_id() == conn_id => a.registered = Some(reg),
                // The connection ended (or was replaced) while registering.
                _ => {
                    return Err(RemoteError::new(
                        ErrorKind::Invalid,
                        "the connection was replaced while registering",
                    ));
                }
            }
        }
        info!(%instance, "shell attached");
        self.changes.send_modify(|n| *n += 1);
        Ok(())
    }

    /// Records `instance` offline, with the time it was last seen.
    async fn gone(&self, registered: Register) {
        if self.is_online(&registered.instance) {
            // It came back already; its new registration stands.
            return;
        }
        let record = InstanceRecord {
            name: registered.instance.clone(),
            stage: registered.stage,
            labels: registered.labels,
            shell_version: registered.shell_version,
            image: registered.image,
            generation: registered.generation,
            online: false,
            last_seen: now_ms(),
        };
        if let Err(e) = self.store.put_instance(record).await {
            warn!(instance = %registered.instance, error = %e, "cannot record the instance offline");
        }
    }
}

/// [`Shells`] as the QUIC server's handler.
#[derive(Debug, Clone)]
pub struct Gate(pub Arc<Shells>);

impl Handler for Gate {
    async fn handle(&self, peer: Arc<Identity>, mut stream: BiStream) {
        // A shell's only stream of its own is its registration; the commands go
        // the other way, on streams the portal opens.
        let reg: Register = match stream.read_request(DEFAULT_FRAME_LIMIT).await {
            Ok(r) => r,
            Err(e) => {
                stream.refuse(&e);
                return;
            }
        };
        let conn_id = match &*peer {
            Identity::Shell { instance } => self
                .0
                .attached()
                .get(instance)
                .map(|a| a.conn.stable_id())
                .unwrap_or(usize::MAX),
            _ => usize::MAX,
        };
        let reply = self.0.register(&peer, conn_id, reg).await;
        if let Err(e) = &reply {
            warn!(%peer, error = %e, "registration refused");
        }
        if wire::codec::write_frame(&mut stream.send, &reply)
            .await
            .is_ok()
        {
            let _ = stream.send.finish();
        }
    }

    fn connected(&self, peer: &Arc<Identity>, conn: &quinn::Connection) {
        if let Identity::Shell { instance } = &**peer {
            let old = self.0.attached().insert(
                instance.clone(),
                Attached {
                    conn: conn.clone(),
                    registered: None,
                },
            );
            if let Some(old) = old {
                old.conn
                    .close(wire::endpoint::code::OK, b"replaced by a newer connection");
            }
        }
    }

    fn disconnected(&self, peer: &Arc<Identity>, conn: &quinn::Connection) {
        let Identity::Shell { instance } = &**peer else {
            return;
        };
        let gone = {
            let mut attached = self.0.attached();
            match attached.get(instance) {
                Some(a) if a.conn.stable_id() == conn.stable_id() => attached.remove(instance),
                _ => None,
            }
        };
        if let Some(Attached {
            registered: Some(reg),
            ..
        }) = gone
        {
            info!(%instance, "shell detached");
            self.0.changes.send_modify(|n| *n += 1);
            let shells = self.0.clone();
            tokio::spawn(async move { shells.gone(reg).await });
        }
    }
}
