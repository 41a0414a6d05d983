//! The repository protocol: what clients ask the repository server, and its answers.
//!
//! Each request is one bidirectional stream: the client writes one [`RepoRequest`]
//! frame, the server answers with one [`RepoReply`] frame. Two requests carry raw
//! blob bytes after their frame (never inside it):
//!
//! - [`RepoRequest::PutBlobs`] lists `(id, size)` pairs; the client then writes each
//!   blob's bytes in that order. The server hashes them on the way in and stores a
//!   blob only if its bytes match its id.
//! - [`RepoRequest::FetchBlobs`] is answered with [`RepoResponse::BlobsFollow`]
//!   giving each size; the server then writes each blob's bytes in that order.
//!
//! Every operation is authorized by the caller's verified identity
//! ([`Operation::allowed`]): users with the developer or admin grant may push and
//! create images, deployers may create images, and shells and the portal read.

use serde::{Deserialize, Serialize};

use image_spec::{
    BlobId, BranchName, Commit, CommitId, Image, ImageId, ImageName, ServiceName, Tree, TreeDiff,
    TreeId,
};

use crate::identity::{Grant, Identity};

/// Most blob ids one request may name.
pub const MAX_BLOBS_PER_REQUEST: usize = 100_000;

/// A request to the repository server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RepoRequest {
    /// Which of these blobs does the server lack?
    MissingBlobs {
        /// The blobs to ask about.
        blobs: Vec<BlobId>,
    },
    /// Upload these blobs; their bytes follow the frame, in order.
    PutBlobs {
        /// Each blob's id and size in bytes.
        blobs: Vec<(BlobId, u64)>,
    },
    /// Create a commit; the server stores its tree too.
    CreateCommit {
        /// The commit.
        commit: Commit,
        /// Its tree (must hash to `commit.tree()`).
        tree: Tree,
    },
    /// Move a branch from `expected` (`None`: the branch must not exist) to `new`.
    MoveBranch {
        /// The service.
        service: ServiceName,
        /// The branch.
        branch: BranchName,
        /// The head the caller believes is current.
        expected: Option<CommitId>,
        /// The new head.
        new: CommitId,
    },
    /// Resolve a branch name or a full or abbreviated (≥ 8 hex) commit id.
    Resolve {
        /// The service.
        service: ServiceName,
        /// The revision as the user typed it.
        rev: String,
    },
    /// The history of a branch, newest first, following first parents.
    Log {
        /// The service.
        service: ServiceName,
        /// The branch.
        branch: BranchName,
        /// Most commits to return.
        limit: u32,
    },
    /// One commit.
    GetCommit {
        /// Its id.
        id: CommitId,
    },
    /// One tree.
    GetTree {
        /// Its id.
        id: TreeId,
    },
    /// The changes between two commits of a service (`from: None`: the full tree).
    Diff {
        /// The service.
        service: ServiceName,
        /// The installed commit, if any.
        from: Option<CommitId>,
        /// The target commit.
        to: CommitId,
    },
    /// Download blobs; their bytes follow the reply, in order.
    FetchBlobs {
        /// The blobs.
        blobs: Vec<BlobId>,
    },
    /// Create an image (names are unique; images are immutable).
    CreateImage {
        /// The image.
        image: Image,
    },
    /// One image by name.
    GetImage {
        /// Its name.
        name: ImageName,
    },
    /// Every image, oldest first.
    ListImages,
    /// Create a commit whose tree is `base`'s tree with `diff` applied: what a push
    /// of a change sends instead of the whole tree. The server applies the diff to
    /// its own copy of the base tree and checks the result is `commit.tree()`.
    CreateCommitFromDiff {
        /// The commit.
        commit: Commit,
        /// A stored commit of the same service whose tree the diff starts from.
        base: CommitId,
        /// The changes from the base's tree to the commit's tree.
        diff: TreeDiff,
    },
}

/// A commit and its id, as listed by [`RepoRequest::Log`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogEntry {
    /// The commit's id.
    pub id: CommitId,
    /// The commit.
    pub commit: Commit,
}

/// A successful answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RepoResponse {
    /// The blobs the server lacks, in the order asked.
    Missing {
        /// The missing blobs.
        blobs: Vec<BlobId>,
    },
    /// The uploaded blobs are stored.
    BlobsStored {
        /// How many were new.
        stored: u64,
        /// Bytes received.
        bytes: u64,
    },
    /// The commit exists now.
    CommitCreated {
        /// Its id.
        id: CommitId,
        /// `false` when it already existed.
        created: bool,
    },
    /// The branch points at the new head.
    BranchMoved,
    /// A revision resolved.
    Resolved {
        /// The commit it names.
        id: CommitId,
    },
    /// A branch's history.
    Log {
        /// Newest first.
        entries: Vec<LogEntry>,
    },
    /// One commit.
    Commit {
        /// The commit.
        commit: Commit,
    },
    /// One tree.
    Tree {
        /// The tree.
        tree: Tree,
    },
    /// A diff.
    Diff {
        /// The diff.
        diff: TreeDiff,
    },
    /// The blobs' bytes follow this frame, in the order asked.
    BlobsFollow {
        /// Each blob's size.
        sizes: Vec<u64>,
    },
    /// The image exists now.
    ImageCreated {
        /// Its id.
        id: ImageId,
    },
    /// One image.
    Image {
        /// Its id.
        id: ImageId,
        /// The image.
        image: Image,
    },
    /// Every image.
    Images {
        /// Oldest first.
        images: Vec<(ImageId, Image)>,
    },
}

