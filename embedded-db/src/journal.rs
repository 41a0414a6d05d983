//! An append-only, hash-chained journal file: the record of changes a
//! component's sled index can be checked against and rebuilt from.
//!
//! sled recovers from a damaged file by dropping what follows the damage, so a
//! flipped byte or a truncated tail silently turns a database into an older one.
//! The components therefore write every change of their refs or installed state
//! here first, durably, and keep the journal's [`Position`] in the database in the
//! same transaction as the change. At start the two are compared: a database
//! behind its journal is brought forward from it; a journal behind its database
//! (its tail lost, or an older copy restored) or disagreeing with it is named.
//!
//! The file is a magic header, then records:
//!
//! ```text
//! u32 LE payload length | its bitwise complement | payload | 32-byte chain
//! chain = blake3(previous chain | length | payload)   (the first "previous" is all zeros)
//! ```
//!
//! so a flipped byte anywhere breaks every chain from that record on (or the
//! length's complement, which tells a damaged length from a record cut short), and a
//! record cannot be removed, reordered or altered without it showing. A record
//! cut short at the end of the file is an append that never completed (it was
//! never acknowledged, appends are synced before they return) and is dropped when
//! the journal is opened for writing; a complete record that does not verify is
//! [`JournalError::Corrupt`].

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// The file's first bytes.
const MAGIC: &[u8; 8] = b"molt-jr1";
/// The largest payload a record may hold.
pub const MAX_RECORD: usize = 16 << 20;

/// Why a journal could not be read or appended to.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// Reading or writing the file failed.
    #[error("journal `{path}`: {source}")]
    Io {
        /// The journal.
        path: PathBuf,
        /// The failure.
        source: io::Error,
    },
    /// The file is not a journal.
    #[error("`{path}` is not a molt journal (its header is wrong)")]
    NotAJournal {
        /// The file.
        path: PathBuf,
    },
    /// A complete record does not verify: the file was altered.
    #[error("journal `{path}` is corrupt at record {seq} (byte {offset}): {why}")]
    Corrupt {
        /// The journal.
        path: PathBuf,
        /// The first record that does not verify (counting from 1).
        seq: u64,
        /// Where it starts in the file.
        offset: u64,
        /// What is wrong with it.
        why: &'static str,
    },
    /// A payload to append is larger than [`MAX_RECORD`].
    #[error("a journal record of {0} bytes is larger than the limit")]
    TooLarge(usize),
}

/// Where a journal ends: how many records it holds and the last one's chain.
/// Two journals at the same position hold the same records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Position {
    /// The number of records (0: empty).
    pub seq: u64,
    /// The chain after the last record (all zeros when empty).
    pub chain: [u8; 32],
}

impl Position {
    /// The position as 40 bytes (seq big-endian, then the chain), to keep in a
    /// database.
    pub fn to_bytes(self) -> [u8; 40] {
        let mut out = [0; 40];
        out[..8].copy_from_slice(&self.seq.to_be_bytes());
        out[8..].copy_from_slice(&self.chain);
        out
    }

    /// A position read back from [`Position::to_bytes`]; `None` if `bytes` is
    /// not 40 bytes long.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        let bytes: &[u8; 40] = bytes.try_into().ok()?;
        let (seq, chain) = bytes.split_at(8);
        Some(Self {
            seq: u64::from_be_bytes(seq.try_into().ok()?),
            chain: chain.try_into().ok()?,
        })
    }

    /// The position after appending `payload` here.
    fn next(self, payload: &[u8]) -> Self {
        let len = u32::try_from(payload.len()).expect("payloads are bounded by MAX_RECORD");
        let mut h = blake3::Hasher::new();
        h.update(&self.chain);
        h.update(&len.to_le_bytes());
        h.update(payload);
        Self {
            seq: self.seq + 1,
            chain: *h.finalize().as_bytes(),
        }
    }
}

impl std::fmt::Display for Position {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "record {}", self.seq)
    }
}

