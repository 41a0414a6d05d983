//! The Repository pages: every microservice with its branches, a branch's
//! commit log, one commit with its changes, and the changes between any two
//! commits of a microservice (what a plan's "old → new" links to).
//!
//! - The microservices and branches: `RepoClient::branches` (the repository's
//!   `ListBranches`), each head's commit from `RepoClient::commit`.
//! - A log: `RepoClient::log`, newest first, following first parents.
//! - A commit or a diff: both commits' trees (`RepoClient::tree`), compared
//!   here with `TreeDiff::between`, so a removed or changed file's old entry
//!   is at hand. For small text files the bytes of both sides are read into
//!   memory, verified (`RepoClient::read_blobs`), and compared line by line
//!   ([`text_diff`]); anything else is listed with its sizes only.
//!
//! Every page is a read: any logged-in person may open it, as they may list
//! images. Revisions in URLs are what `molt` takes: a branch name, or a full
//! or abbreviated commit id, resolved by the repository.

use std::collections::HashMap;

use askama::Template;
use axum::extract::{Path, Query, State};
use image_spec::{BranchName, Change, CommitId, Mode, ServiceName, Tree, TreeEntry};
use repo_client::RepoClient;
use similar::{ChangeTag, TextDiff};

use super::format::{When, bytes, short};
use super::{Layout, PageError, PageResult, page, principal, urlencode};
use crate::api::{ApiError, Caller, Shared};
use crate::deployment::now_ms;

/// The largest file (either side) whose text the diff shows.
pub const TEXT_DIFF_MAX: u64 = 64 * 1024;
/// The most files of one diff whose text is shown.
const TEXT_DIFF_FILES: usize = 50;
/// The most changed files one diff lists.
const LISTED_FILES: usize = 1000;
/// The most lines a text diff shows of one file.
const DIFF_LINES: usize = 2000;
/// Lines of context around each change.
const CONTEXT: usize = 3;
/// Commits a log shows unless asked for more, and the most it shows.
const LOG_DEFAULT: u32 = 50;
const LOG_MAX: u32 = 1000;

/// A commit, briefly.
pub struct CommitLine {
    /// The full id (for links).
    id: String,
    short: String,
    /// The message's first line.
    subject: String,
    author: String,
    when: When,
}

fn commit_line(id: CommitId, c: &image_spec::Commit, now: i64) -> CommitLine {
    CommitLine {
        id: id.to_hex(),
        short: short(&id),
        subject: c.message().lines().next().unwrap_or_default().to_owned(),
        author: c.author().to_owned(),
        when: When::new(c.time().as_unix_seconds() * 1000, now),
    }
}

fn service_name(s: &str) -> Result<ServiceName, PageError> {
    ServiceName::new(s).map_err(|e| PageError::Api(ApiError::bad("service", e.to_string())))
}

/// Resolves `rev` (a branch, or a full or abbreviated commit id) of `service`;
/// an unknown one is a 404 naming it, field `field`.
async fn resolve(
    repo: &RepoClient,
    service: &ServiceName,
    rev: &str,
    field: &str,
) -> Result<CommitId, PageError> {
    repo.resolve(service, rev.trim()).await.map_err(|e| {
        let mut e = crate::api::repo_error(e);
        e.field = Some(field.to_owned());
        PageError::Api(e)
    })
}

// ---------------------------------------------------------------------------
// Microservices and their branches

/// A branch and its head.
pub struct BranchLine {
    name: String,
    head: Option<CommitLine>,
    /// The head's id, when its commit could not be read.
    id: String,
}

/// A microservice and its branches.
pub struct ServiceBranches {
    name: String,
    branches: Vec<BranchLine>,
}

#[derive(Template)]
#[template(path = "repository.html")]
struct RepositoryPage {
    layout: Layout,
    services: Vec<ServiceBranches>,
}

