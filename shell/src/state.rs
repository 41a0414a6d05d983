//! The instance's recorded state: what is installed, and every generation so far.
//!
//! One sled database under the shell's root. The installed state — the image (if
//! the instance runs one) and, per service, its commit, tree and release — is one
//! record, replaced whole; each change of it also appends a [`Generation`] to the
//! history, in the same transaction. So the record is always exactly the old state
//! or exactly the new one, never a mix, whatever instant the shell is killed at.
//! The upgrade writes it only once the new generation is serving (DESIGN.md,
//! step 6).
//!
//! Beside each generation, in the same transaction, the data directories its
//! services used (`ROOT/data/<service>/<slot>`), so a restart or a rollback
//! gives each service the data of its generation.
//!
//! The database lives in `ROOT/state`, and every path it records (releases,
//! data directories) is stored relative to ROOT and resolved against it when
//! read: an instance root moved or copied elsewhere comes back with its paths
//! pointing into itself, not into the old place. A path outside ROOT is never
//! recorded ([`StateError::OutsideRoot`]).
//!
//! Beside them, the outcome of each operation the portal sent with a deployment
//! id ([`DeploymentOutcome`], in `outcomes`): marked running when it takes the
//! instance, replaced by its result when it ends, the newest
//! [`KEEP_OUTCOMES`] kept. A repeated request with that id is answered from
//! here (`crate::deployment`).
//!
//! Records are serde values encoded by `wire`'s codec ([`codec::encode_record`]),
//! so the shell's stored state and its messages change encoding in one place,
//! and a corrupt record is a [`StateError::Corrupt`], bounded like a frame.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

use image_spec::{CommitId, ImageId, ImageName, ServiceName, Timestamp, TreeId};
use serde::{Deserialize, Serialize};
use wire::codec::{self, FrameError};
use wire::portal::DeploymentId;
use wire::repo::RemoteError;
use wire::shell::UpgradeSummary;

/// Why the state could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The database failed.
    #[error("instance state database: {0}")]
    Db(#[from] sled::Error),
    /// A stored record does not decode.
    #[error("instance state record `{what}` is corrupt: {source}")]
    Corrupt {
        /// Which record.
        what: &'static str,
        /// Why it does not decode.
        source: FrameError,
    },
    /// A path to record is not inside the instance root.
    #[error(
        "`{path}` is not inside the instance root `{root}`; the state records only paths inside it"
    )]
    OutsideRoot {
        /// The path.
        path: PathBuf,
        /// The instance root.
        root: PathBuf,
    },
    /// A stored path is not a plain relative path (no `..`, not absolute).
    #[error("instance state record `{what}` holds `{path}`, not a path inside the instance root")]
    CorruptPath {
        /// Which record.
        what: &'static str,
        /// The stored path.
        path: PathBuf,
    },
    /// A record cannot be encoded (too large, or a path that is not UTF-8).
    #[error("instance state record `{what}` cannot be stored: {source}")]
    Encode {
        /// Which record.
        what: &'static str,
        /// Why.
        source: FrameError,
    },
}

/// One service as installed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceState {
    /// The commit.
    pub commit: CommitId,
    /// Its tree.
    pub tree: TreeId,
    /// The sealed release directory.
    pub release: PathBuf,
}

/// Everything installed on the instance.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstalledState {
    /// The image the instance runs, if it runs one (dev and QA instances may not).
    pub image: Option<(ImageName, ImageId)>,
    /// Each installed service.
    pub services: BTreeMap<ServiceName, ServiceState>,
}

/// One recorded change of the installed state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Generation {
    /// Its number, counting from 1.
    pub number: u64,
    /// When it was recorded.
    pub time: Timestamp,
    /// Why (`upgrade to shop-2`, `pull orders@main`, `rollback`).
    pub reason: String,
    /// The state it recorded.
    pub state: InstalledState,
}

