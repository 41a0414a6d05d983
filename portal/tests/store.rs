//! The store's contract, run against the sled store on a real database in a
//! temp dir. Written against `dyn Store` only, so a PostgreSQL store can run the
//! same checks.

// Integration tests are their own crates: a panic is a failed test.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use image_spec::{ImageId, ImageName, InstanceName, TargetName, UserName};
use portal::auth::{AuditEntry, SESSION_IDLE_MS, Session, Token, User};
use portal::deployment::{
    DeployOptions, DeploymentState, EventKind, NewDeployment, RunState, Transition, Trigger,
};
use portal::store::sled::SledStore;
use portal::store::{DeploymentFilter, Store, StoreError};
use portal::target::{Settings, Target};
use wire::Grant;
use wire::portal::DeploymentId;
use wire::shell::{ImageRef, Stage};

fn open() -> (tempfile::TempDir, Arc<dyn Store>) {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(&dir.path().join("db")).unwrap();
    (dir, Arc::new(store))
}

fn target(name: &str, instances: &[&str]) -> Target {
    Target {
        name: TargetName::new(name).unwrap(),
        stage: Stage::Staging,
        instances: instances
            .iter()
            .map(|i| InstanceName::new(i).unwrap())
            .collect(),
        settings: Settings::default(),
        created: 1,
    }
}

fn new(target: &str, image: &str) -> NewDeployment {
    NewDeployment {
        target: TargetName::new(target).unwrap(),
        image: ImageRef {
            name: ImageName::new(image).unwrap(),
            id: ImageId::from_bytes([7; 32]),
        },
        requested_by: UserName::new("ada").unwrap(),
        trigger: Trigger::Manual,
        options: DeployOptions::default(),
        instances: vec![InstanceName::new("i1").unwrap()],
    }
}

#[tokio::test]
async fn an_instance_belongs_to_one_target() {
    let (_dir, store) = open();
    store
        .put_target(target("a", &["i1", "i2"]), false)
        .await
        .unwrap();
    assert!(matches!(
        store.put_target(target("a", &[]), false).await,
        Err(StoreError::TargetExists(_))
    ));
    assert!(matches!(
        store.put_target(target("b", &["i2"]), false).await,
        Err(StoreError::InstanceTaken { .. })
    ));
    assert!(matches!(
        store.put_target(target("b", &[]), true).await,
        Err(StoreError::NoTarget(_))
    ));
    // A refused target left nothing behind.
    assert_eq!(store.targets().await.unwrap().len(), 1);
    // A target may keep its own instances when it changes.
    let mut a = target("a", &["i2", "i1"]);
    a.settings.keep_history = 3;
    store.put_target(a.clone(), true).await.unwrap();
    assert_eq!(store.target(&a.name).await.unwrap(), Some(a));
}

#[tokio::test]
async fn the_queue_runs_one_per_target_in_order_within_the_cap() {
    let (_dir, store) = open();
    let a1 = store.enqueue(new("a", "one"), 10).await.unwrap();
    let a2 = store.enqueue(new("a", "two"), 11).await.unwrap();
    let b1 = store.enqueue(new("b", "one"), 12).await.unwrap();
    let c1 = store.enqueue(new("c", "one"), 13).await.unwrap();
    assert!(a1.id < a2.id && a2.id < b1.id);
    assert_eq!(a1.state, DeploymentState::Queued);

    // First come first served, but never two of one target.
    let first = store.claim_next(2, 20).await.unwrap().unwrap();
    assert_eq!(
        (first.id, first.state, first.started),
        (a1.id, DeploymentState::Running, Some(20))
    );
    let second = store.claim_next(2, 21).await.unwrap().unwrap();
    assert_eq!(second.id, b1.id, "a2 waits for a1");
    // The cap of two is reached.
    assert_eq!(store.claim_next(2, 22).await.unwrap(), None);
    assert_eq!(
        store
            .queue()
            .await
            .unwrap()
            .iter()
            .map(|d| d.id)
            .collect::<Vec<_>>(),
        vec![a2.id, c1.id]
    );
    // An admin moves c1 to the front; a1 ends and frees its target.
    store.to_front(c1.id).await.unwrap();
    let done = store
        .transition(a1.id, Transition::Succeed, None, 30)
        .await
        .unwrap();
    assert_eq!(
        (done.state, done.finished),
        (DeploymentState::Succeeded, Some(30))
    );
    let third = store.claim_next(2, 31).await.unwrap().unwrap();
    assert_eq!(third.id, c1.id, "moved to the front");
    store
        .transition(b1.id, Transition::Fail, Some("boom".into()), 32)
        .await
        .unwrap();
    let fourth = store.claim_next(2, 33).await.unwrap().unwrap();
    assert_eq!(fourth.id, a2.id);
    assert_eq!(store.running().await.unwrap().len(), 2);

    // A finished deployment cannot move again, and nothing changes.
    assert!(matches!(
        store.transition(a1.id, Transition::Fail, None, 40).await,
        Err(StoreError::Transition { .. })
    ));
    assert_eq!(
        store.deployment(a1.id).await.unwrap().unwrap().state,
        DeploymentState::Succeeded
    );
    assert_eq!(
        store
            .deployment(b1.id)
            .await
            .unwrap()
            .unwrap()
            .failure
            .as_deref(),
        Some("boom")
    );
}

