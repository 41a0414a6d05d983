//! Where a developer's pull, reset or watch goes: straight to an instance's
//! shell (`--instance`), or through the portal to a development or quality
//! target's instances (`--target`; also instances behind NAT, which the
//! portal reaches over the connections their shells dialled, and recorded in
//! the target's history).

use std::path::Path;

use anyhow::{Result, bail};
use serde_json::{Value, json};
use wire::shell::{ShellRequest, UpgradeSummary};

use crate::portal::{ApiRefused, PortalClient};

/// Where a pull or reset goes.
#[derive(Debug, Clone)]
pub(crate) enum Onto {
    /// Straight to this instance (NAME@ADDR, or a NAME under `[instances]`).
    Instance(String),
    /// Through the portal to this target's instances (or only one of them).
    Target {
        /// The target.
        target: String,
        /// Only this instance of it.
        instance: Option<String>,
    },
}

impl Onto {
    /// From `--instance` and `--target`: the target when given (then
    /// `--instance` picks one of its instances), else the instance.
    pub(crate) fn new(instance: Option<String>, target: Option<String>) -> Result<Self> {
        match (target, instance) {
            (Some(target), instance) => Ok(Onto::Target { target, instance }),
            (None, Some(instance)) => Ok(Onto::Instance(instance)),
            (None, None) => bail!(
                "name where: --instance NAME (straight to its shell) or --target NAME (through the portal)"
            ),
        }
    }

    /// How it reads in messages.
    pub(crate) fn describe(&self) -> String {
        match self {
            Onto::Instance(i) => i.clone(),
            Onto::Target {
                target,
                instance: None,
            } => format!("target {target}"),
            Onto::Target {
                target,
                instance: Some(i),
            } => format!("{i} of target {target}"),
        }
    }
}

/// The portal's answer to a pull or reset, read: each instance's summary, or
/// the first failure's message.
pub(crate) struct Answered {
    /// The whole answer (for `--json`).
    pub(crate) value: Value,
    /// Each instance that took it, with what changed.
    pub(crate) done: Vec<(String, UpgradeSummary)>,
    /// Each instance that did not, with why.
    pub(crate) failed: Vec<(String, String)>,
}

impl Answered {
    fn read(value: Value) -> Result<Self> {
        let mut done = Vec::new();
        let mut failed = Vec::new();
        if let Some(instances) = value["instances"].as_object() {
            for (name, a) in instances {
                if let Some(s) = a.get("summary") {
                    done.push((name.clone(), serde_json::from_value(s.clone())?));
                } else {
                    let message = a["error"]["message"].as_str().unwrap_or("failed");
                    failed.push((name.clone(), message.to_owned()));
                }
            }
        }
        Ok(Self {
            value,
            done,
            failed,
        })
    }

    /// Every failure, one paragraph per instance.
    pub(crate) fn why(&self) -> String {
        self.failed
            .iter()
            .map(|(i, m)| format!("{i}: {m}"))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// `POST /targets/{target}/pull`; `watch`: the watch run it is a cycle of.
pub(crate) async fn pull_via_portal(
    client: &PortalClient,
    target: &str,
    instance: Option<&str>,
    service: &str,
    rev: &str,
    watch: Option<u64>,
) -> Result<Answered> {
    let body = json!({ "service": service, "rev": rev, "instance": instance, "watch": watch });
    let path = format!(
        "/api/v1/targets/{}/pull",
        image_spec::TargetName::new(target)?
    );
    Answered::read(client.call("POST", &path, Some(&body)).await?)
}

/// `POST /targets/{target}/watches`: a new watch run's number.
pub(crate) async fn open_watch(
    client: &PortalClient,
    target: &str,
    service: &str,
    branch: &str,
) -> Result<u64> {
    let body = json!({ "service": service, "branch": branch });
    let path = format!(
        "/api/v1/targets/{}/watches",
        image_spec::TargetName::new(target)?
    );
    let run = client.call("POST", &path, Some(&body)).await?;
    run["id"]
        .as_u64()
        .ok_or_else(|| anyhow::anyhow!("the portal answered a watch run without its number"))
}

/// `POST /watches/{id}/end`.
pub(crate) async fn end_watch(client: &PortalClient, id: u64) -> Result<()> {
    client
        .call("POST", &format!("/api/v1/watches/{id}/end"), None)
        .await
        .map(drop)
}

/// Is `e` the portal's refusal with this HTTP status?
pub(crate) fn refused_with(e: &anyhow::Error, status: u16) -> bool {
    e.downcast_ref::<ApiRefused>()
        .is_some_and(|r| r.status == status)
}

/// `molt pull SERVICE[@REV] --instance I | --target T` and
/// `molt reset [SERVICE] --instance I | --target T`.
pub(crate) async fn change(
    config: Option<&Path>,
    portal_url: Option<&str>,
    onto: Onto,
    req: ShellRequest,
    json: bool,
) -> Result<()> {
    let (target, instance) = match onto {
        Onto::Instance(i) => return crate::instance::change(config, &i, req, json).await,
        Onto::Target { target, instance } => (target, instance),
    };
    let client = PortalClient::open(config, portal_url)?;
    let (answered, what) = match &req {
        ShellRequest::Pull { service, rev, .. } => (
            pull_via_portal(
                &client,
                &target,
                instance.as_deref(),
                service.as_str(),
                rev,
                None,
            )
            .await?,
            format!("pulled {service}@{rev} onto"),
        ),
        ShellRequest::Reset { service, .. } => {
            let body = json!({ "service": service, "instance": instance });
            let path = format!(
                "/api/v1/targets/{}/reset",
                image_spec::TargetName::new(&target)?
            );
            let what = match service {
                Some(s) => format!("reset {s} to the image on"),
                None => "reset to the image:".to_owned(),
            };
            (
                Answered::read(client.call("POST", &path, Some(&body)).await?)?,
                what,
            )
        }
        other => bail!("internal: {other:?} does not go through the portal this way"),
    };
    if json {
        println!("{}", answered.value);
    } else {
        for (instance, summary) in &answered.done {
            crate::instance::print_summary(&format!("{what} {instance}:"), summary);
        }
    }
    if !answered.failed.is_empty() {
        bail!("{}", answered.why());
    }
    Ok(())
}