/// The instance's state database (see the module docs).
///
/// One sled tree per kind of record, each with one key layout, so no reader
/// has to tell records apart by the length of their keys:
///
/// | tree | key | value |
/// |---|---|---|
/// | `current` | `installed` | [`InstalledState`] |
/// | `generations` | the number, u64 big-endian | [`Generation`] |
/// | `data_dirs` | the generation's number, u64 big-endian | [`DataDirs`] |
/// | `counters` | `last`, `allocated` | u64 |
/// | `outcomes` | the deployment id, u64 big-endian, then 0 (upgrade) or 1 (rollback) | [`DeploymentOutcome`] |
#[derive(Debug, Clone)]
pub struct State {
    /// The instance root: the directory holding the database's; recorded
    /// paths are relative to it.
    root: PathBuf,
    db: sled::Db,
    current: sled::Tree,
    generations: sled::Tree,
    data_dirs: sled::Tree,
    counters: sled::Tree,
    outcomes: sled::Tree,
}

/// Which operation of a deployment an outcome is of: a deployment that fails
/// may send the rollback of an instance with the same id as its upgrade.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum DeploymentOp {
    /// An upgrade to an image.
    Upgrade,
    /// A rollback to an earlier generation.
    Rollback,
}

impl std::fmt::Display for DeploymentOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DeploymentOp::Upgrade => "upgrade",
            DeploymentOp::Rollback => "rollback",
        })
    }
}

/// What an outcome is keyed by: a deployment and its operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OutcomeKey {
    /// The portal's deployment.
    pub deployment: DeploymentId,
    /// Which of its operations.
    pub op: DeploymentOp,
}

impl OutcomeKey {
    /// The key's bytes in `outcomes`: the id big-endian (so keys sort by id),
    /// then the operation.
    fn bytes(self) -> [u8; 9] {
        let mut key = [0; 9];
        key[..8].copy_from_slice(&self.deployment.0.to_be_bytes());
        key[8] = match self.op {
            DeploymentOp::Upgrade => 0,
            DeploymentOp::Rollback => 1,
        };
        key
    }
}

impl std::fmt::Display for OutcomeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} of deployment {}", self.op, self.deployment)
    }
}

/// The recorded outcome of a deployment's operation on this instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeploymentOutcome {
    /// It took the instance when the last recorded generation was `after`
    /// and has not ended (or the shell died before it could say how it
    /// ended): a generation recorded after `after` is its own, since one
    /// operation holds the instance at a time.
    Running {
        /// The last generation recorded when it started.
        after: u64,
    },
    /// It ended: what it did, or why it failed.
    Done(Result<UpgradeSummary, RemoteError>),
}

/// How many deployment outcomes are kept (older ones are pruned).
pub const KEEP_OUTCOMES: usize = 200;

/// The installed state's key (in `current`).
const INSTALLED: &[u8] = b"installed";
/// The last recorded generation's number (in `counters`).
const LAST: &[u8] = b"last";
/// The last generation number handed out (in `counters`).
const ALLOCATED: &[u8] = b"allocated";

/// Each service's data directory, for the services that have one.
pub type DataDirs = BTreeMap<ServiceName, PathBuf>;

fn encode<T: Serialize>(what: &'static str, v: &T) -> Result<Vec<u8>, StateError> {
    codec::encode_record(v).map_err(|source| StateError::Encode { what, source })
}

fn decode<T: serde::de::DeserializeOwned>(
    what: &'static str,
    bytes: &[u8],
) -> Result<T, StateError> {
    codec::decode_record(bytes).map_err(|source| StateError::Corrupt { what, source })
}

/// A path of names only: not empty, not absolute, no `.` or `..`.
fn is_plain_relative(path: &Path) -> bool {
    path.components().next().is_some()
        && path.components().all(|c| matches!(c, Component::Normal(_)))
}

/// `state` with every release path passed through `f`.
fn map_releases(
    state: &InstalledState,
    mut f: impl FnMut(&Path) -> Result<PathBuf, StateError>,
) -> Result<InstalledState, StateError> {
    let mut out = state.clone();
    for service in out.services.values_mut() {
        service.release = f(&service.release)?;
    }
    Ok(out)
}

/// `dirs` with every path passed through `f`.
fn map_dirs(
    dirs: &DataDirs,
    mut f: impl FnMut(&Path) -> Result<PathBuf, StateError>,
) -> Result<DataDirs, StateError> {
    dirs.iter()
        .map(|(name, dir)| Ok((name.clone(), f(dir)?)))
        .collect()
}

