//! `molt watch DIR --instance I | --target T`: save in the editor, the
//! instance serves it.
//!
//! The service directory is watched (`notify` with a debouncer). Each settled
//! batch of changes is one cycle: the directory is scanned (`.moltignore`
//! honoured); if no file's content changed, nothing happens; otherwise it is
//! pushed to the developer's own branch (`dev/<user>` unless `--branch` says)
//! and pulled onto the instance, and one line says what changed, the bytes
//! sent, the build's time and the time from the save to the new version
//! serving. A failed cycle (a build error) prints its error lines and the old
//! version keeps serving; the watcher goes on. Changes that arrive during a
//! cycle are the next cycle's: the debouncer keeps collecting while a cycle
//! runs, so none is lost. A refusal (a staging or production instance, a
//! missing grant) ends the watch. Ctrl-C ends it between or during cycles.
//!
//! With `--target`, each cycle's pull goes through the portal to the target's
//! instances ([`crate::devloop`]), as a cycle of one watch run the portal
//! opens at the first cycle and ends when the watch stops: the target's
//! history shows the run with its cycles. So does `--instance` of an
//! instance the configured portal lists online in a target.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use image_spec::{CommitId, ServiceName, Tree, TreeDiff};
use notify::RecursiveMode;
use notify_debouncer_full::{DebounceEventResult, new_debouncer};
use tokio::sync::mpsc;
use wire::shell::{ShellRequest, ShellResponse, UpgradeSummary};

use crate::config::Loaded;
use crate::devloop::Onto;
use crate::portal::PortalClient;
use crate::repo::Context;

/// The pauses before each new try of a push that failed while the content
/// stayed as it was (a file caught half-written).
const PUSH_RETRIES: [Duration; 3] = [
    Duration::from_millis(50),
    Duration::from_millis(200),
    Duration::from_millis(400),
];

/// How long the files must be quiet before a batch of saves is a cycle: an
/// editor's save (write a temporary file, rename it over) takes a few
/// milliseconds; a `git checkout` or a formatter over many files a few more.
const SETTLE: Duration = Duration::from_millis(50);

/// What `molt watch` was asked.
#[derive(Debug, Clone)]
pub(crate) struct WatchArgs {
    /// The service directory.
    pub(crate) dir: PathBuf,
    /// Where each cycle's pull goes.
    pub(crate) onto: Onto,
    /// The branch to push to (default `dev/<user>`).
    pub(crate) branch: Option<String>,
    /// One JSON object per cycle.
    pub(crate) json: bool,
}

/// Is `path` an editor's temporary or backup file (never a reason to cycle)?
fn is_editor_temp(path: &Path) -> bool {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return false;
    };
    name.ends_with('~')
        || name.ends_with(".swp")
        || name.ends_with(".swx")
        || name.ends_with(".swo")
        || name.ends_with(".tmp")
        || name.starts_with(".#")
        || (name.starts_with('#') && name.ends_with('#'))
        || name == "4913"
        || path.components().any(|c| c.as_os_str() == ".git")
}

/// The tree the directory holds now (`.moltignore` honoured).
async fn scan(dir: &Path) -> Result<Tree> {
    let d = dir.to_owned();
    let scanned = tokio::task::spawn_blocking(move || image_spec::scan_dir(&d))
        .await?
        .with_context(|| format!("cannot read `{}`", dir.display()))?;
    Ok(scanned.tree)
}

/// Most changed paths a cycle names.
const NAMED: usize = 3;

/// The paths that differ between the last cycle's tree and `tree` (all of
/// them on the first cycle).
fn changed_paths(last: Option<&Tree>, tree: &Tree) -> Vec<String> {
    match last {
        Some(last) => TreeDiff::between(last, tree)
            .changes()
            .iter()
            .map(|c| c.path().to_string())
            .collect(),
        None => tree
            .entries()
            .iter()
            .map(|e| e.path().to_string())
            .collect(),
    }
}

