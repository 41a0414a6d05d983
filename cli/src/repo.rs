//! The repository commands: push, log, diff, image create / show / list.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;

use anyhow::{Context as _, Result, bail};
use image_spec::{BranchName, Change, CommitId, Image, ImageName, Mode, ServiceName};
use indicatif::{ProgressBar, ProgressStyle};
use repo_client::{PushOptions, PushProgress, PushReport, RepoClient};
use serde_json::json;
use wire::Client;
use wire::repo::{ImageAuthorship, ImageRecord};

use crate::config::Loaded;

/// A connection to the repository as the configured user.
pub(crate) struct Context {
    repo: RepoClient,
    client: Client,
}

impl Context {
    /// Loads the configuration and connects.
    pub(crate) async fn open(config: Option<&Path>, repo: Option<SocketAddr>) -> Result<Self> {
        let loaded = Loaded::read(config)?;
        let creds = loaded.credentials()?;
        let addr = repo.unwrap_or(loaded.config.repo);
        let client = Client::new(&creds, addr)?;
        let mut repo = RepoClient::connect(&client, addr)
            .await
            .with_context(|| format!("cannot reach the repository server at {addr}"))?;
        if let Some(cache) = tree_cache_dir() {
            repo = repo.with_tree_cache(cache);
        }
        Ok(Self { repo, client })
    }

    /// Closes the connection and waits until the server has been told, so no
    /// half-open connection lingers on the server until its idle timeout.
    pub(crate) async fn close(self) {
        self.repo.connection().close();
        self.client.shutdown().await;
    }

    /// `molt push`: pushes and prints what it did.
    pub(crate) async fn push(
        &self,
        dir: &Path,
        message: &str,
        branch: &str,
        json: bool,
    ) -> Result<()> {
        let report = self.push_report(dir, message, branch, !json).await?;
        if json {
            println!("{}", serde_json::to_string(&report)?);
        } else {
            print_push(&report);
        }
        Ok(())
    }