/// `GET /repository`.
pub(crate) async fn services(State(api): Shared, caller: Caller) -> PageResult {
    let who = principal(&api, &caller, "/repository").await?;
    let repo = api.repo().await?;
    let heads = repo.branches(None).await.map_err(crate::api::repo_error)?;
    let now = now_ms();
    let mut services: Vec<ServiceBranches> = Vec::new();
    for h in heads {
        let line = BranchLine {
            name: h.branch.to_string(),
            head: repo
                .commit(h.head)
                .await
                .ok()
                .map(|c| commit_line(h.head, &c, now)),
            id: short(&h.head),
        };
        match services.last_mut() {
            Some(s) if s.name == h.service.as_str() => s.branches.push(line),
            _ => services.push(ServiceBranches {
                name: h.service.to_string(),
                branches: vec![line],
            }),
        }
    }
    page(&RepositoryPage {
        layout: Layout::new(&who, "repository"),
        services,
    })
}

// ---------------------------------------------------------------------------
// A branch's log

#[derive(Template)]
#[template(path = "repository_log.html")]
struct LogPage {
    layout: Layout,
    service: String,
    branch: String,
    branches: Vec<String>,
    commits: Vec<CommitLine>,
    /// The link to a longer log, when this one may be cut.
    more: Option<String>,
}

/// `GET /repository/{service}?branch=B&limit=N` (`main` unless another
/// branch is asked; the only branch when it has one).
pub(crate) async fn log(
    State(api): Shared,
    caller: Caller,
    Path(service): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> PageResult {
    let here = format!("/repository/{}", urlencode(&service));
    let who = principal(&api, &caller, &here).await?;
    let service = service_name(&service)?;
    let repo = api.repo().await?;
    let branches: Vec<String> = repo
        .branches(Some(&service))
        .await
        .map_err(crate::api::repo_error)?
        .into_iter()
        .map(|h| h.branch.to_string())
        .collect();
    if branches.is_empty() {
        return Err(ApiError::not_found(format!("no microservice named `{service}`")).into());
    }
    let branch = match q.get("branch").map(|b| b.trim()).filter(|b| !b.is_empty()) {
        Some(b) => b.to_owned(),
        None if branches.iter().any(|b| b == "main") => "main".to_owned(),
        None => branches[0].clone(),
    };
    let parsed = BranchName::new(&branch).map_err(|e| ApiError::bad("branch", e.to_string()))?;
    let limit = match q.get("limit") {
        None => LOG_DEFAULT,
        Some(l) => l
            .parse::<u32>()
            .ok()
            .filter(|l| (1..=LOG_MAX).contains(l))
            .ok_or_else(|| ApiError::bad("limit", format!("a number from 1 to {LOG_MAX}")))?,
    };
    let entries = repo
        .log(&service, &parsed, limit)
        .await
        .map_err(crate::api::repo_error)?;
    let now = now_ms();
    let more = (entries.len() == limit as usize && limit < LOG_MAX).then(|| {
        format!(
            "/repository/{}?branch={}&limit={}",
            urlencode(service.as_str()),
            urlencode(&branch),
            (limit * 4).min(LOG_MAX)
        )
    });
    page(&LogPage {
        layout: Layout::new(&who, "repository"),
        service: service.to_string(),
        branch,
        branches,
        commits: entries
            .iter()
            .map(|e| commit_line(e.id, &e.commit, now))
            .collect(),
        more,
    })
}

// ---------------------------------------------------------------------------
// Changes: one commit's, or between two

/// One line of a text diff.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiffLine {
    /// `add`, `del` or `ctx`.
    pub kind: &'static str,
    /// `+`, `-` or a space: the change as text, not only as colour.
    pub sign: char,
    /// Its number in the old file (none for an added line).
    pub old: Option<usize>,
    /// Its number in the new file (none for a removed line).
    pub new: Option<usize>,
    /// The line, without its end.
    pub text: String,
}

/// A run of changed lines with their context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hunk {
    /// `@@ -a,b +c,d @@`.
    pub header: String,
    /// Its lines.
    pub lines: Vec<DiffLine>,
}

