//! Attaching to a portal: the shell's side of "shells dial out".
//!
//! A shell given a portal address dials it (the portal's role, verified by its
//! certificate) with its own `shell/<instance>` credentials, so nothing needs to
//! dial into an instance and instances can sit behind NAT. On that connection
//! it opens one stream and sends [`Register`] — instance, stage, labels, shell
//! version, the image it runs and its generation — and expects `Ok(())`. Then
//! it serves the streams the portal opens, each carrying one shell command,
//! exactly as its own listener would ([`crate::service`]), with the portal as
//! the peer. See [`wire::portal`] for the protocol.
//!
//! This module owns that connection's life: one [`Attach`] per shell, run by
//! `Bound::serve` as one of its tasks. A connection refused, lost, or a
//! registration turned down is tried again after a delay drawn by
//! [`Backoff`] (full jitter under a ceiling doubling from 200 ms to 10 s,
//! back to 200 ms after a connection that lasted). The command streams of all
//! its connections are its own tasks: a stream in flight when its connection
//! is lost ends on its own (an upgrade it started runs on as the service's
//! task, and its outcome waits for the portal under its deployment id). At
//! shutdown it stops taking streams, lets those in flight finish (up to 10 s;
//! the shutdown cancels upgrades), closes the connection and waits for its
//! endpoint to close.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use image_spec::InstanceName;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};
use wire::portal::{Register, RegisterReply};
use wire::repo::RemoteError;
use wire::shell::Stage;
use wire::{BiStream, Client, Connection, Credentials, Identity, WireError};

use crate::service::ShellService;

/// The first delay's ceiling.
pub const FIRST_RETRY: Duration = Duration::from_millis(200);

/// The highest ceiling of a delay between attempts.
pub const MAX_RETRY: Duration = Duration::from_secs(10);

/// A connection that stayed up this long resets the backoff.
pub const STABLE: Duration = Duration::from_secs(10);

/// How long the portal has to answer a registration.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(10);

/// How long command streams in flight may run on at shutdown.
const DRAIN_GRACE: Duration = Duration::from_secs(10);

/// The shell's software, as it registers.
pub const SHELL_VERSION: &str = concat!("molt ", env!("CARGO_PKG_VERSION"));

/// Why one attempt to attach failed.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    /// The portal could not be reached, or the connection failed.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// The portal turned the registration down.
    #[error("the portal refused the registration: {0}")]
    Refused(RemoteError),
    /// The portal did not answer the registration in time.
    #[error("the portal did not answer the registration within {0:?}")]
    Timeout(Duration),
}

/// The delays between attempts: full jitter (uniform between zero and a
/// ceiling) under a ceiling that doubles from `first` up to `max`; a pure
/// value, the randomness passed in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    /// Attempts since the last reset.
    failures: u32,
}

impl Backoff {
    /// A backoff whose first ceiling is `first`, never above `max`.
    pub fn new(first: Duration, max: Duration) -> Self {
        Self {
            first,
            max,
            failures: 0,
        }
    }

    /// The ceiling of the next delay: `first · 2^failures`, at most `max`.
    pub fn ceiling(&self) -> Duration {
        let doubled = 1u32
            .checked_shl(self.failures)
            .and_then(|factor| self.first.checked_mul(factor))
            .unwrap_or(self.max);
        doubled.min(self.max)
    }

    /// The next delay, `random` drawn uniformly over u64: uniform between zero
    /// and the ceiling; the ceiling then doubles.
    pub fn next_delay(&mut self, random: u64) -> Duration {
        let ceiling = self.ceiling();
        self.failures = self.failures.saturating_add(1);
        let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        // The high bits of a uniform draw scaled to [0, ceiling].
        let jittered = (u128::from(random) * (u128::from(nanos) + 1)) >> 64;
        Duration::from_nanos(u64::try_from(jittered).unwrap_or(nanos))
    }

    /// Back to the first ceiling (after a connection that lasted).
    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

/// A random draw for the jitter: the standard library's per-process random
/// hash keys, hashed over a counter. Not for secrets; only to spread shells'
/// reconnections apart.
pub(crate) fn random() -> u64 {
    use std::hash::BuildHasher;
    use std::sync::atomic::{AtomicU64, Ordering};
    static DRAWS: AtomicU64 = AtomicU64::new(0);
    std::collections::hash_map::RandomState::new().hash_one(DRAWS.fetch_add(1, Ordering::Relaxed))
}

/// A shell's attachment to its portal (see the module docs).
#[derive(Debug)]
pub(crate) struct Attach {
    portal: SocketAddr,
    client: Client,
    instance: InstanceName,
    stage: Stage,
    labels: BTreeMap<String, String>,
}

/// How one connection to the portal ended.
enum Ended {
    /// The shell is shutting down.
    Shutdown,
    /// The connection was lost.
    Lost(String),
}

impl Attach {
    /// The attachment of `instance` to the portal at `portal`, dialling with
    /// `credentials` (the shell's own).
    pub(crate) fn new(
        portal: SocketAddr,
        credentials: &Credentials,
        instance: InstanceName,
        stage: Stage,
        labels: BTreeMap<String, String>,
    ) -> Result<Self, WireError> {
        Ok(Self {
            portal,
            client: Client::new(credentials, portal)?,
            instance,
            stage,
            labels,
        })
    }

