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
//! Records are serde values encoded by `wire`'s codec ([`codec::encode_record`]),
//! so the shell's stored state and its messages change encoding in one place,
//! and a corrupt record is a [`StateError::Corrupt`], bounded like a frame.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use image_spec::{CommitId, ImageId, ImageName, ServiceName, Timestamp, TreeId};
use serde::{Deserialize, Serialize};
use wire::codec::{self, FrameError};

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
#[derive(Debug, Clone)]
pub struct State {
    db: sled::Db,
    current: sled::Tree,
    generations: sled::Tree,
    data_dirs: sled::Tree,
    counters: sled::Tree,
}

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

impl State {
    /// Opens (creating if needed) the database in `dir`.
    pub fn open(dir: &Path) -> Result<Self, StateError> {
        let db = embedded_db::open(dir, 8 << 20)?;
        Ok(Self {
            current: db.open_tree("current")?,
            generations: db.open_tree("generations")?,
            data_dirs: db.open_tree("data_dirs")?,
            counters: db.open_tree("counters")?,
            db,
        })
    }

    /// What is installed now (empty on a new instance).
    pub fn installed(&self) -> Result<InstalledState, StateError> {
        match self.current.get(INSTALLED)? {
            Some(v) => decode("installed", &v),
            None => Ok(InstalledState::default()),
        }
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
        let encoded_data = encode("data directories", data)?;
        let encoded_state = encode("installed", state)?;
        let generation = encode(
            "generation",
            &Generation {
                number,
                time: Timestamp::now(),
                reason: reason.to_owned(),
                state: state.clone(),
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
            Some(v) => decode("data directories", &v),
            None => Ok(DataDirs::new()),
        }
    }

    /// The recorded generations, oldest first.
    pub fn generations(&self) -> Result<Vec<Generation>, StateError> {
        let mut out = Vec::new();
        for kv in self.generations.iter() {
            let (_, v) = kv?;
            out.push(decode("generation", &v)?);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(n: u8) -> ServiceState {
        ServiceState {
            commit: CommitId::from_bytes([n; 32]),
            tree: TreeId::from_bytes([n; 32]),
            release: PathBuf::from(format!("/releases/{n}")),
        }
    }

    #[test]
    fn a_corrupt_record_is_a_typed_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let state = State::open(dir.path()).unwrap();
        let mut s1 = InstalledState::default();
        s1.services
            .insert(ServiceName::new("orders").unwrap(), service(1));
        state.record(&s1, "pull orders").unwrap();
        // What the codec wrote reads back; a record cut short does not.
        let stored = state.current.get(INSTALLED).unwrap().unwrap();
        assert_eq!(codec::decode_record::<InstalledState>(&stored).unwrap(), s1);
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
        let dir = tempfile::tempdir().unwrap();
        let state = State::open(dir.path()).unwrap();
        let mut s1 = InstalledState::default();
        s1.services
            .insert(ServiceName::new("orders").unwrap(), service(1));
        let dirs = DataDirs::from([(
            ServiceName::new("orders").unwrap(),
            PathBuf::from("/data/orders/g1"),
        )]);
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
        let state = State::open(dir.path()).unwrap();
        assert_eq!(state.installed().unwrap(), InstalledState::default());

        let mut s1 = InstalledState::default();
        s1.services
            .insert(ServiceName::new("orders").unwrap(), service(1));
        assert_eq!(state.record(&s1, "pull orders").unwrap(), 1);
        let mut s2 = s1.clone();
        s2.image = Some((
            ImageName::new("shop-2").unwrap(),
            ImageId::from_bytes([9; 32]),
        ));
        s2.services
            .insert(ServiceName::new("orders").unwrap(), service(2));
        s2.services
            .insert(ServiceName::new("hello").unwrap(), service(3));
        assert_eq!(state.record(&s2, "upgrade to shop-2").unwrap(), 2);
        assert_eq!(state.installed().unwrap(), s2);
        drop(state);

        // Everything survives reopening.
        let state = State::open(dir.path()).unwrap();
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
        let dirs = DataDirs::from([(
            ServiceName::new("orders").unwrap(),
            PathBuf::from("/data/orders/g3"),
        )]);
        assert_eq!(state.record_with_data(&s1, "rollback", &dirs).unwrap(), 3);
        assert_eq!(state.data_dirs(3).unwrap(), dirs);
        assert_eq!(state.generations().unwrap().len(), 3);

        // A number handed out and never recorded (a failed generation) is not
        // given again, also after a reopen.
        assert_eq!(state.allocate_generation().unwrap(), 4);
        drop(state);
        let state = State::open(dir.path()).unwrap();
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
}
