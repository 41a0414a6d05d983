//! Trees: every file of one service at one version, as a flat sorted list.
//!
//! A [`Tree`] is a list of [`TreeEntry`]s sorted by path bytes. Construction is the
//! only check, and it refuses:
//! - two entries with the same path;
//! - a file/directory clash (`a` and `a/b`: `a` cannot be both);
//! - a symlink whose target leaves the root, or walks through another symlink of
//!   the tree (see [`LinkTarget::resolve_within`]).
//!
//! Directories are implied by paths; an empty directory is not represented.
//!
//! A symlink's target is stored in the tree itself, so a tree can be checked without
//! its blobs. Its `blob` is the blake3 of the target's bytes and its `size` their
//! length, so a diff compares links and files the same way; those blobs are never
//! stored or fetched.
//!
//! # Canonical encoding (version 1)
//!
//! ```text
//! "molt-tree" 0x01
//! u32 entry count
//! per entry, in path order:
//!   str  path
//!   u8   mode: 0 regular, 1 executable, 2 symlink
//!   u64  size in bytes
//!   id   blob
//!   str  link target (symlinks only)
//! ```
//!
//! The [`TreeId`] is the blake3 of those bytes. Primitives are described in
//! [`crate::encoding`].

use std::collections::{BTreeSet, HashSet};

use serde::{Deserialize, Serialize};

use crate::encoding::{DecodeError, Reader, Writer, ensure_canonical};
use crate::id::{BlobId, TreeId};
use crate::path::{LinkTarget, PathError, RelPath, ShownPath};

const MAGIC: &[u8] = b"molt-tree";
const KIND: &str = "tree";

/// What kind of file an entry is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// A regular file, checked out with mode 0644.
    Regular,
    /// A regular file with the executable bit, checked out with mode 0755.
    Executable,
    /// A symbolic link whose target is stored in the entry.
    Symlink,
}

impl Mode {
    fn code(self) -> u8 {
        match self {
            Mode::Regular => 0,
            Mode::Executable => 1,
            Mode::Symlink => 2,
        }
    }

    fn from_code(code: u8) -> Option<Self> {
        match code {
            0 => Some(Mode::Regular),
            1 => Some(Mode::Executable),
            2 => Some(Mode::Symlink),
            _ => None,
        }
    }

    /// Is this a regular or executable file (not a symlink)?
    pub fn is_file(self) -> bool {
        !matches!(self, Mode::Symlink)
    }
}

/// Why a list of entries is not a valid tree, or an entry is not a valid entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TreeError {
    /// Two entries share a path.
    #[error("duplicate path {} in tree", ShownPath::new(.0.as_str()))]
    Duplicate(RelPath),
    /// A path is used both as a file and as a directory.
    #[error(
        "{} is a file, so {} cannot be inside it",
        ShownPath::new(.file.as_str()),
        ShownPath::new(.inside.as_str())
    )]
    FileDirClash {
        /// The entry used as a directory.
        file: RelPath,
        /// The entry below it.
        inside: RelPath,
    },
    /// A symlink is not allowed (escapes the root, or walks through another link).
    #[error(transparent)]
    Link(#[from] PathError),
    /// More entries than a tree may hold.
    #[error("tree has {count} entries; the limit is {max}")]
    TooManyEntries {
        /// How many were given.
        count: usize,
        /// [`Tree::MAX_ENTRIES`].
        max: usize,
    },
    /// A symlink entry's blob or size does not match its target, or a file entry has
    /// a target (only reachable through deserialization of hostile input).
    #[error(
        "entry {}: mode, size, blob and link target disagree",
        ShownPath::new(.0.as_str())
    )]
    InconsistentEntry(RelPath),
}

/// One file of a tree: `(path, mode, size, blob)`, plus the target of a symlink.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "EntryFields", into = "EntryFields")]
pub struct TreeEntry(EntryFields);

/// The fields of an entry; also its serde shape, checked on the way in.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct EntryFields {
    path: RelPath,
    mode: Mode,
    size: u64,
    blob: BlobId,
    /// Always serialized (as null for files): binary formats such as bincode are not
    /// self-describing and cannot skip a field.
    target: Option<LinkTarget>,
}

impl TryFrom<EntryFields> for TreeEntry {
    type Error = TreeError;
    fn try_from(f: EntryFields) -> Result<Self, TreeError> {
        TreeEntry::from_parts(f.path, f.mode, f.size, f.blob, f.target)
    }
}

