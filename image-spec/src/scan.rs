//! Turning a directory on disk into a [`Tree`].
//!
//! [`scan_dir`] walks a service directory, skips what `.moltignore` files exclude
//! (gitignore syntax, matched by the `ignore` crate; a `.moltignore` in a
//! subdirectory applies below it) and every `.git` directory, and hashes the files
//! on all cores with rayon. Large files are read in chunks and hashed with blake3's
//! own parallelism, so memory stays flat whatever the file size.
//!
//! Symlinks are recorded as symlinks, never followed, and must stay inside the root.
//! Sockets, FIFOs and devices cannot be shipped and are refused, naming the path.
//! Files are opened with `O_NOFOLLOW`, so a file swapped for a symlink between the
//! walk and the read is refused rather than followed. That protects the last
//! component only: a *directory* swapped for a symlink while the scan runs is still
//! followed, so scan a directory that nobody else is rewriting at the same time.
//!
//! Empty directories are not part of a tree and are skipped.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use crate::id::BlobId;
use crate::path::{LinkTarget, PathError, RelPath, ShownPath};
use crate::tree::{Tree, TreeEntry, TreeError};

/// The name of the ignore files [`scan_dir`] honours.
pub const IGNORE_FILE: &str = ".moltignore";

/// Files at least this large are hashed in chunks with blake3's multithreading.
const LARGE_FILE: u64 = 1 << 20;

/// Why a directory cannot be scanned.
#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    /// The root is not a directory.
    #[error("{} is not a directory", ShownPath::of(.0))]
    NotADirectory(PathBuf),
    /// Reading a file or directory failed.
    #[error("cannot read {}: {source}", ShownPath::of(.path))]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// The walk failed (an unreadable directory, a bad `.moltignore` pattern).
    #[error("cannot scan {}: {message}", ShownPath::of(.root))]
    Walk {
        /// The root being scanned.
        root: PathBuf,
        /// The walker's error, naming the path it concerns.
        message: String,
    },
    /// A file name cannot be a path in a tree (not UTF-8, too long, a backslash…).
    #[error("{} cannot be shipped: {error}", ShownPath::of(.path))]
    BadPath {
        /// The file on disk.
        path: PathBuf,
        /// Why its relative path is not valid.
        error: PathError,
    },
    /// A socket, FIFO or device.
    #[error(
        "{} is a {kind}; only files, directories and symlinks can be shipped",
        ShownPath::of(.path)
    )]
    Unsupported {
        /// The file on disk.
        path: PathBuf,
        /// `socket`, `fifo`, `block device` or `character device`.
        kind: &'static str,
    },
    /// A symlink points outside the root or through another symlink.
    #[error("{}: {error}", ShownPath::of(.path))]
    BadLink {
        /// The symlink on disk.
        path: PathBuf,
        /// Why its target is refused.
        error: PathError,
    },
    /// The files do not form a valid tree.
    #[error("{} does not form a valid tree: {error}", ShownPath::of(.root))]
    InvalidTree {
        /// The root being scanned.
        root: PathBuf,
        /// Why.
        error: TreeError,
    },
}

/// A scanned directory: its tree, and where each blob's bytes can be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScannedTree {
    /// The tree of the directory.
    pub tree: Tree,
    /// For each distinct file blob, one file on disk holding its bytes (the first
    /// in path order). Symlink entries carry their bytes themselves and are absent.
    pub sources: BTreeMap<BlobId, PathBuf>,
}

/// A file found by the walk, to be hashed.
struct Found {
    rel: RelPath,
    path: PathBuf,
}

