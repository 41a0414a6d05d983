//! A public port: the routing table it follows, the listener and its accept
//! loop, the work it has in flight per backend, and the per-connection front
//! for `tcp` ports.
//!
//! Where new work goes is one [`Router`] per instance: a table from each public
//! port's route key to its backend, replaced as a whole, so a change to several
//! routes (a shadow generation's cutover) takes effect for all of them at one
//! instant — no request can see one route switched and another not.
//!
//! [`bind_tcp`] accepts on the public address and connects each new connection to
//! the backend its route names at that moment; a connection stays with its
//! backend until it ends, so a [`Router::set`] moves only new connections (old
//! ones drain on the old process). While there is no backend (a service with
//! `overlap = false` between its stop and its start), new connections are held
//! for up to the hold time instead of being refused. [`Front::busy`] counts the
//! connections (or, for HTTP, requests) still open on a backend, so an upgrade
//! can wait for the old process to drain.
//!
//! Each front serves at most [`FrontConfig::max_connections`] client
//! connections at once: one more is accepted and closed at once, and
//! accepted again as soon as another has ended.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore, watch};
use tokio::task::JoinSet;

use crate::FrontConfig;

/// How long the accept loop waits after an error other than a connection
/// given up before it was accepted: out of file descriptors or memory, say,
/// which retrying at once would only turn into a busy loop.
const ACCEPT_PAUSE: Duration = Duration::from_millis(50);

/// Connections (or requests) currently open per backend.
pub(crate) type Counts = Arc<Mutex<HashMap<SocketAddr, Counter>>>;

/// One backend's count of connections or requests in flight.
pub(crate) type Counter = Arc<AtomicUsize>;

/// The counter of `backend` (made on first use). Callers that serve many
/// requests to one backend keep it, so the map's lock is taken once per backend,
/// not once per request.
pub(crate) fn counter(counts: &Counts, backend: SocketAddr) -> Counter {
    match counts.lock() {
        Ok(mut m) => m.entry(backend).or_default().clone(),
        // A poisoned map: count on a counter nobody reads rather than fail.
        Err(_) => Counter::default(),
    }
}

/// Counts one connection or request against its backend while it lives.
pub(crate) struct Busy(Counter);

