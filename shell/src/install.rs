//! Bringing one service to a commit on this instance: steps 1–4 of the upgrade.
//!
//! [`install`] compares the installed commit with the target (equal: nothing to
//! do), asks the repository for the diff (or the full tree for a first install),
//! fetches only the blobs missing from the instance's [`BlobCache`] (each verified
//! on arrival), makes the new release — the tree's files linked from the cache
//! or copied, the previous release's build outputs copied ([`crate::release`])
//! —, runs the build there, checks the build changed none of the tree's
//! files, and seals the release. Nothing is started and nothing is
//! recorded: that is the upgrade's job, once everything is serving. A failure at
//! any step leaves no new release behind and the previous one untouched.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use image_spec::{
    BlobId, CommitId, InstanceName, MANIFEST_FILE, ManifestError, ServiceManifest, ServiceName,
    Tree, TreeDiff,
};
use repo_client::{ClientError, RepoClient};

use crate::build::{self, BuildError};
use crate::release::{CopyStats, ReleaseError, Releases, Staging};

pub use crate::cache::BlobCache;

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
    /// The commit has no `service.toml`.
    #[error("commit {commit} of `{service}` has no {MANIFEST_FILE}")]
    NoManifest {
        /// The service.
        service: ServiceName,
        /// The commit.
        commit: CommitId,
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

/// An install worked out before anything is written: the commit's tree, and how
/// to get there from the release installed now.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// The service.
    pub service: ServiceName,
    /// The commit to install.
    pub commit: CommitId,
    /// Its tree.
    pub tree: Tree,
    /// How to make the release.
    pub source: Source,
}

/// Where a new release comes from.
#[derive(Debug, Clone)]
pub enum Source {
    /// A sealed release of the commit is on disk (a rollback): reused as it is,
    /// once verified.
    Sealed(PathBuf),
    /// A copy of the release installed now (if any) with `diff` applied.
    Diff {
        /// The tree of the release copied (empty for a first install).
        base: Tree,
        /// The release copied.
        from: Option<PathBuf>,
        /// From `base` to the commit's tree.
        diff: TreeDiff,
    },
}

impl Prepared {
    /// The blobs the release needs that the cache lacks, and their bytes.
    pub fn missing(&self, cache: &BlobCache) -> (Vec<BlobId>, u64) {
        let Source::Diff { diff, .. } = &self.source else {
            return (Vec::new(), 0);
        };
        let missing = cache.missing(diff.needed_blobs());
        let wanted: std::collections::BTreeSet<&BlobId> = missing.iter().collect();
        let mut counted = std::collections::BTreeSet::new();
        let bytes = diff
            .changes()
            .iter()
            .filter_map(|c| match c {
                image_spec::Change::Added(e) | image_spec::Change::Modified(e) => Some(e),
                _ => None,
            })
            .filter(|e| wanted.contains(&e.blob()) && counted.insert(e.blob()))
            .map(|e| e.size())
            .sum();
        (missing, bytes)
    }
}

/// Works out how to bring `service` to `target` from `current` (the release
/// installed now): reuses a sealed release of the commit on disk, else asks the
/// repository for the diff, checked to lead to exactly the commit's tree.
/// `stored_tree` finds a tree the instance stored when it installed it.
pub async fn prepare(
    ctx: &InstallContext<'_>,
    service: &ServiceName,
    target: CommitId,
    current: Option<&Installed>,
    stored_tree: impl Fn(image_spec::TreeId) -> Option<Tree>,
) -> Result<Prepared, InstallError> {
    let commit = ctx.repo.commit(target).await?;
    let sealed = ctx.releases.dir(service, &target);
    if sealed.is_dir()
        && let Some(tree) = stored_tree(commit.tree())
    {
        return Ok(Prepared {
            service: service.clone(),
            commit: target,
            tree,
            source: Source::Sealed(sealed),
        });
    }
    let base = current.map_or_else(Tree::empty, |c| c.tree.clone());
    let diff: TreeDiff = ctx
        .repo
        .diff(service, current.map(|c| c.commit), target)
        .await?;
    // The diff must lead to exactly the tree of the commit asked for.
    let tree = diff
        .apply_expecting(&base, commit.tree())
        .map_err(ReleaseError::from)?;
    let source = if sealed.is_dir() {
        Source::Sealed(sealed)
    } else {
        Source::Diff {
            base,
            from: current.map(|c| c.dir.clone()),
            diff,
        }
    };
    Ok(Prepared {
        service: service.clone(),
        commit: target,
        tree,
        source,
    })
}

