//! A deployment's page: its state, per instance and step its progress with
//! timings, its log; Cancel while it is queued or running, Rollback to its
//! image once it succeeded (when the target may go back to it); for a failed
//! one, the failure and the failing steps' errors first.
//!
//! The page is whole without JavaScript (and reloads itself every few seconds
//! through a `<noscript>` refresh while the deployment runs). With it, the
//! page follows `GET /deployments/{id}/live`: the deployment's events from
//! [`crate::api::follow_events`] (the API's stream: stored events after the
//! resume point, then live ones, each once), each sent as one Server-Sent
//! Event whose `id` is the event's number and whose data is HTML — the log
//! line, appended, and the summary and progress, swapped out of band. The
//! page starts its stream after the last event it rendered; a reconnect
//! resumes after `Last-Event-ID` (the browser's) or after the last line the
//! page shows (molt.js), and a line already shown is never added twice. A
//! stream asked after the final event sends the final view once more and
//! `end`, which closes it: a page that loaded as the deployment ended shows
//! how it ended, and nothing keeps reconnecting.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::time::Duration;

use askama::Template;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Redirect, Response};
use image_spec::InstanceName;
use wire::plan::StepOutcome;
use wire::portal::DeploymentId;

use super::format::{When, duration, short};
use super::{Layout, PageError, PageResult, page, principal};
use crate::api::{Api, ApiError, Caller, RollbackInput, Shared};
use crate::auth::Principal;
use crate::deployment::{Deployment, DeploymentState, Event, EventKind, Trigger, now_ms};

/// One step of an instance's upgrade, as the page shows it.
#[derive(Debug, Clone)]
pub struct StepView {
    text: String,
    /// `pending`, `running`, `done`, `failed` or `undone`.
    status: &'static str,
    took: Option<String>,
    error: Option<String>,
}

/// One instance's part.
#[derive(Debug, Clone)]
pub struct RunView {
    name: String,
    state: String,
    generations: String,
    took: Option<String>,
    error: Option<String>,
    steps: Vec<StepView>,
}

/// A line of the log.
#[derive(Debug, Clone)]
pub struct LineView {
    seq: u64,
    when: When,
    instance: String,
    text: String,
}

/// A step that failed, for the top of a failed deployment's page.
#[derive(Debug, Clone)]
pub struct FailedStep {
    instance: String,
    step: String,
    error: String,
}

/// Everything the page shows of a deployment, but its log.
#[derive(Debug, Clone)]
pub struct DeploymentView {
    id: u64,
    target: String,
    image: String,
    image_id: String,
    who: String,
    trigger: String,
    /// The deployment this one rolls back to, if it is a rollback.
    rollback_of: Option<u64>,
    state: String,
    finished: bool,
    stuck: bool,
    cancel_requested: bool,
    options: String,
    created: When,
    started: Option<When>,
    ended: Option<When>,
    took: Option<String>,
    failure: Option<String>,
    failed_steps: Vec<FailedStep>,
    runs: Vec<RunView>,
    can_cancel: bool,
    can_rollback: bool,
    csrf: String,
}

/// Per instance, per step index: what the events say so far.
#[derive(Debug, Default, Clone)]
struct Progress {
    steps: BTreeMap<InstanceName, Vec<StepView>>,
    failed: Vec<FailedStep>,
}

impl Progress {
    /// The steps each instance's stored plan shows, all pending.
    fn planned(d: &Deployment) -> Self {
        let steps = d
            .plans
            .iter()
            .map(|(i, plan)| {
                let steps = plan
                    .steps
                    .iter()
                    .map(|s| StepView {
                        text: s.to_string(),
                        status: "pending",
                        took: None,
                        error: None,
                    })
                    .collect();
                (i.clone(), steps)
            })
            .collect();
        Self {
            steps,
            failed: Vec::new(),
        }
    }

    /// Takes one event in.
    fn apply(&mut self, e: &Event) {
        let (Some(instance), EventKind::Step(step)) = (&e.instance, &e.kind) else {
            return;
        };
        let steps = self.steps.entry(instance.clone()).or_default();
        let index = step.index as usize;
        while steps.len() <= index.max(step.of.saturating_sub(1) as usize) {
            steps.push(StepView {
                text: String::from("…"),
                status: "pending",
                took: None,
                error: None,
            });
        }
        let view = &mut steps[index];
        view.text = step.step.to_string();
        match &step.outcome {
            StepOutcome::Started => view.status = "running",
            StepOutcome::Done { millis, bytes } => {
                view.status = "done";
                view.took = Some(match bytes {
                    Some(b) => format!("{}, {}", duration(*millis), super::format::bytes(*b)),
                    None => duration(*millis),
                });
            }
            StepOutcome::Failed { millis, error } => {
                view.status = "failed";
                view.took = Some(duration(*millis));
                view.error = Some(error.clone());
                self.failed.push(FailedStep {
                    instance: instance.to_string(),
                    step: step.step.to_string(),
                    error: error.clone(),
                });
            }
            StepOutcome::Undone { millis } => {
                view.status = "undone";
                view.took = Some(format!("undone in {}", duration(*millis)));
            }
        }
    }
}