impl State {
    /// Opens (creating if needed) the database in `dir`, the instance's
    /// `ROOT/state`: the paths it records are relative to ROOT, the directory
    /// that holds `dir`.
    pub fn open(dir: &Path) -> Result<Self, StateError> {
        let db = embedded_db::open(dir, 8 << 20)?;
        Ok(Self {
            root: dir.parent().unwrap_or(dir).to_owned(),
            current: db.open_tree("current")?,
            generations: db.open_tree("generations")?,
            data_dirs: db.open_tree("data_dirs")?,
            counters: db.open_tree("counters")?,
            outcomes: db.open_tree("outcomes")?,
            db,
        })
    }

    /// What is installed now (empty on a new instance).
    pub fn installed(&self) -> Result<InstalledState, StateError> {
        match self.current.get(INSTALLED)? {
            Some(v) => self.resolve_state("installed", &decode("installed", &v)?),
            None => Ok(InstalledState::default()),
        }
    }

    /// `path` as it is recorded: relative to the root.
    fn to_stored(&self, path: &Path) -> Result<PathBuf, StateError> {
        path.strip_prefix(&self.root)
            .ok()
            .filter(|rel| is_plain_relative(rel))
            .map(Path::to_owned)
            .ok_or_else(|| StateError::OutsideRoot {
                path: path.to_owned(),
                root: self.root.clone(),
            })
    }

    /// A recorded path, resolved against the root.
    fn resolve(&self, what: &'static str, stored: &Path) -> Result<PathBuf, StateError> {
        if is_plain_relative(stored) {
            Ok(self.root.join(stored))
        } else {
            Err(StateError::CorruptPath {
                what,
                path: stored.to_owned(),
            })
        }
    }

    fn resolve_state(
        &self,
        what: &'static str,
        stored: &InstalledState,
    ) -> Result<InstalledState, StateError> {
        map_releases(stored, |p| self.resolve(what, p))
    }

    /// Records `state` as installed and appends it to the history, atomically and
    /// durably; returns the new generation's number.
    pub fn record(&self, state: &InstalledState, reason: &str) -> Result<u64, StateError> {
        self.record_with_data(state, reason, &DataDirs::new())
    }

    /// [`State::record`], with the data directories of the services that have
    /// one.
    pub fn record_with_data(
        &self,
        state: &InstalledState,
        reason: &str,
        data: &DataDirs,
    ) -> Result<u64, StateError> {
        let number = self.allocate_generation()?;
        self.record_generation(number, state, reason, data)?;
        Ok(number)
    }

    /// The last number recorded or handed out (0: none).
    fn last_number(&self) -> Result<u64, StateError> {
        let read = |key: &[u8]| -> Result<u64, StateError> {
            match self.counters.get(key)? {
                Some(v) => decode("generation counter", &v),
                None => Ok(0),
            }
        };
        Ok(read(LAST)?.max(read(ALLOCATED)?))
    }

    /// The number the next generation will get. Numbers are never reused: a
    /// generation that failed keeps its number ([`State::allocate_generation`]).
    pub fn next_generation(&self) -> Result<u64, StateError> {
        Ok(self.last_number()? + 1)
    }

    /// Hands out the next generation's number, durably, so that no other
    /// generation ever gets it, whether this one is recorded or fails.
    pub fn allocate_generation(&self) -> Result<u64, StateError> {
        let number = self.next_generation()?;
        self.counters
            .insert(ALLOCATED, encode("generation counter", &number)?)?;
        self.db.flush()?;
        Ok(number)
    }

    /// Records `state` as installed as generation `number` (handed out by
    /// [`State::allocate_generation`]), with its data directories, in one
    /// transaction, durably.
    pub fn record_generation(
        &self,
        number: u64,
        state: &InstalledState,
        reason: &str,
        data: &DataDirs,
    ) -> Result<(), StateError> {
        use sled::Transactional;
        let state = map_releases(state, |p| self.to_stored(p))?;
        let data = map_dirs(data, |p| self.to_stored(p))?;
        let encoded_data = encode("data directories", &data)?;
        let encoded_state = encode("installed", &state)?;
        let generation = encode(
            "generation",
            &Generation {
                number,
                time: Timestamp::now(),
                reason: reason.to_owned(),
                state,
            },
        )?;
        let encoded_number = encode("generation counter", &number)?;
        let key = number.to_be_bytes();
        (
            &self.current,
            &self.generations,
            &self.data_dirs,
            &self.counters,
        )
            .transaction(|(current, generations, data_dirs, counters)| {
                current.insert(INSTALLED, encoded_state.as_slice())?;
                generations.insert(&key, generation.as_slice())?;
                data_dirs.insert(&key, encoded_data.as_slice())?;
                counters.insert(LAST, encoded_number.as_slice())?;
                Ok(())
            })
            .map_err(embedded_db::storage_error)?;
        self.db.flush()?;
        Ok(())
    }

