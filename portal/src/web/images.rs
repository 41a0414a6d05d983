//! The Images pages: every image of the repository (newest first, with who
//! created it), one image (its microservices and their commits), and "new
//! image from this one", which bumps chosen microservices to a branch head
//! or a revision.
//!
//! - The list: [`crate::api::images_newest_first`], as `GET /api/v1/images`.
//! - One image: the repository's record (`RepoClient::image`), each
//!   microservice's commit (`RepoClient::commit`) and its `main` head
//!   (`RepoClient::head`); the branches offered for each microservice are
//!   its branches in the repository (`RepoClient::branches`), and `main`.
//! - A new image: [`crate::api::create_image_as`], the code behind
//!   `POST /api/v1/images` — made in the repository on the person's behalf
//!   (they are its author, the portal its `by`), audited as `image.create`.
//!   Then to the new image's page, or to a service's Deployment tab with the
//!   new image picked. A refusal shows the form again with the error next to
//!   the field at fault.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use askama::Template;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::response::{Html, IntoResponse, Redirect};
use image_spec::{BranchName, ImageName, ServiceName, TargetName};
use wire::Identity;
use wire::repo::ImageRecord;

use super::format::{When, short};
use super::{Layout, PageError, PageResult, form, page, principal};
use crate::api::{Api, ApiError, Caller, ImageInput, Shared};
use crate::auth::Principal;
use crate::deployment::now_ms;

/// Who made an image, and when, as a page shows it.
pub struct Created {
    when: When,
    author: String,
    /// Made by the portal on the author's behalf (not with their own
    /// certificate)?
    through_portal: bool,
}

fn created(r: &ImageRecord, now: i64) -> Option<Created> {
    r.created.as_ref().map(|c| Created {
        when: When::new(c.at.as_unix_seconds() * 1000, now),
        author: c.author.to_string(),
        through_portal: c.by == Identity::Portal,
    })
}

// ---------------------------------------------------------------------------
// The list

/// An image in the list.
pub struct ImageRow {
    name: String,
    id: String,
    description: String,
    services: Vec<String>,
    created: Option<Created>,
}

#[derive(Template)]
#[template(path = "images.html")]
struct ImagesPage {
    layout: Layout,
    images: Vec<ImageRow>,
    /// Why the repository could not list them.
    error: Option<String>,
}

/// `GET /images`.
pub(crate) async fn list(State(api): Shared, caller: Caller) -> PageResult {
    let who = principal(&api, &caller, "/images").await?;
    let now = now_ms();
    let (records, error) = match crate::api::images_newest_first(&api).await {
        Ok(list) => (list, None),
        Err(e) => (Vec::new(), Some(e.message)),
    };
    page(&ImagesPage {
        layout: Layout::new(&who, "images"),
        images: records
            .iter()
            .map(|r| ImageRow {
                name: r.image.name().to_string(),
                id: short(&r.id),
                description: r.image.description().to_owned(),
                services: r.image.services().keys().map(ToString::to_string).collect(),
                created: created(r, now),
            })
            .collect(),
        error,
    })
}

// ---------------------------------------------------------------------------
// One image, and its "new image from this one" form

/// A commit, briefly.
pub struct CommitView {
    id: String,
    /// Its message's first line.
    message: String,
    author: String,
    when: When,
}

/// One microservice of the image, and its line of the form.
pub struct ServiceLine {
    name: String,
    commit: String,
    /// The commit's full id (for links).
    commit_id: String,
    /// The commit, when the repository could give it.
    details: Option<CommitView>,
    /// Its `main` head: `None` without a `main` branch.
    main: Option<CommitView>,
    /// Is the image's commit `main`'s head?
    at_main: bool,
    /// The branches offered for it.
    branches: Vec<String>,
    /// The form: bump it?
    bump: bool,
    /// The form: to which revision.
    rev: String,
}

/// The form's other fields, as sent.
#[derive(Default)]
pub struct NewImageForm {
    name: String,
    description: String,
    then: String,
}