impl From<TreeEntry> for EntryFields {
    fn from(e: TreeEntry) -> Self {
        e.0
    }
}

impl TreeEntry {
    /// A regular (`executable == false`) or executable file.
    pub fn file(path: RelPath, executable: bool, size: u64, blob: BlobId) -> Self {
        let mode = if executable {
            Mode::Executable
        } else {
            Mode::Regular
        };
        Self(EntryFields {
            path,
            mode,
            size,
            blob,
            target: None,
        })
    }

    /// A symlink to `target`. Whether the target stays inside the root is checked
    /// when the entry is put into a [`Tree`].
    pub fn symlink(path: RelPath, target: LinkTarget) -> Self {
        Self(EntryFields {
            path,
            mode: Mode::Symlink,
            size: target.as_str().len() as u64,
            blob: BlobId::of(target.as_str().as_bytes()),
            target: Some(target),
        })
    }

    fn from_parts(
        path: RelPath,
        mode: Mode,
        size: u64,
        blob: BlobId,
        target: Option<LinkTarget>,
    ) -> Result<Self, TreeError> {
        let entry = match (mode, target) {
            (Mode::Symlink, Some(target)) => Self::symlink(path, target),
            (Mode::Regular | Mode::Executable, None) => {
                Self::file(path, mode == Mode::Executable, size, blob)
            }
            (_, _) => return Err(TreeError::InconsistentEntry(path)),
        };
        if entry.0.size != size || entry.0.blob != blob {
            return Err(TreeError::InconsistentEntry(entry.0.path));
        }
        Ok(entry)
    }

    /// Where the file lives in the tree.
    pub fn path(&self) -> &RelPath {
        &self.0.path
    }

    /// Regular, executable or symlink.
    pub fn mode(&self) -> Mode {
        self.0.mode
    }

    /// Size of the file in bytes (of the target's bytes for a symlink).
    pub fn size(&self) -> u64 {
        self.0.size
    }

    /// The blob holding the file's bytes.
    pub fn blob(&self) -> BlobId {
        self.0.blob
    }

    /// The target, for a symlink.
    pub fn link_target(&self) -> Option<&LinkTarget> {
        self.0.target.as_ref()
    }

    /// The same file with another executable bit. A symlink is returned unchanged.
    pub fn with_executable(&self, executable: bool) -> Self {
        if self.0.mode.is_file() {
            Self::file(self.0.path.clone(), executable, self.0.size, self.0.blob)
        } else {
            self.clone()
        }
    }

    fn encode(&self, w: &mut Writer) {
        w.str(self.0.path.as_str());
        w.u8(self.0.mode.code());
        w.u64(self.0.size);
        w.id(self.0.blob.as_bytes());
        if let Some(t) = &self.0.target {
            w.str(t.as_str());
        }
    }

    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let path = r.str("path length", RelPath::MAX_LEN)?;
        let path = RelPath::new(path).map_err(|e| r.invalid(e))?;
        let code = r.u8()?;
        let mode = Mode::from_code(code).ok_or_else(|| r.invalid(format!("mode {code}")))?;
        let size = r.u64()?;
        let blob = BlobId::from_bytes(r.id()?);
        let target = if mode == Mode::Symlink {
            let t = r.str("link target length", RelPath::MAX_LEN)?;
            Some(LinkTarget::new(t).map_err(|e| r.invalid(e))?)
        } else {
            None
        };
        Self::from_parts(path, mode, size, blob, target).map_err(|e| r.invalid(e))
    }
}

/// Every file of one service at one version (see the module docs).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "Vec<TreeEntry>", into = "Vec<TreeEntry>")]
pub struct Tree {
    entries: Vec<TreeEntry>,
}

impl Tree {
    /// Most entries a tree may hold.
    pub const MAX_ENTRIES: usize = 1 << 20;

    /// The tree with no files: what a first install diffs from.
    pub fn empty() -> Self {
        Self {
            entries: Vec::new(),
        }
    }

