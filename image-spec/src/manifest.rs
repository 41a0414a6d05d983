//! `service.toml`: how the shell builds, runs, checks and stops a service.
//!
//! Every service has a `service.toml` at its root. [`ServiceManifest::parse`] reads it
//! into checked types; unknown keys and bad values are errors that name the key (and
//! the line, when the TOML parser knows it) ([`TomlError`]). A complete example,
//! with every field and its default:
//!
//! ```toml
//! name = "orders"          # required; the service's name (lowercase, digits, - _ .)
//! kind = "process"         # "process" (default): a child process the shell supervises
//!                          # "plugin": a cdylib the shell loads and serves in-process
//! restart = "on-failure"   # "always" | "on-failure" (default) | "never"
//! overlap = true           # may the new process run beside the old one during an
//!                          # upgrade? (default true; false: stop old, then start new,
//!                          # while the proxy holds new connections)
//! data = ["data"]          # directories (relative) that hold state across releases;
//!                          # default none; copied for a full shadow generation
//!
//! [build]                  # optional; without it nothing is built
//! command = ["cargo", "build", "--release"]   # argv, run in the release directory
//! timeout = "10m"          # default 10m
//!
//! [run]                    # required
//! command = ["./target/release/orders"]       # process: argv (required for processes)
//! # library = "target/release/liborders.so"   # plugin: the built cdylib (required for plugins)
//!
//! [[ports]]                # one or more public ports the shell owns and proxies
//! name = "web"             # required when there is more than one port; default "main"
//! port = 8080              # the public port, 1-65535, unique within the service
//! protocol = "http"        # "http" (default): proxied per request; "tcp": per connection
//!
//! [health]                 # optional; default: a TCP connect to the first port
//! http = "/healthz"        # GET this path; healthy on a 2xx answer — or
//! # tcp = true             # healthy when the port accepts a connection — or
//! # command = ["./check"]  # healthy when the command exits 0
//! port = "web"             # which port http/tcp probe; default: the first (http: first http port)
//! interval = "2s"          # time between probes; default 2s
//! timeout = "1s"           # one probe's limit; default 1s
//! retries = 3              # failed probes in a row that make the service unhealthy; default 3
//! start_grace = "30s"      # how long a starting service may fail probes; default 30s
//!
//! [env]                    # extra environment for build, run and hooks; default none
//! RUST_LOG = "info"        # names PORT and MOLT_* are reserved for the shell
//!
//! [stop]
//! signal = "SIGTERM"       # SIGTERM (default), SIGINT, SIGQUIT, SIGHUP, SIGUSR1, SIGUSR2
//! grace = "10s"            # how long after the signal before SIGKILL; default 10s
//!
//! [hooks]                  # optional commands run by the shell, in the release directory
//! pre_swap = { command = ["./migrate"], timeout = "5m" }   # before traffic moves; failure aborts the swap
//! post_swap = { command = ["./notify"], timeout = "5m" }   # after traffic moved; failure is logged
//! ```
//!
//! Durations are written as numbers with units, optionally combined: `500ms`, `10s`,
//! `5m`, `1h`, `1m30s`; each is at most 24 hours and more than zero.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::Deserialize;

use crate::name::ServiceName;
use crate::path::RelPath;
use crate::toml_input::{self, TomlError};

/// The file name of a service's manifest, at the service's root.
pub const MANIFEST_FILE: &str = "service.toml";

/// Why a `service.toml` cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    /// The document is malformed, has an unknown key or a bad value; names the key.
    #[error("service.toml: {0}")]
    Toml(#[from] TomlError),
    /// The file is larger than a manifest may be.
    #[error("service.toml is {len} bytes; the limit is {max}")]
    TooLarge {
        /// Its size in bytes.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The manifest names another service than the one it was pushed as.
    #[error("service.toml names service `{found}`, but this is service `{expected}`")]
    WrongService {
        /// The service being pushed or installed.
        expected: ServiceName,
        /// The `name` in service.toml.
        found: ServiceName,
    },
}

/// How a service runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServiceKind {
    /// A child process the shell starts and supervises.
    Process {
        /// What to run, in the release directory.
        command: Command,
    },
    /// A cdylib the shell loads with libloading and serves in-process.
    Plugin {
        /// The built library, relative to the release directory.
        library: RelPath,
    },
}

/// A command line: a non-empty argv with no NUL bytes. A relative program is
/// resolved in the release directory.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Deserialize)]
#[serde(try_from = "Vec<String>")]
pub struct Command(Vec<String>);

impl Command {
    /// The program (argv\[0\]).
    pub fn program(&self) -> &str {
        &self.0[0]
    }

