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
//! One request is answered with many frames: [`RepoRequest::WatchRefs`] (see
//! "The ref watch" below).
//!
//! Every operation is authorized by the caller's verified identity
//! ([`Operation::allowed`]): users with the developer or admin grant may push;
//! users of any grant and the portal may create images; everyone reads. Shells
//! and the repository server itself never write.
//!
//! # Image authorship
//!
//! The repository records who created each image and when ([`ImageAuthorship`]),
//! beside the image and from the verified identity — the image itself (and so its
//! id) carries no author, and no client can claim one. A user who creates an image
//! is its author. The portal creates images only *on behalf of* a person it has
//! authenticated: [`RepoRequest::CreateImage`] from the portal must name that user
//! in `on_behalf_of`, who becomes the author (the request's identity, `portal`, is
//! kept as `by`). A user may leave `on_behalf_of` empty or name themselves; naming
//! anyone else is refused, as is the portal's request without a user
//! ([`image_author`] is the whole rule). Images created before authors were
//! recorded are listed with `created: None`.
//!
//! # The ref watch
//!
//! The repository keeps a durable, bounded log of every ref change — each branch
//! move and each image created — numbered 1, 2, 3… with no gaps and never reused
//! ([`RefEvent::seq`]); it retains the newest [`REF_LOG_RETAINED`] events.
//! [`RepoRequest::WatchRefs`] `{ after }` is answered on its stream with:
//!
//! 1. one [`RepoResponse::Watching`] frame: the newest sequence number at the start,
//!    and the range of events after `after` that are no longer retained, if any
//!    (the watcher missed those and should re-read what it depends on);
//! 2. every retained event with `seq > after`, oldest first (`after: None`: none —
//!    only what happens from now on; `Some(0)`: everything retained);
//! 3. each new event as it happens, one [`RepoResponse::RefEvent`] frame each, in
//!    sequence order, until the client closes the stream — or the server shuts down,
//!    when the server finishes the stream (a clean end, to resume from).
//!
//! A watcher that resumes with `after` = the last `seq` it saw gets exactly the
//! events after it: none lost that is retained, none repeated. A watcher too slow to
//! take the live events is never waited for (pushes do not block on it): it catches
//! up from the log, and only one that fell behind further than the log retains gets
//! an [`ErrorKind::Lagged`] frame and the end of its stream. An `after` beyond the
//! newest event (a log this repository never wrote) is [`ErrorKind::Invalid`].

use serde::{Deserialize, Serialize};

use image_spec::{
    BlobId, BranchName, Commit, CommitId, Image, ImageId, ImageName, ServiceName, Timestamp, Tree,
    TreeDiff, TreeId, UserName,
};

use crate::identity::{Grant, Identity};

/// Most blob ids one request may name.
pub const MAX_BLOBS_PER_REQUEST: usize = 100_000;

/// How many of the newest ref events the repository keeps for watchers.
pub const REF_LOG_RETAINED: u64 = 10_000;

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
    /// Create an image (names are unique; images are immutable). The repository
    /// records its author (see "Image authorship" in the module docs).
    CreateImage {
        /// The image.
        image: Image,
        /// The person the portal acts for: required from the portal, who may create
        /// images only on a person's behalf; a user may name only themselves.
        on_behalf_of: Option<UserName>,
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
    /// Follow the ref log: answered with many frames until either side closes the
    /// stream (see "The ref watch" in the module docs).
    WatchRefs {
        /// The last sequence number the watcher has seen: every retained event after
        /// it is sent first. `None`: only events from now on.
        after: Option<u64>,
    },
    /// Every branch and its head, ordered by service then branch name.
    ListBranches {
        /// Only this service's branches (`None`: every service's).
        service: Option<ServiceName>,
    },
}

/// Who created an image and when, recorded by the repository from the verified
/// identity of the request (never claimed by a client).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageAuthorship {
    /// The person the image is by: the user who created it, or the user the portal
    /// created it for.
    pub author: UserName,
    /// Who made the request: the author's own certificate, or `portal`.
    pub by: Identity,
    /// When the repository stored the image.
    pub at: Timestamp,
}

/// An image as the repository lists it: its id, the image, and its authorship.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    /// The image's id.
    pub id: ImageId,
    /// The image.
    pub image: Image,
    /// Who created it and when; `None` for images stored before the repository
    /// recorded authors.
    pub created: Option<ImageAuthorship>,
}

/// One entry of the repository's ref log (see "The ref watch" in the module docs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefEvent {
    /// Its place in the log: 1, 2, 3… with no gaps, never reused.
    pub seq: u64,
    /// When the repository made the change.
    pub at: Timestamp,
    /// What changed.
    pub change: RefChange,
}

