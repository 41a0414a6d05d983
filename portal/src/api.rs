//! The HTTP JSON API under `/api/v1`: the one API for people and automation.
//!
//! Every call is authenticated and authorized by grant and scope; every
//! state-changing call is written to the audit log. A request acts as a user
//! ([`crate::auth`]) by one of three credentials, tried in this order:
//!
//! 1. a bearer token, `Authorization: Bearer molt_…` (automation, the CLI
//!    with `$MOLT_TOKEN`);
//! 2. a browser session: the `molt_session` cookie that `POST /api/v1/login`
//!    sets (HttpOnly, SameSite=Strict, Path=/, Secure on HTTPS); every
//!    POST/PUT/PATCH/DELETE it authenticates must carry the session's CSRF
//!    token — the `X-CSRF-Token` header, or a `csrf` field of a form body —
//!    else 403 `csrf`. The token comes with the login's answer and from
//!    `GET /api/v1/whoami`. `POST /api/v1/logout` ends the session. Failed
//!    logins are slowed per user name (see [`crate::auth::login_delay`]): the
//!    answer says how many failed and how long the next attempt waits;
//! 3. a client certificate of the cluster CA, on the HTTPS listener only
//!    (the CLI's): `user/ada/<grant>` acts as the portal user `ada`, who must
//!    exist (else 401), with the lower of the two grants; any other identity
//!    is 403. A revoked certificate is 401 (the revocation list is checked
//!    once per connection).
//!
//! Requests whose `Host` is not one of the portal's own names (its listeners'
//! addresses, `localhost:PORT`, `portal.molt:PORT`, the configured names) are
//! refused (no DNS rebinding from a web page to a loopback portal), as are
//! requests carrying a foreign `Origin` — whatever their credential.
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
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, Method, StatusCode, header};
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

pub(crate) mod devloop;

use crate::Portal;
use crate::auth::{
    AuditEntry, Denied, Principal, SESSION_COOKIE, SESSION_MAX_MS, Session, Token, User, Via,
};
use crate::deployment::{
    DeployOptions, Deployment, DeploymentState, Event, EventKind, NewDeployment, Transition,
    Trigger, now_ms,
};
use crate::listener::{Connection, PeerCert};
use crate::store::{DeploymentFilter, StoreError};
use crate::target::{Rollout, Settings, Target};
use crate::watch::WatchError;

/// A token lives this many days unless its maker says otherwise.
pub const DEFAULT_TOKEN_DAYS: i64 = 90;

/// The most deployments one page lists.
const MAX_PAGE: usize = 500;

/// A token's public id: the first 12 hex characters of its secret's hash.
pub fn token_id(hash: &[u8; 32]) -> String {
    hash[..6].iter().map(|b| format!("{b:02x}")).collect()
}

/// The API's shared state (the web pages' too: [`crate::web`] takes the same).
pub(crate) struct Api {
    pub(crate) portal: Arc<Portal>,
    /// The `Host` values the portal answers to.
    hosts: Vec<String>,
    /// Failed logins per user name.
    logins: Logins,
}

/// The `Host` values a portal with these listeners and extra names answers
/// to: each listener's address, and `localhost`, `127.0.0.1`, `[::1]` and
/// `portal.molt` with its port; each name as given and with each port.
pub fn host_names(listeners: &[SocketAddr], names: &[String]) -> Vec<String> {
    let mut hosts = Vec::new();
    for addr in listeners {
        let port = addr.port();
        hosts.push(addr.to_string());
        for name in ["localhost", "127.0.0.1", "[::1]", "portal.molt"] {
            hosts.push(format!("{name}:{port}"));
        }
        for name in names {
            hosts.push(format!("{name}:{port}"));
        }
    }
    hosts.extend(names.iter().cloned());
    hosts.sort();
    hosts.dedup();
    hosts
}

/// The API's routes over `portal`, answering to `hosts` (see [`host_names`]),
/// with the web pages ([`crate::web`]) beside them.
pub fn router(portal: Arc<Portal>, hosts: Vec<String>) -> Router {
    let api = Arc::new(Api {
        portal,
        hosts,
        logins: Logins::default(),
    });
    Router::new()
        .route("/api/v1/login", post(login))
        .route("/api/v1/logout", post(logout))
        .route(
            "/api/v1/users/{name}/password",
            axum::routing::put(set_password),
        )
        .route("/api/v1/whoami", get(whoami))
        .route("/api/v1/targets", get(list_targets).post(create_target))
        .route("/api/v1/targets/{name}", get(show_target).put(edit_target))
        .route("/api/v1/targets/{name}/plan", get(plan))
        .route("/api/v1/targets/{name}/rollback", post(rollback))
        .route("/api/v1/targets/{name}/pull", post(devloop::pull))
        .route("/api/v1/targets/{name}/reset", post(devloop::reset))
        .route(
            "/api/v1/targets/{name}/watches",
            get(devloop::list_watches).post(devloop::open_watch),
        )
        .route("/api/v1/watches/{id}/end", post(devloop::end_watch))
        .route("/api/v1/instances", get(list_instances))
        .route(
            "/api/v1/instances/{name}/status",
            get(devloop::instance_status),
        )
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
        .merge(crate::web::routes())
        .fallback(not_found)
        .layer(axum::middleware::from_fn(form_csrf))
        .with_state(api)
}

// ---------------------------------------------------------------------------
// Errors

