//! The stores on real files, damaged on purpose: a byte flipped or a tail cut
//! off the repository's index, journal or objects, or off a shell's state
//! database or journal. The damage is named and nothing served is wrong; what
//! is lost comes back from what is left.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::Path;

use molt_e2e::damage::{copy_dir, database_damages, flip};

use image_spec::{
    BranchName, Commit, CommitId, IdPrefix, Image, ImageName, ServiceName, Timestamp, Tree,
    UserName,
};
use repo_server::fsck::fsck;
use repo_server::meta::{MetaError, MetaStore, SledMeta};
use wire::Identity;
use wire::repo::{ImageAuthorship, ImageRecord};

/// What a repository's metadata holds, to compare after damage.
#[derive(Debug, PartialEq)]
struct Snapshot {
    heads: Vec<(String, String, CommitId)>,
    images: Vec<ImageRecord>,
    last_event: u64,
    found_by_prefix: Vec<CommitId>,
}

fn snapshot(meta: &SledMeta, commits: &[CommitId]) -> Snapshot {
    let svc = ServiceName::new("orders").unwrap();
    Snapshot {
        heads: meta
            .heads(None)
            .unwrap()
            .into_iter()
            .map(|h| (h.service.to_string(), h.branch.to_string(), h.head))
            .collect(),
        images: meta.images().unwrap(),
        last_event: meta.ref_log_last().unwrap(),
        found_by_prefix: commits
            .iter()
            .flat_map(|c| {
                let prefix: IdPrefix = c.short(8).parse().unwrap();
                meta.commits_with_prefix(&svc, &prefix).unwrap()
            })
            .collect(),
    }
}

/// A repository with three branches and two images; returns its commits.
fn populate(data: &Path) -> Vec<CommitId> {
    let meta = SledMeta::open(data).unwrap();
    let svc = ServiceName::new("orders").unwrap();
    let ada: Identity = "user/ada/developer".parse().unwrap();
    let mut commits = Vec::new();
    for (i, branch) in ["main", "dev-ada", "qa"].iter().enumerate() {
        let tree = Tree::empty();
        meta.put_tree(&tree).unwrap();
        let commit = Commit::new(
            svc.clone(),
            tree.id(),
            vec![],
            "ada".into(),
            format!("commit {i}"),
            Timestamp::from_unix_seconds(i as i64),
        )
        .unwrap();
        let id = meta.put_commit(&commit).unwrap().0;
        let br = BranchName::new(branch).unwrap();
        meta.swap_head(&svc, &br, None, id, &ada, Timestamp::from_unix_seconds(10))
            .unwrap();
        commits.push(id);
    }
    for (name, commit) in [("v1", commits[0]), ("v2", commits[1])] {
        let image = Image::new(
            ImageName::new(name).unwrap(),
            String::new(),
            BTreeMap::from([(svc.clone(), commit)]),
        )
        .unwrap();
        let by = ImageAuthorship {
            author: UserName::new("ada").unwrap(),
            by: Identity::Portal,
            at: Timestamp::from_unix_seconds(20),
        };
        meta.create_image(&image, &by).unwrap();
    }
    commits
}

#[test]
fn a_damaged_index_is_rebuilt_from_the_journal_and_objects_and_nothing_is_lost() {
    let pristine = tempfile::tempdir().unwrap();
    let commits = populate(pristine.path());
    let want = snapshot(&SledMeta::open(pristine.path()).unwrap(), &commits);
    assert_eq!(want.heads.len(), 3);
    assert_eq!(want.images.len(), 2);
    assert_eq!(want.last_event, 5);
    assert_eq!(want.found_by_prefix, commits);

    let cases = database_damages(pristine.path(), "meta");
    assert!(cases.len() > 1);
    let mut rebuilt_at_start = 0;
    for (what, damage) in cases {
        let dir = tempfile::tempdir().unwrap();
        copy_dir(pristine.path(), dir.path());
        damage(dir.path());
        let got = match SledMeta::open_reporting(dir.path(), wire::repo::REF_LOG_RETAINED) {
            Ok((meta, opened)) => {
                if !opened.rebuilt.is_empty() {
                    rebuilt_at_start += 1;
                }
                snapshot(&meta, &commits)
            }
            Err(e) => {
                // sled refused the damaged file: fsck names it and repairs.
                let report = fsck(dir.path(), false).unwrap();
                assert!(!report.clean(), "{what}: {e}; fsck found nothing");
                let report = fsck(dir.path(), true).unwrap();
                assert!(report.lost.is_empty(), "{what}: {report:?}");
                snapshot(&SledMeta::open(dir.path()).unwrap(), &commits)
            }
        };
        assert_eq!(got, want, "{what}");
        // Whichever way it came back, a check now finds nothing wrong.
        let report = fsck(dir.path(), false).unwrap();
        assert!(report.clean(), "{what}: {report:?}");
    }
    assert!(
        rebuilt_at_start > 0,
        "no damage was found and rebuilt at start"
    );
}

