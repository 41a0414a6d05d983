//! The front for `http` ports: it owns the public port and routes each
//! request, not each connection, to the backend currently behind it.
//!
//! Clients keep their connections to the front (HTTP/1.1 keep-alive); each
//! request is forwarded to the backend its route names when it arrives, over
//! the client connection's own connection to that backend (a new one after a
//! switch). So after a [`crate::Router::set`] the next request of an existing
//! client connection goes to the new process, while requests already in flight
//! finish on the old one ([`crate::Front::busy`] counts them, so an upgrade can
//! wait for the drain). With no backend, a request waits up to the hold time
//! and then gets `503`; a backend that fails before answering gives `502`.
//!
//! The forwarding is a small HTTP/1.x relay of its own rather than a server and
//! a client stacked: one task per client connection reads a request head,
//! writes it (re-made without hop-by-hop headers, [`crate::http1`]) and the
//! body as it arrives to the backend, then does the same with the response.
//! Bodies pass through as bytes, never re-framed and never held whole, and a
//! small response goes out in one write. That is what lets the front keep up
//! with nginx (`scripts/bench-proxy`). Along the way it:
//!
//! - tells the service who the client is: `X-Forwarded-For` with the peer's
//!   address, replacing any the client sent, unless the peer is one of the
//!   configured trusted proxies (then appended to theirs);
//! - answers `Expect: 100-continue` itself;
//! - drops a kept backend connection that turned readable while idle (closed,
//!   or holding bytes nobody asked for), and sends a body-less idempotent
//!   request again, where the table says now, when the kept one turns out
//!   closed before any answer;
//! - turns an accepted upgrade (`101`, e.g. WebSocket) into a tunnel that
//!   counts as in flight until it closes;
//! - passes on a backend's early answer to an upload it did not read (a
//!   `413`), then closes, lingering so the close does not reset the answer;
//! - answers `408` and closes when a request head is not whole within the
//!   head timeout, or a request body sends nothing for the body timeout
//!   (once the answer began, only closes), so a client that trickles its
//!   bytes cannot hold a connection;
//! - closes client connections idle for one to two idle timeouts (75–150 s
//!   by default), and ends an exchange in which nothing moves either way for
//!   as long: `408` if the client's body stopped coming, `504` if the service
//!   did not answer, a closed connection if its answer stalled half-way;
//! - refuses what it cannot frame safely (`400`, `431`) and closes.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::FrontConfig;
use crate::http1::{self, Added, Chunked, FrameError, Length, RequestHead, ResponseHead};
use crate::port::{Busy, Counter, DRAIN_IDLE, Front, Listen, Route, Routing, counter};

/// The time limits of one client connection (see [`FrontConfig`]).
///
/// Idle: a connection that completes no request for a whole idle timeout is
/// closed, and so is an exchange in which nothing moves either way for as
/// long. One timer per connection, armed once per period rather than once per
/// request (a timer per request cost the front a few percent of its rate):
/// when it fires, a connection that completed a request (or moved a byte)
/// since the last firing gets another period, so a connection is closed after
/// one to two periods of idleness.
///
/// Head: a request head must be whole by a deadline, counted from the
/// connection's start for its first request and from the head's first byte
/// for the next ones. Only a head that is not whole in its first read arms a
/// timer for it, so keep-alive requests that arrive whole cost none.
///
/// Body: each read of a request body waits at most the body timeout.
struct Timers {
    period: Duration,
    timer: std::pin::Pin<Box<tokio::time::Sleep>>,
    /// Requests completed on the connection, and that count at the last firing.
    served: u64,
    served_at_last_check: u64,
    /// The count of body and answer bytes moved at the last firing.
    moved_at_last_check: u64,
    /// How long a head may take, and when the one being read must be whole
    /// (`None`: none of it has come yet).
    head: Duration,
    head_by: Option<tokio::time::Instant>,
    /// How long a read of a request body may wait.
    body: Duration,
}

/// What waiting for more of a request head came to.
enum HeadRead {
    /// This many bytes came (0: the client closed).
    Read(usize),
    /// The connection was idle too long.
    Idle,
    /// The head was not whole by its deadline.
    Late,
}

impl Timers {
    fn new(config: &FrontConfig) -> Self {
        let period = config.idle_timeout;
        Self {
            period,
            timer: Box::pin(tokio::time::sleep(period)),
            served: 0,
            served_at_last_check: 0,
            moved_at_last_check: 0,
            head: config.head_timeout,
            head_by: Some(tokio::time::Instant::now() + config.head_timeout),
            body: config.body_timeout,
        }
    }

    /// Resolves once a whole period has passed in which no body or answer
    /// byte moved either way (`moved` counts them), so after one to two
    /// periods of standstill.
    async fn stalled(&mut self, moved: &AtomicU64) {
        loop {
            self.timer.as_mut().await;
            let moved = moved.load(Ordering::Relaxed);
            if moved == self.moved_at_last_check {
                return;
            }
            self.moved_at_last_check = moved;
            let next = tokio::time::Instant::now() + self.period;
            self.timer.as_mut().reset(next);
        }
    }

