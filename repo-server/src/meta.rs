//! Metadata storage: trees, commits, branches, images and the ref log, behind a
//! narrow trait.
//!
//! [`MetaStore`] is what the protocol needs: put and get trees and commits by id,
//! read and compare-and-swap branch heads, create-once and read images with their
//! authorship, and read the ref log. [`SledMeta`] implements it with one sled
//! database and one sled tree per kind of record, trees, commits and images in their
//! canonical encodings (so a record read back is re-verified by decoding), the
//! authorship and ref log records in `wire::codec`'s record encoding.
//!
//! Every branch move and every image created appends one event to the ref log in
//! the same transaction as the change itself, so the log and the refs never
//! disagree, even after `kill -9`. Events are numbered from a counter kept in that
//! transaction (1, 2, 3…, no gaps, never reused), and the append removes the event
//! that falls out of the retained window, so the log holds at most the newest
//! `retain` events. Writes that a client is told about are flushed before the answer, so
//! an acknowledged push survives `kill -9`. A commit is written after its tree, and
//! a branch is moved only to a stored commit, so no reader ever sees a commit
//! without its tree or a branch without its commit. A SQL database would implement
//! the same trait with one table per kind and `UPDATE … WHERE head = expected`.

use std::path::Path;

use image_spec::{
    BranchName, Commit, CommitId, DecodeError, IdPrefix, Image, ImageId, ImageName, ServiceName,
    Timestamp, Tree, TreeId,
};
use wire::Identity;
use wire::codec::{FrameError, decode_record, encode_record};
use wire::repo::{BranchHead, ImageAuthorship, ImageRecord, REF_LOG_RETAINED, RefChange, RefEvent};

/// Why metadata could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    /// The database failed.
    #[error("metadata database: {0}")]
    Db(#[from] sled::Error),
    /// A stored record does not decode: the database is corrupt.
    #[error("stored {what} is corrupt: {source}")]
    Corrupt {
        /// What kind of record.
        what: &'static str,
        /// Why it does not decode.
        source: DecodeError,
    },
    /// A stored record of the record encoding (authorship, ref log) does not
    /// decode, or a new one does not encode.
    #[error("{what} record: {source}")]
    Record {
        /// What kind of record.
        what: &'static str,
        /// Why.
        source: FrameError,
    },
    /// A stored key does not parse: the database is corrupt.
    #[error("a stored {what} key is malformed")]
    Key {
        /// What kind of record.
        what: &'static str,
    },
}

/// The outcome of a compare-and-swap on a branch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeadUpdate {
    /// The branch now points at the new commit; the move is this ref log event.
    Moved {
        /// The event logged with the move.
        event: RefEvent,
    },
    /// The branch was not at the expected commit; here is where it is.
    Conflict {
        /// The current head (`None`: the branch does not exist).
        current: Option<CommitId>,
    },
}

