//! The shell protocol: commands an instance's shell serves to the portal and to
//! deployers.
//!
//! Each request is one stream with one [`ShellRequest`] frame; the shell answers
//! with zero or more [`ShellResponse::Progress`] frames (an upgrade reporting its
//! steps as they happen) and then one final [`ShellReply`] frame ([`call`] reads
//! them). Command handling does not depend on who opened the
//! connection, so the same requests can later travel over the connection a shell
//! opens to the portal. Allowed for the portal and for users with the deployer or
//! admin grant ([`allowed`]).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use image_spec::{CommitId, ImageId, ImageName, ServiceName, Timestamp};

use crate::identity::{Grant, Identity};
pub use crate::plan::{StepEvent, StepTime, UpgradePlan};
use crate::portal::DeploymentId;
use crate::repo::RemoteError;

/// A command to a shell.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ShellRequest {
    /// Bring the instance to an image.
    Upgrade {
        /// The image: its name, or its id or an abbreviation of it (≥ 8 hex).
        image: ImageName,
        /// How; `None`: the instance's default.
        strategy: Option<Strategy>,
        /// The portal's deployment this upgrade belongs to: asked again with the
        /// same id, the shell answers with what that upgrade did instead of
        /// upgrading again (see [`crate::portal`]).
        deployment: Option<DeploymentId>,
        /// Leave out the services' `pre_swap` and `post_swap` hooks.
        skip_hooks: bool,
        /// Keep at least this many releases of each service afterwards, so a
        /// rollback that far back fetches and builds nothing; `None`: the
        /// shell's default.
        keep_releases: Option<u32>,
    },
    /// What an upgrade to the image would do, without doing it: the exact plan
    /// the upgrade would carry out.
    Plan {
        /// The image, as for `Upgrade`.
        image: ImageName,
        /// How; `None`: the instance's default.
        strategy: Option<Strategy>,
        /// Leave out the hooks, as for `Upgrade`.
        skip_hooks: bool,
    },
    /// The instance's state.
    Status,
    /// Go back to an earlier generation (its releases are reused: nothing is
    /// fetched or built).
    Rollback {
        /// How; `None`: the instance's default.
        strategy: Option<Strategy>,
        /// Which generation; `None`: the one before the current.
        to: Option<u64>,
        /// The portal's deployment this rollback belongs to (as for `Upgrade`).
        deployment: Option<DeploymentId>,
    },
    /// A service's log: the last `tail` lines, or (with `from`) everything after
    /// that byte offset, for following.
    Logs {
        /// The service.
        service: ServiceName,
        /// Which log.
        source: LogSource,
        /// How many lines, when `from` is `None`.
        tail: u32,
        /// Continue from this offset (the `next` of the previous answer).
        from: Option<u64>,
        /// Only lines stamped at or after this time (seconds since the epoch).
        since: Option<i64>,
    },
    /// Bring one service to a revision (branch, full or abbreviated commit id);
    /// development and quality instances only. A commit that differs from the
    /// instance's image becomes an [`Overlay`].
    Pull {
        /// The service.
        service: ServiceName,
        /// The revision.
        rev: String,
        /// The person the portal pulls for (`None` from a user: the user).
        on_behalf_of: Option<String>,
    },
    /// Bring overlaid services back to the instance's image: one service, or
    /// (`None`) every service; development and quality instances only.
    Reset {
        /// The service; `None`: all of them.
        service: Option<ServiceName>,
        /// The person the portal resets for (`None` from a user: the user).
        on_behalf_of: Option<String>,
    },
}

impl ShellRequest {
    /// Whether the request is a pull or a reset: the commands developers may
    /// send, to development and quality instances only.
    pub fn is_developers(&self) -> bool {
        matches!(self, ShellRequest::Pull { .. } | ShellRequest::Reset { .. })
    }
}

/// A service an instance runs at another commit than its image's: pulled or
/// watched onto a development or quality instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Overlay {
    /// The commit it runs.
    pub commit: CommitId,
    /// The revision it was pulled as (`dev/ada`, a commit id).
    pub rev: String,
    /// Who pulled it.
    pub by: String,
    /// When it was first pulled onto the instance (later pulls by the same
    /// person of the same revision keep it).
    pub since: Timestamp,
}

/// The instance's overlays, by service.
pub type Overlays = BTreeMap<ServiceName, Overlay>;

