//! The Services list and a service's page (a target, in the API's words):
//! its Overview, Deployment and History tabs.
//!
//! - Services: [`crate::api::target_summaries`], as `GET /api/v1/targets`.
//! - Overview: the target's summary, each online instance's
//!   `ShellRequest::Status` through [`crate::shells::Shells::call`], and the
//!   current image's commits from the repository, to show drift.
//! - Deployment: the repository's images (newest first), the plan of the
//!   picked one from every instance's shell ([`crate::api::target_plan`]), and
//!   the Deploy panel, which posts to [`crate::api::deploy`].
//! - History: [`crate::store::Store::deployments`] with the API's filters.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use askama::Template;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::response::{Html, IntoResponse, Redirect};
use image_spec::{CommitId, ImageName, InstanceName, ServiceName, TargetName};
use serde::Deserialize;
use wire::plan::{Action, Step};
use wire::shell::{Stage, Strategy};

use super::format::{When, bytes, short};
use super::{Layout, PageError, PageResult, form, page, principal};
use crate::api::{Api, ApiError, Caller, DeployInput, Shared, TargetSummary};
use crate::auth::Principal;
use crate::deployment::{Deployment, DeploymentState, now_ms};
use crate::store::DeploymentFilter;
use crate::target::{Rollout, Target};

// ---------------------------------------------------------------------------
// Services

/// One row of the Services list.
pub struct ServiceRow {
    name: String,
    stage: String,
    image: Option<String>,
    last: Option<LastRow>,
    online: usize,
    total: usize,
    queued: usize,
}

/// A target's last deployment, in a row.
pub struct LastRow {
    id: u64,
    state: String,
    image: String,
    when: When,
}

#[derive(Template)]
#[template(path = "services.html")]
struct ServicesPage {
    layout: Layout,
    rows: Vec<ServiceRow>,
}

fn row(s: &TargetSummary, now: i64) -> ServiceRow {
    ServiceRow {
        name: s.name.to_string(),
        stage: s.stage.to_string(),
        image: s.image.as_ref().map(|i| i.name.to_string()),
        last: s.last_deployment.as_ref().map(|d| LastRow {
            id: d.id.0,
            state: d.state.to_string(),
            image: d.image.name.to_string(),
            when: When::new(d.created, now),
        }),
        online: s.online(),
        total: s.instances.len(),
        queued: s.queued,
    }
}

/// `GET /` and `GET /services`.
pub(crate) async fn list(State(api): Shared, caller: Caller) -> PageResult {
    let who = principal(&api, &caller, "/services").await?;
    let targets: Vec<Target> = api.targets_in_scope(&who).await?;
    let summaries = crate::api::target_summaries(&api, &targets).await?;
    let now = now_ms();
    page(&ServicesPage {
        layout: Layout::new(&who, "services"),
        rows: summaries.iter().map(|s| row(s, now)).collect(),
    })
}

// ---------------------------------------------------------------------------
// A service's page: the header every tab shares

/// The head of a service's page.
pub struct Head {
    pub(super) name: String,
    pub(super) stage: String,
    pub(super) image: Option<String>,
    pub(super) online: usize,
    pub(super) total: usize,
    pub(super) queued: usize,
    /// Which tab is shown.
    pub(super) tab: &'static str,
}

/// A service's page's data every tab starts from.
pub(super) struct Loaded {
    pub(super) who: Principal,
    pub(super) target: Target,
    pub(super) summary: TargetSummary,
}

/// Who asks, the target `name` (in their scope) and its summary.
pub(super) async fn load(
    api: &Api,
    caller: &Caller,
    name: &str,
    here: &str,
) -> Result<Loaded, PageError> {
    let who = principal(api, caller, here).await?;
    let name = TargetName::new(name).map_err(|e| ApiError::bad("name", e.to_string()))?;
    let target = api.target(&name).await?;
    who.require_scope(&target.name)?;
    let summary = crate::api::target_summaries(api, std::slice::from_ref(&target))
        .await?
        .pop()
        .ok_or_else(|| ApiError::not_found(format!("no target named `{name}`")))?;
    Ok(Loaded {
        who,
        target,
        summary,
    })
}