#[test]
fn a_journal_that_lost_its_tail_is_refused_and_the_repair_takes_the_refs_back_from_the_index() {
    let dir = tempfile::tempdir().unwrap();
    let commits = populate(dir.path());
    let want = snapshot(&SledMeta::open(dir.path()).unwrap(), &commits);
    let journal = dir.path().join("refs.journal");
    let records = embedded_db::journal::read(&journal).unwrap();
    // Cut back to three records, at a record boundary: it verifies, but the
    // index has applied five.
    let mut bytes = std::fs::read(&journal).unwrap();
    bytes.truncate(records.file_len_through(3) as usize);
    std::fs::write(&journal, &bytes).unwrap();

    let err = SledMeta::open(dir.path()).unwrap_err();
    assert!(
        matches!(
            err,
            MetaError::JournalBehind {
                journal: 3,
                index: 5,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("molt fsck"), "{err}");
    // The check names it and changes nothing.
    let report = fsck(dir.path(), false).unwrap();
    assert!(
        report.problems.iter().any(|p| p.contains("lost records")),
        "{report:?}"
    );
    assert_eq!(std::fs::read(&journal).unwrap(), bytes);
    assert!(SledMeta::open(dir.path()).is_err());

    let report = fsck(dir.path(), true).unwrap();
    assert!(report.lost.is_empty(), "{report:?}");
    let meta = SledMeta::open(dir.path()).unwrap();
    let got = snapshot(&meta, &commits);
    assert_eq!(got.heads, want.heads);
    assert_eq!(got.images, want.images);
    assert_eq!(got.last_event, want.last_event);
    // The repository goes on numbering its events after the repair.
    let svc = ServiceName::new("orders").unwrap();
    let main = BranchName::new("main").unwrap();
    let moved = meta
        .swap_head(
            &svc,
            &main,
            Some(commits[0]),
            commits[2],
            &Identity::RepoServer,
            Timestamp::from_unix_seconds(30),
        )
        .unwrap();
    assert!(
        matches!(&moved, repo_server::meta::HeadUpdate::Moved { event } if event.seq == 6),
        "{moved:?}"
    );
}

#[test]
fn a_flipped_journal_byte_is_named_at_start_and_the_repair_keeps_every_ref() {
    let dir = tempfile::tempdir().unwrap();
    let commits = populate(dir.path());
    let want = snapshot(&SledMeta::open(dir.path()).unwrap(), &commits);
    let journal = dir.path().join("refs.journal");
    let len = std::fs::metadata(&journal).unwrap().len();
    flip(&journal, (len / 2) as usize);

    let err = SledMeta::open(dir.path()).unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("corrupt at record") && text.contains("molt fsck"),
        "{text}"
    );
    let report = fsck(dir.path(), true).unwrap();
    assert!(report.lost.is_empty(), "{report:?}");
    assert!(
        report
            .repaired
            .iter()
            .any(|r| r.contains("kept the damaged journal")),
        "{report:?}"
    );
    let got = snapshot(&SledMeta::open(dir.path()).unwrap(), &commits);
    assert_eq!(got, want);
    assert!(fsck(dir.path(), false).unwrap().clean());
}

#[test]
fn a_corrupt_object_is_never_served_and_the_next_put_restores_it() {
    let dir = tempfile::tempdir().unwrap();
    let commits = populate(dir.path());
    let meta = SledMeta::open(dir.path()).unwrap();
    let commit = meta.commit(&commits[1]).unwrap().unwrap();
    let path = meta
        .objects()
        .path_of(repo_server::objects::Kind::Commit, commits[1].as_bytes());
    drop(meta);
    flip(&path, 10);

    let report = fsck(dir.path(), false).unwrap();
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.contains(&format!("commit {}", commits[1].to_hex()))),
        "{report:?}"
    );
    assert!(path.exists(), "a check moves nothing");

    let meta = SledMeta::open(dir.path()).unwrap();
    let err = meta.commit(&commits[1]).unwrap_err();
    assert!(err.to_string().contains("is corrupt"), "{err}");
    // Quarantined on that read: now simply not stored, which a push repairs.
    assert_eq!(meta.commit(&commits[1]).unwrap(), None);
    drop(meta);
    let report = fsck(dir.path(), false).unwrap();
    assert!(
        report
            .lost
            .iter()
            .any(|p| p.contains("dev-ada") && p.contains("not stored")),
        "{report:?}"
    );
    let meta = SledMeta::open(dir.path()).unwrap();
    meta.put_commit(&commit).unwrap();
    assert_eq!(meta.commit(&commits[1]).unwrap(), Some(commit));
    drop(meta);
    assert!(fsck(dir.path(), false).unwrap().clean());
}

