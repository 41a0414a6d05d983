//! The keeper: a small process that holds an instance's service processes, so
//! that they outlive the shell that started them when another shell takes
//! over from it, and die when no shell is left to supervise them.
//!
//! Why a process of its own: a service is the child of whoever spawned it,
//! and dies with it (`PR_SET_PDEATHSIG`) so that a crashed shell leaves no
//! service nobody supervises. A shell that hands its instance to a new shell
//! must exit without its services dying, so the services are the keeper's
//! children instead, and the keeper answers to one shell at a time — its
//! *owner*. The keeper spawns, signals and reaps the services, writes their
//! output to their logs (so no line is lost while shells change), and tells
//! its owner when one exits.
//!
//! Who owns it: the shell that starts the keeper gives it a secret token; a
//! connection that says [`Hello::Owner`] with it becomes the owner. During a
//! takeover the new shell, given the token by the old one, says
//! [`Hello::Successor`]; the owner's [`Request::Release`] then makes the
//! successor the owner and the old owner its successor until it goes: a new
//! shell that dies before the old one has gone hands the keeper back. If the owner's connection
//! ends first, a registered successor is promoted; with none, the keeper
//! stops every service (SIGTERM to its process group, SIGKILL after
//! [`STOP_GRACE`]) and exits: a shell killed with `kill -9` leaves no service
//! behind. A keeper killed with `kill -9` takes its services with it (they
//! die with their parent), and its owner sees the connection end.
//!
//! The protocol is [`crate::fdpass`] messages over a unix socket: requests
//! answered in order by [`FromKeeper::Reply`], and [`FromKeeper::Event`]s
//! (a service exited) sent to the owner whenever they happen.

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::fdpass::{self, FdPassError};
use crate::process::{LineStamper, RotatingLog, stamp_now};

/// The version of the keeper's protocol; a keeper refuses another.
pub const KEEPER_VERSION: u32 = 1;

/// How long stopped services get between SIGTERM and SIGKILL when the keeper
/// has no owner left.
pub const STOP_GRACE: Duration = Duration::from_secs(5);

/// How long a new keeper waits for its first owner before giving up.
pub const FIRST_OWNER_WAIT: Duration = Duration::from_secs(30);

/// The first message of a connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Hello {
    /// The shell that owns the keeper (the one that started it, or one
    /// reconnecting).
    Owner {
        /// The protocol version.
        version: u32,
        /// The keeper's token.
        token: String,
    },
    /// A shell taking over from the owner.
    Successor {
        /// The protocol version.
        version: u32,
        /// The keeper's token, handed over by the owner.
        token: String,
    },
}

/// What to run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpawnSpec {
    /// The program.
    pub program: String,
    /// Its arguments.
    pub args: Vec<String>,
    /// Its working directory.
    pub dir: PathBuf,
    /// Variables added to the keeper's environment.
    pub env: Vec<(String, String)>,
    /// Where its stdout and stderr go, each line stamped.
    pub log: PathBuf,
    /// The log's rotation size.
    pub log_limit: u64,
    /// What the owner calls it (a service and its generation), for listings.
    pub label: String,
}

/// A request to the keeper.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Start a process in a process group of its own.
    Spawn(SpawnSpec),
    /// Send `signal` to the process group of `pid` (a child of the keeper).
    Signal {
        /// The child.
        pid: u32,
        /// The signal's number.
        signal: i32,
    },
    /// The children running now.
    List,
    /// The owner lets go: the registered successor becomes the owner.
    Release,
}

/// A child of the keeper.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Kept {
    /// Its process id.
    pub pid: u32,
    /// The owner's name for it.
    pub label: String,
}

/// An answer to a request, or to the hello.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    /// Welcome: the keeper's pid and its children.
    Welcome {
        /// The keeper's process id.
        keeper: u32,
        /// Its children.
        children: Vec<Kept>,
    },
    /// Started.
    Spawned {
        /// Its pid.
        pid: u32,
    },
    /// Signalled.
    Signalled,
    /// The children.
    Children(Vec<Kept>),
    /// Released: the successor owns the keeper now.
    Released,
    /// Refused or failed, and why.
    Refused(String),
}

/// Something that happened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Event {
    /// A child exited (and was reaped).
    Exited {
        /// Its pid.
        pid: u32,
        /// Its exit code, if it exited.
        code: Option<i32>,
        /// The signal that ended it, if one did.
        signal: Option<i32>,
    },
    /// This connection is the owner now (a successor promoted).
    Promoted,
}

/// What the keeper sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FromKeeper {
    /// The answer to the last request.
    Reply(Reply),
    /// An event, for the owner.
    Event(Event),
}

