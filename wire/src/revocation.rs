//! Revoked certificates: the serial numbers a server refuses.
//!
//! `molt cert revoke` appends a certificate's serial number to a plain text
//! file beside the CA, `certs/revoked.txt`:
//!
//! - one serial number per line, in hex (what [`serial_hex`] writes: lowercase,
//!   no leading zero bytes); upper case, `:` separators (as `openssl x509
//!   -serial` prints them) and leading zeros are accepted too;
//! - blank lines and lines starting with `#` are ignored.
//!
//! A server is given the file's path and holds a [`RevocationList`]: it checks
//! the file's modification time (and length) on every new connection or
//! request — one `stat` — and re-reads it only when that changed, so a
//! revocation takes effect for the next connection without a restart. A missing
//! file revokes nothing. The check is behind the [`Revoked`] trait so a server
//! can be handed another source (a database, an OCSP cache) without change.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use tracing::{info, warn};

/// The revocation list's file name, beside the CA certificate.
pub const REVOKED_FILE: &str = "revoked.txt";

/// Decides whether a certificate, by its serial number, has been revoked.
pub trait Revoked: Send + Sync + std::fmt::Debug + 'static {
    /// Is the certificate with this serial number (big-endian bytes, as
    /// [`crate::pki::serial_of`] reads them) revoked?
    fn is_revoked(&self, serial: &[u8]) -> bool;
}

/// Why a serial number cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SerialError {
    /// Not hex.
    #[error("`{0}` is not a certificate serial number (hex digits, optionally with `:`)")]
    NotHex(String),
    /// Nothing.
    #[error("empty serial number")]
    Empty,
}

/// The serial's bytes without leading zeros: the one form two spellings of a
/// serial are compared in.
fn normalized(serial: &[u8]) -> &[u8] {
    let start = serial.iter().position(|b| *b != 0).unwrap_or(serial.len());
    &serial[start..]
}

/// A serial number as the revocation list writes it: lowercase hex, no
/// leading zero bytes (`0` for zero).
pub fn serial_hex(serial: &[u8]) -> String {
    let s: String = normalized(serial)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    if s.is_empty() { "0".into() } else { s }
}

/// Parses a serial number written in hex (`:` separators, either case).
pub fn parse_serial(text: &str) -> Result<Vec<u8>, SerialError> {
    let digits: String = text
        .trim()
        .chars()
        .filter(|c| *c != ':')
        .collect::<String>()
        .to_ascii_lowercase();
    let digits = digits.strip_prefix("0x").unwrap_or(&digits);
    if digits.is_empty() {
        return Err(SerialError::Empty);
    }
    if !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(SerialError::NotHex(text.trim().to_owned()));
    }
    let padded = if digits.len() % 2 == 1 {
        format!("0{digits}")
    } else {
        digits.to_owned()
    };
    let bytes = (0..padded.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&padded[i..i + 2], 16))
        .collect::<Result<Vec<u8>, _>>()
        .map_err(|_| SerialError::NotHex(text.trim().to_owned()))?;
    Ok(normalized(&bytes).to_vec())
}

/// Reads a revocation list's text: the serials it names, and the lines it
/// could not read (1-based line numbers with the reason).
pub fn parse_list(text: &str) -> (HashSet<Vec<u8>>, Vec<(usize, SerialError)>) {
    let mut serials = HashSet::new();
    let mut bad = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        match parse_serial(line) {
            Ok(s) => {
                serials.insert(s);
            }
            Err(e) => bad.push((n + 1, e)),
        }
    }
    (serials, bad)
}

/// Appends `serial` to the list at `path` (created if missing, with its
/// directory), durably. `false` when it was listed already.
pub fn append(path: &Path, serial: &[u8]) -> std::io::Result<bool> {
    use std::io::Write;
    let existing = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e),
    };
    if parse_list(&existing).0.contains(normalized(serial)) {
        return Ok(false);
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    let sep = if existing.is_empty() || existing.ends_with('\n') {
        ""
    } else {
        "\n"
    };
    file.write_all(format!("{sep}{}\n", serial_hex(serial)).as_bytes())?;
    file.sync_all()?;
    Ok(true)
}