/// Scans `root` into a tree (see the module docs).
pub fn scan_dir(root: &Path) -> Result<ScannedTree, ScanError> {
    let meta = std::fs::metadata(root).map_err(|source| ScanError::Io {
        path: root.to_owned(),
        source,
    })?;
    if !meta.is_dir() {
        return Err(ScanError::NotADirectory(root.to_owned()));
    }

    let (files, links) = walk(root)?;

    let hashed: Vec<Result<TreeEntry, ScanError>> = files
        .into_par_iter()
        .map(|f| {
            let (size, blob, executable) = hash_file(&f.path)?;
            Ok(TreeEntry::file(f.rel, executable, size, blob))
        })
        .collect();

    let mut entries = Vec::with_capacity(hashed.len() + links.len());
    for h in hashed {
        entries.push(h?);
    }
    entries.extend(links);

    let tree = Tree::new(entries).map_err(|error| match error {
        TreeError::Link(error) => ScanError::BadLink {
            path: root.join(error.link().unwrap_or_default()),
            error,
        },
        error => ScanError::InvalidTree {
            root: root.to_owned(),
            error,
        },
    })?;

    let mut sources = BTreeMap::new();
    for e in tree.entries().iter().filter(|e| e.mode().is_file()) {
        sources
            .entry(e.blob())
            .or_insert_with(|| e.path().under(root));
    }
    Ok(ScannedTree { tree, sources })
}

/// Walks `root`, returning the files to hash and the symlinks (already read).
fn walk(root: &Path) -> Result<(Vec<Found>, Vec<TreeEntry>), ScanError> {
    let walker = ignore::WalkBuilder::new(root)
        .standard_filters(false)
        .add_custom_ignore_filename(IGNORE_FILE)
        .follow_links(false)
        .filter_entry(|e| !(e.file_name() == ".git" && e.file_type().is_some_and(|t| t.is_dir())))
        .build();

    let mut files = Vec::new();
    let mut links = Vec::new();
    for entry in walker {
        let walk_err = |e: &ignore::Error| ScanError::Walk {
            root: root.to_owned(),
            message: e.to_string(),
        };
        let entry = entry.map_err(|e| walk_err(&e))?;
        // A directory whose `.moltignore` has a bad pattern still yields the entry,
        // with the error beside it: refuse, rather than ship what was meant to be
        // excluded.
        if let Some(e) = entry.error() {
            return Err(walk_err(e));
        }
        if entry.depth() == 0 {
            continue;
        }
        let path = entry.path();
        let Some(ft) = entry.file_type() else {
            continue;
        };
        if ft.is_dir() {
            continue;
        }
        let rel_os = path
            .strip_prefix(root)
            .expect("the walker yields paths under its root");
        let rel = RelPath::from_path(rel_os).map_err(|error| ScanError::BadPath {
            path: path.to_owned(),
            error,
        })?;
        if ft.is_file() {
            files.push(Found {
                rel,
                path: path.to_owned(),
            });
        } else if ft.is_symlink() {
            links.push(read_link(path, rel)?);
        } else {
            return Err(ScanError::Unsupported {
                path: path.to_owned(),
                kind: special_kind(ft),
            });
        }
    }
    Ok((files, links))
}

fn special_kind(ft: std::fs::FileType) -> &'static str {
    if ft.is_socket() {
        "socket"
    } else if ft.is_fifo() {
        "fifo"
    } else if ft.is_block_device() {
        "block device"
    } else if ft.is_char_device() {
        "character device"
    } else {
        "special file"
    }
}

fn read_link(path: &Path, rel: RelPath) -> Result<TreeEntry, ScanError> {
    let target = std::fs::read_link(path).map_err(|source| ScanError::Io {
        path: path.to_owned(),
        source,
    })?;
    let bad = |error| ScanError::BadLink {
        path: path.to_owned(),
        error,
    };
    let text = target
        .to_str()
        .ok_or_else(|| bad(PathError::NotUtf8(target.to_string_lossy().into_owned())))?;
    let target = LinkTarget::new(text).map_err(|e| match e {
        PathError::Absolute(_) => bad(PathError::LinkEscapes {
            link: rel.to_string(),
            target: text.to_owned(),
        }),
        e => bad(e),
    })?;
    target.resolve_from(&rel).map_err(bad)?;
    Ok(TreeEntry::symlink(rel, target))
}