/// Storage for trees, commits, branches and images (see the module docs).
pub trait MetaStore: Send + Sync + 'static {
    /// Stores a tree (idempotent).
    fn put_tree(&self, tree: &Tree) -> Result<TreeId, MetaError>;
    /// A stored tree.
    fn tree(&self, id: &TreeId) -> Result<Option<Tree>, MetaError>;
    /// Stores a commit (idempotent); `true` if it was new.
    fn put_commit(&self, commit: &Commit) -> Result<(CommitId, bool), MetaError>;
    /// A stored commit.
    fn commit(&self, id: &CommitId) -> Result<Option<Commit>, MetaError>;
    /// Does the repository hold any commit of `service`?
    fn has_service(&self, service: &ServiceName) -> Result<bool, MetaError>;
    /// The commits of `service` whose id starts with `prefix`.
    fn commits_with_prefix(
        &self,
        service: &ServiceName,
        prefix: &IdPrefix,
    ) -> Result<Vec<CommitId>, MetaError>;
    /// The head of a branch.
    fn head(
        &self,
        service: &ServiceName,
        branch: &BranchName,
    ) -> Result<Option<CommitId>, MetaError>;
    /// Every branch with its head, ordered by service then branch (`service`:
    /// only that service's).
    fn heads(&self, service: Option<&ServiceName>) -> Result<Vec<BranchHead>, MetaError>;
    /// Moves a branch from `expected` to `new`, atomically, logging the move as
    /// made by `by` at `at`.
    fn swap_head(
        &self,
        service: &ServiceName,
        branch: &BranchName,
        expected: Option<CommitId>,
        new: CommitId,
        by: &Identity,
        at: Timestamp,
    ) -> Result<HeadUpdate, MetaError>;
    /// Stores an image and its authorship under its name unless the name is taken,
    /// logging the creation; returns the id of the image stored under that name
    /// (ours, or the one that was there) and the event, if ours was stored.
    fn create_image(
        &self,
        image: &Image,
        created: &ImageAuthorship,
    ) -> Result<(ImageId, Option<RefEvent>), MetaError>;
    /// An image by name, with its authorship.
    fn image(&self, name: &ImageName) -> Result<Option<ImageRecord>, MetaError>;
    /// Every image, in creation order, with its authorship.
    fn images(&self) -> Result<Vec<ImageRecord>, MetaError>;
    /// The newest ref log event's number (0: none yet).
    fn ref_log_last(&self) -> Result<u64, MetaError>;
    /// The oldest retained ref log event's number (`None`: the log is empty).
    fn ref_log_oldest(&self) -> Result<Option<u64>, MetaError>;
    /// Up to `max` retained events numbered `from` or more, oldest first.
    fn ref_events(&self, from: u64, max: usize) -> Result<Vec<RefEvent>, MetaError>;
}

/// Metadata in sled (see the module docs).
#[derive(Debug, Clone)]
pub struct SledMeta {
    db: sled::Db,
    trees: sled::Tree,
    commits: sled::Tree,
    /// `service \0 commit id` → empty: the commits of each service, for prefix lookups.
    by_service: sled::Tree,
    heads: sled::Tree,
    images: sled::Tree,
    /// creation sequence (u64 BE) → image name.
    image_order: sled::Tree,
    /// image name → its [`ImageAuthorship`] (record encoding); absent for images
    /// stored before authors were recorded.
    image_authors: sled::Tree,
    /// event number (u64 BE) → `(Timestamp, RefChange)` (record encoding).
    ref_log: sled::Tree,
    /// [`REF_LOG_LAST`] → the newest event's number (u64 BE).
    counters: sled::Tree,
    /// How many of the newest events the log keeps.
    retain: u64,
}

/// The key of the ref log's counter in `counters`.
const REF_LOG_LAST: &[u8] = b"ref_log_last";

/// sled's page cache, bounded: metadata is small and blobs never go into sled.
const CACHE_BYTES: u64 = 64 << 20;

impl SledMeta {
    /// Opens (creating if needed) the database in `dir`, keeping the newest
    /// [`REF_LOG_RETAINED`] ref log events.
    pub fn open(dir: &Path) -> Result<Self, MetaError> {
        Self::open_retaining(dir, REF_LOG_RETAINED)
    }

    /// Opens the database in `dir`, keeping the newest `retain` (at least 1) ref log
    /// events; older ones are removed now if the log holds more.
    pub fn open_retaining(dir: &Path, retain: u64) -> Result<Self, MetaError> {
        let db = embedded_db::open(dir, CACHE_BYTES)?;
        let meta = Self {
            trees: db.open_tree("trees")?,
            commits: db.open_tree("commits")?,
            by_service: db.open_tree("commits_by_service")?,
            heads: db.open_tree("heads")?,
            images: db.open_tree("images")?,
            image_order: db.open_tree("image_order")?,
            image_authors: db.open_tree("image_authors")?,
            ref_log: db.open_tree("ref_log")?,
            counters: db.open_tree("counters")?,
            retain: retain.max(1),
            db,
        };
        let last = meta.ref_log_last()?;
        if last > meta.retain {
            let keep_from = (last - meta.retain + 1).to_be_bytes();
            for kv in meta.ref_log.range(..keep_from) {
                let (k, _) = kv?;
                meta.ref_log.remove(k)?;
            }
            meta.flush()?;
        }
        Ok(meta)
    }

