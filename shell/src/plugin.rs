//! Plugin services: cdylibs served inside the shell and swapped with their state.
//!
//! A [`PluginHost`] serves one plugin service over HTTP on a loopback port (the
//! service's fronts route to it like to any process) and dispatches each request
//! to the plugin generation current at its arrival, through the C ABI of
//! `molt-plugin-sdk`.
//!
//! Each load copies the built library to a path of its own first: `dlopen`
//! returns the already loaded library for a path it knows, so loading a new
//! build from the old path would run the old code. Every call into a library
//! runs on threads that belong to that load, and those threads end before the
//! library is closed: a thread-local with a destructor, touched by the plugin
//! on a thread that lives on, would keep the library mapped.
//!
//! A swap ([`PluginHost::swap`]) loads and checks the new library first (an
//! ABI mismatch is refused while the old one serves on), then pauses dispatch:
//! it takes the write side of a lock that every request holds the read side of
//! for its whole call, so it waits for the calls in flight and holds new ones.
//! It exports the old instance's state, creates the new instance from it (a
//! failure resumes the old one), switches, and resumes; then the old
//! generation's threads end, its instance is destroyed and its library closed
//! and deleted.

use std::convert::Infallible;
use std::ffi::c_void;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Request as HttpRequest, Response as HttpResponse, StatusCode};
use molt_plugin_sdk::{ABI_VERSION, ENTRY_SYMBOL, EntryFn, OK, PANICKED, PluginTable, RawBuffer};
use molt_plugin_sdk::{Request, Response};
use tokio::net::TcpListener;
use tokio::sync::{RwLock, oneshot};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

mod connection;

/// The largest request body a plugin is given.
pub const MAX_BODY: usize = 16 << 20;

/// Threads per loaded library that run its calls.
const THREADS: usize = 2;

/// Why a plugin could not be loaded, created, called or swapped.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    /// The library file could not be copied to its load path.
    #[error("`{path}`: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// `dlopen` or `dlsym` failed.
    #[error("cannot load `{path}`: {reason}")]
    Load {
        /// The library.
        path: PathBuf,
        /// The loader's message.
        reason: String,
    },
    /// The library was built for another ABI.
    #[error("`{path}` speaks plugin ABI {found}; this shell speaks {expected}")]
    Abi {
        /// The library.
        path: PathBuf,
        /// Its version.
        found: u32,
        /// Ours.
        expected: u32,
    },
    /// The plugin refused to create an instance (or panicked doing so).
    #[error("the plugin could not start: {0}")]
    Create(String),
    /// The plugin failed or panicked while exporting its state.
    #[error("the plugin could not export its state: {0}")]
    Export(String),
    /// The library's threads are gone (it was unloaded).
    #[error("the plugin is no longer loaded")]
    Gone,
}

/// A call to run on a library's own threads.
type Job = Box<dyn FnOnce() + Send>;

