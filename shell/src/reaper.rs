//! Removing what the instance no longer needs — old releases, data directories
//! no generation uses — off the request path.
//!
//! Removing a release of 10,000 files takes seconds; an upgrade must not wait
//! for it. So pruning is two steps: [`retire`] renames the directory to a
//! `.prune-` sibling at once (one `rename`, so nothing can find it at its old
//! place any more and a rollback cannot pick it), and the [`Reaper`], a task the
//! instance owns, deletes retired directories one at a time on a blocking
//! thread. It stops between two entries when cancelled (the instance shutting
//! down); whatever is left — after a cancel or a `kill -9` — is a `.prune-`
//! directory, which the next open or prune finds ([`is_retired`]) and hands to
//! the reaper again. Nothing else ever looks inside one.
//!
//! After the releases it was given, the reaper sweeps the blob cache of the
//! blobs no release links any more ([`BlobCache::sweep`]), under the instance's
//! cache lock, which an upgrade holds while it fetches and links.

use std::io;
use std::path::{Path, PathBuf};

use std::sync::Arc;

use tokio::sync::{RwLock, mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::install::BlobCache;

/// The name prefix of a retired directory.
pub const RETIRED_PREFIX: &str = ".prune-";

/// Is this file name a retired directory's?
pub fn is_retired(name: &str) -> bool {
    name.starts_with(RETIRED_PREFIX)
}

/// Moves `path` out of the way, to a `.prune-` sibling, and returns where it
/// went (for [`Reaper::remove`]).
pub fn retire(path: &Path) -> io::Result<PathBuf> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no file name"))?;
    let to = path.with_file_name(format!("{RETIRED_PREFIX}{name}"));
    if to.exists() {
        // A leftover of the same name (retired before, then made again): it
        // goes first.
        remove_tree(&to, &CancellationToken::new())?;
    }
    std::fs::rename(path, &to)?;
    Ok(to)
}

/// Deletes `path` and everything under it, checking `cancel` between entries;
/// `Ok(false)` if it stopped early. Never follows a symlink.
pub fn remove_tree(path: &Path, cancel: &CancellationToken) -> io::Result<bool> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(true),
        Err(e) => return Err(e),
    };
    if !meta.is_dir() {
        std::fs::remove_file(path)?;
        return Ok(true);
    }
    for entry in std::fs::read_dir(path)? {
        if cancel.is_cancelled() {
            return Ok(false);
        }
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            if !remove_tree(&entry.path(), cancel)? {
                return Ok(false);
            }
        } else {
            match std::fs::remove_file(entry.path()) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
            crate::crash::point("mid-prune");
        }
    }
    std::fs::remove_dir(path)?;
    Ok(true)
}

/// What the reaper is asked to do.
#[derive(Debug)]
enum Job {
    /// Delete a retired directory.
    Remove(PathBuf),
    /// Sweep the blob cache, holding the lock for writing.
    Sweep(BlobCache, Arc<RwLock<()>>),
}

/// Deletes retired directories in the background (see the module docs).
#[derive(Debug)]
pub struct Reaper {
    queue: mpsc::UnboundedSender<Job>,
    /// How many directories are queued or being removed.
    pending: watch::Sender<usize>,
    cancel: CancellationToken,
}

impl Reaper {
    /// Starts the reaper's task on the current runtime.
    pub fn start() -> Self {
        let (queue, mut rx) = mpsc::unbounded_channel::<Job>();
        let (pending, _) = watch::channel(0usize);
        let cancel = CancellationToken::new();
        let (count, stop) = (pending.clone(), cancel.clone());
        tokio::spawn(async move {
            while let Some(job) = rx.recv().await {
                if !stop.is_cancelled() {
                    match job {
                        Job::Remove(path) => remove_in_background(path, &stop).await,
                        Job::Sweep(cache, lock) => {
                            let _held = lock.write_owned().await;
                            let c = stop.clone();
                            // (The sweep logs what it removed.)
                            match tokio::task::spawn_blocking(move || cache.sweep(&c)).await {
                                Ok(Ok(_)) => {}
                                Ok(Err(e)) => warn!(error = %e, "could not sweep the blob cache"),
                                Err(e) => warn!(error = %e, "the cache sweep failed"),
                            }
                        }
                    }
                }
                count.send_modify(|n| *n = n.saturating_sub(1));
            }
        });
        Self {
            queue,
            pending,
            cancel,
        }
    }