    /// Pushes the service in `dir` (with a progress bar on a terminal when
    /// `progress`) and says what the push did, printing nothing.
    pub(crate) async fn push_report(
        &self,
        dir: &Path,
        message: &str,
        branch: &str,
        progress: bool,
    ) -> Result<PushReport> {
        let opts = PushOptions {
            branch: BranchName::new(branch)?,
            message: message.to_owned(),
        };
        let bar = if progress {
            ProgressBar::new(0)
        } else {
            ProgressBar::hidden()
        };
        bar.set_style(
            ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        let report = self
            .repo
            .push(dir, &opts, |p| match p {
                PushProgress::Scanned { files, .. } => bar.set_message(format!("{files} files")),
                PushProgress::Uploading { blobs, bytes } => {
                    bar.set_length(bytes);
                    bar.set_message(format!("uploading {blobs} blobs"));
                }
                PushProgress::Sent { bytes } => bar.set_position(bytes),
            })
            .await
            .with_context(|| format!("push of `{}` failed", dir.display()))?;
        bar.finish_and_clear();
        Ok(report)
    }

    pub(crate) async fn log(
        &self,
        service: &str,
        branch: &str,
        limit: u32,
        json: bool,
    ) -> Result<()> {
        let service = ServiceName::new(service)?;
        let entries = self
            .repo
            .log(&service, &BranchName::new(branch)?, limit)
            .await?;
        if json {
            let list: Vec<_> = entries
                .iter()
                .map(|e| {
                    json!({
                        "commit": e.id,
                        "tree": e.commit.tree(),
                        "parents": e.commit.parents(),
                        "author": e.commit.author(),
                        "message": e.commit.message(),
                        "time": e.commit.time().to_string(),
                    })
                })
                .collect();
            println!("{}", serde_json::Value::Array(list));
        } else {
            for e in &entries {
                let first_line = e.commit.message().lines().next().unwrap_or("");
                println!(
                    "{}  {}  {:<12} {}",
                    e.id.short(12),
                    e.commit.time(),
                    e.commit.author(),
                    first_line
                );
            }
        }
        Ok(())
    }

    async fn resolve(&self, service: &ServiceName, rev: &str) -> Result<CommitId> {
        self.repo
            .resolve(service, rev)
            .await
            .with_context(|| format!("cannot resolve `{rev}` in service `{service}`"))
    }

    pub(crate) async fn diff(&self, service: &str, from: &str, to: &str, json: bool) -> Result<()> {
        let service = ServiceName::new(service)?;
        let from_id = if from == "-" {
            None
        } else {
            Some(self.resolve(&service, from).await?)
        };
        let to_id = self.resolve(&service, to).await?;
        let diff = self.repo.diff(&service, from_id, to_id).await?;
        let mode = |m: Mode| match m {
            Mode::Regular => "regular",
            Mode::Executable => "executable",
            Mode::Symlink => "symlink",
        };
        if json {
            let changes: Vec<_> = diff
                .changes()
                .iter()
                .map(|c| match c {
                    Change::Added(e) | Change::Modified(e) => json!({
                        "change": if matches!(c, Change::Added(_)) { "added" } else { "modified" },
                        "path": e.path().as_str(),
                        "mode": mode(e.mode()),
                        "size": e.size(),
                        "blob": e.blob(),
                    }),
                    Change::ModeChanged { path, mode: m } => json!({
                        "change": "mode_changed", "path": path.as_str(), "mode": mode(*m),
                    }),
                    Change::Removed(path) => json!({ "change": "removed", "path": path.as_str() }),
                })
                .collect();
            println!(
                "{}",
                json!({ "service": service, "from": from_id, "to": to_id, "changes": changes })
            );
        } else {
            for c in diff.changes() {
                match c {
                    Change::Added(e) => println!("A {}", e.path()),
                    Change::Modified(e) => println!("M {}", e.path()),
                    Change::ModeChanged { path, mode: m } => println!("T {path} ({})", mode(*m)),
                    Change::Removed(path) => println!("D {path}"),
                }
            }
            if diff.is_empty() {
                println!("no changes");
            }
        }
        Ok(())
    }

    /// `molt image create`: creates the image and prints it.
    pub(crate) async fn image_create(
        &self,
        name: &str,
        set: &[String],
        from: Option<&str>,
        description: String,
        json: bool,
    ) -> Result<()> {
        let record = self.create_image(name, set, from, description).await?;
        if json {
            println!("{}", image_json(&record));
        } else {
            print_image_created(&record);
        }
        Ok(())
    }

    /// Creates an image from `--from` and `--set SERVICE=REV` pairs, printing
    /// nothing.
    pub(crate) async fn create_image(
        &self,
        name: &str,
        set: &[String],
        from: Option<&str>,
        description: String,
    ) -> Result<ImageRecord> {
        let name = ImageName::new(name)?;
        let mut services: BTreeMap<ServiceName, CommitId> = match from {
            Some(base) => self
                .repo
                .image(&ImageName::new(base)?)
                .await?
                .image
                .services()
                .clone(),
            None => BTreeMap::new(),
        };
        for pair in set {
            let Some((service, rev)) = pair.split_once('=') else {
                bail!("--set `{pair}`: expected SERVICE=REV");
            };
            let service = ServiceName::new(service).with_context(|| format!("--set `{pair}`"))?;
            let commit = self
                .repo
                .resolve(&service, rev)
                .await
                .with_context(|| format!("--set `{pair}`"))?;
            services.insert(service, commit);
        }
        if services.is_empty() {
            bail!("an image needs at least one service: use --set SERVICE=REV or --from IMAGE");
        }
        let image = Image::new(name, description, services)?;
        Ok(self.repo.create_image(image).await?)
    }

    /// The names of every image.
    pub(crate) async fn image_names(&self) -> Result<Vec<String>> {
        Ok(self
            .repo
            .images()
            .await?
            .into_iter()
            .map(|record| record.image.name().to_string())
            .collect())
    }

    /// Whether the repository has an image of this name.
    pub(crate) async fn has_image(&self, name: &str) -> Result<bool> {
        match self.repo.image(&ImageName::new(name)?).await {
            Ok(_) => Ok(true),
            Err(repo_client::ClientError::Remote(e))
                if e.kind == wire::repo::ErrorKind::NotFound =>
            {
                Ok(false)
            }
            Err(e) => Err(e.into()),
        }
    }

    pub(crate) async fn image_show(&self, name: &str, json: bool) -> Result<()> {
        let record = self.repo.image(&ImageName::new(name)?).await?;
        let (id, image) = (&record.id, &record.image);
        if json {
            println!("{}", image_json(&record));
        } else {
            println!("image       {}", image.name());
            println!("id          {id}");
            if !image.description().is_empty() {
                println!("description {}", image.description());
            }
            println!("author      {}", author_line(record.created.as_ref()));
            for (s, c) in image.services() {
                println!("  {:<20} {c}", s.as_str());
            }
        }
        Ok(())
    }

    pub(crate) async fn image_list(&self, json: bool) -> Result<()> {
        let images = self.repo.images().await?;
        if json {
            let list: Vec<_> = images.iter().map(image_json).collect();
            println!("{}", serde_json::Value::Array(list));
        } else {
            for r in &images {
                let author = r.created.as_ref().map_or("-", |c| c.author.as_str());
                println!(
                    "{:<30} {}  {:<12} {}  {}",
                    r.image.name().as_str(),
                    r.id.short(12),
                    author,
                    count(r.image.services().len() as u64, "service"),
                    r.image.description()
                );
            }
        }
        Ok(())
    }
}

/// Where pushed trees are cached: `$XDG_CACHE_HOME/molt/trees`, else
/// `~/.cache/molt/trees`.
fn tree_cache_dir() -> Option<std::path::PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".cache")))?;
    Some(base.join("molt").join("trees"))
}

