//! The portal's HTTP API against a real portal (real sled, real HTTP on
//! 127.0.0.1) and a real repository: authentication and authorization, JSON
//! errors that name the bad field and change nothing, the queue (FIFO, one
//! per target, cancel while queued or running), the event stream resuming
//! from `Last-Event-ID`, and the audit log. The instances here never attach,
//! so deployments wait on them: what they do with real shells is in
//! `portal_deploy.rs`.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use image_spec::{ImageName, ServiceName};
use molt_e2e::portal::TestPortal;
use molt_e2e::{TestCluster, push_main, write_service};
use serde_json::{Value, json};

/// A cluster with one pushed service and images `one`, `two`, `three`.
async fn cluster_with_images() -> TestCluster {
    let cluster = TestCluster::start().await;
    let dev = cluster.repo_client("user/ada/developer").await;
    let admin = cluster.repo_client("user/root/admin").await;
    let dir = cluster.path("src/svc");
    write_service(&dir, "svc", &[("main.py", b"print('hi')\n")]);
    let pushed = dev.push(&dir, &push_main("v1"), |_| {}).await.unwrap();
    for name in ["one", "two", "three"] {
        let image = image_spec::Image::new(
            ImageName::new(name).unwrap(),
            String::new(),
            BTreeMap::from([(ServiceName::new("svc").unwrap(), pushed.commit)]),
        )
        .unwrap();
        admin.create_image(image).await.unwrap();
    }
    cluster
}

