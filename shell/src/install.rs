//! Bringing one service to a commit on this instance: steps 1–4 of the upgrade.
//!
//! [`install`] compares the installed commit with the target (equal: nothing to
//! do), asks the repository for the diff (or the full tree for a first install),
//! fetches only the blobs missing from the instance's [`BlobCache`] (each verified
//! on arrival), makes the new release from the previous one ([`crate::release`]),
//! runs the build there, and seals the release. Nothing is started and nothing is
//! recorded: that is the upgrade's job, once everything is serving. A failure at
//! any step leaves no new release behind and the previous one untouched.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use image_spec::{
    BlobId, CommitId, InstanceName, MANIFEST_FILE, ManifestError, ServiceManifest, ServiceName,
    Tree, TreeDiff,
};
use repo_server::client::{ClientError, RepoClient};

use crate::build::{self, BuildError};
use crate::release::{CopyStats, ReleaseError, Releases};

/// Blobs fetched by this instance, each once: `DIR/<id>`, written only by a
/// verified fetch.
#[derive(Debug, Clone)]
pub struct BlobCache {
    dir: PathBuf,
}

impl BlobCache {
    /// Opens (creating if needed) the cache in `dir`, removing partial downloads.
    pub fn open(dir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "part") {
                std::fs::remove_file(&path)?;
            }
        }
        Ok(Self {
            dir: dir.to_owned(),
        })
    }

    /// Where the blob's bytes are (or would be).
    pub fn path(&self, id: &BlobId) -> PathBuf {
        self.dir.join(id.to_hex())
    }

    /// The blobs among `ids` not in the cache.
    pub fn missing(&self, ids: impl IntoIterator<Item = BlobId>) -> Vec<BlobId> {
        ids.into_iter()
            .filter(|id| !self.path(id).is_file())
            .collect()
    }
}

/// A sealed release of a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Installed {
    /// The commit it holds.
    pub commit: CommitId,
    /// The commit's tree.
    pub tree: Tree,
    /// The release directory.
    pub dir: PathBuf,
}

/// What an install did.
#[derive(Debug, Clone)]
pub struct InstallReport {
    /// The release now ready to start.
    pub release: Installed,
    /// Blobs fetched from the repository (the others were cached).
    pub fetched_blobs: u64,
    /// Their bytes.
    pub fetched_bytes: u64,
    /// What copying the previous release did.
    pub copied: CopyStats,
    /// Was a build run?
    pub built: bool,
    /// Was a sealed release of this commit on disk already (a rollback)? Then
    /// nothing was fetched, copied or built.
    pub reused: bool,
    /// Time spent fetching, copying and applying, and building.
    pub timings: Timings,
}

/// Where an install spent its time.
#[derive(Debug, Clone, Copy, Default)]
pub struct Timings {
    /// Diff and blob fetch.
    pub fetch: Duration,
    /// Copy of the previous release and applying the diff.
    pub copy: Duration,
    /// The build command.
    pub build: Duration,
}

