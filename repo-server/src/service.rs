//! The repository's QUIC service: one request per stream, authorized by the caller's
//! verified identity, answered from the stores.
//!
//! Validation lives here, at the edge: a commit is stored only if its tree hashes to
//! the commit's tree id, every parent exists, every file blob is stored, and the
//! tree holds a `service.toml` that parses and names the commit's service. Paths
//! and symlinks were already checked when the tree was decoded (a `Tree` cannot hold
//! an escaping path). A blob is stored only if its bytes hash to its id. An image
//! is stored only if each of its commits exists and belongs to its service, and
//! no two of its services' `service.toml` want the same public port; its author is
//! decided by [`wire::repo::image_author`] from the verified identity.
//!
//! Every branch move and image creation is also an event of the ref log (written
//! by the [`MetaStore`] in the same transaction) and, once durable, is published
//! on a broadcast channel to the watches ([`RepoRequest::WatchRefs`]). A watch
//! subscribes first and reads the log second, then skips by number what it has
//! already sent, so nothing falls between the two; a watch the channel left
//! behind catches up from the log instead of slowing anyone down. Watches end when
//! the watcher closes its stream or when [`RepoService::close_watches`] is called
//! (the server's shutdown), without waiting for the drain grace period.

use std::collections::BTreeMap;
use std::sync::Arc;

use image_spec::{
    BlobId, BranchName, Commit, CommitId, IdPrefix, Image, MANIFEST_FILE, Mode, RelPath,
    ServiceManifest, ServiceName, Timestamp, Tree, TreeDiff, UserName,
};
use tokio::io::AsyncReadExt as _;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, info_span, warn};
use wire::codec::{self, DEFAULT_FRAME_LIMIT, FrameError};
use wire::endpoint::code;
use wire::repo::{
    ErrorKind, ImageAuthorship, LogEntry, MAX_BLOBS_PER_REQUEST, Missed, Operation, RefEvent,
    RemoteError, RepoReply, RepoRequest, RepoResponse,
};
use wire::{BiStream, Handler, Identity};

use crate::blobs::{BlobError, BlobStore};
use crate::meta::{HeadUpdate, MetaError, MetaStore};

/// Blobs up to this size are received into memory and stored in batches.
const SMALL_BLOB: u64 = 1 << 20;
/// How many bytes of small blobs are gathered before a batch is stored.
const BATCH_BYTES: u64 = 8 << 20;

/// Most commits one log request returns.
const MAX_LOG: u32 = 10_000;

/// How much request memory (frames being read, small blobs being batched) all
/// requests together may hold, in KiB: a peer that opens many streams and sends
/// half frames waits for budget instead of growing the server without bound.
const REQUEST_BUDGET_KIB: usize = 256 << 10;

/// How long a peer has, from opening a stream, to deliver its whole request frame.
const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// How many live events a watch may fall behind before it catches up from the log.
const LIVE_BACKLOG: usize = 256;

/// How many events a watch reads from the log at a time.
const CATCH_UP_BATCH: usize = 256;

/// Most watches open at once, server-wide.
const MAX_WATCHES: usize = 1024;

/// The repository service over a blob store and a metadata store.
#[derive(Debug)]
pub struct RepoService<B, M> {
    blobs: B,
    meta: M,
    budget: tokio::sync::Semaphore,
    /// Each ref log event, once durable, for the live watches.
    events: broadcast::Sender<RefEvent>,
    /// Open watches, at most [`MAX_WATCHES`].
    watches: tokio::sync::Semaphore,
    /// Cancelled when the server shuts down: every watch ends.
    closing: CancellationToken,
    /// Fetches in progress, and when the last one ended: the server gives
    /// the memory of a burst of fetches back once it is over.
    fetches: FetchTracker,
}

/// Counts fetches in progress and remembers when the last one ended.
#[derive(Debug, Default)]
struct FetchTracker {
    active: std::sync::atomic::AtomicUsize,
    last_end: std::sync::Mutex<Option<std::time::Instant>>,
}

/// A fetch in progress; its drop ends it.
struct FetchGuard<'a>(&'a FetchTracker);

impl FetchTracker {
    fn start(&self) -> FetchGuard<'_> {
        self.active
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        FetchGuard(self)
    }
}

