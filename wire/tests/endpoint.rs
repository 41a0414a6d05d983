//! Real QUIC with real certificates on 127.0.0.1: who gets in, who does not, and
//! that bad input costs only its own stream.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use wire::{
    BiStream, Client, ClusterCa, Credentials, DEFAULT_FRAME_LIMIT, Handler, Identity, Server,
    WireError,
};

#[derive(Debug, Serialize, Deserialize)]
struct Echo(String);

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Echoed {
    peer: String,
    text: String,
}

/// Answers each request with the caller's verified identity and its text.
struct EchoHandler;

impl Handler for EchoHandler {
    async fn handle(&self, peer: Arc<Identity>, mut stream: BiStream) {
        match stream.read_request::<Echo>(1024).await {
            Ok(Echo(text)) => {
                let reply = Echoed {
                    peer: peer.to_string(),
                    text,
                };
                wire::codec::write_frame(&mut stream.send, &reply)
                    .await
                    .unwrap();
                let _ = stream.send.finish();
            }
            Err(e) => stream.refuse(&e),
        }
    }
}

/// A running echo server and the CA that made its certificate.
struct TestServer {
    ca: ClusterCa,
    addr: SocketAddr,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl TestServer {
    async fn start() -> Self {
        Self::start_with(EchoHandler).await
    }

    /// A server of `handler`.
    async fn start_with<H: Handler>(handler: H) -> Self {
        let ca = ClusterCa::generate("test").unwrap();
        let creds = ca.issue(&Identity::RepoServer).unwrap();
        let server = Server::bind("127.0.0.1:0".parse().unwrap(), &creds).unwrap();
        let addr = server.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(server.serve(Arc::new(handler), shutdown.clone()));
        Self {
            ca,
            addr,
            shutdown,
            task,
        }
    }

    fn client(&self, who: &str) -> Client {
        client_with(&self.ca.issue(&who.parse().unwrap()).unwrap(), self.addr)
    }

    async fn stop(self) {
        self.shutdown.cancel();
        // A hang guard, not a speed assertion: shutdown must complete at all.
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("server shut down")
            .unwrap();
    }
}

fn client_with(creds: &Credentials, addr: SocketAddr) -> Client {
    Client::new(creds, addr).unwrap()
}

async fn echo(client: &Client, addr: SocketAddr, text: &str) -> Result<Echoed, WireError> {
    let conn = client.connect(addr, &Identity::RepoServer).await?;
    conn.call(&Echo(text.into())).await
}

#[tokio::test]
async fn handlers_see_the_verified_identity() {
    let server = TestServer::start().await;
    for who in ["user/ada/developer", "shell/dev-1", "portal"] {
        let got = echo(&server.client(who), server.addr, "hi").await.unwrap();
        assert_eq!(
            got,
            Echoed {
                peer: who.into(),
                text: "hi".into()
            }
        );
    }
    server.stop().await;
}

#[tokio::test]
async fn another_cas_certificate_gets_nothing() {
    let server = TestServer::start().await;
    let other = ClusterCa::generate("other").unwrap();
    let mut stranger = other.issue(&"user/ada/admin".parse().unwrap()).unwrap();
    // Even trusting the right CA for the server, a client certificate from another
    // CA is refused.
    stranger.ca_pem = server.ca.cert_pem().to_owned();
    let err = echo(&client_with(&stranger, server.addr), server.addr, "hi")
        .await
        .unwrap_err();
    assert!(matches!(err, WireError::Connection { .. }), "{err}");

    // A client that trusts only the other CA refuses the server.
    let other_client = other.issue(&"user/ada/admin".parse().unwrap()).unwrap();
    let err = echo(&client_with(&other_client, server.addr), server.addr, "hi")
        .await
        .unwrap_err();
    assert!(matches!(err, WireError::Connection { .. }), "{err}");

    // The server keeps serving good clients.
    assert!(
        echo(&server.client("user/bob/deployer"), server.addr, "still")
            .await
            .is_ok()
    );
    server.stop().await;
}

#[tokio::test]
async fn no_certificate_gets_nothing() {
    let server = TestServer::start().await;
    // A raw quinn client that trusts the CA but presents no certificate.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    use rustls::pki_types::pem::PemObject;
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(server.ca.cert_pem().as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![wire::ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let outcome = async {
        let conn = endpoint
            .connect_with(
                quinn::ClientConfig::new(Arc::new(quic)),
                server.addr,
                "repo-server.molt",
            )
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())?;
        // TLS 1.3: the handshake may look fine; the refusal arrives with the stream.
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        let hello = wire::hello::Hello {
            version: wire::PROTOCOL_VERSION,
            agent: "anon".into(),
        };
        wire::codec::write_frame(&mut send, &hello)
            .await
            .map_err(|e| e.to_string())?;
        let _ = send.finish();
        wire::codec::expect_frame::<_, wire::hello::HelloReply>(&mut recv, 4096)
            .await
            .map_err(|e| e.to_string())
    }
    .await;
    assert!(
        outcome.is_err(),
        "an anonymous client was answered: {outcome:?}"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_server_of_another_role_is_refused() {
    let server = TestServer::start().await;
    let client = server.client("user/ada/admin");
    // The server is the repo-server; dialling it as the portal must fail.
    let err = client
        .connect(server.addr, &Identity::Portal)
        .await
        .unwrap_err();
    assert!(matches!(err, WireError::Connection { .. }), "{err}");
    // A user certificate cannot serve at all.
    let user = server.ca.issue(&"user/ada/admin".parse().unwrap()).unwrap();
    assert!(matches!(
        Server::bind("127.0.0.1:0".parse().unwrap(), &user),
        Err(WireError::NotAServer(_))
    ));
    // Users cannot be dialled.
    assert!(matches!(
        client
            .connect(server.addr, &"user/x/admin".parse().unwrap())
            .await,
        Err(WireError::NotAServer(_))
    ));
    server.stop().await;
}

#[tokio::test]
async fn a_version_mismatch_is_a_clear_error() {
    let server = TestServer::start().await;
    let client = server.client("user/ada/admin").with_protocol_version(99);
    let err = client
        .connect(server.addr, &Identity::RepoServer)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            WireError::VersionMismatch {
                ours: 99,
                theirs: wire::PROTOCOL_VERSION
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("version mismatch"), "{err}");
    server.stop().await;
}

#[tokio::test]
async fn bad_frames_cost_only_their_stream() {
    let server = TestServer::start().await;
    let client = server.client("user/ada/developer");
    let conn = client
        .connect(server.addr, &Identity::RepoServer)
        .await
        .unwrap();

    let garbage: [&[u8]; 4] = [
        &[0, 0, 0, 1, 0xff],                            // a frame that is not an Echo
        &[0x7f, 0xff, 0xff, 0xff],                      // a header claiming 2 GiB
        &[0, 0, 0, 9, 1, 2], // a frame cut short by the end of the stream
        &[0, 0, 0, 6, 0xfc, 0xff, 0xff, 0xff, 0x7f, 0], // a string longer than its frame
    ];
    for bytes in garbage {
        let mut s = conn.open().await.unwrap();
        s.send.write_all(bytes).await.unwrap();
        let _ = s.send.finish();
        let reply = wire::codec::read_frame::<_, Echoed>(&mut s.recv, DEFAULT_FRAME_LIMIT).await;
        assert!(
            !matches!(reply, Ok(Some(_))),
            "garbage {bytes:?} was answered: {reply:?}"
        );
    }
    // The same connection still serves well-formed requests...
    let ok: Echoed = conn.call(&Echo("after".into())).await.unwrap();
    assert_eq!(ok.text, "after");
    // ...and so does the server, to other clients.
    assert!(
        echo(&server.client("portal"), server.addr, "other")
            .await
            .is_ok()
    );
    // An oversized request (over the handler's 1 KiB limit) is refused the same way.
    let big = conn.call::<_, Echoed>(&Echo("x".repeat(4096))).await;
    assert!(big.is_err());
    assert!(conn.call::<_, Echoed>(&Echo("fine".into())).await.is_ok());
    server.stop().await;
}

#[tokio::test]
async fn shutdown_closes_connections_and_completes() {
    let server = TestServer::start().await;
    let client = server.client("user/ada/developer");
    let conn = client
        .connect(server.addr, &Identity::RepoServer)
        .await
        .unwrap();
    server.stop().await;
    // The open connection was closed by the server, not left to time out.
    let err = conn
        .call::<_, Echoed>(&Echo("late".into()))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("shutting down"), "{err}");
}

/// Holds each request until released, and says when one has arrived.
struct HeldHandler {
    arrived: tokio::sync::mpsc::Sender<()>,
    release: Arc<tokio::sync::Notify>,
}

impl Handler for HeldHandler {
    async fn handle(&self, peer: Arc<Identity>, mut stream: BiStream) {
        let Ok(Echo(text)) = stream.read_request::<Echo>(1024).await else {
            return;
        };
        let _ = self.arrived.send(()).await;
        self.release.notified().await;
        let reply = Echoed {
            peer: peer.to_string(),
            text,
        };
        let _ = wire::codec::write_frame(&mut stream.send, &reply).await;
        let _ = stream.send.finish();
    }
}

#[tokio::test]
async fn shutdown_lets_requests_in_flight_finish() {
    let ca = ClusterCa::generate("test").unwrap();
    let server = Server::bind(
        "127.0.0.1:0".parse().unwrap(),
        &ca.issue(&Identity::RepoServer).unwrap(),
    )
    .unwrap();
    let addr = server.local_addr().unwrap();
    let (arrived_tx, mut arrived) = tokio::sync::mpsc::channel(1);
    let release = Arc::new(tokio::sync::Notify::new());
    let handler = Arc::new(HeldHandler {
        arrived: arrived_tx,
        release: release.clone(),
    });
    let shutdown = CancellationToken::new();
    let serving = tokio::spawn(server.serve(handler, shutdown.clone()));

    let client = client_with(&ca.issue(&"user/ada/admin".parse().unwrap()).unwrap(), addr);
    let conn = client.connect(addr, &Identity::RepoServer).await.unwrap();
    let call = tokio::spawn(async move { conn.call::<_, Echoed>(&Echo("slow".into())).await });
    arrived.recv().await.unwrap();
    // Shutdown is asked for while the request is being served...
    shutdown.cancel();
    tokio::task::yield_now().await;
    release.notify_one();
    // ...and the request still gets its answer before the connection closes.
    let reply = call.await.unwrap().unwrap();
    assert_eq!(reply.text, "slow");
    tokio::time::timeout(Duration::from_secs(30), serving)
        .await
        .expect("server shut down")
        .unwrap();
}

#[tokio::test]
async fn nobody_there_is_a_handshake_timeout() {
    let server = TestServer::start().await;
    let client = server.client("user/ada/admin");
    // A UDP socket that never answers: packets go nowhere, as to a dead host.
    let silent = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let err = client
        .connect(silent.local_addr().unwrap(), &Identity::RepoServer)
        .await
        .unwrap_err();
    assert!(matches!(err, WireError::Timeout("handshake")), "{err}");
    server.stop().await;
}

/// Relays UDP between a client and `to` until `cut` fires; then drops every
/// packet, as if the server's host died.
async fn relay(to: SocketAddr, cut: CancellationToken) -> SocketAddr {
    let front = Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap());
    let back = Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap());
    back.connect(to).await.unwrap();
    let addr = front.local_addr().unwrap();
    let client = Arc::new(std::sync::Mutex::new(None::<SocketAddr>));
    {
        let (front, back, client, cut) = (front.clone(), back.clone(), client.clone(), cut.clone());
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65536];
            while let Ok((n, from)) = front.recv_from(&mut buf).await {
                *client.lock().unwrap() = Some(from);
                if !cut.is_cancelled() {
                    let _ = back.send(&buf[..n]).await;
                }
            }
        });
    }
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        while let Ok(n) = back.recv(&mut buf).await {
            let to = *client.lock().unwrap();
            if let (Some(to), false) = (to, cut.is_cancelled()) {
                let _ = front.send_to(&buf[..n], to).await;
            }
        }
    });
    addr
}

