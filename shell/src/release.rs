//! Releases: one service checked out at one commit, in its own directory.
//!
//! A release lives in `ROOT/<service>/<commit>` and is never modified once sealed.
//! A new release is made in a staging directory (`ROOT/<service>/.staging-<commit>`):
//! a copy of the previous release of the service — build outputs included, with
//! modification times and modes kept, so the next build is incremental — then the
//! diff to the new commit is applied in [`TreeDiff::disk_order`], and then the
//! directory is renamed into place ([`Staging::seal`]). A crash leaves at most a
//! staging directory, which [`Releases::open`] removes.
//!
//! Writing under a release never follows a symlink on the way: the previous
//! release may hold symlinks made by its build (`out -> /somewhere`), and a new
//! file under `out/` must not land outside the release. Such a symlink in the way
//! of a tree path is replaced by a real directory.
//!
//! [`verify`] checks a release directory against its tree: every entry present with
//! the right bytes, mode or link target. Files the tree does not name (build
//! outputs) are ignored.

use std::fs;
use std::io;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};

use image_spec::{BlobId, Change, CommitId, DiffError, Mode, RelPath, ServiceName, Tree, TreeDiff};

/// Why a release cannot be made or is not what its tree says.
#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
    /// A file operation failed.
    #[error("`{path}`: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// The diff does not apply to the previous release's tree.
    #[error(transparent)]
    Diff(#[from] DiffError),
    /// A blob the diff needs is not in the local cache.
    #[error("blob {0} is not in the local cache")]
    MissingBlob(BlobId),
    /// Not enough free disk for the new release.
    #[error(
        "not enough disk for the new release in `{path}`: it needs about {needed} bytes, {available} are free"
    )]
    NoSpace {
        /// The releases directory.
        path: PathBuf,
        /// Bytes the release needs (a copy of the previous one plus new files).
        needed: u64,
        /// Bytes free.
        available: u64,
    },
    /// A release directory does not match its tree.
    #[error("release `{dir}` does not match its tree at `{path}`: {reason}")]
    Mismatch {
        /// The release directory.
        dir: PathBuf,
        /// The tree path that differs.
        path: RelPath,
        /// How.
        reason: String,
    },
}

impl ReleaseError {
    /// Wraps an I/O error about `path`.
    pub fn from_io(path: &Path) -> impl FnOnce(io::Error) -> ReleaseError + '_ {
        io_err(path)
    }
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> ReleaseError + '_ {
    move |source| ReleaseError::Io {
        path: path.to_owned(),
        source,
    }
}

const STAGING_PREFIX: &str = ".staging-";

/// What a copy did, for progress and benchmarks.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CopyStats {
    /// Regular files copied.
    pub files: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Symlinks recreated.
    pub links: u64,
}

/// The releases of every service on this instance.
#[derive(Debug, Clone)]
pub struct Releases {
    root: PathBuf,
}

