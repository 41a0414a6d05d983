//! Damaging a store's files on purpose: copies of a pristine directory, each
//! with one file cut short or one byte flipped, for tests that check the damage
//! is named and what is lost comes back.

use std::path::{Path, PathBuf};

/// One way of damaging a directory.
pub type Damage = Box<dyn Fn(&Path)>;

/// Copies the directory `from` to `to`, recursively.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create the copy");
    for entry in std::fs::read_dir(from).expect("read the directory") {
        let entry = entry.expect("read an entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("its type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy a file");
        }
    }
}

/// Every file under `dir`, sorted.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read the directory") {
        let p = entry.expect("read an entry").path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out.sort();
    out
}

/// Flips the bits of one byte of `path`, at `at` (or its last byte).
pub fn flip(path: &Path, at: usize) {
    let mut bytes = std::fs::read(path).expect("read the file");
    if bytes.is_empty() {
        return;
    }
    let at = at.min(bytes.len() - 1);
    bytes[at] ^= 0x5a;
    std::fs::write(path, bytes).expect("write the file");
}

/// Cuts `path` to its first `keep` bytes.
pub fn cut(path: &Path, keep: u64) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|f| f.set_len(keep))
        .expect("cut the file");
}

/// The damages a database directory `db` (relative to `root`) is put
/// through: deleted whole, then each of its files cut to 1/4, 2/4 and 3/4
/// of its length and flipped there.
pub fn database_damages(root: &Path, db: &str) -> Vec<(String, Damage)> {
    let dir = root.join(db);
    let owned = db.to_owned();
    let mut cases: Vec<(String, Damage)> = vec![(
        format!("{db} deleted"),
        Box::new(move |d: &Path| {
            std::fs::remove_dir_all(d.join(&owned)).expect("delete the database")
        }),
    )];
    for file in files_under(&dir) {
        let rel = file.strip_prefix(root).expect("under the root").to_owned();
        let len = std::fs::metadata(&file).expect("its length").len();
        for frac in [1, 2, 3] {
            let r = rel.clone();
            cases.push((
                format!("{} cut to {frac}/4", rel.display()),
                Box::new(move |d: &Path| cut(&d.join(&r), len * frac / 4)),
            ));
            let r = rel.clone();
            cases.push((
                format!("{} flipped at {frac}/4", rel.display()),
                Box::new(move |d: &Path| flip(&d.join(&r), (len * frac / 4) as usize)),
            ));
        }
    }
    cases
}