/// What a journal file holds.
#[derive(Debug, Default)]
pub struct Contents {
    /// Every verified record's payload, in order, with the position after it.
    pub records: Vec<(Position, Vec<u8>)>,
    /// Bytes at the end that form no complete record (an append cut short).
    pub torn_tail: u64,
}

impl Contents {
    /// Where the verified records end.
    pub fn position(&self) -> Position {
        self.records.last().map(|(p, _)| *p).unwrap_or_default()
    }

    /// The length of a journal file holding exactly the first `seq` of these
    /// records (what cutting the journal back to them leaves).
    pub fn file_len_through(&self, seq: usize) -> u64 {
        let records: usize = self.records[..seq.min(self.records.len())]
            .iter()
            .map(|(_, p)| 8 + p.len() + 32)
            .sum();
        (MAGIC.len() + records) as u64
    }

    /// The position after record `seq` (0: the start), if the journal holds it.
    pub fn position_at(&self, seq: u64) -> Option<Position> {
        if seq == 0 {
            return Some(Position::default());
        }
        let i = usize::try_from(seq - 1).ok()?;
        self.records.get(i).map(|(p, _)| *p)
    }
}

/// How a database's applied position stands against its journal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// The database has applied exactly the journal.
    Agrees,
    /// The database has applied a prefix of the journal (or never recorded a
    /// position): it is brought forward from the journal.
    DatabaseBehind,
    /// The database has applied more records than the journal holds: the
    /// journal lost its tail, or an older copy of it was restored.
    JournalBehind {
        /// The journal's records.
        journal: u64,
        /// What the database applied.
        database: u64,
    },
    /// The database applied a different record than the journal holds at
    /// that place: one of them was replaced.
    Diverged {
        /// The record.
        seq: u64,
    },
}

impl Contents {
    /// How a database that has applied `applied` (`None`: never recorded)
    /// stands against these records.
    pub fn standing(&self, applied: Option<Position>) -> Standing {
        let at = self.position();
        match applied {
            None => Standing::DatabaseBehind,
            Some(a) if a.seq > at.seq => Standing::JournalBehind {
                journal: at.seq,
                database: a.seq,
            },
            Some(a) if self.position_at(a.seq) != Some(a) => Standing::Diverged { seq: a.seq },
            Some(a) if a == at => Standing::Agrees,
            Some(_) => Standing::DatabaseBehind,
        }
    }
}

impl std::fmt::Display for Standing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Standing::Agrees => f.write_str("the database has applied the whole journal"),
            Standing::DatabaseBehind => f.write_str("the database has applied part of the journal"),
            Standing::JournalBehind { journal, database } => write!(
                f,
                "the journal ends at record {journal} but the database applied {database}: the journal lost records"
            ),
            Standing::Diverged { seq } => {
                write!(f, "the journal and the database disagree at record {seq}")
            }
        }
    }
}

/// A damaged file or directory's name when it is set aside for a repair:
/// `NAME.damaged-SECS`, beside it.
pub fn aside_name(path: &Path) -> PathBuf {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut name = path.file_name().unwrap_or_default().to_owned();
    name.push(format!(".damaged-{secs}"));
    path.with_file_name(name)
}

/// Reads and verifies the journal at `path` without changing it; a missing file
/// is an empty journal.
pub fn read(path: &Path) -> Result<Contents, JournalError> {
    let io_err = |source| JournalError::Io {
        path: path.to_owned(),
        source,
    };
    let mut bytes = Vec::new();
    match File::open(path) {
        Ok(mut f) => f.read_to_end(&mut bytes).map_err(io_err)?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Contents::default()),
        Err(e) => return Err(io_err(e)),
    };
    match parse(path, &bytes) {
        (contents, None) => Ok(contents),
        (_, Some(damage)) => Err(damage),
    }
}

/// Reads the journal at `path` as far as it verifies (a repair): the records
/// before the first that does not, and the damage found there, if any.
pub fn salvage(path: &Path) -> Result<(Contents, Option<JournalError>), JournalError> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(parse(path, &bytes)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok((Contents::default(), None)),
        Err(source) => Err(JournalError::Io {
            path: path.to_owned(),
            source,
        }),
    }
}