/// Hashes one file: `(size, blob, executable)`.
fn hash_file(path: &Path) -> Result<(u64, BlobId, bool), ScanError> {
    let io_err = |source| ScanError::Io {
        path: path.to_owned(),
        source,
    };
    let mut file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(io_err)?;
    let meta = file.metadata().map_err(io_err)?;
    if !meta.is_file() {
        return Err(ScanError::Unsupported {
            path: path.to_owned(),
            kind: special_kind(meta.file_type()),
        });
    }
    let executable = meta.permissions().mode() & 0o111 != 0;
    let mut hasher = blake3::Hasher::new();
    let size = if meta.len() >= LARGE_FILE {
        hash_large(&mut file, &mut hasher).map_err(io_err)?
    } else {
        hasher.update_reader(&mut file).map_err(io_err)?;
        hasher.count()
    };
    Ok((size, hasher.finalize().into(), executable))
}

/// Reads `file` in 1 MiB chunks, hashing each with blake3's rayon parallelism.
fn hash_large(file: &mut File, hasher: &mut blake3::Hasher) -> io::Result<u64> {
    let mut buf = vec![0u8; LARGE_FILE as usize];
    loop {
        let mut filled = 0;
        while filled < buf.len() {
            match file.read(&mut buf[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if filled == 0 {
            return Ok(hasher.count());
        }
        hasher.update_rayon(&buf[..filled]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tree::Mode;
    use std::os::unix::fs::symlink;

    fn write(root: &Path, rel: &str, bytes: &[u8]) {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, bytes).unwrap();
    }

    #[test]
    fn scans_files_modes_links_and_ignores() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        write(root, "service.toml", b"name = \"x\"");
        write(root, "src/main.rs", b"fn main() {}");
        write(root, "copy.rs", b"fn main() {}");
        write(root, "empty", b"");
        write(root, "run.sh", b"#!/bin/sh\n");
        std::fs::set_permissions(root.join("run.sh"), std::fs::Permissions::from_mode(0o755))
            .unwrap();
        write(root, "target/debug/app", b"binary");
        write(root, "logs/a.log", b"log");
        write(root, "logs/keep.log", b"keep");
        write(root, ".moltignore", b"/target/\n*.log\n!keep.log\n");
        write(root, "sub/.moltignore", b"secret\n");
        write(root, "sub/secret", b"pw");
        write(root, "sub/public", b"ok");
        write(root, ".git/HEAD", b"ref");
        std::fs::create_dir_all(root.join("empty-dir")).unwrap();
        symlink("src/main.rs", root.join("main-link")).unwrap();

        let scanned = scan_dir(root).unwrap();
        let paths: Vec<_> = scanned
            .tree
            .entries()
            .iter()
            .map(|e| e.path().as_str())
            .collect();
        assert_eq!(
            paths,
            [
                ".moltignore",
                "copy.rs",
                "empty",
                "logs/keep.log",
                "main-link",
                "run.sh",
                "service.toml",
                "src/main.rs",
                "sub/.moltignore",
                "sub/public",
            ]
        );
        let get = |p: &str| scanned.tree.get(&RelPath::new(p).unwrap()).unwrap();
        assert_eq!(get("run.sh").mode(), Mode::Executable);
        assert_eq!(get("src/main.rs").mode(), Mode::Regular);
        assert_eq!(get("main-link").mode(), Mode::Symlink);
        assert_eq!(
            get("main-link").link_target().unwrap().as_str(),
            "src/main.rs"
        );
        assert_eq!(get("empty").size(), 0);
        assert_eq!(get("src/main.rs").blob(), BlobId::of(b"fn main() {}"));
        // Identical files share one blob and one source (the first in path order).
        assert_eq!(
            scanned.sources[&BlobId::of(b"fn main() {}")],
            root.join("copy.rs")
        );
        assert_eq!(scanned.sources.len(), scanned.tree.file_blobs().len());
        assert!(!scanned.sources.contains_key(&get("main-link").blob()));
    }

    #[test]
    fn a_bad_ignore_pattern_is_an_error_not_a_silent_skip() {
        for (dir_of_ignore, file) in [("", ".moltignore"), ("sub", "sub/.moltignore")] {
            let dir = tempfile::tempdir().unwrap();
            write(dir.path(), file, b"secret\n[z-a]\n");
            write(
                dir.path(),
                format!("{dir_of_ignore}/secret").trim_start_matches('/'),
                b"pw",
            );
            let err = scan_dir(dir.path()).unwrap_err();
            assert!(matches!(err, ScanError::Walk { .. }), "{file}: {err:?}");
            assert!(err.to_string().contains("[z-a]"), "{err}");
        }
    }

    #[test]
    fn large_files_hash_like_small_ones() {
        let dir = tempfile::tempdir().unwrap();
        let bytes: Vec<u8> = (0..(3 * LARGE_FILE + 12_345))
            .map(|i| (i % 251) as u8)
            .collect();
        write(dir.path(), "big.bin", &bytes);
        let scanned = scan_dir(dir.path()).unwrap();
        let e = &scanned.tree.entries()[0];
        assert_eq!(e.size(), bytes.len() as u64);
        assert_eq!(e.blob(), BlobId::of(&bytes));
    }

    #[test]
    fn refuses_escaping_and_absolute_links() {
        for target in ["../outside", "/etc/passwd", "a/../../x"] {
            let dir = tempfile::tempdir().unwrap();
            let root = dir.path().join("svc");
            std::fs::create_dir(&root).unwrap();
            symlink(target, root.join("evil")).unwrap();
            let err = scan_dir(&root).unwrap_err();
            assert!(
                matches!(&err, ScanError::BadLink { path, error: PathError::LinkEscapes { .. } } if path.ends_with("evil")),
                "{target}: {err:?}"
            );
            assert!(err.to_string().contains("evil"), "{err}");
        }
    }

    #[test]
    fn refuses_links_through_links() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir(root.join("x")).unwrap();
        symlink("..", root.join("x/l1")).unwrap();
        symlink("x/l1/..", root.join("y")).unwrap();
        let err = scan_dir(root).unwrap_err();
        assert!(
            matches!(&err, ScanError::BadLink { error: PathError::LinkThroughLink { .. }, path } if path.ends_with("y")),
            "{err:?}"
        );
    }

    #[test]
    fn refuses_fifos_and_sockets() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("pipe");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: `c` is a valid NUL-terminated path.
        #[allow(unsafe_code)]
        let rc = unsafe { libc::mkfifo(c.as_ptr(), 0o644) };
        assert_eq!(rc, 0);
        let err = scan_dir(dir.path()).unwrap_err();
        assert!(
            matches!(&err, ScanError::Unsupported { kind: "fifo", path } if path == &fifo),
            "{err:?}"
        );

        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("s.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let err = scan_dir(dir.path()).unwrap_err();
        assert!(
            matches!(&err, ScanError::Unsupported { kind: "socket", .. }),
            "{err:?}"
        );
    }

    #[test]
    fn refuses_bad_names_and_non_directories() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "a\\b", b"x");
        let err = scan_dir(dir.path()).unwrap_err();
        assert!(
            matches!(
                &err,
                ScanError::BadPath {
                    error: PathError::Backslash(_),
                    ..
                }
            ),
            "{err:?}"
        );
        let file = dir.path().join("a\\b");
        assert!(matches!(scan_dir(&file), Err(ScanError::NotADirectory(_))));
        assert!(matches!(
            scan_dir(&dir.path().join("missing")),
            Err(ScanError::Io { .. })
        ));
    }

    #[test]
    fn non_utf8_names_are_refused() {
        use std::os::unix::ffi::OsStrExt;
        let dir = tempfile::tempdir().unwrap();
        let name = std::ffi::OsStr::from_bytes(b"bad\xff");
        std::fs::write(dir.path().join(name), b"x").unwrap();
        let err = scan_dir(dir.path()).unwrap_err();
        assert!(
            matches!(
                &err,
                ScanError::BadPath {
                    error: PathError::NotUtf8(_),
                    ..
                }
            ),
            "{err:?}"
        );
    }
}