/// The file's identity for "has it changed": modification time and length.
type Stamp = Option<(SystemTime, u64)>;

#[derive(Debug, Default)]
struct Cached {
    stamp: Stamp,
    serials: HashSet<Vec<u8>>,
}

/// A revocation list file, re-read whenever it changes (see the module docs).
#[derive(Debug)]
pub struct RevocationList {
    path: PathBuf,
    cached: Mutex<Cached>,
}

impl RevocationList {
    /// The list in `path` (which may not exist yet).
    pub fn new(path: impl Into<PathBuf>) -> Self {
        let list = Self {
            path: path.into(),
            cached: Mutex::new(Cached::default()),
        };
        drop(list.refresh());
        list
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn stamp(&self) -> std::io::Result<Stamp> {
        match std::fs::metadata(&self.path) {
            Ok(m) => Ok(Some((m.modified()?, m.len()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Re-reads the file if its stamp changed; returns the lock on the result.
    fn refresh(&self) -> std::sync::MutexGuard<'_, Cached> {
        // The set is replaced whole; a panic elsewhere cannot leave it half made.
        let mut cached = self.cached.lock().unwrap_or_else(|p| p.into_inner());
        let stamp = match self.stamp() {
            Ok(s) => s,
            Err(e) => {
                warn!(path = %self.path.display(), error = %e, "cannot check the revocation list; keeping the last one read");
                return cached;
            }
        };
        if stamp == cached.stamp && stamp.is_some() {
            return cached;
        }
        let text = match stamp {
            None => String::new(),
            Some(_) => match std::fs::read_to_string(&self.path) {
                Ok(t) => t,
                Err(e) => {
                    warn!(path = %self.path.display(), error = %e, "cannot read the revocation list; keeping the last one read");
                    return cached;
                }
            },
        };
        let (serials, bad) = parse_list(&text);
        for (line, e) in bad {
            warn!(path = %self.path.display(), line, error = %e, "ignoring a line of the revocation list");
        }
        if serials != cached.serials {
            info!(path = %self.path.display(), revoked = serials.len(), "revocation list read");
        }
        *cached = Cached { stamp, serials };
        cached
    }
}

impl Revoked for RevocationList {
    fn is_revoked(&self, serial: &[u8]) -> bool {
        self.refresh().serials.contains(normalized(serial))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serials_are_read_in_every_usual_spelling() {
        assert_eq!(parse_serial("0a1B").unwrap(), vec![0x0a, 0x1b]);
        assert_eq!(parse_serial("00:0A:1b").unwrap(), vec![0x0a, 0x1b]);
        assert_eq!(parse_serial("a1b").unwrap(), vec![0x0a, 0x1b]);
        assert_eq!(parse_serial("0x0a1b").unwrap(), vec![0x0a, 0x1b]);
        assert_eq!(serial_hex(&[0, 0x0a, 0x1b]), "0a1b");
        assert_eq!(serial_hex(&[0]), "0");
        assert!(matches!(parse_serial("xyz"), Err(SerialError::NotHex(_))));
        assert_eq!(parse_serial(" : "), Err(SerialError::Empty));
        let (set, bad) = parse_list("# revoked\n\n0a1b\nnope\n  FF  \n");
        assert_eq!(set.len(), 2);
        assert!(set.contains(&vec![0xff]));
        assert_eq!(bad.len(), 1);
        assert_eq!(bad[0].0, 4);
    }

    #[test]
    fn a_list_follows_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("certs/revoked.txt");
        let list = RevocationList::new(&path);
        assert!(!list.is_revoked(&[1, 2]), "a missing file revokes nothing");
        assert!(append(&path, &[0, 1, 2]).unwrap());
        assert!(!append(&path, &[1, 2]).unwrap(), "listed once");
        assert!(list.is_revoked(&[1, 2]));
        assert!(list.is_revoked(&[0, 1, 2]));
        assert!(!list.is_revoked(&[3]));
        assert!(append(&path, &[3]).unwrap());
        assert!(list.is_revoked(&[3]), "an append is seen at the next check");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "0102\n03\n");
        std::fs::remove_file(&path).unwrap();
        assert!(!list.is_revoked(&[3]), "a removed file revokes nothing");
    }
}
