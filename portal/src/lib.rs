//! molt's portal: the control plane a team deploys through.
//!
//! - **Shells attach** over QUIC with their `shell/<instance>` certificates and
//!   register; the portal sends them the shell protocol's commands on streams
//!   it opens over their connections ([`shells`]).
//! - **Targets** group instances of one stage with the settings their
//!   deployments use ([`target`]).
//! - **Deployments** are records with a pure state machine ([`deployment`]);
//!   the [`runner`] takes queued ones in turn (one per target, FIFO, a
//!   portal-wide cap) and carries each out across the target's instances, with
//!   every step journalled ([`journal`]).
//! - Everything is kept behind one narrow trait ([`store::Store`]), in sled
//!   today ([`store::sled::SledStore`]).
//! - People and automation use the HTTP JSON API ([`api`]), authenticated by
//!   bearer tokens that act as a user ([`auth`]); every change is audited.
//!
//! ```no_run
//! # async fn demo(config: portal::Config) -> Result<(), portal::PortalError> {
//! let shutdown = tokio_util::sync::CancellationToken::new();
//! portal::run(config, shutdown).await
//! # }
//! ```

pub mod api;
pub mod auth;
pub mod deployment;
pub mod journal;
pub mod refs;
pub mod runner;
pub mod shells;
pub mod store;
pub mod target;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use image_spec::UserName;
use tokio_util::sync::CancellationToken;
use tracing::info;
use wire::{Client, Credentials, Grant, Identity, Server, WireError};

use crate::auth::{Token, User};
use crate::deployment::now_ms;
use crate::journal::Journal;
use crate::runner::{Runner, RunnerConfig};
use crate::shells::{Gate, Shells};
use crate::store::sled::SledStore;
use crate::store::{Store, StoreError};

/// How to run a portal.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where its records live (`DATA/db`) and its first admin token is written.
    pub data: PathBuf,
    /// The UDP address shells attach to (QUIC).
    pub listen: SocketAddr,
    /// The TCP address of the HTTP API: a loopback address only, since it is
    /// plain HTTP.
    pub http: SocketAddr,
    /// The portal's certificate (identity `portal`), key and CA.
    pub credentials: Credentials,
    /// The repository server.
    pub repo: SocketAddr,
    /// How deployments are run.
    pub runner: RunnerConfig,
}

/// Why the portal could not start.
#[derive(Debug, thiserror::Error)]
pub enum PortalError {
    /// The store could not be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The QUIC endpoint could not be set up.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// The HTTP listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Http {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// A plain-HTTP listener on an address other hosts can reach.
    #[error(
        "the HTTP API is plain HTTP: it may listen on a loopback address only (127.0.0.1 or ::1), not {0}"
    )]
    NotLoopback(SocketAddr),
    /// The credentials are not the portal's.
    #[error("these credentials are for `{0}`; the portal needs a `portal` certificate")]
    WrongIdentity(Identity),
    /// The first admin's token could not be written.
    #[error("cannot write {path}: {source}")]
    Bootstrap {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// The file the first admin's API token is written to, in the data directory.
pub const ADMIN_TOKEN_FILE: &str = "admin.token";

/// The portal's parts, shared by the API and the runner.
pub struct Portal {
    /// The records.
    pub store: Arc<dyn Store>,
    /// The attached shells.
    pub shells: Arc<Shells>,
    /// The deployments' events.
    pub journal: Arc<Journal>,
    /// The runner.
    pub runner: Arc<Runner>,
    /// The repository's ref moves, followed.
    pub refs: Arc<crate::refs::Refs>,
    /// A client with the portal's credentials, for the repository.
    pub client: Client,
    /// The repository's address.
    pub repo: SocketAddr,
}

impl std::fmt::Debug for Portal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Portal")
            .field("repo", &self.repo)
            .finish_non_exhaustive()
    }
}

/// A portal bound to its addresses, not yet serving.
#[derive(Debug)]
pub struct Bound {
    server: Server,
    http: tokio::net::TcpListener,
    portal: Arc<Portal>,
}