/// The line diff of two texts, in hunks with [`CONTEXT`] lines around each
/// change; `None` when it has more than `max_lines` lines.
pub fn text_diff(old: &str, new: &str, max_lines: usize) -> Option<Vec<Hunk>> {
    let diff = TextDiff::from_lines(old, new);
    let mut hunks = Vec::new();
    let mut shown = 0;
    for group in diff.grouped_ops(CONTEXT) {
        let (Some(first), Some(last)) = (group.first(), group.last()) else {
            continue;
        };
        let (old_start, new_start) = (first.old_range().start, first.new_range().start);
        let old_len = last.old_range().end - old_start;
        let new_len = last.new_range().end - new_start;
        let mut lines = Vec::new();
        for op in &group {
            for change in diff.iter_changes(op) {
                let (kind, sign) = match change.tag() {
                    ChangeTag::Insert => ("add", '+'),
                    ChangeTag::Delete => ("del", '-'),
                    ChangeTag::Equal => ("ctx", ' '),
                };
                lines.push(DiffLine {
                    kind,
                    sign,
                    old: change.old_index().map(|i| i + 1),
                    new: change.new_index().map(|i| i + 1),
                    text: change.value().trim_end_matches(['\n', '\r']).to_owned(),
                });
            }
        }
        shown += lines.len();
        if shown > max_lines {
            return None;
        }
        // Unified diffs number an empty side from the line before it.
        let at = |start: usize, len: usize| if len == 0 { start } else { start + 1 };
        hunks.push(Hunk {
            header: format!(
                "@@ -{},{old_len} +{},{new_len} @@",
                at(old_start, old_len),
                at(new_start, new_len)
            ),
            lines,
        });
    }
    Some(hunks)
}

