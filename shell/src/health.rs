//! Health checks: is a service process ready to take traffic?
//!
//! A [`Probe`] from `service.toml` is one of: an HTTP `GET` on one of the
//! process's ports (healthy on a 2xx status), a TCP connect, or a command that
//! must exit 0. [`wait_healthy`] probes a starting process (soon at first, then
//! backing off to every `interval`) until one probe passes, or fails once
//! `start_grace` has passed, with the last probe's error. Probes go to 127.0.0.1
//! only.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use front::http1::{self, Chunked, FrameError, Length, RequestHead};
use image_spec::manifest::{HealthCheck, Probe};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Why a probe failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProbeError {
    /// The probe names a port the process was not given.
    #[error("no internal port for `{0}`")]
    UnknownPort(String),
    /// The TCP connection failed.
    #[error("cannot connect to 127.0.0.1:{port}: {reason}")]
    Connect {
        /// The port.
        port: u16,
        /// Why.
        reason: String,
    },
    /// The HTTP answer was not 2xx (or not HTTP).
    #[error("GET {path} on port {port} answered `{status}`")]
    Status {
        /// The port.
        port: u16,
        /// The path.
        path: String,
        /// The status line.
        status: String,
    },
    /// The command exited non-zero or could not run.
    #[error("health command failed: {0}")]
    Command(String),
    /// The probe took longer than its timeout.
    #[error("probe timed out after {0:?}")]
    Timeout(Duration),
}

/// Why a process did not become healthy.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not healthy within {grace:?} ({attempts} probes); last: {last}")]
pub struct HealthError {
    /// The start grace that ran out.
    pub grace: Duration,
    /// How many probes were made.
    pub attempts: u32,
    /// The last probe's error.
    pub last: ProbeError,
}

/// Runs one probe against a process whose named ports are `ports` (internal
/// port numbers), with `dir` as the working directory of a command probe.
pub async fn probe(
    probe: &Probe,
    ports: &BTreeMap<String, u16>,
    dir: &Path,
    timeout: Duration,
) -> Result<(), ProbeError> {
    let port_of = |name: &str| {
        ports
            .get(name)
            .copied()
            .ok_or_else(|| ProbeError::UnknownPort(name.to_owned()))
    };
    let run = async {
        match probe {
            Probe::Tcp { port } => connect(port_of(port)?).await.map(drop),
            Probe::Http { port, path } => http_get(port_of(port)?, path).await,
            Probe::Command(cmd) => {
                let status = tokio::process::Command::new(cmd.program())
                    .args(cmd.args())
                    .current_dir(dir)
                    .stdin(std::process::Stdio::null())
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .kill_on_drop(true)
                    .status()
                    .await
                    .map_err(|e| ProbeError::Command(format!("`{cmd}`: {e}")))?;
                if status.success() {
                    Ok(())
                } else {
                    Err(ProbeError::Command(format!("`{cmd}` exited with {status}")))
                }
            }
        }
    };
    tokio::time::timeout(timeout, run)
        .await
        .map_err(|_| ProbeError::Timeout(timeout))?
}

async fn connect(port: u16) -> Result<TcpStream, ProbeError> {
    TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| ProbeError::Connect {
            port,
            reason: e.to_string(),
        })
}

async fn http_get(port: u16, path: &str) -> Result<(), ProbeError> {
    let mut stream = connect(port).await?;
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
    let io = |e: std::io::Error| ProbeError::Connect {
        port,
        reason: e.to_string(),
    };
    stream.write_all(request.as_bytes()).await.map_err(io)?;
    // Read the whole (small) answer — its head, then its body by its
    // Content-Length or chunks, or until the service closes the connection as
    // asked: hanging up mid-answer makes some servers log a broken pipe for
    // every probe. The answer is framed as the front frames it; only its final
    // status matters. At most 64 KiB are read.
    let mut bytes = Vec::with_capacity(256);
    let mut buf = [0u8; 1024];
    let answer = loop {
        let answer = read_answer(&bytes);
        if matches!(answer, Ok(Answer::Whole(_)) | Err(_)) || bytes.len() >= 64 << 10 {
            break answer;
        }
        let n = stream.read(&mut buf).await.map_err(io)?;
        if n == 0 {
            break answer;
        }
        bytes.extend_from_slice(&buf[..n]);
    };
    match answer {
        Ok(Answer::Head(status) | Answer::Whole(status)) if (200..300).contains(&status) => Ok(()),
        _ => Err(ProbeError::Status {
            port,
            path: path.to_owned(),
            status: status_line(&bytes),
        }),
    }
}

