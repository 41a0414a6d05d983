//! The shell's two sides of a takeover ([`crate::takeover`]).
//!
//! The holder listens on the instance's takeover socket while it runs with a
//! keeper ([`hold`]). A taker's ask is answered with the instance's state
//! and its listening sockets, under the instance's lock (no upgrade runs
//! meanwhile; one running or queued makes the holder refuse). Until the
//! taker says it serves, nothing of the holder's changed: a taker that
//! refuses, dies or stays silent past [`READY_WAIT`] leaves it serving as
//! before ([`WAIT_OVERRIDE`] shortens the wait for tests). The commit point is the keeper's release: refused (the taker is
//! gone), the holder serves on; granted, it stops taking commands, detaches
//! its supervisors, drains its fronts, hands its plugins' state over and
//! exits.
//!
//! The taker ([`take_over`]) serves the handed sockets and joins the keeper
//! as successor before it says it serves; then it supervises the processes
//! (same pids), moves the plugins over with their state, opens the state
//! database once the holder has exited, and serves commands.

use std::collections::BTreeMap;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{Bound, ShellConfig, ShellError, ShellService, assemble, check};
use crate::instance::Instance;
use crate::keeper::{Hello, KEEPER_VERSION, KeeperLink, Request};
use crate::takeover::{
    Channel, TakeoverError, ToHolder, ToTaker, accepts, handover_version, socket_path,
};
use image_spec::ServiceName;

/// How long a holder waits for a connection's ask.
pub const ASK_WAIT: Duration = Duration::from_secs(5);
/// How long a holder waits for the taker to serve after the offer (unless
/// [`WAIT_OVERRIDE`] says otherwise).
pub const READY_WAIT: Duration = Duration::from_secs(60);

/// The variable that shortens (or lengthens) [`READY_WAIT`], in
/// milliseconds: for tests and drills of a taker that never answers.
pub const WAIT_OVERRIDE: &str = "MOLT_TAKEOVER_WAIT_MS";

/// [`READY_WAIT`], or what [`WAIT_OVERRIDE`] names.
fn ready_wait() -> Duration {
    std::env::var(WAIT_OVERRIDE)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .map_or(READY_WAIT, Duration::from_millis)
}
/// How long the holder's fronts have to answer their last requests.
pub const DRAIN_GRACE: Duration = Duration::from_secs(10);
/// How long a holder waits for the taker to ask for the plugins' state.
pub const EXPORT_WAIT: Duration = Duration::from_secs(30);
/// How long a holder whose taker failed after the keeper's release waits
/// for the keeper to be its own again.
pub const TAKE_BACK_WAIT: Duration = Duration::from_secs(5);
/// How long a taker waits for the offer.
pub const OFFER_WAIT: Duration = Duration::from_secs(30);
/// How long a taker waits for the holder to let go (its fronts' drain
/// included).
pub const RELEASED_WAIT: Duration = Duration::from_secs(60);

/// Runs a blocking channel call off the async runtime.
async fn blocking<T: Send + 'static>(
    doing: &'static str,
    f: impl FnOnce() -> Result<T, TakeoverError> + Send + 'static,
) -> Result<T, TakeoverError> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| {
        Err(TakeoverError::Channel {
            doing,
            source: std::io::Error::other(e).into(),
        })
    })
}

/// Listens on the takeover socket of the instance at `root` (made anew,
/// 0600), or says why it cannot (the shell then cannot be taken over).
pub(crate) fn listen(root: &std::path::Path) -> Option<tokio::net::UnixListener> {
    let path = socket_path(root);
    let _ = std::fs::remove_file(&path);
    let listener = match tokio::net::UnixListener::bind(&path) {
        Ok(l) => l,
        Err(e) => {
            warn!(path = %path.display(), error = %e, "cannot listen for takeovers; this shell cannot be taken over");
            return None;
        }
    };
    use std::os::unix::fs::PermissionsExt;
    if let Err(e) = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)) {
        warn!(path = %path.display(), error = %e, "cannot make the takeover socket private; this shell cannot be taken over");
        return None;
    }
    Some(listener)
}

