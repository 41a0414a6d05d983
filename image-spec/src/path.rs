//! Paths that cannot leave their root.
//!
//! [`RelPath`] names a file inside a service's tree. It is parsed once, here, and
//! joined onto a root it cannot leave *lexically*: it is valid UTF-8, `/`-separated,
//! relative, has no empty, `.` or `..` component, no NUL, no other ASCII control
//! character and no backslash, and stays within [`RelPath::MAX_LEN`] bytes,
//! [`RelPath::MAX_DEPTH`] components and [`RelPath::MAX_COMPONENT_LEN`] bytes per
//! component. On disk, a directory on the way may still be a symlink (a build output,
//! say): code that writes under a root must not follow symlinks in the middle of a
//! path (`openat` with `O_NOFOLLOW` per component, or `RESOLVE_BENEATH`).
//!
//! Paths compare byte for byte. Trees are meant for case-sensitive filesystems: on a
//! case-insensitive one, `A` and `a` name the same file and the symlink checks below
//! could be bypassed by a link that differs only in case.
//!
//! [`LinkTarget`] is what a symlink in a tree points at. It may use `..` (a link to a
//! sibling directory is ordinary), but [`LinkTarget::resolve_from`] decides whether,
//! read from the link's own directory, it stays inside the root. Whether a target
//! passes *through* another symlink is a property of the whole tree and is checked
//! in [`crate::tree`].

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// How many characters of a long path's start, and of its end, an error message
/// shows (see [`ShownPath`]).
pub const SHOWN_CHARS: usize = 60;

/// A path as an error message shows it, backquoted: whole when it is short;
/// otherwise its first and last [`SHOWN_CHARS`] characters with `…` between
/// them, followed by its length — `` `d/d/d…d/d/f` (8203 bytes) ``. Control
/// characters are escaped (`\n`, `\u{1b}`), so a file name cannot forge a log
/// line. Every error of this crate that prints a path prints it through this,
/// so a path of kilobytes never floods a terminal.
#[derive(Debug, Clone)]
pub struct ShownPath<'a>(std::borrow::Cow<'a, str>);

impl<'a> ShownPath<'a> {
    /// A path given as text.
    pub fn new(path: &'a str) -> Self {
        Self(std::borrow::Cow::Borrowed(path))
    }

    /// A path on disk (not UTF-8 parts are shown as `�`).
    pub fn of(path: &'a Path) -> Self {
        Self(path.to_string_lossy())
    }
}

impl fmt::Display for ShownPath<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fn escaped(f: &mut fmt::Formatter<'_>, chars: impl Iterator<Item = char>) -> fmt::Result {
            for c in chars {
                if c.is_control() {
                    write!(f, "{}", c.escape_default())?;
                } else {
                    fmt::Write::write_char(f, c)?;
                }
            }
            Ok(())
        }
        let path = &*self.0;
        let count = path.chars().count();
        f.write_str("`")?;
        if count <= 2 * SHOWN_CHARS + 1 {
            escaped(f, path.chars())?;
            return f.write_str("`");
        }
        escaped(f, path.chars().take(SHOWN_CHARS))?;
        f.write_str("…")?;
        escaped(f, path.chars().skip(count - SHOWN_CHARS))?;
        write!(f, "` ({} bytes)", path.len())
    }
}

