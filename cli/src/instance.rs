//! The instance commands: `molt shell` (the daemon), `molt deploy`, `molt status`,
//! `molt rollback`, `molt pull`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use image_spec::{ImageName, InstanceName};
use shell::instance::{InstanceConfig, PublicPorts};
use shell::service::{ShellConfig, Stage};
use wire::plan::{Action, UpgradePlan};
use wire::shell::{ShellReply, ShellRequest, ShellResponse, Strategy, Update, UpgradeSummary};
use wire::{Client, Credentials, Identity};

use crate::config::Loaded;

/// What `molt shell` needs besides the configuration.
pub(crate) struct ShellArgs {
    pub(crate) instance: String,
    pub(crate) stage: String,
    pub(crate) root: PathBuf,
    /// Where to serve commands; `None` only with a portal.
    pub(crate) listen: Option<SocketAddr>,
    /// The portal to attach to.
    pub(crate) portal: Option<SocketAddr>,
    /// Labels to register with at the portal.
    pub(crate) labels: std::collections::BTreeMap<String, String>,
    pub(crate) cert: Option<PathBuf>,
    pub(crate) key: Option<PathBuf>,
    pub(crate) port_offset: u16,
    pub(crate) ephemeral_ports: bool,
    /// Start the services through a keeper process.
    pub(crate) keeper: bool,
    /// Take the instance over from its running shell instead of opening it.
    pub(crate) takeover: bool,
    /// The address public ports listen on.
    pub(crate) public_addr: std::net::IpAddr,
    pub(crate) strategy: Option<Strategy>,
}

/// Where `molt shell` listens when given neither `--listen` nor `--portal`.
pub(crate) const DEFAULT_LISTEN: &str = "127.0.0.1:7901";

/// Parses a `--label key=value`.
pub(crate) fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_owned(), value.to_owned())),
        _ => Err(format!(
            "`{s}` is not a label: write key=value (e.g. region=eu)"
        )),
    }
}

/// Applies `--shadow changed|full` to `--strategy` (which it implies).
pub(crate) fn with_shadow(
    strategy: Option<Strategy>,
    shadow: Option<&str>,
) -> Result<Option<Strategy>> {
    let Some(shadow) = shadow else {
        return Ok(strategy);
    };
    if strategy == Some(Strategy::InPlace) {
        bail!("--shadow goes with a shadow strategy, not in-place");
    }
    match shadow {
        "changed" => Ok(Some(Strategy::Shadow)),
        "full" => Ok(Some(Strategy::ShadowFull)),
        other => bail!("--shadow `{other}`: expected changed or full"),
    }
}