#[derive(Template)]
#[template(path = "image.html")]
struct ImagePage {
    layout: Layout,
    name: String,
    id: String,
    description: String,
    created: Option<Created>,
    services: Vec<ServiceLine>,
    form: NewImageForm,
    /// The services (targets) the new image can go to the Deployment tab of.
    targets: Vec<String>,
    error: Option<String>,
    field_errors: HashMap<String, String>,
}

impl ImagePage {
    fn error_for(&self, field: &str) -> Option<&str> {
        self.field_errors.get(field).map(String::as_str)
    }

    /// The error of the revision field of `service`.
    fn rev_error(&self, service: &str) -> Option<&str> {
        self.error_for(&format!("rev.{service}"))
    }
}

fn commit_view(id: image_spec::CommitId, c: &image_spec::Commit, now: i64) -> CommitView {
    CommitView {
        id: short(&id),
        message: c.message().lines().next().unwrap_or_default().to_owned(),
        author: c.author().to_owned(),
        when: When::new(c.time().as_unix_seconds() * 1000, now),
    }
}

/// The image page for `who`, with the form as sent (`None`: fresh).
async fn image_page(
    api: &Api,
    who: &Principal,
    name: &ImageName,
    sent: Option<(&NewImageForm, &BTreeMap<String, String>, &BTreeSet<String>)>,
) -> Result<ImagePage, PageError> {
    let repo = api.repo().await?;
    let record = repo.image(name).await.map_err(crate::api::repo_error)?;
    let now = now_ms();
    let main = BranchName::new("main").ok();
    // The branches offered for each microservice: every branch it has
    // (none listed if the repository cannot say; `main` is always offered).
    let mut branches: BTreeMap<ServiceName, BTreeSet<String>> = BTreeMap::new();
    for h in repo.branches(None).await.unwrap_or_default() {
        branches
            .entry(h.service)
            .or_default()
            .insert(h.branch.to_string());
    }
    let mut services = Vec::new();
    for (service, commit) in record.image.services() {
        let details = repo
            .commit(*commit)
            .await
            .ok()
            .map(|c| commit_view(*commit, &c, now));
        let head = match &main {
            Some(main) => repo.head(service, main).await.ok().flatten(),
            None => None,
        };
        let mut offered = branches.remove(service).unwrap_or_default();
        offered.insert("main".to_owned());
        let (bump, rev) = match sent {
            Some((_, revs, bumped)) => (
                bumped.contains(service.as_str()),
                revs.get(service.as_str()).cloned().unwrap_or_default(),
            ),
            None => (false, "main".to_owned()),
        };
        services.push(ServiceLine {
            name: service.to_string(),
            commit: short(commit),
            commit_id: commit.to_hex(),
            details,
            at_main: head.as_ref().is_some_and(|h| h.id == *commit),
            main: head.map(|h| commit_view(h.id, &h.commit, now)),
            branches: offered.into_iter().collect(),
            bump,
            rev,
        });
    }
    let targets = api
        .targets_in_scope(who)
        .await?
        .into_iter()
        .map(|t| t.name.to_string())
        .collect();
    let form = match sent {
        Some((f, _, _)) => NewImageForm {
            name: f.name.clone(),
            description: f.description.clone(),
            then: f.then.clone(),
        },
        None => NewImageForm {
            description: record.image.description().to_owned(),
            ..Default::default()
        },
    };
    Ok(ImagePage {
        layout: Layout::new(who, "images"),
        name: record.image.name().to_string(),
        id: record.id.to_string(),
        description: record.image.description().to_owned(),
        created: created(&record, now),
        services,
        form,
        targets,
        error: None,
        field_errors: HashMap::new(),
    })
}

fn image_name(s: &str) -> Result<ImageName, PageError> {
    ImageName::new(s).map_err(|e| PageError::Api(ApiError::bad("name", e.to_string())))
}

/// `GET /images/{name}`.
pub(crate) async fn show(
    State(api): Shared,
    caller: Caller,
    Path(name): Path<String>,
) -> PageResult {
    let here = format!("/images/{}", super::urlencode(&name));
    let who = principal(&api, &caller, &here).await?;
    let name = image_name(&name)?;
    page(&image_page(&api, &who, &name, None).await?)
}

