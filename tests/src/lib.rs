//! The one helper every end-to-end test uses: a cluster in a temp directory.
//!
//! [`TestCluster::start`] makes a cluster CA, starts a real repository server on
//! 127.0.0.1 port 0 with a real sled database, and hands out clients for any
//! identity. Service directories for pushes are written with [`write_service`].

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use repo_client::{PushOptions, RepoClient};
use repo_server::FsRepoService;
use rustls::pki_types::pem::PemObject;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use wire::{Client, ClusterCa, Credentials, Identity};

/// A running repository server and the CA of its cluster.
pub struct TestCluster {
    /// The temp directory holding everything; removed on drop.
    pub dir: tempfile::TempDir,
    /// The cluster CA.
    pub ca: ClusterCa,
    /// The repository server's address.
    pub repo_addr: SocketAddr,
    repo_creds: Credentials,
    service: Option<std::sync::Arc<FsRepoService>>,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl TestCluster {
    /// A new cluster with a running repository server.
    pub async fn start() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let ca = ClusterCa::generate("e2e").expect("CA");
        let repo_creds = ca.issue(&Identity::RepoServer).expect("repo cert");
        let mut cluster = Self {
            dir,
            ca,
            repo_addr: "127.0.0.1:0".parse().expect("address"),
            repo_creds,
            service: None,
            shutdown: CancellationToken::new(),
            task: None,
        };
        cluster.start_repo("127.0.0.1:0".parse().expect("address"));
        cluster
    }

    fn start_repo(&mut self, listen: SocketAddr) {
        let config = repo_server::Config {
            data: self.dir.path().join("repo"),
            listen,
            credentials: self.repo_creds.clone(),
            revoked: Some(self.revocation_list()),
        };
        let bound = repo_server::bind(&config).expect("bind repository server");
        self.repo_addr = bound.local_addr().expect("local address");
        self.service = Some(bound.service());
        self.shutdown = CancellationToken::new();
        self.task = Some(tokio::spawn(bound.serve(self.shutdown.clone())));
    }

    /// Stops the repository server and waits until it has released its database.
    pub async fn stop_repo(&mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            task.await.expect("repository server task");
        }
        self.service = None;
    }

    /// Stops the repository server and starts it again on the same data and port.
    pub async fn restart_repo(&mut self) {
        self.stop_repo().await;
        self.start_repo(self.repo_addr);
    }

    /// The running server's stores.
    pub fn service(&self) -> &FsRepoService {
        self.service
            .as_deref()
            .expect("the repository server is running")
    }

    /// Credentials for `identity` (`user/ada/developer`, `shell/dev-1`, …).
    pub fn credentials(&self, identity: &str) -> Credentials {
        self.ca
            .issue(&identity.parse().expect("identity"))
            .expect("issue")
    }

    /// A repository client connected as `identity`.
    pub async fn repo_client(&self, identity: &str) -> RepoClient {
        let client = Client::new(&self.credentials(identity), self.repo_addr).expect("client");
        RepoClient::connect(&client, self.repo_addr)
            .await
            .expect("connect to the repository server")
            .with_tree_cache(self.path("tree-cache"))
    }

    /// The cluster's revocation list (`revoked.txt` in its directory), which
    /// the repository server and the test portal are given; it does not exist
    /// until the first [`TestCluster::revoke`].
    pub fn revocation_list(&self) -> PathBuf {
        self.dir.path().join("revoked.txt")
    }

    /// Revokes a certificate, as `molt cert revoke` does: its serial number
    /// appended to the revocation list.
    pub fn revoke(&self, creds: &Credentials) {
        let der = rustls::pki_types::CertificateDer::from_pem_slice(creds.cert_pem.as_bytes())
            .expect("a PEM certificate");
        let serial = wire::pki::serial_of(&der).expect("its serial number");
        wire::revocation::append(&self.revocation_list(), &serial).expect("append to the list");
    }

    /// A directory under the cluster's temp dir.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Writes a service directory: a `service.toml` for `name` plus `files`.
pub fn write_service(dir: &Path, name: &str, files: &[(&str, &[u8])]) {
    write_file(
        dir,
        "service.toml",
        format!("name = \"{name}\"\n[run]\ncommand = [\"./run\"]\n[[ports]]\nport = 8080\n")
            .as_bytes(),
    );
    for (rel, bytes) in files {
        write_file(dir, rel, bytes);
    }
}

