//! `molt fsck --root ROOT [--repair]`: check a stopped instance's stores and
//! repair what can be repaired from what is left.
//!
//! The check reads everything and changes nothing: the state journal record by
//! record, the state database against it, every recorded generation's stored
//! tree and release (each file against the tree), and every blob in the cache
//! against its name. The repair cuts a damaged journal back to what verifies
//! (keeping the damaged file aside) and writes back what only the database still
//! holds, moves a database that does not open aside, rebuilds the database from
//! the journal, and sets corrupt cache blobs aside. A release whose files differ
//! from its tree is not repaired offline: the shell heals it from the
//! repository when it next starts ([`crate::instance::Instance::open_healing`]).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use embedded_db::journal::{self, Journal, JournalError, Standing, aside_name};
use image_spec::{BlobId, Tree};

use crate::cache::BlobCache;
use crate::state::{self, Generation, StateError, StateRecord, Tables};

/// Why fsck could not run (what it finds is in its [`Report`]).
#[derive(Debug, thiserror::Error)]
pub enum FsckError {
    /// The directory is not an instance root.
    #[error("`{0}` is not an instance root (no `state` in it)")]
    NotAnInstance(PathBuf),
    /// The state could not be read or rebuilt.
    #[error(transparent)]
    State(#[from] StateError),
    /// The journal could not be read or rewritten.
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// A file could not be read, or moved aside.
    #[error("`{path}`: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The failure.
        source: std::io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> FsckError + '_ {
    move |source| FsckError::Io {
        path: path.to_owned(),
        source,
    }
}

/// What fsck found and did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    /// Journal records read.
    pub journal_records: u64,
    /// Release files checked.
    pub files: u64,
    /// Cache blobs checked.
    pub blobs: u64,
    /// What is wrong, one line each.
    pub problems: Vec<String>,
    /// What the repair did, one line each.
    pub repaired: Vec<String>,
    /// What is gone with no local copy left.
    pub lost: Vec<String>,
}

/// Checks the instance in `root` (its shell stopped: the database's lock says
/// so if not); with `repair`, repairs it (see the module docs).
pub fn fsck(root: &Path, repair: bool) -> Result<Report, FsckError> {
    let dir = root.join("state");
    if !dir.exists() && !state::journal_path(&dir).exists() {
        return Err(FsckError::NotAnInstance(root.to_owned()));
    }
    let mut report = Report::default();
    let journal_path = state::journal_path(&dir);
    let (contents, damage) = journal::salvage(&journal_path)?;
    let records = state::journal_records(&contents)?;
    report.journal_records = records.len() as u64;
    let mut journal_damaged = false;
    if let Some(damage) = damage {
        report.problems.push(damage.to_string());
        journal_damaged = true;
    }
    let expected = state::replay(records.iter().map(|(_, r)| r))?;

    let mut index = None;
    match embedded_db::open(&dir, 8 << 20) {
        Ok(db) => {
            let tables = state::tables(&db)?;
            let applied = db
                .open_tree("journal")
                .map_err(StateError::from)?
                .get(b"at")
                .map_err(StateError::from)?
                .and_then(|v| journal::Position::from_bytes(&v));
            match contents.standing(applied) {
                bad @ (Standing::JournalBehind { .. } | Standing::Diverged { .. }) => {
                    journal_damaged = true;
                    report.problems.push(bad.to_string());
                }
                _ => {
                    for d in state::differences(&expected, &tables) {
                        report.problems.push(format!("state database: {d}"));
                    }
                }
            }
            if repair {
                db.open_tree("journal")
                    .and_then(|t| t.remove(b"at"))
                    .and_then(|_| db.flush())
                    .map_err(StateError::from)?;
            }
            index = Some(tables);
        }
        Err(e) => {
            report.problems.push(format!(
                "the state database `{}` does not open: {e}",
                dir.display()
            ));
            if repair {
                let to = aside_name(&dir);
                std::fs::rename(&dir, &to).map_err(io_err(&dir))?;
                report.repaired.push(format!(
                    "moved the damaged state database to `{}`",
                    to.display()
                ));
            }
        }
    }

    if repair && journal_damaged {
        let mut payloads: Vec<Vec<u8>> = contents.records.iter().map(|(_, p)| p.clone()).collect();
        if journal_path.exists() {
            let aside = aside_name(&journal_path);
            std::fs::copy(&journal_path, &aside).map_err(io_err(&journal_path))?;
            report.repaired.push(format!(
                "kept the damaged journal as `{}`, and its {} verified records",
                aside.display(),
                records.len()
            ));
        }
        let extra = only_in_index(&expected, index.as_ref())?;
        for r in &extra {
            payloads.push(
                wire::codec::encode_record(r).map_err(|source| StateError::Encode {
                    what: "state journal",
                    source,
                })?,
            );
        }
        Journal::rewrite(&journal_path, &payloads)?;
        report.repaired.push(format!(
            "wrote {} records the database still held back into the journal",
            extra.len()
        ));
    }
    // What is recorded: the journal's, or after a repair what was rebuilt.
    let recorded = if repair {
        let (state, rebuilt) = state::State::open_reporting(&dir)?;
        let tables = state.tables()?;
        report.repaired.push(if rebuilt.is_empty() {
            "rebuilt the state database from the journal".to_owned()
        } else {
            format!(
                "rebuilt the state database from the journal ({})",
                rebuilt.join("; ")
            )
        });
        tables
    } else {
        expected
    };

    check_releases(root, &recorded, &mut report)?;
    check_cache(root, repair, &mut report)?;
    Ok(report)
}