#[tokio::test]
async fn a_cancelled_queued_deployment_leaves_the_queue() {
    let (_dir, store) = open();
    let a1 = store.enqueue(new("a", "one"), 10).await.unwrap();
    let a2 = store.enqueue(new("a", "two"), 11).await.unwrap();
    let cancelled = store
        .transition(a1.id, Transition::Cancel, Some("no".into()), 12)
        .await
        .unwrap();
    assert_eq!(cancelled.state, DeploymentState::Cancelled);
    assert_eq!(
        cancelled
            .instances
            .values()
            .map(|r| r.state)
            .collect::<Vec<_>>(),
        vec![RunState::Skipped]
    );
    let next = store.claim_next(4, 13).await.unwrap().unwrap();
    assert_eq!(next.id, a2.id);
    // Moving a running deployment to the front is refused.
    assert!(store.to_front(a2.id).await.is_err());
    // A running one is cancelled by request, between instances.
    let asked = store.request_cancel(a2.id).await.unwrap();
    assert!(asked.cancel_requested);
    assert!(store.request_cancel(a1.id).await.is_err());
}

#[tokio::test]
async fn history_filters_pages_and_prunes() {
    let (_dir, store) = open();
    let mut ids = Vec::new();
    for n in 0..6 {
        let mut d = new(if n % 2 == 0 { "a" } else { "b" }, &format!("img-{n}"));
        if n == 4 {
            d.trigger = Trigger::Rollback {
                of: DeploymentId(1),
            };
        }
        let d = store.enqueue(d, 100 + n).await.unwrap();
        store.claim_next(10, 200).await.unwrap().unwrap();
        store
            .transition(d.id, Transition::Succeed, None, 300)
            .await
            .unwrap();
        ids.push(d.id);
    }
    let page = |f: DeploymentFilter| {
        let store = store.clone();
        async move {
            store
                .deployments(f)
                .await
                .unwrap()
                .into_iter()
                .map(|d| d.id)
                .collect::<Vec<_>>()
        }
    };
    let a = || Some(TargetName::new("a").unwrap());
    assert_eq!(
        page(DeploymentFilter {
            target: a(),
            ..Default::default()
        })
        .await,
        vec![ids[4], ids[2], ids[0]]
    );
    assert_eq!(
        page(DeploymentFilter {
            target: a(),
            limit: 2,
            ..Default::default()
        })
        .await,
        vec![ids[4], ids[2]]
    );
    assert_eq!(
        page(DeploymentFilter {
            target: a(),
            before: Some(ids[2]),
            ..Default::default()
        })
        .await,
        vec![ids[0]]
    );
    assert_eq!(
        page(DeploymentFilter {
            rollback: Some(true),
            ..Default::default()
        })
        .await,
        vec![ids[4]]
    );
    assert_eq!(
        page(DeploymentFilter {
            image: Some("img-3".into()),
            ..Default::default()
        })
        .await,
        vec![ids[3]]
    );
    assert_eq!(
        page(DeploymentFilter {
            since: Some(102),
            until: Some(104),
            ..Default::default()
        })
        .await,
        vec![ids[3], ids[2]]
    );
    store
        .append_events(ids[0], vec![(1, None, EventKind::Log("x".into()))])
        .await
        .unwrap();
    assert_eq!(
        store
            .prune(&TargetName::new("a").unwrap(), 2)
            .await
            .unwrap(),
        1
    );
    assert_eq!(store.deployment(ids[0]).await.unwrap(), None);
    assert!(store.events(ids[0], 0, 10).await.unwrap().is_empty());
    assert!(
        store.deployment(ids[1]).await.unwrap().is_some(),
        "other targets untouched"
    );
}