fn parse(path: &Path, bytes: &[u8]) -> (Contents, Option<JournalError>) {
    let mut contents = Contents::default();
    if bytes.is_empty() {
        return (contents, None);
    }
    if bytes.len() < MAGIC.len() {
        // Only a header write can leave fewer bytes than the header.
        if MAGIC.starts_with(bytes) {
            contents.torn_tail = bytes.len() as u64;
            return (contents, None);
        }
        let damage = JournalError::NotAJournal {
            path: path.to_owned(),
        };
        return (contents, Some(damage));
    }
    if &bytes[..MAGIC.len()] != MAGIC {
        let damage = JournalError::NotAJournal {
            path: path.to_owned(),
        };
        return (contents, Some(damage));
    }
    let mut at = MAGIC.len();
    let mut pos = Position::default();
    while at < bytes.len() {
        let rest = &bytes[at..];
        let corrupt = |why| JournalError::Corrupt {
            path: path.to_owned(),
            seq: pos.seq + 1,
            offset: at as u64,
            why,
        };
        let Some(header) = rest.get(..8) else {
            contents.torn_tail = rest.len() as u64;
            break;
        };
        let (len, check) = header.split_at(4);
        let len = u32::from_le_bytes(len.try_into().expect("four bytes"));
        if !len != u32::from_le_bytes(check.try_into().expect("four bytes")) {
            return (
                contents,
                Some(corrupt("its length does not match its complement")),
            );
        }
        let len = len as usize;
        if len > MAX_RECORD {
            return (contents, Some(corrupt("its length is over the limit")));
        }
        let Some(record) = rest.get(8..8 + len + 32) else {
            contents.torn_tail = rest.len() as u64;
            break;
        };
        let (payload, chain) = record.split_at(len);
        let next = pos.next(payload);
        if next.chain != chain {
            return (contents, Some(corrupt("its checksum does not match")));
        }
        contents.records.push((next, payload.to_vec()));
        pos = next;
        at += 8 + len + 32;
    }
    (contents, None)
}

/// Appends one record, `payload` ending at `after`, to `out`.
fn frame(out: &mut Vec<u8>, payload: &[u8], after: &Position) {
    let len = u32::try_from(payload.len()).expect("payloads are bounded by MAX_RECORD");
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&(!len).to_le_bytes());
    out.extend_from_slice(payload);
    out.extend_from_slice(&after.chain);
}

/// A journal open for appending.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    file: File,
    position: Position,
}

impl Journal {
    /// Opens (creating if needed) the journal at `path`, verifying every record,
    /// and drops a torn tail (an append that never completed). Returns the
    /// journal, positioned at its end, and what it held.
    pub fn open(path: &Path) -> Result<(Self, Contents), JournalError> {
        let io_err = |source| JournalError::Io {
            path: path.to_owned(),
            source,
        };
        let contents = read(path)?;
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(io_err)?;
        let len = file.metadata().map_err(io_err)?.len();
        if len == 0 || (contents.records.is_empty() && contents.torn_tail == len) {
            file.set_len(0).map_err(io_err)?;
            file.write_all(MAGIC).map_err(io_err)?;
            file.sync_all().map_err(io_err)?;
            crate::sync_parent(path).map_err(io_err)?;
        } else if contents.torn_tail > 0 {
            tracing::warn!(
                journal = %path.display(),
                bytes = contents.torn_tail,
                "dropping an append that never completed from the end of the journal"
            );
            file.set_len(len - contents.torn_tail).map_err(io_err)?;
            file.sync_all().map_err(io_err)?;
        }
        file.seek(SeekFrom::End(0)).map_err(io_err)?;
        Ok((
            Self {
                path: path.to_owned(),
                file,
                position: contents.position(),
            },
            contents,
        ))
    }

    /// Where the journal ends.
    pub fn position(&self) -> Position {
        self.position
    }

