//! How a front treats its clients: [`FrontConfig`].

use std::net::IpAddr;
use std::time::Duration;

/// How a front treats its clients: how long they may take, how many it
/// serves at once, and whom it believes about who the client is.
/// [`FrontConfig::default`] is what the shell uses for every public port; a
/// `tcp` port uses only `max_connections`.
///
/// The deadlines are what keeps a slow client (a "slowloris" sending its
/// request a byte at a time) from holding a connection, and the task and
/// buffers behind it, for ever.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrontConfig {
    /// HTTP: how long a client may take to send a whole request head,
    /// counted from the connection's start for its first request and from the
    /// head's first byte for later ones (before that byte a kept-alive
    /// connection is idle: see `idle_timeout`). A head not whole in time gets
    /// `408` and the connection closes; a new connection that sent nothing at
    /// all is closed without an answer. Default: 20 s.
    pub head_timeout: Duration,
    /// HTTP: how long the front waits for the next byte of a request body.
    /// A body that stops coming for as long gets `408` if its answer has not
    /// begun, else the connection closes. A body that keeps coming, however
    /// slowly, is never cut off by it; time the front spends waiting for the
    /// backend to take the body does not count. Default: 30 s.
    pub body_timeout: Duration,
    /// HTTP: a client connection with no request for one to two of these is
    /// closed, and an exchange in which no body or answer byte moves either
    /// way for as long ends — `408` if the client's body stopped coming,
    /// `504` if the backend did not answer, a closed connection once the
    /// answer began (so a service holding a long poll must send something
    /// within it). One timer per connection, re-armed only when it fires,
    /// hence "one to two". Default: 75 s, nginx's `keepalive_timeout`.
    pub idle_timeout: Duration,
    /// HTTP and TCP: the most client connections one front serves at once.
    /// One more is accepted and closed at once, before anything is read (its
    /// client sees the connection close without an answer), so a flood of
    /// connections on one port costs the front nothing it keeps; they are
    /// served again as soon as others end. Each open connection holds two
    /// file descriptors (the client's and the backend's): keep twice this,
    /// times the number of public ports, under the process's open-file limit.
    /// Default: 1024.
    pub max_connections: usize,
    /// HTTP: the peers whose own `X-Forwarded-For` is believed. A request
    /// from one of them keeps its `X-Forwarded-For` and gets the peer's
    /// address appended; from anyone else, its `X-Forwarded-For` is replaced
    /// by the peer's address, so a client cannot make a service believe it
    /// comes from elsewhere. List the balancers in front of the instance
    /// here. Default: none.
    pub trusted_proxies: Vec<IpAddr>,
}

impl Default for FrontConfig {
    fn default() -> Self {
        Self {
            head_timeout: Duration::from_secs(20),
            body_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(75),
            max_connections: 1024,
            trusted_proxies: Vec::new(),
        }
    }
}

impl FrontConfig {
    /// Whether `peer` is one of [`FrontConfig::trusted_proxies`] (an
    /// IPv4-mapped IPv6 address counts as its IPv4 address).
    pub(crate) fn trusts(&self, peer: IpAddr) -> bool {
        let peer = peer.to_canonical();
        self.trusted_proxies
            .iter()
            .any(|p| p.to_canonical() == peer)
    }
}
