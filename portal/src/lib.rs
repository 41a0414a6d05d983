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
//! - People and automation use the HTTP JSON API ([`api`]) over HTTPS with
//!   the portal's cluster certificate, and on an optional plain-HTTP listener
//!   bound to loopback for a local browser ([`listener`]). A request is
//!   authenticated by a user certificate of the cluster CA (HTTPS only), a
//!   bearer token or a browser session, each acting as a user ([`auth`]);
//!   every change is audited. People use the web pages ([`web`]) served on
//!   the same listeners, on the same calls. Revoked certificates (the revocation list,
//!   [`wire::revocation`]) are refused on HTTPS and on the shells' QUIC.
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
pub mod listener;
pub mod refs;
pub mod runner;
pub mod shells;
pub mod store;
pub mod target;
pub mod watch;
pub mod web;

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
    /// The TCP address of the API over plain HTTP, for a local browser: a
    /// loopback address only. It accepts tokens and sessions, never
    /// certificates. `None`: no plain-HTTP listener.
    pub http: Option<SocketAddr>,
    /// The TCP address of the API over HTTPS, with the portal's certificate;
    /// clients may present a user certificate of the cluster CA. `None`: no
    /// HTTPS listener. At least one of `http` and `https` is required.
    pub https: Option<SocketAddr>,
    /// More names the API answers to (the `Host` and `Origin` check), beside
    /// its listeners' addresses, `localhost`, `portal.molt`: e.g.
    /// `portal.example.com` (any listener's port) or `portal.example.com:443`.
    pub names: Vec<String>,
    /// The revocation list (`certs/revoked.txt`, see [`wire::revocation`]):
    /// certificates it names are refused on HTTPS and on QUIC. `None`: none are.
    pub revoked: Option<PathBuf>,
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
    /// Neither an HTTP nor an HTTPS listener.
    #[error("the portal needs an HTTPS or a (loopback) HTTP listener for its API")]
    NoListener,
    /// The TLS settings could not be made from the credentials.
    #[error("the HTTPS listener's TLS settings: {0}")]
    Tls(String),
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
pub struct Bound {
    server: Server,
    http: Option<tokio::net::TcpListener>,
    https: Option<(tokio::net::TcpListener, listener::Tls)>,
    names: Vec<String>,
    portal: Arc<Portal>,
}

impl std::fmt::Debug for Bound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bound")
            .field("server", &self.server)
            .field("http", &self.http_addr())
            .field("https", &self.https_addr())
            .finish_non_exhaustive()
    }
}

async fn bind_tcp(addr: SocketAddr) -> Result<tokio::net::TcpListener, PortalError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| PortalError::Http { addr, source })
}

/// Opens the store, makes the first admin if there is no user yet, and binds
/// both listeners.
pub async fn bind(config: Config) -> Result<Bound, PortalError> {
    if config.credentials.identity != Identity::Portal {
        return Err(PortalError::WrongIdentity(
            config.credentials.identity.clone(),
        ));
    }
    if config.http.is_none() && config.https.is_none() {
        return Err(PortalError::NoListener);
    }
    if let Some(http) = config.http.filter(|a| !a.ip().is_loopback()) {
        return Err(PortalError::NotLoopback(http));
    }
    std::fs::create_dir_all(&config.data).map_err(|source| PortalError::Bootstrap {
        path: config.data.clone(),
        source,
    })?;
    let store: Arc<dyn Store> = Arc::new(SledStore::open(&config.data.join("db"))?);
    bootstrap(&*store, &config.data).await?;
    let revoked: Option<Arc<dyn wire::Revoked>> = config
        .revoked
        .as_ref()
        .map(|p| Arc::new(wire::RevocationList::new(p)) as Arc<dyn wire::Revoked>);
    let mut server = Server::bind(config.listen, &config.credentials)?;
    if let Some(r) = &revoked {
        server = server.with_revocation(r.clone());
    }
    let http = match config.http {
        Some(addr) => Some(bind_tcp(addr).await?),
        None => None,
    };
    let https = match config.https {
        Some(addr) => {
            let tls = wire::endpoint::https_server_config(&config.credentials)
                .map_err(|e| PortalError::Tls(e.to_string()))?;
            let tls = listener::Tls {
                acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(tls)),
                revoked: revoked.clone(),
            };
            Some((bind_tcp(addr).await?, tls))
        }
        None => None,
    };
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
        https,
        names: config.names.clone(),
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
                password: None,
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

    /// The plain-HTTP API's address, if it has that listener.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The HTTPS API's address, if it has that listener.
    pub fn https_addr(&self) -> Option<SocketAddr> {
        self.https.as_ref().and_then(|(l, _)| l.local_addr().ok())
    }

    /// The portal's parts (tests, benchmarks).
    pub fn portal(&self) -> Arc<Portal> {
        self.portal.clone()
    }

    /// Serves shells, the API and the runner until `shutdown`.
    pub async fn serve(self, shutdown: CancellationToken) {
        let (http_addr, https_addr) = (self.http_addr(), self.https_addr());
        let Bound {
            server,
            http,
            https,
            names,
            portal,
        } = self;
        info!(quic = ?server.local_addr().ok(), http = ?http_addr, https = ?https_addr, "portal listening");
        let gate = Arc::new(Gate(portal.shells.clone()));
        let listeners: Vec<SocketAddr> = http_addr.into_iter().chain(https_addr).collect();
        let router = api::router(portal.clone(), api::host_names(&listeners, &names));
        let http = async {
            if let Some(l) = http {
                listener::serve(l, None, router.clone(), shutdown.clone()).await;
            }
        };
        let https = async {
            if let Some((l, tls)) = https {
                listener::serve(l, Some(tls), router.clone(), shutdown.clone()).await;
            }
        };
        tokio::join!(
            server.serve(gate, shutdown.clone()),
            portal.runner.clone().run(shutdown.clone()),
            portal.refs.clone().follow(shutdown.clone()),
            http,
            https,
        );
        info!("portal stopped");
    }
}

/// Binds and serves until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), PortalError> {
    bind(config).await?.serve(shutdown).await;
    Ok(())
}
