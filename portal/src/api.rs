//! The HTTP JSON API under `/api/v1`: the one API for people and automation.
//!
//! Every call is authenticated (a bearer token that acts as its user, see
//! [`crate::auth`]) and authorized by grant and scope; every state-changing
//! call is written to the audit log. Requests whose `Host` is not one of the
//! portal's own names are refused (no DNS rebinding from a web page to a
//! loopback portal), as are requests carrying a foreign `Origin`.
//!
//! Errors are JSON, `{"error": {"code", "message", "field"}}`, with `field`
//! naming the bad input when there is one; a refused request changes nothing.
//! The routes are listed in `docs/api.md`.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use image_spec::{ImageName, InstanceName, TargetName, UserName};
use repo_client::RepoClient;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::broadcast::error::RecvError;
use wire::Grant;
use wire::portal::DeploymentId;
use wire::shell::{ImageRef, ShellRequest, ShellResponse, Stage, Strategy};

use crate::Portal;
use crate::auth::{AuditEntry, Denied, Principal, Token, User};
use crate::deployment::{
    DeployOptions, Deployment, DeploymentState, Event, EventKind, NewDeployment, Transition,
    Trigger, now_ms,
};
use crate::store::{DeploymentFilter, StoreError};
use crate::target::{Rollout, Settings, Target};

/// A token lives this many days unless its maker says otherwise.
pub const DEFAULT_TOKEN_DAYS: i64 = 90;

/// The most deployments one page lists.
const MAX_PAGE: usize = 500;

/// A token's public id: the first 12 hex characters of its secret's hash.
pub fn token_id(hash: &[u8; 32]) -> String {
    hash[..6].iter().map(|b| format!("{b:02x}")).collect()
}

/// The API's shared state.
struct Api {
    portal: Arc<Portal>,
    /// The `Host` values the portal answers to.
    hosts: Vec<String>,
}

/// The API's routes over `portal`, answering to the names of `addr`.
pub fn router(portal: Arc<Portal>, addr: Option<SocketAddr>) -> Router {
    let hosts = match addr {
        Some(addr) => {
            let port = addr.port();
            vec![
                addr.to_string(),
                format!("localhost:{port}"),
                format!("127.0.0.1:{port}"),
                format!("[::1]:{port}"),
            ]
        }
        None => Vec::new(),
    };
    let api = Arc::new(Api { portal, hosts });
    Router::new()
        .route("/api/v1/whoami", get(whoami))
        .route("/api/v1/targets", get(list_targets).post(create_target))
        .route("/api/v1/targets/{name}", get(show_target).put(edit_target))
        .route("/api/v1/targets/{name}/plan", get(plan))
        .route("/api/v1/targets/{name}/rollback", post(rollback))
        .route("/api/v1/instances", get(list_instances))
        .route("/api/v1/images", get(list_images).post(create_image))
        .route("/api/v1/images/{name}", get(show_image))
        .route("/api/v1/refs", get(list_refs))
        .route(
            "/api/v1/deployments",
            get(list_deployments).post(create_deployment),
        )
        .route("/api/v1/deployments/{id}", get(show_deployment))
        .route("/api/v1/deployments/{id}/cancel", post(cancel_deployment))
        .route("/api/v1/deployments/{id}/front", post(to_front))
        .route("/api/v1/deployments/{id}/events", get(events))
        .route("/api/v1/users", get(list_users).post(create_user))
        .route(
            "/api/v1/users/{name}",
            axum::routing::delete(remove_user).patch(edit_user),
        )
        .route("/api/v1/tokens", get(list_tokens).post(create_token))
        .route("/api/v1/tokens/{id}", axum::routing::delete(revoke_token))
        .route("/api/v1/audit", get(audit_log))
        .fallback(not_found)
        .with_state(api)
}

// ---------------------------------------------------------------------------
// Errors

/// An API error: a status, a code, a message and the bad field, as JSON.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    field: Option<String>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            field: None,
        }
    }

    fn bad(field: &str, message: impl Into<String>) -> Self {
        Self {
            field: Some(field.to_owned()),
            ..Self::new(StatusCode::BAD_REQUEST, "invalid", message)
        }
    }

    fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not-found", message)
    }

    fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict", message)
    }

    fn unauthenticated(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthenticated", message)
    }

    fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({ "error": {
            "code": self.code,
            "message": self.message,
            "field": self.field,
        }});
        let mut response = (self.status, axum::Json(body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
        }
        response
    }
}

impl From<Denied> for ApiError {
    fn from(e: Denied) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", e.to_string())
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match &e {
            StoreError::TargetExists(_) | StoreError::UserExists(_) => {
                Self::conflict(e.to_string())
            }
            StoreError::InstanceTaken { .. } => Self {
                field: Some("instances".into()),
                ..Self::conflict(e.to_string())
            },
            StoreError::Transition { .. } => Self::conflict(e.to_string()),
            StoreError::NoTarget(_)
            | StoreError::NoDeployment(_)
            | StoreError::NoUser(_)
            | StoreError::NoToken(_) => Self::not_found(e.to_string()),
            StoreError::Backend(_) | StoreError::Corrupt { .. } => Self::internal(e.to_string()),
        }
    }
}

