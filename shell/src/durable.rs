//! Small files the shell writes that must survive a power loss whole or not at
//! all.
//!
//! A rename is atomic but not durable by itself: after a power cut, a file
//! renamed into place may be there without its bytes (they were never flushed),
//! or the rename may be undone (the directory was never flushed). [`write_file`]
//! writes in the one order that leaves either the old file or the new one,
//! whole: a temporary file beside the target, `fsync` it, rename it over the
//! target, `fsync` the directory. Nothing may rely on the file — a record naming
//! it — before it returns.

use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::Path;

/// Replaces (or creates) `path` with `bytes`, durably (see the module docs).
/// The temporary file is `.<name>.tmp` beside it; a failure removes it and
/// leaves any previous file at `path` untouched.
pub fn write_file(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let name = path.file_name().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("`{}` names no file", path.display()),
        )
    })?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut tmp_name = OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(".tmp");
    let tmp = dir.join(tmp_name);
    let written = File::create(&tmp).and_then(|mut file| {
        file.write_all(bytes)?;
        file.sync_all()
    });
    if let Err(e) = written.and_then(|()| fs::rename(&tmp, path)) {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    sync_dir(dir)
}

/// Makes the entries of `dir` (files created, renamed or removed in it) durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_is_written_whole_or_replaced_whole_with_nothing_left_beside_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tree");
        write_file(&path, b"first").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"first");
        // A temporary file left by a crash is overwritten, not in the way.
        fs::write(dir.path().join(".tree.tmp"), b"half of som").unwrap();
        write_file(&path, b"second, longer").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"second, longer");
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["tree"]);
    }

    #[test]
    fn a_failed_write_leaves_the_previous_file_and_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tree");
        write_file(&path, b"kept").unwrap();
        // The rename cannot replace a non-empty directory of the target's name.
        let blocked = dir.path().join("blocked");
        fs::create_dir_all(blocked.join("inside")).unwrap();
        assert!(write_file(&blocked, b"new").is_err());
        assert!(blocked.join("inside").is_dir());
        assert!(!dir.path().join(".blocked.tmp").exists());
        assert_eq!(fs::read(&path).unwrap(), b"kept");
        // No parent directory to write in: an error, nothing created.
        assert!(write_file(&dir.path().join("missing/tree"), b"x").is_err());
        assert!(!dir.path().join("missing").exists());
        assert!(write_file(Path::new("/"), b"x").is_err());
    }
}
