//! Property tests: encodings round-trip, decoders never panic, the diff/apply law
//! holds, and no escaping path is ever accepted.

// Test helpers outside #[test] functions unwrap too: a panic is a failed test.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::{Component, Path};

use image_spec::{
    BlobId, Commit, CommitId, Image, ImageName, LinkTarget, RelPath, ServiceName, Timestamp, Tree,
    TreeDiff, TreeEntry, TreeId,
};
use proptest::prelude::*;

fn path_strategy() -> impl Strategy<Value = String> {
    let dir = prop::sample::select(vec!["d0", "d1", "dé"]);
    let leaf = prop::sample::select(vec!["f0", "f1", "f2", "ü", "x y", "d0"]);
    (prop::collection::vec(dir, 0..3), leaf).prop_map(|(mut parts, leaf)| {
        parts.push(leaf);
        parts.join("/")
    })
}

fn entry_strategy() -> impl Strategy<Value = TreeEntry> {
    let content = prop::sample::select(vec!["", "a", "b", "hello"]);
    let target = prop::sample::select(vec!["f0", "../f1", "d0/f2", "..", "./ü", "../../x", "d1"]);
    prop_oneof![
        // Sizes are declared by whoever builds the tree; let some disagree with the
        // content so the diff cannot rely on blob equality implying size equality.
        4 => (path_strategy(), any::<bool>(), content, 0..2u64).prop_map(|(p, exec, c, extra)| {
            TreeEntry::file(RelPath::new(&p).unwrap(), exec, c.len() as u64 + extra, BlobId::of(c.as_bytes()))
        }),
        1 => (path_strategy(), target).prop_map(|(p, t)| {
            TreeEntry::symlink(RelPath::new(&p).unwrap(), LinkTarget::new(t).unwrap())
        }),
    ]
}

/// A valid tree: random entries, keeping each one only if the tree stays valid.
fn tree_strategy() -> impl Strategy<Value = Tree> {
    prop::collection::vec(entry_strategy(), 0..24).prop_map(|candidates| {
        let mut kept: Vec<TreeEntry> = Vec::new();
        for e in candidates {
            let mut trial = kept.clone();
            trial.push(e);
            if Tree::new(trial.clone()).is_ok() {
                kept = trial;
            }
        }
        Tree::new(kept).unwrap()
    })
}

fn id_bytes() -> impl Strategy<Value = [u8; 32]> {
    any::<[u8; 32]>()
}

fn commit_strategy() -> impl Strategy<Value = Commit> {
    (
        "[a-z0-9][a-z0-9._-]{0,20}",
        id_bytes(),
        prop::collection::btree_set(id_bytes(), 0..4),
        "[a-zA-Z][a-zA-Z <>@.é]{0,40}",
        "\\PC{0,200}",
        any::<i64>(),
    )
        .prop_map(|(service, tree, parents, author, message, time)| {
            Commit::new(
                ServiceName::new(&service).unwrap(),
                TreeId::from_bytes(tree),
                parents.into_iter().map(CommitId::from_bytes).collect(),
                author,
                message,
                Timestamp::from_unix_seconds(time),
            )
            .unwrap()
        })
}

fn image_strategy() -> impl Strategy<Value = Image> {
    (
        "[a-z0-9][a-z0-9._-]{0,30}",
        "\\PC{0,100}",
        prop::collection::btree_map("[a-z0-9][a-z0-9_-]{0,12}", id_bytes(), 1..8),
    )
        .prop_map(|(name, description, services)| {
            let services: BTreeMap<_, _> = services
                .into_iter()
                .map(|(s, c)| (ServiceName::new(&s).unwrap(), CommitId::from_bytes(c)))
                .collect();
            Image::new(ImageName::new(&name).unwrap(), description, services).unwrap()
        })
}

/// What a RelPath must be, written independently of the implementation.
fn is_safe_relative(s: &str) -> bool {
    let parts: Vec<&str> = s.split('/').collect();
    !s.is_empty()
        && s.len() <= RelPath::MAX_LEN
        && !s.chars().any(|c| c.is_ascii_control())
        && !s.contains('\\')
        && parts.len() <= RelPath::MAX_DEPTH
        && parts.iter().all(|c| {
            !c.is_empty() && *c != "." && *c != ".." && c.len() <= RelPath::MAX_COMPONENT_LEN
        })
}