#[test]
fn an_index_of_the_older_layout_is_taken_over_whole() {
    let dir = tempfile::tempdir().unwrap();
    let svc = ServiceName::new("orders").unwrap();
    let tree = Tree::empty();
    let commit = Commit::new(
        svc.clone(),
        tree.id(),
        vec![],
        "ada".into(),
        "old".into(),
        Timestamp::from_unix_seconds(1),
    )
    .unwrap();
    let image = Image::new(
        ImageName::new("old-1").unwrap(),
        String::new(),
        BTreeMap::from([(svc.clone(), commit.id())]),
    )
    .unwrap();
    {
        // What earlier versions wrote: objects inside the index.
        let db = embedded_db::open(&dir.path().join("meta"), 1 << 20).unwrap();
        db.open_tree("trees")
            .unwrap()
            .insert(tree.id().as_bytes(), tree.encode())
            .unwrap();
        db.open_tree("commits")
            .unwrap()
            .insert(commit.id().as_bytes(), commit.encode())
            .unwrap();
        let mut key = b"orders\0".to_vec();
        key.extend_from_slice(commit.id().as_bytes());
        db.open_tree("commits_by_service")
            .unwrap()
            .insert(key, &[])
            .unwrap();
        db.open_tree("heads")
            .unwrap()
            .insert(b"orders/main", commit.id().as_bytes().as_slice())
            .unwrap();
        db.open_tree("images")
            .unwrap()
            .insert(b"old-1", image.encode())
            .unwrap();
        db.open_tree("image_order")
            .unwrap()
            .insert(7u64.to_be_bytes(), b"old-1".as_slice())
            .unwrap();
        db.open_tree("counters")
            .unwrap()
            .insert(b"ref_log_last", 9u64.to_be_bytes().as_slice())
            .unwrap();
        db.flush().unwrap();
    }
    let (meta, opened) = SledMeta::open_reporting(dir.path(), 100).unwrap();
    assert_eq!(opened.migrated, 3);
    assert_eq!(meta.tree(&tree.id()).unwrap(), Some(tree));
    assert_eq!(meta.commit(&commit.id()).unwrap(), Some(commit.clone()));
    let main = BranchName::new("main").unwrap();
    assert_eq!(meta.head(&svc, &main).unwrap(), Some(commit.id()));
    let listed: Vec<_> = meta
        .images()
        .unwrap()
        .into_iter()
        .map(|r| r.image)
        .collect();
    assert_eq!(listed, [image]);
    assert_eq!(meta.ref_log_last().unwrap(), 9);
    drop(meta);
    // Reopened, it agrees with its new journal; a check finds nothing.
    let (meta, opened) = SledMeta::open_reporting(dir.path(), 100).unwrap();
    assert!(opened.rebuilt.is_empty(), "{opened:?}");
    assert_eq!(meta.head(&svc, &main).unwrap(), Some(commit.id()));
    drop(meta);
    assert!(fsck(dir.path(), false).unwrap().clean());
}

/// A shell's recorded state: three generations (the second failed: its
/// number handed out, never recorded), data directories, outcomes.
mod shell_state {
    use super::*;
    use shell::state::{
        DataDirs, DeploymentOp, DeploymentOutcome, InstalledState, OutcomeKey, ServiceState, State,
        StateError,
    };
    use wire::portal::DeploymentId;

    #[derive(Debug, PartialEq)]
    struct Recorded {
        generations: Vec<shell::state::Generation>,
        installed: InstalledState,
        next: u64,
        data: DataDirs,
        outcome: Option<DeploymentOutcome>,
    }

    fn key(n: u64) -> OutcomeKey {
        OutcomeKey {
            deployment: DeploymentId(n),
            op: DeploymentOp::Upgrade,
        }
    }

    fn recorded(state: &State) -> Recorded {
        Recorded {
            generations: state.generations().unwrap(),
            installed: state.installed().unwrap(),
            next: state.next_generation().unwrap(),
            data: state.data_dirs(1).unwrap(),
            outcome: state.outcome(key(7)).unwrap(),
        }
    }

