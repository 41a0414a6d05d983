//! The repository server end to end: real QUIC, real certificates, real sled.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use image_spec::{
    BlobId, BranchName, Change, Commit, Image, ImageName, Mode, ServiceName, Timestamp, Tree,
};
use molt_e2e::{TestCluster, push_main, write_file, write_service};
use repo_client::ClientError;
use repo_server::blobs::BlobStore;
use repo_server::meta::MetaStore;
use serde::Serialize;
use wire::repo::{ErrorKind, RepoReply};

fn svc(name: &str) -> ServiceName {
    ServiceName::new(name).unwrap()
}

fn main_branch() -> BranchName {
    BranchName::new("main").unwrap()
}

#[tokio::test]
async fn push_repush_change_one_file_and_diff() {
    let cluster = TestCluster::start().await;
    let dir = cluster.path("orders");
    let big = vec![7u8; 300_000];
    write_service(
        &dir,
        "orders",
        &[
            ("src/main.rs", b"fn main() {}"),
            ("assets/big.bin", &big),
            ("README", b"hi"),
        ],
    );
    let repo = cluster.repo_client("user/ada/developer").await;

    let first = repo.push(&dir, &push_main("first"), |_| {}).await.unwrap();
    assert!(first.created);
    assert_eq!(first.files, 4);
    assert_eq!(first.blobs_sent, 4);
    let total: u64 = 12 + 300_000 + 2 + std::fs::metadata(dir.join("service.toml")).unwrap().len();
    assert_eq!(first.bytes_sent, total);

    // Unchanged: nothing is created and nothing is sent.
    let again = repo.push(&dir, &push_main("again"), |_| {}).await.unwrap();
    assert!(!again.created);
    assert_eq!((again.blobs_sent, again.bytes_sent), (0, 0));
    assert_eq!(again.commit, first.commit);
    assert_eq!(
        repo.log(&svc("orders"), &main_branch(), 10)
            .await
            .unwrap()
            .len(),
        1
    );

    // One file changes: exactly that blob is sent.
    write_file(&dir, "src/main.rs", b"fn main() { println!(\"v2\"); }");
    let second = repo.push(&dir, &push_main("second"), |_| {}).await.unwrap();
    assert!(second.created);
    assert_eq!(second.blobs_sent, 1);
    assert_eq!(second.bytes_sent, 29);

    let log = repo.log(&svc("orders"), &main_branch(), 10).await.unwrap();
    assert_eq!(
        log.iter().map(|e| e.id).collect::<Vec<_>>(),
        [second.commit, first.commit]
    );
    assert_eq!(log[0].commit.parents(), [first.commit]);
    assert_eq!(log[0].commit.message(), "second");

    let diff = repo
        .diff(&svc("orders"), Some(first.commit), second.commit)
        .await
        .unwrap();
    assert_eq!(diff.changes().len(), 1);
    let Change::Modified(entry) = &diff.changes()[0] else {
        panic!("{:?}", diff.changes())
    };
    assert_eq!(entry.path().as_str(), "src/main.rs");
    assert_eq!(entry.blob(), BlobId::of(b"fn main() { println!(\"v2\"); }"));

    // A full diff (first install) lists every file, and the blobs can be fetched.
    let full = repo
        .diff(&svc("orders"), None, second.commit)
        .await
        .unwrap();
    assert_eq!(full.changes().len(), 4);
    let fetch_dir = cluster.path("fetched");
    std::fs::create_dir_all(&fetch_dir).unwrap();
    let wanted: Vec<BlobId> = full.needed_blobs().into_iter().collect();
    // The server notes when its fetches end (it gives their memory back
    // once they have settled).
    assert_eq!(cluster.service().last_fetch_end(), None);
    let got = repo.fetch_blobs_to(&wanted, &fetch_dir).await.unwrap();
    assert_eq!(got, total - 12 + 29);
    // The server's task may still be finishing the stream the client has read.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while cluster.service().last_fetch_end().is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "the fetch's end was not noted"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(
        std::fs::read(fetch_dir.join(BlobId::of(&big).to_hex())).unwrap(),
        big
    );

    // Revisions resolve by branch, full id and abbreviation.
    for rev in ["main", &second.commit.to_hex(), &second.commit.short(10)] {
        assert_eq!(
            repo.resolve(&svc("orders"), rev).await.unwrap(),
            second.commit
        );
    }
    let err = repo.resolve(&svc("orders"), "nope").await.unwrap_err();
    assert_eq!(err.remote_kind(), Some(&ErrorKind::NotFound));
    // A service the repository never saw is named as such, whatever the revision.
    for rev in ["main", &second.commit.to_hex()] {
        let err = repo.resolve(&svc("nosvc"), rev).await.unwrap_err();
        assert_eq!(err.remote_kind(), Some(&ErrorKind::NotFound));
        assert!(
            err.to_string()
                .contains("the repository has no service `nosvc`"),
            "{err}"
        );
    }
}

