//! `molt.toml`: the client configuration every command reads.
//!
//! Found at `--config FILE`, else `$MOLT_CONFIG`, else `./molt.toml`, else
//! `./molt-local/molt.toml` (the one `molt up` writes, so the commands it suggests
//! work from the directory it ran in). Relative paths in it are relative to the
//! file's own directory. `molt init` writes one:
//!
//! ```toml
//! repo = "127.0.0.1:7878"        # the repository server (override: --repo, $MOLT_REPO)
//! cert = "certs/admin.crt"       # this user's certificate
//! key = "certs/admin.key"        # its private key (mode 0600)
//! ca = "certs/ca.crt"            # the cluster CA certificate
//! ca_key = "certs/ca.key"        # the CA's key: only `molt cert issue` needs it
//!
//! portal = "https://127.0.0.1:7881"  # the portal's API (override: --portal-url);
//!                                     # over https:// the CLI presents this user's
//!                                     # certificate, over http:// a token
//! portal_token = "portal/admin.token" # for http:// only: a file holding this user's
//!                                     # API token ($MOLT_TOKEN overrides it, and is
//!                                     # sent over https:// too when set)
//!
//! [instances]                    # optional: shells by name, for --instance NAME
//! dev-1 = "127.0.0.1:7901"
//!
//! [repo_server]                  # used by `molt repo-server`
//! data = "repo"                  # where blobs and metadata live
//! listen = "127.0.0.1:7878"      # UDP address to serve QUIC on
//! cert = "certs/repo-server.crt"
//! key = "certs/repo-server.key"
//! revoked = "certs/revoked.txt"  # certificates to refuse (`molt cert revoke`)
//!
//! [portal_server]                # used by `molt portal`
//! data = "portal"                # its records; it writes admin.token here at first start
//! listen = "127.0.0.1:7879"      # UDP address shells attach to (QUIC)
//! https = "127.0.0.1:7881"       # the API over HTTPS (the CLI, with its certificate)
//! http = "127.0.0.1:7880"        # the API over plain HTTP, for a local browser:
//!                                # loopback only; tokens and sessions, no certificates
//! names = ["portal.example.com"] # optional: more host names the API answers to
//! cert = "certs/portal.crt"
//! key = "certs/portal.key"
//! revoked = "certs/revoked.txt"  # certificates to refuse (`molt cert revoke`)
//! ```
//!
//! `certs/revoked.txt` is the revocation list: one revoked certificate's
//! serial number per line, in hex (`#` comments and blank lines ignored).
//! `molt cert revoke` appends to it; the repository server and the portal
//! re-read it when it changes, and refuse those certificates from their next
//! connection on.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use wire::Credentials;

/// The default file name.
pub(crate) const CONFIG_FILE: &str = "molt.toml";

/// The state directory `molt up` uses unless told otherwise; its `molt.toml` is
/// the configuration of last resort.
pub(crate) const UP_DIR: &str = "molt-local";

/// Where `molt init` has the portal take shells (QUIC).
pub(crate) const DEFAULT_PORTAL_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 7879);

/// Where `molt init` has the portal serve its API over plain HTTP (a local browser).
pub(crate) const DEFAULT_PORTAL_HTTP: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 7880);

/// Where `molt init` has the portal serve its API over HTTPS (the CLI).
pub(crate) const DEFAULT_PORTAL_HTTPS: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 7881);

/// The client configuration (see the module docs).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Config {
    /// The repository server's address.
    pub(crate) repo: SocketAddr,
    /// This user's certificate.
    pub(crate) cert: PathBuf,
    /// This user's private key.
    pub(crate) key: PathBuf,
    /// The cluster CA certificate.
    pub(crate) ca: PathBuf,
    /// The cluster CA's private key (only for issuing certificates).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) ca_key: Option<PathBuf>,
    /// Settings of `molt repo-server`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) repo_server: Option<RepoServerConfig>,
    /// The portal's API (`https://IP:PORT`, or `http://IP:PORT` on loopback).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) portal: Option<String>,
    /// A file holding this user's API token for the portal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) portal_token: Option<PathBuf>,
    /// Settings of `molt portal`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) portal_server: Option<PortalServerConfig>,
    /// Known instances: name → shell command address.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub(crate) instances: std::collections::BTreeMap<String, SocketAddr>,
}

/// The `[repo_server]` table.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RepoServerConfig {
    /// Where blobs and metadata live.
    pub(crate) data: PathBuf,
    /// UDP address to serve on.
    pub(crate) listen: SocketAddr,
    /// The server's certificate.
    pub(crate) cert: PathBuf,
    /// Its private key.
    pub(crate) key: PathBuf,
    /// The revocation list: certificates it names are refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) revoked: Option<PathBuf>,
}