    /// The arguments after the program.
    pub fn args(&self) -> &[String] {
        &self.0[1..]
    }

    /// The whole argv.
    pub fn argv(&self) -> &[String] {
        &self.0
    }
}

/// Why an argv is not a [`Command`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    /// The argv is empty.
    #[error("a command needs at least the program")]
    Empty,
    /// The program is the empty string.
    #[error("the program name is empty")]
    EmptyProgram,
    /// An argument holds a NUL byte, which no process can receive.
    #[error("command argument {index} contains a NUL byte")]
    Nul {
        /// Zero-based position in the argv.
        index: usize,
    },
}

impl TryFrom<Vec<String>> for Command {
    type Error = CommandError;
    fn try_from(argv: Vec<String>) -> Result<Self, CommandError> {
        match argv.first() {
            None => Err(CommandError::Empty),
            Some(p) if p.is_empty() => Err(CommandError::EmptyProgram),
            Some(_) => match argv.iter().position(|a| a.contains('\0')) {
                Some(index) => Err(CommandError::Nul { index }),
                None => Ok(Self(argv)),
            },
        }
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.join(" "))
    }
}

/// A command with a time limit: a build step or a hook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimedCommand {
    /// What to run.
    pub command: Command,
    /// How long it may take before it is killed and counted as failed.
    pub timeout: Duration,
}

/// How a public port is proxied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// HTTP/1.1, proxied per request, so a switch moves the next request.
    #[default]
    Http,
    /// Raw TCP, proxied per connection.
    Tcp,
}

/// One public port of a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortSpec {
    /// Its name: lowercase letters, digits and `_`, starting with a letter.
    pub name: String,
    /// The public port number the shell listens on.
    pub port: u16,
    /// How it is proxied.
    pub protocol: Protocol,
}

/// What a health probe does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// `GET path` on a port; healthy on a 2xx answer.
    Http {
        /// The port's name.
        port: String,
        /// The request path, starting with `/`.
        path: String,
    },
    /// Healthy when the port accepts a TCP connection.
    Tcp {
        /// The port's name.
        port: String,
    },
    /// Healthy when the command exits 0.
    Command(Command),
}

/// When a service counts as healthy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    /// The probe.
    pub probe: Probe,
    /// Time between probes.
    pub interval: Duration,
    /// One probe's limit.
    pub timeout: Duration,
    /// Failed probes in a row that make a running service unhealthy (at least 1).
    pub retries: u32,
    /// How long a starting service may fail probes before it counts as failed.
    pub start_grace: Duration,
}

/// The signal that asks a process to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize)]
pub enum StopSignal {
    /// SIGTERM (15).
    #[default]
    #[serde(rename = "SIGTERM")]
    Term,
    /// SIGINT (2).
    #[serde(rename = "SIGINT")]
    Int,
    /// SIGQUIT (3).
    #[serde(rename = "SIGQUIT")]
    Quit,
    /// SIGHUP (1).
    #[serde(rename = "SIGHUP")]
    Hup,
    /// SIGUSR1 (10 on Linux).
    #[serde(rename = "SIGUSR1")]
    Usr1,
    /// SIGUSR2 (12 on Linux).
    #[serde(rename = "SIGUSR2")]
    Usr2,
}

impl StopSignal {
    /// The signal number on Linux.
    pub fn number(self) -> i32 {
        match self {
            StopSignal::Term => 15,
            StopSignal::Int => 2,
            StopSignal::Quit => 3,
            StopSignal::Hup => 1,
            StopSignal::Usr1 => 10,
            StopSignal::Usr2 => 12,
        }
    }
}

/// How a service is stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StopPolicy {
    /// Sent first.
    pub signal: StopSignal,
    /// How long to wait after it before SIGKILL.
    pub grace: Duration,
}

/// When the supervisor restarts a process that exited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    /// Whatever the exit status.
    Always,
    /// Only after a non-zero exit or a signal.
    #[default]
    OnFailure,
    /// Never.
    Never,
}

/// Commands the shell runs around a swap.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Hooks {
    /// Runs against the new release before traffic moves (migrations); a failure
    /// aborts the swap.
    pub pre_swap: Option<TimedCommand>,
    /// Runs after traffic moved; a failure is logged, not rolled back.
    pub post_swap: Option<TimedCommand>,
}

/// A parsed, checked `service.toml` (see the module docs for the format).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceManifest {
    name: ServiceName,
    kind: ServiceKind,
    build: Option<TimedCommand>,
    ports: Vec<PortSpec>,
    health: HealthCheck,
    env: BTreeMap<String, String>,
    stop: StopPolicy,
    restart: RestartPolicy,
    overlap: bool,
    hooks: Hooks,
    data: Vec<RelPath>,
}

