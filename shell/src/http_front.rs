//! The front for `http` ports: the shell owns the public port and routes each
//! request, not each connection, to the service process currently behind it.
//!
//! Clients keep their connections to the shell (HTTP/1.1 keep-alive); each
//! request is forwarded to the backend its route names when it arrives, over
//! the client connection's own connection to that backend (a new one after a
//! switch). So after a [`crate::front::Router::set`] the next request of an
//! existing client connection goes to the new process, while requests already
//! in flight finish on the old one ([`Front::busy`] counts them, so an upgrade
//! can wait for the drain). With no backend, a request waits up to the hold
//! time and then gets `503`; a backend that fails gives `502`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::front::{Busy, Counter, Counts, Front, Route, Routing, counter};

/// A response body: the backend's, streamed back while its request counts as in
/// flight, or a short answer of the front's own.
enum Body {
    Upstream {
        body: Incoming,
        /// Held until the body has been sent (or dropped).
        _busy: Busy,
    },
    Plain(Full<Bytes>),
}

impl hyper::body::Body for Body {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            Body::Upstream { body, .. } => std::pin::Pin::new(body).poll_frame(cx),
            Body::Plain(full) => std::pin::Pin::new(full)
                .poll_frame(cx)
                .map(|f| f.map(|f| f.map_err(|never: Infallible| match never {}))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Body::Upstream { body, .. } => body.is_end_stream(),
            Body::Plain(full) => full.is_end_stream(),
        }
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        match self {
            Body::Upstream { body, .. } => body.size_hint(),
            Body::Plain(full) => full.size_hint(),
        }
    }
}

fn plain(status: StatusCode, text: &'static str) -> Response<Body> {
    let mut resp = Response::new(Body::Plain(Full::new(Bytes::from_static(text.as_bytes()))));
    *resp.status_mut() = status;
    resp
}

/// The connection to a backend that one client connection's requests travel
/// on. A client connection's requests come one at a time, so one upstream
/// connection carries them all, with no pool shared between clients; after a
/// switch, the next request opens one to the new backend.
#[derive(Default)]
struct Upstream(tokio::sync::Mutex<Option<Kept>>);

/// What a client connection keeps between requests: its backend's in-flight
/// counter, and its connection to that backend (if still open).
struct Kept {
    backend: SocketAddr,
    counter: Counter,
    sender: Option<SendRequest<Incoming>>,
}

impl Upstream {
    /// The in-flight counter of `backend`, and a sender to it that is ready for
    /// a request: the kept one, or a new connection.
    async fn take(
        &self,
        backend: SocketAddr,
        counts: &Counts,
    ) -> (Counter, std::io::Result<SendRequest<Incoming>>) {
        let kept = self.0.lock().await.take();
        let (counter, sender) = match kept {
            Some(k) if k.backend == backend => (k.counter, k.sender),
            _ => (counter(counts, backend), None),
        };
        if let Some(mut sender) = sender
            && sender.ready().await.is_ok()
        {
            return (counter, Ok(sender));
        }
        (counter, Self::connect(backend).await)
    }

    async fn connect(backend: SocketAddr) -> std::io::Result<SendRequest<Incoming>> {
        let stream = TcpStream::connect(backend).await?;
        let _ = stream.set_nodelay(true);
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(std::io::Error::other)?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(%backend, error = %e, "backend connection ended with an error");
            }
        });
        Ok(sender)
    }

    /// Keeps the counter and `sender` for the next request.
    async fn keep(&self, backend: SocketAddr, counter: Counter, sender: SendRequest<Incoming>) {
        *self.0.lock().await = Some(Kept {
            backend,
            counter,
            sender: Some(sender),
        });
    }
}

/// Forwards one request to the backend current at its arrival.
async fn route(
    routing: Arc<Routing>,
    upstream: Arc<Upstream>,
    mut req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let backend = match routing.now() {
        Some(b) => b,
        // None now: hold the request, on a copy of the routing that can wait.
        None => match Routing::clone(&routing).current().await {
            Some(b) => b,
            None => {
                return Ok(plain(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "no healthy process behind this port\n",
                ));
            }
        },
    };
    // The backend gets the request target in origin form (`/path?query`).
    if req.uri().authority().is_some() {
        let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
        let Ok(uri) = path.parse() else {
            return Ok(plain(StatusCode::BAD_REQUEST, "bad request target\n"));
        };
        *req.uri_mut() = uri;
    }
    let (counter, sender) = upstream.take(backend, &routing.counts).await;
    let busy = Busy::new(&counter);
    let mut sender = match sender {
        Ok(s) => s,
        Err(e) => {
            debug!(%backend, error = %e, "cannot reach the backend");
            return Ok(plain(
                StatusCode::BAD_GATEWAY,
                "the service did not answer\n",
            ));
        }
    };
    let answer = sender.send_request(req);
    upstream.keep(backend, counter, sender).await;
    match answer.await {
        Ok(resp) => {
            // The response body streams back after this returns; the request
            // counts as in flight until it has.
            let (parts, body) = resp.into_parts();
            Ok(Response::from_parts(
                parts,
                Body::Upstream { body, _busy: busy },
            ))
        }
        Err(e) => {
            debug!(%backend, error = %e, "backend failed");
            Ok(plain(
                StatusCode::BAD_GATEWAY,
                "the service did not answer\n",
            ))
        }
    }
}

