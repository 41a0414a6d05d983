//! The portal commands: `molt portal` (the daemon) and the commands that go
//! through its HTTP API — targets, instances, deployments, rollback, tokens,
//! users.
//!
//! The API's address comes from `--portal-url` / `$MOLT_PORTAL_URL`, else
//! `portal` in molt.toml. Over `https://IP:PORT` the CLI dials the portal as
//! `portal.molt` (its certificate must be the cluster's portal's) and presents
//! this user's certificate, which is the credential — unless `$MOLT_TOKEN` is
//! set, then that token is sent too and wins. Over `http://IP:PORT` (loopback)
//! it sends a bearer token: `$MOLT_TOKEN`, else the file `portal_token` in
//! molt.toml names (the first admin's, which the portal writes into its data
//! directory at its first start).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use serde_json::{Value, json};
use wire::Credentials;

use crate::config::Loaded;

/// `molt portal`: serves until SIGINT or SIGTERM.
pub(crate) async fn daemon(
    config: Option<&Path>,
    repo: Option<SocketAddr>,
    data: Option<PathBuf>,
    listen: Option<SocketAddr>,
    http: Option<SocketAddr>,
    https: Option<SocketAddr>,
    runner: portal::runner::RunnerConfig,
) -> Result<()> {
    if runner.max_running == 0 {
        bail!("--max-running must be at least 1");
    }
    let loaded = Loaded::read(config)?;
    let section = loaded.portal_server()?;
    let credentials = Credentials::load(
        &loaded.resolve(&section.cert),
        &loaded.resolve(&section.key),
        &loaded.resolve(&loaded.config.ca),
    )
    .context("cannot load the portal's certificate")?;
    let config = portal::Config {
        data: data.unwrap_or_else(|| loaded.resolve(&section.data)),
        listen: listen.unwrap_or(section.listen),
        http: http.or(section.http),
        https: https.or(section.https),
        names: section.names.clone(),
        credentials,
        repo: repo.unwrap_or(loaded.config.repo),
        revoked: section.revoked.as_ref().map(|p| loaded.resolve(p)),
        runner,
    };
    let bound = portal::bind(config.clone())
        .await
        .with_context(|| format!("cannot start the portal on {}", config.listen))?;
    let (shutdown, waiter) = crate::signals::shutdown_on_signals()?;
    let api: Vec<String> = bound
        .https_addr()
        .map(|a| format!("https://{a}"))
        .into_iter()
        .chain(bound.http_addr().map(|a| format!("http://{a}")))
        .collect();
    eprintln!(
        "portal: shells attach on {} (QUIC); API on {} (data in {})",
        bound.local_addr()?,
        api.join(" and "),
        config.data.display()
    );
    bound.serve(shutdown).await;
    waiter.abort();
    eprintln!("portal stopped");
    Ok(())
}

/// A client of the portal's HTTP API.
pub(crate) struct PortalClient {
    addr: SocketAddr,
    /// TLS with this user's certificate, for an `https://` URL.
    tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    /// The bearer token, if one is sent.
    token: Option<String>,
}

/// The error the API answered with, as the CLI shows it.
#[derive(Debug, thiserror::Error)]
#[error("the portal refused ({status}): {message}")]
pub(crate) struct ApiRefused {
    /// The HTTP status.
    pub(crate) status: u16,
    /// Its message.
    pub(crate) message: String,
}

impl PortalClient {
    /// The client the configuration and environment describe.
    pub(crate) fn open(config: Option<&Path>, url: Option<&str>) -> Result<Self> {
        let loaded = Loaded::read(config)?;
        let url = match url {
            Some(u) => u.to_owned(),
            None => loaded.config.portal.clone().with_context(|| {
                format!(
                    "no portal: set `portal` in `{}`, or pass --portal-url (or $MOLT_PORTAL_URL)",
                    loaded.path.display()
                )
            })?,
        };
        let (addr, https) = parse_url(&url)?;
        let env_token = std::env::var("MOLT_TOKEN")
            .ok()
            .map(|t| t.trim().to_owned())
            .filter(|t| !t.is_empty());
        if https {
            let creds = loaded.credentials()?;
            let tls = wire::endpoint::https_client_config(&creds)
                .context("cannot make TLS settings from this user's certificate")?;
            return Ok(Self {
                addr,
                tls: Some(std::sync::Arc::new(tls)),
                token: env_token,
            });
        }
        let token = match env_token {
            Some(t) => t,
            None => {
                let file = loaded.config.portal_token.as_ref().with_context(|| {
                    format!(
                        "no API token: set $MOLT_TOKEN, or `portal_token` (a file) in `{}`",
                        loaded.path.display()
                    )
                })?;
                let path = loaded.resolve(file);
                std::fs::read_to_string(&path)
                    .with_context(|| format!("cannot read the API token in `{}`", path.display()))?
                    .trim()
                    .to_owned()
            }
        };
        Ok(Self {
            addr,
            tls: None,
            token: Some(token),
        })
    }