/// What kind of failure a [`RemoteError`] is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorKind {
    /// The caller's identity may not do this.
    PermissionDenied,
    /// Something named does not exist.
    NotFound,
    /// A branch moved since the caller read it.
    Conflict {
        /// The branch's current head.
        head: Option<CommitId>,
    },
    /// Something with that name exists already (images are immutable).
    AlreadyExists,
    /// The request is invalid (bad tree, bad manifest, blob bytes that do not match).
    Invalid,
    /// The server failed; the request may be retried.
    Internal,
}

/// A failure reported by the server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct RemoteError {
    /// What kind of failure.
    pub kind: ErrorKind,
    /// A message for people, naming what is wrong.
    pub message: String,
}

impl RemoteError {
    /// A failure of `kind` with `message`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
}

/// The answer to a request.
pub type RepoReply = Result<RepoResponse, RemoteError>;

/// What a request does, for authorization.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    /// Read anything.
    Read,
    /// Upload blobs, create commits, move branches.
    Push,
    /// Create images.
    CreateImage,
}

impl Operation {
    /// The operation a request performs.
    pub fn of(req: &RepoRequest) -> Self {
        // Every variant is listed: a new request must be classified, never
        // default to "anyone may".
        match req {
            RepoRequest::PutBlobs { .. }
            | RepoRequest::CreateCommit { .. }
            | RepoRequest::CreateCommitFromDiff { .. }
            | RepoRequest::MoveBranch { .. } => Operation::Push,
            RepoRequest::CreateImage { .. } => Operation::CreateImage,
            RepoRequest::MissingBlobs { .. }
            | RepoRequest::Resolve { .. }
            | RepoRequest::Log { .. }
            | RepoRequest::GetCommit { .. }
            | RepoRequest::GetTree { .. }
            | RepoRequest::Diff { .. }
            | RepoRequest::FetchBlobs { .. }
            | RepoRequest::GetImage { .. }
            | RepoRequest::ListImages => Operation::Read,
        }
    }

    /// May `who` perform this operation?
    pub fn allowed(self, who: &Identity) -> bool {
        match (self, who) {
            (Operation::Read, _) => true,
            (Operation::Push, Identity::User { grant, .. }) => {
                matches!(grant, Grant::Developer | Grant::Admin)
            }
            (Operation::CreateImage, Identity::User { .. }) => true,
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{DEFAULT_FRAME_LIMIT, decode_payload, encode_frame};
    use image_spec::{LinkTarget, RelPath, Timestamp, TreeEntry};

    /// Every kind of value the protocol carries survives bincode, including the
    /// optional fields that self-describing formats could skip.
    #[test]
    fn messages_round_trip_through_the_codec() {
        let tree = Tree::new(vec![
            TreeEntry::file(
                RelPath::new("service.toml").unwrap(),
                false,
                3,
                BlobId::of(b"abc"),
            ),
            TreeEntry::symlink(
                RelPath::new("link").unwrap(),
                LinkTarget::new("service.toml").unwrap(),
            ),
        ])
        .unwrap();
        let commit = Commit::new(
            ServiceName::new("orders").unwrap(),
            tree.id(),
            vec![],
            "ada".into(),
            "msg".into(),
            Timestamp::from_unix_seconds(5),
        )
        .unwrap();
        let requests = vec![
            RepoRequest::CreateCommit {
                commit: commit.clone(),
                tree: tree.clone(),
            },
            RepoRequest::PutBlobs {
                blobs: vec![(BlobId::of(b"x"), 1)],
            },
            RepoRequest::MoveBranch {
                service: ServiceName::new("orders").unwrap(),
                branch: BranchName::new("main").unwrap(),
                expected: None,
                new: commit.id(),
            },
            RepoRequest::ListImages,
        ];
        for req in requests {
            let frame = encode_frame(&req, DEFAULT_FRAME_LIMIT).unwrap();
            assert_eq!(decode_payload::<RepoRequest>(&frame[4..]).unwrap(), req);
        }
        let replies: Vec<RepoReply> = vec![
            Ok(RepoResponse::Diff {
                diff: TreeDiff::between(&Tree::empty(), &tree),
            }),
            Ok(RepoResponse::Log {
                entries: vec![LogEntry {
                    id: commit.id(),
                    commit,
                }],
            }),
            Err(RemoteError::new(
                ErrorKind::Conflict { head: None },
                "moved",
            )),
        ];
        for reply in replies {
            let frame = encode_frame(&reply, DEFAULT_FRAME_LIMIT).unwrap();
            assert_eq!(decode_payload::<RepoReply>(&frame[4..]).unwrap(), reply);
        }
    }

    #[test]
    fn authorization_table() {
        let id = |s: &str| s.parse::<Identity>().unwrap();
        let cases = [
            ("user/a/developer", [true, true, true]),
            ("user/a/admin", [true, true, true]),
            ("user/a/deployer", [true, false, true]),
            ("shell/dev-1", [true, false, false]),
            ("portal", [true, false, false]),
            ("repo-server", [true, false, false]),
        ];
        for (who, expect) in cases {
            let got = [Operation::Read, Operation::Push, Operation::CreateImage]
                .map(|op| op.allowed(&id(who)));
            assert_eq!(got, expect, "{who}");
        }
    }
}