/// An API error: a status, a code, a message and the bad field, as JSON.
#[derive(Debug)]
pub struct ApiError {
    pub(crate) status: StatusCode,
    pub(crate) code: &'static str,
    pub(crate) message: String,
    pub(crate) field: Option<String>,
    /// More about the error, under `error.details` (a failed login's count).
    details: Option<serde_json::Value>,
    /// Seconds for a `Retry-After` header (a slowed login).
    pub(crate) retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            field: None,
            details: None,
            retry_after: None,
        }
    }

    fn forbidden(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, code, message)
    }

    pub(crate) fn bad(field: &str, message: impl Into<String>) -> Self {
        Self {
            field: Some(field.to_owned()),
            ..Self::new(StatusCode::BAD_REQUEST, "invalid", message)
        }
    }

    pub(crate) fn not_found(message: impl Into<String>) -> Self {
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
        let mut error = json!({
            "code": self.code,
            "message": self.message,
            "field": self.field,
        });
        if let Some(details) = self.details {
            error["details"] = details;
        }
        let body = json!({ "error": error });
        let mut response = (self.status, axum::Json(body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
        }
        if let Some(secs) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from(secs));
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
            StoreError::Watch(WatchError::NotFound(_)) => Self::not_found(e.to_string()),
            StoreError::Watch(WatchError::Ended(_)) => Self::conflict(e.to_string()),
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

/// What a handler knows of its caller: the request's headers and method, and
/// what its connection says (TLS or not, the client's certificate). Every
/// handler takes one and hands it to [`Api::principal`].
#[derive(Debug, Clone)]
pub struct Caller {
    /// The request's headers.
    pub headers: HeaderMap,
    /// The request's method (a state-changing one needs a session's CSRF token).
    pub method: Method,
    /// The connection's client certificate: `None` on plain HTTP, always.
    pub cert: PeerCert,
    /// Did the request come over TLS?
    pub tls: bool,
    /// The `csrf` field of a form body, read by [`form_csrf`].
    pub form_csrf: Option<String>,
}

impl Caller {
    /// Does the request change something (POST, PUT, PATCH, DELETE)?
    fn changes_state(&self) -> bool {
        !matches!(
            self.method,
            Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
        )
    }

    /// The session id the `molt_session` cookie carries, if any.
    fn session_cookie(&self) -> Option<&str> {
        self.headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|pair| pair.trim().split_once('='))
            .find(|(name, _)| *name == SESSION_COOKIE)
            .map(|(_, value)| value.trim())
            .filter(|v| !v.is_empty())
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        // No connection extension: served some other way (a test's oneshot);
        // then it is plain, without a certificate.
        let conn = parts
            .extensions
            .get::<Connection>()
            .cloned()
            .unwrap_or_default();
        Ok(Caller {
            headers: parts.headers.clone(),
            method: parts.method.clone(),
            cert: if conn.tls { conn.cert } else { PeerCert::None },
            tls: conn.tls,
            form_csrf: parts.extensions.get::<FormCsrf>().map(|f| f.0.clone()),
        })
    }
}

/// The `csrf` field of a form body.
#[derive(Debug, Clone)]
struct FormCsrf(String);

/// The most a form body may hold.
const MAX_FORM: usize = 1 << 20;

/// For a state-changing form (`application/x-www-form-urlencoded`) sent with a
/// cookie, reads the body's `csrf` field into the request (the body is put
/// back as it was), so [`Api::principal`] can check it.
async fn form_csrf(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let is_form = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
    let changes = !matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
    if !(is_form && changes && req.headers().contains_key(header::COOKIE)) {
        return next.run(req).await;
    }
    let (parts, body) = req.into_parts();
    let bytes = match axum::body::to_bytes(body, MAX_FORM).await {
        Ok(b) => b,
        Err(_) => {
            return ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too-large",
                format!("a form is at most {MAX_FORM} bytes"),
            )
            .into_response();
        }
    };
    let token = bytes
        .split(|b| *b == b'&')
        .find_map(|pair| pair.strip_prefix(b"csrf="))
        .and_then(|v| std::str::from_utf8(v).ok())
        .map(str::to_owned);
    let mut req = axum::extract::Request::from_parts(parts, axum::body::Body::from(bytes));
    if let Some(token) = token {
        req.extensions_mut().insert(FormCsrf(token));
    }
    next.run(req).await
}

/// A session is marked used at most this often (a write per request otherwise).
const TOUCH_EVERY_MS: i64 = 10_000;

impl Api {
    /// Checks `Host` and `Origin`, then resolves the caller's credential (a
    /// bearer token, else a session cookie, else a certificate; see the module
    /// docs) to the principal it acts as.
    pub(crate) async fn principal(&self, caller: &Caller) -> ApiResult<Principal> {
        self.check_origin(&caller.headers)?;
        if let PeerCert::Refused(why) = &caller.cert {
            return Err(ApiError::unauthenticated(why.clone()));
        }
        if let Some(auth) = caller.headers.get(header::AUTHORIZATION) {
            return self.token_principal(auth).await;
        }
        if let Some(id) = caller.session_cookie() {
            return self.session_principal(caller, id).await;
        }
        if let PeerCert::Verified { identity, serial } = &caller.cert {
            return self.certificate_principal(identity, serial).await;
        }
        Err(ApiError::unauthenticated(
            "no credentials: send `Authorization: Bearer <token>`, log in \
             (POST /api/v1/login), or present a user certificate over HTTPS",
        ))
    }

