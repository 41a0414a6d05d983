//! The client side of molt's repository protocol: typed calls, the blob
//! transfers, and the push.
//!
//! Everything that talks to a repository server goes through [`RepoClient`]: the
//! `molt` CLI (push, log, diff, images), the shell (diffs and blobs for an
//! upgrade) and, later, the portal. This crate holds none of the server's storage
//! (no blob store, no sled): a client only needs `wire`'s messages and
//! `image-spec`'s types, so depending on it never pulls the server in.
//!
//! [`RepoClient::push`] is the whole push flow of DESIGN.md: read `service.toml`,
//! scan the directory, compare with the branch head (an unchanged tree creates
//! nothing), ask which blobs the server lacks, upload only those, create the commit,
//! and move the branch with compare-and-swap from the head it started from.
//!
//! [`RepoClient::fetch_blobs_to`] is the other direction: blobs stream into a
//! directory (the shell's blob cache), each verified against its id on arrival
//! and renamed into place only then.
//!
//! [`RepoClient::watch_refs`] follows the repository's ref log: every branch move
//! and image created, numbered, as a [`RefWatch`] to read event by event (resume
//! with the last number seen; see "The ref watch" in `wire::repo`).
//!
//! ```no_run
//! # async fn demo(client: &wire::Client, addr: std::net::SocketAddr) -> Result<(), repo_client::ClientError> {
//! let repo = repo_client::RepoClient::connect(client, addr).await?;
//! let options = repo_client::PushOptions {
//!     branch: "main".parse().expect("a valid branch name"),
//!     message: "first version".into(),
//! };
//! let report = repo.push(std::path::Path::new("services/orders"), &options, |_| {}).await?;
//! println!("{} is at {}", report.service, report.commit);
//! # Ok(())
//! # }
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use image_spec::UserName;
use image_spec::{
    BlobId, BranchName, Commit, CommitError, CommitId, Image, ImageName, MANIFEST_FILE,
    ManifestError, ScanError, ServiceManifest, ServiceName, Timestamp, Tree, TreeDiff, TreeId,
    scan_dir,
};
use tokio::io::{AsyncRead, AsyncWriteExt};
use tokio::task::{JoinError, JoinSet};
use tracing::info;
use wire::codec::{self, DEFAULT_FRAME_LIMIT, FrameError};
use wire::repo::{
    BranchHead, ErrorKind, ImageRecord, LogEntry, Missed, RefEvent, RemoteError, RepoReply,
    RepoRequest, RepoResponse,
};
use wire::{BiStream, Client, Connection, Identity, WireError};

/// Most blob ids one request names (a push's, a fetch's, a missing-blobs
/// question): longer lists go in several requests, well under the server's
/// [`wire::repo::MAX_BLOBS_PER_REQUEST`] and its frame limit.
pub const BLOBS_PER_REQUEST: usize = 20_000;

/// Files up to this size are read in one call when uploading.
const SMALL_FILE: u64 = 1 << 20;

/// Fetched blobs are made durable and put in place in groups of at most this
/// many files ...
pub const GROUP_FILES: usize = 512;

/// ... or of this many bytes.
const GROUP_BYTES: u64 = 32 << 20;

/// A group of at most this many files is made durable file by file.
const FSYNC_EACH: usize = 16;

/// Most groups being made durable and renamed into place at once, while the
/// next blobs arrive.
pub const GROUPS_IN_FLIGHT: usize = 2;