impl Releases {
    /// Opens (creating if needed) `root`, removing the staging directories a crash
    /// may have left; returns them.
    pub fn open(root: &Path) -> Result<(Self, Vec<PathBuf>), ReleaseError> {
        fs::create_dir_all(root).map_err(io_err(root))?;
        let mut removed = Vec::new();
        for service in fs::read_dir(root).map_err(io_err(root))? {
            let service = service.map_err(io_err(root))?.path();
            if !service.is_dir() {
                continue;
            }
            for entry in fs::read_dir(&service).map_err(io_err(&service))? {
                let path = entry.map_err(io_err(&service))?.path();
                let staging = path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(STAGING_PREFIX));
                if staging {
                    fs::remove_dir_all(&path).map_err(io_err(&path))?;
                    removed.push(path);
                }
            }
        }
        Ok((
            Self {
                root: root.to_owned(),
            },
            removed,
        ))
    }

    /// Where the sealed release of `service` at `commit` lives.
    pub fn dir(&self, service: &ServiceName, commit: &CommitId) -> PathBuf {
        self.root.join(service.as_str()).join(commit.to_hex())
    }

    /// Removes the oldest sealed releases of `service` beyond the newest `keep`,
    /// never one in `protect` (the running and the previous generation's). Returns
    /// the removed directories.
    pub fn prune(
        &self,
        service: &ServiceName,
        keep: usize,
        protect: &[PathBuf],
    ) -> Result<Vec<PathBuf>, ReleaseError> {
        let dir = self.root.join(service.as_str());
        let mut sealed: Vec<(std::time::SystemTime, PathBuf)> = Vec::new();
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err(&dir)(e)),
        };
        for entry in entries {
            let path = entry.map_err(io_err(&dir))?.path();
            let staging = path
                .file_name()
                .and_then(|n| n.to_str())
                .is_none_or(|n| n.starts_with('.'));
            if staging || !path.is_dir() {
                continue;
            }
            let modified = fs::metadata(&path)
                .and_then(|m| m.modified())
                .map_err(io_err(&path))?;
            sealed.push((modified, path));
        }
        sealed.sort();
        let excess = sealed.len().saturating_sub(keep);
        let mut removed = Vec::new();
        for (_, path) in sealed.into_iter().take(excess) {
            if protect.contains(&path) {
                continue;
            }
            fs::remove_dir_all(&path).map_err(io_err(&path))?;
            removed.push(path);
        }
        Ok(removed)
    }

    /// Bytes free on the filesystem holding the releases.
    pub fn free_space(&self) -> Result<u64, ReleaseError> {
        use std::os::unix::ffi::OsStrExt;
        let c = std::ffi::CString::new(self.root.as_os_str().as_bytes())
            .map_err(|e| io_err(&self.root)(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
        // SAFETY: `c` is a valid NUL-terminated path and `stat` a plain struct
        // that statvfs fills in; nothing is retained after the call.
        #[allow(unsafe_code)]
        let stat = unsafe {
            let mut stat: libc::statvfs = std::mem::zeroed();
            if libc::statvfs(c.as_ptr(), &mut stat) != 0 {
                return Err(io_err(&self.root)(io::Error::last_os_error()));
            }
            stat
        };
        Ok(stat.f_bavail.saturating_mul(stat.f_frsize))
    }

    /// Starts a new release of `service` at `commit`: a fresh staging directory,
    /// holding a copy of `base` (the previous release) if given.
    pub fn stage(
        &self,
        service: &ServiceName,
        commit: &CommitId,
        base: Option<&Path>,
    ) -> Result<Staging, ReleaseError> {
        let parent = self.root.join(service.as_str());
        fs::create_dir_all(&parent).map_err(io_err(&parent))?;
        let dir = parent.join(format!("{STAGING_PREFIX}{}", commit.to_hex()));
        if dir.exists() {
            fs::remove_dir_all(&dir).map_err(io_err(&dir))?;
        }
        let copied = match base {
            Some(base) => copy_tree(base, &dir)?,
            None => {
                fs::create_dir(&dir).map_err(io_err(&dir))?;
                CopyStats::default()
            }
        };
        Ok(Staging {
            dir,
            sealed: self.dir(service, commit),
            copied,
        })
    }
}

/// A release being made (see the module docs).
#[derive(Debug)]
pub struct Staging {
    dir: PathBuf,
    sealed: PathBuf,
    copied: CopyStats,
}

impl Staging {
    /// The staging directory (where the build runs).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// What copying the previous release did.
    pub fn copied(&self) -> CopyStats {
        self.copied
    }

    /// Applies `diff` (from the base release's tree) to the staging directory,
    /// taking file bytes from `blob_path(id)`. Returns the new tree.
    pub fn apply(
        &self,
        base_tree: &Tree,
        diff: &TreeDiff,
        blob_path: impl Fn(&BlobId) -> PathBuf,
    ) -> Result<Tree, ReleaseError> {
        // Check the whole diff (paths, result id) before touching the disk.
        let new_tree = diff.apply(base_tree)?;
        for change in diff.disk_order() {
            let path = change.path();
            match change {
                Change::Removed(_) => {
                    let target = path.under(&self.dir);
                    remove_any(&target)?;
                    prune_empty_parents(&self.dir, path);
                }
                Change::Added(entry) | Change::Modified(entry) => {
                    let target = self.prepare(path)?;
                    match entry.link_target() {
                        Some(link) => {
                            remove_any(&target)?;
                            symlink(link.as_str(), &target).map_err(io_err(&target))?;
                        }
                        None => {
                            let src = blob_path(&entry.blob());
                            if !src.is_file() {
                                return Err(ReleaseError::MissingBlob(entry.blob()));
                            }
                            let tmp =
                                target.with_file_name(format!(".molt-new-{}", path.file_name()));
                            fs::copy(&src, &tmp).map_err(io_err(&tmp))?;
                            set_mode(&tmp, entry.mode())?;
                            remove_any(&target)?;
                            fs::rename(&tmp, &target).map_err(io_err(&target))?;
                        }
                    }
                }
                Change::ModeChanged { mode, .. } => {
                    let target = self.prepare(path)?;
                    set_mode(&target, *mode)?;
                }
            }
        }
        Ok(new_tree)
    }

    /// Makes sure every directory on the way to `path` is a real directory inside
    /// the staging directory (replacing symlinks or files in the way), and returns
    /// the path on disk.
    fn prepare(&self, path: &RelPath) -> Result<PathBuf, ReleaseError> {
        for dir in path.ancestors() {
            let here = self.dir.join(dir);
            match fs::symlink_metadata(&here) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => {
                    remove_any(&here)?;
                    fs::create_dir(&here).map_err(io_err(&here))?;
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    fs::create_dir(&here).map_err(io_err(&here))?;
                }
                Err(e) => return Err(io_err(&here)(e)),
            }
        }
        Ok(path.under(&self.dir))
    }

    /// Seals the release: renames the staging directory into place. From here on
    /// the release is never modified.
    pub fn seal(self) -> Result<PathBuf, ReleaseError> {
        if self.sealed.exists() {
            fs::remove_dir_all(&self.dir).map_err(io_err(&self.dir))?;
            return Ok(self.sealed);
        }
        fs::rename(&self.dir, &self.sealed).map_err(io_err(&self.sealed))?;
        if let Some(parent) = self.sealed.parent() {
            fs::File::open(parent)
                .and_then(|d| d.sync_all())
                .map_err(io_err(parent))?;
        }
        Ok(self.sealed)
    }

    /// Throws the staging directory away (a failed build, say).
    pub fn abandon(self) -> Result<(), ReleaseError> {
        fs::remove_dir_all(&self.dir).map_err(io_err(&self.dir))
    }
}