    fn flush(&self) -> Result<(), MetaError> {
        self.db.flush()?;
        Ok(())
    }
}

fn head_key(service: &ServiceName, branch: &BranchName) -> Vec<u8> {
    format!("{service}/{branch}").into_bytes()
}

fn service_key(service: &ServiceName, id: Option<&CommitId>) -> Vec<u8> {
    let mut k = service.as_str().as_bytes().to_vec();
    k.push(0);
    if let Some(id) = id {
        k.extend_from_slice(id.as_bytes());
    }
    k
}

/// Maps a decode failure of a stored record to [`MetaError::Corrupt`].
fn corrupt(what: &'static str) -> impl Fn(DecodeError) -> MetaError {
    move |source| MetaError::Corrupt { what, source }
}

fn id_bytes(v: &[u8]) -> Option<[u8; 32]> {
    v.try_into().ok()
}

fn u64_of(v: &[u8]) -> Option<u64> {
    v.try_into().ok().map(u64::from_be_bytes)
}

fn record_error(what: &'static str) -> impl Fn(FrameError) -> MetaError {
    move |source| MetaError::Record { what, source }
}

/// Appends one event to the ref log inside a transaction over `(counters, ref_log)`:
/// the next number, the event under it, and the removal of the event that falls out
/// of the window of `retain`. Returns the event's number.
fn append_event<E>(
    counters: &sled::transaction::TransactionalTree,
    log: &sled::transaction::TransactionalTree,
    retain: u64,
    body: &[u8],
) -> sled::transaction::ConflictableTransactionResult<u64, E> {
    let last = counters
        .get(REF_LOG_LAST)?
        .and_then(|v| u64_of(&v))
        .unwrap_or(0);
    let seq = last + 1;
    counters.insert(REF_LOG_LAST, &seq.to_be_bytes())?;
    log.insert(&seq.to_be_bytes(), body)?;
    if seq > retain {
        log.remove(&(seq - retain).to_be_bytes())?;
    }
    Ok(seq)
}

impl MetaStore for SledMeta {
    fn put_tree(&self, tree: &Tree) -> Result<TreeId, MetaError> {
        let id = tree.id();
        if !self.trees.contains_key(id.as_bytes())? {
            self.trees.insert(id.as_bytes(), tree.encode())?;
            self.flush()?;
        }
        Ok(id)
    }

    fn tree(&self, id: &TreeId) -> Result<Option<Tree>, MetaError> {
        self.trees
            .get(id.as_bytes())?
            .map(|v| Tree::decode(&v).map_err(corrupt("tree")))
            .transpose()
    }

    fn put_commit(&self, commit: &Commit) -> Result<(CommitId, bool), MetaError> {
        use sled::Transactional;
        let id = commit.id();
        let encoded = commit.encode();
        let index_key = service_key(commit.service(), Some(&id));
        // The commit and its index entry land together or not at all, so a crash
        // can never leave a commit that abbreviated ids do not find.
        let created = (&self.commits, &self.by_service)
            .transaction(|(commits, index)| {
                if commits.get(id.as_bytes())?.is_some() {
                    return Ok(false);
                }
                commits.insert(id.as_bytes(), encoded.as_slice())?;
                index.insert(index_key.as_slice(), &[])?;
                Ok(true)
            })
            .map_err(embedded_db::storage_error)?;
        if created {
            self.flush()?;
        }
        Ok((id, created))
    }

    fn commit(&self, id: &CommitId) -> Result<Option<Commit>, MetaError> {
        self.commits
            .get(id.as_bytes())?
            .map(|v| Commit::decode(&v).map_err(corrupt("commit")))
            .transpose()
    }

    fn has_service(&self, service: &ServiceName) -> Result<bool, MetaError> {
        let base = service_key(service, None);
        Ok(self
            .by_service
            .scan_prefix(&base)
            .next()
            .transpose()?
            .is_some())
    }