    async fn token_principal(&self, auth: &header::HeaderValue) -> ApiResult<Principal> {
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
            via: Via::Token(token.id),
        })
    }

    async fn session_principal(&self, caller: &Caller, id: &str) -> ApiResult<Principal> {
        let store = &self.portal.store;
        let hash = crate::auth::hash_secret(id);
        let ended = || ApiError::unauthenticated("this session has ended: log in again");
        let session = store.session(hash).await?.ok_or_else(ended)?;
        let now = now_ms();
        // Removed, or their grant changed since the login: the session ends.
        let user = store.user(&session.user).await?;
        let current = user.as_ref().is_some_and(|u| u.grant == session.grant);
        if session.expired(now) || !current {
            store.delete_session(hash).await?;
            return Err(ended());
        }
        if caller.changes_state() {
            let sent = caller
                .headers
                .get("x-csrf-token")
                .and_then(|v| v.to_str().ok())
                .or(caller.form_csrf.as_deref());
            if !sent.is_some_and(|t| crate::auth::same_secret(t.trim(), &session.csrf)) {
                return Err(ApiError::forbidden(
                    "csrf",
                    "a change made with a session cookie must carry the session's CSRF token \
                     (the `X-CSRF-Token` header, or a `csrf` form field; GET /api/v1/whoami \
                     shows it)",
                ));
            }
        }
        if now - session.last_used >= TOUCH_EVERY_MS {
            store.touch_session(hash, now).await?;
        }
        Ok(Principal {
            user: session.user,
            grant: session.grant,
            targets: None,
            via: Via::Session {
                hash,
                csrf: session.csrf,
            },
        })
    }

    async fn certificate_principal(
        &self,
        identity: &wire::Identity,
        serial: &[u8],
    ) -> ApiResult<Principal> {
        let wire::Identity::User { name, grant } = identity else {
            return Err(ApiError::forbidden(
                "forbidden",
                format!(
                    "`{identity}` is not a person: only user certificates act at the portal's API"
                ),
            ));
        };
        let user = self.portal.store.user(name).await?.ok_or_else(|| {
            ApiError::unauthenticated(format!(
                "the certificate `{identity}` names `{name}`, who is not a user of this portal: \
                 an admin adds them with `molt user add {name} --grant {grant}`"
            ))
        })?;
        Ok(Principal {
            user: user.name,
            grant: (*grant).min(user.grant),
            targets: None,
            via: Via::Certificate(wire::revocation::serial_hex(serial)),
        })
    }

    pub(crate) fn check_origin(&self, headers: &HeaderMap) -> ApiResult<()> {
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

    pub(crate) async fn audit(
        &self,
        who: &Principal,
        action: &str,
        subject: String,
        detail: String,
    ) {
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

    pub(crate) async fn repo(&self) -> ApiResult<RepoClient> {
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

    /// The targets `who` may act on (a scoped token's, or all).
    pub(crate) async fn targets_in_scope(&self, who: &Principal) -> ApiResult<Vec<Target>> {
        Ok(self
            .portal
            .store
            .targets()
            .await?
            .into_iter()
            .filter(|t| who.require_scope(&t.name).is_ok())
            .collect())
    }

    pub(crate) async fn target(&self, name: &TargetName) -> ApiResult<Target> {
        self.portal
            .store
            .target(name)
            .await?
            .ok_or_else(|| ApiError::not_found(format!("no target named `{name}`")))
    }

    pub(crate) async fn deployment(&self, id: DeploymentId) -> ApiResult<Deployment> {
        self.portal
            .store
            .deployment(id)
            .await?
            .ok_or_else(|| ApiError::not_found(format!("no deployment {id}")))
    }
}

pub(crate) type Shared = State<Arc<Api>>;

async fn whoami(State(api): Shared, caller: Caller) -> ApiResult<impl IntoResponse> {
    let who = api.principal(&caller).await?;
    let csrf = match &who.via {
        Via::Session { csrf, .. } => Some(csrf.clone()),
        _ => None,
    };
    Ok(axum::Json(json!({
        "user": who.user,
        "grant": who.grant,
        "targets": who.targets,
        "via": who.via.kind(),
        "csrf": csrf,
    })))
}

// ---------------------------------------------------------------------------
// Browser sessions

/// Failed logins per user name, in memory: how many in a row, one attempt
/// per name at a time (the lock is held through the delay and the check, so
/// parallel guesses queue behind each other).
#[derive(Debug, Default)]
struct Logins {
    names: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<u32>>>>,
}

/// The most names whose failures are remembered before the clean ones are
/// forgotten.
const MAX_LOGIN_NAMES: usize = 10_000;

impl Logins {
    fn slot(&self, name: &str) -> Arc<tokio::sync::Mutex<u32>> {
        let mut names = self.names.lock().unwrap_or_else(|p| p.into_inner());
        if names.len() >= MAX_LOGIN_NAMES {
            names.retain(|_, slot| {
                Arc::strong_count(slot) > 1 || slot.try_lock().map_or(true, |n| *n > 0)
            });
        }
        names.entry(name.to_owned()).or_default().clone()
    }

    fn forget(&self, name: &str) {
        let mut names = self.names.lock().unwrap_or_else(|p| p.into_inner());
        names.remove(name);
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LoginInput {
    user: String,
    password: String,
}

impl std::fmt::Debug for LoginInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoginInput")
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

/// The `Set-Cookie` value of a session (an empty, expired one ends it).
fn session_cookie(id: &str, max_age_secs: i64, tls: bool) -> String {
    let secure = if tls { "; Secure" } else { "" };
    format!(
        "{SESSION_COOKIE}={id}; HttpOnly; SameSite=Strict; Path=/; Max-Age={max_age_secs}{secure}"
    )
}

/// A session just opened by [`Api::log_in`].
pub(crate) struct LoggedIn {
    /// The user.
    pub(crate) user: UserName,
    /// Their grant.
    pub(crate) grant: Grant,
    /// The session's CSRF token.
    pub(crate) csrf: String,
    /// When it ends at the latest.
    pub(crate) expires: i64,
    /// The `Set-Cookie` value that carries it.
    pub(crate) cookie: String,
}

impl Api {
    /// Checks a user name and password and opens a session (the API's
    /// `POST /api/v1/login` and the login page alike). A name that failed
    /// [`crate::auth::FREE_LOGIN_FAILURES`] times in a row waits before each
    /// further attempt is answered, doubling up to 30 s; a success resets it.
    /// Refused: 401 `bad-login` with the count and delays in its details.
    pub(crate) async fn log_in(
        &self,
        name: &str,
        password: String,
        tls: bool,
    ) -> ApiResult<LoggedIn> {
        let name = name.trim().to_owned();
        if name.is_empty() || name.len() > 200 {
            return Err(ApiError::bad("user", "a user name is 1 to 200 characters"));
        }
        let slot = self.logins.slot(&name);
        let mut failures = slot.lock().await;
        let waited = crate::auth::login_delay(*failures);
        if !waited.is_zero() {
            tracing::info!(user = %name, failures = *failures, waited_ms = waited.as_millis() as u64, "slowing a login after failures");
            tokio::time::sleep(waited).await;
        }
        let user = match UserName::new(&name) {
            Ok(n) => self.portal.store.user(&n).await?,
            Err(_) => None,
        };
        let hash = user.as_ref().and_then(|u| u.password.clone());
        let matches = tokio::task::spawn_blocking(move || {
            crate::auth::verify_password(&password, hash.as_deref())
        })
        .await
        .unwrap_or(false);
        let Some(user) = user.filter(|_| matches) else {
            *failures = failures.saturating_add(1);
            let next = crate::auth::login_delay(*failures);
            tracing::warn!(user = %name, failures = *failures, "failed login");
            let mut e = ApiError::unauthenticated("wrong user name or password");
            e.code = "bad-login";
            e.details = Some(json!({
                "failed_attempts": *failures,
                "waited_ms": waited.as_millis() as u64,
                "next_delay_ms": next.as_millis() as u64,
            }));
            if !next.is_zero() {
                e.retry_after = Some(next.as_millis().div_ceil(1000) as u64);
            }
            return Err(e);
        };
        *failures = 0;
        drop(failures);
        self.logins.forget(&name);
        let id = crate::auth::new_random().map_err(|e| ApiError::internal(e.to_string()))?;
        let csrf = crate::auth::new_random().map_err(|e| ApiError::internal(e.to_string()))?;
        let now = now_ms();
        let session = Session {
            hash: crate::auth::hash_secret(&id),
            user: user.name.clone(),
            grant: user.grant,
            csrf: csrf.clone(),
            created: now,
            last_used: now,
        };
        self.portal.store.create_session(session).await?;
        let who = Principal {
            user: user.name.clone(),
            grant: user.grant,
            targets: None,
            via: Via::Session {
                hash: crate::auth::hash_secret(&id),
                csrf: csrf.clone(),
            },
        };
        self.audit(
            &who,
            "session.login",
            format!("user {}", user.name),
            String::new(),
        )
        .await;
        Ok(LoggedIn {
            user: user.name,
            grant: user.grant,
            csrf,
            expires: now + SESSION_MAX_MS,
            cookie: session_cookie(&id, SESSION_MAX_MS / 1000, tls),
        })
    }

    /// Ends the session `who` came with; the `Set-Cookie` value that clears
    /// its cookie.
    pub(crate) async fn log_out(&self, who: &Principal, tls: bool) -> ApiResult<String> {
        let Via::Session { hash, .. } = &who.via else {
            return Err(ApiError::bad(
                "credential",
                "only a browser session logs out; a token is revoked (DELETE /api/v1/tokens/ID)",
            ));
        };
        self.portal.store.delete_session(*hash).await?;
        self.audit(
            who,
            "session.logout",
            format!("user {}", who.user),
            String::new(),
        )
        .await;
        Ok(session_cookie("", 0, tls))
    }
}

/// `POST /api/v1/login {user, password}`: a new session in the `molt_session`
/// cookie, and its CSRF token in the answer (see [`Api::log_in`]).
async fn login(State(api): Shared, caller: Caller, body: Bytes) -> ApiResult<Response> {
    api.check_origin(&caller.headers)?;
    let input: LoginInput = parse(&body)?;
    let done = api.log_in(&input.user, input.password, caller.tls).await?;
    Ok((
        [(header::SET_COOKIE, done.cookie)],
        axum::Json(json!({
            "user": done.user,
            "grant": done.grant,
            "csrf": done.csrf,
            "expires": done.expires,
        })),
    )
        .into_response())
}

/// `POST /api/v1/logout`: ends the session the cookie names (with its CSRF
/// token, like every change).
async fn logout(State(api): Shared, caller: Caller) -> ApiResult<Response> {
    let who = api.principal(&caller).await?;
    let cookie = api.log_out(&who, caller.tls).await?;
    Ok((StatusCode::NO_CONTENT, [(header::SET_COOKIE, cookie)]).into_response())
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

/// Settings as a request gives them: what is left out keeps its value
/// (`"strategy": null` goes back to each instance's own default).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SettingsInput {
    /// `None`: keep; `Some(None)`: each instance's default.
    #[serde(default, deserialize_with = "present")]
    pub(crate) strategy: Option<Option<Strategy>>,
    pub(crate) rollout: Option<Rollout>,
    pub(crate) canary_secs: Option<u64>,
    pub(crate) parallel: Option<u32>,
    pub(crate) keep_history: Option<u32>,
    pub(crate) keep_rollback: Option<u32>,
}

/// A field that is present, even as `null` (`Some(None)`); absent is `None`
/// through `#[serde(default)]`.
fn present<'de, T, D>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    T: Deserialize<'de>,
    D: serde::Deserializer<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

impl SettingsInput {
    fn apply(self, mut s: Settings) -> ApiResult<Settings> {
        if let Some(strategy) = self.strategy {
            s.strategy = strategy;
        }
        if let Some(r) = self.rollout {
            s.rollout = r;
        }
        if let Some(c) = self.canary_secs {
            s.canary_secs = c;
        }
        if let Some(p) = at_least_one("parallel", self.parallel)? {
            s.parallel = p;
        }
        if let Some(k) = at_least_one("keep_history", self.keep_history)? {
            s.keep_history = k;
        }
        if let Some(k) = self.keep_rollback {
            s.keep_rollback = k;
        }
        Ok(s)
    }
}

/// A setting that must be at least 1, if given.
fn at_least_one(name: &str, value: Option<u32>) -> ApiResult<Option<u32>> {
    match value {
        Some(0) => Err(ApiError::bad(
            &format!("settings.{name}"),
            format!("{name} must be at least 1"),
        )),
        other => Ok(other),
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

/// One of a target's instances as the API and the pages show it.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct InstanceSummary {
    pub(crate) name: InstanceName,
    /// Is its shell attached now?
    pub(crate) online: bool,
    /// What it registered with, if it ever did.
    pub(crate) stage: Option<Stage>,
    pub(crate) image: Option<ImageRef>,
    pub(crate) generation: Option<u64>,
    pub(crate) last_seen: Option<i64>,
}

/// A target's last deployment, in brief.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct LastDeployment {
    pub(crate) id: DeploymentId,
    pub(crate) state: DeploymentState,
    pub(crate) image: ImageRef,
    pub(crate) created: i64,
}

/// A target as the API shows it (`GET /api/v1/targets`) and the Services
/// page lists it: its instances' state, its current image (the newest
/// succeeded deployment's), its last deployment and how many are queued.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct TargetSummary {
    pub(crate) name: TargetName,
    pub(crate) stage: Stage,
    pub(crate) settings: Settings,
    pub(crate) created: i64,
    pub(crate) instances: Vec<InstanceSummary>,
    pub(crate) image: Option<ImageRef>,
    pub(crate) last_deployment: Option<LastDeployment>,
    pub(crate) queued: usize,
}

impl TargetSummary {
    /// How many of its instances are online.
    pub(crate) fn online(&self) -> usize {
        self.instances.iter().filter(|i| i.online).count()
    }
}

/// The summaries of `targets`, reading the instances and the queue once.
pub(crate) async fn target_summaries(
    api: &Api,
    targets: &[Target],
) -> ApiResult<Vec<TargetSummary>> {
    let store = &api.portal.store;
    let known: BTreeMap<_, _> = store
        .instances()
        .await?
        .into_iter()
        .map(|i| (i.name.clone(), i))
        .collect();
    let queue = store.queue().await?;
    let mut out = Vec::with_capacity(targets.len());
    for t in targets {
        let instances = t
            .instances
            .iter()
            .map(|name| {
                let online = api.portal.shells.is_online(name);
                let known = known.get(name);
                InstanceSummary {
                    name: name.clone(),
                    online,
                    stage: known.map(|i| i.stage),
                    image: known.and_then(|i| i.image.clone()),
                    generation: known.map(|i| i.generation),
                    last_seen: known.map(|i| i.last_seen),
                }
            })
            .collect();
        let last = store
            .deployments(DeploymentFilter {
                target: Some(t.name.clone()),
                limit: 1,
                ..Default::default()
            })
            .await?;
        let current = current_image_in(store.as_ref(), &t.name).await?;
        out.push(TargetSummary {
            name: t.name.clone(),
            stage: t.stage,
            settings: t.settings.clone(),
            created: t.created,
            instances,
            image: current,
            last_deployment: last.into_iter().next().map(|d| LastDeployment {
                id: d.id,
                state: d.state,
                image: d.image,
                created: d.created,
            }),
            queued: queue.iter().filter(|d| d.target == t.name).count(),
        });
    }
    Ok(out)
}

/// A target as the API shows it.
async fn target_view(api: &Api, t: &Target) -> ApiResult<TargetSummary> {
    let mut one = target_summaries(api, std::slice::from_ref(t)).await?;
    one.pop()
        .ok_or_else(|| ApiError::internal("a target without its summary"))
}

async fn list_targets(State(api): Shared, caller: Caller) -> ApiResult<impl IntoResponse> {
    api.principal(&caller).await?;
    let targets = api.portal.store.targets().await?;
    Ok(axum::Json(target_summaries(&api, &targets).await?))
}

async fn show_target(
    State(api): Shared,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<impl IntoResponse> {
    api.principal(&caller).await?;
    let t = api.target(&target_name(&name)?).await?;
    Ok(axum::Json(target_view(&api, &t).await?))
}

async fn create_target(
    State(api): Shared,
    caller: Caller,
    body: Bytes,
) -> ApiResult<impl IntoResponse> {
    let who = api.principal(&caller).await?;
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
        format!(
            "stage {}, instances {}",
            target.stage,
            crate::target::names(&target.instances)
        ),
    )
    .await;
    Ok((
        StatusCode::CREATED,
        axum::Json(target_view(&api, &target).await?),
    ))
}

/// A change to a target, as `PUT /api/v1/targets/{name}` and the Settings
/// tab give it: what is left out keeps its value.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TargetEdit {
    pub(crate) stage: Option<Stage>,
    pub(crate) instances: Option<Vec<InstanceName>>,
    #[serde(default)]
    pub(crate) settings: SettingsInput,
}

/// Changes the target `name` as `who` (an admin), audited as `target.edit`:
/// the one way both the API and the Settings tab save a target.
pub(crate) async fn edit_target_as(
    api: &Api,
    who: &Principal,
    name: &TargetName,
    edit: TargetEdit,
) -> ApiResult<Target> {
    who.require_admin("edit targets")?;
    let mut target = api.target(name).await?;
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
        who,
        "target.edit",
        format!("target {}", target.name),
        format!(
            "stage {}, instances {}; {}",
            target.stage,
            crate::target::names(&target.instances),
            target.settings
        ),
    )
    .await;
    Ok(target)
}

async fn edit_target(
    State(api): Shared,
    caller: Caller,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<impl IntoResponse> {
    let who = api.principal(&caller).await?;
    who.require_admin("edit targets")?;
    let name = target_name(&name)?;
    api.target(&name).await?;
    let edit: TargetEdit = parse(&body)?;
    let target = edit_target_as(&api, &who, &name, edit).await?;
    Ok(axum::Json(target_view(&api, &target).await?))
}

/// An instance as `GET /api/v1/instances` and the Instances page show it:
/// what its shell registered, the target it belongs to, online now or not.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct InstanceView {
    pub(crate) name: InstanceName,
    pub(crate) target: Option<TargetName>,
    pub(crate) stage: Stage,
    pub(crate) labels: BTreeMap<String, String>,
    pub(crate) shell_version: String,
    pub(crate) image: Option<ImageRef>,
    pub(crate) generation: u64,
    pub(crate) online: bool,
    pub(crate) last_seen: i64,
}

/// Every instance that ever registered, by name.
pub(crate) async fn instance_views(api: &Api) -> ApiResult<Vec<InstanceView>> {
    let targets = api.portal.store.targets().await?;
    Ok(api
        .portal
        .store
        .instances()
        .await?
        .into_iter()
        .map(|i| InstanceView {
            online: api.portal.shells.is_online(&i.name),
            target: targets
                .iter()
                .find(|t| t.instances.contains(&i.name))
                .map(|t| t.name.clone()),
            name: i.name,
            stage: i.stage,
            labels: i.labels,
            shell_version: i.shell_version,
            image: i.image,
            generation: i.generation,
            last_seen: i.last_seen,
        })
        .collect())
}

async fn list_instances(State(api): Shared, caller: Caller) -> ApiResult<impl IntoResponse> {
    api.principal(&caller).await?;
    Ok(axum::Json(instance_views(&api).await?))
}

/// The repository's images, newest first (`GET /api/v1/images`, the Images
/// page).
pub(crate) async fn images_newest_first(api: &Api) -> ApiResult<Vec<wire::repo::ImageRecord>> {
    let repo = api.repo().await?;
    let mut images = repo
        .images()
        .await
        .map_err(|e| ApiError::new(StatusCode::BAD_GATEWAY, "repository", e.to_string()))?;
    images.reverse();
    Ok(images)
}

async fn list_images(State(api): Shared, caller: Caller) -> ApiResult<impl IntoResponse> {
    api.principal(&caller).await?;
    let images = images_newest_first(&api).await?;
    let out: Vec<_> = images.iter().map(image_view).collect();
    Ok(axum::Json(out))
}

/// The image named `name` in the repository.
pub(crate) async fn resolve_image(api: &Api, name: &ImageName) -> ApiResult<ImageRef> {
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

/// A target's plan for an image: each instance's exact plan from its shell
/// (or why there is none), the services any instance changes, the bytes all
/// of them fetch.
#[derive(Debug, Clone)]
pub(crate) struct TargetPlan {
    pub(crate) image: ImageRef,
    pub(crate) strategy: Option<Strategy>,
    pub(crate) instances: BTreeMap<InstanceName, Result<wire::plan::UpgradePlan, String>>,
    pub(crate) changed_services: std::collections::BTreeSet<String>,
    pub(crate) fetch_bytes: u64,
}

/// Asks every instance of `target` for its plan to `image` (32 at a time,
/// 30 s each), changing nothing.
pub(crate) async fn target_plan(
    api: &Api,
    target: &Target,
    image: ImageRef,
    strategy: Option<Strategy>,
    skip_hooks: bool,
) -> TargetPlan {
    let strategy = strategy.or(target.settings.strategy);
    let req = ShellRequest::Plan {
        image: image.name.clone(),
        strategy,
        skip_hooks,
    };
    let asking = Arc::new(tokio::sync::Semaphore::new(32));
    let mut asked = tokio::task::JoinSet::new();
    for instance in target.instances.iter().cloned() {
        let (shells, req, asking) = (api.portal.shells.clone(), req.clone(), asking.clone());
        asked.spawn(async move {
            let _slot = asking.acquire_owned().await;
            let answer = tokio::time::timeout(
                Duration::from_secs(30),
                shells.call(&instance, &req, |_| {}),
            )
            .await;
            let entry = match answer {
                Ok(Ok(Ok(ShellResponse::Plan(p)))) => Ok(p),
                Ok(Ok(Ok(other))) => Err(format!("unexpected answer {other:?}")),
                Ok(Ok(Err(e))) => Err(e.message),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err("the shell did not answer within 30 s".to_owned()),
            };
            (instance, entry)
        });
    }
    let mut instances = BTreeMap::new();
    while let Some(done) = asked.join_next().await {
        if let Ok((instance, entry)) = done {
            instances.insert(instance, entry);
        }
    }
    let mut fetch_bytes = 0u64;
    let mut changed_services = std::collections::BTreeSet::new();
    for p in instances.values().flatten() {
        fetch_bytes += p.fetch_bytes();
        for s in &p.services {
            if !matches!(s.action, wire::plan::Action::Unchanged) {
                changed_services.insert(s.service.to_string());
            }
        }
    }
    TargetPlan {
        image,
        strategy,
        instances,
        changed_services,
        fetch_bytes,
    }
}

async fn plan(
    State(api): Shared,
    caller: Caller,
    Path(name): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<impl IntoResponse> {
    let who = api.principal(&caller).await?;
    let target = api.target(&target_name(&name)?).await?;
    who.require_scope(&target.name)?;
    let image: ImageName =
        param(&q, "image")?.ok_or_else(|| ApiError::bad("image", "`image` is required"))?;
    let strategy: Option<Strategy> = param(&q, "strategy")?;
    let skip_hooks: bool = param(&q, "skip_hooks")?.unwrap_or(false);
    let image = resolve_image(&api, &image).await?;
    let p = target_plan(&api, &target, image, strategy, skip_hooks).await;
    let instances: BTreeMap<String, Value> = p
        .instances
        .iter()
        .map(|(name, entry)| {
            let v = match entry {
                Ok(plan) => json!({ "plan": plan }),
                Err(e) => json!({ "error": e }),
            };
            (name.to_string(), v)
        })
        .collect();
    Ok(axum::Json(json!({
        "target": target.name,
        "image": p.image,
        "strategy": p.strategy,
        "instances": instances,
        "changed_services": p.changed_services,
        "fetch_bytes": p.fetch_bytes,
    })))
}

/// What a deployment is asked with (`POST /api/v1/deployments`, the Deploy panel).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DeployInput {
    pub(crate) target: TargetName,
    pub(crate) image: ImageName,
    pub(crate) strategy: Option<Strategy>,
    pub(crate) rollout: Option<Rollout>,
    pub(crate) instance: Option<InstanceName>,
    #[serde(default)]
    pub(crate) skip_hooks: bool,
}

/// `instance` (which must be one of the target's), or every instance of the
/// target (it must have one).
fn pick_instances(
    target: &Target,
    instance: Option<&InstanceName>,
) -> ApiResult<Vec<InstanceName>> {
    let instances = match instance {
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
            format!("target `{}` has no instances", target.name),
        ));
    }
    Ok(instances)
}

