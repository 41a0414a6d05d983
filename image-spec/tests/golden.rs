//! Golden vectors: the ids of a known tree, commit and image are pinned here, and
//! the tree's bytes are rebuilt by hand from the documented layout. If one of these
//! fails, the canonical encoding changed and every id in every repository with it:
//! that needs a new format version, not a new golden value.

// Test helpers outside #[test] functions unwrap too: a panic is a failed test.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use image_spec::{
    BlobId, Commit, CommitId, Image, ImageName, LinkTarget, RelPath, ServiceName, Timestamp, Tree,
    TreeEntry,
};

fn known_tree() -> Tree {
    Tree::new(vec![
        TreeEntry::file(
            RelPath::new("service.toml").unwrap(),
            false,
            15,
            BlobId::of(b"name = \"orders\""),
        ),
        TreeEntry::file(RelPath::new("bin/run").unwrap(), true, 2, BlobId::of(b"#!")),
        TreeEntry::symlink(
            RelPath::new("current").unwrap(),
            LinkTarget::new("bin/run").unwrap(),
        ),
    ])
    .unwrap()
}

fn known_commit() -> Commit {
    Commit::new(
        ServiceName::new("orders").unwrap(),
        known_tree().id(),
        vec![CommitId::from_bytes([0xab; 32])],
        "Ada <ada@example.com>".into(),
        "first version\n\nwith a body".into(),
        Timestamp::from_unix_seconds(1_795_462_968),
    )
    .unwrap()
}

fn known_image() -> Image {
    let services = BTreeMap::from([
        (ServiceName::new("orders").unwrap(), known_commit().id()),
        (
            ServiceName::new("payments").unwrap(),
            CommitId::from_bytes([0x01; 32]),
        ),
    ]);
    Image::new(
        ImageName::new("shop-2026.11.23").unwrap(),
        "November release".into(),
        services,
    )
    .unwrap()
}

fn str_field(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

#[test]
fn tree_bytes_follow_the_documented_layout() {
    let mut expected = b"molt-tree\x01".to_vec();
    expected.extend_from_slice(&3u32.to_le_bytes());
    // Entries in path-byte order: bin/run, current, service.toml.
    str_field(&mut expected, "bin/run");
    expected.push(1);
    expected.extend_from_slice(&2u64.to_le_bytes());
    expected.extend_from_slice(blake3::hash(b"#!").as_bytes());
    str_field(&mut expected, "current");
    expected.push(2);
    expected.extend_from_slice(&7u64.to_le_bytes());
    expected.extend_from_slice(blake3::hash(b"bin/run").as_bytes());
    str_field(&mut expected, "bin/run");
    str_field(&mut expected, "service.toml");
    expected.push(0);
    expected.extend_from_slice(&15u64.to_le_bytes());
    expected.extend_from_slice(blake3::hash(b"name = \"orders\"").as_bytes());

    assert_eq!(known_tree().encode(), expected);
}

#[test]
fn commit_bytes_follow_the_documented_layout() {
    let c = known_commit();
    let mut expected = b"molt-commit\x01".to_vec();
    str_field(&mut expected, "orders");
    expected.extend_from_slice(c.tree().as_bytes());
    expected.extend_from_slice(&1u32.to_le_bytes());
    expected.extend_from_slice(&[0xab; 32]);
    str_field(&mut expected, "Ada <ada@example.com>");
    str_field(&mut expected, "first version\n\nwith a body");
    expected.extend_from_slice(&1_795_462_968i64.to_le_bytes());
    assert_eq!(c.encode(), expected);
}

#[test]
fn image_bytes_follow_the_documented_layout() {
    let i = known_image();
    let mut expected = b"molt-image\x01".to_vec();
    str_field(&mut expected, "shop-2026.11.23");
    str_field(&mut expected, "November release");
    expected.extend_from_slice(&2u32.to_le_bytes());
    str_field(&mut expected, "orders");
    expected.extend_from_slice(known_commit().id().as_bytes());
    str_field(&mut expected, "payments");
    expected.extend_from_slice(&[0x01; 32]);
    assert_eq!(i.encode(), expected);
}

#[test]
fn pinned_ids() {
    assert_eq!(
        Tree::empty().id().to_string(),
        "27a6a0abfc9349ad56046f8595e539bfbdd5115696220d5c6356e317947fe0c3"
    );
    assert_eq!(
        known_tree().id().to_string(),
        "885fc9ca1b554845766cc7c48a02514201e5d8fa55a51401d7f46fa05b3a8fef"
    );
    assert_eq!(
        known_commit().id().to_string(),
        "24743eda282f0dcae66390f9497b57c0da41be351c796ea3f34f3514e24da687"
    );
    assert_eq!(
        known_image().id().to_string(),
        "10345476aa7c29338d54aaf591bd9c095352eb0e9046cd17a67fa064129d5726"
    );
}