pub(super) fn head(l: &Loaded, tab: &'static str) -> Head {
    Head {
        name: l.target.name.to_string(),
        stage: l.target.stage.to_string(),
        image: l.summary.image.as_ref().map(|i| i.name.to_string()),
        online: l.summary.online(),
        total: l.summary.instances.len(),
        queued: l.summary.queued,
        tab,
    }
}

// ---------------------------------------------------------------------------
// Overview

/// A microservice on an instance, as its shell reports it.
pub struct MicroserviceView {
    name: String,
    commit: String,
    state: String,
    health: String,
    healthy: bool,
    uptime: String,
    restarts: u32,
    /// Set when it runs another commit than the target's current image has
    /// for it: what the image has (or that the image has no such service).
    drift: Option<String>,
    /// Set when it was pulled there (a development or quality instance):
    /// by whom, from which revision, since when.
    overlay: Option<OverlayView>,
}

/// A microservice pulled onto an instance.
pub struct OverlayView {
    rev: String,
    by: String,
    since: When,
}

/// An instance of the target.
pub struct InstanceView {
    name: String,
    online: bool,
    image: Option<String>,
    generation: Option<u64>,
    last_seen: Option<When>,
    upgrading: bool,
    /// Why its status could not be had.
    error: Option<String>,
    services: Vec<MicroserviceView>,
}

#[derive(Template)]
#[template(path = "service_overview.html")]
struct OverviewPage {
    layout: Layout,
    head: Head,
    instances: Vec<InstanceView>,
}

fn uptime(secs: Option<u64>) -> String {
    match secs {
        None => "—".into(),
        Some(s) => super::format::duration(s * 1000)
            .split('.')
            .next()
            .unwrap_or_default()
            .to_owned(),
    }
}

/// The commits of the target's current image, from the repository.
async fn current_commits(api: &Api, s: &TargetSummary) -> Option<BTreeMap<ServiceName, CommitId>> {
    crate::api::image_commits(api, s.image.as_ref()?).await.ok()
}

/// `GET /services/{name}`: the Overview tab.
pub(crate) async fn overview(
    State(api): Shared,
    caller: Caller,
    Path(name): Path<String>,
) -> PageResult {
    let here = format!("/services/{}", super::urlencode(&name));
    let l = load(&api, &caller, &name, &here).await?;
    let expected = current_commits(&api, &l.summary).await;
    let now = now_ms();
    let mut instances = Vec::new();
    for i in &l.summary.instances {
        let mut view = InstanceView {
            name: i.name.to_string(),
            online: i.online,
            image: i.image.as_ref().map(|r| r.name.to_string()),
            generation: i.generation,
            last_seen: i.last_seen.map(|t| When::new(t, now)),
            upgrading: false,
            error: None,
            services: Vec::new(),
        };
        if i.online {
            match crate::api::devloop::shell_status(&api, &i.name).await {
                Ok(st) => {
                    view.image = st.image.as_ref().map(|r| r.name.to_string());
                    view.generation = Some(st.generation);
                    view.upgrading = st.upgrading;
                    let drifted = crate::api::devloop::drift(&st, expected.as_ref());
                    view.services = st
                        .services
                        .iter()
                        .map(|(svc, s)| {
                            let drift = drifted.get(svc).map(|d| match &d.image {
                                Some(c) => format!("the image has {}", short(c)),
                                None if expected.is_some() => "not in the image".to_owned(),
                                None => "the target has no current image".to_owned(),
                            });
                            let overlay = st.overlays.get(svc).map(|o| OverlayView {
                                rev: o.rev.clone(),
                                by: o.by.clone(),
                                since: When::new(o.since.as_unix_seconds() * 1000, now),
                            });
                            MicroserviceView {
                                name: svc.to_string(),
                                commit: short(&s.commit),
                                state: s.state.clone(),
                                healthy: s.health == "healthy",
                                health: s.health.clone(),
                                uptime: uptime(s.uptime_secs),
                                restarts: s.restarts,
                                drift,
                                overlay,
                            }
                        })
                        .collect();
                }
                Err(e) => view.error = Some(e),
            }
        }
        instances.push(view);
    }
    page(&OverviewPage {
        layout: Layout::new(&l.who, "services"),
        head: head(&l, "overview"),
        instances,
    })
}