    async fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        accept: &str,
    ) -> Result<hyper::Response<hyper::body::Incoming>> {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let stream = tokio::net::TcpStream::connect(self.addr)
            .await
            .with_context(|| format!("cannot reach the portal at {scheme}://{}", self.addr))?;
        let (mut sender, host) = match &self.tls {
            None => {
                let (sender, conn) =
                    hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                        .await
                        .context("HTTP handshake with the portal")?;
                tokio::spawn(async move {
                    // The connection ends when the response is read; errors show there.
                    let _ = conn.await;
                });
                (sender, self.addr.to_string())
            }
            Some(tls) => {
                let name = rustls::pki_types::ServerName::try_from(PORTAL_NAME)
                    .context("the portal's server name")?;
                let stream = tokio_rustls::TlsConnector::from(tls.clone())
                    .connect(name, stream)
                    .await
                    .with_context(|| {
                        format!(
                            "TLS handshake with the portal at https://{} (is it this cluster's?)",
                            self.addr
                        )
                    })?;
                let (sender, conn) =
                    hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                        .await
                        .context("HTTP handshake with the portal")?;
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                // The name the portal always answers to, whatever address it was dialled at.
                (sender, format!("{PORTAL_NAME}:{}", self.addr.port()))
            }
        };
        let bytes = body.map(|b| b.to_string()).unwrap_or_default();
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", host);
        if let Some(token) = &self.token {
            req = req.header("authorization", format!("Bearer {token}"));
        }
        let req = req
            .header("accept", accept)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(bytes)))
            .context("building the request")?;
        sender
            .send_request(req)
            .await
            .with_context(|| format!("{method} {path} failed"))
    }

    /// One call; the JSON answer, or the API's error.
    pub(crate) async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value> {
        let response = self.send(method, path, body, "application/json").await?;
        let status = response.status();
        let bytes = response
            .into_body()
            .collect()
            .await
            .context("reading the portal's answer")?
            .to_bytes();
        if status == hyper::StatusCode::NO_CONTENT {
            return Ok(Value::Null);
        }
        let value: Value = serde_json::from_slice(&bytes)
            .with_context(|| format!("the portal's answer to {method} {path} is not JSON"))?;
        if !status.is_success() {
            let message = value["error"]["message"]
                .as_str()
                .unwrap_or("no message")
                .to_owned();
            return Err(ApiRefused {
                status: status.as_u16(),
                message,
            }
            .into());
        }
        Ok(value)
    }

    /// Follows a deployment's events, resuming after a lost connection from
    /// the last one seen, until its final state; each goes to `on_event`.
    pub(crate) async fn follow(&self, id: u64, mut on_event: impl FnMut(&Value)) -> Result<()> {
        let mut last = 0u64;
        let mut failures = 0;
        loop {
            let path = format!("/api/v1/deployments/{id}/events?after={last}");
            let ended = match self.send("GET", &path, None, "text/event-stream").await {
                Ok(response) if response.status().is_success() => {
                    read_sse(response.into_body(), &mut last, &mut on_event).await
                }
                Ok(response) => bail!(
                    "the portal refused to stream deployment {id} ({})",
                    response.status()
                ),
                Err(e) => Err(e),
            };
            match ended {
                Ok(true) => return Ok(()),
                Ok(false) => failures = 0,
                Err(e) => {
                    failures += 1;
                    if failures > 30 {
                        return Err(e.context(format!("lost the events of deployment {id}")));
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

/// Reads one SSE response; true once a final state was seen.
async fn read_sse(
    mut body: hyper::body::Incoming,
    last: &mut u64,
    on_event: &mut impl FnMut(&Value),
) -> Result<bool> {
    let mut buf = String::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.context("reading the event stream")?;
        let Some(data) = frame.data_ref() else {
            continue;
        };
        buf.push_str(&String::from_utf8_lossy(data));
        while let Some(end) = buf.find("\n\n") {
            let block: String = buf.drain(..end + 2).collect();
            let mut id = None;
            let mut payload = String::new();
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("id:") {
                    id = v.trim().parse::<u64>().ok();
                } else if let Some(v) = line.strip_prefix("data:") {
                    payload.push_str(v.strip_prefix(' ').unwrap_or(v));
                }
            }
            let (Some(id), false) = (id, payload.is_empty()) else {
                continue;
            };
            if id <= *last {
                continue;
            }
            *last = id;
            let event: Value = serde_json::from_str(&payload).context("a malformed event")?;
            on_event(&event);
            if is_final(&event) {
                return Ok(true);
            }
        }
    }
    Ok(false)
}

fn is_final(event: &Value) -> bool {
    matches!(
        event["kind"]["state"].as_str(),
        Some("succeeded" | "failed" | "rolled-back" | "cancelled")
    )
}

/// The name the CLI dials the portal under (its certificate's DNS name).
const PORTAL_NAME: &str = "portal.molt";

/// `https://IP:PORT[/]` or `http://IP:PORT[/]` → its socket address, and
/// whether it is HTTPS.
fn parse_url(url: &str) -> Result<(SocketAddr, bool)> {
    let (rest, https) = if let Some(rest) = url.strip_prefix("https://") {
        (rest, true)
    } else if let Some(rest) = url.strip_prefix("http://") {
        (rest, false)
    } else {
        bail!("the portal URL `{url}` must start with https:// or http://");
    };
    let hostport = rest.trim_end_matches('/');
    let hostport = hostport.replace("localhost:", "127.0.0.1:");
    let addr = hostport.parse().with_context(|| {
        format!("the portal URL `{url}` must be https://IP:PORT or http://IP:PORT")
    })?;
    Ok((addr, https))
}

/// A time in ms since the epoch, for people: `2026-12-02 01:30:12Z`.
fn when(ms: &Value) -> String {
    match ms.as_i64() {
        Some(ms) => {
            let t = image_spec::Timestamp::from_unix_seconds(ms / 1000).to_string();
            t.replace('T', " ")
        }
        None => "-".into(),
    }
}

/// One event of a deployment, as a line.
pub(crate) fn event_line(e: &Value) -> String {
    let instance = e["instance"]
        .as_str()
        .map(|i| format!("{i}: "))
        .unwrap_or_default();
    let kind = &e["kind"];
    let text = if let Some(s) = kind["state"].as_str() {
        format!("deployment {s}")
    } else if let Some(s) = kind["instance"].as_str() {
        format!("instance {s}")
    } else if let Some(line) = kind["log"].as_str() {
        line.to_owned()
    } else if !kind["step"].is_null() {
        match serde_json::from_value::<wire::plan::StepEvent>(kind["step"].clone()) {
            Ok(step) => step.to_string(),
            Err(_) => kind["step"].to_string(),
        }
    } else {
        kind.to_string()
    };
    format!("  {instance}{text}")
}

fn print_deployment(d: &Value) {
    println!(
        "deployment {}  {}  target {}  image {}",
        d["id"],
        d["state"].as_str().unwrap_or("?"),
        d["target"].as_str().unwrap_or("?"),
        d["image"]["name"].as_str().unwrap_or("?"),
    );
    println!(
        "  asked by {} ({}), created {}, started {}, finished {}{}",
        d["requested_by"].as_str().unwrap_or("?"),
        trigger_text(&d["trigger"]),
        when(&d["created"]),
        when(&d["started"]),
        when(&d["finished"]),
        if d["stuck"].as_bool() == Some(true) {
            "  STUCK"
        } else {
            ""
        },
    );
    if let Some(f) = d["failure"].as_str() {
        println!("  failure: {f}");
    }
    if let Some(order) = d["order"].as_array() {
        for i in order {
            let name = i.as_str().unwrap_or("?");
            let run = &d["instances"][name];
            let gens = match (
                run["generation_before"].as_u64(),
                run["generation"].as_u64(),
            ) {
                (Some(a), Some(b)) => format!("generation {a} → {b}"),
                (Some(a), None) => format!("generation {a}"),
                _ => String::new(),
            };
            let total: u64 = run["steps"]
                .as_array()
                .map(|s| s.iter().filter_map(|s| s["millis"].as_u64()).sum())
                .unwrap_or(0);
            println!(
                "  {name:<16} {:<12} {gens}{}{}",
                run["state"].as_str().unwrap_or("?"),
                if total > 0 {
                    format!(", steps {total} ms")
                } else {
                    String::new()
                },
                run["error"]
                    .as_str()
                    .map(|e| format!("  ({e})"))
                    .unwrap_or_default(),
            );
        }
    }
}

fn trigger_text(t: &Value) -> String {
    if let Some(s) = t.as_str() {
        return s.to_owned();
    }
    match t["rollback"]["of"].as_u64() {
        Some(of) => format!("rollback of {of}"),
        None => t.to_string(),
    }
}

/// `molt target …`.
pub(crate) async fn target(
    client: &PortalClient,
    command: TargetCommand,
    json: bool,
) -> Result<()> {
    let value = match command {
        TargetCommand::Create {
            name,
            stage,
            instances,
            settings,
        } => {
            let body = json!({
                "name": name, "stage": stage, "instances": instances,
                "settings": settings.to_json(),
            });
            client.call("POST", "/api/v1/targets", Some(&body)).await?
        }
        TargetCommand::Edit {
            name,
            stage,
            instances,
            settings,
        } => {
            let mut body = json!({ "settings": settings.to_json() });
            if let Some(s) = stage {
                body["stage"] = json!(s);
            }
            if let Some(i) = instances {
                body["instances"] = json!(i);
            }
            client
                .call("PUT", &format!("/api/v1/targets/{name}"), Some(&body))
                .await?
        }
        TargetCommand::Show { name } => {
            client
                .call("GET", &format!("/api/v1/targets/{name}"), None)
                .await?
        }
        TargetCommand::List => {
            let list = client.call("GET", "/api/v1/targets", None).await?;
            if json {
                println!("{list}");
            } else if list.as_array().is_none_or(|l| l.is_empty()) {
                println!(
                    "no targets yet: create one with `molt target create NAME --stage S --instances A,B`"
                );
            } else {
                println!(
                    "{:<20} {:<12} {:<24} {:<8} {:<20} QUEUED",
                    "TARGET", "STAGE", "IMAGE", "ONLINE", "LAST DEPLOYMENT"
                );
                for t in list.as_array().into_iter().flatten() {
                    print_target_row(t);
                }
            }
            return Ok(());
        }
    };
    if json {
        println!("{value}");
    } else {
        print_target(&value);
    }
    Ok(())
}

fn print_target_row(t: &Value) {
    let instances = t["instances"].as_array().cloned().unwrap_or_default();
    let online = instances
        .iter()
        .filter(|i| i["online"].as_bool() == Some(true))
        .count();
    let last = &t["last_deployment"];
    let last = if last.is_null() {
        "-".to_owned()
    } else {
        format!("{} {}", last["id"], last["state"].as_str().unwrap_or("?"))
    };
    println!(
        "{:<20} {:<12} {:<24} {:<8} {:<20} {}",
        t["name"].as_str().unwrap_or("?"),
        t["stage"].as_str().unwrap_or("?"),
        t["image"]["name"].as_str().unwrap_or("-"),
        format!("{online}/{}", instances.len()),
        last,
        t["queued"],
    );
}

fn print_target(t: &Value) {
    println!(
        "target {} ({}), image {}",
        t["name"].as_str().unwrap_or("?"),
        t["stage"].as_str().unwrap_or("?"),
        t["image"]["name"].as_str().unwrap_or("-")
    );
    let s = &t["settings"];
    println!(
        "  rollout {}, strategy {}, canary {} s, history {}, rollback to the last {}",
        s["rollout"].as_str().unwrap_or("?"),
        s["strategy"].as_str().unwrap_or("each instance's default"),
        s["canary_secs"],
        s["keep_history"],
        s["keep_rollback"],
    );
    for i in t["instances"].as_array().into_iter().flatten() {
        println!(
            "  {:<16} {:<8} image {}, generation {}",
            i["name"].as_str().unwrap_or("?"),
            if i["online"].as_bool() == Some(true) {
                "online"
            } else {
                "offline"
            },
            i["image"]["name"].as_str().unwrap_or("-"),
            i["generation"],
        );
    }
}

/// A target's settings as flags.
#[derive(Debug, Clone, Default, clap::Args)]
pub(crate) struct SettingsArgs {
    /// How deployments go across the instances: all, one-by-one or canary.
    #[arg(long)]
    pub(crate) rollout: Option<String>,
    /// in-place, shadow or shadow-full [default: each instance's].
    #[arg(long)]
    pub(crate) strategy: Option<String>,
    /// How long a canary must stay healthy before the rest follow.
    #[arg(long, value_name = "SECONDS")]
    pub(crate) canary_secs: Option<u64>,
    /// At most this many instances of a wave upgrade at once.
    #[arg(long)]
    pub(crate) parallel: Option<u32>,
    /// How many finished deployments the history keeps.
    #[arg(long)]
    pub(crate) keep_history: Option<u32>,
    /// How many earlier succeeded deployments can be rolled back to.
    #[arg(long)]
    pub(crate) keep_rollback: Option<u32>,
}

impl SettingsArgs {
    fn to_json(&self) -> Value {
        let mut v = json!({});
        if let Some(r) = &self.rollout {
            v["rollout"] = json!(r);
        }
        if let Some(s) = &self.strategy {
            v["strategy"] = json!(s);
        }
        if let Some(c) = self.canary_secs {
            v["canary_secs"] = json!(c);
        }
        if let Some(p) = self.parallel {
            v["parallel"] = json!(p);
        }
        if let Some(k) = self.keep_history {
            v["keep_history"] = json!(k);
        }
        if let Some(k) = self.keep_rollback {
            v["keep_rollback"] = json!(k);
        }
        v
    }
}

/// `molt target` subcommands.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum TargetCommand {
    /// Create a target: a name, a stage and its instances.
    Create {
        /// The target's name.
        name: String,
        /// development, quality, staging or production.
        #[arg(long)]
        stage: String,
        /// Its instances, in rollout order (comma-separated).
        #[arg(long, value_delimiter = ',')]
        instances: Vec<String>,
        #[command(flatten)]
        settings: SettingsArgs,
    },
    /// Change a target's stage, instances or settings.
    Edit {
        /// The target.
        name: String,
        /// A new stage.
        #[arg(long)]
        stage: Option<String>,
        /// Its new instances, in rollout order (comma-separated).
        #[arg(long, value_delimiter = ',')]
        instances: Option<Vec<String>>,
        #[command(flatten)]
        settings: SettingsArgs,
    },
    /// Show one target.
    Show {
        /// The target.
        name: String,
    },
    /// List the targets.
    List,
}

/// The rows of a listing to print as a table: `None` when there is nothing
/// more to print — with `--json` the listing itself was printed, and an empty
/// one printed `empty`.
fn rows(list: Value, json: bool, empty: &str) -> Option<Vec<Value>> {
    if json {
        println!("{list}");
        return None;
    }
    let list = list.as_array().cloned().unwrap_or_default();
    if list.is_empty() {
        println!("{empty}");
        return None;
    }
    Some(list)
}

/// `molt instances`.
pub(crate) async fn instances(client: &PortalClient, json: bool) -> Result<()> {
    let list = client.call("GET", "/api/v1/instances", None).await?;
    let Some(list) = rows(
        list,
        json,
        "no instance has attached yet: start a shell with `molt shell … --portal ADDR`",
    ) else {
        return Ok(());
    };
    println!(
        "{:<16} {:<16} {:<12} {:<8} {:<24} {:<4} LAST SEEN",
        "INSTANCE", "TARGET", "STAGE", "STATE", "IMAGE", "GEN"
    );
    for i in list {
        println!(
            "{:<16} {:<16} {:<12} {:<8} {:<24} {:<4} {}",
            i["name"].as_str().unwrap_or("?"),
            i["target"].as_str().unwrap_or("-"),
            i["stage"].as_str().unwrap_or("?"),
            if i["online"].as_bool() == Some(true) {
                "online"
            } else {
                "offline"
            },
            i["image"]["name"].as_str().unwrap_or("-"),
            i["generation"],
            when(&i["last_seen"]),
        );
    }
    Ok(())
}

/// What `molt deploy --target` takes.
pub(crate) struct DeployArgs {
    pub(crate) image: String,
    pub(crate) target: String,
    pub(crate) plan: bool,
    pub(crate) strategy: Option<wire::shell::Strategy>,
    pub(crate) rollout: Option<String>,
    pub(crate) only: Option<String>,
    pub(crate) no_wait: bool,
    pub(crate) skip_hooks: bool,
}

/// `molt deploy IMAGE --target T`: the plan, or a deployment followed to its end.
pub(crate) async fn deploy(client: &PortalClient, args: DeployArgs, json: bool) -> Result<()> {
    if args.plan {
        let mut path = format!("/api/v1/targets/{}/plan?image={}", args.target, args.image);
        if let Some(s) = args.strategy {
            path.push_str(&format!("&strategy={s}"));
        }
        if args.skip_hooks {
            path.push_str("&skip_hooks=true");
        }
        let plan = client.call("GET", &path, None).await?;
        if json {
            println!("{plan}");
        } else {
            print_target_plan(&plan);
        }
        return Ok(());
    }
    let mut body = json!({ "target": args.target, "image": args.image });
    if let Some(s) = args.strategy {
        body["strategy"] = json!(s);
    }
    if let Some(r) = &args.rollout {
        body["rollout"] = json!(r);
    }
    if let Some(i) = &args.only {
        body["instance"] = json!(i);
    }
    if args.skip_hooks {
        body["skip_hooks"] = json!(true);
    }
    let d = client
        .call("POST", "/api/v1/deployments", Some(&body))
        .await?;
    let id = d["id"]
        .as_u64()
        .context("the portal's answer has no deployment id")?;
    if args.no_wait {
        if json {
            println!("{d}");
        } else {
            println!("deployment {id} queued");
        }
        return Ok(());
    }
    eprintln!("deployment {id} queued; following it (Ctrl-C stops following, not the deployment)");
    follow_to_end(client, id, json).await
}

/// Follows deployment `id` to its end and prints how it ended; fails unless it succeeded.
async fn follow_to_end(client: &PortalClient, id: u64, json: bool) -> Result<()> {
    client
        .follow(id, |e| eprintln!("{}", event_line(e)))
        .await?;
    let d = client
        .call("GET", &format!("/api/v1/deployments/{id}"), None)
        .await?;
    if json {
        println!("{d}");
    } else {
        print_deployment(&d);
    }
    match d["state"].as_str() {
        Some("succeeded") => Ok(()),
        Some(state) => bail!(
            "deployment {id} {state}: {}",
            d["failure"].as_str().unwrap_or("no reason recorded")
        ),
        None => bail!("deployment {id} has no state"),
    }
}

fn print_target_plan(plan: &Value) {
    println!(
        "plan for {} on target {} (to fetch in all: {})",
        plan["image"]["name"].as_str().unwrap_or("?"),
        plan["target"].as_str().unwrap_or("?"),
        wire::plan::ByteCount(plan["fetch_bytes"].as_u64().unwrap_or(0)),
    );
    for (name, entry) in plan["instances"].as_object().into_iter().flatten() {
        if let Some(e) = entry["error"].as_str() {
            println!("  {name}: cannot plan: {e}");
            continue;
        }
        match serde_json::from_value::<wire::plan::UpgradePlan>(entry["plan"].clone()) {
            Ok(p) => crate::instance::print_plan(&format!("  {name}"), &p),
            Err(e) => println!("  {name}: unreadable plan: {e}"),
        }
    }
}

/// `molt deployments`.
pub(crate) async fn deployments(
    client: &PortalClient,
    query: &[(&str, Option<String>)],
    json: bool,
) -> Result<()> {
    let q: Vec<String> = query
        .iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={v}")))
        .collect();
    let list = client
        .call("GET", &format!("/api/v1/deployments?{}", q.join("&")), None)
        .await?;
    let Some(list) = rows(list, json, "no deployments match") else {
        return Ok(());
    };
    println!(
        "{:<6} {:<16} {:<24} {:<12} {:<12} {:<16} CREATED",
        "ID", "TARGET", "IMAGE", "STATUS", "WHO", "TRIGGER"
    );
    for d in list {
        println!(
            "{:<6} {:<16} {:<24} {:<12} {:<12} {:<16} {}",
            d["id"].as_u64().unwrap_or_default(),
            d["target"].as_str().unwrap_or("?"),
            d["image"]["name"].as_str().unwrap_or("?"),
            format!(
                "{}{}",
                d["state"].as_str().unwrap_or("?"),
                if d["stuck"].as_bool() == Some(true) {
                    "!"
                } else {
                    ""
                }
            ),
            d["requested_by"].as_str().unwrap_or("?"),
            trigger_text(&d["trigger"]),
            when(&d["created"]),
        );
    }
    Ok(())
}

/// `molt deployment show|cancel|front`.
pub(crate) async fn deployment(
    client: &PortalClient,
    command: DeploymentCommand,
    json: bool,
) -> Result<()> {
    let (d, id) = match command {
        DeploymentCommand::Show { id, follow } => {
            let id = parse_id(&id)?;
            if follow {
                return follow_to_end(client, id, json).await;
            }
            (
                client
                    .call("GET", &format!("/api/v1/deployments/{id}"), None)
                    .await?,
                id,
            )
        }
        DeploymentCommand::Cancel { id } => {
            let id = parse_id(&id)?;
            (
                client
                    .call("POST", &format!("/api/v1/deployments/{id}/cancel"), None)
                    .await?,
                id,
            )
        }
        DeploymentCommand::Front { id } => {
            let id = parse_id(&id)?;
            client
                .call("POST", &format!("/api/v1/deployments/{id}/front"), None)
                .await?;
            (
                client
                    .call("GET", &format!("/api/v1/deployments/{id}"), None)
                    .await?,
                id,
            )
        }
    };
    if json {
        println!("{d}");
        return Ok(());
    }
    print_deployment(&d);
    if d["state"].as_str() == Some("running") && d["cancel_requested"].as_bool() == Some(true) {
        println!(
            "  cancel asked: it stops before its next instance (follow: molt deployment show {id} -f)"
        );
    }
    Ok(())
}

/// `90` or `90d`: a number of days.
fn parse_days(s: &str) -> std::result::Result<u32, String> {
    s.strip_suffix('d')
        .unwrap_or(s)
        .parse()
        .map_err(|_| format!("`{s}` is not a number of days (e.g. `30d`)"))
}

fn parse_id(s: &str) -> Result<u64> {
    s.trim_start_matches('d')
        .parse()
        .with_context(|| format!("`{s}` is not a deployment id (a number)"))
}

/// `molt deployment` subcommands.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum DeploymentCommand {
    /// Show a deployment: per instance, its state, generations and time.
    Show {
        /// The deployment's id.
        id: String,
        /// Follow its events until it ends.
        #[arg(short, long)]
        follow: bool,
    },
    /// Cancel a queued deployment, or a running one before its next instance.
    Cancel {
        /// The deployment's id.
        id: String,
    },
    /// Move a queued deployment to the front of the queue (admins).
    Front {
        /// The deployment's id.
        id: String,
    },
}

/// `molt rollback --target T [--to ID]`.
pub(crate) async fn rollback(
    client: &PortalClient,
    target: &str,
    to: Option<&str>,
    no_wait: bool,
    json: bool,
) -> Result<()> {
    let mut body = json!({});
    if let Some(to) = to {
        body["to"] = json!(parse_id(to)?);
    }
    let d = client
        .call(
            "POST",
            &format!("/api/v1/targets/{target}/rollback"),
            Some(&body),
        )
        .await?;
    let id = d["id"]
        .as_u64()
        .context("the portal's answer has no deployment id")?;
    if no_wait {
        if json {
            println!("{d}");
        } else {
            println!(
                "deployment {id} queued: {} back to {}",
                target,
                d["image"]["name"].as_str().unwrap_or("?")
            );
        }
        return Ok(());
    }
    eprintln!(
        "deployment {id} queued: back to {}",
        d["image"]["name"].as_str().unwrap_or("?")
    );
    follow_to_end(client, id, json).await
}

/// `molt token` subcommands.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum TokenCommand {
    /// Create an API token for a user (admins); its secret is shown once.
    Create {
        /// What it is for (`ci`, `release-bot`).
        name: String,
        /// Whose it is: it acts as this user.
        #[arg(long)]
        user: String,
        /// developer, deployer or admin (at most the user's).
        #[arg(long)]
        grant: String,
        /// Only these targets (comma-separated) [default: every target].
        #[arg(long, value_delimiter = ',')]
        targets: Option<Vec<String>>,
        /// How long until it stops working, in days: `90` or `90d`.
        #[arg(long = "expires", value_name = "DAYS", default_value = "90d", value_parser = parse_days)]
        expires_days: u32,
    },
    /// List tokens (never their secrets).
    List,
    /// Revoke a token by its id.
    Revoke {
        /// Its id (see `molt token list`).
        id: String,
    },
}