/// What a file's entry in the list shows of its content.
pub enum Content {
    /// Its text diff.
    Text(Vec<Hunk>),
    /// Sizes only, and why.
    Summary(&'static str),
}

/// One changed path.
pub struct FileChange {
    path: String,
    /// `added`, `modified`, `removed`, `mode`.
    kind: &'static str,
    /// Sizes (or link targets), old → new, as text.
    detail: String,
    content: Content,
}

#[derive(Template)]
#[template(path = "repository_changes.html")]
struct ChangesPage {
    layout: Layout,
    service: String,
    /// The commit shown (a commit's page), or the newer side of a diff.
    commit: Option<CommitView>,
    /// A diff's sides: the older and the newer commit.
    range: Option<(CommitLine, CommitLine)>,
    /// The commit changes are counted from (`None`: from nothing, the first
    /// commit of its history).
    base: Option<String>,
    files: Vec<FileChange>,
    /// Changed paths not listed.
    unlisted: usize,
    added: usize,
    modified: usize,
    removed: usize,
}

/// A commit's facts.
pub struct CommitView {
    line: CommitLine,
    message: String,
    tree: String,
    /// Each parent's full and short id.
    parents: Vec<(String, String)>,
}

/// `GET /repository/{service}/commits/{rev}`: a commit and what it changed
/// from its first parent.
pub(crate) async fn commit(
    State(api): Shared,
    caller: Caller,
    Path((service, rev)): Path<(String, String)>,
) -> PageResult {
    let here = format!(
        "/repository/{}/commits/{}",
        urlencode(&service),
        urlencode(&rev)
    );
    let who = principal(&api, &caller, &here).await?;
    let service = service_name(&service)?;
    let repo = api.repo().await?;
    let id = resolve(&repo, &service, &rev, "rev").await?;
    let c = repo.commit(id).await.map_err(crate::api::repo_error)?;
    let parent = c.parents().first().copied();
    let old = match parent {
        Some(p) => Some(repo.commit(p).await.map_err(crate::api::repo_error)?),
        None => None,
    };
    let changes = changes(&repo, old.as_ref().map(|o| o.tree()), c.tree()).await?;
    let now = now_ms();
    page(&changes_page(
        &who,
        &service,
        Some(CommitView {
            line: commit_line(id, &c, now),
            message: c.message().to_owned(),
            tree: c.tree().to_hex(),
            parents: c.parents().iter().map(|p| (p.to_hex(), short(p))).collect(),
        }),
        None,
        parent.map(|p| p.to_hex()),
        changes,
    ))
}

/// `GET /repository/{service}/diff?from=A&to=B`: what changed from `A` to `B`.
pub(crate) async fn diff(
    State(api): Shared,
    caller: Caller,
    Path(service): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> PageResult {
    let field = |name: &str| q.get(name).map(String::as_str).unwrap_or_default();
    let here = format!(
        "/repository/{}/diff?from={}&to={}",
        urlencode(&service),
        urlencode(field("from")),
        urlencode(field("to"))
    );
    let who = principal(&api, &caller, &here).await?;
    let service = service_name(&service)?;
    for name in ["from", "to"] {
        if field(name).trim().is_empty() {
            return Err(ApiError::bad(
                name,
                format!("`{name}` is missing: give a branch or a commit id"),
            )
            .into());
        }
    }
    let repo = api.repo().await?;
    let from = resolve(&repo, &service, field("from"), "from").await?;
    let to = resolve(&repo, &service, field("to"), "to").await?;
    let (a, b) = (
        repo.commit(from).await.map_err(crate::api::repo_error)?,
        repo.commit(to).await.map_err(crate::api::repo_error)?,
    );
    let changes = changes(&repo, Some(a.tree()), b.tree()).await?;
    let now = now_ms();
    page(&changes_page(
        &who,
        &service,
        None,
        Some((commit_line(from, &a, now), commit_line(to, &b, now))),
        Some(from.to_hex()),
        changes,
    ))
}

fn changes_page(
    who: &crate::auth::Principal,
    service: &ServiceName,
    commit: Option<CommitView>,
    range: Option<(CommitLine, CommitLine)>,
    base: Option<String>,
    (files, total): (Vec<FileChange>, usize),
) -> ChangesPage {
    let count = |k: &str| files.iter().filter(|f| f.kind == k).count();
    ChangesPage {
        layout: Layout::new(who, "repository"),
        service: service.to_string(),
        commit,
        range,
        base,
        added: count("added"),
        modified: count("modified") + count("mode"),
        removed: count("removed"),
        unlisted: total - files.len(),
        files,
    }
}

/// The changes from the tree `old` (`None`: nothing) to `new`, with the text
/// diffs of small text files; and how many paths changed in all.
async fn changes(
    repo: &RepoClient,
    old: Option<image_spec::TreeId>,
    new: image_spec::TreeId,
) -> Result<(Vec<FileChange>, usize), PageError> {
    let old = match old {
        Some(t) => repo.tree(t).await.map_err(crate::api::repo_error)?,
        None => Tree::empty(),
    };
    let new = repo.tree(new).await.map_err(crate::api::repo_error)?;
    let diff = image_spec::TreeDiff::between(&old, &new);
    let total = diff.changes().len();
    let listed: Vec<(Option<&TreeEntry>, Option<&TreeEntry>, &Change)> = diff
        .changes()
        .iter()
        .take(LISTED_FILES)
        .map(|c| (old.get(c.path()), new.get(c.path()), c))
        .collect();
    // The blobs of the small files whose text is shown, both sides.
    let mut wanted = Vec::new();
    let mut shown = 0;
    for (before, after, change) in &listed {
        if shown == TEXT_DIFF_FILES || matches!(change, Change::ModeChanged { .. }) {
            continue;
        }
        if text_candidate(*before) && text_candidate(*after) {
            shown += 1;
            wanted.extend(before.iter().chain(after.iter()).map(|e| e.blob()));
        }
    }
    wanted.sort();
    wanted.dedup();
    let read = repo
        .read_blobs(&wanted, TEXT_DIFF_MAX)
        .await
        .map_err(crate::api::repo_error)?;
    let texts: HashMap<image_spec::BlobId, Vec<u8>> = wanted.into_iter().zip(read).collect();
    let files = listed
        .into_iter()
        .map(|(before, after, change)| file_change(before, after, change, &texts))
        .collect();
    Ok((files, total))
}

/// Is this side of a change a file small enough to show as text (or absent)?
fn text_candidate(entry: Option<&TreeEntry>) -> bool {
    entry.is_none_or(|e| e.mode().is_file() && e.size() <= TEXT_DIFF_MAX)
}

/// The text of a side: `Some("")` for an absent one, `None` if it is not
/// text (not UTF-8, or holds a NUL) or was not read.
fn text_of<'a>(
    entry: Option<&TreeEntry>,
    texts: &'a HashMap<image_spec::BlobId, Vec<u8>>,
) -> Option<&'a str> {
    let Some(e) = entry else { return Some("") };
    let bytes = texts.get(&e.blob())?;
    if bytes.contains(&0) {
        return None;
    }
    std::str::from_utf8(bytes).ok()
}

