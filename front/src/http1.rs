//! HTTP/1.x message framing for the HTTP front: where a message's head ends,
//! how long its body is, and the head the front forwards in its place.
//!
//! The front forwards bodies byte for byte and never builds a header map; it
//! only has to know where each message ends, so the next request on a kept-alive
//! connection is found exactly where the backend will find it. This module owns
//! that knowledge (RFC 9112, sections 6 and 7), with no I/O, so it is tested and
//! fuzzed on its own. It is strict where a lenient reading could let the front
//! and the backend disagree on a message's end or on whom it is for (request
//! smuggling): conflicting `Content-Length`s; a request `Transfer-Encoding`
//! that does not end in `chunked`, names `chunked` twice or `identity` at all,
//! or comes in more than one field line; more than one `Host`; a chunk line
//! that is not hex digits then CRLF — each is a [`FrameError`], and the front
//! answers it with an error and closes.
//!
//! Forwarded heads drop the hop-by-hop headers (`Connection`, `Keep-Alive`,
//! `Proxy-Connection` and whatever `Connection` names): each hop's connection
//! is its own. Everything else is copied as it came, in order.

use std::fmt::Write as _;

/// The largest message head accepted (request line or status line, and headers).
pub const MAX_HEAD: usize = 64 * 1024;

/// The most header fields in one head.
const MAX_HEADERS: usize = 128;

/// The most header fields in a client's request head: the rest of
/// [`MAX_HEADERS`] is room for the lines the front adds.
const MAX_CLIENT_HEADERS: usize = MAX_HEADERS - 8;

/// Why a message cannot be forwarded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The head is not HTTP/1.x.
    #[error("malformed message head: {0}")]
    Head(httparse::Error),
    /// The head is longer than [`MAX_HEAD`] or has more than 128 fields.
    #[error("message head longer than {MAX_HEAD} bytes or with more than {MAX_HEADERS} fields")]
    HeadTooLarge,
    /// `Content-Length` is not a number, or two of them disagree.
    #[error("invalid or conflicting Content-Length")]
    ContentLength,
    /// A request's `Transfer-Encoding` does not end in `chunked`, names
    /// `chunked` more than once or `identity` at all, comes in more than one
    /// field line, or comes with HTTP/1.0.
    #[error("unsupported or ambiguous Transfer-Encoding")]
    TransferEncoding,
    /// A request has more than one `Host` (as field lines, or as a list in one).
    #[error("more than one Host")]
    Host,
    /// A chunked body is malformed.
    #[error("malformed chunked body")]
    Chunk,
    /// `CONNECT`: the front forwards requests to services, it is no tunnel.
    #[error("CONNECT is not served here")]
    Connect,
}

/// How a message's body ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Length {
    /// Exactly this many bytes (zero: no body).
    Fixed(u64),
    /// Chunked: it ends with the last chunk and the trailer section.
    Chunked,
    /// A response body that ends when the backend closes the connection.
    ToClose,
}

/// A parsed request head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHead {
    /// Bytes of input the head took.
    pub consumed: usize,
    /// Its body.
    pub body: Length,
    /// `HEAD`: the response has no body whatever its headers say.
    pub is_head: bool,
    /// The method may be sent twice with the same effect (RFC 9110, 9.2.2).
    pub idempotent: bool,
    /// HTTP/1.0 (else 1.1).
    pub http10: bool,
    /// The client's connection stays open after the response.
    pub keep_alive: bool,
    /// The client asks to switch protocols (`Connection: upgrade` and `Upgrade`).
    pub upgrade: bool,
    /// The client waits for `100 Continue` before sending the body; the
    /// forwarded head no longer asks for it, the front answers it itself.
    pub expects_continue: bool,
}

/// A parsed response head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseHead {
    /// Bytes of input the head took.
    pub consumed: usize,
    /// The status code.
    pub status: u16,
    /// Its body.
    pub body: Length,
    /// The backend keeps the connection open for the next request.
    pub reusable: bool,
    /// The front closes the client's connection after this response (the
    /// forwarded head then says `Connection: close`).
    pub close_client: bool,
}

impl ResponseHead {
    /// `1xx` other than `101`: an interim answer, the final one follows.
    pub fn is_interim(&self) -> bool {
        (100..200).contains(&self.status) && self.status != 101
    }
}

/// Headers that say where a message ends or whom it is for: never dropped.
const FRAMING: [&[u8]; 3] = [b"content-length", b"transfer-encoding", b"host"];

/// What `Connection` said, with the names it declares hop-by-hop.
#[derive(Default)]
struct ConnectionTokens {
    close: bool,
    keep_alive: bool,
    upgrade: bool,
    /// Further header names to drop, lowercase.
    named: Vec<String>,
}

