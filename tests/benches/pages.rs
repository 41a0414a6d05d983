//! Benchmark: how long the portal's busiest pages take to serve, and how soon a
//! deployment's first progress reaches its event stream — against baselines
//! measured the same way in the same run.
//!
//! 1. A real portal (its records on tmpfs when `/dev/shm` exists, so filling it
//!    measures nothing of the disk) gets 50 targets of 4 instances each (200
//!    instances) and 10,000 finished deployments of one target, written
//!    through its `Store`.
//! 2. Logged in as a person (a session cookie), it GETs, `MOLT_BENCH_REQUESTS`
//!    times each (default 50), on a new loopback connection per request:
//!    the Services page, a History page (the newest 25 of 10,000), a History
//!    page filtered to one image, and the page of one deployment; the baseline
//!    is `GET /api/v1/whoami` (the same connection, authentication and
//!    framing, nothing rendered). It prints median and p90 per page and the
//!    page's cost over the baseline.
//! 3. With one real shell attached: from `POST /api/v1/deployments` to the
//!    first event on the deployment's stream, and to the first step a shell
//!    reported, `MOLT_BENCH_DEPLOYS` times (default 5).
//!
//! Run: `scripts/bench-pages` or `cargo bench -p molt-e2e --bench pages`.

use std::collections::BTreeMap;
use std::error::Error;
use std::time::{Duration, Instant};

use image_spec::{ImageId, ImageName, InstanceName, ServiceName, TargetName, UserName};
use molt_e2e::bench::env_or;
use molt_e2e::portal::{Api, TestPortal, TestShell, wait_online};
use molt_e2e::{TestCluster, copy_example, push_main, write_file};
use portal::deployment::{DeployOptions, NewDeployment, Transition, Trigger};
use portal::target::{Settings, Target};
use serde_json::json;
use wire::shell::{ImageRef, Stage};

type Res<T> = Result<T, Box<dyn Error>>;

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Median and p90 of `samples`, in ms.
fn stats(mut samples: Vec<Duration>) -> (f64, f64) {
    samples.sort();
    let at = |q: f64| ms(samples[((samples.len() - 1) as f64 * q).round() as usize]);
    (at(0.5), at(0.9))
}

/// GETs `path` `n` times: each request's time, checking it answered 200.
async fn time_get(api: &Api, path: &str, n: usize) -> Res<Vec<Duration>> {
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let start = Instant::now();
        let answer = api
            .try_request("GET", path, "text/html", String::new())
            .await?;
        times.push(start.elapsed());
        if answer.status != 200 {
            return Err(format!("GET {path}: {} {}", answer.status, answer.body).into());
        }
    }
    Ok(times)
}

fn main() -> Res<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run())
}

