//! A real portal for the end-to-end tests, and a small client of its HTTP API.
//!
//! [`TestPortal::start`] runs a portal on 127.0.0.1 (QUIC for shells, HTTP and
//! HTTPS for the API) with its own sled store, against the cluster's
//! repository and with the cluster's revocation list; its first admin's token
//! is read from the file the portal writes. [`Api`] sends JSON requests with a
//! bearer token (or over TLS with a client certificate, or with whatever
//! headers a test adds: a session cookie, a CSRF token) and reads a
//! deployment's event stream.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::TestCluster;

/// A running portal.
pub struct TestPortal {
    /// Where shells attach (QUIC).
    pub quic: SocketAddr,
    /// The HTTP API.
    pub http: SocketAddr,
    /// The HTTPS API.
    pub https: SocketAddr,
    /// Its data directory.
    pub data: PathBuf,
    /// The portal's parts.
    pub portal: Arc<portal::Portal>,
    /// The first admin's token.
    pub admin_token: String,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl TestPortal {
    /// Starts a portal with data in `data`, on the given addresses (port 0: any).
    pub async fn start_at(
        cluster: &TestCluster,
        data: PathBuf,
        quic: SocketAddr,
        http: SocketAddr,
        runner: portal::runner::RunnerConfig,
    ) -> Self {
        let config = portal::Config {
            data: data.clone(),
            listen: quic,
            http: Some(http),
            https: Some("127.0.0.1:0".parse().expect("address")),
            names: Vec::new(),
            credentials: cluster.credentials("portal"),
            repo: cluster.repo_addr,
            revoked: Some(cluster.revocation_list()),
            runner,
        };
        let bound = portal::bind(config).await.expect("bind the portal");
        let quic = bound.local_addr().expect("QUIC address");
        let http = bound.http_addr().expect("HTTP address");
        let https = bound.https_addr().expect("HTTPS address");
        let portal = bound.portal();
        let shutdown = CancellationToken::new();
        let shutdown_task = shutdown.clone();
        let task = tokio::spawn(async move {
            bound.serve(shutdown_task).await;
        });
        let admin_token = std::fs::read_to_string(data.join(portal::ADMIN_TOKEN_FILE))
            .expect("the first admin's token")
            .trim()
            .to_owned();
        Self {
            quic,
            http,
            https,
            data,
            portal,
            admin_token,
            shutdown,
            task: Some(task),
        }
    }

    /// A portal on fresh ports with data under the cluster's directory.
    pub async fn start(cluster: &TestCluster) -> Self {
        let any = "127.0.0.1:0".parse().expect("address");
        Self::start_at(
            cluster,
            cluster.path("portal"),
            any,
            any,
            portal::runner::RunnerConfig::default(),
        )
        .await
    }

    /// The API as the first admin.
    pub fn admin(&self) -> Api {
        self.api(&self.admin_token)
    }

    /// The API with `token`.
    pub fn api(&self, token: &str) -> Api {
        Api {
            addr: self.http,
            token: Some(token.to_owned()),
            headers: Vec::new(),
            tls: None,
        }
    }

    /// The plain-HTTP API without credentials (add a cookie with
    /// [`Api::with_header`]).
    pub fn anonymous(&self) -> Api {
        Api {
            addr: self.http,
            token: None,
            headers: Vec::new(),
            tls: None,
        }
    }

    /// The HTTPS API, presenting the certificate of `creds` (and trusting
    /// the CA their `ca_pem` names), without a token.
    pub fn https_api(&self, creds: &wire::Credentials) -> Api {
        let tls = wire::endpoint::https_client_config(creds).expect("TLS client settings");
        Api {
            addr: self.https,
            token: None,
            headers: Vec::new(),
            tls: Some(Arc::new(tls)),
        }
    }

    /// Stops the portal gracefully and waits for it.
    pub async fn stop(&mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            task.await.expect("portal task");
        }
    }

