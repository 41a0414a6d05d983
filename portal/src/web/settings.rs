//! A service's Settings tab (admins only): the target's deployment settings
//! — strategy, rollout, canary time, parallel, history and rollback windows —
//! and its instances, in rollout order.
//!
//! The page reads the target from the store ([`crate::api::Api::target`],
//! through the tabs' shared [`super::services::load`]) and saves through
//! [`crate::api::edit_target_as`], the code behind `PUT /api/v1/targets/{name}`:
//! the same checks, the same store write, the same `target.edit` audit entry.
//! Anyone else gets 403, and the tab is not shown to them. A refusal shows the
//! form again as it was sent, with the error next to the field at fault; a
//! save goes back to the tab (`?saved=1`), which says so.

use std::collections::HashMap;

use askama::Template;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Redirect};
use image_spec::InstanceName;
use serde::Deserialize;
use wire::shell::Strategy;

use super::format::When;
use super::services::{Head, Loaded, head, load};
use super::{Layout, PageResult, form, page};
use crate::api::{ApiError, Caller, SettingsInput, Shared, TargetEdit};
use crate::deployment::now_ms;
use crate::target::{Rollout, Settings};

/// What the form shows: the stored settings, or what was sent.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct SettingsForm {
    #[serde(default)]
    strategy: String,
    #[serde(default)]
    rollout: String,
    #[serde(default)]
    canary_secs: String,
    #[serde(default)]
    parallel: String,
    #[serde(default)]
    keep_history: String,
    #[serde(default)]
    keep_rollback: String,
    /// One instance a line, in rollout order.
    #[serde(default)]
    instances: String,
}

impl SettingsForm {
    fn of(settings: &Settings, instances: &[InstanceName]) -> Self {
        Self {
            strategy: settings.strategy.map(|s| s.to_string()).unwrap_or_default(),
            rollout: settings.rollout.to_string(),
            canary_secs: settings.canary_secs.to_string(),
            parallel: settings.parallel.to_string(),
            keep_history: settings.keep_history.to_string(),
            keep_rollback: settings.keep_rollback.to_string(),
            instances: instances
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("\n"),
        }
    }

