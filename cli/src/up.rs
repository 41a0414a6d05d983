//! `molt up`: a whole local cluster in one process, for trying molt.
//!
//! In a state directory (default `./molt-local`) it creates a cluster (CA,
//! certificates, molt.toml) unless one is there, then runs a repository server,
//! the portal, and three shells — `dev` (development), `staging` and `prod`
//! (production) — that attach to the portal, in this process. The portal gets
//! one target per shell, named like it. The first time, it writes the sample
//! services to `DIR/examples`, pushes them, pins image `up-1` and deploys it
//! through the portal to the staging and prod targets; a marker file records
//! that this seeding finished, so a later
//! `molt up` only brings the cluster back (each shell restarts its recorded
//! generation) and leaves what the user did since alone. Ctrl-C (or SIGTERM)
//! stops every shell, its services and the repository server.
//!
//! Fixed loopback ports by default, so the URLs stay the same between runs: the
//! repository on 7878, the portal on 7879 (shells, QUIC) and 7880 (its HTTP
//! API), shells on 7901–7903, and each service's public port plus
//! 1000 (dev), 2000 (staging) or 3000 (prod). `--ephemeral-ports` picks free
//! ports instead (tests; several clusters on one host) and rewrites molt.toml.
//!
//! With `--json` it prints one JSON object per line instead of text, each with an
//! `event`: `cluster`, `portal`, `shell`, `target`, `pushed`, `image`,
//! `deploying`, `deployed`, `ready` (with the portal's URL and every instance's
//! services and their URLs), `stopping` and `stopped`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};
use image_spec::InstanceName;
use serde_json::json;
use shell::instance::{InstanceConfig, PublicPorts};
use shell::service::{ShellConfig, Stage};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use wire::Credentials;
use wire::shell::{ShellRequest, ShellResponse};

use crate::config::{CONFIG_FILE, Loaded};
use crate::{cluster, examples, instance, repo};

/// What `molt up` needs.
pub(crate) struct UpArgs {
    /// The state directory.
    pub(crate) dir: PathBuf,
    /// Pick free ports instead of the fixed ones.
    pub(crate) ephemeral_ports: bool,
    /// One JSON object per line instead of text.
    pub(crate) json: bool,
}

/// Where `molt up` says what happens: text for people, or one JSON object a line.
#[derive(Debug, Clone, Copy)]
struct Out {
    json: bool,
}

impl Out {
    /// Prints `text`, or with `--json` the `event` with its fields.
    fn event(self, text: impl std::fmt::Display, event: &str, fields: serde_json::Value) {
        if self.json {
            emit(event, fields);
        } else {
            println!("{text}");
        }
    }
}

/// Prints one JSON line: `{"event": EVENT, ...fields}`.
fn emit(event: &str, fields: serde_json::Value) {
    let mut object = serde_json::Map::new();
    object.insert("event".into(), event.into());
    if let serde_json::Value::Object(fields) = fields {
        object.extend(fields);
    }
    println!("{}", serde_json::Value::Object(object));
}

/// One shell of the local cluster.
struct Member {
    name: &'static str,
    stage: Stage,
    listen: u16,
    offset: u16,
}

const MEMBERS: [Member; 3] = [
    Member {
        name: "dev",
        stage: Stage::Development,
        listen: 7901,
        offset: 1000,
    },
    Member {
        name: "staging",
        stage: Stage::Staging,
        listen: 7902,
        offset: 2000,
    },
    Member {
        name: "prod",
        stage: Stage::Production,
        listen: 7903,
        offset: 3000,
    },
];

/// The repository's port when ports are fixed.
const REPO_PORT: u16 = 7878;
/// The image the first run pins and deploys.
const IMAGE: &str = "up-1";
/// The targets the first run deploys to.
const DEPLOY_TO: [&str; 2] = ["staging", "prod"];
/// The portal's ports when ports are fixed: shells attach on the first (UDP),
/// the API listens over plain HTTP (for a browser) on the second and over
/// HTTPS (for the CLI, with its certificate) on the third.
const PORTAL_PORTS: (u16, u16, u16) = (7879, 7880, 7881);
/// Written once the first run has pushed, pinned and deployed.
const SEEDED: &str = "up.seeded";