/// `molt shell`: runs an instance's shell until SIGINT or SIGTERM.
pub(crate) async fn shell(
    config: Option<&Path>,
    repo: Option<SocketAddr>,
    args: ShellArgs,
) -> Result<()> {
    let loaded = Loaded::read(config)?;
    let name = InstanceName::new(&args.instance)?;
    let stage: Stage = args.stage.parse().map_err(anyhow::Error::msg)?;
    let certs = crate::cluster::certs_dir(&loaded);
    let cert = args
        .cert
        .unwrap_or_else(|| certs.join(format!("shell-{name}.crt")));
    let key = args
        .key
        .unwrap_or_else(|| certs.join(format!("shell-{name}.key")));
    let credentials = Credentials::load(&cert, &key, &loaded.resolve(&loaded.config.ca))
        .with_context(|| {
            format!("cannot load the shell's certificate (make one: molt cert issue --role shell --name {name})")
        })?;
    let config = ShellConfig {
        instance: InstanceConfig {
            name: name.clone(),
            root: args.root,
            public_ports: if args.ephemeral_ports {
                PublicPorts::Ephemeral
            } else {
                PublicPorts::Offset(args.port_offset)
            },
            public_ip: args.public_addr,
        },
        stage,
        repo: repo.unwrap_or(loaded.config.repo),
        credentials,
        // Without a portal the shell listens where it always did by default.
        listen: match (args.listen, args.portal) {
            (None, None) => Some(DEFAULT_LISTEN.parse()?),
            (listen, _) => listen,
        },
        portal: args.portal,
        labels: args.labels,
        strategy: args.strategy.unwrap_or(stage.default_strategy()),
    };
    let (shutdown, waiter) = crate::signals::shutdown_on_signals()?;
    let root = config.instance.root.clone();
    let (bound, _keeper) = if args.takeover {
        let bound = shell::service::take_over(config)
            .await
            .with_context(|| format!("cannot take over the shell of `{name}`; it serves on"))?;
        (bound, None)
    } else {
        let keeper = match args.keeper {
            true => Some(start_keeper(&root).await?),
            false => None,
        };
        let bound = shell::service::bind(config)
            .await
            .with_context(|| format!("cannot start the shell of `{name}`"))?;
        (bound, keeper)
    };
    if let Err(e) = crate::takeover::record(name.as_str(), &root) {
        eprintln!("warning: {e:#} (molt shell takeover will need --root)");
    }
    if args.takeover {
        eprintln!("shell {name} took over (pid {})", std::process::id());
        // Whoever started this shell may be gone (its stdout closed): that
        // must not end a shell that now holds the instance.
        {
            use std::io::Write;
            let mut out = std::io::stdout();
            let _ = writeln!(out, "{}", crate::takeover::TOOK_OVER).and_then(|()| out.flush());
        }
        crate::takeover::notify(&format!("MAINPID={}\nREADY=1", std::process::id()));
    } else {
        crate::takeover::notify("READY=1");
    }
    if let Ok(addr) = bound.local_addr() {
        eprintln!("shell {name} listening on {addr}");
    }
    if let Some(portal) = bound.portal() {
        eprintln!("shell {name} attaching to the portal at {portal}");
    }
    match bound.serve(shutdown).await {
        shell::service::Served::Stopped => eprintln!("shell {name} stopped"),
        shell::service::Served::HandedOver => {
            eprintln!("shell {name} handed over to a new shell; its services run on")
        }
    }
    waiter.abort();
    Ok(())
}

/// Starts the instance's keeper (`molt keeper`, this binary) and makes it the
/// parent of every service this shell starts; the child is kept to be
/// reaped.
async fn start_keeper(root: &Path) -> Result<std::process::Child> {
    let logs = root.join("logs");
    std::fs::create_dir_all(&logs).with_context(|| format!("cannot make `{}`", logs.display()))?;
    let socket = root.join("keeper.sock");
    let exe = std::env::current_exe().context("cannot find this program to run its keeper")?;
    let (child, link) = tokio::task::spawn_blocking(move || {
        let (token, child) = shell::keeper::start(&exe, &socket, &logs.join("keeper.log"))?;
        let hello = shell::keeper::Hello::Owner {
            version: shell::keeper::KEEPER_VERSION,
            token,
        };
        let link = shell::keeper::KeeperLink::connect(&socket, &hello)?;
        Ok::<_, shell::keeper::KeeperError>((child, link))
    })
    .await??;
    if !shell::process::use_keeper(link) {
        bail!("a keeper was already set up in this process");
    }
    Ok(child)
}

/// `NAME@ADDR`, or a `NAME` listed under `[instances]`.
fn target(loaded: &Loaded, spec: &str) -> Result<(InstanceName, SocketAddr)> {
    let (name, addr) = match spec.split_once('@') {
        Some((name, addr)) => (
            name,
            addr.parse()
                .with_context(|| format!("`{addr}` is not an address (e.g. 127.0.0.1:7901)"))?,
        ),
        None => match loaded.config.instances.get(spec) {
            Some(addr) => (spec, *addr),
            None => bail!(
                "unknown instance `{spec}`: write NAME@ADDR, or add it under [instances] in {}",
                loaded.path.display()
            ),
        },
    };
    Ok((InstanceName::new(name)?, addr))
}