    /// The data directories recorded with generation `number` (none recorded:
    /// empty).
    pub fn data_dirs(&self, number: u64) -> Result<DataDirs, StateError> {
        match self.data_dirs.get(number.to_be_bytes())? {
            Some(v) => map_dirs(&decode("data directories", &v)?, |p| {
                self.resolve("data directories", p)
            }),
            None => Ok(DataDirs::new()),
        }
    }

    /// The recorded outcome of `key`, if any.
    pub fn outcome(&self, key: OutcomeKey) -> Result<Option<DeploymentOutcome>, StateError> {
        self.outcomes
            .get(key.bytes())?
            .map(|v| decode("deployment outcome", &v))
            .transpose()
    }

    /// Records the outcome of `key`, durably, and prunes the oldest beyond
    /// [`KEEP_OUTCOMES`].
    pub fn record_outcome(
        &self,
        key: OutcomeKey,
        outcome: &DeploymentOutcome,
    ) -> Result<(), StateError> {
        self.outcomes
            .insert(key.bytes(), encode("deployment outcome", outcome)?)?;
        let excess = self.outcomes.len().saturating_sub(KEEP_OUTCOMES);
        let old: Vec<sled::IVec> = self
            .outcomes
            .iter()
            .keys()
            .take(excess)
            .collect::<Result<_, _>>()?;
        for key in old {
            self.outcomes.remove(key)?;
        }
        self.db.flush()?;
        Ok(())
    }