type ApiResult<T> = Result<T, ApiError>;

async fn not_found() -> ApiError {
    ApiError::not_found("no such API route (see docs/api.md)")
}

/// Parses a JSON body, naming the field that is wrong.
fn parse<T: DeserializeOwned>(body: &Bytes) -> ApiResult<T> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let field = e.path().to_string();
        let message = e.inner().to_string();
        ApiError {
            field: (field != ".").then_some(field),
            ..ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid",
                format!("bad request body: {message}"),
            )
        }
    })
}

/// Parses a query parameter, naming it when it is wrong.
fn param<T: std::str::FromStr>(q: &HashMap<String, String>, name: &str) -> ApiResult<Option<T>>
where
    T::Err: std::fmt::Display,
{
    q.get(name)
        .filter(|v| !v.is_empty())
        .map(|v| {
            v.parse::<T>()
                .map_err(|e| ApiError::bad(name, format!("`{name}`: {e}")))
        })
        .transpose()
}

fn deployment_id(s: &str) -> ApiResult<DeploymentId> {
    s.parse().map_err(|e: String| ApiError::bad("id", e))
}

fn target_name(s: &str) -> ApiResult<TargetName> {
    TargetName::new(s).map_err(|e| ApiError::bad("name", e.to_string()))
}

// ---------------------------------------------------------------------------
// Authentication

impl Api {
    /// Checks `Host` and `Origin`, then resolves the bearer token to the
    /// principal it acts as.
    async fn principal(&self, headers: &HeaderMap) -> ApiResult<Principal> {
        self.check_origin(headers)?;
        let Some(auth) = headers.get(header::AUTHORIZATION) else {
            return Err(ApiError::unauthenticated(
                "no credentials: send `Authorization: Bearer <token>`",
            ));
        };
        let secret = auth
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .ok_or_else(|| {
                ApiError::unauthenticated("the Authorization header is not `Bearer <token>`")
            })?;
        let refused = || ApiError::unauthenticated("this token is unknown, expired or revoked");
        let token = self
            .portal
            .store
            .token_by_hash(crate::auth::hash_secret(secret))
            .await?
            .ok_or_else(refused)?;
        if token.revoked.is_some() || token.expires <= now_ms() {
            return Err(refused());
        }
        // The user may have been removed, or their grant lowered, since.
        let user = self
            .portal
            .store
            .user(&token.user)
            .await?
            .ok_or_else(refused)?;
        Ok(Principal {
            user: user.name,
            grant: token.grant.min(user.grant),
            targets: token.targets,
        })
    }

    fn check_origin(&self, headers: &HeaderMap) -> ApiResult<()> {
        let host = headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or_default();
        if !self.hosts.iter().any(|h| h == host) {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "bad-host",
                format!("this portal does not answer to the host `{host}`"),
            ));
        }
        if let Some(origin) = headers.get(header::ORIGIN) {
            let origin = origin.to_str().unwrap_or_default();
            let own = self
                .hosts
                .iter()
                .any(|h| origin == format!("http://{h}") || origin == format!("https://{h}"));
            if !own {
                return Err(ApiError::new(
                    StatusCode::FORBIDDEN,
                    "bad-origin",
                    format!("requests from the origin `{origin}` are refused"),
                ));
            }
        }
        Ok(())
    }

    async fn audit(&self, who: &Principal, action: &str, subject: String, detail: String) {
        let entry = AuditEntry {
            seq: 0,
            at: now_ms(),
            who: who.user.to_string(),
            action: action.to_owned(),
            subject,
            detail,
        };
        if let Err(e) = self.portal.store.audit(entry).await {
            tracing::error!(error = %e, action, "cannot write the audit log");
        }
    }

    async fn repo(&self) -> ApiResult<RepoClient> {
        RepoClient::connect(&self.portal.client, self.portal.repo)
            .await
            .map_err(|e| {
                ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    "repository",
                    format!("cannot reach the repository: {e}"),
                )
            })
    }

    async fn target(&self, name: &TargetName) -> ApiResult<Target> {
        self.portal
            .store
            .target(name)
            .await?
            .ok_or_else(|| ApiError::not_found(format!("no target named `{name}`")))
    }

    async fn deployment(&self, id: DeploymentId) -> ApiResult<Deployment> {
        self.portal
            .store
            .deployment(id)
            .await?
            .ok_or_else(|| ApiError::not_found(format!("no deployment {id}")))
    }
}

type Shared = State<Arc<Api>>;

async fn whoami(State(api): Shared, headers: HeaderMap) -> ApiResult<impl IntoResponse> {
    let who = api.principal(&headers).await?;
    Ok(axum::Json(json!({
        "user": who.user,
        "grant": who.grant,
        "targets": who.targets,
    })))
}