/// An instance's stage: what it may take, and how it upgrades by default.
///
/// In JSON and on the command line: `development`, `quality`, `staging`,
/// `production`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Stage {
    /// A developer's instance: takes pulls.
    Development,
    /// A QA instance: takes pulls.
    Quality,
    /// Takes images only.
    Staging,
    /// Takes images only.
    Production,
}

impl Stage {
    /// The strategy an instance of this stage uses by default: production swaps
    /// whole generations (`shadow`), the others go service by service.
    pub fn default_strategy(self) -> Strategy {
        match self {
            Stage::Production => Strategy::Shadow,
            Stage::Development | Stage::Quality | Stage::Staging => Strategy::InPlace,
        }
    }

    /// Staging and production take images only, and once attached to a portal,
    /// only from it.
    pub fn is_guarded(self) -> bool {
        matches!(self, Stage::Staging | Stage::Production)
    }
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Stage::Development => "development",
            Stage::Quality => "quality",
            Stage::Staging => "staging",
            Stage::Production => "production",
        })
    }
}

impl std::str::FromStr for Stage {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "development" => Ok(Stage::Development),
            "quality" => Ok(Stage::Quality),
            "staging" => Ok(Stage::Staging),
            "production" => Ok(Stage::Production),
            other => Err(format!(
                "unknown stage `{other}` (development, quality, staging or production)"
            )),
        }
    }
}

/// Which of a service's logs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LogSource {
    /// The log of its running process (of the generation it runs in).
    #[default]
    Running,
    /// The log of its processes in generation N.
    Generation(u64),
    /// The build log of the commit it runs.
    Build,
}

/// How an upgrade brings a new generation in.
///
/// In JSON it is spelled as on the command line (`in-place`, `shadow`,
/// `shadow-full`), like its `Display`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    /// Service by service: each changed service's new process starts beside its
    /// old one and takes its traffic once healthy.
    #[default]
    InPlace,
    /// The whole new generation starts beside the running one, is health-checked
    /// as a whole, and takes every service's traffic in one cutover.
    Shadow,
    /// Like `Shadow`, but the unchanged services start as fresh processes too,
    /// on copies of every service's data directories: a complete copy of the
    /// instance.
    ShadowFull,
}

impl std::fmt::Display for Strategy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Strategy::InPlace => "in-place",
            Strategy::Shadow => "shadow",
            Strategy::ShadowFull => "shadow-full",
        })
    }
}

impl std::str::FromStr for Strategy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "in-place" => Ok(Strategy::InPlace),
            "shadow" => Ok(Strategy::Shadow),
            "shadow-full" => Ok(Strategy::ShadowFull),
            other => Err(format!(
                "unknown strategy `{other}` (in-place, shadow or shadow-full)"
            )),
        }
    }
}

/// Where a generation is in its life; in JSON as its `Display` (`serving`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// Its new processes are starting.
    Starting,
    /// Every new process passed its health check; no traffic yet.
    Healthy,
    /// It takes the instance's traffic.
    Serving,
    /// Traffic moved on; requests in flight finish on it.
    Draining,
    /// Its processes are stopped; its releases stay on disk.
    Stopped,
    /// It never served: a start, health check or hook failed.
    Failed,
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Phase::Starting => "starting",
            Phase::Healthy => "healthy",
            Phase::Serving => "serving",
            Phase::Draining => "draining",
            Phase::Stopped => "stopped",
            Phase::Failed => "failed",
        })
    }
}

/// One generation's phase.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GenerationPhase {
    /// The generation's number (the one it is or would be recorded as).
    pub number: u64,
    /// Its phase.
    pub phase: Phase,
}

/// An image as an instance names it: by name and by id (`{"name": …, "id": …}`
/// in JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRef {
    /// The image's name.
    pub name: ImageName,
    /// Its id.
    pub id: ImageId,
}

impl From<(ImageName, ImageId)> for ImageRef {
    fn from((name, id): (ImageName, ImageId)) -> Self {
        Self { name, id }
    }
}

/// One service on an instance, as `status` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceStatus {
    /// The installed commit.
    pub commit: CommitId,
    /// The process id, if running.
    pub pid: Option<u32>,
    /// The process's state (`running`, `restarting in …`, `exited: …`, `stopped`).
    pub state: String,
    /// What its health probes say (`healthy`, `failing (N in a row): …`, `unknown`).
    pub health: String,
    /// Seconds since the running process started.
    pub uptime_secs: Option<u64>,
    /// How many times it was restarted.
    pub restarts: u32,
    /// Public address per port name.
    pub ports: BTreeMap<String, String>,
}

