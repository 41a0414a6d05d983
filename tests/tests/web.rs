//! The portal's web pages in a real browser (headless chromium through
//! chromedriver) against a real portal, repository and shells on loopback:
//! the deploy flow from the login to the new version answering, and what a
//! developer is not shown and a form without its CSRF token is refused.
//! Screenshots of the main pages go to `target/screenshots/`.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use image_spec::{CommitId, ImageName, InstanceName, ServiceName};
use molt_e2e::browser::Browser;
use molt_e2e::portal::{TestPortal, TestShell, wait_online};
use molt_e2e::{TestCluster, copy_example, get_once, push_main, version_of, write_file};
use serde_json::json;
use wire::shell::{ShellRequest, ShellResponse, Stage};

/// Pushes `name`, a copy of the `hello` example answering `greeting` on
/// public port `port`; its commit.
async fn push_service(cluster: &TestCluster, name: &str, port: u16, greeting: &str) -> CommitId {
    let dev = cluster.repo_client("user/ada/developer").await;
    let dir = cluster.path(&format!("src/{name}"));
    copy_example("hello", &dir);
    let toml = std::fs::read_to_string(dir.join("service.toml"))
        .unwrap()
        .replace("name = \"hello\"", &format!("name = \"{name}\""))
        .replace("port = 8080", &format!("port = {port}"))
        .replace("hello from molt", greeting);
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
