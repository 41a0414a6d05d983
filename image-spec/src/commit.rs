//! Commits: one immutable version of one service.
//!
//! A [`Commit`] records `(service, tree, parents, author, message, time)` and is named
//! by the blake3 of its canonical encoding, so changing any field makes another
//! commit. The first commit of a service has no parents; a push has one; a merge may
//! have several (at most [`Commit::MAX_PARENTS`], each once).
//!
//! # Canonical encoding (version 1)
//!
//! ```text
//! "molt-commit" 0x01
//! str  service
//! id   tree
//! u32  parent count, then that many ids, in order (the first parent first)
//! str  author
//! str  message
//! i64  time, whole seconds since 1970-01-01T00:00:00Z
//! ```
//!
//! Primitives are described in [`crate::encoding`].

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::encoding::{DecodeError, Reader, Writer, ensure_canonical};
use crate::id::{CommitId, TreeId};
use crate::name::ServiceName;

const MAGIC: &[u8] = b"molt-commit";
const KIND: &str = "commit";

/// A point in time, in whole seconds since the Unix epoch (UTC).
///
/// `Display` is RFC 3339 (`2026-11-23T19:42:48Z`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Timestamp(i64);

impl Timestamp {
    /// The given number of seconds since the epoch.
    pub const fn from_unix_seconds(secs: i64) -> Self {
        Self(secs)
    }

    /// Seconds since the epoch.
    pub const fn as_unix_seconds(self) -> i64 {
        self.0
    }

    /// The current time, truncated to whole seconds.
    pub fn now() -> Self {
        let secs = match SystemTime::now().duration_since(UNIX_EPOCH) {
            Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
            Err(before) => -i64::try_from(before.duration().as_secs()).unwrap_or(i64::MAX),
        };
        Self(secs)
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Days-to-civil conversion (Howard Hinnant's algorithm), proleptic Gregorian.
        let days = self.0.div_euclid(86_400);
        let secs = self.0.rem_euclid(86_400);
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = doy - (153 * mp + 2) / 5 + 1;
        let month = if mp < 10 { mp + 3 } else { mp - 9 };
        let year = yoe + era * 400 + i64::from(month <= 2);
        write!(
            f,
            "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
            secs / 3600,
            secs / 60 % 60,
            secs % 60
        )
    }
}

/// Why the fields do not make a valid commit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommitError {
    /// More parents than [`Commit::MAX_PARENTS`].
    #[error("commit has {count} parents; the limit is {max}")]
    TooManyParents {
        /// How many were given.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// The same parent twice.
    #[error("commit lists parent {0} twice")]
    DuplicateParent(CommitId),
    /// The author is empty.
    #[error("commit author is empty")]
    EmptyAuthor,
    /// The author is too long.
    #[error("commit author is {len} bytes; the limit is {max}")]
    AuthorTooLong {
        /// Its length in bytes.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The author holds a control character (a newline, say).
    #[error("commit author {0:?} contains a control character")]
    AuthorControl(String),
    /// The message is too long.
    #[error("commit message is {len} bytes; the limit is {max}")]
    MessageTooLong {
        /// Its length in bytes.
        len: usize,
        /// The limit.
        max: usize,
    },
}

/// One immutable version of one service (see the module docs).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "CommitFields", into = "CommitFields")]
pub struct Commit(CommitFields);

/// The fields of a commit; also its serde shape, checked on the way in.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct CommitFields {
    service: ServiceName,
    tree: TreeId,
    parents: Vec<CommitId>,
    author: String,
    message: String,
    time: Timestamp,
}

impl TryFrom<CommitFields> for Commit {
    type Error = CommitError;
    fn try_from(f: CommitFields) -> Result<Self, CommitError> {
        Commit::new(f.service, f.tree, f.parents, f.author, f.message, f.time)
    }
}

impl From<Commit> for CommitFields {
    fn from(c: Commit) -> Self {
        c.0
    }
}

impl Commit {
    /// Most parents a commit may have.
    pub const MAX_PARENTS: usize = 16;
    /// Longest author, in bytes.
    pub const MAX_AUTHOR_LEN: usize = 256;
    /// Longest message, in bytes.
    pub const MAX_MESSAGE_LEN: usize = 64 * 1024;

