//! The front for `tcp` ports: the shell owns the public port and splices each
//! connection to the service process currently behind it.
//!
//! [`bind_tcp`] accepts on the public address and connects each new connection to
//! the backend set at that moment; a connection stays with its backend until it
//! ends, so [`Front::switch`] moves only new connections (old ones drain on the
//! old process). While there is no backend (a service with `overlap = false`
//! between its stop and its start), new connections are held for up to the hold
//! time instead of being refused. [`Front::busy`] counts the connections
//! still open on a backend, so an upgrade can wait for the old process to drain.
//! HTTP ports get a request-level front later; this one is per connection.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::debug;

/// Connections (or requests) currently open per backend.
pub(crate) type Counts = Arc<Mutex<HashMap<SocketAddr, usize>>>;

/// Counts one connection or request against its backend while it lives.
pub(crate) struct Busy {
    backend: SocketAddr,
    counts: Counts,
}

impl Busy {
    pub(crate) fn new(backend: SocketAddr, counts: &Counts) -> Self {
        if let Ok(mut m) = counts.lock() {
            *m.entry(backend).or_insert(0) += 1;
        }
        Self {
            backend,
            counts: counts.clone(),
        }
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        if let Ok(mut m) = self.counts.lock()
            && let Some(n) = m.get_mut(&self.backend)
        {
            *n = n.saturating_sub(1);
        }
    }
}

/// What a front's connection handler gets besides the client connection.
#[derive(Clone)]
pub(crate) struct Routing {
    /// The backend new work goes to (`None`: hold it).
    pub(crate) backend: watch::Receiver<Option<SocketAddr>>,
    /// How long to hold new work while there is no backend.
    pub(crate) hold: Duration,
    /// Work in flight per backend.
    pub(crate) counts: Counts,
    /// Cancelled when the front shuts down.
    pub(crate) stop: CancellationToken,
}

impl Routing {
    /// The backend, waiting up to the hold time while there is none.
    pub(crate) async fn current(&mut self) -> Option<SocketAddr> {
        match tokio::time::timeout(self.hold, self.backend.wait_for(Option::is_some)).await {
            Ok(Ok(b)) => *b,
            _ => None,
        }
    }
}

/// A public port owned by the shell: the listener, its accept loop, and the
/// switchable backend. [`bind_tcp`] and [`crate::http_front::bind_http`] make one;
/// they differ only in what they do with each client connection.
#[derive(Debug)]
pub struct Front {
    addr: SocketAddr,
    backend: watch::Sender<Option<SocketAddr>>,
    counts: Counts,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Front {
    /// Listens on `public` and runs `serve` for every client connection.
    pub(crate) async fn bind<F, Fut>(
        public: SocketAddr,
        backend: Option<SocketAddr>,
        hold: Duration,
        serve: F,
    ) -> std::io::Result<Self>
    where
        F: Fn(TcpStream, Routing) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind(public).await?;
        let addr = listener.local_addr()?;
        let (tx, rx) = watch::channel(backend);
        let counts: Counts = Arc::default();
        let stop = CancellationToken::new();
        let routing = Routing {
            backend: rx,
            hold,
            counts: counts.clone(),
            stop: stop.clone(),
        };
        let task = tokio::spawn(accept_loop(listener, routing, serve));
        Ok(Self {
            addr,
            backend: tx,
            counts,
            stop,
            task,
        })
    }

    /// The public address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Sends new work to `backend` from now on (`None`: hold it).
    pub fn switch(&self, backend: Option<SocketAddr>) {
        self.backend.send_replace(backend);
    }

    /// Connections (TCP) or requests (HTTP) still open on `backend`: what an
    /// upgrade waits on to drain the old process.
    pub fn busy(&self, backend: SocketAddr) -> usize {
        self.counts
            .lock()
            .map(|m| m.get(&backend).copied().unwrap_or(0))
            .unwrap_or(0)
    }

    /// Stops accepting and ends every client connection.
    pub async fn shutdown(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

async fn accept_loop<F, Fut>(listener: TcpListener, routing: Routing, serve: F)
where
    F: Fn(TcpStream, Routing) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut conns = JoinSet::new();
    loop {
        while conns.try_join_next().is_some() {}
        let (client, _) = tokio::select! {
            () = routing.stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    debug!(error = %e, "accept failed");
                    continue;
                }
            },
        };
        let _ = client.set_nodelay(true);
        conns.spawn(serve(client, routing.clone()));
    }
    conns.shutdown().await;
}

/// Listens on `public` for a `tcp` port, splicing each connection to `backend`
/// (if any); a connection arriving with no backend waits up to `hold` for one.
pub async fn bind_tcp(
    public: SocketAddr,
    backend: Option<SocketAddr>,
    hold: Duration,
) -> std::io::Result<Front> {
    Front::bind(public, backend, hold, |client, routing| async move {
        let stop = routing.stop.clone();
        tokio::select! {
            () = stop.cancelled() => {}
            () = splice(client, routing) => {}
        }
    })
    .await
}

/// Waits (up to the hold time) for a backend, connects, and copies both ways.
async fn splice(mut client: TcpStream, mut routing: Routing) {
    let Some(target) = routing.current().await else {
        debug!("no backend within the hold time; closing the connection");
        return;
    };
    let mut server = match TcpStream::connect(target).await {
        Ok(s) => s,
        Err(e) => {
            debug!(%target, error = %e, "backend refused the connection");
            return;
        }
    };
    let _busy = Busy::new(target, &routing.counts);
    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
}

#[cfg(test)]
mod tests {
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

    async fn ask(s: &mut TcpStream, what: &str) -> String {
        s.write_all(what.as_bytes()).await.unwrap();
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).await.unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[tokio::test]
    async fn a_switch_moves_new_connections_and_old_ones_drain() {
        let (old, new) = (backend("old").await, backend("new").await);
        let front = bind_tcp(
            "127.0.0.1:0".parse().unwrap(),
            Some(old),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        let mut before = TcpStream::connect(front.local_addr()).await.unwrap();
        assert_eq!(ask(&mut before, "a").await, "old:a");
        assert_eq!(front.busy(old), 1);

        front.switch(Some(new));
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
        front.shutdown().await;
    }

    #[tokio::test]
    async fn connections_are_held_while_there_is_no_backend() {
        let front = bind_tcp(
            "127.0.0.1:0".parse().unwrap(),
            None,
            Duration::from_secs(10),
        )
        .await
        .unwrap();
        let mut held = TcpStream::connect(front.local_addr()).await.unwrap();
        held.write_all(b"x").await.unwrap();
        // The service comes up while the connection waits.
        let b = backend("late").await;
        front.switch(Some(b));
        let mut buf = [0u8; 16];
        let n = held.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"late:x");
        front.shutdown().await;
    }

    #[tokio::test]
    async fn a_held_connection_is_closed_after_the_hold_time() {
        let front = bind_tcp(
            "127.0.0.1:0".parse().unwrap(),
            None,
            Duration::from_millis(100),
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
}
