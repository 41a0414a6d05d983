//! The front for `tcp` ports: the shell owns the public port and splices each
//! connection to the service process currently behind it.
//!
//! [`TcpFront`] accepts on the public address and connects each new connection to
//! the backend set at that moment; a connection stays with its backend until it
//! ends, so [`TcpFront::switch`] moves only new connections (old ones drain on the
//! old process). While there is no backend (a service with `overlap = false`
//! between its stop and its start), new connections are held for up to the hold
//! time instead of being refused. [`TcpFront::active`] counts the connections
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

/// Connections currently open per backend.
type Active = Arc<Mutex<HashMap<SocketAddr, usize>>>;

/// A running front for one public port (see the module docs).
#[derive(Debug)]
pub struct TcpFront {
    addr: SocketAddr,
    backend: watch::Sender<Option<SocketAddr>>,
    active: Active,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl TcpFront {
    /// Listens on `public`, splicing to `backend` (if any); a connection arriving
    /// with no backend waits up to `hold` for one.
    pub async fn bind(
        public: SocketAddr,
        backend: Option<SocketAddr>,
        hold: Duration,
    ) -> std::io::Result<Self> {
        let listener = TcpListener::bind(public).await?;
        let addr = listener.local_addr()?;
        let (tx, rx) = watch::channel(backend);
        let active: Active = Arc::default();
        let stop = CancellationToken::new();
        let task = tokio::spawn(accept_loop(
            listener,
            rx,
            hold,
            active.clone(),
            stop.clone(),
        ));
        Ok(Self {
            addr,
            backend: tx,
            active,
            stop,
            task,
        })
    }

    /// The public address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Sends new connections to `backend` from now on (`None`: hold them).
    pub fn switch(&self, backend: Option<SocketAddr>) {
        self.backend.send_replace(backend);
    }

    /// Connections still open on `backend`.
    pub fn active(&self, backend: SocketAddr) -> usize {
        self.active
            .lock()
            .map(|m| m.get(&backend).copied().unwrap_or(0))
            .unwrap_or(0)
    }

    /// Stops accepting and closes every spliced connection.
    pub async fn shutdown(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

async fn accept_loop(
    listener: TcpListener,
    backend: watch::Receiver<Option<SocketAddr>>,
    hold: Duration,
    active: Active,
    stop: CancellationToken,
) {
    let mut conns = JoinSet::new();
    loop {
        while conns.try_join_next().is_some() {}
        let (client, _) = tokio::select! {
            () = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    debug!(error = %e, "accept failed");
                    continue;
                }
            },
        };
        let backend = backend.clone();
        let active = active.clone();
        let stop = stop.clone();
        conns.spawn(async move {
            tokio::select! {
                () = stop.cancelled() => {}
                () = splice(client, backend, hold, active) => {}
            }
        });
    }
    conns.shutdown().await;
}

/// Waits (up to `hold`) for a backend, connects, and copies both ways.
async fn splice(
    mut client: TcpStream,
    mut backend: watch::Receiver<Option<SocketAddr>>,
    hold: Duration,
    active: Active,
) {
    let target = match tokio::time::timeout(hold, backend.wait_for(Option::is_some)).await {
        Ok(Ok(b)) => *b,
        _ => {
            debug!("no backend within the hold time; closing the connection");
            return;
        }
    };
    let Some(target) = target else { return };
    let mut server = match TcpStream::connect(target).await {
        Ok(s) => s,
        Err(e) => {
            debug!(%target, error = %e, "backend refused the connection");
            return;
        }
    };
    let count = |delta: isize| {
        if let Ok(mut m) = active.lock() {
            let n = m.entry(target).or_insert(0);
            *n = n.saturating_add_signed(delta);
        }
    };
    count(1);
    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
    count(-1);
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
        let front = TcpFront::bind(
            "127.0.0.1:0".parse().unwrap(),
            Some(old),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        let mut before = TcpStream::connect(front.local_addr()).await.unwrap();
        assert_eq!(ask(&mut before, "a").await, "old:a");
        assert_eq!(front.active(old), 1);

        front.switch(Some(new));
        let mut after = TcpStream::connect(front.local_addr()).await.unwrap();
        assert_eq!(ask(&mut after, "b").await, "new:b");
        // The connection made before the switch stays on the old process.
        assert_eq!(ask(&mut before, "c").await, "old:c");
        drop(before);
        // It drains: the count of the old backend's connections reaches zero.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while front.active(old) > 0 {
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
        let front = TcpFront::bind(
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
        let front = TcpFront::bind(
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
