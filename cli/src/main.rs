//! `molt`: every user-facing command, and the daemons.
//!
//! Thin by design: each command parses its arguments, loads `molt.toml`
//! ([`config`]) and calls a library (`repo-server`, `wire`, `image-spec`).

mod cluster;
mod config;
mod devloop;
mod examples;
mod instance;
mod locate;
mod portal;
mod repo;
mod signals;
mod takeover;
mod up;
mod watch;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// molt ships microservices to running instances and swaps them in with zero downtime.
#[derive(Debug, Parser)]
#[command(name = "molt", version, about)]
struct Cli {
    /// The client configuration file [default: ./molt.toml, else ./molt-local/molt.toml]
    #[arg(long, global = true, env = "MOLT_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// The repository server's address, overriding `repo` in the configuration.
    #[arg(long, global = true, env = "MOLT_REPO", value_name = "ADDR")]
    repo: Option<SocketAddr>,
    /// The portal's HTTP API (`http://IP:PORT`), overriding `portal` in the
    /// configuration.
    #[arg(long, global = true, env = "MOLT_PORTAL_URL", value_name = "URL")]
    portal_url: Option<String>,
    /// Print one JSON document instead of text (`molt up`, `molt logs`: one a
    /// line); a failure is a JSON document too: `{"error": …, "causes": […]}`.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a whole local cluster (repository + 3 instances) with the examples deployed.
    Up {
        /// The state directory (created if missing, reused if it holds a cluster).
        #[arg(long, default_value = config::UP_DIR)]
        dir: PathBuf,
        /// Pick free ports instead of the fixed ones (see them in the output).
        #[arg(long)]
        ephemeral_ports: bool,
    },
    /// Create a local cluster's CA and certificates, and its molt.toml.
    Init {
        /// Where to write molt.toml and certs/ [default: .]
        #[arg(default_value = ".")]
        dir: PathBuf,
        /// The cluster's name, written into its CA certificate.
        #[arg(long, default_value = "local")]
        name: String,
        /// The address the repository server will listen on.
        #[arg(long, default_value = "127.0.0.1:7878")]
        repo_listen: SocketAddr,
    },
    /// Manage certificates.
    Cert {
        #[command(subcommand)]
        command: CertCommand,
    },
    /// Run the repository server until SIGINT or SIGTERM.
    RepoServer {
        /// Where blobs and metadata live [default: from molt.toml].
        #[arg(long)]
        data: Option<PathBuf>,
        /// UDP address to serve QUIC on [default: from molt.toml].
        #[arg(long)]
        listen: Option<SocketAddr>,
    },
    /// Run the portal (the control plane) until SIGINT or SIGTERM.
    Portal {
        /// Where its records live [default: from molt.toml].
        #[arg(long)]
        data: Option<PathBuf>,
        /// UDP address shells attach to [default: from molt.toml].
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// TCP address of the API over plain HTTP, loopback only, for a
        /// local browser [default: from molt.toml].
        #[arg(long)]
        http: Option<SocketAddr>,
        /// Most deployments running at once, across targets.
        #[arg(long, default_value_t = 4)]
        max_running: usize,
        /// A running deployment that hears nothing for this long is marked
        /// stuck: `90s`, `10m`, `2h`.
        #[arg(long, value_name = "AGE", default_value = "10m", value_parser = instance::parse_age)]
        stuck_after: u64,
        /// TCP address of the API over HTTPS, where the CLI presents its
        /// certificate [default: from molt.toml].
        #[arg(long)]
        https: Option<SocketAddr>,
    },
    /// Watch a service's directory: each settled change is pushed to your own
    /// branch (dev/<user>) and pulled onto a development or quality instance;
    /// one line per cycle (--json: one JSON object). Ctrl-C stops.
    Watch {
        /// The service directory (holds service.toml).
        dir: PathBuf,
        /// The instance: NAME@ADDR, or a NAME under [instances] in molt.toml
        /// (with --target: one of the target's instances).
        #[arg(long)]
        instance: Option<String>,
        /// A development or quality target of the portal: its instances take
        /// each cycle through the portal, which records the run in its history.
        #[arg(long)]
        target: Option<String>,
        /// The branch to push to [default: dev/<your user name>].
        #[arg(long)]
        branch: Option<String>,
    },
    /// The process that holds an instance's services for its shell (started
    /// by the shell; not for people).
    #[command(hide = true)]
    Keeper {
        /// The unix socket to listen on.
        #[arg(long)]
        socket: PathBuf,
    },
    /// Check a stopped repository's or instance's stores, and repair them.
    ///
    /// Without --repair nothing changes; the exit status is 1 when something
    /// is wrong (or, with --repair, when something is lost for good).
    Fsck {
        /// The repository's data directory [default: from molt.toml, unless
        /// --root is given].
        #[arg(long, conflicts_with = "root")]
        data: Option<PathBuf>,
        /// An instance's root directory, its shell stopped.
        #[arg(long)]
        root: Option<PathBuf>,
        /// Repair what can be repaired: rebuild indexes, cut damaged journals
        /// back to what verifies, quarantine corrupt files.
        #[arg(long)]
        repair: bool,
    },
    /// Run an instance's shell until SIGINT or SIGTERM (or until a new
    /// shell takes the instance over: `molt shell takeover`).
    #[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
    Shell {
        #[command(subcommand)]
        action: Option<ShellCommand>,
        /// The instance's name (its certificate is `shell/NAME`).
        #[arg(long, required = true)]
        instance: Option<String>,
        /// development, quality, staging or production.
        #[arg(long, required = true)]
        stage: Option<String>,
        /// The instance's root directory (state, cache, releases, logs).
        #[arg(long, required = true)]
        root: Option<PathBuf>,
        /// UDP address to serve commands on [default: 127.0.0.1:7901; none
        /// when --portal is given: the shell then takes commands only over the
        /// connection it dials to the portal].
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// The portal to attach to: the shell dials it, registers, and serves
        /// its commands over that connection (a staging or production shell
        /// then takes deployments only from the portal).
        #[arg(long)]
        portal: Option<SocketAddr>,
        /// A label to register with at the portal, key=value (repeatable).
        #[arg(long = "label", value_name = "KEY=VALUE", value_parser = instance::parse_label)]
        labels: Vec<(String, String)>,
        /// The shell's certificate [default: certs/shell-NAME.crt beside the CA].
        #[arg(long)]
        cert: Option<PathBuf>,
        /// The shell's private key [default: certs/shell-NAME.key beside the CA].
        #[arg(long)]
        key: Option<PathBuf>,
        /// Added to every public port of service.toml (several instances on one host).
        #[arg(long, default_value_t = 0)]
        port_offset: u16,
        /// Pick free public ports instead (see them with `molt status`).
        #[arg(long)]
        ephemeral_ports: bool,
        /// Start the services as this shell's own children instead of through
        /// a keeper process (ROOT/keeper.sock): such a shell cannot be taken
        /// over, and its services stop with it.
        #[arg(long)]
        no_keeper: bool,
        /// Take the instance over from the shell serving it now (under the
        /// same --root, on this host), keeping every service and public port
        /// up, instead of starting it (what `molt shell takeover` runs).
        #[arg(long, conflicts_with = "no_keeper")]
        takeover: bool,
        /// The address the services' public ports listen on (e.g. 0.0.0.0 to
        /// serve other hosts).
        #[arg(long, default_value = "127.0.0.1")]
        public_addr: std::net::IpAddr,
        /// How upgrades run unless a deploy says: in-place or shadow
        /// [default: shadow on production, in-place elsewhere].
        #[arg(long)]
        strategy: Option<wire::shell::Strategy>,
    },
    /// Deploy an image to a target through the portal (or straight to one
    /// instance), or show the plan.
    Deploy {
        /// The image: its name, or its id or an abbreviation of it (≥ 8 hex).
        image: String,
        /// The portal's target: queued, carried out across its instances and
        /// followed until it ends.
        #[arg(
            long,
            required_unless_present = "instance",
            conflicts_with = "instance"
        )]
        target: Option<String>,
        /// One instance, directly: NAME@ADDR, or a NAME under [instances] in molt.toml.
        #[arg(long)]
        instance: Option<String>,
        /// Only show what would be fetched, built, restarted, kept and stopped.
        #[arg(long)]
        plan: bool,
        /// in-place (service by service), shadow (the whole generation beside
        /// the running one, one cutover) or shadow-full [default: the instance's].
        #[arg(long)]
        strategy: Option<wire::shell::Strategy>,
        /// With a shadow: `changed` starts only the changed services; `full` also
        /// the unchanged ones, on copies of every service's data (= shadow-full).
        #[arg(long, value_name = "changed|full")]
        shadow: Option<String>,
        /// Leave out the services' pre_swap and post_swap hooks.
        #[arg(long)]
        skip_hooks: bool,
        /// With --target: all, one-by-one or canary [default: the target's].
        #[arg(long, requires = "target")]
        rollout: Option<String>,
        /// With --target: only this one of its instances.
        #[arg(long, requires = "target", value_name = "INSTANCE")]
        only: Option<String>,
        /// With --target: print the deployment's id and return at once.
        #[arg(long, requires = "target")]
        no_wait: bool,
    },
    /// Show an instance's services, image, generation and queue.
    Status {
        /// The instance: NAME@ADDR, or a NAME under [instances] in molt.toml.
        #[arg(long)]
        instance: String,
    },
    /// Show a service's log on an instance (the last lines, or follow it).
    Logs {
        /// The service.
        service: String,
        /// The instance: NAME@ADDR, or a NAME under [instances] in molt.toml.
        #[arg(long)]
        instance: String,
        /// How many lines to show first.
        #[arg(long, default_value_t = 50)]
        lines: u32,
        /// Keep printing what the service writes.
        #[arg(short, long)]
        follow: bool,
        /// The log of its processes in generation N (default: the running one).
        #[arg(long, value_name = "N", conflicts_with = "build")]
        generation: Option<u64>,
        /// The build log of the commit it runs.
        #[arg(long)]
        build: bool,
        /// Only lines from this long ago on: `90s`, `10m`, `2h`, `1d`.
        #[arg(long, value_name = "AGE", value_parser = instance::parse_age)]
        since: Option<u64>,
    },
    /// Go back: a target to the image of an earlier succeeded deployment
    /// (through the portal), or one instance to an earlier generation (no
    /// fetch, no build).
    Rollback {
        /// The portal's target.
        #[arg(
            long,
            required_unless_present = "instance",
            conflicts_with = "instance"
        )]
        target: Option<String>,
        /// One instance, directly: NAME@ADDR, or a NAME under [instances] in molt.toml.
        #[arg(long)]
        instance: Option<String>,
        /// With --target: the deployment to go back to [default: the one before
        /// the current]; with --instance: the generation [default: the previous].
        #[arg(long, value_name = "ID|GENERATION")]
        to: Option<String>,
        /// in-place or shadow [default: the instance's].
        #[arg(long)]
        strategy: Option<wire::shell::Strategy>,
        /// With --target: print the deployment's id and return at once.
        #[arg(long, requires = "target")]
        no_wait: bool,
    },
    /// Bring one service of a development or quality instance to a revision.
    Pull {
        /// SERVICE or SERVICE@REV (REV: branch, commit id or abbreviation; default main).
        service: String,
        /// The instance: NAME@ADDR, or a NAME under [instances] in molt.toml
        /// (with --target: one of the target's instances).
        #[arg(long)]
        instance: Option<String>,
        /// A development or quality target of the portal: pull onto its
        /// instances through the portal.
        #[arg(long)]
        target: Option<String>,
    },
    /// Bring services pulled or watched onto a development or quality instance
    /// back to the instance's image.
    Reset {
        /// The service; without it, every service.
        service: Option<String>,
        /// The instance: NAME@ADDR, or a NAME under [instances] in molt.toml
        /// (with --target: one of the target's instances).
        #[arg(long)]
        instance: Option<String>,
        /// A development or quality target of the portal: reset its
        /// instances through the portal.
        #[arg(long)]
        target: Option<String>,
    },
    /// Push the service in DIR: upload what the repository lacks, commit, move the branch.
    Push {
        /// The service directory (holds service.toml).
        dir: PathBuf,
        /// The commit message.
        #[arg(short, long, default_value = "push")]
        message: String,
        /// The branch to move.
        #[arg(long, default_value = "main")]
        branch: String,
    },
    /// Show a branch's history, newest first.
    Log {
        /// The service.
        service: String,
        /// The branch.
        #[arg(long, default_value = "main")]
        branch: String,
        /// Most commits to show.
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// Show what changed between two revisions of a service (FROM `-`: nothing).
    Diff {
        /// The service.
        service: String,
        /// The old revision (branch, commit id or ≥ 8-hex abbreviation; `-` for none).
        from: String,
        /// The new revision.
        to: String,
    },
    /// Create and inspect images.
    Image {
        #[command(subcommand)]
        command: ImageCommand,
    },
    /// The portal's targets (its "Services").
    Target {
        #[command(subcommand)]
        command: portal::TargetCommand,
    },
    /// The instances attached to the portal: online or not, image, last seen.
    Instances,
    /// The portal's deployments, newest first.
    Deployments {
        /// Only this target's.
        #[arg(long)]
        target: Option<String>,
        /// Only queued, running, succeeded, failed, rolled-back or cancelled.
        #[arg(long)]
        status: Option<String>,
        /// Only those this user asked for.
        #[arg(long)]
        who: Option<String>,
        /// Only of this image.
        #[arg(long)]
        image: Option<String>,
        /// Only manual ones or only rollbacks.
        #[arg(long, value_name = "manual|rollback")]
        trigger: Option<String>,
        /// Only with ids below this (the next page).
        #[arg(long, value_name = "ID")]
        before: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// One deployment: show (and follow), cancel, or move to the front.
    Deployment {
        #[command(subcommand)]
        command: portal::DeploymentCommand,
    },
    /// The portal's API tokens.
    Token {
        #[command(subcommand)]
        command: portal::TokenCommand,
    },
    /// The portal's users.
    User {
        #[command(subcommand)]
        command: portal::UserCommand,
    },
}

#[derive(Debug, Subcommand)]
enum ShellCommand {
    /// Replace an instance's running shell with a new one of this molt
    /// binary, keeping every service process and public port up: the new
    /// shell takes the listening sockets, the services and their state, the
    /// old one finishes its requests and exits. Prints when it is done; on
    /// any failure the running shell serves on. (systemd: ExecReload=.)
    Takeover {
        /// The instance.
        #[arg(long)]
        instance: String,
        /// Its root directory [default: where its running shell registered
        /// it, in $MOLT_RUN_DIR, else $XDG_RUNTIME_DIR/molt, else /tmp/molt-UID].
        #[arg(long)]
        root: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
enum CertCommand {
    /// Issue a certificate from the cluster CA (needs `ca_key` in molt.toml).
    Issue {
        /// repo-server, portal, shell or user.
        #[arg(long)]
        role: String,
        /// The instance (shell) or person (user).
        #[arg(long)]
        name: Option<String>,
        /// developer, deployer or admin (users only).
        #[arg(long)]
        grant: Option<String>,
        /// Where to write the files [default: the CA's directory].
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Revoke a certificate: its serial number is appended to the revocation
    /// list beside the CA (`certs/revoked.txt`), which the repository server
    /// and the portal refuse from their next connection on.
    Revoke {
        /// The certificate file (PEM), or its serial number in hex.
        certificate: String,
    },
}

#[derive(Debug, Subcommand)]
enum ImageCommand {
    /// Create an image pinning one commit per service.
    Create {
        /// The image's name.
        name: String,
        /// SERVICE=REV, repeatable (REV: branch, commit id or abbreviation).
        #[arg(long = "set", value_name = "SERVICE=REV")]
        set: Vec<String>,
        /// Start from this image's services.
        #[arg(long)]
        from: Option<String>,
        /// What the image is for.
        #[arg(short, long, default_value = "")]
        description: String,
    },
    /// Show one image.
    Show {
        /// The image's name.
        name: String,
    },
    /// List every image.
    List,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return refuse_arguments(&e),
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MOLT_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let json = cli.json;
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            let e = anyhow::Error::new(e).context("cannot start the runtime");
            report_error(&e, json);
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            report_error(&e, json);
            ExitCode::FAILURE
        }
    }
}

/// Reports a command's failure on stderr and, with `--json`, also as one JSON
/// document on stdout (see [`error_json`]).
fn report_error(e: &anyhow::Error, json: bool) {
    eprintln!("error: {}", render_error(e));
    if json {
        println!("{}", error_json(e));
    }
}

/// An error as JSON: `error` is the one line stderr shows, `causes` every
/// underlying error's own message, outermost first.
fn error_json(e: &anyhow::Error) -> serde_json::Value {
    let causes: Vec<String> = e.chain().skip(1).map(|c| c.to_string()).collect();
    serde_json::json!({ "error": render_error(e), "causes": causes })
}

/// Arguments clap refused: its usual message on stderr and, when `--json` is
/// among the arguments, the error as JSON on stdout too. Help and version
/// requests print as usual.
fn refuse_arguments(e: &clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    let shown = matches!(
        e.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    );
    if !shown && std::env::args_os().skip(1).any(|a| a == "--json") {
        let text = e.to_string();
        let first = text.lines().next().unwrap_or_default();
        let message = first.strip_prefix("error: ").unwrap_or(first);
        println!(
            "{}",
            serde_json::json!({ "error": message, "causes": Vec::<String>::new() })
        );
    }
    let _ = e.print();
    ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2))
}

