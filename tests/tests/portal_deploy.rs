//! Deployments through a real portal to real shells that dialled it (real
//! QUIC, real processes): rollouts one by one and by canary, the plan shown
//! equal step for step to what ran, a failure on the second instance rolling
//! the first back, rollback to a deployment before the last with nothing
//! fetched or built, and a connection cut after the shell recorded its
//! success: the deployment still ends `succeeded` once the shell is back.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use image_spec::{CommitId, ImageName, InstanceName, ServiceName};
use molt_e2e::portal::{TestPortal, TestShell, wait_online};
use molt_e2e::{TestCluster, copy_example, push_main, write_file};
use serde_json::{Value, json};
use wire::plan::{Step, StepKind};
use wire::shell::{ShellRequest, ShellResponse, Stage};

/// Pushes a variant of `hello` and returns its commit.
async fn push_hello(
    cluster: &TestCluster,
    message: &str,
    edit: impl Fn(&str) -> String,
) -> CommitId {
    let dev = cluster.repo_client("user/ada/developer").await;
    let dir = cluster.path("src/hello");
    if !dir.exists() {
        copy_example("hello", &dir);
    }
    let original =
        std::fs::read_to_string(cluster.path("src/hello.toml.orig")).unwrap_or_else(|_| {
            let t = std::fs::read_to_string(dir.join("service.toml")).unwrap();
            std::fs::write(cluster.path("src/hello.toml.orig"), &t).unwrap();
            t
        });
    write_file(&dir, "service.toml", edit(&original).as_bytes());
    dev.push(&dir, &push_main(message), |_| {})
        .await
        .unwrap()
        .commit
}

async fn image(cluster: &TestCluster, name: &str, commit: CommitId) {
    let admin = cluster.repo_client("user/root/admin").await;
    let image = image_spec::Image::new(
        ImageName::new(name).unwrap(),
        String::new(),
        BTreeMap::from([(ServiceName::new("hello").unwrap(), commit)]),
    )
    .unwrap();
    admin.create_image(image).await.unwrap();
}

fn greeting(toml: &str, greeting: &str) -> String {
    toml.replace("hello from molt", greeting)
}