/// `changed` in words: the first few paths, then how many more.
fn in_words(changed: &[String]) -> String {
    match changed.len() {
        0 => "nothing".to_owned(),
        n if n <= NAMED => changed.join(", "),
        n => format!("{} and {} more", changed[..NAMED].join(", "), n - NAMED),
    }
}

/// `molt watch` (see the module docs).
pub(crate) async fn watch(
    config: Option<&Path>,
    portal_url: Option<&str>,
    repo: Option<std::net::SocketAddr>,
    args: WatchArgs,
) -> Result<()> {
    let loaded = Loaded::read(config)?;
    let user = match loaded.credentials()?.identity {
        wire::Identity::User { name, .. } => name,
        other => bail!("`molt watch` runs as a person; the configured certificate is `{other}`"),
    };
    let branch = args.branch.clone().unwrap_or_else(|| format!("dev/{user}"));
    image_spec::BranchName::new(&branch)?;
    let ctx = Context::open(config, repo).await?;
    let mut via = match &args.onto {
        Onto::Instance(i) => match portal_target_of(config, portal_url, i).await {
            Some((client, target, instance)) => {
                if !args.json {
                    eprintln!(
                        "{instance} is an instance of portal target {target}: each cycle goes \
                         through the portal, which records the watch run in the target's history"
                    );
                }
                Via::Portal {
                    client,
                    target,
                    instance: Some(instance),
                    run: None,
                }
            }
            None => Via::Shell(i.clone()),
        },
        Onto::Target { target, instance } => Via::Portal {
            client: PortalClient::open(config, portal_url)?,
            target: target.clone(),
            instance: instance.clone(),
            run: None,
        },
    };

    // Every settled batch's earliest change, for the save → serving time.
    let (tx, mut rx) = mpsc::unbounded_channel::<Instant>();
    let mut debouncer = new_debouncer(SETTLE, None, move |res: DebounceEventResult| {
        let Ok(events) = res else {
            return;
        };
        let earliest = events
            .iter()
            .filter(|e| e.paths.iter().any(|p| !is_editor_temp(p)))
            .map(|e| e.time)
            .min();
        if let Some(t) = earliest {
            let _ = tx.send(t);
        }
    })
    .context("cannot watch files")?;
    debouncer
        .watch(&args.dir, RecursiveMode::Recursive)
        .with_context(|| format!("cannot watch `{}`", args.dir.display()))?;
    if !args.json {
        eprintln!(
            "watching {} → branch {branch} → {} (Ctrl-C stops)",
            args.dir.display(),
            args.onto.describe()
        );
    }

    // One listener for the whole watch: a Ctrl-C that comes between two
    // waits is kept for the next, not missed (a listener made per wait
    // would not see it).
    let mut interrupt = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .context("cannot listen for Ctrl-C")?;
    let mut last: Option<Tree> = None;
    // The commit the last cycle pushed: a scan taken mid-burst may differ
    // from what its push then read, so a later cycle can find the same
    // commit again, which is already serving (or already failed).
    let mut pushed: Option<CommitId> = None;
    let mut pending = Some(Instant::now());
    loop {
        let saved = match pending.take() {
            Some(t) => t,
            None => tokio::select! {
                t = rx.recv() => match t {
                    Some(t) => t,
                    None => bail!("the file watcher stopped"),
                },
                _ = interrupt.recv() => break,
            },
        };
        // Everything saved up to now is in this cycle.
        let mut saved = saved;
        while let Ok(t) = rx.try_recv() {
            saved = saved.min(t);
        }
        let cycle = tokio::select! {
            c = cycle(config, &ctx, &mut via, &args, &branch, (last.as_ref(), pushed), saved) => c,
            _ = interrupt.recv() => break,
        };
        match cycle {
            Ok(Some((tree, commit, line))) => {
                (last, pushed) = (Some(tree), Some(commit));
                if let Some(line) = line {
                    println!("{line}");
                }
            }
            Ok(None) => {}
            Err(Cycle::Failed(tree, commit, line)) => {
                pushed = commit.or(pushed);
                // The same bytes would fail the same way: wait for a change.
                last = Some(tree);
                println!("{line}");
            }
            Err(Cycle::Refused(e)) => {
                via.end().await;
                return Err(e);
            }
        }
    }
    via.end().await;
    ctx.close().await;
    Ok(())
}