impl Busy {
    pub(crate) fn new(counter: &Counter) -> Self {
        counter.fetch_add(1, Ordering::SeqCst);
        Self(counter.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A front's stop signal: set once, seen by its accept loop and every
/// connection. Checking it is one atomic load, so a connection may look at it
/// between any two requests.
#[derive(Debug, Clone, Default)]
pub(crate) struct Stop(Arc<StopInner>);

#[derive(Debug, Default)]
struct StopInner {
    stopped: std::sync::atomic::AtomicBool,
    notify: Notify,
}

impl Stop {
    /// Stops: every waiter of [`Stop::stopped`] wakes, and later ones return at once.
    pub(crate) fn stop(&self) {
        self.0.stopped.store(true, Ordering::SeqCst);
        self.0.notify.notify_waiters();
    }

    /// Whether [`Stop::stop`] was called.
    pub(crate) fn is_stopped(&self) -> bool {
        self.0.stopped.load(Ordering::SeqCst)
    }

    /// Resolves once [`Stop::stop`] has been called.
    pub(crate) async fn stopped(&self) {
        let notified = self.0.notify.notified();
        tokio::pin!(notified);
        // Registered before the flag is checked, so a stop in between wakes it.
        notified.as_mut().enable();
        if self.is_stopped() {
            return;
        }
        notified.await;
    }
}

/// Backends by route key; a key that is absent holds its work.
type Table = BTreeMap<String, SocketAddr>;

/// An instance's routing table (see the module docs). Cloning shares it.
#[derive(Debug, Clone)]
pub struct Router {
    table: Arc<watch::Sender<Arc<Table>>>,
}

impl Default for Router {
    fn default() -> Self {
        Self::new()
    }
}

impl Router {
    /// An empty table: every route holds its work.
    pub fn new() -> Self {
        Self {
            table: Arc::new(watch::channel(Arc::new(Table::new())).0),
        }
    }

    /// What a front follows: the backend of `key`, whenever the table changes.
    pub fn route(&self, key: impl Into<String>) -> Route {
        Route {
            table: self.table.subscribe(),
            key: key.into(),
        }
    }

    /// Applies every change (`None`: hold that route's work) as one new table.
    pub fn set(&self, changes: impl IntoIterator<Item = (String, Option<SocketAddr>)>) {
        let mut next: Table = (**self.table.borrow()).clone();
        for (key, backend) in changes {
            match backend {
                Some(b) => next.insert(key, b),
                None => next.remove(&key),
            };
        }
        self.table.send_replace(Arc::new(next));
    }

    /// The backend `key` sends new work to now.
    pub fn get(&self, key: &str) -> Option<SocketAddr> {
        self.table.borrow().get(key).copied()
    }
}

/// One route of a [`Router`]: what a front reads for each new piece of work.
#[derive(Debug, Clone)]
pub struct Route {
    table: watch::Receiver<Arc<Table>>,
    key: String,
}

/// What a front's connection handler gets besides the client connection.
#[derive(Clone)]
pub(crate) struct Routing {
    /// The route new work follows.
    pub(crate) route: Route,
    /// How long to hold new work while there is no backend.
    pub(crate) hold: Duration,
    /// Work in flight per backend.
    pub(crate) counts: Counts,
    /// Set when the front shuts down.
    pub(crate) stop: Stop,
    /// Set when the front drains ([`Front::drain`]): no new connection, and
    /// each open one ends after answering its next request.
    pub(crate) draining: Stop,
    /// The route's backend as last read, until the table changes (`None`:
    /// not read yet).
    pub(crate) seen: Option<Option<SocketAddr>>,
    /// How many times the table was read: what a connection compares to know
    /// the table changed since it looked something up.
    pub(crate) table_reads: u64,
}

impl Routing {
    /// The backend now, if there is one (no waiting). The table is read again
    /// only after it changed: checking for a change is one atomic load, while
    /// reading takes the table's lock, which every connection would contend on.
    pub(crate) fn now(&mut self) -> Option<SocketAddr> {
        let changed = self.route.table.has_changed().unwrap_or(true);
        match self.seen {
            Some(backend) if !changed => backend,
            _ => {
                let table = self.route.table.borrow_and_update();
                let backend = table.get(self.route.key.as_str()).copied();
                self.seen = Some(backend);
                self.table_reads += 1;
                backend
            }
        }
    }

    /// Whether the table changed since it was last read here (one atomic load).
    pub(crate) fn route_changed(&self) -> bool {
        self.route.table.has_changed().unwrap_or(false)
    }

    /// The backend, waiting up to the hold time while there is none.
    pub(crate) async fn current(&mut self) -> Option<SocketAddr> {
        // The common case, without arming a timer: there is a backend.
        if let Some(backend) = self.now() {
            return Some(backend);
        }
        let Route { table, key } = &mut self.route;
        let backend =
            match tokio::time::timeout(self.hold, table.wait_for(|t| t.contains_key(key))).await {
                Ok(Ok(t)) => t.get(key).copied(),
                _ => None,
            };
        // `wait_for` marked the table seen: read it afresh next time.
        self.seen = None;
        backend
    }
}

/// A public port owned by the shell: the listener, its accept loop, and the
/// route it follows. [`bind_tcp`] and [`crate::bind_http`] make one;
/// they differ only in what they do with each client connection.
#[derive(Debug)]
pub struct Front {
    addr: SocketAddr,
    counts: Counts,
    /// One permit per client connection it may still take.
    permits: Arc<Semaphore>,
    /// How many permits there are in all.
    max_connections: usize,
    stop: Stop,
    draining: Stop,
    /// A copy of the listening socket, for [`Front::listener`].
    listener: std::os::fd::OwnedFd,
    task: Option<tokio::task::JoinHandle<()>>,
}

/// A front dropped without [`Front::shutdown`] stops too: it accepts no more,
/// and its connections end as `shutdown` would end them, in the background.
impl Drop for Front {
    fn drop(&mut self) {
        self.stop.stop();
    }
}

impl Front {
    /// Accepts on `listener` (bound here, or handed over from another
    /// process: see [`Front::listener`]) and runs `serve` for every client
    /// connection, at most `max_connections` at once.
    pub(crate) fn bind<F, Fut>(
        listener: Listen,
        route: Route,
        hold: Duration,
        max_connections: usize,
        serve: F,
    ) -> std::io::Result<Self>
    where
        F: Fn(TcpStream, Routing) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let listener = match listener {
            Listen::Bound(l) => l,
            Listen::Inherited(l) => {
                l.set_nonblocking(true)?;
                TcpListener::from_std(l)?
            }
        };
        let addr = listener.local_addr()?;
        let copy = {
            use std::os::fd::AsFd;
            listener.as_fd().try_clone_to_owned()?
        };
        let counts: Counts = Arc::default();
        let stop = Stop::default();
        let draining = Stop::default();
        let routing = Routing {
            route,
            hold,
            counts: counts.clone(),
            stop: stop.clone(),
            draining: draining.clone(),
            seen: None,
            table_reads: 0,
        };
        let max_connections = max_connections.min(Semaphore::MAX_PERMITS);
        let permits = Arc::new(Semaphore::new(max_connections));
        let task = tokio::spawn(accept_loop(listener, routing, permits.clone(), serve));
        Ok(Self {
            addr,
            counts,
            permits,
            max_connections,
            stop,
            draining,
            listener: copy,
            task: Some(task),
        })
    }

    /// A copy of the listening socket, to hand to another process (a shell
    /// taking over): it accepts from the same queue, so a connection waiting
    /// there is taken by whichever front accepts first, never refused.
    pub fn listener(&self) -> std::io::Result<std::net::TcpListener> {
        Ok(std::net::TcpListener::from(self.listener.try_clone()?))
    }

    /// Stops accepting and lets the open connections finish: an HTTP
    /// connection answers its next request (or the one in flight) with
    /// `Connection: close` and ends, or ends after [`DRAIN_IDLE`] without
    /// one; a TCP connection runs until it ends. What is still open after
    /// `grace` is ended as by [`Front::shutdown`]. Returns how many were
    /// ended so.
    pub async fn drain(mut self, grace: Duration) -> usize {
        self.draining.stop();
        let Some(mut task) = self.task.take() else {
            return 0;
        };
        match tokio::time::timeout(grace, &mut task).await {
            Ok(_) => 0,
            Err(_) => {
                let cut = self.connections();
                self.stop.stop();
                let _ = task.await;
                cut
            }
        }
    }

    /// The public address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Client connections open now (at most
    /// [`FrontConfig::max_connections`]).
    pub fn connections(&self) -> usize {
        self.max_connections - self.permits.available_permits()
    }

    /// Connections (TCP) or requests (HTTP) still open on `backend`: what an
    /// upgrade waits on to drain the old process.
    pub fn busy(&self, backend: SocketAddr) -> usize {
        self.counts
            .lock()
            .map(|m| m.get(&backend).map_or(0, |c| c.load(Ordering::SeqCst)))
            .unwrap_or(0)
    }

    /// Forgets `backend`'s counter once nothing is in flight on it (after a
    /// drain: new work no longer goes there), so counters do not pile up over
    /// upgrades.
    pub fn forget(&self, backend: SocketAddr) {
        if let Ok(mut m) = self.counts.lock()
            && m.get(&backend)
                .is_some_and(|c| c.load(Ordering::SeqCst) == 0)
        {
            m.remove(&backend);
        }
    }

    /// The number of backends with a counter (for tests of [`Front::forget`]).
    #[cfg(test)]
    pub(crate) fn counted_backends(&self) -> usize {
        self.counts.lock().map(|m| m.len()).unwrap_or(0)
    }

    /// Stops accepting and ends every client connection.
    pub async fn shutdown(mut self) {
        self.stop.stop();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

async fn accept_loop<F, Fut>(
    listener: TcpListener,
    routing: Routing,
    permits: Arc<Semaphore>,
    serve: F,
) where
    F: Fn(TcpStream, Routing) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    use std::io::ErrorKind::{ConnectionAborted, ConnectionReset, Interrupted};
    let mut conns = JoinSet::new();
    loop {
        while conns.try_join_next().is_some() {}
        let (client, _) = tokio::select! {
            () = routing.stop.stopped() => break,
            () = routing.draining.stopped() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) if matches!(e.kind(), ConnectionAborted | ConnectionReset | Interrupted) => {
                    continue;
                }
                Err(_) => {
                    tokio::select! {
                        () = routing.stop.stopped() => break,
                        () = tokio::time::sleep(ACCEPT_PAUSE) => continue,
                    }
                }
            },
        };
        // Over the limit: closed at once, before anything is read or spent.
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            drop(client);
            continue;
        };
        let _ = client.set_nodelay(true);
        let served = serve(client, routing.clone());
        conns.spawn(async move {
            served.await;
            drop(permit);
        });
    }
    drop(listener);
    // Draining: the connections end on their own, unless a stop comes first.
    if !routing.stop.is_stopped() {
        tokio::select! {
            () = async { while conns.join_next().await.is_some() {} } => {}
            () = routing.stop.stopped() => {}
        }
    }
    conns.shutdown().await;
}