#[tokio::test]
async fn two_services_sharing_a_file_store_its_blob_once() {
    let cluster = TestCluster::start().await;
    let shared = vec![42u8; 100_000];
    let (a, b) = (cluster.path("a"), cluster.path("b"));
    write_service(&a, "alpha", &[("lib/shared.so", &shared)]);
    write_service(&b, "beta", &[("lib/shared.so", &shared)]);
    let repo = cluster.repo_client("user/ada/developer").await;
    let ra = repo.push(&a, &push_main("a"), |_| {}).await.unwrap();
    let rb = repo.push(&b, &push_main("b"), |_| {}).await.unwrap();
    assert_eq!(ra.blobs_sent, 2);
    // Only beta's service.toml is new.
    assert_eq!(rb.blobs_sent, 1);
    let (count, _) = cluster.service().blobs().usage().unwrap();
    assert_eq!(count, 3);
}

#[tokio::test]
async fn a_blob_whose_bytes_lie_is_refused_and_nothing_is_stored() {
    let cluster = TestCluster::start().await;
    let repo = cluster.repo_client("user/ada/developer").await;
    let file = cluster.path("payload");
    write_file(cluster.dir.path(), "payload", b"the real bytes");
    let lie = BlobId::of(b"other bytes");
    let err = repo
        .put_blobs(&[(lie, 14, file.clone())], |_| {})
        .await
        .unwrap_err();
    assert_eq!(err.remote_kind(), Some(&ErrorKind::Invalid), "{err}");
    assert!(!cluster.service().blobs().contains(&lie).await.unwrap());
    assert!(
        !cluster
            .service()
            .blobs()
            .contains(&BlobId::of(b"the real bytes"))
            .await
            .unwrap()
    );
    assert_eq!(cluster.service().blobs().usage().unwrap().0, 0);
    // The connection still works after the refusal.
    assert!(repo.images().await.unwrap().is_empty());
}

#[tokio::test]
async fn roles_are_enforced_per_operation() {
    let cluster = TestCluster::start().await;
    let dir = cluster.path("orders");
    write_service(&dir, "orders", &[("x", b"1")]);
    for who in ["shell/dev-1", "portal", "user/dan/deployer"] {
        let repo = cluster.repo_client(who).await;
        let err = repo.push(&dir, &push_main("m"), |_| {}).await.unwrap_err();
        assert_eq!(
            err.remote_kind(),
            Some(&ErrorKind::PermissionDenied),
            "{who}: {err}"
        );
        assert!(err.to_string().contains(who), "{err}");
    }
    // Nothing was stored by the refused pushes.
    assert_eq!(cluster.service().blobs().usage().unwrap().0, 0);

    let dev = cluster.repo_client("user/ada/developer").await;
    let pushed = dev.push(&dir, &push_main("m"), |_| {}).await.unwrap();
    let image = Image::new(
        ImageName::new("shop-1").unwrap(),
        String::new(),
        [(svc("orders"), pushed.commit)].into(),
    )
    .unwrap();
    // Shells read but cannot create images; deployers can.
    let shell = cluster.repo_client("shell/dev-1").await;
    assert_eq!(
        shell
            .create_image(image.clone())
            .await
            .unwrap_err()
            .remote_kind(),
        Some(&ErrorKind::PermissionDenied)
    );
    let deployer = cluster.repo_client("user/dan/deployer").await;
    let created = deployer.create_image(image.clone()).await.unwrap();
    let read = shell.image(image.name()).await.unwrap();
    assert_eq!((read.id, &read.image), (image.id(), &image));
    assert_eq!(read, created);
    assert_eq!(read.created.unwrap().author.as_str(), "dan");
}