/// How much of an HTTP answer the bytes read so far hold.
#[derive(Debug, PartialEq, Eq)]
enum Answer {
    /// Not yet its final head.
    Partial,
    /// The final head, with this status, but not yet all of its body.
    Head(u16),
    /// The final head and all of its body.
    Whole(u16),
}

/// Reads `bytes` as the answer to the probe's `GET` (interim `1xx` heads are
/// passed over), with the front's framing.
fn read_answer(bytes: &[u8]) -> Result<Answer, FrameError> {
    let asked = RequestHead {
        consumed: 0,
        body: Length::Fixed(0),
        is_head: false,
        idempotent: true,
        http10: false,
        keep_alive: false,
        upgrade: false,
        expects_continue: false,
    };
    let mut rest = bytes;
    let mut forwarded = Vec::new();
    loop {
        forwarded.clear();
        let Some(head) = http1::parse_response(rest, &asked, &mut forwarded)? else {
            return Ok(Answer::Partial);
        };
        rest = &rest[head.consumed..];
        if head.is_interim() {
            continue;
        }
        let whole = match head.body {
            Length::Fixed(n) => rest.len() as u64 >= n,
            Length::Chunked => {
                let mut chunks = Chunked::new();
                chunks.scan(rest)?;
                chunks.is_done()
            }
            // Without a length the answer ends when the connection does.
            Length::ToClose => false,
        };
        return Ok(if whole {
            Answer::Whole(head.status)
        } else {
            Answer::Head(head.status)
        });
    }
}

/// The first line of an answer, for an error message.
fn status_line(bytes: &[u8]) -> String {
    let line = bytes.split(|&b| b == b'\n').next().unwrap_or_default();
    match String::from_utf8_lossy(line).trim() {
        "" => "nothing".to_owned(),
        line => line.to_owned(),
    }
}

/// The first pause between start-up probes; it doubles up to the check's interval.
const FIRST_PAUSE: Duration = Duration::from_millis(10);

/// For this long after the first probe, probes are at most [`FAST_PAUSE`]
/// apart: an interpreter that listens after 160 ms would otherwise wait for
/// the probe at 310 ms (10 + 20 + 40 + 80 + 160).
const FAST_PHASE: Duration = Duration::from_millis(500);
/// The longest pause between probes during [`FAST_PHASE`].
const FAST_PAUSE: Duration = Duration::from_millis(20);

/// The pause after a failed probe, `since` the first one, when the last
/// pause was `last` and the check's interval is `interval`: 10 ms, then
/// at most [`FAST_PAUSE`] during [`FAST_PHASE`], then doubling up to
/// `interval`.
fn next_pause(last: Option<Duration>, since: Duration, interval: Duration) -> Duration {
    let doubled = match last {
        None => FIRST_PAUSE,
        Some(p) => p * 2,
    };
    let pause = match since < FAST_PHASE {
        true => doubled.min(FAST_PAUSE),
        false => doubled,
    };
    pause.min(interval)
}