fn set_mode(path: &Path, mode: Mode) -> Result<(), ReleaseError> {
    let bits = if mode == Mode::Executable {
        0o755
    } else {
        0o644
    };
    fs::set_permissions(path, fs::Permissions::from_mode(bits)).map_err(io_err(path))
}

/// Removes a file, symlink or directory tree at `path`, if anything is there.
fn remove_any(path: &Path) -> Result<(), ReleaseError> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path).map_err(io_err(path)),
        Ok(_) => fs::remove_file(path).map_err(io_err(path)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(path)(e)),
    }
}

/// Removes the now-empty directories above a removed path (best effort: a
/// directory that still holds build outputs stays).
fn prune_empty_parents(root: &Path, path: &RelPath) {
    let mut dirs: Vec<&str> = path.ancestors().collect();
    dirs.reverse();
    for dir in dirs {
        if fs::remove_dir(root.join(dir)).is_err() {
            break;
        }
    }
}

/// Copies the directory `src` to `dst` (which must not exist): directories, files
/// with their modes and modification times, and symlinks as symlinks.
pub fn copy_tree(src: &Path, dst: &Path) -> Result<CopyStats, ReleaseError> {
    let mut stats = CopyStats::default();
    fs::create_dir(dst).map_err(io_err(dst))?;
    let mut stack = vec![(src.to_owned(), dst.to_owned())];
    while let Some((from, to)) = stack.pop() {
        for entry in fs::read_dir(&from).map_err(io_err(&from))? {
            let entry = entry.map_err(io_err(&from))?;
            let (s, d) = (entry.path(), to.join(entry.file_name()));
            let meta = fs::symlink_metadata(&s).map_err(io_err(&s))?;
            let ft = meta.file_type();
            if ft.is_dir() {
                fs::create_dir(&d).map_err(io_err(&d))?;
                fs::set_permissions(&d, meta.permissions()).map_err(io_err(&d))?;
                stack.push((s, d));
            } else if ft.is_symlink() {
                let target = fs::read_link(&s).map_err(io_err(&s))?;
                symlink(&target, &d).map_err(io_err(&d))?;
                stats.links += 1;
            } else if ft.is_file() {
                // std::fs::copy keeps the mode and uses copy_file_range, which
                // clones extents on filesystems that can.
                stats.bytes += fs::copy(&s, &d).map_err(io_err(&d))?;
                let times = fs::FileTimes::new()
                    .set_modified(meta.modified().map_err(io_err(&s))?)
                    .set_accessed(meta.accessed().map_err(io_err(&s))?);
                fs::File::options()
                    .write(true)
                    .open(&d)
                    .and_then(|f| f.set_times(times))
                    .map_err(io_err(&d))?;
                stats.files += 1;
                if stats.files == 1 {
                    crate::crash::point("mid-copy");
                }
            }
            // Sockets and FIFOs a build may leave behind are not copied.
        }
    }
    Ok(stats)
}