#[tokio::test]
async fn images_need_existing_commits_and_are_immutable() {
    let cluster = TestCluster::start().await;
    let dir = cluster.path("orders");
    write_service(&dir, "orders", &[]);
    let repo = cluster.repo_client("user/ada/admin").await;
    let pushed = repo.push(&dir, &push_main("m"), |_| {}).await.unwrap();
    let image = |name: &str, commit| {
        Image::new(
            ImageName::new(name).unwrap(),
            String::new(),
            [(svc("orders"), commit)].into(),
        )
        .unwrap()
    };
    let missing = image_spec::CommitId::from_bytes([9; 32]);
    let err = repo.create_image(image("bad", missing)).await.unwrap_err();
    assert_eq!(err.remote_kind(), Some(&ErrorKind::NotFound), "{err}");
    // A commit of another service under this name is refused too.
    let other = cluster.path("pay");
    write_service(&other, "payments", &[]);
    let pay = repo.push(&other, &push_main("m"), |_| {}).await.unwrap();
    let err = repo
        .create_image(image("mixed", pay.commit))
        .await
        .unwrap_err();
    assert_eq!(err.remote_kind(), Some(&ErrorKind::Invalid), "{err}");

    repo.create_image(image("shop-1", pushed.commit))
        .await
        .unwrap();
    let err = repo
        .create_image(image("shop-1", pushed.commit))
        .await
        .unwrap_err();
    assert_eq!(err.remote_kind(), Some(&ErrorKind::AlreadyExists), "{err}");
    let names: Vec<String> = repo
        .images()
        .await
        .unwrap()
        .iter()
        .map(|r| r.image.name().to_string())
        .collect();
    assert_eq!(names, ["shop-1"]);
}

/// Two services on one public port would fail only at deploy, with the port in
/// use: the repository refuses such an image, naming both and the port; the
/// same services on distinct ports make an image.
#[tokio::test]
async fn an_image_whose_services_share_a_public_port_is_refused() {
    let cluster = TestCluster::start().await;
    let repo = cluster.repo_client("user/ada/admin").await;
    let mut commits = BTreeMap::new();
    // alpha and beta both take write_service's port 8080; gamma takes 8081.
    for name in ["alpha", "beta", "gamma"] {
        let dir = cluster.path(name);
        write_service(&dir, name, &[]);
        if name == "gamma" {
            let toml = std::fs::read_to_string(dir.join("service.toml")).unwrap();
            write_file(
                &dir,
                "service.toml",
                toml.replace("port = 8080", "port = 8081").as_bytes(),
            );
        }
        let pushed = repo.push(&dir, &push_main("m"), |_| {}).await.unwrap();
        commits.insert(svc(name), pushed.commit);
    }
    let image = |name: &str, services: &[&str]| {
        Image::new(
            ImageName::new(name).unwrap(),
            String::new(),
            services
                .iter()
                .map(|s| (svc(s), commits[&svc(s)]))
                .collect(),
        )
        .unwrap()
    };
    let err = repo
        .create_image(image("clash", &["alpha", "beta", "gamma"]))
        .await
        .unwrap_err();
    assert_eq!(err.remote_kind(), Some(&ErrorKind::Invalid), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("services `alpha` and `beta` both want public port 8080"),
        "{text}"
    );
    assert!(repo.images().await.unwrap().is_empty());
    repo.create_image(image("apart", &["alpha", "gamma"]))
        .await
        .unwrap();
}