    /// The portal's address.
    pub(crate) fn portal(&self) -> SocketAddr {
        self.portal
    }

    /// Attaches, serves the portal's commands and reattaches until `shutdown`.
    pub(crate) async fn run(self, service: Arc<ShellService>, shutdown: CancellationToken) {
        let span = info_span!("attach", instance = %self.instance, portal = %self.portal);
        async {
            let mut backoff = Backoff::new(FIRST_RETRY, MAX_RETRY);
            let mut streams = JoinSet::new();
            loop {
                let attempt = tokio::select! {
                    () = shutdown.cancelled() => break,
                    attempt = self.attach(&service) => attempt,
                };
                match attempt {
                    Ok(conn) => {
                        info!("registered with the portal");
                        let since = Instant::now();
                        let ended = self.serve(&conn, &service, &mut streams, &shutdown).await;
                        if let Ended::Lost(reason) = ended {
                            warn!(%reason, "lost the connection to the portal");
                        } else {
                            drain(&mut streams).await;
                            conn.close();
                            break;
                        }
                        if since.elapsed() >= STABLE {
                            backoff.reset();
                        }
                    }
                    Err(e) => warn!(error = %e, "cannot attach to the portal"),
                }
                let delay = backoff.next_delay(random());
                debug!(?delay, "attaching again after a delay");
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(delay) => {}
                }
                while streams.try_join_next().is_some() {}
            }
            drain(&mut streams).await;
            self.client.shutdown().await;
            info!("detached from the portal");
        }
        .instrument(span)
        .await;
    }

    /// One attempt: connect, register, and the connection if accepted.
    async fn attach(&self, service: &ShellService) -> Result<Connection, AttachError> {
        let conn = self.client.connect(self.portal, &Identity::Portal).await?;
        let status = service.status();
        let register = Register {
            instance: self.instance.clone(),
            stage: self.stage,
            labels: self.labels.clone(),
            shell_version: SHELL_VERSION.to_owned(),
            image: status.image,
            generation: status.generation,
        };
        let reply: RegisterReply = tokio::time::timeout(REGISTER_TIMEOUT, conn.call(&register))
            .await
            .map_err(|_| AttachError::Timeout(REGISTER_TIMEOUT))??;
        match reply {
            Ok(()) => Ok(conn),
            Err(refused) => {
                conn.close();
                Err(AttachError::Refused(refused))
            }
        }
    }

    /// Serves the streams the portal opens on `conn` until it ends or the
    /// shell shuts down.
    async fn serve(
        &self,
        conn: &Connection,
        service: &Arc<ShellService>,
        streams: &mut JoinSet<()>,
        shutdown: &CancellationToken,
    ) -> Ended {
        let portal = Arc::new(Identity::Portal);
        loop {
            while streams.try_join_next().is_some() {}
            let (send, recv) = tokio::select! {
                () = shutdown.cancelled() => return Ended::Shutdown,
                accepted = conn.quinn().accept_bi() => match accepted {
                    Ok(stream) => stream,
                    Err(e) => return Ended::Lost(e.to_string()),
                },
            };
            let (service, portal) = (service.clone(), portal.clone());
            streams.spawn(
                async move { service.handle(portal, BiStream { send, recv }).await }
                    .in_current_span(),
            );
        }
    }
}

/// Lets the command streams in flight finish, up to [`DRAIN_GRACE`]; then
/// ends the rest.
async fn drain(streams: &mut JoinSet<()>) {
    let drained = tokio::time::timeout(DRAIN_GRACE, async {
        while streams.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        debug!("command streams cut off after the drain grace period");
        streams.shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_are_jittered_under_a_doubling_capped_ceiling() {
        let mut backoff = Backoff::new(FIRST_RETRY, MAX_RETRY);
        let ceilings: Vec<u64> = (0..10)
            .map(|_| {
                let ceiling = backoff.ceiling();
                // The largest draw reaches the ceiling, the smallest zero.
                let mut copy = backoff.clone();
                assert_eq!(copy.next_delay(u64::MAX), ceiling);
                assert_eq!(backoff.clone().next_delay(0), Duration::ZERO);
                let half = backoff.next_delay(u64::MAX / 2);
                assert!(half <= ceiling / 2 + Duration::from_nanos(1), "{half:?}");
                u64::try_from(ceiling.as_millis()).unwrap()
            })
            .collect();
        assert_eq!(
            ceilings,
            [
                200, 400, 800, 1600, 3200, 6400, 10_000, 10_000, 10_000, 10_000
            ]
        );
        // Far past the cap nothing overflows.
        for _ in 0..100 {
            assert!(backoff.next_delay(u64::MAX) <= MAX_RETRY);
        }
        backoff.reset();
        assert_eq!(backoff.ceiling(), FIRST_RETRY);
        // Draws spread out.
        let draws: std::collections::BTreeSet<u64> = (0..16).map(|_| random()).collect();
        assert!(draws.len() > 1);
    }
}