/// The threads one loaded library's calls run on.
struct Workers {
    jobs: Option<mpsc::Sender<Job>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Workers {
    fn start(name: &str) -> Result<Self, std::io::Error> {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        let mut threads = Vec::new();
        for i in 0..THREADS {
            let rx = rx.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("plugin-{name}-{i}"))
                    .spawn(move || {
                        loop {
                            let job = match rx.lock() {
                                Ok(rx) => rx.recv(),
                                Err(_) => return,
                            };
                            match job {
                                Ok(job) => job(),
                                Err(_) => return,
                            }
                        }
                    })?,
            );
        }
        Ok(Self {
            jobs: Some(tx),
            threads,
        })
    }

    /// Runs `f` on one of the threads and waits for its result.
    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, PluginError> {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = tx.send(f());
        });
        self.jobs
            .as_ref()
            .ok_or(PluginError::Gone)?
            .send(job)
            .map_err(|_| PluginError::Gone)?;
        rx.await.map_err(|_| PluginError::Gone)
    }

    /// Ends the threads (after the jobs already queued) and waits for them.
    fn stop(&mut self) {
        self.jobs = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// The table and an instance pointer, as the library's threads use them.
#[derive(Clone, Copy)]
struct Raw {
    table: *const PluginTable,
    instance: *mut c_void,
}

// SAFETY: the table is a static of the loaded library, which outlives every call
// (the library closes only after its threads end); the instance is a `Plugin`,
// which the SDK requires to be `Send + Sync`.
#[allow(unsafe_code)]
unsafe impl Send for Raw {}
// SAFETY: as for `Send`: shared use only reads the two pointers.
#[allow(unsafe_code)]
unsafe impl Sync for Raw {}

impl Raw {
    /// Destroys the instance. Only once no call is in flight (the host holds
    /// the write lock, or has dropped the generation) and never again.
    fn destroy(self) {
        // SAFETY: per the above, the instance is used no more.
        #[allow(unsafe_code)]
        unsafe {
            ((*self.table).destroy)(self.instance)
        }
    }

    /// Takes a buffer the plugin lent: copies it, gives it back.
    fn take(self, buffer: RawBuffer) -> Vec<u8> {
        // SAFETY: `buffer` was just written by a call of this table; it is read
        // once and given back to the library that allocated it, once.
        #[allow(unsafe_code)]
        unsafe {
            let bytes = buffer.as_slice().to_vec();
            ((*self.table).free_buffer)(buffer);
            bytes
        }
    }
}

/// One loaded library with its instance and threads.
struct Loaded {
    path: PathBuf,
    raw: Raw,
    workers: Workers,
    library: Option<libloading::Library>,
}

static LOADS: AtomicU64 = AtomicU64::new(0);

impl Loaded {
    /// Copies `built` to a path of its own under `dir`, loads it and checks its
    /// ABI. No instance yet.
    async fn load(built: &Path, dir: &Path, name: &str) -> Result<Self, PluginError> {
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| PluginError::Io { path, source }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let n = LOADS.fetch_add(1, Ordering::SeqCst);
        let path = dir.join(format!("{name}-{}-{n}.so", std::process::id()));
        std::fs::copy(built, &path).map_err(io(&path))?;
        let workers = Workers::start(name).map_err(io(&path))?;
        let load_path = path.clone();
        let loaded = workers
            .run(
                move || -> Result<(libloading::Library, usize), PluginError> {
                    let err = |e: libloading::Error| PluginError::Load {
                        path: load_path.clone(),
                        reason: e.to_string(),
                    };
                    // SAFETY: loading runs the library's initialisers; a plugin
                    // library is code the operator chose to run in the shell.
                    #[allow(unsafe_code)]
                    unsafe {
                        let library = libloading::Library::new(&load_path).map_err(err)?;
                        let entry: libloading::Symbol<'_, EntryFn> =
                            library.get(ENTRY_SYMBOL.as_bytes()).map_err(err)?;
                        let table = entry();
                        if table.is_null() {
                            return Err(PluginError::Load {
                                path: load_path.clone(),
                                reason: format!("{ENTRY_SYMBOL} returned no table"),
                            });
                        }
                        let version = (*table).abi_version;
                        if version != ABI_VERSION {
                            return Err(PluginError::Abi {
                                path: load_path.clone(),
                                found: version,
                                expected: ABI_VERSION,
                            });
                        }
                        Ok((library, table as usize))
                    }
                },
            )
            .await;
        let mut this = Self {
            path,
            raw: Raw {
                table: std::ptr::null(),
                instance: std::ptr::null_mut(),
            },
            workers,
            library: None,
        };
        match loaded {
            Ok(Ok((library, table))) => {
                this.library = Some(library);
                this.raw.table = table as *const PluginTable;
                Ok(this)
            }
            Ok(Err(e)) | Err(e) => Err(e),
        }
    }

    /// Creates the instance, from `state` if given.
    async fn create(&mut self, state: Option<Vec<u8>>) -> Result<(), PluginError> {
        let raw = self.raw;
        let (code, instance, message) = self
            .workers
            .run(move || {
                let mut instance: *mut c_void = std::ptr::null_mut();
                let mut err = RawBuffer::empty();
                let (ptr, len) = state
                    .as_ref()
                    .map_or((std::ptr::null(), 0), |s| (s.as_ptr(), s.len()));
                // SAFETY: the table is loaded and checked; `state` lives through
                // the call; the out pointers are valid.
                #[allow(unsafe_code)]
                let code = unsafe { ((*raw.table).create)(ptr, len, &mut instance, &mut err) };
                let message = raw.take(err);
                (code, instance as usize, message)
            })
            .await?;
        if code != OK || instance == 0 {
            return Err(PluginError::Create(
                String::from_utf8_lossy(&message).into_owned(),
            ));
        }
        self.raw.instance = instance as *mut c_void;
        Ok(())
    }

    /// The instance's exported state.
    async fn export(&self) -> Result<Vec<u8>, PluginError> {
        let raw = self.raw;
        let (code, bytes) = self
            .workers
            .run(move || {
                let mut out = RawBuffer::empty();
                // SAFETY: a live instance of this table; a valid out pointer.
                #[allow(unsafe_code)]
                let code = unsafe { ((*raw.table).export_state)(raw.instance, &mut out) };
                (code, raw.take(out))
            })
            .await?;
        if code == OK {
            Ok(bytes)
        } else {
            Err(PluginError::Export(
                String::from_utf8_lossy(&bytes).into_owned(),
            ))
        }
    }

    /// Answers one request (a failure or panic of the plugin is a 500).
    async fn handle(&self, request: Request) -> Response {
        let raw = self.raw;
        let encoded = request.encode();
        let called = self
            .workers
            .run(move || {
                let mut out = RawBuffer::empty();
                // SAFETY: a live instance of this table; the request bytes live
                // through the call; a valid out pointer.
                #[allow(unsafe_code)]
                let code = unsafe {
                    ((*raw.table).handle)(raw.instance, encoded.as_ptr(), encoded.len(), &mut out)
                };
                (code, raw.take(out))
            })
            .await;
        match called {
            Ok((OK, bytes)) => Response::decode(&bytes).unwrap_or_else(|e| {
                Response::text(500, format!("the plugin answered garbage: {e}\n"))
            }),
            Ok((PANICKED, bytes)) => {
                let message = String::from_utf8_lossy(&bytes);
                warn!(%message, "plugin panicked; answering 500");
                Response::text(500, format!("the plugin panicked: {message}\n"))
            }
            Ok((_, bytes)) => Response::text(
                500,
                format!("the plugin failed: {}\n", String::from_utf8_lossy(&bytes)),
            ),
            Err(e) => Response::text(503, format!("{e}\n")),
        }
    }

    /// Destroys the instance, ends the threads, closes and deletes the library.
    fn unload(&mut self) {
        let raw = self.raw;
        if !raw.instance.is_null()
            && let Some(jobs) = &self.workers.jobs
        {
            let _ = jobs.send(Box::new(move || raw.destroy()));
        }
        self.workers.stop();
        self.raw.instance = std::ptr::null_mut();
        if let Some(library) = self.library.take()
            && let Err(e) = library.close()
        {
            warn!(path = %self.path.display(), error = %e, "closing a plugin library failed");
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Drop for Loaded {
    fn drop(&mut self) {
        self.unload();
    }
}

/// One plugin service served on a loopback port (see the module docs).
///
/// Dropping it stops serving (its server and connections end, and the library
/// is unloaded with the last of them); [`PluginHost::shutdown`] does the same
/// and waits.
pub struct PluginHost {
    name: String,
    dir: PathBuf,
    current: Arc<RwLock<Loaded>>,
    addr: SocketAddr,
    stop: CancellationToken,
    server: tokio::task::JoinHandle<()>,
    /// Cancels `stop` when the host is dropped without a shutdown.
    _stop_on_drop: tokio_util::sync::DropGuard,
}

impl std::fmt::Debug for PluginHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginHost")
            .field("name", &self.name)
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

/// What a swap did.
#[derive(Debug, Clone, Copy)]
pub struct Swapped {
    /// How long dispatch was paused (waiting for calls in flight, exporting,
    /// creating, switching).
    pub pause: Duration,
    /// Bytes of state handed over.
    pub state_bytes: usize,
}

impl PluginHost {
    /// Loads `built` (copied under `dir`), creates its first instance (with
    /// `state`, if any) and serves it on 127.0.0.1 on a free port.
    pub async fn start(
        name: &str,
        built: &Path,
        dir: &Path,
        state: Option<Vec<u8>>,
    ) -> Result<Self, PluginError> {
        let mut loaded = Loaded::load(built, dir, name).await?;
        loaded.create(state).await?;
        info!(plugin = name, path = %loaded.path.display(), "plugin loaded");
        let current = Arc::new(RwLock::new(loaded));
        let listener = TcpListener::bind(("127.0.0.1", 0))
            .await
            .map_err(|source| PluginError::Io {
                path: dir.to_owned(),
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| PluginError::Io {
            path: dir.to_owned(),
            source,
        })?;
        let stop = CancellationToken::new();
        let server = tokio::spawn(serve(listener, current.clone(), stop.clone()));
        Ok(Self {
            name: name.to_owned(),
            dir: dir.to_owned(),
            current,
            addr,
            _stop_on_drop: stop.clone().drop_guard(),
            stop,
            server,
        })
    }

    /// Where it serves HTTP (what the service's fronts route to).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The path the current library was loaded from.
    pub async fn loaded_path(&self) -> PathBuf {
        self.current.read().await.path.clone()
    }

    /// Swaps to the library at `built`, keeping the state (see the module docs).
    /// On any error the old plugin keeps serving.
    pub async fn swap(&self, built: &Path) -> Result<Swapped, PluginError> {
        let mut next = Loaded::load(built, &self.dir, &self.name).await?;
        let paused = Instant::now();
        let mut current = self.current.write().await;
        let state = current.export().await?;
        let state_bytes = state.len();
        next.create(Some(state)).await?;
        let mut old = std::mem::replace(&mut *current, next);
        drop(current);
        let pause = paused.elapsed();
        info!(plugin = %self.name, ?pause, state_bytes, "plugin swapped");
        // The old library: its threads end, then it is closed.
        let _ = tokio::task::spawn_blocking(move || old.unload()).await;
        Ok(Swapped { pause, state_bytes })
    }

    /// Stops serving and unloads the plugin.
    pub async fn shutdown(self) {
        let _ = self.stop_with_state(false).await;
    }

    /// Stops serving, exports the plugin's state once no call is in flight,
    /// and unloads it: what a later [`PluginHost::start`] takes up again.
    pub async fn stop_exporting(self) -> Result<Vec<u8>, PluginError> {
        self.stop_with_state(true)
            .await
            .map(|state| state.unwrap_or_default())
    }

    async fn stop_with_state(self, export: bool) -> Result<Option<Vec<u8>>, PluginError> {
        self.stop.cancel();
        let _ = self.server.await;
        // Every connection task has ended, so nothing else holds the lock.
        let mut loaded = match Arc::try_unwrap(self.current) {
            Ok(lock) => lock.into_inner(),
            Err(shared) => {
                // Not expected; export through the lock and leave the unload
                // to the last holder.
                let state = if export {
                    Some(shared.write().await.export().await?)
                } else {
                    None
                };
                return Ok(state);
            }
        };
        let state = if export {
            Some(loaded.export().await)
        } else {
            None
        };
        let _ = tokio::task::spawn_blocking(move || loaded.unload()).await;
        state.transpose()
    }
}

async fn serve(listener: TcpListener, current: Arc<RwLock<Loaded>>, stop: CancellationToken) {
    let mut conns = JoinSet::new();
    loop {
        while conns.try_join_next().is_some() {}
        let stream = tokio::select! {
            () = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((s, _)) => s,
                Err(e) => {
                    debug!(error = %e, "accept failed");
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let current = current.clone();
        let stop = stop.clone();
        let service = hyper::service::service_fn(move |req| dispatch(current.clone(), req));
        conns.spawn(connection::serve_http1(stream, service, stop));
    }
    conns.shutdown().await;
}

/// One HTTP request → one plugin call, on the generation current at arrival.
async fn dispatch(
    current: Arc<RwLock<Loaded>>,
    req: HttpRequest<Incoming>,
) -> Result<HttpResponse<Full<Bytes>>, Infallible> {
    let (parts, body) = req.into_parts();
    let body = match Limited::new(body, MAX_BODY).collect().await {
        Ok(b) => b.to_bytes().to_vec(),
        Err(_) => {
            return Ok(reply(Response::text(
                413,
                format!("a request body is at most {MAX_BODY} bytes\n"),
            )));
        }
    };
    let request = Request {
        method: parts.method.to_string(),
        path: parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned(),
        headers: parts
            .headers
            .iter()
            .filter_map(|(k, v)| Some((k.to_string(), v.to_str().ok()?.to_owned())))
            .collect(),
        body,
    };
    // The read side is held for the whole call: a swap waits for it.
    let loaded = current.read().await;
    Ok(reply(loaded.handle(request).await))
}

fn reply(response: Response) -> HttpResponse<Full<Bytes>> {
    let mut out = HttpResponse::new(Full::new(Bytes::from(response.body)));
    *out.status_mut() =
        StatusCode::from_u16(response.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    for (k, v) in response.headers {
        if let (Ok(k), Ok(v)) = (
            hyper::header::HeaderName::from_bytes(k.as_bytes()),
            hyper::header::HeaderValue::from_str(&v),
        ) {
            out.headers_mut().append(k, v);
        }
    }
    out
}

/// The SDK's source, as plugin builds find it at `.molt/plugin-sdk` in their
/// release (see `molt-plugin-sdk`).
const SDK_SOURCE: &str = include_str!("../../plugin-sdk/src/lib.rs");

/// Writes the plugin SDK into a plugin release before its build.
pub fn provide_sdk(release: &Path) -> std::io::Result<()> {
    let dir = release.join(".molt/plugin-sdk");
    std::fs::create_dir_all(dir.join("src"))?;
    std::fs::write(
        dir.join("Cargo.toml"),
        format!(
            "# Written by the molt shell for plugin builds.\n\
             [package]\nname = \"molt-plugin-sdk\"\nversion = \"{}\"\nedition = \"2024\"\n",
            env!("CARGO_PKG_VERSION")
        ),
    )?;
    std::fs::write(dir.join("src/lib.rs"), SDK_SOURCE)
}