/// Why a string is not a valid [`RelPath`] or [`LinkTarget`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// The path is the empty string.
    #[error("path is empty")]
    Empty,
    /// The path starts with `/`.
    #[error(
        "path {} is absolute; it must be relative to the service root",
        ShownPath::new(.0)
    )]
    Absolute(String),
    /// Two slashes in a row, or a leading or trailing slash.
    #[error("path {} has an empty component", ShownPath::new(.0))]
    EmptyComponent(String),
    /// A `.` component.
    #[error("path {} has a `.` component", ShownPath::new(.0))]
    Dot(String),
    /// A `..` component: it would escape the root.
    #[error(
        "path {} has a `..` component and could escape the service root",
        ShownPath::new(.0)
    )]
    DotDot(String),
    /// A NUL byte.
    #[error("path {} contains a NUL byte", ShownPath::new(.0))]
    Nul(String),
    /// A control character (U+0001–U+001F or U+007F): a newline or an escape in a
    /// file name can forge log lines and terminal output.
    #[error("path {} contains a control character", ShownPath::new(.0))]
    Control(String),
    /// A backslash, which some platforms read as a separator.
    #[error("path {} contains a backslash", ShownPath::new(.0))]
    Backslash(String),
    /// The path is longer than allowed.
    #[error(
        "path {} is over the limit of {max} bytes",
        ShownPath::new(.path)
    )]
    TooLong {
        /// The path.
        path: String,
        /// Its length in bytes.
        len: usize,
        /// The limit in bytes.
        max: usize,
    },
    /// The path has too many components.
    #[error(
        "path {} is {depth} components deep; the limit is {max}",
        ShownPath::new(.path)
    )]
    TooDeep {
        /// The path.
        path: String,
        /// Its number of components.
        depth: usize,
        /// The limit.
        max: usize,
    },
    /// One component is longer than a file name may be.
    #[error(
        "path {} has a component of {len} bytes; the limit is {max}",
        ShownPath::new(.path)
    )]
    ComponentTooLong {
        /// The path.
        path: String,
        /// Length in bytes of the longest component.
        len: usize,
        /// The limit in bytes.
        max: usize,
    },
    /// The path is not valid UTF-8 (held with `�` for what is not).
    #[error("path {} is not valid UTF-8", ShownPath::new(.0))]
    NotUtf8(String),
    /// A symlink's target passes through another symlink (`a -> l/..` where `l` is a
    /// link): what that resolves to depends on the other link, so it is refused.
    #[error(
        "symlink {} points at {}, which passes through the symlink {}",
        ShownPath::new(.link),
        ShownPath::new(.target),
        ShownPath::new(.through)
    )]
    LinkThroughLink {
        /// The symlink's own path.
        link: String,
        /// Its target.
        target: String,
        /// The symlink it passes through.
        through: String,
    },
    /// A symlink's target, read from the link's directory, leaves the root.
    #[error(
        "symlink {} points at {}, which is outside the service root",
        ShownPath::new(.link),
        ShownPath::new(.target)
    )]
    LinkEscapes {
        /// The symlink's own path.
        link: String,
        /// Its target.
        target: String,
    },
}

impl PathError {
    /// The symlink a link error is about.
    pub fn link(&self) -> Option<&str> {
        match self {
            PathError::LinkEscapes { link, .. } | PathError::LinkThroughLink { link, .. } => {
                Some(link)
            }
            _ => None,
        }
    }
}

/// Checks what RelPath and LinkTarget share: non-empty, relative, no NUL, no
/// backslash, bounded size; returns the components.
fn check_common(s: &str) -> Result<Vec<&str>, PathError> {
    if s.is_empty() {
        return Err(PathError::Empty);
    }
    if s.contains('\0') {
        return Err(PathError::Nul(s.to_owned()));
    }
    if s.chars().any(|c| c.is_ascii_control()) {
        return Err(PathError::Control(s.to_owned()));
    }
    if s.len() > RelPath::MAX_LEN {
        return Err(PathError::TooLong {
            path: s.to_owned(),
            len: s.len(),
            max: RelPath::MAX_LEN,
        });
    }
    if s.starts_with('/') {
        return Err(PathError::Absolute(s.to_owned()));
    }
    if s.contains('\\') {
        return Err(PathError::Backslash(s.to_owned()));
    }
    let parts: Vec<&str> = s.split('/').collect();
    if parts.len() > RelPath::MAX_DEPTH {
        return Err(PathError::TooDeep {
            path: s.to_owned(),
            depth: parts.len(),
            max: RelPath::MAX_DEPTH,
        });
    }
    if parts.iter().any(|p| p.is_empty()) {
        return Err(PathError::EmptyComponent(s.to_owned()));
    }
    if let Some(long) = parts.iter().map(|p| p.len()).max()
        && long > RelPath::MAX_COMPONENT_LEN
    {
        return Err(PathError::ComponentTooLong {
            path: s.to_owned(),
            len: long,
            max: RelPath::MAX_COMPONENT_LEN,
        });
    }
    Ok(parts)
}

/// A relative path inside a service's tree that cannot escape it (see the module docs).
///
/// Ordered by its UTF-8 bytes, which is the order of entries in a tree.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct RelPath(String);

impl RelPath {
    /// Longest accepted path, in bytes.
    pub const MAX_LEN: usize = 1024;
    /// Most components accepted.
    pub const MAX_DEPTH: usize = 64;
    /// Longest accepted component, in bytes (Linux's `NAME_MAX`).
    pub const MAX_COMPONENT_LEN: usize = 255;

