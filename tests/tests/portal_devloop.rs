//! The developer loop through a real portal to real shells that dialled it
//! (instances behind NAT are reached this way): a developer pulls their
//! branch onto a development target's instance, the instance view and the
//! API show the overlay (who, branch, commit, since) as drift from the
//! target's image, a watch run records its cycles in the target's history,
//! a reset brings the image back, and staging refuses pulls. The service's
//! Overview and History tabs are read in a real browser (headless chromium).

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use image_spec::{CommitId, ImageName, ServiceName};
use molt_e2e::browser::Browser;
use molt_e2e::portal::{Api, TestPortal, TestShell, wait_online};
use molt_e2e::{TestCluster, copy_example, get_once, write_file};
use repo_client::PushOptions;
use serde_json::{Value, json};
use wire::shell::Stage;

/// Pushes `hello` answering `greeting` to `branch` as `who`; its commit.
async fn push_hello(cluster: &TestCluster, who: &str, branch: &str, greeting: &str) -> CommitId {
    let repo = cluster.repo_client(who).await;
    let dir = cluster.path(&format!("src/{}", branch.replace('/', "-")));
    copy_example("hello", &dir);
    let toml = std::fs::read_to_string(dir.join("service.toml")).unwrap();
    write_file(
        &dir,
        "service.toml",
        toml.replace("hello from molt", greeting).as_bytes(),
    );
    let options = PushOptions {
        branch: branch.parse().unwrap(),
        message: greeting.into(),
    };
    repo.push(&dir, &options, |_| {}).await.unwrap().commit
}