    /// Kills the portal's tasks without any shutdown (as `kill -9` would leave
    /// its store: whatever it had written).
    pub async fn kill(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }
}

impl Drop for TestPortal {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A client of the portal's HTTP API.
#[derive(Debug, Clone)]
pub struct Api {
    /// The API's address.
    pub addr: SocketAddr,
    /// The bearer token, if any.
    pub token: Option<String>,
    /// Extra headers (`Origin`, a wrong `Host`, a cookie).
    pub headers: Vec<(String, String)>,
    /// TLS settings: HTTPS to `portal.molt` when given.
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

/// An answer in full: status, headers, JSON (`null` when empty).
#[derive(Debug)]
pub struct Answer {
    /// The status.
    pub status: u16,
    /// The headers.
    pub headers: hyper::HeaderMap,
    /// The body as JSON (a string when it is not JSON).
    pub body: Value,
}

impl Api {
    /// The same client with another header.
    pub fn with_header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    async fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        accept: &str,
    ) -> hyper::Response<hyper::body::Incoming> {
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        self.try_send(method, path, "application/json", body, accept)
            .await
            .expect("send the request")
    }

    /// Sends one request on a new connection; an error when the connection
    /// or the TLS handshake is refused.
    async fn try_send(
        &self,
        method: &str,
        path: &str,
        content_type: &str,
        body: String,
        accept: &str,
    ) -> Result<hyper::Response<hyper::body::Incoming>, String> {
        let stream = tokio::net::TcpStream::connect(self.addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let mut sender = match &self.tls {
            None => {
                let (sender, conn) =
                    hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                        .await
                        .map_err(|e| format!("HTTP handshake: {e}"))?;
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                sender
            }
            Some(tls) => {
                let name =
                    rustls::pki_types::ServerName::try_from("portal.molt").expect("a server name");
                let stream = tokio_rustls::TlsConnector::from(tls.clone())
                    .connect(name, stream)
                    .await
                    .map_err(|e| format!("TLS handshake: {e}"))?;
                let (sender, conn) =
                    hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                        .await
                        .map_err(|e| format!("HTTP handshake: {e}"))?;
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                sender
            }
        };
        let mut req = hyper::Request::builder().method(method).uri(path);
        if !self
            .headers
            .iter()
            .any(|(n, _)| n.eq_ignore_ascii_case("host"))
        {
            req = req.header("host", self.addr.to_string());
        }
        for (name, value) in &self.headers {
            req = req.header(name.as_str(), value.as_str());
        }
        if let Some(token) = &self.token {
            req = req.header("authorization", format!("Bearer {token}"));
        }
        let req = req
            .header("accept", accept)
            .header("content-type", content_type)
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| format!("request: {e}"))?;
        sender
            .send_request(req)
            .await
            .map_err(|e| format!("send the request: {e}"))
    }