fn side(e: &TreeEntry) -> String {
    match e.link_target() {
        Some(t) => format!("link to {t}"),
        None => bytes(e.size()),
    }
}

fn file_change(
    before: Option<&TreeEntry>,
    after: Option<&TreeEntry>,
    change: &Change,
    texts: &HashMap<image_spec::BlobId, Vec<u8>>,
) -> FileChange {
    let path = change.path().to_string();
    let (kind, detail) = match (change, before, after) {
        (Change::ModeChanged { mode, .. }, _, _) => (
            "mode",
            match mode {
                Mode::Executable => "made executable".to_owned(),
                _ => "no longer executable".to_owned(),
            },
        ),
        (Change::Added(_), _, Some(a)) => ("added", side(a)),
        (Change::Removed(_), Some(b), _) => ("removed", side(b)),
        (_, Some(b), Some(a)) => ("modified", format!("{} → {}", side(b), side(a))),
        (Change::Added(_), _, None) => ("added", String::new()),
        (Change::Removed(_), None, _) => ("removed", String::new()),
        (_, _, _) => ("modified", String::new()),
    };
    let content = if kind == "mode" {
        Content::Summary("same content")
    } else if !(text_candidate(before) && text_candidate(after)) {
        Content::Summary("not shown: larger than 64 KiB, or a link")
    } else {
        match (text_of(before, texts), text_of(after, texts)) {
            (Some(old), Some(new)) => match text_diff(old, new, DIFF_LINES) {
                Some(hunks) => Content::Text(hunks),
                None => Content::Summary("not shown: the diff is too long"),
            },
            _ if [before, after]
                .iter()
                .flatten()
                .any(|e| !texts.contains_key(&e.blob())) =>
            {
                Content::Summary("not shown: too many files to show them all")
            }
            _ => Content::Summary("not shown: binary"),
        }
    };
    FileChange {
        path,
        kind,
        detail,
        content,
    }
}