    /// Sorts `entries` by path and checks them (see the module docs).
    pub fn new(mut entries: Vec<TreeEntry>) -> Result<Self, TreeError> {
        if entries.len() > Self::MAX_ENTRIES {
            return Err(TreeError::TooManyEntries {
                count: entries.len(),
                max: Self::MAX_ENTRIES,
            });
        }
        entries.sort_by(|a, b| a.path().cmp(b.path()));
        if let Some(w) = entries.windows(2).find(|w| w[0].path() == w[1].path()) {
            return Err(TreeError::Duplicate(w[0].path().clone()));
        }
        let paths: HashSet<&str> = entries.iter().map(|e| e.path().as_str()).collect();
        for e in &entries {
            if let Some(dir) = e.path().ancestors().find(|a| paths.contains(a)) {
                return Err(TreeError::FileDirClash {
                    file: RelPath::new(dir).expect("an ancestor of a RelPath is a RelPath"),
                    inside: e.path().clone(),
                });
            }
        }
        let links: HashSet<&str> = entries
            .iter()
            .filter(|e| e.mode() == Mode::Symlink)
            .map(|e| e.path().as_str())
            .collect();
        for e in &entries {
            if let Some(t) = e.link_target() {
                t.resolve_within(e.path(), |p| links.contains(p))?;
            }
        }
        Ok(Self { entries })
    }

    /// The entries, sorted by path.
    pub fn entries(&self) -> &[TreeEntry] {
        &self.entries
    }

    /// The entry at `path`, if any.
    pub fn get(&self, path: &RelPath) -> Option<&TreeEntry> {
        self.entries
            .binary_search_by(|e| e.path().cmp(path))
            .ok()
            .map(|i| &self.entries[i])
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Does the tree hold no files?
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Sum of the sizes of all files (symlinks excluded).
    pub fn total_size(&self) -> u64 {
        self.entries
            .iter()
            .filter(|e| e.mode().is_file())
            .map(|e| e.size())
            .sum()
    }

    /// The distinct blobs the files of this tree need (symlinks carry their own bytes).
    pub fn file_blobs(&self) -> BTreeSet<BlobId> {
        self.entries
            .iter()
            .filter(|e| e.mode().is_file())
            .map(|e| e.blob())
            .collect()
    }

    /// The canonical encoding (see the module docs).
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new(MAGIC);
        w.len(self.entries.len());
        for e in &self.entries {
            e.encode(&mut w);
        }
        w.finish()
    }

    /// Parses a canonical encoding, checking everything [`Tree::new`] checks.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(KIND, MAGIC, bytes)?;
        let count = r.len("entry count", Self::MAX_ENTRIES)?;
        // Each entry takes at least 46 bytes; do not trust `count` for the allocation.
        let mut entries = Vec::with_capacity(count.min(bytes.len() / 46));
        for _ in 0..count {
            entries.push(TreeEntry::decode(&mut r)?);
        }
        r.finish()?;
        let tree = Tree::new(entries).map_err(|e| DecodeError::Invalid {
            kind: KIND,
            reason: e.to_string(),
        })?;
        ensure_canonical(KIND, bytes, &tree.encode())?;
        Ok(tree)
    }

    /// blake3 of the canonical encoding.
    pub fn id(&self) -> TreeId {
        blake3::hash(&self.encode()).into()
    }
}

impl TryFrom<Vec<TreeEntry>> for Tree {
    type Error = TreeError;
    fn try_from(entries: Vec<TreeEntry>) -> Result<Self, TreeError> {
        Tree::new(entries)
    }
}