/// The bytes of the regular files under `dir` (what a copy of it needs).
pub fn dir_size(dir: &Path) -> Result<u64, ReleaseError> {
    let mut total = 0;
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in fs::read_dir(&d).map_err(io_err(&d))? {
            let entry = entry.map_err(io_err(&d))?;
            let meta = fs::symlink_metadata(entry.path()).map_err(io_err(&entry.path()))?;
            if meta.is_dir() {
                stack.push(entry.path());
            } else if meta.is_file() {
                total += meta.len();
            }
        }
    }
    Ok(total)
}

/// Checks that `dir` holds every entry of `tree` as the tree says (see the module
/// docs).
pub fn verify(dir: &Path, tree: &Tree) -> Result<(), ReleaseError> {
    let mismatch = |path: &RelPath, reason: String| ReleaseError::Mismatch {
        dir: dir.to_owned(),
        path: path.clone(),
        reason,
    };
    for entry in tree.entries() {
        let path = entry.path();
        let on_disk = path.under(dir);
        let meta = fs::symlink_metadata(&on_disk).map_err(|e| mismatch(path, e.to_string()))?;
        match entry.link_target() {
            Some(target) => {
                let found = fs::read_link(&on_disk).map_err(|e| mismatch(path, e.to_string()))?;
                if found != Path::new(target.as_str()) {
                    return Err(mismatch(path, format!("links to {}", found.display())));
                }
            }
            None => {
                if !meta.is_file() {
                    return Err(mismatch(path, "is not a regular file".into()));
                }
                let executable = meta.permissions().mode() & 0o111 != 0;
                if executable != (entry.mode() == Mode::Executable) {
                    return Err(mismatch(path, "has the wrong executable bit".into()));
                }
                let bytes = fs::read(&on_disk).map_err(io_err(&on_disk))?;
                if BlobId::of(&bytes) != entry.blob() {
                    return Err(mismatch(path, "has other bytes".into()));
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use image_spec::{LinkTarget, TreeEntry, scan_dir};
    use std::time::{Duration, SystemTime};

    fn write(root: &Path, rel: &str, bytes: &[u8]) {
        let p = root.join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, bytes).unwrap();
    }

    /// A blob cache in a directory: `dir/<id>`.
    fn cache_from(dir: &Path, files: &[&[u8]]) -> impl Fn(&BlobId) -> PathBuf + use<> {
        fs::create_dir_all(dir).unwrap();
        for bytes in files {
            fs::write(dir.join(BlobId::of(bytes).to_hex()), bytes).unwrap();
        }
        let dir = dir.to_owned();
        move |id| dir.join(id.to_hex())
    }

    fn p(s: &str) -> RelPath {
        RelPath::new(s).unwrap()
    }

    fn svc() -> ServiceName {
        ServiceName::new("orders").unwrap()
    }

    #[test]
    fn copies_keep_mtimes_modes_and_links_and_are_independent() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        write(&src, "a/b.txt", b"hello");
        write(&src, "run", b"#!/bin/sh");
        fs::set_permissions(src.join("run"), fs::Permissions::from_mode(0o755)).unwrap();
        symlink("a/b.txt", src.join("link")).unwrap();
        let old = SystemTime::now() - Duration::from_secs(86_400);
        fs::File::options()
            .write(true)
            .open(src.join("a/b.txt"))
            .unwrap()
            .set_modified(old)
            .unwrap();

        let dst = tmp.path().join("dst");
        let stats = copy_tree(&src, &dst).unwrap();
        assert_eq!((stats.files, stats.links, stats.bytes), (2, 1, 14));
        let m = fs::metadata(dst.join("a/b.txt")).unwrap();
        assert_eq!(m.modified().unwrap(), old);
        assert_eq!(
            fs::metadata(dst.join("run")).unwrap().permissions().mode() & 0o777,
            0o755
        );
        assert_eq!(
            fs::read_link(dst.join("link")).unwrap(),
            Path::new("a/b.txt")
        );
        // Writing the copy leaves the source alone.
        fs::write(dst.join("a/b.txt"), b"changed").unwrap();
        assert_eq!(fs::read(src.join("a/b.txt")).unwrap(), b"hello");
    }

    #[test]
    fn a_first_release_and_an_upgrade_keep_the_old_release_untouched() {
        let tmp = tempfile::tempdir().unwrap();
        let (releases, removed) = Releases::open(&tmp.path().join("releases")).unwrap();
        assert!(removed.is_empty());

        // v1 from nothing.
        let v1_src = tmp.path().join("v1");
        write(&v1_src, "service.toml", b"name = \"orders\"");
        write(&v1_src, "src/main.rs", b"v1");
        write(&v1_src, "dir/file", b"becomes a file");
        let v1 = scan_dir(&v1_src).unwrap().tree;
        let cache = cache_from(
            &tmp.path().join("cache"),
            &[
                b"name = \"orders\"",
                b"v1",
                b"becomes a file",
                b"v2",
                b"new",
                b"now a file",
            ],
        );
        let c1 = CommitId::from_bytes([1; 32]);
        let stage = releases.stage(&svc(), &c1, None).unwrap();
        let got = stage
            .apply(
                &Tree::empty(),
                &TreeDiff::between(&Tree::empty(), &v1),
                &cache,
            )
            .unwrap();
        assert_eq!(got, v1);
        // A build output beside the sources, and a symlink the build made that
        // points outside the release.
        write(stage.dir(), "target/app", b"binary v1");
        let outside = tmp.path().join("outside");
        fs::create_dir(&outside).unwrap();
        symlink(&outside, stage.dir().join("out")).unwrap();
        let r1 = stage.seal().unwrap();
        assert_eq!(r1, releases.dir(&svc(), &c1));
        verify(&r1, &v1).unwrap();

        // v2: a change, an addition, a removal, a mode change, a directory turned
        // into a file, and a new file under the build's symlink.
        let v2 = Tree::new(vec![
            v1.get(&p("service.toml")).unwrap().clone(),
            TreeEntry::file(p("src/main.rs"), false, 2, BlobId::of(b"v2")),
            TreeEntry::file(p("dir"), true, 10, BlobId::of(b"now a file")),
            TreeEntry::file(p("out/new"), false, 3, BlobId::of(b"new")),
            TreeEntry::symlink(p("current"), LinkTarget::new("src/main.rs").unwrap()),
        ])
        .unwrap();
        let c2 = CommitId::from_bytes([2; 32]);
        let stage = releases.stage(&svc(), &c2, Some(&r1)).unwrap();
        assert_eq!(stage.copied().files, 4);
        let got = stage
            .apply(&v1, &TreeDiff::between(&v1, &v2), &cache)
            .unwrap();
        assert_eq!(got, v2);
        let r2 = stage.seal().unwrap();
        verify(&r2, &v2).unwrap();
        // The build output came along; the build's symlink became a real directory.
        assert_eq!(fs::read(r2.join("target/app")).unwrap(), b"binary v1");
        assert!(fs::symlink_metadata(r2.join("out")).unwrap().is_dir());
        assert!(
            !outside.join("new").exists(),
            "a write followed the build's symlink"
        );
        // v1 is exactly as it was.
        verify(&r1, &v1).unwrap();
        assert_eq!(fs::read(r1.join("src/main.rs")).unwrap(), b"v1");
        assert!(
            fs::symlink_metadata(r1.join("out"))
                .unwrap()
                .file_type()
                .is_symlink()
        );
    }

    #[test]
    fn verify_catches_tampering_and_open_removes_half_made_releases() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("releases");
        let (releases, _) = Releases::open(&root).unwrap();
        let src = tmp.path().join("v1");
        write(&src, "a", b"1");
        let tree = scan_dir(&src).unwrap().tree;
        let cache = cache_from(&tmp.path().join("cache"), &[b"1"]);
        let c = CommitId::from_bytes([3; 32]);
        let stage = releases.stage(&svc(), &c, None).unwrap();
        stage
            .apply(
                &Tree::empty(),
                &TreeDiff::between(&Tree::empty(), &tree),
                &cache,
            )
            .unwrap();
        let dir = stage.seal().unwrap();
        fs::write(dir.join("a"), b"2").unwrap();
        let err = verify(&dir, &tree).unwrap_err();
        assert!(matches!(err, ReleaseError::Mismatch { .. }), "{err}");
        assert!(err.to_string().contains("other bytes"), "{err}");

        // A crash mid-stage leaves a staging directory; reopening removes it.
        let half = releases
            .stage(&svc(), &CommitId::from_bytes([4; 32]), Some(&dir))
            .unwrap();
        let half_dir = half.dir().to_owned();
        std::mem::forget(half);
        let (_, removed) = Releases::open(&root).unwrap();
        assert_eq!(removed, std::slice::from_ref(&half_dir));
        assert!(!half_dir.exists());
        assert!(dir.exists());
    }

    #[test]
    fn pruning_keeps_the_newest_and_the_protected() {
        let tmp = tempfile::tempdir().unwrap();
        let (releases, _) = Releases::open(&tmp.path().join("r")).unwrap();
        let mut dirs = Vec::new();
        for i in 0..7u8 {
            let stage = releases
                .stage(&svc(), &CommitId::from_bytes([i; 32]), None)
                .unwrap();
            write(stage.dir(), "f", &[i]);
            let dir = stage.seal().unwrap();
            // Distinct, increasing ages.
            let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 + u64::from(i));
            fs::File::open(&dir).unwrap().set_modified(t).unwrap();
            dirs.push(dir);
        }
        // Keep 3; the oldest one is protected (it is still running, say).
        let removed = releases.prune(&svc(), 3, &[dirs[0].clone()]).unwrap();
        assert_eq!(removed, dirs[1..4].to_vec());
        for d in [&dirs[0], &dirs[4], &dirs[5], &dirs[6]] {
            assert!(d.exists());
        }
        assert!(releases.free_space().unwrap() > 0);
        assert_eq!(dir_size(&dirs[6]).unwrap(), 1);
    }

    #[test]
    fn a_missing_blob_is_a_clear_error() {
        let tmp = tempfile::tempdir().unwrap();
        let (releases, _) = Releases::open(&tmp.path().join("r")).unwrap();
        let tree = Tree::new(vec![TreeEntry::file(p("a"), false, 1, BlobId::of(b"x"))]).unwrap();
        let stage = releases
            .stage(&svc(), &CommitId::from_bytes([5; 32]), None)
            .unwrap();
        let cache = cache_from(&tmp.path().join("empty"), &[]);
        let err = stage
            .apply(
                &Tree::empty(),
                &TreeDiff::between(&Tree::empty(), &tree),
                &cache,
            )
            .unwrap_err();
        assert!(matches!(err, ReleaseError::MissingBlob(_)), "{err}");
        stage.abandon().unwrap();
    }
}
