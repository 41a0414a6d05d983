//! `molt fsck --repo DATA [--repair]`: check a stopped repository's stores
//! against each other and repair what can be repaired from what is left.
//!
//! The check reads everything and changes nothing:
//!
//! - the refs journal verifies record by record ([`embedded_db::journal`]);
//! - the index opens, has applied exactly the journal, and holds the refs the
//!   journal makes ([`crate::meta`]);
//! - every object file hashes to its name and decodes; every branch head and
//!   image names a commit that is stored, every commit a tree, every tree blobs
//!   that are stored and hash to their names.
//!
//! The repair keeps every verified part and rebuilds the rest: a damaged journal
//! is cut back to its verified records (the damaged file is kept aside) and the
//! refs the index still holds are written back into it; an index that does not
//! open is moved aside; the index is then rebuilt from the journal and the
//! objects; corrupt objects and blobs are quarantined, so the next push that holds
//! them sends them again. What no local copy holds any more is reported as lost.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use embedded_db::journal::{self, Journal, Standing, aside_name};
use image_spec::{BlobId, Commit, CommitId, Image, Tree, TreeId};

use crate::blobs::{BlobError, FsBlobStore};
use crate::meta::{self, MetaError, RefRecord, Refs, SledMeta};
use crate::objects::{Kind, ObjectError, Objects};