/// What hello answers on `instance`, found through the portal's status.
async fn greeting(api: &Api, instance: &str) -> String {
    let status = api
        .get(&format!("/api/v1/instances/{instance}/status"))
        .await;
    let addr = status["status"]["services"]["hello"]["ports"]["main"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let (code, body) = get_once(addr, "/").await;
    assert_eq!(code, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    v["greeting"].as_str().unwrap().to_owned()
}

/// A user with `grant` and their API client.
async fn person(portal: &TestPortal, name: &str, grant: &str) -> Api {
    let admin = portal.admin();
    admin
        .post("/api/v1/users", json!({ "name": name, "grant": grant }))
        .await;
    let made = admin
        .post(
            "/api/v1/tokens",
            json!({ "name": "laptop", "user": name, "grant": grant }),
        )
        .await;
    portal.api(made["secret"].as_str().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn developers_pull_watch_and_reset_through_the_portal_and_overlays_show_as_drift() {
    let cluster = TestCluster::start().await;
    let base = push_hello(&cluster, "user/root/admin", "main", "from the image").await;
    let admin_repo = cluster.repo_client("user/root/admin").await;
    admin_repo
        .create_image(
            image_spec::Image::new(
                ImageName::new("base-1").unwrap(),
                String::new(),
                BTreeMap::from([(ServiceName::new("hello").unwrap(), base)]),
            )
            .unwrap(),
        )
        .await
        .unwrap();
    let portal = TestPortal::start(&cluster).await;
    let admin = portal.admin();
    for (name, stage, instance) in [("dev", "development", "dev-1"), ("stg", "staging", "stg-1")] {
        admin
            .post(
                "/api/v1/targets",
                json!({ "name": name, "stage": stage, "instances": [instance] }),
            )
            .await;
    }
    let _dev = TestShell::start(&cluster, portal.quic, "dev-1", Stage::Development).await;
    let _stg = TestShell::start(&cluster, portal.quic, "stg-1", Stage::Staging).await;
    wait_online(&admin, &["dev-1", "stg-1"]).await;
    let d = admin
        .post(
            "/api/v1/deployments",
            json!({ "target": "dev", "image": "base-1" }),
        )
        .await;
    let d = admin
        .wait_deployment(d["id"].as_u64().unwrap(), 120, |d| {
            !matches!(d["state"].as_str(), Some("queued" | "running"))
        })
        .await;
    assert_eq!(d["state"], "succeeded", "{d}");
    assert_eq!(greeting(&admin, "dev-1").await, "from the image");
    let status = admin.get("/api/v1/instances/dev-1/status").await;
    assert_eq!(status["drift"], json!({}), "{status}");
    assert_eq!(status["current_image"], "base-1", "{status}");

    // Dan, a developer, pulls his branch onto the development target.
    let dan = person(&portal, "dan", "developer").await;
    let mine = push_hello(&cluster, "user/dan/developer", "dev/dan", "dan's change").await;
    let before = portal::deployment::now_ms() / 1000 - 1;
    let pulled = dan
        .post(
            "/api/v1/targets/dev/pull",
            json!({ "service": "hello", "rev": "dev/dan" }),
        )
        .await;
    assert_eq!(pulled["ok"], true, "{pulled}");
    assert_eq!(pulled["commit"], mine.to_string(), "{pulled}");
    assert_eq!(
        pulled["instances"]["dev-1"]["summary"]["restarted"],
        json!(["hello"]),
        "{pulled}"
    );
    assert_eq!(greeting(&dan, "dev-1").await, "dan's change");

    // The API shows it as an overlay: drift from the image, who, branch, since.
    let status = dan.get("/api/v1/instances/dev-1/status").await;
    let drift = &status["drift"]["hello"];
    assert_eq!(drift["runs"], mine.to_string(), "{status}");
    assert_eq!(drift["image"], base.to_string(), "{status}");
    assert_eq!(drift["overlay"]["by"], "dan", "{status}");
    assert_eq!(drift["overlay"]["rev"], "dev/dan", "{status}");
    assert!(
        drift["overlay"]["since"].as_i64().unwrap() >= before,
        "{status}"
    );
    // And so does the instance view, in a browser.
    admin
        .post(
            "/api/v1/users",
            json!({ "name": "alice", "grant": "deployer", "password": "alice password" }),
        )
        .await;
    let browser = Browser::start(portal.http).await;
    browser.goto("/services/dev").await;
    browser
        .find("#user")
        .await
        .send_keys("alice")
        .await
        .unwrap();
    browser
        .find("#password")
        .await
        .send_keys("alice password")
        .await
        .unwrap();
    browser.find("#login").await.click().await.unwrap();
    let row = browser
        .wait_text(
            "[data-instance=dev-1] tr[data-microservice=hello]",
            20,
            |t| t.contains("overlay"),
        )
        .await;
    assert!(row.contains("overlay: dev/dan pulled by dan"), "{row}");
    assert!(row.contains("drift: the image has"), "{row}");
    browser.screenshot("overlay").await;

    // A watch run: opened, one cycle per pull naming it, ended.
    let (code, refused) = dan
        .call(
            "POST",
            "/api/v1/targets/stg/watches",
            Some(&json!({ "service": "hello", "branch": "dev/dan" })),
        )
        .await;
    assert_eq!(code, 403, "{refused}");
    let run = dan
        .post(
            "/api/v1/targets/dev/watches",
            json!({ "service": "hello", "branch": "dev/dan" }),
        )
        .await;
    let id = run["id"].as_u64().unwrap();
    let again = push_hello(&cluster, "user/dan/developer", "dev/dan", "dan's second").await;
    let cycle = dan
        .post(
            "/api/v1/targets/dev/pull",
            json!({ "service": "hello", "rev": "dev/dan", "watch": id }),
        )
        .await;
    assert_eq!(cycle["ok"], true, "{cycle}");
    assert_eq!(cycle["watch"]["cycles"], 1, "{cycle}");
    assert_eq!(cycle["watch"]["recent"][0]["commit"], again.to_string());
    assert_eq!(greeting(&dan, "dev-1").await, "dan's second");
    // Someone else's run is not theirs to add to.
    let (code, body) = admin
        .call(
            "POST",
            "/api/v1/targets/dev/pull",
            Some(&json!({ "service": "hello", "rev": "dev/dan", "watch": id })),
        )
        .await;
    assert_eq!(
        (code, body["error"]["field"].as_str()),
        (400, Some("watch")),
        "{body}"
    );
    let ended = dan
        .post(&format!("/api/v1/watches/{id}/end"), json!({}))
        .await;
    assert!(ended["ended"].as_i64().is_some(), "{ended}");
    let (code, body) = dan
        .call(
            "POST",
            "/api/v1/targets/dev/pull",
            Some(&json!({ "service": "hello", "rev": "dev/dan", "watch": id })),
        )
        .await;
    assert_eq!(code, 409, "an ended run takes no cycle: {body}");
    let runs = admin.get("/api/v1/targets/dev/watches").await;
    assert_eq!(runs.as_array().unwrap().len(), 1, "{runs}");
    assert_eq!(runs[0]["by"], "dan");
    assert_eq!(runs[0]["cycles"], 1);
    browser.goto("/services/dev/history").await;
    let listed = browser
        .text(&format!("#watches tr[data-watch='{id}']"))
        .await;
    assert!(listed.contains("dev/dan"), "{listed}");
    assert!(
        listed.contains("1 cycle,") || listed.contains("1 cycle "),
        "{listed}"
    );
    assert!(listed.contains("ended"), "{listed}");
    browser.close().await;

    // Staging takes no pulls: not from a developer, not from an admin.
    let (code, body) = dan
        .call(
            "POST",
            "/api/v1/targets/stg/pull",
            Some(&json!({ "service": "hello", "rev": "dev/dan" })),
        )
        .await;
    assert_eq!(code, 403, "{body}");
    let (code, body) = admin
        .call(
            "POST",
            "/api/v1/targets/stg/pull",
            Some(&json!({ "service": "hello", "rev": "dev/dan" })),
        )
        .await;
    assert_eq!(
        (code, body["error"]["code"].as_str()),
        (403, Some("stage")),
        "{body}"
    );
    // A revision that does not resolve is named, and nothing moves.
    let (code, body) = dan
        .call(
            "POST",
            "/api/v1/targets/dev/pull",
            Some(&json!({ "service": "hello", "rev": "dev/nobody" })),
        )
        .await;
    assert_eq!(
        (code, body["error"]["field"].as_str()),
        (400, Some("rev")),
        "{body}"
    );
    assert_eq!(greeting(&dan, "dev-1").await, "dan's second");

    // Reset brings the image back, and the overlay is gone.
    let reset = dan
        .post("/api/v1/targets/dev/reset", json!({ "service": "hello" }))
        .await;
    assert_eq!(reset["ok"], true, "{reset}");
    assert_eq!(greeting(&dan, "dev-1").await, "from the image");
    let status = dan.get("/api/v1/instances/dev-1/status").await;
    assert_eq!(status["drift"], json!({}), "{status}");
    assert_eq!(status["status"]["overlays"], json!({}), "{status}");

    // Every change is in the audit log.
    let audit = admin.get("/api/v1/audit?limit=500").await;
    for action in ["instance.pull", "instance.reset", "watch.open", "watch.end"] {
        assert!(
            audit
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["action"] == action && e["who"] == "dan"),
            "{action}: {audit}"
        );
    }
}