    /// Reads more of a request head from the client, within the head's
    /// deadline (armed here once part of it has come) and the idle timeout.
    async fn read_head(&mut self, client: &mut Side) -> std::io::Result<HeadRead> {
        if self.head_by.is_none() && !client.buf.is_empty() {
            self.head_by = Some(tokio::time::Instant::now() + self.head);
        }
        let by = self.head_by;
        let late = async move {
            match by {
                Some(by) => tokio::time::sleep_until(by).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(late);
        loop {
            tokio::select! {
                biased;
                read = client.fill() => return read.map(HeadRead::Read),
                () = &mut late => return Ok(HeadRead::Late),
                () = self.timer.as_mut() => {
                    if self.served == self.served_at_last_check {
                        return Ok(HeadRead::Idle);
                    }
                    self.served_at_last_check = self.served;
                    let next = tokio::time::Instant::now() + self.period;
                    self.timer.as_mut().reset(next);
                }
            }
        }
    }

    /// A whole head came: the next one's deadline starts with its first byte.
    fn head_done(&mut self) {
        self.head_by = None;
    }
}

/// How long a closing client connection is read from after the last response.
const LINGER: Duration = Duration::from_secs(2);

/// How much is read at a time.
const READ_CHUNK: usize = 16 * 1024;

/// Bytes read from a connection and not yet used: `data[start..]`. Using
/// bytes moves `start`; the used ones are reclaimed when all are used (the
/// common case: nothing to move) or when room runs short.
struct Inbox {
    data: Vec<u8>,
    start: usize,
}

impl Inbox {
    fn new() -> Self {
        Self {
            data: Vec::with_capacity(READ_CHUNK),
            start: 0,
        }
    }

    /// What was read and not yet used.
    fn bytes(&self) -> &[u8] {
        &self.data[self.start..]
    }

    fn is_empty(&self) -> bool {
        self.start == self.data.len()
    }

    /// Marks the first `n` bytes as used.
    fn advance(&mut self, n: usize) {
        self.start = (self.start + n).min(self.data.len());
        if self.start == self.data.len() {
            self.data.clear();
            self.start = 0;
        }
    }

    /// Reads what has arrived from `from`; `Ok(0)` once it has closed.
    async fn fill<R: AsyncRead + Unpin>(&mut self, from: &mut R) -> std::io::Result<usize> {
        if self.data.capacity() - self.data.len() < READ_CHUNK / 4 {
            // Room first from the bytes already used, then from the allocator.
            self.data.drain(..self.start);
            self.start = 0;
            if self.data.capacity() - self.data.len() < READ_CHUNK / 4 {
                self.data.reserve(READ_CHUNK);
            }
        }
        from.read_buf(&mut self.data).await
    }

    /// [`Inbox::fill`], adding what it read to `moved`.
    async fn fill_counted<R: AsyncRead + Unpin>(
        &mut self,
        from: &mut R,
        moved: &AtomicU64,
    ) -> std::io::Result<usize> {
        let n = self.fill(from).await?;
        moved.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// One connection and what was read from it but not yet used.
struct Side {
    stream: TcpStream,
    buf: Inbox,
}

impl Side {
    fn new(stream: TcpStream) -> Self {
        Self {
            stream,
            buf: Inbox::new(),
        }
    }

    /// Reads what has arrived; `Ok(0)` once the peer has closed.
    async fn fill(&mut self) -> std::io::Result<usize> {
        self.buf.fill(&mut self.stream).await
    }
}

/// Where a body is: how much of it is still to come.
enum BodyLeft {
    Fixed(u64),
    Chunked(Chunked),
    ToClose,
}

impl BodyLeft {
    fn new(length: Length) -> Self {
        match length {
            Length::Fixed(n) => Self::Fixed(n),
            Length::Chunked => Self::Chunked(Chunked::new()),
            Length::ToClose => Self::ToClose,
        }
    }

    fn is_done(&self) -> bool {
        match self {
            Self::Fixed(n) => *n == 0,
            Self::Chunked(c) => c.is_done(),
            Self::ToClose => false,
        }
    }

    /// How many of `bytes` (the next ones read) belong to the body.
    fn take(&mut self, bytes: &[u8]) -> Result<usize, FrameError> {
        match self {
            Self::Fixed(left) => {
                let n = usize::try_from(*left)
                    .unwrap_or(usize::MAX)
                    .min(bytes.len());
                *left -= n as u64;
                Ok(n)
            }
            Self::Chunked(c) => c.scan(bytes),
            Self::ToClose => Ok(bytes.len()),
        }
    }
}

/// Why copying a body stopped short.
enum CopyError {
    /// The side it came from failed, closed early, or sent a malformed body.
    Read,
    /// The side it came from sent nothing for as long as it may.
    Stalled,
    /// The side it went to failed.
    Write,
}

/// Copies the rest of a body from `from` (the bytes already read from it in
/// `buf` first) to `to`; with `stall`, a read from `from` that waits longer
/// than that is [`CopyError::Stalled`] (time spent writing to `to` does not
/// count).
async fn copy_body<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    from: &mut R,
    buf: &mut Inbox,
    to: &mut W,
    left: &mut BodyLeft,
    moved: &AtomicU64,
    stall: Option<Duration>,
) -> Result<(), CopyError> {
    loop {
        if !buf.is_empty() {
            let mut n = left.take(buf.bytes()).map_err(|_| CopyError::Read)?;
            // Written piece by piece, each piece leaving `buf` as it goes out:
            // if this is dropped half-way (the backend switched protocols),
            // `buf` holds exactly what the backend has not got.
            while n > 0 {
                let wrote = to
                    .write(&buf.bytes()[..n])
                    .await
                    .map_err(|_| CopyError::Write)?;
                if wrote == 0 {
                    return Err(CopyError::Write);
                }
                buf.advance(wrote);
                n -= wrote;
            }
        }
        if left.is_done() {
            return Ok(());
        }
        let read = buf.fill_counted(from, moved);
        let read = match stall {
            Some(limit) => tokio::time::timeout(limit, read)
                .await
                .map_err(|_| CopyError::Stalled)?,
            None => read.await,
        };
        match read {
            Ok(0) if matches!(left, BodyLeft::ToClose) => return Ok(()),
            Ok(0) | Err(_) => return Err(CopyError::Read),
            Ok(_) => {}
        }
    }
}

/// Moves the bytes in `buf` that belong to the body onto `out`.
fn take_buffered(
    buf: &mut Inbox,
    left: &mut BodyLeft,
    out: &mut Vec<u8>,
) -> Result<(), FrameError> {
    let n = left.take(buf.bytes())?;
    out.extend_from_slice(&buf.bytes()[..n]);
    buf.advance(n);
    Ok(())
}

/// A client connection's backend: its in-flight counter and, between requests,
/// the open connection to it (none yet, or closed by the last response).
struct Upstream {
    backend: SocketAddr,
    counter: Counter,
    conn: Option<Side>,
    /// [`Routing::table_reads`] when the counter was looked up.
    table: u64,
}

/// Why no response came from the backend.
enum NoResponse {
    /// The kept connection was closed before anything came back: the request
    /// may go again, on a new connection.
    Closed,
    /// Anything else (no connection, a malformed or unasked-for answer, a
    /// close in the middle of a head): the client gets a `502`.
    Failed,
    /// The client failed or left: nothing to answer.
    Client,
    /// The backend failed after the response began, or the exchange stood
    /// still after it: too late for a `502`, the client sees its connection end.
    Broken,
    /// Nothing moved for a whole idle period before the answer began: the
    /// client gets this status, and its connection ends.
    Stalled((u16, &'static str)),
}

/// What reading the answer to a request needs to know about it.
#[derive(Clone, Copy)]
struct Asked<'a> {
    req: &'a RequestHead,
    /// The connection was kept from an earlier request, so its end before any
    /// answer is [`NoResponse::Closed`].
    reused: bool,
    /// Body and answer bytes moved on the client's connection.
    moved: &'a AtomicU64,
}

/// What came back for a request.
enum Relayed {
    /// A whole response went to the client; `close`: its connection ends.
    Done { resp: ResponseHead, close: bool },
    /// `101`: the head is in `scratch.response`, nothing passed on yet.
    Switching,
}

/// What happens to the client connection after an exchange.
enum Next {
    KeepAlive,
    Close,
}

/// The reusable buffers of one client connection, and the header lines the
/// front adds to each of its requests.
#[derive(Default)]
struct Scratch {
    request: Vec<u8>,
    response: Vec<u8>,
    /// `X-Forwarded-For: <client address>`: the services see the client, not
    /// the front.
    forwarded: Vec<u8>,
    /// Whether the client's own `X-Forwarded-For` lines are passed on (before
    /// the front's): only from a trusted proxy.
    keep_forwarded: bool,
    /// Body and answer bytes moved on this connection (see [`Timers::stalled`]).
    moved: AtomicU64,
}

/// Serves one client connection, request by request, until it closes, sends
/// something that is not HTTP, or the front shuts down.
async fn serve_client(stream: TcpStream, mut routing: Routing, config: &FrontConfig) {
    let mut scratch = Scratch::default();
    if let Ok(peer) = stream.peer_addr() {
        let ip = peer.ip().to_canonical();
        scratch.forwarded = format!("X-Forwarded-For: {ip}\r\n").into_bytes();
        scratch.keep_forwarded = config.trusts(ip);
    }
    let mut client = Side::new(stream);
    let mut upstream: Option<Upstream> = None;
    let mut timers = Timers::new(config);
    loop {
        // Draining: a connection with nothing to answer waits a moment for
        // its next request (answered with `Connection: close`), then ends.
        if routing.draining.is_stopped()
            && client.buf.is_empty()
            && tokio::time::timeout(DRAIN_IDLE, client.stream.readable())
                .await
                .is_err()
        {
            break;
        }
        let next = exchange(
            &mut client,
            &mut upstream,
            &mut routing,
            &mut scratch,
            &mut timers,
        )
        .await;
        timers.served += 1;
        match next {
            Ok(Next::KeepAlive) if !routing.stop.is_stopped() => {}
            Ok(_) | Err(_) => break,
        }
    }
    let _ = client.stream.shutdown().await;
    // A lingering close: read what the client still sends (the rest of a body
    // nobody read) for a moment, so that closing does not reset the connection
    // under the response the client has yet to read.
    let mut sink = [0u8; 4096];
    let _ = tokio::time::timeout(LINGER, async {
        while let Ok(1..) = client.stream.read(&mut sink).await {}
    })
    .await;
}

/// Writes a response of the front's own. A request with a body that was not
/// read ends the connection: its bytes would be taken for the next request.
async fn answer(
    client: &mut Side,
    scratch: &mut Scratch,
    req: Option<&RequestHead>,
    (status, reason): (u16, &str),
    text: &str,
) -> std::io::Result<Next> {
    let close = req.is_none_or(|r| !r.keep_alive || r.body != Length::Fixed(0));
    scratch.response.clear();
    http1::own_response(status, reason, text, close, &mut scratch.response);
    client.stream.write_all(&scratch.response).await?;
    Ok(if close { Next::Close } else { Next::KeepAlive })
}

const BAD_GATEWAY: (u16, &str) = (502, "Bad Gateway");
const REQUEST_TIMEOUT: (u16, &str) = (408, "Request Timeout");
const UNAVAILABLE: (u16, &str) = (503, "Service Unavailable");
const NO_BACKEND: &str = "no healthy process behind this port\n";

/// Picks the backend for a request (waiting up to the hold time while there
/// is none), counts the request on it and returns the count with the
/// connection's upstream for it; `None`: no backend within the hold.
///
/// The count comes first and the table is checked again after it, so a
/// cutover either sees this request on the old backend's counter (and waits
/// for it) or this request sees the cutover (and goes to the new backend).
async fn route<'u>(
    upstream: &'u mut Option<Upstream>,
    routing: &mut Routing,
) -> Option<(Busy, &'u mut Upstream)> {
    let (busy, backend) = loop {
        let backend = match routing.now() {
            Some(b) => b,
            None => routing.current().await?,
        };
        let busy = Busy::new(&upstream_for(upstream, routing, backend).counter);
        if !routing.route_changed() {
            break (busy, backend);
        }
    };
    // The same backend and table: this finds what the loop just set up.
    Some((busy, upstream_for(upstream, routing, backend)))
}

/// The connection's upstream for `backend`: the kept one, with its counter
/// looked up again if the table changed since, or a new one.
fn upstream_for<'u>(
    upstream: &'u mut Option<Upstream>,
    routing: &Routing,
    backend: SocketAddr,
) -> &'u mut Upstream {
    if upstream.as_ref().is_some_and(|up| up.backend != backend) {
        *upstream = None;
    }
    let up = upstream.get_or_insert_with(|| Upstream {
        backend,
        counter: counter(&routing.counts, backend),
        conn: None,
        table: routing.table_reads,
    });
    // The table changed since this counter was looked up: the address may now
    // be another process, with another counter (or none, forgotten).
    if up.table != routing.table_reads {
        let now = counter(&routing.counts, backend);
        if !std::sync::Arc::ptr_eq(&now, &up.counter) {
            up.counter = now;
            up.conn = None;
        }
        up.table = routing.table_reads;
    }
    up
}

/// One request and its response.
async fn exchange(
    client: &mut Side,
    upstream: &mut Option<Upstream>,
    routing: &mut Routing,
    scratch: &mut Scratch,
    timers: &mut Timers,
) -> std::io::Result<Next> {
    // The request head.
    scratch.request.clear();
    let added = Added {
        lines: &scratch.forwarded,
        replacing: if scratch.keep_forwarded {
            &[]
        } else {
            &["x-forwarded-for"]
        },
    };
    let req = loop {
        match http1::parse_request(client.buf.bytes(), &added, &mut scratch.request) {
            Ok(Some(req)) => break req,
            Ok(None) => {}
            Err(e) => {
                let status = match e {
                    FrameError::HeadTooLarge => (431, "Request Header Fields Too Large"),
                    FrameError::Connect => (405, "Method Not Allowed"),
                    _ => (400, "Bad Request"),
                };
                return answer(client, scratch, None, status, &format!("{e}\n")).await;
            }
        }
        match timers.read_head(client).await? {
            HeadRead::Read(0) | HeadRead::Idle => return Ok(Next::Close),
            HeadRead::Read(_) => {}
            // Nothing of a head came: no request to answer.
            HeadRead::Late if client.buf.is_empty() => return Ok(Next::Close),
            HeadRead::Late => {
                let late = "the request head did not come in time\n";
                return answer(client, scratch, None, REQUEST_TIMEOUT, late).await;
            }
        }
    };
    timers.head_done();
    client.buf.advance(req.consumed);
    // A draining front answers with `Connection: close`: the client's next
    // request goes to a new connection, which the front taking over accepts.
    let mut req = req;
    if routing.draining.is_stopped() {
        req.keep_alive = false;
    }
    // A request arriving is movement: a standstill is counted from here, not
    // from an idle moment before it.
    scratch
        .moved
        .fetch_add(req.consumed as u64, Ordering::Relaxed);

    // Its backend, and counted on it from here until the response has been
    // passed on.
    let Some((mut _in_flight, mut up)) = route(upstream, routing).await else {
        return answer(client, scratch, Some(&req), UNAVAILABLE, NO_BACKEND).await;
    };

    if req.expects_continue {
        client
            .stream
            .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
            .await?;
    }
    let mut body = BodyLeft::new(req.body);
    if let Err(e) = take_buffered(&mut client.buf, &mut body, &mut scratch.request) {
        return answer(
            client,
            scratch,
            None,
            (400, "Bad Request"),
            &format!("{e}\n"),
        )
        .await;
    }
    // A request that is whole in `scratch.request`, has no body and may
    // repeat can be sent again.
    let resendable = body.is_done() && req.body == Length::Fixed(0) && req.idempotent;

    let mut again = resendable;
    let relayed = loop {
        match send(client, up, &req, &mut body, scratch, timers).await {
            // The kept backend connection was closed: sent again on a new one.
            Err(NoResponse::Closed) if again => {
                again = false;
                up.conn = None;
                // A backend closing its kept connections may be one being
                // drained after a cutover: the request goes where the table
                // says now.
                if routing.route_changed() {
                    let Some((count, now)) = route(upstream, routing).await else {
                        return answer(client, scratch, Some(&req), UNAVAILABLE, NO_BACKEND).await;
                    };
                    (_in_flight, up) = (count, now);
                }
            }
            other => break other,
        }
    };
    let (resp, close) = match relayed {
        Ok(Relayed::Done { resp, close }) => (resp, close),
        Ok(Relayed::Switching) => {
            // The client asked for it (else `read_head` refused it): from here
            // on the connection is the two peers' own.
            let mut backend_side = up.conn.take().expect("a response came on it");
            scratch.response.extend_from_slice(backend_side.buf.bytes());
            client.stream.write_all(&scratch.response).await?;
            if !client.buf.is_empty() {
                backend_side.stream.write_all(client.buf.bytes()).await?;
            }
            tokio::io::copy_bidirectional(&mut client.stream, &mut backend_side.stream).await?;
            return Ok(Next::Close);
        }
        Err(e) => return fail(client, up, scratch, &req, e).await,
    };
    // Bytes after the response are not an answer to anything: a connection
    // that has them is not used again; nor one whose request was cut short.
    if !resp.reusable || close || up.conn.as_ref().is_some_and(|c| !c.buf.is_empty()) {
        up.conn = None;
    }
    Ok(if close { Next::Close } else { Next::KeepAlive })
}

/// Answers a request no response came for.
async fn fail(
    client: &mut Side,
    up: &mut Upstream,
    scratch: &mut Scratch,
    req: &RequestHead,
    why: NoResponse,
) -> std::io::Result<Next> {
    up.conn = None;
    match why {
        // Too late for an answer of the front's own: the client's connection ends.
        NoResponse::Client | NoResponse::Broken => Ok(Next::Close),
        NoResponse::Stalled(status) => {
            answer(
                client,
                scratch,
                None,
                status,
                "nothing moved for too long\n",
            )
            .await
        }
        NoResponse::Closed | NoResponse::Failed => {
            answer(
                client,
                scratch,
                Some(req),
                BAD_GATEWAY,
                "the service did not answer\n",
            )
            .await
        }
    }
}

/// Whether an idle kept connection has become readable: closed by the
/// backend, or holding bytes nobody asked for. `try_read` consults the
/// poller's readiness first, so this costs no system call while the poller has
/// seen nothing; the byte read is lost, but so is the connection.
fn stale(stream: &TcpStream) -> bool {
    !matches!(stream.try_read(&mut [0u8; 1]), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

/// Sends the request on the kept connection or a new one: its head and
/// buffered body (in `scratch.request`), then the rest of its body while the
/// response comes back and goes on to the client (see [`relay`]).
async fn send(
    client: &mut Side,
    up: &mut Upstream,
    req: &RequestHead,
    body: &mut BodyLeft,
    scratch: &mut Scratch,
    timers: &mut Timers,
) -> Result<Relayed, NoResponse> {
    // A kept connection that has something to read before it was asked
    // anything (the backend closed it, or sent what answers nothing) is
    // dropped. Asking costs no system call unless the poller saw it readable.
    if up.conn.as_ref().is_some_and(|c| stale(&c.stream)) {
        up.conn = None;
    }
    let reused = up.conn.is_some();
    let conn = match &mut up.conn {
        Some(conn) => conn,
        None => {
            let stream = TcpStream::connect(up.backend)
                .await
                .map_err(|_| NoResponse::Failed)?;
            let _ = stream.set_nodelay(true);
            up.conn.insert(Side::new(stream))
        }
    };
    if conn.stream.write_all(&scratch.request).await.is_err() {
        return Err(if reused {
            NoResponse::Closed
        } else {
            NoResponse::Failed
        });
    }
    let asked = Asked {
        req,
        reused,
        moved: &scratch.moved,
    };
    relay(client, conn, body, &mut scratch.response, timers, asked).await
}

/// Sends the rest of the request body from the client to the backend while
/// reading the response and passing it on, so that neither side waits on the
/// other: a backend may answer before it has read the whole body (a `413`),
/// or stream its answer while it reads (an echo). A response that starts
/// before the body is all sent ends the client's connection after it.
async fn relay(
    client: &mut Side,
    conn: &mut Side,
    body: &mut BodyLeft,
    response: &mut Vec<u8>,
    timers: &mut Timers,
    asked: Asked<'_>,
) -> Result<Relayed, NoResponse> {
    let moved = asked.moved;
    let body_stall = timers.body;
    let (mut client_rd, mut client_wr) = client.stream.split();
    let (mut backend_rd, mut backend_wr) = conn.stream.split();
    let (client_buf, backend_buf) = (&mut client.buf, &mut conn.buf);
    let sent = AtomicBool::new(body.is_done());
    let answered = AtomicBool::new(false);
    let respond = async {
        let resp = read_head(
            &mut backend_rd,
            backend_buf,
            response,
            &mut client_wr,
            asked,
            &sent,
        )
        .await?;
        if resp.status == 101 {
            return Ok(Relayed::Switching);
        }
        let close = resp.close_client;
        // The head, with as much of the body as has arrived, in one write;
        // then the rest.
        let mut left = BodyLeft::new(resp.body);
        // A malformed start of the body: a 502 still fits.
        take_buffered(backend_buf, &mut left, response).map_err(|_| NoResponse::Failed)?;
        client_wr
            .write_all(response)
            .await
            .map_err(|_| NoResponse::Client)?;
        answered.store(true, Ordering::Relaxed);
        if left.is_done() {
            return Ok(Relayed::Done { resp, close });
        }
        match copy_body(
            &mut backend_rd,
            backend_buf,
            &mut client_wr,
            &mut left,
            moved,
            None,
        )
        .await
        {
            Ok(()) => Ok(Relayed::Done { resp, close }),
            Err(CopyError::Read | CopyError::Stalled) => Err(NoResponse::Broken),
            Err(CopyError::Write) => Err(NoResponse::Client),
        }
    };
    // Nothing moving either way for a whole period ends the exchange: the
    // client is told the backend did not answer in time (504) or that its
    // body did not come in time (408), or, once its answer has begun, sees
    // the connection end.
    let stalled = |uploading: bool| {
        if answered.load(Ordering::Relaxed) {
            NoResponse::Broken
        } else if uploading {
            NoResponse::Stalled(REQUEST_TIMEOUT)
        } else {
            NoResponse::Stalled((504, "Gateway Timeout"))
        }
    };
    if body.is_done() {
        // Most requests: nothing more to send, only the answer to relay.
        return tokio::select! {
            biased;
            relayed = respond => relayed,
            () = timers.stalled(moved) => Err(stalled(false)),
        };
    }
    let upload = async {
        let copied = copy_body(
            &mut client_rd,
            client_buf,
            &mut backend_wr,
            body,
            moved,
            Some(body_stall),
        )
        .await;
        sent.store(copied.is_ok(), Ordering::Relaxed);
        copied
    };
    tokio::pin!(upload, respond);
    let mut cut = false;
    let mut uploading = true;
    loop {
        tokio::select! {
            biased;
            copied = &mut upload, if uploading => {
                uploading = false;
                match copied {
                    Ok(()) => {}
                    // The client left, or sent a body that is not one.
                    Err(CopyError::Read) => return Err(NoResponse::Client),
                    // Its body stopped coming.
                    Err(CopyError::Stalled) => return Err(stalled(true)),
                    // The backend stopped reading: its answer may still come.
                    Err(CopyError::Write) => cut = true,
                }
            }
            () = timers.stalled(moved) => return Err(stalled(uploading)),
            relayed = &mut respond => {
                // Cut off while sending the body, and no answer: not a
                // kept connection that may be asked again.
                return match (relayed, cut) {
                    (Err(NoResponse::Closed | NoResponse::Failed), true) => Err(NoResponse::Failed),
                    (relayed, _) => relayed,
                };
            }
        }
    }
}

/// Reads the final response head from the backend into `response`, passing
/// interim (`1xx`) ones on to the client.
///
/// `sent`: whether the request body has all gone to the backend. A response
/// that starts before it has ends the client's connection (its head says so),
/// since the rest of the body will not be read.
async fn read_head<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    from: &mut R,
    buf: &mut Inbox,
    response: &mut Vec<u8>,
    client: &mut W,
    asked: Asked<'_>,
    sent: &AtomicBool,
) -> Result<ResponseHead, NoResponse> {
    let Asked { req, reused, moved } = asked;
    let cut_short = RequestHead {
        keep_alive: false,
        ..*req
    };
    let closed = if reused {
        NoResponse::Closed
    } else {
        NoResponse::Failed
    };
    loop {
        response.clear();
        let answering = if sent.load(Ordering::Relaxed) {
            req
        } else {
            &cut_short
        };
        match http1::parse_response(buf.bytes(), answering, response) {
            Ok(Some(resp)) if resp.is_interim() => {
                buf.advance(resp.consumed);
                if !req.http10 {
                    client
                        .write_all(response)
                        .await
                        .map_err(|_| NoResponse::Client)?;
                }
                continue;
            }
            // A 101 to a request that asked for no upgrade.
            Ok(Some(resp)) if resp.status == 101 && !req.upgrade => {
                return Err(NoResponse::Failed);
            }
            Ok(Some(resp)) => {
                buf.advance(resp.consumed);
                return Ok(resp);
            }
            Ok(None) => {}
            Err(_) => return Err(NoResponse::Failed),
        }
        match buf.fill_counted(from, moved).await {
            // Closed or failed before any answer, or in the middle of a head.
            Ok(0) | Err(_) if buf.is_empty() => return Err(closed),
            Ok(0) | Err(_) => return Err(NoResponse::Failed),
            Ok(_) => {}
        }
    }
}

/// Listens on `public` for an `http` port, routing each request to the backend
/// of `route`; a request arriving while it has none waits up to `hold`.
/// `config` says how clients are treated.
pub async fn bind_http(
    public: SocketAddr,
    route: Route,
    hold: Duration,
    config: &FrontConfig,
) -> std::io::Result<Front> {
    bind_http_on(Listen::new(public, None).await?, route, hold, config)
}

/// [`bind_http`] on a listening socket another process handed over
/// ([`Front::listener`]).
pub fn bind_http_inherited(
    listener: std::net::TcpListener,
    route: Route,
    hold: Duration,
    config: &FrontConfig,
) -> std::io::Result<Front> {
    bind_http_on(Listen::Inherited(listener), route, hold, config)
}

fn bind_http_on(
    listener: Listen,
    route: Route,
    hold: Duration,
    config: &FrontConfig,
) -> std::io::Result<Front> {
    let max = config.max_connections;
    let config = std::sync::Arc::new(config.clone());
    Front::bind(listener, route, hold, max, move |stream, routing| {
        let config = config.clone();
        async move { serve_client(stream, routing, &config).await }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::port::Router;
    use bytes::Bytes;
    use http_body_util::Full;
    use hyper::body::Incoming;
    use hyper::{Request, Response};
    use hyper_util::rt::TokioIo;
    use std::convert::Infallible;
    use std::sync::{Arc, Mutex};
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    use tokio::net::{TcpListener, TcpStream};

    const KEY: &str = "svc/main";

    /// A front on a free port following route KEY, set to `backend`.
    async fn bind_front(backend: Option<SocketAddr>, hold: Duration) -> (Router, Front) {
        configured_front(backend, hold, FrontConfig::default()).await
    }

    /// [`bind_front`] with `config`.
    async fn configured_front(
        backend: Option<SocketAddr>,
        hold: Duration,
        config: FrontConfig,
    ) -> (Router, Front) {
        let router = Router::new();
        router.set([(KEY.to_owned(), backend)]);
        let any = "127.0.0.1:0".parse().unwrap();
        let front = bind_http(any, router.route(KEY), hold, &config)
            .await
            .unwrap();
        (router, front)
    }

    /// The default configuration with `idle` as its idle timeout.
    fn idle_after(idle: Duration) -> FrontConfig {
        FrontConfig {
            idle_timeout: idle,
            ..FrontConfig::default()
        }
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

    /// A response as the client saw it.
    #[derive(Debug)]
    struct Seen {
        status: u16,
        /// Header lines, names lowercased.
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    }

    impl Seen {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.as_str())
        }
        fn text(&self) -> String {
            String::from_utf8_lossy(&self.body).into_owned()
        }
    }

    /// Reads one response (Content-Length, chunked or to the close) from `conn`.
    async fn read_response<R>(conn: &mut R, head_request: bool) -> Seen
    where
        R: tokio::io::AsyncBufRead + Unpin,
    {
        let mut status = String::new();
        conn.read_line(&mut status).await.unwrap();
        let status: u16 = status.split_whitespace().nth(1).unwrap().parse().unwrap();
        let mut headers = Vec::new();
        loop {
            let mut line = String::new();
            conn.read_line(&mut line).await.unwrap();
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            let (n, v) = line.split_once(':').unwrap();
            headers.push((n.trim().to_ascii_lowercase(), v.trim().to_owned()));
        }
        let mut seen = Seen {
            status,
            headers,
            body: Vec::new(),
        };
        if head_request || (100..200).contains(&status) || status == 204 || status == 304 {
            return seen;
        }
        if seen.header("transfer-encoding") == Some("chunked") {
            loop {
                let mut size = String::new();
                conn.read_line(&mut size).await.unwrap();
                let size = usize::from_str_radix(size.trim_end(), 16).unwrap();
                let mut chunk = vec![0u8; size + 2];
                conn.read_exact(&mut chunk).await.unwrap();
                assert_eq!(&chunk[size..], b"\r\n");
                if size == 0 {
                    break;
                }
                seen.body.extend_from_slice(&chunk[..size]);
            }
        } else if let Some(len) = seen.header("content-length") {
            seen.body = vec![0u8; len.parse().unwrap()];
            conn.read_exact(&mut seen.body).await.unwrap();
        } else {
            conn.read_to_end(&mut seen.body).await.unwrap();
        }
        seen
    }

    /// One response's status and whether it said `Connection: close`; an
    /// error where the connection failed or ended before a whole response.
    async fn try_response(conn: &mut BufReader<TcpStream>) -> std::io::Result<(u16, bool)> {
        let mut line = String::new();
        if conn.read_line(&mut line).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("bad status line {line:?}")))?;
        let (mut len, mut close) = (0usize, false);
        loop {
            line.clear();
            if conn.read_line(&mut line).await? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            let l = line.trim_end().to_ascii_lowercase();
            if l.is_empty() {
                break;
            }
            if let Some(v) = l.strip_prefix("content-length:") {
                len = v.trim().parse().unwrap_or(0);
            }
            close |= l == "connection: close";
        }
        let mut body = vec![0u8; len];
        conn.read_exact(&mut body).await?;
        Ok((status, close))
    }

    /// A client asking GETs on keep-alive connections until `stop`, opening
    /// a new connection when told to close (or, with `fresh`, for every
    /// request): (answered 200, failed).
    async fn keep_asking(
        front: SocketAddr,
        fresh: bool,
        stop: Arc<std::sync::atomic::AtomicBool>,
    ) -> (u64, u64) {
        use std::sync::atomic::Ordering::SeqCst;
        let (mut ok, mut failed) = (0u64, 0u64);
        'connections: while !stop.load(SeqCst) {
            let Ok(stream) = TcpStream::connect(front).await else {
                failed += 1;
                continue;
            };
            let mut conn = BufReader::new(stream);
            while !stop.load(SeqCst) {
                let asked = conn
                    .get_mut()
                    .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                    .await;
                match (asked, try_response(&mut conn).await) {
                    (Ok(()), Ok((200, close))) => {
                        ok += 1;
                        if close || fresh {
                            continue 'connections;
                        }
                    }
                    _ => {
                        failed += 1;
                        continue 'connections;
                    }
                }
            }
        }
        (ok, failed)
    }