    /// Checks and assembles a commit.
    pub fn new(
        service: ServiceName,
        tree: TreeId,
        parents: Vec<CommitId>,
        author: String,
        message: String,
        time: Timestamp,
    ) -> Result<Self, CommitError> {
        if parents.len() > Self::MAX_PARENTS {
            return Err(CommitError::TooManyParents {
                count: parents.len(),
                max: Self::MAX_PARENTS,
            });
        }
        for (i, p) in parents.iter().enumerate() {
            if parents[..i].contains(p) {
                return Err(CommitError::DuplicateParent(*p));
            }
        }
        if author.is_empty() {
            return Err(CommitError::EmptyAuthor);
        }
        if author.len() > Self::MAX_AUTHOR_LEN {
            return Err(CommitError::AuthorTooLong {
                len: author.len(),
                max: Self::MAX_AUTHOR_LEN,
            });
        }
        if author.chars().any(char::is_control) {
            return Err(CommitError::AuthorControl(author));
        }
        if message.len() > Self::MAX_MESSAGE_LEN {
            return Err(CommitError::MessageTooLong {
                len: message.len(),
                max: Self::MAX_MESSAGE_LEN,
            });
        }
        Ok(Self(CommitFields {
            service,
            tree,
            parents,
            author,
            message,
            time,
        }))
    }

    /// The service this is a version of.
    pub fn service(&self) -> &ServiceName {
        &self.0.service
    }

    /// The service's files at this version.
    pub fn tree(&self) -> TreeId {
        self.0.tree
    }

    /// The commits this one follows, first parent first.
    pub fn parents(&self) -> &[CommitId] {
        &self.0.parents
    }

    /// Who made it.
    pub fn author(&self) -> &str {
        &self.0.author
    }

    /// Why it was made.
    pub fn message(&self) -> &str {
        &self.0.message
    }

    /// When it was made.
    pub fn time(&self) -> Timestamp {
        self.0.time
    }

    /// The canonical encoding (see the module docs).
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new(MAGIC);
        w.str(self.0.service.as_str());
        w.id(self.0.tree.as_bytes());
        w.len(self.0.parents.len());
        for p in &self.0.parents {
            w.id(p.as_bytes());
        }
        w.str(&self.0.author);
        w.str(&self.0.message);
        w.i64(self.0.time.as_unix_seconds());
        w.finish()
    }