/// Serves one client connection, request by request, until it closes or the
/// front shuts down (then gracefully: the request in progress finishes).
async fn serve_client(stream: TcpStream, routing: Routing) {
    let stop = routing.stop.clone();
    let routing = Arc::new(routing);
    let upstream = Arc::new(Upstream::default());
    let service =
        hyper::service::service_fn(move |req| route(routing.clone(), upstream.clone(), req));
    serve_http1(stream, service, stop).await;
}

/// Serves HTTP/1.1 with keep-alive on one connection with `service`, until the
/// client closes it or `stop` (then gracefully: the request in progress finishes).
pub(crate) async fn serve_http1<S, B>(stream: TcpStream, service: S, stop: CancellationToken)
where
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>> + Send,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let conn = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        .serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    tokio::select! {
        res = conn.as_mut() => {
            if let Err(e) = res {
                debug!(error = %e, "client connection ended with an error");
            }
        }
        () = stop.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

/// Listens on `public` for an `http` port, routing each request to the backend
/// of `route`; a request arriving while it has none waits up to `hold`.
pub async fn bind_http(public: SocketAddr, route: Route, hold: Duration) -> std::io::Result<Front> {
    Front::bind(public, route, hold, serve_client).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::front::Router;
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    use tokio::net::{TcpListener, TcpStream};

    const KEY: &str = "svc/main";

    /// A front on a free port following route KEY, set to `backend`.
    async fn bind_front(backend: Option<SocketAddr>, hold: Duration) -> (Router, Front) {
        let router = Router::new();
        router.set([(KEY.to_owned(), backend)]);
        let front = bind_http("127.0.0.1:0".parse().unwrap(), router.route(KEY), hold)
            .await
            .unwrap();
        (router, front)
    }

    /// An HTTP/1.1 backend answering `name` to every request, after `delay`.
    async fn backend(name: &'static str, delay: Duration) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let service =
                        hyper::service::service_fn(move |_req: Request<Incoming>| async move {
                            tokio::time::sleep(delay).await;
                            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(
                                name.as_bytes(),
                            ))))
                        });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(s), service)
                        .await;
                });
            }
        });
        addr
    }

    /// Sends one GET on an open keep-alive connection and reads the body.
    async fn get(conn: &mut BufReader<TcpStream>) -> (u16, String) {
        conn.get_mut()
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut status = String::new();
        conn.read_line(&mut status).await.unwrap();
        let code: u16 = status.split_whitespace().nth(1).unwrap().parse().unwrap();
        let mut len = 0usize;
        loop {
            let mut line = String::new();
            conn.read_line(&mut line).await.unwrap();
            let line = line.trim_end().to_ascii_lowercase();
            if line.is_empty() {
                break;
            }
            if let Some(v) = line.strip_prefix("content-length:") {
                len = v.trim().parse().unwrap();
            }
        }
        let mut body = vec![0u8; len];
        conn.read_exact(&mut body).await.unwrap();
        (code, String::from_utf8(body).unwrap())
    }

    #[tokio::test]
    async fn a_switch_moves_the_next_request_of_a_kept_alive_connection() {
        let (a, b) = (
            backend("a", Duration::ZERO).await,
            backend("b", Duration::ZERO).await,
        );
        let (router, front) = bind_front(Some(a), Duration::from_secs(5)).await;
        let mut conn = BufReader::new(TcpStream::connect(front.local_addr()).await.unwrap());
        assert_eq!(get(&mut conn).await, (200, "a".into()));
        router.set([(KEY.to_owned(), Some(b))]);
        // Same client connection, next request: the new process answers.
        assert_eq!(get(&mut conn).await, (200, "b".into()));
        front.shutdown().await;
    }

    #[tokio::test]
    async fn requests_in_flight_finish_on_the_old_process() {
        let slow_old = backend("old", Duration::from_millis(300)).await;
        let new = backend("new", Duration::ZERO).await;
        let (router, front) = bind_front(Some(slow_old), Duration::from_secs(5)).await;
        let addr = front.local_addr();
        let pending = tokio::spawn(async move {
            let mut conn = BufReader::new(TcpStream::connect(addr).await.unwrap());
            get(&mut conn).await
        });
        // Wait until the request is in flight on the old process, then switch.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while front.busy(slow_old) == 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "request never arrived"
            );
            tokio::task::yield_now().await;
        }
        router.set([(KEY.to_owned(), Some(new))]);
        assert_eq!(pending.await.unwrap(), (200, "old".into()));
        let mut conn = BufReader::new(TcpStream::connect(addr).await.unwrap());
        assert_eq!(get(&mut conn).await, (200, "new".into()));
        assert_eq!(front.busy(slow_old), 0);
        front.shutdown().await;
    }

    #[tokio::test]
    async fn no_backend_holds_then_503_and_a_dead_backend_is_502() {
        let (router, front) = bind_front(None, Duration::from_millis(100)).await;
        let mut conn = BufReader::new(TcpStream::connect(front.local_addr()).await.unwrap());
        assert_eq!(get(&mut conn).await.0, 503);
        // A backend address nobody listens on.
        let dead = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        router.set([(KEY.to_owned(), Some(dead))]);
        assert_eq!(get(&mut conn).await.0, 502);
        front.shutdown().await;

        // A backend appearing while a request is held gets that request.
        let (router, front) = bind_front(None, Duration::from_secs(30)).await;
        let addr = front.local_addr();
        let held = tokio::spawn(async move {
            let mut c = BufReader::new(TcpStream::connect(addr).await.unwrap());
            get(&mut c).await
        });
        let late = backend("late", Duration::ZERO).await;
        router.set([(KEY.to_owned(), Some(late))]);
        assert_eq!(held.await.unwrap(), (200, "late".into()));
        front.shutdown().await;
    }
}
