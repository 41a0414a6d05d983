//! The portal's authentication beyond bearer tokens, against a real portal
//! (real sled in a temp dir, real HTTP and HTTPS on 127.0.0.1, certificates
//! from the cluster's real CA) and a real repository: user certificates over
//! HTTPS, certificates of another cluster, revoked certificates (portal HTTPS,
//! portal QUIC, repository QUIC), browser sessions with their cookie, CSRF
//! token, logout and end when the user changes, and slowed wrong passwords.

#![allow(clippy::unwrap_used)]

use molt_e2e::TestCluster;
use molt_e2e::portal::{Api, TestPortal};
use serde_json::{Value, json};
use wire::{Client, ClusterCa, Credentials, Identity};

const LOGIN: &str = "/api/v1/login";

/// Adds a user with a password, as the first admin.
async fn add_user(portal: &TestPortal, name: &str, grant: &str, password: &str) {
    portal
        .admin()
        .post(
            "/api/v1/users",
            json!({ "name": name, "grant": grant, "password": password }),
        )
        .await;
}

/// Logs in over `api`; the session cookie (`name=value`), the CSRF token and
/// the whole `Set-Cookie` line.
async fn login(api: &Api, user: &str, password: &str) -> (String, String, String) {
    let a = api
        .request(
            "POST",
            LOGIN,
            Some(&json!({ "user": user, "password": password })),
        )
        .await;
    assert_eq!(a.status, 200, "login of {user}: {}", a.body);
    let set = a.headers["set-cookie"].to_str().unwrap().to_owned();
    let cookie = set.split(';').next().unwrap().to_owned();
    let csrf = a.body["csrf"].as_str().unwrap().to_owned();
    (cookie, csrf, set)
}

