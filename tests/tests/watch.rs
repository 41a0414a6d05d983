//! Image authorship and the ref watch, end to end: a real repository server over
//! real QUIC with real certificates on 127.0.0.1, real sled in a temp dir.

use std::sync::Arc;

use image_spec::{CommitId, Image, ImageName, ServiceName, UserName};
use molt_e2e::{TestCluster, push_main, write_service};
use repo_client::{RefWatch, RepoClient};
use repo_server::blobs::FsBlobStore;
use repo_server::meta::{MetaStore, SledMeta};
use repo_server::service::RepoService;
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use wire::Identity;
use wire::repo::{ErrorKind, Missed, RefChange, RefEvent, RepoReply};

fn image(name: &str, service: &str, commit: CommitId) -> Image {
    Image::new(
        ImageName::new(name).expect("an image name"),
        String::new(),
        [(ServiceName::new(service).expect("a service name"), commit)].into(),
    )
    .expect("an image")
}

fn user(name: &str) -> UserName {
    UserName::new(name).expect("a user name")
}

/// Pushes a service `orders` whose file `x` holds `content`; its new head.
async fn push(cluster: &TestCluster, repo: &RepoClient, content: &str) -> CommitId {
    let dir = cluster.path("orders");
    write_service(&dir, "orders", &[("x", content.as_bytes())]);
    repo.push(&dir, &push_main(content), |_| {})
        .await
        .expect("push")
        .commit
}

/// The next event of a watch, which must come.
async fn next(watch: &mut RefWatch) -> RefEvent {
    watch
        .next()
        .await
        .expect("the next event")
        .expect("the watch goes on while the server runs")
}

fn seqs(events: &[RefEvent]) -> Vec<u64> {
    events.iter().map(|e| e.seq).collect()
}

#[tokio::test]
async fn the_portal_creates_images_only_on_behalf_of_a_user_who_becomes_the_author() {
    let cluster = TestCluster::start().await;
    let dev = cluster.repo_client("user/ada/developer").await;
    let commit = push(&cluster, &dev, "1").await;
    let portal = cluster.repo_client("portal").await;

    // The portal for ada: ada is the author, the portal made the request.
    let made = portal
        .create_image_for(image("for-ada", "orders", commit), user("ada"))
        .await
        .unwrap();
    let created = made.created.clone().unwrap();
    assert_eq!(created.author, user("ada"));
    assert_eq!(created.by, Identity::Portal);
    let read = dev
        .image(&ImageName::new("for-ada").unwrap())
        .await
        .unwrap();
    assert_eq!(read, made);

    // The portal without a user, and a shell with or without one: refused.
    let err = portal
        .create_image(image("nobody", "orders", commit))
        .await
        .unwrap_err();
    assert_eq!(
        err.remote_kind(),
        Some(&ErrorKind::PermissionDenied),
        "{err}"
    );
    assert!(err.to_string().contains("on behalf of"), "{err}");
    let shell = cluster.repo_client("shell/dev-1").await;
    for attempt in [
        shell
            .create_image(image("by-shell", "orders", commit))
            .await,
        shell
            .create_image_for(image("by-shell", "orders", commit), user("ada"))
            .await,
    ] {
        let err = attempt.unwrap_err();
        assert_eq!(
            err.remote_kind(),
            Some(&ErrorKind::PermissionDenied),
            "{err}"
        );
    }

    // A user is the author of their own images; naming themselves is the same;
    // naming someone else is refused.
    let mine = dev
        .create_image(image("by-ada", "orders", commit))
        .await
        .unwrap()
        .created
        .unwrap();
    assert_eq!(mine.author, user("ada"));
    assert_eq!(mine.by, "user/ada/developer".parse::<Identity>().unwrap());
    let deployer = cluster.repo_client("user/dan/deployer").await;
    let dans = deployer
        .create_image_for(image("by-dan", "orders", commit), user("dan"))
        .await
        .unwrap();
    assert_eq!(dans.created.unwrap().author, user("dan"));
    let err = deployer
        .create_image_for(image("dan-as-ada", "orders", commit), user("ada"))
        .await
        .unwrap_err();
    assert_eq!(
        err.remote_kind(),
        Some(&ErrorKind::PermissionDenied),
        "{err}"
    );

    // Only the allowed images exist, each with its author.
    let authors: Vec<(String, String)> = dev
        .images()
        .await
        .unwrap()
        .into_iter()
        .map(|r| {
            (
                r.image.name().to_string(),
                r.created.unwrap().author.to_string(),
            )
        })
        .collect();
    let expect = [("for-ada", "ada"), ("by-ada", "ada"), ("by-dan", "dan")];
    assert_eq!(
        authors,
        expect.map(|(a, b)| (a.to_owned(), b.to_owned())).to_vec()
    );
    // The log holds the push and the three creations, nothing refused.
    assert_eq!(cluster.service().meta().ref_log_last().unwrap(), 4);
}