/// An instance's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceStatus {
    /// The instance's name.
    pub instance: String,
    /// Its stage.
    pub stage: String,
    /// The image it runs, if any.
    pub image: Option<ImageRef>,
    /// Its services.
    pub services: BTreeMap<ServiceName, ServiceStatus>,
    /// Upgrades waiting for the one running (0 when idle).
    pub queued: u32,
    /// Whether an upgrade is running now.
    pub upgrading: bool,
    /// The last recorded generation.
    pub generation: u64,
    /// The strategy upgrades use unless told otherwise.
    pub strategy: Strategy,
    /// The latest generations' phases, oldest first.
    pub lifecycle: Vec<GenerationPhase>,
    /// Why the last generation that failed did, if one did.
    pub last_failure: Option<String>,
    /// The services that run another commit than the image's (empty on an
    /// instance that runs its image).
    pub overlays: Overlays,
}

/// What an upgrade did, per service, and where it spent its time.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpgradeSummary {
    /// Services (re)started or swapped.
    pub restarted: Vec<ServiceName>,
    /// Services left untouched.
    pub unchanged: Vec<ServiceName>,
    /// Services stopped because the image no longer has them.
    pub removed: Vec<ServiceName>,
    /// The generation recorded (none when nothing changed).
    pub generation: Option<u64>,
    /// Every step carried out, with its time.
    pub steps: Vec<StepTime>,
    /// Failures after the commit point (a drain cut short, a `post_swap` hook
    /// that failed): reported, not rolled back.
    pub warnings: Vec<String>,
    /// What the change was (`upgrade to shop-2`, `rollback to generation 3
    /// (image shop-1)`), as recorded with the generation.
    pub reason: String,
    /// The image the instance runs now, if it runs one.
    pub image: Option<ImageName>,
}

/// A successful answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ShellResponse {
    /// The upgrade (or rollback, or pull) is done and recorded.
    Upgraded(UpgradeSummary),
    /// What an upgrade would do, exactly.
    Plan(UpgradePlan),
    /// The instance's state.
    Status(InstanceStatus),
    /// Part of a service's log.
    Logs {
        /// The text.
        text: String,
        /// The offset to continue from.
        next: u64,
    },
    /// A note from a running upgrade (a data copy's progress, the queue); the
    /// final answer follows.
    Progress(Progress),
    /// A step of a running upgrade started, ended, failed or was undone; the
    /// final answer follows.
    Step(StepEvent),
}

/// A step of an upgrade, as it happens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// The service the step is about, if any.
    pub service: Option<ServiceName>,
    /// What is happening (`building`, `healthy; serving`, `recorded generation 3`).
    pub step: String,
}

impl std::fmt::Display for Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.service {
            Some(s) => write!(f, "{s}: {}", self.step),
            None => f.write_str(&self.step),
        }
    }
}