/// The portal target `instance` (NAME or NAME@ADDR) belongs to, if the
/// configured portal answers within a moment that it does and the instance
/// is online there: then its cycles go through the portal, so the target's
/// history records them.
async fn portal_target_of(
    config: Option<&Path>,
    portal_url: Option<&str>,
    instance: &str,
) -> Option<(PortalClient, String, String)> {
    let name = instance.split('@').next().unwrap_or(instance).to_owned();
    let client = PortalClient::open(config, portal_url).ok()?;
    let listed = tokio::time::timeout(
        Duration::from_secs(2),
        client.call("GET", "/api/v1/instances", None),
    )
    .await
    .ok()?
    .ok()?;
    let target = listed.as_array()?.iter().find_map(|i| {
        (i["name"] == name.as_str() && i["online"] == true)
            .then(|| i["target"].as_str().map(str::to_owned))
            .flatten()
    })?;
    Some((client, target, name))
}

/// Where each cycle's pull goes.
enum Via {
    /// Straight to the instance's shell.
    Shell(String),
    /// Through the portal, as cycles of watch run `run` (opened at the
    /// first cycle, and again if the portal ended it).
    Portal {
        client: PortalClient,
        target: String,
        instance: Option<String>,
        run: Option<u64>,
    },
}

/// Why a pull did not serve.
enum PullFailed {
    /// Refused: the watch ends.
    Refused(anyhow::Error),
    /// Failed (a build error): the old version serves.
    Failed(String),
}

impl Via {
    /// Pulls `service` at `branch`.
    async fn pull(
        &mut self,
        config: Option<&Path>,
        service: &ServiceName,
        branch: &str,
    ) -> Result<UpgradeSummary, PullFailed> {
        let (client, target, instance, run) = match self {
            Via::Shell(instance) => {
                let req = ShellRequest::Pull {
                    service: service.clone(),
                    rev: branch.to_owned(),
                    on_behalf_of: None,
                };
                return match crate::instance::command_quiet(config, instance, req).await {
                    Ok(ShellResponse::Upgraded(s)) => Ok(s),
                    Ok(_) => Err(PullFailed::Refused(anyhow::anyhow!(
                        "the shell answered with something else than an upgrade"
                    ))),
                    Err(e) if crate::instance::is_refusal(&e) => Err(PullFailed::Refused(e)),
                    Err(e) => Err(PullFailed::Failed(format!("{e:#}"))),
                };
            }
            Via::Portal {
                client,
                target,
                instance,
                run,
            } => (client, target, instance, run),
        };
        let mut reopened = false;
        loop {
            let id = match *run {
                Some(id) => id,
                None => {
                    let id = crate::devloop::open_watch(client, target, service.as_str(), branch)
                        .await
                        .map_err(PullFailed::Refused)?;
                    *run = Some(id);
                    id
                }
            };
            let answer = crate::devloop::pull_via_portal(
                client,
                target,
                instance.as_deref(),
                service.as_str(),
                branch,
                Some(id),
            )
            .await;
            return match answer {
                // The portal ended the run (an admin did): open another.
                Err(e) if crate::devloop::refused_with(&e, 409) && !reopened => {
                    *run = None;
                    reopened = true;
                    continue;
                }
                Err(e) => Err(PullFailed::Refused(e)),
                Ok(a) if a.failed.is_empty() => {
                    a.done.into_iter().next().map(|(_, s)| s).ok_or_else(|| {
                        PullFailed::Refused(anyhow::anyhow!("the portal pulled onto no instance"))
                    })
                }
                Ok(a) => Err(PullFailed::Failed(a.why())),
            };
        }
    }