impl From<Tree> for Vec<TreeEntry> {
    fn from(t: Tree) -> Self {
        t.entries
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> RelPath {
        RelPath::new(s).unwrap()
    }

    fn f(path: &str, content: &str) -> TreeEntry {
        TreeEntry::file(
            p(path),
            false,
            content.len() as u64,
            BlobId::of(content.as_bytes()),
        )
    }

    fn l(path: &str, target: &str) -> TreeEntry {
        TreeEntry::symlink(p(path), LinkTarget::new(target).unwrap())
    }

    #[test]
    fn sorts_and_looks_up() {
        let t = Tree::new(vec![f("b", "2"), f("a/x", "1"), f("a-b", "3")]).unwrap();
        let order: Vec<_> = t.entries().iter().map(|e| e.path().as_str()).collect();
        assert_eq!(order, ["a-b", "a/x", "b"]);
        assert_eq!(t.get(&p("a/x")).unwrap().size(), 1);
        assert!(t.get(&p("a")).is_none());
        assert_eq!(t.total_size(), 3);
    }

    #[test]
    fn rejects_duplicates_and_clashes() {
        assert_eq!(
            Tree::new(vec![f("a", "1"), f("a", "2")]).unwrap_err(),
            TreeError::Duplicate(p("a"))
        );
        assert_eq!(
            Tree::new(vec![f("a", "1"), f("a-b", "1"), f("a/b/c", "2")]).unwrap_err(),
            TreeError::FileDirClash {
                file: p("a"),
                inside: p("a/b/c")
            }
        );
        // A symlink is a file too.
        assert!(matches!(
            Tree::new(vec![l("a", "b"), f("a/c", "1")]),
            Err(TreeError::FileDirClash { .. })
        ));
    }

    #[test]
    fn symlinks_must_stay_inside() {
        assert!(Tree::new(vec![l("d/up", "../x"), f("x", "1")]).is_ok());
        assert!(matches!(
            Tree::new(vec![l("d/up", "../../x")]),
            Err(TreeError::Link(PathError::LinkEscapes { .. }))
        ));
        // Each link alone is inside; together `y` would reach the parent of the root.
        assert!(matches!(
            Tree::new(vec![l("x/l1", ".."), l("y", "x/l1/..")]),
            Err(TreeError::Link(PathError::LinkThroughLink { .. }))
        ));
        // A dangling link inside the root is allowed (it may point at a build output).
        assert!(Tree::new(vec![l("bin", "target/release/app")]).is_ok());
    }

    #[test]
    fn symlink_entries_carry_their_target() {
        let e = l("link", "a/b");
        assert_eq!(e.blob(), BlobId::of(b"a/b"));
        assert_eq!(e.size(), 3);
        assert_eq!(e.with_executable(true), e);
        let t = Tree::new(vec![e.clone()]).unwrap();
        assert!(t.file_blobs().is_empty());
    }

    #[test]
    fn decode_round_trips_and_refuses_non_canonical() {
        let t = Tree::new(vec![f("a", "1"), l("b", "a"), f("c/d", "")]).unwrap();
        let bytes = t.encode();
        assert_eq!(Tree::decode(&bytes).unwrap(), t);

        // Swap the order of two entries by hand: valid value, non-canonical bytes.
        let mut w = Writer::new(MAGIC);
        w.len(2);
        f("b", "1").encode(&mut w);
        f("a", "1").encode(&mut w);
        assert_eq!(
            Tree::decode(&w.finish()).unwrap_err(),
            DecodeError::NonCanonical { kind: "tree" }
        );
    }

    #[test]
    fn decode_rejects_hostile_entries() {
        let mut w = Writer::new(MAGIC);
        w.len(1);
        w.str("../etc/passwd");
        w.u8(0);
        w.u64(0);
        w.id(&[0; 32]);
        assert!(matches!(
            Tree::decode(&w.finish()),
            Err(DecodeError::Invalid { .. })
        ));
        // A symlink whose blob does not match its target.
        let mut w = Writer::new(MAGIC);
        w.len(1);
        w.str("l");
        w.u8(2);
        w.u64(1);
        w.id(&[0; 32]);
        w.str("a");
        assert!(matches!(
            Tree::decode(&w.finish()),
            Err(DecodeError::Invalid { .. })
        ));
        // A huge count with no bytes behind it fails without allocating for it.
        let mut w = Writer::new(MAGIC);
        w.u32(u32::MAX);
        assert!(matches!(
            Tree::decode(&w.finish()),
            Err(DecodeError::TooLarge { .. })
        ));
        let mut w = Writer::new(MAGIC);
        w.len(Tree::MAX_ENTRIES);
        assert!(matches!(
            Tree::decode(&w.finish()),
            Err(DecodeError::Truncated { .. })
        ));
    }

    #[test]
    fn serde_round_trips_and_checks() {
        let t = Tree::new(vec![f("a", "1"), l("b", "a")]).unwrap();
        let json = serde_json::to_string(&t).unwrap();
        assert_eq!(serde_json::from_str::<Tree>(&json).unwrap(), t);

        // Deserializing goes through Tree::new: a clash is refused.
        let clash = json.replace("\"b\"", "\"a/b\"");
        let err = serde_json::from_str::<Tree>(&clash).unwrap_err();
        assert!(err.to_string().contains("cannot be inside"), "{err}");
        // And through the entry check: a link whose blob disagrees with its target.
        let lying = json.replace("\"target\":\"a\"", "\"target\":\"c\"");
        assert!(serde_json::from_str::<Tree>(&lying).is_err());
    }
}