#[tokio::test]
async fn concurrent_pushes_to_one_branch_one_wins_none_is_lost() {
    let cluster = TestCluster::start().await;
    let base = cluster.path("base");
    write_service(&base, "orders", &[("f", b"base")]);
    let repo = cluster.repo_client("user/ada/developer").await;
    let root = repo.push(&base, &push_main("base"), |_| {}).await.unwrap();

    // Two developers push different trees from the same head at the same time.
    let (a, b) = (cluster.path("a"), cluster.path("b"));
    write_service(&a, "orders", &[("f", b"from a")]);
    write_service(&b, "orders", &[("f", b"from b")]);
    let (ca, cb) = (
        cluster.repo_client("user/ada/developer").await,
        cluster.repo_client("user/bob/developer").await,
    );
    let opts = push_main("race");
    let (ra, rb) = tokio::join!(ca.push(&a, &opts, |_| {}), cb.push(&b, &opts, |_| {}));
    let (winner, loser) = match (ra, rb) {
        (Ok(w), Err(l)) | (Err(l), Ok(w)) => (w, l),
        (Ok(_), Ok(_)) => {
            // Possible only if one push saw the other's head: then the log has both.
            let log = repo.log(&svc("orders"), &main_branch(), 10).await.unwrap();
            assert_eq!(log.len(), 3);
            return;
        }
        (Err(a), Err(b)) => panic!("both pushes failed: {a} / {b}"),
    };
    let Some(ErrorKind::Conflict { head }) = loser.remote_kind() else {
        panic!("the losing push must report a conflict: {loser}")
    };
    assert_eq!(*head, Some(winner.commit));
    assert!(
        loser.to_string().contains(&winner.commit.to_hex()),
        "{loser}"
    );
    let head_now = repo.resolve(&svc("orders"), "main").await.unwrap();
    assert_eq!(head_now, winner.commit);
    // The winner's commit sits on top of the root; nothing was overwritten.
    let log = repo.log(&svc("orders"), &main_branch(), 10).await.unwrap();
    assert_eq!(
        log.iter().map(|e| e.id).collect::<Vec<_>>(),
        [winner.commit, root.commit]
    );
    // The loser pushes again and lands on top of the winner.
    let winner_tree = repo.commit(winner.commit).await.unwrap().tree();
    let loser_dir = if image_spec::scan_dir(&a).unwrap().tree.id() == winner_tree {
        &b
    } else {
        &a
    };
    let retry = repo
        .push(loser_dir, &push_main("retry"), |_| {})
        .await
        .unwrap();
    assert!(retry.created);
    let log = repo.log(&svc("orders"), &main_branch(), 10).await.unwrap();
    assert_eq!(
        log.iter().map(|e| e.id).collect::<Vec<_>>(),
        [retry.commit, winner.commit, root.commit]
    );
}

#[tokio::test]
async fn a_restart_keeps_everything() {
    let mut cluster = TestCluster::start().await;
    let dir = cluster.path("orders");
    write_service(&dir, "orders", &[("a", b"1")]);
    let repo = cluster.repo_client("user/ada/developer").await;
    let pushed = repo.push(&dir, &push_main("m"), |_| {}).await.unwrap();
    let image = Image::new(
        ImageName::new("keep").unwrap(),
        "kept".into(),
        [(svc("orders"), pushed.commit)].into(),
    )
    .unwrap();
    let created = repo.create_image(image).await.unwrap();
    drop(repo);

    cluster.restart_repo().await;
    let repo = cluster.repo_client("user/ada/developer").await;
    assert_eq!(
        repo.resolve(&svc("orders"), "main").await.unwrap(),
        pushed.commit
    );
    // The image and its recorded author.
    assert_eq!(
        repo.image(&ImageName::new("keep").unwrap()).await.unwrap(),
        created
    );
    let again = repo.push(&dir, &push_main("m"), |_| {}).await.unwrap();
    assert!(!again.created);
}

/// The same shape as the protocol's request, but with a tree of raw strings, so a
/// test can send what a real `Tree` can never hold.
#[derive(Serialize)]
#[allow(dead_code)]
enum HostileRequest {
    MissingBlobs {
        blobs: Vec<BlobId>,
    },
    PutBlobs {
        blobs: Vec<(BlobId, u64)>,
    },
    CreateCommit {
        commit: Commit,
        tree: Vec<HostileEntry>,
    },
}

#[derive(Serialize)]
struct HostileEntry {
    path: String,
    mode: Mode,
    size: u64,
    blob: BlobId,
    target: Option<String>,
}