// ---------------------------------------------------------------------------
// Deployment: images, the plan, the Deploy panel

/// An image in the list.
pub struct ImageRow {
    name: String,
    id: String,
    description: String,
    created: Option<When>,
    author: Option<String>,
    selected: bool,
    current: bool,
}

/// What a plan does to one microservice.
pub struct ChangeView {
    service: String,
    action: String,
    from: String,
    to: String,
    rebuilt: bool,
    restarted: bool,
    /// The repository page of what changed (old → new, or the one commit).
    link: Option<String>,
}

/// One instance's plan.
pub struct InstancePlanView {
    name: String,
    error: Option<String>,
    changes: Vec<ChangeView>,
    steps: usize,
    fetch: String,
}

/// The plan of the picked image against what runs now.
pub struct PlanView {
    image: String,
    strategy: String,
    instances: Vec<InstancePlanView>,
    restarted: Vec<String>,
    untouched: Vec<String>,
    fetch: String,
}

/// The Deploy panel's values and errors (each shown next to its field).
#[derive(Default)]
pub struct DeployPanel {
    strategy: String,
    rollout: String,
    instance: String,
    skip_hooks: bool,
    error: Option<String>,
    field_errors: HashMap<String, String>,
}

impl DeployPanel {
    fn error_for(&self, field: &str) -> Option<&str> {
        self.field_errors.get(field).map(String::as_str)
    }
}

#[derive(Template)]
#[template(path = "service_deployment.html")]
struct DeploymentTab {
    layout: Layout,
    head: Head,
    images: Vec<ImageRow>,
    plan: Option<PlanView>,
    /// May this user deploy to this target?
    can_deploy: bool,
    /// Is it a production target (asks for its name)?
    production: bool,
    instances: Vec<String>,
    strategies: Vec<&'static str>,
    rollouts: Vec<&'static str>,
    panel: DeployPanel,
    /// Why the images could not be listed.
    images_error: Option<String>,
}

const STRATEGIES: [&str; 3] = ["in-place", "shadow", "shadow-full"];
const ROLLOUTS: [&str; 3] = ["all", "one-by-one", "canary"];

fn plan_view(p: &crate::api::TargetPlan) -> PlanView {
    let mut restarted = BTreeSet::new();
    let mut all = BTreeSet::new();
    let instances = p
        .instances
        .iter()
        .map(|(name, entry)| match entry {
            Err(e) => InstancePlanView {
                name: name.to_string(),
                error: Some(e.clone()),
                changes: Vec::new(),
                steps: 0,
                fetch: String::new(),
            },
            Ok(plan) => {
                let built: BTreeSet<&ServiceName> = plan
                    .steps
                    .iter()
                    .filter_map(|s| match s {
                        Step::Build { service, .. } => Some(service),
                        _ => None,
                    })
                    .collect();
                let changes = plan
                    .services
                    .iter()
                    .map(|s| {
                        all.insert(s.service.to_string());
                        let changed = !matches!(s.action, Action::Unchanged);
                        if changed {
                            restarted.insert(s.service.to_string());
                        }
                        ChangeView {
                            service: s.service.to_string(),
                            action: s.action.to_string(),
                            from: s.from.as_ref().map(short).unwrap_or_else(|| "—".into()),
                            to: s.to.as_ref().map(short).unwrap_or_else(|| "—".into()),
                            rebuilt: built.contains(&s.service),
                            restarted: changed && !matches!(s.action, Action::Remove),
                            link: changed
                                .then(|| {
                                    super::repository::changes_link(
                                        &s.service,
                                        s.from.as_ref(),
                                        s.to.as_ref(),
                                    )
                                })
                                .flatten(),
                        }
                    })
                    .collect();
                InstancePlanView {
                    name: name.to_string(),
                    error: None,
                    changes,
                    steps: plan.steps.len(),
                    fetch: bytes(plan.fetch_bytes()),
                }
            }
        })
        .collect();
    PlanView {
        image: p.image.name.to_string(),
        strategy: p
            .strategy
            .map(|s| s.to_string())
            .unwrap_or_else(|| "each instance's default".into()),
        instances,
        untouched: all.difference(&restarted).cloned().collect(),
        restarted: restarted.into_iter().collect(),
        fetch: bytes(p.fetch_bytes),
    }
}

