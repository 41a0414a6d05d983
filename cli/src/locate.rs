//! `file:line:col` for a failed build's error lines, so an editor (or a
//! terminal) can jump to them.
//!
//! A build runs in the instance's release directory, so the paths its output
//! names are that directory's (absolute, or relative to it). Each is mapped
//! back to the file of the watched directory with the same relative path (the
//! longest tail of its components that names a file there); a path that maps
//! to no file there (the standard library, a dependency) is left out. Two
//! shapes are read: `PATH:LINE:COL` anywhere in a line (rustc's `--> `, gcc,
//! clang, go, tsc, eslint's unix format), and Python's `File "PATH", line N`
//! with its caret line for the column.

use std::path::{Component, Path, PathBuf};

/// A place in a file of the watched directory, and what is wrong there.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub(crate) struct Location {
    /// The file, in the watched directory.
    pub(crate) file: PathBuf,
    /// Its line, from 1.
    pub(crate) line: u32,
    /// Its column, from 1.
    pub(crate) col: u32,
    /// The error's message, as the build said it.
    pub(crate) message: String,
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file.display(),
            self.line,
            self.col,
            self.message
        )
    }
}

/// The file of `dir` that `path` (as a build in another directory named it)
/// is, if any.
fn in_dir(path: &str, dir: &Path) -> Option<PathBuf> {
    let parts: Vec<&std::ffi::OsStr> = Path::new(path)
        .components()
        .filter_map(|c| match c {
            Component::Normal(p) => Some(p),
            _ => None,
        })
        .collect();
    (0..parts.len()).find_map(|i| {
        let candidate = parts[i..].iter().fold(dir.to_owned(), |p, c| p.join(c));
        candidate.is_file().then_some(candidate)
    })
}

/// `PATH:LINE:COL` at the start of `token` (a trailing `:` or `,` allowed).
fn path_line_col(token: &str) -> Option<(&str, u32, u32)> {
    let token = token.trim_end_matches([':', ',']);
    let (rest, col) = token.rsplit_once(':')?;
    let (path, line) = rest.rsplit_once(':')?;
    if path.is_empty() || path.contains("://") {
        return None;
    }
    Some((path, line.parse().ok()?, col.parse().ok()?))
}

/// Leading whitespace of line `line` (from 1) of `file`.
fn indent_of(file: &Path, line: u32) -> u32 {
    std::fs::read_to_string(file)
        .ok()
        .and_then(|text| {
            let l = text.lines().nth(line.checked_sub(1)? as usize)?;
            Some((l.len() - l.trim_start().len()) as u32)
        })
        .unwrap_or(0)
}

