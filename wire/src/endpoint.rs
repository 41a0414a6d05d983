//! QUIC endpoints with mutual TLS: a [`Server`] that serves verified peers and a
//! [`Client`] that dials a server of an expected role.
//!
//! Both sides use rustls with the ring provider, TLS 1.3 only, ALPN [`ALPN`], and
//! trust exactly one root: the cluster CA. The server requires a client certificate
//! from that CA; the client dials under the expected server identity's DNS name
//! (see [`crate::identity`]), so a server with another role fails verification.
//!
//! With TLS 1.3 a client whose certificate is refused still sees its handshake
//! complete; the refusal arrives with the first stream. So [`Client::connect`]
//! always finishes with the hello exchange ([`crate::hello`]): a connection it
//! returns has been accepted by the server, checked for protocol version, and
//! names the server's verified identity.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{IdleTimeout, TransportConfig, VarInt};
use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info_span, warn};

use crate::codec::{self, DEFAULT_FRAME_LIMIT, FrameError};
use crate::hello::{self, HelloReply, PROTOCOL_VERSION};
use crate::identity::{Identity, IdentityError};
use crate::pki::Credentials;
use crate::revocation::Revoked;

/// The ALPN protocol id of molt's QUIC protocol.
pub const ALPN: &[u8] = b"molt/1";

/// Application error codes used to close connections and reset streams.
pub mod code {
    use quinn::VarInt;
    /// Normal close.
    pub const OK: VarInt = VarInt::from_u32(0);
    /// The peer sent something that is not a valid frame or message.
    pub const PROTOCOL: VarInt = VarInt::from_u32(1);
    /// The peer sent a frame over the size limit.
    pub const TOO_LARGE: VarInt = VarInt::from_u32(2);
    /// The peer speaks another protocol version.
    pub const VERSION: VarInt = VarInt::from_u32(3);
    /// The peer's certificate does not name a molt identity.
    pub const IDENTITY: VarInt = VarInt::from_u32(4);
    /// The server is shutting down.
    pub const SHUTDOWN: VarInt = VarInt::from_u32(5);
}

/// How long in-flight requests may run on after shutdown is asked for.
const DRAIN_GRACE: Duration = Duration::from_secs(10);

/// How long a peer has to complete the handshake and the hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a client waits for the QUIC handshake: a peer that is not there
/// (nothing listens, or the packets go nowhere) is reported in about this long.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// How often a quiet connection sends a keep-alive.
const KEEP_ALIVE: Duration = Duration::from_secs(1);

/// A connection that hears nothing for this long is dead: a peer killed in the
/// middle of a command is noticed within it.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long [`Client::shutdown`] lets its connections' close frames go out.
pub const CLOSE_FLUSH: Duration = Duration::from_millis(10);

