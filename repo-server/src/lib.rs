//! molt's repository server: every commit of every service, content-addressed.
//!
//! Blobs live as files in `DATA/blobs` ([`blobs`]); trees, commits, branches,
//! images with their authors, and the ref log live in a sled database in
//! `DATA/meta` ([`meta`]). Both sit behind narrow
//! traits so an object store or a SQL database can replace them without touching
//! the protocol code ([`service`]). The other side, the typed calls and the push
//! that the `molt` CLI and the shell use, is the `repo-client` crate, which holds
//! none of this storage.
//!
//! ```no_run
//! # async fn demo(config: repo_server::Config) -> Result<(), repo_server::RepoServerError> {
//! let shutdown = tokio_util::sync::CancellationToken::new();
//! repo_server::run(config, shutdown).await
//! # }
//! ```

pub mod blobs;
pub mod fsck;
pub mod meta;
pub mod objects;
pub mod service;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use wire::{Credentials, Server, WireError};

use crate::blobs::{BlobError, BlobStore, FsBlobStore};
use crate::meta::{MetaError, MetaStore, SledMeta};
use crate::service::RepoService;

/// How to run a repository server.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where blobs and metadata live (`DATA/blobs`, `DATA/meta`).
    pub data: PathBuf,
    /// The UDP address to serve QUIC on.
    pub listen: SocketAddr,
    /// The server's certificate (identity `repo-server`), key and CA.
    pub credentials: Credentials,
    /// The revocation list (`certs/revoked.txt`, see [`wire::revocation`]):
    /// peers whose certificate it names are refused at admission. `None`:
    /// none are.
    pub revoked: Option<PathBuf>,
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum RepoServerError {
    /// The blob store could not be opened.
    #[error(transparent)]
    Blobs(#[from] BlobError),
    /// The metadata database could not be opened.
    #[error(transparent)]
    Meta(#[from] MetaError),
    /// The QUIC endpoint could not be set up.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// The credentials are not the repository server's.
    #[error(
        "these credentials are for `{0}`; the repository server needs a `repo-server` certificate"
    )]
    WrongIdentity(wire::Identity),
}

/// The unacknowledged bytes the server holds per connection at most: what a
/// shell reading slower than the server sends (a disk-bound fetch) can cost
/// the server in memory. It equals what a shell accepts on one stream (a fetch
/// is one stream), so a fetch runs as fast as before while a connection with
/// several streams cannot hold more. Measured with `scripts/bench-fanout`: 8 MiB
/// made one fetch on loopback ~25 % slower (the receiver's acknowledgements
/// stall while it syncs what it wrote).
pub const SEND_WINDOW: u64 = 16 << 20;

/// A burst of fetches is over once none has run for this long; the server
/// then gives the memory it used back to the system.
const FETCHES_SETTLED: std::time::Duration = std::time::Duration::from_secs(1);

/// The concrete service this crate serves.
pub type FsRepoService = RepoService<FsBlobStore, SledMeta>;

/// A server bound to its address, not yet serving.
#[derive(Debug)]
pub struct Bound {
    server: Server,
    service: Arc<FsRepoService>,
}

/// Opens the stores and binds the endpoint.
pub fn bind(config: &Config) -> Result<Bound, RepoServerError> {
    if config.credentials.identity != wire::Identity::RepoServer {
        return Err(RepoServerError::WrongIdentity(
            config.credentials.identity.clone(),
        ));
    }
    // sled locks its directory: opening it first makes a second server on the same
    // data fail before it can touch the running server's blob store.
    let meta = SledMeta::open(&config.data)?;
    let blobs = FsBlobStore::open(&config.data.join("blobs"))?;
    let mut server =
        Server::bind_with_send_window(config.listen, &config.credentials, SEND_WINDOW)?;
    if let Some(path) = &config.revoked {
        server = server.with_revocation(Arc::new(wire::RevocationList::new(path)));
    }
    Ok(Bound {
        server,
        service: Arc::new(RepoService::new(blobs, meta)),
    })
}

impl Bound {
    /// The address actually bound.
    pub fn local_addr(&self) -> Result<SocketAddr, RepoServerError> {
        Ok(self.server.local_addr()?)
    }

    /// The service, for inspecting the stores (tests, admin tools).
    pub fn service(&self) -> Arc<FsRepoService> {
        self.service.clone()
    }

    /// Serves until `shutdown` is cancelled; returns once every connection is closed.
    pub async fn serve(self, shutdown: CancellationToken) {
        tracing::info!(addr = ?self.server.local_addr().ok(), "repository server listening");
        serve(self.server, self.service, shutdown).await;
        tracing::info!("repository server stopped");
    }
}

/// Serves `service` on `server` until `shutdown` is cancelled, ending every watch
/// at once then (a watch would otherwise hold the shutdown up for the drain grace
/// period); returns once every connection is closed.
pub async fn serve<B: BlobStore, M: MetaStore>(
    server: Server,
    service: Arc<RepoService<B, M>>,
    shutdown: CancellationToken,
) {
    let watches = async {
        shutdown.cancelled().await;
        service.close_watches();
    };
    tokio::join!(
        server.serve(service.clone(), shutdown.clone()),
        watches,
        give_back_memory(&service, &shutdown)
    );
}

/// Once a burst of fetches is over, hands the heap the server no longer uses
/// back to the system: the allocator keeps freed memory for reuse, so the
/// buffers of thirty fetches at once would otherwise stay resident.
async fn give_back_memory<B: BlobStore, M: MetaStore>(
    service: &RepoService<B, M>,
    shutdown: &CancellationToken,
) {
    let mut trimmed_after = None;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(FETCHES_SETTLED) => {}
        }
        let Some(ended) = service.last_fetch_end() else {
            continue;
        };
        // One trim per burst: when it has settled and not been trimmed yet.
        if ended.elapsed() >= FETCHES_SETTLED && trimmed_after != Some(ended) {
            trimmed_after = Some(ended);
            let _ = tokio::task::spawn_blocking(trim_heap).await;
        }
    }
}

/// Returns free heap pages to the system (glibc's `malloc_trim`).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim_heap() {
    // SAFETY: malloc_trim only walks the allocator's own free lists; it takes
    // the arenas' locks and is safe to call from any thread at any time.
    #[allow(unsafe_code)]
    let released = unsafe { libc::malloc_trim(0) };
    tracing::debug!(released, "gave free heap back to the system");
}

/// Other allocators return memory on their own.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim_heap() {}

/// Binds and serves until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), RepoServerError> {
    bind(&config)?.serve(shutdown).await;
    Ok(())
}
