//! The portal's web pages in a real browser (headless chromium through
//! chromedriver) against a real portal, repository and shells on loopback:
//! the deploy flow from the login to the new version answering, and what a
//! developer is not shown and a form without its CSRF token is refused; a
//! failing build's page; a rollback from History; and the live log across
//! forced reconnects of its event stream (the browser reaching the portal
//! through a [`Relay`] that cuts it off).
//! Screenshots of the main pages go to `target/screenshots/`.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use image_spec::{CommitId, ImageName, InstanceName, ServiceName};
use molt_e2e::browser::Browser;
use molt_e2e::portal::{Api, TestPortal, TestShell, wait_online};
use molt_e2e::relay::{Mode, Relay};
use molt_e2e::{TestCluster, copy_example, get_once, push_main, version_of, write_file};
use serde_json::{Value, json};
use wire::shell::{ShellRequest, ShellResponse, Stage};

/// Pushes `name`, a copy of the `hello` example answering `greeting` on
/// public port `port`; its commit.
async fn push_service(cluster: &TestCluster, name: &str, port: u16, greeting: &str) -> CommitId {
    push_built_service(cluster, name, port, greeting, None).await
}

/// Like [`push_service`], with `build` (a shell script) as its build command.
async fn push_built_service(
    cluster: &TestCluster,
    name: &str,
    port: u16,
    greeting: &str,
    build: Option<&str>,
) -> CommitId {
    let dev = cluster.repo_client("user/ada/developer").await;
    let dir = cluster.path(&format!("src/{name}"));
    copy_example("hello", &dir);
    let mut toml = std::fs::read_to_string(dir.join("service.toml"))
        .unwrap()
        .replace("name = \"hello\"", &format!("name = \"{name}\""))
        .replace("port = 8080", &format!("port = {port}"))
        .replace("hello from molt", greeting);
    if let Some(script) = build {
        // A TOML basic string: the script is ASCII, so Rust's escapes are TOML's.
        toml.push_str(&format!(
            "\n[build]\ncommand = [\"sh\", \"-c\", {script:?}]\n"
        ));
    }
    write_file(&dir, "service.toml", toml.as_bytes());
    dev.push(&dir, &push_main(greeting), |_| {})
        .await
        .unwrap()
        .commit
}

async fn image(cluster: &TestCluster, name: &str, services: &[(&str, CommitId)]) {
    let admin = cluster.repo_client("user/root/admin").await;
    let services: BTreeMap<_, _> = services
        .iter()
        .map(|(s, c)| (ServiceName::new(s).unwrap(), *c))
        .collect();
    let image =
        image_spec::Image::new(ImageName::new(name).unwrap(), String::new(), services).unwrap();
    admin.create_image(image).await.unwrap();
}

async fn add_user(portal: &TestPortal, name: &str, grant: &str, password: &str) {
    portal
        .admin()
        .post(
            "/api/v1/users",
            json!({ "name": name, "grant": grant, "password": password }),
        )
        .await;
}

/// The public address of `service` on `instance`, as its shell reports it.
async fn public_addr(portal: &TestPortal, instance: &str, service: &str) -> std::net::SocketAddr {
    let name = InstanceName::new(instance).unwrap();
    let answer = portal
        .portal
        .shells
        .call(&name, &ShellRequest::Status, |_| {})
        .await
        .unwrap()
        .unwrap();
    let ShellResponse::Status(status) = answer else {
        panic!("status answered {answer:?}");
    };
    let svc = &status.services[&ServiceName::new(service).unwrap()];
    let addr = svc.ports.values().next().expect("a public port");
    addr.parse().unwrap()
}