impl Drop for FetchGuard<'_> {
    fn drop(&mut self) {
        *self.0.last_end.lock().unwrap_or_else(|e| e.into_inner()) =
            Some(std::time::Instant::now());
        self.0
            .active
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

impl From<MetaError> for RemoteError {
    fn from(e: MetaError) -> Self {
        warn!(error = %e, "metadata store failed");
        RemoteError::new(ErrorKind::Internal, e.to_string())
    }
}

impl From<BlobError> for RemoteError {
    fn from(e: BlobError) -> Self {
        match e {
            BlobError::Mismatch { .. } => RemoteError::new(ErrorKind::Invalid, e.to_string()),
            BlobError::Io { .. } => {
                warn!(error = %e, "blob store failed");
                RemoteError::new(ErrorKind::Internal, e.to_string())
            }
        }
    }
}

fn invalid(msg: impl Into<String>) -> RemoteError {
    RemoteError::new(ErrorKind::Invalid, msg)
}

fn not_found(msg: impl Into<String>) -> RemoteError {
    RemoteError::new(ErrorKind::NotFound, msg)
}

fn request_name(req: &RepoRequest) -> &'static str {
    match req {
        RepoRequest::MissingBlobs { .. } => "missing_blobs",
        RepoRequest::PutBlobs { .. } => "put_blobs",
        RepoRequest::CreateCommit { .. } => "create_commit",
        RepoRequest::MoveBranch { .. } => "move_branch",
        RepoRequest::Resolve { .. } => "resolve",
        RepoRequest::Log { .. } => "log",
        RepoRequest::GetCommit { .. } => "get_commit",
        RepoRequest::GetTree { .. } => "get_tree",
        RepoRequest::Diff { .. } => "diff",
        RepoRequest::FetchBlobs { .. } => "fetch_blobs",
        RepoRequest::CreateImage { .. } => "create_image",
        RepoRequest::GetImage { .. } => "get_image",
        RepoRequest::ListImages => "list_images",
        RepoRequest::CreateCommitFromDiff { .. } => "create_commit_from_diff",
        RepoRequest::WatchRefs { .. } => "watch_refs",
        RepoRequest::ListBranches { .. } => "list_branches",
    }
}

impl<B: BlobStore, M: MetaStore> Handler for RepoService<B, M> {
    async fn handle(&self, peer: Arc<Identity>, mut stream: BiStream) {
        let read = tokio::time::timeout(
            REQUEST_TIMEOUT,
            stream.read_request_within::<RepoRequest>(DEFAULT_FRAME_LIMIT, &self.budget),
        )
        .await
        .unwrap_or(Err(FrameError::Stalled(REQUEST_TIMEOUT)));
        let (req, permit) = match read {
            Ok(r) => r,
            Err(e) => {
                warn!(%peer, error = %e, "refusing malformed request");
                stream.refuse(&e);
                return;
            }
        };
        let span = info_span!("request", %peer, op = request_name(&req));
        // A watch lasts as long as its watcher wants: it holds no request budget.
        let permit = (!matches!(req, RepoRequest::WatchRefs { .. })).then_some(permit);
        self.serve(&peer, req, stream).instrument(span).await;
        drop(permit);
    }
}

async fn reply(stream: &mut BiStream, reply: &RepoReply) {
    let written = match codec::encode_frame(reply, DEFAULT_FRAME_LIMIT) {
        Ok(frame) => stream
            .send
            .write_all(&frame)
            .await
            .map_err(|e| FrameError::Io(e.into())),
        // An answer too large for one frame becomes a typed error the client sees.
        Err(FrameError::TooLarge { len, limit }) => {
            let err: RepoReply = Err(invalid(format!(
                "the answer is {len} bytes, over the frame limit of {limit}; ask for less (e.g. a smaller --limit)"
            )));
            codec::write_frame(&mut stream.send, &err).await
        }
        Err(e) => Err(e),
    };
    if let Err(e) = written {
        debug!(error = %e, "could not deliver the reply");
        return;
    }
    let _ = stream.send.finish();
}

impl<B: BlobStore, M: MetaStore> RepoService<B, M> {
    /// A service over these stores.
    pub fn new(blobs: B, meta: M) -> Self {
        Self {
            blobs,
            meta,
            budget: tokio::sync::Semaphore::new(REQUEST_BUDGET_KIB),
            events: broadcast::channel(LIVE_BACKLOG).0,
            watches: tokio::sync::Semaphore::new(MAX_WATCHES),
            closing: CancellationToken::new(),
            fetches: FetchTracker::default(),
        }
    }