    /// Parses `s`.
    pub fn new(s: &str) -> Result<Self, PathError> {
        for part in check_common(s)? {
            match part {
                "." => return Err(PathError::Dot(s.to_owned())),
                ".." => return Err(PathError::DotDot(s.to_owned())),
                _ => {}
            }
        }
        Ok(Self(s.to_owned()))
    }

    /// Parses a platform path relative to some root, e.g. from a directory walk.
    pub fn from_path(p: &Path) -> Result<Self, PathError> {
        let s = p
            .to_str()
            .ok_or_else(|| PathError::NotUtf8(p.to_string_lossy().into_owned()))?;
        Self::new(s)
    }

    /// The path as a `/`-separated string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Its components, first to last.
    pub fn components(&self) -> impl Iterator<Item = &str> {
        self.0.split('/')
    }

    /// The number of components.
    pub fn depth(&self) -> usize {
        self.components().count()
    }

    /// The last component.
    pub fn file_name(&self) -> &str {
        self.0.rsplit('/').next().unwrap_or(&self.0)
    }

    /// The directory holding this path, or `None` at the root.
    pub fn parent(&self) -> Option<RelPath> {
        self.0.rfind('/').map(|i| RelPath(self.0[..i].to_owned()))
    }

    /// Every proper ancestor directory, shortest first (`a`, `a/b` for `a/b/c`).
    pub fn ancestors(&self) -> impl Iterator<Item = &str> {
        self.0.match_indices('/').map(move |(i, _)| &self.0[..i])
    }

    /// Is `self` a proper ancestor directory of `other`?
    pub fn is_ancestor_of(&self, other: &RelPath) -> bool {
        other.0.len() > self.0.len()
            && other.0.starts_with(&self.0)
            && other.0.as_bytes()[self.0.len()] == b'/'
    }

    /// This path under `root`. Safe by construction: it cannot leave `root` lexically.
    pub fn under(&self, root: &Path) -> PathBuf {
        let mut out = root.to_path_buf();
        out.extend(self.components());
        out
    }
}

impl FromStr for RelPath {
    type Err = PathError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl TryFrom<String> for RelPath {
    type Error = PathError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::new(&s)
    }
}

impl From<RelPath> for String {
    fn from(p: RelPath) -> String {
        p.0
    }
}

impl fmt::Display for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

/// What a symlink points at: a relative path that may use `.` and `..`.
///
/// On its own it is only well-formed; [`resolve_from`](Self::resolve_from) decides
/// whether it stays inside the root when read from a given link.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct LinkTarget(String);

impl LinkTarget {
    /// Parses `s`: non-empty, relative, no NUL, no backslash, no empty component,
    /// bounded like a [`RelPath`]. One trailing `/` is allowed (`ln -s dir/ link`).
    pub fn new(s: &str) -> Result<Self, PathError> {
        check_common(Self::trimmed(s))?;
        Ok(Self(s.to_owned()))
    }

    /// `s` without one trailing slash, if that leaves something.
    fn trimmed(s: &str) -> &str {
        match s.strip_suffix('/') {
            Some(t) if !t.is_empty() => t,
            _ => s,
        }
    }

    /// The target as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Resolves the target lexically from the directory holding `link`.
    ///
    /// Returns the components of the path it names inside the root (empty: the root
    /// itself), or [`PathError::LinkEscapes`] if a `..` climbs above the root.
    pub fn resolve_from(&self, link: &RelPath) -> Result<Vec<String>, PathError> {
        self.resolve_within(link, |_| false)
    }