/// Probes until one passes or `start_grace` runs out. A starting process is
/// probed soon and then less and less often ([`next_pause`]): most services
/// listen within milliseconds, and every probe interval waited needlessly is
/// time a developer waits for their save, or the upgrade keeps the old
/// process serving.
pub async fn wait_healthy(
    check: &HealthCheck,
    ports: &BTreeMap<String, u16>,
    dir: &Path,
) -> Result<(), HealthError> {
    let started = tokio::time::Instant::now();
    let deadline = started + check.start_grace;
    let mut attempts = 0;
    let mut pause = None;
    loop {
        attempts += 1;
        let last = match probe(&check.probe, ports, dir, check.timeout).await {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        let next = next_pause(pause, started.elapsed(), check.interval);
        if tokio::time::Instant::now() + next > deadline {
            return Err(HealthError {
                grace: check.start_grace,
                attempts,
                last,
            });
        }
        tokio::time::sleep(next).await;
        pause = Some(next);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image_spec::manifest::Command;
    use tokio::net::TcpListener;

    fn ports(port: u16) -> BTreeMap<String, u16> {
        BTreeMap::from([("main".to_owned(), port)])
    }

    /// A one-shot HTTP server answering `status` to every request.
    async fn http_server(status: &'static str) -> u16 {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\n\r\n").as_bytes())
                    .await;
            }
        });
        port
    }

    #[tokio::test]
    async fn http_tcp_and_command_probes() {
        let dir = tempfile::tempdir().unwrap();
        let ok = http_server("200 OK").await;
        let bad = http_server("503 Service Unavailable").await;
        let t = Duration::from_secs(5);
        let http = |p: &str| Probe::Http {
            port: "main".into(),
            path: p.into(),
        };
        probe(&http("/healthz"), &ports(ok), dir.path(), t)
            .await
            .unwrap();
        let err = probe(&http("/healthz"), &ports(bad), dir.path(), t)
            .await
            .unwrap_err();
        assert!(
            matches!(&err, ProbeError::Status { status, .. } if status.contains("503")),
            "{err}"
        );
        let tcp = Probe::Tcp {
            port: "main".into(),
        };
        probe(&tcp, &ports(ok), dir.path(), t).await.unwrap();
        // A port nobody listens on.
        let closed = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        assert!(matches!(
            probe(&tcp, &ports(closed), dir.path(), t).await,
            Err(ProbeError::Connect { .. })
        ));
        assert!(matches!(
            probe(&tcp, &BTreeMap::new(), dir.path(), t).await,
            Err(ProbeError::UnknownPort(_))
        ));
        let cmd = |argv: &[&str]| {
            Probe::Command(
                Command::try_from(argv.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap(),
            )
        };
        probe(&cmd(&["true"]), &ports(ok), dir.path(), t)
            .await
            .unwrap();
        assert!(matches!(
            probe(&cmd(&["false"]), &ports(ok), dir.path(), t).await,
            Err(ProbeError::Command(_))
        ));
    }

    #[test]
    fn answers_are_complete_by_content_length() {
        assert_eq!(
            read_answer(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok"),
            Ok(Answer::Head(200))
        );
        assert_eq!(
            read_answer(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n"),
            Ok(Answer::Whole(200))
        );
        assert_eq!(
            read_answer(b"HTTP/1.1 200 OK\r\n\r\nbody"),
            Ok(Answer::Head(200))
        );
        assert_eq!(read_answer(b"HTTP/1.1 200 OK\r\n"), Ok(Answer::Partial));
    }

    #[test]
    fn answers_are_framed_as_the_front_frames_them() {
        // An interim answer is passed over; a chunked body ends with its last chunk.
        let interim = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n";
        assert_eq!(read_answer(interim), Ok(Answer::Whole(204)));
        let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n";
        assert_eq!(read_answer(chunked), Ok(Answer::Head(200)));
        let whole = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n";
        assert_eq!(read_answer(whole), Ok(Answer::Whole(200)));
        // What the front would refuse is no healthy answer.
        assert!(read_answer(b"SSH-2.0-OpenSSH\r\n\r\n").is_err());
        assert!(
            read_answer(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n")
                .is_err()
        );
        assert_eq!(
            status_line(b"HTTP/1.1 503 Busy\r\n\r\n"),
            "HTTP/1.1 503 Busy"
        );
        assert_eq!(status_line(b""), "nothing");
    }

    /// An answer that is not HTTP, or that ends before its head does, fails
    /// the probe and says what came.
    #[tokio::test]
    async fn answers_that_are_not_http_fail_the_probe() {
        let dir = tempfile::tempdir().unwrap();
        let http = Probe::Http {
            port: "main".into(),
            path: "/healthz".into(),
        };
        for (reply, says) in [
            (&b"SSH-2.0-OpenSSH\r\n\r\n"[..], "SSH-2.0-OpenSSH"),
            (b"HTTP/1.1 200 O", "HTTP/1.1 200 O"),
            (b"", "nothing"),
        ] {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let port = listener.local_addr().unwrap().port();
            let server = tokio::spawn(async move {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                s.write_all(reply).await.unwrap();
            });
            let err = probe(&http, &ports(port), dir.path(), Duration::from_secs(5))
                .await
                .unwrap_err();
            assert!(
                matches!(&err, ProbeError::Status { status, .. } if status == says),
                "{err}"
            );
            server.await.unwrap();
        }
    }

    /// A server that answers and keeps the connection open (ignoring
    /// `Connection: close`) still passes a probe: its Content-Length ends it.
    #[tokio::test]
    async fn a_kept_open_connection_does_not_stall_the_probe() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\n")
                .await
                .unwrap();
            let _ = rx.await;
        });
        let dir = tempfile::tempdir().unwrap();
        let http = Probe::Http {
            port: "main".into(),
            path: "/healthz".into(),
        };
        probe(&http, &ports(port), dir.path(), Duration::from_secs(5))
            .await
            .unwrap();
        drop(tx);
    }

    #[tokio::test]
    async fn waiting_gives_up_after_the_start_grace_with_the_last_error() {
        let dir = tempfile::tempdir().unwrap();
        let check = HealthCheck {
            probe: Probe::Command(Command::try_from(vec!["false".to_owned()]).unwrap()),
            interval: Duration::from_millis(50),
            timeout: Duration::from_secs(5),
            retries: 3,
            // Long enough for two probes even on a loaded machine.
            start_grace: Duration::from_secs(1),
        };
        let err = wait_healthy(&check, &BTreeMap::new(), dir.path())
            .await
            .unwrap_err();
        assert_eq!(err.grace, Duration::from_secs(1));
        assert!(err.attempts >= 2, "{err}");
        assert!(matches!(err.last, ProbeError::Command(_)), "{err}");
    }

    #[tokio::test]
    async fn a_starting_process_is_probed_soon_then_backing_off_to_the_interval() {
        let dir = tempfile::tempdir().unwrap();
        let check = HealthCheck {
            probe: Probe::Command(Command::try_from(vec!["false".to_owned()]).unwrap()),
            interval: Duration::from_millis(400),
            timeout: Duration::from_secs(5),
            retries: 3,
            start_grace: Duration::from_secs(1),
        };
        let err = wait_healthy(&check, &BTreeMap::new(), dir.path())
            .await
            .unwrap_err();
        // Pauses of 10 then 20 ms for half a second, then doubling to 400:
        // about thirty probes fit in one second where probing every interval
        // would have made three. (A loaded machine spawns `false` slowly:
        // many more than three is the point.)
        assert!((8..=35).contains(&err.attempts), "{err}");
    }

    #[test]
    fn probes_stay_close_while_a_service_starts_then_back_off() {
        let interval = Duration::from_secs(1);
        let ms = Duration::from_millis;
        assert_eq!(next_pause(None, ms(0), interval), ms(10));
        assert_eq!(next_pause(Some(ms(10)), ms(10), interval), ms(20));
        assert_eq!(next_pause(Some(ms(20)), ms(300), interval), ms(20));
        assert_eq!(next_pause(Some(ms(20)), ms(500), interval), ms(40));
        assert_eq!(next_pause(Some(ms(640)), ms(2_000), interval), interval);
        // Never longer than the interval, even at the start.
        assert_eq!(next_pause(None, ms(0), ms(5)), ms(5));
    }

    #[tokio::test]
    async fn waiting_succeeds_once_the_service_comes_up() {
        let dir = tempfile::tempdir().unwrap();
        // Reserve a port, then start listening on it only after a few probes.
        let port = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let check = HealthCheck {
            probe: Probe::Tcp {
                port: "main".into(),
            },
            interval: Duration::from_millis(20),
            timeout: Duration::from_secs(5),
            retries: 3,
            start_grace: Duration::from_secs(30),
        };
        let (tx, rx) = tokio::sync::oneshot::channel::<TcpListener>();
        let opener = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let l = TcpListener::bind(("127.0.0.1", port)).await.unwrap();
            let _ = tx.send(l);
        });
        wait_healthy(&check, &ports(port), dir.path())
            .await
            .unwrap();
        opener.await.unwrap();
        drop(rx);
    }
}