/// What a running command reports before its final answer.
#[derive(Debug, Clone, Copy)]
pub enum Update<'a> {
    /// A note.
    Progress(&'a Progress),
    /// A step's event.
    Step(&'a StepEvent),
}

/// Sends `req` on a new stream of `conn` and reads the answer: each progress or
/// step frame goes to `on_update`, and the final reply is returned.
pub async fn call(
    conn: &crate::endpoint::Connection,
    req: &ShellRequest,
    on_update: impl FnMut(Update<'_>),
) -> Result<ShellReply, crate::WireError> {
    call_on(conn.quinn(), &conn.peer().to_string(), req, on_update).await
}

/// [`call`] on any connection to a shell: the portal sends its commands on the
/// connection the shell dialled. `peer` names the shell in errors.
pub async fn call_on(
    conn: &quinn::Connection,
    peer: &str,
    req: &ShellRequest,
    mut on_update: impl FnMut(Update<'_>),
) -> Result<ShellReply, crate::WireError> {
    let (send, recv) = conn
        .open_bi()
        .await
        .map_err(|source| crate::WireError::Connection {
            peer: peer.to_owned(),
            source,
        })?;
    let mut s = crate::BiStream { send, recv };
    crate::codec::write_frame(&mut s.send, req).await?;
    // The stream may already be reset by the shell; the read below reports why.
    let _ = s.send.finish();
    loop {
        let reply: ShellReply =
            crate::codec::expect_frame(&mut s.recv, crate::codec::DEFAULT_FRAME_LIMIT).await?;
        match reply {
            Ok(ShellResponse::Progress(p)) => on_update(Update::Progress(&p)),
            Ok(ShellResponse::Step(e)) => on_update(Update::Step(&e)),
            other => return Ok(other),
        }
    }
}

/// The answer to a shell request.
pub type ShellReply = Result<ShellResponse, RemoteError>;

/// May `who` send `req` to a shell? The portal and users with the deployer or
/// admin grant anything; developers pulls and resets (which only development
/// and quality instances take) and the reads (`status`, `logs`).
pub fn allowed(who: &Identity, req: &ShellRequest) -> bool {
    match who {
        Identity::Portal => true,
        Identity::User { grant, .. } => match grant {
            Grant::Deployer | Grant::Admin => true,
            Grant::Developer => {
                req.is_developers()
                    || matches!(req, ShellRequest::Status | ShellRequest::Logs { .. })
            }
        },
        Identity::RepoServer | Identity::Shell { .. } => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Strategies and phases read in JSON as the CLI spells them, and an
    /// instance's image is an object.
    #[test]
    fn status_reads_in_the_clis_spelling() {
        for strategy in [Strategy::InPlace, Strategy::Shadow, Strategy::ShadowFull] {
            let json = serde_json::to_value(strategy).unwrap();
            assert_eq!(json, strategy.to_string());
            assert_eq!(serde_json::from_value::<Strategy>(json).unwrap(), strategy);
        }
        let phases = [
            Phase::Starting,
            Phase::Healthy,
            Phase::Serving,
            Phase::Draining,
            Phase::Stopped,
            Phase::Failed,
        ];
        for phase in phases {
            assert_eq!(serde_json::to_value(phase).unwrap(), phase.to_string());
        }
        let name = ImageName::new("shop-1").unwrap();
        let id = ImageId::from_bytes([3; 32]);
        let status = InstanceStatus {
            instance: "dev-1".into(),
            stage: "staging".into(),
            image: Some((name, id).into()),
            services: BTreeMap::new(),
            queued: 0,
            upgrading: false,
            generation: 1,
            strategy: Strategy::Shadow,
            lifecycle: vec![GenerationPhase {
                number: 1,
                phase: Phase::Serving,
            }],
            last_failure: None,
            overlays: Overlays::new(),
        };
        let json = serde_json::to_value(&status).unwrap();
        assert_eq!(
            json["image"],
            serde_json::json!({ "name": "shop-1", "id": id.to_string() })
        );
        assert_eq!(json["strategy"], "shadow");
        assert_eq!(json["lifecycle"][0]["phase"], "serving");
        assert_eq!(
            serde_json::from_value::<InstanceStatus>(json).unwrap(),
            status
        );
        let source = serde_json::to_value(LogSource::Generation(3)).unwrap();
        assert_eq!(source, serde_json::json!({ "generation": 3 }));
    }

    #[test]
    fn who_may_command_a_shell() {
        let id = |s: &str| s.parse::<Identity>().unwrap();
        let upgrade = ShellRequest::Upgrade {
            image: ImageName::new("shop-1").unwrap(),
            strategy: None,
            deployment: None,
            skip_hooks: false,
            keep_releases: None,
        };
        let pull = ShellRequest::Pull {
            service: ServiceName::new("hello").unwrap(),
            rev: "dev/a".into(),
            on_behalf_of: None,
        };
        let reset = ShellRequest::Reset {
            service: None,
            on_behalf_of: None,
        };
        let rollback = ShellRequest::Rollback {
            strategy: None,
            to: None,
            deployment: None,
        };
        for req in [&upgrade, &pull, &reset, &rollback, &ShellRequest::Status] {
            assert!(allowed(&id("portal"), req));
            assert!(allowed(&id("user/a/deployer"), req));
            assert!(allowed(&id("user/a/admin"), req));
            assert!(!allowed(&id("shell/dev-1"), req));
            assert!(!allowed(&id("repo-server"), req));
        }
        let developer = id("user/a/developer");
        assert!(allowed(&developer, &pull));
        assert!(allowed(&developer, &reset));
        assert!(allowed(&developer, &ShellRequest::Status));
        assert!(!allowed(&developer, &upgrade));
        assert!(!allowed(&developer, &rollback));
    }
}