    /// Like [`resolve_from`](Self::resolve_from), and also refuses a target that walks
    /// through a path for which `is_link` is true before its last component. A tree
    /// passes its own symlinks here, so that a chain of links, each lexically inside
    /// the root, cannot combine into one that leaves it.
    pub fn resolve_within(
        &self,
        link: &RelPath,
        is_link: impl Fn(&str) -> bool,
    ) -> Result<Vec<String>, PathError> {
        // `here` is the resolved directory so far, `/`-joined; `ends[i]` is where its
        // first i+1 components end, so `..` pops in O(1) and nothing is re-joined.
        let mut here = String::new();
        let mut ends: Vec<usize> = Vec::new();
        let push = |here: &mut String, ends: &mut Vec<usize>, name: &str| {
            if !here.is_empty() {
                here.push('/');
            }
            here.push_str(name);
            ends.push(here.len());
        };
        if let Some(dir) = link.parent() {
            for part in dir.components() {
                push(&mut here, &mut ends, part);
            }
        }
        for part in Self::trimmed(&self.0).split('/') {
            if !here.is_empty() && is_link(&here) {
                return Err(PathError::LinkThroughLink {
                    link: link.to_string(),
                    target: self.0.clone(),
                    through: here,
                });
            }
            match part {
                "." => {}
                ".." => {
                    if ends.pop().is_none() {
                        return Err(PathError::LinkEscapes {
                            link: link.to_string(),
                            target: self.0.clone(),
                        });
                    }
                    // Back to the end of the previous component (or the root).
                    let keep = ends.last().copied().unwrap_or(0);
                    here.truncate(keep);
                }
                name => push(&mut here, &mut ends, name),
            }
        }
        Ok(if here.is_empty() {
            Vec::new()
        } else {
            here.split('/').map(str::to_owned).collect()
        })
    }
}

impl TryFrom<String> for LinkTarget {
    type Error = PathError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::new(&s)
    }
}

impl From<LinkTarget> for String {
    fn from(p: LinkTarget) -> String {
        p.0
    }
}

impl fmt::Display for LinkTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for LinkTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_paths() {
        for ok in [
            "a",
            "a/b/c.txt",
            ".moltignore",
            "..hidden",
            "a/.../b",
            "ünï/cødé ✓",
            "x y",
        ] {
            let p = RelPath::new(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
            assert_eq!(p.as_str(), ok);
        }
    }

    #[test]
    fn rejects_escapes_with_the_right_error() {
        type Check = fn(&PathError) -> bool;
        let cases: &[(&str, Check)] = &[
            ("", |e| matches!(e, PathError::Empty)),
            ("/etc/passwd", |e| matches!(e, PathError::Absolute(_))),
            ("a//b", |e| matches!(e, PathError::EmptyComponent(_))),
            ("a/", |e| matches!(e, PathError::EmptyComponent(_))),
            ("./a", |e| matches!(e, PathError::Dot(_))),
            ("a/..", |e| matches!(e, PathError::DotDot(_))),
            ("../a", |e| matches!(e, PathError::DotDot(_))),
            ("a\0b", |e| matches!(e, PathError::Nul(_))),
            ("a\\..\\b", |e| matches!(e, PathError::Backslash(_))),
            ("evil\nINFO forged", |e| matches!(e, PathError::Control(_))),
            ("\u{1b}[31mred", |e| matches!(e, PathError::Control(_))),
            ("del\u{7f}", |e| matches!(e, PathError::Control(_))),
        ];
        for (input, check) in cases {
            let err = RelPath::new(input).unwrap_err();
            assert!(check(&err), "{input:?} gave {err:?}");
        }
    }

    #[test]
    fn enforces_bounds() {
        let name = "n".repeat(RelPath::MAX_COMPONENT_LEN);
        assert!(RelPath::new(&name).is_ok());
        let e = RelPath::new(&format!("{name}n")).unwrap_err();
        assert!(matches!(e, PathError::ComponentTooLong { len: 256, .. }));
        let deep = vec!["d"; RelPath::MAX_DEPTH].join("/");
        assert!(RelPath::new(&deep).is_ok());
        let e = RelPath::new(&format!("{deep}/d")).unwrap_err();
        assert!(matches!(e, PathError::TooDeep { depth: 65, .. }));
        let long = vec!["x".repeat(200); 6].join("/");
        assert!(matches!(
            RelPath::new(&long).unwrap_err(),
            PathError::TooLong { .. }
        ));
    }

