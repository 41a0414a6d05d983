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
//! Every change is first appended, synced, to the state's journal
//! (`ROOT/state.journal`, [`embedded_db::journal`]) as a [`StateRecord`], then
//! applied to the database in one transaction with the journal position it
//! reached. sled recovers a damaged file by dropping what follows the damage —
//! a shell would come back on an older generation, or on none — so opening
//! replays the journal and compares: a database that differs or lags is
//! rebuilt from it (a warning names what differed); a journal behind its
//! database, disagreeing with it, or damaged is a typed error naming
//! `molt fsck --root ROOT --repair` ([`crate::fsck`]).
//!
//! Records are serde values encoded by `wire`'s codec ([`codec::encode_record`]),
//! so the shell's stored state and its messages change encoding in one place,
//! and a corrupt record is a [`StateError::Corrupt`], bounded like a frame.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};

use embedded_db::journal::{Contents, Journal, JournalError, Position, Standing};

use image_spec::{CommitId, ImageId, ImageName, ServiceName, Timestamp, TreeId};
use serde::{Deserialize, Serialize};
use wire::codec::{self, FrameError};
use wire::portal::DeploymentId;
use wire::repo::RemoteError;
pub use wire::shell::Overlays;
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
    /// The state's journal could not be read or written, or is damaged.
    #[error("{0}; run `molt fsck --root ROOT --repair`")]
    Journal(#[from] JournalError),
    /// The database has applied more of the journal than the journal holds.
    #[error(
        "the state journal `{path}` ends at record {journal} but the state database has applied \
         {index}: the journal lost its tail or an older copy was restored; run \
         `molt fsck --root ROOT --repair`"
    )]
    JournalBehind {
        /// The journal.
        path: PathBuf,
        /// Its records.
        journal: u64,
        /// What the database applied.
        index: u64,
    },
    /// The database applied a different record than the journal holds there.
    #[error(
        "the state journal `{path}` and the state database disagree at record {seq}; run \
         `molt fsck --root ROOT --repair`"
    )]
    Diverged {
        /// The journal.
        path: PathBuf,
        /// The record.
        seq: u64,
    },
    /// An earlier change reached the journal but not the database.
    #[error("the state database fell behind its journal; restart the shell")]
    Stale,
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
    overlays: sled::Tree,
    /// `at` → the journal [`Position`] the database has applied.
    applied: sled::Tree,
    writer: Arc<Mutex<Writer>>,
    journal_path: PathBuf,
}

/// The journal's writer, and whether the database keeps up with it.
#[derive(Debug)]
struct Writer {
    journal: Journal,
    stale: bool,
}

/// One change of the instance's state, as its journal records it. Paths are
/// relative to the root, as the database stores them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StateRecord {
    /// A generation number was handed out.
    Allocated {
        /// The number.
        number: u64,
    },
    /// A generation was recorded: it is now the installed state (written by
    /// shells before overlays; read, no longer written).
    Generation {
        /// The generation.
        generation: Generation,
        /// Its services' data directories.
        data: DataDirs,
    },
    /// A deployment's outcome was recorded.
    Outcome {
        /// The deployment.
        deployment: DeploymentId,
        /// Which of its operations.
        op: DeploymentOp,
        /// The outcome.
        outcome: DeploymentOutcome,
    },
    /// A generation was recorded: it is now the installed state, with the
    /// services that run another commit than its image's.
    Recorded {
        /// The generation.
        generation: Generation,
        /// Its services' data directories.
        data: DataDirs,
        /// Its overlays.
        overlays: Overlays,
    },
}

impl StateRecord {
    /// The generation the record records, if it records one.
    pub fn generation(&self) -> Option<&Generation> {
        match self {
            StateRecord::Generation { generation, .. }
            | StateRecord::Recorded { generation, .. } => Some(generation),
            StateRecord::Allocated { .. } | StateRecord::Outcome { .. } => None,
        }
    }
}

/// The database's contents: tree name → key → value.
pub type Tables = BTreeMap<&'static str, BTreeMap<Vec<u8>, Vec<u8>>>;

