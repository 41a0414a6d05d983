//! Metadata storage: trees, commits, branches and images, behind a narrow trait.
//!
//! [`MetaStore`] is what the protocol needs: put and get trees and commits by id,
//! read and compare-and-swap branch heads, create-once and read images. [`SledMeta`]
//! implements it with one sled database and one sled tree per kind of record, all
//! values in their canonical encodings (so a record read back is re-verified by
//! decoding). Writes that a client is told about are flushed before the answer, so
//! an acknowledged push survives `kill -9`. A commit is written after its tree, and
//! a branch is moved only to a stored commit, so no reader ever sees a commit
//! without its tree or a branch without its commit. A SQL database would implement
//! the same trait with one table per kind and `UPDATE … WHERE head = expected`.

use std::path::Path;

use image_spec::{
    BranchName, Commit, CommitId, DecodeError, IdPrefix, Image, ImageId, ImageName, ServiceName,
    Tree, TreeId,
};

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
}

/// The outcome of a compare-and-swap on a branch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeadUpdate {
    /// The branch now points at the new commit.
    Moved,
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
    /// Moves a branch from `expected` to `new`, atomically.
    fn swap_head(
        &self,
        service: &ServiceName,
        branch: &BranchName,
        expected: Option<CommitId>,
        new: CommitId,
    ) -> Result<HeadUpdate, MetaError>;
    /// Stores an image under its name unless the name is taken; returns the id of
    /// the image stored under that name (ours, or the one that was there).
    fn create_image(&self, image: &Image) -> Result<(ImageId, bool), MetaError>;
    /// An image by name.
    fn image(&self, name: &ImageName) -> Result<Option<Image>, MetaError>;
    /// Every image, in creation order.
    fn images(&self) -> Result<Vec<Image>, MetaError>;
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
}

/// sled's page cache, bounded: metadata is small and blobs never go into sled.
const CACHE_BYTES: u64 = 64 << 20;

impl SledMeta {
    /// Opens (creating if needed) the database in `dir`.
    pub fn open(dir: &Path) -> Result<Self, MetaError> {
        let db = embedded_db::open(dir, CACHE_BYTES)?;
        Ok(Self {
            trees: db.open_tree("trees")?,
            commits: db.open_tree("commits")?,
            by_service: db.open_tree("commits_by_service")?,
            heads: db.open_tree("heads")?,
            images: db.open_tree("images")?,
            image_order: db.open_tree("image_order")?,
            db,
        })
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

    fn swap_head(
        &self,
        service: &ServiceName,
        branch: &BranchName,
        expected: Option<CommitId>,
        new: CommitId,
    ) -> Result<HeadUpdate, MetaError> {
        let key = head_key(service, branch);
        let old = expected.map(|c| c.as_bytes().to_vec());
        match self
            .heads
            .compare_and_swap(&key, old, Some(new.as_bytes().to_vec()))?
        {
            Ok(()) => {
                self.flush()?;
                Ok(HeadUpdate::Moved)
            }
            Err(cas) => Ok(HeadUpdate::Conflict {
                current: cas
                    .current
                    .and_then(|v| id_bytes(&v))
                    .map(CommitId::from_bytes),
            }),
        }
    }

    fn create_image(&self, image: &Image) -> Result<(ImageId, bool), MetaError> {
        use sled::Transactional;
        let key = image.name().as_str().as_bytes();
        let encoded = image.encode();
        let seq = self.db.generate_id()?;
        // The image and its place in the listing land together or not at all.
        let existing = (&self.images, &self.image_order)
            .transaction(|(images, order)| {
                if let Some(v) = images.get(key)? {
                    return Ok(Some(v));
                }
                images.insert(key, encoded.as_slice())?;
                order.insert(&seq.to_be_bytes(), key)?;
                Ok(None)
            })
            .map_err(embedded_db::storage_error)?;
        match existing {
            None => {
                self.flush()?;
                Ok((image.id(), true))
            }
            Some(v) => {
                let stored = Image::decode(&v).map_err(corrupt("image"))?;
                Ok((stored.id(), false))
            }
        }
    }

    fn image(&self, name: &ImageName) -> Result<Option<Image>, MetaError> {
        self.images
            .get(name.as_str().as_bytes())?
            .map(|v| Image::decode(&v).map_err(corrupt("image")))
            .transpose()
    }

    fn images(&self) -> Result<Vec<Image>, MetaError> {
        let mut out = Vec::new();
        for kv in self.image_order.iter() {
            let (_, name) = kv?;
            if let Some(v) = self.images.get(&name)? {
                out.push(Image::decode(&v).map_err(corrupt("image"))?);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image_spec::Timestamp;
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
        assert_eq!(
            meta.swap_head(&svc, &main, None, a).unwrap(),
            HeadUpdate::Moved
        );
        assert_eq!(
            meta.swap_head(&svc, &main, None, b).unwrap(),
            HeadUpdate::Conflict { current: Some(a) }
        );
        assert_eq!(
            meta.swap_head(&svc, &main, Some(a), b).unwrap(),
            HeadUpdate::Moved
        );
        assert_eq!(meta.head(&svc, &main).unwrap(), Some(b));
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
        let first = mk("zeta", "1");
        assert!(meta.create_image(&first).unwrap().1);
        assert!(meta.create_image(&mk("alpha", "2")).unwrap().1);
        let (existing, created) = meta.create_image(&mk("zeta", "other")).unwrap();
        assert!(!created);
        assert_eq!(existing, first.id());
        let names: Vec<_> = meta
            .images()
            .unwrap()
            .iter()
            .map(|i| i.name().to_string())
            .collect();
        assert_eq!(names, ["zeta", "alpha"]);
        drop(meta);
        // Everything survives reopening.
        let meta = SledMeta::open(dir.path()).unwrap();
        assert_eq!(
            meta.image(&ImageName::new("zeta").unwrap()).unwrap(),
            Some(first)
        );
    }
}