/// Why the keeper or a client of it failed.
#[derive(Debug, thiserror::Error)]
pub enum KeeperError {
    /// The socket could not be made or reached.
    #[error("the keeper's socket `{path}`: {source}")]
    Socket {
        /// The socket.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A message failed.
    #[error(transparent)]
    Channel(#[from] FdPassError),
    /// The keeper refused.
    #[error("the keeper refused: {0}")]
    Refused(String),
    /// The keeper answered something else than the request calls for.
    #[error("the keeper answered {0:?}")]
    Unexpected(Box<Reply>),
}

/// One connection's writing half, shared by its reader and the reapers.
type Writer = Arc<Mutex<UnixStream>>;

/// A spawn for the spawner thread, and where its pid (or why not) goes.
type SpawnJob = (SpawnSpec, mpsc::Sender<Result<u32, String>>);

/// What the keeper knows.
#[derive(Default)]
struct Shared {
    owner: Option<(u64, Writer)>,
    successor: Option<(u64, Writer)>,
    children: BTreeMap<u32, Kept>,
    /// Events no owner was there to hear, sent to the next.
    pending: Vec<Event>,
    /// Set once the keeper stops: no owner, no successor.
    stopping: bool,
}

struct Keeper {
    token: String,
    shared: Mutex<Shared>,
    /// Signalled when a child is reaped or the owner changes.
    changed: Condvar,
    /// Spawns go to one thread that lives as long as the keeper: a child dies
    /// with the thread that forked it.
    spawner: Mutex<mpsc::Sender<SpawnJob>>,
}

fn send(writer: &Writer, msg: &FromKeeper) -> Result<(), FdPassError> {
    let w = writer.lock().unwrap_or_else(|p| p.into_inner());
    fdpass::send(&w, msg, &[])
}

impl Keeper {
    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Tells the owner, or keeps it for the next one.
    /// Tells the owner, and a successor (which will supervise the same
    /// children), or keeps it for the next owner.
    fn event(&self, event: Event) {
        let mut shared = self.lock();
        if let Some((_, w)) = &shared.successor {
            let _ = send(w, &FromKeeper::Event(event.clone()));
        }
        match &shared.owner {
            Some((_, w)) if send(w, &FromKeeper::Event(event.clone())).is_ok() => {}
            _ => shared.pending.push(event),
        }
    }

    fn children(&self) -> Vec<Kept> {
        self.lock().children.values().cloned().collect()
    }

    /// Serves one connection until it ends.
    fn serve_connection(self: &Arc<Self>, id: u64, stream: UnixStream) {
        let writer: Writer = match stream.try_clone() {
            Ok(w) => Arc::new(Mutex::new(w)),
            Err(_) => return,
        };
        let reply = |r: Reply| send(&writer, &FromKeeper::Reply(r));
        let hello = match fdpass::recv::<Hello>(&stream) {
            Ok((hello, _)) => hello,
            Err(_) => return,
        };
        let (version, token, successor) = match &hello {
            Hello::Owner { version, token } => (*version, token, false),
            Hello::Successor { version, token } => (*version, token, true),
        };
        if version != KEEPER_VERSION {
            let _ = reply(Reply::Refused(format!(
                "keeper protocol {version} is not this keeper's ({KEEPER_VERSION})"
            )));
            return;
        }
        if *token != self.token {
            let _ = reply(Reply::Refused("wrong token".into()));
            return;
        }
        {
            let mut shared = self.lock();
            let taken = match successor {
                false => shared.owner.is_some(),
                true => shared.owner.is_none() || shared.successor.is_some(),
            };
            if taken || shared.stopping {
                drop(shared);
                let _ = reply(Reply::Refused(match successor {
                    false => "the keeper has an owner".into(),
                    true => "no owner to take over from, or a takeover under way".into(),
                }));
                return;
            }
            let slot = Some((id, writer.clone()));
            match successor {
                false => shared.owner = slot,
                true => shared.successor = slot,
            }
            let welcome = Reply::Welcome {
                keeper: std::process::id(),
                children: shared.children.values().cloned().collect(),
            };
            // Under the lock: no event overtakes the welcome.
            if send(&writer, &FromKeeper::Reply(welcome)).is_err() {
                drop(shared);
                self.gone(id);
                return;
            }
            if !successor {
                for e in std::mem::take(&mut shared.pending) {
                    let _ = send(&writer, &FromKeeper::Event(e));
                }
            }
            self.changed.notify_all();
        }
        while let Ok((request, _)) = fdpass::recv::<Request>(&stream) {
            let answer = self.answer(id, request);
            if reply(answer).is_err() {
                break;
            }
        }
        self.gone(id);
    }

    fn answer(&self, id: u64, request: Request) -> Reply {
        let is_owner = self.lock().owner.as_ref().is_some_and(|(o, _)| *o == id);
        match request {
            Request::List => Reply::Children(self.children()),
            _ if !is_owner => Reply::Refused("only the keeper's owner may do that".into()),
            Request::Spawn(spec) => {
                let (tx, rx) = mpsc::channel();
                let sent = self
                    .spawner
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .send((spec, tx));
                match sent.ok().and_then(|()| rx.recv().ok()) {
                    Some(Ok(pid)) => Reply::Spawned { pid },
                    Some(Err(e)) => Reply::Refused(e),
                    None => Reply::Refused("the keeper is stopping".into()),
                }
            }
            Request::Signal { pid, signal } => {
                if !self.lock().children.contains_key(&pid) {
                    return Reply::Refused(format!("{pid} is not a child of the keeper"));
                }
                match signal_group(pid, signal) {
                    Ok(()) => Reply::Signalled,
                    Err(e) => Reply::Refused(format!("cannot signal {pid}: {e}")),
                }
            }
            Request::Release => {
                let mut shared = self.lock();
                match shared.successor.take() {
                    Some(next) => {
                        let _ = send(&next.1, &FromKeeper::Event(Event::Promoted));
                        // The old owner stays on as the successor: should the
                        // new owner go first, the old one owns the keeper
                        // again (a takeover that failed after the release).
                        shared.successor = shared.owner.replace(next);
                        self.changed.notify_all();
                        Reply::Released
                    }
                    None => Reply::Refused("no successor to release to".into()),
                }
            }
        }
    }

    /// Connection `id` ended: a lost owner is replaced by the successor, or
    /// the keeper stops.
    fn gone(&self, id: u64) {
        let mut shared = self.lock();
        if shared.successor.as_ref().is_some_and(|(s, _)| *s == id) {
            shared.successor = None;
        }
        if shared.owner.as_ref().is_some_and(|(o, _)| *o == id) {
            shared.owner = shared.successor.take();
            match shared.owner.as_ref().map(|(_, w)| w.clone()) {
                Some(w) => {
                    let _ = send(&w, &FromKeeper::Event(Event::Promoted));
                    for e in std::mem::take(&mut shared.pending) {
                        let _ = send(&w, &FromKeeper::Event(e));
                    }
                }
                None => shared.stopping = true,
            }
        }
        self.changed.notify_all();
    }

    /// Stops every child: SIGTERM to each group, SIGKILL to what is left
    /// after [`STOP_GRACE`]; returns once all were reaped (or after another
    /// grace, if one cannot be).
    fn stop_all(&self) {
        let pids: Vec<u32> = self.lock().children.keys().copied().collect();
        for pid in &pids {
            let _ = signal_group(*pid, libc::SIGTERM);
        }
        let deadline = Instant::now() + STOP_GRACE;
        let mut shared = self.lock();
        let mut killed = false;
        while !shared.children.is_empty() {
            let now = Instant::now();
            if now >= deadline && !killed {
                for pid in shared.children.keys() {
                    let _ = signal_group(*pid, libc::SIGKILL);
                }
                killed = true;
            }
            if now >= deadline + STOP_GRACE {
                break;
            }
            let wait = match killed {
                false => deadline - now,
                true => (deadline + STOP_GRACE).saturating_duration_since(now),
            };
            shared = self
                .changed
                .wait_timeout(shared, wait.max(Duration::from_millis(1)))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

/// Sends `signal` to `pid`'s process group.
fn signal_group(pid: u32, signal: i32) -> std::io::Result<()> {
    let pid = rustix::process::Pid::from_raw(i32::try_from(pid).unwrap_or(i32::MAX))
        .ok_or_else(|| std::io::Error::other("no such process"))?;
    let signal = rustix::process::Signal::from_named_raw(signal)
        .ok_or_else(|| std::io::Error::other(format!("unknown signal {signal}")))?;
    rustix::process::kill_process_group(pid, signal).map_err(std::io::Error::from)
}

/// Copies a child's output into its log, line by line, stamped.
fn pump(mut from: impl Read, log: Arc<Mutex<RotatingLog>>) {
    let mut buf = vec![0u8; 16 << 10];
    let mut lines = LineStamper::default();
    let mut out = Vec::new();
    loop {
        out.clear();
        let n = from.read(&mut buf).unwrap_or(0);
        match n {
            0 => lines.finish(&stamp_now(), &mut out),
            n => lines.feed(&buf[..n], &stamp_now(), &mut out),
        }
        if !out.is_empty() {
            let mut log = log.lock().unwrap_or_else(|p| p.into_inner());
            if log.write(&out).is_err() {
                return;
            }
        }
        if n == 0 {
            return;
        }
    }
}

/// Starts `spec` as the keeper's child, its output pumped into its log.
fn start_child(spec: &SpawnSpec) -> Result<Child, String> {
    let log = RotatingLog::open(&spec.log, spec.log_limit)
        .map_err(|e| format!("cannot open the log `{}`: {e}", spec.log.display()))?;
    let log = Arc::new(Mutex::new(log));
    let mut command = std::process::Command::new(&spec.program);
    crate::process::owned_by_this_process(&mut command);
    let mut child = command
        .args(&spec.args)
        .current_dir(&spec.dir)
        .envs(spec.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start `{}`: {e}", spec.program))?;
    if let Some(out) = child.stdout.take() {
        let log = log.clone();
        std::thread::spawn(move || pump(out, log));
    }
    if let Some(err) = child.stderr.take() {
        std::thread::spawn(move || pump(err, log));
    }
    Ok(child)
}

/// Runs a keeper on `socket` (made here, 0600) with `token` until it has no
/// owner left: then every child is stopped, the socket removed, and it
/// returns. A keeper nobody owns within [`FIRST_OWNER_WAIT`] returns too.
pub fn serve(socket: &Path, token: String) -> Result<(), KeeperError> {
    let socket_error = |source| KeeperError::Socket {
        path: socket.to_owned(),
        source,
    };
    let _ = std::fs::remove_file(socket);
    let listener = UnixListener::bind(socket).map_err(socket_error)?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))
            .map_err(socket_error)?;
    }
    let (spawns, requests) = mpsc::channel::<SpawnJob>();
    let keeper = Arc::new(Keeper {
        token,
        shared: Mutex::default(),
        changed: Condvar::new(),
        spawner: Mutex::new(spawns),
    });
    // The spawner: the children's parent thread, for as long as the keeper.
    let k = keeper.clone();
    let spawner = std::thread::spawn(move || {
        for (spec, answer) in requests {
            let started = start_child(&spec).map(|mut child| {
                let pid = child.id();
                k.lock().children.insert(
                    pid,
                    Kept {
                        pid,
                        label: spec.label.clone(),
                    },
                );
                let k = k.clone();
                std::thread::spawn(move || {
                    let status = child.wait();
                    k.lock().children.remove(&pid);
                    k.changed.notify_all();
                    let (code, signal) = match status {
                        Ok(s) => (s.code(), s.signal()),
                        Err(_) => (None, None),
                    };
                    k.event(Event::Exited { pid, code, signal });
                });
                pid
            });
            let _ = answer.send(started);
        }
    });
    // Connections, each on a thread of its own.
    let k = keeper.clone();
    let accepting = listener.try_clone().map_err(socket_error)?;
    std::thread::spawn(move || {
        for (id, stream) in (1u64..).zip(accepting.incoming()) {
            let Ok(stream) = stream else { continue };
            let k = k.clone();
            std::thread::spawn(move || k.serve_connection(id, stream));
        }
    });
    // Wait until the keeper has had an owner and has none left.
    {
        let started = Instant::now();
        let mut shared = keeper.lock();
        loop {
            if shared.stopping {
                break;
            }
            if shared.owner.is_none()
                && shared.successor.is_none()
                && shared.children.is_empty()
                && started.elapsed() > FIRST_OWNER_WAIT
            {
                shared.stopping = true;
                break;
            }
            shared = keeper
                .changed
                .wait_timeout(shared, Duration::from_millis(500))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
    let _ = std::fs::remove_file(socket);
    keeper.stop_all();
    drop(keeper.spawner.lock().map(|mut s| *s = mpsc::channel().0));
    let _ = spawner.join();
    drop(listener);
    Ok(())
}

/// How long [`start`] waits for a new keeper's socket.
pub const START_WAIT: Duration = Duration::from_secs(10);

/// A new secret token: 32 random bytes, in hex.
pub fn new_token() -> std::io::Result<String> {
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Starts `exe keeper --socket SOCKET` (the `molt` binary) in a process
/// group of its own, not tied to this process's life, gives it a new token on
/// its standard input, and waits for its socket. Returns the token and the
/// child (to reap it should it end first).
///
/// A keeper still answering at `socket` is waited for first: one left by a
/// shell that was killed stops its services before it goes (their data
/// directories are the new shell's next). One still there after twice
/// [`STOP_GRACE`] has an owner — another shell runs the instance — and the
/// start is refused.
pub fn start(exe: &Path, socket: &Path, log: &Path) -> Result<(String, Child), KeeperError> {
    let failed = |source| KeeperError::Socket {
        path: socket.to_owned(),
        source,
    };
    let deadline = Instant::now() + STOP_GRACE * 2;
    while UnixStream::connect(socket).is_ok() {
        if Instant::now() >= deadline {
            return Err(KeeperError::Refused(format!(
                "another shell runs this instance (its keeper answers at `{}`): stop it, or replace it with molt shell takeover",
                socket.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let token = new_token().map_err(failed)?;
    let _ = std::fs::remove_file(socket);
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(failed)?;
    let mut child = {
        use std::os::unix::process::CommandExt;
        std::process::Command::new(exe)
            .arg("keeper")
            .arg("--socket")
            .arg(socket)
            .process_group(0)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(failed)?
    };
    {
        use std::io::Write;
        let mut stdin = child
            .stdin
            .take()
            .ok_or_else(|| failed(std::io::Error::other("no stdin")))?;
        writeln!(stdin, "{token}").map_err(failed)?;
    }
    let deadline = Instant::now() + START_WAIT;
    while UnixStream::connect(socket).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(failed(std::io::Error::other(format!(
                "the keeper ended at once ({status})"
            ))));
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(failed(std::io::Error::other(format!(
                "the keeper did not listen within {} s",
                START_WAIT.as_secs()
            ))));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok((token, child))
}

/// The keeper's side of [`start`]: reads the token from standard input, then
/// [`serve`]s.
pub fn run(socket: &Path) -> Result<(), KeeperError> {
    let mut token = String::new();
    std::io::stdin()
        .read_line(&mut token)
        .map_err(|source| KeeperError::Socket {
            path: socket.to_owned(),
            source,
        })?;
    let token = token.trim().to_owned();
    if token.len() < 32 {
        return Err(KeeperError::Refused(
            "the keeper needs its token on standard input".into(),
        ));
    }
    serve(socket, token)
}

/// Connects to the keeper at `socket`, says `hello` and reads the welcome:
/// the stream, the keeper's pid and its children. (No event comes before the
/// welcome: the keeper sends it under the lock events are sent under.)
fn handshake(socket: &Path, hello: &Hello) -> Result<(UnixStream, (u32, Vec<Kept>)), KeeperError> {
    let stream = UnixStream::connect(socket).map_err(|source| KeeperError::Socket {
        path: socket.to_owned(),
        source,
    })?;
    fdpass::send(&stream, hello, &[])?;
    match fdpass::recv::<FromKeeper>(&stream)?.0 {
        FromKeeper::Reply(Reply::Welcome { keeper, children }) => Ok((stream, (keeper, children))),
        FromKeeper::Reply(Reply::Refused(why)) => Err(KeeperError::Refused(why)),
        FromKeeper::Reply(other) => Err(KeeperError::Unexpected(Box::new(other))),
        FromKeeper::Event(e) => Err(KeeperError::Refused(format!(
            "an event before the welcome: {e:?}"
        ))),
    }
}

/// A plain, blocking connection to a keeper (tools and tests; a shell uses
/// [`KeeperLink`]).
pub struct KeeperClient {
    stream: UnixStream,
    /// Events that arrived while waiting for a reply, oldest first.
    events: std::collections::VecDeque<Event>,
    /// The keeper's pid and its children when this connection began.
    welcome: (u32, Vec<Kept>),
}

impl std::fmt::Debug for KeeperClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeeperClient")
            .field("keeper", &self.welcome.0)
            .finish_non_exhaustive()
    }
}

impl KeeperClient {
    /// Connects to the keeper at `socket` as `hello` says.
    pub fn connect(socket: &Path, hello: &Hello) -> Result<Self, KeeperError> {
        let (stream, welcome) = handshake(socket, hello)?;
        Ok(Self {
            stream,
            events: std::collections::VecDeque::new(),
            welcome,
        })
    }

    /// The keeper's pid and its children when this connection began.
    pub fn welcome(&self) -> (u32, &[Kept]) {
        (self.welcome.0, &self.welcome.1)
    }

    fn read_reply(&mut self) -> Result<Reply, KeeperError> {
        loop {
            match fdpass::recv::<FromKeeper>(&self.stream)?.0 {
                FromKeeper::Reply(r) => return Ok(r),
                FromKeeper::Event(e) => self.events.push_back(e),
            }
        }
    }

    /// Sends `request` and returns its reply (a refusal as an error).
    pub fn call(&mut self, request: &Request) -> Result<Reply, KeeperError> {
        fdpass::send(&self.stream, request, &[])?;
        match self.read_reply()? {
            Reply::Refused(why) => Err(KeeperError::Refused(why)),
            r => Ok(r),
        }
    }

    /// Starts `spec`; its pid.
    pub fn spawn(&mut self, spec: SpawnSpec) -> Result<u32, KeeperError> {
        match self.call(&Request::Spawn(spec))? {
            Reply::Spawned { pid } => Ok(pid),
            other => Err(KeeperError::Unexpected(Box::new(other))),
        }
    }

    /// The next event: one that came while waiting for a reply, else one
    /// read now (waiting at most `timeout`); `None` on timeout.
    pub fn wait_event(&mut self, timeout: Duration) -> Result<Option<Event>, KeeperError> {
        if let Some(e) = self.events.pop_front() {
            return Ok(Some(e));
        }
        self.stream
            .set_read_timeout(Some(timeout))
            .map_err(FdPassError::from)?;
        let got = fdpass::recv::<FromKeeper>(&self.stream);
        self.stream
            .set_read_timeout(None)
            .map_err(FdPassError::from)?;
        match got {
            Ok((FromKeeper::Event(e), _)) => Ok(Some(e)),
            Ok((FromKeeper::Reply(r), _)) => Err(KeeperError::Unexpected(Box::new(r))),
            Err(FdPassError::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(e.into()),
        }
    }
}

/// How a kept process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    /// Its exit code, if it exited.
    pub code: Option<i32>,
    /// The signal that ended it, if one did.
    pub signal: Option<i32>,
}

impl Exit {
    /// As a `std` exit status.
    pub fn status(self) -> std::process::ExitStatus {
        match (self.code, self.signal) {
            (Some(code), _) => std::process::ExitStatus::from_raw((code & 0xff) << 8),
            (None, Some(signal)) => std::process::ExitStatus::from_raw(signal & 0x7f),
            (None, None) => std::process::ExitStatus::from_raw(0xff << 8),
        }
    }
}

/// Exits waited for, and those that came before anyone waited.
#[derive(Default)]
struct Exits {
    waiting: std::collections::HashMap<u32, tokio::sync::oneshot::Sender<Exit>>,
    early: std::collections::HashMap<u32, Exit>,
}

/// A shell's live link to its keeper, usable from any task: one request at a
/// time (blocking: call it from `spawn_blocking`), each child's exit routed
/// to whoever waits for it ([`KeeperLink::exit_of`]), and a token cancelled
/// when the keeper is gone.
pub struct KeeperLink {
    writer: Mutex<UnixStream>,
    replies: Mutex<mpsc::Receiver<Reply>>,
    exits: Arc<Mutex<Exits>>,
    lost: tokio_util::sync::CancellationToken,
    promoted: Arc<std::sync::atomic::AtomicBool>,
    welcome: (u32, Vec<Kept>),
    token: String,
}

impl std::fmt::Debug for KeeperLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeeperLink")
            .field("keeper", &self.welcome.0)
            .finish_non_exhaustive()
    }
}

/// Letting go of the link ends the connection (its reader holds a copy of
/// the socket, which alone would keep it open).
impl Drop for KeeperLink {
    fn drop(&mut self) {
        let w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let _ = w.shutdown(std::net::Shutdown::Both);
    }
}

impl KeeperLink {
    /// Connects as `hello` says and starts reading what the keeper sends.
    pub fn connect(socket: &Path, hello: &Hello) -> Result<Arc<Self>, KeeperError> {
        let (stream, welcome) = handshake(socket, hello)?;
        let reader = stream.try_clone().map_err(FdPassError::from)?;
        let (replies_tx, replies) = mpsc::channel();
        let exits: Arc<Mutex<Exits>> = Arc::default();
        let lost = tokio_util::sync::CancellationToken::new();
        let promoted = Arc::new(std::sync::atomic::AtomicBool::new(matches!(
            hello,
            Hello::Owner { .. }
        )));
        {
            let (exits, lost, promoted) = (exits.clone(), lost.clone(), promoted.clone());
            std::thread::spawn(move || {
                while let Ok((msg, _)) = fdpass::recv::<FromKeeper>(&reader) {
                    match msg {
                        FromKeeper::Reply(r) => {
                            if let Reply::Spawned { pid } = &r {
                                // A new child: an exit kept for an older
                                // process of the same pid (pids are reused)
                                // is not its. Dropped here, in order, before
                                // any exit of the new child can arrive.
                                exits
                                    .lock()
                                    .unwrap_or_else(|p| p.into_inner())
                                    .early
                                    .remove(pid);
                            }
                            if replies_tx.send(r).is_err() {
                                break;
                            }
                        }
                        FromKeeper::Event(Event::Exited { pid, code, signal }) => {
                            let exit = Exit { code, signal };
                            let mut e = exits.lock().unwrap_or_else(|p| p.into_inner());
                            match e.waiting.remove(&pid) {
                                Some(tx) => {
                                    let _ = tx.send(exit);
                                }
                                None => {
                                    e.early.insert(pid, exit);
                                }
                            }
                        }
                        FromKeeper::Event(Event::Promoted) => {
                            promoted.store(true, std::sync::atomic::Ordering::SeqCst);
                        }
                    }
                }
                // The keeper is gone: nobody will hear of another exit. Said
                // first, so a waiter that finds its exit lost sees why.
                lost.cancel();
                exits
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .waiting
                    .clear();
            });
        }
        Ok(Arc::new(Self {
            writer: Mutex::new(stream),
            replies: Mutex::new(replies),
            exits,
            lost,
            promoted,
            welcome,
            token: match hello {
                Hello::Owner { token, .. } | Hello::Successor { token, .. } => token.clone(),
            },
        }))
    }

    /// The keeper's pid and its children when the link began.
    pub fn welcome(&self) -> (u32, &[Kept]) {
        (self.welcome.0, &self.welcome.1)
    }

    /// The keeper's token (what a shell taking over needs to join it).
    pub fn token(&self) -> &str {
        &self.token
    }

    /// Whether this link owns the keeper (a successor once promoted).
    pub fn owns(&self) -> bool {
        self.promoted.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Cancelled once the keeper is gone.
    pub fn lost(&self) -> tokio_util::sync::CancellationToken {
        self.lost.clone()
    }

    /// Sends `request` and waits for its reply (a refusal as an error).
    pub fn call(&self, request: &Request) -> Result<Reply, KeeperError> {
        // One request at a time: replies come in order.
        let replies = self.replies.lock().unwrap_or_else(|p| p.into_inner());
        {
            let w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
            fdpass::send(&w, request, &[])?;
        }
        match replies.recv() {
            Ok(Reply::Refused(why)) => Err(KeeperError::Refused(why)),
            Ok(Reply::Released) => {
                // The successor owns the keeper now; this link is its
                // successor until a `Promoted` says otherwise.
                self.promoted
                    .store(false, std::sync::atomic::Ordering::SeqCst);
                Ok(Reply::Released)
            }
            Ok(r) => Ok(r),
            Err(_) => Err(FdPassError::Closed.into()),
        }
    }

    /// How child `pid` ends (the receiver fails if the keeper goes first).
    pub fn exit_of(&self, pid: u32) -> tokio::sync::oneshot::Receiver<Exit> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let mut e = self.exits.lock().unwrap_or_else(|p| p.into_inner());
        match e.early.remove(&pid) {
            Some(exit) => {
                let _ = tx.send(exit);
            }
            None if self.lost.is_cancelled() => {}
            None => {
                e.waiting.insert(pid, tx);
            }
        }
        rx
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::process::alive;

    fn wait_until(what: &str, secs: u64, done: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while !done() {
            assert!(Instant::now() < deadline, "{what} within {secs} s");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    struct Running {
        dir: tempfile::TempDir,
        socket: PathBuf,
        thread: Option<std::thread::JoinHandle<Result<(), KeeperError>>>,
    }

    impl Running {
        fn start() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let socket = dir.path().join("keeper.sock");
            let s = socket.clone();
            let thread = std::thread::spawn(move || serve(&s, "secret".into()));
            wait_until("the socket", 10, || socket.exists());
            Self {
                dir,
                socket,
                thread: Some(thread),
            }
        }

        fn connect(&self, hello: Hello) -> Result<KeeperClient, KeeperError> {
            KeeperClient::connect(&self.socket, &hello)
        }

        fn owner(&self) -> KeeperClient {
            self.connect(Hello::Owner {
                version: KEEPER_VERSION,
                token: "secret".into(),
            })
            .unwrap()
        }

        fn successor(&self) -> KeeperClient {
            self.connect(Hello::Successor {
                version: KEEPER_VERSION,
                token: "secret".into(),
            })
            .unwrap()
        }

        fn spec(&self, label: &str, script: &str) -> SpawnSpec {
            SpawnSpec {
                program: "sh".into(),
                args: vec!["-c".into(), script.into()],
                dir: self.dir.path().to_owned(),
                env: vec![("WHO".into(), label.into())],
                log: self.dir.path().join(format!("{label}.log")),
                log_limit: 1 << 20,
                label: label.into(),
            }
        }

        fn join(&mut self) {
            self.thread.take().unwrap().join().unwrap().unwrap();
        }
    }

    fn exited(client: &mut KeeperClient, pid: u32) -> Event {
        loop {
            match client.wait_event(Duration::from_secs(20)).unwrap() {
                Some(e @ Event::Exited { pid: p, .. }) if p == pid => return e,
                Some(_) => {}
                None => panic!("no exit of {pid} within 20 s"),
            }
        }
    }

    #[test]
    fn the_owner_spawns_signals_and_hears_of_exits_and_logs_are_written() {
        let mut k = Running::start();
        let mut owner = k.owner();
        let pid = owner
            .spawn(k.spec("web", "echo started as $WHO; exec sleep 60"))
            .unwrap();
        assert!(alive(pid));
        let log = k.dir.path().join("web.log");
        wait_until("the log line", 10, || {
            std::fs::read_to_string(&log).is_ok_and(|l| l.contains("started as web"))
        });
        let listed = owner.call(&Request::List).unwrap();
        assert_eq!(
            listed,
            Reply::Children(vec![Kept {
                pid,
                label: "web".into()
            }])
        );
        owner
            .call(&Request::Signal {
                pid,
                signal: libc::SIGTERM,
            })
            .unwrap();
        assert_eq!(
            exited(&mut owner, pid),
            Event::Exited {
                pid,
                code: None,
                signal: Some(libc::SIGTERM)
            }
        );
        let quick = owner.spawn(k.spec("job", "exit 3")).unwrap();
        assert_eq!(
            exited(&mut owner, quick),
            Event::Exited {
                pid: quick,
                code: Some(3),
                signal: None
            }
        );
        // Not a child: refused. A program that is not there: refused, named.
        let e = owner
            .call(&Request::Signal {
                pid: 1,
                signal: libc::SIGTERM,
            })
            .unwrap_err();
        assert!(e.to_string().contains("not a child"), "{e}");
        let mut missing = k.spec("x", "");
        missing.program = "/nonexistent/program".into();
        let e = owner.spawn(missing).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/program"), "{e}");
        drop(owner);
        k.join();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_link_routes_each_exit_to_its_waiter_and_says_when_the_keeper_is_gone() {
        let k = Running::start();
        let link = KeeperLink::connect(
            &k.socket,
            &Hello::Owner {
                version: KEEPER_VERSION,
                token: "secret".into(),
            },
        )
        .unwrap();
        assert!(link.owns());
        let spawn = |spec: SpawnSpec| match link.call(&Request::Spawn(spec)).unwrap() {
            Reply::Spawned { pid } => pid,
            other => panic!("{other:?}"),
        };
        // One that exits before anyone waits: its exit is kept for the waiter.
        let quick = spawn(k.spec("quick", "exit 7"));
        let slow = spawn(k.spec("slow", "exec sleep 60"));
        tokio::time::sleep(Duration::from_millis(200)).await;
        let exit = link.exit_of(quick).await.unwrap();
        assert_eq!(
            exit,
            Exit {
                code: Some(7),
                signal: None
            }
        );
        assert_eq!(exit.status().code(), Some(7));
        let waiting = link.exit_of(slow);
        link.call(&Request::Signal {
            pid: slow,
            signal: libc::SIGKILL,
        })
        .unwrap();
        let exit = waiting.await.unwrap();
        assert_eq!(exit.signal, Some(libc::SIGKILL));
        assert_eq!(exit.status().signal(), Some(libc::SIGKILL));
        // A successor link is promoted when the owner goes without a release.
        let successor = KeeperLink::connect(
            &k.socket,
            &Hello::Successor {
                version: KEEPER_VERSION,
                token: "secret".into(),
            },
        )
        .unwrap();
        assert!(!successor.owns());
        let last = spawn(k.spec("last", "exec sleep 60"));
        let waiting = link.exit_of(last);
        let lost = link.lost();
        drop(link);
        assert!(
            waiting.await.is_err(),
            "a link let go hears of no more exits"
        );
        assert!(lost.is_cancelled());
        wait_until("the successor's promotion", 10, || successor.owns());
        assert!(alive(last));
        // Its keeper gone (no owner left), the link says so.
        let gone = successor.lost();
        let waiting = successor.exit_of(last);
        drop(successor);
        assert!(waiting.await.is_err());
        assert!(gone.is_cancelled());
        wait_until("the service to be stopped", 20, || !alive(last));
    }

    #[test]
    fn a_lost_owner_with_no_successor_takes_every_service_with_it() {
        let mut k = Running::start();
        let mut owner = k.owner();
        // One that ignores SIGTERM: killed after the grace.
        let stubborn = owner
            .spawn(k.spec("stubborn", "trap '' TERM; while :; do sleep 0.05; done"))
            .unwrap();
        let plain = owner.spawn(k.spec("plain", "exec sleep 60")).unwrap();
        // Nobody else may own it, nor act with a wrong token.
        assert!(
            k.connect(Hello::Owner {
                version: KEEPER_VERSION,
                token: "secret".into()
            })
            .is_err()
        );
        let e = k
            .connect(Hello::Successor {
                version: KEEPER_VERSION,
                token: "guess".into(),
            })
            .unwrap_err();
        assert!(e.to_string().contains("wrong token"), "{e}");
        let e = k
            .connect(Hello::Owner {
                version: KEEPER_VERSION + 1,
                token: "secret".into(),
            })
            .unwrap_err();
        assert!(e.to_string().contains("protocol"), "{e}");
        assert!(alive(stubborn) && alive(plain));
        // The owner dies (as with kill -9: its connection just ends).
        drop(owner);
        k.join();
        assert!(!alive(stubborn), "the stubborn service outlived the keeper");
        assert!(!alive(plain), "a service outlived the keeper");
        assert!(!k.socket.exists());
    }

    #[test]
    fn a_new_owner_lost_before_the_old_one_left_hands_the_keeper_back() {
        let mut k = Running::start();
        let mut old = k.owner();
        let pid = old.spawn(k.spec("web", "exec sleep 60")).unwrap();
        let mut new = k.successor();
        assert_eq!(old.call(&Request::Release).unwrap(), Reply::Released);
        assert_eq!(
            new.wait_event(Duration::from_secs(10)).unwrap(),
            Some(Event::Promoted)
        );
        // The old owner is the successor now: it may look, not act.
        let e = old
            .call(&Request::Signal {
                pid,
                signal: libc::SIGTERM,
            })
            .unwrap_err();
        assert!(e.to_string().contains("owner"), "{e}");
        // The new owner dies (a takeover failing after the release): the
        // old one owns the keeper again, and the service never stopped.
        drop(new);
        assert_eq!(
            old.wait_event(Duration::from_secs(10)).unwrap(),
            Some(Event::Promoted)
        );
        assert!(alive(pid));
        old.call(&Request::Signal {
            pid,
            signal: libc::SIGTERM,
        })
        .unwrap();
        assert!(matches!(exited(&mut old, pid), Event::Exited { .. }));
        drop(old);
        k.join();
    }

    #[test]
    fn a_successor_takes_over_the_running_services_and_a_failed_one_changes_nothing() {
        let mut k = Running::start();
        let mut old = k.owner();
        let pid = old.spawn(k.spec("web", "exec sleep 60")).unwrap();

        // A successor that dies before the release: the old owner keeps it all.
        let failed = k.successor();
        drop(failed);
        // A successor that takes over (once the failed one is seen gone): it
        // sees the child, is promoted at the release, and the old owner may
        // go without the service dying.
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut new = loop {
            match k.connect(Hello::Successor {
                version: KEEPER_VERSION,
                token: "secret".into(),
            }) {
                Ok(c) => break c,
                Err(e) => {
                    assert!(Instant::now() < deadline, "{e}");
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        };
        assert!(alive(pid));
        let listed = old.call(&Request::List).unwrap();
        assert!(matches!(listed, Reply::Children(c) if c.len() == 1));
        assert_eq!(new.welcome().1.len(), 1);
        assert_eq!(new.welcome().1[0].pid, pid);
        // Before the release it may look, not act.
        let e = new
            .call(&Request::Signal {
                pid,
                signal: libc::SIGTERM,
            })
            .unwrap_err();
        assert!(e.to_string().contains("owner"), "{e}");
        assert_eq!(old.call(&Request::Release).unwrap(), Reply::Released);
        drop(old);
        assert_eq!(
            new.wait_event(Duration::from_secs(10)).unwrap(),
            Some(Event::Promoted)
        );
        std::thread::sleep(Duration::from_millis(100));
        assert!(alive(pid), "the service died with the old owner");
        new.call(&Request::Signal {
            pid,
            signal: libc::SIGTERM,
        })
        .unwrap();
        assert!(matches!(exited(&mut new, pid), Event::Exited { .. }));

        // An owner lost during a takeover: the successor is promoted.
        let next = new.spawn(k.spec("web2", "exec sleep 60")).unwrap();
        let mut third = k.successor();
        drop(new);
        assert_eq!(
            third.wait_event(Duration::from_secs(10)).unwrap(),
            Some(Event::Promoted)
        );
        assert!(alive(next));
        drop(third);
        k.join();
        assert!(!alive(next));
    }
}