/// The trees a journal replay fills, by name.
const TREES: [&str; 6] = [
    "current",
    "generations",
    "data_dirs",
    "counters",
    "outcomes",
    "overlays",
];

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

/// The key of the applied journal position (in `journal`).
const JOURNAL_AT: &[u8] = b"at";
/// Positions of the trees [`State::change`] hands its closure.
const CURRENT: usize = 0;
const GENERATIONS: usize = 1;
const DATA_DIRS: usize = 2;
const COUNTERS: usize = 3;
const OUTCOMES: usize = 4;
const OVERLAYS: usize = 5;

/// The journal of the state database in `dir` (`ROOT/state` →
/// `ROOT/state.journal`).
pub fn journal_path(dir: &Path) -> PathBuf {
    dir.with_extension("journal")
}

/// One row to write: the tree (by position in [`TREES`]), key and value.
type Row = (usize, Vec<u8>, Vec<u8>);

/// The rows a recorded generation writes (its overlays only if it has any).
fn generation_rows(
    generation: &Generation,
    data: &DataDirs,
    overlays: &Overlays,
) -> Result<Vec<Row>, StateError> {
    let key = generation.number.to_be_bytes().to_vec();
    let overlays = match overlays.is_empty() {
        true => None,
        false => Some((OVERLAYS, key.clone(), encode("overlays", overlays)?)),
    };
    let rows = vec![
        (
            CURRENT,
            INSTALLED.to_vec(),
            encode("installed", &generation.state)?,
        ),
        (GENERATIONS, key.clone(), encode("generation", generation)?),
        (DATA_DIRS, key, encode("data directories", data)?),
        (
            COUNTERS,
            LAST.to_vec(),
            encode("generation counter", &generation.number)?,
        ),
    ];
    Ok(rows.into_iter().chain(overlays).collect())
}

/// The journal's records, decoded.
pub fn journal_records(contents: &Contents) -> Result<Vec<(Position, StateRecord)>, StateError> {
    contents
        .records
        .iter()
        .map(|(pos, payload)| Ok((*pos, decode("state journal", payload)?)))
        .collect()
}

/// Tree `i` of `tables` ([`TREES`]), made empty if missing.
fn table(tables: &mut Tables, i: usize) -> &mut BTreeMap<Vec<u8>, Vec<u8>> {
    tables.entry(TREES[i]).or_default()
}

/// The database contents `records` make.
pub fn replay<'a>(
    records: impl IntoIterator<Item = &'a StateRecord>,
) -> Result<Tables, StateError> {
    let mut tables = Tables::new();
    for name in TREES {
        tables.insert(name, BTreeMap::new());
    }
    for r in records {
        match r {
            StateRecord::Allocated { number } => {
                table(&mut tables, COUNTERS)
                    .insert(ALLOCATED.to_vec(), encode("generation counter", number)?);
            }
            StateRecord::Generation { generation, data } => {
                for (tree, key, value) in generation_rows(generation, data, &Overlays::new())? {
                    table(&mut tables, tree).insert(key, value);
                }
            }
            StateRecord::Recorded {
                generation,
                data,
                overlays,
            } => {
                for (tree, key, value) in generation_rows(generation, data, overlays)? {
                    table(&mut tables, tree).insert(key, value);
                }
            }
            StateRecord::Outcome {
                deployment,
                op,
                outcome,
            } => {
                let key = OutcomeKey {
                    deployment: *deployment,
                    op: *op,
                };
                let outcomes = table(&mut tables, OUTCOMES);
                outcomes.insert(key.bytes().to_vec(), encode("deployment outcome", outcome)?);
                while outcomes.len() > KEEP_OUTCOMES {
                    outcomes.pop_first();
                }
            }
        }
    }
    Ok(tables)
}

/// The contents of the state database `db`, tree by tree (reads only).
pub fn tables(db: &sled::Db) -> Result<Tables, StateError> {
    let mut out = Tables::new();
    for name in TREES {
        let mut rows = BTreeMap::new();
        for kv in db.open_tree(name)?.iter() {
            let (k, v) = kv?;
            rows.insert(k.to_vec(), v.to_vec());
        }
        out.insert(name, rows);
    }
    Ok(out)
}