async fn run() -> Res<()> {
    let requests = env_or("MOLT_BENCH_REQUESTS", 50).max(2);
    let deploys = env_or("MOLT_BENCH_DEPLOYS", 5).max(1);
    let history = env_or("MOLT_BENCH_HISTORY", 10_000);
    let cluster = TestCluster::start().await;

    // Two images of `hello`, for the deployments that really run.
    let dev = cluster.repo_client("user/ada/developer").await;
    let dir = cluster.path("src/hello");
    copy_example("hello", &dir);
    let toml = std::fs::read_to_string(dir.join("service.toml"))?;
    let admin_repo = cluster.repo_client("user/root/admin").await;
    let mut images = Vec::new();
    for n in 0..=deploys {
        write_file(
            &dir,
            "service.toml",
            toml.replace("hello from molt", &format!("hello {n}"))
                .as_bytes(),
        );
        let commit = dev
            .push(&dir, &push_main(&format!("v{n}")), |_| {})
            .await?
            .commit;
        let name = format!("v{n}");
        let image = image_spec::Image::new(
            ImageName::new(&name)?,
            String::new(),
            BTreeMap::from([(ServiceName::new("hello")?, commit)]),
        )?;
        admin_repo.create_image(image).await?;
        images.push(name);
    }

    let shm = std::path::Path::new("/dev/shm");
    let data = if shm.is_dir() {
        tempfile::tempdir_in(shm)?
    } else {
        tempfile::tempdir()?
    };
    let any = "127.0.0.1:0".parse()?;
    let portal = TestPortal::start_at(
        &cluster,
        data.path().join("portal"),
        any,
        any,
        portal::runner::RunnerConfig::default(),
    )
    .await;
    let store = portal.portal.store.clone();

    // 1. 50 targets × 4 instances, and 10,000 finished deployments of one.
    let fill = Instant::now();
    for t in 0..50 {
        store
            .put_target(
                Target {
                    name: TargetName::new(&format!("svc-{t:02}"))?,
                    stage: if t % 2 == 0 {
                        Stage::Staging
                    } else {
                        Stage::Production
                    },
                    instances: (0..4)
                        .map(|i| InstanceName::new(&format!("svc-{t:02}-{i}")))
                        .collect::<Result<_, _>>()?,
                    settings: Settings::default(),
                    created: 0,
                },
                false,
            )
            .await?;
    }
    let big = Settings {
        keep_history: u32::MAX,
        ..Settings::default()
    };
    let target = TargetName::new("svc-00")?;
    let mut t0 = store.target(&target).await?.ok_or("svc-00")?;
    t0.settings = big;
    store.put_target(t0.clone(), true).await?;
    let mut one_id = None;
    for n in 0..history {
        let d = store
            .enqueue(
                NewDeployment {
                    target: target.clone(),
                    image: ImageRef {
                        name: ImageName::new(&format!("img-{}", n % 100))?,
                        id: ImageId::from_bytes([(n % 251) as u8; 32]),
                    },
                    requested_by: UserName::new(if n % 3 == 0 { "ada" } else { "bob" })?,
                    trigger: Trigger::Manual,
                    options: DeployOptions::default(),
                    instances: t0.instances.clone(),
                },
                n as i64,
            )
            .await?;
        store.claim_next(4, n as i64).await?;
        let end = if n % 10 == 0 {
            Transition::Fail
        } else {
            Transition::Succeed
        };
        store.transition(d.id, end, None, n as i64 + 1).await?;
        one_id.get_or_insert(d.id);
    }
    let filled = fill.elapsed();

    // A person's session.
    let admin = portal.admin();
    admin
        .post(
            "/api/v1/users",
            json!({ "name": "ada", "grant": "deployer", "password": "a long bench password" }),
        )
        .await;
    let login = portal
        .anonymous()
        .request(
            "POST",
            "/api/v1/login",
            Some(&json!({ "user": "ada", "password": "a long bench password" })),
        )
        .await;
    let cookie = login
        .headers
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|c| c.starts_with("molt_session="))
        .and_then(|c| c.split(';').next())
        .ok_or("no session cookie")?
        .to_owned();
    let person = portal.anonymous().with_header("cookie", &cookie);

    // 2. The pages against the baseline.
    let one = one_id.ok_or("no deployment")?;
    let pages = [
        ("baseline: GET /api/v1/whoami", "/api/v1/whoami".to_owned()),
        (
            "Services (50 targets, 200 instances)",
            "/services".to_owned(),
        ),
        (
            &*format!("History of svc-00 ({history} deployments)"),
            "/services/svc-00/history".to_owned(),
        ),
        (
            "History filtered to one image",
            "/services/svc-00/history?image=img-7".to_owned(),
        ),
        ("one deployment's page", format!("/deployments/{one}")),
    ]
    .map(|(what, path)| (what.to_owned(), path));
    // Warm up every page once.
    for (_, path) in &pages {
        time_get(&person, path, 1).await?;
    }
    let mut results = Vec::new();
    for (what, path) in &pages {
        results.push((
            what.clone(),
            stats(time_get(&person, path, requests).await?),
        ));
    }

    // 3. Deploy → first event, with one real shell.
    store
        .put_target(
            Target {
                name: TargetName::new("live")?,
                stage: Stage::Staging,
                instances: vec![InstanceName::new("live-1")?],
                settings: Settings::default(),
                created: 0,
            },
            false,
        )
        .await?;
    let mut shell = TestShell::start(&cluster, portal.quic, "live-1", Stage::Staging).await;
    wait_online(&admin, &["live-1"]).await;
    let mut first_event = Vec::new();
    let mut first_step = Vec::new();
    for image in &images {
        let mut live = portal.portal.journal.subscribe();
        let start = Instant::now();
        let d = admin
            .post(
                "/api/v1/deployments",
                json!({ "target": "live", "image": image }),
            )
            .await;
        let id = d["id"].as_u64().ok_or("no id")?;
        let (mut event, mut step) = (None, None);
        while step.is_none() {
            let (did, e) = tokio::time::timeout(Duration::from_secs(60), live.recv()).await??;
            if did.0 != id {
                continue;
            }
            event.get_or_insert(start.elapsed());
            if matches!(e.kind, portal::deployment::EventKind::Step(_)) {
                step = Some(start.elapsed());
            }
        }
        admin
            .wait_deployment(id, 120, |d| {
                d["state"] != "queued" && d["state"] != "running"
            })
            .await;
        first_event.extend(event);
        first_step.extend(step);
    }
    shell.stop().await;

    println!(
        "portal pages, {requests} GETs each on new loopback connections, as a logged-in person (ms):"
    );
    println!(
        "  filled {history} deployments and 50 targets in {:.1} s",
        filled.as_secs_f64()
    );
    println!(
        "  {:<44} {:>8} {:>8} {:>14}",
        "page", "median", "p90", "median-baseline"
    );
    let base = results[0].1.0;
    for (what, (median, p90)) in &results {
        println!(
            "  {what:<44} {median:>8.2} {p90:>8.2} {:>+14.2}",
            median - base
        );
    }
    let (e50, e90) = stats(first_event);
    let (s50, s90) = stats(first_step);
    println!(
        "deploy → first event on its stream, {} deployments with one real shell (ms):",
        images.len()
    );
    println!("  first event (queued/running): median {e50:.2} p90 {e90:.2}");
    println!("  first step a shell reported:  median {s50:.2} p90 {s90:.2}");
    Ok(())
}