/// Logs in through the login page, from wherever the browser was sent.
async fn log_in(browser: &Browser, user: &str, password: &str) {
    browser.find("#user").await.send_keys(user).await.unwrap();
    browser
        .find("#password")
        .await
        .send_keys(password)
        .await
        .unwrap();
    browser.find("#login").await.click().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn log_in_pick_an_image_see_its_plan_deploy_and_watch_it_succeed() {
    let cluster = TestCluster::start().await;
    let hello_v1 = push_service(&cluster, "hello", 8080, "hello v1").await;
    let clock = push_service(&cluster, "clock", 8081, "tick").await;
    let hello_v2 = push_service(&cluster, "hello", 8080, "hello v2").await;
    image(&cluster, "v1", &[("hello", hello_v1), ("clock", clock)]).await;
    image(&cluster, "v2", &[("hello", hello_v2), ("clock", clock)]).await;

    let portal = TestPortal::start(&cluster).await;
    let admin = portal.admin();
    admin
        .post(
            "/api/v1/targets",
            json!({ "name": "shop", "stage": "staging", "instances": ["shop-1"] }),
        )
        .await;
    add_user(&portal, "ada", "deployer", "correct horse battery").await;
    let _shell = TestShell::start(&cluster, portal.quic, "shop-1", Stage::Staging).await;
    wait_online(&admin, &["shop-1"]).await;
    // v1 runs before the browser comes.
    let d = admin
        .post(
            "/api/v1/deployments",
            json!({ "target": "shop", "image": "v1" }),
        )
        .await;
    let first = admin
        .wait_deployment(d["id"].as_u64().unwrap(), 180, |d| {
            d["state"] != "queued" && d["state"] != "running"
        })
        .await;
    assert_eq!(first["state"], "succeeded", "{first}");

    let browser = Browser::start(portal.http).await;
    // Not logged in: the login page, then back to where it was going.
    browser.goto("/services").await;
    assert!(
        browser.url().await.contains("/login?next="),
        "{}",
        browser.url().await
    );
    browser.screenshot("login").await;
    log_in(&browser, "ada", "correct horse battery").await;

    // Services: the target with its stage, image, last deployment, 1/1.
    let row = browser
        .wait_text("tr[data-service=shop]", 20, |t| t.contains("shop"))
        .await;
    assert!(row.contains("staging") && row.contains("v1"), "{row}");
    assert!(row.contains("succeeded"), "{row}");
    assert_eq!(
        browser.text("tr[data-service=shop] td.instances").await,
        "1/1"
    );
    browser.screenshot("services").await;

    // The service: its instance and both microservices, healthy, no drift.
    browser
        .find("tr[data-service=shop] a")
        .await
        .click()
        .await
        .unwrap();
    let instance = browser
        .wait_text("section[data-instance=shop-1]", 20, |t| t.contains("clock"))
        .await;
    assert!(
        instance.contains("online") && instance.contains("hello"),
        "{instance}"
    );
    assert!(!instance.contains("drift"), "{instance}");
    browser.screenshot("service-overview").await;

    // Deployment: pick v2; the plan restarts hello only.
    browser.find("#tab-deployment").await.click().await.unwrap();
    browser
        .find("li[data-image=v2] a")
        .await
        .click()
        .await
        .unwrap();
    assert_eq!(browser.text("#restart-set").await, "hello");
    assert_eq!(browser.text("#untouched-set").await, "clock");
    let hello_row = browser.text("table.plan tr[data-microservice=hello]").await;
    assert!(hello_row.contains("replace"), "{hello_row}");
    browser.screenshot("deployment-plan").await;

    // Deploy: the deployment's page follows it live to succeeded.
    browser.find("#deploy").await.click().await.unwrap();
    browser.find("#state").await;
    assert!(
        browser.url().await.contains("/deployments/"),
        "{}",
        browser.url().await
    );
    browser.wait_text("#state", 180, |s| s == "succeeded").await;
    let steps = browser
        .find_all("section[data-instance=shop-1] li[data-status=done]")
        .await;
    assert!(
        steps.len() >= 3,
        "the steps are shown done: {}",
        browser.source().await
    );
    // Every line of the log once, in order.
    let mut seqs = Vec::new();
    for line in browser.find_all("#log li").await {
        seqs.push(
            line.attr("data-seq")
                .await
                .unwrap()
                .unwrap()
                .parse::<u64>()
                .unwrap(),
        );
    }
    let expected: Vec<u64> = (1..=seqs.len() as u64).collect();
    assert_eq!(seqs, expected, "each event once, in order");
    browser.screenshot("deployment").await;

    // The new version answers on the instance's public port.
    let addr = public_addr(&portal, "shop-1", "hello").await;
    let (status, body) = get_once(addr, "/").await;
    assert_eq!((status, version_of(&body)), (200, "hello v2".to_owned()));
    browser.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_developer_sees_no_deploy_on_production_and_a_form_without_its_csrf_token_is_refused() {
    let cluster = TestCluster::start().await;
    let hello = push_service(&cluster, "hello", 8080, "hello v1").await;
    image(&cluster, "v1", &[("hello", hello)]).await;
    let portal = TestPortal::start(&cluster).await;
    let admin = portal.admin();
    admin
        .post(
            "/api/v1/targets",
            json!({ "name": "prod", "stage": "production", "instances": ["prod-1"] }),
        )
        .await;
    add_user(&portal, "dev", "developer", "developer password").await;
    add_user(&portal, "ada", "deployer", "correct horse battery").await;
    let _shell = TestShell::start(&cluster, portal.quic, "prod-1", Stage::Production).await;
    wait_online(&admin, &["prod-1"]).await;

    // A developer sees the plan but no Deploy.
    let browser = Browser::start(portal.http).await;
    browser.goto("/services/prod/deployment?image=v1").await;
    log_in(&browser, "dev", "developer password").await;
    browser.find("#restart-set").await;
    assert!(
        browser.find_all("#deploy").await.is_empty(),
        "no Deploy for a developer"
    );
    let why = browser.text("#no-deploy").await;
    assert!(
        why.contains("developer") && why.contains("production"),
        "{why}"
    );
    browser.screenshot("deployment-developer").await;
    browser
        .find("header form button")
        .await
        .click()
        .await
        .unwrap();
    browser.find("#user").await;
    browser.close().await;

    // A deployer sees Deploy, asking for the target's name; the same form
    // posted without its CSRF token is refused and queues nothing.
    let browser = Browser::start(portal.http).await;
    browser.goto("/services/prod/deployment?image=v1").await;
    log_in(&browser, "ada", "correct horse battery").await;
    browser.find("#deploy").await;
    browser
        .find("#confirm")
        .await
        .send_keys("prod")
        .await
        .unwrap();
    browser
        .client
        .execute(
            "document.querySelector('#deploy-panel input[name=csrf]').remove();",
            vec![],
        )
        .await
        .unwrap();
    browser.find("#deploy").await.click().await.unwrap();
    let refused = browser.wait_text("main", 20, |t| t.contains("403")).await;
    assert!(refused.contains("csrf"), "{refused}");
    browser.screenshot("csrf-refused").await;
    assert_eq!(
        admin.get("/api/v1/deployments?target=prod").await,
        json!([]),
        "nothing was queued"
    );

    // With its token and a wrong confirmation: the error next to the field.
    browser.goto("/services/prod/deployment?image=v1").await;
    browser
        .find("#confirm")
        .await
        .send_keys("production")
        .await
        .unwrap();
    browser.find("#deploy").await.click().await.unwrap();
    let error = browser.text("#confirm-error").await;
    assert!(error.contains("type its name"), "{error}");
    assert_eq!(
        admin.get("/api/v1/deployments?target=prod").await,
        json!([])
    );
    browser.close().await;
}

/// A portal with the staging target `shop` (instance `shop-1`, its shell
/// attached and online) and the deployer `ada`.
async fn shop(cluster: &TestCluster) -> (TestPortal, TestShell) {
    let portal = TestPortal::start(cluster).await;
    let admin = portal.admin();
    admin
        .post(
            "/api/v1/targets",
            json!({ "name": "shop", "stage": "staging", "instances": ["shop-1"] }),
        )
        .await;
    add_user(&portal, "ada", "deployer", "correct horse battery").await;
    let shell = TestShell::start(cluster, portal.quic, "shop-1", Stage::Staging).await;
    wait_online(&admin, &["shop-1"]).await;
    (portal, shell)
}

/// Queues `image` to `shop` through the API; the deployment's id.
async fn queue(admin: &Api, image: &str) -> u64 {
    let d = admin
        .post(
            "/api/v1/deployments",
            json!({ "target": "shop", "image": image }),
        )
        .await;
    d["id"].as_u64().unwrap()
}

/// Deploys `image` to `shop` through the API and waits until it succeeded;
/// the deployment's id.
async fn deployed(admin: &Api, image: &str) -> u64 {
    let id = queue(admin, image).await;
    let d = admin
        .wait_deployment(id, 180, |d| {
            d["state"] != "queued" && d["state"] != "running"
        })
        .await;
    assert_eq!(d["state"], "succeeded", "{d}");
    id
}

/// The event numbers the page's log shows, in the page's order.
async fn log_seqs(browser: &Browser) -> Vec<u64> {
    let mut seqs = Vec::new();
    for line in browser.find_all("#log li").await {
        seqs.push(
            line.attr("data-seq")
                .await
                .unwrap()
                .unwrap()
                .parse::<u64>()
                .unwrap(),
        );
    }
    seqs
}

/// The numbers of a deployment's events, as the API lists them.
async fn event_seqs(admin: &Api, id: u64) -> Vec<u64> {
    let events = admin.get(&format!("/api/v1/deployments/{id}/events")).await;
    events
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["seq"].as_u64().unwrap())
        .collect()
}

/// Waits (at most `secs`) until some event of deployment `id`, as the API
/// lists them, satisfies `found`.
async fn wait_event(admin: &Api, id: u64, secs: u64, what: &str, found: impl Fn(&Value) -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let events = admin.get(&format!("/api/v1/deployments/{id}/events")).await;
        if events.as_array().unwrap().iter().any(&found) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "deployment {id}: no event {what} in {secs} s: {events}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A step event of `service`'s build that ended (done or failed).
fn build_ended(e: &Value, service: &str) -> bool {
    let step = &e["kind"]["step"];
    let outcome = &step["outcome"];
    step["step"]["build"]["service"] == service
        && (outcome.get("done").is_some() || outcome.get("failed").is_some())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_build_shows_failed_its_step_and_error_lines_first_and_the_old_version_answers() {
    let cluster = TestCluster::start().await;
    let v1 = push_service(&cluster, "hello", 8080, "hello v1").await;
    // The build's error line is printed, not spelled out in the command (which
    // the error also quotes), so finding it on the page means its log was read.
    let broken = push_built_service(
        &cluster,
        "hello",
        8080,
        "hello v2",
        Some("echo compiling hello; printf 'error[E%s]: mismatched types at src/lib.rs:%s\\n' 0308 7 >&2; exit 1"),
    )
    .await;
    image(&cluster, "v1", &[("hello", v1)]).await;
    image(&cluster, "v2", &[("hello", broken)]).await;
    let (portal, _shell) = shop(&cluster).await;
    let admin = portal.admin();
    deployed(&admin, "v1").await;

    // Deploy v2 from its Deployment tab; its page follows it to the end.
    let browser = Browser::start(portal.http).await;
    browser.goto("/services/shop/deployment?image=v2").await;
    log_in(&browser, "ada", "correct horse battery").await;
    browser.find("#deploy").await.click().await.unwrap();
    browser.find("#state").await;
    assert!(
        browser.url().await.contains("/deployments/"),
        "{}",
        browser.url().await
    );
    let state = browser
        .wait_text("#state", 180, |s| {
            matches!(s, "succeeded" | "failed" | "cancelled")
        })
        .await;
    assert_eq!(state, "failed", "{}", browser.source().await);

    // First on the page: the failure, the failing step and the build's
    // error line.
    let failure = browser.text("#failure").await;
    assert!(failure.contains("build hello"), "{failure}");
    assert!(
        failure.contains("error[E0308]: mismatched types at src/lib.rs:7"),
        "{failure}"
    );
    assert!(failure.contains("shop-1"), "{failure}");
    let placement = browser
        .client
        .execute(
            "const f = document.querySelector('#failure');
             const before = (other) => !!(f.compareDocumentPosition(
                 document.querySelector(other)) & Node.DOCUMENT_POSITION_FOLLOWING);
             return { top: f.getBoundingClientRect().top, height: window.innerHeight,
                      progress: before('#progress'), log: before('#log'),
                      state: before('#state') };",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(placement["progress"], true, "{placement}");
    assert_eq!(placement["log"], true, "{placement}");
    assert_eq!(placement["state"], true, "{placement}");
    assert!(
        placement["top"].as_f64().unwrap() < placement["height"].as_f64().unwrap() / 2.0,
        "the failure is seen without scrolling: {placement}"
    );
    // The failing step, marked failed in the progress with its error.
    let failed = browser
        .text("section[data-instance=shop-1] li[data-status=failed]")
        .await;
    assert!(
        failed.contains("build hello") && failed.contains("error[E0308]"),
        "{failed}"
    );
    browser.screenshot("deployment-failed").await;

    // The old version still answers.
    let addr = public_addr(&portal, "shop-1", "hello").await;
    let (status, body) = get_once(addr, "/").await;
    assert_eq!((status, version_of(&body)), (200, "hello v1".to_owned()));
    browser.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rollback_from_history_to_the_deployment_before_last() {
    let cluster = TestCluster::start().await;
    let mut images = Vec::new();
    for v in ["v1", "v2", "v3"] {
        let commit = push_service(&cluster, "hello", 8080, &format!("hello {v}")).await;
        image(&cluster, v, &[("hello", commit)]).await;
        images.push(v);
    }
    let (portal, _shell) = shop(&cluster).await;
    let admin = portal.admin();
    let mut ids = Vec::new();
    for v in &images {
        ids.push(deployed(&admin, v).await);
    }
    let addr = public_addr(&portal, "shop-1", "hello").await;
    assert_eq!(version_of(&get_once(addr, "/").await.1), "hello v3");

    let browser = Browser::start(portal.http).await;
    // What runs now offers no rollback to itself.
    browser.goto(&format!("/deployments/{}", ids[2])).await;
    log_in(&browser, "ada", "correct horse battery").await;
    browser.wait_text("#state", 20, |s| s == "succeeded").await;
    assert!(
        browser.find_all("#rollback").await.is_empty(),
        "no rollback to the current deployment"
    );

    // History: three succeeded deployments, newest first; the first one's page.
    browser.goto("/services/shop/history").await;
    let rows = browser.find_all("#history tbody tr").await;
    let mut listed = Vec::new();
    for row in &rows {
        listed.push(row.attr("data-deployment").await.unwrap().unwrap());
    }
    let newest_first: Vec<String> = ids.iter().rev().map(u64::to_string).collect();
    assert_eq!(listed, newest_first);
    let first = browser
        .text(&format!("#history tr[data-deployment=\"{}\"]", ids[0]))
        .await;
    assert!(
        first.contains("v1") && first.contains("succeeded"),
        "{first}"
    );
    browser.screenshot("history").await;
    browser
        .find(&format!("#history tr[data-deployment=\"{}\"] a", ids[0]))
        .await
        .click()
        .await
        .unwrap();

    // Its page offers the rollback to v1; pressing it queues a new deployment
    // whose page follows it to succeeded.
    let offer = browser.text("#rollback").await;
    assert!(offer.contains("v1"), "{offer}");
    browser.find("#rollback").await.click().await.unwrap();
    browser
        .wait_text("#summary", 20, |t| {
            t.contains(&format!("rollback of {}", ids[0]))
        })
        .await;
    let url = browser.url().await;
    let new: u64 = url
        .rsplit('/')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("a deployment's page: {url}"));
    assert!(!ids.contains(&new), "a new deployment: {url}");
    browser.wait_text("#state", 180, |s| s == "succeeded").await;
    let summary = browser.text("#summary").await;
    assert!(summary.contains("v1"), "{summary}");
    browser.screenshot("deployment-rollback").await;
    let d = admin.get(&format!("/api/v1/deployments/{new}")).await;
    assert_eq!(d["image"]["name"], "v1", "{d}");

    // The service answers v1 again, and History lists the rollback first.
    let (status, body) = get_once(addr, "/").await;
    assert_eq!((status, version_of(&body)), (200, "hello v1".to_owned()));
    browser.goto("/services/shop/history").await;
    let top = browser.text("#history tbody tr").await;
    assert!(
        top.contains(&format!("#{new}")) && top.contains(&format!("rollback of {}", ids[0])),
        "{top}"
    );
    browser.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_live_log_keeps_up_across_forced_reconnects_of_its_event_stream() {
    let cluster = TestCluster::start().await;
    let hello_v1 = push_service(&cluster, "hello", 8080, "hello v1").await;
    let clock_v1 = push_service(&cluster, "clock", 8081, "tick v1").await;
    // v2's builds wait for a file each: the test says when they end.
    let gates = cluster.path("gates");
    std::fs::create_dir_all(&gates).unwrap();
    let gated = |name: &str| {
        let gate = gates.join(name);
        format!(
            "echo building {name}; while [ ! -e {} ]; do sleep 0.05; done; echo built {name}",
            gate.display()
        )
    };
    let hello_v2 =
        push_built_service(&cluster, "hello", 8080, "hello v2", Some(&gated("hello"))).await;
    let clock_v2 =
        push_built_service(&cluster, "clock", 8081, "tick v2", Some(&gated("clock"))).await;
    image(&cluster, "v1", &[("hello", hello_v1), ("clock", clock_v1)]).await;
    image(&cluster, "v2", &[("hello", hello_v2), ("clock", clock_v2)]).await;
    let (portal, _shell) = shop(&cluster).await;
    let admin = portal.admin();
    deployed(&admin, "v1").await;
    let id = queue(&admin, "v2").await;

    // The browser reaches the portal through a relay that can cut it off.
    let relay = Relay::for_portal(portal.http).await;
    let browser = Browser::start(relay.addr).await;
    browser.goto(&format!("/deployments/{id}")).await;
    log_in(&browser, "ada", "correct horse battery").await;
    browser.wait_text("#state", 60, |s| s == "running").await;
    // A reload would lose this.
    browser
        .client
        .execute("window.moltSamePage = true; return true;", vec![])
        .await
        .unwrap();
    // The builds run in the plan's order, clock's first; it waits for its
    // gate, shown running live or on load.
    browser
        .wait_text(
            "section[data-instance=shop-1] li[data-status=running]",
            120,
            |t| t.contains("build clock"),
        )
        .await;
    browser.screenshot("deployment-running").await;

    // 1. The stream is cut and the browser's own reconnect (with
    // Last-Event-ID) held while clock's build ends.
    relay.set(Mode::Hold);
    relay.cut();
    relay
        .wait_for("the browser reconnect", 60, |r| r.held() >= 1)
        .await;
    let cut_off = log_seqs(&browser).await;
    std::fs::write(gates.join("clock"), b"").unwrap();
    wait_event(&admin, id, 120, "ending clock's build", |e| {
        build_ended(e, "clock")
    })
    .await;
    assert_eq!(
        log_seqs(&browser).await,
        cut_off,
        "nothing reaches the page while its stream is held"
    );
    // Let through, it catches up: hello's build now runs.
    relay.set(Mode::Forward);
    browser
        .wait_text(
            "section[data-instance=shop-1] li[data-status=running]",
            60,
            |t| t.contains("build hello"),
        )
        .await;

    // 2. Cut again, every reconnect now refused (502), so the browser's
    // EventSource gives up and htmx's SSE extension opens new ones (after
    // the last line shown) until one goes through; hello's build ends and
    // the deployment finishes meanwhile.
    relay.set(Mode::Refuse);
    relay.cut();
    relay
        .wait_for("the browser's and htmx's reconnects", 60, |r| {
            r.refused() >= 2
        })
        .await;
    let cut_off = log_seqs(&browser).await;
    std::fs::write(gates.join("hello"), b"").unwrap();
    let done = admin
        .wait_deployment(id, 180, |d| {
            d["state"] != "queued" && d["state"] != "running"
        })
        .await;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(
        browser.text("#state").await,
        "running",
        "nothing reaches the page while its stream is refused"
    );
    assert_eq!(
        log_seqs(&browser).await,
        cut_off,
        "nothing reaches the page while its stream is refused"
    );
    relay.set(Mode::Forward);
    browser.wait_text("#state", 120, |s| s == "succeeded").await;

    // Every event once, in order, as the API lists them; the same page.
    let page = log_seqs(&browser).await;
    let api = event_seqs(&admin, id).await;
    assert_eq!(page, api, "the page's log is the deployment's events");
    let steps = browser
        .find_all("section[data-instance=shop-1] li[data-status=done]")
        .await;
    let pending = browser
        .find_all("section[data-instance=shop-1] li[data-status=pending], section[data-instance=shop-1] li[data-status=running]")
        .await;
    assert!(
        steps.len() >= 4 && pending.is_empty(),
        "every step shown done: {}",
        browser.source().await
    );
    let same = browser
        .client
        .execute("return window.moltSamePage === true;", vec![])
        .await
        .unwrap();
    assert_eq!(same, Value::Bool(true), "the page was not reloaded");
    browser.screenshot("deployment-reconnected").await;

    let addr = public_addr(&portal, "shop-1", "hello").await;
    let (status, body) = get_once(addr, "/").await;
    assert_eq!((status, version_of(&body)), (200, "hello v2".to_owned()));
    browser.close().await;
}