pub(crate) async fn command(
    config: Option<&Path>,
    instance: &str,
    req: ShellRequest,
) -> Result<ShellResponse> {
    command_with(config, instance, req, true).await
}

/// [`command`] without printing the upgrade's steps (`molt watch` prints one
/// line per cycle).
pub(crate) async fn command_quiet(
    config: Option<&Path>,
    instance: &str,
    req: ShellRequest,
) -> Result<ShellResponse> {
    command_with(config, instance, req, false).await
}

/// Did the shell refuse the request (no grant, a staging or production
/// instance), rather than fail carrying it out?
pub(crate) fn is_refusal(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<wire::repo::RemoteError>()
            .is_some_and(|r| matches!(r.kind, wire::repo::ErrorKind::PermissionDenied))
    })
}

async fn command_with(
    config: Option<&Path>,
    instance: &str,
    req: ShellRequest,
    show_steps: bool,
) -> Result<ShellResponse> {
    let loaded = Loaded::read(config)?;
    let creds = loaded.credentials()?;
    let (name, addr) = target(&loaded, instance)?;
    let client = Client::new(&creds, addr)?;
    let conn = client
        .connect(
            addr,
            &Identity::Shell {
                instance: name.clone(),
            },
        )
        .await
        .with_context(|| format!("cannot reach the shell of `{name}` at {addr}"))?;
    // An upgrade reports its steps as it goes: show them on stderr (stdout keeps
    // the one answer, or the one JSON document).
    let reply: ShellReply = wire::shell::call(&conn, &req, |update| match update {
        Update::Progress(p) if show_steps => eprintln!("  {name}: {p}"),
        Update::Step(e) if show_steps => eprintln!("  {name}: {e}"),
        _ => {}
    })
    .await?;
    conn.close();
    client.shutdown().await;
    reply.with_context(|| format!("the shell of `{name}` refused"))
}

pub(crate) fn print_summary(verb: &str, s: &UpgradeSummary) {
    let list = |v: &[image_spec::ServiceName]| {
        if v.is_empty() {
            "-".to_owned()
        } else {
            v.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
        }
    };
    println!("{verb}");
    println!("  restart:   {}", list(&s.restarted));
    println!("  unchanged: {}", list(&s.unchanged));
    println!("  stop:      {}", list(&s.removed));
    if let Some(g) = s.generation {
        println!("  recorded as generation {g}");
    }
    for w in &s.warnings {
        println!("  warning: {w}");
    }
}

/// Prints a plan: every service from → to, then every step with its undo.
pub(crate) fn print_plan(title: &str, plan: &UpgradePlan) {
    let commit = |c: Option<image_spec::CommitId>| c.map_or("-".to_owned(), |c| c.short(12));
    match plan.generation {
        Some(g) => println!("{title} (strategy {}, generation {g})", plan.strategy),
        None => println!("{title} (strategy {}): nothing to do", plan.strategy),
    }
    println!("  services:");
    for s in &plan.services {
        let change = match s.action {
            Action::Unchanged | Action::Restart => commit(s.to),
            Action::Add => format!("- → {}", commit(s.to)),
            Action::Remove => format!("{} → -", commit(s.from)),
            _ => format!("{} → {}", commit(s.from), commit(s.to)),
        };
        println!(
            "    {:<16} {:<16} {change}",
            s.service.as_str(),
            s.action.to_string()
        );
    }
    if plan.steps.is_empty() {
        return;
    }
    println!("  steps (and what undoes each if a later one fails):");
    let width = plan.steps.len().to_string().len();
    for (i, step) in plan.steps.iter().enumerate() {
        println!("    {:>width$}. {step:<60} undo: {}", i + 1, step.undo());
    }
    println!("  to fetch: {}", wire::plan::ByteCount(plan.fetch_bytes()));
}