    /// Appends `payload` as one record and syncs it to disk before returning
    /// the position after it. On failure nothing is appended: a partial write is
    /// cut off again.
    pub fn append(&mut self, payload: &[u8]) -> Result<Position, JournalError> {
        if payload.len() > MAX_RECORD {
            return Err(JournalError::TooLarge(payload.len()));
        }
        let next = self.position.next(payload);
        let mut record = Vec::with_capacity(8 + payload.len() + 32);
        frame(&mut record, payload, &next);
        let end = self.file.stream_position();
        let written = self
            .file
            .write_all(&record)
            .and_then(|()| self.file.sync_data());
        if let Err(source) = written {
            if let Ok(end) = end {
                // Best effort: a record cut short is dropped at the next open anyway.
                let _ = self.file.set_len(end);
                let _ = self.file.seek(SeekFrom::Start(end));
            }
            return Err(JournalError::Io {
                path: self.path.clone(),
                source,
            });
        }
        self.position = next;
        Ok(next)
    }

    /// Replaces the journal with `payloads` (a repair): written to a temporary
    /// file, synced, renamed over the journal. Returns the new journal.
    pub fn rewrite(path: &Path, payloads: &[Vec<u8>]) -> Result<Self, JournalError> {
        let io_err = |source| JournalError::Io {
            path: path.to_owned(),
            source,
        };
        let tmp = path.with_extension("rewrite");
        {
            let mut f = File::create(&tmp).map_err(io_err)?;
            let mut out = MAGIC.to_vec();
            let mut pos = Position::default();
            for p in payloads {
                if p.len() > MAX_RECORD {
                    return Err(JournalError::TooLarge(p.len()));
                }
                pos = pos.next(p);
                frame(&mut out, p, &pos);
            }
            f.write_all(&out).map_err(io_err)?;
            f.sync_all().map_err(io_err)?;
        }
        std::fs::rename(&tmp, path).map_err(io_err)?;
        crate::sync_parent(path).map_err(io_err)?;
        Ok(Self::open(path)?.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn journal_with(dir: &Path, payloads: &[&[u8]]) -> PathBuf {
        let path = dir.join("j");
        let (mut j, c) = Journal::open(&path).unwrap();
        assert!(c.records.is_empty());
        for p in payloads {
            j.append(p).unwrap();
        }
        path
    }

    #[test]
    fn records_come_back_in_order_with_their_positions() {
        let dir = tempfile::tempdir().unwrap();
        let path = journal_with(dir.path(), &[b"one", b"", b"three"]);
        let (mut j, c) = Journal::open(&path).unwrap();
        let payloads: Vec<&[u8]> = c.records.iter().map(|(_, p)| p.as_slice()).collect();
        assert_eq!(payloads, [b"one".as_slice(), b"", b"three"]);
        assert_eq!(c.position().seq, 3);
        assert_eq!(j.position(), c.position());
        assert_eq!(c.position_at(2), Some(c.records[1].0));
        assert_eq!(c.position_at(0), Some(Position::default()));
        assert_eq!(c.position_at(4), None);
        assert_eq!(
            c.file_len_through(3),
            std::fs::metadata(&path).unwrap().len()
        );
        assert_eq!(c.file_len_through(1), 8 + 8 + 3 + 32);
        // Appending goes on from the end, and positions round-trip as bytes.
        let p = j.append(b"four").unwrap();
        assert_eq!(p.seq, 4);
        assert_eq!(Position::from_bytes(&p.to_bytes()), Some(p));
        assert_eq!(Position::from_bytes(&[0; 39]), None);
        assert_eq!(read(&path).unwrap().position(), p);
        // The same records make the same chain.
        let other = tempfile::tempdir().unwrap();
        let same = journal_with(other.path(), &[b"one", b"", b"three", b"four"]);
        assert_eq!(read(&same).unwrap().position(), p);
    }

    #[test]
    fn a_flipped_byte_anywhere_is_named_with_its_record() {
        let dir = tempfile::tempdir().unwrap();
        let path = journal_with(dir.path(), &[b"alpha", b"bravo", b"delta"]);
        let good = std::fs::read(&path).unwrap();
        // The header, then every byte of every record.
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0x01;
            std::fs::write(&path, &bad).unwrap();
            let err = read(&path).unwrap_err();
            match err {
                JournalError::NotAJournal { .. } => assert!(i < MAGIC.len(), "byte {i}"),
                JournalError::Corrupt { seq, .. } => {
                    // Records are 8 + 5 + 32 bytes here.
                    let expect = ((i - MAGIC.len()) / 45) as u64 + 1;
                    assert_eq!(seq, expect, "byte {i}");
                }
                other => panic!("byte {i}: {other}"),
            }
            // Opening for writing refuses too, and changes nothing.
            assert!(Journal::open(&path).is_err());
            assert_eq!(std::fs::read(&path).unwrap(), bad);
            // A salvage keeps the records before the damage.
            let (kept, damage) = salvage(&path).unwrap();
            assert!(damage.is_some(), "byte {i}");
            let before = i.saturating_sub(MAGIC.len()) / 45;
            assert_eq!(kept.records.len(), if i < MAGIC.len() { 0 } else { before });
        }
    }

    #[test]
    fn an_append_cut_short_is_dropped_and_the_journal_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let path = journal_with(dir.path(), &[b"alpha", b"bravo"]);
        let good = std::fs::read(&path).unwrap();
        let two = read(&path).unwrap().position();
        for cut in 1..45 {
            std::fs::write(&path, &good[..good.len() - cut]).unwrap();
            let c = read(&path).unwrap();
            assert_eq!(c.position().seq, 1, "cut {cut}");
            assert_eq!(c.torn_tail, 45 - cut as u64, "cut {cut}");
            let (mut j, _) = Journal::open(&path).unwrap();
            assert_eq!(j.append(b"bravo").unwrap(), two, "cut {cut}");
        }
        // A journal cut inside its header starts again empty.
        std::fs::write(&path, &MAGIC[..3]).unwrap();
        let (mut j, c) = Journal::open(&path).unwrap();
        assert!(c.records.is_empty());
        assert_eq!(j.append(b"x").unwrap().seq, 1);
        std::fs::write(&path, b"junk").unwrap();
        assert!(matches!(
            Journal::open(&path),
            Err(JournalError::NotAJournal { .. })
        ));
    }

