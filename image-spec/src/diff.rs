//! Tree diffs: what changes between two versions of a service, and applying them.
//!
//! [`TreeDiff::between`] walks both sorted entry lists once (a merge) and yields the
//! changes in path order. [`TreeDiff::apply`] replays them onto the old tree in one
//! merge pass and rebuilds the tree through [`Tree::new`], so every invariant of a
//! tree (no escaping path, no clash, no escaping link) is checked again on the
//! receiving side. The law, held by a property test:
//!
//! ```
//! # use image_spec::{Tree, TreeDiff};
//! # let (old, new) = (Tree::empty(), Tree::empty());
//! assert_eq!(TreeDiff::between(&old, &new).apply(&old).unwrap(), new);
//! ```
//!
//! A diff names the ids of the tree it starts from and the tree it produces, and
//! `apply` checks both: a diff cannot be applied to the wrong base, and it cannot
//! produce anything but its declared result. The declared result travels with the
//! diff, so a receiver that asked for a given commit uses
//! [`TreeDiff::apply_expecting`] with that commit's tree id: then a diff altered in
//! transit is refused. A first install is the same code path, from [`Tree::empty`].
//!
//! Changes are ordered by path, which is not the order a filesystem can replay them
//! in when a directory becomes a file (`a/b` removed, `a` added: `a` sorts first).
//! [`TreeDiff::disk_order`] gives an order that can be replayed on disk.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::id::{BlobId, TreeId};
use crate::path::{RelPath, ShownPath};
use crate::tree::{Mode, Tree, TreeEntry, TreeError};

/// One change to one path.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Change {
    /// A path that did not exist now does.
    Added(TreeEntry),
    /// A path's content changed (or it turned from a file into a symlink or back):
    /// the new entry.
    Modified(TreeEntry),
    /// Only the executable bit of a file changed; the bytes are the same.
    ModeChanged {
        /// The file.
        path: RelPath,
        /// Its new mode (regular or executable).
        mode: Mode,
    },
    /// A path that existed no longer does.
    Removed(RelPath),
}

impl Change {
    /// The path this change is about.
    pub fn path(&self) -> &RelPath {
        match self {
            Change::Added(e) | Change::Modified(e) => e.path(),
            Change::ModeChanged { path, .. } | Change::Removed(path) => path,
        }
    }
}

/// Why a diff cannot be applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DiffError {
    /// The diff starts from another tree.
    #[error("diff starts from tree {expected}, but the installed tree is {found}")]
    BaseMismatch {
        /// The diff's `from`.
        expected: TreeId,
        /// The tree it was applied to.
        found: TreeId,
    },
    /// Changes are not in strictly increasing path order.
    #[error("diff changes are out of order at {}", ShownPath::new(.0.as_str()))]
    OutOfOrder(RelPath),
    /// An added path already exists.
    #[error("diff adds {}, which already exists", ShownPath::new(.0.as_str()))]
    AlreadyExists(RelPath),
    /// A modified, re-moded or removed path does not exist.
    #[error("diff changes {}, which does not exist", ShownPath::new(.0.as_str()))]
    Missing(RelPath),
    /// A mode change that is not between regular and executable.
    #[error(
        "diff changes the mode of {} to or from a symlink without new content",
        ShownPath::new(.0.as_str())
    )]
    BadModeChange(RelPath),
    /// The result is not a valid tree.
    #[error("applying the diff gives an invalid tree: {0}")]
    InvalidResult(#[from] TreeError),
    /// The result is valid but is not the tree the diff promised.
    #[error("applying the diff gives tree {found}, not the promised {expected}")]
    ResultMismatch {
        /// The diff's `to`.
        expected: TreeId,
        /// What applying it produced.
        found: TreeId,
    },
}

/// The ordered changes from one tree to another (see the module docs).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TreeDiff {
    from: TreeId,
    to: TreeId,
    changes: Vec<Change>,
}

impl TreeDiff {
    /// The changes that turn `old` into `new`, in path order, in one merge pass.
    pub fn between(old: &Tree, new: &Tree) -> Self {
        let mut changes = Vec::new();
        let (mut a, mut b) = (
            old.entries().iter().peekable(),
            new.entries().iter().peekable(),
        );
        loop {
            match (a.peek(), b.peek()) {
                (None, None) => break,
                (Some(o), None) => {
                    changes.push(Change::Removed(o.path().clone()));
                    a.next();
                }
                (None, Some(n)) => {
                    changes.push(Change::Added((*n).clone()));
                    b.next();
                }
                (Some(o), Some(n)) => match o.path().cmp(n.path()) {
                    std::cmp::Ordering::Less => {
                        changes.push(Change::Removed(o.path().clone()));
                        a.next();
                    }
                    std::cmp::Ordering::Greater => {
                        changes.push(Change::Added((*n).clone()));
                        b.next();
                    }
                    std::cmp::Ordering::Equal => {
                        if let Some(c) = compare(o, n) {
                            changes.push(c);
                        }
                        a.next();
                        b.next();
                    }
                },
            }
        }
        Self {
            from: old.id(),
            to: new.id(),
            changes,
        }
    }