    /// Parses a canonical encoding, checking everything [`Commit::new`] checks.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(KIND, MAGIC, bytes)?;
        let service = r.str("service length", ServiceName::MAX_LEN)?;
        let service = ServiceName::new(service).map_err(|e| r.invalid(e))?;
        let tree = TreeId::from_bytes(r.id()?);
        let count = r.len("parent count", Self::MAX_PARENTS)?;
        let mut parents = Vec::with_capacity(count);
        for _ in 0..count {
            parents.push(CommitId::from_bytes(r.id()?));
        }
        let author = r.str("author length", Self::MAX_AUTHOR_LEN)?.to_owned();
        let message = r.str("message length", Self::MAX_MESSAGE_LEN)?.to_owned();
        let time = Timestamp(r.i64()?);
        let commit =
            Self::new(service, tree, parents, author, message, time).map_err(|e| r.invalid(e))?;
        r.finish()?;
        ensure_canonical(KIND, bytes, &commit.encode())?;
        Ok(commit)
    }

    /// blake3 of the canonical encoding.
    pub fn id(&self) -> CommitId {
        blake3::hash(&self.encode()).into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn commit(parents: Vec<CommitId>) -> Result<Commit, CommitError> {
        Commit::new(
            ServiceName::new("orders").unwrap(),
            TreeId::from_bytes([7; 32]),
            parents,
            "ada <ada@example.com>".into(),
            "first".into(),
            Timestamp::from_unix_seconds(1_700_000_000),
        )
    }

    #[test]
    fn round_trips_and_ids_depend_on_every_field() {
        let c = commit(vec![]).unwrap();
        assert_eq!(Commit::decode(&c.encode()).unwrap(), c);
        let f = &c.0;
        let variants = [
            Commit::new(
                ServiceName::new("payments").unwrap(),
                f.tree,
                vec![],
                f.author.clone(),
                f.message.clone(),
                f.time,
            ),
            Commit::new(
                f.service.clone(),
                TreeId::from_bytes([8; 32]),
                vec![],
                f.author.clone(),
                f.message.clone(),
                f.time,
            ),
            Commit::new(
                f.service.clone(),
                f.tree,
                vec![c.id()],
                f.author.clone(),
                f.message.clone(),
                f.time,
            ),
            Commit::new(
                f.service.clone(),
                f.tree,
                vec![],
                "bob".into(),
                f.message.clone(),
                f.time,
            ),
            Commit::new(
                f.service.clone(),
                f.tree,
                vec![],
                f.author.clone(),
                "second".into(),
                f.time,
            ),
            Commit::new(
                f.service.clone(),
                f.tree,
                vec![],
                f.author.clone(),
                f.message.clone(),
                Timestamp(f.time.0 + 1),
            ),
        ];
        let mut ids: Vec<CommitId> = variants.into_iter().map(|v| v.unwrap().id()).collect();
        ids.push(c.id());
        let distinct: std::collections::BTreeSet<_> = ids.iter().collect();
        assert_eq!(
            distinct.len(),
            ids.len(),
            "changing any field must change the id"
        );
    }

    #[test]
    fn rejects_bad_fields() {
        let p = CommitId::from_bytes([1; 32]);
        assert_eq!(commit(vec![p, p]), Err(CommitError::DuplicateParent(p)));
        let many = (0..17u8).map(|i| CommitId::from_bytes([i; 32])).collect();
        assert!(matches!(
            commit(many),
            Err(CommitError::TooManyParents { count: 17, .. })
        ));
        let svc = ServiceName::new("a").unwrap();
        let t = TreeId::from_bytes([0; 32]);
        let now = Timestamp::now();
        assert_eq!(
            Commit::new(svc.clone(), t, vec![], String::new(), String::new(), now),
            Err(CommitError::EmptyAuthor)
        );
        assert!(matches!(
            Commit::new(svc.clone(), t, vec![], "a\nb".into(), String::new(), now),
            Err(CommitError::AuthorControl(_))
        ));
        assert!(matches!(
            Commit::new(svc, t, vec![], "a".into(), "m".repeat(65 * 1024), now),
            Err(CommitError::MessageTooLong { .. })
        ));
    }

    #[test]
    fn decode_rejects_truncation_and_trailing_bytes() {
        let bytes = commit(vec![]).unwrap().encode();
        for cut in 0..bytes.len() {
            assert!(Commit::decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut long = bytes.clone();
        long.push(0);
        assert!(matches!(
            Commit::decode(&long),
            Err(DecodeError::TrailingBytes { extra: 1, .. })
        ));
    }

    #[test]
    fn timestamps_display_as_rfc3339() {
        for (secs, text) in [
            (0, "1970-01-01T00:00:00Z"),
            (951_782_400, "2000-02-29T00:00:00Z"),
            (1_795_462_968, "2026-11-23T19:42:48Z"),
            (-1, "1969-12-31T23:59:59Z"),
        ] {
            assert_eq!(Timestamp::from_unix_seconds(secs).to_string(), text);
        }
    }
}