#[tokio::test]
async fn hostile_trees_are_refused() {
    let cluster = TestCluster::start().await;
    let dir = cluster.path("orders");
    write_service(&dir, "orders", &[]);
    let repo = cluster.repo_client("user/ada/developer").await;
    repo.push(&dir, &push_main("m"), |_| {}).await.unwrap();
    let manifest = std::fs::read(dir.join("service.toml")).unwrap();
    let toml_entry = || HostileEntry {
        path: "service.toml".into(),
        mode: Mode::Regular,
        size: manifest.len() as u64,
        blob: BlobId::of(&manifest),
        target: None,
    };
    let file = |path: &str| HostileEntry {
        path: path.into(),
        mode: Mode::Regular,
        size: manifest.len() as u64,
        blob: BlobId::of(&manifest),
        target: None,
    };
    let link = |path: &str, target: &str| HostileEntry {
        path: path.into(),
        mode: Mode::Symlink,
        size: target.len() as u64,
        blob: BlobId::of(target.as_bytes()),
        target: Some(target.into()),
    };
    let cases: Vec<(&str, Vec<HostileEntry>)> = vec![
        ("dot-dot", vec![file("../escape"), toml_entry()]),
        ("absolute", vec![file("/etc/passwd"), toml_entry()]),
        ("duplicate", vec![toml_entry(), toml_entry()]),
        (
            "escaping symlink",
            vec![link("evil", "../../etc"), toml_entry()],
        ),
        ("nul", vec![file("a\0b"), toml_entry()]),
    ];
    let client = wire::Client::new(
        &cluster.credentials("user/ada/developer"),
        cluster.repo_addr,
    )
    .unwrap();
    let conn = client
        .connect(cluster.repo_addr, &wire::Identity::RepoServer)
        .await
        .unwrap();
    let manifest_tree = Tree::new(vec![image_spec::TreeEntry::file(
        image_spec::RelPath::new("service.toml").unwrap(),
        false,
        manifest.len() as u64,
        BlobId::of(&manifest),
    )])
    .unwrap();
    let send = |entries: Vec<HostileEntry>, message: &str| {
        let commit = Commit::new(
            svc("orders"),
            manifest_tree.id(),
            vec![],
            "ada".into(),
            message.into(),
            Timestamp::from_unix_seconds(1),
        )
        .unwrap();
        let req = HostileRequest::CreateCommit {
            commit,
            tree: entries,
        };
        let conn = conn.clone();
        async move { conn.call::<_, RepoReply>(&req).await }
    };
    // Control: the same request shape with a valid tree is accepted, so a refusal
    // below is about the tree, not the harness.
    let control = send(vec![toml_entry()], "control").await;
    assert!(
        matches!(
            control,
            Ok(Ok(wire::repo::RepoResponse::CommitCreated { .. }))
        ),
        "{control:?}"
    );
    for (name, entries) in cases {
        // Refused while decoding: the stream is reset before any handler sees a
        // tree, so the client gets a transport error, not an answer about ids.
        let reply = send(entries, name).await;
        assert!(
            reply.is_err(),
            "hostile tree `{name}` was not refused at decoding: {reply:?}"
        );
    }
    // No hostile commit exists (main was never moved), and the server serves.
    let log = repo.log(&svc("orders"), &main_branch(), 10).await.unwrap();
    assert_eq!(log.len(), 1);
    // A tree missing service.toml, or naming another service, is refused too.
    let bare = cluster.path("bare");
    write_file(&bare, "only.txt", b"x");
    let err = repo.push(&bare, &push_main("m"), |_| {}).await.unwrap_err();
    assert!(matches!(err, ClientError::Io { .. }), "{err}");
    let dir2 = cluster.path("liar");
    write_service(&dir2, "orders", &[]);
    let tree = image_spec::scan_dir(&dir2).unwrap().tree;
    let commit = Commit::new(
        svc("payments"),
        tree.id(),
        vec![],
        "ada".into(),
        "wrong service".into(),
        Timestamp::now(),
    )
    .unwrap();
    let err = repo.create_commit(commit, tree).await.unwrap_err();
    assert_eq!(err.remote_kind(), Some(&ErrorKind::Invalid), "{err}");
    assert!(err.to_string().contains("payments"), "{err}");
    assert!(
        cluster
            .service()
            .meta()
            .head(&svc("payments"), &main_branch())
            .unwrap()
            .is_none()
    );
}

#[tokio::test]
async fn malformed_requests_do_not_disturb_other_clients() {
    let cluster = TestCluster::start().await;
    let client = wire::Client::new(
        &cluster.credentials("user/ada/developer"),
        cluster.repo_addr,
    )
    .unwrap();
    let conn = client
        .connect(cluster.repo_addr, &wire::Identity::RepoServer)
        .await
        .unwrap();
    for garbage in [&[0u8, 0, 0, 2, 0xff, 0xff][..], &[0x7f, 0xff, 0xff, 0xff]] {
        let mut s = conn.open().await.unwrap();
        s.send.write_all(garbage).await.unwrap();
        let _ = s.send.finish();
        let r = wire::codec::read_frame::<_, RepoReply>(&mut s.recv, 1 << 20).await;
        assert!(!matches!(r, Ok(Some(_))), "garbage was answered: {r:?}");
    }
    let other = cluster.repo_client("portal").await;
    assert!(other.images().await.unwrap().is_empty());
    let same = repo_client::RepoClient::connect(&client, cluster.repo_addr)
        .await
        .unwrap();
    assert!(same.images().await.unwrap().is_empty());
}