    fn commits_with_prefix(
        &self,
        service: &ServiceName,
        prefix: &IdPrefix,
    ) -> Result<Vec<CommitId>, MetaError> {
        let base = service_key(service, None);
        // Scan only the keys whose first id byte matches the prefix's first byte.
        let first = u8::from_str_radix(&prefix.as_str()[..2], 16).expect("a prefix has 8+ hex");
        let mut start = base.clone();
        start.push(first);
        let mut out = Vec::new();
        for kv in self.by_service.scan_prefix(&start) {
            let (k, _) = kv?;
            if let Some(bytes) = id_bytes(&k[base.len()..])
                && prefix.matches(&bytes)
            {
                out.push(CommitId::from_bytes(bytes));
            }
        }
        Ok(out)
    }

    fn head(
        &self,
        service: &ServiceName,
        branch: &BranchName,
    ) -> Result<Option<CommitId>, MetaError> {
        Ok(self
            .heads
            .get(head_key(service, branch))?
            .and_then(|v| id_bytes(&v))
            .map(CommitId::from_bytes))
    }

    fn heads(&self, service: Option<&ServiceName>) -> Result<Vec<BranchHead>, MetaError> {
        let prefix = service.map(|s| format!("{s}/")).unwrap_or_default();
        let mut out = Vec::new();
        for kv in self.heads.scan_prefix(prefix.as_bytes()) {
            let (k, v) = kv?;
            let bad = || MetaError::Key {
                what: "branch head",
            };
            let key = std::str::from_utf8(&k).map_err(|_| bad())?;
            let (service, branch) = key.split_once('/').ok_or_else(bad)?;
            out.push(BranchHead {
                service: ServiceName::new(service).map_err(|_| bad())?,
                branch: BranchName::new(branch).map_err(|_| bad())?,
                head: CommitId::from_bytes(id_bytes(&v).ok_or_else(bad)?),
            });
        }
        // Keys sort as `service/branch` bytes, where `-` and `.` come before
        // `/` (`a-b/main` before `a/main`): sort by the fields themselves.
        out.sort_by(|a, b| (&a.service, &a.branch).cmp(&(&b.service, &b.branch)));
        Ok(out)
    }

    fn swap_head(
        &self,
        service: &ServiceName,
        branch: &BranchName,
        expected: Option<CommitId>,
        new: CommitId,
        by: &Identity,
        at: Timestamp,
    ) -> Result<HeadUpdate, MetaError> {
        use sled::Transactional;
        let key = head_key(service, branch);
        let change = |old| RefChange::BranchMoved {
            service: service.clone(),
            branch: branch.clone(),
            old,
            new,
            by: by.clone(),
        };
        let body = encode_record(&(at, change(expected))).map_err(record_error("ref log"))?;
        // The head moves and the move is logged in one transaction: a compare-and-swap
        // that is also an append.
        let outcome = (&self.heads, &self.counters, &self.ref_log)
            .transaction(|(heads, counters, log)| {
                let current = heads
                    .get(&key)?
                    .and_then(|v| id_bytes(&v))
                    .map(CommitId::from_bytes);
                if current != expected {
                    return Ok(Err(current));
                }
                heads.insert(key.as_slice(), new.as_bytes().as_slice())?;
                Ok(Ok(append_event(counters, log, self.retain, &body)?))
            })
            .map_err(embedded_db::storage_error)?;
        match outcome {
            Ok(seq) => {
                self.flush()?;
                Ok(HeadUpdate::Moved {
                    event: RefEvent {
                        seq,
                        at,
                        change: change(expected),
                    },
                })
            }
            Err(current) => Ok(HeadUpdate::Conflict { current }),
        }
    }