impl ConnectionTokens {
    fn read(headers: &[httparse::Header<'_>]) -> Self {
        let mut t = Self::default();
        for h in headers {
            if !h.name.eq_ignore_ascii_case("connection") {
                continue;
            }
            for token in h.value.split(|&b| b == b',') {
                let token = token.trim_ascii();
                if token.eq_ignore_ascii_case(b"close") {
                    t.close = true;
                } else if token.eq_ignore_ascii_case(b"keep-alive") {
                    t.keep_alive = true;
                } else if token.eq_ignore_ascii_case(b"upgrade") {
                    t.upgrade = true;
                } else if !token.is_empty()
                    && !FRAMING.iter().any(|f| token.eq_ignore_ascii_case(f))
                {
                    // A peer cannot make the headers that frame the message
                    // hop-by-hop: dropping them would change where it ends.
                    t.named
                        .push(String::from_utf8_lossy(token).to_ascii_lowercase());
                }
            }
        }
        t
    }

    /// Whether `name` is hop-by-hop here (dropped from the forwarded head).
    fn drops(&self, name: &str) -> bool {
        ["connection", "keep-alive", "proxy-connection", "upgrade"]
            .iter()
            .any(|h| name.eq_ignore_ascii_case(h))
            || self.named.iter().any(|n| name.eq_ignore_ascii_case(n))
    }
}

/// The body length from `Content-Length` headers: none, or all equal; and
/// whether it was said more than once (then it is passed on once).
fn content_length(headers: &[httparse::Header<'_>]) -> Result<(Option<u64>, bool), FrameError> {
    let mut found = None;
    let mut said = 0;
    for h in headers {
        if !h.name.eq_ignore_ascii_case("content-length") {
            continue;
        }
        // A list (`5, 5`) is allowed when every member agrees.
        for part in h.value.split(|&b| b == b',') {
            let part = part.trim_ascii();
            if part.is_empty() || part.len() > 19 || !part.iter().all(u8::is_ascii_digit) {
                return Err(FrameError::ContentLength);
            }
            let n = part.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
            if found.is_some_and(|f| f != n) {
                return Err(FrameError::ContentLength);
            }
            found = Some(n);
            said += 1;
        }
    }
    Ok((found, said > 1))
}

/// Whether there is a `Transfer-Encoding`, and whether its last coding is chunked.
fn transfer_encoding(headers: &[httparse::Header<'_>]) -> Option<bool> {
    let mut last: Option<&[u8]> = None;
    for h in headers {
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            for coding in h.value.split(|&b| b == b',') {
                let coding = coding.trim_ascii();
                if !coding.is_empty() {
                    last = Some(coding);
                }
            }
            last.get_or_insert(b"");
        }
    }
    last.map(|c| c.eq_ignore_ascii_case(b"chunked"))
}

/// Refuses a request whose framing or target a server behind the front could
/// read another way: a `Transfer-Encoding` in several field lines (one reader
/// may take the first, another the last), with `identity` (obsolete, and
/// ignored by some readers but not others) or `chunked` twice; several
/// `Host`s, or a `Host` list (RFC 9112, 3.2: a server answers it with 400).
fn refuse_ambiguous_request(headers: &[httparse::Header<'_>]) -> Result<(), FrameError> {
    let (mut te_lines, mut chunked, mut hosts) = (0, 0, 0);
    for h in headers {
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            te_lines += 1;
            for coding in h.value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                if coding.eq_ignore_ascii_case(b"identity") {
                    return Err(FrameError::TransferEncoding);
                }
                chunked += usize::from(coding.eq_ignore_ascii_case(b"chunked"));
            }
        } else if h.name.eq_ignore_ascii_case("host") {
            hosts += 1;
            if h.value.contains(&b',') {
                return Err(FrameError::Host);
            }
        }
    }
    if te_lines > 1 || chunked > 1 {
        return Err(FrameError::TransferEncoding);
    }
    if hosts > 1 {
        return Err(FrameError::Host);
    }
    Ok(())
}

/// Where the head parsed from `input` ends: `None` while it is incomplete.
fn head_end(parsed: httparse::Result<usize>, input: &[u8]) -> Result<Option<usize>, FrameError> {
    match parsed {
        Ok(httparse::Status::Complete(n)) if n <= MAX_HEAD => Ok(Some(n)),
        Ok(httparse::Status::Partial) if input.len() <= MAX_HEAD => Ok(None),
        Ok(_) | Err(httparse::Error::TooManyHeaders) => Err(FrameError::HeadTooLarge),
        Err(_) if input.len() > MAX_HEAD => Err(FrameError::HeadTooLarge),
        Err(e) => Err(FrameError::Head(e)),
    }
}

/// Writes each header of `headers` that `keep` accepts as `name: value`.
fn copy_headers(out: &mut Vec<u8>, headers: &[httparse::Header<'_>], keep: impl Fn(&str) -> bool) {
    for h in headers {
        if keep(h.name) {
            out.extend_from_slice(h.name.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(h.value);
            out.extend_from_slice(b"\r\n");
        }
    }
}

/// Writes the `Upgrade` headers and `Connection: upgrade`: what an upgrade
/// needs to pass a hop.
fn copy_upgrade(out: &mut Vec<u8>, headers: &[httparse::Header<'_>]) {
    copy_headers(out, headers, |name| name.eq_ignore_ascii_case("upgrade"));
    out.extend_from_slice(b"Connection: upgrade\r\n");
}

/// What the front adds to each request it forwards.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Added<'a> {
    /// Header lines of the front's own, each `Name: value` and CRLF,
    /// written after the client's.
    pub lines: &'a [u8],
    /// Names (any case) of the client's headers left out, because `lines`
    /// replaces them rather than adding to them.
    pub replacing: &'a [&'a str],
}

impl Added<'_> {
    /// Nothing added, nothing replaced.
    pub const NONE: Added<'static> = Added {
        lines: b"",
        replacing: &[],
    };
}

