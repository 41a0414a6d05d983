//! Releases: one service checked out at one commit, in its own directory.
//!
//! A release lives in `ROOT/<service>/<commit>` and is never modified once sealed.
//! A new release is assembled in a staging directory
//! (`ROOT/<service>/.staging-<commit>`, [`Releases::assemble`]) and renamed into
//! place ([`Staging::seal`]); a crash leaves at most a staging directory, which
//! [`Releases::open`] removes.
//!
//! Assembling costs what changed, not the size of the service (the OSTree way):
//! a regular file of the tree is a hard link to the instance's blob cache when
//! the cache holds its blob and the file is unchanged from the previous release
//! or its blob was just fetched — either way the inode's modification time
//! tells an incremental build the truth ([`FileSource::choose`]). Executables
//! (the mode belongs to the inode) and a file back to bytes cached long ago
//! are private copies; so are the previous release's build outputs (whatever
//! it holds beyond its tree), with their modification times, so the next build
//! is incremental and writes only its own copies. Every byte copied is hashed
//! on the way against the tree, so a tampered file of the previous release
//! never reaches a new one (the cache's bytes are used instead).
//!
//! Shared files are made read-only, and owned by nobody when the shell runs as
//! root, before they are linked; the build runs without the capabilities to
//! override that (`crate::process::without_file_override`). So a build may add
//! files but cannot write into the commit's: an in-place write fails with
//! "permission denied". After the build, [`Staging::check_tree`] proves the
//! release against its tree cheaply — each linked file still the same inode,
//! unwritten (size and modification time), each private copy hashed — and
//! names what a build replaced, removed or wrote into.
//!
//! Writing under a release never follows a symlink: the tree's files go into a
//! fresh directory, and the previous release's outputs are copied only where the
//! new tree put nothing (a build's `out -> /somewhere` in the way of a tree
//! path stays behind; the path is a real directory).
//!
//! [`verify`] checks a release directory against its tree by reading it: every
//! entry present with the right bytes, mode or link target. Files the tree does
//! not name (build outputs) are ignored.

use std::collections::BTreeSet;
use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};

use image_spec::{BlobId, CommitId, DiffError, Mode, RelPath, ServiceName, Tree, TreeEntry};

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
    /// A blob the release needs is not in the local cache.
    #[error("blob {0} is not in the local cache")]
    MissingBlob(BlobId),
    /// Blobs in the local cache are not what their ids say; they were set
    /// aside, to be fetched again (`install` does, then assembles again).
    #[error(
        "{} blob(s) in the local cache are corrupt (first: {}); set aside, to be fetched again",
        .0.len(),
        .0.first().map(ToString::to_string).unwrap_or_default()
    )]
    CorruptBlobs(Vec<BlobId>),
    /// The build changed a file of the commit's tree (replaced, removed or
    /// rewrote a private copy of it).
    #[error(
        "the build changed `{path}`, a file of the commit ({how}): a build may add files, not change the commit's"
    )]
    BuildChanged {
        /// The file.
        path: RelPath,
        /// What it did.
        how: String,
    },
    /// The build wrote into a file shared with the blob cache (and so with
    /// other releases); the cache drops it.
    #[error(
        "the build wrote into `{path}`, a file of the commit shared with the blob cache and other releases: a build may add files, not change the commit's"
    )]
    WroteShared {
        /// The file.
        path: RelPath,
    },
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

/// Most threads placing a release's files.
const PLACING_THREADS: usize = 4;
/// Fewer files than this a thread are placed by fewer threads.
const PER_THREAD_AT_LEAST: usize = 256;

/// What making a release (or a copy) did, for progress and benchmarks.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CopyStats {
    /// Files linked from the blob cache (no byte copied).
    pub linked: u64,
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

    /// The releases retired but not yet deleted (by a stop or a crash), of
    /// every service.
    pub fn retired(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for service in fs::read_dir(&self.root).into_iter().flatten().flatten() {
            for entry in fs::read_dir(service.path()).into_iter().flatten().flatten() {
                if entry
                    .file_name()
                    .to_str()
                    .is_some_and(crate::reaper::is_retired)
                {
                    out.push(entry.path());
                }
            }
        }
        out
    }

    /// Where the sealed release of `service` at `commit` lives.
    pub fn dir(&self, service: &ServiceName, commit: &CommitId) -> PathBuf {
        self.root.join(service.as_str()).join(commit.to_hex())
    }

    /// Retires the oldest sealed releases of `service` beyond the newest
    /// `keep`, never one in `protect` (the running and the previous
    /// generation's): each is renamed out of the way at once
    /// ([`crate::reaper::retire`]). Returns what to delete: the retired
    /// directories, and any a crash or a stop left retired before.
    pub fn prune(
        &self,
        service: &ServiceName,
        keep: usize,
        protect: &[PathBuf],
    ) -> Result<Vec<PathBuf>, ReleaseError> {
        let dir = self.root.join(service.as_str());
        let mut sealed: Vec<(std::time::SystemTime, PathBuf)> = Vec::new();
        let mut retired = Vec::new();
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err(&dir)(e)),
        };
        for entry in entries {
            let path = entry.map_err(io_err(&dir))?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or(".");
            if crate::reaper::is_retired(name) {
                retired.push(path);
                continue;
            }
            if name.starts_with('.') || !path.is_dir() {
                continue;
            }
            let modified = fs::metadata(&path)
                .and_then(|m| m.modified())
                .map_err(io_err(&path))?;
            sealed.push((modified, path));
        }
        sealed.sort();
        let excess = sealed.len().saturating_sub(keep);
        for (_, path) in sealed.into_iter().take(excess) {
            if protect.contains(&path) {
                continue;
            }
            retired.push(crate::reaper::retire(&path).map_err(io_err(&path))?);
        }
        retired.sort();
        Ok(retired)
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

    /// Assembles a new release of `service` at `commit` in a fresh staging
    /// directory (see the module docs): every entry of `tree` from the blob
    /// cache or the previous release as [`Sources`] decides, then the previous
    /// release's build outputs, copied. Nothing under `base` is modified.
    pub fn assemble(
        &self,
        service: &ServiceName,
        commit: &CommitId,
        tree: &Tree,
        base: Option<(&Path, &Tree)>,
        sources: &Sources<'_>,
    ) -> Result<Staging, ReleaseError> {
        self.assemble_within(service, commit, tree, base, sources, &|| self.free_space())
    }

    /// [`Releases::assemble`], `free` telling the bytes free on the disk.
    fn assemble_within(
        &self,
        service: &ServiceName,
        commit: &CommitId,
        tree: &Tree,
        base: Option<(&Path, &Tree)>,
        sources: &Sources<'_>,
        free: &dyn Fn() -> Result<u64, ReleaseError>,
    ) -> Result<Staging, ReleaseError> {
        let parent = self.root.join(service.as_str());
        fs::create_dir_all(&parent).map_err(io_err(&parent))?;
        let dir = parent.join(format!("{STAGING_PREFIX}{}", commit.to_hex()));
        remove_any(&dir)?;
        fs::create_dir(&dir).map_err(io_err(&dir))?;
        let mut stage = Staging {
            dir,
            sealed: self.dir(service, commit),
            copied: CopyStats::default(),
            shared: Vec::new(),
        };
        match stage.fill(tree, base, sources, free) {
            Ok(()) => Ok(stage),
            Err(e) => {
                let _ = fs::remove_dir_all(&stage.dir);
                Err(e)
            }
        }
    }
}

