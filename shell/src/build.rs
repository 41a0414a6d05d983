//! Running a service's build command in its release directory.
//!
//! The command runs with the service's `env` and the molt variables, its output
//! (stdout and stderr) appended to a log file, and a time limit after which it is
//! killed. A failure is a [`BuildError`] carrying the last lines of the log, so an
//! operator sees why without opening files.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use image_spec::manifest::TimedCommand;
use tokio::process::Command;

/// How many log lines a failure carries.
pub const TAIL_LINES: usize = 20;

/// Why a build failed.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The command could not be started.
    #[error("cannot start build `{command}`: {source}")]
    Spawn {
        /// The command line.
        command: String,
        /// Why.
        source: std::io::Error,
    },
    /// The log file could not be written.
    #[error("build log `{path}`: {source}")]
    Log {
        /// The log file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The command exited unsuccessfully.
    #[error("build `{command}` failed ({status}); last lines of its log:\n{tail}")]
    Failed {
        /// The command line.
        command: String,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// The last lines of its output.
        tail: String,
    },
    /// The command ran longer than its timeout and was killed.
    #[error("build `{command}` did not finish within {timeout:?}; last lines of its log:\n{tail}")]
    TimedOut {
        /// The command line.
        command: String,
        /// The limit.
        timeout: Duration,
        /// The last lines of its output.
        tail: String,
    },
}

/// The last `n` lines of a file (empty if it cannot be read).
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Variables of the shell's own environment that would send a build's
/// outputs out of its release (a cargo build would write to the shell's target
/// directory, and the next release, copied from this one, would not have them):
/// builds do not inherit them. A service's `env` may still set them.
const NOT_INHERITED: &[&str] = &["CARGO_TARGET_DIR", "CARGO_BUILD_TARGET_DIR"];

/// The command for `build` in `dir`: the shell's environment without
/// [`NOT_INHERITED`], plus `env`.
fn build_command(build: &TimedCommand, dir: &Path, env: &[(String, String)]) -> Command {
    let mut child = Command::new(build.command.program());
    crate::process::owned_by_shell(&mut child);
    crate::process::without_file_override(&mut child);
    for name in NOT_INHERITED {
        child.env_remove(name);
    }
    child
        .args(build.command.args())
        .current_dir(dir)
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    child
}

/// Runs `build` in `dir` with `env`, appending its output to `log`.
pub async fn run(
    build: &TimedCommand,
    dir: &Path,
    env: &[(String, String)],
    log: &Path,
) -> Result<(), BuildError> {
    let command = build.command.to_string();
    let log_err = |source| BuildError::Log {
        path: log.to_owned(),
        source,
    };
    if let Some(parent) = log.parent() {
        std::fs::create_dir_all(parent).map_err(log_err)?;
    }
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(log_err)?;
    let err = out.try_clone().map_err(log_err)?;
    let mut child = build_command(build, dir, env)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| BuildError::Spawn {
            command: command.clone(),
            source,
        })?;
    crate::crash::point("mid-build");
    match tokio::time::timeout(build.timeout, child.wait()).await {
        Ok(Ok(status)) if status.success() => Ok(()),
        Ok(Ok(status)) => Err(BuildError::Failed {
            command,
            status,
            tail: tail(log, TAIL_LINES),
        }),
        Ok(Err(source)) => Err(BuildError::Spawn { command, source }),
        Err(_) => {
            // The whole group: cargo's rustc children too.
            if let Some(pid) = child.id() {
                crate::process::signal_group(pid, libc::SIGKILL);
            }
            let _ = child.kill().await;
            Err(BuildError::TimedOut {
                command,
                timeout: build.timeout,
                tail: tail(log, TAIL_LINES),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image_spec::manifest::Command as Argv;

    #[test]
    fn builds_do_not_inherit_what_would_move_their_outputs() {
        let build = cmd(&["cargo", "build"], 5);
        let dir = Path::new("/release");
        let envs = |env: &[(String, String)]| -> Vec<(String, Option<String>)> {
            build_command(&build, dir, env)
                .as_std()
                .get_envs()
                .map(|(k, v)| {
                    let text = |s: &std::ffi::OsStr| s.to_string_lossy().into_owned();
                    (text(k), v.map(text))
                })
                .collect()
        };
        let plain = envs(&[("RUST_LOG".into(), "info".into())]);
        for name in NOT_INHERITED {
            assert!(plain.contains(&((*name).to_owned(), None)), "{plain:?}");
        }
        assert!(plain.contains(&("RUST_LOG".into(), Some("info".into()))));
        // The service's own env may set it.
        let set = envs(&[("CARGO_TARGET_DIR".into(), "/elsewhere".into())]);
        assert!(
            set.contains(&("CARGO_TARGET_DIR".into(), Some("/elsewhere".into()))),
            "{set:?}"
        );
    }

    fn cmd(argv: &[&str], secs: u64) -> TimedCommand {
        TimedCommand {
            command: Argv::try_from(argv.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap(),
            timeout: Duration::from_secs(secs),
        }
    }

    #[tokio::test]
    async fn success_failure_and_the_log_tail() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("logs/build.log");
        let env = vec![("GREETING".to_owned(), "hi".to_owned())];
        run(
            &cmd(&["sh", "-c", "echo $GREETING > out.txt; echo built"], 30),
            dir.path(),
            &env,
            &log,
        )
        .await
        .unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.path().join("out.txt")).unwrap(),
            "hi\n"
        );
        assert!(tail(&log, 5).contains("built"));

        let err = run(
            &cmd(
                &[
                    "sh",
                    "-c",
                    "for i in $(seq 1 30); do echo line $i; done; echo boom >&2; exit 3",
                ],
                30,
            ),
            dir.path(),
            &env,
            &log,
        )
        .await
        .unwrap_err();
        let BuildError::Failed { tail, status, .. } = &err else {
            panic!("{err}")
        };
        assert_eq!(status.code(), Some(3));
        assert!(tail.ends_with("boom"), "{tail}");
        assert_eq!(tail.lines().count(), TAIL_LINES);
        assert!(!tail.contains("line 1\n"), "{tail}");
    }

    #[tokio::test]
    async fn a_missing_program_and_a_timeout_are_typed() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("build.log");
        let err = run(&cmd(&["/nonexistent/tool"], 5), dir.path(), &[], &log)
            .await
            .unwrap_err();
        assert!(matches!(err, BuildError::Spawn { .. }), "{err}");
        let err = run(&cmd(&["sleep", "30"], 1), dir.path(), &[], &log)
            .await
            .unwrap_err();
        assert!(matches!(err, BuildError::TimedOut { .. }), "{err}");
    }
}