/// `molt up` (see the module docs).
pub(crate) async fn up(args: UpArgs) -> Result<()> {
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("cannot create `{}`", args.dir.display()))?;
    let dir = args
        .dir
        .canonicalize()
        .with_context(|| format!("cannot resolve `{}`", args.dir.display()))?;
    let out = Out { json: args.json };
    let config_path = dir.join(CONFIG_FILE);
    let created = !config_path.exists();
    if created {
        cluster::create(&dir, "local", loopback(args.ephemeral_ports, REPO_PORT))?;
    }
    out.event(
        format_args!(
            "{} in {}",
            if created {
                "created a cluster"
            } else {
                "reusing the cluster"
            },
            dir.display()
        ),
        "cluster",
        json!({ "dir": dir, "created": created }),
    );

    let (shutdown, waiter) = crate::signals::shutdown_on_signals()?;
    let mut daemons = JoinSet::new();
    let result = run(
        &dir,
        &config_path,
        args.ephemeral_ports,
        out,
        &shutdown,
        &mut daemons,
    )
    .await;
    shutdown.cancel();
    if result.is_ok() {
        out.event(
            "stopping: services, shells, repository server",
            "stopping",
            json!({}),
        );
    }
    while daemons.join_next().await.is_some() {}
    waiter.abort();
    if result.is_ok() {
        out.event(
            format_args!("stopped; the state stays in {}", dir.display()),
            "stopped",
            json!({ "dir": dir }),
        );
    }
    result
}

/// Starts the daemons, seeds the cluster if it is new, and serves until `shutdown`.
async fn run(
    dir: &Path,
    config_path: &Path,
    ephemeral: bool,
    out: Out,
    shutdown: &CancellationToken,
    daemons: &mut JoinSet<()>,
) -> Result<()> {
    let mut loaded = Loaded::read(Some(config_path))?;
    let section = loaded.repo_server()?.clone();
    let listen = if ephemeral {
        loopback(true, 0)
    } else {
        section.listen
    };
    let credentials = Credentials::load(
        &loaded.resolve(&section.cert),
        &loaded.resolve(&section.key),
        &loaded.resolve(&loaded.config.ca),
    )
    .context("cannot load the repository server's certificate")?;
    let server = repo_server::bind(&repo_server::Config {
        data: loaded.resolve(&section.data),
        listen,
        credentials,
        revoked: section.revoked.as_ref().map(|p| loaded.resolve(p)),
    })
    .with_context(|| in_use_hint("the repository server", listen))?;
    let repo_addr = server.local_addr()?;
    daemons.spawn(server.serve(shutdown.clone()));

    let portal = start_portal(&mut loaded, ephemeral, repo_addr, shutdown, daemons).await?;
    out.event(
        format_args!(
            "portal: web and API on {} and {}, shells attach on {}",
            portal.url, portal.https, portal.quic
        ),
        "portal",
        json!({ "url": portal.url, "https": portal.https, "quic": portal.quic }),
    );

    let mut instances = BTreeMap::new();
    for m in &MEMBERS {
        out.event(
            format_args!("starting shell {} ({})", m.name, m.stage),
            "shell",
            json!({ "instance": m.name, "stage": m.stage.to_string() }),
        );
        let listen = loopback(ephemeral, m.listen);
        let config = ShellConfig {
            instance: InstanceConfig {
                name: InstanceName::new(m.name)?,
                root: dir.join("instances").join(m.name),
                public_ports: if ephemeral {
                    PublicPorts::Ephemeral
                } else {
                    PublicPorts::Offset(m.offset)
                },
                public_ip: shell::instance::LOOPBACK,
            },
            stage: m.stage,
            repo: repo_addr,
            credentials: cluster::shell_credentials(&loaded, m.name)?,
            listen: Some(listen),
            portal: Some(portal.quic),
            labels: BTreeMap::from([("cluster".to_owned(), "molt-up".to_owned())]),
            strategy: m.stage.default_strategy(),
        };
        let bound = shell::service::bind(config)
            .await
            .with_context(|| in_use_hint(&format!("the shell of `{}`", m.name), listen))?;
        instances.insert(m.name.to_owned(), bound.local_addr()?);
        let stop = shutdown.clone();
        daemons.spawn(async move {
            bound.serve(stop).await;
        });
    }
    loaded.config.repo = repo_addr;
    loaded.config.instances = instances;
    loaded.config.save(config_path, "molt up")?;
    let client = crate::portal::PortalClient::open(Some(config_path), None)?;
    admin_login(dir, &client, out).await?;
    ensure_targets(&client, out).await?;

    if !dir.join(SEEDED).exists() {
        tokio::select! {
            seeded = seed(dir, config_path, &client, out) => seeded?,
            () = shutdown.cancelled() => bail!("interrupted before the cluster was seeded; run molt up again to finish"),
        }
    }
    print_ready(dir, config_path, repo_addr, &portal.url, out).await?;
    shutdown.cancelled().await;
    Ok(())
}