/// Opens the store, makes the first admin if there is no user yet, and binds
/// both listeners.
pub async fn bind(config: Config) -> Result<Bound, PortalError> {
    if config.credentials.identity != Identity::Portal {
        return Err(PortalError::WrongIdentity(
            config.credentials.identity.clone(),
        ));
    }
    if !config.http.ip().is_loopback() {
        return Err(PortalError::NotLoopback(config.http));
    }
    std::fs::create_dir_all(&config.data).map_err(|source| PortalError::Bootstrap {
        path: config.data.clone(),
        source,
    })?;
    let store: Arc<dyn Store> = Arc::new(SledStore::open(&config.data.join("db"))?);
    bootstrap(&*store, &config.data).await?;
    let server = Server::bind(config.listen, &config.credentials)?;
    let http = tokio::net::TcpListener::bind(config.http)
        .await
        .map_err(|source| PortalError::Http {
            addr: config.http,
            source,
        })?;
    let client = Client::new(&config.credentials, config.repo)?;
    let shells = Arc::new(Shells::new(store.clone()));
    let journal = Arc::new(Journal::new(store.clone()));
    let runner = Arc::new(Runner::new(
        store.clone(),
        shells.clone(),
        journal.clone(),
        config.runner.clone(),
    ));
    let refs = Arc::new(crate::refs::Refs::new(
        store.clone(),
        client.clone(),
        config.repo,
    ));
    Ok(Bound {
        server,
        http,
        portal: Arc::new(Portal {
            store,
            shells,
            journal,
            runner,
            refs,
            client,
            repo: config.repo,
        }),
    })
}

/// On first start (no user yet): the user `admin` with an API token, whose
/// secret is written to `DATA/admin.token` (mode 0600) and nowhere else.
async fn bootstrap(store: &dyn Store, data: &std::path::Path) -> Result<(), PortalError> {
    if !store.users().await?.is_empty() {
        return Ok(());
    }
    let name = UserName::new("admin").expect("`admin` is a valid user name");
    let now = now_ms();
    let secret = auth::new_secret().map_err(|e| PortalError::Bootstrap {
        path: data.join(ADMIN_TOKEN_FILE),
        source: std::io::Error::other(e.to_string()),
    })?;
    let path = data.join(ADMIN_TOKEN_FILE);
    write_private(&path, &format!("{secret}\n")).map_err(|source| PortalError::Bootstrap {
        path: path.clone(),
        source,
    })?;
    store
        .put_user(
            User {
                name: name.clone(),
                grant: Grant::Admin,
                created: now,
            },
            false,
        )
        .await?;
    let hash = auth::hash_secret(&secret);
    store
        .put_token(Token {
            id: api::token_id(&hash),
            name: "first admin".into(),
            user: name,
            grant: Grant::Admin,
            targets: None,
            created: now,
            expires: now + api::DEFAULT_TOKEN_DAYS * 86_400_000,
            revoked: None,
            hash,
        })
        .await?;
    info!(path = %path.display(), "made the first admin; its API token is in this file");
    Ok(())
}

/// Writes `text` to a new file only its owner can read.
fn write_private(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(text.as_bytes())?;
    file.sync_all()
}

impl Bound {
    /// The QUIC address shells attach to.
    pub fn local_addr(&self) -> Result<SocketAddr, PortalError> {
        Ok(self.server.local_addr()?)
    }

    /// The HTTP API's address.
    pub fn http_addr(&self) -> Result<SocketAddr, PortalError> {
        self.http.local_addr().map_err(|source| PortalError::Http {
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            source,
        })
    }

    /// The portal's parts (tests, benchmarks).
    pub fn portal(&self) -> Arc<Portal> {
        self.portal.clone()
    }

    /// Serves shells, the API and the runner until `shutdown`.
    pub async fn serve(self, shutdown: CancellationToken) {
        let http_addr = self.http.local_addr().ok();
        info!(quic = ?self.server.local_addr().ok(), http = ?http_addr, "portal listening");
        let gate = Arc::new(Gate(self.portal.shells.clone()));
        let router = api::router(self.portal.clone(), http_addr);
        let api_shutdown = shutdown.clone();
        let http = async move {
            let serving = axum::serve(self.http, router)
                .with_graceful_shutdown(async move { api_shutdown.cancelled().await });
            if let Err(e) = serving.await {
                tracing::warn!(error = %e, "the HTTP API stopped");
            }
        };
        tokio::join!(
            self.server.serve(gate, shutdown.clone()),
            self.portal.runner.clone().run(shutdown.clone()),
            self.portal.refs.clone().follow(shutdown.clone()),
            http,
        );
        info!("portal stopped");
    }
}

/// Binds and serves until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), PortalError> {
    bind(config).await?.serve(shutdown).await;
    Ok(())
}