/// What a [`RefEvent`] records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RefChange {
    /// A branch moved (or was created: `old` is `None`).
    BranchMoved {
        /// The service.
        service: ServiceName,
        /// The branch.
        branch: BranchName,
        /// The head before.
        old: Option<CommitId>,
        /// The head now.
        new: CommitId,
        /// Who moved it.
        by: Identity,
    },
    /// An image was created.
    ImageCreated {
        /// Its name.
        name: ImageName,
        /// Its id.
        id: ImageId,
        /// Its author (see [`ImageAuthorship`]).
        author: UserName,
        /// Who made the request.
        by: Identity,
    },
}

/// Events of the ref log a watcher asked for that are no longer retained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Missed {
    /// The first event missed.
    pub first: u64,
    /// The last event missed.
    pub last: u64,
}

/// A commit and its id, as listed by [`RepoRequest::Log`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogEntry {
    /// The commit's id.
    pub id: CommitId,
    /// The commit.
    pub commit: Commit,
}

/// A branch and where it points, as listed by [`RepoRequest::ListBranches`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BranchHead {
    /// The service the branch belongs to.
    pub service: ServiceName,
    /// The branch.
    pub branch: BranchName,
    /// Its head commit.
    pub head: CommitId,
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
        /// Its authorship, as recorded.
        created: ImageAuthorship,
    },
    /// One image.
    Image {
        /// The image, its id and authorship.
        record: ImageRecord,
    },
    /// Every image.
    Images {
        /// Oldest first.
        images: Vec<ImageRecord>,
    },
    /// The first frame of a watch: where the log stands.
    Watching {
        /// The newest event's sequence number when the watch started (0: none yet);
        /// with `after: None`, the events that follow are those after it.
        last: u64,
        /// Events after the watcher's `after` that are no longer retained.
        missed: Option<Missed>,
    },
    /// One event of a watch.
    RefEvent {
        /// The event.
        event: RefEvent,
    },
    /// Branches and their heads.
    Branches {
        /// Ordered by service, then branch name.
        branches: Vec<BranchHead>,
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
    /// A watcher fell behind further than the ref log retains; watch again with
    /// `after: Some(resume_after)` to learn which events it missed.
    Lagged {
        /// The last event the watcher was sent.
        resume_after: u64,
    },
    /// A commit names blobs the repository does not hold (never uploaded,
    /// or found corrupt and quarantined): upload these, then try again.
    BlobsMissing {
        /// The blobs to upload.
        blobs: Vec<BlobId>,
    },
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
            | RepoRequest::ListImages
            | RepoRequest::ListBranches { .. }
            | RepoRequest::WatchRefs { .. } => Operation::Read,
        }
    }

    /// May `who` perform this operation?
    pub fn allowed(self, who: &Identity) -> bool {
        match (self, who) {
            (Operation::Read, _) => true,
            (Operation::Push, Identity::User { grant, .. }) => {
                matches!(grant, Grant::Developer | Grant::Admin)
            }
            // The portal only on a person's behalf: see `image_author`.
            (Operation::CreateImage, Identity::User { .. } | Identity::Portal) => true,
            _ => false,
        }
    }
}