#[tokio::test]
async fn a_watcher_sees_a_branch_move_and_an_image_creation_in_order() {
    let cluster = TestCluster::start().await;
    let dev = cluster.repo_client("user/ada/developer").await;
    let portal = cluster.repo_client("portal").await;
    // Started before anything happened: from now on.
    let mut watch = portal.watch_refs(None).await.unwrap();
    assert_eq!(watch.last_at_start(), 0);
    assert_eq!(watch.missed(), None);

    let first = push(&cluster, &dev, "1").await;
    let second = push(&cluster, &dev, "2").await;
    let made = portal
        .create_image_for(image("shop-1", "orders", second), user("ada"))
        .await
        .unwrap();

    let events = [
        next(&mut watch).await,
        next(&mut watch).await,
        next(&mut watch).await,
    ];
    assert_eq!(seqs(&events), [1, 2, 3]);
    let ada: Identity = "user/ada/developer".parse().unwrap();
    let orders = ServiceName::new("orders").unwrap();
    let main = "main".parse::<image_spec::BranchName>().unwrap();
    assert_eq!(
        events[0].change,
        RefChange::BranchMoved {
            service: orders.clone(),
            branch: main.clone(),
            old: None,
            new: first,
            by: ada.clone(),
        }
    );
    assert_eq!(
        events[1].change,
        RefChange::BranchMoved {
            service: orders,
            branch: main,
            old: Some(first),
            new: second,
            by: ada,
        }
    );
    assert_eq!(
        events[2].change,
        RefChange::ImageCreated {
            name: ImageName::new("shop-1").unwrap(),
            id: made.id,
            author: user("ada"),
            by: Identity::Portal,
        }
    );
    assert_eq!(events[2].at, made.created.unwrap().at);
    assert_eq!(watch.seen(), 3);

    // A second watcher from the start gets the same events, then live ones.
    let mut all = dev.watch_refs(Some(0)).await.unwrap();
    assert_eq!(all.last_at_start(), 3);
    let replayed = [
        next(&mut all).await,
        next(&mut all).await,
        next(&mut all).await,
    ];
    assert_eq!(replayed, events);
    push(&cluster, &dev, "3").await;
    assert_eq!(next(&mut all).await.seq, 4);
    assert_eq!(next(&mut watch).await.seq, 4);
}

#[tokio::test]
async fn a_watcher_resuming_after_n_gets_exactly_the_events_after_n_across_a_restart() {
    let mut cluster = TestCluster::start().await;
    let dev = cluster.repo_client("user/ada/developer").await;
    for i in 0..4 {
        push(&cluster, &dev, &i.to_string()).await;
    }
    // A watcher that has seen up to 2, and one watching live, when the server stops.
    let mut first = dev.watch_refs(Some(0)).await.unwrap();
    assert_eq!(
        seqs(&[next(&mut first).await, next(&mut first).await]),
        [1, 2]
    );
    let resume_at = first.seen();
    let mut live = dev.watch_refs(None).await.unwrap();
    assert_eq!(live.last_at_start(), 4);
    drop(dev);

    cluster.restart_repo().await;
    // The shutdown ended the open watch cleanly (not cut off after a grace period,
    // which the client would see as a lost connection).
    assert!(live.next().await.unwrap().is_none());

    let dev = cluster.repo_client("user/ada/developer").await;
    push(&cluster, &dev, "4").await;
    push(&cluster, &dev, "5").await;
    let mut resumed = dev.watch_refs(Some(resume_at)).await.unwrap();
    assert_eq!(resumed.missed(), None);
    assert_eq!(resumed.last_at_start(), 6);
    let mut got = Vec::new();
    for _ in 0..4 {
        got.push(next(&mut resumed).await);
    }
    // 3..=6: none lost, none repeated, the numbering continued over the restart.
    assert_eq!(seqs(&got), [3, 4, 5, 6]);
    // The pushes before the restart moved the branch 1 → 2 → 3 → 4; after it, on.
    let news: Vec<_> = got
        .iter()
        .map(|e| match &e.change {
            RefChange::BranchMoved { old, new, .. } => (*old, *new),
            other => panic!("{other:?}"),
        })
        .collect();
    assert!(
        news.windows(2).all(|w| w[0].1 == w[1].0.unwrap()),
        "{news:?}"
    );
    // Live from there.
    push(&cluster, &dev, "6").await;
    assert_eq!(next(&mut resumed).await.seq, 7);
    // Resuming at the newest event sends nothing old.
    let mut at_end = dev.watch_refs(Some(7)).await.unwrap();
    push(&cluster, &dev, "7").await;
    assert_eq!(next(&mut at_end).await.seq, 8);
}

/// The same shape as the protocol's request up to `CreateImage`, with a raw
/// string where a `UserName` goes, so a test can send a name no `UserName` holds.
#[derive(Serialize)]
#[allow(dead_code)]
enum HostileRequest {
    MissingBlobs,
    PutBlobs,
    CreateCommit,
    MoveBranch,
    Resolve,
    Log,
    GetCommit,
    GetTree,
    Diff,
    FetchBlobs,
    CreateImage {
        image: Image,
        on_behalf_of: Option<String>,
    },
}

