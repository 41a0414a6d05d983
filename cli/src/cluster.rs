//! Setting a cluster up and running its daemons: `molt init`, `molt cert issue`,
//! `molt repo-server`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use wire::{ClusterCa, Credentials, Identity};

use crate::config::{CONFIG_FILE, Config, Loaded, RepoServerConfig};

/// `molt init DIR`: the CA, the repo-server, portal and admin certificates, molt.toml.
pub(crate) fn init(dir: &Path, name: &str, repo_listen: SocketAddr, json: bool) -> Result<()> {
    let written = create(dir, name, repo_listen)?;
    let config_path = dir.join(CONFIG_FILE);
    if json {
        let files: Vec<String> = written.iter().map(|p| p.display().to_string()).collect();
        println!(
            "{}",
            serde_json::json!({ "config": config_path.display().to_string(), "files": files })
        );
    } else {
        println!("created cluster `{name}` in {}", dir.display());
        for f in &written {
            println!("  {}", f.display());
        }
        println!("next: molt --config {} repo-server", config_path.display());
    }
    Ok(())
}

/// Creates a cluster in `dir`: the CA, the repo-server, portal and admin
/// certificates, and molt.toml (written last, so a directory with molt.toml holds
/// a whole cluster). Returns the files written.
pub(crate) fn create(dir: &Path, name: &str, repo_listen: SocketAddr) -> Result<Vec<PathBuf>> {
    let config_path = dir.join(CONFIG_FILE);
    if config_path.exists() {
        bail!(
            "`{}` exists already; this directory holds a cluster (remove it to start over)",
            config_path.display()
        );
    }
    let certs = dir.join("certs");
    if certs.join(wire::pki::CA_KEY_FILE).exists() {
        bail!("`{}` already holds a CA", certs.display());
    }
    let ca = ClusterCa::generate(name).context("cannot create the cluster CA")?;
    ca.write(&certs).context("cannot write the cluster CA")?;
    let mut written = vec![
        certs.join(wire::pki::CA_CERT_FILE),
        certs.join(wire::pki::CA_KEY_FILE),
    ];
    for (identity, stem) in [
        (Identity::RepoServer, "repo-server"),
        (Identity::Portal, "portal"),
        ("user/admin/admin".parse()?, "admin"),
    ] {
        let files = ca
            .issue(&identity)
            .and_then(|c| c.write(&certs, stem))
            .with_context(|| format!("cannot issue the {identity} certificate"))?;
        written.push(files.cert);
        written.push(files.key);
    }
    let config = Config {
        repo: repo_listen,
        cert: "certs/admin.crt".into(),
        key: "certs/admin.key".into(),
        ca: "certs/ca.crt".into(),
        ca_key: Some("certs/ca.key".into()),
        repo_server: Some(RepoServerConfig {
            data: "repo".into(),
            listen: repo_listen,
            cert: "certs/repo-server.crt".into(),
            key: "certs/repo-server.key".into(),
            revoked: Some(revoked_list()),
        }),
        portal: Some(format!("https://{}", crate::config::DEFAULT_PORTAL_HTTPS)),
        portal_token: Some("portal/admin.token".into()),
        portal_server: Some(crate::config::PortalServerConfig {
            data: "portal".into(),
            listen: crate::config::DEFAULT_PORTAL_LISTEN,
            https: Some(crate::config::DEFAULT_PORTAL_HTTPS),
            http: Some(crate::config::DEFAULT_PORTAL_HTTP),
            names: Vec::new(),
            cert: "certs/portal.crt".into(),
            key: "certs/portal.key".into(),
            revoked: Some(revoked_list()),
        }),
        instances: Default::default(),
    };
    config.save(&config_path, "molt init")?;
    written.push(config_path);
    Ok(written)
}

/// Where `molt init` puts the revocation list (relative to molt.toml).
fn revoked_list() -> PathBuf {
    Path::new("certs").join(wire::revocation::REVOKED_FILE)
}