    fn populate(root: &Path) -> Recorded {
        let state = State::open(&root.join("state")).unwrap();
        let orders = ServiceName::new("orders").unwrap();
        let installed = |n: u8| {
            let mut s = InstalledState::default();
            s.services.insert(
                orders.clone(),
                ServiceState {
                    commit: CommitId::from_bytes([n; 32]),
                    tree: image_spec::TreeId::from_bytes([n; 32]),
                    release: root.join(format!("releases/orders/{n}")),
                },
            );
            s
        };
        let dirs = DataDirs::from([(orders.clone(), root.join("data/orders/g1"))]);
        state
            .record_with_data(&installed(1), "pull orders@main", &dirs)
            .unwrap();
        state.allocate_generation().unwrap();
        state
            .record_outcome(key(7), &DeploymentOutcome::Running { after: 1 })
            .unwrap();
        state.record(&installed(3), "upgrade to shop-2").unwrap();
        state
            .record_outcome(
                key(7),
                &DeploymentOutcome::Done(Err(wire::repo::RemoteError {
                    kind: wire::repo::ErrorKind::Invalid,
                    message: "build failed".into(),
                })),
            )
            .unwrap();
        let got = recorded(&state);
        assert_eq!(got.generations.len(), 2);
        assert_eq!(got.next, 4);
        got
    }

    #[test]
    fn a_damaged_state_database_is_rebuilt_from_its_journal_never_an_older_generation() {
        let pristine = tempfile::tempdir().unwrap();
        let want = populate(pristine.path());
        let cases = database_damages(pristine.path(), "state");
        assert!(cases.len() > 1);
        let mut rebuilt_at_start = 0;
        for (what, damage) in cases {
            let dir = tempfile::tempdir().unwrap();
            copy_dir(pristine.path(), dir.path());
            damage(dir.path());
            let got = match State::open_reporting(&dir.path().join("state")) {
                Ok((state, rebuilt)) => {
                    if !rebuilt.is_empty() {
                        rebuilt_at_start += 1;
                    }
                    recorded(&state)
                }
                Err(e) => {
                    let report = shell::fsck::fsck(dir.path(), false).unwrap();
                    assert!(
                        !report.problems.is_empty(),
                        "{what}: {e}; fsck found nothing"
                    );
                    let report = shell::fsck::fsck(dir.path(), true).unwrap();
                    assert!(report.lost.is_empty(), "{what}: {report:?}");
                    recorded(&State::open(&dir.path().join("state")).unwrap())
                }
            };
            // The paths resolve against the copy's root: compare relative to it.
            let rebase = |r: &Recorded, root: &Path| {
                format!("{r:?}").replace(&root.display().to_string(), "ROOT")
            };
            assert_eq!(
                rebase(&got, dir.path()),
                rebase(&want, pristine.path()),
                "{what}"
            );
            let report = shell::fsck::fsck(dir.path(), false).unwrap();
            assert!(report.problems.is_empty(), "{what}: {report:?}");
        }
        assert!(
            rebuilt_at_start > 0,
            "no damage was found and rebuilt at start"
        );
    }

    #[test]
    fn a_state_journal_that_lost_records_is_refused_and_the_repair_takes_them_back() {
        let dir = tempfile::tempdir().unwrap();
        let want = populate(dir.path());
        let journal = shell::state::journal_path(&dir.path().join("state"));
        let records = embedded_db::journal::read(&journal).unwrap();
        // Allocated and recorded 1, allocated 2, an outcome, allocated and
        // recorded 3, the outcome again.
        assert_eq!(records.records.len(), 7);
        let mut bytes = std::fs::read(&journal).unwrap();
        bytes.truncate(records.file_len_through(3) as usize);
        std::fs::write(&journal, &bytes).unwrap();

        let err = State::open(&dir.path().join("state")).unwrap_err();
        assert!(
            matches!(
                err,
                StateError::JournalBehind {
                    journal: 3,
                    index: 7,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("molt fsck --root"), "{err}");
        let report = shell::fsck::fsck(dir.path(), false).unwrap();
        assert!(
            report.problems.iter().any(|p| p.contains("lost records")),
            "{report:?}"
        );
        assert_eq!(
            std::fs::read(&journal).unwrap(),
            bytes,
            "a check changes nothing"
        );

        let report = shell::fsck::fsck(dir.path(), true).unwrap();
        assert!(report.lost.is_empty(), "{report:?}");
        let state = State::open(&dir.path().join("state")).unwrap();
        assert_eq!(recorded(&state), want);
        // Numbers go on after the repair; none is reused.
        assert_eq!(state.allocate_generation().unwrap(), 4);
    }
}