/// The records that make `tables` (a database without a journal, or the part
/// of a database a damaged journal lost).
pub fn baseline(tables: &Tables) -> Result<Vec<StateRecord>, StateError> {
    let mut out = Vec::new();
    let rows = |i: usize| tables.get(TREES[i]).into_iter().flatten();
    if let Some(v) = tables.get(TREES[COUNTERS]).and_then(|c| c.get(ALLOCATED)) {
        out.push(StateRecord::Allocated {
            number: decode("generation counter", v)?,
        });
    }
    let dirs = tables.get(TREES[DATA_DIRS]);
    let overlaid = tables.get(TREES[OVERLAYS]);
    for (k, v) in rows(GENERATIONS) {
        let generation: Generation = decode("generation", v)?;
        let data = match dirs.and_then(|d| d.get(k)) {
            Some(d) => decode("data directories", d)?,
            None => DataDirs::new(),
        };
        let overlays = match overlaid.and_then(|o| o.get(k)) {
            Some(o) => decode("overlays", o)?,
            None => Overlays::new(),
        };
        out.push(StateRecord::Recorded {
            generation,
            data,
            overlays,
        });
    }
    for (k, v) in rows(OUTCOMES) {
        let Some(deployment) = k.get(..8).and_then(|b| <[u8; 8]>::try_from(b).ok()) else {
            continue;
        };
        let op = match k.get(8) {
            Some(0) => DeploymentOp::Upgrade,
            Some(1) => DeploymentOp::Rollback,
            _ => continue,
        };
        out.push(StateRecord::Outcome {
            deployment: DeploymentId(u64::from_be_bytes(deployment)),
            op,
            outcome: decode("deployment outcome", v)?,
        });
    }
    Ok(out)
}

/// How `index` differs from `expected` (the journal's), in words.
pub fn differences(expected: &Tables, index: &Tables) -> Vec<String> {
    let mut out = Vec::new();
    for name in TREES {
        let (want, have) = (expected.get(name), index.get(name));
        let empty = BTreeMap::new();
        let (want, have) = (want.unwrap_or(&empty), have.unwrap_or(&empty));
        let missing = want
            .iter()
            .filter(|(k, v)| have.get(*k) != Some(*v))
            .count();
        let extra = have.keys().filter(|k| !want.contains_key(*k)).count();
        if missing > 0 {
            out.push(format!("{name}: {missing} records missing or different"));
        }
        if extra > 0 {
            out.push(format!("{name}: {extra} records not in the journal"));
        }
    }
    out
}

impl State {
    /// Opens (creating if needed) the database in `dir`, the instance's
    /// `ROOT/state`: the paths it records are relative to ROOT, the directory
    /// that holds `dir`.
    ///
    /// The database is checked against the journal (`ROOT/state.journal`) and
    /// rebuilt from it if it differs (see the module docs).
    pub fn open(dir: &Path) -> Result<Self, StateError> {
        Ok(Self::open_reporting(dir)?.0)
    }

