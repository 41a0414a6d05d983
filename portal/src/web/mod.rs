//! The portal's web pages: server-rendered HTML for people, served on the
//! same listeners as the API (outside `/api`).
//!
//! This module owns the pages, their templates (`portal/templates/`, askama,
//! every value HTML-escaped, nothing user-given ever marked safe) and the
//! static assets they load (`portal/assets/`: a vendored htmx 2 and its SSE
//! extension, molt's stylesheet and a few lines of its own JavaScript), served
//! under `/assets/<content hash>/<file>` with a year-long immutable cache.
//!
//! It owns no data and no rule: each handler authenticates through the API's
//! [`Api::principal`](crate::api) (so a page accepts the same session cookie,
//! token or certificate the API does), gathers what it shows with the same
//! store, runner and shells calls the API makes (shared helpers of
//! [`crate::api`]: target summaries, plans, deploy, cancel, rollback, the
//! deployment's event stream), and renders a typed template. Every page reads
//! without JavaScript; the live parts (a deployment's progress and log) follow
//! a Server-Sent Events stream of HTML fragments through htmx, resuming after
//! the last event shown.
//!
//! Sessions are the API's: the login form opens one with
//! [`Api::log_in`](crate::api), the logout form ends it. Every form carries a
//! CSRF token: the session's (checked by `Api::principal` from the `csrf`
//! field), or before a login a token of its own in a cookie, checked against
//! the form's field. Every page carries a strict Content-Security-Policy (no
//! inline script or style).
//!
//! | route | page |
//! |---|---|
//! | `GET /login`, `POST /login`, `POST /logout` | [`session`] |
//! | `GET /`, `GET /services` | the Services list ([`services`]) |
//! | `GET /services/{name}` | a service's Overview: instances and their microservices, drift |
//! | `GET /services/{name}/deployment?image=I` | its images, the plan for `I`, the Deploy panel |
//! | `POST /services/{name}/deploy` | queues a deployment, then its page |
//! | `GET /services/{name}/history` | its deployments, filtered and paged |
//! | `GET`/`POST /services/{name}/settings` | its settings and instances, admins only ([`settings`]) |
//! | `GET /images`, `GET /images/{name}` | the images, one image ([`images`]) |
//! | `POST /images/{name}/new` | a new image from this one, on the person's behalf |
//! | `GET /repository` | every microservice and its branches ([`repository`]) |
//! | `GET /repository/{service}?branch=B` | a branch's commit log |
//! | `GET /repository/{service}/commits/{rev}` | a commit and its changes, text diffs of small text files |
//! | `GET /repository/{service}/diff?from=A&to=B` | the changes between two commits (the plan links here) |
//! | `GET /instances` | every instance, admins only ([`instances`]) |
//! | `GET /audit?before=N` | the audit log, newest first, paged; admins only ([`audit`]) |
//! | `GET /deployments/{id}` | a deployment's progress and log ([`deployments`]) |
//! | `GET /deployments/{id}/live` | its live fragments (SSE) |
//! | `POST /deployments/{id}/cancel`, `POST /deployments/{id}/rollback` | |
//! | `GET /assets/{hash}/{file}` | [`assets`] |

pub mod assets;
pub mod audit;
pub mod deployments;
pub mod format;
pub mod images;
pub mod instances;
pub mod repository;
pub mod services;
pub mod session;
pub mod settings;

use std::sync::Arc;

use askama::Template;
use axum::Router;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};

use crate::api::{Api, ApiError};
use crate::auth::{Principal, Via};

/// The pages' routes, merged into the API's router (which adds the `csrf`
/// form-field reader in front of them).
pub(crate) fn routes() -> Router<Arc<Api>> {
    Router::new()
        .route("/", get(services::list))
        .route("/services", get(services::list))
        .route("/services/{name}", get(services::overview))
        .route("/services/{name}/deployment", get(services::deployment_tab))
        .route("/services/{name}/deploy", post(services::deploy))
        .route("/services/{name}/history", get(services::history))
        .route(
            "/services/{name}/settings",
            get(settings::show).post(settings::save),
        )
        .route("/images", get(images::list))
        .route("/images/{name}", get(images::show))
        .route("/images/{name}/new", post(images::create))
        .route("/repository", get(repository::services))
        .route("/repository/{service}", get(repository::log))
        .route(
            "/repository/{service}/commits/{rev}",
            get(repository::commit),
        )
        .route("/repository/{service}/diff", get(repository::diff))
        .route("/instances", get(instances::list))
        .route("/audit", get(audit::list))
        .route("/deployments/{id}", get(deployments::show))
        .route("/deployments/{id}/live", get(deployments::live))
        .route("/deployments/{id}/cancel", post(deployments::cancel))
        .route("/deployments/{id}/rollback", post(deployments::rollback))
        .route("/login", get(session::form_page).post(session::submit))
        .route("/logout", post(session::logout))
        .route("/assets/{hash}/{file}", get(assets::serve))
        .layer(axum::middleware::from_fn(security_headers))
}