/// Default build timeout.
pub const DEFAULT_BUILD_TIMEOUT: Duration = Duration::from_secs(600);
/// Default hook timeout.
pub const DEFAULT_HOOK_TIMEOUT: Duration = Duration::from_secs(300);
/// Default time between health probes.
pub const DEFAULT_HEALTH_INTERVAL: Duration = Duration::from_secs(2);
/// Default limit of one health probe.
pub const DEFAULT_HEALTH_TIMEOUT: Duration = Duration::from_secs(1);
/// Default failed probes in a row before a service is unhealthy.
pub const DEFAULT_HEALTH_RETRIES: u32 = 3;
/// Default time a starting service may fail probes.
pub const DEFAULT_START_GRACE: Duration = Duration::from_secs(30);
/// Default time between the stop signal and SIGKILL.
pub const DEFAULT_STOP_GRACE: Duration = Duration::from_secs(10);

impl ServiceManifest {
    /// Largest `service.toml` accepted, in bytes.
    pub const MAX_LEN: usize = 64 * 1024;
    /// Most public ports one service may have.
    pub const MAX_PORTS: usize = 16;

    /// Parses and checks a `service.toml`.
    pub fn parse(text: &str) -> Result<Self, ManifestError> {
        if text.len() > Self::MAX_LEN {
            return Err(ManifestError::TooLarge {
                len: text.len(),
                max: Self::MAX_LEN,
            });
        }
        let raw: RawManifest = toml_input::parse(text)?;
        Ok(raw.check()?)
    }

    /// Fails unless this manifest is for `service`.
    pub fn check_service(&self, service: &ServiceName) -> Result<(), ManifestError> {
        if &self.name == service {
            Ok(())
        } else {
            Err(ManifestError::WrongService {
                expected: service.clone(),
                found: self.name.clone(),
            })
        }
    }

    /// The service's name.
    pub fn name(&self) -> &ServiceName {
        &self.name
    }

    /// Process or plugin, with what to run or load.
    pub fn kind(&self) -> &ServiceKind {
        &self.kind
    }

    /// The build step, if any.
    pub fn build(&self) -> Option<&TimedCommand> {
        self.build.as_ref()
    }

    /// The public ports, in the order written (at least one).
    pub fn ports(&self) -> &[PortSpec] {
        &self.ports
    }

    /// The health check.
    pub fn health(&self) -> &HealthCheck {
        &self.health
    }

    /// Extra environment.
    pub fn env(&self) -> &BTreeMap<String, String> {
        &self.env
    }

    /// How to stop it.
    pub fn stop(&self) -> &StopPolicy {
        &self.stop
    }

    /// When to restart it.
    pub fn restart(&self) -> RestartPolicy {
        self.restart
    }

    /// May a new process run beside the old one during an upgrade?
    pub fn overlap(&self) -> bool {
        self.overlap
    }

    /// Swap hooks.
    pub fn hooks(&self) -> &Hooks {
        &self.hooks
    }

    /// Declared state directories, relative.
    pub fn data(&self) -> &[RelPath] {
        &self.data
    }
}

/// Two services that would run together (the services of one image) want the
/// same public port: an instance could bind it for only one of them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "services `{first}` and `{second}` both want public port {port}; the services of \
     one image need distinct ports (change `ports` in one of their service.toml)"
)]
pub struct PortClash {
    /// The port.
    pub port: u16,
    /// The first service (in name order) that wants it.
    pub first: ServiceName,
    /// Another service that wants it.
    pub second: ServiceName,
}

/// Checks that no two of these services want the same public port (one
/// service's own ports are distinct already: [`ServiceManifest::parse`] checks).
pub fn distinct_ports<'a>(
    services: impl IntoIterator<Item = (&'a ServiceName, &'a ServiceManifest)>,
) -> Result<(), PortClash> {
    let mut owners: BTreeMap<u16, &ServiceName> = BTreeMap::new();
    let mut services: Vec<_> = services.into_iter().collect();
    services.sort_by(|a, b| a.0.cmp(b.0));
    for (service, manifest) in services {
        for spec in manifest.ports() {
            if let Some(first) = owners.insert(spec.port, service) {
                return Err(PortClash {
                    port: spec.port,
                    first: first.clone(),
                    second: service.clone(),
                });
            }
        }
    }
    Ok(())
}

/// A duration as written in a manifest (`10s`, `1m30s`).
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(try_from = "String")]
struct Dur(Duration);

impl TryFrom<String> for Dur {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        parse_duration(&s).map(Dur)
    }
}