/// Writes one file, creating its directories.
pub fn write_file(dir: &Path, rel: &str, bytes: &[u8]) {
    let path = dir.join(rel);
    std::fs::create_dir_all(path.parent().expect("a file has a parent")).expect("mkdir");
    std::fs::write(path, bytes).expect("write");
}

/// Copies the sources of `examples/NAME` (never its build outputs) to `dst`.
pub fn copy_example(name: &str, dst: &Path) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples")
        .join(name);
    for rel in [
        "service.toml",
        "Cargo.toml",
        "Cargo.lock",
        ".moltignore",
        "src/main.rs",
        "src/lib.rs",
        "server.py",
    ] {
        if let Ok(bytes) = std::fs::read(src.join(rel)) {
            write_file(dst, rel, &bytes);
        }
    }
}

/// Sets `const VERSION: &str = "…";` in the source file `file` (the sample
/// services' version) to `version`.
pub fn set_version(file: &Path, version: &str) {
    const MARK: &str = "const VERSION: &str = \"";
    let src = std::fs::read_to_string(file).expect("read the source");
    let start = src.find(MARK).expect("a VERSION constant") + MARK.len();
    let end = start + src[start..].find('"').expect("its closing quote");
    let changed = format!("{}{version}{}", &src[..start], &src[end..]);
    std::fs::write(file, changed).expect("write the source");
}

/// Push options for branch `main`.
pub fn push_main(message: &str) -> PushOptions {
    PushOptions {
        branch: "main".parse().expect("branch"),
        message: message.into(),
    }
}

/// One GET on a kept-alive connection: the status code and the body.
pub async fn get(conn: &mut BufReader<TcpStream>, path: &str) -> std::io::Result<(u16, String)> {
    conn.get_mut()
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await?;
    let mut status = String::new();
    if conn.read_line(&mut status).await? == 0 {
        return Err(std::io::Error::other("connection closed"));
    }
    let code: u16 = status
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line {status:?}")))?;
    let mut len = 0usize;
    loop {
        let mut line = String::new();
        conn.read_line(&mut line).await?;
        let line = line.trim_end().to_ascii_lowercase();
        if line.is_empty() {
            break;
        }
        if let Some(v) = line.strip_prefix("content-length:") {
            len = v.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0u8; len];
    conn.read_exact(&mut body).await?;
    Ok((code, String::from_utf8_lossy(&body).into_owned()))
}

/// One GET on a new connection (panics if it fails).
pub async fn get_once(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut conn = BufReader::new(TcpStream::connect(addr).await.expect("connect"));
    get(&mut conn, path).await.expect("GET")
}

/// What identifies a version in a sample service's answer: hello's greeting,
/// orders' version.
pub fn version_of(body: &str) -> String {
    for key in ["\"greeting\": \"", "\"version\":\""] {
        if let Some(rest) = body.split(key).nth(1) {
            return rest.split('"').next().unwrap_or("?").to_owned();
        }
    }
    format!("unrecognised answer: {body}")
}

/// Keep-alive GETs on one address until stopped, counting answers and failures
/// and collecting the versions seen ([`version_of`]).
pub struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<BTreeSet<String>>,
}

impl Load {
    /// Starts the load on `addr`.
    pub fn start(addr: std::net::SocketAddr) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let task = {
            let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
            tokio::spawn(async move {
                let mut seen = BTreeSet::new();
                let mut conn = BufReader::new(TcpStream::connect(addr).await.expect("connect"));
                while !stop.load(Ordering::Relaxed) {
                    match get(&mut conn, "/").await {
                        Ok((200, body)) => {
                            ok.fetch_add(1, Ordering::Relaxed);
                            seen.insert(version_of(&body));
                        }
                        Ok(_) | Err(_) => {
                            failed.fetch_add(1, Ordering::Relaxed);
                            // A new connection, as a client would.
                            if let Ok(c) = TcpStream::connect(addr).await {
                                conn = BufReader::new(c);
                            }
                        }
                    }
                }
                seen
            })
        };
        Self {
            stop,
            ok,
            failed,
            task,
        }
    }

    /// Stops; returns (answered, failed, versions seen).
    pub async fn finish(self) -> (u64, u64, BTreeSet<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let seen = self.task.await.expect("the load task");
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
            seen,
        )
    }
}

pub mod bench;
pub mod browser;
pub mod damage;
pub mod portal;
pub mod relay;
