//! Metadata storage: trees, commits, branches, images and the ref log, behind a
//! narrow trait.
//!
//! [`MetaStore`] is what the protocol needs: put and get trees and commits by id,
//! read and compare-and-swap branch heads, create-once and read images with their
//! authorship, and read the ref log. [`SledMeta`] implements it in three parts
//! under the repository's data directory:
//!
//! - **objects** (`DATA/objects`, [`crate::objects`]): every tree, commit and
//!   image as a file named by the blake3 of its canonical encoding, verified on
//!   every read;
//! - **the refs journal** (`DATA/refs.journal`, [`embedded_db::journal`]): every
//!   branch move and image creation, appended and synced before it is applied,
//!   hash-chained so damage or a lost tail shows;
//! - **the index** (`DATA/meta`, sled): branch heads, image names, authorship,
//!   commits by service (for abbreviated ids) and the retained window of the ref
//!   log, plus the journal position it has applied, all derived from the two
//!   above.
//!
//! Opening checks the index against the journal. sled recovers a damaged file by
//! dropping what follows the damage, so a flipped byte or a truncated tail turns
//! the index into an older one: it is then rebuilt from the journal and the
//! objects, and the warning says what differed. A journal behind or disagreeing
//! with its index (its tail lost, an old copy restored) is refused at start,
//! named, for `molt fsck --repo DATA --repair` ([`crate::fsck`]).
//!
//! Every branch move and every image created is one journal record and one ref
//! log event; the index applies both in one transaction with the journal
//! position, so the log and the refs never disagree, even after `kill -9`. Events
//! are numbered 1, 2, 3… with no gaps, never reused; the index keeps the newest
//! `retain`. Writes are serialized by the journal's lock and are durable before
//! the caller is answered. A commit is written after its tree, and a branch is
//! moved only to a stored commit, so no reader ever sees a commit without its tree
//! or a branch without its commit. A SQL database would implement the same trait
//! with one table per kind and `UPDATE … WHERE head = expected`, and would need no
//! journal of its own.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use embedded_db::journal::{Contents, Journal, JournalError, Position, Standing};
use image_spec::{
    BranchName, Commit, CommitId, DecodeError, IdPrefix, Image, ImageId, ImageName, ServiceName,
    Timestamp, Tree, TreeId,
};
use serde::{Deserialize, Serialize};
use wire::Identity;
use wire::codec::{FrameError, decode_record, encode_record};
use wire::repo::{BranchHead, ImageAuthorship, ImageRecord, REF_LOG_RETAINED, RefChange, RefEvent};

use crate::objects::{Kind, ObjectError, Objects};

/// Why metadata could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    /// The index database failed.
    #[error("metadata index: {0}")]
    Db(#[from] sled::Error),
    /// An object file could not be read or written, or is corrupt.
    #[error(transparent)]
    Objects(#[from] ObjectError),
    /// The refs journal could not be read or written, or is corrupt.
    #[error("{0}; run `molt fsck --repo DATA --repair`")]
    Journal(#[from] JournalError),
    /// The index has applied more of the journal than the journal holds.
    #[error(
        "the refs journal `{path}` ends at record {journal} but the metadata index has applied \
         {index}: the journal lost its tail or an older copy was restored; run \
         `molt fsck --repo DATA --repair` to take the index's refs back into it"
    )]
    JournalBehind {
        /// The journal.
        path: PathBuf,
        /// Its records.
        journal: u64,
        /// What the index applied.
        index: u64,
    },
    /// The index applied a different record than the journal holds there.
    #[error(
        "the refs journal `{path}` and the metadata index disagree at record {seq}: one of them \
         was replaced; run `molt fsck --repo DATA --repair`"
    )]
    Diverged {
        /// The journal.
        path: PathBuf,
        /// The record.
        seq: u64,
    },
    /// An earlier write reached the journal but not the index: the index is
    /// behind until the next start brings it forward.
    #[error("the metadata index fell behind the refs journal; restart the repository server")]
    Stale,
    /// A stored object does not decode.
    #[error("stored {what} is corrupt: {source}")]
    Corrupt {
        /// What kind of record.
        what: &'static str,
        /// Why it does not decode.
        source: DecodeError,
    },
    /// A stored record of the record encoding (authorship, ref log, journal)
    /// does not decode, or a new one does not encode.
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