/// Parses the request head at the start of `input`. `Ok(None)`: it is not
/// complete yet (read more). On success the head to send the backend is
/// appended to `out`: the request target in origin form, the client's HTTP
/// version, the end-to-end headers (but those `added` replaces),
/// `Connection: upgrade` for an upgrade, and `added`'s lines.
pub fn parse_request(
    input: &[u8],
    added: &Added<'_>,
    out: &mut Vec<u8>,
) -> Result<Option<RequestHead>, FrameError> {
    // Left uninitialised: httparse writes each slot it hands back.
    let mut headers =
        [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let Some(consumed) = head_end(req.parse_with_uninit_headers(input, &mut headers), input)?
    else {
        return Ok(None);
    };
    let (Some(method), Some(target), Some(version)) = (req.method, req.path, req.version) else {
        // A complete parse always has all three.
        return Err(FrameError::Head(httparse::Error::Token));
    };
    let headers = req.headers;
    // Room is kept for the front's own lines.
    if headers.len() > MAX_CLIENT_HEADERS {
        return Err(FrameError::HeadTooLarge);
    }
    if method == "CONNECT" {
        return Err(FrameError::Connect);
    }
    let http10 = version == 0;
    let conn = ConnectionTokens::read(headers);
    let has_upgrade = headers
        .iter()
        .any(|h| h.name.eq_ignore_ascii_case("upgrade"));
    let upgrade = conn.upgrade && has_upgrade && !http10;
    refuse_ambiguous_request(headers)?;
    let (length, length_repeated) = content_length(headers)?;
    let body = match transfer_encoding(headers) {
        Some(true) if !http10 => Length::Chunked,
        Some(_) => return Err(FrameError::TransferEncoding),
        None => Length::Fixed(length.unwrap_or(0)),
    };
    // Both: the chunked coding wins, and the connection ends after this
    // exchange, since whatever sent it framed it two ways (RFC 9112, 6.3).
    let both = body == Length::Chunked && length.is_some();
    let expects_continue = !http10
        && body != Length::Fixed(0)
        && headers.iter().any(|h| {
            h.name.eq_ignore_ascii_case("expect") && h.value.eq_ignore_ascii_case(b"100-continue")
        });

    // The target in origin form: `http://host/p?q` becomes `/p?q`, and
    // `http://host?q` becomes `/?q`.
    let (slash, target) = match target.split_once("://") {
        Some((_, rest)) if !target.starts_with('/') => match rest.find(['/', '?']) {
            Some(i) if rest[i..].starts_with('?') => ("/", &rest[i..]),
            Some(i) => ("", &rest[i..]),
            None => ("/", ""),
        },
        _ => ("", target),
    };
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(slash.as_bytes());
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(if http10 {
        b" HTTP/1.0\r\n"
    } else {
        b" HTTP/1.1\r\n"
    });
    let rewrite_length = body == Length::Chunked || length_repeated;
    copy_headers(out, headers, |name| {
        // With a chunked body a Content-Length is wrong, and a repeated one
        // goes on once: either way, not as it came.
        let length = rewrite_length && name.eq_ignore_ascii_case("content-length");
        let answered = expects_continue && name.eq_ignore_ascii_case("expect");
        // `X_Y` could reach a CGI-style service as `X-Y`: such names are dropped.
        let underscored = name.contains('_');
        let replaced = added.replacing.iter().any(|r| name.eq_ignore_ascii_case(r));
        !(conn.drops(name) || length || answered || underscored || replaced)
    });
    if let (Length::Fixed(n), true) = (body, length_repeated) {
        let _ = write!(StrOut(out), "Content-Length: {n}\r\n");
    }
    if upgrade {
        copy_upgrade(out, headers);
    }
    out.extend_from_slice(added.lines);
    out.extend_from_slice(b"\r\n");

    Ok(Some(RequestHead {
        consumed,
        body,
        is_head: method == "HEAD",
        idempotent: matches!(
            method,
            "GET" | "HEAD" | "OPTIONS" | "TRACE" | "PUT" | "DELETE"
        ),
        http10,
        keep_alive: !both && if http10 { conn.keep_alive } else { !conn.close },
        upgrade,
        expects_continue,
    }))
}

/// Parses the response head at the start of `input`, answering `request`.
/// `Ok(None)`: not complete yet. On success the head to send the client is
/// appended to `out`, with `Connection: close` when the client's connection
/// ends after it, and `Connection: upgrade` on a `101`.
pub fn parse_response(
    input: &[u8],
    request: &RequestHead,
    out: &mut Vec<u8>,
) -> Result<Option<ResponseHead>, FrameError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    let Some(consumed) = head_end(resp.parse(input), input)? else {
        return Ok(None);
    };
    let (Some(version), Some(status)) = (resp.version, resp.code) else {
        return Err(FrameError::Head(httparse::Error::Status));
    };
    let reason = resp.reason.unwrap_or("");
    let headers = resp.headers;
    let conn = ConnectionTokens::read(headers);
    let switching = status == 101;
    let (length, length_repeated) = content_length(headers)?;
    let body = if request.is_head || (100..200).contains(&status) || status == 204 || status == 304
    {
        Length::Fixed(0)
    } else {
        match transfer_encoding(headers) {
            Some(true) => Length::Chunked,
            // A response coding other than chunked is delimited by the close.
            Some(false) => Length::ToClose,
            None => match length {
                Some(n) => Length::Fixed(n),
                None => Length::ToClose,
            },
        }
    };
    let backend_keeps = if version == 0 {
        conn.keep_alive
    } else {
        !conn.close
    };
    let reusable = backend_keeps && body != Length::ToClose && !switching;
    let interim = (100..200).contains(&status) && !switching;
    let close_client = !interim && !switching && (!request.keep_alive || body == Length::ToClose);

    let _ = write!(
        StrOut(out),
        "HTTP/{} {status} {reason}\r\n",
        if request.http10 { "1.0" } else { "1.1" }
    );
    let rewrite_length = body == Length::Chunked || length_repeated;
    copy_headers(out, headers, |name| {
        let length = rewrite_length && name.eq_ignore_ascii_case("content-length");
        !(conn.drops(name) || length)
    });
    if let (Some(n), true, false) = (length, length_repeated, body == Length::Chunked) {
        let _ = write!(StrOut(out), "Content-Length: {n}\r\n");
    }
    if switching {
        copy_upgrade(out, headers);
    } else if close_client {
        out.extend_from_slice(b"Connection: close\r\n");
    } else if request.http10 {
        out.extend_from_slice(b"Connection: keep-alive\r\n");
    }
    out.extend_from_slice(b"\r\n");

    Ok(Some(ResponseHead {
        consumed,
        status,
        body,
        reusable,
        close_client,
    }))
}