/// Why a connection cannot be made or used.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The credentials cannot be turned into a TLS configuration.
    #[error("TLS configuration: {0}")]
    Tls(String),
    /// Binding the UDP socket failed.
    #[error("cannot bind {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The connection could not be started.
    #[error("cannot connect to {addr}: {message}")]
    Connect {
        /// The server's address.
        addr: SocketAddr,
        /// What went wrong.
        message: String,
    },
    /// The connection failed or was refused: a certificate the other side does not
    /// accept, a server of another role, or a lost network.
    #[error("connection to {peer} failed: {source}")]
    Connection {
        /// Who (or where) the peer is.
        peer: String,
        /// quinn's reason, which includes TLS alerts.
        source: quinn::ConnectionError,
    },
    /// Both sides speak different protocol versions.
    #[error("protocol version mismatch: this side speaks {ours}, the server speaks {theirs}")]
    VersionMismatch {
        /// Our version.
        ours: u32,
        /// The server's version.
        theirs: u32,
    },
    /// The peer's certificate does not name a valid identity.
    #[error("peer identity: {0}")]
    Identity(#[from] IdentityError),
    /// The server is not who we dialled.
    #[error("expected to reach {expected}, but the server is {found}")]
    WrongServer {
        /// The identity dialled.
        expected: Identity,
        /// The identity its certificate names.
        found: Identity,
    },
    /// Only serving identities can be dialled.
    #[error("{0} does not serve; it cannot be dialled")]
    NotAServer(Identity),
    /// A frame could not be read or written.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// Writing to a stream failed.
    #[error("stream write failed: {0}")]
    Write(#[from] quinn::WriteError),
    /// The peer did not answer in time.
    #[error("{0} timed out")]
    Timeout(&'static str),
}

fn tls_err(e: impl std::fmt::Display) -> WireError {
    WireError::Tls(e.to_string())
}

/// How many bytes a peer may have sent and not yet had acknowledged, per
/// connection, by default: the data a connection can hold in memory while its
/// peer reads slower than it is sent.
pub const SEND_WINDOW: u64 = 64 << 20;

/// Transport settings tuned for bulk transfer on fast links, sending at most
/// `send_window` unacknowledged bytes per connection.
fn transport(send_window: u64) -> TransportConfig {
    let mut t = TransportConfig::default();
    t.stream_receive_window(VarInt::from_u32(16 << 20));
    t.receive_window(VarInt::from_u32(64 << 20));
    t.send_window(send_window);
    t.max_concurrent_bidi_streams(VarInt::from_u32(64));
    t.max_concurrent_uni_streams(VarInt::from_u32(0));
    // Keep-alives keep a quiet connection (a long build behind a deploy) open;
    // a peer that died is noticed after the idle timeout.
    t.keep_alive_interval(Some(KEEP_ALIVE));
    t.max_idle_timeout(Some(
        IdleTimeout::try_from(IDLE_TIMEOUT).expect("5 s is a valid idle timeout"),
    ));
    t
}

/// Parsed credentials: the chain, the key, and the root store of the cluster CA.
struct TlsParts {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    roots: Arc<RootCertStore>,
}

fn tls_parts(creds: &Credentials) -> Result<TlsParts, WireError> {
    let chain = CertificateDer::pem_slice_iter(creds.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(tls_err)?;
    let key = PrivateKeyDer::from_pem_slice(creds.key_pem.as_bytes()).map_err(tls_err)?;
    let mut roots = RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(creds.ca_pem.as_bytes()) {
        roots.add(ca.map_err(tls_err)?).map_err(tls_err)?;
    }
    if roots.is_empty() {
        return Err(WireError::Tls("the CA file holds no certificate".into()));
    }
    Ok(TlsParts {
        chain,
        key,
        roots: Arc::new(roots),
    })
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn server_config(creds: &Credentials, send_window: u64) -> Result<quinn::ServerConfig, WireError> {
    let parts = tls_parts(creds)?;
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(parts.roots, provider())
            .build()
            .map_err(tls_err)?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(parts.chain, parts.key)
        .map_err(tls_err)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = QuicServerConfig::try_from(tls).map_err(tls_err)?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(quic));
    cfg.transport_config(Arc::new(transport(send_window)));
    Ok(cfg)
}

fn client_config(creds: &Credentials) -> Result<quinn::ClientConfig, WireError> {
    let parts = tls_parts(creds)?;
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .with_root_certificates(parts.roots)
        .with_client_auth_cert(parts.chain, parts.key)
        .map_err(tls_err)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = QuicClientConfig::try_from(tls).map_err(tls_err)?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(quic));
    cfg.transport_config(Arc::new(transport(SEND_WINDOW)));
    Ok(cfg)
}

/// TLS (over TCP) settings for an HTTPS server of the cluster: its own
/// certificate, TLS 1.3, ALPN `http/1.1`, and client certificates from the
/// cluster CA *accepted but not required* — a caller without one (a browser, a
/// bearer token) is authenticated some other way, one with one is verified
/// against the CA. Read a verified client's identity with [`identity_of`].
pub fn https_server_config(creds: &Credentials) -> Result<rustls::ServerConfig, WireError> {
    let parts = tls_parts(creds)?;
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(parts.roots, provider())
            .allow_unauthenticated()
            .build()
            .map_err(tls_err)?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(parts.chain, parts.key)
        .map_err(tls_err)?;
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tls)
}

/// TLS (over TCP) settings for an HTTPS client of the cluster: trusts the
/// cluster CA only and presents `creds`' certificate. Dial the server under its
/// identity's [`Identity::server_name`].
pub fn https_client_config(creds: &Credentials) -> Result<rustls::ClientConfig, WireError> {
    let parts = tls_parts(creds)?;
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .with_root_certificates(parts.roots)
        .with_client_auth_cert(parts.chain, parts.key)
        .map_err(tls_err)?;
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tls)
}