    /// A shell taking over: a second front accepts on a copy of the first's
    /// listening socket while the first drains. Under keep-alive load and a
    /// stream of new connections, no request fails: each keep-alive client
    /// is told `Connection: close` on its next answer and goes to a new
    /// connection, which the new front takes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_front_handed_over_takes_the_load_while_the_old_one_drains() {
        use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
        let app = backend("app", Duration::ZERO).await;
        let (router, old) = bind_front(Some(app), Duration::from_secs(1)).await;
        let addr = old.local_addr();
        let stop = Arc::new(AtomicBool::new(false));
        let mut clients = Vec::new();
        for i in 0..6 {
            clients.push(tokio::spawn(keep_asking(addr, i == 0, stop.clone())));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let new = bind_http_inherited(
            old.listener().unwrap(),
            router.route(KEY),
            Duration::from_secs(1),
            &FrontConfig::default(),
        )
        .unwrap();
        assert_eq!(new.local_addr(), addr);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let cut = old.drain(Duration::from_secs(10)).await;
        assert_eq!(cut, 0, "the old front had to cut connections");
        // Only the new front answers now, and it does.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut conn = BufReader::new(TcpStream::connect(addr).await.unwrap());
        assert_eq!(get(&mut conn).await, (200, "app".to_owned()));
        assert!(new.connections() >= 1);
        stop.store(true, SeqCst);
        let (mut ok, mut failed) = (0, 0);
        for c in clients {
            let (o, f) = c.await.unwrap();
            (ok, failed) = (ok + o, failed + f);
        }
        assert!(ok > 100, "{ok} answered");
        assert_eq!(failed, 0, "{failed} of {} requests failed", ok + failed);
        new.shutdown().await;
    }

