//! The real `molt` binary against a real `molt portal` and `molt repo-server`
//! made by `molt init`: the CLI reaches the portal over HTTPS with the user
//! certificate `molt init` issued (no token), adds a user with a password from
//! standard input, and `molt cert revoke` makes both servers refuse the
//! revoked certificate from their next connection.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Output, Stdio};

use common::{Cluster, MOLT, signal};

/// Starts `molt portal` on fresh ports; the child and its HTTPS URL.
fn start_portal(c: &Cluster) -> (Child, String) {
    let mut child = Command::new(MOLT)
        .arg("--config")
        .arg(c.config())
        .arg("--repo")
        .arg(c.addr.unwrap().to_string())
        .args([
            "portal",
            "--listen",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
            "--https",
            "127.0.0.1:0",
        ])
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let url = loop {
        let line = lines
            .next()
            .expect("the portal says where it listens")
            .unwrap();
        if let Some(rest) = line.split("API on ").nth(1) {
            break rest.split(' ').next().unwrap().to_owned();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    (child, url)
}

/// `molt --portal-url URL ARGS` without `$MOLT_TOKEN`, with `stdin`.
fn molt(c: &Cluster, url: &str, args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(MOLT)
        .env_remove("MOLT_TOKEN")
        .env("XDG_CACHE_HOME", c.dir.path().join("cache"))
        .arg("--config")
        .arg(c.config())
        .arg("--repo")
        .arg(c.addr.unwrap().to_string())
        .arg("--portal-url")
        .arg(url)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_cli_uses_its_certificate_over_https_and_revoked_certificates_are_refused() {
    let c = Cluster::init();
    let toml = std::fs::read_to_string(c.config()).unwrap();
    for line in [
        "portal = \"https://127.0.0.1:7881\"",
        "https = \"127.0.0.1:7881\"",
        "http = \"127.0.0.1:7880\"",
        "revoked = \"certs/revoked.txt\"",
    ] {
        assert!(toml.contains(line), "molt init writes {line}:\n{toml}");
    }
    let (mut portal, url) = start_portal(&c);
    assert!(url.starts_with("https://127.0.0.1:"), "{url}");

    // The admin certificate of `molt init` is the portal's first admin.
    let users = ok(&molt(&c, &url, &["user", "list", "--json"], ""));
    assert!(users.contains("\"admin\""), "{users}");
    ok(&molt(
        &c,
        &url,
        &[
            "user",
            "add",
            "ada",
            "--grant",
            "deployer",
            "--password-stdin",
        ],
        "ada's password\n",
    ));
    let out = ok(&molt(
        &c,
        &url,
        &["user", "add", "bob", "--grant", "developer"],
        "",
    ));
    assert!(out.contains("password (shown once"), "{out}");
    let users = ok(&molt(&c, &url, &["user", "list", "--json"], ""));
    assert!(
        users.contains("\"ada\"") && !users.contains("argon2"),
        "{users}"
    );

    // Revoke the admin's certificate: the portal and the repository refuse it.
    let cert = c.dir.path().join("certs/admin.crt");
    let cert = cert.to_str().unwrap();
    let out = ok(&molt(&c, &url, &["cert", "revoke", cert], ""));
    assert!(out.contains("revoked serial"), "{out}");
    let list = std::fs::read_to_string(c.dir.path().join("certs/revoked.txt")).unwrap();
    assert_eq!(list.lines().count(), 1, "{list}");
    let out = molt(&c, &url, &["user", "list"], "");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("revoked"), "{err}");
    let out = molt(&c, &url, &["log", "anything"], "");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("revoked"),
        "the repository refuses it too: {err}"
    );
    // Revoking it again changes nothing.
    let out = ok(&molt(&c, &url, &["cert", "revoke", cert], ""));
    assert!(out.contains("revoked already"), "{out}");

    assert!(signal(&mut portal, "-TERM").success());
}