/// The identity and serial number of a verified peer certificate chain (its
/// leaf), as a TLS library hands it over.
pub fn identity_of(chain: &[CertificateDer<'_>]) -> Result<(Identity, Vec<u8>), IdentityError> {
    let leaf = chain
        .first()
        .ok_or_else(|| IdentityError::BadCertificate("empty certificate chain".into()))?;
    let identity = Identity::from_certificate(leaf)?;
    let serial = crate::pki::serial_of(leaf)?;
    Ok((identity, serial))
}

/// The certificate chain a peer presented in the handshake.
fn peer_chain(conn: &quinn::Connection) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
    conn.peer_identity()
        .and_then(|any| any.downcast::<Vec<CertificateDer<'static>>>().ok())
        .map(|chain| *chain)
        .ok_or_else(|| IdentityError::BadCertificate("no certificate presented".into()))
}

/// The identity named by the certificate a peer presented in the handshake.
fn peer_identity(conn: &quinn::Connection) -> Result<Identity, IdentityError> {
    let certs = peer_chain(conn)?;
    let leaf = certs
        .first()
        .ok_or_else(|| IdentityError::BadCertificate("empty certificate chain".into()))?;
    Identity::from_certificate(leaf)
}

/// One bidirectional stream, as a handler receives it.
#[derive(Debug)]
pub struct BiStream {
    /// Where replies go.
    pub send: quinn::SendStream,
    /// Where the request comes from.
    pub recv: quinn::RecvStream,
}

impl BiStream {
    /// Reads the request frame of this stream.
    pub async fn read_request<T: DeserializeOwned>(
        &mut self,
        limit: usize,
    ) -> Result<T, FrameError> {
        codec::expect_frame(&mut self.recv, limit).await
    }

    /// Reads the request frame of this stream within a server-wide memory budget
    /// (see [`codec::read_frame_within`]).
    pub async fn read_request_within<'b, T: DeserializeOwned>(
        &mut self,
        limit: usize,
        budget: &'b tokio::sync::Semaphore,
    ) -> Result<(T, tokio::sync::SemaphorePermit<'b>), FrameError> {
        codec::read_frame_within(&mut self.recv, limit, budget)
            .await?
            .ok_or(FrameError::Truncated {
                expected: 4,
                got: 0,
            })
    }

    /// Abandons the stream after bad input: resets our side and tells the peer to
    /// stop sending, with the code that matches `err`.
    pub fn refuse(mut self, err: &FrameError) {
        let c = match err {
            FrameError::TooLarge { .. } => code::TOO_LARGE,
            _ => code::PROTOCOL,
        };
        // Either may already be closed by the peer; there is nothing left to do then.
        let _ = self.send.reset(c);
        let _ = self.recv.stop(c);
    }
}

/// What a server does with each stream a verified peer opens.
pub trait Handler: Send + Sync + 'static {
    /// Serves one stream. `peer` is the identity from the peer's verified certificate.
    fn handle(&self, peer: Arc<Identity>, stream: BiStream) -> impl Future<Output = ()> + Send;

    /// Called once a peer is admitted, before any of its streams is served: a
    /// server that sends requests back over the peer's own connection (the portal
    /// to the shells that dialled it) keeps the connection here.
    fn connected(&self, _peer: &Arc<Identity>, _conn: &quinn::Connection) {}

    /// Called once the peer's connection has ended (or the server stops).
    fn disconnected(&self, _peer: &Arc<Identity>, _conn: &quinn::Connection) {}
}

