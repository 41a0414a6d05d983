//! The portal's Settings, Images, Instances and Audit pages in a real
//! browser (headless chromium through chromedriver, `molt_e2e::browser`)
//! against a real portal, repository and shell on loopback: an admin changes
//! a service's settings and sees them saved, makes a new image from another
//! one (as its author) and finds it listed, the instances and the audit log
//! show what happened; a deployer is shown none of the admin pages and is
//! refused them; a form without its CSRF token is refused. Screenshots go to
//! `target/screenshots/`.

#![allow(clippy::unwrap_used)]

use image_spec::{CommitId, ImageName, ServiceName};
use molt_e2e::browser::Browser;
use molt_e2e::portal::{TestPortal, TestShell, wait_online};
use molt_e2e::{TestCluster, copy_example, push_main, write_file};
use serde_json::json;
use wire::shell::Stage;

/// Pushes `hello` (a copy of the example) answering `greeting`; its commit.
async fn push_hello(cluster: &TestCluster, greeting: &str) -> CommitId {
    let dev = cluster.repo_client("user/ada/developer").await;
    let dir = cluster.path("src/hello");
    copy_example("hello", &dir);
    let toml = std::fs::read_to_string(dir.join("service.toml"))
        .unwrap()
        .replace("hello from molt", greeting);
    write_file(&dir, "service.toml", toml.as_bytes());
    dev.push(&dir, &push_main(greeting), |_| {})
        .await
        .unwrap()
        .commit
}

/// A portal with target `shop` (staging, `shop-1` attached) and `spare`
/// (an instance that never attached); `root` has made image `v1` of
/// `hello` v1, and `hello`'s `main` has moved on to v2 since. Users:
/// `alice` (admin) and `bob` (deployer).
async fn setup() -> (TestCluster, TestPortal, TestShell, CommitId) {
    let cluster = TestCluster::start().await;
    let v1 = push_hello(&cluster, "hello v1").await;
    let root = cluster.repo_client("user/root/admin").await;
    let services = [(ServiceName::new("hello").unwrap(), v1)].into();
    root.create_image(
        image_spec::Image::new(ImageName::new("v1").unwrap(), "first".into(), services).unwrap(),
    )
    .await
    .unwrap();
    let v2 = push_hello(&cluster, "hello v2").await;

    let portal = TestPortal::start(&cluster).await;
    let admin = portal.admin();
    for (name, instance) in [("shop", "shop-1"), ("spare", "spare-1")] {
        admin
            .post(
                "/api/v1/targets",
                json!({ "name": name, "stage": "staging", "instances": [instance] }),
            )
            .await;
    }
    for (name, grant) in [("alice", "admin"), ("bob", "deployer")] {
        admin
            .post(
                "/api/v1/users",
                json!({ "name": name, "grant": grant, "password": format!("{name} password") }),
            )
            .await;
    }
    let shell = TestShell::start(&cluster, portal.quic, "shop-1", Stage::Staging).await;
    wait_online(&admin, &["shop-1"]).await;
    (cluster, portal, shell, v2)
}

/// Logs in through the login page, from wherever the browser was sent.
async fn log_in(browser: &Browser, user: &str) {
    browser.find("#user").await.send_keys(user).await.unwrap();
    browser
        .find("#password")
        .await
        .send_keys(&format!("{user} password"))
        .await
        .unwrap();
    browser.find("#login").await.click().await.unwrap();
}

/// Replaces the value of the input `css` with `value`.
async fn fill(browser: &Browser, css: &str, value: &str) {
    let input = browser.find(css).await;
    input.clear().await.unwrap();
    input.send_keys(value).await.unwrap();
}