const MAX_DURATION: Duration = Duration::from_secs(24 * 3600);

fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("`{s}` is not a duration; write e.g. `500ms`, `10s`, `5m`, `1h`, `1m30s`");
    let mut total = Duration::ZERO;
    // Units must go from larger to smaller, each at most once: `1m30s`, not `30s1m`.
    let mut last_rank = u8::MAX;
    let mut rest = s.trim();
    if rest.is_empty() {
        return Err(bad());
    }
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
        if digits == 0 {
            return Err(bad());
        }
        let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let (rank, part) = match &rest[..unit_len] {
            "ms" => (0, Duration::from_millis(n)),
            "s" => (1, Duration::from_secs(n)),
            "m" => (2, Duration::from_secs(n.saturating_mul(60))),
            "h" => (3, Duration::from_secs(n.saturating_mul(3600))),
            _ => return Err(bad()),
        };
        if rank >= last_rank {
            return Err(bad());
        }
        last_rank = rank;
        rest = &rest[unit_len..];
        total = total.saturating_add(part);
    }
    if total.is_zero() {
        return Err(format!("`{s}` is zero; a duration must be positive"));
    }
    if total > MAX_DURATION {
        return Err(format!("`{s}` is longer than the limit of 24h"));
    }
    Ok(total)
}

#[derive(Deserialize, Default, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum RawKind {
    #[default]
    Process,
    Plugin,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawManifest {
    name: ServiceName,
    #[serde(default)]
    kind: RawKind,
    build: Option<RawTimed>,
    run: RawRun,
    ports: Vec<RawPort>,
    health: Option<RawHealth>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    stop: RawStop,
    #[serde(default)]
    restart: RestartPolicy,
    #[serde(default = "default_true")]
    overlap: bool,
    #[serde(default)]
    hooks: RawHooks,
    #[serde(default)]
    data: Vec<RelPath>,
}