/// `molt deploy IMAGE --instance T [--plan]`.
pub(crate) async fn deploy(
    config: Option<&Path>,
    image: &str,
    instance: &str,
    plan_only: bool,
    strategy: Option<Strategy>,
    skip_hooks: bool,
    json: bool,
) -> Result<()> {
    let image = ImageName::new(image)?;
    let req = if plan_only {
        ShellRequest::Plan {
            image: image.clone(),
            strategy,
            skip_hooks,
        }
    } else {
        ShellRequest::Upgrade {
            image: image.clone(),
            strategy,
            deployment: None,
            skip_hooks,
            keep_releases: None,
        }
    };
    match command(config, instance, req).await? {
        ShellResponse::Plan(plan) if json => println!("{}", serde_json::to_string(&plan)?),
        ShellResponse::Plan(plan) => print_plan(&format!("plan for {image} on {instance}"), &plan),
        ShellResponse::Upgraded(summary) if json => {
            println!("{}", serde_json::to_string(&summary)?)
        }
        ShellResponse::Upgraded(summary) => {
            print_summary(&format!("deployed {image} to {instance}:"), &summary)
        }
        _ => bail!("the shell answered a deploy with something else"),
    }
    Ok(())
}

/// Which change [`change`] made.
enum Kind {
    Rollback,
    Other,
}

/// `molt rollback --instance T`, `molt pull SERVICE[@REV] --instance T` and
/// `molt reset --instance T [SERVICE]`.
pub(crate) async fn change(
    config: Option<&Path>,
    instance: &str,
    req: ShellRequest,
    json: bool,
) -> Result<()> {
    let what = match &req {
        ShellRequest::Rollback { .. } => "rolled back".to_owned(),
        ShellRequest::Pull { service, rev, .. } => format!("pulled {service}@{rev} onto"),
        ShellRequest::Reset {
            service: Some(service),
            ..
        } => format!("reset {service} to the image on"),
        ShellRequest::Reset { service: None, .. } => "reset to the image:".to_owned(),
        _ => "changed".to_owned(),
    };
    let req_kind = match &req {
        ShellRequest::Rollback { .. } => Kind::Rollback,
        _ => Kind::Other,
    };
    let ShellResponse::Upgraded(summary) = command(config, instance, req).await? else {
        bail!("the shell answered with something else than an upgrade");
    };
    if json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        let title = match &req_kind {
            Kind::Rollback => format!("{instance}: {}", summary.reason),
            Kind::Other => format!("{what} {instance}:"),
        };
        print_summary(&title, &summary);
    }
    Ok(())
}

/// What `molt logs` shows.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LogOptions {
    /// Which log.
    pub(crate) source: wire::shell::LogSource,
    /// How many lines first.
    pub(crate) lines: u32,
    /// Keep printing what comes.
    pub(crate) follow: bool,
    /// Only lines from this many seconds ago on.
    pub(crate) since: Option<u64>,
    /// One JSON object per line.
    pub(crate) json: bool,
}

/// Parses an age such as `90s`, `10m`, `2h` or `1d` into seconds.
pub(crate) fn parse_age(s: &str) -> Result<u64, String> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("`{s}` is not an age (e.g. 90s, 10m, 2h, 1d)"))?;
    let scale = match unit {
        "s" | "" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("`{s}`: the unit is s, m, h or d")),
    };
    n.checked_mul(scale)
        .ok_or_else(|| format!("`{s}` is too long ago"))
}

/// Prints log text: as it is, or one JSON object per line (`time`, `line`).
fn print_log(out: &mut impl std::io::Write, text: &str, json: bool) -> Result<()> {
    if !json {
        out.write_all(text.as_bytes())?;
        return Ok(());
    }
    for line in text.lines() {
        let (time, rest) = match shell::process::split_stamp(line) {
            Some((stamp, rest)) => (Some(stamp), rest),
            None => (None, line),
        };
        let obj = serde_json::json!({ "time": time, "line": rest });
        writeln!(out, "{obj}")?;
    }
    Ok(())
}

