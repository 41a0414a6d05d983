//! molt's front: the public ports of an instance.
//!
//! A front owns one public port and passes the work that arrives on it to the
//! backend its route names at that moment. It knows nothing of images,
//! services or processes: a route is an opaque string key in a [`Router`]
//! (the shell uses `service/port`), and a backend is a socket address.
//!
//! What it owns:
//! - [`Router`] and [`Route`]: one routing table per instance, from each route
//!   key to its backend, replaced as a whole, so a change to many routes (a
//!   shadow generation's cutover) lands for all of them at one instant;
//! - [`Front`]: the handle of one public port — its address, its open client
//!   connections, the work still in flight per backend (what an upgrade waits
//!   on to drain an old process), and its shutdown;
//! - [`bind_tcp`]: the per-connection front for `tcp` ports (a connection
//!   stays with the backend it was spliced to; new ones follow the table);
//! - [`bind_http`]: the per-request front for `http` ports, a small HTTP/1.1
//!   relay of its own (a keep-alive client's next request follows the table,
//!   requests in flight finish where they are);
//! - [`FrontConfig`]: how clients are treated — deadlines for a request head,
//!   a request body and an idle connection, the most connections served at
//!   once, and the proxies trusted to say who the client is;
//! - [`http1`]: HTTP/1.x message framing with no I/O — where a head ends, how
//!   its body is delimited, the head forwarded in its place — strict where a
//!   lenient reading would let the front and a backend disagree.
//!
//! Both fronts hold new work for a while (the `hold` given at bind) when their
//! route has no backend, instead of refusing it: a service that cannot run
//! twice is stopped and started behind them.
//!
//! What a client cannot do through a front: send a request whose end or host
//! a backend could read differently (refused with `400` before anything
//! reaches a backend); make a service believe it comes from another address
//! (its `X-Forwarded-For` is replaced unless it is a trusted proxy); hold a
//! connection by sending slowly (the head and body deadlines) or by opening
//! many (the connection limit).
//!
//! Non-goals: TLS (a front serves loopback or sits behind a terminating
//! balancer), HTTP/2, caching, load balancing across several backends of one
//! route.

mod config;
mod http;
pub mod http1;
mod port;

pub use config::FrontConfig;
pub use http::{bind_http, bind_http_inherited};
pub use port::{DRAIN_IDLE, Front, Route, Router, bind_tcp, bind_tcp_inherited};