/// `fmt::Write` into a byte buffer.
struct StrOut<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for StrOut<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

/// A whole response of the front's own: `status`, a plain-text body, and
/// `Connection: close` when `close`.
pub(crate) fn own_response(status: u16, reason: &str, text: &str, close: bool, out: &mut Vec<u8>) {
    let _ = write!(
        StrOut(out),
        "HTTP/1.1 {status} {reason}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n{}\r\n{text}",
        text.len(),
        if close { "Connection: close\r\n" } else { "" }
    );
}

/// Finds the end of a chunked body in the bytes passing through, without
/// changing them (the front forwards chunked bodies as they are).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunked {
    state: ChunkState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    /// In the hex size; `digits` so far, `size` their value.
    Size {
        size: u64,
        digits: u8,
    },
    /// Whitespace after the size, before `;` or CR.
    SizeWs {
        size: u64,
    },
    /// An extension (after `;`), up to CR.
    Extension {
        size: u64,
    },
    /// After the size line's CR.
    SizeLf {
        size: u64,
    },
    /// Inside a chunk's data.
    Data {
        left: u64,
    },
    /// After the data: CR, then LF.
    DataCr,
    DataLf,
    /// At the start of a trailer line (or the final CRLF).
    TrailerStart,
    /// Inside a trailer field line, up to CR.
    TrailerLine,
    TrailerLf,
    /// After the final CR.
    EndLf,
    Done,
}

impl Default for Chunked {
    fn default() -> Self {
        Self::new()
    }
}

impl Chunked {
    /// At the start of a chunked body.
    pub fn new() -> Self {
        Self {
            state: ChunkState::Size { size: 0, digits: 0 },
        }
    }

    /// Whether the whole body has been seen.
    pub fn is_done(&self) -> bool {
        self.state == ChunkState::Done
    }

