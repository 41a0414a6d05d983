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

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};
use image_spec::InstanceName;
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
    let config_path = dir.join(CONFIG_FILE);
    if config_path.exists() {
        println!("reusing the cluster in {}", dir.display());
    } else {
        cluster::create(&dir, "local", loopback(args.ephemeral_ports, REPO_PORT))?;
        println!("created a cluster in {}", dir.display());
    }

    let (shutdown, waiter) = crate::signals::shutdown_on_signals()?;
    let mut daemons = JoinSet::new();
    let result = run(
        &dir,
        &config_path,
        args.ephemeral_ports,
        &shutdown,
        &mut daemons,
    )
    .await;
    shutdown.cancel();
    if result.is_ok() {
        println!("stopping: services, shells, repository server");
    }
    while daemons.join_next().await.is_some() {}
    waiter.abort();
    if result.is_ok() {
        println!("stopped; the state stays in {}", dir.display());
    }
    result
}

/// Starts the daemons, seeds the cluster if it is new, and serves until `shutdown`.
async fn run(
    dir: &Path,
    config_path: &Path,
    ephemeral: bool,
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
    })
    .with_context(|| in_use_hint("the repository server", listen))?;
    let repo_addr = server.local_addr()?;
    daemons.spawn(server.serve(shutdown.clone()));

    let mut instances = BTreeMap::new();
    for m in &MEMBERS {
        println!("starting shell {} ({})", m.name, m.stage);
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
            },
            stage: m.stage,
            repo: repo_addr,
            credentials: cluster::shell_credentials(&loaded, m.name)?,
            listen,
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
            seeded = seed(dir, config_path) => seeded?,
            () = shutdown.cancelled() => bail!("interrupted before the cluster was seeded; run molt up again to finish"),
        }
    }
    print_ready(dir, config_path, repo_addr).await?;
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
async fn seed(dir: &Path, config_path: &Path) -> Result<()> {
    examples::write_out(&dir.join("examples"))?;
    let ctx = repo::Context::open(Some(config_path), None).await?;
    let pushed = async {
        for name in examples::SERVICES {
            let d = dir.join("examples").join(name);
            ctx.push(&d, "first version (molt up)", "main", false)
                .await?;
        }
        if !ctx.has_image(IMAGE).await? {
            let set: Vec<String> = examples::SERVICES
                .iter()
                .map(|s| format!("{s}=main"))
                .collect();
            ctx.image_create(
                IMAGE,
                &set,
                None,
                "the examples as `molt up` first pushed them".into(),
                false,
            )
            .await?;
        }
        anyhow::Ok(())
    }
    .await;
    ctx.close().await;
    pushed?;
    for target in DEPLOY_TO {
        println!("deploying {IMAGE} to {target} (orders and counter are built there by cargo)");
        instance::deploy(Some(config_path), IMAGE, target, false, None, false).await?;
    }
    std::fs::write(dir.join(SEEDED), "pushed, pinned up-1 and deployed it\n")
        .with_context(|| format!("cannot write `{}`", dir.join(SEEDED).display()))
}

/// Prints every service's URL on every instance, and what to try next.
async fn print_ready(dir: &Path, config_path: &Path, repo_addr: SocketAddr) -> Result<()> {
    println!();
    println!("repository  {repo_addr}");
    for m in &MEMBERS {
        let ShellResponse::Status(status) =
            instance::command(Some(config_path), m.name, ShellRequest::Status).await?
        else {
            bail!(
                "the shell of `{}` answered status with something else",
                m.name
            );
        };
        let image = status.image.as_ref().map_or_else(
            || "no image".to_owned(),
            |image| format!("image {}", image.name),
        );
        println!(
            "instance    {} ({}), {image}, generation {}",
            m.name, m.stage, status.generation
        );
        if status.services.is_empty() {
            println!("  (no services yet)");
        }
        for (service, s) in &status.services {
            for addr in s.ports.values() {
                println!("  {:<8} {:<8} http://{addr}/", m.name, service.as_str());
            }
        }
    }
    let ctx = repo::Context::open(Some(config_path), None).await?;
    let names = ctx.image_names().await;
    ctx.close().await;
    let next = next_image(&names?);
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