    fn create_image(
        &self,
        image: &Image,
        created: &ImageAuthorship,
    ) -> Result<(ImageId, Option<RefEvent>), MetaError> {
        use sled::Transactional;
        let key = image.name().as_str().as_bytes();
        let encoded = image.encode();
        let authorship = encode_record(created).map_err(record_error("image authorship"))?;
        let change = RefChange::ImageCreated {
            name: image.name().clone(),
            id: image.id(),
            author: created.author.clone(),
            by: created.by.clone(),
        };
        let body = encode_record(&(created.at, &change)).map_err(record_error("ref log"))?;
        let order_seq = self.db.generate_id()?;
        // The image, its authorship, its place in the listing and its event in the
        // ref log land together or not at all.
        let outcome = (
            &self.images,
            &self.image_order,
            &self.image_authors,
            &self.counters,
            &self.ref_log,
        )
            .transaction(|(images, order, authors, counters, log)| {
                if let Some(v) = images.get(key)? {
                    return Ok(Err(v));
                }
                images.insert(key, encoded.as_slice())?;
                order.insert(&order_seq.to_be_bytes(), key)?;
                authors.insert(key, authorship.as_slice())?;
                Ok(Ok(append_event(counters, log, self.retain, &body)?))
            })
            .map_err(embedded_db::storage_error)?;
        match outcome {
            Ok(seq) => {
                self.flush()?;
                let event = RefEvent {
                    seq,
                    at: created.at,
                    change,
                };
                Ok((image.id(), Some(event)))
            }
            Err(v) => {
                let stored = Image::decode(&v).map_err(corrupt("image"))?;
                Ok((stored.id(), None))
            }
        }
    }

    fn image(&self, name: &ImageName) -> Result<Option<ImageRecord>, MetaError> {
        self.image_record(name.as_str().as_bytes())
    }

    fn images(&self) -> Result<Vec<ImageRecord>, MetaError> {
        let mut out = Vec::new();
        for kv in self.image_order.iter() {
            let (_, name) = kv?;
            if let Some(record) = self.image_record(&name)? {
                out.push(record);
            }
        }
        Ok(out)
    }

    fn ref_log_last(&self) -> Result<u64, MetaError> {
        Ok(self
            .counters
            .get(REF_LOG_LAST)?
            .and_then(|v| u64_of(&v))
            .unwrap_or(0))
    }

    fn ref_log_oldest(&self) -> Result<Option<u64>, MetaError> {
        Ok(self.ref_log.first()?.and_then(|(k, _)| u64_of(&k)))
    }

    fn ref_events(&self, from: u64, max: usize) -> Result<Vec<RefEvent>, MetaError> {
        let mut out = Vec::new();
        for kv in self.ref_log.range(from.to_be_bytes()..).take(max) {
            let (k, v) = kv?;
            let seq = u64_of(&k).ok_or(MetaError::Record {
                what: "ref log",
                source: FrameError::Malformed(format!("a key of {} bytes", k.len())),
            })?;
            let (at, change): (Timestamp, RefChange) =
                decode_record(&v).map_err(record_error("ref log"))?;
            out.push(RefEvent { seq, at, change });
        }
        Ok(out)
    }
}