/// Where the files of a new release come from: the instance's verified blob
/// cache, and which of its blobs were fetched for this release.
pub struct Sources<'a> {
    /// Where the cache keeps a blob's bytes (whether it holds them or not).
    pub cache: &'a (dyn Fn(&BlobId) -> PathBuf + Sync),
    /// Are the cache's bytes of a blob (its file's metadata given) still the
    /// blob's? (`BlobCache::verified`: a stamp, or a hash.)
    pub verified: &'a (dyn Fn(&BlobId, &fs::Metadata) -> bool + Sync),
    /// The blobs fetched for this release: newer than anything the previous
    /// release's build wrote, so a file linked to one is seen as changed by
    /// an incremental build.
    pub fresh: &'a BTreeSet<BlobId>,
}

/// How one file of a new release is made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileSource {
    /// A hard link to the blob cache's read-only file: no byte copied.
    Link(PathBuf),
    /// A private copy of the cache's file, modified now.
    Fresh(PathBuf),
    /// A private copy of the previous release's file, its modification time
    /// kept, its bytes checked against the tree on the way.
    Kept(PathBuf),
}

impl FileSource {
    /// How `entry` (a file) of the new tree is made, `old` being the entry at
    /// its path in the previous release's tree (at `base`), if any, `cached`
    /// where the cache keeps its blob (`in_cache`: and holds it), `fresh` the
    /// blobs just fetched: a regular
    /// file is linked from the cache when it is unchanged or its blob was just
    /// fetched (either way its modification time tells an incremental build
    /// the truth); an unchanged executable or uncached file is kept from the
    /// previous release; anything else is copied fresh from the cache.
    pub fn choose(
        entry: &TreeEntry,
        old: Option<&TreeEntry>,
        base: Option<&Path>,
        cached: PathBuf,
        in_cache: bool,
        fresh: &BTreeSet<BlobId>,
    ) -> Self {
        let unchanged = old == Some(entry);
        if entry.mode() == Mode::Regular && in_cache && (unchanged || fresh.contains(&entry.blob()))
        {
            return FileSource::Link(cached);
        }
        match base {
            Some(base) if unchanged && (!in_cache || entry.mode() == Mode::Executable) => {
                FileSource::Kept(entry.path().under(base))
            }
            _ => FileSource::Fresh(cached),
        }
    }
}

/// What a hard link shares: the inode, and what any write to it would change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Fingerprint {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
}

impl Fingerprint {
    fn of(m: &fs::Metadata) -> Self {
        Self {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime: (m.mtime(), m.mtime_nsec()),
        }
    }
}

/// The owner the shared files of a shell running as root are given: nobody,
/// so a build (which runs without the capabilities to override file modes or
/// change owners, see `crate::process`) can neither write them nor make them
/// writable.
const SHARED_OWNER: u32 = 65_534;

/// Makes a blob-cache file read-only (and, for a shell running as root, owned
/// by [`SHARED_OWNER`]) before it is shared; returns its metadata.
fn lock_shared(path: &Path, meta: fs::Metadata) -> Result<fs::Metadata, ReleaseError> {
    let root = effective_uid() == 0;
    let mode_ok = meta.permissions().mode() & 0o7777 == 0o444;
    let owner_ok = !root || (meta.uid() == SHARED_OWNER && meta.gid() == SHARED_OWNER);
    if mode_ok && owner_ok {
        return Ok(meta);
    }
    if !mode_ok {
        fs::set_permissions(path, fs::Permissions::from_mode(0o444)).map_err(io_err(path))?;
    }
    if !owner_ok {
        std::os::unix::fs::lchown(path, Some(SHARED_OWNER), Some(SHARED_OWNER))
            .map_err(io_err(path))?;
    }
    fs::symlink_metadata(path).map_err(io_err(path))
}

/// The shell's effective user id.
fn effective_uid() -> u32 {
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    #[allow(unsafe_code)]
    unsafe {
        libc::geteuid()
    }
}

/// A release being made (see the module docs).
#[derive(Debug)]
pub struct Staging {
    dir: PathBuf,
    sealed: PathBuf,
    copied: CopyStats,
    /// The files linked from the cache, and what they were when linked.
    shared: Vec<(RelPath, Fingerprint)>,
}

impl Staging {
    /// The staging directory (where the build runs).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// What making the release linked and copied.
    pub fn copied(&self) -> CopyStats {
        self.copied
    }