/// Never answers: holds each stream open.
struct SilentHandler;

impl Handler for SilentHandler {
    async fn handle(&self, _peer: Arc<Identity>, stream: BiStream) {
        std::future::pending::<()>().await;
        drop(stream);
    }
}

#[tokio::test]
async fn a_peer_that_vanishes_mid_command_ends_the_command() {
    let ca = ClusterCa::generate("test").unwrap();
    let server = Server::bind(
        "127.0.0.1:0".parse().unwrap(),
        &ca.issue(&Identity::RepoServer).unwrap(),
    )
    .unwrap();
    let server_addr = server.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let serving = tokio::spawn(server.serve(Arc::new(SilentHandler), shutdown.clone()));
    let cut = CancellationToken::new();
    let addr = relay(server_addr, cut.clone()).await;
    let client = client_with(&ca.issue(&"user/ada/admin".parse().unwrap()).unwrap(), addr);
    let conn = client.connect(addr, &Identity::RepoServer).await.unwrap();
    let mut stream = conn.open().await.unwrap();
    wire::codec::write_frame(&mut stream.send, &Echo("hello?".into()))
        .await
        .unwrap();
    // The server's host goes away while the command waits for its answer.
    cut.cancel();
    let mut buf = [0u8; 16];
    // A hang guard, not a speed assertion: the read must end at all.
    let read = tokio::time::timeout(Duration::from_secs(120), stream.recv.read(&mut buf))
        .await
        .expect("a read on a vanished peer's connection never ended");
    let err = read.unwrap_err();
    assert!(
        format!("{err:?}").contains("TimedOut"),
        "the connection should time out: {err:?}"
    );
    shutdown.cancel();
    let _ = serving.await;
}