    /// [`State::open`], returning how the database differed from the journal
    /// before it was rebuilt (empty: it agreed).
    pub fn open_reporting(dir: &Path) -> Result<(Self, Vec<String>), StateError> {
        let db = embedded_db::open(dir, 8 << 20)?;
        let journal_path = journal_path(dir);
        let (journal, contents) = Journal::open(&journal_path)?;
        let state = Self {
            root: dir.parent().unwrap_or(dir).to_owned(),
            current: db.open_tree("current")?,
            generations: db.open_tree("generations")?,
            data_dirs: db.open_tree("data_dirs")?,
            counters: db.open_tree("counters")?,
            outcomes: db.open_tree("outcomes")?,
            overlays: db.open_tree("overlays")?,
            applied: db.open_tree("journal")?,
            writer: Arc::new(Mutex::new(Writer {
                journal,
                stale: false,
            })),
            journal_path,
            db,
        };
        let mut records = journal_records(&contents)?;
        let applied = state.applied()?;
        if applied.is_none() && records.is_empty() {
            // A database from before the journal (or a new instance): its
            // contents become the journal's first records.
            let baseline = baseline(&state.tables()?)?;
            let mut writer = state.lock();
            for r in baseline {
                let pos = writer.journal.append(&encode("state journal", &r)?)?;
                records.push((pos, r));
            }
        }
        let at = records.last().map(|(p, _)| *p).unwrap_or_default();
        match contents.standing(applied) {
            Standing::JournalBehind { journal, database } => {
                return Err(StateError::JournalBehind {
                    path: state.journal_path.clone(),
                    journal,
                    index: database,
                });
            }
            Standing::Diverged { seq } => {
                return Err(StateError::Diverged {
                    path: state.journal_path.clone(),
                    seq,
                });
            }
            Standing::Agrees | Standing::DatabaseBehind => {}
        }
        let expected = replay(records.iter().map(|(_, r)| r))?;
        let differences = differences(&expected, &state.tables()?);
        if !differences.is_empty() {
            tracing::warn!(
                journal = %state.journal_path.display(),
                differences = %differences.join("; "),
                "the instance's state database disagreed with its journal; rebuilding it"
            );
        }
        if !differences.is_empty() || applied != Some(at) {
            state.rebuild(&expected, at)?;
        }
        Ok((state, differences))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Writer> {
        // A writer that panicked left journal and database as a crash would;
        // the next open reconciles them, so the lock stays usable.
        self.writer.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The journal position the database has applied (`None`: never recorded).
    fn applied(&self) -> Result<Option<Position>, StateError> {
        Ok(self
            .applied
            .get(JOURNAL_AT)?
            .and_then(|v| Position::from_bytes(&v)))
    }

    /// The database's contents, tree by tree.
    pub fn tables(&self) -> Result<Tables, StateError> {
        tables(&self.db)
    }

    /// Replaces the database's contents with `tables`, then records `at` as
    /// applied (last: a crash halfway rebuilds again at the next open).
    fn rebuild(&self, tables: &Tables, at: Position) -> Result<(), StateError> {
        self.applied.remove(JOURNAL_AT)?;
        self.db.flush()?;
        for name in TREES {
            let tree = self.db.open_tree(name)?;
            tree.clear()?;
            for (k, v) in tables.get(name).into_iter().flatten() {
                tree.insert(k.as_slice(), v.as_slice())?;
            }
        }
        self.db.flush()?;
        self.applied.insert(JOURNAL_AT, at.to_bytes().as_slice())?;
        self.db.flush()?;
        Ok(())
    }

    /// Journals `record`, then applies `apply` and the new journal position
    /// in one transaction, durably.
    fn change(
        &self,
        record: &StateRecord,
        apply: impl Fn(
            &[sled::transaction::TransactionalTree],
        )
            -> sled::transaction::ConflictableTransactionResult<(), std::convert::Infallible>,
    ) -> Result<(), StateError> {
        use sled::Transactional;
        let mut writer = self.lock();
        if writer.stale {
            return Err(StateError::Stale);
        }
        let pos = writer
            .journal
            .append(&encode("state journal", record)?)?
            .to_bytes();
        let trees: [&sled::Tree; 7] = [
            &self.current,
            &self.generations,
            &self.data_dirs,
            &self.counters,
            &self.outcomes,
            &self.overlays,
            &self.applied,
        ];
        let applied = trees[..]
            .transaction(|t| {
                apply(t)?;
                t[6].insert(JOURNAL_AT, pos.as_slice())?;
                Ok(())
            })
            .map_err(embedded_db::storage_error)
            .and_then(|()| self.db.flush().map(drop));
        if applied.is_err() {
            writer.stale = true;
        }
        Ok(applied?)
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
        self.record_generation(number, state, reason, data, &Overlays::new())?;
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
        let encoded = encode("generation counter", &number)?;
        self.change(&StateRecord::Allocated { number }, |t| {
            t[COUNTERS].insert(ALLOCATED, encoded.as_slice())?;
            Ok(())
        })?;
        Ok(number)
    }

    /// Records `state` as installed as generation `number` (handed out by
    /// [`State::allocate_generation`]), with its data directories and its
    /// overlays, in one transaction, durably.
    pub fn record_generation(
        &self,
        number: u64,
        state: &InstalledState,
        reason: &str,
        data: &DataDirs,
        overlays: &Overlays,
    ) -> Result<(), StateError> {
        let state = map_releases(state, |p| self.to_stored(p))?;
        let data = map_dirs(data, |p| self.to_stored(p))?;
        let generation = Generation {
            number,
            time: Timestamp::now(),
            reason: reason.to_owned(),
            state,
        };
        let rows = generation_rows(&generation, &data, overlays)?;
        let record = StateRecord::Recorded {
            generation,
            data,
            overlays: overlays.clone(),
        };
        self.change(&record, |t| {
            for (tree, key, value) in &rows {
                t[*tree].insert(key.as_slice(), value.as_slice())?;
            }
            Ok(())
        })
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

    /// The overlays recorded with generation `number` (none recorded: empty).
    pub fn overlays(&self, number: u64) -> Result<Overlays, StateError> {
        match self.overlays.get(number.to_be_bytes())? {
            Some(v) => decode("overlays", &v),
            None => Ok(Overlays::new()),
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
        let value = encode("deployment outcome", outcome)?;
        let mut kept: Vec<sled::IVec> = self.outcomes.iter().keys().collect::<Result<_, _>>()?;
        kept.push(key.bytes().to_vec().into());
        kept.sort();
        kept.dedup();
        let excess = kept.len().saturating_sub(KEEP_OUTCOMES);
        let record = StateRecord::Outcome {
            deployment: key.deployment,
            op: key.op,
            outcome: outcome.clone(),
        };
        self.change(&record, |t| {
            t[OUTCOMES].insert(&key.bytes(), value.as_slice())?;
            for old in &kept[..excess] {
                t[OUTCOMES].remove(old)?;
            }
            Ok(())
        })
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

    /// Overlays travel with their generation: kept only when a generation
    /// has some, journalled with it, and rebuilt from the journal when the
    /// database is lost; a journal written before overlays (its records
    /// `Generation`) replays as generations without any.
    #[test]
    fn overlays_are_recorded_with_their_generation_and_rebuilt_from_the_journal() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let state = open(root);
        let s1 = one_service(root, 1);
        let overlays = Overlays::from([(
            orders(),
            wire::shell::Overlay {
                commit: CommitId::from_bytes([7; 32]),
                rev: "dev/ada".into(),
                by: "ada".into(),
                since: Timestamp::from_unix_seconds(1_800_000_000),
            },
        )]);
        let one = state.allocate_generation().unwrap();
        state
            .record_generation(one, &s1, "pull", &DataDirs::new(), &overlays)
            .unwrap();
        let two = state.record(&s1, "reset").unwrap();
        assert_eq!(state.overlays(one).unwrap(), overlays);
        assert_eq!(state.overlays(two).unwrap(), Overlays::new());
        let rows = state.tables().unwrap();
        assert_eq!(
            rows["overlays"].len(),
            1,
            "a generation without overlays keeps no row"
        );
        drop(state);

        std::fs::remove_dir_all(root.join("state")).unwrap();
        let (state, differences) = State::open_reporting(&root.join("state")).unwrap();
        assert!(!differences.is_empty());
        assert_eq!(state.overlays(one).unwrap(), overlays);
        assert_eq!(state.generations().unwrap().len(), 2);

        // The older record replays as a generation without overlays.
        let old = StateRecord::Generation {
            generation: state.generations().unwrap()[0].clone(),
            data: DataDirs::new(),
        };
        let tables = replay([&old]).unwrap();
        assert!(tables["overlays"].is_empty());
        assert_eq!(tables["generations"].len(), 1);
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