#[tokio::test]
async fn events_are_numbered_and_read_after_a_number() {
    let (_dir, store) = open();
    let d = store.enqueue(new("a", "one"), 1).await.unwrap();
    let other = store.enqueue(new("b", "one"), 1).await.unwrap();
    let first = store
        .append_events(
            d.id,
            vec![
                (5, None, EventKind::State(DeploymentState::Running)),
                (6, None, EventKind::Log("one".into())),
            ],
        )
        .await
        .unwrap();
    assert_eq!(first.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![1, 2]);
    store
        .append_events(
            other.id,
            vec![(7, None, EventKind::Log("elsewhere".into()))],
        )
        .await
        .unwrap();
    let third = store
        .append_events(d.id, vec![(8, None, EventKind::Log("two".into()))])
        .await
        .unwrap();
    assert_eq!(third[0].seq, 3);
    let after = store.events(d.id, 1, 100).await.unwrap();
    assert_eq!(after.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![2, 3]);
    assert_eq!(store.events(d.id, 0, 1).await.unwrap().len(), 1);
    assert_eq!(store.events(other.id, 0, 100).await.unwrap().len(), 1);
}

#[tokio::test]
async fn users_tokens_and_audit() {
    let (_dir, store) = open();
    let ada = UserName::new("ada").unwrap();
    store
        .put_user(
            User {
                name: ada.clone(),
                grant: Grant::Deployer,
                created: 1,
                password: None,
            },
            false,
        )
        .await
        .unwrap();
    assert!(matches!(
        store
            .put_user(
                User {
                    name: ada.clone(),
                    grant: Grant::Admin,
                    created: 1,
                    password: None,
                },
                false
            )
            .await,
        Err(StoreError::UserExists(_))
    ));
    let token = Token {
        id: "abc".into(),
        name: "ci".into(),
        user: ada.clone(),
        grant: Grant::Deployer,
        targets: None,
        created: 1,
        expires: 100,
        revoked: None,
        hash: [9; 32],
    };
    store.put_token(token.clone()).await.unwrap();
    assert_eq!(store.token_by_hash([9; 32]).await.unwrap(), Some(token));
    assert_eq!(store.token_by_hash([8; 32]).await.unwrap(), None);
    assert_eq!(store.revoke_token("abc", 5).await.unwrap().revoked, Some(5));
    assert!(matches!(
        store.revoke_token("nope", 5).await,
        Err(StoreError::NoToken(_))
    ));
    // Removing a user revokes their tokens.
    store
        .put_token(Token {
            id: "def".into(),
            hash: [10; 32],
            revoked: None,
            ..store.token_by_hash([9; 32]).await.unwrap().unwrap()
        })
        .await
        .unwrap();
    store.remove_user(&ada, 6).await.unwrap();
    assert_eq!(
        store
            .token_by_hash([10; 32])
            .await
            .unwrap()
            .unwrap()
            .revoked,
        Some(6)
    );
    assert!(store.user(&ada).await.unwrap().is_none());

    for n in 0..3 {
        let e = store
            .audit(AuditEntry {
                seq: 0,
                at: n,
                who: "ada".into(),
                action: "target.create".into(),
                subject: format!("target t{n}"),
                detail: String::new(),
            })
            .await
            .unwrap();
        assert_eq!(e.seq, n as u64 + 1);
    }
    let log = store.audit_log(1, 10).await.unwrap();
    assert_eq!(log.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![2, 3]);
    // Newest first, in pages.
    let seqs = |log: Vec<AuditEntry>| log.iter().map(|e| e.seq).collect::<Vec<_>>();
    assert_eq!(seqs(store.audit_newest(None, 2).await.unwrap()), vec![3, 2]);
    assert_eq!(seqs(store.audit_newest(Some(2), 2).await.unwrap()), vec![1]);
    assert!(store.audit_newest(Some(1), 2).await.unwrap().is_empty());
}

