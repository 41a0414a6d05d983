//! A real browser for the web pages' tests: Debian's headless chromium driven
//! through chromedriver by fantoccini.
//!
//! [`Browser::start`] starts (or shares, while another browser of the same
//! test binary is open) a chromedriver on a free loopback port, and opens a
//! chromium session with a fresh profile. A missing `chromium` or
//! `chromedriver` fails the test with how to install them (`scripts/test`
//! does, with apt-get). On drop, the browser's chromium (found
//! by its own profile directory) and, with the last browser, chromedriver are
//! ended, so a failed test leaves no process behind.
//!
//! [`Browser::screenshot`] saves a PNG under `target/screenshots/`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

pub use fantoccini::Locator;
use fantoccini::elements::Element;

/// Where chromium is, unless `$MOLT_CHROMIUM` says otherwise.
pub const CHROMIUM: &str = "/usr/bin/chromium";
/// Where chromedriver is, unless `$MOLT_CHROMEDRIVER` says otherwise.
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// A running chromedriver, ended when its last browser is.
struct Driver {
    child: std::process::Child,
    addr: SocketAddr,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The chromedriver the open browsers of this test binary share.
static DRIVER: Mutex<Weak<Driver>> = Mutex::new(Weak::new());

fn executable(var: &str, default: &str) -> PathBuf {
    let path = std::env::var_os(var)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(default));
    assert!(
        path.exists(),
        "{} is missing: the web tests need Debian's chromium and chromium-driver \
         (apt-get install chromium chromium-driver; scripts/test installs them), \
         or ${var} naming another",
        path.display()
    );
    path
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

async fn driver() -> Arc<Driver> {
    if let Some(d) = DRIVER.lock().expect("driver lock").upgrade() {
        return d;
    }
    let binary = executable("MOLT_CHROMEDRIVER", CHROMEDRIVER);
    let port = free_port();
    let child = std::process::Command::new(&binary)
        .arg(format!("--port={port}"))
        .arg("--allowed-ips=127.0.0.1")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let driver = Arc::new(Driver { child, addr });
    // Ready when it accepts a connection (within 20 s).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "chromedriver did not listen on {addr} within 20 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut shared = DRIVER.lock().expect("driver lock");
    match shared.upgrade() {
        // Another test started one meanwhile: use it, end ours.
        Some(other) => other,
        None => {
            *shared = Arc::downgrade(&driver);
            driver
        }
    }
}

/// A headless chromium session.
pub struct Browser {
    /// The WebDriver client.
    pub client: fantoccini::Client,
    /// The portal the pages come from (`http://127.0.0.1:PORT`).
    pub base: String,
    profile: tempfile::TempDir,
    _driver: Arc<Driver>,
}

impl Browser {
    /// A new browser with a fresh profile, for the pages at `portal` (its
    /// plain-HTTP listener).
    pub async fn start(portal: SocketAddr) -> Self {
        // fantoccini's rustls wants a process-wide crypto provider; the
        // workspace's is ring.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let chromium = executable("MOLT_CHROMIUM", CHROMIUM);
        let driver = driver().await;
        let profile = tempfile::tempdir().expect("a profile directory");
        let args = vec![
            "--headless".to_owned(),
            "--no-sandbox".into(),
            "--disable-gpu".into(),
            "--disable-dev-shm-usage".into(),
            "--disable-quic".into(),
            "--no-first-run".into(),
            "--disable-background-networking".into(),
            "--disable-component-update".into(),
            "--disable-sync".into(),
            "--window-size=1280,900".into(),
            format!("--user-data-dir={}", profile.path().display()),
        ];
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            serde_json::json!({ "binary": chromium, "args": args }),
        );
        let client = fantoccini::ClientBuilder::rustls()
            .expect("the WebDriver client's TLS settings")
            .capabilities(caps)
            .connect(&format!("http://{}", driver.addr))
            .await
            .unwrap_or_else(|e| panic!("cannot open a chromium session: {e}"));
        Self {
            client,
            base: format!("http://{portal}"),
            profile,
            _driver: driver,
        }
    }

    /// Opens `path` of the portal.
    pub async fn goto(&self, path: &str) {
        self.client
            .goto(&format!("{}{path}", self.base))
            .await
            .unwrap_or_else(|e| panic!("open {path}: {e}"));
    }

    /// The element `css` finds, waiting up to 20 s for it.
    pub async fn find(&self, css: &str) -> Element {
        let found = self
            .client
            .wait()
            .at_most(Duration::from_secs(20))
            .for_element(Locator::Css(css))
            .await;
        match found {
            Ok(e) => e,
            Err(e) => panic!(
                "no element `{css}` on {}: {e}\n{}",
                self.url().await,
                self.source().await
            ),
        }
    }

    /// Every element `css` finds now.
    pub async fn find_all(&self, css: &str) -> Vec<Element> {
        self.client
            .find_all(Locator::Css(css))
            .await
            .unwrap_or_default()
    }

    /// The text of the element `css` finds.
    pub async fn text(&self, css: &str) -> String {
        self.find(css)
            .await
            .text()
            .await
            .expect("an element's text")
    }

    /// Waits (at most `secs`) until the text of `css` satisfies `done`;
    /// returns it.
    pub async fn wait_text(&self, css: &str, secs: u64, done: impl Fn(&str) -> bool) -> String {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        loop {
            // An element htmx is swapping out reads as missing or stale for
            // a moment: that is "not there yet", never an empty answer.
            let text = match self.client.find(Locator::Css(css)).await {
                Ok(e) => e.text().await.ok(),
                Err(_) => None,
            };
            if let Some(text) = text.as_deref().filter(|t| done(t)) {
                return text.to_owned();
            }
            let text = text.unwrap_or_default();
            assert!(
                tokio::time::Instant::now() < deadline,
                "`{css}` did not get there in {secs} s: {text:?}\n{}",
                self.client.source().await.unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The current URL.
    pub async fn url(&self) -> String {
        self.client
            .current_url()
            .await
            .map(|u| u.to_string())
            .unwrap_or_default()
    }

    /// The page's HTML.
    pub async fn source(&self) -> String {
        self.client.source().await.unwrap_or_default()
    }

    /// Saves a PNG of the page as `target/screenshots/NAME.png`.
    pub async fn screenshot(&self, name: &str) -> PathBuf {
        let png = self.client.screenshot().await.expect("a screenshot");
        let dir = screenshots_dir();
        std::fs::create_dir_all(&dir).expect("the screenshots directory");
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, png).expect("write the screenshot");
        path
    }

    /// Ends the session (chromium quits).
    pub async fn close(self) {
        let _ = self.client.clone().close().await;
    }
}

/// `target/screenshots/` of the workspace (or of `$CARGO_TARGET_DIR`).
pub fn screenshots_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("screenshots")
}

impl Drop for Browser {
    fn drop(&mut self) {
        // A session not closed (a failed test): end its chromium, found by
        // its own profile directory.
        end_processes_using(self.profile.path());
    }
}

/// Ends (SIGKILL, by pid) the processes whose command line names `marker`.
fn end_processes_using(marker: &Path) {
    let marker = format!("--user-data-dir={}", marker.display());
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        if cmdline
            .split(|b| *b == 0)
            .any(|arg| arg == marker.as_bytes())
        {
            let _ = std::process::Command::new("kill")
                .args(["-9", pid])
                .status();
        }
    }
}
