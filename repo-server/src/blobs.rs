//! Blob storage: bytes named by their blake3, behind a narrow trait.
//!
//! [`BlobStore`] is everything the protocol needs from blob storage: does a blob
//! exist, store one from a stream, read one as a stream. [`FsBlobStore`] keeps each
//! blob as a file, the way OSTree does: bytes go to a temporary file while they are
//! hashed, the hash is compared with the claimed id, and only then is the file
//! synced and renamed into `blobs/<first two hex>/<id>`. A reader therefore never
//! sees a partial or wrong blob, and a crash leaves at most a stray temporary file,
//! which the next start removes. An S3-compatible store would implement the same
//! trait with a multipart upload and a conditional put.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use image_spec::BlobId;
use tokio::fs::File;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

/// Why a blob could not be stored or read.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    /// The bytes received do not hash to the claimed id; nothing was stored.
    #[error("blob {claimed}: the bytes received hash to {actual}; nothing stored")]
    Mismatch {
        /// The id the sender claimed.
        claimed: BlobId,
        /// What the bytes hash to.
        actual: BlobId,
    },
    /// The store's files could not be read or written.
    #[error("blob store `{path}`: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// Storage for blobs (see the module docs).
pub trait BlobStore: Send + Sync + 'static {
    /// A blob being written: every byte written is hashed on the way, and the bytes
    /// become a blob only on [`BlobStore::commit`].
    type Sink: AsyncWrite + Unpin + Send;
    /// A blob being read.
    type Source: AsyncRead + Unpin + Send;

    /// The size of a stored blob, or `None` if it is not stored.
    fn size(&self, id: &BlobId) -> impl Future<Output = Result<Option<u64>, BlobError>> + Send;

    /// Is the blob stored?
    fn contains(&self, id: &BlobId) -> impl Future<Output = Result<bool, BlobError>> + Send;

    /// For each id, the stored blob's size, or `None` if it is not stored. One round
    /// trip to the storage for many ids.
    fn sizes_many(
        &self,
        ids: Vec<BlobId>,
    ) -> impl Future<Output = Result<Vec<Option<u64>>, BlobError>> + Send;

    /// Stores many small blobs held in memory, all or none: every blob's bytes are
    /// checked against its id first ([`BlobError::Mismatch`] stores nothing), then
    /// they are made durable together.
    fn put_many(
        &self,
        blobs: Vec<(BlobId, Vec<u8>)>,
    ) -> impl Future<Output = Result<(), BlobError>> + Send;

    /// Starts writing a blob.
    fn begin(&self) -> impl Future<Output = Result<Self::Sink, BlobError>> + Send;

    /// Finishes a blob: stores it under `id` if its bytes hash to `id`, else
    /// discards it and returns [`BlobError::Mismatch`]. Storing a blob that exists
    /// already is not an error.
    fn commit(
        &self,
        sink: Self::Sink,
        id: &BlobId,
    ) -> impl Future<Output = Result<(), BlobError>> + Send;

    /// Discards a blob being written.
    fn abort(&self, sink: Self::Sink) -> impl Future<Output = ()> + Send;

    /// Opens a stored blob: its bytes and size, or `None` if it is not stored.
    fn open(
        &self,
        id: &BlobId,
    ) -> impl Future<Output = Result<Option<(Self::Source, u64)>, BlobError>> + Send;

    /// Takes a blob found corrupt (its bytes do not hash to its id) out of
    /// the store, kept aside for inspection: from then on it is missing, so
    /// the next push that holds it uploads it again.
    fn quarantine(&self, id: &BlobId) -> impl Future<Output = Result<(), BlobError>> + Send;
}

/// Blobs as files in a directory (see the module docs).
#[derive(Debug)]
pub struct FsBlobStore {
    root: PathBuf,
    tmp: PathBuf,
    next_tmp: AtomicU64,
}

/// A blob being written to a temporary file of an [`FsBlobStore`].
#[derive(Debug)]
pub struct FsSink {
    file: File,
    path: PathBuf,
    hasher: blake3::Hasher,
}

impl AsyncWrite for FsSink {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let this = &mut *self;
        let polled = std::pin::Pin::new(&mut this.file).poll_write(cx, buf);
        if let std::task::Poll::Ready(Ok(n)) = &polled {
            this.hasher.update(&buf[..*n]);
        }
        polled
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.file).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.file).poll_shutdown(cx)
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> BlobError + '_ {
    move |source| BlobError::Io {
        path: path.to_owned(),
        source,
    }
}