/// The Content-Security-Policy of every page: scripts, styles and event
/// streams from the portal only, no inline script or style, no framing.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self' data:; connect-src 'self'; form-action 'self'; \
     frame-ancestors 'none'; base-uri 'none'";

async fn security_headers(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let mut response = next.run(req).await;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    response
}

/// What every page's frame shows: who is logged in, the CSRF token its forms
/// carry, the assets' URLs.
#[derive(Debug, Clone)]
pub struct Layout {
    /// The user's name.
    pub user: String,
    /// Their grant, as text.
    pub grant: String,
    /// The CSRF token every form of the page carries (a session's; empty
    /// for a token or a certificate, which need none).
    pub csrf: String,
    /// Logged in by a session (so the page shows Log out)?
    pub session: bool,
    /// The assets' URLs.
    pub assets: &'static assets::Urls,
    /// Which part of the navigation is current (`services`, `images`,
    /// `repository`, `instances`, `audit`).
    pub section: &'static str,
    /// An admin (the navigation shows Instances and Audit, a service its
    /// Settings tab)?
    pub admin: bool,
}

impl Layout {
    /// The frame of a page for `who`.
    pub fn new(who: &Principal, section: &'static str) -> Self {
        let (csrf, session) = match &who.via {
            Via::Session { csrf, .. } => (csrf.clone(), true),
            _ => (String::new(), false),
        };
        Self {
            user: who.user.to_string(),
            grant: who.grant.to_string(),
            csrf,
            session,
            assets: assets::urls(),
            section,
            admin: who.grant == wire::Grant::Admin,
        }
    }
}

/// Why a page could not be shown: an error page, or a redirect to the login.
#[derive(Debug)]
pub enum PageError {
    /// Not logged in (or the session ended): to the login page, then back.
    Login {
        /// The page to come back to.
        next: String,
    },
    /// An error of the API's kind, shown as a page.
    Api(ApiError),
    /// A template failed to render.
    Render(askama::Error),
}

impl From<ApiError> for PageError {
    fn from(e: ApiError) -> Self {
        PageError::Api(e)
    }
}

impl From<askama::Error> for PageError {
    fn from(e: askama::Error) -> Self {
        PageError::Render(e)
    }
}

impl From<crate::store::StoreError> for PageError {
    fn from(e: crate::store::StoreError) -> Self {
        PageError::Api(e.into())
    }
}

impl From<crate::auth::Denied> for PageError {
    fn from(e: crate::auth::Denied) -> Self {
        PageError::Api(e.into())
    }
}

/// The error page.
#[derive(Template)]
#[template(path = "error.html")]
struct ErrorPage {
    status: u16,
    title: String,
    message: String,
    code: String,
    assets: &'static assets::Urls,
}

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        let (status, code, message) = match self {
            PageError::Login { next } => {
                let next = if safe_next(&next) { next } else { "/".into() };
                return Redirect::to(&format!("/login?next={}", urlencode(&next))).into_response();
            }
            PageError::Api(e) => (e.status, e.code.to_owned(), e.message),
            PageError::Render(e) => {
                tracing::error!(error = %e, "a page failed to render");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal".to_owned(),
                    "the page failed to render (the portal's log says why)".to_owned(),
                )
            }
        };
        let page = ErrorPage {
            status: status.as_u16(),
            title: status.canonical_reason().unwrap_or("Error").to_owned(),
            message,
            code,
            assets: assets::urls(),
        };
        match page.render() {
            Ok(html) => (status, Html(html)).into_response(),
            Err(_) => (status, page.message).into_response(),
        }
    }
}

/// What a page handler returns.
pub type PageResult = Result<Response, PageError>;

/// Renders a template as a 200 page.
pub(crate) fn page(t: &impl Template) -> PageResult {
    Ok(Html(t.render()?).into_response())
}

/// The principal of a page's request; not logged in → the login page.
pub(crate) async fn principal(
    api: &Api,
    caller: &crate::api::Caller,
    here: &str,
) -> Result<Principal, PageError> {
    match api.principal(caller).await {
        Ok(p) => Ok(p),
        Err(e) if e.status == StatusCode::UNAUTHORIZED => Err(PageError::Login {
            next: here.to_owned(),
        }),
        Err(e) => Err(e.into()),
    }
}

/// Is `next` a path of this portal (not another site's, not `//host`)?
pub(crate) fn safe_next(next: &str) -> bool {
    next.starts_with('/') && !next.starts_with("//") && !next.contains('\\')
}

/// Percent-encodes a query value.
pub(crate) fn urlencode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// A page's form body, parsed; a malformed one is a 400 naming the problem.
pub(crate) fn form<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, PageError> {
    serde_urlencoded::from_bytes(body)
        .map_err(|e| PageError::Api(ApiError::bad("form", format!("a malformed form: {e}"))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_own_paths_are_followed_after_a_login() {
        assert!(safe_next("/services/shop"));
        assert!(!safe_next("//evil.example/"));
        assert!(!safe_next("https://evil.example/"));
        assert!(!safe_next("/\\evil.example"));
        assert_eq!(urlencode("/a b?c=d&e"), "/a%20b%3Fc%3Dd%26e");
    }
}