    /// Ends the portal's watch run, if one was opened (a failure is only
    /// reported: the run then shows when it was last heard from).
    async fn end(&mut self) {
        if let Via::Portal {
            client,
            run: Some(id),
            ..
        } = self
            && let Err(e) = crate::devloop::end_watch(client, *id).await
        {
            eprintln!("warning: cannot end watch run {id} on the portal: {e:#}");
        }
    }
}

/// A cycle that did not serve.
enum Cycle {
    /// The build (or the pull) failed: the old version serves; the line says why.
    Failed(Tree, Option<CommitId>, String),
    /// The instance or repository refused: the watch ends.
    Refused(anyhow::Error),
}

/// How a push of the watched directory went.
enum Pushed {
    /// Pushed.
    Done(repo_client::PushReport),
    /// The directory changed meanwhile: the next cycle has it.
    Moved,
    /// The content, still as scanned, cannot be pushed.
    Failed(anyhow::Error),
}

/// Pushes the directory, whose content was `tree`. A push that fails while
/// the content stays as it was is tried again after each of
/// [`PUSH_RETRIES`]: a file caught half-written (an editor that truncates,
/// then writes — and a busy machine may pause it in between) is read again
/// once still. A refusal is the error.
async fn push_settled(
    ctx: &Context,
    dir: &Path,
    branch: &str,
    tree: &Tree,
) -> Result<Pushed, anyhow::Error> {
    let moved = async || scan(dir).await.ok().map(|t| t.id()) != Some(tree.id());
    let mut failure = None;
    for pause in std::iter::once(Duration::ZERO).chain(PUSH_RETRIES) {
        if !pause.is_zero() {
            tokio::time::sleep(pause).await;
            if moved().await {
                return Ok(Pushed::Moved);
            }
        }
        match ctx.push_report(dir, "molt watch", branch, false).await {
            Ok(p) => return Ok(Pushed::Done(p)),
            Err(e) if crate::instance::is_refusal(&e) => return Err(e),
            Err(e) => failure = Some(e),
        }
    }
    if moved().await {
        return Ok(Pushed::Moved);
    }
    Ok(Pushed::Failed(
        failure.unwrap_or_else(|| anyhow::anyhow!("the push failed")),
    ))
}

/// The line of a cycle that did not serve (`pushed`: what it pushed, if the
/// push went through): the error's own words first, then one `file:line:col:
/// message` line per place it names, for editors to link; or one JSON
/// object.
fn failed_line(
    args: &WatchArgs,
    changed: &[String],
    pushed: Option<&repo_client::PushReport>,
    why: &str,
) -> String {
    let found = crate::locate::locations(why, &args.dir);
    if args.json {
        return serde_json::json!({
            "service": pushed.map(|p| p.service.to_string()),
            "commit": pushed.map(|p| p.commit.to_hex().to_string()),
            "ok": false,
            "changed": changed,
            "bytes_sent": pushed.map(|p| p.bytes_sent),
            "error": why,
            "locations": found,
        })
        .to_string();
    }
    let mut line = match pushed {
        Some(p) => format!(
            "{} {}: FAILED, the old version serves: {why}",
            p.service,
            p.commit.short(10)
        ),
        None => format!("push FAILED, the old version serves: {why}"),
    };
    for l in &found {
        line.push_str(&format!("\n{l}"));
    }
    line
}