    /// The tree's entries, then the previous release's build outputs.
    fn fill(
        &mut self,
        tree: &Tree,
        base: Option<(&Path, &Tree)>,
        sources: &Sources<'_>,
        free: &dyn Fn() -> Result<u64, ReleaseError>,
    ) -> Result<(), ReleaseError> {
        // Each file's source, from one look at the cache; what is copied
        // must fit before anything is.
        let mut plan = Vec::with_capacity(tree.len());
        let mut copies = 0u64;
        for entry in tree.entries() {
            if entry.link_target().is_some() {
                plan.push(None);
                continue;
            }
            let cached = (sources.cache)(&entry.blob());
            let meta = fs::symlink_metadata(&cached).ok().filter(|m| m.is_file());
            let old = base.and_then(|(_, t)| t.get(entry.path()));
            let source = FileSource::choose(
                entry,
                old,
                base.map(|(d, _)| d),
                cached,
                meta.is_some(),
                sources.fresh,
            );
            if !matches!(source, FileSource::Link(_)) {
                copies += entry.size();
            }
            plan.push(Some((source, meta)));
        }
        self.check_space(copies, free)?;
        // Directories first, then the files in contiguous runs (whole
        // directories, mostly) on a few threads: linking is metadata work
        // the filesystem does faster in parallel.
        let mut made: BTreeSet<&str> = BTreeSet::new();
        for entry in tree.entries() {
            for dir in entry.path().ancestors() {
                if made.insert(dir) {
                    let here = self.dir.join(dir);
                    fs::create_dir(&here).map_err(io_err(&here))?;
                }
            }
        }
        let items: Vec<_> = tree.entries().iter().zip(plan).collect();
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .clamp(1, PLACING_THREADS)
            .min(items.len().div_ceil(PER_THREAD_AT_LEAST).max(1));
        let chunk = items.len().div_ceil(threads).max(1);
        let dir = self.dir.clone();
        let placed: Vec<Result<Placer<'_>, ReleaseError>> = std::thread::scope(|scope| {
            let handles: Vec<_> = items
                .chunks(chunk)
                .enumerate()
                .map(|(i, run)| {
                    let dir = &dir;
                    scope.spawn(move || {
                        let mut placer = Placer {
                            dir,
                            sources,
                            copied: CopyStats::default(),
                            shared: Vec::new(),
                            corrupt: Vec::new(),
                        };
                        placer.place_all(run, i == 0 && base.is_some())?;
                        Ok(placer)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                .collect()
        });
        let mut corrupt = Vec::new();
        for p in placed {
            let p = p?;
            self.copied.linked += p.copied.linked;
            self.copied.files += p.copied.files;
            self.copied.bytes += p.copied.bytes;
            self.copied.links += p.copied.links;
            self.shared.extend(p.shared);
            corrupt.extend(p.corrupt);
        }
        if !corrupt.is_empty() {
            corrupt.sort();
            corrupt.dedup();
            return Err(ReleaseError::CorruptBlobs(corrupt));
        }
        if let Some((dir, tree)) = base {
            let tracked: BTreeSet<&str> =
                tree.entries().iter().map(|e| e.path().as_str()).collect();
            let mut outputs = Outputs {
                tracked: &tracked,
                ops: Vec::new(),
                bytes: 0,
            };
            outputs.plan(dir, &self.dir, "", true)?;
            self.check_space(outputs.bytes, free)?;
            outputs.copy(&mut self.copied)?;
        }
        Ok(())
    }

    /// Refuses, with the numbers, to copy `needed` bytes the disk cannot take.
    fn check_space(
        &self,
        needed: u64,
        free: &dyn Fn() -> Result<u64, ReleaseError>,
    ) -> Result<(), ReleaseError> {
        if needed == 0 {
            return Ok(());
        }
        let available = free()?;
        if needed > available {
            return Err(ReleaseError::NoSpace {
                path: self.sealed.clone(),
                needed,
                available,
            });
        }
        Ok(())
    }

    /// Checks, after the build, that the tree's files are still what they
    /// were made as: a linked file is the same inode, neither written nor
    /// resized; a private copy still has the tree's bytes; a symlink its
    /// target. This is what proves a built release against its tree without
    /// reading the bytes it shares with the verified cache.
    pub fn check_tree(&self, tree: &Tree) -> Result<(), ReleaseError> {
        let shared: std::collections::HashMap<&RelPath, &Fingerprint> =
            self.shared.iter().map(|(p, f)| (p, f)).collect();
        for entry in tree.entries() {
            let path = entry.path();
            let on_disk = path.under(&self.dir);
            let changed = |how: &str| ReleaseError::BuildChanged {
                path: path.clone(),
                how: how.to_owned(),
            };
            let meta = fs::symlink_metadata(&on_disk).map_err(|_| changed("removed it"))?;
            if let Some(was) = shared.get(path) {
                let now = Fingerprint::of(&meta);
                if now.dev != was.dev || now.ino != was.ino {
                    return Err(changed("replaced it"));
                }
                if now != **was {
                    return Err(ReleaseError::WroteShared { path: path.clone() });
                }
                continue;
            }
            verify_entry(&self.dir, entry, &meta).map_err(|e| match e {
                ReleaseError::Mismatch { reason, .. } => changed(&reason),
                other => other,
            })?;
        }
        Ok(())
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

/// How a file of a new release will be made: its source, and the cache
/// file's metadata (when the cache holds its blob).
type Planned = (FileSource, Option<fs::Metadata>);

/// Makes files of a new release; one per thread, merged into the [`Staging`].
struct Placer<'a> {
    dir: &'a Path,
    sources: &'a Sources<'a>,
    copied: CopyStats,
    shared: Vec<(RelPath, Fingerprint)>,
    /// Blobs found corrupt in the cache (not placed).
    corrupt: Vec<BlobId>,
}

impl Placer<'_> {
    /// Makes `entries` (each with its source; a symlink has none).
    fn place_all(
        &mut self,
        entries: &[(&TreeEntry, Option<Planned>)],
        crash_point: bool,
    ) -> Result<(), ReleaseError> {
        for (entry, source) in entries {
            let Some((source, meta)) = source else {
                let target = entry.path().under(self.dir);
                let link = entry.link_target().expect("only symlinks have no source");
                symlink(link.as_str(), &target).map_err(io_err(&target))?;
                self.copied.links += 1;
                continue;
            };
            self.place(entry, source.clone(), meta.clone())?;
            if crash_point && self.copied.linked + self.copied.files == 1 {
                crate::crash::point("mid-copy");
            }
        }
        Ok(())
    }

    /// Makes the file `entry` from `source`; a cache file that is not what
    /// the tree says is removed from the cache and the entry made otherwise.
    fn place(
        &mut self,
        entry: &TreeEntry,
        source: FileSource,
        cached_meta: Option<fs::Metadata>,
    ) -> Result<(), ReleaseError> {
        let target = entry.path().under(self.dir);
        match source {
            FileSource::Link(cached) => {
                let meta = match cached_meta {
                    Some(m) => lock_shared(&cached, m)?,
                    None => return Err(ReleaseError::MissingBlob(entry.blob())),
                };
                // (Verified first: a bad file is then set aside, not lost.)
                if !(self.sources.verified)(&entry.blob(), &meta) || meta.len() != entry.size() {
                    return self.corrupt_in_cache(entry, &cached);
                }
                match fs::hard_link(&cached, &target) {
                    Ok(()) => {
                        self.copied.linked += 1;
                        self.shared
                            .push((entry.path().clone(), Fingerprint::of(&meta)));
                        Ok(())
                    }
                    // Another filesystem, too many links, a link refused:
                    // a private copy, dated like the cache's file.
                    Err(_) => {
                        self.copy_checked(entry, &cached, meta.modified().ok())?;
                        Ok(())
                    }
                }
            }
            FileSource::Fresh(cached) => {
                if !cached.is_file() {
                    return Err(ReleaseError::MissingBlob(entry.blob()));
                }
                self.copy_checked(entry, &cached, None)
            }
            FileSource::Kept(old) => {
                let mtime = fs::symlink_metadata(&old).and_then(|m| m.modified()).ok();
                match self.copy_checked(entry, &old, mtime) {
                    Ok(()) => Ok(()),
                    // The previous release's copy is not what its tree says
                    // (or is gone): the cache's bytes, if it has them.
                    Err(ReleaseError::Mismatch { .. } | ReleaseError::Io { .. }) => {
                        let cached = (self.sources.cache)(&entry.blob());
                        if !cached.is_file() {
                            return Err(ReleaseError::MissingBlob(entry.blob()));
                        }
                        self.copy_checked(entry, &cached, None)
                    }
                    Err(e) => Err(e),
                }
            }
        }
    }

    /// The cache's file for `entry` is not its blob: it is dropped from the
    /// cache (if `verified` has not set it aside already) and noted; the
    /// assembly goes on and fails at the end, naming every such blob.
    fn corrupt_in_cache(&mut self, entry: &TreeEntry, cached: &Path) -> Result<(), ReleaseError> {
        tracing::warn!(blob = %entry.blob(), file = %cached.display(), "a blob in the cache is corrupt; dropped");
        let _ = fs::remove_file(cached);
        self.corrupt.push(entry.blob());
        Ok(())
    }

    /// Copies `src` to `entry`'s place, hashing on the way: bytes that are not
    /// the entry's blob are refused ([`ReleaseError::Mismatch`]) and leave
    /// nothing. The copy gets the entry's mode and, if given, `mtime`.
    fn copy_checked(
        &mut self,
        entry: &TreeEntry,
        src: &Path,
        mtime: Option<std::time::SystemTime>,
    ) -> Result<(), ReleaseError> {
        let target = entry.path().under(self.dir);
        let mut from = fs::File::open(src).map_err(io_err(src))?;
        let mut to = fs::File::create(&target).map_err(io_err(&target))?;
        let mut hashing = HashingWriter {
            inner: &mut to,
            hasher: blake3::Hasher::new(),
        };
        let bytes = io::copy(&mut from, &mut hashing).map_err(io_err(&target))?;
        if BlobId::from(hashing.hasher.finalize()) != entry.blob() {
            drop(to);
            let _ = fs::remove_file(&target);
            return Err(ReleaseError::Mismatch {
                dir: src.parent().unwrap_or(src).to_owned(),
                path: entry.path().clone(),
                reason: "has other bytes".into(),
            });
        }
        if let Some(t) = mtime {
            to.set_modified(t).map_err(io_err(&target))?;
        }
        drop(to);
        set_mode(&target, entry.mode())?;
        self.copied.files += 1;
        self.copied.bytes += bytes;
        Ok(())
    }
}

/// A previous release's build outputs — whatever it holds that its tree does
/// not name — planned for a new release: where the new tree put nothing, never
/// through a symlink. Planned first, so the space they need is known before
/// a byte is copied; then copied with their modification times and modes.
struct Outputs<'a> {
    tracked: &'a BTreeSet<&'a str>,
    ops: Vec<OutputOp>,
    /// The bytes the copies need.
    bytes: u64,
}

/// One step of copying the outputs.
enum OutputOp {
    Dir {
        dst: PathBuf,
        perms: fs::Permissions,
    },
    File {
        src: PathBuf,
        dst: PathBuf,
        meta: fs::Metadata,
    },
    Link {
        target: PathBuf,
        dst: PathBuf,
    },
}

impl Outputs<'_> {
    /// Plans the outputs under `from` (at `rel` in the release) going to `to`
    /// (`exists`: `to` is there already, made by the tree).
    fn plan(
        &mut self,
        from: &Path,
        to: &Path,
        rel: &str,
        exists: bool,
    ) -> Result<(), ReleaseError> {
        for entry in fs::read_dir(from).map_err(io_err(from))? {
            let entry = entry.map_err(io_err(from))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else {
                continue;
            };
            let here = if rel.is_empty() {
                name.to_owned()
            } else {
                format!("{rel}/{name}")
            };
            if self.tracked.contains(here.as_str()) {
                continue;
            }
            let (src, dst) = (entry.path(), to.join(name));
            let kind = entry.file_type().map_err(io_err(&src))?;
            // What the new tree put there (only where `to` exists can it have).
            let there = if exists {
                fs::symlink_metadata(&dst).ok()
            } else {
                None
            };
            if kind.is_dir() {
                match there {
                    Some(t) if t.is_dir() => self.plan(&src, &dst, &here, true)?,
                    Some(_) => {}
                    None => {
                        let at = self.ops.len();
                        let perms = fs::symlink_metadata(&src)
                            .map_err(io_err(&src))?
                            .permissions();
                        self.ops.push(OutputOp::Dir {
                            dst: dst.clone(),
                            perms,
                        });
                        self.plan(&src, &dst, &here, false)?;
                        // A directory that held only tracked files the new
                        // tree dropped does not come back empty.
                        if self.ops.len() == at + 1 {
                            self.ops.pop();
                        }
                    }
                }
            } else if there.is_some() {
                // The new tree has this path: the tree wins.
            } else if kind.is_symlink() {
                let target = fs::read_link(&src).map_err(io_err(&src))?;
                self.ops.push(OutputOp::Link { target, dst });
            } else if kind.is_file() {
                let meta = fs::symlink_metadata(&src).map_err(io_err(&src))?;
                self.bytes += meta.len();
                self.ops.push(OutputOp::File { src, dst, meta });
            }
            // Sockets and FIFOs a build may leave behind are not copied.
        }
        Ok(())
    }