/// `molt token …`.
pub(crate) async fn token(client: &PortalClient, command: TokenCommand, json: bool) -> Result<()> {
    match command {
        TokenCommand::Create {
            name,
            user,
            grant,
            targets,
            expires_days,
        } => {
            let body = json!({ "name": name, "user": user, "grant": grant,
                "targets": targets, "expires_days": expires_days });
            let made = client.call("POST", "/api/v1/tokens", Some(&body)).await?;
            if json {
                println!("{made}");
            } else {
                println!(
                    "token {} for {} (shown once; keep it secret):",
                    made["token"]["id"].as_str().unwrap_or("?"),
                    user
                );
                println!("{}", made["secret"].as_str().unwrap_or("?"));
            }
        }
        TokenCommand::List => {
            let list = client.call("GET", "/api/v1/tokens", None).await?;
            if json {
                println!("{list}");
                return Ok(());
            }
            println!(
                "{:<14} {:<16} {:<12} {:<10} {:<20} {:<20} STATE",
                "ID", "NAME", "USER", "GRANT", "TARGETS", "EXPIRES"
            );
            for t in list.as_array().into_iter().flatten() {
                let targets = t["targets"].as_array().map_or("all".to_owned(), |a| {
                    a.iter()
                        .filter_map(|v| v.as_str())
                        .collect::<Vec<_>>()
                        .join(",")
                });
                println!(
                    "{:<14} {:<16} {:<12} {:<10} {:<20} {:<20} {}",
                    t["id"].as_str().unwrap_or("?"),
                    t["name"].as_str().unwrap_or("?"),
                    t["user"].as_str().unwrap_or("?"),
                    t["grant"].as_str().unwrap_or("?"),
                    targets,
                    when(&t["expires"]),
                    if t["revoked"].is_null() {
                        "active"
                    } else {
                        "revoked"
                    },
                );
            }
        }
        TokenCommand::Revoke { id } => {
            let t = client
                .call("DELETE", &format!("/api/v1/tokens/{id}"), None)
                .await?;
            if json {
                println!("{t}");
            } else {
                println!("token {id} revoked");
            }
        }
    }
    Ok(())
}