fn code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_certificate_over_https_acts_as_that_user() {
    let cluster = TestCluster::start().await;
    let portal = TestPortal::start(&cluster).await;
    add_user(&portal, "ada", "deployer", "ada's password").await;
    // A client that connects and never starts its handshake holds up no one.
    let _silent = tokio::net::TcpStream::connect(portal.https).await.unwrap();

    // ada's certificate says admin; the portal's user ada is a deployer: the
    // lower grant wins.
    let ada = portal.https_api(&cluster.credentials("user/ada/admin"));
    let me = ada.get("/api/v1/whoami").await;
    assert_eq!(
        (&me["user"], &me["grant"], &me["via"]),
        (&json!("ada"), &json!("deployer"), &json!("certificate"))
    );
    let (status, body) = ada
        .call(
            "POST",
            "/api/v1/targets",
            Some(&json!({ "name": "dev", "stage": "development" })),
        )
        .await;
    assert_eq!(status, 403, "a deployer manages no targets: {body}");
    // The first admin's certificate, as `molt init` issues it, over HTTPS
    // with no token; the host may be `portal.molt:PORT`.
    let admin = portal
        .https_api(&cluster.credentials("user/admin/admin"))
        .with_header("host", &format!("portal.molt:{}", portal.https.port()));
    admin
        .post(
            "/api/v1/targets",
            json!({ "name": "dev", "stage": "development" }),
        )
        .await;
    let audit = portal.admin().get("/api/v1/audit").await;
    assert!(
        audit
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["who"] == "admin" && e["action"] == "target.create"),
        "{audit}"
    );

    // A certificate of a person the portal does not know.
    let (status, body) = portal
        .https_api(&cluster.credentials("user/nobody/admin"))
        .call("GET", "/api/v1/whoami", None)
        .await;
    assert_eq!(status, 401, "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("molt user add nobody"), "{message}");
    // A certificate that is not a person's.
    for identity in ["shell/dev-1", "repo-server", "portal"] {
        let (status, body) = portal
            .https_api(&cluster.credentials(identity))
            .call("GET", "/api/v1/whoami", None)
            .await;
        assert_eq!(status, 403, "{identity}: {body}");
    }
    // Plain HTTP without a token has no certificate to go by.
    let (status, _) = portal.anonymous().call("GET", "/api/v1/whoami", None).await;
    assert_eq!(status, 401);
    // A token still works over HTTPS, and wins over the certificate.
    let mut with_token = portal.https_api(&cluster.credentials("user/ada/admin"));
    with_token.token = Some(portal.admin_token.clone());
    let me = with_token.get("/api/v1/whoami").await;
    assert_eq!(
        (&me["user"], &me["via"]),
        (&json!("admin"), &json!("token"))
    );

    // A certificate of another cluster's CA is refused in the handshake.
    let other = ClusterCa::generate("elsewhere").unwrap();
    let foreign = other
        .issue(&"user/ada/admin".parse::<Identity>().unwrap())
        .unwrap();
    let foreign = Credentials {
        ca_pem: cluster.ca.cert_pem().to_owned(),
        ..foreign
    };
    let refused = portal
        .https_api(&foreign)
        .try_request("GET", "/api/v1/whoami", "application/json", String::new())
        .await;
    assert!(refused.is_err(), "another CA's certificate: {refused:?}");
    // The portal goes on serving everyone else.
    ada.get("/api/v1/whoami").await;

    // A portal needs an API listener; a plain-HTTP one only on loopback.
    let config = |http: Option<&str>, https: Option<&str>| portal::Config {
        data: cluster.path("portal-2"),
        listen: "127.0.0.1:0".parse().unwrap(),
        http: http.map(|a| a.parse().unwrap()),
        https: https.map(|a| a.parse().unwrap()),
        names: Vec::new(),
        credentials: cluster.credentials("portal"),
        repo: cluster.repo_addr,
        revoked: None,
        runner: portal::runner::RunnerConfig::default(),
    };
    assert!(matches!(
        portal::bind(config(None, None)).await,
        Err(portal::PortalError::NoListener)
    ));
    assert!(matches!(
        portal::bind(config(Some("0.0.0.0:0"), Some("127.0.0.1:0"))).await,
        Err(portal::PortalError::NotLoopback(_))
    ));

    // Shutdown completes with a TLS handshake still pending.
    let mut portal = portal;
    portal.stop().await;
    drop(_silent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_certificates_are_refused_by_the_portal_and_the_repository() {
    let cluster = TestCluster::start().await;
    let portal = TestPortal::start(&cluster).await;
    add_user(&portal, "ada", "deployer", "ada's password").await;
    let ada = cluster.credentials("user/ada/deployer");
    let repo = |creds: Credentials| {
        let addr = cluster.repo_addr;
        async move {
            let client = Client::new(&creds, addr).unwrap();
            repo_client::RepoClient::connect(&client, addr).await
        }
    };
    portal.https_api(&ada).get("/api/v1/whoami").await;
    repo(ada.clone()).await.unwrap();
    let shell = cluster.credentials("shell/dev-1");
    let quic = |creds: &Credentials| {
        let client = Client::new(creds, portal.quic).unwrap();
        async move { client.connect(portal.quic, &Identity::Portal).await }
    };
    quic(&shell).await.unwrap().close();

    cluster.revoke(&ada);
    cluster.revoke(&shell);

    let (status, body) = portal
        .https_api(&ada)
        .call("GET", "/api/v1/whoami", None)
        .await;
    assert_eq!(status, 401, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("revoked"),
        "{body}"
    );
    let refused = repo(ada.clone()).await;
    assert!(
        refused.is_err(),
        "the repository refuses a revoked certificate"
    );
    let refused = quic(&shell).await;
    assert!(
        refused.is_err(),
        "the portal's QUIC refuses a revoked shell certificate"
    );

    // Other certificates, a new one of the same person included, still work.
    let again = cluster.credentials("user/ada/deployer");
    let me = portal.https_api(&again).get("/api/v1/whoami").await;
    assert_eq!(me["user"], "ada");
    repo(again).await.unwrap();
    quic(&cluster.credentials("shell/dev-1"))
        .await
        .unwrap()
        .close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_needs_its_csrf_token_for_changes_and_ends_at_logout() {
    let cluster = TestCluster::start().await;
    let portal = TestPortal::start(&cluster).await;
    portal
        .admin()
        .call(
            "PUT",
            "/api/v1/users/admin/password",
            Some(&json!({ "password": "the admin's password" })),
        )
        .await;
    let browser = portal.anonymous();
    let (cookie, csrf, set) = login(&browser, "admin", "the admin's password").await;
    assert!(
        cookie.starts_with("molt_session=") && cookie.len() > 40,
        "{set}"
    );
    for attribute in ["HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(set.contains(attribute), "{set}");
    }
    assert!(!set.contains("Secure"), "plain HTTP: {set}");
    let session = browser.clone().with_header("cookie", &cookie);
    let me = session.get("/api/v1/whoami").await;
    assert_eq!(
        (&me["user"], &me["via"], &me["csrf"]),
        (&json!("admin"), &json!("session"), &json!(csrf))
    );

    // A change without the CSRF token is refused and changes nothing.
    let target = json!({ "name": "dev", "stage": "development" });
    let (status, body) = session.call("POST", "/api/v1/targets", Some(&target)).await;
    assert_eq!((status, code(&body)), (403, "csrf"), "{body}");
    let (status, body) = session
        .clone()
        .with_header("x-csrf-token", "not-the-token")
        .call("POST", "/api/v1/targets", Some(&target))
        .await;
    assert_eq!((status, code(&body)), (403, "csrf"), "{body}");
    assert_eq!(session.get("/api/v1/targets").await, json!([]));
    // With it, it is made.
    let with_csrf = session.clone().with_header("x-csrf-token", &csrf);
    with_csrf.post("/api/v1/targets", target).await;
    assert_eq!(session.get("/api/v1/targets").await[0]["name"], "dev");

    // A foreign origin is refused, cookie and token or not.
    let (status, body) = with_csrf
        .clone()
        .with_header("origin", "http://evil.example")
        .call("GET", "/api/v1/whoami", None)
        .await;
    assert_eq!((status, code(&body)), (403, "bad-origin"));

    // A form without the token is refused; with it, it logs out.
    let form = |body: &str| {
        let session = session.clone();
        let body = body.to_owned();
        async move {
            session
                .try_request(
                    "POST",
                    "/api/v1/logout",
                    "application/x-www-form-urlencoded",
                    body,
                )
                .await
                .unwrap()
        }
    };
    let a = form("").await;
    assert_eq!((a.status, code(&a.body)), (403, "csrf"), "{}", a.body);
    session.get("/api/v1/whoami").await;
    let a = form(&format!("x=1&csrf={csrf}")).await;
    assert_eq!(a.status, 204, "{}", a.body);
    let cleared = a.headers["set-cookie"].to_str().unwrap();
    assert!(cleared.contains("Max-Age=0"), "{cleared}");
    let (status, _) = session.call("GET", "/api/v1/whoami", None).await;
    assert_eq!(status, 401, "the session ended");

    // Over HTTPS the cookie is Secure.
    let https = portal.https_api(&cluster.credentials("user/admin/admin"));
    let (_, _, set) = login(&https, "admin", "the admin's password").await;
    assert!(set.contains("; Secure"), "{set}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_passwords_are_slowed_per_user_name() {
    let cluster = TestCluster::start().await;
    let portal = TestPortal::start(&cluster).await;
    add_user(&portal, "ada", "deployer", "ada's password").await;
    let browser = portal.anonymous();
    let attempt = |user: &str, password: &str| {
        let browser = browser.clone();
        let body = json!({ "user": user, "password": password });
        async move { browser.request("POST", LOGIN, Some(&body)).await }
    };
    let details = |a: &molt_e2e::portal::Answer| {
        let d = &a.body["error"]["details"];
        (
            d["failed_attempts"].as_u64().unwrap(),
            d["waited_ms"].as_u64().unwrap(),
            d["next_delay_ms"].as_u64().unwrap(),
        )
    };
    for n in 1..=3 {
        let a = attempt("ada", "wrong").await;
        assert_eq!((a.status, code(&a.body)), (401, "bad-login"));
        let next = if n == 3 { 500 } else { 0 };
        assert_eq!(details(&a), (n, 0, next), "{}", a.body);
    }
    let a = attempt("ada", "wrong").await;
    assert_eq!(details(&a), (4, 500, 1000), "waited before answering");
    assert_eq!(a.headers["retry-after"], "1");
    // Per name: another name (known or not) is not slowed by ada's failures.
    let a = attempt("bob", "wrong").await;
    assert_eq!(details(&a), (1, 0, 0));
    // The right password still works after the wait, and resets the count.
    let a = attempt("ada", "ada's password").await;
    assert_eq!(a.status, 200, "{}", a.body);
    let a = attempt("ada", "wrong").await;
    assert_eq!(details(&a), (1, 0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_a_user_or_changing_their_grant_ends_their_sessions() {
    let cluster = TestCluster::start().await;
    let portal = TestPortal::start(&cluster).await;
    let admin = portal.admin();
    add_user(&portal, "ada", "deployer", "ada's password").await;
    add_user(&portal, "bob", "deployer", "bob's password").await;
    let browser = portal.anonymous();
    let (ada, _, _) = login(&browser, "ada", "ada's password").await;
    let (bob, _, _) = login(&browser, "bob", "bob's password").await;
    let (bob2, _, _) = login(&browser, "bob", "bob's password").await;
    let as_ = |cookie: &str| browser.clone().with_header("cookie", cookie);
    for c in [&ada, &bob, &bob2] {
        as_(c).get("/api/v1/whoami").await;
    }

    let (status, _) = admin
        .call(
            "PATCH",
            "/api/v1/users/ada",
            Some(&json!({ "grant": "developer" })),
        )
        .await;
    assert_eq!(status, 200);
    let (status, _) = as_(&ada).call("GET", "/api/v1/whoami", None).await;
    assert_eq!(status, 401, "a new grant ends the session");
    as_(&bob).get("/api/v1/whoami").await;

    let (status, _) = admin.call("DELETE", "/api/v1/users/bob", None).await;
    assert_eq!(status, 204);
    for c in [&bob, &bob2] {
        let (status, _) = as_(c).call("GET", "/api/v1/whoami", None).await;
        assert_eq!(status, 401, "a removed user's sessions end");
    }
    // A login with the new grant works and says so.
    let (ada, _, _) = login(&browser, "ada", "ada's password").await;
    assert_eq!(as_(&ada).get("/api/v1/whoami").await["grant"], "developer");
    // Users are listed without their hashes.
    let users = admin.get("/api/v1/users").await;
    assert!(!users.to_string().contains("argon2"), "{users}");
    assert_eq!(
        users
            .as_array()
            .unwrap()
            .iter()
            .find(|u| u["name"] == "ada")
            .unwrap()["password"],
        true
    );
}