    /// Carries the plan out.
    fn copy(self, stats: &mut CopyStats) -> Result<(), ReleaseError> {
        for op in self.ops {
            match op {
                OutputOp::Dir { dst, perms } => {
                    fs::create_dir(&dst).map_err(io_err(&dst))?;
                    fs::set_permissions(&dst, perms).map_err(io_err(&dst))?;
                }
                OutputOp::Link { target, dst } => {
                    symlink(&target, &dst).map_err(io_err(&dst))?;
                    stats.links += 1;
                }
                OutputOp::File { src, dst, meta } => {
                    stats.bytes += fs::copy(&src, &dst).map_err(io_err(&dst))?;
                    let times = fs::FileTimes::new()
                        .set_modified(meta.modified().map_err(io_err(&src))?)
                        .set_accessed(meta.accessed().map_err(io_err(&src))?);
                    fs::File::options()
                        .write(true)
                        .open(&dst)
                        .and_then(|f| f.set_times(times))
                        .map_err(io_err(&dst))?;
                    stats.files += 1;
                }
            }
        }
        Ok(())
    }
}

/// Hashes what it writes.
struct HashingWriter<'a, W> {
    inner: &'a mut W,
    hasher: blake3::Hasher,
}

impl<W: io::Write> io::Write for HashingWriter<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
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