/// `molt user` subcommands.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum UserCommand {
    /// Add a user (admins).
    Add {
        /// Their name.
        name: String,
        /// developer, deployer or admin.
        #[arg(long)]
        grant: String,
        /// Read their password (for browser logins) from standard input;
        /// without it, one is generated and printed once.
        #[arg(long)]
        password_stdin: bool,
    },
    /// Set a user's password for browser logins (admins); their sessions end.
    Password {
        /// Their name.
        name: String,
        /// Read the password from standard input; without it, one is
        /// generated and printed once.
        #[arg(long)]
        password_stdin: bool,
    },
    /// Change a user's grant (their sessions end).
    Grant {
        /// Their name.
        name: String,
        /// developer, deployer or admin.
        grant: String,
    },
    /// Remove a user; their tokens are revoked and their sessions end.
    Remove {
        /// Their name.
        name: String,
    },
    /// List users.
    List,
}

/// A password from standard input: its first line, without the line end.
fn read_password() -> Result<String> {
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .context("cannot read the password from standard input")?;
    let password = line.trim_end_matches(['\r', '\n']).to_owned();
    if password.is_empty() {
        bail!("no password on standard input");
    }
    Ok(password)
}

/// Prints a generated password, once (people only: `--json` carries it).
fn show_password(value: &Value, json: bool) {
    if let (Some(p), false) = (value["generated_password"].as_str(), json) {
        println!("password (shown once, keep it): {p}");
    }
}