fn line(e: &Event, now: i64) -> LineView {
    let text = match &e.kind {
        EventKind::State(s) => format!("deployment {s}"),
        EventKind::Instance(s) => format!("instance {s}"),
        EventKind::Step(s) => s.to_string(),
        EventKind::Log(l) => l.clone(),
    };
    LineView {
        seq: e.seq,
        when: When::new(e.at, now),
        instance: e
            .instance
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default(),
        text,
    }
}

/// What the viewer may do with the deployment.
#[derive(Debug, Clone, Copy, Default)]
struct Allowed {
    cancel: bool,
    rollback: bool,
}

async fn allowed(api: &Api, who: &Principal, d: &Deployment) -> Result<Allowed, PageError> {
    let target = api.target(&d.target).await?;
    if who.require_deploy(&target.name, target.stage).is_err() {
        return Ok(Allowed::default());
    }
    let rollback = d.state == DeploymentState::Succeeded
        && crate::api::rollback_window(api, &target)
            .await?
            .is_some_and(|(_, earlier)| earlier.iter().any(|e| e.id == d.id));
    Ok(Allowed {
        cancel: !d.state.is_final(),
        rollback,
    })
}

fn view(d: &Deployment, p: &Progress, allowed: Allowed, csrf: &str, now: i64) -> DeploymentView {
    let runs = d
        .order
        .iter()
        .map(|i| {
            let run = d.instances.get(i);
            RunView {
                name: i.to_string(),
                state: run.map(|r| r.state.to_string()).unwrap_or_default(),
                generations: match run {
                    Some(r) => match (r.generation_before, r.generation) {
                        (Some(b), Some(a)) => format!("generation {b} → {a}"),
                        (Some(b), None) => format!("generation {b}"),
                        _ => String::new(),
                    },
                    None => String::new(),
                },
                took: run
                    .and_then(|r| r.started.zip(r.finished))
                    .map(|(s, f)| duration((f - s).max(0) as u64)),
                error: run.and_then(|r| r.error.clone()),
                steps: p.steps.get(i).cloned().unwrap_or_default(),
            }
        })
        .collect();
    let mut options = Vec::new();
    if let Some(s) = d.options.strategy {
        options.push(format!("strategy {s}"));
    }
    if let Some(r) = d.options.rollout {
        options.push(format!("rollout {r}"));
    }
    if let Some(i) = &d.options.instance {
        options.push(format!("only {i}"));
    }
    if d.options.skip_hooks {
        options.push("hooks skipped".into());
    }
    DeploymentView {
        id: d.id.0,
        target: d.target.to_string(),
        image: d.image.name.to_string(),
        image_id: short(&d.image.id),
        who: d.requested_by.to_string(),
        trigger: d.trigger.to_string(),
        rollback_of: match d.trigger {
            Trigger::Rollback { of } => Some(of.0),
            Trigger::Manual => None,
        },
        state: d.state.to_string(),
        finished: d.state.is_final(),
        stuck: d.stuck,
        cancel_requested: d.cancel_requested,
        options: if options.is_empty() {
            "the target's settings".into()
        } else {
            options.join(", ")
        },
        created: When::new(d.created, now),
        started: d.started.map(|t| When::new(t, now)),
        ended: d.finished.map(|t| When::new(t, now)),
        took: d
            .started
            .zip(d.finished)
            .map(|(s, f)| duration((f - s).max(0) as u64)),
        failure: d.failure.clone(),
        failed_steps: if matches!(
            d.state,
            DeploymentState::Failed | DeploymentState::RolledBack
        ) {
            p.failed.clone()
        } else {
            Vec::new()
        },
        runs,
        can_cancel: allowed.cancel,
        can_rollback: allowed.rollback,
        csrf: csrf.to_owned(),
    }
}

#[derive(Template)]
#[template(path = "deployment.html")]
struct DeploymentPage {
    layout: Layout,
    view: DeploymentView,
    lines: Vec<LineView>,
    /// The number of the last event rendered: the live stream starts after it.
    after: u64,
    oob: bool,
}

/// The fragments one live event brings: its log line, appended, and the
/// summary and progress, swapped out of band.
#[derive(Template)]
#[template(path = "deployment_live.html")]
struct LiveFragment<'a> {
    view: &'a DeploymentView,
    line: &'a LineView,
    oob: bool,
}

fn deployment_id(s: &str) -> Result<DeploymentId, PageError> {
    s.parse()
        .map_err(|e: String| PageError::Api(ApiError::bad("id", e)))
}

async fn load(
    api: &Api,
    caller: &Caller,
    id: &str,
    here: &str,
) -> Result<(Principal, Deployment), PageError> {
    let who = principal(api, caller, here).await?;
    let d = api.deployment(deployment_id(id)?).await?;
    who.require_scope(&d.target)?;
    Ok((who, d))
}

