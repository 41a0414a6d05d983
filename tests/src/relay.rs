//! A TCP relay in front of a server, for tests of what a client does when
//! its connections drop: [`Relay::cut`] ends every connection it carries (as
//! a restarted load balancer or a lost network would), and [`Mode`] says what
//! happens to the connections that come next — carried to the server, held
//! unanswered until the mode changes, or refused with `502 Bad Gateway` (as a
//! reverse proxy answers while its backend is gone).
//!
//! For the portal's pages the relay listens on `[::1]` with the portal's own
//! HTTP port: `[::1]:PORT` is one of the `Host` values the portal answers to,
//! so the browser's requests pass its `Host`/`Origin` check unchanged.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// What the relay does with a connection it accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Carry it to the server.
    Forward,
    /// Keep it open, unanswered, until the mode changes.
    Hold,
    /// Answer its request `502 Bad Gateway` and close it.
    Refuse,
}

#[derive(Debug)]
struct Shared {
    /// What to do with new (and held) connections.
    mode: watch::Sender<Mode>,
    /// Bumped by every [`Relay::cut`]: the connections carried end.
    cuts: watch::Sender<u64>,
    /// Connections accepted (whatever became of them).
    accepted: AtomicUsize,
    /// Connections held so far.
    held: AtomicUsize,
    /// Requests refused so far.
    refused: AtomicUsize,
    /// Connections carried to the server now.
    carrying: AtomicUsize,
}

/// A running relay; it stops (and drops every connection) on drop.
#[derive(Debug)]
pub struct Relay {
    /// Where it listens.
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
}

impl Relay {
    /// Listens on `listen` and carries connections to `server`.
    pub async fn start(listen: SocketAddr, server: SocketAddr) -> Self {
        let listener = TcpListener::bind(listen)
            .await
            .unwrap_or_else(|e| panic!("the relay cannot listen on {listen}: {e}"));
        let addr = listener.local_addr().expect("the relay's address");
        let shared = Arc::new(Shared {
            mode: watch::Sender::new(Mode::Forward),
            cuts: watch::Sender::new(0),
            accepted: AtomicUsize::new(0),
            held: AtomicUsize::new(0),
            refused: AtomicUsize::new(0),
            carrying: AtomicUsize::new(0),
        });
        let shutdown = CancellationToken::new();
        tokio::spawn(accept(listener, server, shared.clone(), shutdown.clone()));
        Self {
            addr,
            shared,
            shutdown,
        }
    }

    /// For the portal at `portal` (`127.0.0.1:PORT`): a relay on `[::1]:PORT`.
    pub async fn for_portal(portal: SocketAddr) -> Self {
        let listen = SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, portal.port()));
        Self::start(listen, portal).await
    }

    /// From now on, new connections (and those held) get `mode`.
    pub fn set(&self, mode: Mode) {
        self.shared.mode.send_replace(mode);
    }

    /// Ends every connection carried now.
    pub fn cut(&self) {
        self.shared.cuts.send_modify(|n| *n += 1);
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// Connections held so far.
    pub fn held(&self) -> usize {
        self.shared.held.load(Ordering::SeqCst)
    }

    /// Requests refused with 502 so far.
    pub fn refused(&self) -> usize {
        self.shared.refused.load(Ordering::SeqCst)
    }

    /// Connections carried to the server now.
    pub fn carrying(&self) -> usize {
        self.shared.carrying.load(Ordering::SeqCst)
    }

    /// Waits (at most `secs`) until `done` holds of the relay.
    pub async fn wait_for(&self, what: &str, secs: u64, done: impl Fn(&Relay) -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        while !done(self) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the relay did not see {what} in {secs} s (accepted {}, held {}, refused {}, carrying {})",
                self.accepted(),
                self.held(),
                self.refused(),
                self.carrying()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// The relay's task: accepts connections and owns their tasks.
async fn accept(
    listener: TcpListener,
    server: SocketAddr,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => {
                let Ok((client, _)) = accepted else { continue };
                shared.accepted.fetch_add(1, Ordering::SeqCst);
                conns.spawn(connection(client, server, shared.clone()));
            }
        }
    }
    conns.shutdown().await;
}

/// One connection: held while the mode says so, then refused or carried
/// until it ends or is cut.
async fn connection(mut client: TcpStream, server: SocketAddr, shared: Arc<Shared>) {
    let mut mode = shared.mode.subscribe();
    if *mode.borrow_and_update() == Mode::Hold {
        shared.held.fetch_add(1, Ordering::SeqCst);
        if mode.wait_for(|m| *m != Mode::Hold).await.is_err() {
            return;
        }
    }
    let now = *mode.borrow();
    match now {
        Mode::Hold => {}
        Mode::Refuse => {
            // Read (some of) the request, then answer it.
            let mut buf = [0u8; 4096];
            let _ = client.read(&mut buf).await;
            let _ = client
                .write_all(
                    b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                )
                .await;
            let _ = client.shutdown().await;
            shared.refused.fetch_add(1, Ordering::SeqCst);
        }
        Mode::Forward => {
            let mut cuts = shared.cuts.subscribe();
            cuts.borrow_and_update();
            let Ok(mut upstream) = TcpStream::connect(server).await else {
                return;
            };
            shared.carrying.fetch_add(1, Ordering::SeqCst);
            tokio::select! {
                _ = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {}
                _ = cuts.changed() => {}
            }
            shared.carrying.fetch_sub(1, Ordering::SeqCst);
        }
    }
}