    /// The edit this form asks for; a value that does not parse is an
    /// error naming its field.
    fn edit(&self) -> Result<TargetEdit, ApiError> {
        fn number<T: std::str::FromStr>(
            value: &str,
            field: &str,
            what: &str,
        ) -> Result<T, ApiError> {
            value.trim().parse().map_err(|_| {
                ApiError::bad(
                    field,
                    format!("{what} must be a whole number, not `{value}`"),
                )
            })
        }
        let strategy = match self.strategy.trim() {
            "" => None,
            s => Some(
                s.parse::<Strategy>()
                    .map_err(|e| ApiError::bad("strategy", e))?,
            ),
        };
        let rollout: Rollout = self
            .rollout
            .trim()
            .parse()
            .map_err(|e: String| ApiError::bad("rollout", e))?;
        let instances = self
            .instances
            .split(|c: char| c.is_whitespace() || c == ',')
            .filter(|s| !s.is_empty())
            .map(|s| {
                InstanceName::new(s).map_err(|e| ApiError::bad("instances", format!("`{s}`: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(TargetEdit {
            stage: None,
            instances: Some(instances),
            settings: SettingsInput {
                strategy: Some(strategy),
                rollout: Some(rollout),
                canary_secs: Some(number(&self.canary_secs, "canary_secs", "the canary time")?),
                parallel: Some(number(&self.parallel, "parallel", "parallel")?),
                keep_history: Some(number(&self.keep_history, "keep_history", "the history")?),
                keep_rollback: Some(number(
                    &self.keep_rollback,
                    "keep_rollback",
                    "the rollback window",
                )?),
            },
        })
    }
}

/// One of the target's instances, with its state, under the form.
pub struct InstanceLine {
    name: String,
    online: bool,
    last_seen: Option<When>,
}

#[derive(Template)]
#[template(path = "service_settings.html")]
struct SettingsPage {
    layout: Layout,
    head: Head,
    form: SettingsForm,
    instances: Vec<InstanceLine>,
    strategies: Vec<&'static str>,
    rollouts: Vec<&'static str>,
    saved: bool,
    error: Option<String>,
    field_errors: HashMap<String, String>,
}

impl SettingsPage {
    fn error_for(&self, field: &str) -> Option<&str> {
        self.field_errors.get(field).map(String::as_str)
    }
}

fn settings_page(l: &Loaded, form: SettingsForm, saved: bool) -> SettingsPage {
    let now = now_ms();
    SettingsPage {
        layout: Layout::new(&l.who, "services"),
        head: head(l, "settings"),
        form,
        instances: l
            .summary
            .instances
            .iter()
            .map(|i| InstanceLine {
                name: i.name.to_string(),
                online: i.online,
                last_seen: i.last_seen.map(|t| When::new(t, now)),
            })
            .collect(),
        strategies: vec!["in-place", "shadow", "shadow-full"],
        rollouts: vec!["all", "one-by-one", "canary"],
        saved,
        error: None,
        field_errors: HashMap::new(),
    }
}

/// What the tab and its form need to see or change a target's settings.
const WHAT: &str = "see or change a target's settings";

/// `GET /services/{name}/settings[?saved=1]`.
pub(crate) async fn show(
    State(api): Shared,
    caller: Caller,
    Path(name): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> PageResult {
    let here = format!("/services/{}/settings", super::urlencode(&name));
    let l = load(&api, &caller, &name, &here).await?;
    l.who.require_admin(WHAT)?;
    let form = SettingsForm::of(&l.target.settings, &l.target.instances);
    page(&settings_page(&l, form, q.contains_key("saved")))
}

/// `POST /services/{name}/settings`: saves through
/// [`crate::api::edit_target_as`], then back to the tab; a refusal shows
/// the form again with the error next to its field.
pub(crate) async fn save(
    State(api): Shared,
    caller: Caller,
    Path(name): Path<String>,
    body: Bytes,
) -> PageResult {
    let here = format!("/services/{}/settings", super::urlencode(&name));
    let l = load(&api, &caller, &name, &here).await?;
    l.who.require_admin(WHAT)?;
    let sent: SettingsForm = form(&body)?;
    let result = match sent.edit() {
        Ok(edit) => crate::api::edit_target_as(&api, &l.who, &l.target.name, edit).await,
        Err(e) => Err(e),
    };
    match result {
        Ok(_) => Ok(Redirect::to(&format!("{here}?saved=1")).into_response()),
        Err(e) if e.status == StatusCode::FORBIDDEN => Err(e.into()),
        Err(e) => {
            let status = e.status;
            let mut p = settings_page(&l, sent, false);
            match e.field.as_deref() {
                Some(field) => {
                    let field = field.strip_prefix("settings.").unwrap_or(field);
                    p.field_errors.insert(field.to_owned(), e.message);
                }
                None => p.error = Some(e.message),
            }
            Ok((status, Html(p.render()?)).into_response())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_form_round_trips_the_settings_and_names_a_bad_field() {
        let settings = Settings {
            strategy: Some(Strategy::Shadow),
            ..Settings::default()
        };
        let instances = vec![
            InstanceName::new("a-1").unwrap(),
            InstanceName::new("a-2").unwrap(),
        ];
        let form = SettingsForm::of(&settings, &instances);
        let edit = form.edit().unwrap();
        assert_eq!(edit.instances.as_deref(), Some(&instances[..]));
        let s = edit.settings;
        assert_eq!(s.strategy, Some(Some(Strategy::Shadow)));
        assert_eq!(s.rollout, Some(settings.rollout));
        assert_eq!(s.canary_secs, Some(settings.canary_secs));
        assert_eq!(s.keep_rollback, Some(settings.keep_rollback));

        // The instance's default strategy; instances by commas or lines.
        let form = SettingsForm {
            strategy: String::new(),
            instances: "a-1, a-2\n\na-3".into(),
            ..form
        };
        let edit = form.edit().unwrap();
        assert_eq!(edit.settings.strategy, Some(None));
        assert_eq!(edit.instances.map(|i| i.len()), Some(3));

        let bad = SettingsForm {
            parallel: "many".into(),
            ..form.clone()
        };
        let e = bad.edit().unwrap_err();
        assert_eq!(e.field.as_deref(), Some("parallel"));
        assert!(e.message.contains("`many`"), "{}", e.message);
        let bad = SettingsForm {
            rollout: "blue-green".into(),
            ..form
        };
        assert_eq!(bad.edit().unwrap_err().field.as_deref(), Some("rollout"));
    }
}