/// `molt user …`.
pub(crate) async fn user(client: &PortalClient, command: UserCommand, json: bool) -> Result<()> {
    let value = match command {
        UserCommand::Add {
            name,
            grant,
            password_stdin,
        } => {
            let password = password_stdin.then(read_password).transpose()?;
            let value = client
                .call(
                    "POST",
                    "/api/v1/users",
                    Some(&json!({ "name": name, "grant": grant, "password": password })),
                )
                .await?;
            show_password(&value, json);
            value
        }
        UserCommand::Password {
            name,
            password_stdin,
        } => {
            let password = password_stdin.then(read_password).transpose()?;
            let value = client
                .call(
                    "PUT",
                    &format!("/api/v1/users/{name}/password"),
                    Some(&json!({ "password": password })),
                )
                .await?;
            show_password(&value, json);
            if !json {
                println!("password of {name} set; their sessions ended");
                return Ok(());
            }
            value
        }
        UserCommand::Grant { name, grant } => {
            client
                .call(
                    "PATCH",
                    &format!("/api/v1/users/{name}"),
                    Some(&json!({ "grant": grant })),
                )
                .await?
        }
        UserCommand::Remove { name } => {
            client
                .call("DELETE", &format!("/api/v1/users/{name}"), None)
                .await?;
            if !json {
                println!("user {name} removed; their tokens are revoked");
            }
            return Ok(());
        }
        UserCommand::List => client.call("GET", "/api/v1/users", None).await?,
    };
    if json {
        println!("{value}");
    } else if let Some(list) = value.as_array() {
        for u in list {
            println!(
                "{:<16} {}",
                u["name"].as_str().unwrap_or("?"),
                u["grant"].as_str().unwrap_or("?")
            );
        }
    } else {
        println!(
            "{} ({})",
            value["name"].as_str().unwrap_or("?"),
            value["grant"].as_str().unwrap_or("?")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_ids() {
        assert_eq!(parse_url("http://127.0.0.1:7880").unwrap().0.port(), 7880);
        assert_eq!(parse_url("http://localhost:7880/").unwrap().0.port(), 7880);
        assert_eq!(
            parse_url("https://127.0.0.1:7881").unwrap(),
            ("127.0.0.1:7881".parse().unwrap(), true)
        );
        assert!(!parse_url("http://127.0.0.1:7880").unwrap().1);
        assert!(parse_url("https://portal.example:443").is_err());
        assert!(parse_url("127.0.0.1:7880").is_err());
        assert_eq!(parse_id("d12").unwrap(), 12);
        assert_eq!(parse_days("30d"), Ok(30));
        assert_eq!(parse_days("7"), Ok(7));
        assert!(parse_days("7h").is_err());
        assert!(parse_id("x").is_err());
        assert!(is_final(&json!({"kind": {"state": "rolled-back"}})));
        assert!(!is_final(&json!({"kind": {"state": "running"}})));
        assert_eq!(
            event_line(&json!({"instance": "a", "kind": {"log": "hello"}})),
            "  a: hello"
        );
    }
}