impl FsBlobStore {
    /// Opens (creating if needed) a store under `root`, removing temporary files a
    /// crash may have left.
    pub fn open(root: &Path) -> Result<Self, BlobError> {
        let tmp = root.join("tmp");
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(io_err(&tmp))?;
        }
        std::fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;
        Ok(Self {
            root: root.to_owned(),
            tmp,
            next_tmp: AtomicU64::new(0),
        })
    }

    /// Where corrupt blobs are kept aside (`quarantine/<id>`).
    fn quarantine_dir(&self) -> PathBuf {
        self.root.join("quarantine")
    }

    fn path_of(&self, id: &BlobId) -> PathBuf {
        let hex = id.to_hex();
        self.root.join(&hex[..2]).join(hex)
    }

    /// Checks the stored blob `id` against its name, reading it whole (fsck):
    /// `None` if it is missing, `Some(false)` if its bytes hash to another id.
    pub fn check(&self, id: &BlobId) -> Result<Option<bool>, BlobError> {
        let path = self.path_of(id);
        let file = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(&path)(e)),
        };
        let mut hasher = blake3::Hasher::new();
        hasher.update_reader(file).map_err(io_err(&path))?;
        Ok(Some(hasher.finalize().as_bytes() == id.as_bytes()))
    }

    /// [`BlobStore::quarantine`], from a blocking context (fsck).
    pub fn quarantine_blocking(&self, id: &BlobId) -> Result<(), BlobError> {
        let dir = self.quarantine_dir();
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let (from, to) = (self.path_of(id), dir.join(id.to_hex()));
        match std::fs::rename(&from, &to) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err(&from)(e)),
        }
    }

    /// Number of blobs stored and their total size (walks the directory).
    pub fn usage(&self) -> Result<(u64, u64), BlobError> {
        let (mut count, mut bytes) = (0, 0);
        for shard in std::fs::read_dir(&self.root).map_err(io_err(&self.root))? {
            let shard = shard.map_err(io_err(&self.root))?;
            if shard.path() == self.tmp || shard.path() == self.quarantine_dir() {
                continue;
            }
            for f in std::fs::read_dir(shard.path()).map_err(io_err(&shard.path()))? {
                let f = f.map_err(io_err(&shard.path()))?;
                count += 1;
                bytes += f.metadata().map_err(io_err(&f.path()))?.len();
            }
        }
        Ok((count, bytes))
    }
}

impl BlobStore for FsBlobStore {
    type Sink = FsSink;
    type Source = File;

    async fn size(&self, id: &BlobId) -> Result<Option<u64>, BlobError> {
        let path = self.path_of(id);
        match tokio::fs::metadata(&path).await {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(&path)(e)),
        }
    }

    async fn contains(&self, id: &BlobId) -> Result<bool, BlobError> {
        Ok(self.size(id).await?.is_some())
    }

    async fn sizes_many(&self, ids: Vec<BlobId>) -> Result<Vec<Option<u64>>, BlobError> {
        let paths: Vec<PathBuf> = ids.iter().map(|id| self.path_of(id)).collect();
        blocking(move || {
            paths
                .iter()
                .map(|p| match std::fs::symlink_metadata(p) {
                    Ok(m) => Ok(Some(m.len())),
                    Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
                    Err(e) => Err(io_err(p)(e)),
                })
                .collect()
        })
        .await
    }

    async fn put_many(&self, blobs: Vec<(BlobId, Vec<u8>)>) -> Result<(), BlobError> {
        for (id, bytes) in &blobs {
            let actual = BlobId::of(bytes);
            if actual != *id {
                return Err(BlobError::Mismatch {
                    claimed: *id,
                    actual,
                });
            }
        }
        let first = self
            .next_tmp
            .fetch_add(blobs.len() as u64, Ordering::Relaxed);
        let jobs: Vec<(PathBuf, PathBuf, Vec<u8>)> = blobs
            .into_iter()
            .enumerate()
            .map(|(i, (id, bytes))| {
                let tmp = self
                    .tmp
                    .join(format!("{}-{}", std::process::id(), first + i as u64));
                (tmp, self.path_of(&id), bytes)
            })
            .collect();
        let root = self.root.clone();
        blocking(move || {
            // Write every file, make them all durable at once, then move them into
            // place and make the renames durable: a blob is never visible before
            // its bytes are on disk.
            for (tmp, _, bytes) in &jobs {
                std::fs::write(tmp, bytes).map_err(io_err(tmp))?;
            }
            sync_filesystem(&root)?;
            for (tmp, dest, _) in &jobs {
                let dir = dest.parent().expect("a blob path has a shard directory");
                std::fs::create_dir_all(dir).map_err(io_err(dir))?;
                std::fs::rename(tmp, dest).map_err(io_err(dest))?;
            }
            sync_filesystem(&root)
        })
        .await
    }

    async fn begin(&self) -> Result<FsSink, BlobError> {
        let n = self.next_tmp.fetch_add(1, Ordering::Relaxed);
        let path = self.tmp.join(format!("{}-{n}", std::process::id()));
        let file = File::create(&path).await.map_err(io_err(&path))?;
        Ok(FsSink {
            file,
            path,
            hasher: blake3::Hasher::new(),
        })
    }

    async fn commit(&self, mut sink: FsSink, id: &BlobId) -> Result<(), BlobError> {
        let actual = BlobId::from(sink.hasher.finalize());
        if actual != *id {
            self.abort(sink).await;
            return Err(BlobError::Mismatch {
                claimed: *id,
                actual,
            });
        }
        sink.file.flush().await.map_err(io_err(&sink.path))?;
        sink.file.sync_all().await.map_err(io_err(&sink.path))?;
        drop(sink.file);
        let dest = self.path_of(id);
        let dir = dest.parent().expect("a blob path has a shard directory");
        tokio::fs::create_dir_all(dir).await.map_err(io_err(dir))?;
        // Renaming over an existing copy of the same bytes is harmless.
        tokio::fs::rename(&sink.path, &dest)
            .await
            .map_err(io_err(&dest))?;
        // Make the new directory entry durable too, before anyone is told.
        let dir = dir.to_owned();
        blocking(move || {
            std::fs::File::open(&dir)
                .and_then(|d| d.sync_all())
                .map_err(io_err(&dir))
        })
        .await
    }

    async fn abort(&self, sink: FsSink) {
        drop(sink.file);
        // Best effort: a leftover temporary file is removed at the next start.
        let _ = tokio::fs::remove_file(&sink.path).await;
    }

    async fn open(&self, id: &BlobId) -> Result<Option<(File, u64)>, BlobError> {
        let path = self.path_of(id);
        match File::open(&path).await {
            Ok(f) => {
                let len = f.metadata().await.map_err(io_err(&path))?.len();
                Ok(Some((f, len)))
            }
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(&path)(e)),
        }
    }

    async fn quarantine(&self, id: &BlobId) -> Result<(), BlobError> {
        let dir = self.quarantine_dir();
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(io_err(&dir))?;
        let (from, to) = (self.path_of(id), dir.join(id.to_hex()));
        match tokio::fs::rename(&from, &to).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err(&from)(e)),
        }
    }
}