async fn deployment_page(
    api: &Api,
    l: &Loaded,
    picked: Option<ImageName>,
    strategy: Option<Strategy>,
    skip_hooks: bool,
    panel: DeployPanel,
) -> Result<DeploymentTab, PageError> {
    let now = now_ms();
    let current = l.summary.image.as_ref().map(|i| i.name.clone());
    let (records, images_error) = match api.repo().await {
        Ok(repo) => match repo.images().await {
            Ok(list) => (list, None),
            Err(e) => (Vec::new(), Some(e.to_string())),
        },
        Err(e) => (Vec::new(), Some(e.message)),
    };
    let images = records
        .iter()
        .rev()
        .map(|r| ImageRow {
            name: r.image.name().to_string(),
            id: short(&r.id),
            description: r.image.description().to_owned(),
            created: r
                .created
                .as_ref()
                .map(|c| When::new(c.at.as_unix_seconds() * 1000, now)),
            author: r.created.as_ref().map(|c| c.author.to_string()),
            selected: picked.as_ref() == Some(r.image.name()),
            current: current.as_ref() == Some(r.image.name()),
        })
        .collect();
    let plan = match &picked {
        None => None,
        Some(name) => {
            let image = crate::api::resolve_image(api, name).await?;
            let p = crate::api::target_plan(api, &l.target, image, strategy, skip_hooks).await;
            Some(plan_view(&p))
        }
    };
    Ok(DeploymentTab {
        layout: Layout::new(&l.who, "services"),
        head: head(l, "deployment"),
        images,
        plan,
        can_deploy: l.who.require_deploy(&l.target.name, l.target.stage).is_ok(),
        production: l.target.stage == Stage::Production,
        instances: l.target.instances.iter().map(ToString::to_string).collect(),
        strategies: STRATEGIES.to_vec(),
        rollouts: ROLLOUTS.to_vec(),
        panel,
        images_error,
    })
}

pub(super) fn parse_opt<T: std::str::FromStr>(
    v: Option<&String>,
    field: &str,
) -> Result<Option<T>, ApiError>
where
    T::Err: std::fmt::Display,
{
    v.map(|s| s.trim())
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<T>()
                .map_err(|e| ApiError::bad(field, format!("`{field}`: {e}")))
        })
        .transpose()
}