/// One record of the refs journal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RefRecord {
    /// A change the ref log also holds, under the same number.
    Event(RefEvent),
    /// A branch head set without a ref log event: taken over from an index
    /// that had no journal yet, or back from the index by a repair.
    Head {
        /// The service.
        service: ServiceName,
        /// The branch.
        branch: BranchName,
        /// Its head.
        head: CommitId,
    },
    /// An image recorded without a ref log event (as [`RefRecord::Head`]).
    Image {
        /// Its name.
        name: ImageName,
        /// Its id.
        id: ImageId,
        /// Its authorship, if known.
        created: Option<ImageAuthorship>,
    },
    /// The ref log goes on after event `last` (events before the journal).
    LogFrom {
        /// The last event numbered before this record.
        last: u64,
    },
}

/// The refs a journal (or an index) holds: what is compared at start.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Refs {
    /// Every branch head.
    pub heads: BTreeMap<(ServiceName, BranchName), CommitId>,
    /// Every image, in creation order, with its id and authorship.
    pub images: Vec<(ImageName, ImageId, Option<ImageAuthorship>)>,
    /// The newest ref log event's number.
    pub last_event: u64,
}

impl Refs {
    /// The refs after applying `record`.
    fn apply(&mut self, record: &RefRecord) {
        match record {
            RefRecord::Event(event) => {
                self.last_event = self.last_event.max(event.seq);
                match &event.change {
                    RefChange::BranchMoved {
                        service,
                        branch,
                        new,
                        ..
                    } => {
                        self.heads.insert((service.clone(), branch.clone()), *new);
                    }
                    RefChange::ImageCreated {
                        name,
                        id,
                        author,
                        by,
                    } => self.add_image(
                        name,
                        *id,
                        Some(ImageAuthorship {
                            author: author.clone(),
                            by: by.clone(),
                            at: event.at,
                        }),
                    ),
                }
            }
            RefRecord::Head {
                service,
                branch,
                head,
            } => {
                self.heads.insert((service.clone(), branch.clone()), *head);
            }
            RefRecord::Image { name, id, created } => self.add_image(name, *id, created.clone()),
            RefRecord::LogFrom { last } => self.last_event = self.last_event.max(*last),
        }
    }

    fn add_image(&mut self, name: &ImageName, id: ImageId, created: Option<ImageAuthorship>) {
        // Names are created once; a repair never records one twice.
        if !self.images.iter().any(|(n, _, _)| n == name) {
            self.images.push((name.clone(), id, created));
        }
    }

    /// What differs between `self` (the journal's) and `index`, in words.
    pub fn differences(&self, index: &Refs) -> Vec<String> {
        let mut out = Vec::new();
        for ((service, branch), head) in &self.heads {
            match index.heads.get(&(service.clone(), branch.clone())) {
                Some(h) if h == head => {}
                Some(h) => out.push(format!(
                    "{service}/{branch} is at {} in the index, {} in the journal",
                    h.short(12),
                    head.short(12)
                )),
                None => out.push(format!(
                    "branch {service}/{branch} is missing from the index"
                )),
            }
        }
        for (service, branch) in index.heads.keys() {
            if !self.heads.contains_key(&(service.clone(), branch.clone())) {
                out.push(format!("branch {service}/{branch} is only in the index"));
            }
        }
        for (name, id, _) in &self.images {
            if !index.images.iter().any(|(n, i, _)| n == name && i == id) {
                out.push(format!("image {name} is missing from the index"));
            }
        }
        if index.images.len() > self.images.len() {
            out.push(format!(
                "the index lists {} images, the journal {}",
                index.images.len(),
                self.images.len()
            ));
        }
        if self.last_event != index.last_event {
            out.push(format!(
                "the index's ref log ends at event {}, the journal's at {}",
                index.last_event, self.last_event
            ));
        }
        out
    }
}

/// The refs journal's records, decoded.
pub fn journal_records(contents: &Contents) -> Result<Vec<(Position, RefRecord)>, MetaError> {
    contents
        .records
        .iter()
        .map(|(pos, payload)| {
            decode_record(payload)
                .map(|r| (*pos, r))
                .map_err(record_error("refs journal"))
        })
        .collect()
}

/// The refs `records` make.
pub fn replay<'a>(records: impl IntoIterator<Item = &'a RefRecord>) -> Refs {
    let mut refs = Refs::default();
    for r in records {
        refs.apply(r);
    }
    refs
}