/// The link to the changes from `from` to `to` of `service` (either may be
/// absent: a microservice added or removed).
pub fn changes_link(
    service: &ServiceName,
    from: Option<&CommitId>,
    to: Option<&CommitId>,
) -> Option<String> {
    let s = urlencode(service.as_str());
    match (from, to) {
        (Some(a), Some(b)) if a != b => Some(format!(
            "/repository/{s}/diff?from={}&to={}",
            a.to_hex(),
            b.to_hex()
        )),
        (_, Some(c)) | (Some(c), None) => Some(format!("/repository/{s}/commits/{}", c.to_hex())),
        (None, None) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rendered(hunks: &[Hunk]) -> String {
        let mut out = String::new();
        for h in hunks {
            out.push_str(&h.header);
            out.push('\n');
            for l in &h.lines {
                out.push(l.sign);
                out.push_str(&l.text);
                out.push('\n');
            }
        }
        out
    }

    #[test]
    fn a_text_diff_is_unified_hunks_with_line_numbers() {
        let old: String = (1..=20).map(|i| format!("line {i}\n")).collect();
        let new = old
            .replace("line 5\n", "line five\n")
            .replace("line 18\n", "");
        let hunks = text_diff(&old, &new, 100).unwrap();
        assert_eq!(
            rendered(&hunks),
            "@@ -2,7 +2,7 @@\n line 2\n line 3\n line 4\n-line 5\n+line five\n line 6\n line 7\n line 8\n\
             @@ -15,6 +15,5 @@\n line 15\n line 16\n line 17\n-line 18\n line 19\n line 20\n"
        );
        let five = &hunks[0].lines[3..5];
        assert_eq!((five[0].old, five[0].new), (Some(5), None));
        assert_eq!((five[1].old, five[1].new), (None, Some(5)));
        assert_eq!(five[1].kind, "add");
    }

    #[test]
    fn a_new_file_is_all_additions_and_an_equal_one_has_no_hunk() {
        let hunks = text_diff("", "a\nb\n", 100).unwrap();
        assert_eq!(rendered(&hunks), "@@ -0,0 +1,2 @@\n+a\n+b\n");
        assert!(text_diff("same\n", "same\n", 100).unwrap().is_empty());
        // Too long to show: none, not a cut diff.
        let long: String = (0..50).map(|i| format!("{i}\n")).collect();
        assert!(text_diff("", &long, 49).is_none());
        assert!(text_diff("", &long, 50).is_some());
    }

    fn file(path: &str, bytes: &[u8]) -> TreeEntry {
        TreeEntry::file(
            image_spec::RelPath::new(path).unwrap(),
            false,
            bytes.len() as u64,
            image_spec::BlobId::of(bytes),
        )
    }

    fn texts(of: &[&[u8]]) -> HashMap<image_spec::BlobId, Vec<u8>> {
        of.iter()
            .map(|b| (image_spec::BlobId::of(b), b.to_vec()))
            .collect()
    }

    fn summary(c: &FileChange) -> &'static str {
        match c.content {
            Content::Summary(why) => why,
            Content::Text(_) => panic!("{} shown as text", c.path),
        }
    }

    #[test]
    fn small_text_files_are_diffed_and_the_rest_summarised() {
        let (old, new) = (file("a.txt", b"x\n"), file("a.txt", b"y\n"));
        let modified = Change::Modified(new.clone());
        let c = file_change(Some(&old), Some(&new), &modified, &texts(&[b"x\n", b"y\n"]));
        assert_eq!((c.kind, c.detail.as_str()), ("modified", "2 B → 2 B"));
        let Content::Text(hunks) = &c.content else {
            panic!("not text")
        };
        assert_eq!(hunks[0].lines.len(), 2);

        // A NUL byte: binary, whatever else it holds.
        let bin = file("a.bin", b"\0ELF");
        let added = Change::Added(bin.clone());
        let c = file_change(None, Some(&bin), &added, &texts(&[b"\0ELF"]));
        assert_eq!((c.kind, summary(&c)), ("added", "not shown: binary"));

        // Larger than what is read: never fetched, said so.
        let big = TreeEntry::file(
            image_spec::RelPath::new("big.txt").unwrap(),
            false,
            TEXT_DIFF_MAX + 1,
            image_spec::BlobId::of(b"big"),
        );
        assert!(!text_candidate(Some(&big)));
        let c = file_change(
            Some(&old),
            Some(&big),
            &Change::Modified(big.clone()),
            &texts(&[]),
        );
        assert!(summary(&c).contains("larger than"), "{}", summary(&c));

        // A small file left unread (past the files shown): not called binary.
        let c = file_change(Some(&old), Some(&new), &modified, &texts(&[b"x\n"]));
        assert!(summary(&c).contains("too many files"), "{}", summary(&c));

        let removed = Change::Removed(old.path().clone());
        let c = file_change(Some(&old), None, &removed, &texts(&[b"x\n"]));
        assert_eq!(c.kind, "removed");
        assert!(matches!(c.content, Content::Text(_)));
    }

    #[test]
    fn changes_link_to_a_diff_or_to_the_one_commit() {
        let svc = ServiceName::new("orders").unwrap();
        let (a, b) = (CommitId::from_bytes([1; 32]), CommitId::from_bytes([2; 32]));
        assert_eq!(
            changes_link(&svc, Some(&a), Some(&b)).unwrap(),
            format!(
                "/repository/orders/diff?from={}&to={}",
                a.to_hex(),
                b.to_hex()
            )
        );
        assert_eq!(
            changes_link(&svc, None, Some(&b)).unwrap(),
            format!("/repository/orders/commits/{}", b.to_hex())
        );
        assert_eq!(
            changes_link(&svc, Some(&a), Some(&a)).unwrap(),
            format!("/repository/orders/commits/{}", a.to_hex())
        );
        assert_eq!(changes_link(&svc, None, None), None);
    }
}