/// The records of `index` the journal's `expected` contents lack: newer
/// generations, a higher allocated number, outcomes.
fn only_in_index(expected: &Tables, index: Option<&Tables>) -> Result<Vec<StateRecord>, FsckError> {
    let Some(index) = index else {
        return Ok(Vec::new());
    };
    let known = state::baseline(expected)?;
    let mut out = Vec::new();
    for r in state::baseline(index)? {
        let new = match &r {
            StateRecord::Generation { generation, .. }
            | StateRecord::Recorded { generation, .. } => !known.iter().any(|k| {
                k.generation()
                    .is_some_and(|g| g.number >= generation.number)
            }),
            StateRecord::Allocated { number } => !known
                .iter()
                .any(|k| matches!(k, StateRecord::Allocated { number: n } if n >= number)),
            StateRecord::Outcome { .. } => !known.contains(&r),
        };
        if new {
            out.push(r);
        }
    }
    Ok(out)
}

/// Checks the stored tree and release of every recorded generation.
fn check_releases(root: &Path, recorded: &Tables, report: &mut Report) -> Result<(), FsckError> {
    let records = state::baseline(recorded)?;
    let mut seen = BTreeSet::new();
    for r in records {
        let Some(Generation { number, state, .. }) = r.generation().cloned() else {
            continue;
        };
        for (service, s) in state.services {
            let release = root.join(&s.release);
            if !seen.insert(release.clone()) || !release.exists() {
                continue;
            }
            let tree_path = root.join("trees").join(s.tree.to_hex());
            let tree = match std::fs::read(&tree_path)
                .ok()
                .and_then(|b| Tree::decode(&b).ok())
                .filter(|t| t.id() == s.tree)
            {
                Some(t) => t,
                None => {
                    report.problems.push(format!(
                        "generation {number}: the stored tree of {service} (`{}`) is missing or corrupt",
                        tree_path.display()
                    ));
                    continue;
                }
            };
            report.files += tree.entries().len() as u64;
            let bad = crate::release::verify_all(&release, &tree);
            if !bad.is_empty() {
                let paths: Vec<String> = bad
                    .iter()
                    .take(5)
                    .map(|(e, _)| e.path().to_string())
                    .collect();
                report.problems.push(format!(
                    "generation {number}: {} files of {service}'s release `{}` differ from its tree ({}); \
                     the shell heals them from the repository when it starts",
                    bad.len(),
                    release.display(),
                    paths.join(", ")
                ));
            }
        }
    }
    Ok(())
}

/// Checks every cache blob against its name; the repair sets corrupt ones
/// aside (the next deploy that needs one fetches it anew).
fn check_cache(root: &Path, repair: bool, report: &mut Report) -> Result<(), FsckError> {
    let dir = root.join("cache");
    if !dir.exists() {
        return Ok(());
    }
    let cache = BlobCache::open(&dir).map_err(io_err(&dir))?;
    for entry in std::fs::read_dir(&dir).map_err(io_err(&dir))? {
        let entry = entry.map_err(io_err(&dir))?;
        let Some(id) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<BlobId>().ok())
        else {
            continue;
        };
        report.blobs += 1;
        let path = entry.path();
        let file = std::fs::File::open(&path).map_err(io_err(&path))?;
        let mut hasher = blake3::Hasher::new();
        hasher.update_reader(file).map_err(io_err(&path))?;
        if hasher.finalize().as_bytes() == id.as_bytes() {
            continue;
        }
        report.problems.push(format!("cache blob {id} is corrupt"));
        if repair {
            cache.quarantine(&id).map_err(io_err(&path))?;
            report.repaired.push(format!(
                "set cache blob {id} aside; the next deploy that needs it fetches it anew"
            ));
        }
    }
    Ok(())
}
