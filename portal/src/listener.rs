//! Serving the API's router on TCP listeners: plain HTTP (loopback only) and
//! HTTPS with the portal's cluster certificate.
//!
//! Each accepted connection is one owned task (a `JoinSet`): the TLS handshake
//! happens there, within [`HANDSHAKE_TIMEOUT`], so a slow or silent client
//! never holds up the accept loop. A client certificate of the cluster CA is
//! optional; when one is presented and verified, its identity and serial
//! number — and whether the revocation list names it, checked once per
//! connection — go into every request of the connection as a [`Connection`]
//! extension, where the API's `Caller` extractor reads them. A plain-HTTP
//! connection carries no certificate, ever.
//!
//! On shutdown the listener stops accepting, every connection finishes the
//! request it is serving and closes (hyper's graceful shutdown), and whatever
//! is still open after [`DRAIN_GRACE`] (an event stream) is cut.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info_span, warn};
use wire::Identity;
use wire::revocation::Revoked;

/// How long a client has to complete the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a client has to send a request's head once it started one (or,
/// on a kept-alive connection, its next request).
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);

/// How long open connections may go on after shutdown is asked for.
pub const DRAIN_GRACE: Duration = Duration::from_secs(10);

/// The certificate a client presented on this connection.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum PeerCert {
    /// None (always so on plain HTTP).
    #[default]
    None,
    /// One of the cluster CA, verified in the handshake, not revoked.
    Verified {
        /// Who it names.
        identity: Identity,
        /// Its serial number (big-endian bytes).
        serial: Vec<u8>,
    },
    /// One verified by the CA but refused: revoked, or naming no molt identity.
    Refused(String),
}

/// What the connection a request came on says about its client: an extension
/// of every request.
#[derive(Debug, Clone, Default)]
pub struct Connection {
    /// Is it TLS?
    pub tls: bool,
    /// The client's certificate.
    pub cert: PeerCert,
    /// The client's address.
    pub remote: Option<SocketAddr>,
}

/// TLS for a listener: the acceptor and the revocation check.
#[derive(Clone)]
pub struct Tls {
    /// The portal's TLS settings.
    pub acceptor: TlsAcceptor,
    /// Certificates to refuse.
    pub revoked: Option<Arc<dyn Revoked>>,
}

/// Serves `router` on `listener` (with TLS when `tls` is given) until
/// `shutdown`; returns once every connection is closed.
pub async fn serve(
    listener: TcpListener,
    tls: Option<Tls>,
    router: Router,
    shutdown: CancellationToken,
) {
    let mut connections = JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        let (tcp, remote) = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors, most likely: let connections end.
                    warn!(error = %e, "cannot accept a connection");
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        () = tokio::time::sleep(Duration::from_millis(100)) => continue,
                    }
                }
            },
        };
        let span = info_span!("http", %remote, tls = tls.is_some(), peer = tracing::field::Empty);
        connections.spawn(
            connection(tcp, remote, tls.clone(), router.clone(), shutdown.clone()).instrument(span),
        );
    }
    let drained = tokio::time::timeout(DRAIN_GRACE, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        debug!("connections still open after the drain grace period are cut");
        connections.shutdown().await;
    }
}

async fn connection(
    tcp: tokio::net::TcpStream,
    remote: SocketAddr,
    tls: Option<Tls>,
    router: Router,
    shutdown: CancellationToken,
) {
    let Some(tls) = tls else {
        let info = Connection {
            tls: false,
            cert: PeerCert::None,
            remote: Some(remote),
        };
        return serve_io(TokioIo::new(tcp), info, router, shutdown).await;
    };
    let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.acceptor.accept(tcp));
    let stream = tokio::select! {
        () = shutdown.cancelled() => return,
        done = handshake => match done {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => {
                debug!(error = %e, "TLS handshake failed");
                return;
            }
            Err(_) => {
                debug!("TLS handshake timed out");
                return;
            }
        },
    };
    let cert = match stream.get_ref().1.peer_certificates() {
        None | Some([]) => PeerCert::None,
        Some(chain) => peer_cert(chain, tls.revoked.as_deref()),
    };
    if let PeerCert::Verified { identity, .. } = &cert {
        tracing::Span::current().record("peer", tracing::field::display(identity));
    }
    let info = Connection {
        tls: true,
        cert,
        remote: Some(remote),
    };
    serve_io(TokioIo::new(stream), info, router, shutdown).await;
}

/// What a verified chain's leaf says, with the revocation check.
fn peer_cert(
    chain: &[rustls::pki_types::CertificateDer<'_>],
    revoked: Option<&dyn Revoked>,
) -> PeerCert {
    match wire::endpoint::identity_of(chain) {
        Ok((identity, serial)) if revoked.is_some_and(|r| r.is_revoked(&serial)) => {
            let serial = wire::revocation::serial_hex(&serial);
            warn!(%identity, %serial, "refusing a revoked certificate");
            PeerCert::Refused(format!(
                "the certificate of `{identity}` (serial {serial}) has been revoked"
            ))
        }
        Ok((identity, serial)) => PeerCert::Verified { identity, serial },
        Err(e) => {
            warn!(error = %e, "refusing a certificate that names no molt identity");
            PeerCert::Refused(format!("this certificate names no molt identity: {e}"))
        }
    }
}

async fn serve_io<I>(io: TokioIo<I>, info: Connection, router: Router, shutdown: CancellationToken)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
        req.extensions_mut().insert(info.clone());
        let mut router = router.clone();
        async move {
            // A Router is always ready; `call` answers every request.
            let response: Result<_, Infallible> =
                tower_service::Service::call(&mut router, req).await;
            response
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT);
    let conn = builder.serve_connection(io, service);
    tokio::pin!(conn);
    tokio::select! {
        done = conn.as_mut() => {
            if let Err(e) = done {
                debug!(error = %e, "HTTP connection ended with an error");
            }
        }
        () = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            if let Err(e) = conn.await {
                debug!(error = %e, "HTTP connection ended with an error");
            }
        }
    }
}