    /// The tree this diff starts from ([`Tree::empty`]'s id for a first install).
    pub fn from(&self) -> TreeId {
        self.from
    }

    /// The tree this diff produces.
    pub fn to(&self) -> TreeId {
        self.to
    }

    /// The changes, in path order.
    pub fn changes(&self) -> &[Change] {
        &self.changes
    }

    /// Does the diff change nothing?
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }

    /// The distinct blobs whose bytes a receiver needs to apply this diff to disk:
    /// those of added and modified files. Symlinks carry their own target.
    pub fn needed_blobs(&self) -> BTreeSet<BlobId> {
        self.changes
            .iter()
            .filter_map(|c| match c {
                Change::Added(e) | Change::Modified(e) if e.mode().is_file() => Some(e.blob()),
                _ => None,
            })
            .collect()
    }

    /// The changes in an order a filesystem can replay: every removal first,
    /// deepest path first (a directory's files before what replaces the directory),
    /// then every other change in path order (a directory before its files).
    pub fn disk_order(&self) -> impl Iterator<Item = &Change> {
        let removals = self
            .changes
            .iter()
            .rev()
            .filter(|c| matches!(c, Change::Removed(_)));
        let others = self
            .changes
            .iter()
            .filter(|c| !matches!(c, Change::Removed(_)));
        removals.chain(others)
    }

    /// Like [`apply`](Self::apply), and first checks that the diff promises the
    /// tree the caller asked for (e.g. the tree of the commit it is installing).
    pub fn apply_expecting(&self, old: &Tree, expected: TreeId) -> Result<Tree, DiffError> {
        if self.to != expected {
            return Err(DiffError::ResultMismatch {
                expected,
                found: self.to,
            });
        }
        self.apply(old)
    }

    /// Replays the diff onto `old` (see the module docs for what is checked).
    pub fn apply(&self, old: &Tree) -> Result<Tree, DiffError> {
        let found = old.id();
        if found != self.from {
            return Err(DiffError::BaseMismatch {
                expected: self.from,
                found,
            });
        }
        let mut out: Vec<TreeEntry> = Vec::with_capacity(old.len() + self.changes.len());
        let mut olds = old.entries().iter().peekable();
        let mut previous: Option<&RelPath> = None;
        for change in &self.changes {
            let path = change.path();
            if previous.is_some_and(|p| p >= path) {
                return Err(DiffError::OutOfOrder(path.clone()));
            }
            previous = Some(path);
            while let Some(e) = olds.next_if(|e| e.path() < path) {
                out.push(e.clone());
            }
            let existing = olds.next_if(|e| e.path() == path);
            match (change, existing) {
                (Change::Added(_), Some(_)) => return Err(DiffError::AlreadyExists(path.clone())),
                (Change::Added(new), None) => out.push(new.clone()),
                (Change::Modified(new), Some(_)) => out.push(new.clone()),
                (Change::ModeChanged { mode, .. }, Some(old_entry)) => {
                    if !mode.is_file() || !old_entry.mode().is_file() {
                        return Err(DiffError::BadModeChange(path.clone()));
                    }
                    out.push(old_entry.with_executable(*mode == Mode::Executable));
                }
                (Change::Removed(_), Some(_)) => {}
                (_, None) => return Err(DiffError::Missing(path.clone())),
            }
        }
        out.extend(olds.cloned());
        let tree = Tree::new(out)?;
        let produced = tree.id();
        if produced != self.to {
            return Err(DiffError::ResultMismatch {
                expected: self.to,
                found: produced,
            });
        }
        Ok(tree)
    }
}