/// The value of the form control `css`.
async fn value_of(browser: &Browser, css: &str) -> String {
    browser
        .find(css)
        .await
        .prop("value")
        .await
        .unwrap()
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_admin_changes_settings_makes_an_image_and_sees_instances_and_the_audit_log() {
    let (_cluster, portal, _shell, v2) = setup().await;
    let admin = portal.admin();
    let browser = Browser::start(portal.http).await;
    browser.goto("/services/shop").await;
    log_in(&browser, "alice").await;

    // Settings: change the rollout, the canary time, parallel, the rollback
    // window and the instances' order; saved, shown saved, and stored.
    browser.find("#tab-settings").await.click().await.unwrap();
    assert_eq!(value_of(&browser, "#rollout").await, "one-by-one");
    browser
        .find("#rollout")
        .await
        .select_by_value("canary")
        .await
        .unwrap();
    browser
        .find("#strategy")
        .await
        .select_by_value("shadow")
        .await
        .unwrap();
    fill(&browser, "#canary_secs", "45").await;
    fill(&browser, "#parallel", "3").await;
    fill(&browser, "#keep_rollback", "7").await;
    fill(&browser, "#instances", "shop-1\nshop-2").await;
    browser.find("#save-settings").await.click().await.unwrap();
    let saved = browser.text("#saved").await;
    assert!(saved.contains("Saved"), "{saved}");
    assert!(
        browser
            .url()
            .await
            .ends_with("/services/shop/settings?saved=1")
    );
    assert_eq!(value_of(&browser, "#rollout").await, "canary");
    assert_eq!(value_of(&browser, "#strategy").await, "shadow");
    assert_eq!(value_of(&browser, "#canary_secs").await, "45");
    assert_eq!(value_of(&browser, "#instances").await, "shop-1\nshop-2");
    let shop1 = browser
        .text("#settings-instances li[data-instance=shop-1]")
        .await;
    assert!(shop1.contains("online"), "{shop1}");
    let shop2 = browser
        .text("#settings-instances li[data-instance=shop-2]")
        .await;
    assert!(
        shop2.contains("offline") && shop2.contains("never"),
        "{shop2}"
    );
    browser.screenshot("service-settings").await;
    let stored = admin.get("/api/v1/targets/shop").await;
    assert_eq!(
        stored["settings"],
        json!({ "strategy": "shadow", "rollout": "canary", "canary_secs": 45, "parallel": 3,
                "keep_history": 200, "keep_rollback": 7 }),
        "{stored}"
    );
    assert_eq!(
        stored["instances"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["name"].as_str().unwrap())
            .collect::<Vec<_>>(),
        ["shop-1", "shop-2"]
    );

    // A bad value is shown next to its field and changes nothing; an
    // instance another service holds likewise.
    fill(&browser, "#instances", "shop-1\nspare-1").await;
    browser.find("#save-settings").await.click().await.unwrap();
    let error = browser.text("#instances-error").await;
    assert!(error.contains("spare-1"), "{error}");
    browser.screenshot("service-settings-error").await;
    // Back to each instance's own strategy, and the two instances.
    browser.goto("/services/shop/settings").await;
    browser
        .find("#strategy")
        .await
        .select_by_value("")
        .await
        .unwrap();
    fill(&browser, "#instances", "shop-1").await;
    browser.find("#save-settings").await.click().await.unwrap();
    browser.find("#saved").await;
    let stored = admin.get("/api/v1/targets/shop").await;
    assert_eq!(stored["settings"]["strategy"], json!(null), "{stored}");
    assert_eq!(stored["settings"]["rollout"], "canary");

    // The same form without its CSRF token is refused and changes nothing.
    fill(&browser, "#parallel", "9").await;
    browser
        .client
        .execute(
            "document.querySelector('#settings-form input[name=csrf]').remove();",
            vec![],
        )
        .await
        .unwrap();
    browser.find("#save-settings").await.click().await.unwrap();
    let refused = browser.wait_text("main", 20, |t| t.contains("403")).await;
    assert!(refused.contains("csrf"), "{refused}");
    assert_eq!(
        admin.get("/api/v1/targets/shop").await["settings"]["parallel"],
        3
    );

    // Images: v1 by root; open it, bump hello to main's head as v2, then
    // to shop's Deployment tab with v2 picked.
    browser.goto("/services").await;
    browser.find("#nav-images").await.click().await.unwrap();
    let row = browser.text("#images tr[data-image=v1]").await;
    assert!(row.contains("root") && row.contains("hello"), "{row}");
    browser
        .find("#images tr[data-image=v1] a")
        .await
        .click()
        .await
        .unwrap();
    let hello = browser
        .text("#image-services tr[data-microservice=hello]")
        .await;
    assert!(
        hello.contains("hello v1") && hello.contains("ahead"),
        "{hello}"
    );
    assert_eq!(browser.text("#image-author").await, "root");
    // Nothing chosen: the error is next to the list, nothing is made.
    fill(&browser, "#new-name", "v2").await;
    browser.find("#create-image").await.click().await.unwrap();
    let error = browser.text("#bump-error").await;
    assert!(error.contains("at least one"), "{error}");
    // A revision that names nothing: next to its field.
    browser.find("#bump-hello").await.click().await.unwrap();
    fill(&browser, "#rev-hello", "no-such-branch").await;
    browser.find("#create-image").await.click().await.unwrap();
    let error = browser.text("#rev-hello-error").await;
    assert!(!error.is_empty(), "an error next to the revision");
    assert_eq!(value_of(&browser, "#new-name").await, "v2", "the form kept");
    assert_eq!(admin.call("GET", "/api/v1/images/v2", None).await.0, 404);
    fill(&browser, "#rev-hello", "main").await;
    browser
        .find("#then")
        .await
        .select_by_value("shop")
        .await
        .unwrap();
    browser.screenshot("image").await;
    browser.find("#create-image").await.click().await.unwrap();
    assert_eq!(browser.text("#restart-set").await, "hello");
    assert!(
        browser
            .url()
            .await
            .ends_with("/services/shop/deployment?image=v2"),
        "{}",
        browser.url().await
    );
    let made = admin.get("/api/v1/images/v2").await;
    assert_eq!(made["services"]["hello"], v2.to_string(), "{made}");
    assert_eq!(made["created"]["author"], "alice", "{made}");
    assert_eq!(made["created"]["by"], "portal", "{made}");
    // Listed first, by alice.
    browser.find("#nav-images").await.click().await.unwrap();
    let first = browser.text("#images tbody tr").await;
    assert!(
        first.starts_with("v2") && first.contains("alice (through the portal)"),
        "{first}"
    );
    browser.screenshot("images").await;
    // The name is taken now: said next to it.
    browser.goto("/images/v1").await;
    fill(&browser, "#new-name", "v2").await;
    browser.find("#bump-hello").await.click().await.unwrap();
    browser.find("#create-image").await.click().await.unwrap();
    let error = browser.text("#new-name-error").await;
    assert!(error.contains("exists"), "{error}");

    // Instances: shop-1 online with its labels, spare-1 never seen.
    browser.find("#nav-instances").await.click().await.unwrap();
    let shop1 = browser.text("#instances tr[data-instance=shop-1]").await;
    for expected in ["shop", "staging", "online", "suite=e2e", "now"] {
        assert!(shop1.contains(expected), "{expected}: {shop1}");
    }
    let spare = browser.text("#instances tr[data-instance=spare-1]").await;
    assert!(
        spare.contains("spare") && spare.contains("offline") && spare.contains("never"),
        "{spare}"
    );
    browser.screenshot("instances").await;

    // Audit: newest first, the image and the settings by alice.
    browser.find("#nav-audit").await.click().await.unwrap();
    let rows = browser.find_all("#audit tbody tr").await;
    let mut lines = Vec::new();
    for r in rows {
        lines.push(r.text().await.unwrap());
    }
    assert!(
        lines[0].contains("alice") && lines[0].contains("image.create") && lines[0].contains("v2"),
        "{lines:#?}"
    );
    let edits: Vec<_> = lines
        .iter()
        .filter(|l| l.contains("target.edit") && l.contains("target shop"))
        .collect();
    assert_eq!(edits.len(), 2, "two saves: {lines:#?}");
    assert!(
        edits[1].contains("alice") && edits[1].contains("rollout canary, strategy shadow"),
        "{lines:#?}"
    );
    assert!(
        lines.last().unwrap().contains("target.create"),
        "oldest last: {lines:#?}"
    );
    browser.screenshot("audit").await;
    browser.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_deployer_sees_no_admin_page_and_is_refused_them() {
    let (_cluster, portal, _shell, _) = setup().await;
    let admin = portal.admin();
    let browser = Browser::start(portal.http).await;
    browser.goto("/services/shop").await;
    log_in(&browser, "bob").await;
    browser.find("#tab-history").await;
    assert!(browser.find_all("#tab-settings").await.is_empty());
    assert!(browser.find_all("#nav-instances").await.is_empty());
    assert!(browser.find_all("#nav-audit").await.is_empty());
    browser.find("#nav-images").await;

    for path in ["/services/shop/settings", "/instances", "/audit"] {
        browser.goto(path).await;
        let refused = browser.wait_text("main", 20, |t| t.contains("403")).await;
        assert!(refused.contains("forbidden"), "{path}: {refused}");
    }
    browser.screenshot("settings-refused").await;

    // A settings form posted with bob's own CSRF token is refused as well.
    browser.goto("/services").await;
    browser
        .client
        .execute(
            "const f = document.createElement('form');
             f.method = 'post'; f.action = '/services/shop/settings';
             for (const [k, v] of [['csrf', document.querySelector('header input[name=csrf]').value],
                                   ['rollout', 'all'], ['canary_secs', '1'], ['parallel', '1'],
                                   ['keep_history', '1'], ['keep_rollback', '0'], ['instances', 'x-1']]) {
               const i = document.createElement('input'); i.type = 'hidden'; i.name = k; i.value = v;
               f.appendChild(i);
             }
             document.body.appendChild(f); f.submit();",
            vec![],
        )
        .await
        .unwrap();
    let refused = browser.wait_text("main", 20, |t| t.contains("403")).await;
    assert!(refused.contains("forbidden"), "{refused}");
    let stored = admin.get("/api/v1/targets/shop").await;
    assert_eq!(stored["settings"]["rollout"], "one-by-one", "{stored}");
    let audit = admin.get("/api/v1/audit").await;
    assert!(
        !audit.to_string().contains("target.edit"),
        "nothing was changed: {audit}"
    );
    browser.close().await;
}

/// The Repository pages, reached as a person would: the microservices and
/// their branches, a branch's log, a commit with its text diff, and from a
/// plan's "changes" link; a bad revision is a clear 404.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_repository_pages_show_branches_commits_and_diffs() {
    let (_cluster, portal, _shell, v2) = setup().await;
    let browser = Browser::start(portal.http).await;
    browser.goto("/repository").await;
    log_in(&browser, "bob").await;
    let row = browser
        .text("tr[data-microservice=hello][data-branch=main]")
        .await;
    assert!(row.contains("hello v2"), "{row}");
    assert!(row.contains(&v2.to_hex()[..12]), "{row}");
    browser.screenshot("repository").await;

    // The branch's log, newest first.
    browser
        .find("tr[data-branch=main] td a")
        .await
        .click()
        .await
        .unwrap();
    let log = browser
        .wait_text("#commits", 20, |t| t.contains("hello v1"))
        .await;
    assert!(
        log.find("hello v2").unwrap() < log.find("hello v1").unwrap(),
        "{log}"
    );
    let rows = browser.find_all("#commits tbody tr").await;
    assert_eq!(rows.len(), 2);
    let first = rows[1].attr("data-commit").await.unwrap().unwrap();
    assert_ne!(first, v2.to_hex());

    // v2's commit: service.toml changed, the greeting line replaced.
    browser
        .find(&format!("tr[data-commit='{}'] th a", v2.to_hex()))
        .await
        .click()
        .await
        .unwrap();
    browser.find("#commit-message").await;
    assert!(browser.text("#commit-message").await.contains("hello v2"));
    let file = browser.find("section.file[data-path='service.toml']").await;
    assert_eq!(file.attr("data-kind").await.unwrap().unwrap(), "modified");
    let removed = browser
        .text("section.file[data-path='service.toml'] tr.del")
        .await;
    let added = browser
        .text("section.file[data-path='service.toml'] tr.add")
        .await;
    assert!(removed.contains("-GREETING = \"hello v1\""), "{removed}");
    assert!(added.contains("+GREETING = \"hello v2\""), "{added}");
    assert_eq!(
        browser.text("#change-counts").await,
        "0 added, 1 modified, 0 removed."
    );
    browser.screenshot("commit").await;

    // The plan of image v1 (nothing runs yet: hello is added) links to the
    // commit it adds, which was the first: every file added.
    browser.goto("/services/shop/deployment?image=v1").await;
    let link = browser
        .find("table.plan tr[data-microservice=hello] a.changes")
        .await;
    let href = link.attr("href").await.unwrap().unwrap();
    assert_eq!(href, format!("/repository/hello/commits/{first}"));
    link.click().await.unwrap();
    browser.find("#commit-message").await;
    let mut files = Vec::new();
    for f in browser.find_all("section.file").await {
        files.push((
            f.attr("data-path").await.unwrap().unwrap(),
            f.attr("data-kind").await.unwrap().unwrap(),
        ));
    }
    let added = |p: &str| (p.to_owned(), "added".to_owned());
    assert_eq!(
        files,
        [
            added(".moltignore"),
            added("server.py"),
            added("service.toml")
        ]
    );
    assert!(
        browser
            .text("main")
            .await
            .contains("none: the first commit")
    );

    // Between any two revisions; the same tree twice is no change at all.
    browser
        .goto(&format!("/repository/hello/diff?from={first}&to=main"))
        .await;
    assert_eq!(
        browser.text("#change-counts").await,
        "0 added, 1 modified, 0 removed."
    );
    browser
        .goto("/repository/hello/diff?from=main&to=main")
        .await;
    browser.find("#no-changes").await;

    // Bad revisions and names: a clear error, not a blank page.
    browser
        .goto("/repository/hello/diff?from=no-such-branch&to=main")
        .await;
    let missing = browser.wait_text("main", 20, |t| t.contains("404")).await;
    assert!(missing.contains("no-such-branch"), "{missing}");
    browser.goto("/repository/nothing").await;
    let missing = browser.wait_text("main", 20, |t| t.contains("404")).await;
    assert!(missing.contains("nothing"), "{missing}");
    browser.goto("/repository/hello/diff?to=main").await;
    let bad = browser.wait_text("main", 20, |t| t.contains("400")).await;
    assert!(bad.contains("from"), "{bad}");
    browser.close().await;
}