/// The commit's `service.toml`, read from the sealed release or from the blob
/// cache, fetching just that blob if the cache lacks it.
pub async fn manifest(
    ctx: &InstallContext<'_>,
    prepared: &Prepared,
) -> Result<ServiceManifest, InstallError> {
    let path = match &prepared.source {
        Source::Sealed(dir) => dir.join(MANIFEST_FILE),
        Source::Diff { .. } => {
            let name =
                image_spec::RelPath::new(MANIFEST_FILE).expect("the manifest's name is a path");
            let entry = prepared
                .tree
                .get(&name)
                .ok_or_else(|| InstallError::NoManifest {
                    service: prepared.service.clone(),
                    commit: prepared.commit,
                })?;
            let id = entry.blob();
            if ctx.cache.missing([id]).is_empty() {
                ctx.cache.path(&id)
            } else {
                // Read from a scratch copy, so that planning leaves the cache
                // as it was and the plan's fetch counts this blob too.
                let scratch = ctx.cache.scratch();
                let _ = std::fs::remove_dir_all(&scratch);
                std::fs::create_dir_all(&scratch).map_err(InstallError::Cache)?;
                ctx.repo.fetch_blobs_to(&[id], &scratch).await?;
                scratch.join(id.to_hex())
            }
        }
    };
    let text = std::fs::read_to_string(&path).map_err(|e| {
        InstallError::Release(ReleaseError::Io {
            path: path.clone(),
            source: e,
        })
    })?;
    ServiceManifest::parse(&text).map_err(|source| InstallError::Manifest {
        path: PathBuf::from(format!(
            "{}@{}/{MANIFEST_FILE}",
            prepared.service,
            prepared.commit.short(12)
        )),
        source,
    })
}

/// Fetches the blobs the release needs that the cache lacks; returns them
/// and their bytes.
pub async fn fetch(
    ctx: &InstallContext<'_>,
    prepared: &Prepared,
) -> Result<(Vec<BlobId>, u64), InstallError> {
    let (missing, _) = prepared.missing(ctx.cache);
    let bytes = if missing.is_empty() {
        0
    } else {
        ctx.repo.fetch_blobs_to(&missing, ctx.cache.dir()).await?
    };
    ctx.cache.stamp_fetched(&missing);
    crate::crash::point("after-fetch");
    Ok((missing, bytes))
}

/// A release being made: staged and not sealed yet, or sealed.
#[derive(Debug)]
pub enum Made {
    /// Sealed: ready to start.
    Sealed(Installed),
    /// Staged: the build runs in it, then it is sealed ([`build_and_seal`]).
    Staged(Staging, Installed),
}

/// Makes the release of `prepared`: verifies a sealed one, or assembles a
/// new one from the blob cache and the previous release
/// ([`Releases::assemble`]; `fresh`: the blobs fetched for it, which refuses
/// up front when the disk cannot hold what it copies). A release with no build
/// command is sealed at once. A failure leaves nothing behind. Blocking: it
/// hashes and copies, so async callers run it on a blocking thread.
pub fn make_release(
    releases: &Releases,
    cache: &BlobCache,
    prepared: &Prepared,
    fresh: &BTreeSet<BlobId>,
) -> Result<Made, InstallError> {
    let (base, from) = match &prepared.source {
        Source::Sealed(dir) => {
            crate::release::verify(dir, &prepared.tree)?;
            return Ok(Made::Sealed(Installed {
                commit: prepared.commit,
                tree: prepared.tree.clone(),
                dir: dir.clone(),
            }));
        }
        Source::Diff { base, from, .. } => (base, from),
    };
    let service = &prepared.service;
    let target = prepared.commit;
    let blob_path = |id: &BlobId| cache.path(id);
    let verified = |id: &BlobId, meta: &std::fs::Metadata| cache.verified(id, meta);
    let sources = crate::release::Sources {
        cache: &blob_path,
        verified: &verified,
        fresh,
    };
    let stage = releases.assemble(
        service,
        &target,
        &prepared.tree,
        from.as_deref().map(|dir| (dir, base)),
        &sources,
    )?;
    let staged = (|| {
        let manifest = release_manifest(stage.dir())?;
        if matches!(
            manifest.kind(),
            image_spec::manifest::ServiceKind::Plugin { .. }
        ) {
            // A plugin builds against the SDK this shell speaks.
            crate::plugin::provide_sdk(stage.dir())
                .map_err(ReleaseError::from_io(&stage.dir().join(".molt")))?;
        }
        Ok::<_, InstallError>(manifest)
    })();
    let manifest = match staged {
        Ok(m) => m,
        Err(e) => {
            if let Err(cleanup) = stage.abandon() {
                tracing::warn!(error = %cleanup, "could not remove the failed release");
            }
            return Err(e);
        }
    };
    let installed = Installed {
        commit: target,
        tree: prepared.tree.clone(),
        dir: releases.dir(service, &target),
    };
    if manifest.build().is_some() {
        return Ok(Made::Staged(stage, installed));
    }
    stage.seal()?;
    Ok(Made::Sealed(installed))
}

