//! The developer loop through the portal: pulls and resets onto a target's
//! development and quality instances (also those behind NAT: the portal
//! reaches them over the connection their shells dialled), watch runs
//! ([`crate::watch`]), and an instance's live status with its overlays and
//! drift.
//!
//! A pull or reset is sent to each shell on the person's behalf
//! (`on_behalf_of`), so the overlay it leaves names them. Developers may do
//! both on development and quality targets only (the grant check of a
//! deployment); staging and production targets refuse them before any shell
//! is asked, as their shells would.

use std::collections::BTreeMap;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use image_spec::{BranchName, CommitId, InstanceName, ServiceName, TargetName};
use serde::{Deserialize, Serialize};
use wire::repo::RemoteError;
use wire::shell::{InstanceStatus, Overlay, ShellRequest, ShellResponse, UpgradeSummary};

use super::{ApiError, ApiResult, Caller, Shared, parse, target_name};
use crate::auth::Principal;
use crate::deployment::now_ms;
use crate::target::Target;
use crate::watch::{NewWatch, WatchCycle, WatchRun};

/// `POST /targets/{name}/pull`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PullInput {
    service: ServiceName,
    /// A branch, a commit id or an abbreviation of one.
    rev: String,
    /// Only this instance of the target.
    instance: Option<InstanceName>,
    /// The watch run this pull is a cycle of.
    watch: Option<u64>,
}

/// `POST /targets/{name}/reset`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ResetInput {
    /// Only this microservice (else every one).
    service: Option<ServiceName>,
    /// Only this instance of the target.
    instance: Option<InstanceName>,
}

/// `POST /targets/{name}/watches`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct WatchInput {
    service: ServiceName,
    branch: BranchName,
}

/// How one instance took a pull or reset.
#[derive(Debug, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum InstanceAnswer {
    /// Done: what changed.
    Summary(UpgradeSummary),
    /// Refused or failed (a failed build carries its error lines).
    Error(RemoteError),
}

/// The answer to a pull or reset.
#[derive(Debug, Serialize)]
pub(crate) struct ChangeAnswer {
    /// Every instance took it.
    ok: bool,
    /// The commit the revision resolved to (pulls).
    commit: Option<CommitId>,
    /// Each instance's answer, in the target's order.
    instances: BTreeMap<InstanceName, InstanceAnswer>,
    /// The watch run, with this cycle (pulls that name one).
    watch: Option<WatchRun>,
}

/// The target, checked to take pulls from `who`: they may deploy there, and
/// it is a development or quality target.
async fn dev_target(api: &super::Api, who: &Principal, name: &TargetName) -> ApiResult<Target> {
    let target = api.target(name).await?;
    who.require_deploy(&target.name, target.stage)?;
    if target.stage.is_guarded() {
        return Err(ApiError::forbidden(
            "stage",
            format!(
                "`{}` is a {} target: it takes images (deploy), not pulls or resets",
                target.name, target.stage
            ),
        ));
    }
    Ok(target)
}

/// Sends `req` to each of `instances` in turn.
async fn send_each(
    api: &super::Api,
    instances: &[InstanceName],
    req: &ShellRequest,
) -> BTreeMap<InstanceName, InstanceAnswer> {
    let mut out = BTreeMap::new();
    for instance in instances {
        let answer = match api.portal.shells.call(instance, req, |_| {}).await {
            Ok(Ok(ShellResponse::Upgraded(summary))) => InstanceAnswer::Summary(summary),
            Ok(Ok(other)) => InstanceAnswer::Error(RemoteError::new(
                wire::repo::ErrorKind::Internal,
                format!("the shell answered with something else: {other:?}"),
            )),
            Ok(Err(e)) => InstanceAnswer::Error(e),
            Err(e) => InstanceAnswer::Error(RemoteError::new(
                wire::repo::ErrorKind::Internal,
                e.to_string(),
            )),
        };
        out.insert(instance.clone(), answer);
    }
    out
}

fn all_ok(answers: &BTreeMap<InstanceName, InstanceAnswer>) -> bool {
    answers
        .values()
        .all(|a| matches!(a, InstanceAnswer::Summary(_)))
}

/// The first failure, as a line for the watch run.
fn first_error(answers: &BTreeMap<InstanceName, InstanceAnswer>) -> Option<String> {
    answers.iter().find_map(|(i, a)| match a {
        InstanceAnswer::Error(e) => Some(format!("{i}: {}", e.message)),
        InstanceAnswer::Summary(_) => None,
    })
}