    /// The recorded generations, oldest first.
    pub fn generations(&self) -> Result<Vec<Generation>, StateError> {
        let mut out = Vec::new();
        for kv in self.generations.iter() {
            let (_, v) = kv?;
            let mut generation: Generation = decode("generation", &v)?;
            generation.state = self.resolve_state("generation", &generation.state)?;
            out.push(generation);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The state of an instance whose root is `root`.
    fn open(root: &Path) -> State {
        State::open(&root.join("state")).unwrap()
    }

    fn service(root: &Path, n: u8) -> ServiceState {
        ServiceState {
            commit: CommitId::from_bytes([n; 32]),
            tree: TreeId::from_bytes([n; 32]),
            release: root.join(format!("releases/orders/{n}")),
        }
    }

    fn orders() -> ServiceName {
        ServiceName::new("orders").unwrap()
    }

    fn one_service(root: &Path, n: u8) -> InstalledState {
        let mut state = InstalledState::default();
        state.services.insert(orders(), service(root, n));
        state
    }

    #[test]
    fn a_corrupt_record_is_a_typed_error_naming_it() {
        let root = tempfile::tempdir().unwrap();
        let state = open(root.path());
        let s1 = one_service(root.path(), 1);
        state.record(&s1, "pull orders").unwrap();
        // What the codec wrote reads back (with the release relative to the
        // root); a record cut short does not.
        let stored = state.current.get(INSTALLED).unwrap().unwrap();
        let decoded: InstalledState = codec::decode_record(&stored).unwrap();
        assert_eq!(
            decoded.services[&orders()].release,
            Path::new("releases/orders/1")
        );
        state
            .current
            .insert(INSTALLED, &stored[..stored.len() - 1])
            .unwrap();
        let err = state.installed().unwrap_err();
        assert!(
            matches!(
                err,
                StateError::Corrupt {
                    what: "installed",
                    ..
                }
            ),
            "{err}"
        );
        // No image, then a service count claiming two billion entries: refused
        // without reserving room for them.
        state
            .current
            .insert(INSTALLED, &[0, 0xfc, 0xff, 0xff, 0xff, 0x7f][..])
            .unwrap();
        assert!(matches!(state.installed(), Err(StateError::Corrupt { .. })));
    }

    #[test]
    fn each_tree_keeps_one_key_layout() {
        let root = tempfile::tempdir().unwrap();
        let state = open(root.path());
        let s1 = one_service(root.path(), 1);
        let dirs = DataDirs::from([(orders(), root.path().join("data/orders/g1"))]);
        state.record_with_data(&s1, "one", &dirs).unwrap();
        state.allocate_generation().unwrap();
        state.record(&s1, "three").unwrap();

        let keys = |tree: &sled::Tree| -> Vec<Vec<u8>> {
            tree.iter().keys().map(|k| k.unwrap().to_vec()).collect()
        };
        let numbers = [1u64, 3].map(|n| n.to_be_bytes().to_vec());
        assert_eq!(keys(&state.current), [INSTALLED.to_vec()]);
        assert_eq!(keys(&state.generations), numbers);
        assert_eq!(keys(&state.data_dirs), numbers);
        let mut counters = keys(&state.counters);
        counters.sort();
        assert_eq!(counters, [ALLOCATED.to_vec(), LAST.to_vec()]);
        // Every generation is found under its own number, and only there.
        for (k, v) in state.generations.iter().map(Result::unwrap) {
            let g: Generation = codec::decode_record(&v).unwrap();
            assert_eq!(k.as_ref(), g.number.to_be_bytes());
        }
        assert_eq!(state.data_dirs(1).unwrap(), dirs);
        assert_eq!(state.data_dirs(3).unwrap(), DataDirs::new());
        assert_eq!(state.next_generation().unwrap(), 4);
    }

    #[test]
    fn records_replace_the_state_and_grow_the_history() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let state = open(root);
        assert_eq!(state.installed().unwrap(), InstalledState::default());

        let s1 = one_service(root, 1);
        assert_eq!(state.record(&s1, "pull orders").unwrap(), 1);
        let mut s2 = s1.clone();
        s2.image = Some((
            ImageName::new("shop-2").unwrap(),
            ImageId::from_bytes([9; 32]),
        ));
        s2.services.insert(orders(), service(root, 2));
        s2.services
            .insert(ServiceName::new("hello").unwrap(), service(root, 3));
        assert_eq!(state.record(&s2, "upgrade to shop-2").unwrap(), 2);
        assert_eq!(state.installed().unwrap(), s2);
        drop(state);

        // Everything survives reopening.
        let state = open(root);
        assert_eq!(state.installed().unwrap(), s2);
        let history = state.generations().unwrap();
        assert_eq!(history.len(), 2);
        assert_eq!(
            (history[0].number, history[0].reason.as_str()),
            (1, "pull orders")
        );
        assert_eq!(history[0].state, s1);
        assert_eq!(history[1].state, s2);
        assert_eq!(state.data_dirs(2).unwrap(), DataDirs::new());

        // Data directories travel with their generation.
        let dirs = DataDirs::from([(orders(), root.join("data/orders/g3"))]);
        assert_eq!(state.record_with_data(&s1, "rollback", &dirs).unwrap(), 3);
        assert_eq!(state.data_dirs(3).unwrap(), dirs);
        assert_eq!(state.generations().unwrap().len(), 3);

        // A number handed out and never recorded (a failed generation) is not
        // given again, also after a reopen.
        assert_eq!(state.allocate_generation().unwrap(), 4);
        drop(state);
        let state = open(root);
        assert_eq!(state.next_generation().unwrap(), 5);
        assert_eq!(state.record(&s2, "upgrade").unwrap(), 5);
        let numbers: Vec<u64> = state
            .generations()
            .unwrap()
            .iter()
            .map(|g| g.number)
            .collect();
        assert_eq!(numbers, [1, 2, 3, 5]);
    }

    #[test]
    fn a_moved_or_copied_root_finds_its_paths_where_it_is_now() {
        let dir = tempfile::tempdir().unwrap();
        let (old, moved, copy) = (
            dir.path().join("old"),
            dir.path().join("moved"),
            dir.path().join("copy"),
        );
        let state = open(&old);
        let s1 = one_service(&old, 1);
        state
            .record_with_data(
                &s1,
                "one",
                &DataDirs::from([(orders(), old.join("data/orders/g1"))]),
            )
            .unwrap();
        state.record(&one_service(&old, 2), "two").unwrap();
        drop(state);

        std::fs::rename(&old, &moved).unwrap();
        fs_extra::dir::copy(
            &moved,
            &copy,
            &fs_extra::dir::CopyOptions::new().copy_inside(true),
        )
        .unwrap();
        for root in [&moved, &copy] {
            let state = open(root);
            // Every path read is inside this root, none inside the old one.
            assert_eq!(state.installed().unwrap(), one_service(root, 2));
            let history = state.generations().unwrap();
            assert_eq!(history[0].state, one_service(root, 1));
            assert_eq!(history[1].state, one_service(root, 2));
            assert_eq!(
                state.data_dirs(1).unwrap(),
                DataDirs::from([(orders(), root.join("data/orders/g1"))])
            );
            // And what is recorded from here is relative again.
            state.record(&one_service(root, 3), "three").unwrap();
            drop(state);
            assert_eq!(open(root).installed().unwrap(), one_service(root, 3));
        }
    }

    #[test]
    fn only_paths_inside_the_root_are_recorded_or_read() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("instance");
        let state = open(&root);
        state.record(&one_service(&root, 1), "one").unwrap();

        // Outside the root, or climbing out of it: refused, nothing changes.
        for outside in [
            dir.path().join("elsewhere/releases/x"),
            root.join("../elsewhere"),
            root.clone(),
        ] {
            let mut s = one_service(&root, 2);
            s.services.get_mut(&orders()).unwrap().release = outside.clone();
            let err = state.record(&s, "outside").unwrap_err();
            assert!(
                matches!(&err, StateError::OutsideRoot { path, .. } if *path == outside),
                "{err}"
            );
            let data = DataDirs::from([(orders(), outside.clone())]);
            let err = state
                .record_with_data(&one_service(&root, 2), "outside", &data)
                .unwrap_err();
            assert!(matches!(err, StateError::OutsideRoot { .. }), "{err}");
        }
        assert_eq!(state.installed().unwrap(), one_service(&root, 1));
        assert_eq!(state.generations().unwrap().len(), 1);

        // A stored path that would leave the root is a corrupt record.
        for stored in ["/etc", "../elsewhere", "releases/../../x", ""] {
            let mut s = one_service(Path::new(""), 1);
            s.services.get_mut(&orders()).unwrap().release = PathBuf::from(stored);
            state
                .current
                .insert(INSTALLED, codec::encode_record(&s).unwrap())
                .unwrap();
            let err = state.installed().unwrap_err();
            assert!(
                matches!(&err, StateError::CorruptPath { what: "installed", path } if path == Path::new(stored)),
                "{stored}: {err}"
            );
        }
    }