/// The portal as `molt up` runs it.
struct PortalUp {
    /// Where shells attach.
    quic: SocketAddr,
    /// Its HTTP API for a browser on this machine (plain HTTP, loopback).
    url: String,
    /// Its HTTPS API, where the CLI presents its certificate.
    https: String,
}

/// Binds the portal (on the fixed ports, or free ones), records its addresses
/// and its first admin's token file in molt.toml, and serves it until `shutdown`.
async fn start_portal(
    loaded: &mut Loaded,
    ephemeral: bool,
    repo: SocketAddr,
    shutdown: &CancellationToken,
    daemons: &mut JoinSet<()>,
) -> Result<PortalUp> {
    let section = match loaded.config.portal_server.clone() {
        Some(s) => s,
        // A cluster made before the portal existed: the defaults.
        None => crate::config::PortalServerConfig {
            data: "portal".into(),
            listen: crate::config::DEFAULT_PORTAL_LISTEN,
            https: None,
            http: None,
            names: Vec::new(),
            cert: "certs/portal.crt".into(),
            key: "certs/portal.key".into(),
            revoked: None,
        },
    };
    let credentials = Credentials::load(
        &loaded.resolve(&section.cert),
        &loaded.resolve(&section.key),
        &loaded.resolve(&loaded.config.ca),
    )
    .context("cannot load the portal's certificate")?;
    let listen = loopback(ephemeral, PORTAL_PORTS.0);
    let http = loopback(ephemeral, PORTAL_PORTS.1);
    let https = loopback(ephemeral, PORTAL_PORTS.2);
    let bound = portal::bind(portal::Config {
        data: loaded.resolve(&section.data),
        listen,
        http: Some(http),
        https: Some(https),
        names: section.names.clone(),
        credentials,
        repo,
        revoked: section.revoked.as_ref().map(|p| loaded.resolve(p)),
        runner: portal::runner::RunnerConfig::default(),
    })
    .await
    .with_context(|| in_use_hint("the portal", listen))?;
    let quic = bound.local_addr()?;
    let http = bound
        .http_addr()
        .context("the portal has no HTTP listener")?;
    let https = bound
        .https_addr()
        .context("the portal has no HTTPS listener")?;
    daemons.spawn(bound.serve(shutdown.clone()));
    let up = PortalUp {
        quic,
        url: format!("http://{http}"),
        https: format!("https://{https}"),
    };
    loaded.config.portal = Some(up.https.clone());
    loaded.config.portal_token = Some(section.data.join(portal::ADMIN_TOKEN_FILE));
    loaded.config.portal_server = Some(crate::config::PortalServerConfig {
        listen: quic,
        http: Some(http),
        https: Some(https),
        ..section
    });
    Ok(up)
}

/// The file the admin's generated login password is kept in (0600).
const ADMIN_PASSWORD: &str = "admin.password";

/// Once per cluster: a generated password for the portal's `admin`, for a
/// browser's login; written 0600 to the state directory and printed this once.
async fn admin_login(dir: &Path, client: &crate::portal::PortalClient, out: Out) -> Result<()> {
    let file = dir.join(ADMIN_PASSWORD);
    if file.exists() {
        return Ok(());
    }
    let user = client
        .call("PUT", "/api/v1/users/admin/password", None)
        .await
        .context("cannot set the portal admin's password")?;
    let password = user["generated_password"]
        .as_str()
        .context("the portal generated no password")?;
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&file)
            .with_context(|| format!("cannot write `{}`", file.display()))?;
        writeln!(f, "{password}")?;
    }
    out.event(
        format_args!(
            "portal login: admin / {password}  (shown once; kept in {})",
            file.display()
        ),
        "login",
        json!({ "user": "admin", "password": password, "file": file }),
    );
    Ok(())
}

