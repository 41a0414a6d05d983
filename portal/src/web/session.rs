//! Logging in and out, on the API's sessions ([`Api::log_in`], [`Api::log_out`]).
//!
//! The login form has no session to take a CSRF token from, so it carries a
//! token of its own: a random value set in the `molt_login_csrf` cookie
//! (HttpOnly, SameSite=Strict, Path=/login) when the form is shown, and
//! required in the form's `csrf` field, equal, when it is sent. A login
//! refused is shown next to the field at fault, with how long the next
//! attempt waits after repeated failures.

use std::collections::HashMap;

use askama::Template;
use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use serde::Deserialize;

use super::{PageError, PageResult, assets, form, safe_next};
use crate::api::{Caller, Shared};

/// The cookie that carries the login form's CSRF token.
const LOGIN_CSRF_COOKIE: &str = "molt_login_csrf";

#[derive(Template)]
#[template(path = "login.html")]
struct LoginPage {
    assets: &'static assets::Urls,
    csrf: String,
    next: String,
    user: String,
    user_error: Option<String>,
    password_error: Option<String>,
    form_error: Option<String>,
}

fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(n, _)| *n == name)
        .map(|(_, v)| v.trim().to_owned())
        .filter(|v| !v.is_empty())
}

/// Renders the login form with a fresh CSRF token in its cookie.
fn login_page(mut page: LoginPage, status: StatusCode, tls: bool) -> PageResult {
    let token = crate::auth::new_random()
        .map_err(|e| PageError::Api(crate::api::ApiError::bad("csrf", e.to_string())))?;
    page.csrf = token.clone();
    let secure = if tls { "; Secure" } else { "" };
    let set = format!(
        "{LOGIN_CSRF_COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/login; Max-Age=3600{secure}"
    );
    Ok((status, [(header::SET_COOKIE, set)], Html(page.render()?)).into_response())
}

fn next_of(q: &HashMap<String, String>) -> String {
    q.get("next")
        .filter(|n| safe_next(n))
        .cloned()
        .unwrap_or_else(|| "/".into())
}

/// `GET /login?next=/path`.
pub(crate) async fn form_page(
    State(api): Shared,
    caller: Caller,
    Query(q): Query<HashMap<String, String>>,
) -> PageResult {
    api.check_origin(&caller.headers)?;
    let page = LoginPage {
        assets: assets::urls(),
        csrf: String::new(),
        next: next_of(&q),
        user: String::new(),
        user_error: None,
        password_error: None,
        form_error: None,
    };
    login_page(page, StatusCode::OK, caller.tls)
}

#[derive(Deserialize)]
struct LoginForm {
    #[serde(default)]
    user: String,
    #[serde(default)]
    password: String,
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    next: String,
}

/// `POST /login`: opens a session and goes on to `next`.
pub(crate) async fn submit(State(api): Shared, caller: Caller, body: Bytes) -> PageResult {
    api.check_origin(&caller.headers)?;
    let input: LoginForm = form::<LoginForm>(&body)?;
    let next = if safe_next(&input.next) {
        input.next.clone()
    } else {
        "/".into()
    };
    let mut page = LoginPage {
        assets: assets::urls(),
        csrf: String::new(),
        next: next.clone(),
        user: input.user.clone(),
        user_error: None,
        password_error: None,
        form_error: None,
    };
    let expected = cookie(&caller.headers, LOGIN_CSRF_COOKIE);
    if !expected.is_some_and(|e| crate::auth::same_secret(&e, input.csrf.trim())) {
        page.form_error =
            Some("this form has expired or did not come from this portal: log in again".into());
        return login_page(page, StatusCode::FORBIDDEN, caller.tls);
    }
    if input.user.trim().is_empty() {
        page.user_error = Some("enter your user name".into());
        return login_page(page, StatusCode::BAD_REQUEST, caller.tls);
    }
    match api.log_in(&input.user, input.password, caller.tls).await {
        Ok(done) => {
            let clear =
                format!("{LOGIN_CSRF_COOKIE}=; HttpOnly; SameSite=Strict; Path=/login; Max-Age=0");
            let mut response = Redirect::to(&next).into_response();
            let headers = response.headers_mut();
            for c in [done.cookie, clear] {
                if let Ok(v) = header::HeaderValue::from_str(&c) {
                    headers.append(header::SET_COOKIE, v);
                }
            }
            Ok(response)
        }
        Err(e) if e.field.as_deref() == Some("user") => {
            page.user_error = Some(e.message);
            login_page(page, e.status, caller.tls)
        }
        Err(e) if e.code == "bad-login" => {
            let mut message = e.message.clone();
            if let Some(secs) = e.retry_after {
                message.push_str(&format!(
                    "; after repeated failures the next attempt waits {secs} s"
                ));
            }
            page.password_error = Some(message);
            login_page(page, e.status, caller.tls)
        }
        Err(e) => Err(e.into()),
    }
}

/// `POST /logout` (with the session's CSRF token): ends the session.
pub(crate) async fn logout(State(api): Shared, caller: Caller) -> Response {
    let who = match api.principal(&caller).await {
        Ok(who) => who,
        // No session any more: already logged out.
        Err(e) if e.status == StatusCode::UNAUTHORIZED => {
            return Redirect::to("/login").into_response();
        }
        Err(e) => return PageError::from(e).into_response(),
    };
    match api.log_out(&who, caller.tls).await {
        Ok(clear) => ([(header::SET_COOKIE, clear)], Redirect::to("/login")).into_response(),
        Err(e) => PageError::from(e).into_response(),
    }
}