    /// One request with any body; the whole answer, or why there was none
    /// (a refused connection or handshake).
    pub async fn try_request(
        &self,
        method: &str,
        path: &str,
        content_type: &str,
        body: String,
    ) -> Result<Answer, String> {
        let response = self
            .try_send(method, path, content_type, body, "application/json")
            .await?;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("read the body: {e}"))?
            .to_bytes();
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
        };
        Ok(Answer {
            status,
            headers,
            body,
        })
    }

    /// One JSON call, answered in full.
    pub async fn request(&self, method: &str, path: &str, body: Option<&Value>) -> Answer {
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        self.try_request(method, path, "application/json", body)
            .await
            .expect("an answer")
    }

    /// One call: the status and the JSON answer (`null` when empty).
    pub async fn call(&self, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
        let a = self.request(method, path, body).await;
        (a.status, a.body)
    }

    /// `GET path`, which must succeed.
    pub async fn get(&self, path: &str) -> Value {
        let (status, value) = self.call("GET", path, None).await;
        assert_eq!(status, 200, "GET {path}: {value}");
        value
    }

    /// `POST path body`, which must succeed (200 or 201).
    pub async fn post(&self, path: &str, body: Value) -> Value {
        let (status, value) = self.call("POST", path, Some(&body)).await;
        assert!(
            status == 200 || status == 201,
            "POST {path}: {status} {value}"
        );
        value
    }

    /// Reads a deployment's event stream (Server-Sent Events) from after
    /// `last_event_id`, until `take` events arrived or the stream ended.
    pub async fn stream_events(
        &self,
        id: u64,
        last_event_id: Option<u64>,
        take: usize,
    ) -> Vec<Value> {
        let api = match last_event_id {
            Some(n) => self.clone().with_header("last-event-id", &n.to_string()),
            None => self.clone(),
        };
        let path = format!("/api/v1/deployments/{id}/events");
        let response = api.send("GET", &path, None, "text/event-stream").await;
        assert_eq!(response.status().as_u16(), 200, "event stream");
        let mut body = response.into_body();
        let mut buf = String::new();
        let mut events = Vec::new();
        while events.len() < take {
            let Ok(Some(frame)) = tokio::time::timeout(Duration::from_secs(60), body.frame()).await
            else {
                break;
            };
            let frame = frame.expect("a frame of the event stream");
            let Some(data) = frame.data_ref() else {
                continue;
            };
            buf.push_str(&String::from_utf8_lossy(data));
            while let Some(end) = buf.find("\n\n") {
                let block: String = buf.drain(..end + 2).collect();
                let data: String = block
                    .lines()
                    .filter_map(|l| l.strip_prefix("data:"))
                    .map(|d| d.trim_start())
                    .collect();
                if !data.is_empty() {
                    events.push(serde_json::from_str(&data).expect("an event is JSON"));
                }
            }
        }
        events
    }

    /// Polls a deployment until `done` says so (at most `secs` seconds).
    pub async fn wait_deployment(
        &self,
        id: u64,
        secs: u64,
        done: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        loop {
            let d = self.get(&format!("/api/v1/deployments/{id}")).await;
            if done(&d) {
                return d;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "deployment {id} did not get there in {secs} s: {d}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// A real shell attached to a portal (no listener of its own).
pub struct TestShell {
    /// The instance.
    pub name: String,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl TestShell {
    /// Opens instance `name` (root under the cluster's directory) and attaches
    /// it to the portal at `portal`.
    pub async fn start(
        cluster: &TestCluster,
        portal: SocketAddr,
        name: &str,
        stage: wire::shell::Stage,
    ) -> Self {
        let config = shell::service::ShellConfig {
            instance: shell::instance::InstanceConfig {
                name: name.parse().expect("instance name"),
                root: cluster.path(&format!("instances/{name}")),
                public_ports: shell::instance::PublicPorts::Ephemeral,
                public_ip: shell::instance::LOOPBACK,
            },
            stage,
            repo: cluster.repo_addr,
            credentials: cluster.credentials(&format!("shell/{name}")),
            listen: None,
            portal: Some(portal),
            labels: [("suite".to_owned(), "e2e".to_owned())].into(),
            strategy: stage.default_strategy(),
        };
        let bound = shell::service::bind(config).await.expect("open the shell");
        let shutdown = CancellationToken::new();
        let shutdown_task = shutdown.clone();
        let task = tokio::spawn(async move {
            bound.serve(shutdown_task).await;
        });
        Self {
            name: name.to_owned(),
            shutdown,
            task: Some(task),
        }
    }

    /// Stops the shell and its services, and waits for it.
    pub async fn stop(&mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            task.await.expect("shell task");
        }
    }
}

impl Drop for TestShell {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Waits until the portal lists every one of `instances` online.
pub async fn wait_online(api: &Api, instances: &[&str]) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let list = api.get("/api/v1/instances").await;
        let online = |name: &str| {
            list.as_array()
                .into_iter()
                .flatten()
                .any(|i| i["name"] == name && i["online"] == true)
        };
        if instances.iter().all(|i| online(i)) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "instances {instances:?} did not come online: {list}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