/// Why a repository call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The connection failed.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// A frame or a blob transfer failed.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The server refused the request.
    #[error(transparent)]
    Remote(#[from] RemoteError),
    /// The server answered with something else than the request calls for.
    #[error("unexpected answer from the repository server to {0}")]
    Unexpected(&'static str),
    /// The directory to push could not be scanned.
    #[error(transparent)]
    Scan(#[from] ScanError),
    /// The directory's `service.toml` is missing or invalid.
    #[error("{path}: {source}")]
    Manifest {
        /// The manifest file.
        path: PathBuf,
        /// Why it cannot be used.
        source: ManifestError,
    },
    /// A local file could not be read or written.
    #[error("`{path}`: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The commit could not be built (e.g. an author with a newline).
    #[error(transparent)]
    Commit(#[from] CommitError),
    /// A watch received an event other than the next in sequence.
    #[error("the ref watch expected event {expected}, the server sent {got}")]
    OutOfSequence {
        /// The number that should have come.
        expected: u64,
        /// The number that came.
        got: u64,
    },
    /// A fetched blob's bytes do not match its id.
    #[error("blob {claimed}: received bytes hash to {actual}")]
    BlobMismatch {
        /// The id asked for.
        claimed: BlobId,
        /// What the bytes hash to.
        actual: BlobId,
    },
    /// A blob is larger than the caller would read into memory.
    #[error("blob {blob} is {size} bytes, more than the {max} read into memory")]
    TooLarge {
        /// The blob.
        blob: BlobId,
        /// Its size.
        size: u64,
        /// The most the caller would read.
        max: u64,
    },
}

impl ClientError {
    /// The server's error kind, if the server refused the request.
    pub fn remote_kind(&self) -> Option<&ErrorKind> {
        match self {
            ClientError::Remote(e) => Some(&e.kind),
            _ => None,
        }
    }
}

/// What to push.
#[derive(Debug, Clone)]
pub struct PushOptions {
    /// The branch to move (usually `main`).
    pub branch: BranchName,
    /// The commit message.
    pub message: String,
}

/// What a push did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PushReport {
    /// The service pushed.
    pub service: ServiceName,
    /// The branch moved (or left alone).
    pub branch: BranchName,
    /// The branch's head after the push.
    pub commit: CommitId,
    /// Was a new commit created? `false` when the tree was unchanged.
    pub created: bool,
    /// Files in the pushed tree.
    pub files: usize,
    /// Blobs uploaded.
    pub blobs_sent: u64,
    /// Bytes of blob data uploaded.
    pub bytes_sent: u64,
}

/// Progress of a push, for a progress bar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushProgress {
    /// The directory was scanned.
    Scanned {
        /// Files found.
        files: usize,
        /// Their total size.
        bytes: u64,
    },
    /// The upload starts.
    Uploading {
        /// Blobs to send.
        blobs: u64,
        /// Bytes to send.
        bytes: u64,
    },
    /// More bytes were sent.
    Sent {
        /// Bytes sent so far.
        bytes: u64,
    },
}

/// A connection to the repository server with typed calls.
#[derive(Debug, Clone)]
pub struct RepoClient {
    conn: Connection,
    tree_cache: Option<PathBuf>,
    /// Most blob ids one request names ([`BLOBS_PER_REQUEST`] unless set).
    batch: usize,
}

macro_rules! expect {
    ($resp:expr, $pat:pat => $out:expr, $what:literal) => {
        match $resp {
            $pat => Ok($out),
            _ => Err(ClientError::Unexpected($what)),
        }
    };
}

impl RepoClient {
    /// The underlying connection (for its statistics, or to close it).
    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    /// Connects to the repository server at `addr`.
    pub async fn connect(client: &Client, addr: SocketAddr) -> Result<Self, ClientError> {
        Ok(Self {
            conn: client.connect(addr, &Identity::RepoServer).await?,
            tree_cache: None,
            batch: BLOBS_PER_REQUEST,
        })
    }

    /// Keeps the trees of pushed commits in `dir`, so the next push of a change can
    /// send a diff without first downloading the branch head's tree.
    pub fn with_tree_cache(mut self, dir: PathBuf) -> Self {
        self.tree_cache = Some(dir);
        self
    }

    /// Names at most `n` blob ids a request (at least 1; the default is
    /// [`BLOBS_PER_REQUEST`]): for a server that takes fewer, and for tests
    /// of the batching.
    pub fn with_blobs_per_request(mut self, n: usize) -> Self {
        self.batch = n.max(1);
        self
    }

    /// The tree `id`, from the local cache if it holds it, else from the server
    /// (and then cached).
    async fn cached_tree(&self, id: TreeId) -> Result<Tree, ClientError> {
        let path = self.tree_cache.as_ref().map(|d| d.join(id.to_hex()));
        if let Some(path) = &path
            && let Ok(bytes) = tokio::fs::read(path).await
            && let Ok(tree) = Tree::decode(&bytes)
            && tree.id() == id
        {
            return Ok(tree);
        }
        let tree = self.tree(id).await?;
        self.cache_tree(&tree).await;
        Ok(tree)
    }

    /// Stores a tree in the local cache; a cache that cannot be written is skipped.
    async fn cache_tree(&self, tree: &Tree) {
        let Some(dir) = &self.tree_cache else { return };
        let path = dir.join(tree.id().to_hex());
        let tmp = dir.join(format!(".{}.tmp", tree.id().to_hex()));
        let written = async {
            tokio::fs::create_dir_all(dir).await?;
            tokio::fs::write(&tmp, tree.encode()).await?;
            tokio::fs::rename(&tmp, &path).await
        }
        .await;
        if let Err(e) = written {
            tracing::debug!(error = %e, "tree cache not written");
        }
    }

    /// Creates a commit by sending only the changes from `base`'s tree.
    pub async fn create_commit_from_diff(
        &self,
        commit: Commit,
        base: CommitId,
        diff: TreeDiff,
    ) -> Result<(CommitId, bool), ClientError> {
        let resp = self
            .call(&RepoRequest::CreateCommitFromDiff { commit, base, diff })
            .await?;
        expect!(resp, RepoResponse::CommitCreated { id, created } => (id, created), "create_commit_from_diff")
    }

    async fn call(&self, req: &RepoRequest) -> Result<RepoResponse, ClientError> {
        let reply: RepoReply = self.conn.call(req).await?;
        Ok(reply?)
    }

    /// The blobs among `blobs` the server lacks.
    pub async fn missing_blobs(&self, blobs: Vec<BlobId>) -> Result<Vec<BlobId>, ClientError> {
        let mut missing = Vec::new();
        for batch in blobs.chunks(self.batch) {
            let resp = self
                .call(&RepoRequest::MissingBlobs {
                    blobs: batch.to_vec(),
                })
                .await?;
            missing
                .extend(expect!(resp, RepoResponse::Missing { blobs } => blobs, "missing_blobs")?);
        }
        Ok(missing)
    }

    /// Uploads blobs from local files, streaming each in chunks. `progress` gets the
    /// running byte count. Returns `(stored, bytes)` as counted by the server.
    pub async fn put_blobs(
        &self,
        blobs: &[(BlobId, u64, PathBuf)],
        mut progress: impl FnMut(u64),
    ) -> Result<(u64, u64), ClientError> {
        let mut s = self.conn.open().await?;
        let announce = RepoRequest::PutBlobs {
            blobs: blobs.iter().map(|(id, size, _)| (*id, *size)).collect(),
        };
        // Small files are read on a blocking thread ahead of the network, so disk
        // reads and sends overlap; large files stream in chunks as they are sent.
        let small: Vec<(u64, PathBuf)> = blobs
            .iter()
            .filter(|(_, size, _)| *size <= SMALL_FILE)
            .map(|(_, size, path)| (*size, path.clone()))
            .collect();
        let (tx, mut rx) = tokio::sync::mpsc::channel::<std::io::Result<Vec<u8>>>(64);
        let reader = tokio::task::spawn_blocking(move || {
            for (size, path) in small {
                let read = std::fs::read(&path).and_then(|bytes| {
                    if bytes.len() as u64 == size {
                        Ok(bytes)
                    } else {
                        Err(std::io::Error::other(format!(
                            "`{}` changed size during the push ({size} -> {} bytes); push again",
                            path.display(),
                            bytes.len()
                        )))
                    }
                });
                let failed = read.is_err();
                if tx.blocking_send(read).is_err() || failed {
                    return;
                }
            }
        });
        let sent = async {
            codec::write_frame(&mut s.send, &announce).await?;
            let mut total = 0u64;
            for (_, size, path) in blobs {
                if *size <= SMALL_FILE {
                    let bytes = rx
                        .recv()
                        .await
                        .ok_or_else(|| std::io::Error::other("file reader stopped"))??;
                    s.send
                        .write_all(&bytes)
                        .await
                        .map_err(std::io::Error::from)?;
                    total += *size;
                    progress(total);
                    continue;
                }
                let mut file = tokio::fs::File::open(path).await?;
                codec::copy_exact(&mut file, &mut s.send, *size, |chunk| {
                    total += chunk.len() as u64;
                    progress(total);
                })
                .await?;
            }
            s.send.flush().await?;
            Ok::<_, FrameError>(())
        }
        .await;
        drop(rx);
        let _ = reader.await;
        let _ = s.send.finish();
        // The reply says why the server stopped reading, if it did.
        let reply = codec::expect_frame::<_, RepoReply>(&mut s.recv, DEFAULT_FRAME_LIMIT).await;
        match (reply, sent) {
            (Ok(reply), _) => {
                let resp = reply?;
                expect!(resp, RepoResponse::BlobsStored { stored, bytes } => (stored, bytes), "put_blobs")
            }
            (Err(_), Err(e)) | (Err(e), Ok(())) => Err(e.into()),
        }
    }

    /// Creates a commit with its tree; `(id, created)`.
    pub async fn create_commit(
        &self,
        commit: Commit,
        tree: Tree,
    ) -> Result<(CommitId, bool), ClientError> {
        let resp = self
            .call(&RepoRequest::CreateCommit { commit, tree })
            .await?;
        expect!(resp, RepoResponse::CommitCreated { id, created } => (id, created), "create_commit")
    }

    /// Moves a branch from `expected` to `new` (compare-and-swap).
    pub async fn move_branch(
        &self,
        service: &ServiceName,
        branch: &BranchName,
        expected: Option<CommitId>,
        new: CommitId,
    ) -> Result<(), ClientError> {
        let resp = self
            .call(&RepoRequest::MoveBranch {
                service: service.clone(),
                branch: branch.clone(),
                expected,
                new,
            })
            .await?;
        expect!(resp, RepoResponse::BranchMoved => (), "move_branch")
    }

    /// Resolves a branch name or a full or abbreviated commit id.
    pub async fn resolve(&self, service: &ServiceName, rev: &str) -> Result<CommitId, ClientError> {
        let resp = self
            .call(&RepoRequest::Resolve {
                service: service.clone(),
                rev: rev.to_owned(),
            })
            .await?;
        expect!(resp, RepoResponse::Resolved { id } => id, "resolve")
    }

    /// The history of a branch, newest first.
    pub async fn log(
        &self,
        service: &ServiceName,
        branch: &BranchName,
        limit: u32,
    ) -> Result<Vec<LogEntry>, ClientError> {
        let resp = self
            .call(&RepoRequest::Log {
                service: service.clone(),
                branch: branch.clone(),
                limit,
            })
            .await?;
        expect!(resp, RepoResponse::Log { entries } => entries, "log")
    }

    /// The head of a branch, with its commit; `None` if the branch does not exist.
    pub async fn head(
        &self,
        service: &ServiceName,
        branch: &BranchName,
    ) -> Result<Option<LogEntry>, ClientError> {
        match self.log(service, branch, 1).await {
            Ok(mut entries) => Ok(entries.pop()),
            Err(e) if e.remote_kind() == Some(&ErrorKind::NotFound) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Every branch and its head, ordered by service then branch (`service`:
    /// only that service's).
    pub async fn branches(
        &self,
        service: Option<&ServiceName>,
    ) -> Result<Vec<BranchHead>, ClientError> {
        let resp = self
            .call(&RepoRequest::ListBranches {
                service: service.cloned(),
            })
            .await?;
        expect!(resp, RepoResponse::Branches { branches } => branches, "list_branches")
    }

    /// One commit.
    pub async fn commit(&self, id: CommitId) -> Result<Commit, ClientError> {
        let resp = self.call(&RepoRequest::GetCommit { id }).await?;
        expect!(resp, RepoResponse::Commit { commit } => commit, "get_commit")
    }

    /// One tree.
    pub async fn tree(&self, id: TreeId) -> Result<Tree, ClientError> {
        let resp = self.call(&RepoRequest::GetTree { id }).await?;
        expect!(resp, RepoResponse::Tree { tree } => tree, "get_tree")
    }

    /// The diff between two commits of a service (`from: None`: the full tree).
    pub async fn diff(
        &self,
        service: &ServiceName,
        from: Option<CommitId>,
        to: CommitId,
    ) -> Result<TreeDiff, ClientError> {
        let resp = self
            .call(&RepoRequest::Diff {
                service: service.clone(),
                from,
                to,
            })
            .await?;
        expect!(resp, RepoResponse::Diff { diff } => diff, "diff")
    }

    /// Downloads blobs into `dir` as `dir/<id>`, verifying each on arrival.
    /// Returns the bytes received.
    ///
    /// A blob is visible under its id only once its bytes are verified and
    /// durable, so after a crash or a power loss `dir` holds whole, correct
    /// blobs and at most some `.<id>.part` files (the shell's blob cache removes
    /// them when it opens). Each blob arrives in `dir/.<id>.part`, hashed on the
    /// way. Verified blobs are put in place in groups (up to [`GROUP_FILES`]
    /// files or 32 MiB): one `syncfs` makes a group's bytes durable (a group
    /// of a few files: an `fsync` each), then its files are renamed into
    /// place — one sync for hundreds of files instead of an `fsync` each —
    /// and the directory is synced before this returns,
    /// so the renames are durable too. Up to [`GROUPS_IN_FLIGHT`] groups are
    /// synced on blocking threads while the next blobs arrive. On a failure,
    /// the blobs verified before it are still put in place, the one in flight
    /// is removed, and nothing unverified is ever renamed.
    pub async fn fetch_blobs_to(&self, blobs: &[BlobId], dir: &Path) -> Result<u64, ClientError> {
        let mut total = 0;
        // A service of any size: a bounded number of ids a request.
        for batch in blobs.chunks(self.batch) {
            total += self.fetch_batch_to(batch, dir).await?;
        }
        let io = |source| ClientError::Io {
            path: dir.to_owned(),
            source,
        };
        tokio::fs::File::open(dir)
            .await
            .map_err(io)?
            .sync_all()
            .await
            .map_err(io)?;
        Ok(total)
    }

    /// Asks for `blobs`: the stream their bytes follow on, and each one's size.
    async fn request_blobs(&self, blobs: &[BlobId]) -> Result<(BiStream, Vec<u64>), ClientError> {
        let mut s = self.conn.open().await?;
        codec::write_frame(
            &mut s.send,
            &RepoRequest::FetchBlobs {
                blobs: blobs.to_vec(),
            },
        )
        .await?;
        let _ = s.send.finish();
        let reply: RepoReply = codec::expect_frame(&mut s.recv, DEFAULT_FRAME_LIMIT).await?;
        let sizes = expect!(reply?, RepoResponse::BlobsFollow { sizes } => sizes, "fetch_blobs")?;
        if sizes.len() != blobs.len() {
            return Err(ClientError::Unexpected("fetch_blobs"));
        }
        Ok((s, sizes))
    }

    /// One request of [`RepoClient::fetch_blobs_to`]: the blobs are in place
    /// and durable, the directory not yet synced.
    async fn fetch_batch_to(&self, blobs: &[BlobId], dir: &Path) -> Result<u64, ClientError> {
        let (mut s, sizes) = self.request_blobs(blobs).await?;
        let mut placing = JoinSet::new();
        let mut group = Group::default();
        let received = receive_blobs(
            &mut s.recv,
            blobs.iter().zip(sizes),
            dir,
            &mut group,
            &mut placing,
        )
        .await;
        // Whatever stopped the transfer, every blob verified before it is made
        // durable and put in place: no task outlives the call.
        if !group.parts.is_empty() {
            let dir = dir.to_owned();
            placing.spawn_blocking(move || group.place(&dir));
        }
        let mut placed = Ok(());
        while let Some(done) = placing.join_next().await {
            if let Err(e) = joined(done) {
                placed = placed.and(Err(e));
            }
        }
        let total = received?;
        placed?;
        Ok(total)
    }

    /// Downloads blobs into memory, verifying each, in the order asked: for
    /// showing small files, not for installing them. A blob the repository
    /// announces larger than `max_each` bytes is refused before any byte of it
    /// is read ([`ClientError::TooLarge`]).
    pub async fn read_blobs(
        &self,
        blobs: &[BlobId],
        max_each: u64,
    ) -> Result<Vec<Vec<u8>>, ClientError> {
        let (mut s, sizes) = self.request_blobs(blobs).await?;
        if let Some((id, size)) = blobs.iter().zip(&sizes).find(|(_, s)| **s > max_each) {
            return Err(ClientError::TooLarge {
                blob: *id,
                size: *size,
                max: max_each,
            });
        }
        let mut out = Vec::with_capacity(blobs.len());
        for (id, size) in blobs.iter().zip(sizes) {
            let mut bytes = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
            codec::copy_exact(&mut s.recv, &mut bytes, size, |_| {}).await?;
            let actual = BlobId::of(&bytes);
            if actual != *id {
                return Err(ClientError::BlobMismatch {
                    claimed: *id,
                    actual,
                });
            }
            out.push(bytes);
        }
        Ok(out)
    }

    /// Creates an image, authored by the user this client's certificate names.
    /// Returns it as the repository stored it: id, image and authorship.
    pub async fn create_image(&self, image: Image) -> Result<ImageRecord, ClientError> {
        self.create_image_as(image, None).await
    }

    /// Creates an image on behalf of `user`: what the portal does for a person it
    /// has authenticated (the repository refuses the portal without one, and a
    /// user naming anyone but themselves). Returns it as the repository stored it,
    /// with `user` as its author.
    pub async fn create_image_for(
        &self,
        image: Image,
        user: UserName,
    ) -> Result<ImageRecord, ClientError> {
        self.create_image_as(image, Some(user)).await
    }

    async fn create_image_as(
        &self,
        image: Image,
        on_behalf_of: Option<UserName>,
    ) -> Result<ImageRecord, ClientError> {
        let resp = self
            .call(&RepoRequest::CreateImage {
                image: image.clone(),
                on_behalf_of,
            })
            .await?;
        let (id, created) = expect!(resp, RepoResponse::ImageCreated { id, created } => (id, created), "create_image")?;
        Ok(ImageRecord {
            id,
            image,
            created: Some(created),
        })
    }

    /// One image by name, with its id and authorship.
    pub async fn image(&self, name: &ImageName) -> Result<ImageRecord, ClientError> {
        let resp = self
            .call(&RepoRequest::GetImage { name: name.clone() })
            .await?;
        expect!(resp, RepoResponse::Image { record } => record, "get_image")
    }

    /// Every image, oldest first, with its id and authorship.
    pub async fn images(&self) -> Result<Vec<ImageRecord>, ClientError> {
        let resp = self.call(&RepoRequest::ListImages).await?;
        expect!(resp, RepoResponse::Images { images } => images, "list_images")
    }

    /// Follows the ref log: the events after `after` that the repository retains
    /// (`None`: none, only those from now on; `Some(0)`: all retained), then each
    /// new one as it happens. Check [`RefWatch::missed`] when resuming.
    pub async fn watch_refs(&self, after: Option<u64>) -> Result<RefWatch, ClientError> {
        let mut stream = self.conn.open().await?;
        codec::write_frame(&mut stream.send, &RepoRequest::WatchRefs { after }).await?;
        // Nothing more to say; the server keeps its side open.
        let _ = stream.send.finish();
        let reply: RepoReply = codec::expect_frame(&mut stream.recv, DEFAULT_FRAME_LIMIT).await?;
        let (last, missed) = expect!(reply?, RepoResponse::Watching { last, missed } => (last, missed), "watch_refs")?;
        let seen = match (after, missed) {
            (_, Some(m)) => m.last,
            (Some(a), None) => a,
            (None, None) => last,
        };
        Ok(RefWatch {
            stream,
            last_at_start: last,
            missed,
            seen,
        })
    }

    /// Pushes the service in `dir` (see the module docs).
    #[tracing::instrument(skip_all, fields(dir = %dir.display(), branch = %opts.branch))]
    pub async fn push(
        &self,
        dir: &Path,
        opts: &PushOptions,
        mut progress: impl FnMut(PushProgress),
    ) -> Result<PushReport, ClientError> {
        let manifest_path = dir.join(MANIFEST_FILE);
        let text = tokio::fs::read_to_string(&manifest_path)
            .await
            .map_err(|source| ClientError::Io {
                path: manifest_path.clone(),
                source,
            })?;
        let manifest = ServiceManifest::parse(&text).map_err(|source| ClientError::Manifest {
            path: manifest_path.clone(),
            source,
        })?;
        let service = manifest.name().clone();

        let owned = dir.to_owned();
        let scanned = tokio::task::spawn_blocking(move || scan_dir(&owned))
            .await
            .map_err(|e| ClientError::Io {
                path: dir.to_owned(),
                source: std::io::Error::other(e),
            })??;
        let tree = scanned.tree;
        progress(PushProgress::Scanned {
            files: tree.len(),
            bytes: tree.total_size(),
        });

        let head = self.head(&service, &opts.branch).await?;
        let report = |commit, created, blobs_sent, bytes_sent| PushReport {
            service: service.clone(),
            branch: opts.branch.clone(),
            commit,
            created,
            files: tree.len(),
            blobs_sent,
            bytes_sent,
        };
        if let Some(h) = &head
            && h.commit.tree() == tree.id()
        {
            info!(%service, commit = %h.id, "tree unchanged; nothing to push");
            return Ok(report(h.id, false, 0, 0));
        }

        // With a head, only the changes travel: the diff from the head's tree (from
        // the local cache, or fetched once) names the blobs that can be new.
        let base = match &head {
            Some(h) => Some((h.id, self.cached_tree(h.commit.tree()).await?)),
            None => None,
        };
        let wanted: Vec<BlobId> = match &base {
            Some((_, base_tree)) => TreeDiff::between(base_tree, &tree)
                .needed_blobs()
                .into_iter()
                .collect(),
            None => tree.file_blobs().into_iter().collect(),
        };
        // Ask and upload in slices that stay well inside one request's limits.
        let mut missing = Vec::new();
        for slice in wanted.chunks(self.batch) {
            missing.extend(self.missing_blobs(slice.to_vec()).await?);
        }
        let sizes: std::collections::BTreeMap<BlobId, u64> = tree
            .entries()
            .iter()
            .filter(|e| e.mode().is_file())
            .map(|e| (e.blob(), e.size()))
            .collect();
        // Each blob to upload, with its size and the file that holds it.
        let to_upload = |ids: &[BlobId]| -> Vec<(BlobId, u64, PathBuf)> {
            ids.iter()
                .filter_map(|id| {
                    Some((
                        *id,
                        sizes.get(id).copied()?,
                        scanned.sources.get(id)?.clone(),
                    ))
                })
                .collect()
        };
        let uploads = to_upload(&missing);
        let upload_bytes: u64 = uploads.iter().map(|(_, s, _)| s).sum();
        progress(PushProgress::Uploading {
            blobs: uploads.len() as u64,
            bytes: upload_bytes,
        });
        let mut sent_before = 0u64;
        for slice in uploads.chunks(self.batch) {
            self.put_blobs(slice, |bytes| {
                progress(PushProgress::Sent {
                    bytes: sent_before + bytes,
                })
            })
            .await?;
            sent_before += slice.iter().map(|(_, s, _)| s).sum::<u64>();
        }
        let (mut blobs_sent, mut bytes_sent) = (uploads.len() as u64, upload_bytes);

        // The server requires the author to be the pusher, as its certificate names it.
        let author = match self.conn.me() {
            Identity::User { name, .. } => name.to_string(),
            other => other.to_string(),
        };
        let commit = Commit::new(
            service.clone(),
            tree.id(),
            head.iter().map(|h| h.id).collect(),
            author,
            opts.message.clone(),
            Timestamp::now(),
        )?;
        let create = |commit: Commit| {
            let base = base.clone();
            let tree = tree.clone();
            async move {
                match base {
                    Some((base_id, base_tree)) => {
                        let diff = TreeDiff::between(&base_tree, &tree);
                        self.create_commit_from_diff(commit, base_id, diff).await
                    }
                    None => self.create_commit(commit, tree).await,
                }
            }
        };
        let (id, _) = match create(commit.clone()).await {
            // Blobs the repository should hold but does not (lost, or found
            // corrupt and quarantined): this push has them, so it repairs the
            // repository by uploading them, then creates the commit.
            Err(ClientError::Remote(RemoteError {
                kind: ErrorKind::BlobsMissing { blobs },
                ..
            })) => {
                let repair = to_upload(&blobs);
                info!(%service, blobs = repair.len(), "the repository lacks blobs of this tree; uploading them");
                for slice in repair.chunks(self.batch) {
                    self.put_blobs(slice, |_| {}).await?;
                }
                blobs_sent += repair.len() as u64;
                bytes_sent += repair.iter().map(|(_, s, _)| s).sum::<u64>();
                create(commit).await?
            }
            other => other?,
        };
        self.cache_tree(&tree).await;
        self.move_branch(&service, &opts.branch, head.map(|h| h.id), id)
            .await?;
        info!(%service, commit = %id, blobs_sent, bytes_sent, "pushed");
        Ok(report(id, true, blobs_sent, bytes_sent))
    }
}

/// An open watch of the repository's ref log ([`RepoClient::watch_refs`]).
///
/// Dropping it closes the watch.
#[derive(Debug)]
pub struct RefWatch {
    stream: BiStream,
    last_at_start: u64,
    missed: Option<Missed>,
    /// The newest event number accounted for: sent, missed, or before `after`.
    seen: u64,
}

impl RefWatch {
    /// The newest event's number when the watch started (0: none yet).
    pub fn last_at_start(&self) -> u64 {
        self.last_at_start
    }

    /// Events after the watch's `after` that the repository no longer retains:
    /// the watcher missed them and should re-read what it depends on.
    pub fn missed(&self) -> Option<Missed> {
        self.missed
    }

    /// The number of the last event received (or accounted for: missed, or the
    /// `after` the watch started from), to resume a later watch from.
    pub fn seen(&self) -> u64 {
        self.seen
    }

    /// The next event, waiting for it; `None` once the server ended the watch
    /// (it shuts down: watch again after [`RefWatch::seen`]). An event out of
    /// sequence is an error, never silently passed on.
    pub async fn next(&mut self) -> Result<Option<RefEvent>, ClientError> {
        let Some(reply) =
            codec::read_frame::<_, RepoReply>(&mut self.stream.recv, DEFAULT_FRAME_LIMIT).await?
        else {
            return Ok(None);
        };
        let event = expect!(reply?, RepoResponse::RefEvent { event } => event, "watch_refs")?;
        if event.seq != self.seen + 1 {
            return Err(ClientError::OutOfSequence {
                expected: self.seen + 1,
                got: event.seq,
            });
        }
        self.seen = event.seq;
        Ok(Some(event))
    }
}

/// A group's move into place: sync the filesystem, then rename its files.
type Placing = JoinSet<Result<(), ClientError>>;

/// Verified blobs waiting, as `.part` files, to be made durable and renamed
/// into place together.
#[derive(Debug, Default)]
struct Group {
    /// Each blob's `.part` file and its place.
    parts: Vec<(PathBuf, PathBuf)>,
    bytes: u64,
}

impl Group {
    fn full(&self) -> bool {
        self.parts.len() >= GROUP_FILES || self.bytes >= GROUP_BYTES
    }

    /// Makes the group's bytes durable (one `syncfs` of the filesystem
    /// holding `dir`, or for a few files their own fsyncs), then renames
    /// each file into place.
    fn place(self, dir: &Path) -> Result<(), ClientError> {
        if self.parts.len() <= FSYNC_EACH {
            // A few files: their own fsyncs cost less than flushing the
            // whole filesystem, whatever else it has dirty.
            for (tmp, _) in &self.parts {
                std::fs::File::open(tmp)
                    .and_then(|f| f.sync_all())
                    .map_err(|source| ClientError::Io {
                        path: tmp.clone(),
                        source,
                    })?;
            }
        } else {
            sync_filesystem(dir)?;
        }
        for (tmp, dest) in self.parts {
            std::fs::rename(&tmp, &dest).map_err(|source| ClientError::Io { path: tmp, source })?;
        }
        Ok(())
    }
}

/// Flushes every dirty page of the filesystem holding `dir` to disk.
fn sync_filesystem(dir: &Path) -> Result<(), ClientError> {
    use std::os::fd::AsRawFd;
    let io = |source| ClientError::Io {
        path: dir.to_owned(),
        source,
    };
    let handle = std::fs::File::open(dir).map_err(io)?;
    // SAFETY: `handle` is an open file descriptor for the duration of the
    // call, and syncfs only reads it.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::syncfs(handle.as_raw_fd()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io(std::io::Error::last_os_error()))
    }
}

/// Receives the announced blobs from `src` into `dir`, each in a `.part` file
/// hashed on the way. A verified blob joins `group`; a full group is handed
/// to `placing` (at most [`GROUPS_IN_FLIGHT`] at once) to be made durable and
/// renamed. A blob that is cut short or does not hash to its id is removed and
/// ends the transfer. Returns the bytes received.
async fn receive_blobs<'a, R: AsyncRead + Unpin>(
    src: &mut R,
    blobs: impl Iterator<Item = (&'a BlobId, u64)>,
    dir: &Path,
    group: &mut Group,
    placing: &mut Placing,
) -> Result<u64, ClientError> {
    let mut total = 0;
    for (id, size) in blobs {
        let dest = dir.join(id.to_hex());
        let tmp = dir.join(format!(".{}.part", id.to_hex()));
        let io = |source| ClientError::Io {
            path: tmp.clone(),
            source,
        };
        let mut file = tokio::fs::File::create(&tmp).await.map_err(io)?;
        let mut hasher = blake3::Hasher::new();
        let received = match codec::copy_exact(src, &mut file, size, |c| {
            hasher.update(c);
        })
        .await
        {
            Ok(()) => file.flush().await.map_err(io),
            Err(e) => Err(e.into()),
        };
        drop(file);
        let actual = BlobId::from(hasher.finalize());
        let verified = received.and_then(|()| {
            if actual == *id {
                Ok(())
            } else {
                Err(ClientError::BlobMismatch {
                    claimed: *id,
                    actual,
                })
            }
        });
        if let Err(e) = verified {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(e);
        }
        group.parts.push((tmp, dest));
        group.bytes += size;
        total += size;
        if group.full() {
            if placing.len() >= GROUPS_IN_FLIGHT
                && let Some(done) = placing.join_next().await
            {
                joined(done)?;
            }
            let full = std::mem::take(group);
            let dir = dir.to_owned();
            placing.spawn_blocking(move || full.place(&dir));
        }
    }
    Ok(total)
}

/// The outcome of a task of [`Placing`].
fn joined(done: Result<Result<(), ClientError>, JoinError>) -> Result<(), ClientError> {
    done.map_err(|e| ClientError::Io {
        path: PathBuf::from("<blob fsync task>"),
        source: std::io::Error::other(e),
    })?
}
