//! The instance's blob cache: every blob it fetched, once, as `DIR/<id>`,
//! written only by a verified fetch — and shared, read-only, with the
//! releases that hard-link it (see `crate::release`).
//!
//! A file that was right when it arrived can still go bad: a byte flipped by
//! whoever may write as root, a disk that lies. Hashing every shared file at
//! every deploy would cost what the links save, so the cache keeps a *stamp*
//! of each blob it has verified — the inode, size and modification time of
//! its file — in `DIR/.stamps` (one line per blob, appended; the newest line
//! wins). A file whose stamp still matches was verified and not written
//! since (a write changes its modification time); one without a stamp, or
//! whose stamp differs, is hashed again ([`BlobCache::verified`]): right, it
//! is stamped anew; wrong, it is set aside in `DIR/.quarantine/` and counts
//! as missing, so the next fetch brings it anew and a new release never
//! links the bad bytes. The stamps are an index that can always be lost:
//! without one, a blob is hashed once more.

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use image_spec::BlobId;
use tracing::{info, warn};

/// The stamps file's name.
const STAMPS: &str = ".stamps";

/// What a verified blob's file looked like: any write since changes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    ino: u64,
    len: u64,
    mtime: i64,
    mtime_ns: i64,
}

impl Stamp {
    fn of(m: &std::fs::Metadata) -> Self {
        Self {
            ino: m.ino(),
            len: m.len(),
            mtime: m.mtime(),
            mtime_ns: m.mtime_nsec(),
        }
    }

    fn line(&self, id: &BlobId) -> String {
        format!(
            "{} {} {} {} {}\n",
            id.to_hex(),
            self.ino,
            self.len,
            self.mtime,
            self.mtime_ns
        )
    }

    fn parse(line: &str) -> Option<(BlobId, Self)> {
        let mut f = line.split_whitespace();
        let id = f.next()?.parse().ok()?;
        let stamp = Self {
            ino: f.next()?.parse().ok()?,
            len: f.next()?.parse().ok()?,
            mtime: f.next()?.parse().ok()?,
            mtime_ns: f.next()?.parse().ok()?,
        };
        f.next().is_none().then_some((id, stamp))
    }
}

#[derive(Debug, Default)]
struct Stamps {
    by_blob: HashMap<BlobId, Stamp>,
    /// Lines in the file (old ones included).
    lines: usize,
}

/// The blob cache (see the module docs).
#[derive(Debug, Clone)]
pub struct BlobCache {
    dir: PathBuf,
    stamps: Arc<Mutex<Stamps>>,
}