/// Tells the test when a peer's connection ends.
struct Watched(tokio::sync::mpsc::UnboundedSender<String>);

impl Handler for Watched {
    async fn handle(&self, peer: Arc<Identity>, stream: BiStream) {
        EchoHandler.handle(peer, stream).await;
    }

    fn disconnected(&self, peer: &Arc<Identity>, _conn: &quinn::Connection) {
        let _ = self.0.send(peer.to_string());
    }
}

/// A client's shutdown does not wait out QUIC's draining period, yet the
/// server learns the client is done from its close frame, not from the idle
/// timeout.
#[tokio::test]
async fn a_client_shutdown_reaches_the_server_without_draining() {
    let (tx, mut ended) = tokio::sync::mpsc::unbounded_channel();
    let server = TestServer::start_with(Watched(tx)).await;
    for round in 0..5 {
        let client = server.client("user/ada/developer");
        let reply = echo(&client, server.addr, &format!("round {round}"))
            .await
            .unwrap();
        assert_eq!(reply.text, format!("round {round}"));
        client.shutdown().await;
        drop(client);
        // Well before the idle timeout would have ended it: the close arrived.
        let who = tokio::time::timeout(wire::endpoint::IDLE_TIMEOUT / 2, ended.recv())
            .await
            .expect("the server saw the close, not an idle timeout")
            .unwrap();
        assert_eq!(who, "user/ada/developer");
    }
    server.stop().await;
}