/// A QUIC server that requires cluster certificates (see the module docs).
///
/// With [`Server::with_revocation`] it also refuses, at admission, a peer whose
/// certificate's serial number the check says is revoked: the connection is
/// closed with [`code::IDENTITY`] before any of its streams is served.
#[derive(Debug)]
pub struct Server {
    endpoint: quinn::Endpoint,
    identity: Identity,
    revoked: Option<Arc<dyn Revoked>>,
}

impl Server {
    /// Binds `addr` (UDP) with the server's credentials.
    pub fn bind(addr: SocketAddr, creds: &Credentials) -> Result<Self, WireError> {
        Self::bind_with_send_window(addr, creds, SEND_WINDOW)
    }

    /// [`Server::bind`], holding at most `send_window` unacknowledged bytes
    /// per connection ([`SEND_WINDOW`] by default): a server that streams bulk
    /// data to many peers at once bounds its memory with it.
    pub fn bind_with_send_window(
        addr: SocketAddr,
        creds: &Credentials,
        send_window: u64,
    ) -> Result<Self, WireError> {
        if creds.identity.server_name().is_none() {
            return Err(WireError::NotAServer(creds.identity.clone()));
        }
        let cfg = server_config(creds, send_window)?;
        let endpoint = quinn::Endpoint::server(cfg, addr)
            .map_err(|source| WireError::Bind { addr, source })?;
        Ok(Self {
            endpoint,
            identity: creds.identity.clone(),
            revoked: None,
        })
    }