impl SledMeta {
    /// The image stored under `key` (its name's bytes) with its authorship.
    fn image_record(&self, key: &[u8]) -> Result<Option<ImageRecord>, MetaError> {
        let Some(v) = self.images.get(key)? else {
            return Ok(None);
        };
        let image = Image::decode(&v).map_err(corrupt("image"))?;
        let created = self
            .image_authors
            .get(key)?
            .map(|v| decode_record::<ImageAuthorship>(&v))
            .transpose()
            .map_err(record_error("image authorship"))?;
        Ok(Some(ImageRecord {
            id: image.id(),
            image,
            created,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image_spec::UserName;
    use std::collections::BTreeMap;

    fn commit(service: &str, msg: &str, parents: Vec<CommitId>) -> Commit {
        Commit::new(
            ServiceName::new(service).unwrap(),
            Tree::empty().id(),
            parents,
            "ada".into(),
            msg.into(),
            Timestamp::from_unix_seconds(1),
        )
        .unwrap()
    }

    #[test]
    fn commits_trees_and_prefixes() {
        let dir = tempfile::tempdir().unwrap();
        let meta = SledMeta::open(dir.path()).unwrap();
        assert_eq!(meta.put_tree(&Tree::empty()).unwrap(), Tree::empty().id());
        let c = commit("orders", "one", vec![]);
        let (id, created) = meta.put_commit(&c).unwrap();
        assert!(created);
        assert!(!meta.put_commit(&c).unwrap().1);
        assert_eq!(meta.commit(&id).unwrap().unwrap(), c);
        let prefix: IdPrefix = id.short(8).parse().unwrap();
        let svc = ServiceName::new("orders").unwrap();
        assert_eq!(meta.commits_with_prefix(&svc, &prefix).unwrap(), [id]);
        // Another service's commits are not found under this service.
        let other = ServiceName::new("payments").unwrap();
        assert!(
            meta.commits_with_prefix(&other, &prefix)
                .unwrap()
                .is_empty()
        );
        // A service exists once it has a commit; a name that is a prefix of
        // another service's is a service of its own.
        assert!(meta.has_service(&svc).unwrap());
        assert!(!meta.has_service(&other).unwrap());
        assert!(
            !meta
                .has_service(&ServiceName::new("order").unwrap())
                .unwrap()
        );
    }

    #[test]
    fn heads_move_only_by_compare_and_swap() {
        let dir = tempfile::tempdir().unwrap();
        let meta = SledMeta::open(dir.path()).unwrap();
        let (svc, main) = (
            ServiceName::new("orders").unwrap(),
            BranchName::new("main").unwrap(),
        );
        let a = meta.put_commit(&commit("orders", "a", vec![])).unwrap().0;
        let b = meta.put_commit(&commit("orders", "b", vec![a])).unwrap().0;
        let ada: Identity = "user/ada/developer".parse().unwrap();
        let at = Timestamp::from_unix_seconds(1);
        let moved = |u| matches!(u, HeadUpdate::Moved { .. });
        assert!(moved(
            meta.swap_head(&svc, &main, None, a, &ada, at).unwrap()
        ));
        assert_eq!(
            meta.swap_head(&svc, &main, None, b, &ada, at).unwrap(),
            HeadUpdate::Conflict { current: Some(a) }
        );
        assert!(moved(
            meta.swap_head(&svc, &main, Some(a), b, &ada, at).unwrap()
        ));
        assert_eq!(meta.head(&svc, &main).unwrap(), Some(b));
        // Only the two moves are logged, in order; the conflict logged nothing.
        let log = meta.ref_events(0, 10).unwrap();
        let heads: Vec<_> = log
            .iter()
            .map(|e| match &e.change {
                RefChange::BranchMoved { old, new, .. } => (e.seq, *old, *new),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(heads, [(1, None, a), (2, Some(a), b)]);
    }

    #[test]
    fn heads_are_listed_by_service_then_branch() {
        let dir = tempfile::tempdir().unwrap();
        let meta = SledMeta::open(dir.path()).unwrap();
        let ada: Identity = "user/ada/developer".parse().unwrap();
        let at = Timestamp::from_unix_seconds(1);
        let mut made = Vec::new();
        // `a-b` sorts before `a` as a `service/branch` key; the list must not.
        for (service, branch) in [("a-b", "main"), ("a", "dev-ada"), ("a", "main")] {
            let svc = ServiceName::new(service).unwrap();
            let br = BranchName::new(branch).unwrap();
            let c = meta.put_commit(&commit(service, branch, vec![])).unwrap().0;
            meta.swap_head(&svc, &br, None, c, &ada, at).unwrap();
            made.push((service, branch, c));
        }
        let listed: Vec<_> = meta
            .heads(None)
            .unwrap()
            .into_iter()
            .map(|h| (h.service.to_string(), h.branch.to_string(), h.head))
            .collect();
        let want = |i: usize| {
            let (s, b, c) = made[i];
            (s.to_owned(), b.to_owned(), c)
        };
        assert_eq!(listed, [want(1), want(2), want(0)]);
        let only: Vec<_> = meta
            .heads(Some(&ServiceName::new("a").unwrap()))
            .unwrap()
            .into_iter()
            .map(|h| h.branch.to_string())
            .collect();
        assert_eq!(only, ["dev-ada", "main"]);
        assert!(
            meta.heads(Some(&ServiceName::new("zzz").unwrap()))
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn images_are_created_once_and_listed_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let meta = SledMeta::open(dir.path()).unwrap();
        let mk = |name: &str, desc: &str| {
            Image::new(
                ImageName::new(name).unwrap(),
                desc.into(),
                BTreeMap::from([(
                    ServiceName::new("a").unwrap(),
                    CommitId::from_bytes([1; 32]),
                )]),
            )
            .unwrap()
        };
        let by_ada = ImageAuthorship {
            author: UserName::new("ada").unwrap(),
            by: Identity::Portal,
            at: Timestamp::from_unix_seconds(7),
        };
        let first = mk("zeta", "1");
        assert!(meta.create_image(&first, &by_ada).unwrap().1.is_some());
        assert!(
            meta.create_image(&mk("alpha", "2"), &by_ada)
                .unwrap()
                .1
                .is_some()
        );
        let (existing, created) = meta.create_image(&mk("zeta", "other"), &by_ada).unwrap();
        assert!(created.is_none());
        assert_eq!(existing, first.id());
        let names: Vec<_> = meta
            .images()
            .unwrap()
            .iter()
            .map(|i| i.image.name().to_string())
            .collect();
        assert_eq!(names, ["zeta", "alpha"]);
        // Two creations logged, the refused one not.
        assert_eq!(meta.ref_log_last().unwrap(), 2);
        drop(meta);
        // Everything survives reopening.
        let meta = SledMeta::open(dir.path()).unwrap();
        assert_eq!(
            meta.image(&ImageName::new("zeta").unwrap()).unwrap(),
            Some(ImageRecord {
                id: first.id(),
                image: first,
                created: Some(by_ada),
            })
        );
    }

    #[test]
    fn the_ref_log_numbers_every_change_and_keeps_only_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        let meta = SledMeta::open_retaining(dir.path(), 3).unwrap();
        assert_eq!(meta.ref_log_last().unwrap(), 0);
        assert_eq!(meta.ref_log_oldest().unwrap(), None);
        let (svc, main) = (
            ServiceName::new("orders").unwrap(),
            BranchName::new("main").unwrap(),
        );
        let ada: Identity = "user/ada/developer".parse().unwrap();
        let mut head = None;
        for i in 0..5 {
            let c = meta
                .put_commit(&commit("orders", &i.to_string(), vec![]))
                .unwrap()
                .0;
            let at = Timestamp::from_unix_seconds(i);
            let HeadUpdate::Moved { event } =
                meta.swap_head(&svc, &main, head, c, &ada, at).unwrap()
            else {
                panic!("the move conflicted");
            };
            assert_eq!(event.seq, i as u64 + 1);
            head = Some(c);
        }
        // Five events, the newest three kept.
        assert_eq!(meta.ref_log_last().unwrap(), 5);
        assert_eq!(meta.ref_log_oldest().unwrap(), Some(3));
        let seqs = |m: &SledMeta, from| -> Vec<u64> {
            m.ref_events(from, 100)
                .unwrap()
                .iter()
                .map(|e| e.seq)
                .collect()
        };
        assert_eq!(seqs(&meta, 0), [3, 4, 5]);
        assert_eq!(seqs(&meta, 4), [4, 5]);
        assert_eq!(meta.ref_events(3, 2).unwrap().len(), 2);
        assert!(seqs(&meta, 6).is_empty());
        drop(meta);
        // Numbers continue after a reopen; a smaller window prunes at once.
        let meta = SledMeta::open_retaining(dir.path(), 2).unwrap();
        assert_eq!(seqs(&meta, 0), [4, 5]);
        let c = meta.put_commit(&commit("orders", "6", vec![])).unwrap().0;
        let moved = meta
            .swap_head(&svc, &main, head, c, &ada, Timestamp::from_unix_seconds(9))
            .unwrap();
        assert!(matches!(moved, HeadUpdate::Moved { event } if event.seq == 6));
        assert_eq!(seqs(&meta, 0), [5, 6]);
    }
}