/// A target's current image: its newest succeeded deployment's.
async fn current_image_in(
    store: &dyn crate::store::Store,
    target: &TargetName,
) -> ApiResult<Option<ImageRef>> {
    let newest = store
        .deployments(DeploymentFilter {
            target: Some(target.clone()),
            state: Some(DeploymentState::Succeeded),
            limit: 1,
            ..Default::default()
        })
        .await?;
    Ok(newest.into_iter().next().map(|d| d.image))
}

/// [`current_image_in`] the portal's store.
pub(crate) async fn current_image(api: &Api, target: &Target) -> ApiResult<Option<ImageRef>> {
    current_image_in(api.portal.store.as_ref(), &target.name).await
}

/// The commits of `image`, from the repository.
pub(crate) async fn image_commits(
    api: &Api,
    image: &ImageRef,
) -> ApiResult<BTreeMap<image_spec::ServiceName, image_spec::CommitId>> {
    let repo = api.repo().await?;
    let record = repo
        .image(&image.name)
        .await
        .map_err(|e| ApiError::new(StatusCode::BAD_GATEWAY, "repository", e.to_string()))?;
    Ok(record.image.services().clone())
}

async fn enqueue(
    api: &Api,
    who: &Principal,
    target: &Target,
    image: ImageRef,
    trigger: Trigger,
    options: DeployOptions,
) -> ApiResult<Deployment> {
    let instances = pick_instances(target, options.instance.as_ref())?;
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
            "target {}, image {}, {}; {}",
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

/// Queues a deployment `who` asks for: their grant checked for the target,
/// the image resolved in the repository.
pub(crate) async fn deploy(
    api: &Api,
    who: &Principal,
    input: DeployInput,
) -> ApiResult<Deployment> {
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
    let image = resolve_image(api, &input.image).await?;
    let options = DeployOptions {
        strategy: input.strategy,
        rollout: input.rollout,
        instance: input.instance,
        skip_hooks: input.skip_hooks,
    };
    enqueue(api, who, &target, image, Trigger::Manual, options).await
}

async fn create_deployment(
    State(api): Shared,
    caller: Caller,
    body: Bytes,
) -> ApiResult<impl IntoResponse> {
    let who = api.principal(&caller).await?;
    let input: DeployInput = parse(&body)?;
    let d = deploy(&api, &who, input).await?;
    Ok((StatusCode::CREATED, axum::Json(d)))
}

/// What a rollback is asked with.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RollbackInput {
    pub(crate) to: Option<DeploymentId>,
    pub(crate) strategy: Option<Strategy>,
    pub(crate) rollout: Option<Rollout>,
}