    /// Refuses peers whose certificate `revoked` names (checked once per
    /// connection, at admission).
    pub fn with_revocation(mut self, revoked: Arc<dyn Revoked>) -> Self {
        self.revoked = Some(revoked);
        self
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> Result<SocketAddr, WireError> {
        let addr = self
            .endpoint
            .local_addr()
            .map_err(|source| WireError::Bind {
                addr: SocketAddr::from(([0, 0, 0, 0], 0)),
                source,
            })?;
        Ok(addr)
    }

    /// Serves until `shutdown` is cancelled; then accepts nothing new, lets the
    /// requests in flight finish (up to 10 s), closes every connection and waits
    /// for every task it started.
    pub async fn serve<H: Handler>(self, handler: Arc<H>, shutdown: CancellationToken) {
        let mut connections = JoinSet::new();
        loop {
            while connections.try_join_next().is_some() {}
            let incoming = tokio::select! {
                () = shutdown.cancelled() => break,
                incoming = self.endpoint.accept() => match incoming {
                    Some(i) => i,
                    None => break,
                },
            };
            let handler = handler.clone();
            let shutdown = shutdown.clone();
            let span = info_span!(
                "conn",
                server = %self.identity,
                remote = %incoming.remote_address(),
                peer = tracing::field::Empty,
            );
            let revoked = self.revoked.clone();
            connections
                .spawn(serve_connection(incoming, handler, revoked, shutdown).instrument(span));
        }
        // Each connection drains its requests and closes itself; then the endpoint.
        while connections.join_next().await.is_some() {}
        self.endpoint.close(code::SHUTDOWN, b"server shutting down");
        self.endpoint.wait_idle().await;
    }
}

async fn serve_connection<H: Handler>(
    incoming: quinn::Incoming,
    handler: Arc<H>,
    revoked: Option<Arc<dyn Revoked>>,
    shutdown: CancellationToken,
) {
    let admitted = tokio::select! {
        () = shutdown.cancelled() => return,
        admitted = tokio::time::timeout(HELLO_TIMEOUT, admit(incoming, revoked.as_deref())) => admitted,
    };
    let (conn, peer) = match admitted {
        Ok(Some(admitted)) => admitted,
        Ok(None) => return,
        Err(_) => {
            debug!("handshake or hello timed out");
            return;
        }
    };
    handler.connected(&peer, &conn);
    let mut streams = JoinSet::new();
    loop {
        while streams.try_join_next().is_some() {}
        let (send, recv) = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = conn.accept_bi() => match accepted {
                Ok(s) => s,
                Err(e) => {
                    debug!(%peer, reason = %e, "connection ended");
                    break;
                }
            },
        };
        let handler = handler.clone();
        let peer = peer.clone();
        streams.spawn(async move { handler.handle(peer, BiStream { send, recv }).await });
    }
    // Graceful: requests already being served may finish, within a grace period;
    // no new stream is accepted. Then the peer is told why the connection ends.
    let drained = tokio::time::timeout(DRAIN_GRACE, async {
        while streams.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        debug!(%peer, "in-flight requests cut off after the drain grace period");
        streams.shutdown().await;
    }
    conn.close(code::SHUTDOWN, b"server shutting down");
    handler.disconnected(&peer, &conn);
}

/// Completes the handshake, reads the peer's identity, checks its certificate
/// against the revocation list if there is one, and answers its hello. `None`
/// when the peer is refused (the reason is logged).
async fn admit(
    incoming: quinn::Incoming,
    revoked: Option<&dyn Revoked>,
) -> Option<(quinn::Connection, Arc<Identity>)> {
    let conn = match incoming.await {
        Ok(conn) => conn,
        Err(e) => {
            debug!(error = %e, "handshake failed");
            return None;
        }
    };
    let peer = match peer_identity(&conn) {
        Ok(p) => Arc::new(p),
        Err(e) => {
            warn!(error = %e, "refusing peer without a molt identity");
            conn.close(code::IDENTITY, b"certificate names no molt identity");
            return None;
        }
    };
    tracing::Span::current().record("peer", tracing::field::display(&peer));
    if let Some(revoked) = revoked {
        let serial = peer_chain(&conn).ok().and_then(|chain| {
            chain
                .first()
                .and_then(|leaf| crate::pki::serial_of(leaf).ok())
        });
        match serial {
            Some(serial) if !revoked.is_revoked(&serial) => {}
            Some(serial) => {
                let serial = crate::revocation::serial_hex(&serial);
                warn!(%peer, %serial, "refusing a revoked certificate");
                conn.close(code::IDENTITY, b"certificate revoked");
                return None;
            }
            None => {
                warn!(%peer, "refusing a certificate whose serial number cannot be read");
                conn.close(code::IDENTITY, b"certificate unreadable");
                return None;
            }
        }
    }
    if let Err(e) = hello::answer(&conn, &peer).await {
        debug!(%peer, error = %e, "hello failed");
        return None;
    }
    Some((conn, peer))
}

/// A QUIC client holding one party's credentials.
#[derive(Debug, Clone)]
pub struct Client {
    endpoint: quinn::Endpoint,
    config: quinn::ClientConfig,
    version: u32,
}

impl Client {
    /// A client bound to an ephemeral local port (IPv4 or IPv6, matching `family`).
    pub fn new(creds: &Credentials, family: SocketAddr) -> Result<Self, WireError> {
        let config = client_config(creds)?;
        let bind: SocketAddr = if family.is_ipv6() {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
        };
        let endpoint = quinn::Endpoint::client(bind)
            .map_err(|source| WireError::Bind { addr: bind, source })?;
        Ok(Self {
            endpoint,
            config,
            version: PROTOCOL_VERSION,
        })
    }

    /// Speaks another protocol version in the hello. Only for testing the
    /// server's refusal of versions it does not speak.
    pub fn with_protocol_version(mut self, version: u32) -> Self {
        self.version = version;
        self
    }