/// Every location in `output` that is a file of `dir`, in order, once each.
pub(crate) fn locations(output: &str, dir: &Path) -> Vec<Location> {
    let lines: Vec<&str> = output.lines().collect();
    let mut out: Vec<Location> = Vec::new();
    let mut push = |l: Location| {
        if !out
            .iter()
            .any(|o| o.file == l.file && o.line == l.line && o.col == l.col)
        {
            out.push(l);
        }
    };
    for (i, text) in lines.iter().enumerate() {
        let trimmed = text.trim_start();
        // Python: `  File "server.py", line 3` (then the code, a caret line,
        // and the exception's line).
        if let Some(rest) = trimmed.strip_prefix("File \"")
            && let Some((path, after)) = rest.split_once("\", line ")
        {
            let digits: String = after.chars().take_while(char::is_ascii_digit).collect();
            let (Ok(line), Some(file)) = (digits.parse::<u32>(), in_dir(path, dir)) else {
                continue;
            };
            let following = &lines[i + 1..];
            let code = following.first().copied().unwrap_or_default();
            let col = following
                .get(1)
                .filter(|c| {
                    c.trim().starts_with('^') && c.trim().chars().all(|ch| "^~ ".contains(ch))
                })
                .and_then(|caret| {
                    let at = caret.find('^')? as u32;
                    let code_indent = (code.len() - code.trim_start().len()) as u32;
                    Some(at.checked_sub(code_indent)? + 1 + indent_of(&file, line))
                })
                .unwrap_or(1);
            let message = following
                .iter()
                .find(|l| {
                    !l.starts_with(' ')
                        && l.split_once(':').is_some_and(|(kind, _)| {
                            kind.ends_with("Error") || kind.ends_with("Exception")
                        })
                })
                .map_or_else(|| "error".to_owned(), |l| l.trim().to_owned());
            push(Location {
                file,
                line,
                col,
                message,
            });
            continue;
        }
        for (t, token) in text.split_whitespace().enumerate() {
            let Some((path, line, col)) = path_line_col(token) else {
                continue;
            };
            let Some(file) = in_dir(path, dir) else {
                continue;
            };
            // The rest of the line (gcc: `f.c:1:2: error: …`), else the
            // nearest `error…`/`warning…` line above (rustc's `--> f.rs:1:2`).
            let rest: Vec<&str> = text.split_whitespace().skip(t + 1).collect();
            let message = match rest.is_empty() {
                false => rest.join(" "),
                true => lines[..i]
                    .iter()
                    .rev()
                    .take(5)
                    .find(|l| l.starts_with("error") || l.starts_with("warning"))
                    .map_or_else(|| "error".to_owned(), |l| l.trim().to_owned()),
            };
            push(Location {
                file,
                line,
                col,
                message,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("src")).unwrap();
        std::fs::write(d.path().join("src/main.rs"), "fn main() {\n    x\n}\n").unwrap();
        std::fs::write(
            d.path().join("server.py"),
            "import os\nclass A:\n    def broken(:\n        pass\n",
        )
        .unwrap();
        std::fs::write(d.path().join("calc.c"), "int f() {}\n").unwrap();
        d
    }

    #[test]
    fn rustc_errors_point_into_the_watched_directory() {
        let d = dir();
        let out = "   Compiling orders v0.1.0\n\
                   error[E0425]: cannot find value `x` in this scope\n \
                   --> src/main.rs:2:5\n  |\n2 |     x\n  |     ^ not found in this scope\n\
                   error: could not compile `orders`";
        let found = locations(out, d.path());
        assert_eq!(
            found,
            [Location {
                file: d.path().join("src/main.rs"),
                line: 2,
                col: 5,
                message: "error[E0425]: cannot find value `x` in this scope".into(),
            }]
        );
        assert_eq!(
            found[0].to_string(),
            format!(
                "{}:2:5: error[E0425]: cannot find value `x` in this scope",
                d.path().join("src/main.rs").display()
            )
        );
    }

    #[test]
    fn a_release_directorys_absolute_paths_map_back_and_others_are_left_out() {
        let d = dir();
        let out = "/var/lib/molt/releases/calc/3f2a/calc.c:1:11: error: expected ';'\n\
                   /usr/include/stdio.h:12:1: note: declared here";
        let found = locations(out, d.path());
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].file, d.path().join("calc.c"));
        assert_eq!((found[0].line, found[0].col), (1, 11));
        assert_eq!(found[0].message, "error: expected ';'");
    }

    #[test]
    fn python_syntax_errors_take_their_column_from_the_caret() {
        let d = dir();
        let out = "  File \"/srv/releases/hello/ab12/server.py\", line 3\n    \
                   def broken(:\n               ^\nSyntaxError: invalid syntax\n";
        let found = locations(out, d.path());
        assert_eq!(
            found,
            [Location {
                file: d.path().join("server.py"),
                line: 3,
                col: 16,
                message: "SyntaxError: invalid syntax".into(),
            }]
        );
    }

    #[test]
    fn text_without_locations_gives_none() {
        let d = dir();
        for out in [
            "",
            "build failed: exit status 1",
            "see https://example.com:8080:12 for help",
            "main.rs:2:5 is not here",
        ] {
            assert!(locations(out, d.path()).is_empty(), "{out}");
        }
    }
}
