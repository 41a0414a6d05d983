//! molt's vocabulary as types.
//!
//! This crate turns the words of molt's design into values that cannot be invalid:
//!
//! - ids ([`BlobId`], [`TreeId`], [`CommitId`], [`ImageId`]): blake3 hashes, full hex
//!   in `Display`, short in `Debug`; [`IdPrefix`] for abbreviations;
//! - paths that cannot leave their root ([`RelPath`], [`LinkTarget`]) and names
//!   ([`ServiceName`], [`BranchName`], [`ImageName`]);
//! - [`Tree`]s of a service's files, their [`TreeDiff`]s, [`Commit`]s and [`Image`]s,
//!   each with a canonical byte encoding its id is the hash of ([`encoding`]);
//! - [`ServiceManifest`], the parsed `service.toml` ([`manifest`] documents every
//!   field and default);
//! - [`scan_dir`], which turns a directory into a tree.
//!
//! It is pure: no network and no database. Every other molt crate builds on it.
//!
//! ```
//! use image_spec::{Tree, TreeDiff, TreeEntry, RelPath, BlobId};
//!
//! let file = |p: &str, bytes: &[u8]| {
//!     TreeEntry::file(RelPath::new(p).unwrap(), false, bytes.len() as u64, BlobId::of(bytes))
//! };
//! let v1 = Tree::new(vec![file("service.toml", b"v1"), file("src/main.rs", b"a")]).unwrap();
//! let v2 = Tree::new(vec![file("service.toml", b"v1"), file("src/main.rs", b"b")]).unwrap();
//! let diff = TreeDiff::between(&v1, &v2);
//! assert_eq!(diff.changes().len(), 1);
//! assert_eq!(diff.apply(&v1).unwrap().id(), v2.id());
//! assert!(RelPath::new("../etc/passwd").is_err());
//! ```

pub mod commit;
pub mod diff;
pub mod encoding;
pub mod id;
pub mod image;
pub mod manifest;
pub mod name;
pub mod path;
pub mod scan;
pub mod toml_input;
pub mod tree;

pub use commit::{Commit, CommitError, Timestamp};
pub use diff::{Change, DiffError, TreeDiff};
pub use encoding::DecodeError;
pub use id::{BlobId, CommitId, IdParseError, IdPrefix, ImageId, PrefixResolveError, TreeId};
pub use image::{Image, ImageError};
pub use manifest::{MANIFEST_FILE, ManifestError, PortClash, ServiceManifest, distinct_ports};
pub use name::{BranchName, ImageName, InstanceName, NameError, ServiceName, TargetName, UserName};
pub use path::{LinkTarget, PathError, RelPath, SHOWN_CHARS, ShownPath};
pub use scan::{IGNORE_FILE, ScanError, ScannedTree, scan_dir};
pub use toml_input::TomlError;
pub use tree::{Mode, Tree, TreeEntry, TreeError};