    /// Connects to `server` at `addr`, verifies it, and exchanges the hello.
    pub async fn connect(
        &self,
        addr: SocketAddr,
        server: &Identity,
    ) -> Result<Connection, WireError> {
        let name = server
            .server_name()
            .ok_or_else(|| WireError::NotAServer(server.clone()))?;
        let connecting = self
            .endpoint
            .connect_with(self.config.clone(), addr, &name)
            .map_err(|e| WireError::Connect {
                addr,
                message: e.to_string(),
            })?;
        let conn = tokio::time::timeout(CONNECT_TIMEOUT, connecting)
            .await
            .map_err(|_| WireError::Timeout("handshake"))?
            .map_err(|source| WireError::Connection {
                peer: format!("{server} at {addr}"),
                source,
            })?;
        let found = peer_identity(&conn)?;
        if &found != server {
            conn.close(code::IDENTITY, b"unexpected server identity");
            return Err(WireError::WrongServer {
                expected: server.clone(),
                found,
            });
        }
        let reply = tokio::time::timeout(HELLO_TIMEOUT, hello::greet(&conn, self.version))
            .await
            .map_err(|_| WireError::Timeout("hello"))?
            .map_err(|e| match e {
                hello::HelloError::Connection(source) => WireError::Connection {
                    peer: format!("{server} at {addr}"),
                    source,
                },
                hello::HelloError::Frame(f) => WireError::Frame(f),
                hello::HelloError::Write(w) => WireError::Write(w),
            })?;
        match reply {
            HelloReply::Welcome { you, .. } => Ok(Connection {
                conn,
                peer: found,
                me: you,
            }),
            HelloReply::VersionMismatch { supported } => Err(WireError::VersionMismatch {
                ours: self.version,
                theirs: supported,
            }),
        }
    }

    /// Closes the endpoint: its connections' close frames go out, and the
    /// servers learn at once that this client is done.
    ///
    /// It waits at most [`CLOSE_FLUSH`] for the connections to finish
    /// closing: the close frame leaves on the endpoint driver's next turn,
    /// well within that, while waiting out QUIC's whole draining period (three
    /// probe timeouts, ~90 ms even on loopback) would only cover a lost close
    /// packet — which costs the server one idle timeout, not a wrong answer —
    /// and would add that time to every one-shot command.
    pub async fn shutdown(&self) {
        self.endpoint.close(code::OK, b"client done");
        let _ = tokio::time::timeout(CLOSE_FLUSH, self.endpoint.wait_idle()).await;
    }
}

/// An established, verified connection to a server.
#[derive(Debug, Clone)]
pub struct Connection {
    conn: quinn::Connection,
    peer: Identity,
    me: Identity,
}

impl Connection {
    /// The server's verified identity.
    pub fn peer(&self) -> &Identity {
        &self.peer
    }

    /// Who the server verified us to be (from the hello).
    pub fn me(&self) -> &Identity {
        &self.me
    }

    /// Opens a new stream for one request.
    pub async fn open(&self) -> Result<BiStream, WireError> {
        let (send, recv) = self
            .conn
            .open_bi()
            .await
            .map_err(|source| WireError::Connection {
                peer: self.peer.to_string(),
                source,
            })?;
        Ok(BiStream { send, recv })
    }

    /// One request, one response: opens a stream, sends `req` as a frame, finishes
    /// the sending side, and reads one response frame of at most the default limit.
    pub async fn call<Req, Resp>(&self, req: &Req) -> Result<Resp, WireError>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
    {
        let mut s = self.open().await?;
        codec::write_frame(&mut s.send, req).await?;
        // The stream may already be reset by the server; the read below reports why.
        let _ = s.send.finish();
        Ok(codec::expect_frame(&mut s.recv, DEFAULT_FRAME_LIMIT).await?)
    }

    /// Closes the connection.
    pub fn close(&self) {
        self.conn.close(code::OK, b"done");
    }

    /// The underlying quinn connection, for protocols that need more than `call`.
    pub fn quinn(&self) -> &quinn::Connection {
        &self.conn
    }
}