    #[test]
    fn deployment_outcomes_are_kept_by_id_and_operation_and_pruned() {
        let root = tempfile::tempdir().unwrap();
        let state = open(root.path());
        let key = |id: u64, op| OutcomeKey {
            deployment: DeploymentId(id),
            op,
        };
        let summary = UpgradeSummary {
            generation: Some(3),
            reason: "upgrade to shop-2".into(),
            ..UpgradeSummary::default()
        };
        assert_eq!(state.outcome(key(1, DeploymentOp::Upgrade)).unwrap(), None);
        let running = DeploymentOutcome::Running { after: 2 };
        state
            .record_outcome(key(1, DeploymentOp::Upgrade), &running)
            .unwrap();
        let done = DeploymentOutcome::Done(Ok(summary));
        state
            .record_outcome(key(1, DeploymentOp::Upgrade), &done)
            .unwrap();
        let failed = DeploymentOutcome::Done(Err(RemoteError::new(
            wire::repo::ErrorKind::Invalid,
            "no such generation",
        )));
        state
            .record_outcome(key(1, DeploymentOp::Rollback), &failed)
            .unwrap();
        drop(state);

        // Both survive a reopen, each under its own operation.
        let state = open(root.path());
        assert_eq!(
            state.outcome(key(1, DeploymentOp::Upgrade)).unwrap(),
            Some(done.clone())
        );
        assert_eq!(
            state.outcome(key(1, DeploymentOp::Rollback)).unwrap(),
            Some(failed)
        );

        // The newest are kept: ids from 2 up push out 1's two records first.
        for id in 2..(KEEP_OUTCOMES as u64 + 2) {
            state
                .record_outcome(key(id, DeploymentOp::Upgrade), &done)
                .unwrap();
        }
        assert_eq!(state.outcomes.len(), KEEP_OUTCOMES);
        assert_eq!(state.outcome(key(1, DeploymentOp::Upgrade)).unwrap(), None);
        assert_eq!(state.outcome(key(1, DeploymentOp::Rollback)).unwrap(), None);
        assert_eq!(
            state.outcome(key(2, DeploymentOp::Upgrade)).unwrap(),
            Some(done)
        );
    }
}