    /// Queues a retired directory for removal.
    pub fn remove(&self, path: PathBuf) {
        self.push(Job::Remove(path));
    }

    /// Queues a sweep of `cache` ([`BlobCache::sweep`]), run holding `lock`
    /// for writing, after everything queued before it.
    pub fn sweep(&self, cache: BlobCache, lock: Arc<RwLock<()>>) {
        self.push(Job::Sweep(cache, lock));
    }

    fn push(&self, job: Job) {
        self.pending.send_modify(|n| *n += 1);
        if self.queue.send(job).is_err() {
            self.pending.send_modify(|n| *n = n.saturating_sub(1));
        }
    }

    /// Waits until everything queued so far is removed (or given up on).
    pub async fn idle(&self) {
        let mut rx = self.pending.subscribe();
        let _ = rx.wait_for(|n| *n == 0).await;
    }

    /// Stops removing: the current directory is left between two entries,
    /// the queued ones as they are (all found again on the next open).
    pub fn stop(&self) {
        self.cancel.cancel();
    }
}

/// Deletes `path` on a blocking thread, logging the outcome.
async fn remove_in_background(path: PathBuf, stop: &CancellationToken) {
    let (p, c) = (path.clone(), stop.clone());
    match tokio::task::spawn_blocking(move || remove_tree(&p, &c)).await {
        Ok(Ok(true)) => debug!(dir = %path.display(), "removed"),
        Ok(Ok(false)) => {}
        Ok(Err(e)) => {
            warn!(dir = %path.display(), error = %e, "could not remove a retired directory")
        }
        Err(e) => warn!(dir = %path.display(), error = %e, "the removal task failed"),
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(root: &Path, files: usize) {
        for i in 0..files {
            let p = root.join(format!("d{}/f{i}", i % 7));
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, b"x").unwrap();
        }
    }

    #[tokio::test]
    async fn retired_directories_leave_at_once_and_are_removed_in_the_background() {
        let tmp = tempfile::tempdir().unwrap();
        let old = tmp.path().join("abc");
        tree(&old, 200);
        let outside = tmp.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("keep"), b"k").unwrap();
        std::os::unix::fs::symlink(&outside, old.join("link")).unwrap();

        let retired = retire(&old).unwrap();
        assert!(!old.exists());
        assert!(is_retired(retired.file_name().unwrap().to_str().unwrap()));
        let reaper = Reaper::start();
        reaper.remove(retired.clone());
        reaper.idle().await;
        assert!(!retired.exists());
        // The symlink went, not what it points at.
        assert!(outside.join("keep").exists());
    }

    #[tokio::test]
    async fn a_stopped_reaper_leaves_a_retired_directory_for_next_time() {
        let tmp = tempfile::tempdir().unwrap();
        let old = tmp.path().join("abc");
        tree(&old, 50);
        let retired = retire(&old).unwrap();
        let reaper = Reaper::start();
        reaper.stop();
        reaper.remove(retired.clone());
        reaper.idle().await;
        assert!(retired.exists(), "a cancelled reaper removes nothing more");
        // Cancelled half way: some entries gone, the rest still retired.
        let cancel = CancellationToken::new();
        cancel.cancel();
        assert!(!remove_tree(&retired, &cancel).unwrap());
        assert!(retired.exists());
        // Retiring a directory of the same name again replaces the leftover.
        tree(&old, 3);
        let again = retire(&old).unwrap();
        assert_eq!(again, retired);
        assert_eq!(std::fs::read_dir(&again).unwrap().count(), 3);
    }
}