/// One target per shell, named like it, unless the portal has it already.
async fn ensure_targets(client: &crate::portal::PortalClient, out: Out) -> Result<()> {
    let existing = client.call("GET", "/api/v1/targets", None).await?;
    for m in &MEMBERS {
        let known = existing
            .as_array()
            .is_some_and(|list| list.iter().any(|t| t["name"] == m.name));
        if known {
            continue;
        }
        let body = json!({ "name": m.name, "stage": m.stage, "instances": [m.name] });
        client.call("POST", "/api/v1/targets", Some(&body)).await?;
        out.event(
            format_args!(
                "portal target {} ({}) over instance {}",
                m.name, m.stage, m.name
            ),
            "target",
            json!({ "target": m.name, "stage": m.stage, "instances": [m.name] }),
        );
    }
    Ok(())
}

/// A loopback address: the fixed port, or any free one.
fn loopback(ephemeral: bool, fixed: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], if ephemeral { 0 } else { fixed }))
}

fn in_use_hint(what: &str, addr: SocketAddr) -> String {
    if addr.port() == 0 {
        format!("cannot start {what}")
    } else {
        format!(
            "cannot start {what} on {addr} (another `molt up` or `molt repo-server`? \
             `molt up --ephemeral-ports` picks free ports)"
        )
    }
}

/// The first run's work: push the examples, pin an image, deploy it.
async fn seed(
    dir: &Path,
    config_path: &Path,
    client: &crate::portal::PortalClient,
    out: Out,
) -> Result<()> {
    examples::write_out(&dir.join("examples"))?;
    let ctx = repo::Context::open(Some(config_path), None).await?;
    let pushed = async {
        for name in examples::SERVICES {
            let d = dir.join("examples").join(name);
            let report = ctx
                .push_report(&d, "first version (molt up)", "main", !out.json)
                .await?;
            if out.json {
                emit("pushed", serde_json::to_value(&report)?);
            } else {
                repo::print_push(&report);
            }
        }
        if !ctx.has_image(IMAGE).await? {
            let set: Vec<String> = examples::SERVICES
                .iter()
                .map(|s| format!("{s}=main"))
                .collect();
            let record = ctx
                .create_image(
                    IMAGE,
                    &set,
                    None,
                    "the examples as `molt up` first pushed them".into(),
                )
                .await?;
            if out.json {
                emit("image", repo::image_json(&record));
            } else {
                repo::print_image_created(&record);
            }
        }
        anyhow::Ok(())
    }
    .await;
    ctx.close().await;
    pushed?;
    for target in DEPLOY_TO {
        out.event(
            format_args!(
                "deploying {IMAGE} to target {target} through the portal (orders and counter are built there by cargo)"
            ),
            "deploying",
            json!({ "image": IMAGE, "target": target }),
        );
        let body = json!({ "target": target, "image": IMAGE });
        let d = client
            .call("POST", "/api/v1/deployments", Some(&body))
            .await?;
        let id = d["id"]
            .as_u64()
            .context("the portal's answer has no deployment id")?;
        client
            .follow(id, |e| {
                if !out.json {
                    println!("{}", crate::portal::event_line(e));
                }
            })
            .await?;
        let d = client
            .call("GET", &format!("/api/v1/deployments/{id}"), None)
            .await?;
        if d["state"] != "succeeded" {
            bail!(
                "deployment {id} of {IMAGE} to {target} {}: {}",
                d["state"].as_str().unwrap_or("?"),
                d["failure"].as_str().unwrap_or("no reason recorded")
            );
        }
        out.event(
            format_args!("deployed {IMAGE} to {target} (deployment {id})"),
            "deployed",
            json!({ "image": IMAGE, "target": target, "deployment": d }),
        );
    }
    std::fs::write(dir.join(SEEDED), "pushed, pinned up-1 and deployed it\n")
        .with_context(|| format!("cannot write `{}`", dir.join(SEEDED).display()))
}

/// One instance of the local cluster, as the `ready` event shows it.
#[derive(Debug, serde::Serialize)]
struct ReadyInstance {
    name: &'static str,
    stage: String,
    /// The shell's command address.
    address: SocketAddr,
    image: Option<wire::shell::ImageRef>,
    generation: u64,
    /// service → port name → URL.
    services: BTreeMap<String, BTreeMap<String, String>>,
}