/// One cycle: scan, push, pull. `Ok(None)`: nothing changed.
async fn cycle(
    config: Option<&Path>,
    ctx: &Context,
    via: &mut Via,
    args: &WatchArgs,
    branch: &str,
    (last, last_commit): (Option<&Tree>, Option<CommitId>),
    saved: Instant,
) -> Result<Option<(Tree, CommitId, Option<String>)>, Cycle> {
    let began = Instant::now();
    let tree = scan(&args.dir).await.map_err(Cycle::Refused)?;
    if last.map(Tree::id) == Some(tree.id()) {
        return Ok(None);
    }
    let changed = changed_paths(last, &tree);
    let pushed = match push_settled(ctx, &args.dir, branch, &tree).await {
        Ok(Pushed::Done(p)) => p,
        Ok(Pushed::Moved) => return Ok(None),
        // The content as it stands cannot be pushed (a broken `service.toml`,
        // say): shown like a failed build; the next save is the next cycle.
        Ok(Pushed::Failed(e)) => {
            let line = failed_line(args, &changed, None, &format!("{e:#}"));
            return Err(Cycle::Failed(tree, None, line));
        }
        Err(refused) => return Err(Cycle::Refused(refused)),
    };
    if Some(pushed.commit) == last_commit {
        // What the last cycle pushed, already serving: nothing to say.
        return Ok(Some((tree, pushed.commit, None)));
    }
    let service: ServiceName = pushed.service.clone();
    let pushed_at = Instant::now();
    let answer = via.pull(config, &service, branch).await;
    let serving = saved.elapsed();
    let summary = match answer {
        Ok(s) => s,
        Err(PullFailed::Refused(e)) => return Err(Cycle::Refused(e)),
        Err(PullFailed::Failed(why)) => {
            let line = failed_line(args, &changed, Some(&pushed), &why);
            return Err(Cycle::Failed(tree, Some(pushed.commit), line));
        }
    };
    let build_ms: u64 = summary
        .steps
        .iter()
        .filter(|s| matches!(s.step, wire::plan::Step::Build { .. }))
        .map(|s| s.millis)
        .sum();
    let line = if args.json {
        serde_json::json!({
            "service": service,
            "commit": pushed.commit.to_hex().to_string(),
            "ok": true,
            "changed": changed,
            "files": pushed.files,
            "blobs_sent": pushed.blobs_sent,
            "bytes_sent": pushed.bytes_sent,
            "build_ms": build_ms,
            "settle_ms": began.saturating_duration_since(saved).as_millis() as u64,
            "push_ms": pushed_at.saturating_duration_since(began).as_millis() as u64,
            "pull_ms": pushed_at.elapsed().as_millis() as u64,
            "steps": summary.steps.iter().map(|s| (s.step.kind().to_string(), s.millis)).collect::<std::collections::BTreeMap<_, _>>(),
            "save_to_serving_ms": serving.as_millis() as u64,
            "generation": summary.generation,
        })
        .to_string()
    } else {
        format!(
            "{service} {}: {} changed, {} B sent, build {build_ms} ms, save → serving {} ms",
            pushed.commit.short(10),
            in_words(&changed),
            pushed.bytes_sent,
            serving.as_millis()
        )
    };
    Ok(Some((tree, pushed.commit, Some(line))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cycle_names_the_paths_that_changed() {
        let entry = |path: &str, n: u8| {
            image_spec::TreeEntry::file(
                image_spec::RelPath::new(path).unwrap(),
                false,
                1,
                image_spec::BlobId::from_bytes([n; 32]),
            )
        };
        let old = Tree::new(vec![entry("a.py", 1), entry("b.py", 2)]).unwrap();
        let new = Tree::new(vec![entry("a.py", 1), entry("b.py", 3), entry("c.py", 4)]).unwrap();
        let changed = changed_paths(Some(&old), &new);
        assert_eq!(changed, ["b.py", "c.py"]);
        assert_eq!(in_words(&changed), "b.py, c.py");
        let first = changed_paths(None, &new);
        assert_eq!(first.len(), 3);
        let many: Vec<String> = (0..5).map(|i| format!("f{i}")).collect();
        assert_eq!(in_words(&many), "f0, f1, f2 and 2 more");
    }

    #[test]
    fn editors_temporary_files_are_told_apart() {
        for temp in [
            "a/.server.py.swp",
            "server.py~",
            ".#server.py",
            "#server.py#",
            "a/4913",
            "x.tmp",
            ".git/index",
        ] {
            assert!(is_editor_temp(Path::new(temp)), "{temp}");
        }
        for real in ["server.py", "src/main.rs", "service.toml", ".moltignore"] {
            assert!(!is_editor_temp(Path::new(real)), "{real}");
        }
    }
}