fn error_field(v: &Value) -> Option<&str> {
    v["error"]["field"].as_str()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_call_is_authenticated_and_authorized() {
    let cluster = cluster_with_images().await;
    let portal = TestPortal::start(&cluster).await;
    let admin = portal.admin();
    admin
        .post(
            "/api/v1/targets",
            json!({ "name": "prod", "stage": "production", "instances": ["p1"] }),
        )
        .await;
    admin
        .post(
            "/api/v1/targets",
            json!({ "name": "dev", "stage": "development", "instances": ["d1"] }),
        )
        .await;

    // No credentials, or a token nobody made.
    let mut anonymous = admin.clone();
    anonymous.token = None;
    let (status, body) = anonymous.call("GET", "/api/v1/targets", None).await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["error"]["code"], "unauthenticated");
    let (status, _) = portal
        .api("molt_made-up")
        .call("GET", "/api/v1/targets", None)
        .await;
    assert_eq!(status, 401);

    // A developer may deploy to development, not to production.
    admin
        .post(
            "/api/v1/users",
            json!({ "name": "dan", "grant": "developer" }),
        )
        .await;
    let made = admin
        .post(
            "/api/v1/tokens",
            json!({ "name": "laptop", "user": "dan", "grant": "developer" }),
        )
        .await;
    let dan = portal.api(made["secret"].as_str().unwrap());
    assert_eq!(dan.get("/api/v1/whoami").await["user"], "dan");
    let (status, body) = dan
        .call(
            "POST",
            "/api/v1/deployments",
            Some(&json!({ "target": "prod", "image": "one" })),
        )
        .await;
    assert_eq!(status, 403, "{body}");
    let (status, body) = dan
        .call(
            "POST",
            "/api/v1/deployments",
            Some(&json!({ "target": "dev", "image": "one" })),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    // Nor may a developer manage users or tokens.
    let (status, _) = dan
        .call(
            "POST",
            "/api/v1/users",
            Some(&json!({ "name": "eve", "grant": "admin" })),
        )
        .await;
    assert_eq!(status, 403);
    // A token cannot carry more than its user's grant.
    let (status, body) = admin
        .call(
            "POST",
            "/api/v1/tokens",
            Some(&json!({ "name": "x", "user": "dan", "grant": "admin" })),
        )
        .await;
    assert_eq!((status, error_field(&body)), (400, Some("grant")), "{body}");

    // A deployer's token scoped to `dev` may not touch `prod`.
    admin
        .post(
            "/api/v1/users",
            json!({ "name": "ops", "grant": "deployer" }),
        )
        .await;
    let scoped = admin
        .post(
            "/api/v1/tokens",
            json!({ "name": "ci", "user": "ops", "grant": "deployer", "targets": ["dev"] }),
        )
        .await;
    let ci = portal.api(scoped["secret"].as_str().unwrap());
    let (status, body) = ci
        .call(
            "POST",
            "/api/v1/deployments",
            Some(&json!({ "target": "prod", "image": "one" })),
        )
        .await;
    assert_eq!(status, 403, "{body}");
    assert!(
        body["error"]["message"].as_str().unwrap().contains("prod"),
        "{body}"
    );

    // Revoked: refused from then on; listing shows it revoked, never a secret.
    let id = scoped["token"]["id"].as_str().unwrap();
    let (status, _) = admin
        .call("DELETE", &format!("/api/v1/tokens/{id}"), None)
        .await;
    assert_eq!(status, 200);
    let (status, _) = ci.call("GET", "/api/v1/targets", None).await;
    assert_eq!(status, 401);
    let tokens = admin.get("/api/v1/tokens").await;
    let listed = tokens
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["id"] == id)
        .unwrap();
    assert!(!listed["revoked"].is_null());
    assert!(
        tokens.to_string().find("molt_").is_none(),
        "no secret is ever listed"
    );

    // Expired: a token whose time is up is refused.
    let secret = portal::auth::new_secret().unwrap();
    let hash = portal::auth::hash_secret(&secret);
    portal
        .portal
        .store
        .put_token(portal::auth::Token {
            id: portal::api::token_id(&hash),
            name: "old".into(),
            user: "ops".parse().unwrap(),
            grant: wire::Grant::Deployer,
            targets: None,
            created: 0,
            expires: portal::deployment::now_ms() - 1,
            revoked: None,
            hash,
        })
        .await
        .unwrap();
    let (status, _) = portal
        .api(&secret)
        .call("GET", "/api/v1/targets", None)
        .await;
    assert_eq!(status, 401);

    // A removed user's tokens stop working.
    let (status, _) = admin.call("DELETE", "/api/v1/users/dan", None).await;
    assert_eq!(status, 204);
    let (status, _) = dan.call("GET", "/api/v1/targets", None).await;
    assert_eq!(status, 401);

    // A page of another site, or a rebinding name, is refused before anything runs.
    let (status, body) = admin
        .clone()
        .with_header("origin", "http://evil.example")
        .call(
            "POST",
            "/api/v1/users",
            Some(&json!({ "name": "eve", "grant": "admin" })),
        )
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (403, Some("bad-origin"))
    );
    let (status, body) = admin
        .clone()
        .with_header("host", "evil.example:80")
        .call("GET", "/api/v1/targets", None)
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (403, Some("bad-host"))
    );
    let users = admin.get("/api/v1/users").await;
    assert!(
        !users.to_string().contains("eve"),
        "refused requests change nothing"
    );
    // The portal's own origin is fine.
    let own = format!("http://{}", portal.http);
    let (status, _) = admin
        .clone()
        .with_header("origin", &own)
        .call("GET", "/api/v1/targets", None)
        .await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_named_and_changes_nothing() {
    let cluster = cluster_with_images().await;
    let portal = TestPortal::start(&cluster).await;
    let admin = portal.admin();
    let cases = [
        (json!({ "name": "x", "stage": "prod" }), "stage"),
        (json!({ "name": "Bad Name", "stage": "staging" }), "name"),
        (
            json!({ "name": "x", "stage": "staging", "instances": ["a", "a"] }),
            "instances",
        ),
        (
            json!({ "name": "x", "stage": "staging", "colour": "red" }),
            "colour",
        ),
        (
            json!({ "name": "x", "stage": "staging", "settings": { "rollout": "sideways" } }),
            "settings.rollout",
        ),
        (
            json!({ "name": "x", "stage": "staging", "settings": { "keep_history": 0 } }),
            "settings.keep_history",
        ),
    ];
    for (body, field) in cases {
        let (status, answer) = admin.call("POST", "/api/v1/targets", Some(&body)).await;
        assert_eq!(status, 400, "{body} → {answer}");
        let named = error_field(&answer).unwrap_or_default();
        assert!(
            named.contains(field) || answer["error"]["message"].as_str().unwrap().contains(field),
            "{body}: expected the field `{field}` named, got {answer}"
        );
    }
    assert_eq!(admin.get("/api/v1/targets").await, json!([]));

    admin
        .post(
            "/api/v1/targets",
            json!({ "name": "a", "stage": "staging", "instances": ["i1"] }),
        )
        .await;
    // An instance belongs to one target.
    let (status, body) = admin
        .call(
            "POST",
            "/api/v1/targets",
            Some(&json!({ "name": "b", "stage": "staging", "instances": ["i1"] })),
        )
        .await;
    assert_eq!(
        (status, error_field(&body)),
        (409, Some("instances")),
        "{body}"
    );
    // Deployments: an unknown image or target, a stranger instance, a bad id.
    let bad = [
        (json!({ "target": "a", "image": "nope" }), 404, "image"),
        (json!({ "target": "zz", "image": "one" }), 404, "target"),
        (
            json!({ "target": "a", "image": "one", "instance": "i9" }),
            400,
            "instance",
        ),
        (
            json!({ "target": "a", "image": "one", "strategy": "yolo" }),
            400,
            "strategy",
        ),
    ];
    for (body, code, field) in bad {
        let (status, answer) = admin.call("POST", "/api/v1/deployments", Some(&body)).await;
        assert_eq!(
            (status, error_field(&answer)),
            (code, Some(field)),
            "{body} → {answer}"
        );
    }
    assert_eq!(admin.get("/api/v1/deployments").await, json!([]));
    let (status, body) = admin.call("GET", "/api/v1/deployments/nope", None).await;
    assert_eq!((status, error_field(&body)), (400, Some("id")));
    let (status, body) = admin
        .call("GET", "/api/v1/deployments?status=done", None)
        .await;
    assert_eq!((status, error_field(&body)), (400, Some("status")));
    let (status, _) = admin.call("GET", "/api/v1/no-such-thing", None).await;
    assert_eq!(status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queue_is_fifo_per_target_and_cancellable() {
    let cluster = cluster_with_images().await;
    let portal = TestPortal::start(&cluster).await;
    let admin = portal.admin();
    // Its instance never attaches: the first deployment waits on it, running.
    admin
        .post(
            "/api/v1/targets",
            json!({ "name": "t", "stage": "staging", "instances": ["gone-1"] }),
        )
        .await;
    let mut ids = Vec::new();
    for image in ["one", "two", "three"] {
        let d = admin
            .post(
                "/api/v1/deployments",
                json!({ "target": "t", "image": image }),
            )
            .await;
        ids.push(d["id"].as_u64().unwrap());
    }
    let first = admin
        .wait_deployment(ids[0], 10, |d| d["state"] == "running")
        .await;
    assert_eq!(first["requested_by"], "admin");
    let queued = admin
        .get("/api/v1/deployments?target=t&status=queued")
        .await;
    let queued: Vec<u64> = queued
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_u64().unwrap())
        .collect();
    assert_eq!(
        queued,
        vec![ids[2], ids[1]],
        "newest first; both wait behind the first"
    );
    let target = admin.get("/api/v1/targets/t").await;
    assert_eq!(target["queued"], 2);
    assert_eq!(target["instances"][0]["online"], false);

    // A queued one is cancelled at once and never runs.
    let cancelled = admin
        .post(&format!("/api/v1/deployments/{}/cancel", ids[1]), json!({}))
        .await;
    assert_eq!(cancelled["state"], "cancelled");
    // The running one (waiting on its offline instance) is cancelled between
    // instances: it ends `cancelled`, and the next in line runs.
    admin
        .post(&format!("/api/v1/deployments/{}/cancel", ids[0]), json!({}))
        .await;
    let ended = admin
        .wait_deployment(ids[0], 20, |d| d["state"] != "running")
        .await;
    assert_eq!(ended["state"], "cancelled", "{ended}");
    assert_eq!(ended["instances"]["gone-1"]["state"], "skipped");
    admin
        .wait_deployment(ids[2], 10, |d| d["state"] == "running")
        .await;
    assert_eq!(
        admin.get(&format!("/api/v1/deployments/{}", ids[1])).await["state"],
        "cancelled",
        "a cancelled deployment stays cancelled"
    );
    // Finished ones cannot be cancelled again.
    let (status, _) = admin
        .call(
            "POST",
            &format!("/api/v1/deployments/{}/cancel", ids[0]),
            None,
        )
        .await;
    assert_eq!(status, 409);

    // The event stream: all of deployment 0's events, then again resuming
    // after the second one: nothing lost, nothing repeated.
    let all = admin.stream_events(ids[0], None, usize::MAX).await;
    let seqs: Vec<u64> = all.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert!(
        seqs.len() >= 4,
        "queued, running, a note, cancelled: {all:?}"
    );
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
    assert_eq!(all.last().unwrap()["kind"]["state"], "cancelled");
    let resumed = admin.stream_events(ids[0], Some(2), usize::MAX).await;
    assert_eq!(resumed, all[2..].to_vec());
    // The page's own stream, asked after the last event of a finished
    // deployment (a page that loaded as it ended): the final view once more,
    // then `end`, which closes it — no 204 for a client to keep retrying.
    let last = all.last().unwrap()["seq"].as_u64().unwrap();
    let live = admin
        .request(
            "GET",
            &format!("/deployments/{}/live?after={last}", ids[0]),
            None,
        )
        .await;
    assert_eq!(live.status, 200);
    let text = live.body.as_str().unwrap_or_default();
    assert!(
        text.contains("event: line") && text.contains(&format!("id: {last}")),
        "{text}"
    );
    assert!(text.trim_end().ends_with("event: end\ndata: end"), "{text}");
    assert!(
        text.contains("cancelled"),
        "the final state is shown: {text}"
    );

    // The History page's time range: days in UTC, the last one included.
    let history = |query: &str| {
        let admin = admin.clone();
        let path = format!("/services/t/history?{query}");
        async move { admin.request("GET", &path, None).await }
    };
    let today = {
        let secs = portal::deployment::now_ms() / 1000;
        image_spec::Timestamp::from_unix_seconds(secs).to_string()[..10].to_owned()
    };
    let page = history(&format!("from={today}&to={today}")).await;
    assert_eq!(page.status, 200);
    assert!(
        page.body.as_str().unwrap().contains("id=\"history\""),
        "today's deployments are listed"
    );
    for query in ["from=2999-01-01", "to=2000-01-01"] {
        let page = history(query).await;
        assert_eq!(page.status, 200, "{query}");
        assert!(
            page.body
                .as_str()
                .unwrap()
                .contains("No deployment matches"),
            "{query}"
        );
    }
    assert_eq!(history("from=yesterday").await.status, 400);

    // The audit log holds every change, with who made it.
    let audit = admin.get("/api/v1/audit").await;
    let actions: Vec<&str> = audit
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        [
            "target.create",
            "deployment.create",
            "deployment.create",
            "deployment.create",
            "deployment.cancel",
            "deployment.cancel"
        ]
    );
    assert!(
        audit
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["who"] == "admin")
    );
    // Details are plain words a person reads, not program structures.
    for e in audit.as_array().unwrap() {
        let detail = e["detail"].as_str().unwrap();
        assert!(
            !detail.contains('{') && !detail.contains("Some(") && !detail.contains('['),
            "{detail}"
        );
    }
    assert!(
        audit[1]["detail"]
            .as_str()
            .unwrap()
            .starts_with("target t, image "),
        "{}",
        audit[1]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_moves_a_queued_deployment_to_the_front() {
    let cluster = cluster_with_images().await;
    let portal = TestPortal::start(&cluster).await;
    let admin = portal.admin();
    admin
        .post(
            "/api/v1/targets",
            json!({ "name": "t", "stage": "staging", "instances": ["gone-1"] }),
        )
        .await;
    let mut ids = Vec::new();
    for image in ["one", "two", "three"] {
        let d = admin
            .post(
                "/api/v1/deployments",
                json!({ "target": "t", "image": image }),
            )
            .await;
        ids.push(d["id"].as_u64().unwrap());
    }
    admin
        .wait_deployment(ids[0], 10, |d| d["state"] == "running")
        .await;
    let queue = admin
        .post(&format!("/api/v1/deployments/{}/front", ids[2]), json!({}))
        .await;
    let order: Vec<u64> = queue
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_u64().unwrap())
        .collect();
    assert_eq!(order, vec![ids[2], ids[1]]);
    admin
        .post(&format!("/api/v1/deployments/{}/cancel", ids[0]), json!({}))
        .await;
    admin
        .wait_deployment(ids[2], 20, |d| d["state"] == "running")
        .await;
    assert_eq!(
        admin.get(&format!("/api/v1/deployments/{}", ids[1])).await["state"],
        "queued"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_are_made_on_a_persons_behalf_and_ref_moves_are_followed() {
    let cluster = cluster_with_images().await;
    let portal = TestPortal::start(&cluster).await;
    let admin = portal.admin();
    admin
        .post(
            "/api/v1/users",
            json!({ "name": "dan", "grant": "developer" }),
        )
        .await;
    let made = admin
        .post(
            "/api/v1/tokens",
            json!({ "name": "laptop", "user": "dan", "grant": "developer" }),
        )
        .await;
    let dan = portal.api(made["secret"].as_str().unwrap());

    // "New image from this one": dan is its author; the portal made the request.
    let four = dan
        .post(
            "/api/v1/images",
            json!({ "name": "four", "from": "one", "set": { "svc": "main" }, "description": "bump" }),
        )
        .await;
    assert_eq!(four["created"]["author"], "dan", "{four}");
    assert_eq!(four["created"]["by"], "portal");
    let one = admin.get("/api/v1/images/one").await;
    assert_eq!(four["services"], one["services"]);
    assert_eq!(
        admin.get("/api/v1/images/four").await["description"],
        "bump"
    );

    // Bad input is named and creates nothing.
    for (body, status, field) in [
        (json!({ "name": "five", "from": "nope" }), 404, "from"),
        (
            json!({ "name": "five", "set": { "svc": "no-such-branch" } }),
            404,
            "set.svc",
        ),
        (
            json!({ "name": "five", "set": { "Bad": "main" } }),
            400,
            "set",
        ),
        (json!({ "name": "four", "from": "one" }), 409, ""),
    ] {
        let (got, answer) = dan.call("POST", "/api/v1/images", Some(&body)).await;
        assert_eq!(got, status, "{body} → {answer}");
        if !field.is_empty() {
            assert!(
                answer["error"]["field"]
                    .as_str()
                    .unwrap_or_default()
                    .starts_with(field),
                "{body} → {answer}"
            );
        }
    }
    let (status, _) = admin.call("GET", "/api/v1/images/five", None).await;
    assert_eq!(status, 404);

    // The portal follows the repository's ref log: the push, the three images
    // made directly, and the one made through the portal, in order.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    let refs = loop {
        let refs = admin.get("/api/v1/refs").await;
        if refs.as_array().unwrap().len() >= 5 {
            break refs;
        }
        assert!(tokio::time::Instant::now() < deadline, "{refs}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    let refs = refs.as_array().unwrap();
    let seqs: Vec<u64> = refs.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=refs.len() as u64).collect::<Vec<_>>());
    assert!(
        refs[0]["change"]["branch_moved"].is_object()
            || refs[0]["change"].to_string().contains("svc")
    );
    let last = refs.last().unwrap().to_string();
    assert!(last.contains("four") && last.contains("dan"), "{last}");
    let after = admin.get(&format!("/api/v1/refs?after={}", seqs[3])).await;
    assert_eq!(after.as_array().unwrap().len(), refs.len() - 4);
    // The portal's audit log names the image too.
    let audit = admin.get("/api/v1/audit").await.to_string();
    assert!(
        audit.contains("image.create") && audit.contains("image four"),
        "{audit}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deployment_without_progress_is_marked_stuck_and_can_be_cancelled() {
    let cluster = cluster_with_images().await;
    let any = "127.0.0.1:0".parse().unwrap();
    let runner = portal::runner::RunnerConfig {
        max_running: 4,
        stuck_after: std::time::Duration::from_millis(300),
    };
    let portal = TestPortal::start_at(&cluster, cluster.path("portal"), any, any, runner).await;
    let admin = portal.admin();
    admin
        .post(
            "/api/v1/targets",
            json!({ "name": "t", "stage": "quality", "instances": ["never"] }),
        )
        .await;
    let d = admin
        .post(
            "/api/v1/deployments",
            json!({ "target": "t", "image": "one" }),
        )
        .await;
    let id = d["id"].as_u64().unwrap();
    let stuck = admin.wait_deployment(id, 30, |d| d["stuck"] == true).await;
    assert_eq!(
        stuck["state"], "running",
        "stuck is a flag on a running deployment"
    );
    let events = admin.get(&format!("/api/v1/deployments/{id}/events")).await;
    assert!(
        events.to_string().contains("stuck: no progress"),
        "{events}"
    );
    admin
        .post(&format!("/api/v1/deployments/{id}/cancel"), json!({}))
        .await;
    let ended = admin
        .wait_deployment(id, 30, |d| d["state"] != "running")
        .await;
    assert_eq!(
        (ended["state"].as_str(), ended["stuck"].as_bool()),
        (Some("cancelled"), Some(false))
    );
}
