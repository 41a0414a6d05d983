//! The hello: the first exchange on every connection, where versions are compared.
//!
//! The client opens the connection's first stream and sends [`Hello`] with its
//! protocol version; the server answers [`HelloReply::Welcome`] (naming the identity
//! it verified for the client) or [`HelloReply::VersionMismatch`] (naming the
//! version it speaks) and then closes the connection with
//! [`code::VERSION`](crate::endpoint::code::VERSION).
//!
//! Version rule: [`PROTOCOL_VERSION`] is bumped whenever a message of any protocol
//! changes incompatibly; both sides must speak the same version. The ALPN id
//! (`molt/1`) changes only if the framing itself changes.

use serde::{Deserialize, Serialize};

use crate::codec::{self, FrameError};
use crate::endpoint::code;
use crate::identity::Identity;

/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u32 = 3;

/// Largest hello frame accepted.
const HELLO_LIMIT: usize = 4096;

/// The client's first message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The protocol version the client speaks.
    pub version: u32,
    /// The client's software, for logs (`molt 0.1.0`).
    pub agent: String,
}

/// The server's answer to [`Hello`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HelloReply {
    /// Accepted.
    Welcome {
        /// The version both sides speak.
        version: u32,
        /// The identity the server verified for the client.
        you: Identity,
    },
    /// Refused: the server speaks another version.
    VersionMismatch {
        /// The version the server speaks.
        supported: u32,
    },
}

/// Why the hello failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HelloError {
    #[error(transparent)]
    Connection(#[from] quinn::ConnectionError),
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error(transparent)]
    Write(#[from] quinn::WriteError),
}

fn agent() -> String {
    format!("molt {}", env!("CARGO_PKG_VERSION"))
}

/// Client side: sends the hello on a new stream and reads the reply.
pub(crate) async fn greet(
    conn: &quinn::Connection,
    version: u32,
) -> Result<HelloReply, HelloError> {
    let (mut send, mut recv) = conn.open_bi().await?;
    codec::write_frame(
        &mut send,
        &Hello {
            version,
            agent: agent(),
        },
    )
    .await?;
    let _ = send.finish();
    match codec::expect_frame(&mut recv, HELLO_LIMIT).await {
        Ok(reply) => Ok(reply),
        // A refused client certificate surfaces here, as the connection's close reason.
        Err(e) => Err(conn
            .close_reason()
            .map_or(HelloError::Frame(e), HelloError::Connection)),
    }
}

/// Server side: reads the hello from the first stream and answers it. On a version
/// mismatch the connection is closed after the reply is delivered.
pub(crate) async fn answer(conn: &quinn::Connection, peer: &Identity) -> Result<(), HelloError> {
    let (mut send, mut recv) = conn.accept_bi().await?;
    let hello: Hello = match codec::expect_frame(&mut recv, HELLO_LIMIT).await {
        Ok(h) => h,
        Err(e) => {
            conn.close(code::PROTOCOL, b"malformed hello");
            return Err(e.into());
        }
    };
    if hello.version != PROTOCOL_VERSION {
        codec::write_frame(
            &mut send,
            &HelloReply::VersionMismatch {
                supported: PROTOCOL_VERSION,
            },
        )
        .await?;
        let _ = send.finish();
        // Let the reply reach the client before the close overtakes it.
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), send.stopped()).await;
        conn.close(code::VERSION, b"protocol version mismatch");
        return Err(FrameError::Malformed(format!(
            "client speaks version {}, this server {PROTOCOL_VERSION}",
            hello.version
        ))
        .into());
    }
    codec::write_frame(
        &mut send,
        &HelloReply::Welcome {
            version: PROTOCOL_VERSION,
            you: peer.clone(),
        },
    )
    .await?;
    let _ = send.finish();
    Ok(())
}