impl BlobCache {
    /// Opens (creating if needed) the cache in `dir`, removing partial
    /// downloads and reading the stamps (rewritten without their old lines
    /// when these are most of the file).
    pub fn open(dir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        match std::fs::remove_dir_all(dir.join(".scratch")) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "part") {
                std::fs::remove_file(&path)?;
            }
        }
        let mut stamps = Stamps::default();
        match std::fs::read_to_string(dir.join(STAMPS)) {
            Ok(text) => {
                for line in text.lines() {
                    stamps.lines += 1;
                    // A torn or foreign line is a stamp less: that blob is
                    // hashed again.
                    if let Some((id, stamp)) = Stamp::parse(line) {
                        stamps.by_blob.insert(id, stamp);
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        if stamps.lines > 2 * stamps.by_blob.len() + 1024 {
            let text: String = stamps.by_blob.iter().map(|(id, s)| s.line(id)).collect();
            let tmp = dir.join(".stamps.new");
            std::fs::write(&tmp, text)?;
            std::fs::rename(&tmp, dir.join(STAMPS))?;
            stamps.lines = stamps.by_blob.len();
        }
        Ok(Self {
            dir: dir.to_owned(),
            stamps: Arc::new(Mutex::new(stamps)),
        })
    }

    /// A scratch directory for blobs read but not kept (planning reads a new
    /// commit's `service.toml` there); emptied when the cache opens.
    pub fn scratch(&self) -> PathBuf {
        self.dir.join(".scratch")
    }

    /// The cache's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the blob's bytes are (or would be).
    pub fn path(&self, id: &BlobId) -> PathBuf {
        self.dir.join(id.to_hex())
    }

    /// Stamps blobs just fetched (and so verified on arrival).
    pub fn stamp_fetched(&self, ids: &[BlobId]) {
        for id in ids {
            if let Ok(meta) = std::fs::symlink_metadata(self.path(id)) {
                self.record(id, Stamp::of(&meta));
            }
        }
    }

    fn record(&self, id: &BlobId, stamp: Stamp) {
        let mut stamps = self.stamps.lock().unwrap_or_else(|p| p.into_inner());
        if stamps.by_blob.get(id) == Some(&stamp) {
            return;
        }
        stamps.by_blob.insert(*id, stamp);
        stamps.lines += 1;
        let appended = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(STAMPS))
            .and_then(|mut f| f.write_all(stamp.line(id).as_bytes()));
        if let Err(e) = appended {
            // Only an index: without the line the blob is hashed again.
            warn!(error = %e, "cannot write the blob cache's stamps");
        }
    }

    /// Is the cache's file for `id` (whose metadata is `meta`) the blob's
    /// bytes? Yes at once if its stamp matches; else it is hashed: right, it
    /// is stamped; wrong (or unreadable), it is set aside and this says no.
    pub fn verified(&self, id: &BlobId, meta: &std::fs::Metadata) -> bool {
        let stamp = Stamp::of(meta);
        {
            let stamps = self.stamps.lock().unwrap_or_else(|p| p.into_inner());
            if stamps.by_blob.get(id) == Some(&stamp) {
                return true;
            }
        }
        let path = self.path(id);
        let sound = std::fs::File::open(&path).and_then(|mut f| {
            let mut hasher = blake3::Hasher::new();
            std::io::copy(&mut f, &mut hasher)?;
            Ok(BlobId::from(hasher.finalize()) == *id)
        });
        match sound {
            Ok(true) => {
                self.record(id, stamp);
                true
            }
            _ => {
                warn!(blob = %id, file = %path.display(), "a blob in the cache is corrupt; set aside to be fetched again");
                if let Err(e) = self.quarantine(id) {
                    warn!(blob = %id, error = %e, "cannot set a corrupt blob aside");
                }
                false
            }
        }
    }

    /// Takes a blob found corrupt out of the cache (kept aside in
    /// `.quarantine/`), so the next fetch brings it anew. A blob not in the
    /// cache is nothing to do.
    pub fn quarantine(&self, id: &BlobId) -> std::io::Result<()> {
        let aside = self.dir.join(".quarantine");
        std::fs::create_dir_all(&aside)?;
        match std::fs::rename(self.path(id), aside.join(id.to_hex())) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Removes the blobs no release links any more (a cache file's only
    /// link is its own), which the releases pruned before let go; stops
    /// between two files when `cancel` is. Returns how many went and their
    /// bytes. A blob used only by private copies (an executable) goes too:
    /// it is fetched again if a later release needs it. The caller makes sure
    /// no install is using the cache meanwhile (`Instance` holds a lock).
    pub fn sweep(
        &self,
        cancel: &tokio_util::sync::CancellationToken,
    ) -> std::io::Result<(u64, u64)> {
        let (mut files, mut bytes) = (0, 0);
        for entry in std::fs::read_dir(&self.dir)? {
            if cancel.is_cancelled() {
                break;
            }
            let entry = entry?;
            let is_blob = entry
                .file_name()
                .to_str()
                .is_some_and(|n| n.parse::<BlobId>().is_ok());
            if !is_blob {
                continue;
            }
            let meta = entry.metadata()?;
            if meta.is_file() && meta.nlink() == 1 {
                std::fs::remove_file(entry.path())?;
                files += 1;
                bytes += meta.len();
            }
        }
        if files > 0 {
            info!(files, bytes, "swept blobs no release links from the cache");
        }
        Ok((files, bytes))
    }

    /// The blobs among `ids` the cache does not hold verified: absent, or
    /// found corrupt (and set aside) by [`BlobCache::verified`].
    pub fn missing(&self, ids: impl IntoIterator<Item = BlobId>) -> Vec<BlobId> {
        ids.into_iter()
            .filter(|id| match std::fs::symlink_metadata(self.path(id)) {
                Ok(m) if m.is_file() => !self.verified(id, &m),
                _ => true,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(cache: &BlobCache, bytes: &[u8]) -> BlobId {
        let id = BlobId::of(bytes);
        std::fs::write(cache.path(&id), bytes).unwrap();
        id
    }

    #[test]
    fn a_stamped_blob_is_trusted_until_written_and_a_bad_one_set_aside() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = BlobCache::open(tmp.path()).unwrap();
        let (a, b) = (put(&cache, b"alpha"), put(&cache, b"bravo"));
        cache.stamp_fetched(&[a]);
        // b has no stamp: hashed, found right, stamped.
        assert!(cache.missing([a, b]).is_empty());
        let stamps = std::fs::read_to_string(tmp.path().join(STAMPS)).unwrap();
        assert_eq!(stamps.lines().count(), 2);
        // A write (same size) changes the file's time: hashed, found wrong,
        // set aside, missing.
        std::fs::write(cache.path(&a), b"ALPHA").unwrap();
        assert_eq!(cache.missing([a, b]), [a]);
        assert!(!cache.path(&a).exists());
        assert!(tmp.path().join(".quarantine").join(a.to_hex()).exists());

        // The stamps come back on the next open; a torn line is ignored.
        std::fs::OpenOptions::new()
            .append(true)
            .open(tmp.path().join(STAMPS))
            .and_then(|mut f| f.write_all(b"0123 torn"))
            .unwrap();
        let again = BlobCache::open(tmp.path()).unwrap();
        let meta = std::fs::metadata(again.path(&b)).unwrap();
        assert!(again.verified(&b, &meta));
        assert_eq!(
            again.stamps.lock().unwrap().by_blob.get(&b).copied(),
            Some(Stamp::of(&meta))
        );
    }
}