#[tokio::test]
async fn declared_sizes_and_authors_are_checked() {
    let cluster = TestCluster::start().await;
    let dir = cluster.path("orders");
    write_service(&dir, "orders", &[("big.bin", &[5u8; 20_000])]);
    let repo = cluster.repo_client("user/ada/developer").await;
    repo.push(&dir, &push_main("m"), |_| {}).await.unwrap();
    let scanned = image_spec::scan_dir(&dir).unwrap().tree;
    let lie: Vec<image_spec::TreeEntry> = scanned
        .entries()
        .iter()
        .map(|e| {
            if e.path().as_str() == "big.bin" {
                image_spec::TreeEntry::file(e.path().clone(), false, 7, e.blob())
            } else {
                e.clone()
            }
        })
        .collect();
    let lie = Tree::new(lie).unwrap();
    let commit = |tree: &Tree, author: &str| {
        Commit::new(
            svc("orders"),
            tree.id(),
            vec![],
            author.into(),
            "x".into(),
            Timestamp::now(),
        )
        .unwrap()
    };
    let err = repo
        .create_commit(commit(&lie, "ada"), lie.clone())
        .await
        .unwrap_err();
    assert_eq!(err.remote_kind(), Some(&ErrorKind::Invalid), "{err}");
    assert!(err.to_string().contains("declared as 7 bytes"), "{err}");
    // Authoring a commit as someone else is refused.
    let err = repo
        .create_commit(commit(&scanned, "bob"), scanned.clone())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("authored by the pusher"), "{err}");
    assert!(
        repo.create_commit(commit(&scanned, "ada"), scanned)
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn an_answer_too_large_for_a_frame_is_a_clear_error() {
    let cluster = TestCluster::start().await;
    let dir = cluster.path("orders");
    write_service(&dir, "orders", &[]);
    let repo = cluster.repo_client("user/ada/developer").await;
    let first = repo.push(&dir, &push_main("m"), |_| {}).await.unwrap();
    let tree = image_spec::scan_dir(&dir).unwrap().tree;
    // 300 commits with 64 KiB messages: their log is over 16 MiB.
    let mut head = first.commit;
    for i in 0..300 {
        let c = Commit::new(
            svc("orders"),
            tree.id(),
            vec![head],
            "ada".into(),
            format!("{i}{}", "m".repeat(Commit::MAX_MESSAGE_LEN - 4)),
            Timestamp::now(),
        )
        .unwrap();
        let (id, _) = repo.create_commit(c, tree.clone()).await.unwrap();
        repo.move_branch(&svc("orders"), &main_branch(), Some(head), id)
            .await
            .unwrap();
        head = id;
    }
    assert_eq!(
        repo.log(&svc("orders"), &main_branch(), 20)
            .await
            .unwrap()
            .len(),
        20
    );
    let err = repo
        .log(&svc("orders"), &main_branch(), 1000)
        .await
        .unwrap_err();
    assert_eq!(err.remote_kind(), Some(&ErrorKind::Invalid), "{err}");
    assert!(err.to_string().contains("over the frame limit"), "{err}");
}

#[tokio::test]
async fn a_change_is_pushed_as_a_diff_with_or_without_a_tree_cache() {
    let cluster = TestCluster::start().await;
    let dir = cluster.path("orders");
    let files: Vec<(String, Vec<u8>)> = (0..500)
        .map(|i| (format!("src/f{i}.rs"), format!("file {i}").into_bytes()))
        .collect();
    let refs: Vec<(&str, &[u8])> = files
        .iter()
        .map(|(p, b)| (p.as_str(), b.as_slice()))
        .collect();
    write_service(&dir, "orders", &refs);
    let repo = cluster.repo_client("user/ada/developer").await;
    let first = repo.push(&dir, &push_main("first"), |_| {}).await.unwrap();

    // A client with no cache fetches the head's tree once and still sends a diff.
    let client = wire::Client::new(
        &cluster.credentials("user/ada/developer"),
        cluster.repo_addr,
    )
    .unwrap();
    let fresh = repo_client::RepoClient::connect(&client, cluster.repo_addr)
        .await
        .unwrap();
    write_file(&dir, "src/f7.rs", b"changed");
    let before = fresh.connection().quinn().stats().udp_tx.bytes;
    let second = fresh
        .push(&dir, &push_main("second"), |_| {})
        .await
        .unwrap();
    let sent = fresh.connection().quinn().stats().udp_tx.bytes - before;
    assert_eq!((second.blobs_sent, second.bytes_sent), (1, 7));
    // The whole tree (500 entries, ~45 KB) did not travel, nor 500 blob ids.
    assert!(sent < 10_000, "a one-file push sent {sent} bytes");
    let diff = repo
        .diff(&svc("orders"), Some(first.commit), second.commit)
        .await
        .unwrap();
    assert_eq!(diff.changes().len(), 1);

    // A diff that does not lead to the commit's tree is refused.
    let tree = image_spec::scan_dir(&dir).unwrap().tree;
    let first_tree = repo
        .tree(repo.commit(first.commit).await.unwrap().tree())
        .await
        .unwrap();
    let wrong = image_spec::TreeDiff::between(&first_tree, &first_tree);
    let commit = Commit::new(
        svc("orders"),
        tree.id(),
        vec![second.commit],
        "ada".into(),
        "x".into(),
        Timestamp::now(),
    )
    .unwrap();
    let err = repo
        .create_commit_from_diff(commit, first.commit, wrong)
        .await
        .unwrap_err();
    assert_eq!(err.remote_kind(), Some(&ErrorKind::Invalid), "{err}");
    assert!(err.to_string().contains("does not apply"), "{err}");
}

/// The repository lists every branch with its head, for the portal's
/// Repository pages, and reads small blobs into memory verified, refusing one
/// larger than the caller allows before reading it.
#[tokio::test]
async fn branches_are_listed_and_small_blobs_read_into_memory() {
    let cluster = TestCluster::start().await;
    let repo = cluster.repo_client("user/ada/developer").await;
    let orders = cluster.path("orders");
    write_service(&orders, "orders", &[("notes.txt", b"one\ntwo\n")]);
    let first = repo.push(&orders, &push_main("m"), |_| {}).await.unwrap();
    write_file(&orders, "notes.txt", b"one\nthree\n");
    let mut dev = push_main("on a branch");
    dev.branch = BranchName::new("dev-ada").unwrap();
    let second = repo.push(&orders, &dev, |_| {}).await.unwrap();
    let pay = cluster.path("pay");
    write_service(&pay, "payments", &[]);
    let payments = repo.push(&pay, &push_main("m"), |_| {}).await.unwrap();

    let listed: Vec<(String, String, image_spec::CommitId)> = repo
        .branches(None)
        .await
        .unwrap()
        .into_iter()
        .map(|h| (h.service.to_string(), h.branch.to_string(), h.head))
        .collect();
    assert_eq!(
        listed,
        [
            ("orders".into(), "dev-ada".into(), second.commit),
            ("orders".into(), "main".into(), first.commit),
            ("payments".into(), "main".into(), payments.commit),
        ]
    );
    let only = repo.branches(Some(&svc("payments"))).await.unwrap();
    assert_eq!(only.len(), 1);
    assert!(
        repo.branches(Some(&svc("nothing")))
            .await
            .unwrap()
            .is_empty()
    );

    let a = BlobId::of(b"one\ntwo\n");
    let b = BlobId::of(b"one\nthree\n");
    let read = repo.read_blobs(&[b, a], 100).await.unwrap();
    assert_eq!(read, [b"one\nthree\n".to_vec(), b"one\ntwo\n".to_vec()]);
    match repo.read_blobs(&[a, b], 9).await.unwrap_err() {
        ClientError::TooLarge { blob, size, max } => assert_eq!((blob, size, max), (b, 10, 9)),
        other => panic!("expected TooLarge, got {other}"),
    }
    // The connection still serves after a refused read.
    assert_eq!(repo.read_blobs(&[a], 8).await.unwrap().len(), 1);
}

/// Where the repository keeps a blob's file.
fn stored_blob(cluster: &TestCluster, id: &BlobId) -> std::path::PathBuf {
    let hex = id.to_hex();
    let found: Vec<_> = walk(&cluster.path("repo"))
        .into_iter()
        .filter(|p| {
            p.file_name().is_some_and(|n| n == hex.as_str())
                && !p.to_string_lossy().contains("quarantine")
        })
        .collect();
    assert_eq!(found.len(), 1, "{found:?}");
    found[0].clone()
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        if e.file_type().unwrap().is_dir() {
            out.extend(walk(&e.path()));
        } else {
            out.push(e.path());
        }
    }
    out
}