/// The change between two entries at the same path, if any.
fn compare(old: &TreeEntry, new: &TreeEntry) -> Option<Change> {
    if old == new {
        None
    } else if old.mode().is_file()
        && new.mode().is_file()
        && old.blob() == new.blob()
        && old.size() == new.size()
    {
        Some(Change::ModeChanged {
            path: new.path().clone(),
            mode: new.mode(),
        })
    } else {
        Some(Change::Modified(new.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::path::LinkTarget;

    fn p(s: &str) -> RelPath {
        RelPath::new(s).unwrap()
    }

    fn f(path: &str, content: &str, exec: bool) -> TreeEntry {
        TreeEntry::file(
            p(path),
            exec,
            content.len() as u64,
            BlobId::of(content.as_bytes()),
        )
    }

    fn tree(entries: Vec<TreeEntry>) -> Tree {
        Tree::new(entries).unwrap()
    }

    #[test]
    fn every_kind_of_change_in_path_order() {
        let old = tree(vec![
            f("a", "1", false),
            f("b", "2", false),
            f("c", "3", false),
            f("e", "5", false),
        ]);
        let link = TreeEntry::symlink(p("e"), LinkTarget::new("a").unwrap());
        let new = tree(vec![
            f("a", "1", false),
            f("b", "2", true),
            f("c", "33", false),
            f("d", "4", false),
            link.clone(),
        ]);
        let diff = TreeDiff::between(&old, &new);
        assert_eq!(
            diff.changes(),
            [
                Change::ModeChanged {
                    path: p("b"),
                    mode: Mode::Executable
                },
                Change::Modified(f("c", "33", false)),
                Change::Added(f("d", "4", false)),
                Change::Modified(link),
            ]
        );
        assert_eq!(
            diff.needed_blobs(),
            [BlobId::of(b"33"), BlobId::of(b"4")].into_iter().collect()
        );
        assert_eq!(diff.apply(&old).unwrap(), new);
        let back = TreeDiff::between(&new, &old);
        assert_eq!(back.apply(&new).unwrap(), old);
    }

    #[test]
    fn first_install_is_the_same_path() {
        let new = tree(vec![f("a", "1", false), f("b/c", "2", true)]);
        let diff = TreeDiff::between(&Tree::empty(), &new);
        assert_eq!(diff.from(), Tree::empty().id());
        assert!(diff.changes().iter().all(|c| matches!(c, Change::Added(_))));
        assert_eq!(diff.apply(&Tree::empty()).unwrap(), new);
        assert!(TreeDiff::between(&new, &new).is_empty());
    }

    #[test]
    fn apply_refuses_wrong_base_and_tampering() {
        let old = tree(vec![f("a", "1", false)]);
        let new = tree(vec![f("a", "2", false)]);
        let diff = TreeDiff::between(&old, &new);
        assert!(matches!(
            diff.apply(&new),
            Err(DiffError::BaseMismatch { .. })
        ));

        let mut forged = diff.clone();
        forged.changes = vec![Change::Modified(f("a", "evil", false))];
        assert!(matches!(
            forged.apply(&old),
            Err(DiffError::ResultMismatch { .. })
        ));

        let mut forged = diff.clone();
        forged.changes = vec![Change::Added(f("a", "2", false))];
        assert_eq!(forged.apply(&old), Err(DiffError::AlreadyExists(p("a"))));

        let mut forged = diff.clone();
        forged.changes = vec![Change::Removed(p("zz"))];
        assert_eq!(forged.apply(&old), Err(DiffError::Missing(p("zz"))));

        let mut forged = diff.clone();
        forged.changes = vec![Change::Removed(p("a")), Change::Removed(p("a"))];
        assert_eq!(forged.apply(&old), Err(DiffError::OutOfOrder(p("a"))));

        let mut forged = diff;
        forged.changes = vec![Change::Added(f("a/b", "x", false))];
        assert!(matches!(
            forged.apply(&old),
            Err(DiffError::InvalidResult(TreeError::FileDirClash { .. }))
        ));
    }

    /// Sizes are declared, not derived from blobs: a change of mode and size with
    /// the same blob is a modification, or the law would break.
    #[test]
    fn mode_and_size_change_with_the_same_blob_is_a_modification() {
        let blob = BlobId::of(b"x");
        let old = tree(vec![TreeEntry::file(p("a"), false, 5, blob)]);
        let new = tree(vec![TreeEntry::file(p("a"), true, 6, blob)]);
        let diff = TreeDiff::between(&old, &new);
        assert!(matches!(diff.changes(), [Change::Modified(_)]));
        assert_eq!(diff.apply(&old).unwrap(), new);
    }

    #[test]
    fn disk_order_removes_before_it_adds() {
        // A directory becomes a file: path order adds `a` before removing `a/b`.
        let old = tree(vec![
            f("a/b", "1", false),
            f("a/c", "2", false),
            f("z", "3", false),
        ]);
        let new = tree(vec![f("a", "4", false), f("z", "3", true)]);
        let diff = TreeDiff::between(&old, &new);
        assert_eq!(diff.changes()[0].path().as_str(), "a");
        let order: Vec<&str> = diff.disk_order().map(|c| c.path().as_str()).collect();
        assert_eq!(order, ["a/c", "a/b", "a", "z"]);
        assert_eq!(diff.disk_order().count(), diff.changes().len());
    }

    #[test]
    fn apply_expecting_refuses_a_diff_to_another_tree() {
        let old = tree(vec![f("a", "1", false)]);
        let new = tree(vec![f("a", "2", false)]);
        let other = tree(vec![f("a", "3", false)]);
        let diff = TreeDiff::between(&old, &new);
        assert_eq!(diff.apply_expecting(&old, new.id()).unwrap(), new);
        // A forged diff that is internally consistent but leads elsewhere.
        let forged = TreeDiff::between(&old, &other);
        assert!(matches!(
            forged.apply_expecting(&old, new.id()),
            Err(DiffError::ResultMismatch { .. })
        ));
    }

    #[test]
    fn mode_change_cannot_make_a_symlink() {
        let old = tree(vec![f("a", "1", false)]);
        let diff = TreeDiff {
            from: old.id(),
            to: old.id(),
            changes: vec![Change::ModeChanged {
                path: p("a"),
                mode: Mode::Symlink,
            }],
        };
        assert_eq!(diff.apply(&old), Err(DiffError::BadModeChange(p("a"))));
    }
}