fn hostile_string() -> impl Strategy<Value = String> {
    let piece = prop::sample::select(vec![
        "..", ".", "/", "\\", "\0", "\n", "\u{1b}", "a", "é", "日本", "😀", " ", "", "b/", "//",
        "\u{202e}", ":",
    ]);
    prop::collection::vec(piece, 0..12).prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn relpath_never_accepts_an_escaping_path(s in hostile_string()) {
        let parsed = RelPath::new(&s);
        prop_assert_eq!(parsed.is_ok(), is_safe_relative(&s), "{:?} gave {:?}", s, parsed);
        if let Ok(p) = parsed {
            let root = Path::new("/srv/root");
            let joined = p.under(root);
            prop_assert!(joined.starts_with(root) && joined != root);
            prop_assert!(joined
                .components()
                .all(|c| matches!(c, Component::RootDir | Component::Normal(_))));
        }
    }

    #[test]
    fn relpath_any_unicode(s in "\\PC{0,40}") {
        prop_assert_eq!(RelPath::new(&s).is_ok(), is_safe_relative(&s));
    }

    #[test]
    fn link_targets_in_valid_trees_resolve_inside(tree in tree_strategy()) {
        for e in tree.entries() {
            if let Some(t) = e.link_target() {
                // Resolving can only return components inside the root.
                let parts = t.resolve_from(e.path()).unwrap();
                prop_assert!(parts.iter().all(|c| c != ".." && c != "." && !c.is_empty()));
            }
        }
    }

    #[test]
    fn tree_encoding_round_trips(tree in tree_strategy()) {
        let bytes = tree.encode();
        prop_assert_eq!(&Tree::decode(&bytes).unwrap(), &tree);
        let json = serde_json::to_string(&tree).unwrap();
        prop_assert_eq!(serde_json::from_str::<Tree>(&json).unwrap(), tree);
    }

    #[test]
    fn commit_encoding_round_trips(commit in commit_strategy()) {
        prop_assert_eq!(&Commit::decode(&commit.encode()).unwrap(), &commit);
        let json = serde_json::to_string(&commit).unwrap();
        prop_assert_eq!(serde_json::from_str::<Commit>(&json).unwrap(), commit);
    }

    #[test]
    fn image_encoding_round_trips(image in image_strategy()) {
        prop_assert_eq!(&Image::decode(&image.encode()).unwrap(), &image);
        prop_assert_eq!(&Image::from_toml(&image.to_toml()).unwrap(), &image);
        let json = serde_json::to_string(&image).unwrap();
        prop_assert_eq!(serde_json::from_str::<Image>(&json).unwrap(), image);
    }

    #[test]
    fn diff_apply_law(old in tree_strategy(), new in tree_strategy()) {
        let diff = TreeDiff::between(&old, &new);
        prop_assert_eq!(&diff.apply(&old).unwrap(), &new);
        // Changes are strictly ordered by path, and the diff survives serde.
        prop_assert!(diff.changes().windows(2).all(|w| w[0].path() < w[1].path()));
        let json = serde_json::to_string(&diff).unwrap();
        let back: TreeDiff = serde_json::from_str(&json).unwrap();
        prop_assert_eq!(back.apply(&old).unwrap(), new.clone());
        // First install is the same law from the empty tree.
        prop_assert_eq!(TreeDiff::between(&Tree::empty(), &new).apply(&Tree::empty()).unwrap(), new);
        prop_assert!(TreeDiff::between(&old, &old).is_empty());
    }

    #[test]
    fn decoders_never_panic_on_noise(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = Tree::decode(&bytes);
        let _ = Commit::decode(&bytes);
        let _ = Image::decode(&bytes);
    }

    /// A corrupted encoding either fails or is itself the canonical encoding of what
    /// it decodes to: one value never has two encodings (and so two ids).
    #[test]
    fn corrupted_encodings_fail_or_are_canonical(
        tree in tree_strategy(),
        commit in commit_strategy(),
        image in image_strategy(),
        pos in any::<prop::sample::Index>(),
        byte in any::<u8>(),
    ) {
        for bytes in [tree.encode(), commit.encode(), image.encode()] {
            let mut bad = bytes.clone();
            let i = pos.index(bad.len());
            bad[i] = byte;
            if let Ok(t) = Tree::decode(&bad) { prop_assert_eq!(t.encode(), bad.clone()); }
            if let Ok(c) = Commit::decode(&bad) { prop_assert_eq!(c.encode(), bad.clone()); }
            if let Ok(m) = Image::decode(&bad) { prop_assert_eq!(m.encode(), bad.clone()); }
            let truncated = &bytes[..i];
            prop_assert!(Tree::decode(truncated).is_err());
            prop_assert!(Commit::decode(truncated).is_err());
            prop_assert!(Image::decode(truncated).is_err());
        }
    }
}
