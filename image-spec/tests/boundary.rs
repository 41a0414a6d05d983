//! Boundary cases, as a table: each row builds a real directory, scans it with
//! `scan_dir`, and checks the tree (or the error) it must give.

// Test helpers outside #[test] functions unwrap too: a panic is a failed test.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::os::unix::fs::symlink;
use std::path::Path;

use image_spec::{
    BlobId, Change, DiffError, Mode, PathError, RelPath, ScanError, ScannedTree, Tree, TreeDiff,
    TreeEntry, TreeError, scan_dir,
};

fn write(root: &Path, rel: &str, bytes: &[u8]) {
    let p = root.join(rel);
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(p, bytes).unwrap();
}

type Setup = fn(&Path);
type Check = fn(&Path, Result<ScannedTree, ScanError>);

struct Case {
    name: &'static str,
    setup: Setup,
    check: Check,
}

fn ok(r: Result<ScannedTree, ScanError>) -> ScannedTree {
    r.unwrap_or_else(|e| panic!("scan failed: {e}"))
}

fn paths(s: &ScannedTree) -> Vec<String> {
    s.tree
        .entries()
        .iter()
        .map(|e| e.path().to_string())
        .collect()
}

const LONG_COMPONENT: &str = "ä"; // 2 bytes in UTF-8

fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "empty tree",
            setup: |_| {},
            check: |_, r| {
                let s = ok(r);
                assert!(s.tree.is_empty());
                assert_eq!(s.tree.id(), Tree::empty().id());
                assert!(s.sources.is_empty());
            },
        },
        Case {
            name: "only empty directories",
            setup: |root| fs::create_dir_all(root.join("a/b/c")).unwrap(),
            check: |_, r| assert_eq!(ok(r).tree.id(), Tree::empty().id()),
        },
        Case {
            name: "one file",
            setup: |root| write(root, "service.toml", b"name = \"one\"\n"),
            check: |root, r| {
                let s = ok(r);
                assert_eq!(paths(&s), ["service.toml"]);
                let e = &s.tree.entries()[0];
                assert_eq!(e.size(), 13);
                assert_eq!(e.blob(), BlobId::of(b"name = \"one\"\n"));
                assert_eq!(s.sources[&e.blob()], root.join("service.toml"));
            },
        },
        Case {
            name: "0-byte file",
            setup: |root| write(root, "empty", b""),
            check: |_, r| {
                let s = ok(r);
                let e = &s.tree.entries()[0];
                assert_eq!((e.size(), e.blob()), (0, BlobId::of(b"")));
            },
        },
        Case {
            name: "10k files",
            setup: |root| {
                for i in 0..10_000 {
                    write(
                        root,
                        &format!("d{}/f{i}.txt", i % 100),
                        format!("file {i}").as_bytes(),
                    );
                }
            },
            check: |root, r| {
                let s = ok(r);
                assert_eq!(s.tree.len(), 10_000);
                assert_eq!(s.sources.len(), 10_000);
                // Change one file: the diff is that one file, and applies.
                write(root, "d42/f4242.txt", b"changed");
                let s2 = scan_dir(root).unwrap();
                let diff = TreeDiff::between(&s.tree, &s2.tree);
                assert_eq!(diff.changes().len(), 1);
                assert!(
                    matches!(&diff.changes()[0], Change::Modified(e) if e.path().as_str() == "d42/f4242.txt")
                );
                assert_eq!(diff.apply(&s.tree).unwrap(), s2.tree);
            },
        },
        Case {
            name: "unicode names",
            setup: |root| {
                write(root, "日本語/ファイル.txt", b"1");
                write(root, "émoji 😀", b"2");
                write(root, "rtl\u{202e}txt.exe", b"3");
            },
            check: |_, r| {
                let s = ok(r);
                assert_eq!(
                    paths(&s),
                    ["rtl\u{202e}txt.exe", "émoji 😀", "日本語/ファイル.txt"]
                );
            },
        },
        Case {
            name: "very long names at the limits",
            setup: |root| {
                // A 254-byte component of 2-byte characters, and a path near 1024 bytes.
                let name = LONG_COMPONENT.repeat(127);
                write(root, &name, b"x");
                let dir = "d".repeat(200);
                write(
                    root,
                    &format!("{dir}/{dir}/{dir}/{dir}/{}", "f".repeat(200)),
                    b"y",
                );
            },
            check: |_, r| {
                let s = ok(r);
                assert_eq!(s.tree.len(), 2);
                assert!(
                    s.tree
                        .entries()
                        .iter()
                        .any(|e| e.path().as_str().len() == 1004)
                );
            },
        },
        Case {
            name: "path over the length limit",
            setup: |root| {
                let dir = "d".repeat(250);
                write(
                    root,
                    &format!("{dir}/{dir}/{dir}/{dir}/{}", "f".repeat(100)),
                    b"y",
                );
            },
            check: |_, r| {
                let e = r.unwrap_err();
                assert!(
                    matches!(
                        &e,
                        ScanError::BadPath {
                            error: PathError::TooLong { len: 1104, .. },
                            ..
                        }
                    ),
                    "{e}"
                );
            },
        },
        Case {
            name: "a very deep path is named by its ends, not repeated whole",
            setup: |root| {
                // 3301 bytes: as deep as a path on disk can be made in one call
                // here (PATH_MAX is 4096), three times the limit.
                let deep = format!("{}/f", vec!["d".repeat(10); 300].join("/"));
                write(root, &deep, b"deep");
            },
            check: |root, r| {
                let e = r.unwrap_err();
                assert!(
                    matches!(
                        &e,
                        ScanError::BadPath {
                            error: PathError::TooLong { len: 3301, .. },
                            ..
                        }
                    ),
                    "{e}"
                );
                let text = e.to_string();
                // Both paths shortened: their first and last characters and
                // their lengths, never all 3 KB twice.
                assert!(text.len() < 400, "{} bytes: {text}", text.len());
                assert!(text.starts_with(&format!("`{}", root.display())), "{text}");
                assert!(
                    text.contains("dddd/f` (3301 bytes) is over the limit of 1024 bytes"),
                    "{text}"
                );
                let on_disk = root.as_os_str().len() + 1 + 3301;
                assert!(
                    text.contains(&format!("dddd/f` ({on_disk} bytes) cannot be shipped")),
                    "{text}"
                );
            },
        },
        Case {
            name: "path over the depth limit",
            setup: |root| write(root, &vec!["d"; 65].join("/"), b"deep"),
            check: |_, r| {
                let e = r.unwrap_err();
                assert!(
                    matches!(
                        &e,
                        ScanError::BadPath {
                            error: PathError::TooDeep { depth: 65, .. },
                            ..
                        }
                    ),
                    "{e}"
                );
            },
        },
        Case {
            name: "symlink out of the root",
            setup: |root| {
                write(root, "ok", b"1");
                fs::create_dir(root.join("sub")).unwrap();
                symlink("../../etc/shadow", root.join("sub/evil")).unwrap();
            },
            check: |root, r| {
                let e = r.unwrap_err();
                assert!(
                    matches!(&e, ScanError::BadLink { path, .. } if path == &root.join("sub/evil")),
                    "{e}"
                );
                assert!(e.to_string().contains("outside the service root"), "{e}");
            },
        },
        Case {
            name: "symlink inside the root, to a directory",
            setup: |root| {
                write(root, "lib/a.so", b"so");
                fs::create_dir(root.join("bin")).unwrap();
                symlink("../lib", root.join("bin/lib")).unwrap();
            },
            check: |_, r| {
                let s = ok(r);
                let link = s.tree.get(&RelPath::new("bin/lib").unwrap()).unwrap();
                assert_eq!(link.mode(), Mode::Symlink);
                assert_eq!(link.link_target().unwrap().as_str(), "../lib");
                // The link is not followed: lib/a.so appears once.
                assert_eq!(s.tree.len(), 2);
            },
        },
    ]
}