/// A blob corrupted, truncated or deleted on the repository's disk: the
/// repository never serves its bad bytes (it verifies what it serves and
/// quarantines what fails), says it is missing from then on, and the next push
/// that holds the file uploads it again — though the push's own change does
/// not touch that file — after which it serves again.
#[tokio::test]
async fn a_corrupt_or_lost_blob_is_quarantined_and_repaired_by_the_next_push() {
    let cluster = TestCluster::start().await;
    let dir = cluster.path("svc");
    write_service(
        &dir,
        "svc",
        &[
            ("a.txt", b"alpha alpha"),
            ("b.txt", b"bravo bravo"),
            ("c.txt", b"charlie"),
        ],
    );
    let dev = cluster.repo_client("user/ada/developer").await;
    let shell = cluster.repo_client("shell/dev-1").await;
    dev.push(&dir, &push_main("v1"), |_| {}).await.unwrap();
    let (a, b, c) = (
        BlobId::of(b"alpha alpha"),
        BlobId::of(b"bravo bravo"),
        BlobId::of(b"charlie"),
    );
    let fetch_dir = cluster.path("fetched");
    std::fs::create_dir_all(&fetch_dir).unwrap();

    // a: a byte flipped. The fetch fails and nothing lands; a is missing now.
    let path = stored_blob(&cluster, &a);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[0] ^= 1;
    std::fs::write(&path, &bytes).unwrap();
    assert!(shell.fetch_blobs_to(&[a], &fetch_dir).await.is_err());
    assert!(!fetch_dir.join(a.to_hex()).exists());
    assert_eq!(dev.missing_blobs(vec![a, b, c]).await.unwrap(), [a]);
    // b: truncated (caught when a commit names it); c: deleted.
    let path = stored_blob(&cluster, &b);
    std::fs::write(&path, b"bravo").unwrap();
    std::fs::remove_file(stored_blob(&cluster, &c)).unwrap();

    // A push that changes only another file repairs all three.
    write_file(&dir, "d.txt", b"delta");
    let pushed = dev.push(&dir, &push_main("v2"), |_| {}).await.unwrap();
    assert!(pushed.created);
    assert_eq!(pushed.blobs_sent, 4, "d, and a, b, c again");
    assert!(dev.missing_blobs(vec![a, b, c]).await.unwrap().is_empty());
    let got = shell.fetch_blobs_to(&[a, b, c], &fetch_dir).await.unwrap();
    assert_eq!(got, 11 + 11 + 7);
    assert_eq!(
        std::fs::read(fetch_dir.join(a.to_hex())).unwrap(),
        b"alpha alpha"
    );
    // What was quarantined is kept aside, not served.
    let quarantined: Vec<_> = walk(&cluster.path("repo"))
        .into_iter()
        .filter(|p| p.to_string_lossy().contains("quarantine"))
        .collect();
    assert_eq!(quarantined.len(), 2, "a and b: {quarantined:?}");
}