fn steps_of(run: &Value) -> Vec<Step> {
    run["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| serde_json::from_value(s["step"].clone()).unwrap())
        .collect()
}

fn planned(d: &Value, instance: &str) -> Vec<Step> {
    serde_json::from_value(d["plans"][instance]["steps"].clone()).unwrap()
}

async fn deploy(admin: &molt_e2e::portal::Api, body: Value) -> Value {
    let d = admin.post("/api/v1/deployments", body).await;
    let id = d["id"].as_u64().unwrap();
    admin
        .wait_deployment(id, 180, |d| {
            !matches!(d["state"].as_str(), Some("queued" | "running"))
        })
        .await
}

/// The image an instance runs, as its shell says.
async fn running_image(portal: &TestPortal, instance: &str) -> String {
    let name = InstanceName::new(instance).unwrap();
    match portal
        .portal
        .shells
        .call(&name, &ShellRequest::Status, |_| {})
        .await
        .unwrap()
        .unwrap()
    {
        ShellResponse::Status(s) => s.image.map(|i| i.name.to_string()).unwrap_or_default(),
        other => panic!("status answered {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rollouts_plans_failures_and_rollbacks_across_two_instances() {
    let cluster = TestCluster::start().await;
    let v1 = push_hello(&cluster, "v1", |t| t.to_owned()).await;
    let v2 = push_hello(&cluster, "v2", |t| greeting(t, "hello v2")).await;
    // Fails to start on stg-2 only; serves on stg-1.
    let bad = push_hello(&cluster, "bad", |t| {
        greeting(t, "hello bad").replace(
            r#"command = ["python3", "server.py"]"#,
            r#"command = ["sh", "-c", "if [ \"$MOLT_INSTANCE\" = stg-2 ]; then exit 3; fi; exec python3 server.py"]"#,
        )
    })
    .await;
    let v3 = push_hello(&cluster, "v3", |t| greeting(t, "hello v3")).await;
    for (name, commit) in [("v1", v1), ("v2", v2), ("bad", bad), ("v3", v3)] {
        image(&cluster, name, commit).await;
    }

    let portal = TestPortal::start(&cluster).await;
    let admin = portal.admin();
    admin
        .post(
            "/api/v1/targets",
            json!({ "name": "stg", "stage": "staging", "instances": ["stg-1", "stg-2"],
                    "settings": { "rollout": "one-by-one", "canary_secs": 1 } }),
        )
        .await;
    let _shells = [
        TestShell::start(&cluster, portal.quic, "stg-1", Stage::Staging).await,
        TestShell::start(&cluster, portal.quic, "stg-2", Stage::Staging).await,
    ];
    wait_online(&admin, &["stg-1", "stg-2"]).await;
    let instances = admin.get("/api/v1/instances").await;
    let one = instances
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == "stg-1")
        .unwrap();
    assert_eq!(
        (one["target"].as_str(), one["stage"].as_str()),
        (Some("stg"), Some("staging"))
    );
    assert_eq!(one["labels"]["suite"], "e2e");

    // The plan for the target, before anything moves.
    let plan = admin.get("/api/v1/targets/stg/plan?image=v1").await;
    assert!(plan["fetch_bytes"].as_u64().unwrap() > 0, "{plan}");
    assert_eq!(plan["changed_services"], json!(["hello"]));
    assert!(
        plan["instances"]["stg-1"]["plan"]["steps"]
            .as_array()
            .unwrap()
            .len()
            > 3
    );

    // 1. One by one: both succeed, and each ran exactly the plan it showed.
    let d1 = deploy(&admin, json!({ "target": "stg", "image": "v1" })).await;
    assert_eq!(d1["state"], "succeeded", "{d1}");
    for i in ["stg-1", "stg-2"] {
        let run = &d1["instances"][i];
        assert_eq!(run["state"], "succeeded");
        assert_eq!(
            (
                run["generation_before"].as_u64(),
                run["generation"].as_u64()
            ),
            (Some(0), Some(1))
        );
        assert_eq!(
            steps_of(run),
            planned(&d1, i),
            "{i} ran its plan step for step"
        );
        assert!(run["started"].as_i64() <= run["finished"].as_i64());
    }
    let one_by_one = [
        d1["instances"]["stg-1"]["finished"].as_i64(),
        d1["instances"]["stg-2"]["started"].as_i64(),
    ];
    assert!(
        one_by_one[0] <= one_by_one[1],
        "stg-2 started after stg-1 ended: {d1}"
    );
    assert_eq!(running_image(&portal, "stg-2").await, "v1");

    // 2. A canary: the first instance, its health watched, then the rest.
    let d2 = deploy(
        &admin,
        json!({ "target": "stg", "image": "v2", "rollout": "canary" }),
    )
    .await;
    assert_eq!(d2["state"], "succeeded", "{d2}");
    let events = admin
        .get(&format!("/api/v1/deployments/{}/events", d2["id"]))
        .await;
    let text = events.to_string();
    assert!(text.contains("canary stg-1"), "{text}");

    // 3. The second instance fails: the rollout halts and the first goes back.
    let d3 = deploy(&admin, json!({ "target": "stg", "image": "bad" })).await;
    assert_eq!(d3["state"], "rolled-back", "{d3}");
    assert_eq!(d3["instances"]["stg-1"]["state"], "rolled-back");
    assert_eq!(d3["instances"]["stg-2"]["state"], "failed");
    let failure = d3["failure"].as_str().unwrap();
    assert!(
        failure.starts_with("stg-2:") && failure.contains("rolled back stg-1"),
        "{failure}"
    );
    assert_eq!(running_image(&portal, "stg-1").await, "v2");
    assert_eq!(running_image(&portal, "stg-2").await, "v2");

    // 4. v3 goes out; then back to v1 — the deployment before the last
    //    succeeded one — with nothing fetched or built.
    // All at once, but at most one at a time by the target's setting.
    let (status, _) = admin
        .call(
            "PUT",
            "/api/v1/targets/stg",
            Some(&json!({ "settings": { "parallel": 1 } })),
        )
        .await;
    assert_eq!(status, 200);
    let d4 = deploy(
        &admin,
        json!({ "target": "stg", "image": "v3", "rollout": "all" }),
    )
    .await;
    assert_eq!(d4["state"], "succeeded", "{d4}");
    let runs = &d4["instances"];
    let (a, b) = (&runs["stg-1"], &runs["stg-2"]);
    assert!(
        a["finished"].as_i64() <= b["started"].as_i64()
            || b["finished"].as_i64() <= a["started"].as_i64(),
        "one at a time: {runs}"
    );
    let target = admin.get("/api/v1/targets/stg").await;
    assert_eq!(target["image"]["name"], "v3");
    let (status, refused) = admin
        .call(
            "POST",
            "/api/v1/targets/stg/rollback",
            Some(&json!({ "to": d3["id"] })),
        )
        .await;
    assert_eq!(
        status, 400,
        "a rolled-back deployment is no rollback target: {refused}"
    );
    let back = admin
        .post("/api/v1/targets/stg/rollback", json!({ "to": d1["id"] }))
        .await;
    assert_eq!(back["trigger"], json!({ "rollback": { "of": d1["id"] } }));
    let back = admin
        .wait_deployment(back["id"].as_u64().unwrap(), 120, |d| {
            d["state"] != "queued" && d["state"] != "running"
        })
        .await;
    assert_eq!(back["state"], "succeeded", "{back}");
    for i in ["stg-1", "stg-2"] {
        let kinds: Vec<StepKind> = steps_of(&back["instances"][i])
            .iter()
            .map(Step::kind)
            .collect();
        assert!(
            !kinds.contains(&StepKind::Fetch) && !kinds.contains(&StepKind::Build),
            "{i}: {kinds:?}"
        );
        assert_eq!(running_image(&portal, i).await, "v1");
    }
    // History, filtered.
    let rollbacks = admin
        .get("/api/v1/deployments?target=stg&trigger=rollback")
        .await;
    assert_eq!(rollbacks.as_array().unwrap().len(), 1);
    let failed = admin.get("/api/v1/deployments?status=rolled-back").await;
    assert_eq!(failed[0]["id"], d3["id"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_connection_cut_after_the_record_still_ends_succeeded() {
    let cluster = TestCluster::start().await;
    let v1 = push_hello(&cluster, "v1", |t| t.to_owned()).await;
    image(&cluster, "v1", v1).await;
    let v2 = push_hello(&cluster, "v2", |t| greeting(t, "hello v2")).await;
    image(&cluster, "v2", v2).await;
    let portal = TestPortal::start(&cluster).await;
    let admin = portal.admin();
    admin
        .post(
            "/api/v1/targets",
            json!({ "name": "prod", "stage": "production", "instances": ["prod-1"] }),
        )
        .await;
    let _shell = TestShell::start(&cluster, portal.quic, "prod-1", Stage::Production).await;
    wait_online(&admin, &["prod-1"]).await;

    for (image, cut_after) in [("v1", StepKind::Record), ("v2", StepKind::Start)] {
        // Cut the shell's connection the moment its upgrade reports the step:
        // after the record (the upgrade is done but its answer is lost), and
        // in the middle (the shell finishes it while the portal waits).
        portal
            .portal
            .shells
            .cut_after(InstanceName::new("prod-1").unwrap(), cut_after);
        let d = deploy(&admin, json!({ "target": "prod", "image": image })).await;
        assert_eq!(d["state"], "succeeded", "{d}");
        let run = &d["instances"]["prod-1"];
        assert_eq!(run["state"], "succeeded");
        assert_eq!(steps_of(run), planned(&d, "prod-1"));
        let events = admin
            .get(&format!("/api/v1/deployments/{}/events", d["id"]))
            .await;
        assert!(events.to_string().contains("lost prod-1"), "{events}");
        assert_eq!(running_image(&portal, "prod-1").await, image);
    }
    // Nothing stays running.
    assert_eq!(
        admin.get("/api/v1/deployments?status=running").await,
        json!([])
    );
}
