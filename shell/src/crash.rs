//! Crash points, for the tests that prove an upgrade survives `kill -9`.
//!
//! With `MOLT_CRASH_AT=POINT` (or `POINT:N`, the N-th time it is reached; default
//! the first) in its environment, the shell sends itself SIGKILL when an upgrade
//! reaches that point — the same death as `kill -9` from outside, but at a
//! chosen step instead of a lucky moment. Without the variable a point costs one
//! atomic load. The points, in upgrade order:
//!
//! - `after-fetch`: the missing blobs are in the cache, no release exists yet;
//! - `mid-copy`: a new release (not the first of its service) is half made;
//! - `mid-build`: the build command is running;
//! - `after-switch`: a new process serves a front, its old one still runs;
//! - `before-record`: every new process serves, the state is not recorded yet;
//! - `after-record`: the new state is recorded, old releases not yet pruned;
//! - `mid-prune`: an old release or data directory is half deleted (in the
//!   background, after the upgrade).

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

/// The environment variable that arms a crash point.
pub const CRASH_AT: &str = "MOLT_CRASH_AT";

struct Armed {
    point: String,
    nth: u32,
    seen: AtomicU32,
}

fn armed() -> Option<&'static Armed> {
    static ARMED: OnceLock<Option<Armed>> = OnceLock::new();
    ARMED
        .get_or_init(|| {
            let spec = std::env::var(CRASH_AT).ok()?;
            let (point, nth) = match spec.split_once(':') {
                Some((p, n)) => (p.to_owned(), n.parse().ok()?),
                None => (spec, 1),
            };
            Some(Armed {
                point,
                nth,
                seen: AtomicU32::new(0),
            })
        })
        .as_ref()
}

/// Dies here, by SIGKILL, if this point is armed (see the module docs).
pub(crate) fn point(name: &str) {
    let Some(armed) = armed() else { return };
    if armed.point != name || armed.seen.fetch_add(1, Ordering::SeqCst) + 1 != armed.nth {
        return;
    }
    eprintln!("crash point `{name}` reached: SIGKILL");
    // SAFETY: kill(2) on our own pid with a valid signal number.
    #[allow(unsafe_code)]
    unsafe {
        libc::kill(libc::getpid(), libc::SIGKILL);
    }
}