/// Answers takeovers on `listener` for `service`'s instance until `stop`
/// (or a takeover, which cancels `stop` itself): `true` once the instance
/// was handed over.
pub(crate) async fn hold(
    listener: tokio::net::UnixListener,
    service: Arc<ShellService>,
    stop: CancellationToken,
) -> bool {
    loop {
        let stream = tokio::select! {
            () = stop.cancelled() => return false,
            accepted = listener.accept() => match accepted {
                Ok((s, _)) => s,
                Err(e) => {
                    warn!(error = %e, "a takeover connection failed");
                    continue;
                }
            },
        };
        let channel = match stream
            .into_std()
            .and_then(|s| s.set_nonblocking(false).map(|()| s))
        {
            Ok(s) => Channel::new(s),
            Err(e) => {
                warn!(error = %e, "a takeover connection failed");
                continue;
            }
        };
        match service.hand_over(channel, &stop).await {
            Ok(true) => return true,
            Ok(false) => {}
            Err(e) => warn!(error = %e, "a takeover did not happen; this shell serves on"),
        }
    }
}

impl ShellService {
    /// One takeover, as the holder: `Ok(true)` once handed over, `Ok(false)`
    /// if refused (an upgrade runs), an error if it failed before the commit
    /// point (nothing changed).
    async fn hand_over(
        self: &Arc<Self>,
        channel: Channel,
        stop: &CancellationToken,
    ) -> Result<bool, TakeoverError> {
        let channel = Arc::new(channel);
        let ch = channel.clone();
        let (ask, _) = blocking("waiting for the ask", move || {
            ch.recv::<ToHolder>(Some(ASK_WAIT), "waiting for the ask")
        })
        .await?;
        let ToHolder::Ask { version } = ask else {
            return Err(TakeoverError::OutOfTurn {
                doing: "waiting for the ask",
                got: format!("{ask:?}"),
            });
        };
        info!(instance = %self.name, taker_version = version, "a shell asks to take over");
        let refuse = |why: String| {
            let ch = channel.clone();
            blocking("refusing", move || {
                ch.send(&ToTaker::Refuse(why), &[], "refusing")
            })
        };
        if self.upgrading.load(Ordering::SeqCst) || self.queued.load(Ordering::SeqCst) > 0 {
            refuse("an upgrade is running here; take over once it has ended".into()).await?;
            return Ok(false);
        }
        let Some(link) = crate::process::keeper().cloned() else {
            refuse("this shell runs its services without a keeper".into()).await?;
            return Ok(false);
        };
        let mut instance = self.instance.lock().await;
        let (handover, listeners) = match instance.handover(link.token().to_owned()) {
            Ok((h, l)) => (
                crate::takeover::Handover {
                    commands: self.listen,
                    ..h
                },
                l,
            ),
            Err(e) => {
                refuse(format!("cannot describe the instance: {e}")).await?;
                return Ok(false);
            }
        };
        let ch = channel.clone();
        let offered = handover.clone();
        let listeners = blocking("sending the offer", move || {
            use std::os::fd::AsFd;
            let fds: Vec<_> = listeners.iter().map(|l| l.as_fd()).collect();
            ch.send(&ToTaker::Offer(offered), &fds, "sending the offer")?;
            Ok(listeners)
        })
        .await?;
        let ch = channel.clone();
        let (answer, _) = blocking("waiting for the taker to serve", move || {
            ch.recv::<ToHolder>(Some(ready_wait()), "waiting for the taker to serve")
        })
        .await?;
        match answer {
            ToHolder::Ready => {}
            ToHolder::Refuse(why) => return Err(TakeoverError::Refused(why)),
            other => {
                return Err(TakeoverError::OutOfTurn {
                    doing: "waiting for the taker to serve",
                    got: format!("{other:?}"),
                });
            }
        }
        // The keeper's release (refused if the taker is gone — then nothing
        // changed here). This shell stays its successor until it exits.
        let l = link.clone();
        tokio::task::spawn_blocking(move || l.call(&Request::Release))
            .await
            .map_err(|e| TakeoverError::Refused(format!("releasing the keeper: {e}")))?
            .map_err(|e| TakeoverError::Refused(format!("the keeper: {e}")))?;
        info!(instance = %self.name, "handed the keeper over; letting go");
        self.handed.store(true, Ordering::SeqCst);
        let cut = instance.let_go(DRAIN_GRACE).await;
        if cut > 0 {
            warn!(cut, "connections still open after the drain grace were cut");
        }
        let mut exported = None;
        let finished = self.finish(&channel, &mut instance, &mut exported).await;
        let Err(e) = finished else {
            stop.cancel();
            self.cancel.cancel();
            info!(instance = %self.name, "handed over");
            return Ok(true);
        };
        // The new shell failed after the release: once the keeper is this
        // shell's again, it serves everything as before.
        warn!(error = %e, "the new shell went away during the takeover; taking everything back");
        let promoted = async {
            while !link.owns() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        if tokio::time::timeout(TAKE_BACK_WAIT, promoted)
            .await
            .is_err()
        {
            // The new shell holds the keeper and lives on: it is the shell.
            tracing::error!(error = %e, "the new shell keeps the keeper though it failed to finish the takeover; this shell exits");
            stop.cancel();
            self.cancel.cancel();
            return Ok(true);
        }
        match instance
            .take_back(&handover, listeners, &link, exported)
            .await
        {
            Ok(()) => {
                self.handed.store(false, Ordering::SeqCst);
                self.refresh(&instance);
                info!(instance = %self.name, "took everything back; serving on");
                Err(e)
            }
            Err(back) => {
                tracing::error!(error = %back, "could not take everything back; this shell stops");
                instance.stop_all().await;
                stop.cancel();
                self.cancel.cancel();
                Ok(true)
            }
        }
    }

    /// The holder's part after it let go: says so, hands the plugins' state
    /// over when asked (kept in `exported`, should the taker fail after),
    /// and waits for the taker's `Done`.
    async fn finish(
        &self,
        channel: &Arc<Channel>,
        instance: &mut Instance,
        exported: &mut Option<BTreeMap<ServiceName, Vec<u8>>>,
    ) -> Result<(), TakeoverError> {
        let ch = channel.clone();
        let (ask, _) = blocking("waiting for the plugins' export", move || {
            ch.send(&ToTaker::Released, &[], "saying it let go")?;
            ch.recv::<ToHolder>(Some(EXPORT_WAIT), "waiting for the plugins' export")
        })
        .await?;
        if !matches!(ask, ToHolder::Export) {
            return Err(TakeoverError::OutOfTurn {
                doing: "waiting for the plugins' export",
                got: format!("{ask:?}"),
            });
        }
        let states = instance.export_plugins().await;
        *exported = Some(states.clone());
        let ch = channel.clone();
        let (done, _) = blocking("waiting for the taker to finish", move || {
            ch.send(
                &ToTaker::Exported(states),
                &[],
                "handing the plugins' state",
            )?;
            ch.recv::<ToHolder>(Some(EXPORT_WAIT), "waiting for the taker to finish")
        })
        .await?;
        match done {
            ToHolder::Done => Ok(()),
            other => Err(TakeoverError::OutOfTurn {
                doing: "waiting for the taker to finish",
                got: format!("{other:?}"),
            }),
        }
    }
}

/// Takes the instance of `config` over from the shell that serves it (see
/// the module docs): returns once this shell serves everything and holds
/// the state; an error before the holder let go leaves the holder serving.
pub async fn take_over(mut config: ShellConfig) -> Result<Bound, ShellError> {
    check(&config)?;
    let root = config.instance.root.clone();
    let path = socket_path(&root);
    let stream = UnixStream::connect(&path).map_err(|source| ShellError::NoHolder {
        path: path.clone(),
        source,
    })?;
    let channel = Arc::new(Channel::new(stream));
    let ch = channel.clone();
    let (offer, sockets) = blocking("waiting for the offer", move || {
        ch.send(
            &ToHolder::Ask {
                version: handover_version(),
            },
            &[],
            "asking",
        )?;
        ch.recv::<ToTaker>(Some(OFFER_WAIT), "waiting for the offer")
    })
    .await?;
    let handover = match offer {
        ToTaker::Offer(h) => h,
        ToTaker::Refuse(why) => return Err(TakeoverError::Refused(why).into()),
        other => {
            return Err(TakeoverError::OutOfTurn {
                doing: "waiting for the offer",
                got: format!("{other:?}"),
            }
            .into());
        }
    };
    let refuse = |why: String| {
        let ch = channel.clone();
        async move {
            let _ = blocking("refusing", move || {
                ch.send(&ToHolder::Refuse(why), &[], "refusing")
            })
            .await;
        }
    };
    if let Err(e) = accepts(handover.version, handover_version()) {
        refuse(e.to_string()).await;
        return Err(e.into());
    }
    if config.listen.is_some_and(|a| a.port() == 0) && handover.commands.is_some() {
        config.listen = handover.commands;
    }
    let hello = Hello::Successor {
        version: KEEPER_VERSION,
        token: handover.keeper_token.clone(),
    };
    let keeper_socket = root.join("keeper.sock");
    let link = match tokio::task::spawn_blocking(move || {
        KeeperLink::connect(&keeper_socket, &hello)
    })
    .await
    {
        Ok(Ok(link)) => link,
        Ok(Err(e)) => {
            refuse(format!("cannot join the keeper: {e}")).await;
            return Err(ShellError::Keeper(e));
        }
        Err(e) => {
            refuse(format!("cannot join the keeper: {e}")).await;
            return Err(ShellError::Keeper(crate::keeper::KeeperError::Refused(
                e.to_string(),
            )));
        }
    };
    if !crate::process::use_keeper(link.clone()) {
        refuse("this process has a keeper already".into()).await;
        return Err(ShellError::Keeper(crate::keeper::KeeperError::Refused(
            "this process has a keeper already".into(),
        )));
    }
    let mut taken = match Instance::adopt(config.instance.clone(), &handover, sockets) {
        Ok(t) => t,
        Err(e) => {
            refuse(e.to_string()).await;
            return Err(e.into());
        }
    };
    crate::crash::point("takeover-before-ready");
    let ch = channel.clone();
    let released = blocking("waiting for the holder to let go", move || {
        ch.send(&ToHolder::Ready, &[], "saying it serves")?;
        ch.recv::<ToTaker>(Some(RELEASED_WAIT), "waiting for the holder to let go")
    })
    .await;
    let holder_here = match released {
        Ok((ToTaker::Released, _)) => true,
        Ok((other, _)) => {
            return Err(TakeoverError::OutOfTurn {
                doing: "waiting for the holder to let go",
                got: format!("{other:?}"),
            }
            .into());
        }
        Err(e) => {
            // The holder died after the offer, or did not let go: the
            // takeover goes on only if the keeper made this shell its owner.
            tokio::time::sleep(Duration::from_millis(200)).await;
            if !link.owns() {
                return Err(e.into());
            }
            warn!(error = %e, "the old shell went away during the takeover; its plugins' state is lost");
            false
        }
    };
    crate::crash::point("takeover-after-release");
    info!(instance = %config.instance.name, "the old shell let go; supervising the services");
    taken.supervise(&link).await?;
    taken.hold_plugins().await;
    let states = match holder_here {
        true => {
            let ch = channel.clone();
            let exported = blocking("taking the plugins' state", move || {
                ch.send(&ToHolder::Export, &[], "asking for the plugins' state")?;
                ch.recv::<ToTaker>(Some(RELEASED_WAIT), "taking the plugins' state")
            })
            .await;
            match exported {
                Ok((ToTaker::Exported(states), _)) => states,
                Ok((other, _)) => {
                    warn!(got = ?other, "the old shell sent something else than the plugins' state");
                    Default::default()
                }
                Err(e) => {
                    warn!(error = %e, "the plugins' state did not come");
                    Default::default()
                }
            }
        }
        false => Default::default(),
    };
    taken.start_plugins(states).await;
    crate::crash::point("takeover-before-done");
    // The holder exits now; its end of the channel closes with it.
    let ch = channel.clone();
    let _ = blocking("waiting for the old shell to exit", move || {
        ch.send(&ToHolder::Done, &[], "saying it is done")?;
        ch.recv::<ToTaker>(Some(RELEASED_WAIT), "waiting for the old shell to exit")
    })
    .await;
    let instance = taken.open().await?;
    info!(instance = %config.instance.name, "took over");
    assemble(config, instance).await
}