/// Checks that `dir` holds every entry of `tree` as the tree says (see the module
/// docs).
pub fn verify(dir: &Path, tree: &Tree) -> Result<(), ReleaseError> {
    match verify_all(dir, tree).into_iter().next() {
        Some((_, e)) => Err(e),
        None => Ok(()),
    }
}

/// Every entry of `tree` that `dir` does not hold as the tree says, each with
/// how it differs (see [`verify`]).
pub fn verify_all(dir: &Path, tree: &Tree) -> Vec<(TreeEntry, ReleaseError)> {
    let mut bad = Vec::new();
    for entry in tree.entries() {
        let on_disk = entry.path().under(dir);
        let checked = fs::symlink_metadata(&on_disk)
            .map_err(|e| ReleaseError::Mismatch {
                dir: dir.to_owned(),
                path: entry.path().clone(),
                reason: e.to_string(),
            })
            .and_then(|meta| verify_entry(dir, entry, &meta));
        if let Err(e) = checked {
            bad.push((entry.clone(), e));
        }
    }
    bad
}

/// Puts `entry` back into the sealed release at `dir` as its tree says, from
/// the blob cache's verified file at `cached` (unused for a symlink): a new
/// file beside the bad one, renamed over it, so the path is never missing. A
/// regular file is linked from the cache (read-only, shared), an executable
/// copied.
pub fn restore(dir: &Path, entry: &TreeEntry, cached: &Path) -> Result<(), ReleaseError> {
    let path = entry.path().under(dir);
    // A file (or symlink) where a directory should be goes; missing ones are
    // made.
    for part in entry.path().ancestors() {
        let here = dir.join(part);
        match fs::symlink_metadata(&here) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                remove_any(&here)?;
                fs::create_dir(&here).map_err(io_err(&here))?;
            }
            Err(_) => fs::create_dir(&here).map_err(io_err(&here))?,
        }
    }
    let tmp = path.with_file_name(format!(".molt-restore-{}", entry.path().file_name()));
    remove_any(&tmp)?;
    match entry.link_target() {
        Some(target) => symlink(target.as_str(), &tmp).map_err(io_err(&tmp))?,
        None if entry.mode() == Mode::Regular => {
            let meta = fs::symlink_metadata(cached).map_err(io_err(cached))?;
            lock_shared(cached, meta)?;
            if fs::hard_link(cached, &tmp).is_err() {
                fs::copy(cached, &tmp).map_err(io_err(&tmp))?;
                set_mode(&tmp, entry.mode())?;
            }
        }
        None => {
            fs::copy(cached, &tmp).map_err(io_err(&tmp))?;
            set_mode(&tmp, entry.mode())?;
        }
    }
    if fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir()) {
        remove_any(&path)?;
    }
    fs::rename(&tmp, &path).map_err(io_err(&path))?;
    let m = fs::symlink_metadata(&path).map_err(io_err(&path))?;
    verify_entry(dir, entry, &m)
}