fn default_true() -> bool {
    true
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTimed {
    command: Command,
    timeout: Option<Dur>,
}

impl RawTimed {
    fn check(self, default: Duration) -> TimedCommand {
        TimedCommand {
            command: self.command,
            timeout: self.timeout.map_or(default, |d| d.0),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRun {
    command: Option<Command>,
    library: Option<RelPath>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPort {
    name: Option<String>,
    port: u16,
    #[serde(default)]
    protocol: Protocol,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    http: Option<String>,
    tcp: Option<bool>,
    command: Option<Command>,
    port: Option<String>,
    interval: Option<Dur>,
    timeout: Option<Dur>,
    retries: Option<u32>,
    start_grace: Option<Dur>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawStop {
    #[serde(default)]
    signal: StopSignal,
    grace: Option<Dur>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawHooks {
    pre_swap: Option<RawTimed>,
    post_swap: Option<RawTimed>,
}

fn valid_port_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && name.len() <= 32
}

fn check_env_name(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && name.len() <= 128;
    if !ok {
        return Err(format!(
            "`{name}` is not an environment variable name (letters, digits, `_`; not starting with a digit)"
        ));
    }
    if name == "PORT" || name.starts_with("MOLT_") {
        return Err(format!("`{name}` is reserved: the shell sets it"));
    }
    Ok(())
}

impl RawManifest {
    fn check(self) -> Result<ServiceManifest, TomlError> {
        let kind = match (self.kind, self.run.command, self.run.library) {
            (RawKind::Process, Some(command), None) => ServiceKind::Process { command },
            (RawKind::Plugin, None, Some(library)) => ServiceKind::Plugin { library },
            (RawKind::Process, None, _) => {
                return Err(TomlError::at(
                    "run.command",
                    "a process service needs a run command",
                ));
            }
            (RawKind::Process, Some(_), Some(_)) => {
                return Err(TomlError::at(
                    "run.library",
                    "only a plugin service has a library; a process service has a command",
                ));
            }
            (RawKind::Plugin, _, None) => {
                return Err(TomlError::at(
                    "run.library",
                    "a plugin service needs the path of its built library",
                ));
            }
            (RawKind::Plugin, Some(_), Some(_)) => {
                return Err(TomlError::at(
                    "run.command",
                    "a plugin service is loaded, not run: remove the command",
                ));
            }
        };

        let ports = check_ports(self.ports, matches!(kind, ServiceKind::Plugin { .. }))?;
        let health = check_health(self.health, &ports)?;

        for (name, value) in &self.env {
            check_env_name(name).map_err(|m| TomlError::at(format!("env.{name}"), m))?;
            if value.contains('\0') {
                return Err(TomlError::at(
                    format!("env.{name}"),
                    "the value contains a NUL byte",
                ));
            }
        }

        for (i, dir) in self.data.iter().enumerate() {
            for (j, other) in self.data.iter().enumerate() {
                if i != j && (dir == other || dir.is_ancestor_of(other)) {
                    return Err(TomlError::at(
                        format!("data[{j}]"),
                        format!("`{other}` is already covered by `{dir}`"),
                    ));
                }
            }
        }

        Ok(ServiceManifest {
            name: self.name,
            kind,
            build: self.build.map(|b| b.check(DEFAULT_BUILD_TIMEOUT)),
            ports,
            health,
            env: self.env,
            stop: StopPolicy {
                signal: self.stop.signal,
                grace: self.stop.grace.map_or(DEFAULT_STOP_GRACE, |d| d.0),
            },
            restart: self.restart,
            overlap: self.overlap,
            hooks: Hooks {
                pre_swap: self.hooks.pre_swap.map(|h| h.check(DEFAULT_HOOK_TIMEOUT)),
                post_swap: self.hooks.post_swap.map(|h| h.check(DEFAULT_HOOK_TIMEOUT)),
            },
            data: self.data,
        })
    }
}

fn check_ports(raw: Vec<RawPort>, plugin: bool) -> Result<Vec<PortSpec>, TomlError> {
    if raw.is_empty() {
        return Err(TomlError::at("ports", "a service needs at least one port"));
    }
    if raw.len() > ServiceManifest::MAX_PORTS {
        return Err(TomlError::at(
            "ports",
            format!(
                "{} ports; the limit is {}",
                raw.len(),
                ServiceManifest::MAX_PORTS
            ),
        ));
    }
    let several = raw.len() > 1;
    let mut ports: Vec<PortSpec> = Vec::with_capacity(raw.len());
    for (i, p) in raw.into_iter().enumerate() {
        let name = match p.name {
            Some(n) if valid_port_name(&n) => n,
            Some(n) => {
                return Err(TomlError::at(
                    format!("ports[{i}].name"),
                    format!(
                        "`{n}` is not a port name (lowercase letters, digits, `_`; starts with a letter; at most 32)"
                    ),
                ));
            }
            None if several => {
                return Err(TomlError::at(
                    format!("ports[{i}].name"),
                    "name every port when a service has more than one",
                ));
            }
            None => "main".to_owned(),
        };
        if p.port == 0 {
            return Err(TomlError::at(
                format!("ports[{i}].port"),
                "port 0 is not a port",
            ));
        }
        if plugin && p.protocol != Protocol::Http {
            return Err(TomlError::at(
                format!("ports[{i}].protocol"),
                "a plugin service is served over http",
            ));
        }
        if let Some(other) = ports.iter().find(|o| o.port == p.port || o.name == name) {
            return Err(TomlError::at(
                format!("ports[{i}]"),
                format!(
                    "port `{name}` ({}) repeats port `{}` ({})",
                    p.port, other.name, other.port
                ),
            ));
        }
        ports.push(PortSpec {
            name,
            port: p.port,
            protocol: p.protocol,
        });
    }
    Ok(ports)
}

fn check_health(raw: Option<RawHealth>, ports: &[PortSpec]) -> Result<HealthCheck, TomlError> {
    let first = &ports[0].name;
    let Some(h) = raw else {
        return Ok(HealthCheck {
            probe: Probe::Tcp {
                port: first.clone(),
            },
            interval: DEFAULT_HEALTH_INTERVAL,
            timeout: DEFAULT_HEALTH_TIMEOUT,
            retries: DEFAULT_HEALTH_RETRIES,
            start_grace: DEFAULT_START_GRACE,
        });
    };
    let named_port = |want: Option<Protocol>| -> Result<String, TomlError> {
        match &h.port {
            Some(name) => {
                let p = ports.iter().find(|p| &p.name == name).ok_or_else(|| {
                    TomlError::at("health.port", format!("there is no port named `{name}`"))
                })?;
                if want.is_some_and(|w| w != p.protocol) {
                    return Err(TomlError::at(
                        "health.port",
                        format!("port `{name}` is not an http port"),
                    ));
                }
                Ok(name.clone())
            }
            None => match want {
                None => Ok(first.clone()),
                Some(w) => ports
                    .iter()
                    .find(|p| p.protocol == w)
                    .map(|p| p.name.clone())
                    .ok_or_else(|| TomlError::at("health.http", "the service has no http port")),
            },
        }
    };
    let probe = match (&h.http, h.tcp, &h.command) {
        (Some(path), None, None) => {
            if !path.starts_with('/') || path.contains(char::is_whitespace) {
                return Err(TomlError::at(
                    "health.http",
                    format!("`{path}` is not a request path (starts with `/`, no spaces)"),
                ));
            }
            Probe::Http {
                port: named_port(Some(Protocol::Http))?,
                path: path.clone(),
            }
        }
        (None, Some(true), None) => Probe::Tcp {
            port: named_port(None)?,
        },
        (None, Some(false), None) => {
            return Err(TomlError::at(
                "health.tcp",
                "`tcp = false` selects no check; choose one of http, tcp or command",
            ));
        }
        (None, None, Some(command)) => {
            if h.port.is_some() {
                return Err(TomlError::at("health.port", "a command check uses no port"));
            }
            Probe::Command(command.clone())
        }
        (None, None, None) => Probe::Tcp {
            port: named_port(None)?,
        },
        _ => {
            return Err(TomlError::at(
                "health",
                "choose one check: http, tcp or command",
            ));
        }
    };
    if h.retries == Some(0) {
        return Err(TomlError::at("health.retries", "must be at least 1"));
    }
    Ok(HealthCheck {
        probe,
        interval: h.interval.map_or(DEFAULT_HEALTH_INTERVAL, |d| d.0),
        timeout: h.timeout.map_or(DEFAULT_HEALTH_TIMEOUT, |d| d.0),
        retries: h.retries.unwrap_or(DEFAULT_HEALTH_RETRIES),
        start_grace: h.start_grace.map_or(DEFAULT_START_GRACE, |d| d.0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str =
        "name = \"orders\"\n[run]\ncommand = [\"./orders\"]\n[[ports]]\nport = 8080\n";

    fn err(text: &str) -> TomlError {
        match ServiceManifest::parse(text) {
            Err(ManifestError::Toml(e)) => e,
            other => panic!("expected a TOML error, got {other:?}"),
        }
    }

    #[test]
    fn services_of_one_image_need_distinct_ports() {
        let manifest = |name: &str, ports: &[u16]| {
            let mut text = format!("name = \"{name}\"\n[run]\ncommand = [\"./x\"]\n");
            for (i, port) in ports.iter().enumerate() {
                text.push_str(&format!("[[ports]]\nname = \"p{i}\"\nport = {port}\n"));
            }
            (
                ServiceName::new(name).unwrap(),
                ServiceManifest::parse(&text).unwrap(),
            )
        };
        let (a, b, c) = (
            manifest("alpha", &[8080, 9000]),
            manifest("beta", &[8081]),
            manifest("gamma", &[7000, 9000]),
        );
        assert_eq!(distinct_ports([(&a.0, &a.1), (&b.0, &b.1)]), Ok(()));
        let clash = distinct_ports([(&c.0, &c.1), (&b.0, &b.1), (&a.0, &a.1)]).unwrap_err();
        assert_eq!(
            clash,
            PortClash {
                port: 9000,
                first: a.0.clone(),
                second: c.0.clone()
            }
        );
        let text = clash.to_string();
        assert!(
            text.contains("`alpha` and `gamma` both want public port 9000"),
            "{text}"
        );
    }

    #[test]
    fn minimal_manifest_gets_every_default() {
        let m = ServiceManifest::parse(MINIMAL).unwrap();
        assert_eq!(m.name().as_str(), "orders");
        assert_eq!(
            m.kind(),
            &ServiceKind::Process {
                command: Command(vec!["./orders".into()])
            }
        );
        assert!(m.build().is_none());
        assert_eq!(
            m.ports(),
            [PortSpec {
                name: "main".into(),
                port: 8080,
                protocol: Protocol::Http
            }]
        );
        assert_eq!(
            m.health(),
            &HealthCheck {
                probe: Probe::Tcp {
                    port: "main".into()
                },
                interval: DEFAULT_HEALTH_INTERVAL,
                timeout: DEFAULT_HEALTH_TIMEOUT,
                retries: DEFAULT_HEALTH_RETRIES,
                start_grace: DEFAULT_START_GRACE,
            }
        );
        assert!(m.env().is_empty());
        assert_eq!(
            m.stop(),
            &StopPolicy {
                signal: StopSignal::Term,
                grace: DEFAULT_STOP_GRACE
            }
        );
        assert_eq!(m.restart(), RestartPolicy::OnFailure);
        assert!(m.overlap());
        assert_eq!(m.hooks(), &Hooks::default());
        assert!(m.data().is_empty());
    }

    #[test]
    fn full_manifest() {
        let text = r#"
name = "orders"
kind = "process"
restart = "always"
overlap = false
data = ["data", "uploads/big"]

[build]
command = ["cargo", "build", "--release"]
timeout = "2m30s"

[run]
command = ["./target/release/orders", "--flag"]

[[ports]]
name = "web"
port = 8080

[[ports]]
name = "raw_db"
port = 5432
protocol = "tcp"

[health]
http = "/healthz"
interval = "500ms"
timeout = "1s"
retries = 5
start_grace = "1m"

[env]
RUST_LOG = "debug"

[stop]
signal = "SIGINT"
grace = "3s"

[hooks]
pre_swap = { command = ["./migrate", "up"] }
post_swap = { command = ["./notify"], timeout = "10s" }
"#;
        let m = ServiceManifest::parse(text).unwrap();
        assert_eq!(m.restart(), RestartPolicy::Always);
        assert!(!m.overlap());
        assert_eq!(m.data().len(), 2);
        let b = m.build().unwrap();
        assert_eq!(b.command.argv(), ["cargo", "build", "--release"]);
        assert_eq!(b.timeout, Duration::from_secs(150));
        let ServiceKind::Process { command } = m.kind() else {
            panic!()
        };
        assert_eq!(command.program(), "./target/release/orders");
        assert_eq!(command.args(), ["--flag"]);
        assert_eq!(m.ports()[1].protocol, Protocol::Tcp);
        assert_eq!(
            m.health().probe,
            Probe::Http {
                port: "web".into(),
                path: "/healthz".into()
            }
        );
        assert_eq!(m.health().interval, Duration::from_millis(500));
        assert_eq!(m.health().retries, 5);
        assert_eq!(m.health().start_grace, Duration::from_secs(60));
        assert_eq!(m.env()["RUST_LOG"], "debug");
        assert_eq!(m.stop().signal.number(), 2);
        assert_eq!(m.stop().grace, Duration::from_secs(3));
        let pre = m.hooks().pre_swap.as_ref().unwrap();
        assert_eq!(pre.timeout, DEFAULT_HOOK_TIMEOUT);
        assert_eq!(
            m.hooks().post_swap.as_ref().unwrap().timeout,
            Duration::from_secs(10)
        );
        m.check_service(&ServiceName::new("orders").unwrap())
            .unwrap();
        assert!(matches!(
            m.check_service(&ServiceName::new("payments").unwrap()),
            Err(ManifestError::WrongService { .. })
        ));
    }

    #[test]
    fn plugin_manifest() {
        let m = ServiceManifest::parse(
            "name = \"counter\"\nkind = \"plugin\"\n[run]\nlibrary = \"target/release/libcounter.so\"\n[[ports]]\nport = 9000\n",
        )
        .unwrap();
        assert_eq!(
            m.kind(),
            &ServiceKind::Plugin {
                library: RelPath::new("target/release/libcounter.so").unwrap()
            }
        );
    }

    /// Each bad document names the key at fault.
    #[test]
    fn errors_name_the_key() {
        let base = "name = \"orders\"\n";
        let run = "[run]\ncommand = [\"./o\"]\n";
        let port = "[[ports]]\nport = 8080\n";
        let cases: Vec<(String, &str, &str)> = vec![
            (
                format!("{base}{run}{port}colour = 1\n"),
                "ports[0].colour",
                "unknown field `colour`",
            ),
            (
                format!("{base}bogus = 1\n{run}{port}"),
                "bogus",
                "unknown field `bogus`",
            ),
            (format!("name = \"Orders\"\n{run}{port}"), "name", "`O`"),
            (
                format!("{base}kind = \"lambda\"\n{run}{port}"),
                "kind",
                "unknown variant",
            ),
            (
                format!("{base}[run]\ncommand = []\n{port}"),
                "run.command",
                "at least the program",
            ),
            (
                format!("{base}[run]\n{port}"),
                "run.command",
                "needs a run command",
            ),
            (
                format!("{base}kind = \"plugin\"\n{run}{port}"),
                "run.library",
                "needs the path",
            ),
            (
                format!("{base}kind = \"plugin\"\n[run]\nlibrary = \"../x.so\"\n{port}"),
                "run.library",
                "`..`",
            ),
            (format!("{base}{run}"), "", "missing field `ports`"),
            (
                format!("{base}ports = []\n{run}"),
                "ports",
                "at least one port",
            ),
            (
                format!("{base}{run}[[ports]]\nport = 0\n"),
                "ports[0].port",
                "port 0",
            ),
            (
                format!("{base}{run}[[ports]]\nport = 70000\n"),
                "ports[0].port",
                "invalid value",
            ),
            (
                format!("{base}{run}[[ports]]\nport = 1\nprotocol = \"udp\"\n"),
                "ports[0].protocol",
                "unknown variant",
            ),
            (
                format!("{base}{run}[[ports]]\nname = \"a\"\nport = 1\n[[ports]]\nport = 2\n"),
                "ports[1].name",
                "name every port",
            ),
            (
                format!(
                    "{base}{run}[[ports]]\nname = \"a\"\nport = 1\n[[ports]]\nname = \"b\"\nport = 1\n"
                ),
                "ports[1]",
                "repeats",
            ),
            (
                format!("{base}{run}[[ports]]\nname = \"Web\"\nport = 1\n"),
                "ports[0].name",
                "not a port name",
            ),
            (
                format!("{base}{run}{port}[health]\nhttp = \"/h\"\ntcp = true\n"),
                "health",
                "choose one check",
            ),
            (
                format!("{base}{run}{port}[health]\nhttp = \"h\"\n"),
                "health.http",
                "not a request path",
            ),
            (
                format!(
                    "{base}{run}[[ports]]\nport = 1\nprotocol = \"tcp\"\n[health]\nhttp = \"/h\"\n"
                ),
                "health.http",
                "no http port",
            ),
            (
                format!("{base}{run}{port}[health]\ntcp = true\nport = \"nope\"\n"),
                "health.port",
                "no port named",
            ),
            (
                format!("{base}{run}{port}[health]\ntcp = false\n"),
                "health.tcp",
                "selects no check",
            ),
            (
                format!("{base}{run}{port}[health]\nretries = 0\n"),
                "health.retries",
                "at least 1",
            ),
            (
                format!("{base}{run}{port}[health]\ninterval = \"soon\"\n"),
                "health.interval",
                "not a duration",
            ),
            (
                format!("{base}{run}{port}[health]\ntimeout = \"0s\"\n"),
                "health.timeout",
                "zero",
            ),
            (
                format!("{base}{run}{port}[health]\ntimeout = \"25h\"\n"),
                "health.timeout",
                "24h",
            ),
            (
                format!("{base}{run}{port}[env]\nPORT = \"1\"\n"),
                "env.PORT",
                "reserved",
            ),
            (
                format!("{base}{run}{port}[env]\nMOLT_X = \"1\"\n"),
                "env.MOLT_X",
                "reserved",
            ),
            (
                format!("{base}{run}{port}[env]\n\"1A\" = \"1\"\n"),
                "env.1A",
                "not an environment",
            ),
            (
                format!("{base}{run}{port}[stop]\nsignal = \"SIGSTOP\"\n"),
                "stop.signal",
                "unknown variant",
            ),
            (
                format!("{base}restart = \"sometimes\"\n{run}{port}"),
                "restart",
                "unknown variant",
            ),
            (
                format!("{base}overlap = \"yes\"\n{run}{port}"),
                "overlap",
                "invalid type",
            ),
            (
                format!("{base}data = [\"a\", \"a/b\"]\n{run}{port}"),
                "data[1]",
                "covered by `a`",
            ),
            (
                format!("{base}data = [\"/var/lib\"]\n{run}{port}"),
                "data[0]",
                "absolute",
            ),
            (
                format!("{base}{run}{port}[hooks]\npre_swap = {{ command = [\"\"] }}\n"),
                "hooks.pre_swap.command",
                "empty",
            ),
            (
                format!("{base}{run}{port}[hooks]\nlater = {{ command = [\"x\"] }}\n"),
                "hooks.later",
                "unknown field `later`",
            ),
            (
                format!("{base}{run}{port}[build]\ntimeout = \"1m\"\n"),
                "build",
                "missing field `command`",
            ),
        ];
        let mut failures = Vec::new();
        for (text, key, message) in cases {
            let e = err(&text);
            if e.key != key || !e.message.contains(message) {
                failures.push(format!(
                    "for\n{text}\nwanted key `{key}` and {message:?}, got {e}\n"
                ));
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    #[test]
    fn refuses_oversized_documents() {
        let text = format!("{MINIMAL}# {}\n", "x".repeat(ServiceManifest::MAX_LEN));
        assert!(matches!(
            ServiceManifest::parse(&text),
            Err(ManifestError::TooLarge { .. })
        ));
    }

    #[test]
    fn durations() {
        assert_eq!(
            parse_duration("1h2m3s4ms"),
            Ok(Duration::from_millis(3_723_004))
        );
        assert_eq!(parse_duration("24h"), Ok(MAX_DURATION));
        for bad in [
            "",
            "s",
            "10",
            "10x",
            "1.5s",
            "-1s",
            "1 s",
            "99999999999999999999s",
            "1s1s",
            "30s1m",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }
}
