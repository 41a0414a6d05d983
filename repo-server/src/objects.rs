//! Trees, commits and images as verified, content-addressed files.
//!
//! Every immutable object the repository holds besides blobs is a file named by
//! the blake3 of its canonical encoding, `DATA/objects/<kind>/<2 hex>/<id>`,
//! written the way blobs are (a temporary file, synced, renamed into place).
//! Reading one hashes its bytes against its name before decoding them, so a
//! flipped byte is found on the first read and the object is moved to
//! `DATA/objects/quarantine/`; the next push that holds it writes it again. The
//! metadata database is only an index over these files and the refs journal, so
//! losing it loses nothing ([`crate::fsck`] rebuilds it).

use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// The kinds of object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// A [`image_spec::Tree`].
    Tree,
    /// A [`image_spec::Commit`].
    Commit,
    /// An [`image_spec::Image`].
    Image,
}

impl Kind {
    /// Every kind.
    pub const ALL: [Kind; 3] = [Kind::Tree, Kind::Commit, Kind::Image];

    /// Its name (and directory).
    pub fn name(self) -> &'static str {
        match self {
            Kind::Tree => "tree",
            Kind::Commit => "commit",
            Kind::Image => "image",
        }
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Why an object could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum ObjectError {
    /// A file could not be read or written.
    #[error("object store `{path}`: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The failure.
        source: std::io::Error,
    },
    /// The object's bytes do not hash to its name; it was quarantined.
    #[error("{kind} {id} is corrupt (its bytes hash to {actual}); moved to quarantine")]
    Corrupt {
        /// Its kind.
        kind: Kind,
        /// Its id (hex).
        id: String,
        /// What its bytes hash to (hex).
        actual: String,
    },
}

/// The object files under `DATA/objects` (see the module docs).
#[derive(Debug)]
pub struct Objects {
    root: PathBuf,
    tmp_seq: AtomicU64,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ObjectError + '_ {
    move |source| ObjectError::Io {
        path: path.to_owned(),
        source,
    }
}