/// The `[portal_server]` table.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PortalServerConfig {
    /// Where its records live.
    pub(crate) data: PathBuf,
    /// UDP address shells attach to.
    pub(crate) listen: SocketAddr,
    /// TCP address of the API over HTTPS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) https: Option<SocketAddr>,
    /// TCP address of the API over plain HTTP (loopback).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) http: Option<SocketAddr>,
    /// More host names the API answers to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) names: Vec<String>,
    /// The portal's certificate.
    pub(crate) cert: PathBuf,
    /// Its private key.
    pub(crate) key: PathBuf,
    /// The revocation list: certificates it names are refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) revoked: Option<PathBuf>,
}

/// A loaded configuration and the directory its relative paths start from.
#[derive(Debug, Clone)]
pub(crate) struct Loaded {
    /// The file it came from.
    pub(crate) path: PathBuf,
    /// Its contents.
    pub(crate) config: Config,
}

impl Config {
    /// Writes the configuration to `path`, with a header saying where it came from.
    pub(crate) fn save(&self, path: &Path, by: &str) -> Result<()> {
        let text = format!(
            "# molt client configuration, written by `{by}`.\n\
             # Relative paths are relative to this file. Keys are documented in README.md.\n{}",
            toml::to_string(self).context("cannot encode molt.toml")?
        );
        let tmp = path.with_extension("toml.tmp");
        std::fs::write(&tmp, text).with_context(|| format!("cannot write `{}`", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("cannot write `{}`", path.display()))
    }
}

/// The configuration in `dir` when none is named: `molt.toml`, else the one
/// `molt up` wrote in `molt-local/`. Without either, the error says how to get
/// one — and that `molt init` makes a new cluster, whose certificates a running
/// `molt up` cluster does not accept.
fn discover(dir: &Path) -> Result<PathBuf> {
    let candidates = [dir.join(CONFIG_FILE), dir.join(UP_DIR).join(CONFIG_FILE)];
    if let Some(found) = candidates.iter().find(|p| p.exists()) {
        // Shown relative to the working directory, as the user would type it.
        return Ok(found.strip_prefix(".").unwrap_or(found).to_path_buf());
    }
    bail!(
        "no molt configuration: neither ./{CONFIG_FILE} nor ./{UP_DIR}/{CONFIG_FILE} exists. \
         To use a cluster `molt up` started, run from the directory it ran in or pass \
         --config DIR/{UP_DIR}/{CONFIG_FILE} (or set MOLT_CONFIG); `molt init` makes a \
         new cluster of your own, with its own CA that a running `molt up` does not trust"
    )
}

impl Loaded {
    /// Reads the configuration from `explicit`, else `$MOLT_CONFIG` (clap passes it
    /// in `explicit`), else `./molt.toml`, else `./molt-local/molt.toml`.
    pub(crate) fn read(explicit: Option<&Path>) -> Result<Self> {
        let path = match explicit {
            Some(path) => path.to_path_buf(),
            None => discover(Path::new("."))?,
        };
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "cannot read the molt configuration `{}` (pass another with --config)",
                path.display()
            )
        })?;
        let config: Config = toml::from_str(&text)
            .with_context(|| format!("invalid configuration `{}`", path.display()))?;
        Ok(Self { path, config })
    }

    /// `p` resolved against the configuration file's directory.
    pub(crate) fn resolve(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_owned()
        } else {
            self.path.parent().unwrap_or_else(|| Path::new(".")).join(p)
        }
    }

    /// This user's credentials.
    pub(crate) fn credentials(&self) -> Result<Credentials> {
        let c = &self.config;
        Credentials::load(
            &self.resolve(&c.cert),
            &self.resolve(&c.key),
            &self.resolve(&c.ca),
        )
        .context("cannot load this user's certificate")
    }

    /// The `[repo_server]` table, or a clear error.
    pub(crate) fn repo_server(&self) -> Result<&RepoServerConfig> {
        match &self.config.repo_server {
            Some(r) => Ok(r),
            None => bail!(
                "`{}` has no [repo_server] table; add one or pass --data and --listen",
                self.path.display()
            ),
        }
    }
}

impl Loaded {
    /// The `[portal_server]` table, or a clear error.
    pub(crate) fn portal_server(&self) -> Result<&PortalServerConfig> {
        match &self.config.portal_server {
            Some(p) => Ok(p),
            None => bail!(
                "`{}` has no [portal_server] table; add one (see README.md)",
                self.path.display()
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discovery_prefers_molt_toml_then_what_molt_up_wrote() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let err = discover(dir.path())
            .expect_err("nothing to find")
            .to_string();
        assert!(
            err.contains("./molt-local/molt.toml") && err.contains("molt init"),
            "{err}"
        );
        std::fs::create_dir(dir.path().join(UP_DIR)).expect("mkdir");
        std::fs::write(dir.path().join(UP_DIR).join(CONFIG_FILE), "").expect("write");
        assert_eq!(
            discover(dir.path()).expect("found"),
            dir.path().join("molt-local/molt.toml")
        );
        std::fs::write(dir.path().join(CONFIG_FILE), "").expect("write");
        assert_eq!(
            discover(dir.path()).expect("found"),
            dir.path().join("molt.toml")
        );
    }
}