/// Where a front's listening socket comes from.
pub(crate) enum Listen {
    /// Bound by this process.
    Bound(TcpListener),
    /// Handed over by another process ([`Front::listener`]).
    Inherited(std::net::TcpListener),
}

impl Listen {
    /// `public` bound now, or `inherited` taken as it is.
    pub(crate) async fn new(
        public: SocketAddr,
        inherited: Option<std::net::TcpListener>,
    ) -> std::io::Result<Self> {
        Ok(match inherited {
            Some(l) => Listen::Inherited(l),
            None => Listen::Bound(TcpListener::bind(public).await?),
        })
    }
}

/// How long a draining HTTP connection waits for its next request before it
/// ends.
pub const DRAIN_IDLE: Duration = Duration::from_secs(1);

/// Listens on `public` for a `tcp` port, splicing each connection to the backend
/// of `route`; a connection arriving while it has none waits up to `hold`.
/// Of `config`, only [`FrontConfig::max_connections`] applies to a `tcp` port.
pub async fn bind_tcp(
    public: SocketAddr,
    route: Route,
    hold: Duration,
    config: &FrontConfig,
) -> std::io::Result<Front> {
    bind_tcp_on(Listen::new(public, None).await?, route, hold, config)
}

/// [`bind_tcp`] on a listening socket another process handed over.
pub fn bind_tcp_inherited(
    listener: std::net::TcpListener,
    route: Route,
    hold: Duration,
    config: &FrontConfig,
) -> std::io::Result<Front> {
    bind_tcp_on(Listen::Inherited(listener), route, hold, config)
}