/// `molt cert revoke FILE.crt|SERIAL`: appends the certificate's serial number
/// to the revocation list beside the CA (`certs/revoked.txt`).
pub(crate) fn revoke(config: Option<&Path>, what: &str, json: bool) -> Result<()> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let loaded = Loaded::read(config)?;
    let path = Path::new(what);
    let (serial, identity) = if path.is_file() {
        let der = CertificateDer::from_pem_file(path)
            .with_context(|| format!("`{what}` is not a PEM certificate"))?;
        let serial = wire::pki::serial_of(&der)
            .with_context(|| format!("cannot read the serial number of `{what}`"))?;
        let identity = Identity::from_certificate(&der).ok();
        (serial, identity)
    } else {
        let serial = wire::revocation::parse_serial(what).with_context(|| {
            format!("`{what}` is neither a certificate file nor a serial number")
        })?;
        (serial, None)
    };
    let list = certs_dir(&loaded).join(wire::revocation::REVOKED_FILE);
    let added = wire::revocation::append(&list, &serial)
        .with_context(|| format!("cannot write `{}`", list.display()))?;
    let hex = wire::revocation::serial_hex(&serial);
    if json {
        println!(
            "{}",
            serde_json::json!({
                "serial": hex,
                "identity": identity.as_ref().map(ToString::to_string),
                "list": list.display().to_string(),
                "added": added,
            })
        );
    } else {
        let who = identity.map(|i| format!(" ({i})")).unwrap_or_default();
        if added {
            println!("revoked serial {hex}{who} in {}", list.display());
        } else {
            println!("serial {hex}{who} was revoked already");
        }
        println!(
            "  the repository server and the portal refuse it from their next connection              (when configured with `revoked = \"{}\"`)",
            list.display()
        );
    }
    Ok(())
}

/// The cluster CA of a configuration that holds its key.
fn load_ca(loaded: &Loaded) -> Result<ClusterCa> {
    let ca_key = loaded.config.ca_key.as_ref().with_context(|| {
        format!(
            "`{}` has no `ca_key`: only a holder of the CA key can issue certificates",
            loaded.path.display()
        )
    })?;
    let read = |p: &Path| {
        std::fs::read_to_string(p).with_context(|| format!("cannot read `{}`", p.display()))
    };
    ClusterCa::from_pem(
        &read(&loaded.resolve(&loaded.config.ca))?,
        &read(&loaded.resolve(ca_key))?,
    )
    .context("cannot load the cluster CA")
}