/// `GET /services/{name}/deployment?image=I&strategy=S&skip_hooks=on`.
pub(crate) async fn deployment_tab(
    State(api): Shared,
    caller: Caller,
    uri: axum::http::Uri,
    Path(name): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> PageResult {
    let here = uri.to_string();
    let l = load(&api, &caller, &name, &here).await?;
    let picked: Option<ImageName> = parse_opt(q.get("image"), "image")?;
    let strategy: Option<Strategy> = parse_opt(q.get("strategy"), "strategy")?;
    let skip_hooks = q.get("skip_hooks").is_some_and(|v| !v.is_empty());
    let panel = DeployPanel {
        strategy: strategy.map(|s| s.to_string()).unwrap_or_default(),
        skip_hooks,
        ..Default::default()
    };
    let tab = deployment_page(&api, &l, picked, strategy, skip_hooks, panel).await?;
    page(&tab)
}

#[derive(Deserialize)]
struct DeployForm {
    #[serde(default)]
    image: String,
    #[serde(default)]
    strategy: String,
    #[serde(default)]
    rollout: String,
    #[serde(default)]
    instance: String,
    #[serde(default)]
    skip_hooks: Option<String>,
    #[serde(default)]
    confirm: Option<String>,
}

/// `POST /services/{name}/deploy`: queues the deployment and shows its page;
/// a refusal shows the tab again with the error next to its field.
pub(crate) async fn deploy(
    State(api): Shared,
    caller: Caller,
    Path(name): Path<String>,
    body: Bytes,
) -> PageResult {
    let here = format!("/services/{}/deployment", super::urlencode(&name));
    let l = load(&api, &caller, &name, &here).await?;
    let f: DeployForm = form(&body)?;
    let mut panel = DeployPanel {
        strategy: f.strategy.clone(),
        rollout: f.rollout.clone(),
        instance: f.instance.clone(),
        skip_hooks: f.skip_hooks.is_some(),
        ..Default::default()
    };
    let picked = ImageName::new(f.image.trim()).ok();
    let parsed = (|| -> Result<DeployInput, ApiError> {
        let image = ImageName::new(f.image.trim())
            .map_err(|e| ApiError::bad("image", format!("pick an image: {e}")))?;
        let strategy: Option<Strategy> = parse_opt(Some(&f.strategy), "strategy")?;
        let rollout: Option<Rollout> = parse_opt(Some(&f.rollout), "rollout")?;
        let instance: Option<InstanceName> = parse_opt(Some(&f.instance), "instance")?;
        if l.target.stage == Stage::Production
            && f.confirm.as_deref().map(str::trim) != Some(l.target.name.as_str())
        {
            return Err(ApiError::bad(
                "confirm",
                format!(
                    "`{}` is a production target: type its name to confirm",
                    l.target.name
                ),
            ));
        }
        Ok(DeployInput {
            target: l.target.name.clone(),
            image,
            strategy,
            rollout,
            instance,
            skip_hooks: f.skip_hooks.is_some(),
        })
    })();
    let result = match parsed {
        Ok(input) => crate::api::deploy(&api, &l.who, input).await,
        Err(e) => Err(e),
    };
    match result {
        Ok(d) => Ok(Redirect::to(&format!("/deployments/{}", d.id.0)).into_response()),
        Err(e) => {
            let status = e.status;
            match e.field.clone() {
                Some(field) => {
                    panel.field_errors.insert(field, e.message);
                }
                None => panel.error = Some(e.message),
            }
            let strategy = parse_opt(Some(&f.strategy), "strategy").ok().flatten();
            let tab =
                deployment_page(&api, &l, picked, strategy, f.skip_hooks.is_some(), panel).await?;
            Ok((status, Html(tab.render()?)).into_response())
        }
    }
}

// ---------------------------------------------------------------------------
// History

/// A deployment in a list.
pub struct DeploymentRow {
    id: u64,
    state: String,
    stuck: bool,
    image: String,
    who: String,
    trigger: String,
    created: When,
    took: Option<String>,
}

impl DeploymentRow {
    pub(crate) fn new(d: &Deployment, now: i64) -> Self {
        Self {
            id: d.id.0,
            state: d.state.to_string(),
            stuck: d.stuck,
            image: d.image.name.to_string(),
            who: d.requested_by.to_string(),
            // As the deployment's page, the API and the CLI say it.
            trigger: d.trigger.to_string(),
            created: When::new(d.created, now),
            took: d
                .started
                .zip(d.finished)
                .map(|(s, f)| super::format::duration((f - s).max(0) as u64)),
        }
    }
}

/// The History tab's filters, as the form sends them.
#[derive(Default)]
pub struct Filters {
    status: String,
    who: String,
    image: String,
    trigger: String,
    /// From this day on (`YYYY-MM-DD`, UTC).
    from: String,
    /// Up to this day, included.
    to: String,
}

#[derive(Template)]
#[template(path = "service_history.html")]
struct HistoryPage {
    layout: Layout,
    head: Head,
    rows: Vec<DeploymentRow>,
    filters: Filters,
    statuses: Vec<String>,
    /// The query of the next (older) page, if there is one.
    older: Option<String>,
    filtered: bool,
    /// The newest watch runs (on the first page only).
    watches: Vec<WatchRow>,
}

/// A watch run as History lists it.
pub struct WatchRow {
    id: u64,
    service: String,
    branch: String,
    by: String,
    started: When,
    last: When,
    open: bool,
    cycles: u64,
    failed: u64,
    /// The latest cycles, newest first.
    recent: Vec<CycleRow>,
}

/// One cycle of a watch run.
pub struct CycleRow {
    number: u64,
    at: When,
    commit: String,
    took: String,
    error: Option<String>,
}

impl WatchRow {
    fn new(r: &crate::watch::WatchRun, now: i64) -> Self {
        Self {
            id: r.id,
            service: r.service.to_string(),
            branch: r.branch.to_string(),
            by: r.by.to_string(),
            started: When::new(r.started, now),
            last: When::new(r.ended.unwrap_or(r.last), now),
            open: r.ended.is_none(),
            cycles: r.cycles,
            failed: r.failed,
            recent: r
                .recent
                .iter()
                .rev()
                .take(WATCH_CYCLES_SHOWN)
                .map(|c| CycleRow {
                    number: c.number,
                    at: When::new(c.at, now),
                    commit: c.commit.as_ref().map(short).unwrap_or_default(),
                    took: super::format::duration(c.millis),
                    error: c.error.clone(),
                })
                .collect(),
        }
    }
}

/// How many watch runs the History tab shows, and how many cycles of each.
const WATCHES_SHOWN: usize = 10;
const WATCH_CYCLES_SHOWN: usize = 20;

/// How many deployments a History page lists.
const HISTORY_PAGE: usize = 25;

/// `GET /services/{name}/history?status&who&image&trigger&before`.
pub(crate) async fn history(
    State(api): Shared,
    caller: Caller,
    uri: axum::http::Uri,
    Path(name): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> PageResult {
    let here = uri.to_string();
    let l = load(&api, &caller, &name, &here).await?;
    let get = |k: &str| q.get(k).map(|v| v.trim().to_owned()).unwrap_or_default();
    let filters = Filters {
        status: get("status"),
        who: get("who"),
        image: get("image"),
        trigger: get("trigger"),
        from: get("from"),
        to: get("to"),
    };
    let day = |field: &str, text: &str| -> Result<Option<i64>, ApiError> {
        if text.is_empty() {
            return Ok(None);
        }
        super::format::day_start(text)
            .map(Some)
            .ok_or_else(|| ApiError::bad(field, format!("`{text}` is not a date (YYYY-MM-DD)")))
    };
    let since = day("from", &filters.from)?;
    let until = day("to", &filters.to)?.map(|start| start + 86_400_000);
    let rollback = match filters.trigger.as_str() {
        "" => None,
        "manual" => Some(false),
        "rollback" => Some(true),
        other => {
            return Err(ApiError::bad(
                "trigger",
                format!("unknown trigger `{other}` (manual or rollback)"),
            )
            .into());
        }
    };
    let filter = DeploymentFilter {
        target: Some(l.target.name.clone()),
        state: parse_opt::<DeploymentState>(q.get("status"), "status")?,
        who: parse_opt(q.get("who"), "who")?,
        image: Some(filters.image.clone()).filter(|s| !s.is_empty()),
        rollback,
        since,
        until,
        before: parse_opt(q.get("before"), "before")?,
        limit: HISTORY_PAGE + 1,
    };
    let mut list = api.portal.store.deployments(filter).await?;
    let more = list.len() > HISTORY_PAGE;
    list.truncate(HISTORY_PAGE);
    let now = now_ms();
    let older = match (more, list.last()) {
        (true, Some(last)) => Some(format!(
            "status={}&who={}&image={}&trigger={}&from={}&to={}&before={}",
            super::urlencode(&filters.status),
            super::urlencode(&filters.who),
            super::urlencode(&filters.image),
            super::urlencode(&filters.trigger),
            super::urlencode(&filters.from),
            super::urlencode(&filters.to),
            last.id.0
        )),
        _ => None,
    };
    let filtered = !(filters.status.is_empty()
        && filters.who.is_empty()
        && filters.image.is_empty()
        && filters.trigger.is_empty()
        && filters.from.is_empty()
        && filters.to.is_empty());
    let watches = match q.contains_key("before") {
        true => Vec::new(),
        false => crate::api::devloop::target_watches(&api, &l.who, &l.target.name, WATCHES_SHOWN)
            .await?
            .iter()
            .map(|r| WatchRow::new(r, now))
            .collect(),
    };
    let h = HistoryPage {
        watches,
        layout: Layout::new(&l.who, "services"),
        head: head(&l, "history"),
        rows: list.iter().map(|d| DeploymentRow::new(d, now)).collect(),
        filters,
        statuses: DeploymentState::ALL
            .iter()
            .map(ToString::to_string)
            .collect(),
        older,
        filtered,
    };
    page(&h)
}