#[test]
fn boundary_table() {
    for case in cases() {
        let dir = tempfile::tempdir().unwrap();
        (case.setup)(dir.path());
        let result = scan_dir(dir.path());
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            (case.check)(dir.path(), result)
        }));
        assert!(outcome.is_ok(), "boundary case `{}` failed", case.name);
    }
}

/// A file/directory clash cannot exist on disk, but can arrive in a tree or a diff.
#[test]
fn file_dir_clash_is_refused_in_trees_and_diffs() {
    let file = |p: &str| TreeEntry::file(RelPath::new(p).unwrap(), false, 1, BlobId::of(b"x"));
    assert!(matches!(
        Tree::new(vec![file("a"), file("a/b")]),
        Err(TreeError::FileDirClash { .. })
    ));
    let old = Tree::new(vec![file("a")]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a/b", b"x");
    let new = scan_dir(dir.path()).unwrap().tree;
    // The honest diff removes `a` before adding `a/b`, so it applies...
    assert_eq!(TreeDiff::between(&old, &new).apply(&old).unwrap(), new);
    // ...but a diff that only adds `a/b` on top of `a` does not.
    let forged: TreeDiff = serde_json::from_value(serde_json::json!({
        "from": old.id(),
        "to": new.id(),
        "changes": [{ "added": serde_json::to_value(file("a/b")).unwrap() }],
    }))
    .unwrap();
    assert!(matches!(
        forged.apply(&old),
        Err(DiffError::InvalidResult(TreeError::FileDirClash { .. }))
    ));
}

/// A file larger than 4 GiB keeps its exact size (no 32-bit truncation anywhere).
/// The file is sparse, so it costs no disk; hashing reads 4.5 GiB of zeros.
#[test]
fn multi_gigabyte_sparse_file() {
    let dir = tempfile::tempdir().unwrap();
    let size: u64 = (4 << 30) + (512 << 20) + 7;
    let f = fs::File::create(dir.path().join("huge.img")).unwrap();
    f.set_len(size).unwrap();
    drop(f);
    let s = scan_dir(dir.path()).unwrap();
    let e = &s.tree.entries()[0];
    assert_eq!(e.size(), size);

    let mut hasher = blake3::Hasher::new();
    let zeros = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        let n = left.min(zeros.len() as u64) as usize;
        hasher.update_rayon(&zeros[..n]);
        left -= n as u64;
    }
    assert_eq!(e.blob(), BlobId::from(hasher.finalize()));
}