#[tokio::test]
async fn sessions_end_with_their_user_their_grant_or_their_time() {
    let (_dir, store) = open();
    let user = |name: &str, grant| User {
        name: UserName::new(name).unwrap(),
        grant,
        created: 1,
        password: Some("$argon2id$…".into()),
    };
    let session = |n: u8, name: &str, at| Session {
        hash: [n; 32],
        user: UserName::new(name).unwrap(),
        grant: Grant::Deployer,
        csrf: format!("csrf-{n}"),
        created: at,
        last_used: at,
    };
    store
        .put_user(user("ada", Grant::Deployer), false)
        .await
        .unwrap();
    store
        .put_user(user("bob", Grant::Deployer), false)
        .await
        .unwrap();
    store.create_session(session(1, "ada", 10)).await.unwrap();
    store.create_session(session(2, "ada", 10)).await.unwrap();
    store.create_session(session(3, "bob", 10)).await.unwrap();
    assert_eq!(
        store.session([1; 32]).await.unwrap(),
        Some(session(1, "ada", 10))
    );
    store.touch_session([1; 32], 50).await.unwrap();
    assert_eq!(store.session([1; 32]).await.unwrap().unwrap().last_used, 50);

    // Changing something else than the grant or password keeps them.
    store
        .put_user(
            User {
                created: 2,
                ..user("ada", Grant::Deployer)
            },
            true,
        )
        .await
        .unwrap();
    assert!(store.session([1; 32]).await.unwrap().is_some());
    // A new grant ends ada's sessions, not bob's.
    store
        .put_user(user("ada", Grant::Admin), true)
        .await
        .unwrap();
    assert!(store.session([1; 32]).await.unwrap().is_none());
    assert!(store.session([2; 32]).await.unwrap().is_none());
    assert!(store.session([3; 32]).await.unwrap().is_some());
    // A new password does too.
    store.create_session(session(4, "bob", 10)).await.unwrap();
    store
        .put_user(
            User {
                password: Some("other".into()),
                ..user("bob", Grant::Deployer)
            },
            true,
        )
        .await
        .unwrap();
    assert!(store.session([4; 32]).await.unwrap().is_none());
    // Removing a user, and logging out.
    store.create_session(session(5, "ada", 10)).await.unwrap();
    store.create_session(session(6, "bob", 10)).await.unwrap();
    store
        .remove_user(&UserName::new("ada").unwrap(), 20)
        .await
        .unwrap();
    assert!(store.session([5; 32]).await.unwrap().is_none());
    assert!(store.delete_session([6; 32]).await.unwrap());
    assert!(!store.delete_session([6; 32]).await.unwrap());
    // A new session sweeps the expired ones away.
    store.create_session(session(7, "bob", 10)).await.unwrap();
    store
        .create_session(session(8, "bob", 10 + SESSION_IDLE_MS))
        .await
        .unwrap();
    assert!(store.session([7; 32]).await.unwrap().is_none());
    assert_eq!(
        store
            .delete_user_sessions(&UserName::new("bob").unwrap())
            .await
            .unwrap(),
        1
    );
}

#[tokio::test]
async fn records_survive_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let id = {
        let store = SledStore::open(&dir.path().join("db")).unwrap();
        let d = store.enqueue(new("a", "one"), 1).await.unwrap();
        store.claim_next(4, 2).await.unwrap().unwrap();
        d.id
    };
    let store = SledStore::open(&dir.path().join("db")).unwrap();
    let running = store.running().await.unwrap();
    assert_eq!(running.iter().map(|d| d.id).collect::<Vec<_>>(), vec![id]);
    let next = store.enqueue(new("a", "two"), 3).await.unwrap();
    assert!(next.id > id, "ids are never reused");
}

#[tokio::test]
async fn instance_parts_and_plans_come_back_with_their_deployment() {
    let (_dir, store) = open();
    let mut two = new("a", "one");
    two.instances.push(InstanceName::new("i2").unwrap());
    let d = store.enqueue(two, 1).await.unwrap();
    store.claim_next(4, 2).await.unwrap().unwrap();
    let i1 = InstanceName::new("i1").unwrap();
    let mut run = portal::deployment::InstanceRun::pending();
    run.state = RunState::Succeeded;
    run.generation = Some(3);
    store.put_run(d.id, i1.clone(), run.clone()).await.unwrap();
    let plan = wire::plan::UpgradePlan::default();
    store
        .put_plans(d.id, [(i1.clone(), plan.clone())].into())
        .await
        .unwrap();
    // A part for a deployment that does not exist is refused.
    assert!(
        store
            .put_run(DeploymentId(99), i1.clone(), run.clone())
            .await
            .is_err()
    );

    let shown = store.deployment(d.id).await.unwrap().unwrap();
    assert_eq!(shown.instances[&i1], run);
    assert_eq!(
        shown.instances[&InstanceName::new("i2").unwrap()].state,
        RunState::Pending
    );
    assert_eq!(shown.plans[&i1], plan);
    // Lists carry the parts, not the plans.
    let listed = store
        .deployments(DeploymentFilter::default())
        .await
        .unwrap();
    assert_eq!(listed[0].instances[&i1], run);
    assert!(listed[0].plans.is_empty());
    // A cancel request and the end keep the parts; the end skips what never ran.
    store.request_cancel(d.id).await.unwrap();
    let ended = store
        .transition(d.id, Transition::Cancel, None, 5)
        .await
        .unwrap();
    assert_eq!(ended.instances[&i1], run);
    let again = store.deployment(d.id).await.unwrap().unwrap();
    assert_eq!(
        again.instances[&InstanceName::new("i2").unwrap()].state,
        RunState::Skipped
    );
    assert_eq!(again.plans[&i1], plan);
}
