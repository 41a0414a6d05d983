//! The sample services, built into the binary so `molt up` works from an empty
//! directory: it writes them out as the user's working copies and pushes them.
//!
//! A test checks that this list is exactly the files under `examples/`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// One file of one example: (service, path inside it, contents).
type ExampleFile = (&'static str, &'static str, &'static [u8]);

macro_rules! example {
    ($service:literal, $path:literal) => {
        (
            $service,
            $path,
            include_bytes!(concat!("../../examples/", $service, "/", $path)),
        )
    };
}

/// Every file of every example.
const FILES: &[ExampleFile] = &[
    example!("counter", ".moltignore"),
    example!("counter", "Cargo.toml"),
    example!("counter", "service.toml"),
    example!("counter", "src/lib.rs"),
    example!("hello", ".moltignore"),
    example!("hello", "server.py"),
    example!("hello", "service.toml"),
    example!("orders", ".moltignore"),
    example!("orders", "Cargo.lock"),
    example!("orders", "Cargo.toml"),
    example!("orders", "service.toml"),
    example!("orders", "src/main.rs"),
];

/// The examples' names, in push order.
pub(crate) const SERVICES: &[&str] = &["counter", "hello", "orders"];

/// Writes each example to `dir/<service>` unless that directory exists already
/// (it is the user's working copy then, edits and all). Returns each example's
/// directory.
pub(crate) fn write_out(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut dirs = Vec::new();
    for service in SERVICES {
        let target = dir.join(service);
        dirs.push(target.clone());
        if target.exists() {
            continue;
        }
        // Write into a temporary sibling and rename, so a half-written example
        // never passes for a working copy.
        let tmp = dir.join(format!(".{service}.tmp"));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp)
                .with_context(|| format!("cannot remove `{}`", tmp.display()))?;
        }
        for (_, path, bytes) in FILES.iter().filter(|(s, _, _)| s == service) {
            let file = tmp.join(path);
            if let Some(parent) = file.parent() {
                std::fs::create_dir_all(parent)
                    .with_context(|| format!("cannot create `{}`", parent.display()))?;
            }
            std::fs::write(&file, bytes)
                .with_context(|| format!("cannot write `{}`", file.display()))?;
        }
        std::fs::rename(&tmp, &target)
            .with_context(|| format!("cannot create `{}`", target.display()))?;
    }
    Ok(dirs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files_under(root: &Path, dir: &Path, out: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let entry = entry.unwrap();
            let path = entry.path();
            if entry.file_name() == "target" {
                continue;
            }
            if entry.file_type().unwrap().is_dir() {
                files_under(root, &path, out);
            } else {
                out.push(path.strip_prefix(root).unwrap().display().to_string());
            }
        }
    }

    #[test]
    fn the_embedded_examples_are_exactly_the_files_under_examples() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
        let mut on_disk = Vec::new();
        files_under(&root, &root, &mut on_disk);
        on_disk.sort();
        let mut embedded: Vec<String> = FILES.iter().map(|(s, p, _)| format!("{s}/{p}")).collect();
        embedded.sort();
        assert_eq!(embedded, on_disk, "update FILES in cli/src/examples.rs");
        let mut services: Vec<&str> = FILES.iter().map(|(s, _, _)| *s).collect();
        services.dedup();
        assert_eq!(services, SERVICES);
    }

    #[test]
    fn writing_out_keeps_an_existing_working_copy() {
        let dir = tempfile::tempdir().unwrap();
        let dirs = write_out(dir.path()).unwrap();
        assert_eq!(dirs.len(), SERVICES.len());
        let main = dir.path().join("orders/src/main.rs");
        assert!(std::fs::read_to_string(&main).unwrap().contains("VERSION"));
        std::fs::write(&main, "edited").unwrap();
        write_out(dir.path()).unwrap();
        assert_eq!(std::fs::read_to_string(&main).unwrap(), "edited");
        assert!(!dir.path().join(".orders.tmp").exists());
    }
}