/// Why fsck could not run (problems it finds are in its [`Report`]).
#[derive(Debug, thiserror::Error)]
pub enum FsckError {
    /// The data directory does not hold a repository.
    #[error("`{0}` is not a repository's data directory (no `meta`, `blobs` or `objects` in it)")]
    NotARepository(PathBuf),
    /// The metadata could not be read or rebuilt.
    #[error(transparent)]
    Meta(#[from] MetaError),
    /// The object files could not be read.
    #[error(transparent)]
    Objects(#[from] ObjectError),
    /// The blob store could not be read.
    #[error(transparent)]
    Blobs(#[from] BlobError),
    /// The journal could not be read or rewritten.
    #[error(transparent)]
    Journal(#[from] journal::JournalError),
    /// Moving a damaged part aside failed.
    #[error("moving `{path}` aside: {source}")]
    Io {
        /// The part.
        path: PathBuf,
        /// The failure.
        source: std::io::Error,
    },
}

/// What fsck found and did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    /// What was checked, as counts: journal records, objects, blobs.
    pub journal_records: u64,
    /// Object files checked.
    pub objects: u64,
    /// Blobs checked.
    pub blobs: u64,
    /// What is wrong, one line each.
    pub problems: Vec<String>,
    /// What the repair did, one line each.
    pub repaired: Vec<String>,
    /// What is gone with no local copy left (a push of it restores it).
    pub lost: Vec<String>,
}

impl Report {
    /// Whether nothing is wrong (or, after a repair, nothing is lost).
    pub fn clean(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Moves `path` aside ([`aside_name`]).
fn set_aside(path: &Path) -> Result<PathBuf, FsckError> {
    let to = aside_name(path);
    std::fs::rename(path, &to).map_err(|source| FsckError::Io {
        path: path.to_owned(),
        source,
    })?;
    Ok(to)
}

/// Checks the repository in `data` (the server must be stopped: the index's
/// lock says so if not); with `repair`, repairs it (see the module docs).
pub fn fsck(data: &Path, repair: bool) -> Result<Report, FsckError> {
    if !["meta", "blobs", "objects"]
        .iter()
        .any(|p| data.join(p).exists())
    {
        return Err(FsckError::NotARepository(data.to_owned()));
    }
    let mut report = Report::default();
    let journal_path = meta::journal_path(data);

    // The journal, as far as it verifies.
    let (contents, damage) = journal::salvage(&journal_path)?;
    let records = meta::journal_records(&contents)?;
    report.journal_records = records.len() as u64;
    let mut journal_damaged = false;
    if let Some(damage) = damage {
        report.problems.push(damage.to_string());
        journal_damaged = true;
    }
    let journal_refs = meta::replay(records.iter().map(|(_, r)| r));

    // The index: does it open, and does it agree?
    let index_dir = meta::index_dir(data);
    let mut index_refs = None;
    match embedded_db::open(&index_dir, meta::CACHE_BYTES) {
        Ok(db) => {
            let (applied, refs) = meta::read_index(&db)?;
            match contents.standing(applied) {
                bad @ (Standing::JournalBehind { .. } | Standing::Diverged { .. }) => {
                    journal_damaged = true;
                    report.problems.push(bad.to_string());
                }
                standing => {
                    for d in journal_refs.differences(&refs) {
                        report.problems.push(format!("index: {d}"));
                    }
                    if standing == Standing::DatabaseBehind && !records.is_empty() {
                        report.problems.push(format!("index: {standing}"));
                    }
                }
            }
            index_refs = Some(refs);
            if repair {
                meta::forget_applied(&db)?;
            }
        }
        Err(e) => {
            report.problems.push(format!(
                "the index `{}` does not open: {e}",
                index_dir.display()
            ));
            if repair {
                let to = set_aside(&index_dir)?;
                report
                    .repaired
                    .push(format!("moved the damaged index to `{}`", to.display()));
            }
        }
    }

    // The refs whose commits must be stored: the journal's, as repaired.
    let refs = if repair && journal_damaged {
        repair_journal(
            data,
            &journal_path,
            &records,
            &journal_refs,
            index_refs.as_ref(),
            &mut report,
        )?;
        let (contents, _) = journal::salvage(&journal_path)?;
        meta::replay(meta::journal_records(&contents)?.iter().map(|(_, r)| r))
    } else {
        journal_refs
    };

    check_objects(data, &refs, repair, &mut report)?;

    if repair {
        let (_, opened) = SledMeta::open_reporting(data, wire::repo::REF_LOG_RETAINED)?;
        report.repaired.push(if opened.rebuilt.is_empty() {
            "rebuilt the index from the journal and the objects".to_owned()
        } else {
            format!(
                "rebuilt the index from the journal and the objects ({})",
                opened.rebuilt.join("; ")
            )
        });
    }
    Ok(report)
}

/// Cuts a damaged journal back to its verified records (keeping the damaged
/// file aside) and writes back the refs only the index still holds.
fn repair_journal(
    data: &Path,
    path: &Path,
    records: &[(journal::Position, RefRecord)],
    journal_refs: &Refs,
    index_refs: Option<&Refs>,
    report: &mut Report,
) -> Result<(), FsckError> {
    let objects = Objects::open(&meta::objects_dir(data))?;
    let mut payloads: Vec<Vec<u8>> = journal::salvage(path)?
        .0
        .records
        .into_iter()
        .map(|(_, p)| p)
        .collect();
    if path.exists() {
        let aside = aside_name(path);
        std::fs::copy(path, &aside).map_err(|source| FsckError::Io {
            path: path.to_owned(),
            source,
        })?;
        report.repaired.push(format!(
            "kept the damaged journal as `{}`, and its {} verified records",
            aside.display(),
            records.len()
        ));
    }
    let empty = Refs::default();
    let index_refs = index_refs.unwrap_or(&empty);
    let mut extra = Vec::new();
    for ((service, branch), head) in &index_refs.heads {
        if journal_refs.heads.get(&(service.clone(), branch.clone())) != Some(head) {
            if objects.inspect(Kind::Commit, head.as_bytes())?.is_some() {
                extra.push(RefRecord::Head {
                    service: service.clone(),
                    branch: branch.clone(),
                    head: *head,
                });
            } else {
                report.lost.push(format!(
                    "branch {service}/{branch}: the index's head {} is not stored",
                    head.short(12)
                ));
            }
        }
    }
    for (name, id, created) in &index_refs.images {
        if !journal_refs.images.iter().any(|(n, _, _)| n == name) {
            extra.push(RefRecord::Image {
                name: name.clone(),
                id: *id,
                created: created.clone(),
            });
        }
    }
    if index_refs.last_event > journal_refs.last_event {
        extra.push(RefRecord::LogFrom {
            last: index_refs.last_event,
        });
    }
    for r in &extra {
        let payload = wire::codec::encode_record(r).map_err(|source| MetaError::Record {
            what: "refs journal",
            source,
        })?;
        payloads.push(payload);
    }
    Journal::rewrite(path, &payloads)?;
    report.repaired.push(format!(
        "wrote {} refs the index still held back into the journal",
        extra.len()
    ));
    Ok(())
}

/// Checks every object file and what `refs` and the trees name.
fn check_objects(
    data: &Path,
    refs: &Refs,
    repair: bool,
    report: &mut Report,
) -> Result<(), FsckError> {
    let objects = Objects::open(&meta::objects_dir(data))?;
    let blobs = FsBlobStore::open(&data.join("blobs"))?;
    let mut sound: [BTreeSet<[u8; 32]>; 3] = Default::default();
    let mut trees = Vec::new();
    let mut commits = Vec::new();
    let mut images = Vec::new();
    for (i, kind) in Kind::ALL.into_iter().enumerate() {
        for id in objects.ids(kind)? {
            report.objects += 1;
            let Some((bytes, ok)) = objects.inspect(kind, &id)? else {
                continue;
            };
            let decodes = match kind {
                Kind::Tree => Tree::decode(&bytes).map(|t| trees.push(t)).is_ok(),
                Kind::Commit => Commit::decode(&bytes)
                    .map(|c| commits.push((CommitId::from_bytes(id), c)))
                    .is_ok(),
                Kind::Image => Image::decode(&bytes).map(|m| images.push(m)).is_ok(),
            };
            if ok && decodes {
                sound[i].insert(id);
                continue;
            }
            let hex = blake3::Hash::from_bytes(id).to_hex();
            report.problems.push(format!("{kind} {hex} is corrupt"));
            if repair {
                objects.quarantine(kind, &id)?;
                report.repaired.push(format!("quarantined {kind} {hex}"));
                report.lost.push(format!("{kind} {hex}"));
            }
        }
    }
    let [sound_trees, sound_commits, _] = &sound;
    let missing = |what: String, report: &mut Report| {
        report.problems.push(what.clone());
        report.lost.push(what);
    };
    for (id, c) in &commits {
        if !sound_trees.contains(c.tree().as_bytes()) {
            missing(
                format!(
                    "commit {} names tree {} that is not stored",
                    id.short(12),
                    TreeId::short(&c.tree(), 12)
                ),
                report,
            );
        }
    }
    for ((service, branch), head) in &refs.heads {
        if !sound_commits.contains(head.as_bytes()) {
            missing(
                format!(
                    "branch {service}/{branch} points at commit {} that is not stored",
                    head.short(12)
                ),
                report,
            );
        }
    }
    for image in &images {
        for (service, commit) in image.services() {
            if !sound_commits.contains(commit.as_bytes()) {
                missing(
                    format!(
                        "image {} names {service} at commit {} that is not stored",
                        image.name(),
                        commit.short(12)
                    ),
                    report,
                );
            }
        }
    }
    let wanted: BTreeSet<BlobId> = trees
        .iter()
        .flat_map(|t| t.entries().iter().map(|e| e.blob()))
        .collect();
    for blob in wanted {
        report.blobs += 1;
        match blobs.check(&blob)? {
            Some(true) => {}
            Some(false) => {
                report.problems.push(format!("blob {blob} is corrupt"));
                if repair {
                    blobs.quarantine_blocking(&blob)?;
                    report.repaired.push(format!("quarantined blob {blob}"));
                    report.lost.push(format!("blob {blob}"));
                }
            }
            None => missing(format!("blob {blob} is not stored"), report),
        }
    }
    Ok(())
}
