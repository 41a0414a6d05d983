//! The Instances page (admins only): every instance that ever registered —
//! its target, stage, online or offline, image, generation, last seen,
//! labels and shell version.
//!
//! Data: [`crate::api::instance_views`], as `GET /api/v1/instances` (the
//! store's instance records, whose target from the store's targets, online
//! from [`crate::shells::Shells::is_online`]). The target's instances no
//! shell registered as yet are listed after them, as never seen.

use std::collections::BTreeSet;

use askama::Template;
use axum::extract::State;

use super::format::When;
use super::{Layout, PageResult, page, principal};
use crate::api::{Caller, Shared};
use crate::deployment::now_ms;

/// An instance in the list.
pub struct InstanceRow {
    name: String,
    target: Option<String>,
    stage: Option<String>,
    online: bool,
    image: Option<String>,
    generation: Option<u64>,
    /// `None`: never registered.
    last_seen: Option<When>,
    labels: Vec<(String, String)>,
    shell_version: String,
}

#[derive(Template)]
#[template(path = "instances.html")]
struct InstancesPage {
    layout: Layout,
    rows: Vec<InstanceRow>,
    online: usize,
}

/// `GET /instances`.
pub(crate) async fn list(State(api): Shared, caller: Caller) -> PageResult {
    let who = principal(&api, &caller, "/instances").await?;
    who.require_admin("see every instance")?;
    let now = now_ms();
    let known = crate::api::instance_views(&api).await?;
    let registered: BTreeSet<_> = known.iter().map(|i| i.name.clone()).collect();
    let mut rows: Vec<InstanceRow> = known
        .into_iter()
        .map(|i| InstanceRow {
            name: i.name.to_string(),
            target: i.target.map(|t| t.to_string()),
            stage: Some(i.stage.to_string()),
            online: i.online,
            image: i.image.map(|r| r.name.to_string()),
            generation: Some(i.generation),
            last_seen: Some(When::new(i.last_seen, now)),
            labels: i.labels.into_iter().collect(),
            shell_version: i.shell_version,
        })
        .collect();
    for t in api.portal.store.targets().await? {
        for name in t.instances.iter().filter(|n| !registered.contains(*n)) {
            rows.push(InstanceRow {
                name: name.to_string(),
                target: Some(t.name.to_string()),
                stage: None,
                online: false,
                image: None,
                generation: None,
                last_seen: None,
                labels: Vec::new(),
                shell_version: String::new(),
            });
        }
    }
    rows.sort_by(|a, b| a.name.cmp(&b.name));
    page(&InstancesPage {
        layout: Layout::new(&who, "instances"),
        online: rows.iter().filter(|r| r.online).count(),
        rows,
    })
}