#[tokio::test]
async fn hostile_image_and_watch_requests_get_typed_errors_and_change_nothing() {
    let cluster = TestCluster::start().await;
    let dev = cluster.repo_client("user/ada/developer").await;
    let commit = push(&cluster, &dev, "1").await;
    let portal = cluster.repo_client("portal").await;

    // Watching after an event this repository never logged.
    let err = portal.watch_refs(Some(99)).await.unwrap_err();
    assert_eq!(err.remote_kind(), Some(&ErrorKind::Invalid), "{err}");
    assert!(err.to_string().contains("99"), "{err}");

    // A user name that is no user name, from the portal: the frame is refused.
    let client = wire::Client::new(&cluster.credentials("portal"), cluster.repo_addr).unwrap();
    let conn = client
        .connect(cluster.repo_addr, &Identity::RepoServer)
        .await
        .unwrap();
    for name in ["../root", "", "Ada", &"a".repeat(65)] {
        let req = HostileRequest::CreateImage {
            image: image("hostile", "orders", commit),
            on_behalf_of: Some(name.to_owned()),
        };
        let mut s = conn.open().await.unwrap();
        wire::codec::write_frame(&mut s.send, &req).await.unwrap();
        let _ = s.send.finish();
        let r = wire::codec::read_frame::<_, RepoReply>(&mut s.recv, 1 << 20).await;
        assert!(!matches!(r, Ok(Some(_))), "{name:?} was answered: {r:?}");
    }
    // A user acting for another, an image of a commit that does not exist.
    let err = dev
        .create_image_for(image("hostile", "orders", commit), user("bob"))
        .await
        .unwrap_err();
    assert_eq!(
        err.remote_kind(),
        Some(&ErrorKind::PermissionDenied),
        "{err}"
    );
    let missing = CommitId::from_bytes([9; 32]);
    let err = portal
        .create_image_for(image("hostile", "orders", missing), user("ada"))
        .await
        .unwrap_err();
    assert_eq!(err.remote_kind(), Some(&ErrorKind::NotFound), "{err}");

    // Nothing changed: no image, only the push in the log; the connections work.
    assert!(portal.images().await.unwrap().is_empty());
    assert_eq!(cluster.service().meta().ref_log_last().unwrap(), 1);
    let mut watch = dev.watch_refs(Some(0)).await.unwrap();
    assert_eq!(next(&mut watch).await.seq, 1);

    // The same hand-made frame with a real name is answered: the refusals above
    // were the names'.
    let req = HostileRequest::CreateImage {
        image: image("hostile", "orders", commit),
        on_behalf_of: Some("ada".to_owned()),
    };
    let reply: RepoReply = conn.call(&req).await.unwrap();
    assert!(reply.is_ok(), "{reply:?}");
    assert_eq!(next(&mut watch).await.seq, 2);
}

#[tokio::test]
async fn a_watcher_behind_what_the_log_retains_is_told_what_it_missed() {
    // A repository keeping only the newest 3 events, served like `repo_server::run`.
    let cluster = TestCluster::start().await;
    let data = cluster.path("small-repo");
    let meta = SledMeta::open_retaining(&data, 3).unwrap();
    let blobs = FsBlobStore::open(&data.join("blobs")).unwrap();
    let service = Arc::new(RepoService::new(blobs, meta));
    let server = wire::Server::bind(
        "127.0.0.1:0".parse().unwrap(),
        &cluster.credentials("repo-server"),
    )
    .unwrap();
    let addr = server.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let serving = tokio::spawn(repo_server::serve(server, service, shutdown.clone()));

    let client = wire::Client::new(&cluster.credentials("user/ada/admin"), addr).unwrap();
    let repo = RepoClient::connect(&client, addr).await.unwrap();
    let commit = push(&cluster, &repo, "1").await;
    for i in 0..5 {
        repo.create_image(image(&format!("i{i}"), "orders", commit))
            .await
            .unwrap();
    }
    // Six events, 4..=6 retained: a watcher that saw 1 missed 2 and 3.
    let mut behind = repo.watch_refs(Some(1)).await.unwrap();
    assert_eq!(behind.missed(), Some(Missed { first: 2, last: 3 }));
    assert_eq!(behind.last_at_start(), 6);
    let got = [
        next(&mut behind).await,
        next(&mut behind).await,
        next(&mut behind).await,
    ];
    assert_eq!(seqs(&got), [4, 5, 6]);
    // One that saw 3 missed nothing; one from the start missed 1..=3.
    assert_eq!(repo.watch_refs(Some(3)).await.unwrap().missed(), None);
    assert_eq!(
        repo.watch_refs(Some(0)).await.unwrap().missed(),
        Some(Missed { first: 1, last: 3 })
    );

    // The shutdown ends the open watch cleanly and is not held up by it.
    shutdown.cancel();
    assert!(behind.next().await.unwrap().is_none());
    serving.await.unwrap();
}
