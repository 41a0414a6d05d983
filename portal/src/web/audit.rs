//! The Audit log page (admins only): every state-changing call — who, what,
//! on what, when —, newest first, [`PAGE`] entries a page.
//!
//! Data: [`crate::store::Store::audit_newest`], the same log
//! `GET /api/v1/audit` reads oldest first; a page's "Older" link asks for the
//! entries before the last one it shows (`?before=N`).

use std::collections::HashMap;

use askama::Template;
use axum::extract::{Query, State};

use super::format::When;
use super::services::parse_opt;
use super::{Layout, PageResult, page, principal};
use crate::api::{Caller, Shared};
use crate::deployment::now_ms;

/// How many entries a page shows.
pub const PAGE: usize = 50;

/// An entry of the log.
pub struct EntryRow {
    seq: u64,
    when: When,
    who: String,
    action: String,
    subject: String,
    detail: String,
}

#[derive(Template)]
#[template(path = "audit.html")]
struct AuditPage {
    layout: Layout,
    rows: Vec<EntryRow>,
    /// `before` of the next (older) page, if there is one.
    older: Option<u64>,
    /// Is this the newest page?
    first: bool,
}

/// `GET /audit?before=N`.
pub(crate) async fn list(
    State(api): Shared,
    caller: Caller,
    uri: axum::http::Uri,
    Query(q): Query<HashMap<String, String>>,
) -> PageResult {
    let who = principal(&api, &caller, &uri.to_string()).await?;
    who.require_admin("read the audit log")?;
    let before: Option<u64> = parse_opt(q.get("before"), "before")?;
    let mut entries = api.portal.store.audit_newest(before, PAGE + 1).await?;
    let more = entries.len() > PAGE;
    entries.truncate(PAGE);
    let now = now_ms();
    page(&AuditPage {
        layout: Layout::new(&who, "audit"),
        older: more.then(|| entries.last().map(|e| e.seq)).flatten(),
        first: before.is_none(),
        rows: entries
            .into_iter()
            .map(|e| EntryRow {
                seq: e.seq,
                when: When::new(e.at, now),
                who: e.who,
                action: e.action,
                subject: e.subject,
                detail: e.detail,
            })
            .collect(),
    })
}