impl Objects {
    /// Opens (creating if needed) the store at `root`, removing temporary files
    /// a crash left behind.
    pub fn open(root: &Path) -> Result<Self, ObjectError> {
        for kind in Kind::ALL {
            let dir = root.join(kind.name());
            std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        }
        let tmp = root.join("tmp");
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(io_err(&tmp))?;
        }
        std::fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;
        Ok(Self {
            root: root.to_owned(),
            tmp_seq: AtomicU64::new(0),
        })
    }

    /// Where the object `id` of `kind` lives.
    pub fn path_of(&self, kind: Kind, id: &[u8; 32]) -> PathBuf {
        let hex = blake3::Hash::from_bytes(*id).to_hex();
        self.root
            .join(kind.name())
            .join(&hex[..2])
            .join(hex.as_str())
    }

    /// Stores `bytes` as the object `id` of `kind` (its blake3), durably. An
    /// object already there is kept if it verifies and replaced if not, so a
    /// push of a damaged object repairs it. Returns whether it was written.
    pub fn put(&self, kind: Kind, id: &[u8; 32], bytes: &[u8]) -> Result<bool, ObjectError> {
        debug_assert_eq!(blake3::hash(bytes).as_bytes(), id);
        let path = self.path_of(kind, id);
        if let Ok(existing) = std::fs::read(&path)
            && blake3::hash(&existing).as_bytes() == id
        {
            return Ok(false);
        }
        let dir = path.parent().expect("object paths have a parent");
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let tmp = self.root.join("tmp").join(format!(
            "{}.{}",
            std::process::id(),
            self.tmp_seq.fetch_add(1, Ordering::Relaxed)
        ));
        let written = (|| {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(bytes)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            embedded_db::sync_parent(&path)
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(io_err(&path)(e));
        }
        Ok(true)
    }

    /// The verified bytes of object `id` of `kind`, if stored. Bytes that do
    /// not hash to `id` are moved to quarantine and reported corrupt.
    pub fn get(&self, kind: Kind, id: &[u8; 32]) -> Result<Option<Vec<u8>>, ObjectError> {
        let path = self.path_of(kind, id);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(&path)(e)),
        };
        let actual = blake3::hash(&bytes);
        if actual.as_bytes() != id {
            self.quarantine(kind, id)?;
            return Err(ObjectError::Corrupt {
                kind,
                id: blake3::Hash::from_bytes(*id).to_hex().to_string(),
                actual: actual.to_hex().to_string(),
            });
        }
        Ok(Some(bytes))
    }

    /// The bytes of object `id` of `kind` and whether they hash to `id`,
    /// without quarantining anything (fsck); `None` if it is missing.
    pub fn inspect(
        &self,
        kind: Kind,
        id: &[u8; 32],
    ) -> Result<Option<(Vec<u8>, bool)>, ObjectError> {
        let path = self.path_of(kind, id);
        match std::fs::read(&path) {
            Ok(b) => {
                let sound = blake3::hash(&b).as_bytes() == id;
                Ok(Some((b, sound)))
            }
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(&path)(e)),
        }
    }

    /// Moves object `id` of `kind` out of the store, to
    /// `quarantine/<kind>-<id>`, where it no longer answers reads.
    pub fn quarantine(&self, kind: Kind, id: &[u8; 32]) -> Result<(), ObjectError> {
        let path = self.path_of(kind, id);
        let dir = self.root.join("quarantine");
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let to = dir.join(format!("{kind}-{}", blake3::Hash::from_bytes(*id).to_hex()));
        match std::fs::rename(&path, &to) {
            Ok(()) => {
                tracing::warn!(%kind, object = %to.display(), "quarantined a corrupt object");
                Ok(())
            }
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err(&path)(e)),
        }
    }

    /// The ids of every stored object of `kind` (file names that are not ids
    /// are skipped).
    pub fn ids(&self, kind: Kind) -> Result<Vec<[u8; 32]>, ObjectError> {
        let base = self.root.join(kind.name());
        let mut out = Vec::new();
        for shard in std::fs::read_dir(&base).map_err(io_err(&base))? {
            let shard = shard.map_err(io_err(&base))?.path();
            if !shard.is_dir() {
                continue;
            }
            for file in std::fs::read_dir(&shard).map_err(io_err(&shard))? {
                let file = file.map_err(io_err(&shard))?;
                if let Some(id) = file
                    .file_name()
                    .to_str()
                    .and_then(|n| blake3::Hash::from_hex(n).ok())
                {
                    out.push(*id.as_bytes());
                }
            }
        }
        out.sort_unstable();
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_verify_on_read_and_a_put_repairs_a_damaged_one() {
        let dir = tempfile::tempdir().unwrap();
        let objects = Objects::open(dir.path()).unwrap();
        let bytes = b"a tree's canonical bytes".to_vec();
        let id = *blake3::hash(&bytes).as_bytes();
        assert_eq!(objects.get(Kind::Tree, &id).unwrap(), None);
        assert!(objects.put(Kind::Tree, &id, &bytes).unwrap());
        assert!(!objects.put(Kind::Tree, &id, &bytes).unwrap());
        assert_eq!(objects.get(Kind::Tree, &id).unwrap(), Some(bytes.clone()));
        // Kinds are apart: the same id is not a commit.
        assert_eq!(objects.get(Kind::Commit, &id).unwrap(), None);
        assert_eq!(objects.ids(Kind::Tree).unwrap(), vec![id]);

        // A flipped byte: named, quarantined, gone from reads.
        let path = objects.path_of(Kind::Tree, &id);
        let mut bad = bytes.clone();
        bad[3] ^= 1;
        std::fs::write(&path, &bad).unwrap();
        let err = objects.get(Kind::Tree, &id).unwrap_err();
        assert!(
            matches!(
                err,
                ObjectError::Corrupt {
                    kind: Kind::Tree,
                    ..
                }
            ),
            "{err}"
        );
        assert!(!path.exists());
        assert_eq!(objects.get(Kind::Tree, &id).unwrap(), None);
        assert_eq!(
            std::fs::read_dir(dir.path().join("quarantine"))
                .unwrap()
                .count(),
            1
        );

        // Damaged in place, a put writes it again.
        std::fs::write(&path, &bad).unwrap();
        assert!(objects.put(Kind::Tree, &id, &bytes).unwrap());
        assert_eq!(objects.get(Kind::Tree, &id).unwrap(), Some(bytes));
    }
}