/// What `molt push` prints for people.
pub(crate) fn print_push(report: &PushReport) {
    if report.created {
        println!(
            "pushed {}@{} to {}: {}, {} sent ({} bytes)",
            report.service,
            report.commit.short(12),
            report.branch,
            count(report.files as u64, "file"),
            count(report.blobs_sent, "blob"),
            report.bytes_sent
        );
    } else {
        println!(
            "{}: nothing to push, {} is already at {} ({} files unchanged)",
            report.service,
            report.branch,
            report.commit.short(12),
            report.files
        );
    }
}

/// What `molt image create` prints for people.
pub(crate) fn print_image_created(record: &ImageRecord) {
    let (id, image) = (&record.id, &record.image);
    println!(
        "created image {} ({}), author {}",
        image.name(),
        id.short(12),
        author_line(record.created.as_ref())
    );
    for (s, c) in image.services() {
        println!("  {:<20} {}", s.as_str(), c.short(12));
    }
}

/// `1 file`, `2 files`.
fn count(n: u64, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

/// `ada at 2026-11-23T19:42:48Z`, `ada via portal at …`, or `unknown` for an
/// image stored before the repository recorded authors.
fn author_line(created: Option<&ImageAuthorship>) -> String {
    let Some(c) = created else {
        return "unknown (created before authors were recorded)".to_owned();
    };
    match &c.by {
        wire::Identity::User { name, .. } if *name == c.author => {
            format!("{} at {}", c.author, c.at)
        }
        by => format!("{} via {by} at {}", c.author, c.at),
    }
}

/// An image in `--json`: name, id, description, services, and `created`
/// (`{"author", "by", "at"}` with `at` in RFC 3339, or `null` for an image
/// stored before authors were recorded).
pub(crate) fn image_json(record: &ImageRecord) -> serde_json::Value {
    let image = &record.image;
    let created = record.created.as_ref().map(|c| {
        json!({
            "author": c.author,
            "by": c.by,
            "at": c.at.to_string(),
        })
    });
    json!({
        "name": image.name(),
        "id": record.id,
        "description": image.description(),
        "services": image.services(),
        "created": created,
    })
}