/// An error and its causes on one line, each cause once: the library errors
/// already name their source in their own message, so a cause whose text is
/// already there is not repeated.
fn render_error(e: &anyhow::Error) -> String {
    let mut text = e.to_string();
    for cause in e.chain().skip(1) {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
    }
    text
}

/// The commands that talk to the repository, over one connection.
async fn run_repo(ctx: &repo::Context, command: Command, json: bool) -> anyhow::Result<()> {
    match command {
        Command::Push {
            dir,
            message,
            branch,
        } => ctx.push(&dir, &message, &branch, json).await,
        Command::Log {
            service,
            branch,
            limit,
        } => ctx.log(&service, &branch, limit, json).await,
        Command::Diff { service, from, to } => ctx.diff(&service, &from, &to, json).await,
        Command::Image { command } => match command {
            ImageCommand::Create {
                name,
                set,
                from,
                description,
            } => {
                ctx.image_create(&name, &set, from.as_deref(), description, json)
                    .await
            }
            ImageCommand::Show { name } => ctx.image_show(&name, json).await,
            ImageCommand::List => ctx.image_list(json).await,
        },
        other => anyhow::bail!("internal: {other:?} is not a repository command"),
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let json = cli.json;
    match cli.command {
        Command::Up {
            dir,
            ephemeral_ports,
        } => {
            up::up(up::UpArgs {
                dir,
                ephemeral_ports,
                json,
            })
            .await
        }
        Command::Init {
            dir,
            name,
            repo_listen,
        } => cluster::init(&dir, &name, repo_listen, json),
        Command::Cert {
            command:
                CertCommand::Issue {
                    role,
                    name,
                    grant,
                    out,
                },
        } => cluster::issue(
            cli.config.as_deref(),
            &role,
            name.as_deref(),
            grant.as_deref(),
            out,
            json,
        ),
        Command::Cert {
            command: CertCommand::Revoke { certificate },
        } => cluster::revoke(cli.config.as_deref(), &certificate, json),
        Command::Keeper { socket } => Ok(shell::keeper::run(&socket)?),
        Command::Watch {
            dir,
            instance,
            target,
            branch,
        } => {
            watch::watch(
                cli.config.as_deref(),
                cli.portal_url.as_deref(),
                cli.repo,
                watch::WatchArgs {
                    dir,
                    onto: devloop::Onto::new(instance, target)?,
                    branch,
                    json,
                },
            )
            .await
        }
        Command::Fsck { data, root, repair } => {
            cluster::fsck(cli.config.as_deref(), data, root, repair)
        }
        Command::RepoServer { data, listen } => {
            cluster::repo_server(cli.config.as_deref(), data, listen).await
        }
        Command::Shell {
            action: Some(ShellCommand::Takeover { instance, root }),
            ..
        } => takeover::takeover(&instance, root, json).await,
        Command::Shell {
            action: None,
            instance,
            stage,
            root,
            listen,
            portal,
            labels,
            cert,
            key,
            port_offset,
            ephemeral_ports,
            no_keeper,
            takeover,
            public_addr,
            strategy,
        } => {
            let required = |what: &str| anyhow::anyhow!("molt shell needs --{what}");
            instance::shell(
                cli.config.as_deref(),
                cli.repo,
                instance::ShellArgs {
                    instance: instance.ok_or_else(|| required("instance"))?,
                    stage: stage.ok_or_else(|| required("stage"))?,
                    root: root.ok_or_else(|| required("root"))?,
                    listen,
                    portal,
                    labels: labels.into_iter().collect(),
                    cert,
                    key,
                    port_offset,
                    ephemeral_ports,
                    keeper: !no_keeper,
                    takeover,
                    public_addr,
                    strategy,
                },
            )
            .await
        }
        Command::Portal {
            data,
            listen,
            http,
            max_running,
            stuck_after,
            https,
        } => {
            let runner = ::portal::runner::RunnerConfig {
                max_running,
                stuck_after: std::time::Duration::from_secs(stuck_after),
            };
            portal::daemon(
                cli.config.as_deref(),
                cli.repo,
                data,
                listen,
                http,
                https,
                runner,
            )
            .await
        }
        Command::Deploy {
            image,
            target,
            instance,
            plan,
            strategy,
            shadow,
            skip_hooks,
            rollout,
            only,
            no_wait,
        } => {
            let strategy = instance::with_shadow(strategy, shadow.as_deref())?;
            match (target, instance) {
                (Some(target), _) => {
                    let client = portal::PortalClient::open(
                        cli.config.as_deref(),
                        cli.portal_url.as_deref(),
                    )?;
                    let args = portal::DeployArgs {
                        image,
                        target,
                        plan,
                        strategy,
                        rollout,
                        only,
                        no_wait,
                        skip_hooks,
                    };
                    portal::deploy(&client, args, json).await
                }
                (None, Some(instance)) => {
                    instance::deploy(
                        cli.config.as_deref(),
                        &image,
                        &instance,
                        plan,
                        strategy,
                        skip_hooks,
                        json,
                    )
                    .await
                }
                (None, None) => anyhow::bail!("name a --target or an --instance"),
            }
        }
        Command::Status { instance } => {
            instance::status(cli.config.as_deref(), &instance, json).await
        }
        Command::Logs {
            service,
            instance,
            lines,
            follow,
            generation,
            build,
            since,
        } => {
            let source = match (generation, build) {
                (Some(n), _) => wire::shell::LogSource::Generation(n),
                (None, true) => wire::shell::LogSource::Build,
                (None, false) => wire::shell::LogSource::Running,
            };
            let options = instance::LogOptions {
                source,
                lines,
                follow,
                since,
                json,
            };
            instance::logs(cli.config.as_deref(), &instance, &service, options).await
        }
        Command::Rollback {
            target,
            instance,
            to,
            strategy,
            no_wait,
        } => match (target, instance) {
            (Some(target), _) => {
                let client =
                    portal::PortalClient::open(cli.config.as_deref(), cli.portal_url.as_deref())?;
                portal::rollback(&client, &target, to.as_deref(), no_wait, json).await
            }
            (None, Some(instance)) => {
                let to = to
                    .map(|t| {
                        t.parse::<u64>()
                            .map_err(|_| anyhow::anyhow!("--to `{t}`: a generation number"))
                    })
                    .transpose()?;
                instance::change(
                    cli.config.as_deref(),
                    &instance,
                    wire::shell::ShellRequest::Rollback {
                        strategy,
                        to,
                        deployment: None,
                    },
                    json,
                )
                .await
            }
            (None, None) => anyhow::bail!("name a --target or an --instance"),
        },
        Command::Target { command } => {
            let client =
                portal::PortalClient::open(cli.config.as_deref(), cli.portal_url.as_deref())?;
            portal::target(&client, command, json).await
        }
        Command::Instances => {
            let client =
                portal::PortalClient::open(cli.config.as_deref(), cli.portal_url.as_deref())?;
            portal::instances(&client, json).await
        }
        Command::Deployments {
            target,
            status,
            who,
            image,
            trigger,
            before,
            limit,
        } => {
            let client =
                portal::PortalClient::open(cli.config.as_deref(), cli.portal_url.as_deref())?;
            let query = [
                ("target", target),
                ("status", status),
                ("who", who),
                ("image", image),
                ("trigger", trigger),
                ("before", before),
                ("limit", Some(limit.to_string())),
            ];
            portal::deployments(&client, &query, json).await
        }
        Command::Deployment { command } => {
            let client =
                portal::PortalClient::open(cli.config.as_deref(), cli.portal_url.as_deref())?;
            portal::deployment(&client, command, json).await
        }
        Command::Token { command } => {
            let client =
                portal::PortalClient::open(cli.config.as_deref(), cli.portal_url.as_deref())?;
            portal::token(&client, command, json).await
        }
        Command::User { command } => {
            let client =
                portal::PortalClient::open(cli.config.as_deref(), cli.portal_url.as_deref())?;
            portal::user(&client, command, json).await
        }
        Command::Pull {
            service,
            instance,
            target,
        } => {
            let (service, rev) = instance::service_rev(&service)?;
            devloop::change(
                cli.config.as_deref(),
                cli.portal_url.as_deref(),
                devloop::Onto::new(instance, target)?,
                wire::shell::ShellRequest::Pull {
                    service,
                    rev,
                    on_behalf_of: None,
                },
                json,
            )
            .await
        }
        Command::Reset {
            service,
            instance,
            target,
        } => {
            let service = service
                .map(|s| image_spec::ServiceName::new(&s))
                .transpose()?;
            devloop::change(
                cli.config.as_deref(),
                cli.portal_url.as_deref(),
                devloop::Onto::new(instance, target)?,
                wire::shell::ShellRequest::Reset {
                    service,
                    on_behalf_of: None,
                },
                json,
            )
            .await
        }
        repo_command => {
            let ctx = repo::Context::open(cli.config.as_deref(), cli.repo).await?;
            let result = run_repo(&ctx, repo_command, json).await;
            ctx.close().await;
            result
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Like the library errors: names its source in its message, and has it
    /// as its `source()`.
    #[derive(Debug)]
    struct Build {
        source: std::io::Error,
    }

    impl std::fmt::Display for Build {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "the build of `orders` failed: {}", self.source)
        }
    }

    impl std::error::Error for Build {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.source)
        }
    }

    #[test]
    fn errors_name_each_cause_once() {
        let io = || std::io::Error::other("exit status 2");
        // A library error that names its source: the source is not repeated.
        let e = anyhow::Error::new(Build { source: io() }).context("deploy to prod");
        assert_eq!(
            render_error(&e),
            "deploy to prod: the build of `orders` failed: exit status 2"
        );
        // Plain context chains keep every link.
        let e = anyhow::Error::new(io()).context("reading service.toml");
        assert_eq!(render_error(&e), "reading service.toml: exit status 2");
    }

    #[test]
    fn json_errors_carry_the_line_and_every_cause() {
        let e = anyhow::Error::new(std::io::Error::other("exit status 2"))
            .context("the build failed")
            .context("deploy to prod");
        assert_eq!(
            error_json(&e),
            serde_json::json!({
                "error": "deploy to prod: the build failed: exit status 2",
                "causes": ["the build failed", "exit status 2"],
            })
        );
    }
}