/// The journal's writer: the file, and whether the index keeps up with it.
#[derive(Debug)]
struct Writer {
    journal: Journal,
    /// A write reached the journal but the index failed to apply it.
    stale: bool,
}

/// Metadata in object files, a journal and a sled index (see the module docs).
#[derive(Debug)]
pub struct SledMeta {
    db: sled::Db,
    objects: Objects,
    writer: Mutex<Writer>,
    journal_path: PathBuf,
    /// `service \0 commit id` → empty: the commits of each service, for prefix lookups.
    by_service: sled::Tree,
    heads: sled::Tree,
    /// image name → image id.
    image_ids: sled::Tree,
    /// journal record number (u64 BE) → image name: creation order.
    image_order: sled::Tree,
    /// image name → its [`ImageAuthorship`] (record encoding); absent for images
    /// stored before authors were recorded.
    image_authors: sled::Tree,
    /// event number (u64 BE) → `(Timestamp, RefChange)` (record encoding).
    ref_log: sled::Tree,
    /// [`REF_LOG_LAST`] → the newest event's number (u64 BE); [`JOURNAL_AT`] →
    /// the journal [`Position`] the index has applied.
    counters: sled::Tree,
    /// How many of the newest events the log keeps.
    retain: u64,
}

/// The key of the ref log's counter in `counters`.
const REF_LOG_LAST: &[u8] = b"ref_log_last";
/// The key of the applied journal position in `counters`.
const JOURNAL_AT: &[u8] = b"journal_at";

/// sled's page cache, bounded: metadata is small and blobs never go into sled.
pub const CACHE_BYTES: u64 = 64 << 20;

/// Where the parts live under the data directory.
pub fn index_dir(data: &Path) -> PathBuf {
    data.join("meta")
}
/// The objects' directory under the data directory.
pub fn objects_dir(data: &Path) -> PathBuf {
    data.join("objects")
}
/// The refs journal under the data directory.
pub fn journal_path(data: &Path) -> PathBuf {
    data.join("refs.journal")
}

/// What opening found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Opened {
    /// How the index differed from the journal before it was rebuilt (empty:
    /// it agreed).
    pub rebuilt: Vec<String>,
    /// Objects taken over from an index of the older layout.
    pub migrated: usize,
}

impl SledMeta {
    /// Opens (creating if needed) the metadata under the data directory
    /// `data`, keeping the newest [`REF_LOG_RETAINED`] ref log events.
    pub fn open(data: &Path) -> Result<Self, MetaError> {
        Self::open_retaining(data, REF_LOG_RETAINED)
    }

    /// [`SledMeta::open`], keeping the newest `retain` (at least 1) ref log
    /// events; older ones are removed now if the log holds more.
    pub fn open_retaining(data: &Path, retain: u64) -> Result<Self, MetaError> {
        Ok(Self::open_reporting(data, retain)?.0)
    }