    #[test]
    fn long_paths_are_shown_by_their_ends_and_length() {
        // Short: whole, backquoted.
        assert_eq!(ShownPath::new("a/b").to_string(), "`a/b`");
        let edge = "é".repeat(2 * SHOWN_CHARS + 1);
        assert_eq!(ShownPath::new(&edge).to_string(), format!("`{edge}`"));
        // Long: the first and last SHOWN_CHARS characters, and the length.
        let deep = format!("{}/file.txt", vec!["dir"; 2000].join("/"));
        let shown = ShownPath::new(&deep).to_string();
        let head: String = deep.chars().take(SHOWN_CHARS).collect();
        let tail: String = deep.chars().skip(deep.len() - SHOWN_CHARS).collect();
        assert_eq!(shown, format!("`{head}…{tail}` ({} bytes)", deep.len()));
        assert!(shown.ends_with("/dir/file.txt` (8008 bytes)"), "{shown}");
        // Multi-byte characters are never cut in half.
        let wide = "ä".repeat(500);
        let shown = ShownPath::new(&wide).to_string();
        assert_eq!(shown.matches('ä').count(), 2 * SHOWN_CHARS, "{shown}");
        assert!(shown.ends_with("(1000 bytes)"), "{shown}");
        // Control characters cannot reach a terminal or a log as they are.
        assert_eq!(
            ShownPath::new("evil\nINFO \u{1b}[31m").to_string(),
            "`evil\\nINFO \\u{1b}[31m`"
        );
        // Errors print paths through it.
        let long = vec!["x".repeat(200); 6].join("/");
        let e = RelPath::new(&long).unwrap_err().to_string();
        assert!(e.len() < 2 * SHOWN_CHARS + 80, "{e}");
        assert!(
            e.contains("(1205 bytes) is over the limit of 1024 bytes"),
            "{e}"
        );
        let e = RelPath::new(&format!("{long}\n")).unwrap_err().to_string();
        assert!(!e.contains('\n') && e.len() < 2 * SHOWN_CHARS + 80, "{e}");
    }

    #[test]
    fn structure_helpers() {
        let p = RelPath::new("a/b/c").unwrap();
        assert_eq!(p.file_name(), "c");
        assert_eq!(p.parent().unwrap().as_str(), "a/b");
        assert_eq!(p.ancestors().collect::<Vec<_>>(), ["a", "a/b"]);
        assert_eq!(p.depth(), 3);
        let a = RelPath::new("a").unwrap();
        assert!(a.is_ancestor_of(&p));
        assert!(!RelPath::new("a/b/c").unwrap().is_ancestor_of(&p));
        assert!(!a.is_ancestor_of(&RelPath::new("ab/c").unwrap()));
        assert_eq!(p.under(Path::new("/r")), PathBuf::from("/r/a/b/c"));
        assert!(RelPath::new("top").unwrap().parent().is_none());
    }

    #[test]
    fn link_targets_resolve_from_the_link_directory() {
        let link = RelPath::new("a/b/link").unwrap();
        let t = LinkTarget::new("../c/./d").unwrap();
        assert_eq!(t.resolve_from(&link).unwrap(), ["a", "c", "d"]);
        let t = LinkTarget::new("../..").unwrap();
        assert!(t.resolve_from(&link).unwrap().is_empty());
        let t = LinkTarget::new("../../../etc").unwrap();
        assert!(matches!(
            t.resolve_from(&link),
            Err(PathError::LinkEscapes { .. })
        ));
        // Climbing out and back in still escapes on the way.
        let top = RelPath::new("link").unwrap();
        let t = LinkTarget::new("../link-dir/x").unwrap();
        assert!(t.resolve_from(&top).is_err());
        assert!(LinkTarget::new("/etc/passwd").is_err());
        // Walking through another link is refused, even when `..` undoes it lexically.
        let y = RelPath::new("y").unwrap();
        let t = LinkTarget::new("x/l1/../f").unwrap();
        assert_eq!(t.resolve_from(&y).unwrap(), ["x", "f"]);
        assert!(matches!(
            t.resolve_within(&y, |p| p == "x/l1"),
            Err(PathError::LinkThroughLink { through, .. }) if through == "x/l1"
        ));
        // Landing on a link is fine: that link is checked on its own.
        let t = LinkTarget::new("x/l1").unwrap();
        assert!(t.resolve_within(&y, |p| p == "x/l1").is_ok());
        assert!(LinkTarget::new("a\\b").is_err());
        // One trailing slash is how `ln -s dir/ link` writes it.
        let t = LinkTarget::new("../c/").unwrap();
        assert_eq!(t.as_str(), "../c/");
        assert_eq!(t.resolve_from(&link).unwrap(), ["a", "c"]);
        assert!(LinkTarget::new("c//").is_err());
        assert!(LinkTarget::new("/").is_err());
    }

    #[test]
    fn serde_parses_instead_of_trusting() {
        use serde::de::value::{Error, StrDeserializer};
        let p = RelPath::deserialize(StrDeserializer::<Error>::new("../x"));
        assert!(p.is_err());
        let p = RelPath::deserialize(StrDeserializer::<Error>::new("a/b")).unwrap();
        assert_eq!(p.as_str(), "a/b");
    }
}
