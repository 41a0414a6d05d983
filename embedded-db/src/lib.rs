//! How a molt component opens its embedded database.
//!
//! Each component that keeps records (the repository's metadata, a shell's
//! installed state, later the portal's) owns one sled database that nothing else
//! opens (DESIGN.md). They open it the same way, and that way lives here, apart
//! from any component's storage, so the shell can share it without depending on
//! the repository server:
//!
//! - the page cache is bounded by the caller ([`open`]'s `cache_bytes`): records
//!   are small and bulk data never goes into sled;
//! - a reopen in the same process waits for the lock of a handle being let go.
//!   sled drops its file lock only once its background threads release the
//!   database, a moment after the last handle is dropped; a shell or repository
//!   restarted in place (`molt up`, the tests) would otherwise fail at random. A
//!   lock that stays held — another live process on the same directory — is
//!   still an error, after [`LOCK_WAIT`].
//!
//! Beside the database, [`journal`]: the append-only, hash-chained record of
//! changes a component checks its database against at start and rebuilds it
//! from.
//!
//! It also flattens sled's transaction error for the transactions the components
//! run, which never abort on purpose ([`storage_error`]).
//!
//! ```no_run
//! # fn demo() -> Result<(), sled::Error> {
//! let db = embedded_db::open(std::path::Path::new("/var/lib/molt/state"), 8 << 20)?;
//! db.insert(b"key", b"value".as_slice())?;
//! db.flush()?;
//! # Ok(())
//! # }
//! ```

pub mod journal;

use std::convert::Infallible;
use std::path::Path;
use std::time::{Duration, Instant};

use sled::transaction::TransactionError;

/// How long [`open`] waits for a lock that is being let go.
pub const LOCK_WAIT: Duration = Duration::from_secs(5);

/// Opens (creating if needed) the sled database in `dir` with a page cache of
/// `cache_bytes`, waiting up to [`LOCK_WAIT`] for a lock being let go (see the
/// crate docs).
pub fn open(dir: &Path, cache_bytes: u64) -> Result<sled::Db, sled::Error> {
    open_waiting(dir, cache_bytes, LOCK_WAIT)
}

fn open_waiting(dir: &Path, cache_bytes: u64, wait: Duration) -> Result<sled::Db, sled::Error> {
    let deadline = Instant::now() + wait;
    loop {
        match sled::Config::new()
            .path(dir)
            .cache_capacity(cache_bytes)
            .open()
        {
            Err(sled::Error::Io(e))
                if e.to_string().contains("could not acquire lock")
                    && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

/// The storage error of a transaction that cannot abort on purpose (its closure
/// only returns sled's own conflicts and errors): the one way it fails.
pub fn storage_error(e: TransactionError<Infallible>) -> sled::Error {
    match e {
        TransactionError::Storage(e) => e,
        TransactionError::Abort(never) => match never {},
    }
}

/// Syncs the directory holding `path`, so a file created or renamed there
/// survives a crash.
pub fn sync_parent(path: &Path) -> std::io::Result<()> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    std::fs::File::open(parent)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reopen_waits_for_a_lock_being_let_go_but_not_for_one_held() {
        let dir = tempfile::tempdir().unwrap();
        let held = open(dir.path(), 1 << 20).unwrap();
        // Held throughout: still the lock error, after the (short) wait.
        let err = open_waiting(dir.path(), 1 << 20, Duration::from_millis(100)).unwrap_err();
        assert!(err.to_string().contains("could not acquire lock"), "{err}");
        // Let go while the reopen waits: the reopen succeeds.
        let releaser = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            drop(held);
        });
        let reopened = open(dir.path(), 1 << 20).unwrap();
        releaser.join().unwrap();
        reopened.insert(b"k", b"v".as_slice()).unwrap();
        assert_eq!(
            reopened.get(b"k").unwrap().as_deref(),
            Some(b"v".as_slice())
        );
    }

    #[test]
    fn a_transaction_over_several_trees_reports_its_storage_error_plainly() {
        use sled::Transactional;
        let dir = tempfile::tempdir().unwrap();
        let db = open(dir.path(), 1 << 20).unwrap();
        let (a, b) = (db.open_tree("a").unwrap(), db.open_tree("b").unwrap());
        (&a, &b)
            .transaction(|(a, b)| {
                a.insert(b"k", b"1".as_slice())?;
                b.insert(b"k", b"2".as_slice())?;
                Ok(())
            })
            .map_err(storage_error)
            .unwrap();
        assert_eq!(a.get(b"k").unwrap().as_deref(), Some(b"1".as_slice()));
        assert_eq!(b.get(b"k").unwrap().as_deref(), Some(b"2".as_slice()));
        let err = storage_error(TransactionError::Storage(sled::Error::Unsupported(
            "test".into(),
        )));
        assert!(matches!(err, sled::Error::Unsupported(m) if m == "test"));
    }
}
