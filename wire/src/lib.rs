//! What every networked part of molt shares: certificates, QUIC endpoints with
//! mutual TLS, framing, and the hello.
//!
//! # Protocol
//!
//! **Goals.** Every hop between molt components is authenticated both ways by the
//! cluster CA, and every handler knows who is asking (a verified [`Identity`]).
//! Control messages are small typed frames; bulk data (blobs) streams in chunks
//! outside of frames (a receiver may still gather small blobs, up to a bounded
//! budget, before storing them). Bad input from a peer costs that peer its stream,
//! never the server.
//!
//! **Non-goals.** Talking to anything outside the cluster (browsers use the
//! portal's HTTP API); plaintext or anonymous modes; compatibility across protocol
//! versions (both sides must match; see below).
//!
//! **Transport.** QUIC (quinn 0.11) over UDP, TLS 1.3 only (rustls 0.23 with ring),
//! ALPN `molt/1`, client certificates required ([`endpoint`]). Each request opens
//! its own bidirectional stream and is answered on it, once — except the
//! repository's ref watch ([`repo::RepoRequest::WatchRefs`]), answered with a frame
//! per event until either side ends the stream.
//!
//! **Framing and limits.** A frame is a 4-byte big-endian length and a bincode 2
//! payload; a frame over its limit (16 MiB by default) or one that does not decode
//! to exactly one message is a typed [`FrameError`]; the stream is reset and the
//! connection and server carry on ([`codec`]).
//!
//! **Version rule.** The first stream of every connection carries the hello
//! ([`hello`]): the client states [`PROTOCOL_VERSION`], and a server that speaks
//! another version answers with its own and closes the connection, so the client
//! reports a clear [`WireError::VersionMismatch`].

pub mod codec;
pub mod endpoint;
pub mod hello;
pub mod identity;
pub mod pki;
pub mod plan;
pub mod portal;
pub mod repo;
pub mod revocation;
pub mod shell;

pub use codec::{DEFAULT_FRAME_LIMIT, FrameError};
pub use endpoint::{ALPN, BiStream, Client, Connection, Handler, SEND_WINDOW, Server, WireError};
pub use hello::PROTOCOL_VERSION;
pub use identity::{Grant, Identity, IdentityError};
pub use pki::{ClusterCa, CredentialFiles, Credentials, PkiError};
pub use revocation::{RevocationList, Revoked};
