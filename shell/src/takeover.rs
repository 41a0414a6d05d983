//! What one shell hands the shell that takes over its instance, and which
//! versions of it a shell accepts.
//!
//! The state handed over carries the version of its layout
//! ([`HANDOVER_VERSION`]). A shell takes state of its own version and of the
//! one before it (the previous release of molt), and refuses newer state with
//! a clear error: an older shell cannot know what a newer one meant. Tests
//! (and drills) make a binary claim another version with
//! `MOLT_HANDOVER_VERSION` ([`handover_version`]) instead of building a
//! second copy of molt.
//!
//! The messages travel as [`crate::fdpass`] frames over the instance's
//! takeover socket ([`socket_path`]): the taker asks ([`ToHolder::Ask`]), the
//! holder offers its state with the public ports' listening sockets attached
//! in [`Handover::fronts`] order ([`ToTaker::Offer`]), the taker says it
//! serves ([`ToHolder::Ready`]) or why it cannot, the holder lets go of the
//! keeper, its fronts and its supervisors ([`ToTaker::Released`]), the taker
//! asks for the plugins' state once none of its requests is in flight on the
//! holder's plugins ([`ToHolder::Export`]), the holder hands it over
//! ([`ToTaker::Exported`]), the taker says it serves everything
//! ([`ToHolder::Done`]) and the holder exits. [`Channel`] carries them, each wait
//! bounded.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use image_spec::{CommitId, InstanceName, ServiceName, TreeId};
use serde::{Deserialize, Serialize};

/// The version of the handover's layout this shell writes.
pub const HANDOVER_VERSION: u32 = 1;

/// The variable that makes this binary claim another handover version.
pub const VERSION_OVERRIDE: &str = "MOLT_HANDOVER_VERSION";

/// The handover version this process speaks: [`HANDOVER_VERSION`], unless
/// [`VERSION_OVERRIDE`] names another (a number; anything else is ignored).
pub fn handover_version() -> u32 {
    version_from(std::env::var(VERSION_OVERRIDE).ok().as_deref())
}

/// The version an override's value names (none, or not a number: ours).
fn version_from(value: Option<&str>) -> u32 {
    value
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(HANDOVER_VERSION)
}

/// Why a takeover cannot go on.
#[derive(Debug, thiserror::Error)]
pub enum TakeoverError {
    /// The state was written by a newer shell.
    #[error(
        "the running shell hands over state of version {theirs}, newer than this shell's {mine}: \
         upgrade molt to a release that knows it, or restart the shell instead"
    )]
    Newer {
        /// The state's version.
        theirs: u32,
        /// This shell's.
        mine: u32,
    },
    /// The state was written by a shell more than one release older.
    #[error(
        "the running shell hands over state of version {theirs}; this shell takes {oldest} to \
         {mine}: take over through the release in between, or restart the shell instead"
    )]
    Older {
        /// The state's version.
        theirs: u32,
        /// The oldest this shell takes.
        oldest: u32,
        /// This shell's.
        mine: u32,
    },
    /// The other shell refused, and said why.
    #[error("the other shell refused: {0}")]
    Refused(String),
    /// The channel to the other shell failed (it exited, or did not answer
    /// in time).
    #[error("the takeover channel {doing}: {source}")]
    Channel {
        /// What was being done (`waiting for the offer`).
        doing: &'static str,
        /// Why it failed.
        source: crate::fdpass::FdPassError,
    },
    /// The other shell sent a message out of turn.
    #[error("the other shell sent {got} while this one was {doing}")]
    OutOfTurn {
        /// What was being done.
        doing: &'static str,
        /// What came instead.
        got: String,
    },
}

/// The takeover socket of the instance whose root is `root`.
pub fn socket_path(root: &Path) -> PathBuf {
    root.join("takeover.sock")
}

/// One end of a takeover's conversation: blocking, each receive bounded by a
/// timeout (call it from `spawn_blocking`).
#[derive(Debug)]
pub struct Channel {
    stream: UnixStream,
}

impl Channel {
    /// Wraps a connected stream.
    pub fn new(stream: UnixStream) -> Self {
        Self { stream }
    }

    /// Sends `msg` with `fds` attached.
    pub fn send<T: Serialize>(
        &self,
        msg: &T,
        fds: &[std::os::fd::BorrowedFd<'_>],
        doing: &'static str,
    ) -> Result<(), TakeoverError> {
        crate::fdpass::send(&self.stream, msg, fds)
            .map_err(|source| TakeoverError::Channel { doing, source })
    }

    /// Waits up to `timeout` for the next message (`None`: no limit).
    pub fn recv<T: serde::de::DeserializeOwned>(
        &self,
        timeout: Option<Duration>,
        doing: &'static str,
    ) -> Result<(T, Vec<OwnedFd>), TakeoverError> {
        let channel = |source| TakeoverError::Channel { doing, source };
        self.stream
            .set_read_timeout(timeout)
            .map_err(|e| channel(e.into()))?;
        crate::fdpass::recv(&self.stream).map_err(channel)
    }

    /// A second handle on the same conversation (for another thread).
    pub fn try_clone(&self) -> std::io::Result<Self> {
        Ok(Self {
            stream: self.stream.try_clone()?,
        })
    }
}

/// Whether a shell of version `mine` takes state of version `theirs`.
pub fn accepts(theirs: u32, mine: u32) -> Result<(), TakeoverError> {
    let oldest = mine.saturating_sub(1);
    if theirs > mine {
        Err(TakeoverError::Newer { theirs, mine })
    } else if theirs < oldest {
        Err(TakeoverError::Older {
            theirs,
            oldest,
            mine,
        })
    } else {
        Ok(())
    }
}

/// One running service as the holder hands it over.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandedService {
    /// The service.
    pub name: ServiceName,
    /// Its commit.
    pub commit: CommitId,
    /// Its release's tree (stored under `ROOT/trees`).
    pub tree: TreeId,
    /// Its release directory.
    pub release: PathBuf,
    /// Its process id: a child of the keeper (`None`: waiting to be
    /// restarted), or, for a plugin, the holder itself.
    pub pid: Option<u32>,
    /// A plugin served inside the holder (its state comes with
    /// [`ToTaker::Exported`]), not a process.
    pub plugin: bool,
    /// Its internal port per port name (a plugin's: its host's, in the
    /// holder, until the taker starts its own).
    pub ports: BTreeMap<String, u16>,
    /// Its data directory, if it has one.
    pub data: Option<PathBuf>,
    /// Its log.
    pub log: PathBuf,
    /// How long it has been running, in milliseconds.
    pub uptime_ms: u64,
}