/// The author of an image `who` asks to create, `on_behalf_of` whom (see "Image
/// authorship" in the module docs): a user is the author of their images and may
/// name only themselves; the portal must name the person it acts for; nobody else
/// creates images.
pub fn image_author(
    who: &Identity,
    on_behalf_of: Option<&UserName>,
) -> Result<UserName, RemoteError> {
    let denied = |msg: String| RemoteError::new(ErrorKind::PermissionDenied, msg);
    match (who, on_behalf_of) {
        (Identity::User { name, .. }, None) => Ok(name.clone()),
        (Identity::User { name, .. }, Some(other)) if other == name => Ok(name.clone()),
        (Identity::User { .. }, Some(other)) => Err(denied(format!(
            "`{who}` may not create images on behalf of `{other}`; only the portal acts for others"
        ))),
        (Identity::Portal, Some(user)) => Ok(user.clone()),
        (Identity::Portal, None) => Err(denied(
            "the portal creates images only on behalf of a user: name them in `on_behalf_of`"
                .to_owned(),
        )),
        (Identity::RepoServer | Identity::Shell { .. }, _) => {
            Err(denied(format!("`{who}` may not create images")))
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
            RepoRequest::ListBranches { service: None },
            RepoRequest::ListBranches {
                service: Some(ServiceName::new("orders").unwrap()),
            },
        ];
        for req in requests {
            let frame = encode_frame(&req, DEFAULT_FRAME_LIMIT).unwrap();
            assert_eq!(decode_payload::<RepoRequest>(&frame[4..]).unwrap(), req);
        }
        let replies: Vec<RepoReply> = vec![
            Ok(RepoResponse::Diff {
                diff: TreeDiff::between(&Tree::empty(), &tree),
            }),
            Ok(RepoResponse::Branches {
                branches: vec![BranchHead {
                    service: ServiceName::new("orders").unwrap(),
                    branch: BranchName::new("dev-ada").unwrap(),
                    head: commit.id(),
                }],
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
            ("portal", [true, false, true]),
            ("repo-server", [true, false, false]),
        ];
        for (who, expect) in cases {
            let got = [Operation::Read, Operation::Push, Operation::CreateImage]
                .map(|op| op.allowed(&id(who)));
            assert_eq!(got, expect, "{who}");
        }
    }

    #[test]
    fn image_authors_come_from_the_verified_identity() {
        let id = |s: &str| s.parse::<Identity>().unwrap();
        let user = |s: &str| UserName::new(s).unwrap();
        let kind = |r: Result<UserName, RemoteError>| r.map_err(|e| e.kind);
        // A user is the author, named or not; naming someone else is refused.
        for grant in ["developer", "deployer", "admin"] {
            let ada = id(&format!("user/ada/{grant}"));
            assert_eq!(kind(image_author(&ada, None)), Ok(user("ada")));
            assert_eq!(
                kind(image_author(&ada, Some(&user("ada")))),
                Ok(user("ada"))
            );
            assert_eq!(
                kind(image_author(&ada, Some(&user("bob")))),
                Err(ErrorKind::PermissionDenied)
            );
        }
        // The portal only on behalf of someone.
        assert_eq!(
            kind(image_author(&id("portal"), Some(&user("ada")))),
            Ok(user("ada"))
        );
        assert_eq!(
            kind(image_author(&id("portal"), None)),
            Err(ErrorKind::PermissionDenied)
        );
        // Shells and the repository never.
        for who in ["shell/dev-1", "repo-server"] {
            for behalf in [None, Some(user("ada"))] {
                assert_eq!(
                    kind(image_author(&id(who), behalf.as_ref())),
                    Err(ErrorKind::PermissionDenied),
                    "{who}"
                );
            }
        }
    }

    #[test]
    fn watch_messages_round_trip_through_the_codec() {
        let image = Image::new(
            ImageName::new("shop-1").unwrap(),
            String::new(),
            [(
                ServiceName::new("orders").unwrap(),
                CommitId::from_bytes([7; 32]),
            )]
            .into(),
        )
        .unwrap();
        let created = ImageAuthorship {
            author: UserName::new("ada").unwrap(),
            by: Identity::Portal,
            at: Timestamp::from_unix_seconds(9),
        };
        let requests = [
            RepoRequest::WatchRefs { after: None },
            RepoRequest::WatchRefs { after: Some(0) },
            RepoRequest::CreateImage {
                image: image.clone(),
                on_behalf_of: Some(UserName::new("ada").unwrap()),
            },
        ];
        for req in requests {
            let frame = encode_frame(&req, DEFAULT_FRAME_LIMIT).unwrap();
            assert_eq!(decode_payload::<RepoRequest>(&frame[4..]).unwrap(), req);
        }
        let replies: Vec<RepoReply> = vec![
            Ok(RepoResponse::Watching {
                last: 4,
                missed: Some(Missed { first: 1, last: 2 }),
            }),
            Ok(RepoResponse::RefEvent {
                event: RefEvent {
                    seq: 3,
                    at: Timestamp::from_unix_seconds(5),
                    change: RefChange::BranchMoved {
                        service: ServiceName::new("orders").unwrap(),
                        branch: BranchName::new("main").unwrap(),
                        old: None,
                        new: CommitId::from_bytes([1; 32]),
                        by: "user/ada/developer".parse().unwrap(),
                    },
                },
            }),
            Ok(RepoResponse::RefEvent {
                event: RefEvent {
                    seq: 4,
                    at: Timestamp::from_unix_seconds(6),
                    change: RefChange::ImageCreated {
                        name: image.name().clone(),
                        id: image.id(),
                        author: UserName::new("ada").unwrap(),
                        by: Identity::Portal,
                    },
                },
            }),
            Ok(RepoResponse::Images {
                images: vec![
                    ImageRecord {
                        id: image.id(),
                        image: image.clone(),
                        created: Some(created),
                    },
                    ImageRecord {
                        id: image.id(),
                        image,
                        created: None,
                    },
                ],
            }),
            Err(RemoteError::new(
                ErrorKind::Lagged { resume_after: 3 },
                "behind",
            )),
        ];
        for reply in replies {
            let frame = encode_frame(&reply, DEFAULT_FRAME_LIMIT).unwrap();
            assert_eq!(decode_payload::<RepoReply>(&frame[4..]).unwrap(), reply);
        }
    }
}