    /// [`SledMeta::open_retaining`], saying what it found.
    pub fn open_reporting(data: &Path, retain: u64) -> Result<(Self, Opened), MetaError> {
        let db = embedded_db::open(&index_dir(data), CACHE_BYTES)?;
        let objects = Objects::open(&objects_dir(data))?;
        let journal_path = journal_path(data);
        let (journal, contents) = Journal::open(&journal_path)?;
        let meta = Self {
            by_service: db.open_tree("commits_by_service")?,
            heads: db.open_tree("heads")?,
            image_ids: db.open_tree("image_ids")?,
            image_order: db.open_tree("image_order")?,
            image_authors: db.open_tree("image_authors")?,
            ref_log: db.open_tree("ref_log")?,
            counters: db.open_tree("counters")?,
            retain: retain.max(1),
            objects,
            writer: Mutex::new(Writer {
                journal,
                stale: false,
            }),
            journal_path,
            db,
        };
        let mut opened = Opened {
            migrated: meta.migrate()?,
            ..Opened::default()
        };
        let mut records = journal_records(&contents)?;
        let applied = meta.applied()?;
        if applied.is_none() && records.is_empty() {
            // An index from before the journal (or a new repository): its refs
            // become the journal's first records.
            let baseline = meta.baseline()?;
            let mut writer = meta.lock();
            for r in baseline {
                let pos = writer.journal.append(&encode(&r)?)?;
                records.push((pos, r));
            }
        }
        let journal_at = records.last().map(|(p, _)| *p).unwrap_or_default();
        match contents.standing(applied) {
            Standing::JournalBehind { journal, database } => {
                return Err(MetaError::JournalBehind {
                    path: meta.journal_path.clone(),
                    journal,
                    index: database,
                });
            }
            Standing::Diverged { seq } => {
                return Err(MetaError::Diverged {
                    path: meta.journal_path.clone(),
                    seq,
                });
            }
            Standing::Agrees | Standing::DatabaseBehind => {}
        }
        let expected = replay(records.iter().map(|(_, r)| r));
        let mut differences = expected.differences(&meta.indexed_refs()?);
        if applied != Some(journal_at) && differences.is_empty() && !records.is_empty() {
            differences.push(format!(
                "the index had applied {} of the journal's {} records",
                applied.map_or(0, |p| p.seq),
                journal_at.seq
            ));
        }
        if !differences.is_empty() || applied != Some(journal_at) {
            if !differences.is_empty() {
                tracing::warn!(
                    journal = %meta.journal_path.display(),
                    differences = %differences.join("; "),
                    "the metadata index disagreed with the refs journal; rebuilding it"
                );
            }
            meta.rebuild(&records)?;
            opened.rebuilt = differences;
        }
        meta.trim_ref_log()?;
        Ok((meta, opened))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Writer> {
        // A writer that panicked left the journal and index as a crash would:
        // the next start reconciles them, so the lock stays usable.
        self.writer.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn flush(&self) -> Result<(), MetaError> {
        self.db.flush()?;
        Ok(())
    }

    /// The journal position the index has applied (`None`: never recorded).
    fn applied(&self) -> Result<Option<Position>, MetaError> {
        Ok(self
            .counters
            .get(JOURNAL_AT)?
            .and_then(|v| Position::from_bytes(&v)))
    }

    /// The refs as the index holds them.
    pub fn indexed_refs(&self) -> Result<Refs, MetaError> {
        Ok(read_index(&self.db)?.1)
    }

    fn authorship(&self, key: &[u8]) -> Result<Option<ImageAuthorship>, MetaError> {
        self.image_authors
            .get(key)?
            .map(|v| decode_record::<ImageAuthorship>(&v))
            .transpose()
            .map_err(record_error("image authorship"))
    }

    /// The records that make a journal of an index without one.
    fn baseline(&self) -> Result<Vec<RefRecord>, MetaError> {
        let refs = self.indexed_refs()?;
        let mut out = Vec::new();
        if refs.last_event > 0 {
            out.push(RefRecord::LogFrom {
                last: refs.last_event,
            });
        }
        for ((service, branch), head) in refs.heads {
            out.push(RefRecord::Head {
                service,
                branch,
                head,
            });
        }
        for (name, id, created) in refs.images {
            out.push(RefRecord::Image { name, id, created });
        }
        Ok(out)
    }

    /// Moves trees, commits and images kept in the index by older versions
    /// into object files; returns how many.
    fn migrate(&self) -> Result<usize, MetaError> {
        let mut moved = 0;
        for (name, kind) in [
            ("trees", Kind::Tree),
            ("commits", Kind::Commit),
            ("images", Kind::Image),
        ] {
            if !self
                .db
                .tree_names()
                .iter()
                .any(|n| n.as_ref() == name.as_bytes())
            {
                continue;
            }
            let old = self.db.open_tree(name)?;
            for kv in old.iter() {
                let (k, v) = kv?;
                let id = blake3::hash(&v);
                self.objects.put(kind, id.as_bytes(), &v)?;
                if kind == Kind::Image {
                    // Old layout: image name → encoded image.
                    self.image_ids.insert(&k, id.as_bytes().as_slice())?;
                }
                moved += 1;
            }
            self.flush()?;
            self.db.drop_tree(name)?;
        }
        if moved > 0 {
            tracing::info!(
                objects = moved,
                "moved trees, commits and images out of the index into object files"
            );
        }
        Ok(moved)
    }

    /// Rebuilds the index's refs, ref log and commit index from the journal's
    /// `records` and the object files; the applied position is written last,
    /// so a crash halfway rebuilds again at the next start.
    pub fn rebuild(&self, records: &[(Position, RefRecord)]) -> Result<(), MetaError> {
        self.counters.remove(JOURNAL_AT)?;
        self.flush()?;
        for tree in [
            &self.heads,
            &self.image_ids,
            &self.image_order,
            &self.image_authors,
            &self.ref_log,
        ] {
            tree.clear()?;
        }
        let refs = replay(records.iter().map(|(_, r)| r));
        for ((service, branch), head) in &refs.heads {
            self.heads
                .insert(head_key(service, branch), head.as_bytes().as_slice())?;
        }
        for (i, (name, id, created)) in refs.images.iter().enumerate() {
            let key = name.as_str().as_bytes();
            self.image_ids.insert(key, id.as_bytes().as_slice())?;
            self.image_order.insert((i as u64 + 1).to_be_bytes(), key)?;
            if let Some(created) = created {
                self.image_authors.insert(
                    key,
                    encode_record(created).map_err(record_error("image authorship"))?,
                )?;
            }
        }
        let events = records.iter().filter_map(|(_, r)| match r {
            RefRecord::Event(e) => Some(e),
            _ => None,
        });
        for e in events {
            if e.seq + self.retain > refs.last_event {
                let body = encode_record(&(e.at, &e.change)).map_err(record_error("ref log"))?;
                self.ref_log.insert(e.seq.to_be_bytes(), body)?;
            }
        }
        self.counters
            .insert(REF_LOG_LAST, &refs.last_event.to_be_bytes())?;
        self.reindex_commits()?;
        let at = records.last().map(|(p, _)| *p).unwrap_or_default();
        self.flush()?;
        self.counters.insert(JOURNAL_AT, at.to_bytes().as_slice())?;
        self.flush()?;
        Ok(())
    }

    /// Rebuilds the commits-by-service index from the commit objects; a commit
    /// that does not verify is quarantined and left out.
    fn reindex_commits(&self) -> Result<(), MetaError> {
        self.by_service.clear()?;
        for id in self.objects.ids(Kind::Commit)? {
            match self.objects.get(Kind::Commit, &id) {
                Ok(Some(bytes)) => {
                    let commit = Commit::decode(&bytes).map_err(corrupt("commit"))?;
                    let id = CommitId::from_bytes(id);
                    self.by_service
                        .insert(service_key(commit.service(), Some(&id)), &[])?;
                }
                Ok(None) => {}
                Err(ObjectError::Corrupt { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Removes ref log events older than the window.
    fn trim_ref_log(&self) -> Result<(), MetaError> {
        let last = self.ref_log_last()?;
        if last > self.retain {
            let keep_from = (last - self.retain + 1).to_be_bytes();
            let mut removed = false;
            for kv in self.ref_log.range(..keep_from) {
                let (k, _) = kv?;
                self.ref_log.remove(k)?;
                removed = true;
            }
            if removed {
                self.flush()?;
            }
        }
        Ok(())
    }

    /// The object files.
    pub fn objects(&self) -> &Objects {
        &self.objects
    }

    /// Every commit the index lists, by service.
    pub fn indexed_commits(&self) -> Result<Vec<CommitId>, MetaError> {
        let mut out = Vec::new();
        for kv in self.by_service.iter() {
            let (k, _) = kv?;
            let id = k
                .len()
                .checked_sub(32)
                .and_then(|at| id_bytes(&k[at..]))
                .ok_or(MetaError::Key { what: "commit" })?;
            out.push(CommitId::from_bytes(id));
        }
        Ok(out)
    }

    /// Journals `record`, then applies it to the index with `apply` in one
    /// transaction that also records the new journal position.
    fn journal_and_apply(
        &self,
        writer: &mut Writer,
        record: &RefRecord,
        apply: impl Fn(
            &[&sled::transaction::TransactionalTree],
        )
            -> sled::transaction::ConflictableTransactionResult<(), std::convert::Infallible>,
    ) -> Result<(), MetaError> {
        if writer.stale {
            return Err(MetaError::Stale);
        }
        let pos = writer.journal.append(&encode(record)?)?;
        let applied = self.apply_at(pos, apply);
        if applied.is_err() {
            writer.stale = true;
        }
        applied
    }

    fn apply_at(
        &self,
        pos: Position,
        apply: impl Fn(
            &[&sled::transaction::TransactionalTree],
        )
            -> sled::transaction::ConflictableTransactionResult<(), std::convert::Infallible>,
    ) -> Result<(), MetaError> {
        use sled::Transactional;
        let pos = pos.to_bytes();
        let trees: [&sled::Tree; 6] = [
            &self.heads,
            &self.image_ids,
            &self.image_order,
            &self.image_authors,
            &self.counters,
            &self.ref_log,
        ];
        trees[..]
            .transaction(|trees| {
                let refs: Vec<&sled::transaction::TransactionalTree> = trees.iter().collect();
                apply(&refs)?;
                trees[COUNTERS].insert(JOURNAL_AT, pos.as_slice())?;
                Ok(())
            })
            .map_err(embedded_db::storage_error)?;
        self.flush()
    }

    /// The next ref log event's number.
    fn next_event(&self) -> Result<u64, MetaError> {
        Ok(self.ref_log_last()? + 1)
    }
}

/// The index trees [`SledMeta::apply_at`] hands its closure, by position.
const HEADS: usize = 0;
const IMAGE_IDS: usize = 1;
const IMAGE_ORDER: usize = 2;
const IMAGE_AUTHORS: usize = 3;
const COUNTERS: usize = 4;
const REF_LOG: usize = 5;

/// A `heads` entry.
fn parse_head(k: &[u8], v: &[u8]) -> Result<BranchHead, MetaError> {
    let bad = || MetaError::Key {
        what: "branch head",
    };
    let key = std::str::from_utf8(k).map_err(|_| bad())?;
    let (service, branch) = key.split_once('/').ok_or_else(bad)?;
    Ok(BranchHead {
        service: ServiceName::new(service).map_err(|_| bad())?,
        branch: BranchName::new(branch).map_err(|_| bad())?,
        head: CommitId::from_bytes(id_bytes(v).ok_or_else(bad)?),
    })
}

/// What the index in `db` holds: the journal position it applied and its
/// refs. Reads only (fsck inspects an index with it before repairing).
pub fn read_index(db: &sled::Db) -> Result<(Option<Position>, Refs), MetaError> {
    let counters = db.open_tree("counters")?;
    let applied = counters
        .get(JOURNAL_AT)?
        .and_then(|v| Position::from_bytes(&v));
    let mut refs = Refs {
        last_event: counters
            .get(REF_LOG_LAST)?
            .and_then(|v| u64_of(&v))
            .unwrap_or(0),
        ..Refs::default()
    };
    for kv in db.open_tree("heads")?.iter() {
        let (k, v) = kv?;
        let h = parse_head(&k, &v)?;
        refs.heads.insert((h.service, h.branch), h.head);
    }
    let (ids, authors) = (db.open_tree("image_ids")?, db.open_tree("image_authors")?);
    for kv in db.open_tree("image_order")?.iter() {
        let (_, name) = kv?;
        let bad = || MetaError::Key { what: "image" };
        let Some(id) = ids.get(&name)? else {
            continue;
        };
        let id = ImageId::from_bytes(id_bytes(&id).ok_or_else(bad)?);
        let created = authors
            .get(&name)?
            .map(|v| decode_record::<ImageAuthorship>(&v))
            .transpose()
            .map_err(record_error("image authorship"))?;
        let name = std::str::from_utf8(&name)
            .ok()
            .and_then(|n| ImageName::new(n).ok())
            .ok_or_else(bad)?;
        refs.images.push((name, id, created));
    }
    Ok((applied, refs))
}

/// Forgets which journal position `db` applied, so the next open rebuilds it
/// from the journal (a repair).
pub fn forget_applied(db: &sled::Db) -> Result<(), MetaError> {
    db.open_tree("counters")?.remove(JOURNAL_AT)?;
    db.flush()?;
    Ok(())
}

fn encode(record: &RefRecord) -> Result<Vec<u8>, MetaError> {
    encode_record(record).map_err(record_error("refs journal"))
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

/// Appends event `seq` to the ref log inside the transaction: the counter, the
/// event under it, and the removal of the event that falls out of the window of
/// `retain`.
fn append_event(
    counters: &sled::transaction::TransactionalTree,
    log: &sled::transaction::TransactionalTree,
    retain: u64,
    seq: u64,
    body: &[u8],
) -> sled::transaction::ConflictableTransactionResult<(), std::convert::Infallible> {
    counters.insert(REF_LOG_LAST, &seq.to_be_bytes())?;
    log.insert(&seq.to_be_bytes(), body)?;
    if seq > retain {
        log.remove(&(seq - retain).to_be_bytes())?;
    }
    Ok(())
}

impl MetaStore for SledMeta {
    fn put_tree(&self, tree: &Tree) -> Result<TreeId, MetaError> {
        let id = tree.id();
        self.objects
            .put(Kind::Tree, id.as_bytes(), &tree.encode())?;
        Ok(id)
    }

    fn tree(&self, id: &TreeId) -> Result<Option<Tree>, MetaError> {
        self.objects
            .get(Kind::Tree, id.as_bytes())?
            .map(|v| Tree::decode(&v).map_err(corrupt("tree")))
            .transpose()
    }

    fn put_commit(&self, commit: &Commit) -> Result<(CommitId, bool), MetaError> {
        let id = commit.id();
        self.objects
            .put(Kind::Commit, id.as_bytes(), &commit.encode())?;
        // The index entry follows the object: a crash between them leaves a
        // commit that a rebuild indexes, never an entry without its commit.
        let created = self
            .by_service
            .insert(service_key(commit.service(), Some(&id)), &[])?
            .is_none();
        if created {
            self.flush()?;
        }
        Ok((id, created))
    }

    fn commit(&self, id: &CommitId) -> Result<Option<Commit>, MetaError> {
        self.objects
            .get(Kind::Commit, id.as_bytes())?
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
            out.push(parse_head(&k, &v)?);
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
        let key = head_key(service, branch);
        // The journal's lock serializes every ref change: the head read here
        // cannot move before this change is applied.
        let mut writer = self.lock();
        let current = self.head(service, branch)?;
        if current != expected {
            return Ok(HeadUpdate::Conflict { current });
        }
        let event = RefEvent {
            seq: self.next_event()?,
            at,
            change: RefChange::BranchMoved {
                service: service.clone(),
                branch: branch.clone(),
                old: expected,
                new,
                by: by.clone(),
            },
        };
        let body = encode_record(&(at, &event.change)).map_err(record_error("ref log"))?;
        let record = RefRecord::Event(event.clone());
        self.journal_and_apply(&mut writer, &record, |t| {
            t[HEADS].insert(key.as_slice(), new.as_bytes().as_slice())?;
            append_event(t[COUNTERS], t[REF_LOG], self.retain, event.seq, &body)
        })?;
        Ok(HeadUpdate::Moved { event })
    }

    fn create_image(
        &self,
        image: &Image,
        created: &ImageAuthorship,
    ) -> Result<(ImageId, Option<RefEvent>), MetaError> {
        let key = image.name().as_str().as_bytes();
        let id = image.id();
        let mut writer = self.lock();
        if let Some(v) = self.image_ids.get(key)? {
            let stored = id_bytes(&v).ok_or(MetaError::Key { what: "image" })?;
            return Ok((ImageId::from_bytes(stored), None));
        }
        self.objects
            .put(Kind::Image, id.as_bytes(), &image.encode())?;
        let authorship = encode_record(created).map_err(record_error("image authorship"))?;
        let event = RefEvent {
            seq: self.next_event()?,
            at: created.at,
            change: RefChange::ImageCreated {
                name: image.name().clone(),
                id,
                author: created.author.clone(),
                by: created.by.clone(),
            },
        };
        let body = encode_record(&(created.at, &event.change)).map_err(record_error("ref log"))?;
        let order = writer.journal.position().seq + 1;
        let record = RefRecord::Event(event.clone());
        // The image's name, authorship, place in the listing and event land
        // together or not at all.
        self.journal_and_apply(&mut writer, &record, |t| {
            t[IMAGE_IDS].insert(key, id.as_bytes().as_slice())?;
            t[IMAGE_ORDER].insert(&order.to_be_bytes(), key)?;
            t[IMAGE_AUTHORS].insert(key, authorship.as_slice())?;
            append_event(t[COUNTERS], t[REF_LOG], self.retain, event.seq, &body)
        })?;
        Ok((id, Some(event)))
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
        let Some(v) = self.image_ids.get(key)? else {
            return Ok(None);
        };
        let id = id_bytes(&v).ok_or(MetaError::Key { what: "image" })?;
        let Some(bytes) = self.objects.get(Kind::Image, &id)? else {
            return Ok(None);
        };
        let image = Image::decode(&bytes).map_err(corrupt("image"))?;
        Ok(Some(ImageRecord {
            id: image.id(),
            image,
            created: self.authorship(key)?,
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