    /// Sends one GET on an open keep-alive connection and reads the body.
    async fn get(conn: &mut BufReader<TcpStream>) -> (u16, String) {
        conn.get_mut()
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let seen = read_response(conn, false).await;
        (seen.status, seen.text())
    }

    /// Sends `raw` on a new connection to `front` and reads one response.
    async fn ask(front: SocketAddr, raw: &[u8]) -> (Seen, BufReader<TcpStream>) {
        let mut conn = BufReader::new(TcpStream::connect(front).await.unwrap());
        conn.get_mut().write_all(raw).await.unwrap();
        let seen = read_response(&mut conn, raw.starts_with(b"HEAD")).await;
        (seen, conn)
    }

    /// Whether `backend` has nothing in flight within 5 s (a request stops
    /// counting a moment after its answer went out).
    async fn drained(front: &Front, backend: SocketAddr) -> bool {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while front.busy(backend) != 0 {
            if tokio::time::Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        true
    }

    /// Whether the front closed `conn` (EOF, nothing more).
    async fn closed<R: AsyncRead + Unpin>(conn: &mut R) -> bool {
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), conn.read_to_end(&mut rest))
            .await
            .is_ok_and(|r| r.is_ok() && rest.is_empty())
    }

    /// An HTTP/1.1 backend (hyper) that answers each request with its method,
    /// target, `Connection` header and body; `/stream` answers in chunks.
    async fn echo_backend() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(|req: Request<Incoming>| async move {
                        use http_body_util::BodyExt;
                        let (parts, body) = req.into_parts();
                        let body = body.collect().await?.to_bytes();
                        if parts.uri.path() == "/stream" {
                            let pieces = (0..3).map(|i| Bytes::from(format!("part{i};"))).collect();
                            return Ok::<_, hyper::Error>(Response::new(
                                http_body_util::Either::Right(Pieces(pieces)),
                            ));
                        }
                        let conn = parts
                            .headers
                            .get("connection")
                            .map_or("-", |v| v.to_str().unwrap_or("?"));
                        if parts.uri.path() == "/who" {
                            let who: Vec<&str> = parts
                                .headers
                                .get_all("x-forwarded-for")
                                .iter()
                                .map(|v| v.to_str().unwrap_or("?"))
                                .collect();
                            let text = Bytes::from(who.join(", "));
                            return Ok(Response::new(http_body_util::Either::Left(Full::new(
                                text,
                            ))));
                        }
                        let mut text = format!(
                            "{} {} conn={conn} len={}\n",
                            parts.method,
                            parts.uri,
                            body.len()
                        )
                        .into_bytes();
                        text.extend_from_slice(&body);
                        Ok(Response::new(http_body_util::Either::Left(Full::new(
                            Bytes::from(text),
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

    /// A body of several pieces and no length: hyper sends it chunked.
    struct Pieces(std::collections::VecDeque<Bytes>);

    impl hyper::body::Body for Pieces {
        type Data = Bytes;
        type Error = Infallible;
        fn poll_frame(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Infallible>>> {
            std::task::Poll::Ready(self.0.pop_front().map(|b| Ok(hyper::body::Frame::data(b))))
        }
    }

    /// A backend that reads one request head per connection and answers with
    /// `reply`, then closes (or keeps reading, when `keep`).
    async fn raw_backend(reply: &'static [u8], keep: bool) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let mut s = BufReader::new(s);
                    while read_head(&mut s).await {
                        if s.get_mut().write_all(reply).await.is_err() || !keep {
                            return;
                        }
                    }
                });
            }
        });
        addr
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
        assert!(drained(&front, slow_old).await);
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

    #[tokio::test]
    async fn idle_and_trickling_clients_are_closed_busy_ones_are_not() {
        let period = Duration::from_millis(300);
        let (_router, front) = configured_front(
            Some(echo_backend().await),
            Duration::ZERO,
            idle_after(period),
        )
        .await;
        let addr = front.local_addr();
        // Requests every 100 ms for four periods: never closed.
        let mut busy = BufReader::new(TcpStream::connect(addr).await.unwrap());
        let started = tokio::time::Instant::now();
        while started.elapsed() < period * 4 {
            assert_eq!(get(&mut busy).await.0, 200);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Silent, or sending a head that never ends: closed within two periods.
        let mut silent = BufReader::new(TcpStream::connect(addr).await.unwrap());
        let mut trickle = BufReader::new(TcpStream::connect(addr).await.unwrap());
        trickle
            .get_mut()
            .write_all(b"GET / HTTP/1.1\r\n")
            .await
            .unwrap();
        let waited = tokio::time::Instant::now();
        assert!(closed(&mut silent).await && closed(&mut trickle).await);
        // (Their timers started a moment before `waited`.)
        assert!(
            waited.elapsed() >= period / 2,
            "closed long before its period"
        );
        front.shutdown().await;
    }

    /// Sends `bytes` on `to` one at a time, `every` apart, until they are all
    /// sent or the front stops taking them.
    fn trickle(
        mut to: tokio::net::tcp::OwnedWriteHalf,
        bytes: &'static [u8],
        every: Duration,
    ) -> tokio::task::JoinHandle<tokio::net::tcp::OwnedWriteHalf> {
        tokio::spawn(async move {
            for byte in bytes {
                tokio::time::sleep(every).await;
                if to.write_all(&[*byte]).await.is_err() {
                    break;
                }
            }
            to
        })
    }

    /// Head and body deadlines of `limit`, and an idle timeout of `IDLE`:
    /// the idle timeout would close a connection too, so one closed well
    /// before it was closed by a deadline.
    fn deadlines(limit: Duration) -> FrontConfig {
        FrontConfig {
            head_timeout: limit,
            body_timeout: limit,
            idle_timeout: IDLE,
            ..FrontConfig::default()
        }
    }

    const IDLE: Duration = Duration::from_secs(3600);

    // On tokio's paused clock: time moves only when every task waits, to the
    // next timer, so the deadlines below fire exactly when they are due
    // however loaded the machine is.
    #[tokio::test(start_paused = true)]
    async fn a_head_that_trickles_in_gets_a_408_at_its_deadline() {
        let (backend, seen) = recording_backend().await;
        let limit = Duration::from_millis(200);
        let hold = Duration::from_secs(5);
        let (_router, front) = configured_front(Some(backend), hold, deadlines(limit)).await;
        let addr = front.local_addr();

        // A byte every 50 ms: the head would take 3 s, the front waits 200 ms.
        let started = tokio::time::Instant::now();
        let (reader, writer) = TcpStream::connect(addr).await.unwrap().into_split();
        let head = b"GET /slow HTTP/1.1\r\nHost: x\r\nX-Padding: 0123456789abcdef\r\n\r\n";
        let sender = trickle(writer, head, Duration::from_millis(50));
        let mut reader = BufReader::new(reader);
        let answer = read_response(&mut reader, false).await;
        assert_eq!(answer.status, 408);
        assert!((limit..IDLE).contains(&started.elapsed()));
        assert!(closed(&mut reader).await);
        drop(sender.await.unwrap());

        // A new connection that sends nothing is closed, without an answer.
        let started = tokio::time::Instant::now();
        let mut silent = TcpStream::connect(addr).await.unwrap();
        assert!(closed(&mut silent).await);
        assert!((limit..IDLE).contains(&started.elapsed()));

        // Between requests a kept-alive connection is idle, not late: a
        // head's deadline runs from its first byte.
        let mut kept = BufReader::new(TcpStream::connect(addr).await.unwrap());
        assert_eq!(get(&mut kept).await, (200, "ok".into()));
        tokio::time::sleep(limit * 5).await;
        assert_eq!(get(&mut kept).await, (200, "ok".into()));
        // The late head never reached the backend.
        assert_eq!(*seen.lock().unwrap(), ["GET / HTTP/1.1", "GET / HTTP/1.1"]);
        front.shutdown().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_stops_coming_gets_a_408_one_that_keeps_coming_does_not() {
        let limit = Duration::from_millis(200);
        let hold = Duration::from_secs(5);
        let backend = echo_backend().await;
        let (router, front) = configured_front(Some(backend), hold, deadlines(limit)).await;
        let addr = front.local_addr();

        // A byte every 100 ms: slow, but never 200 ms without one.
        let (reader, mut writer) = TcpStream::connect(addr).await.unwrap().into_split();
        writer
            .write_all(b"POST /slow HTTP/1.1\r\nHost: x\r\nContent-Length: 8\r\n\r\n")
            .await
            .unwrap();
        let started = tokio::time::Instant::now();
        let sender = trickle(writer, b"01234567", Duration::from_millis(100));
        let answer = read_response(&mut BufReader::new(reader), false).await;
        assert_eq!(answer.text(), "POST /slow conn=- len=8\n01234567");
        assert!(started.elapsed() > limit * 2, "the body came in less time");
        drop(sender.await.unwrap());

        // Half a body, then nothing: 408, and the connection closes.
        let started = tokio::time::Instant::now();
        let (answer, mut conn) = ask(
            addr,
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nhalf",
        )
        .await;
        assert_eq!(answer.status, 408);
        assert!((limit..IDLE).contains(&started.elapsed()));
        assert!(closed(&mut conn).await);

        // A service that answers while it reads has begun its answer when the
        // body stops: too late for a 408, the connection just ends.
        router.set([(KEY.to_owned(), Some(streaming_echo_backend().await))]);
        let started = tokio::time::Instant::now();
        let mut conn = BufReader::new(TcpStream::connect(addr).await.unwrap());
        conn.get_mut()
            .write_all(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nhalf")
            .await
            .unwrap();
        let mut status = String::new();
        conn.read_line(&mut status).await.unwrap();
        assert!(status.starts_with("HTTP/1.1 200 "), "{status:?}");
        let mut rest = Vec::new();
        conn.read_to_end(&mut rest).await.unwrap();
        assert!((limit..IDLE).contains(&started.elapsed()));
        let rest = String::from_utf8_lossy(&rest);
        assert!(
            rest.contains("half") && !rest.contains("408") && !rest.ends_with("0\r\n\r\n"),
            "{rest:?}"
        );
        front.shutdown().await;
    }

    /// A front on a free port in front of `backend`.
    async fn front_to(backend: SocketAddr) -> (Router, Front) {
        bind_front(Some(backend), Duration::from_secs(5)).await
    }

    #[tokio::test]
    async fn bodies_of_every_framing_pass_both_ways_and_hop_by_hop_headers_stay_behind() {
        let (_router, front) = front_to(echo_backend().await).await;
        let addr = front.local_addr();

        // A fixed-length body, with a hop-by-hop header the backend must not see.
        let (seen, mut conn) = ask(
            addr,
            b"POST /p?q=1 HTTP/1.1\r\nHost: x\r\nConnection: x-hop\r\nX-Hop: 1\r\n\
              Content-Length: 5\r\n\r\nhello",
        )
        .await;
        assert_eq!(seen.status, 200);
        assert_eq!(seen.text(), "POST /p?q=1 conn=- len=5\nhello");

        // A chunked request body, on the same kept-alive connection.
        conn.get_mut()
            .write_all(
                b"PUT /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n\
                  3\r\nabc\r\n4;ext\r\ndefg\r\n0\r\n\r\n",
            )
            .await
            .unwrap();
        assert_eq!(
            read_response(&mut conn, false).await.text(),
            "PUT /c conn=- len=7\nabcdefg"
        );

        // A chunked response.
        conn.get_mut()
            .write_all(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let seen = read_response(&mut conn, false).await;
        assert_eq!(seen.header("transfer-encoding"), Some("chunked"));
        assert_eq!(seen.text(), "part0;part1;part2;");

        // A body larger than any buffer, sent in pieces while the front forwards.
        let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let head = format!(
            "POST /big HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
            big.len()
        );
        conn.get_mut().write_all(head.as_bytes()).await.unwrap();
        let (mut reader, mut writer) = conn.into_inner().into_split();
        let sender = {
            let big = big.clone();
            tokio::spawn(async move {
                for piece in big.chunks(100_000) {
                    writer.write_all(piece).await.unwrap();
                }
                writer
            })
        };
        let mut all = Vec::new();
        let prefix = format!("POST /big conn=- len={}\n", big.len());
        // Read the whole response: head, then prefix + body.
        let mut buf = vec![0u8; 64 * 1024];
        let want_body = prefix.len() + big.len();
        let head_end = loop {
            let n = reader.read(&mut buf).await.unwrap();
            assert!(n > 0, "front closed early");
            all.extend_from_slice(&buf[..n]);
            if let Some(i) = all.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
        };
        while all.len() < head_end + want_body {
            let n = reader.read(&mut buf).await.unwrap();
            assert!(n > 0, "front closed early");
            all.extend_from_slice(&buf[..n]);
        }
        assert!(all.starts_with(b"HTTP/1.1 200 OK\r\n"));
        assert_eq!(&all[head_end..head_end + prefix.len()], prefix.as_bytes());
        assert!(
            all[head_end + prefix.len()..] == big[..],
            "the body came back changed"
        );
        drop(sender.await.unwrap());

        // The service learns who the client is (and not who it says it is).
        let (seen, _) = ask(
            addr,
            b"GET /who HTTP/1.1\r\nX-Forwarded-For: 10.1.2.3\r\n\r\n",
        )
        .await;
        assert_eq!(seen.text(), "127.0.0.1");

        // HEAD: no body though the backend says how long it would be.
        let (seen, mut conn) = ask(addr, b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert_eq!(seen.status, 200);
        assert!(seen.header("content-length").is_some() && seen.body.is_empty());
        // ... and the connection still carries the next request correctly.
        assert_eq!(get(&mut conn).await, (200, "GET / conn=- len=0\n".into()));
        front.shutdown().await;
    }

    #[tokio::test]
    async fn a_clients_forwarded_for_is_replaced_unless_it_is_a_trusted_proxy() {
        let backend = echo_backend().await;
        let hold = Duration::from_secs(5);
        let claims = b"GET /who HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 10.1.2.3\r\n\
                       x-forwarded-for: 10.4.5.6, 10.7.8.9\r\n\r\n";
        // By default, and when the trusted proxies are others: replaced.
        let elsewhere = FrontConfig {
            trusted_proxies: vec!["10.0.0.1".parse().unwrap(), "::1".parse().unwrap()],
            ..FrontConfig::default()
        };
        for config in [FrontConfig::default(), elsewhere] {
            let (_router, front) = configured_front(Some(backend), hold, config).await;
            let (seen, _) = ask(front.local_addr(), claims).await;
            assert_eq!(seen.text(), "127.0.0.1");
            front.shutdown().await;
        }
        // From a trusted proxy (named as an IPv4-mapped address here): kept,
        // and the proxy's address appended.
        let trusting = FrontConfig {
            trusted_proxies: vec!["::ffff:127.0.0.1".parse().unwrap()],
            ..FrontConfig::default()
        };
        let (_router, front) = configured_front(Some(backend), hold, trusting).await;
        let (seen, _) = ask(front.local_addr(), claims).await;
        assert_eq!(seen.text(), "10.1.2.3, 10.4.5.6, 10.7.8.9, 127.0.0.1");
        front.shutdown().await;
    }

    #[tokio::test]
    async fn client_connections_over_the_limit_are_closed_until_others_end() {
        use crate::port::tests::{refused, until_connections};
        let config = FrontConfig {
            max_connections: 2,
            ..FrontConfig::default()
        };
        let backend = Some(backend("b", Duration::ZERO).await);
        let (_router, front) = configured_front(backend, Duration::from_secs(5), config).await;
        let addr = front.local_addr();
        let connect = || async { BufReader::new(TcpStream::connect(addr).await.unwrap()) };
        let (mut first, mut second) = (connect().await, connect().await);
        assert_eq!(get(&mut first).await, (200, "b".into()));
        assert_eq!(get(&mut second).await, (200, "b".into()));

        // Kept alive, both stay open: a third is closed before any answer.
        let mut third = TcpStream::connect(addr).await.unwrap();
        third
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        assert!(refused(&mut third).await);
        assert_eq!(front.connections(), 2);

        // Once one ends, a new one is served; the limit still holds.
        drop(first);
        until_connections(&front, 1).await;
        let mut fourth = connect().await;
        assert_eq!(get(&mut fourth).await, (200, "b".into()));
        assert!(refused(&mut TcpStream::connect(addr).await.unwrap()).await);
        assert_eq!(get(&mut second).await, (200, "b".into()));
        front.shutdown().await;
    }

    #[tokio::test]
    async fn pipelined_requests_and_http10_clients_are_answered_in_order() {
        let (_router, front) = front_to(echo_backend().await).await;
        let mut conn = BufReader::new(TcpStream::connect(front.local_addr()).await.unwrap());
        conn.get_mut()
            .write_all(
                b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\nPOST /2 HTTP/1.1\r\nHost: x\r\n\
                  Content-Length: 2\r\n\r\nhiGET /3 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            )
            .await
            .unwrap();
        assert_eq!(
            read_response(&mut conn, false).await.text(),
            "GET /1 conn=- len=0\n"
        );
        assert_eq!(
            read_response(&mut conn, false).await.text(),
            "POST /2 conn=- len=2\nhi"
        );
        let last = read_response(&mut conn, false).await;
        assert_eq!(last.text(), "GET /3 conn=- len=0\n");
        assert_eq!(last.header("connection"), Some("close"));
        assert!(closed(&mut conn).await, "Connection: close is honoured");

        // HTTP/1.0 without keep-alive: one answer in HTTP/1.0, then the close.
        let (seen, mut conn) = ask(front.local_addr(), b"GET /old HTTP/1.0\r\n\r\n").await;
        assert_eq!(seen.text(), "GET /old conn=- len=0\n");
        assert!(closed(&mut conn).await);
        front.shutdown().await;
    }

    #[tokio::test]
    async fn bad_requests_get_a_clear_error_and_reach_no_backend() {
        // A backend that only listens: a connection reaching it would queue.
        let backend = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (_router, front) = front_to(backend.local_addr().unwrap()).await;
        let addr = front.local_addr();
        for (raw, status, says) in [
            (
                &b"GET / HTTP/1.1\r\nBad Header\r\n\r\n"[..],
                400,
                "malformed",
            ),
            (
                b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
                400,
                "Content-Length",
            ),
            (
                b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
                400,
                "Transfer-Encoding",
            ),
            (
                b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
                400,
                "chunked",
            ),
        ] {
            let (seen, mut conn) = ask(addr, raw).await;
            assert_eq!(seen.status, status, "{}", String::from_utf8_lossy(raw));
            assert!(seen.text().contains(says), "{}", seen.text());
            assert!(closed(&mut conn).await);
        }
        let mut huge = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..4000 {
            huge.extend_from_slice(format!("X-Field-{i}: some value\r\n").as_bytes());
        }
        huge.extend_from_slice(b"\r\n");
        let (seen, _) = ask(addr, &huge).await;
        assert_eq!(seen.status, 431);
        let reached = tokio::time::timeout(Duration::from_millis(200), backend.accept()).await;
        assert!(reached.is_err(), "a bad request reached the backend");
        front.shutdown().await;
    }

    /// A backend that answers `ok` to every request and records each
    /// request line it reads, in order.
    async fn recording_backend() -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                let record = record.clone();
                tokio::spawn(async move {
                    let mut s = BufReader::new(s);
                    loop {
                        let mut line = String::new();
                        if s.read_line(&mut line).await.unwrap_or(0) == 0 {
                            return;
                        }
                        record.lock().unwrap().push(line.trim_end().to_owned());
                        if !read_head(&mut s).await {
                            return;
                        }
                        let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
                        if s.get_mut().write_all(ok).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (addr, seen)
    }

    #[tokio::test]
    async fn ambiguous_framing_or_hosts_get_a_400_and_reach_no_backend() {
        let (backend, seen) = recording_backend().await;
        let (_router, front) = front_to(backend).await;
        let addr = front.local_addr();
        // Each would let a reader that takes the other reading find a second,
        // smuggled request in the body, or send the request to another host.
        for (raw, says) in [
            (
                &b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: identity, chunked\r\n\
                   Content-Length: 32\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n"[..],
                "Transfer-Encoding",
            ),
            (
                b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\
                  Transfer-Encoding: identity\r\n\r\n0\r\n\r\n",
                "Transfer-Encoding",
            ),
            (
                b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\
                  Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
                "Transfer-Encoding",
            ),
            (
                b"GET / HTTP/1.1\r\nHost: public.example\r\nHost: internal.example\r\n\r\n",
                "Host",
            ),
            (
                b"GET / HTTP/1.1\r\nHost: public.example, internal.example\r\n\r\n",
                "Host",
            ),
        ] {
            let (answer, mut conn) = ask(addr, raw).await;
            assert_eq!(answer.status, 400, "{}", String::from_utf8_lossy(raw));
            assert!(answer.text().contains(says), "{}", answer.text());
            assert!(closed(&mut conn).await);
        }
        // A plain request gets through, and is the only one the backend saw:
        // had any of the above reached it, it would have been seen first.
        let (answer, _) = ask(addr, b"GET /plain HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert_eq!((answer.status, answer.text().as_str()), (200, "ok"));
        assert_eq!(*seen.lock().unwrap(), ["GET /plain HTTP/1.1"]);
        front.shutdown().await;
    }

    #[tokio::test]
    async fn expect_continue_is_answered_before_the_body_is_sent() {
        let (_router, front) = front_to(echo_backend().await).await;
        let mut conn = BufReader::new(TcpStream::connect(front.local_addr()).await.unwrap());
        conn.get_mut()
            .write_all(
                b"PUT /e HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n",
            )
            .await
            .unwrap();
        // Nothing of the body is sent until the 100 arrives.
        assert_eq!(read_response(&mut conn, false).await.status, 100);
        conn.get_mut().write_all(b"data").await.unwrap();
        assert_eq!(
            read_response(&mut conn, false).await.text(),
            "PUT /e conn=- len=4\ndata"
        );
        front.shutdown().await;
    }

    #[tokio::test]
    async fn responses_without_a_length_end_with_the_connection() {
        let backend = raw_backend(
            b"HTTP/1.1 200 OK\r\nX-Kind: raw\r\n\r\nuntil the close",
            false,
        )
        .await;
        let (_router, front) = front_to(backend).await;
        let (seen, mut conn) = ask(front.local_addr(), b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert_eq!(seen.header("connection"), Some("close"));
        assert_eq!(seen.header("x-kind"), Some("raw"));
        assert_eq!(seen.text(), "until the close");
        assert!(closed(&mut conn).await);
        front.shutdown().await;
    }

    #[tokio::test]
    async fn a_kept_backend_connection_closed_between_requests_is_not_a_502() {
        // Answers one request per connection and closes it without saying so.
        let backend = raw_backend(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", false).await;
        let (_router, front) = front_to(backend).await;
        let mut conn = BufReader::new(TcpStream::connect(front.local_addr()).await.unwrap());
        for _ in 0..5 {
            assert_eq!(get(&mut conn).await, (200, "ok".into()));
            // Let the backend's close arrive before the next request.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        front.shutdown().await;
    }

    #[tokio::test]
    async fn a_backend_that_is_not_http_is_a_502_and_the_client_connection_survives() {
        let backend = raw_backend(b"SSH-2.0-nonsense\r\n\r\n", true).await;
        let (router, front) = front_to(backend).await;
        let mut conn = BufReader::new(TcpStream::connect(front.local_addr()).await.unwrap());
        assert_eq!(get(&mut conn).await.0, 502);
        router.set([(KEY.to_owned(), Some(echo_backend().await))]);
        assert_eq!(get(&mut conn).await, (200, "GET / conn=- len=0\n".into()));
        front.shutdown().await;
    }

    #[tokio::test]
    async fn an_upgrade_becomes_a_tunnel_to_the_backend() {
        // A backend that switches protocols, then echoes what it gets, upper-cased.
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let backend = l.local_addr().unwrap();
        tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            let mut s = BufReader::new(s);
            let mut head = String::new();
            while !head.ends_with("\r\n\r\n") {
                s.read_line(&mut head).await.unwrap();
            }
            assert!(
                head.contains("Upgrade: echo\r\n") && head.contains("Connection: upgrade\r\n"),
                "{head}"
            );
            s.get_mut()
                .write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: echo\r\nConnection: upgrade\r\n\r\n")
                .await
                .unwrap();
            let mut buf = [0u8; 64];
            loop {
                let n = s.read(&mut buf).await.unwrap();
                if n == 0 {
                    return;
                }
                let up = buf[..n].to_ascii_uppercase();
                s.get_mut().write_all(&up).await.unwrap();
            }
        });
        let (_router, front) = front_to(backend).await;
        let (seen, mut conn) = ask(
            front.local_addr(),
            b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n",
        )
        .await;
        assert_eq!(seen.status, 101);
        assert_eq!(seen.header("upgrade"), Some("echo"));
        assert_eq!(front.busy(backend), 1, "a tunnel counts as in flight");
        for word in ["hello", "tunnel"] {
            conn.get_mut().write_all(word.as_bytes()).await.unwrap();
            let mut back = vec![0u8; word.len()];
            conn.read_exact(&mut back).await.unwrap();
            assert_eq!(back, word.to_uppercase().as_bytes());
        }
        drop(conn);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while front.busy(backend) != 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the tunnel never ended"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        front.shutdown().await;
    }

    #[tokio::test]
    async fn an_early_answer_to_an_unread_body_still_reaches_the_client() {
        // Refuses every upload at its head, without reading the body, and closes.
        let backend = raw_backend(
            b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 9\r\nConnection: close\r\n\r\ntoo large",
            false,
        )
        .await;
        let (_router, front) = front_to(backend).await;
        let conn = TcpStream::connect(front.local_addr()).await.unwrap();
        let (reader, mut writer) = conn.into_split();
        let size = 8 << 20;
        let upload = tokio::spawn(async move {
            let head = format!("PUT /f HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n\r\n");
            writer.write_all(head.as_bytes()).await.unwrap();
            let piece = vec![7u8; 64 * 1024];
            for _ in 0..size / piece.len() {
                if writer.write_all(&piece).await.is_err() {
                    return;
                }
            }
        });
        let mut reader = BufReader::new(reader);
        let mut status = String::new();
        reader.read_line(&mut status).await.unwrap();
        assert!(status.starts_with("HTTP/1.1 413 "), "{status:?}");
        let mut rest = Vec::new();
        let _ = reader.read_to_end(&mut rest).await;
        let rest = String::from_utf8_lossy(&rest);
        assert!(
            rest.contains("Connection: close") && rest.ends_with("too large"),
            "{rest}"
        );
        upload.await.unwrap();
        front.shutdown().await;
    }

    /// Reads one request head; false at the end of the stream.
    async fn read_head(s: &mut BufReader<TcpStream>) -> bool {
        let mut line = String::new();
        loop {
            line.clear();
            if s.read_line(&mut line).await.unwrap_or(0) == 0 {
                return false;
            }
            if line == "\r\n" {
                return true;
            }
        }
    }

    /// A backend that answers the first request of each connection, and then
    /// does `then` on it: `Some(bytes)`: sends them unasked and closes;
    /// `None`: reads the next request head and closes without answering.
    async fn one_answer_backend(then: Option<&'static [u8]>) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let mut s = BufReader::new(s);
                    if !read_head(&mut s).await {
                        return;
                    }
                    let _ = s
                        .get_mut()
                        .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                        .await;
                    match then {
                        Some(bytes) => {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            let _ = s.get_mut().write_all(bytes).await;
                        }
                        None => {
                            read_head(&mut s).await;
                        }
                    }
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn bytes_nobody_asked_for_never_answer_the_next_request() {
        let backend = one_answer_backend(Some(
            b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\n\r\n",
        ))
        .await;
        let (_router, front) = front_to(backend).await;
        let mut conn = BufReader::new(TcpStream::connect(front.local_addr()).await.unwrap());
        for _ in 0..3 {
            assert_eq!(get(&mut conn).await, (200, "ok".into()));
            // The unasked 408 arrives on the kept connection meanwhile.
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
        front.shutdown().await;
    }

    #[tokio::test]
    async fn only_requests_that_may_repeat_are_sent_again() {
        // Closes, unanswered, the second request on each connection.
        let (_router, front) = front_to(one_answer_backend(None).await).await;
        let mut conn = BufReader::new(TcpStream::connect(front.local_addr()).await.unwrap());
        assert_eq!(get(&mut conn).await, (200, "ok".into()));
        // A GET may repeat: sent again on a new connection, answered there.
        assert_eq!(get(&mut conn).await, (200, "ok".into()));
        // A POST may not: the client is told it failed.
        conn.get_mut()
            .write_all(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
            .await
            .unwrap();
        assert_eq!(read_response(&mut conn, false).await.status, 502);
        front.shutdown().await;
    }

    #[tokio::test]
    async fn a_backend_address_used_again_is_counted_on_its_new_counter() {
        let slow = backend("a", Duration::from_millis(300)).await;
        let other = backend("b", Duration::ZERO).await;
        let (router, front) = front_to(slow).await;
        let addr = front.local_addr();
        let mut conn = BufReader::new(TcpStream::connect(addr).await.unwrap());
        assert_eq!(get(&mut conn).await, (200, "a".into()));
        // Away and drained: its counter is forgotten. Then the address is
        // routed to again (a new process may get the same port).
        router.set([(KEY.to_owned(), Some(other))]);
        front.forget(slow);
        router.set([(KEY.to_owned(), Some(slow))]);
        let pending = tokio::spawn(async move {
            let r = get(&mut conn).await;
            (r, conn)
        });
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while front.busy(slow) == 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the request in flight is not counted"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(pending.await.unwrap().0, (200, "a".into()));
        assert!(drained(&front, slow).await);
        front.shutdown().await;
    }

    /// A backend (hyper) that streams each request's body back as it reads
    /// it: an echo that begins its answer at once.
    async fn streaming_echo_backend() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let backend = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(|req: Request<Incoming>| async move {
                        Ok::<_, Infallible>(Response::new(req.into_body()))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(s), service)
                        .await;
                });
            }
        });
        backend
    }

    #[tokio::test]
    async fn a_backend_that_answers_while_it_reads_gets_its_whole_body() {
        let (_router, front) = front_to(streaming_echo_backend().await).await;
        let conn = TcpStream::connect(front.local_addr()).await.unwrap();
        let (reader, mut writer) = conn.into_split();
        // Far more than the socket buffers on the way hold.
        let size: usize = 16 << 20;
        let upload = tokio::spawn(async move {
            let head = format!("POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n\r\n");
            writer.write_all(head.as_bytes()).await.unwrap();
            let piece: Vec<u8> = (0..64 * 1024).map(|i| (i % 253) as u8).collect();
            for _ in 0..size / piece.len() {
                writer.write_all(&piece).await.unwrap();
            }
            writer
        });
        let mut reader = BufReader::new(reader);
        let seen = tokio::time::timeout(Duration::from_secs(30), read_response(&mut reader, false))
            .await
            .expect("no whole answer: the front and the backend wait on each other");
        assert_eq!(seen.status, 200);
        let echoed = seen.body.len();
        assert_eq!(echoed, size);
        drop(upload.await.unwrap());
        front.shutdown().await;
    }

    #[tokio::test]
    async fn a_switch_to_another_protocol_mid_upload_loses_and_repeats_no_byte() {
        // Switches protocols at the head, before reading the body, then
        // counts what comes through the tunnel until the client stops.
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let backend = l.local_addr().unwrap();
        let counted = tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            let mut s = BufReader::new(s);
            assert!(read_head(&mut s).await);
            tokio::time::sleep(Duration::from_millis(300)).await;
            s.get_mut()
                .write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: raw\r\nConnection: upgrade\r\n\r\n")
                .await
                .unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).await.unwrap();
            got
        });
        let (_router, front) = front_to(backend).await;
        let conn = TcpStream::connect(front.local_addr()).await.unwrap();
        let (mut reader, mut writer) = conn.into_split();
        let size: usize = 16 << 20;
        let sent: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        let head = format!(
            "POST /up HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: raw\r\nContent-Length: {size}\r\n\r\n"
        );
        let upload = {
            let sent = sent.clone();
            tokio::spawn(async move {
                writer.write_all(head.as_bytes()).await.unwrap();
                writer.write_all(&sent).await.unwrap();
                writer.shutdown().await.unwrap();
                writer
            })
        };
        // Drain the 101 so nothing backs up on the way back.
        let drain = tokio::spawn(async move {
            let mut back = Vec::new();
            let _ = reader.read_to_end(&mut back).await;
            back
        });
        let got = tokio::time::timeout(Duration::from_secs(30), counted)
            .await
            .expect("the tunnel never ended")
            .unwrap();
        assert_eq!(got.len(), sent.len(), "bytes lost or repeated on the way");
        assert!(got == sent, "the body arrived changed");
        drop(upload.await.unwrap());
        drop(front);
        assert!(String::from_utf8_lossy(&drain.await.unwrap()).starts_with("HTTP/1.1 101 "));
    }

    #[tokio::test]
    async fn an_early_answer_to_an_http10_keep_alive_upload_says_close_once() {
        let backend = raw_backend(
            b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 0\r\n\r\n",
            false,
        )
        .await;
        let (_router, front) = front_to(backend).await;
        let conn = TcpStream::connect(front.local_addr()).await.unwrap();
        let (reader, mut writer) = conn.into_split();
        let upload = tokio::spawn(async move {
            let size = 8 << 20;
            let head = format!(
                "POST / HTTP/1.0\r\nConnection: keep-alive\r\nContent-Length: {size}\r\n\r\n"
            );
            writer.write_all(head.as_bytes()).await.unwrap();
            let _ = writer.write_all(&vec![1u8; size]).await;
        });
        let mut reader = BufReader::new(reader);
        let seen = read_response(&mut reader, false).await;
        assert_eq!(seen.status, 413);
        let connection: Vec<_> = seen
            .headers
            .iter()
            .filter(|(n, _)| n == "connection")
            .collect();
        assert_eq!(connection, [&("connection".to_owned(), "close".to_owned())]);
        upload.await.unwrap();
        front.shutdown().await;
    }

    #[tokio::test]
    async fn a_request_sent_again_follows_a_cutover() {
        // `old` answers the first request of a connection; at the second it
        // lets the test cut over, then closes without answering, like a
        // process being drained.
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let old = l.local_addr().unwrap();
        let (asked, mut asked_rx) =
            tokio::sync::mpsc::channel::<tokio::sync::oneshot::Sender<()>>(1);
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                let asked = asked.clone();
                tokio::spawn(async move {
                    let mut s = BufReader::new(s);
                    if !read_head(&mut s).await {
                        return;
                    }
                    let _ = s
                        .get_mut()
                        .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nold")
                        .await;
                    if read_head(&mut s).await {
                        let (go, gone) = tokio::sync::oneshot::channel();
                        let _ = asked.send(go).await;
                        let _ = gone.await;
                    }
                });
            }
        });
        let new = backend("new", Duration::ZERO).await;
        let (router, front) = front_to(old).await;
        let mut conn = BufReader::new(TcpStream::connect(front.local_addr()).await.unwrap());
        assert_eq!(get(&mut conn).await, (200, "old".into()));
        let second = tokio::spawn(async move { get(&mut conn).await });
        let go = asked_rx.recv().await.unwrap();
        router.set([(KEY.to_owned(), Some(new))]);
        drop(go); // `old` closes the connection, unanswered
        assert_eq!(second.await.unwrap(), (200, "new".into()));
        front.shutdown().await;
    }

    #[tokio::test]
    async fn a_standstill_either_way_ends_with_a_timeout_status() {
        // A backend that takes connections and requests, and never answers.
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let silent = l.local_addr().unwrap();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = l.accept().await {
                held.push(s);
            }
        });
        let period = Duration::from_millis(300);
        let (router, front) =
            configured_front(Some(silent), Duration::ZERO, idle_after(period)).await;
        let started = tokio::time::Instant::now();
        let (seen, _) = ask(front.local_addr(), b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert_eq!(seen.status, 504);
        assert!(started.elapsed() >= period, "gave up before a whole period");
        assert!(
            drained(&front, silent).await,
            "the stalled request is still counted"
        );

        // A slow answer to a request that came late in a quiet period is not
        // a standstill: the period starts again at the request.
        router.set([(KEY.to_owned(), Some(backend("slow", period / 2).await))]);
        let mut conn = BufReader::new(TcpStream::connect(front.local_addr()).await.unwrap());
        tokio::time::sleep(period * 4 / 5).await;
        assert_eq!(get(&mut conn).await, (200, "slow".into()));

        // A client that stops sending its body half-way.
        router.set([(KEY.to_owned(), Some(echo_backend().await))]);
        let (seen, mut conn) = ask(
            front.local_addr(),
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nhalf",
        )
        .await;
        assert_eq!(seen.status, 408);
        assert!(closed(&mut conn).await);
        front.shutdown().await;
    }
}