fn bind_tcp_on(
    listener: Listen,
    route: Route,
    hold: Duration,
    config: &FrontConfig,
) -> std::io::Result<Front> {
    let max = config.max_connections;
    Front::bind(listener, route, hold, max, |client, routing| async move {
        let stop = routing.stop.clone();
        tokio::select! {
            () = stop.stopped() => {}
            () = splice(client, routing) => {}
        }
    })
}

/// Waits (up to the hold time) for a backend, connects, and copies both ways.
async fn splice(mut client: TcpStream, mut routing: Routing) {
    // No backend within the hold time, or one that refuses: the client's
    // connection closes.
    let Some(target) = routing.current().await else {
        return;
    };
    let Ok(mut server) = TcpStream::connect(target).await else {
        return;
    };
    let _busy = Busy::new(&counter(&routing.counts, target));
    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A backend that answers each line with its name and the line.
    async fn backend(name: &'static str) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 64];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 {
                            return;
                        }
                        let mut out = format!("{name}:").into_bytes();
                        out.extend_from_slice(&buf[..n]);
                        if s.write_all(&out).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        addr
    }

    fn any() -> SocketAddr {
        "127.0.0.1:0".parse().unwrap()
    }

    async fn ask(s: &mut TcpStream, what: &str) -> String {
        s.write_all(what.as_bytes()).await.unwrap();
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).await.unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    fn set(router: &Router, backend: Option<SocketAddr>) {
        router.set([("svc/main".to_owned(), backend)]);
    }

    /// Waits (up to 10 s) until `front` has `n` client connections open: a
    /// closed one counts until its task has ended.
    pub(crate) async fn until_connections(front: &Front, n: usize) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while front.connections() != n {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} connections open, not {n}",
                front.connections()
            );
            tokio::task::yield_now().await;
        }
    }

    /// Whether `conn` was closed by the front (within 10 s) before anything
    /// came on it.
    pub(crate) async fn refused(conn: &mut TcpStream) -> bool {
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(Duration::from_secs(10), conn.read(&mut buf)).await;
        // A close with unread bytes is a reset: refused too.
        matches!(read, Ok(Ok(0) | Err(_)))
    }

    /// A `tcp` port handed over: the new front accepts on the same socket,
    /// the old one's open connection carries on until its client ends it,
    /// and only then is the old front's drain done, having cut nothing.
    #[tokio::test]
    async fn a_tcp_front_handed_over_keeps_open_connections_until_they_end() {
        let app = backend("app").await;
        let router = Router::new();
        set(&router, Some(app));
        let config = FrontConfig::default();
        let hold = Duration::from_secs(1);
        let old = bind_tcp(any(), router.route("svc/main"), hold, &config)
            .await
            .unwrap();
        let addr = old.local_addr();
        let mut open = TcpStream::connect(addr).await.unwrap();
        assert_eq!(ask(&mut open, "a").await, "app:a");
        let new = bind_tcp_inherited(
            old.listener().unwrap(),
            router.route("svc/main"),
            hold,
            &config,
        )
        .unwrap();
        let draining = tokio::spawn(old.drain(Duration::from_secs(10)));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            !draining.is_finished(),
            "the drain ended with a connection open"
        );
        assert_eq!(ask(&mut open, "b").await, "app:b");
        let mut fresh = TcpStream::connect(addr).await.unwrap();
        assert_eq!(ask(&mut fresh, "c").await, "app:c");
        until_connections(&new, 1).await;
        drop(open);
        assert_eq!(draining.await.unwrap(), 0);
        // A drain that runs out of grace cuts what is left, and says so.
        let held = TcpStream::connect(addr).await.unwrap();
        until_connections(&new, 2).await;
        assert_eq!(new.drain(Duration::from_millis(100)).await, 2);
        drop((held, fresh));
    }

    #[tokio::test]
    async fn a_dropped_front_stops_listening() {
        let b = backend("b").await;
        let router = Router::new();
        set(&router, Some(b));
        let front = bind_tcp(
            any(),
            router.route("svc/main"),
            Duration::from_secs(5),
            &FrontConfig::default(),
        )
        .await
        .unwrap();
        let addr = front.local_addr();
        let mut client = TcpStream::connect(addr).await.unwrap();
        assert_eq!(ask(&mut client, "1").await, "b:1");
        drop(front);
        // A hang guard, not a speed assertion: the port must close at all.
        tokio::time::timeout(Duration::from_secs(30), async {
            while TcpStream::connect(addr).await.is_ok() {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("a dropped front still accepts connections");
    }

    #[tokio::test]
    async fn connections_over_the_limit_are_closed_until_others_end() {
        let b = backend("b").await;
        let router = Router::new();
        set(&router, Some(b));
        let config = FrontConfig {
            max_connections: 2,
            ..FrontConfig::default()
        };
        let hold = Duration::from_secs(5);
        let front = bind_tcp(any(), router.route("svc/main"), hold, &config)
            .await
            .unwrap();
        let addr = front.local_addr();
        let mut first = TcpStream::connect(addr).await.unwrap();
        assert_eq!(ask(&mut first, "1").await, "b:1");
        let mut second = TcpStream::connect(addr).await.unwrap();
        assert_eq!(ask(&mut second, "2").await, "b:2");
        assert_eq!(front.connections(), 2);

        // A third is closed at once, and never reaches the backend.
        let mut third = TcpStream::connect(addr).await.unwrap();
        assert!(refused(&mut third).await);
        assert_eq!((front.connections(), front.busy(b)), (2, 2));

        // Once one ends, connections are taken again, up to the limit.
        drop(first);
        until_connections(&front, 1).await;
        let mut fourth = TcpStream::connect(addr).await.unwrap();
        assert_eq!(ask(&mut fourth, "4").await, "b:4");
        let mut fifth = TcpStream::connect(addr).await.unwrap();
        assert!(refused(&mut fifth).await);
        assert_eq!(ask(&mut second, "still").await, "b:still");
        front.shutdown().await;
    }

    #[tokio::test]
    async fn a_switch_moves_new_connections_and_old_ones_drain() {
        let (old, new) = (backend("old").await, backend("new").await);
        let router = Router::new();
        set(&router, Some(old));
        let front = bind_tcp(
            "127.0.0.1:0".parse().unwrap(),
            router.route("svc/main"),
            Duration::from_secs(5),
            &FrontConfig::default(),
        )
        .await
        .unwrap();
        let mut before = TcpStream::connect(front.local_addr()).await.unwrap();
        assert_eq!(ask(&mut before, "a").await, "old:a");
        assert_eq!(front.busy(old), 1);

        set(&router, Some(new));
        let mut after = TcpStream::connect(front.local_addr()).await.unwrap();
        assert_eq!(ask(&mut after, "b").await, "new:b");
        // The connection made before the switch stays on the old process.
        assert_eq!(ask(&mut before, "c").await, "old:c");
        drop(before);
        // It drains: the count of the old backend's connections reaches zero.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while front.busy(old) > 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "old connection never drained"
            );
            tokio::task::yield_now().await;
        }
        // Drained, its counter can go; the new backend's (busy) one stays.
        assert_eq!(front.counted_backends(), 2);
        front.forget(old);
        front.forget(new);
        assert_eq!(front.counted_backends(), 1);
        assert_eq!(front.busy(new), 1);
        front.shutdown().await;
    }

    #[tokio::test]
    async fn connections_are_held_while_there_is_no_backend() {
        let router = Router::new();
        let front = bind_tcp(
            "127.0.0.1:0".parse().unwrap(),
            router.route("svc/main"),
            Duration::from_secs(10),
            &FrontConfig::default(),
        )
        .await
        .unwrap();
        let mut held = TcpStream::connect(front.local_addr()).await.unwrap();
        held.write_all(b"x").await.unwrap();
        // The service comes up while the connection waits.
        let b = backend("late").await;
        set(&router, Some(b));
        let mut buf = [0u8; 16];
        let n = held.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"late:x");
        front.shutdown().await;
    }

    #[tokio::test]
    async fn a_held_connection_is_closed_after_the_hold_time() {
        let front = bind_tcp(
            "127.0.0.1:0".parse().unwrap(),
            Router::new().route("svc/main"),
            Duration::from_millis(100),
            &FrontConfig::default(),
        )
        .await
        .unwrap();
        let mut held = TcpStream::connect(front.local_addr()).await.unwrap();
        let mut buf = [0u8; 16];
        let n = tokio::time::timeout(Duration::from_secs(10), held.read(&mut buf))
            .await
            .expect("closed in time")
            .unwrap_or(0);
        assert_eq!(n, 0);
        front.shutdown().await;
    }

    #[tokio::test]
    async fn one_change_of_the_table_moves_every_front_at_once() {
        let (a1, a2, b1, b2) = (
            backend("a1").await,
            backend("a2").await,
            backend("b1").await,
            backend("b2").await,
        );
        let router = Router::new();
        router.set([("a/main".into(), Some(a1)), ("b/main".into(), Some(b1))]);
        let hold = Duration::from_secs(5);
        let config = FrontConfig::default();
        let fa = bind_tcp(any(), router.route("a/main"), hold, &config)
            .await
            .unwrap();
        let fb = bind_tcp(any(), router.route("b/main"), hold, &config)
            .await
            .unwrap();
        // Every reader of the table sees it before or after a change, whole.
        let mut seen = router.route("a/main").table;
        router.set([("a/main".into(), Some(a2)), ("b/main".into(), Some(b2))]);
        let table = seen.borrow_and_update().clone();
        assert_eq!(
            (table.get("a/main"), table.get("b/main")),
            (Some(&a2), Some(&b2))
        );
        let mut ca = TcpStream::connect(fa.local_addr()).await.unwrap();
        let mut cb = TcpStream::connect(fb.local_addr()).await.unwrap();
        assert_eq!(ask(&mut ca, "x").await, "a2:x");
        assert_eq!(ask(&mut cb, "y").await, "b2:y");
        // A route set to None holds, and others are untouched.
        router.set([("a/main".into(), None)]);
        assert_eq!(router.get("a/main"), None);
        assert_eq!(router.get("b/main"), Some(b2));
        fa.shutdown().await;
        fb.shutdown().await;
    }
}