/// [`make_release_blocking`], and once more if it finds blobs in the cache
/// corrupt (set aside by then): those are fetched anew from the repository
/// and linked fresh. Returns what was made and how many blobs (and bytes) the
/// second try fetched.
pub async fn make_release_healing(
    ctx: &InstallContext<'_>,
    prepared: &Prepared,
    fresh: &BTreeSet<BlobId>,
) -> Result<(Made, u64, u64), InstallError> {
    match make_release_blocking(ctx, prepared, fresh).await {
        Err(InstallError::Release(ReleaseError::CorruptBlobs(blobs))) => {
            tracing::warn!(
                blobs = blobs.len(),
                "blobs in the cache were corrupt; fetching them anew"
            );
            let bytes = ctx.repo.fetch_blobs_to(&blobs, ctx.cache.dir()).await?;
            ctx.cache.stamp_fetched(&blobs);
            let mut fresh = fresh.clone();
            fresh.extend(blobs.iter().copied());
            let made = make_release_blocking(ctx, prepared, &fresh).await?;
            Ok((made, blobs.len() as u64, bytes))
        }
        other => other.map(|made| (made, 0, 0)),
    }
}

/// [`make_release`] on a blocking thread.
pub async fn make_release_blocking(
    ctx: &InstallContext<'_>,
    prepared: &Prepared,
    fresh: &BTreeSet<BlobId>,
) -> Result<Made, InstallError> {
    let (releases, cache, prepared, fresh) = (
        ctx.releases.clone(),
        ctx.cache.clone(),
        prepared.clone(),
        fresh.clone(),
    );
    tokio::task::spawn_blocking(move || make_release(&releases, &cache, &prepared, &fresh))
        .await
        .map_err(|e| {
            InstallError::Release(ReleaseError::Io {
                path: PathBuf::from("<release task>"),
                source: std::io::Error::other(e),
            })
        })?
}

/// The `service.toml` of a release directory.
fn release_manifest(dir: &Path) -> Result<ServiceManifest, InstallError> {
    let path = dir.join(MANIFEST_FILE);
    let text = std::fs::read_to_string(&path).map_err(ReleaseError::from_io(&path))?;
    ServiceManifest::parse(&text).map_err(|source| InstallError::Manifest { path, source })
}

/// Runs the build of a staged release and seals it; a failure removes it.
pub async fn build_and_seal(
    ctx: &InstallContext<'_>,
    service: &ServiceName,
    stage: Staging,
    installed: Installed,
) -> Result<Installed, InstallError> {
    let built = async {
        let manifest = release_manifest(stage.dir())?;
        if let Some(b) = manifest.build() {
            let env = crate::env::ServiceEnv {
                instance: ctx.instance,
                service,
                commit: installed.commit,
                manifest: &manifest,
                ports: None,
                data: None,
            }
            .vars();
            let log = ctx
                .logs
                .join(service.as_str())
                .join(format!("{}.build.log", installed.commit.short(12)));
            build::run(b, stage.dir(), &env, &log).await?;
            // Prove the built release against its tree: a build may add
            // files, not change the commit's.
            if let Err(e) = stage.check_tree(&installed.tree) {
                if let ReleaseError::WroteShared { path } = &e
                    && let Some(entry) = installed.tree.get(path)
                {
                    // The shared bytes are not the blob's any more.
                    let _ = std::fs::remove_file(ctx.cache.path(&entry.blob()));
                    tracing::error!(path = %path, blob = %entry.blob(), "the build wrote into a shared file; the blob was dropped from the cache");
                }
                return Err(e.into());
            }
        }
        Ok::<_, InstallError>(())
    }
    .await;
    if let Err(e) = built {
        if let Err(cleanup) = stage.abandon() {
            tracing::warn!(error = %cleanup, "could not remove the failed release");
        }
        return Err(e);
    }
    stage.seal()?;
    Ok(installed)
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
    if let Some(c) = current
        && c.commit == target
    {
        return Ok(InstallReport {
            release: c.clone(),
            fetched_blobs: 0,
            fetched_bytes: 0,
            copied: CopyStats::default(),
            built: false,
            reused: true,
            timings: Timings::default(),
        });
    }
    let prepared = prepare(ctx, service, target, current, |_| None).await?;
    let reused = matches!(prepared.source, Source::Sealed(_));
    let (fetched, fetched_bytes) = fetch(ctx, &prepared).await?;
    let mut fetched_blobs = fetched.len() as u64;
    let mut fetched_bytes = fetched_bytes;
    let fetch_time = started.elapsed();
    let copy_started = Instant::now();
    let (made, refetched, rebytes) =
        make_release_healing(ctx, &prepared, &fetched.into_iter().collect()).await?;
    fetched_blobs += refetched;
    fetched_bytes += rebytes;
    let copy = copy_started.elapsed();
    let build_started = Instant::now();
    let (release, built, copied) = match made {
        Made::Sealed(i) => (i, false, CopyStats::default()),
        Made::Staged(stage, i) => {
            let copied = stage.copied();
            (build_and_seal(ctx, service, stage, i).await?, true, copied)
        }
    };
    Ok(InstallReport {
        release,
        fetched_blobs,
        fetched_bytes,
        copied,
        built,
        reused,
        timings: Timings {
            fetch: fetch_time,
            copy,
            build: build_started.elapsed(),
        },
    })
}