    /// When the last fetch ended, if none is in progress (`None`: one is, or
    /// none ever ran).
    pub fn last_fetch_end(&self) -> Option<std::time::Instant> {
        if self
            .fetches
            .active
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
        {
            return None;
        }
        *self
            .fetches
            .last_end
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Ends every watch, now and from now on (the server is shutting down).
    pub fn close_watches(&self) {
        self.closing.cancel();
    }

    /// Hands a logged event to the live watches.
    fn publish(&self, event: RefEvent) {
        debug!(seq = event.seq, "ref event");
        // No watch listening is not an error: the event is in the log.
        let _ = self.events.send(event);
    }

    /// The blob store.
    pub fn blobs(&self) -> &B {
        &self.blobs
    }

    /// The metadata store.
    pub fn meta(&self) -> &M {
        &self.meta
    }

    async fn serve(&self, peer: &Identity, req: RepoRequest, mut stream: BiStream) {
        let op = Operation::of(&req);
        if !op.allowed(peer) {
            info!(%peer, ?op, "permission denied");
            let what = match op {
                Operation::Push => "push",
                Operation::CreateImage => "create images",
                Operation::Read => "read",
            };
            let err = RemoteError::new(
                ErrorKind::PermissionDenied,
                format!("`{peer}` may not {what}"),
            );
            // Bytes may be following the request; we will not read them.
            let _ = stream.recv.stop(code::OK);
            reply(&mut stream, &Err(err)).await;
            return;
        }
        match req {
            RepoRequest::PutBlobs { blobs } => {
                let result = self.put_blobs(&mut stream, blobs).await;
                if result.is_err() {
                    let _ = stream.recv.stop(code::OK);
                }
                reply(&mut stream, &result).await;
            }
            RepoRequest::FetchBlobs { blobs } => self.fetch_blobs(&mut stream, blobs).await,
            RepoRequest::WatchRefs { after } => self.watch_refs(&mut stream, after).await,
            other => {
                let result = self.answer(peer, other).await;
                if let Err(e) = &result {
                    debug!(kind = ?e.kind, error = %e, "request failed");
                }
                reply(&mut stream, &result).await;
            }
        }
    }

    async fn answer(&self, peer: &Identity, req: RepoRequest) -> RepoReply {
        match req {
            RepoRequest::MissingBlobs { blobs } => {
                check_count(blobs.len())?;
                let sizes = self.blobs.sizes_many(blobs.clone()).await?;
                let missing = blobs
                    .into_iter()
                    .zip(sizes)
                    .filter_map(|(id, size)| size.is_none().then_some(id))
                    .collect();
                Ok(RepoResponse::Missing { blobs: missing })
            }
            RepoRequest::CreateCommit { commit, tree } => {
                self.create_commit(peer, commit, tree).await
            }
            RepoRequest::CreateCommitFromDiff { commit, base, diff } => {
                let base = self.service_commit(commit.service(), &base)?;
                let base_tree = self
                    .meta
                    .tree(&base.tree())?
                    .ok_or_else(|| not_found(format!("no tree {}", base.tree())))?;
                // Re-checks every path and the promised result against the commit.
                let tree = diff
                    .apply_expecting(&base_tree, commit.tree())
                    .map_err(|e| invalid(format!("the diff does not apply: {e}")))?;
                self.create_commit(peer, commit, tree).await
            }
            RepoRequest::MoveBranch {
                service,
                branch,
                expected,
                new,
            } => self.move_branch(peer, &service, &branch, expected, new),
            RepoRequest::Resolve { service, rev } => self
                .resolve(&service, &rev)
                .map(|id| RepoResponse::Resolved { id }),
            RepoRequest::Log {
                service,
                branch,
                limit,
            } => self.log(&service, &branch, limit.min(MAX_LOG)),
            RepoRequest::GetCommit { id } => Ok(RepoResponse::Commit {
                commit: self.commit(&id)?,
            }),
            RepoRequest::GetTree { id } => {
                let tree = self
                    .meta
                    .tree(&id)?
                    .ok_or_else(|| not_found(format!("no tree {id}")))?;
                Ok(RepoResponse::Tree { tree })
            }
            RepoRequest::Diff { service, from, to } => self.diff(&service, from, to),
            RepoRequest::CreateImage {
                image,
                on_behalf_of,
            } => self.create_image(peer, image, on_behalf_of).await,
            RepoRequest::GetImage { name } => {
                let record = self
                    .meta
                    .image(&name)?
                    .ok_or_else(|| not_found(format!("no image named `{name}`")))?;
                Ok(RepoResponse::Image { record })
            }
            RepoRequest::ListImages => Ok(RepoResponse::Images {
                images: self.meta.images()?,
            }),
            RepoRequest::ListBranches { service } => Ok(RepoResponse::Branches {
                branches: self.meta.heads(service.as_ref())?,
            }),
            RepoRequest::PutBlobs { .. }
            | RepoRequest::FetchBlobs { .. }
            | RepoRequest::WatchRefs { .. } => {
                Err(invalid("streaming requests are served on their own path"))
            }
        }
    }

    /// Receives each announced blob, verifying it on the way in. Small blobs are
    /// gathered in memory and stored in batches (one durability barrier per batch);
    /// large ones stream through a temporary file.
    async fn put_blobs(&self, stream: &mut BiStream, blobs: Vec<(BlobId, u64)>) -> RepoReply {
        check_count(blobs.len())?;
        let present: Vec<bool> = self
            .blobs
            .sizes_many(blobs.iter().map(|(id, _)| *id).collect())
            .await?
            .into_iter()
            .map(|s| s.is_some())
            .collect();
        let (mut stored, mut bytes) = (0u64, 0u64);
        let mut batch: Vec<(BlobId, Vec<u8>)> = Vec::new();
        let mut batch_permits = Vec::new();
        let mut batch_bytes = 0u64;
        for ((id, size), existed) in blobs.into_iter().zip(present) {
            if size <= SMALL_BLOB {
                // Batched bytes count against the server-wide request budget.
                batch_permits.push(
                    codec::acquire(&self.budget, size)
                        .await
                        .map_err(|e| RemoteError::new(ErrorKind::Internal, e.to_string()))?,
                );
                let mut buf = Vec::with_capacity(size as usize);
                codec::copy_exact(&mut stream.recv, &mut buf, size, |_| {})
                    .await
                    .map_err(|e| invalid(format!("blob {id}: {e}")))?;
                batch.push((id, buf));
                batch_bytes += size;
                if batch_bytes >= BATCH_BYTES {
                    self.blobs.put_many(std::mem::take(&mut batch)).await?;
                    batch_permits.clear();
                    batch_bytes = 0;
                }
            } else {
                let mut sink = self.blobs.begin().await?;
                if let Err(e) = codec::copy_exact(&mut stream.recv, &mut sink, size, |_| {}).await {
                    self.blobs.abort(sink).await;
                    return Err(invalid(format!("blob {id}: {e}")));
                }
                self.blobs.commit(sink, &id).await?;
            }
            bytes += size;
            if !existed {
                stored += 1;
            }
        }
        if !batch.is_empty() {
            self.blobs.put_many(batch).await?;
        }
        // Nothing may follow the announced blobs.
        let mut probe = [0u8; 1];
        match stream.recv.read(&mut probe).await {
            Ok(None | Some(0)) => {}
            Ok(Some(_)) => return Err(invalid("bytes follow the announced blobs")),
            Err(e) => debug!(error = %e, "reading the end of an upload"),
        }
        info!(stored, bytes, "blobs received");
        Ok(RepoResponse::BlobsStored { stored, bytes })
    }

    /// Sends the sizes, then each blob's bytes in order.
    async fn fetch_blobs(&self, stream: &mut BiStream, blobs: Vec<BlobId>) {
        let _fetch = self.fetches.start();
        let sizes = async {
            check_count(blobs.len())?;
            let mut sizes = Vec::with_capacity(blobs.len());
            for id in &blobs {
                let size = self
                    .blobs
                    .size(id)
                    .await?
                    .ok_or_else(|| not_found(format!("no blob {id}")))?;
                sizes.push(size);
            }
            Ok::<_, RemoteError>(sizes)
        }
        .await;
        let sizes = match sizes {
            Ok(s) => s,
            Err(e) => return reply(stream, &Err(e)).await,
        };
        let header: RepoReply = Ok(RepoResponse::BlobsFollow {
            sizes: sizes.clone(),
        });
        if codec::write_frame(&mut stream.send, &header).await.is_err() {
            return;
        }
        for (id, size) in blobs.iter().zip(sizes) {
            // What is served is verified on the way: a blob whose bytes are
            // not its id's is quarantined, so it is missing from now on and
            // the next push that holds it uploads it again.
            let mut hasher = blake3::Hasher::new();
            let sent = async {
                let (mut src, _) = self
                    .blobs
                    .open(id)
                    .await
                    .map_err(|e| FrameError::Io(std::io::Error::other(e.to_string())))?
                    .ok_or_else(|| FrameError::Io(std::io::Error::other("blob vanished")))?;
                codec::copy_exact(&mut src, &mut stream.send, size, |chunk| {
                    hasher.update(chunk);
                })
                .await
            }
            .await;
            if let Err(e) = sent {
                warn!(blob = %id, error = %e, "fetch aborted");
                let _ = stream.send.reset(code::PROTOCOL);
                return;
            }
            if BlobId::from(hasher.finalize()) != *id {
                error!(blob = %id, "a stored blob is corrupt; quarantined");
                if let Err(e) = self.blobs.quarantine(id).await {
                    error!(blob = %id, error = %e, "could not quarantine a corrupt blob");
                }
                let _ = stream.send.reset(code::PROTOCOL);
                return;
            }
        }
        let _ = stream.send.finish();
    }

    /// Do the stored bytes of `id` hash to it? (A missing blob is not sound.)
    async fn blob_is_sound(&self, id: &BlobId) -> Result<bool, RemoteError> {
        let Some((mut src, _)) = self.blobs.open(id).await? else {
            return Ok(false);
        };
        let mut hasher = blake3::Hasher::new();
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = tokio::io::AsyncReadExt::read(&mut src, &mut buf)
                .await
                .map_err(|e| RemoteError::new(ErrorKind::Internal, e.to_string()))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        Ok(BlobId::from(hasher.finalize()) == *id)
    }

    fn commit(&self, id: &CommitId) -> Result<Commit, RemoteError> {
        self.meta
            .commit(id)?
            .ok_or_else(|| not_found(format!("no commit {id}")))
    }

    fn service_commit(&self, service: &ServiceName, id: &CommitId) -> Result<Commit, RemoteError> {
        let commit = self.commit(id)?;
        if commit.service() != service {
            return Err(invalid(format!(
                "commit {id} belongs to service `{}`, not `{service}`",
                commit.service()
            )));
        }
        Ok(commit)
    }

    #[tracing::instrument(skip_all, fields(service = %commit.service(), commit = %commit.id()))]
    async fn create_commit(&self, peer: &Identity, commit: Commit, tree: Tree) -> RepoReply {
        // A commit is authored by whoever pushes it: the name in their certificate.
        if let Identity::User { name, .. } = peer
            && commit.author() != name.as_str()
        {
            return Err(invalid(format!(
                "the commit's author is `{}`, but you are `{name}`; commits are authored by the pusher",
                commit.author()
            )));
        }
        let tree_id = tree.id();
        if tree_id != commit.tree() {
            return Err(invalid(format!(
                "the tree sent hashes to {tree_id}, but the commit names tree {}",
                commit.tree()
            )));
        }
        for parent in commit.parents() {
            self.service_commit(commit.service(), parent)?;
        }
        // Every file's blob is stored, and has the size the tree declares.
        let files: Vec<(BlobId, u64, &RelPath)> = tree
            .entries()
            .iter()
            .filter(|e| e.mode().is_file())
            .map(|e| (e.blob(), e.size(), e.path()))
            .collect();
        let stored = self
            .blobs
            .sizes_many(files.iter().map(|(id, _, _)| *id).collect())
            .await?;
        let mut missing = std::collections::BTreeSet::new();
        for ((blob, declared, path), actual) in files.iter().zip(stored) {
            match actual {
                None => {
                    missing.insert(*blob);
                }
                // Another size than declared: the tree lies, or the stored
                // blob is corrupt. Its bytes say which.
                Some(actual) if actual != *declared => {
                    if self.blob_is_sound(blob).await? {
                        return Err(invalid(format!(
                            "`{path}` is declared as {declared} bytes but its blob {blob} has {actual}"
                        )));
                    }
                    warn!(%blob, path = %path, declared = *declared, actual, "a stored blob is corrupt; quarantined");
                    self.blobs.quarantine(blob).await?;
                    missing.insert(*blob);
                }
                Some(_) => {}
            }
        }
        if !missing.is_empty() {
            return Err(RemoteError::new(
                ErrorKind::BlobsMissing {
                    blobs: missing.iter().copied().collect(),
                },
                format!(
                    "{} blob(s) of the commit are not stored (for one, {}); upload them before the commit",
                    missing.len(),
                    missing.first().expect("not empty")
                ),
            ));
        }
        self.check_manifest(&commit, &tree).await?;
        self.meta.put_tree(&tree)?;
        let (id, created) = self.meta.put_commit(&commit)?;
        info!(service = %commit.service(), commit = %id, created, "commit");
        Ok(RepoResponse::CommitCreated { id, created })
    }

    /// The tree must hold a `service.toml` that parses and names the service.
    async fn check_manifest(&self, commit: &Commit, tree: &Tree) -> Result<(), RemoteError> {
        self.manifest(tree)
            .await?
            .check_service(commit.service())
            .map_err(|e| invalid(e.to_string()))
    }

    /// The `service.toml` at the root of `tree`, read from its blob and parsed.
    async fn manifest(&self, tree: &Tree) -> Result<ServiceManifest, RemoteError> {
        let path = RelPath::new(MANIFEST_FILE).expect("service.toml is a valid path");
        let entry = tree.get(&path).ok_or_else(|| {
            invalid(format!(
                "the tree has no {MANIFEST_FILE} at its root; every service needs one"
            ))
        })?;
        if entry.mode() == Mode::Symlink {
            return Err(invalid(format!(
                "{MANIFEST_FILE} must be a file, not a symlink"
            )));
        }
        if entry.size() > ServiceManifest::MAX_LEN as u64 {
            return Err(invalid(format!(
                "{MANIFEST_FILE} is {} bytes; the limit is {}",
                entry.size(),
                ServiceManifest::MAX_LEN
            )));
        }
        let (mut src, _) = self
            .blobs
            .open(&entry.blob())
            .await?
            .ok_or_else(|| invalid(format!("blob {} is not stored", entry.blob())))?;
        let mut text = String::new();
        let mut limited = (&mut src).take(ServiceManifest::MAX_LEN as u64 + 1);
        limited
            .read_to_string(&mut text)
            .await
            .map_err(|e| invalid(format!("{MANIFEST_FILE} is not UTF-8 text: {e}")))?;
        ServiceManifest::parse(&text).map_err(|e| invalid(e.to_string()))
    }

    #[tracing::instrument(skip(self, peer))]
    fn move_branch(
        &self,
        peer: &Identity,
        service: &ServiceName,
        branch: &BranchName,
        expected: Option<CommitId>,
        new: CommitId,
    ) -> RepoReply {
        self.service_commit(service, &new)?;
        match self
            .meta
            .swap_head(service, branch, expected, new, peer, Timestamp::now())?
        {
            HeadUpdate::Moved { event } => {
                info!(%service, %branch, commit = %new, seq = event.seq, "branch moved");
                self.publish(event);
                Ok(RepoResponse::BranchMoved)
            }
            HeadUpdate::Conflict { current } => {
                let at =
                    current.map_or_else(|| "does not exist".to_owned(), |c| format!("is at {c}"));
                let want =
                    expected.map_or_else(|| "not to exist".to_owned(), |c| format!("at {c}"));
                Err(RemoteError::new(
                    ErrorKind::Conflict { head: current },
                    format!("branch {service}/{branch} {at}; the push expected it {want}"),
                ))
            }
        }
    }

    /// A branch name first, then a full id, then an abbreviated id. A service
    /// the repository has never seen is named as such, whatever the revision.
    fn resolve(&self, service: &ServiceName, rev: &str) -> Result<CommitId, RemoteError> {
        if !self.meta.has_service(service)? {
            return Err(not_found(format!(
                "the repository has no service `{service}`; push it first (molt push DIR)"
            )));
        }
        if let Ok(branch) = BranchName::new(rev)
            && let Some(head) = self.meta.head(service, &branch)?
        {
            return Ok(head);
        }
        if let Ok(id) = rev.parse::<CommitId>() {
            self.service_commit(service, &id)?;
            return Ok(id);
        }
        if let Ok(prefix) = rev.parse::<IdPrefix>() {
            let found = self.meta.commits_with_prefix(service, &prefix)?;
            return prefix.resolve(found).map_err(|e| not_found(e.to_string()));
        }
        Err(not_found(format!(
            "`{rev}` is neither a branch of `{service}` nor a commit id (8 to 64 hex)"
        )))
    }

    fn log(&self, service: &ServiceName, branch: &BranchName, limit: u32) -> RepoReply {
        let mut next = self.meta.head(service, branch)?;
        if next.is_none() {
            return Err(not_found(format!("no branch {service}/{branch}")));
        }
        let mut entries = Vec::new();
        while let Some(id) = next {
            if entries.len() >= limit as usize {
                break;
            }
            let commit = self.commit(&id)?;
            next = commit.parents().first().copied();
            entries.push(LogEntry { id, commit });
        }
        Ok(RepoResponse::Log { entries })
    }

    fn diff(&self, service: &ServiceName, from: Option<CommitId>, to: CommitId) -> RepoReply {
        let tree_of = |id: &CommitId| -> Result<Tree, RemoteError> {
            let commit = self.service_commit(service, id)?;
            self.meta
                .tree(&commit.tree())?
                .ok_or_else(|| not_found(format!("no tree {}", commit.tree())))
        };
        let old = match from {
            Some(id) => tree_of(&id)?,
            None => Tree::empty(),
        };
        let new = tree_of(&to)?;
        Ok(RepoResponse::Diff {
            diff: TreeDiff::between(&old, &new),
        })
    }

    /// Stores an image whose every commit exists, belongs to its service, and
    /// whose services want distinct public ports (read from each commit's
    /// `service.toml`): an image two of whose services share a port would only
    /// fail later, at deploy, with the port in use. Its author is decided first,
    /// from the verified identity, so a refused caller learns nothing of commits.
    #[tracing::instrument(skip_all, fields(image = %image.name()))]
    async fn create_image(
        &self,
        peer: &Identity,
        image: Image,
        on_behalf_of: Option<UserName>,
    ) -> RepoReply {
        let author = wire::repo::image_author(peer, on_behalf_of.as_ref())?;
        let mut manifests = BTreeMap::new();
        for (service, commit) in image.services() {
            let commit = self.service_commit(service, commit)?;
            let tree = self
                .meta
                .tree(&commit.tree())?
                .ok_or_else(|| not_found(format!("no tree {}", commit.tree())))?;
            manifests.insert(service, self.manifest(&tree).await?);
        }
        image_spec::distinct_ports(manifests.iter().map(|(s, m)| (*s, m)))
            .map_err(|e| invalid(format!("image `{}`: {e}", image.name())))?;
        let created = ImageAuthorship {
            author,
            by: peer.clone(),
            at: Timestamp::now(),
        };
        let (id, event) = self.meta.create_image(&image, &created)?;
        let Some(event) = event else {
            return Err(RemoteError::new(
                ErrorKind::AlreadyExists,
                format!(
                    "image `{}` exists already (id {id}); images are immutable, pick another name",
                    image.name()
                ),
            ));
        };
        info!(image = %image.name(), %id, author = %created.author, seq = event.seq, "image created");
        self.publish(event);
        Ok(RepoResponse::ImageCreated { id, created })
    }

    /// Serves a watch (see the module docs and "The ref watch" in `wire::repo`):
    /// the start frame, the retained events after `after`, then live events until
    /// the watcher goes or the server closes.
    #[tracing::instrument(skip(self, stream))]
    async fn watch_refs(&self, stream: &mut BiStream, after: Option<u64>) {
        let Ok(_slot) = self.watches.try_acquire() else {
            let err = RemoteError::new(
                ErrorKind::Internal,
                format!("the repository serves {MAX_WATCHES} watches already; try again later"),
            );
            return reply(stream, &Err(err)).await;
        };
        // Subscribe before reading the log: every event is then in the log read, or
        // arrives live, or both (sent once: by number).
        let mut live = self.events.subscribe();
        let (start, mut next) = match self.watch_start(after) {
            Ok(s) => s,
            Err(e) => return reply(stream, &Err(e)).await,
        };
        info!(?after, next, "watch started");
        if !self.send_watch(stream, &Ok(start)).await {
            return;
        }
        let gone = stream.send.stopped();
        tokio::pin!(gone);
        let mut behind = true;
        let ended = loop {
            if behind {
                match self.catch_up(stream, &mut next).await {
                    Ok(true) => behind = false,
                    Ok(false) => return,
                    Err(e) => break Some(e),
                }
            }
            let got = tokio::select! {
                () = self.closing.cancelled() => break None,
                _ = &mut gone => {
                    debug!(next, "the watcher went away");
                    return;
                }
                got = live.recv() => got,
            };
            match got {
                Ok(event) if event.seq < next => {}
                Ok(event) if event.seq == next => {
                    next += 1;
                    let frame = Ok(RepoResponse::RefEvent { event });
                    if !self.send_watch(stream, &frame).await {
                        return;
                    }
                }
                // A gap (an event published before an earlier one) or a lag: the
                // log has them all.
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => behind = true,
                Err(broadcast::error::RecvError::Closed) => break None,
            }
        };
        if let Some(e) = ended {
            info!(next, error = %e, "watch ended with an error");
            reply(stream, &Err(e)).await;
        } else {
            info!(next, "watch closed by the server");
            end_watch(stream).await;
        }
    }

    /// The first frame of a watch and the first event number to send.
    fn watch_start(&self, after: Option<u64>) -> Result<(RepoResponse, u64), RemoteError> {
        let last = self.meta.ref_log_last()?;
        let after = match after {
            None => last,
            Some(a) if a > last => {
                return Err(invalid(format!(
                    "watch after event {a}, but the newest event is {last}: this repository never logged it"
                )));
            }
            Some(a) => a,
        };
        let mut next = after + 1;
        let oldest = self.meta.ref_log_oldest()?.unwrap_or(last + 1);
        let missed = (oldest > next).then(|| Missed {
            first: next,
            last: oldest - 1,
        });
        next = next.max(oldest);
        Ok((RepoResponse::Watching { last, missed }, next))
    }

    /// Sends every logged event from `next` on. `Ok(false)`: the watch is over (the
    /// watcher went away or the server closes); `Err`: it ends with that error.
    async fn catch_up(&self, stream: &mut BiStream, next: &mut u64) -> Result<bool, RemoteError> {
        loop {
            let batch = self.meta.ref_events(*next, CATCH_UP_BATCH)?;
            if let Some(first) = batch.first()
                && first.seq != *next
            {
                let resume_after = *next - 1;
                return Err(RemoteError::new(
                    ErrorKind::Lagged { resume_after },
                    format!(
                        "the watch fell behind: events from {} on are no longer retained; watch again after {resume_after}",
                        *next
                    ),
                ));
            }
            let full = batch.len() == CATCH_UP_BATCH;
            for event in batch {
                *next = event.seq + 1;
                if !self
                    .send_watch(stream, &Ok(RepoResponse::RefEvent { event }))
                    .await
                {
                    return Ok(false);
                }
            }
            if !full {
                return Ok(true);
            }
        }
    }

    /// Writes one frame of a watch; `false` if the watch is over (the watcher went
    /// away, or the server closes: a watcher that does not read cannot hold it up).
    async fn send_watch(&self, stream: &mut BiStream, frame: &RepoReply) -> bool {
        let bytes = match codec::encode_frame(frame, DEFAULT_FRAME_LIMIT) {
            Ok(b) => b,
            Err(e) => {
                warn!(error = %e, "a watch frame does not encode");
                let _ = stream.send.reset(code::PROTOCOL);
                return false;
            }
        };
        tokio::select! {
            () = self.closing.cancelled() => {
                end_watch(stream).await;
                false
            }
            written = stream.send.write_all(&bytes) => match written {
                Ok(()) => true,
                Err(e) => {
                    debug!(error = %e, "the watcher went away");
                    false
                }
            },
        }
    }
}

/// How long a watch the server ends waits for the watcher to acknowledge the end,
/// so the close of the connection that follows does not overtake it.
const END_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// Ends a watch cleanly: the watcher reads the end of the stream (not a lost
/// connection) and may resume from the last event it got.
async fn end_watch(stream: &mut BiStream) {
    if stream.send.finish().is_ok() {
        let _ = tokio::time::timeout(END_GRACE, stream.send.stopped()).await;
    }
}

fn check_count(n: usize) -> Result<(), RemoteError> {
    if n > MAX_BLOBS_PER_REQUEST {
        return Err(invalid(format!(
            "{n} blobs in one request; the limit is {MAX_BLOBS_PER_REQUEST}"
        )));
    }
    Ok(())
}