/// Why an install failed; nothing was left behind.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// The repository refused or failed.
    #[error("repository: {0}")]
    Repo(#[from] ClientError),
    /// The release could not be made.
    #[error(transparent)]
    Release(#[from] ReleaseError),
    /// The build failed (the error carries the log's last lines).
    #[error(transparent)]
    Build(#[from] BuildError),
    /// The release's `service.toml` is invalid.
    #[error("{path}: {source}")]
    Manifest {
        /// The manifest file.
        path: PathBuf,
        /// Why.
        source: ManifestError,
    },
    /// The blob cache could not be used.
    #[error("blob cache: {0}")]
    Cache(std::io::Error),
}

/// Where an install happens and who it is for.
#[derive(Debug, Clone)]
pub struct InstallContext<'a> {
    /// The repository.
    pub repo: &'a RepoClient,
    /// The instance's blob cache.
    pub cache: &'a BlobCache,
    /// The instance's releases.
    pub releases: &'a Releases,
    /// The instance, for `MOLT_INSTANCE`.
    pub instance: &'a InstanceName,
    /// Where build logs go (`<dir>/<service>/<commit>.build.log`).
    pub logs: &'a Path,
}

/// Brings `service` to `target` (see the module docs). `current` is the release
/// installed now, if any.
#[tracing::instrument(skip_all, fields(instance = %ctx.instance, service = %service, commit = %target))]
pub async fn install(
    ctx: &InstallContext<'_>,
    service: &ServiceName,
    target: CommitId,
    current: Option<&Installed>,
) -> Result<InstallReport, InstallError> {
    let started = Instant::now();
    let commit = ctx.repo.commit(target).await?;
    let base_tree = current.map_or_else(Tree::empty, |c| c.tree.clone());
    let unchanged = |release: Installed| InstallReport {
        release,
        fetched_blobs: 0,
        fetched_bytes: 0,
        copied: CopyStats::default(),
        built: false,
        reused: true,
        timings: Timings::default(),
    };
    if let Some(c) = current
        && c.commit == target
    {
        return Ok(unchanged(c.clone()));
    }
    let diff: TreeDiff = ctx
        .repo
        .diff(service, current.map(|c| c.commit), target)
        .await?;
    // The diff must lead to exactly the tree of the commit asked for.
    let tree = diff
        .apply_expecting(&base_tree, commit.tree())
        .map_err(ReleaseError::from)?;

    // A release of this commit that exists already is reused (a rollback).
    let sealed = ctx.releases.dir(service, &target);
    if sealed.is_dir() {
        crate::release::verify(&sealed, &tree)?;
        return Ok(unchanged(Installed {
            commit: target,
            tree,
            dir: sealed,
        }));
    }

    // Pre-flight: the new release needs a copy of the previous one plus the files
    // the diff adds; refuse with the numbers rather than fail half way.
    let needed = current.map_or(Ok(0), |c| crate::release::dir_size(&c.dir))?
        + diff
            .changes()
            .iter()
            .filter_map(|c| match c {
                image_spec::Change::Added(e) | image_spec::Change::Modified(e) => Some(e.size()),
                _ => None,
            })
            .sum::<u64>();
    let available = ctx.releases.free_space()?;
    if needed > available {
        return Err(ReleaseError::NoSpace {
            path: ctx.releases.dir(service, &target),
            needed,
            available,
        }
        .into());
    }

    let missing = ctx.cache.missing(diff.needed_blobs());
    let fetched_bytes = if missing.is_empty() {
        0
    } else {
        ctx.repo.fetch_blobs_to(&missing, &ctx.cache.dir).await?
    };
    let fetch = started.elapsed();
    crate::crash::point("after-fetch");

    let copy_started = Instant::now();
    let stage = ctx
        .releases
        .stage(service, &target, current.map(|c| c.dir.as_path()))?;
    let outcome = async {
        stage.apply(&base_tree, &diff, |id| ctx.cache.path(id))?;
        let copy = copy_started.elapsed();
        let manifest_path = stage.dir().join(MANIFEST_FILE);
        let text = std::fs::read_to_string(&manifest_path)
            .map_err(ReleaseError::from_io(&manifest_path))?;
        let manifest = ServiceManifest::parse(&text).map_err(|source| InstallError::Manifest {
            path: manifest_path.clone(),
            source,
        })?;
        let build_started = Instant::now();
        if matches!(
            manifest.kind(),
            image_spec::manifest::ServiceKind::Plugin { .. }
        ) {
            // A plugin builds against the SDK this shell speaks.
            crate::plugin::provide_sdk(stage.dir())
                .map_err(ReleaseError::from_io(&stage.dir().join(".molt")))?;
        }
        let built = match manifest.build() {
            Some(b) => {
                let mut env: Vec<(String, String)> = manifest
                    .env()
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                env.push(("MOLT_SERVICE".into(), service.to_string()));
                env.push(("MOLT_COMMIT".into(), target.to_string()));
                env.push(("MOLT_INSTANCE".into(), ctx.instance.to_string()));
                let log = ctx
                    .logs
                    .join(service.as_str())
                    .join(format!("{}.build.log", target.short(12)));
                build::run(b, stage.dir(), &env, &log).await?;
                true
            }
            None => false,
        };
        Ok::<_, InstallError>((copy, built, build_started.elapsed()))
    }
    .await;
    let (copy, built, build) = match outcome {
        Ok(o) => o,
        Err(e) => {
            if let Err(cleanup) = stage.abandon() {
                tracing::warn!(error = %cleanup, "could not remove the failed release");
            }
            return Err(e);
        }
    };
    let copied = stage.copied();
    let dir = stage.seal()?;
    Ok(InstallReport {
        release: Installed {
            commit: target,
            tree,
            dir,
        },
        fetched_blobs: missing.len() as u64,
        fetched_bytes,
        copied,
        built,
        reused: false,
        timings: Timings { fetch, copy, build },
    })
}