/// A target's succeeded deployments: the current one (what it runs) and the
/// ones a rollback may go to (its `keep_rollback` before it), newest first.
pub(crate) async fn rollback_window(
    api: &Api,
    target: &Target,
) -> ApiResult<Option<(Deployment, Vec<Deployment>)>> {
    let mut succeeded = api
        .portal
        .store
        .deployments(DeploymentFilter {
            target: Some(target.name.clone()),
            state: Some(DeploymentState::Succeeded),
            limit: target.settings.keep_rollback as usize + 1,
            ..Default::default()
        })
        .await?;
    if succeeded.is_empty() {
        return Ok(None);
    }
    let current = succeeded.remove(0);
    Ok(Some((current, succeeded)))
}

/// Queues a rollback of `target` to the image of `input.to` (default: the
/// succeeded deployment before the current one), which must be in its
/// rollback window.
pub(crate) async fn rollback_target(
    api: &Api,
    who: &Principal,
    target: &Target,
    input: RollbackInput,
) -> ApiResult<Deployment> {
    who.require_deploy(&target.name, target.stage)?;
    let Some((current, earlier)) = rollback_window(api, target).await? else {
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
    enqueue(
        api,
        who,
        target,
        to.image.clone(),
        Trigger::Rollback { of: to.id },
        options,
    )
    .await
}

async fn rollback(
    State(api): Shared,
    caller: Caller,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<impl IntoResponse> {
    let who = api.principal(&caller).await?;
    let target = api.target(&target_name(&name)?).await?;
    who.require_deploy(&target.name, target.stage)?;
    let input: RollbackInput = if body.is_empty() {
        RollbackInput::default()
    } else {
        parse(&body)?
    };
    let d = rollback_target(&api, &who, &target, input).await?;
    Ok((StatusCode::CREATED, axum::Json(d)))
}

async fn list_deployments(
    State(api): Shared,
    caller: Caller,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<impl IntoResponse> {
    let who = api.principal(&caller).await?;
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
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    let who = api.principal(&caller).await?;
    let d = api.deployment(deployment_id(&id)?).await?;
    who.require_scope(&d.target)?;
    Ok(axum::Json(d))
}

/// Cancels deployment `id` for `who`: a queued one at once, a running one
/// before its next instance; 409 once finished.
pub(crate) async fn cancel(api: &Api, who: &Principal, id: DeploymentId) -> ApiResult<Deployment> {
    let d = api.deployment(id).await?;
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
        who,
        "deployment.cancel",
        format!("deployment {}", d.id),
        String::new(),
    )
    .await;
    api.portal.runner.wake();
    Ok(d)
}

async fn cancel_deployment(
    State(api): Shared,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    let who = api.principal(&caller).await?;
    let d = cancel(&api, &who, deployment_id(&id)?).await?;
    Ok(axum::Json(d))
}

async fn to_front(
    State(api): Shared,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    let who = api.principal(&caller).await?;
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
    caller: Caller,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Response> {
    let who = api.principal(&caller).await?;
    let d = api.deployment(deployment_id(&id)?).await?;
    who.require_scope(&d.target)?;
    let after = resume_after(&caller, &q)?;
    let wants_stream = caller
        .headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/event-stream"));
    if !wants_stream {
        let events = api.portal.store.events(d.id, after, 10_000).await?;
        return Ok(axum::Json(events).into_response());
    }
    use tokio_stream::StreamExt as _;
    let stream = follow_events(api.portal.clone(), d.id, after).map(|e| {
        let data = serde_json::to_string(&e).unwrap_or_default();
        Ok::<_, std::convert::Infallible>(
            SseEvent::default()
                .id(e.seq.to_string())
                .event("deployment")
                .data(data),
        )
    });
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(10)))
        .into_response())
}

