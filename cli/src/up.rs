//! `molt up`: a whole local cluster in one process, for trying molt.
//!
//! In a state directory (default `./molt-local`) it creates a cluster (CA,
//! certificates, molt.toml) unless one is there, then runs a repository server
//! and three shells — `dev` (development), `staging` and `prod` (production) —
//! in this process. The first time, it writes the sample services to
//! `DIR/examples`, pushes them, pins image `up-1` and deploys it to staging and
//! production; a marker file records that this seeding finished, so a later
//! `molt up` only brings the cluster back (each shell restarts its recorded
//! generation) and leaves what the user did since alone. Ctrl-C (or SIGTERM)
//! stops every shell, its services and the repository server.
//!
//! Fixed loopback ports by default, so the URLs stay the same between runs: the
//! repository on 7878, shells on 7901–7903, and each service's public port plus
//! 1000 (dev), 2000 (staging) or 3000 (prod). `--ephemeral-ports` picks free
//! ports instead (tests; several clusters on one host) and rewrites molt.toml.
//!
//! With `--json` it prints one JSON object per line instead of text, each with an
//! `event`: `cluster`, `shell`, `pushed`, `image`, `deploying`, `deployed`,
//! `ready` (with every instance's services and their URLs), `stopping` and
//! `stopped`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};
use image_spec::{ImageName, InstanceName};
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
/// The instances the first run deploys to.
const DEPLOY_TO: [&str; 2] = ["staging", "prod"];
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
            portal: None,
            labels: BTreeMap::new(),
            strategy: m.stage.default_strategy(),
        };
        let bound = shell::service::bind(config)
            .await
            .with_context(|| in_use_hint(&format!("the shell of `{}`", m.name), listen))?;
        instances.insert(m.name.to_owned(), bound.local_addr()?);
        daemons.spawn(bound.serve(shutdown.clone()));
    }
    loaded.config.repo = repo_addr;
    loaded.config.instances = instances;
    loaded.config.save(config_path, "molt up")?;

    if !dir.join(SEEDED).exists() {
        tokio::select! {
            seeded = seed(dir, config_path, out) => seeded?,
            () = shutdown.cancelled() => bail!("interrupted before the cluster was seeded; run molt up again to finish"),
        }
    }
    print_ready(dir, config_path, repo_addr, out).await?;
    shutdown.cancelled().await;
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
async fn seed(dir: &Path, config_path: &Path, out: Out) -> Result<()> {
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
                "deploying {IMAGE} to {target} (orders and counter are built there by cargo)"
            ),
            "deploying",
            json!({ "image": IMAGE, "instance": target }),
        );
        let upgrade = ShellRequest::Upgrade {
            image: ImageName::new(IMAGE)?,
            strategy: None,
            deployment: None,
        };
        let ShellResponse::Upgraded(summary) =
            instance::command(Some(config_path), target, upgrade).await?
        else {
            bail!("the shell of `{target}` answered a deploy with something else");
        };
        if out.json {
            emit(
                "deployed",
                json!({ "image": IMAGE, "instance": target, "summary": summary }),
            );
        } else {
            instance::print_summary(&format!("deployed {IMAGE} to {target}:"), &summary);
        }
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
                "instances": ready,
                "next_image": next,
            }),
        );
        return Ok(());
    }
    println!();
    println!("repository  {repo_addr}");
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
         \x20 molt deploy {next} --instance staging --plan\n\
         \x20 molt deploy {next} --instance staging      # only orders is rebuilt and restarted\n\
         \x20 molt status --instance staging\n\
         \x20 molt logs orders --instance staging\n\
         \x20 molt rollback --instance staging\n\
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