    #[test]
    fn a_database_position_stands_against_the_journal() {
        let dir = tempfile::tempdir().unwrap();
        let path = journal_with(dir.path(), &[b"alpha", b"bravo"]);
        let c = read(&path).unwrap();
        let (one, two) = (c.records[0].0, c.records[1].0);
        assert_eq!(c.standing(Some(two)), Standing::Agrees);
        assert_eq!(c.standing(Some(one)), Standing::DatabaseBehind);
        assert_eq!(c.standing(None), Standing::DatabaseBehind);
        let three = Position {
            seq: 3,
            chain: [7; 32],
        };
        assert_eq!(
            c.standing(Some(three)),
            Standing::JournalBehind {
                journal: 2,
                database: 3
            }
        );
        let other = Position {
            seq: 1,
            chain: [9; 32],
        };
        assert_eq!(c.standing(Some(other)), Standing::Diverged { seq: 1 });
        let aside = aside_name(&path);
        assert!(aside.to_string_lossy().contains("j.damaged-"), "{aside:?}");
        assert_eq!(aside.parent(), path.parent());
    }

    #[test]
    fn a_rewrite_replaces_the_records_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = journal_with(dir.path(), &[b"alpha", b"bravo"]);
        let mut j = Journal::rewrite(&path, &[b"alpha".to_vec(), b"other".to_vec()]).unwrap();
        assert_eq!(j.position().seq, 2);
        j.append(b"third").unwrap();
        let c = read(&path).unwrap();
        let payloads: Vec<&[u8]> = c.records.iter().map(|(_, p)| p.as_slice()).collect();
        assert_eq!(payloads, [b"alpha".as_slice(), b"other", b"third"]);
        assert!(!path.with_extension("rewrite").exists());
        assert!(matches!(
            j.append(&vec![0; MAX_RECORD + 1]),
            Err(JournalError::TooLarge(_))
        ));
    }
}