/// Runs blocking filesystem work off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, BlobError> + Send + 'static,
) -> Result<T, BlobError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| BlobError::Io {
            path: PathBuf::from("<blocking task>"),
            source: std::io::Error::other(e),
        })?
}

/// Flushes every dirty page and directory entry of the filesystem holding `dir`:
/// one `syncfs` instead of one `fsync` per file of a batch.
fn sync_filesystem(dir: &Path) -> Result<(), BlobError> {
    use std::os::fd::AsRawFd;
    let handle = std::fs::File::open(dir).map_err(io_err(dir))?;
    // SAFETY: `handle` is an open file descriptor for the duration of the call, and
    // syncfs only reads it.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::syncfs(handle.as_raw_fd()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io_err(dir)(std::io::Error::last_os_error()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    async fn put(store: &FsBlobStore, id: &BlobId, bytes: &[u8]) -> Result<(), BlobError> {
        let mut sink = store.begin().await?;
        sink.write_all(bytes).await.unwrap();
        store.commit(sink, id).await
    }

    #[tokio::test]
    async fn stores_verified_blobs_and_refuses_lies() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsBlobStore::open(dir.path()).unwrap();
        let id = BlobId::of(b"hello");
        assert!(!store.contains(&id).await.unwrap());
        put(&store, &id, b"hello").await.unwrap();
        assert!(store.contains(&id).await.unwrap());
        let (mut f, len) = store.open(&id).await.unwrap().unwrap();
        let mut back = Vec::new();
        f.read_to_end(&mut back).await.unwrap();
        assert_eq!((back.as_slice(), len), (&b"hello"[..], 5));

        let lie = BlobId::of(b"something else");
        let err = put(&store, &lie, b"hello").await.unwrap_err();
        assert!(matches!(err, BlobError::Mismatch { .. }), "{err}");
        assert!(!store.contains(&lie).await.unwrap());
        assert_eq!(store.usage().unwrap(), (1, 5));
        // Nothing is left in the temporary directory.
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0
        );
    }

    #[tokio::test]
    async fn batches_are_all_or_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsBlobStore::open(dir.path()).unwrap();
        let good = (BlobId::of(b"a"), b"a".to_vec());
        let bad = (BlobId::of(b"b"), b"not b".to_vec());
        let err = store.put_many(vec![good.clone(), bad]).await.unwrap_err();
        assert!(matches!(err, BlobError::Mismatch { .. }));
        assert_eq!(store.usage().unwrap(), (0, 0));
        store
            .put_many(vec![good.clone(), (BlobId::of(b"cc"), b"cc".to_vec())])
            .await
            .unwrap();
        assert_eq!(
            store
                .sizes_many(vec![good.0, BlobId::of(b"zz"), BlobId::of(b"cc")])
                .await
                .unwrap(),
            [Some(1), None, Some(2)]
        );
    }

    #[tokio::test]
    async fn reopening_clears_leftover_temporary_files() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsBlobStore::open(dir.path()).unwrap();
        let mut sink = store.begin().await.unwrap();
        sink.write_all(b"half a blob").await.unwrap();
        std::mem::forget(sink);
        drop(store);
        let _store = FsBlobStore::open(dir.path()).unwrap();
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0
        );
    }
}