/// A developer's own branch is named `dev/<user>`: pushed to, listed,
/// resolved, and kept across a restart like any branch, apart from `main`.
#[tokio::test]
async fn a_branch_named_dev_slash_user_is_a_branch_like_any_other() {
    let mut cluster = TestCluster::start().await;
    let dev = cluster.repo_client("user/ada/developer").await;
    let dir = cluster.path("orders");
    write_service(&dir, "orders", &[("src/main.rs", b"fn main() {}")]);
    let main = dev.push(&dir, &push_main("main"), |_| {}).await.unwrap();
    write_file(&dir, "src/main.rs", b"fn main() { /* ada's */ }");
    let mine = dev
        .push(
            &dir,
            &repo_client::PushOptions {
                branch: "dev/ada".parse().unwrap(),
                message: "mine".into(),
            },
            |_| {},
        )
        .await
        .unwrap();
    assert_eq!(mine.branch.as_str(), "dev/ada");
    assert_ne!(mine.commit, main.commit);
    for _ in 0..2 {
        let dev = cluster.repo_client("user/ada/developer").await;
        assert_eq!(
            dev.resolve(&svc("orders"), "dev/ada").await.unwrap(),
            mine.commit
        );
        assert_eq!(
            dev.resolve(&svc("orders"), "main").await.unwrap(),
            main.commit
        );
        let branches: Vec<String> = dev
            .branches(Some(&svc("orders")))
            .await
            .unwrap()
            .into_iter()
            .map(|b| b.branch.to_string())
            .collect();
        assert_eq!(branches, ["dev/ada", "main"]);
        cluster.restart_repo().await;
    }
}