/// `molt logs SERVICE --instance T [--lines N] [-f] [--generation N | --build] [--since AGE]`.
pub(crate) async fn logs(
    config: Option<&Path>,
    instance: &str,
    service: &str,
    options: LogOptions,
) -> Result<()> {
    use std::io::Write;
    let service = image_spec::ServiceName::new(service)?;
    let since = options.since.map(|age| {
        image_spec::Timestamp::now().as_unix_seconds() - i64::try_from(age).unwrap_or(i64::MAX)
    });
    let mut from = None;
    loop {
        let req = ShellRequest::Logs {
            service: service.clone(),
            source: options.source,
            tail: options.lines,
            from,
            since,
        };
        let ShellResponse::Logs { text, next } = command(config, instance, req).await? else {
            bail!("the shell answered a logs request with something else");
        };
        let mut out = std::io::stdout().lock();
        print_log(&mut out, &text, options.json)?;
        if from.is_none() && !text.is_empty() && !options.json {
            out.write_all(b"\n")?;
        }
        out.flush()?;
        if !options.follow {
            return Ok(());
        }
        from = Some(next);
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}

/// Splits `SERVICE[@REV]` (REV defaults to `main`).
pub(crate) fn service_rev(spec: &str) -> Result<(image_spec::ServiceName, String)> {
    let (service, rev) = spec.split_once('@').unwrap_or((spec, "main"));
    Ok((image_spec::ServiceName::new(service)?, rev.to_owned()))
}

/// `molt status --instance T`.
pub(crate) async fn status(config: Option<&Path>, instance: &str, json: bool) -> Result<()> {
    let ShellResponse::Status(s) = command(config, instance, ShellRequest::Status).await? else {
        bail!("the shell answered a status request with something else");
    };
    if json {
        println!("{}", serde_json::to_string(&s)?);
        return Ok(());
    }
    println!(
        "instance {} ({}), generation {}, strategy {}",
        s.instance, s.stage, s.generation, s.strategy
    );
    if !s.lifecycle.is_empty() {
        let phases: Vec<String> = s
            .lifecycle
            .iter()
            .map(|g| format!("{} {}", g.number, g.phase))
            .collect();
        println!("lifecycle {}", phases.join(", "));
    }
    if let Some(why) = &s.last_failure {
        println!("last failure: {why}");
    }
    if let Some(image) = &s.image {
        println!("image    {} ({})", image.name, image.id.short(12));
    }
    if s.upgrading || s.queued > 0 {
        println!("upgrade  running: {}, queued: {}", s.upgrading, s.queued);
    }
    for (name, svc) in &s.services {
        let ports: Vec<String> = svc.ports.iter().map(|(p, a)| format!("{p}={a}")).collect();
        println!(
            "  {:<16} {}  {:<10} pid {:<8} up {:<8} restarts {}  {}",
            name.as_str(),
            svc.commit.short(12),
            svc.state,
            svc.pid.map_or("-".to_owned(), |p| p.to_string()),
            svc.uptime_secs.map_or("-".to_owned(), |s| format!("{s}s")),
            svc.restarts,
            ports.join(" ")
        );
        if svc.health != "healthy" {
            println!("  {:<16} health: {}", "", svc.health);
        }
        if let Some(o) = s.overlays.get(name) {
            println!("  {:<16} {}", "", overlay_line(o));
        }
    }
    Ok(())
}

/// How `status` shows an overlay: who pulled which revision, since when.
pub(crate) fn overlay_line(o: &wire::shell::Overlay) -> String {
    format!(
        "overlay: {} pulled by {} since {} (not the image's; molt reset brings it back)",
        o.rev, o.by, o.since
    )
}
