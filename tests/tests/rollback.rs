//! The undo journal end to end: real processes behind the real fronts, a failure
//! injected after each kind of step of an upgrade, for both strategies.
//!
//! The instance runs three Python services — `web` (built, with `pre_swap` and
//! `post_swap` hooks), `solo` (may not overlap: held and stopped first) and
//! `gone` (not in the next image) — and is upgraded to an image where `web` and
//! `solo` changed, `gone` is removed and `fresh` is new. A failure after any step
//! before the record must leave every service answering as before on the same
//! public ports, `web` and `gone` on the same processes, `fresh` without a port,
//! and the record untouched — while a keep-alive client on `web` sees no failed
//! request. A failure after the record is reported and the upgrade stands.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};

use image_spec::{CommitId, InstanceName, ServiceName};
use molt_e2e::{Load, TestCluster, copy_example, get_once, push_main, version_of, write_file};
use repo_client::RepoClient;
use shell::executor::Fault;
use shell::instance::{
    Instance, InstanceConfig, PublicPorts, Strategy, UpgradeError, UpgradeOptions,
};
use wire::plan::StepKind;

fn svc(s: &str) -> ServiceName {
    ServiceName::new(s).unwrap()
}

/// Pushes `name` as the hello example greeting `greeting`, its manifest edited
/// by `extra` (appended) and `overlap`.
async fn push(
    cluster: &TestCluster,
    dev: &RepoClient,
    name: &str,
    greeting: &str,
    overlap: bool,
    extra: &str,
) -> CommitId {
    let dir = cluster.path(&format!("src/{name}"));
    copy_example("hello", &dir);
    let toml = std::fs::read_to_string(dir.join("service.toml")).unwrap();
    let mut toml = toml
        .replace("name = \"hello\"", &format!("name = \"{name}\""))
        .replace("hello from molt", greeting);
    if !overlap {
        toml = toml.replace("kind = \"process\"", "kind = \"process\"\noverlap = false");
    }
    toml.push_str(extra);
    write_file(&dir, "service.toml", toml.as_bytes());
    dev.push(&dir, &push_main(greeting), |_| {})
        .await
        .unwrap()
        .commit
}

/// What a person can see of the instance.
#[derive(Debug, PartialEq, Eq)]
struct Seen {
    /// Per service: its public address and the greeting it answers with.
    answers: BTreeMap<ServiceName, (std::net::SocketAddr, String)>,
    /// The recorded commits and generation.
    recorded: (BTreeMap<ServiceName, CommitId>, u64),
}

async fn seen(instance: &Instance) -> Seen {
    let mut answers = BTreeMap::new();
    for name in instance.commits().keys() {
        let addr = instance.public_addr(name, "main").unwrap();
        let (code, body) = get_once(addr, "/").await;
        assert_eq!(code, 200, "{name}: {body}");
        answers.insert(name.clone(), (addr, version_of(&body)));
    }
    Seen {
        answers,
        recorded: (instance.commits(), instance.recorded().unwrap().1),
    }
}