/// One public port as the holder hands it over; its listening socket comes
/// attached to the offer, in this order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandedFront {
    /// The service.
    pub service: ServiceName,
    /// The port's name.
    pub port: String,
    /// Its public address.
    pub public: SocketAddr,
    /// `true` for `http`, `false` for `tcp`.
    pub http: bool,
}

/// Everything the taker needs to serve the instance as the holder does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Handover {
    /// The layout's version.
    pub version: u32,
    /// The instance.
    pub instance: InstanceName,
    /// The generation it runs.
    pub generation: u64,
    /// The address the holder takes commands on, if it listens (a taker
    /// told to listen on port 0 takes the same).
    pub commands: Option<SocketAddr>,
    /// The keeper's token (see [`crate::keeper`]).
    pub keeper_token: String,
    /// Its running services.
    pub services: Vec<HandedService>,
    /// Its public ports.
    pub fronts: Vec<HandedFront>,
}

/// What the taker sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToHolder {
    /// "I would take over; I speak `version`."
    Ask {
        /// The taker's handover version.
        version: u32,
    },
    /// "I serve: let go."
    Ready,
    /// "Nothing of mine is in flight on your plugins: hand me their state."
    Export,
    /// "I serve everything: go." (The holder exits; the taker opens the
    /// state once it has.)
    Done,
    /// "I cannot take over, because …": the holder serves on.
    Refuse(String),
}

/// What the holder sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToTaker {
    /// The state, with the listening sockets attached.
    Offer(Handover),
    /// "I let go": the keeper is released, the old fronts drained and the
    /// supervisors detached; only the plugins still run here.
    Released,
    /// The plugins' exported state, by service (a plugin whose export failed
    /// is missing).
    Exported(BTreeMap<ServiceName, Vec<u8>>),
    /// "Not now, because …".
    Refuse(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_override_names_a_version_or_is_ignored() {
        assert_eq!(version_from(None), HANDOVER_VERSION);
        assert_eq!(version_from(Some(" 7 ")), 7);
        assert_eq!(version_from(Some("seven")), HANDOVER_VERSION);
    }

    #[test]
    fn a_shell_takes_its_own_version_and_the_one_before_never_a_newer() {
        assert!(accepts(5, 5).is_ok());
        assert!(accepts(4, 5).is_ok());
        assert!(matches!(
            accepts(6, 5),
            Err(TakeoverError::Newer { theirs: 6, mine: 5 })
        ));
        assert!(matches!(
            accepts(3, 5),
            Err(TakeoverError::Older {
                theirs: 3,
                oldest: 4,
                mine: 5
            })
        ));
        assert!(accepts(0, 1).is_ok());
        let newer = accepts(2, 1).unwrap_err().to_string();
        assert!(newer.contains("newer than this shell's 1"), "{newer}");
    }

    #[test]
    fn the_offer_travels_with_its_sockets_in_order() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let listeners: Vec<std::net::TcpListener> = (0..2)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
            .collect();
        let fronts: Vec<HandedFront> = listeners
            .iter()
            .enumerate()
            .map(|(i, l)| HandedFront {
                service: ServiceName::new("hello").unwrap(),
                port: format!("p{i}"),
                public: l.local_addr().unwrap(),
                http: i == 0,
            })
            .collect();
        let offer = ToTaker::Offer(Handover {
            version: handover_version(),
            instance: InstanceName::new("dev-1").unwrap(),
            generation: 3,
            commands: None,
            keeper_token: "t".into(),
            services: vec![HandedService {
                name: ServiceName::new("hello").unwrap(),
                commit: CommitId::from_bytes([1; 32]),
                tree: TreeId::from_bytes([2; 32]),
                release: "/r".into(),
                pid: Some(42),
                plugin: false,
                ports: BTreeMap::from([("main".to_owned(), 9000)]),
                data: None,
                log: "/l".into(),
                uptime_ms: 5,
            }],
            fronts,
        });
        use std::os::fd::AsFd;
        let fds: Vec<_> = listeners.iter().map(|l| l.as_fd()).collect();
        crate::fdpass::send(&a, &offer, &fds).unwrap();
        let (got, sockets): (ToTaker, _) = crate::fdpass::recv(&b).unwrap();
        assert_eq!(got, offer);
        let ToTaker::Offer(handover) = got else {
            unreachable!()
        };
        for (front, fd) in handover.fronts.iter().zip(sockets) {
            let l = std::net::TcpListener::from(fd);
            assert_eq!(l.local_addr().unwrap(), front.public);
        }
    }
}