/// Where an event stream resumes: after `Last-Event-ID` (what a browser
/// sends when it reconnects), else after `?after=N`, else from the start.
pub(crate) fn resume_after(caller: &Caller, q: &HashMap<String, String>) -> ApiResult<u64> {
    let last_id = caller
        .headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.trim()
                .parse::<u64>()
                .map_err(|_| ApiError::bad("Last-Event-ID", "Last-Event-ID is not a number"))
        })
        .transpose()?;
    Ok(last_id.or(param(q, "after")?).unwrap_or(0))
}

/// A deployment's events after `after`: the stored ones, then the live ones,
/// each exactly once, ending after the deployment's final state (or when the
/// stream is dropped: its task ends at its next send).
pub(crate) fn follow_events(
    portal: Arc<Portal>,
    id: DeploymentId,
    after: u64,
) -> tokio_stream::wrappers::ReceiverStream<Event> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Event>(64);
    tokio::spawn(async move { follow(portal, id, after, tx).await });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// Feeds one follower: the stored events after `after`, then the live ones,
/// each exactly once, until the deployment's final state or the follower leaves.
async fn follow(
    portal: Arc<Portal>,
    id: DeploymentId,
    mut after: u64,
    tx: tokio::sync::mpsc::Sender<Event>,
) {
    // Subscribe before reading the store: nothing falls between the two.
    let mut live = portal.journal.subscribe();
    let send = |e: &Event| e.clone();
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
                if tx.send(send(e)).await.is_err() {
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
                    if tx.send(e.clone()).await.is_err() {
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UserInput {
    name: UserName,
    grant: Grant,
    /// Their password; `None`: one is generated and answered once.
    password: Option<String>,
}

/// A user as the API shows them: never their password's hash.
fn user_view(u: &User) -> serde_json::Value {
    json!({
        "name": u.name,
        "grant": u.grant,
        "created": u.created,
        "password": u.password.is_some(),
    })
}

/// The argon2id hash of the given password, or of a generated one (then
/// returned too, to be shown once).
async fn password_hash(given: Option<String>) -> ApiResult<(String, Option<String>)> {
    let (password, generated) = match given {
        Some(p) => (p, false),
        None => (
            crate::auth::new_random().map_err(|e| ApiError::internal(e.to_string()))?,
            true,
        ),
    };
    let hashed = {
        let password = password.clone();
        tokio::task::spawn_blocking(move || crate::auth::hash_password(&password))
            .await
            .map_err(|e| ApiError::internal(e.to_string()))?
    };
    let hash = hashed.map_err(|e| match e {
        crate::auth::PasswordError::Length(_) => ApiError::bad("password", e.to_string()),
        other => ApiError::internal(other.to_string()),
    })?;
    Ok((hash, generated.then_some(password)))
}

async fn list_users(State(api): Shared, caller: Caller) -> ApiResult<impl IntoResponse> {
    api.principal(&caller).await?.require_admin("list users")?;
    let users = api.portal.store.users().await?;
    Ok(axum::Json(users.iter().map(user_view).collect::<Vec<_>>()))
}

async fn create_user(
    State(api): Shared,
    caller: Caller,
    body: Bytes,
) -> ApiResult<impl IntoResponse> {
    let who = api.principal(&caller).await?;
    who.require_admin("add users")?;
    let input: UserInput = parse(&body)?;
    if api.portal.store.user(&input.name).await?.is_some() {
        return Err(StoreError::UserExists(input.name).into());
    }
    let (hash, generated) = password_hash(input.password).await?;
    let user = User {
        name: input.name,
        grant: input.grant,
        created: now_ms(),
        password: Some(hash),
    };
    api.portal.store.put_user(user.clone(), false).await?;
    api.audit(
        &who,
        "user.add",
        format!("user {}", user.name),
        format!("grant {}", user.grant),
    )
    .await;
    let mut view = user_view(&user);
    if let Some(p) = generated {
        view["generated_password"] = json!(p);
    }
    Ok((StatusCode::CREATED, axum::Json(view)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PasswordInput {
    /// The new password; `None`: one is generated and answered once.
    password: Option<String>,
}

/// `PUT /api/v1/users/{name}/password {password?}` (admin): sets a user's
/// password, or a generated one; their sessions end.
async fn set_password(
    State(api): Shared,
    caller: Caller,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<impl IntoResponse> {
    let who = api.principal(&caller).await?;
    who.require_admin("set passwords")?;
    let name = UserName::new(&name).map_err(|e| ApiError::bad("name", e.to_string()))?;
    let input: PasswordInput = if body.is_empty() {
        PasswordInput { password: None }
    } else {
        parse(&body)?
    };
    let mut user = api
        .portal
        .store
        .user(&name)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no user named `{name}`")))?;
    let (hash, generated) = password_hash(input.password).await?;
    user.password = Some(hash);
    api.portal.store.put_user(user.clone(), true).await?;
    api.audit(
        &who,
        "user.password",
        format!("user {name}"),
        "sessions ended".into(),
    )
    .await;
    let mut view = user_view(&user);
    if let Some(p) = generated {
        view["generated_password"] = json!(p);
    }
    Ok(axum::Json(view))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UserEdit {
    grant: Grant,
}

async fn edit_user(
    State(api): Shared,
    caller: Caller,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<impl IntoResponse> {
    let who = api.principal(&caller).await?;
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
        format!("grant {} (sessions ended)", user.grant),
    )
    .await;
    Ok(axum::Json(user_view(&user)))
}

async fn remove_user(
    State(api): Shared,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<impl IntoResponse> {
    let who = api.principal(&caller).await?;
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
        "tokens revoked, sessions ended".into(),
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

async fn list_tokens(State(api): Shared, caller: Caller) -> ApiResult<impl IntoResponse> {
    api.principal(&caller).await?.require_admin("list tokens")?;
    let tokens = api.portal.store.tokens().await?;
    let views: Vec<TokenView<'_>> = tokens.iter().map(TokenView::from).collect();
    Ok(axum::Json(serde_json::to_value(views).unwrap_or_default()))
}

async fn create_token(
    State(api): Shared,
    caller: Caller,
    body: Bytes,
) -> ApiResult<impl IntoResponse> {
    let who = api.principal(&caller).await?;
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
            "for {}, grant {}, targets {}",
            token.user,
            token.grant,
            token
                .targets
                .as_deref()
                .map_or_else(|| "all".to_owned(), crate::target::names)
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
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    let who = api.principal(&caller).await?;
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
    caller: Caller,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<impl IntoResponse> {
    api.principal(&caller)
        .await?
        .require_admin("read the audit log")?;
    let after: u64 = param(&q, "after")?.unwrap_or(0);
    let limit: usize = param(&q, "limit")?.unwrap_or(100).min(1000);
    Ok(axum::Json(api.portal.store.audit_log(after, limit).await?))
}

// ---------------------------------------------------------------------------
// Images on a person's behalf, and the repository's ref moves

pub(crate) fn repo_error(e: repo_client::ClientError) -> ApiError {
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
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<impl IntoResponse> {
    api.principal(&caller).await?;
    let name = ImageName::new(&name).map_err(|e| ApiError::bad("name", e.to_string()))?;
    let record = api.repo().await?.image(&name).await.map_err(repo_error)?;
    Ok(axum::Json(image_view(&record)))
}

/// A new image, as `POST /api/v1/images` and the "new image from this one"
/// form give it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ImageInput {
    pub(crate) name: ImageName,
    /// Start from this image's services.
    pub(crate) from: Option<ImageName>,
    /// Service → revision (branch, commit id or abbreviation) to set.
    #[serde(default)]
    pub(crate) set: BTreeMap<image_spec::ServiceName, String>,
    #[serde(default)]
    pub(crate) description: String,
}

/// Creates an image in the repository on `who`'s behalf: they are its
/// author (the repository records that the portal made the request);
/// audited as `image.create`. The one way both the API and the pages make
/// an image. A bad `from` names the field `from`, a revision that does not
/// resolve `set.SERVICE`.
pub(crate) async fn create_image_as(
    api: &Api,
    who: &Principal,
    input: ImageInput,
) -> ApiResult<wire::repo::ImageRecord> {
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
    let image = image_spec::Image::new(input.name, input.description, services).map_err(|e| {
        let field = match e {
            image_spec::ImageError::DescriptionTooLong { .. } => "description",
            _ => "set",
        };
        ApiError::bad(field, e.to_string())
    })?;
    let record = repo
        .create_image_for(image, who.user.clone())
        .await
        .map_err(|e| {
            let taken = e.remote_kind() == Some(&wire::repo::ErrorKind::AlreadyExists);
            ApiError {
                field: taken.then(|| "name".to_owned()),
                ..repo_error(e)
            }
        })?;
    api.audit(
        who,
        "image.create",
        format!("image {}", record.image.name()),
        match &input.from {
            Some(from) => format!("id {}, from image {from}", record.id),
            None => format!("id {}", record.id),
        },
    )
    .await;
    Ok(record)
}

async fn create_image(
    State(api): Shared,
    caller: Caller,
    body: Bytes,
) -> ApiResult<impl IntoResponse> {
    let who = api.principal(&caller).await?;
    let input: ImageInput = parse(&body)?;
    let record = create_image_as(&api, &who, input).await?;
    Ok((StatusCode::CREATED, axum::Json(image_view(&record))))
}

/// The repository's recent ref moves after `?after=N`, oldest first.
async fn list_refs(
    State(api): Shared,
    caller: Caller,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<impl IntoResponse> {
    api.principal(&caller).await?;
    let after: u64 = param(&q, "after")?.unwrap_or(0);
    Ok(axum::Json(api.portal.refs.after(after)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_left_out_keep_their_value_and_a_null_strategy_clears_it() {
        let shadow = Settings {
            strategy: Some(Strategy::Shadow),
            ..Settings::default()
        };
        let edit = |body: &str| -> SettingsInput { parse(&Bytes::from(body.to_owned())).unwrap() };
        let kept = edit(r#"{"parallel": 3}"#).apply(shadow.clone()).unwrap();
        assert_eq!(kept.strategy, Some(Strategy::Shadow));
        assert_eq!(kept.parallel, 3);
        let cleared = edit(r#"{"strategy": null}"#).apply(shadow.clone()).unwrap();
        assert_eq!(cleared.strategy, None);
        let set = edit(r#"{"strategy": "in-place"}"#).apply(shadow).unwrap();
        assert_eq!(set.strategy, Some(Strategy::InPlace));
        let e = edit(r#"{"parallel": 0}"#)
            .apply(Settings::default())
            .unwrap_err();
        assert_eq!(e.field.as_deref(), Some("settings.parallel"));
    }
}