/// Prints every service's URL on every instance, and what to try next.
async fn print_ready(
    dir: &Path,
    config_path: &Path,
    repo_addr: SocketAddr,
    portal: &str,
    out: Out,
) -> Result<()> {
    let loaded = Loaded::read(Some(config_path))?;
    let mut ready = Vec::new();
    for m in &MEMBERS {
        let ShellResponse::Status(status) =
            instance::command(Some(config_path), m.name, ShellRequest::Status).await?
        else {
            bail!(
                "the shell of `{}` answered status with something else",
                m.name
            );
        };
        let address =
            *loaded.config.instances.get(m.name).with_context(|| {
                format!("`{}` lost instance `{}`", config_path.display(), m.name)
            })?;
        ready.push(ReadyInstance {
            name: m.name,
            stage: m.stage.to_string(),
            address,
            image: status.image,
            generation: status.generation,
            services: status
                .services
                .into_iter()
                .map(|(service, s)| {
                    let urls = s
                        .ports
                        .into_iter()
                        .map(|(port, addr)| (port, format!("http://{addr}/")))
                        .collect();
                    (service.to_string(), urls)
                })
                .collect(),
        });
    }
    let ctx = repo::Context::open(Some(config_path), None).await?;
    let names = ctx.image_names().await;
    ctx.close().await;
    let next = next_image(&names?);
    if out.json {
        emit(
            "ready",
            json!({
                "dir": dir,
                "config": config_path,
                "repository": repo_addr,
                "portal": portal,
                "instances": ready,
                "next_image": next,
            }),
        );
        return Ok(());
    }
    println!();
    println!("repository  {repo_addr}");
    println!("portal      {portal}  (API; its admin token: {})", {
        let loaded = Loaded::read(Some(config_path))?;
        loaded
            .config
            .portal_token
            .as_ref()
            .map(|p| loaded.resolve(p).display().to_string())
            .unwrap_or_default()
    });
    for i in &ready {
        let image = i.image.as_ref().map_or_else(
            || "no image".to_owned(),
            |image| format!("image {}", image.name),
        );
        println!(
            "instance    {} ({}), {image}, generation {}",
            i.name, i.stage, i.generation
        );
        if i.services.is_empty() {
            println!("  (no services yet)");
        }
        for (service, urls) in &i.services {
            for url in urls.values() {
                println!("  {:<8} {:<8} {url}", i.name, service);
            }
        }
    }
    let exe = std::env::current_exe().map_or_else(|_| "molt".into(), |p| p.display().to_string());
    let examples = dir.join("examples");
    println!(
        "\nTry next, in another terminal (molt is {exe}):\n\
         \x20 export MOLT_CONFIG={config}\n\
         \x20 $EDITOR {examples}/orders/src/main.rs     # e.g. VERSION = \"2\"\n\
         \x20 molt push {examples}/orders -m \"my change\"\n\
         \x20 molt image create {next} --from {IMAGE} --set orders=main\n\
         \x20 molt deploy {next} --target staging --plan\n\
         \x20 molt deploy {next} --target staging        # only orders is rebuilt and restarted\n\
         \x20 molt deployments                            # the portal's history\n\
         \x20 molt status --instance staging\n\
         \x20 molt logs orders --instance staging\n\
         \x20 molt rollback --target staging             # back to the deployment before\n\
         \x20 molt pull hello --instance dev           # dev instances take single services\n\
         \x20 # counter is a plugin, served inside the shell: edit VERSION in\n\
         \x20 # {examples}/counter/src/lib.rs, push, pin and deploy it the same way;\n\
         \x20 # its library is swapped in place and its hit count carries on.\n",
        config = config_path.display(),
        examples = examples.display(),
    );
    println!(
        "molt up: ready (Ctrl-C stops everything; the state stays in {})",
        dir.display()
    );
    Ok(())
}

/// The first `up-N` name no image has yet.
fn next_image(names: &[String]) -> String {
    let last = names
        .iter()
        .filter_map(|n| n.strip_prefix("up-")?.parse::<u64>().ok())
        .max()
        .unwrap_or(0);
    format!("up-{}", last + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggested_image_names_follow_the_last_one() {
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(next_image(&names(&[])), "up-1");
        assert_eq!(next_image(&names(&["up-1"])), "up-2");
        assert_eq!(
            next_image(&names(&["up-1", "up-10", "up-x", "shop-40"])),
            "up-11"
        );
    }
}