// ---------------------------------------------------------------------------
// Targets and instances

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TargetInput {
    name: TargetName,
    stage: Stage,
    #[serde(default)]
    instances: Vec<InstanceName>,
    #[serde(default)]
    settings: SettingsInput,
}

/// Settings as a request gives them: what is left out keeps its value.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct SettingsInput {
    strategy: Option<Strategy>,
    rollout: Option<Rollout>,
    canary_secs: Option<u64>,
    keep_history: Option<u32>,
    keep_rollback: Option<u32>,
}

impl SettingsInput {
    fn apply(self, mut s: Settings) -> ApiResult<Settings> {
        if self.strategy.is_some() {
            s.strategy = self.strategy;
        }
        if let Some(r) = self.rollout {
            s.rollout = r;
        }
        if let Some(c) = self.canary_secs {
            s.canary_secs = c;
        }
        if let Some(k) = self.keep_history {
            if k == 0 {
                return Err(ApiError::bad(
                    "settings.keep_history",
                    "keep_history must be at least 1",
                ));
            }
            s.keep_history = k;
        }
        if let Some(k) = self.keep_rollback {
            s.keep_rollback = k;
        }
        Ok(s)
    }
}

fn check_instances(instances: &[InstanceName]) -> ApiResult<()> {
    let mut seen = std::collections::BTreeSet::new();
    for i in instances {
        if !seen.insert(i) {
            return Err(ApiError::bad(
                "instances",
                format!("instance `{i}` is listed twice"),
            ));
        }
    }
    Ok(())
}

/// A target as the API shows it: with its instances' state and its last deployment.
async fn target_view(api: &Api, t: &Target) -> ApiResult<serde_json::Value> {
    let known: BTreeMap<_, _> = api
        .portal
        .store
        .instances()
        .await?
        .into_iter()
        .map(|i| (i.name.clone(), i))
        .collect();
    let instances: Vec<_> = t
        .instances
        .iter()
        .map(|name| {
            let online = api.portal.shells.is_online(name);
            match known.get(name) {
                Some(i) => json!({ "name": name, "online": online, "stage": i.stage,
                    "image": i.image, "generation": i.generation, "last_seen": i.last_seen }),
                None => json!({ "name": name, "online": online, "stage": null,
                    "image": null, "generation": null, "last_seen": null }),
            }
        })
        .collect();
    let last = api
        .portal
        .store
        .deployments(DeploymentFilter {
            target: Some(t.name.clone()),
            limit: 1,
            ..Default::default()
        })
        .await?;
    let current = api
        .portal
        .store
        .deployments(DeploymentFilter {
            target: Some(t.name.clone()),
            state: Some(DeploymentState::Succeeded),
            limit: 1,
            ..Default::default()
        })
        .await?;
    let queued = api
        .portal
        .store
        .queue()
        .await?
        .iter()
        .filter(|d| d.target == t.name)
        .count();
    Ok(json!({
        "name": t.name,
        "stage": t.stage,
        "settings": t.settings,
        "created": t.created,
        "instances": instances,
        "image": current.first().map(|d| &d.image),
        "last_deployment": last.first().map(|d| json!({ "id": d.id, "state": d.state, "image": d.image })),
        "queued": queued,
    }))
}

async fn list_targets(State(api): Shared, headers: HeaderMap) -> ApiResult<impl IntoResponse> {
    api.principal(&headers).await?;
    let mut out = Vec::new();
    for t in api.portal.store.targets().await? {
        out.push(target_view(&api, &t).await?);
    }
    Ok(axum::Json(out))
}