/// Checks one entry of a tree under `dir`, `meta` being what is at its path.
fn verify_entry(dir: &Path, entry: &TreeEntry, meta: &fs::Metadata) -> Result<(), ReleaseError> {
    let path = entry.path();
    let on_disk = path.under(dir);
    let mismatch = |reason: String| ReleaseError::Mismatch {
        dir: dir.to_owned(),
        path: path.clone(),
        reason,
    };
    match entry.link_target() {
        Some(target) => {
            let found = fs::read_link(&on_disk).map_err(|e| mismatch(e.to_string()))?;
            if found != Path::new(target.as_str()) {
                return Err(mismatch(format!("links to {}", found.display())));
            }
        }
        None => {
            if !meta.is_file() {
                return Err(mismatch("is not a regular file".into()));
            }
            let executable = meta.permissions().mode() & 0o111 != 0;
            if executable != (entry.mode() == Mode::Executable) {
                return Err(mismatch("has the wrong executable bit".into()));
            }
            let mut hasher = blake3::Hasher::new();
            let mut file = fs::File::open(&on_disk).map_err(io_err(&on_disk))?;
            io::copy(&mut file, &mut hasher).map_err(io_err(&on_disk))?;
            if BlobId::from(hasher.finalize()) != entry.blob() {
                return Err(mismatch("has other bytes".into()));
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
    fn cache_from(dir: &Path, files: &[&[u8]]) {
        fs::create_dir_all(dir).unwrap();
        for bytes in files {
            fs::write(dir.join(BlobId::of(bytes).to_hex()), bytes).unwrap();
        }
    }

    fn p(s: &str) -> RelPath {
        RelPath::new(s).unwrap()
    }

    fn svc() -> ServiceName {
        ServiceName::new("orders").unwrap()
    }

    /// Assembles `tree` of commit `[n; 32]` from the cache at `cache` (its
    /// `fresh` blobs just fetched), on `base` if given.
    fn assemble(
        releases: &Releases,
        n: u8,
        tree: &Tree,
        base: Option<(&Path, &Tree)>,
        cache: &Path,
        fresh: &[&[u8]],
    ) -> Result<Staging, ReleaseError> {
        let dir = cache.to_owned();
        let path = move |id: &BlobId| dir.join(id.to_hex());
        let fresh: BTreeSet<BlobId> = fresh.iter().map(|b| BlobId::of(b)).collect();
        releases.assemble(
            &svc(),
            &CommitId::from_bytes([n; 32]),
            tree,
            base,
            &Sources {
                cache: &path,
                verified: &|_, _| true,
                fresh: &fresh,
            },
        )
    }

    fn ino(path: &Path) -> u64 {
        fs::symlink_metadata(path).unwrap().ino()
    }

    fn age(path: &Path, secs: u64) {
        let t = SystemTime::now() - Duration::from_secs(secs);
        fs::File::options()
            .write(true)
            .open(path)
            .unwrap()
            .set_modified(t)
            .unwrap();
    }

    #[test]
    fn a_release_links_what_the_cache_holds_and_keeps_the_old_release_untouched() {
        let tmp = tempfile::tempdir().unwrap();
        let (releases, removed) = Releases::open(&tmp.path().join("releases")).unwrap();
        assert!(removed.is_empty());
        let cache_dir = tmp.path().join("cache");
        let blobs: [&[u8]; 6] = [
            b"name = \"orders\"",
            b"v1",
            b"becomes a file",
            b"v2",
            b"new",
            b"now a file",
        ];
        cache_from(&cache_dir, &blobs);
        let cached = |b: &[u8]| cache_dir.join(BlobId::of(b).to_hex());

        // v1 from nothing: every blob just fetched, every regular file linked.
        let v1_src = tmp.path().join("v1");
        write(&v1_src, "service.toml", b"name = \"orders\"");
        write(&v1_src, "src/main.rs", b"v1");
        write(&v1_src, "dir/file", b"becomes a file");
        let v1 = scan_dir(&v1_src).unwrap().tree;
        let stage = assemble(&releases, 1, &v1, None, &cache_dir, &blobs[..3]).unwrap();
        assert_eq!((stage.copied().linked, stage.copied().files), (3, 0));
        // A build output beside the sources, and a symlink the build made that
        // points outside the release.
        write(stage.dir(), "target/app", b"binary v1");
        let outside = tmp.path().join("outside");
        fs::create_dir(&outside).unwrap();
        symlink(&outside, stage.dir().join("out")).unwrap();
        stage.check_tree(&v1).unwrap();
        let r1 = stage.seal().unwrap();
        assert_eq!(r1, releases.dir(&svc(), &CommitId::from_bytes([1; 32])));
        verify(&r1, &v1).unwrap();
        // The release shares the cache's inode, read-only and owned by nobody.
        assert_eq!(ino(&r1.join("src/main.rs")), ino(&cached(b"v1")));
        let m = fs::metadata(cached(b"v1")).unwrap();
        assert_eq!(m.permissions().mode() & 0o7777, 0o444);
        if effective_uid() == 0 {
            assert_eq!((m.uid(), m.gid()), (SHARED_OWNER, SHARED_OWNER));
        }

        // v2: a change, an addition, an unchanged file, a directory turned into
        // an executable file, and a new file under the build's symlink.
        let v2 = Tree::new(vec![
            v1.get(&p("service.toml")).unwrap().clone(),
            TreeEntry::file(p("src/main.rs"), false, 2, BlobId::of(b"v2")),
            TreeEntry::file(p("dir"), true, 10, BlobId::of(b"now a file")),
            TreeEntry::file(p("out/new"), false, 3, BlobId::of(b"new")),
            TreeEntry::symlink(p("current"), LinkTarget::new("src/main.rs").unwrap()),
        ])
        .unwrap();
        let fresh: [&[u8]; 3] = [b"v2", b"new", b"now a file"];
        let stage = assemble(&releases, 2, &v2, Some((&r1, &v1)), &cache_dir, &fresh).unwrap();
        // Linked: service.toml (unchanged), src/main.rs and out/new (fresh);
        // copied: the executable, and the build output.
        assert_eq!((stage.copied().linked, stage.copied().files), (3, 2));
        stage.check_tree(&v2).unwrap();
        let r2 = stage.seal().unwrap();
        verify(&r2, &v2).unwrap();
        assert_eq!(ino(&r2.join("service.toml")), ino(&r1.join("service.toml")));
        assert_eq!(ino(&r2.join("src/main.rs")), ino(&cached(b"v2")));
        assert_ne!(ino(&r2.join("dir")), ino(&cached(b"now a file")));
        assert_eq!(
            fs::metadata(r2.join("dir")).unwrap().permissions().mode() & 0o777,
            0o755
        );
        // The build output came along as a private copy; the build's symlink
        // became a real directory and nothing was written through it.
        assert_eq!(fs::read(r2.join("target/app")).unwrap(), b"binary v1");
        assert_ne!(ino(&r2.join("target/app")), ino(&r1.join("target/app")));
        assert_eq!(
            fs::metadata(r2.join("target/app"))
                .unwrap()
                .modified()
                .unwrap(),
            fs::metadata(r1.join("target/app"))
                .unwrap()
                .modified()
                .unwrap(),
            "an output keeps its time, so the next build is incremental"
        );
        // Writing the copy leaves the old release alone.
        fs::write(r2.join("target/app"), b"binary v2").unwrap();
        assert_eq!(fs::read(r1.join("target/app")).unwrap(), b"binary v1");
        assert!(fs::symlink_metadata(r2.join("out")).unwrap().is_dir());
        assert!(
            !outside.join("new").exists(),
            "a write followed the build's symlink"
        );
        // Nothing of v1's tree that v2 dropped came back.
        assert!(!r2.join("dir/file").exists());
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
    fn a_file_back_to_cached_bytes_is_a_fresh_copy_so_incremental_builds_see_it() {
        let tmp = tempfile::tempdir().unwrap();
        let (releases, _) = Releases::open(&tmp.path().join("r")).unwrap();
        let cache_dir = tmp.path().join("cache");
        cache_from(&cache_dir, &[b"A", b"B"]);
        let tree = |b: &[u8]| {
            Tree::new(vec![TreeEntry::file(
                p("src/lib.rs"),
                false,
                1,
                BlobId::of(b),
            )])
            .unwrap()
        };
        let (a, b) = (tree(b"A"), tree(b"B"));
        let r1 = assemble(&releases, 1, &a, None, &cache_dir, &[b"A"])
            .unwrap()
            .seal()
            .unwrap();
        let r2 = assemble(&releases, 2, &b, Some((&r1, &a)), &cache_dir, &[b"B"])
            .unwrap()
            .seal()
            .unwrap();
        // An output built from B, newer than any source so far.
        write(&r2, "target/out", b"built from B");
        // Back to A, whose cached file is old: not linked (its old time would
        // hide the change from the build) but copied, dated now.
        age(&cache_dir.join(BlobId::of(b"A").to_hex()), 3600);
        let stage = assemble(&releases, 3, &a, Some((&r2, &b)), &cache_dir, &[]).unwrap();
        assert_eq!(stage.copied().linked, 0);
        let src = fs::metadata(stage.dir().join("src/lib.rs")).unwrap();
        let out = fs::metadata(stage.dir().join("target/out")).unwrap();
        assert!(src.modified().unwrap() > out.modified().unwrap());
        stage.check_tree(&a).unwrap();
    }

    #[test]
    fn linked_and_copied_releases_verify_alike_and_bad_bytes_never_reach_one() {
        let tmp = tempfile::tempdir().unwrap();
        let (releases, _) = Releases::open(&tmp.path().join("r")).unwrap();
        let src = tmp.path().join("src");
        write(&src, "a.txt", b"alpha");
        write(&src, "b/c.txt", b"gamma");
        write(&src, "run.sh", b"#!/bin/sh");
        fs::set_permissions(src.join("run.sh"), fs::Permissions::from_mode(0o755)).unwrap();
        symlink("a.txt", src.join("link")).unwrap();
        let tree = scan_dir(&src).unwrap().tree;
        let cache_dir = tmp.path().join("cache");
        let blobs: [&[u8]; 3] = [b"alpha", b"gamma", b"#!/bin/sh"];
        cache_from(&cache_dir, &blobs);
        // Linked: every regular file (fresh). Copied: kept from a release made
        // from a plain directory, the cache not holding them.
        let linked = assemble(&releases, 1, &tree, None, &cache_dir, &blobs).unwrap();
        assert_eq!(linked.copied().linked, 2);
        let linked = linked.seal().unwrap();
        let empty = tmp.path().join("empty");
        fs::create_dir(&empty).unwrap();
        let copied = assemble(&releases, 2, &tree, Some((&src, &tree)), &empty, &[]).unwrap();
        assert_eq!((copied.copied().linked, copied.copied().files), (0, 3));
        let copied = copied.seal().unwrap();
        verify(&linked, &tree).unwrap();
        verify(&copied, &tree).unwrap();
        for f in ["a.txt", "b/c.txt", "run.sh"] {
            assert_eq!(
                fs::read(linked.join(f)).unwrap(),
                fs::read(copied.join(f)).unwrap()
            );
        }

        // A tampered file of the previous release is not kept: the cache's
        // bytes are used (or, lacking them, nothing is made).
        fs::write(src.join("b/c.txt"), b"GAMMA").unwrap();
        let stage = assemble(&releases, 3, &tree, Some((&src, &tree)), &cache_dir, &[]).unwrap();
        assert_eq!(fs::read(stage.dir().join("b/c.txt")).unwrap(), b"gamma");
        stage.abandon().unwrap();
        let err = assemble(&releases, 4, &tree, Some((&src, &tree)), &empty, &[]).unwrap_err();
        assert!(matches!(err, ReleaseError::MissingBlob(_)), "{err}");
        assert!(
            !releases
                .root
                .join("orders")
                .join(format!(
                    ".staging-{}",
                    CommitId::from_bytes([4; 32]).to_hex()
                ))
                .exists()
        );

        // A cache file of the wrong size is dropped from the cache, named.
        let bad = cache_dir.join(BlobId::of(b"alpha").to_hex());
        fs::write(&bad, b"alphabet").unwrap();
        let err = assemble(&releases, 5, &tree, None, &cache_dir, &blobs).unwrap_err();
        assert!(
            matches!(&err, ReleaseError::CorruptBlobs(b) if b == &[BlobId::of(b"alpha")]),
            "{err}"
        );
        assert!(!bad.exists());
    }

    #[test]
    fn the_check_after_a_build_catches_what_it_changed_of_the_tree() {
        let tmp = tempfile::tempdir().unwrap();
        let (releases, _) = Releases::open(&tmp.path().join("r")).unwrap();
        let src = tmp.path().join("src");
        write(&src, "shared.txt", b"shared");
        write(&src, "private.sh", b"#!/bin/sh");
        fs::set_permissions(src.join("private.sh"), fs::Permissions::from_mode(0o755)).unwrap();
        let tree = scan_dir(&src).unwrap().tree;
        let cache_dir = tmp.path().join("cache");
        let blobs: [&[u8]; 2] = [b"shared", b"#!/bin/sh"];
        cache_from(&cache_dir, &blobs);
        let fresh = || assemble(&releases, 1, &tree, None, &cache_dir, &blobs).unwrap();

        // Outputs added: fine.
        let stage = fresh();
        write(stage.dir(), "target/x", b"out");
        stage.check_tree(&tree).unwrap();
        stage.abandon().unwrap();
        // A tracked file replaced (a new inode), removed, or a private copy rewritten.
        let stage = fresh();
        fs::remove_file(stage.dir().join("shared.txt")).unwrap();
        write(stage.dir(), "shared.txt", b"shared");
        let err = stage.check_tree(&tree).unwrap_err();
        assert!(err.to_string().contains("replaced it"), "{err}");
        fs::remove_file(stage.dir().join("shared.txt")).unwrap();
        let err = stage.check_tree(&tree).unwrap_err();
        assert!(err.to_string().contains("removed it"), "{err}");
        stage.abandon().unwrap();
        let stage = fresh();
        fs::write(stage.dir().join("private.sh"), b"#!/bin/bash").unwrap();
        let err = stage.check_tree(&tree).unwrap_err();
        assert!(matches!(err, ReleaseError::BuildChanged { .. }), "{err}");
        assert!(err.to_string().contains("other bytes"), "{err}");
        stage.abandon().unwrap();
        // Written through the shared inode (this test may, as root): named as such.
        let stage = fresh();
        if effective_uid() == 0 {
            let mut f = fs::OpenOptions::new()
                .append(true)
                .open(stage.dir().join("shared.txt"))
                .unwrap();
            io::Write::write_all(&mut f, b"!").unwrap();
            let err = stage.check_tree(&tree).unwrap_err();
            assert!(matches!(err, ReleaseError::WroteShared { .. }), "{err}");
        }
        stage.abandon().unwrap();
    }

    #[test]
    fn verify_catches_tampering_and_open_removes_half_made_releases() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("releases");
        let (releases, _) = Releases::open(&root).unwrap();
        let src = tmp.path().join("v1");
        write(&src, "a", b"1");
        let tree = scan_dir(&src).unwrap().tree;
        let cache_dir = tmp.path().join("cache");
        cache_from(&cache_dir, &[b"1"]);
        let empty = tmp.path().join("empty");
        fs::create_dir(&empty).unwrap();
        // A private copy (nothing cached), so tampering touches only it.
        let dir = assemble(&releases, 3, &tree, Some((&src, &tree)), &empty, &[])
            .unwrap()
            .seal()
            .unwrap();
        fs::write(dir.join("a"), b"2").unwrap();
        let err = verify(&dir, &tree).unwrap_err();
        assert!(matches!(err, ReleaseError::Mismatch { .. }), "{err}");
        assert!(err.to_string().contains("other bytes"), "{err}");

        // A crash mid-assembly leaves a staging directory; reopening removes it.
        let half = assemble(&releases, 4, &tree, None, &cache_dir, &[b"1"]).unwrap();
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
        let cache_dir = tmp.path().join("cache");
        let mut dirs = Vec::new();
        for i in 0..7u8 {
            cache_from(&cache_dir, &[&[i]]);
            let tree =
                Tree::new(vec![TreeEntry::file(p("f"), false, 1, BlobId::of(&[i]))]).unwrap();
            let dir = assemble(&releases, i, &tree, None, &cache_dir, &[&[i]])
                .unwrap()
                .seal()
                .unwrap();
            // Distinct, increasing ages.
            let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 + u64::from(i));
            fs::File::open(&dir).unwrap().set_modified(t).unwrap();
            dirs.push(dir);
        }
        // Keep 3; the oldest one is protected (it is still running, say). The
        // others are retired at once: gone from their place, left to delete.
        let retired = releases.prune(&svc(), 3, &[dirs[0].clone()]).unwrap();
        let expected: Vec<PathBuf> = dirs[1..4]
            .iter()
            .map(|d| {
                d.with_file_name(format!(
                    ".prune-{}",
                    d.file_name().unwrap().to_str().unwrap()
                ))
            })
            .collect();
        assert_eq!(retired, expected);
        for d in &dirs[1..4] {
            assert!(!d.exists());
        }
        for d in [&dirs[0], &dirs[4], &dirs[5], &dirs[6]] {
            assert!(d.exists());
        }
        // Not deleted yet (a crash here, say): the next prune hands them over
        // again, and retires nothing more.
        assert_eq!(
            releases.prune(&svc(), 3, &[dirs[0].clone()]).unwrap(),
            expected
        );
        assert!(releases.free_space().unwrap() > 0);
    }

    #[test]
    fn a_release_the_disk_cannot_hold_is_refused_up_front_with_the_numbers() {
        let tmp = tempfile::tempdir().unwrap();
        let (releases, _) = Releases::open(&tmp.path().join("r")).unwrap();
        let src = tmp.path().join("src");
        write(&src, "run.sh", b"#!/bin/sh\necho hi\n");
        fs::set_permissions(src.join("run.sh"), fs::Permissions::from_mode(0o755)).unwrap();
        write(&src, "lib.txt", b"linked, costs nothing");
        write(&src, "target/out.bin", &[7; 100]);
        let tree = Tree::new(
            scan_dir(&src)
                .unwrap()
                .tree
                .entries()
                .iter()
                .filter(|e| !e.path().as_str().starts_with("target"))
                .cloned()
                .collect(),
        )
        .unwrap();
        let cache_dir = tmp.path().join("cache");
        let blobs: [&[u8]; 2] = [b"#!/bin/sh\necho hi\n", b"linked, costs nothing"];
        cache_from(&cache_dir, &blobs);
        let dir = cache_dir.clone();
        let path = move |id: &BlobId| dir.join(id.to_hex());
        let fresh: BTreeSet<BlobId> = blobs.iter().map(|b| BlobId::of(b)).collect();
        let sources = Sources {
            cache: &path,
            verified: &|_, _| true,
            fresh: &fresh,
        };
        let c = CommitId::from_bytes([9; 32]);
        // The executable is copied (18 bytes); the rest is linked.
        let err = releases
            .assemble_within(&svc(), &c, &tree, None, &sources, &|| Ok(17))
            .unwrap_err();
        assert!(
            matches!(
                err,
                ReleaseError::NoSpace {
                    needed: 18,
                    available: 17,
                    ..
                }
            ),
            "{err}"
        );
        // On a base with 100 bytes of outputs: those must fit too.
        let err = releases
            .assemble_within(&svc(), &c, &tree, Some((&src, &tree)), &sources, &|| Ok(99))
            .unwrap_err();
        assert!(
            matches!(
                err,
                ReleaseError::NoSpace {
                    needed: 100,
                    available: 99,
                    ..
                }
            ),
            "{err}"
        );
        assert!(
            !tmp.path()
                .join("r/orders")
                .join(format!(".staging-{}", c.to_hex()))
                .exists()
        );
        let ok = releases
            .assemble_within(&svc(), &c, &tree, Some((&src, &tree)), &sources, &|| {
                Ok(118)
            })
            .unwrap();
        assert_eq!(fs::read(ok.dir().join("target/out.bin")).unwrap(), [7; 100]);
    }

    #[test]
    fn a_missing_blob_is_a_clear_error_and_leaves_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let (releases, _) = Releases::open(&tmp.path().join("r")).unwrap();
        let tree = Tree::new(vec![TreeEntry::file(p("a"), false, 1, BlobId::of(b"x"))]).unwrap();
        let empty = tmp.path().join("empty");
        fs::create_dir(&empty).unwrap();
        let err = assemble(&releases, 5, &tree, None, &empty, &[]).unwrap_err();
        assert!(matches!(err, ReleaseError::MissingBlob(_)), "{err}");
        let left: Vec<_> = fs::read_dir(releases.root.join("orders"))
            .unwrap()
            .collect();
        assert!(left.is_empty());
    }
}