pub(super) async fn pull(
    State(api): Shared,
    caller: Caller,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<impl IntoResponse> {
    let who = api.principal(&caller).await?;
    let target = dev_target(&api, &who, &target_name(&name)?).await?;
    let input: PullInput = parse(&body)?;
    let instances = super::pick_instances(&target, input.instance.as_ref())?;
    if let Some(id) = input.watch {
        let run = api
            .portal
            .store
            .watch(id)
            .await?
            .ok_or_else(|| ApiError::bad("watch", format!("no watch run {id}")))?;
        if run.target != target.name || run.by != who.user || run.service != input.service {
            return Err(ApiError::bad(
                "watch",
                format!(
                    "watch run {id} is {}'s of {} on `{}`",
                    run.by, run.service, run.target
                ),
            ));
        }
        if run.ended.is_some() {
            return Err(ApiError::conflict(format!(
                "watch run {id} has ended; open a new one"
            )));
        }
    }
    let repo = api.repo().await?;
    let commit = repo
        .resolve(&input.service, &input.rev)
        .await
        .map_err(|e| {
            ApiError::bad(
                "rev",
                format!("`{}@{}` does not resolve: {e}", input.service, input.rev),
            )
        })?;
    let started = Instant::now();
    let req = ShellRequest::Pull {
        service: input.service.clone(),
        rev: input.rev.clone(),
        on_behalf_of: Some(who.user.to_string()),
    };
    let answers = send_each(&api, &instances, &req).await;
    let millis = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    let watch = match input.watch {
        None => None,
        Some(id) => {
            let cycle = WatchCycle {
                number: 0,
                at: now_ms(),
                commit: Some(commit),
                instances: instances.clone(),
                millis,
                error: first_error(&answers),
            };
            // Ended while this pull ran (an admin ended it): the pull stands,
            // and the watch opens a new run at its next cycle.
            match api.portal.store.watch_cycle(id, cycle).await {
                Ok(run) => Some(run),
                Err(crate::store::StoreError::Watch(crate::watch::WatchError::Ended(_))) => None,
                Err(e) => return Err(e.into()),
            }
        }
    };
    let names: Vec<String> = instances.iter().map(ToString::to_string).collect();
    api.audit(
        &who,
        "instance.pull",
        format!("target {}", target.name),
        format!(
            "{}@{} ({}) onto {}{}{}",
            input.service,
            input.rev,
            commit.short(12),
            names.join(", "),
            input
                .watch
                .map(|w| format!(", watch run {w}"))
                .unwrap_or_default(),
            first_error(&answers)
                .map(|e| format!("; failed: {e}"))
                .unwrap_or_default()
        ),
    )
    .await;
    Ok(axum::Json(ChangeAnswer {
        ok: all_ok(&answers),
        commit: Some(commit),
        instances: answers,
        watch,
    }))
}

pub(super) async fn reset(
    State(api): Shared,
    caller: Caller,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<impl IntoResponse> {
    let who = api.principal(&caller).await?;
    let target = dev_target(&api, &who, &target_name(&name)?).await?;
    let input: ResetInput = match body.is_empty() {
        true => ResetInput::default(),
        false => parse(&body)?,
    };
    let instances = super::pick_instances(&target, input.instance.as_ref())?;
    let req = ShellRequest::Reset {
        service: input.service.clone(),
        on_behalf_of: Some(who.user.to_string()),
    };
    let answers = send_each(&api, &instances, &req).await;
    let names: Vec<String> = instances.iter().map(ToString::to_string).collect();
    api.audit(
        &who,
        "instance.reset",
        format!("target {}", target.name),
        format!(
            "{} onto {}{}",
            input
                .service
                .as_ref()
                .map_or("every microservice".to_owned(), ToString::to_string),
            names.join(", "),
            first_error(&answers)
                .map(|e| format!("; failed: {e}"))
                .unwrap_or_default()
        ),
    )
    .await;
    Ok(axum::Json(ChangeAnswer {
        ok: all_ok(&answers),
        commit: None,
        instances: answers,
        watch: None,
    }))
}

pub(super) async fn open_watch(
    State(api): Shared,
    caller: Caller,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<impl IntoResponse> {
    let who = api.principal(&caller).await?;
    let target = dev_target(&api, &who, &target_name(&name)?).await?;
    let input: WatchInput = parse(&body)?;
    let run = api
        .portal
        .store
        .open_watch(
            NewWatch {
                target: target.name.clone(),
                service: input.service,
                branch: input.branch,
                by: who.user.clone(),
            },
            now_ms(),
        )
        .await?;
    api.audit(
        &who,
        "watch.open",
        format!("watch run {}", run.id),
        format!("target {}, {} from {}", run.target, run.service, run.branch),
    )
    .await;
    Ok((StatusCode::CREATED, axum::Json(run)))
}

pub(super) async fn end_watch(
    State(api): Shared,
    caller: Caller,
    Path(id): Path<u64>,
) -> ApiResult<impl IntoResponse> {
    let who = api.principal(&caller).await?;
    let run = api
        .portal
        .store
        .watch(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no watch run {id}")))?;
    if run.by != who.user && who.grant != wire::Grant::Admin {
        return Err(ApiError::forbidden(
            "forbidden",
            format!(
                "watch run {id} is {}'s; only they or an admin may end it",
                run.by
            ),
        ));
    }
    let run = api.portal.store.end_watch(id, now_ms()).await?;
    api.audit(
        &who,
        "watch.end",
        format!("watch run {id}"),
        format!(
            "target {}, {} cycles, {} failed",
            run.target, run.cycles, run.failed
        ),
    )
    .await;
    Ok(axum::Json(run))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct WatchesQuery {
    limit: Option<usize>,
}

/// The newest watch runs of a target (`GET /targets/{name}/watches`, the
/// History tab).
pub(crate) async fn target_watches(
    api: &super::Api,
    who: &Principal,
    target: &TargetName,
    limit: usize,
) -> ApiResult<Vec<WatchRun>> {
    who.require_scope(target)?;
    api.target(target).await?;
    Ok(api.portal.store.watches(target, limit).await?)
}

pub(super) async fn list_watches(
    State(api): Shared,
    caller: Caller,
    Path(name): Path<String>,
    Query(q): Query<WatchesQuery>,
) -> ApiResult<impl IntoResponse> {
    let who = api.principal(&caller).await?;
    let limit = q.limit.unwrap_or(20);
    if !(1..=200).contains(&limit) {
        return Err(ApiError::bad("limit", "limit is 1 to 200"));
    }
    let runs = target_watches(&api, &who, &target_name(&name)?, limit).await?;
    Ok(axum::Json(runs))
}

/// A microservice whose running commit is not the target's image's.
#[derive(Debug, Serialize)]
pub(crate) struct Drift {
    /// What runs.
    pub(crate) runs: CommitId,
    /// What the target's current image has (`None`: it has no such
    /// microservice, or the target has no current image).
    pub(crate) image: Option<CommitId>,
    /// Who pulled it there, from which revision, since when (`None`: not
    /// pulled; another image, say).
    pub(crate) overlay: Option<Overlay>,
}

/// `GET /instances/{name}/status`.
#[derive(Debug, Serialize)]
pub(crate) struct StatusAnswer {
    target: Option<TargetName>,
    /// The target's current image (its newest succeeded deployment's).
    current_image: Option<String>,
    status: InstanceStatus,
    drift: BTreeMap<ServiceName, Drift>,
}

/// An instance's status from its shell (10 s at most), or why there is
/// none: what the API's instance status and the Overview tab show.
pub(crate) async fn shell_status(
    api: &super::Api,
    instance: &InstanceName,
) -> Result<InstanceStatus, String> {
    let answer = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        api.portal
            .shells
            .call(instance, &ShellRequest::Status, |_| {}),
    )
    .await;
    match answer {
        Ok(Ok(Ok(ShellResponse::Status(s)))) => Ok(s),
        Ok(Ok(Ok(other))) => Err(format!("unexpected answer {other:?}")),
        Ok(Ok(Err(e))) => Err(e.message),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("the shell did not answer within 10 s".into()),
    }
}

/// Each microservice of `status` that differs from `expected` (the target's
/// current image's commits, if it has one).
pub(crate) fn drift(
    status: &InstanceStatus,
    expected: Option<&BTreeMap<ServiceName, CommitId>>,
) -> BTreeMap<ServiceName, Drift> {
    status
        .services
        .iter()
        .filter_map(|(name, s)| {
            let image = expected.and_then(|e| e.get(name)).copied();
            let overlay = status.overlays.get(name).cloned();
            (image != Some(s.commit) && (expected.is_some() || overlay.is_some())).then(|| {
                (
                    name.clone(),
                    Drift {
                        runs: s.commit,
                        image,
                        overlay,
                    },
                )
            })
        })
        .collect()
}

pub(super) async fn instance_status(
    State(api): Shared,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<impl IntoResponse> {
    let who = api.principal(&caller).await?;
    let instance = InstanceName::new(&name).map_err(|e| ApiError::bad("name", e.to_string()))?;
    let targets = api.portal.store.targets().await?;
    let target = targets
        .into_iter()
        .find(|t| t.instances.contains(&instance));
    if let Some(t) = &target {
        who.require_scope(&t.name)?;
    }
    let status = shell_status(&api, &instance)
        .await
        .map_err(|why| ApiError::new(StatusCode::BAD_GATEWAY, "shell", why))?;
    let current = match &target {
        Some(t) => super::current_image(&api, t).await?,
        None => None,
    };
    let expected = match &current {
        Some(image) => Some(super::image_commits(&api, image).await?),
        None => None,
    };
    Ok(axum::Json(StatusAnswer {
        drift: drift(&status, expected.as_ref()),
        target: target.map(|t| t.name),
        current_image: current.map(|i| i.name.to_string()),
        status,
    }))
}