/// The directory certificates go to by default: the CA certificate's.
pub(crate) fn certs_dir(loaded: &Loaded) -> PathBuf {
    loaded
        .resolve(&loaded.config.ca)
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

/// Issues a shell's certificate into the certificates directory, unless it is
/// there already; returns its credentials.
pub(crate) fn shell_credentials(loaded: &Loaded, instance: &str) -> Result<Credentials> {
    let (identity, stem) = identity_for("shell", Some(instance), None)?;
    let dir = certs_dir(loaded);
    let (cert, key) = (
        dir.join(format!("{stem}.crt")),
        dir.join(format!("{stem}.key")),
    );
    if !cert.exists() || !key.exists() {
        load_ca(loaded)?
            .issue(&identity)?
            .write(&dir, &stem)
            .with_context(|| format!("cannot write the certificate for {identity}"))?;
    }
    Credentials::load(&cert, &key, &loaded.resolve(&loaded.config.ca))
        .with_context(|| format!("cannot load the certificate of {identity}"))
}

/// `molt cert issue`: a certificate for a role and name, from the cluster CA.
pub(crate) fn issue(
    config: Option<&Path>,
    role: &str,
    name: Option<&str>,
    grant: Option<&str>,
    out: Option<PathBuf>,
    json: bool,
) -> Result<()> {
    let loaded = Loaded::read(config)?;
    let ca = load_ca(&loaded)?;
    let (identity, stem) = identity_for(role, name, grant)?;
    let out = out.unwrap_or_else(|| certs_dir(&loaded));
    let creds: Credentials = ca.issue(&identity)?;
    let files = creds
        .write(&out, &stem)
        .with_context(|| format!("cannot write the certificate for {identity}"))?;
    if json {
        println!(
            "{}",
            serde_json::json!({
                "identity": identity.to_string(),
                "cert": files.cert.display().to_string(),
                "key": files.key.display().to_string(),
                "ca": files.ca.display().to_string(),
            })
        );
    } else {
        println!("issued {identity}");
        println!("  certificate {}", files.cert.display());
        println!("  key         {} (mode 0600)", files.key.display());
    }
    Ok(())
}

/// The identity and file stem for `--role/--name/--grant`.
fn identity_for(role: &str, name: Option<&str>, grant: Option<&str>) -> Result<(Identity, String)> {
    let need_name = || name.with_context(|| format!("--role {role} needs --name"));
    let text = match role {
        "repo-server" | "portal" => role.to_owned(),
        "shell" => format!("shell/{}", need_name()?),
        "user" => {
            let grant =
                grant.context("--role user needs --grant (developer, deployer or admin)")?;
            format!("user/{}/{grant}", need_name()?)
        }
        other => bail!("unknown role `{other}` (expected repo-server, portal, shell or user)"),
    };
    if grant.is_some() && role != "user" {
        bail!("--grant applies to users only");
    }
    let identity: Identity = text.parse()?;
    let stem = match &identity {
        Identity::Shell { instance } => format!("shell-{instance}"),
        Identity::User { name, .. } => format!("user-{name}"),
        other => other.role().to_owned(),
    };
    Ok((identity, stem))
}

/// `molt repo-server`: serves until SIGINT or SIGTERM, then shuts down gracefully.
/// `molt fsck`: checks (and with `repair` repairs) a repository's data
/// directory or an instance's root, prints what it found, and fails when
/// something is wrong (after a repair: when something is lost).
pub(crate) fn fsck(
    config: Option<&Path>,
    data: Option<PathBuf>,
    root: Option<PathBuf>,
    repair: bool,
) -> Result<()> {
    let (checked, problems, repaired, lost, lost_hint) = match root {
        Some(root) => {
            let r = shell::fsck::fsck(&root, repair)
                .with_context(|| format!("cannot check the instance in {}", root.display()))?;
            (
                format!(
                    "the instance in {}: {} journal records, {} release files, {} cache blobs",
                    root.display(),
                    r.journal_records,
                    r.files,
                    r.blobs
                ),
                r.problems,
                r.repaired,
                r.lost,
                "lost",
            )
        }
        None => {
            let data = match data {
                Some(d) => d,
                None => {
                    let loaded = Loaded::read(config)?;
                    loaded.resolve(&loaded.repo_server()?.data)
                }
            };
            let r = repo_server::fsck::fsck(&data, repair)
                .with_context(|| format!("cannot check the repository in {}", data.display()))?;
            (
                format!(
                    "the repository in {}: {} journal records, {} objects, {} blobs",
                    data.display(),
                    r.journal_records,
                    r.objects,
                    r.blobs
                ),
                r.problems,
                r.repaired,
                r.lost,
                "lost (push it again to restore it)",
            )
        }
    };
    println!("checked {checked}");
    for (heading, lines) in [
        ("wrong", &problems),
        ("repaired", &repaired),
        (lost_hint, &lost),
    ] {
        if !lines.is_empty() {
            println!("{heading}:");
            for line in lines {
                println!("  {line}");
            }
        }
    }
    if problems.is_empty() {
        println!("nothing is wrong");
    } else if !repair {
        println!("run `molt fsck --repair` to repair it");
    }
    let failed = if repair {
        !lost.is_empty()
    } else {
        !problems.is_empty()
    };
    if failed {
        std::process::exit(1);
    }
    Ok(())
}

pub(crate) async fn repo_server(
    config: Option<&Path>,
    data: Option<PathBuf>,
    listen: Option<SocketAddr>,
) -> Result<()> {
    let loaded = Loaded::read(config)?;
    let section = loaded.repo_server()?;
    let credentials = Credentials::load(
        &loaded.resolve(&section.cert),
        &loaded.resolve(&section.key),
        &loaded.resolve(&loaded.config.ca),
    )
    .context("cannot load the repository server's certificate")?;
    let config = repo_server::Config {
        data: data.unwrap_or_else(|| loaded.resolve(&section.data)),
        listen: listen.unwrap_or(section.listen),
        credentials,
        revoked: section.revoked.as_ref().map(|p| loaded.resolve(p)),
    };
    let bound = repo_server::bind(&config)
        .with_context(|| format!("cannot start the repository server on {}", config.listen))?;
    let addr = bound.local_addr()?;
    let (shutdown, waiter) = crate::signals::shutdown_on_signals()?;
    eprintln!(
        "repository server listening on {addr} (data in {})",
        config.data.display()
    );
    bound.serve(shutdown).await;
    waiter.abort();
    eprintln!("repository server stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_map_to_identities_and_file_names() {
        let (id, stem) = identity_for("shell", Some("dev-1"), None).unwrap();
        assert_eq!(
            (id.to_string(), stem.as_str()),
            ("shell/dev-1".into(), "shell-dev-1")
        );
        let (id, stem) = identity_for("user", Some("ada"), Some("deployer")).unwrap();
        assert_eq!(
            (id.to_string(), stem.as_str()),
            ("user/ada/deployer".into(), "user-ada")
        );
        assert!(identity_for("user", Some("ada"), None).is_err());
        assert!(identity_for("shell", None, None).is_err());
        assert!(identity_for("root", Some("x"), None).is_err());
        assert!(identity_for("shell", Some("x"), Some("admin")).is_err());
    }
}