    /// Reads the next bytes of the body; returns how many belong to it (all of
    /// `input`, or fewer when the body ends inside it).
    pub fn scan(&mut self, input: &[u8]) -> Result<usize, FrameError> {
        use ChunkState::*;
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            self.state = match self.state {
                Done => return Ok(i),
                Data { left } => {
                    // Skip data in bulk.
                    let take = usize::try_from(left)
                        .unwrap_or(usize::MAX)
                        .min(input.len() - i);
                    i += take;
                    let left = left - take as u64;
                    self.state = if left == 0 { DataCr } else { Data { left } };
                    continue;
                }
                Size { size, digits } => match (b as char).to_digit(16) {
                    Some(d) if digits < 16 => Size {
                        size: size << 4 | u64::from(d),
                        digits: digits + 1,
                    },
                    Some(_) => return Err(FrameError::Chunk),
                    None if digits == 0 => return Err(FrameError::Chunk),
                    None => match b {
                        b'\r' => SizeLf { size },
                        b';' => Extension { size },
                        b' ' | b'\t' => SizeWs { size },
                        _ => return Err(FrameError::Chunk),
                    },
                },
                SizeWs { size } => match b {
                    b'\r' => SizeLf { size },
                    b';' => Extension { size },
                    b' ' | b'\t' => SizeWs { size },
                    _ => return Err(FrameError::Chunk),
                },
                Extension { size } => match b {
                    b'\r' => SizeLf { size },
                    b'\n' => return Err(FrameError::Chunk),
                    _ => Extension { size },
                },
                SizeLf { size } => match (b, size) {
                    (b'\n', 0) => TrailerStart,
                    (b'\n', left) => Data { left },
                    _ => return Err(FrameError::Chunk),
                },
                DataCr if b == b'\r' => DataLf,
                DataLf if b == b'\n' => Size { size: 0, digits: 0 },
                DataCr | DataLf => return Err(FrameError::Chunk),
                TrailerStart if b == b'\r' => EndLf,
                TrailerStart | TrailerLine if b == b'\n' => return Err(FrameError::Chunk),
                TrailerStart | TrailerLine if b == b'\r' => TrailerLf,
                TrailerStart | TrailerLine => TrailerLine,
                TrailerLf if b == b'\n' => TrailerStart,
                EndLf if b == b'\n' => Done,
                TrailerLf | EndLf => return Err(FrameError::Chunk),
            };
            i += 1;
        }
        Ok(i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses `raw`, checking that the head forwarded in its place frames the
    /// body the same way for the backend.
    fn request(raw: &str) -> (RequestHead, String) {
        let mut out = Vec::new();
        let head = parse_request(raw.as_bytes(), &Added::NONE, &mut out)
            .unwrap()
            .unwrap();
        let again = parse_request(&out, &Added::NONE, &mut Vec::new())
            .unwrap()
            .unwrap();
        assert_eq!(again.consumed, out.len());
        assert_eq!(
            (again.body, again.http10, again.upgrade, again.is_head),
            (head.body, head.http10, head.upgrade, head.is_head)
        );
        (head, String::from_utf8(out).unwrap())
    }

    fn response(raw: &str, req: &RequestHead) -> (ResponseHead, String) {
        let mut out = Vec::new();
        let head = parse_response(raw.as_bytes(), req, &mut out)
            .unwrap()
            .unwrap();
        (head, String::from_utf8(out).unwrap())
    }

    #[test]
    fn a_plain_get_is_forwarded_without_its_hop_by_hop_headers() {
        let raw = "GET /a?b=1 HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, X-Hop\r\n\
                   X-Hop: 1\r\nKeep-Alive: 5\r\nAccept: */*\r\n\r\nNEXT";
        let (head, out) = request(raw);
        assert_eq!(out, "GET /a?b=1 HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n");
        assert_eq!(head.consumed, raw.len() - 4);
        assert_eq!(head.body, Length::Fixed(0));
        assert!(head.keep_alive && !head.http10 && !head.upgrade && !head.is_head);

        // An absolute-form target goes on in origin form.
        let (_, out) = request("GET http://h:1/p HTTP/1.1\r\nHost: h\r\n\r\n");
        assert!(out.starts_with("GET /p HTTP/1.1\r\n"), "{out}");
        let (_, out) = request("OPTIONS http://h:1 HTTP/1.1\r\nHost: h\r\n\r\n");
        assert!(out.starts_with("OPTIONS / HTTP/1.1\r\n"), "{out}");
    }

    #[test]
    fn the_fronts_own_lines_go_last_and_replace_what_they_name() {
        let raw =
            b"GET / HTTP/1.1\r\nX-Forwarded-For: 10.0.0.1\r\nx-forwarded-for: 10.0.0.2\r\n\r\n";
        let lines = b"X-Forwarded-For: 127.0.0.1\r\n";
        let mut out = Vec::new();
        let appending = Added {
            lines,
            replacing: &[],
        };
        parse_request(raw, &appending, &mut out).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "GET / HTTP/1.1\r\nX-Forwarded-For: 10.0.0.1\r\nx-forwarded-for: 10.0.0.2\r\n\
             X-Forwarded-For: 127.0.0.1\r\n\r\n"
        );
        let mut out = Vec::new();
        let replacing = Added {
            lines,
            replacing: &["X-Forwarded-For"],
        };
        parse_request(raw, &replacing, &mut out).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "GET / HTTP/1.1\r\nX-Forwarded-For: 127.0.0.1\r\n\r\n"
        );
    }

    #[test]
    fn what_frames_a_message_cannot_be_made_hop_by_hop() {
        let (head, out) = request(
            "POST / HTTP/1.1\r\nConnection: content-length, Transfer-Encoding, host\r\n\
             Host: x\r\nContent-Length: 3\r\n\r\n",
        );
        assert_eq!(head.body, Length::Fixed(3));
        assert!(
            out.contains("Host: x\r\n") && out.contains("Content-Length: 3\r\n"),
            "{out}"
        );
        let get = request("GET / HTTP/1.1\r\n\r\n").0;
        let (r, out) = response(
            "HTTP/1.1 200 OK\r\nConnection: Content-Length\r\nContent-Length: 2\r\n\r\n",
            &get,
        );
        assert_eq!(r.body, Length::Fixed(2));
        assert!(out.contains("Content-Length: 2\r\n"), "{out}");
    }

    #[test]
    fn doubtful_framing_is_refused_or_made_plain() {
        // Chunked and a length: chunked, no length passed on, and the
        // connection ends after the exchange.
        let (head, out) =
            request("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n");
        assert_eq!(head.body, Length::Chunked);
        assert!(!head.keep_alive && !out.contains("Content-Length"), "{out}");
        // HTTP/1.0 has no chunked coding.
        assert_eq!(
            parse_request(
                b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
                &Added::NONE,
                &mut Vec::new()
            ),
            Err(FrameError::TransferEncoding)
        );
        // A repeated length goes on once.
        let (_, out) =
            request("POST / HTTP/1.1\r\nContent-Length: 5, 5\r\nContent-Length: 5\r\n\r\n");
        assert_eq!(out.matches("Content-Length").count(), 1, "{out}");
        assert!(out.contains("Content-Length: 5\r\n"));
        let get = request("GET / HTTP/1.1\r\n\r\n").0;
        let (_, out) = response("HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\n\r\n", &get);
        assert_eq!(out.matches("Content-Length").count(), 1, "{out}");
        // Underscored names are dropped; CONNECT is refused.
        let (_, out) = request("GET / HTTP/1.1\r\nContent_Length: 9\r\nX-Ok: 1\r\n\r\n");
        assert!(
            !out.contains("Content_Length") && out.contains("X-Ok: 1"),
            "{out}"
        );
        assert_eq!(
            parse_request(
                b"CONNECT h:443 HTTP/1.1\r\nHost: h\r\n\r\n",
                &Added::NONE,
                &mut Vec::new()
            ),
            Err(FrameError::Connect)
        );
        // Too many fields for the front to add its own.
        let mut many = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..MAX_CLIENT_HEADERS + 1 {
            many.extend_from_slice(format!("X-{i}: v\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert_eq!(
            parse_request(&many, &Added::NONE, &mut Vec::new()),
            Err(FrameError::HeadTooLarge)
        );
    }

    #[test]
    fn framing_that_readers_could_take_two_ways_is_refused() {
        for (bad, why) in [
            (
                "POST / HTTP/1.1\r\nTransfer-Encoding: identity, chunked\r\n\r\n",
                FrameError::TransferEncoding,
            ),
            (
                "POST / HTTP/1.1\r\nTransfer-Encoding: IDENTITY\r\nContent-Length: 3\r\n\r\n",
                FrameError::TransferEncoding,
            ),
            (
                "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
                FrameError::TransferEncoding,
            ),
            (
                "POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\ntransfer-encoding: chunked\r\n\r\n",
                FrameError::TransferEncoding,
            ),
            (
                "POST / HTTP/1.1\r\nTransfer-Encoding: chunked, chunked\r\n\r\n",
                FrameError::TransferEncoding,
            ),
            (
                "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
                FrameError::Host,
            ),
            (
                "GET / HTTP/1.1\r\nHost: a\r\nhost: a\r\n\r\n",
                FrameError::Host,
            ),
            ("GET / HTTP/1.1\r\nHost: a, b\r\n\r\n", FrameError::Host),
        ] {
            let mut out = Vec::new();
            assert_eq!(
                parse_request(bad.as_bytes(), &Added::NONE, &mut out),
                Err(why),
                "{bad}"
            );
            assert!(out.is_empty(), "a refused head wrote {out:?}");
        }
        // One Host, one chunked coding last: as before.
        let (head, out) =
            request("POST / HTTP/1.1\r\nHost: a:80\r\nTransfer-Encoding: gzip, chunked\r\n\r\n");
        assert_eq!(head.body, Length::Chunked);
        assert!(out.contains("Host: a:80\r\n"), "{out}");
    }

    #[test]
    fn absolute_targets_keep_their_query_and_methods_say_if_they_repeat() {
        let (head, out) = request("GET http://h?r=/admin HTTP/1.1\r\nHost: h\r\n\r\n");
        assert!(out.starts_with("GET /?r=/admin HTTP/1.1\r\n"), "{out}");
        assert!(head.idempotent);
        assert!(!request("POST / HTTP/1.1\r\n\r\n").0.idempotent);
    }

    #[test]
    fn keep_alive_follows_the_version_and_connection() {
        assert!(
            !request("GET / HTTP/1.1\r\nConnection: close\r\n\r\n")
                .0
                .keep_alive
        );
        assert!(!request("GET / HTTP/1.0\r\n\r\n").0.keep_alive);
        let (head, out) = request("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n");
        assert!(head.keep_alive && head.http10);
        assert_eq!(out, "GET / HTTP/1.0\r\n\r\n");
    }

    #[test]
    fn body_lengths_of_requests() {
        let (head, out) = request("POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\n");
        assert_eq!(head.body, Length::Fixed(5));
        assert!(out.contains("Content-Length: 5\r\n"));
        assert_eq!(
            request("POST / HTTP/1.1\r\nContent-Length: 5, 5\r\nContent-Length: 5\r\n\r\n")
                .0
                .body,
            Length::Fixed(5)
        );
        // Chunked wins over Content-Length, which is not passed on.
        let (head, out) = request(
            "POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\nContent-Length: 3\r\n\r\n",
        );
        assert_eq!(head.body, Length::Chunked);
        assert!(!out.contains("Content-Length"), "{out}");

        for bad in [
            "POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: \r\n\r\n",
        ] {
            assert_eq!(
                parse_request(bad.as_bytes(), &Added::NONE, &mut Vec::new()),
                Err(FrameError::ContentLength),
                "{bad}"
            );
        }
        assert_eq!(
            parse_request(
                b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
                &Added::NONE,
                &mut Vec::new()
            ),
            Err(FrameError::TransferEncoding)
        );
    }

    #[test]
    fn incomplete_heads_ask_for_more_and_oversized_or_malformed_ones_are_refused() {
        let mut out = Vec::new();
        assert_eq!(
            parse_request(b"GET / HTTP/1.1\r\nHost:", &Added::NONE, &mut out),
            Ok(None)
        );
        assert!(out.is_empty());
        let mut long = b"GET / HTTP/1.1\r\nX: ".to_vec();
        long.resize(MAX_HEAD + 10, b'a');
        assert_eq!(
            parse_request(&long, &Added::NONE, &mut out),
            Err(FrameError::HeadTooLarge)
        );
        assert!(matches!(
            parse_request(
                b"GET / HTTP/1.1\r\nBad Header\r\n\r\n",
                &Added::NONE,
                &mut out
            ),
            Err(FrameError::Head(_))
        ));
        assert!(matches!(
            parse_request(b"\x00\x01 nonsense\r\n\r\n", &Added::NONE, &mut out),
            Err(FrameError::Head(_))
        ));
        assert!(out.is_empty(), "nothing is written for a refused head");
    }

    #[test]
    fn expect_continue_is_answered_by_the_front_not_forwarded() {
        let (head, out) =
            request("PUT / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n");
        assert!(head.expects_continue);
        assert!(!out.to_ascii_lowercase().contains("expect"), "{out}");
        // Without a body there is nothing to wait for.
        assert!(
            !request("GET / HTTP/1.1\r\nExpect: 100-continue\r\n\r\n")
                .0
                .expects_continue
        );
    }

    #[test]
    fn upgrades_keep_their_upgrade_headers() {
        let (head, out) = request(
            "GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
             Sec-WebSocket-Key: k\r\n\r\n",
        );
        assert!(head.upgrade);
        assert_eq!(
            out,
            "GET /ws HTTP/1.1\r\nHost: x\r\nSec-WebSocket-Key: k\r\nUpgrade: websocket\r\n\
             Connection: upgrade\r\n\r\n"
        );
        // `Upgrade` alone, without the Connection token, is dropped.
        let (head, out) = request("GET / HTTP/1.1\r\nUpgrade: h2c\r\n\r\n");
        assert!(!head.upgrade);
        assert!(!out.contains("h2c"));

        let (resp, out) = response(
            "HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
            &head,
        );
        assert_eq!(resp.status, 101);
        assert!(!resp.reusable && !resp.close_client && !resp.is_interim());
        assert!(out.ends_with("Upgrade: websocket\r\nConnection: upgrade\r\n\r\n"));
    }

    #[test]
    fn response_lengths_follow_the_request_and_the_status() {
        let get = request("GET / HTTP/1.1\r\n\r\n").0;
        let head_req = request("HEAD / HTTP/1.1\r\n\r\n").0;
        let (r, out) = response("HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc", &get);
        assert_eq!(
            (r.body, r.reusable, r.close_client),
            (Length::Fixed(3), true, false)
        );
        assert_eq!(out, "HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n");
        assert_eq!(r.consumed, out.len());
        // HEAD, 204 and 304 have no body whatever their headers say.
        assert_eq!(
            response("HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n", &head_req)
                .0
                .body,
            Length::Fixed(0)
        );
        for status in ["204 No Content", "304 Not Modified", "100 Continue"] {
            let raw = format!("HTTP/1.1 {status}\r\nTransfer-Encoding: chunked\r\n\r\n");
            assert_eq!(response(&raw, &get).0.body, Length::Fixed(0), "{status}");
        }
        assert!(
            response("HTTP/1.1 100 Continue\r\n\r\n", &get)
                .0
                .is_interim()
        );
        assert_eq!(
            response(
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                &get
            )
            .0
            .body,
            Length::Chunked
        );
        // No length: the body ends at the close, and so does the client's connection.
        let (r, out) = response("HTTP/1.1 200 OK\r\n\r\n", &get);
        assert_eq!(
            (r.body, r.reusable, r.close_client),
            (Length::ToClose, false, true)
        );
        assert!(out.ends_with("Connection: close\r\n\r\n"));
        // A backend that closes after the response is not reused; the client stays.
        let (r, out) = response(
            "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
            &get,
        );
        assert_eq!((r.reusable, r.close_client), (false, false));
        assert!(!out.contains("Connection"), "{out}");
        // An HTTP/1.0 backend keeps its connection only when it says so.
        assert!(
            !response("HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n", &get)
                .0
                .reusable
        );
        assert!(
            response(
                "HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n",
                &get
            )
            .0
            .reusable
        );
        // A client that closes gets `Connection: close`; an HTTP/1.0 one its version.
        let closing = request("GET / HTTP/1.1\r\nConnection: close\r\n\r\n").0;
        let (r, out) = response("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", &closing);
        assert!(r.close_client && out.contains("Connection: close\r\n"));
        let old = request("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").0;
        let (_, out) = response("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", &old);
        assert!(out.starts_with("HTTP/1.0 200 OK\r\n") && out.contains("Connection: keep-alive"));
        assert_eq!(
            parse_response(
                b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
                &get,
                &mut Vec::new()
            ),
            Err(FrameError::ContentLength)
        );
    }

    #[test]
    fn chunked_bodies_end_where_they_end_however_they_are_split() {
        let body = b"4\r\nWiki\r\n5;ext=1\r\npedia\r\nE\r\n in\r\n\r\nchunks.\r\n0\r\nT: 1\r\n\r\n";
        let mut input = body.to_vec();
        input.extend_from_slice(b"GET /next");
        for split in 0..input.len() {
            let mut c = Chunked::new();
            let a = c.scan(&input[..split]).unwrap();
            assert_eq!(a, split.min(body.len()));
            let b = c.scan(&input[split..]).unwrap();
            assert_eq!(a + b, body.len(), "split at {split}");
            assert!(c.is_done());
        }
        let mut c = Chunked::new();
        assert_eq!(c.scan(b"0\r\n\r\n"), Ok(5));
        assert!(c.is_done());
        // Whitespace after the size only before `;` or the line's end.
        assert_eq!(Chunked::new().scan(b"5 ;a=b\r\n"), Ok(8));
        assert_eq!(Chunked::new().scan(b"5 \t\r\n"), Ok(5));
        for bad in [
            &b"x\r\n"[..],
            b"5 junk\r\n",
            b"4\nWiki",
            b"4\r\nWikiX\r\n",
            b"11111111111111111\r\n",
            b"0\r\nT: 1\n",
            b"0\r\n\rX",
        ] {
            assert_eq!(Chunked::new().scan(bad), Err(FrameError::Chunk), "{bad:?}");
        }
    }

    #[test]
    fn own_responses_are_complete() {
        let mut out = Vec::new();
        own_response(503, "Service Unavailable", "none\n", true, &mut out);
        let get = request("GET / HTTP/1.1\r\n\r\n").0;
        let mut fwd = Vec::new();
        let r = parse_response(&out, &get, &mut fwd).unwrap().unwrap();
        assert_eq!(
            (r.status, r.body, r.reusable),
            (503, Length::Fixed(5), false)
        );
        assert_eq!(&out[r.consumed..], b"none\n");
    }
}