/// What the form asks for: the new image and where to go after.
struct Request {
    input: ImageInput,
    then: Option<TargetName>,
}

/// Reads the form (`name`, `description`, `bump` once per chosen
/// microservice, `rev.SERVICE`, `then`): an error names the field at fault.
async fn request(
    api: &Api,
    who: &Principal,
    from: &ImageName,
    f: &NewImageForm,
    revs: &BTreeMap<String, String>,
    bumped: &BTreeSet<String>,
) -> Result<Request, ApiError> {
    let name = ImageName::new(f.name.trim())
        .map_err(|e| ApiError::bad("name", format!("name the new image: {e}")))?;
    if bumped.is_empty() {
        return Err(ApiError::bad(
            "bump",
            "pick at least one microservice to bump",
        ));
    }
    let mut set = BTreeMap::new();
    for service in bumped {
        let field = format!("rev.{service}");
        let parsed = ServiceName::new(service).map_err(|e| ApiError::bad("bump", e.to_string()))?;
        let rev = revs.get(service).map(|r| r.trim()).unwrap_or_default();
        if rev.is_empty() {
            return Err(ApiError::bad(
                &field,
                format!("a branch or a commit for `{service}`"),
            ));
        }
        set.insert(parsed, rev.to_owned());
    }
    let then = match f.then.trim() {
        "" => None,
        t => {
            let t = TargetName::new(t).map_err(|e| ApiError::bad("then", e.to_string()))?;
            let target = api.target(&t).await.map_err(|mut e| {
                e.field = Some("then".into());
                e
            })?;
            who.require_scope(&target.name)?;
            Some(target.name)
        }
    };
    Ok(Request {
        input: ImageInput {
            name,
            from: Some(from.clone()),
            set,
            description: f.description.trim().to_owned(),
        },
        then,
    })
}

/// `POST /images/{name}/new`: makes the new image on the person's behalf,
/// then its page (or the chosen service's Deployment tab with it picked).
pub(crate) async fn create(
    State(api): Shared,
    caller: Caller,
    Path(name): Path<String>,
    body: Bytes,
) -> PageResult {
    let here = format!("/images/{}", super::urlencode(&name));
    let who = principal(&api, &caller, &here).await?;
    let from = image_name(&name)?;
    let pairs: Vec<(String, String)> = form(&body)?;
    let mut f = NewImageForm::default();
    let mut revs = BTreeMap::new();
    let mut bumped = BTreeSet::new();
    for (key, value) in pairs {
        match key.as_str() {
            "name" => f.name = value,
            "description" => f.description = value,
            "then" => f.then = value,
            "bump" => {
                bumped.insert(value);
            }
            _ => {
                if let Some(service) = key.strip_prefix("rev.") {
                    revs.insert(service.to_owned(), value);
                }
            }
        }
    }
    let result = match request(&api, &who, &from, &f, &revs, &bumped).await {
        Ok(r) => crate::api::create_image_as(&api, &who, r.input)
            .await
            .map(|record| (record, r.then)),
        Err(e) => Err(e),
    };
    match result {
        Ok((record, then)) => {
            let new = super::urlencode(record.image.name().as_str());
            let to = match then {
                Some(t) => format!(
                    "/services/{}/deployment?image={new}",
                    super::urlencode(t.as_str())
                ),
                None => format!("/images/{new}"),
            };
            Ok(Redirect::to(&to).into_response())
        }
        Err(e) => {
            let status = e.status;
            let mut p = image_page(&api, &who, &from, Some((&f, &revs, &bumped))).await?;
            // The API's `set.SERVICE` is the form's `rev.SERVICE`.
            let field = e.field.as_deref().map(|f| match f.strip_prefix("set.") {
                Some(service) => format!("rev.{service}"),
                None => f.to_owned(),
            });
            match field {
                Some(f)
                    if f.starts_with("rev.")
                        || ["name", "description", "bump", "then"].contains(&f.as_str()) =>
                {
                    p.field_errors.insert(f, e.message);
                }
                _ => p.error = Some(e.message),
            }
            Ok((status, Html(p.render()?)).into_response())
        }
    }
}