/// `GET /deployments/{id}`.
pub(crate) async fn show(State(api): Shared, caller: Caller, Path(id): Path<String>) -> PageResult {
    let here = format!("/deployments/{}", super::urlencode(&id));
    let (who, d) = load(&api, &caller, &id, &here).await?;
    let events = api.portal.store.events(d.id, 0, 100_000).await?;
    let mut progress = Progress::planned(&d);
    for e in &events {
        progress.apply(e);
    }
    let now = now_ms();
    let layout = Layout::new(&who, "services");
    let allowed = allowed(&api, &who, &d).await?;
    let view = view(&d, &progress, allowed, &layout.csrf, now);
    page(&DeploymentPage {
        layout,
        view,
        after: events.last().map_or(0, |e| e.seq),
        lines: events.iter().map(|e| line(e, now)).collect(),
        oob: false,
    })
}

/// `GET /deployments/{id}/live?after=N` (or `Last-Event-ID`): the page's
/// live fragments as Server-Sent Events, ending after the final state with
/// an `end` event. Asked after the deployment's last event, it sends the final
/// view once more and `end`.
pub(crate) async fn live(
    State(api): Shared,
    caller: Caller,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, PageError> {
    use tokio_stream::StreamExt as _;
    let here = format!("/deployments/{}", super::urlencode(&id));
    let (who, d) = load(&api, &caller, &id, &here).await?;
    let after = crate::api::resume_after(&caller, &q)?;
    // What the page showed up to `after`, to carry the progress on from.
    let shown = api.portal.store.events(d.id, 0, 100_000).await?;
    let csrf = Layout::new(&who, "services").csrf;
    if d.state.is_final() && shown.last().is_none_or(|e| e.seq <= after) {
        // Nothing left to send, but the page may show an older state (the
        // deployment ended while the page loaded): send the final view once
        // more with the last line (a page drops a line it has) and `end`, so
        // the page shows how it ended and no client keeps reconnecting.
        let Some(last) = shown.last() else {
            return Ok(StatusCode::NO_CONTENT.into_response());
        };
        let mut progress = Progress::planned(&d);
        for e in &shown {
            progress.apply(e);
        }
        let allowed = allowed(&api, &who, &d).await.unwrap_or_default();
        let now = now_ms();
        let view = view(&d, &progress, allowed, &csrf, now);
        let line = line(last, now);
        let html = LiveFragment {
            view: &view,
            line: &line,
            oob: true,
        }
        .render()?;
        let events = [
            SseEvent::default()
                .id(last.seq.to_string())
                .event("line")
                .data(html),
            SseEvent::default().event("end").data("end"),
        ]
        .map(Ok::<_, Infallible>);
        return Ok(Sse::new(tokio_stream::iter(events)).into_response());
    }
    let mut progress = Progress::planned(&d);
    for e in shown.iter().filter(|e| e.seq <= after) {
        progress.apply(e);
    }
    let id = d.id;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<SseEvent, Infallible>>(16);
    // Ends when the deployment has or when the page leaves (a send fails).
    tokio::spawn(async move {
        let mut events = crate::api::follow_events(api.portal.clone(), id, after);
        while let Some(e) = events.next().await {
            progress.apply(&e);
            let Ok(d) = api.deployment(id).await else {
                return;
            };
            let allowed = allowed(&api, &who, &d).await.unwrap_or_default();
            let now = now_ms();
            let view = view(&d, &progress, allowed, &csrf, now);
            let line = line(&e, now);
            let Ok(html) = (LiveFragment {
                view: &view,
                line: &line,
                oob: true,
            })
            .render() else {
                return;
            };
            let event = SseEvent::default()
                .id(e.seq.to_string())
                .event("line")
                .data(html);
            if tx.send(Ok(event)).await.is_err() {
                return;
            }
            if matches!(e.kind, EventKind::State(s) if s.is_final()) {
                let _ = tx
                    .send(Ok(SseEvent::default().event("end").data("end")))
                    .await;
                return;
            }
        }
    });
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(10)))
        .into_response())
}

/// `POST /deployments/{id}/cancel`.
pub(crate) async fn cancel(
    State(api): Shared,
    caller: Caller,
    Path(id): Path<String>,
) -> PageResult {
    let here = format!("/deployments/{}", super::urlencode(&id));
    let (who, d) = load(&api, &caller, &id, &here).await?;
    crate::api::cancel(&api, &who, d.id).await?;
    Ok(Redirect::to(&format!("/deployments/{}", d.id.0)).into_response())
}

/// `POST /deployments/{id}/rollback`: a new deployment of this one's image,
/// then its page.
pub(crate) async fn rollback(
    State(api): Shared,
    caller: Caller,
    Path(id): Path<String>,
) -> PageResult {
    let here = format!("/deployments/{}", super::urlencode(&id));
    let (who, d) = load(&api, &caller, &id, &here).await?;
    let target = api.target(&d.target).await?;
    let input = RollbackInput {
        to: Some(d.id),
        ..Default::default()
    };
    let new = crate::api::rollback_target(&api, &who, &target, input).await?;
    Ok(Redirect::to(&format!("/deployments/{}", new.id.0)).into_response())
}