async fn show_target(
    State(api): Shared,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> ApiResult<impl IntoResponse> {
    api.principal(&headers).await?;
    let t = api.target(&target_name(&name)?).await?;
    Ok(axum::Json(target_view(&api, &t).await?))
}

async fn create_target(
    State(api): Shared,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<impl IntoResponse> {
    let who = api.principal(&headers).await?;
    who.require_admin("create targets")?;
    let input: TargetInput = parse(&body)?;
    check_instances(&input.instances)?;
    let target = Target {
        name: input.name,
        stage: input.stage,
        instances: input.instances,
        settings: input.settings.apply(Settings::default())?,
        created: now_ms(),
    };
    api.portal.store.put_target(target.clone(), false).await?;
    api.audit(
        &who,
        "target.create",
        format!("target {}", target.name),
        format!("stage {}, instances {:?}", target.stage, target.instances),
    )
    .await;
    Ok((
        StatusCode::CREATED,
        axum::Json(target_view(&api, &target).await?),
    ))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TargetEdit {
    stage: Option<Stage>,
    instances: Option<Vec<InstanceName>>,
    #[serde(default)]
    settings: SettingsInput,
}

async fn edit_target(
    State(api): Shared,
    headers: HeaderMap,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<impl IntoResponse> {
    let who = api.principal(&headers).await?;
    who.require_admin("edit targets")?;
    let mut target = api.target(&target_name(&name)?).await?;
    let edit: TargetEdit = parse(&body)?;
    if let Some(stage) = edit.stage {
        target.stage = stage;
    }
    if let Some(instances) = edit.instances {
        check_instances(&instances)?;
        target.instances = instances;
    }
    target.settings = edit.settings.apply(target.settings)?;
    api.portal.store.put_target(target.clone(), true).await?;
    api.audit(
        &who,
        "target.edit",
        format!("target {}", target.name),
        format!(
            "stage {}, instances {:?}, settings {:?}",
            target.stage, target.instances, target.settings
        ),
    )
    .await;
    Ok(axum::Json(target_view(&api, &target).await?))
}

async fn list_instances(State(api): Shared, headers: HeaderMap) -> ApiResult<impl IntoResponse> {
    api.principal(&headers).await?;
    let targets = api.portal.store.targets().await?;
    let out: Vec<_> = api
        .portal
        .store
        .instances()
        .await?
        .into_iter()
        .map(|mut i| {
            i.online = api.portal.shells.is_online(&i.name);
            let target = targets
                .iter()
                .find(|t| t.instances.contains(&i.name))
                .map(|t| t.name.clone());
            json!({
                "name": i.name, "target": target, "stage": i.stage, "labels": i.labels,
                "shell_version": i.shell_version, "image": i.image, "generation": i.generation,
                "online": i.online, "last_seen": i.last_seen,
            })
        })
        .collect();
    Ok(axum::Json(out))
}

async fn list_images(State(api): Shared, headers: HeaderMap) -> ApiResult<impl IntoResponse> {
    api.principal(&headers).await?;
    let repo = api.repo().await?;
    let images = repo
        .images()
        .await
        .map_err(|e| ApiError::new(StatusCode::BAD_GATEWAY, "repository", e.to_string()))?;
    let out: Vec<_> = images
        .into_iter()
        .rev()
        .map(|r| {
            json!({ "name": r.image.name(), "id": r.id.to_string(),
                "description": r.image.description(), "services": r.image.services(),
                "created": r.created })
        })
        .collect();
    Ok(axum::Json(out))
}

/// The image named `name` in the repository.
async fn resolve_image(api: &Api, name: &ImageName) -> ApiResult<ImageRef> {
    let repo = api.repo().await?;
    match repo.image(name).await {
        Ok(record) => Ok(ImageRef {
            name: name.clone(),
            id: record.id,
        }),
        Err(repo_client::ClientError::Remote(e)) if e.kind == wire::repo::ErrorKind::NotFound => {
            Err(ApiError {
                field: Some("image".into()),
                ..ApiError::not_found(format!("no image named `{name}`"))
            })
        }
        Err(e) => Err(ApiError::new(
            StatusCode::BAD_GATEWAY,
            "repository",
            e.to_string(),
        )),
    }
}

// ---------------------------------------------------------------------------
// Plans and deployments

async fn plan(
    State(api): Shared,
    headers: HeaderMap,
    Path(name): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<impl IntoResponse> {
    let who = api.principal(&headers).await?;
    let target = api.target(&target_name(&name)?).await?;
    who.require_scope(&target.name)?;
    let image: ImageName =
        param(&q, "image")?.ok_or_else(|| ApiError::bad("image", "`image` is required"))?;
    let strategy: Option<Strategy> = param(&q, "strategy")?.or(target.settings.strategy);
    let skip_hooks: bool = param(&q, "skip_hooks")?.unwrap_or(false);
    let image = resolve_image(&api, &image).await?;
    let mut instances = BTreeMap::new();
    let mut fetch_bytes = 0u64;
    let mut restart = std::collections::BTreeSet::new();
    for instance in &target.instances {
        let req = ShellRequest::Plan {
            image: image.name.clone(),
            strategy,
            skip_hooks,
        };
        let answer = tokio::time::timeout(
            Duration::from_secs(30),
            api.portal.shells.call(instance, &req, |_| {}),
        )
        .await;
        let entry = match answer {
            Ok(Ok(Ok(ShellResponse::Plan(p)))) => {
                fetch_bytes += p.fetch_bytes();
                for s in &p.services {
                    if !matches!(s.action, wire::plan::Action::Unchanged) {
                        restart.insert(s.service.to_string());
                    }
                }
                json!({ "plan": p })
            }
            Ok(Ok(Ok(other))) => json!({ "error": format!("unexpected answer {other:?}") }),
            Ok(Ok(Err(e))) => json!({ "error": e.message }),
            Ok(Err(e)) => json!({ "error": e.to_string() }),
            Err(_) => json!({ "error": "the shell did not answer within 30 s" }),
        };
        instances.insert(instance.to_string(), entry);
    }
    Ok(axum::Json(json!({
        "target": target.name,
        "image": image,
        "strategy": strategy,
        "instances": instances,
        "changed_services": restart,
        "fetch_bytes": fetch_bytes,
    })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeployInput {
    target: TargetName,
    image: ImageName,
    strategy: Option<Strategy>,
    rollout: Option<Rollout>,
    instance: Option<InstanceName>,
    #[serde(default)]
    skip_hooks: bool,
}

async fn enqueue(
    api: &Api,
    who: &Principal,
    target: &Target,
    image: ImageRef,
    trigger: Trigger,
    options: DeployOptions,
) -> ApiResult<Deployment> {
    let instances = match &options.instance {
        Some(i) if !target.instances.contains(i) => {
            return Err(ApiError::bad(
                "instance",
                format!("instance `{i}` is not one of target `{}`'s", target.name),
            ));
        }
        Some(i) => vec![i.clone()],
        None => target.instances.clone(),
    };
    if instances.is_empty() {
        return Err(ApiError::bad(
            "target",
            format!("target `{}` has no instances to deploy to", target.name),
        ));
    }
    let d = api
        .portal
        .store
        .enqueue(
            NewDeployment {
                target: target.name.clone(),
                image,
                requested_by: who.user.clone(),
                trigger,
                options,
                instances,
            },
            now_ms(),
        )
        .await?;
    api.audit(
        who,
        "deployment.create",
        format!("deployment {}", d.id),
        format!(
            "target {}, image {}, {}, options {:?}",
            d.target, d.image.name, d.trigger, d.options
        ),
    )
    .await;
    api.portal
        .journal
        .note(d.id, None, EventKind::State(DeploymentState::Queued))
        .await;
    api.portal.runner.wake();
    Ok(d)
}

async fn create_deployment(
    State(api): Shared,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<impl IntoResponse> {
    let who = api.principal(&headers).await?;
    let input: DeployInput = parse(&body)?;
    let target = api
        .portal
        .store
        .target(&input.target)
        .await?
        .ok_or_else(|| ApiError {
            field: Some("target".into()),
            ..ApiError::not_found(format!("no target named `{}`", input.target))
        })?;
    who.require_deploy(&target.name, target.stage)?;
    let image = resolve_image(&api, &input.image).await?;
    let options = DeployOptions {
        strategy: input.strategy,
        rollout: input.rollout,
        instance: input.instance,
        skip_hooks: input.skip_hooks,
    };
    let d = enqueue(&api, &who, &target, image, Trigger::Manual, options).await?;
    Ok((StatusCode::CREATED, axum::Json(d)))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RollbackInput {
    to: Option<DeploymentId>,
    strategy: Option<Strategy>,
    rollout: Option<Rollout>,
}

async fn rollback(
    State(api): Shared,
    headers: HeaderMap,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<impl IntoResponse> {
    let who = api.principal(&headers).await?;
    let target = api.target(&target_name(&name)?).await?;
    who.require_deploy(&target.name, target.stage)?;
    let input: RollbackInput = if body.is_empty() {
        RollbackInput::default()
    } else {
        parse(&body)?
    };
    // The current image is the newest succeeded deployment's; rollback goes to
    // one of the `keep_rollback` before it.
    let succeeded = api
        .portal
        .store
        .deployments(DeploymentFilter {
            target: Some(target.name.clone()),
            state: Some(DeploymentState::Succeeded),
            limit: target.settings.keep_rollback as usize + 1,
            ..Default::default()
        })
        .await?;
    let Some((current, earlier)) = succeeded.split_first() else {
        return Err(ApiError::conflict(format!(
            "target `{}` has no succeeded deployment to roll back from",
            target.name
        )));
    };
    let to = match input.to {
        None => earlier.first().ok_or_else(|| {
            ApiError::conflict(format!(
                "target `{}` has no earlier succeeded deployment to roll back to",
                target.name
            ))
        })?,
        Some(id) if id == current.id => {
            return Err(ApiError::bad("to", format!("deployment {id} is what target `{}` runs now", target.name)));
        }
        Some(id) => earlier.iter().find(|d| d.id == id).ok_or_else(|| {
            ApiError::bad(
                "to",
                format!(
                    "deployment {id} is not one of the last {} succeeded deployments of `{}` before the current one",
                    target.settings.keep_rollback, target.name
                ),
            )
        })?,
    };
    let options = DeployOptions {
        strategy: input.strategy,
        rollout: input.rollout,
        instance: None,
        skip_hooks: false,
    };
    let d = enqueue(
        &api,
        &who,
        &target,
        to.image.clone(),
        Trigger::Rollback { of: to.id },
        options,
    )
    .await?;
    Ok((StatusCode::CREATED, axum::Json(d)))
}

async fn list_deployments(
    State(api): Shared,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<impl IntoResponse> {
    let who = api.principal(&headers).await?;
    let trigger = match q.get("trigger").map(String::as_str) {
        None | Some("") => None,
        Some("manual") => Some(false),
        Some("rollback") => Some(true),
        Some(other) => {
            return Err(ApiError::bad(
                "trigger",
                format!("unknown trigger `{other}` (manual or rollback)"),
            ));
        }
    };
    let limit: usize = param(&q, "limit")?.unwrap_or(50);
    if limit == 0 || limit > MAX_PAGE {
        return Err(ApiError::bad(
            "limit",
            format!("`limit` must be 1 to {MAX_PAGE}"),
        ));
    }
    let filter = DeploymentFilter {
        target: param(&q, "target")?,
        state: param(&q, "status")?,
        who: param(&q, "who")?,
        image: q.get("image").filter(|s| !s.is_empty()).cloned(),
        rollback: trigger,
        since: param(&q, "since")?,
        until: param(&q, "until")?,
        before: param(&q, "before")?,
        limit,
    };
    let list: Vec<_> = api
        .portal
        .store
        .deployments(filter)
        .await?
        .into_iter()
        .filter(|d| who.require_scope(&d.target).is_ok())
        .collect();
    Ok(axum::Json(list))
}

async fn show_deployment(
    State(api): Shared,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    let who = api.principal(&headers).await?;
    let d = api.deployment(deployment_id(&id)?).await?;
    who.require_scope(&d.target)?;
    Ok(axum::Json(d))
}

async fn cancel_deployment(
    State(api): Shared,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    let who = api.principal(&headers).await?;
    let d = api.deployment(deployment_id(&id)?).await?;
    let target = api.target(&d.target).await?;
    who.require_deploy(&target.name, target.stage)?;
    let d = match d.state {
        DeploymentState::Queued => {
            let d = api
                .portal
                .store
                .transition(
                    d.id,
                    Transition::Cancel,
                    Some(format!("cancelled by {}", who.user)),
                    now_ms(),
                )
                .await?;
            api.portal
                .journal
                .note(d.id, None, EventKind::State(d.state))
                .await;
            d
        }
        DeploymentState::Running => {
            let d = api.portal.store.request_cancel(d.id).await?;
            api.portal
                .journal
                .note(
                    d.id,
                    None,
                    EventKind::Log(format!(
                        "cancel asked by {}; stopping before the next instance",
                        who.user
                    )),
                )
                .await;
            d
        }
        state => {
            return Err(ApiError::conflict(format!(
                "deployment {} is {state}: nothing to cancel",
                d.id
            )));
        }
    };
    api.audit(
        &who,
        "deployment.cancel",
        format!("deployment {}", d.id),
        String::new(),
    )
    .await;
    api.portal.runner.wake();
    Ok(axum::Json(d))
}

async fn to_front(
    State(api): Shared,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    let who = api.principal(&headers).await?;
    who.require_admin("reorder the queue")?;
    let id = deployment_id(&id)?;
    api.portal.store.to_front(id).await?;
    api.audit(
        &who,
        "deployment.front",
        format!("deployment {id}"),
        String::new(),
    )
    .await;
    api.portal.runner.wake();
    Ok(axum::Json(api.portal.store.queue().await?))
}

/// A deployment's events: JSON after `?after=N`, or (with `Accept:
/// text/event-stream`) a live Server-Sent Events stream that resumes after
/// `Last-Event-ID` and ends after the deployment's final state.
async fn events(
    State(api): Shared,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Response> {
    let who = api.principal(&headers).await?;
    let d = api.deployment(deployment_id(&id)?).await?;
    who.require_scope(&d.target)?;
    let last_id = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.parse::<u64>()
                .map_err(|_| ApiError::bad("Last-Event-ID", "Last-Event-ID is not a number"))
        })
        .transpose()?;
    let after = last_id.or(param(&q, "after")?).unwrap_or(0);
    let wants_stream = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/event-stream"));
    if !wants_stream {
        let events = api.portal.store.events(d.id, after, 10_000).await?;
        return Ok(axum::Json(events).into_response());
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<SseEvent, std::convert::Infallible>>(64);
    let portal = api.portal.clone();
    tokio::spawn(async move { follow(portal, d.id, after, tx).await });
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(10)))
        .into_response())
}

/// Feeds one follower: the stored events after `after`, then the live ones,
/// each exactly once, until the deployment's final state or the follower leaves.
async fn follow(
    portal: Arc<Portal>,
    id: DeploymentId,
    mut after: u64,
    tx: tokio::sync::mpsc::Sender<Result<SseEvent, std::convert::Infallible>>,
) {
    // Subscribe before reading the store: nothing falls between the two.
    let mut live = portal.journal.subscribe();
    let send = |e: &Event| {
        let data = serde_json::to_string(e).unwrap_or_default();
        SseEvent::default()
            .id(e.seq.to_string())
            .event("deployment")
            .data(data)
    };
    let is_end = |e: &Event| matches!(e.kind, EventKind::State(s) if s.is_final());
    loop {
        // Catch up from the store.
        loop {
            let stored = match portal.store.events(id, after, 1000).await {
                Ok(s) => s,
                Err(_) => return,
            };
            if stored.is_empty() {
                break;
            }
            for e in &stored {
                if tx.send(Ok(send(e))).await.is_err() {
                    return;
                }
                after = e.seq;
                if is_end(e) {
                    return;
                }
            }
        }
        // A deployment that ended before we looked has its final state stored.
        if let Ok(Some(d)) = portal.store.deployment(id).await
            && d.state.is_final()
            && after > 0
        {
            // Its final event may not be journalled yet; wait for it below.
        }
        loop {
            match live.recv().await {
                Ok((did, e)) if did == id && e.seq > after => {
                    if tx.send(Ok(send(&e))).await.is_err() {
                        return;
                    }
                    after = e.seq;
                    if is_end(&e) {
                        return;
                    }
                }
                Ok(_) => {}
                // Fell behind: read what was missed from the store.
                Err(RecvError::Lagged(_)) => break,
                Err(RecvError::Closed) => return,
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Users, tokens, audit

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UserInput {
    name: UserName,
    grant: Grant,
}

async fn list_users(State(api): Shared, headers: HeaderMap) -> ApiResult<impl IntoResponse> {
    api.principal(&headers).await?.require_admin("list users")?;
    Ok(axum::Json(api.portal.store.users().await?))
}

async fn create_user(
    State(api): Shared,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<impl IntoResponse> {
    let who = api.principal(&headers).await?;
    who.require_admin("add users")?;
    let input: UserInput = parse(&body)?;
    let user = User {
        name: input.name,
        grant: input.grant,
        created: now_ms(),
    };
    api.portal.store.put_user(user.clone(), false).await?;
    api.audit(
        &who,
        "user.add",
        format!("user {}", user.name),
        format!("grant {}", user.grant),
    )
    .await;
    Ok((StatusCode::CREATED, axum::Json(user)))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UserEdit {
    grant: Grant,
}

async fn edit_user(
    State(api): Shared,
    headers: HeaderMap,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<impl IntoResponse> {
    let who = api.principal(&headers).await?;
    who.require_admin("change users")?;
    let name = UserName::new(&name).map_err(|e| ApiError::bad("name", e.to_string()))?;
    let edit: UserEdit = parse(&body)?;
    let mut user = api
        .portal
        .store
        .user(&name)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no user named `{name}`")))?;
    user.grant = edit.grant;
    api.portal.store.put_user(user.clone(), true).await?;
    api.audit(
        &who,
        "user.edit",
        format!("user {name}"),
        format!("grant {}", user.grant),
    )
    .await;
    Ok(axum::Json(user))
}

async fn remove_user(
    State(api): Shared,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> ApiResult<impl IntoResponse> {
    let who = api.principal(&headers).await?;
    who.require_admin("remove users")?;
    let name = UserName::new(&name).map_err(|e| ApiError::bad("name", e.to_string()))?;
    if name == who.user {
        return Err(ApiError::conflict("you cannot remove yourself"));
    }
    api.portal.store.remove_user(&name, now_ms()).await?;
    api.audit(
        &who,
        "user.remove",
        format!("user {name}"),
        "tokens revoked".into(),
    )
    .await;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenInput {
    name: String,
    user: UserName,
    grant: Grant,
    targets: Option<Vec<TargetName>>,
    expires_days: Option<u32>,
}

/// A token as listed: never its secret or its hash.
#[derive(Debug, Serialize)]
struct TokenView<'a> {
    id: &'a str,
    name: &'a str,
    user: &'a UserName,
    grant: Grant,
    targets: &'a Option<Vec<TargetName>>,
    created: i64,
    expires: i64,
    revoked: Option<i64>,
}

impl<'a> From<&'a Token> for TokenView<'a> {
    fn from(t: &'a Token) -> Self {
        Self {
            id: &t.id,
            name: &t.name,
            user: &t.user,
            grant: t.grant,
            targets: &t.targets,
            created: t.created,
            expires: t.expires,
            revoked: t.revoked,
        }
    }
}

async fn list_tokens(State(api): Shared, headers: HeaderMap) -> ApiResult<impl IntoResponse> {
    api.principal(&headers)
        .await?
        .require_admin("list tokens")?;
    let tokens = api.portal.store.tokens().await?;
    let views: Vec<TokenView<'_>> = tokens.iter().map(TokenView::from).collect();
    Ok(axum::Json(serde_json::to_value(views).unwrap_or_default()))
}

async fn create_token(
    State(api): Shared,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<impl IntoResponse> {
    let who = api.principal(&headers).await?;
    who.require_admin("create tokens")?;
    let input: TokenInput = parse(&body)?;
    if input.name.trim().is_empty() || input.name.len() > 200 {
        return Err(ApiError::bad(
            "name",
            "a token's name is 1 to 200 characters",
        ));
    }
    let user = api
        .portal
        .store
        .user(&input.user)
        .await?
        .ok_or_else(|| ApiError {
            field: Some("user".into()),
            ..ApiError::not_found(format!("no user named `{}`", input.user))
        })?;
    if input.grant > user.grant {
        return Err(ApiError::bad(
            "grant",
            format!(
                "`{}` is {}; their token cannot be {}",
                user.name, user.grant, input.grant
            ),
        ));
    }
    let days = i64::from(input.expires_days.unwrap_or(DEFAULT_TOKEN_DAYS as u32));
    if days == 0 || days > 3650 {
        return Err(ApiError::bad(
            "expires_days",
            "a token lives 1 to 3650 days",
        ));
    }
    let secret = crate::auth::new_secret().map_err(|e| ApiError::internal(e.to_string()))?;
    let hash = crate::auth::hash_secret(&secret);
    let now = now_ms();
    let token = Token {
        id: token_id(&hash),
        name: input.name,
        user: user.name,
        grant: input.grant,
        targets: input.targets,
        created: now,
        expires: now + days * 86_400_000,
        revoked: None,
        hash,
    };
    api.portal.store.put_token(token.clone()).await?;
    api.audit(
        &who,
        "token.create",
        format!("token {}", token.id),
        format!(
            "for {}, grant {}, targets {:?}",
            token.user, token.grant, token.targets
        ),
    )
    .await;
    Ok((
        StatusCode::CREATED,
        axum::Json(json!({ "secret": secret, "token": TokenView::from(&token) })),
    ))
}

async fn revoke_token(
    State(api): Shared,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    let who = api.principal(&headers).await?;
    who.require_admin("revoke tokens")?;
    let token = api.portal.store.revoke_token(&id, now_ms()).await?;
    api.audit(
        &who,
        "token.revoke",
        format!("token {id}"),
        format!("of {}", token.user),
    )
    .await;
    Ok(axum::Json(
        serde_json::to_value(TokenView::from(&token)).unwrap_or_default(),
    ))
}

async fn audit_log(
    State(api): Shared,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<impl IntoResponse> {
    api.principal(&headers)
        .await?
        .require_admin("read the audit log")?;
    let after: u64 = param(&q, "after")?.unwrap_or(0);
    let limit: usize = param(&q, "limit")?.unwrap_or(100).min(1000);
    Ok(axum::Json(api.portal.store.audit_log(after, limit).await?))
}

// ---------------------------------------------------------------------------
// Images on a person's behalf, and the repository's ref moves

fn repo_error(e: repo_client::ClientError) -> ApiError {
    match e {
        repo_client::ClientError::Remote(r) => {
            let status = match r.kind {
                wire::repo::ErrorKind::NotFound => StatusCode::NOT_FOUND,
                wire::repo::ErrorKind::Conflict { .. } | wire::repo::ErrorKind::AlreadyExists => {
                    StatusCode::CONFLICT
                }
                wire::repo::ErrorKind::PermissionDenied => StatusCode::FORBIDDEN,
                wire::repo::ErrorKind::Invalid => StatusCode::BAD_REQUEST,
                _ => StatusCode::BAD_GATEWAY,
            };
            ApiError::new(status, "repository", r.message)
        }
        other => ApiError::new(StatusCode::BAD_GATEWAY, "repository", other.to_string()),
    }
}

fn image_view(r: &wire::repo::ImageRecord) -> Value {
    json!({ "name": r.image.name(), "id": r.id.to_string(),
        "description": r.image.description(), "services": r.image.services(),
        "created": r.created })
}

async fn show_image(
    State(api): Shared,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> ApiResult<impl IntoResponse> {
    api.principal(&headers).await?;
    let name = ImageName::new(&name).map_err(|e| ApiError::bad("name", e.to_string()))?;
    let record = api.repo().await?.image(&name).await.map_err(repo_error)?;
    Ok(axum::Json(image_view(&record)))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ImageInput {
    name: ImageName,
    /// Start from this image's services.
    from: Option<ImageName>,
    /// Service → revision (branch, commit id or abbreviation) to set.
    #[serde(default)]
    set: BTreeMap<image_spec::ServiceName, String>,
    #[serde(default)]
    description: String,
}

/// Creates an image in the repository on the caller's behalf: they are its
/// author (the repository records that the portal made the request).
async fn create_image(
    State(api): Shared,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<impl IntoResponse> {
    let who = api.principal(&headers).await?;
    let input: ImageInput = parse(&body)?;
    let repo = api.repo().await?;
    let mut services = match &input.from {
        Some(from) => repo
            .image(from)
            .await
            .map_err(|e| ApiError {
                field: Some("from".into()),
                ..repo_error(e)
            })?
            .image
            .services()
            .clone(),
        None => BTreeMap::new(),
    };
    for (service, rev) in &input.set {
        let commit = repo.resolve(service, rev).await.map_err(|e| ApiError {
            field: Some(format!("set.{service}")),
            ..repo_error(e)
        })?;
        services.insert(service.clone(), commit);
    }
    let image = image_spec::Image::new(input.name, input.description, services)
        .map_err(|e| ApiError::bad("set", e.to_string()))?;
    let record = repo
        .create_image_for(image, who.user.clone())
        .await
        .map_err(repo_error)?;
    api.audit(
        &who,
        "image.create",
        format!("image {}", record.image.name()),
        format!("id {}, from {:?}", record.id, input.from),
    )
    .await;
    Ok((StatusCode::CREATED, axum::Json(image_view(&record))))
}

/// The repository's recent ref moves after `?after=N`, oldest first.
async fn list_refs(
    State(api): Shared,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<impl IntoResponse> {
    api.principal(&headers).await?;
    let after: u64 = param(&q, "after")?.unwrap_or(0);
    Ok(axum::Json(api.portal.refs.after(after)))
}