async fn upgrade(
    instance: &mut Instance,
    repo: &RepoClient,
    target: &BTreeMap<ServiceName, CommitId>,
    strategy: Strategy,
    fault: Option<StepKind>,
) -> Result<shell::instance::UpgradeReport, UpgradeError> {
    let options = UpgradeOptions {
        strategy,
        fault: fault.map(|after| Fault { after }),
        ..UpgradeOptions::default()
    };
    instance
        .upgrade_with(repo, target, None, "test", options, &|_, _| {}, &|_| {})
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_after_any_step_before_the_record_leaves_everything_as_it_was() {
    let cluster = TestCluster::start().await;
    let dev = cluster.repo_client("user/ada/developer").await;
    let repo = cluster.repo_client("shell/qa-1").await;
    let marks = cluster.path("marks");
    std::fs::create_dir_all(&marks).unwrap();
    let hooks = format!(
        "\n[build]\ncommand = [\"sh\", \"-c\", \"echo built > built.txt\"]\n\
         [hooks]\npre_swap = {{ command = [\"true\"] }}\n\
         post_swap = {{ command = [\"sh\", \"-c\", \"echo $MOLT_COMMIT >> {}/post\"] }}\n",
        marks.display()
    );
    let v1 = BTreeMap::from([
        (
            svc("web"),
            push(&cluster, &dev, "web", "web v1", true, &hooks).await,
        ),
        (
            svc("solo"),
            push(&cluster, &dev, "solo", "solo v1", false, "").await,
        ),
        (
            svc("gone"),
            push(&cluster, &dev, "gone", "gone v1", true, "").await,
        ),
    ]);
    let v2 = BTreeMap::from([
        (
            svc("web"),
            push(&cluster, &dev, "web", "web v2", true, &hooks).await,
        ),
        (
            svc("solo"),
            push(&cluster, &dev, "solo", "solo v2", false, "").await,
        ),
        (
            svc("fresh"),
            push(&cluster, &dev, "fresh", "fresh v2", true, "").await,
        ),
    ]);

    let sick_solo = {
        let dir = cluster.path("src/solo");
        let toml = std::fs::read_to_string(dir.join("service.toml")).unwrap();
        let broken = toml
            .replace(
                "[\"python3\", \"server.py\"]",
                "[\"sh\", \"-c\", \"echo solo cannot start >&2; exit 3\"]",
            )
            .replace("start_grace = \"10s\"", "start_grace = \"10m\"");
        assert_ne!(broken, toml);
        write_file(&dir, "service.toml", broken.as_bytes());
        dev.push(&dir, &push_main("sick"), |_| {})
            .await
            .unwrap()
            .commit
    };

    for strategy in [Strategy::InPlace, Strategy::Shadow] {
        let mut instance = Instance::open(InstanceConfig {
            name: InstanceName::new("qa-1").unwrap(),
            root: cluster.path(&format!("instance-{strategy}")),
            public_ports: PublicPorts::Ephemeral,
            public_ip: shell::instance::LOOPBACK,
        })
        .await
        .unwrap();
        upgrade(&mut instance, &repo, &v1, strategy, None)
            .await
            .unwrap();
        let before = seen(&instance).await;
        let pids = |i: &Instance| (i.pid(&svc("web")), i.pid(&svc("gone")));
        let web_pids = pids(&instance);

        // The plan has every kind of step but a plugin swap.
        let plan = instance.plan(&repo, &v2, strategy).await.unwrap();
        let kinds: BTreeSet<StepKind> = plan.steps.iter().map(|s| s.kind()).collect();
        let want: BTreeSet<StepKind> = StepKind::ALL
            .into_iter()
            .filter(|k| *k != StepKind::SwapPlugin)
            .collect();
        assert_eq!(kinds, want, "{strategy}: {:#?}", plan.steps);

        // Before the record: every failure leaves everything as it was, while a
        // client on `web` never sees a failed request or a new version. Fetch,
        // release and build go first: once a release is built and sealed, later
        // plans reuse it.
        let _ = std::fs::remove_file(marks.join("post"));
        let load = Load::start(before.answers[&svc("web")].0);
        for kind in [
            StepKind::Fetch,
            StepKind::Release,
            StepKind::Build,
            StepKind::Start,
            StepKind::Hold,
            StepKind::PreSwap,
            StepKind::Cutover,
        ] {
            let err = upgrade(&mut instance, &repo, &v2, strategy, Some(kind))
                .await
                .unwrap_err();
            assert!(
                matches!(err, UpgradeError::Injected { after } if after == kind),
                "{strategy}, after {kind}: {err}"
            );
            assert_eq!(seen(&instance).await, before, "{strategy}, after {kind}");
            assert_eq!(pids(&instance), web_pids, "{strategy}, after {kind}");
            assert_eq!(instance.public_addr(&svc("fresh"), "main"), None);
            // The lifecycle says so: the attempt failed.
            let last = instance.lifecycle().snapshot();
            let why = last.last_failure.unwrap();
            assert!(
                why.contains(kind.as_str()) || why.contains("injected"),
                "{why}"
            );
        }
        let (ok, failed, versions) = load.finish().await;
        assert_eq!(
            failed, 0,
            "{strategy}: a request failed during the rollbacks"
        );
        assert!(ok > 0);
        // In place, `web` comes last and never switched; in a shadow, a failure
        // right after the cutover lets v2 answer until the route back.
        let v1_only = BTreeSet::from(["web v1".to_owned()]);
        match strategy {
            Strategy::InPlace => assert_eq!(versions, v1_only),
            _ => assert!(
                versions.is_superset(&v1_only) && versions.len() <= 2,
                "{versions:?}"
            ),
        }
        assert!(
            !std::fs::read_to_string(marks.join("post"))
                .unwrap_or_default()
                .contains(&v2[&svc("web")].to_string()),
            "{strategy}: post_swap ran for a rolled-back upgrade"
        );

        // A real failure too: `solo`'s new process exits at once (in a shadow,
        // after the cutover of the others).
        let mut sick = v2.clone();
        sick.insert(svc("solo"), sick_solo);
        let err = upgrade(&mut instance, &repo, &sick, strategy, None)
            .await
            .unwrap_err();
        // It fails as soon as the process exits, with its status and its own
        // last lines — not after the ten-minute start grace.
        assert!(
            matches!(&err, UpgradeError::Exited { status, log_tail, .. }
                if status.contains('3') && log_tail.contains("solo cannot start")),
            "{err}"
        );
        assert_eq!(seen(&instance).await, before, "{strategy}, sick");
        assert_eq!(pids(&instance), web_pids);
        assert_eq!(instance.public_addr(&svc("fresh"), "main"), None);

        // After the record (and at it): the upgrade stands, the failure is
        // reported; then back to v1 for the next one.
        for kind in [
            StepKind::Record,
            StepKind::Drain,
            StepKind::StopOld,
            StepKind::Remove,
            StepKind::PostSwap,
        ] {
            let report = upgrade(&mut instance, &repo, &v2, strategy, Some(kind))
                .await
                .unwrap();
            assert_eq!(report.warnings.len(), 1, "{strategy}, after {kind}");
            assert!(
                report.warnings[0].contains("injected"),
                "{:?}",
                report.warnings
            );
            let now = seen(&instance).await;
            assert_eq!(now.recorded.0, v2);
            for (name, (_, greeting)) in &now.answers {
                assert!(greeting.ends_with("v2"), "{name}: {greeting}");
            }
            upgrade(&mut instance, &repo, &v1, strategy, None)
                .await
                .unwrap();
            let back = seen(&instance).await;
            assert_eq!(back.recorded.0, v1);
        }
        // Generations were never reused: 1 (v1), eight failures (2–9), then
        // five pairs of v2 and v1.
        assert_eq!(instance.recorded().unwrap().1, 19, "{strategy}");
        let numbers: Vec<u64> = instance
            .lifecycle()
            .snapshot()
            .generations
            .iter()
            .map(|g| g.number)
            .collect();
        assert_eq!(numbers, [17, 18, 19]);
        instance.shutdown().await;
    }
}

/// The portal asks a shell to keep as many releases as its target's rollback
/// window needs, and may skip the hooks: the releases stay (a rollback that
/// far back builds nothing), and the hooks do not run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn releases_kept_as_asked_and_hooks_skipped_on_request() {
    let cluster = TestCluster::start().await;
    let dev = cluster.repo_client("user/ada/developer").await;
    let repo = cluster.repo_client("shell/qa-1").await;
    let marks = cluster.path("marks");
    std::fs::create_dir_all(&marks).unwrap();
    let hooks = format!(
        "\n[hooks]\npost_swap = {{ command = [\"sh\", \"-c\", \"echo $MOLT_COMMIT >> {}/post\"] }}\n",
        marks.display()
    );
    let mut instance = Instance::open(InstanceConfig {
        name: InstanceName::new("qa-1").unwrap(),
        root: cluster.path("instance"),
        public_ports: PublicPorts::Ephemeral,
        public_ip: shell::instance::LOOPBACK,
    })
    .await
    .unwrap();
    let releases = cluster.path("instance/releases/web");
    let count = || std::fs::read_dir(&releases).unwrap().count();
    for n in 1..=7 {
        let commit = push(&cluster, &dev, "web", &format!("web v{n}"), true, &hooks).await;
        let options = UpgradeOptions {
            strategy: Strategy::InPlace,
            skip_hooks: true,
            keep_releases: Some(8),
            ..UpgradeOptions::default()
        };
        let report = instance
            .upgrade_with(
                &repo,
                &BTreeMap::from([(svc("web"), commit)]),
                None,
                "test",
                options,
                &|_, _| {},
                &|_| {},
            )
            .await
            .unwrap();
        assert!(
            report
                .timeline
                .iter()
                .all(|t| t.step.kind() != StepKind::PostSwap),
            "the hooks were skipped"
        );
    }
    assert_eq!(count(), 7, "seven releases kept, as asked");
    assert!(!marks.join("post").exists(), "no post_swap hook ran");
    // Without the request: the shell's own default, and the hooks run.
    let commit = push(&cluster, &dev, "web", "web v8", true, &hooks).await;
    upgrade(
        &mut instance,
        &repo,
        &BTreeMap::from([(svc("web"), commit)]),
        Strategy::InPlace,
        None,
    )
    .await
    .unwrap();
    // The old ones are deleted in the background: once it is done, nothing
    // but the kept releases is left.
    instance.pruned().await;
    assert_eq!(count(), shell::instance::KEEP_RELEASES);
    let ran = std::fs::read_to_string(marks.join("post")).unwrap();
    assert_eq!(ran.trim(), commit.to_string());
    instance.stop_all().await;
}
