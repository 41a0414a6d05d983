//! Inspect a service directory the way `molt push` will see it: parse its
//! `service.toml`, scan it (honouring `.moltignore`), and print the tree and its id.
//!
//! ```text
//! cargo run -p image-spec --example inspect -- examples/hello [--files]
//! ```

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use image_spec::{MANIFEST_FILE, Mode, ServiceManifest, manifest::ServiceKind, scan_dir};

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let Some(dir) = args.next().map(PathBuf::from) else {
        eprintln!("usage: inspect DIR [--files]");
        return ExitCode::from(2);
    };
    let list_files = args.any(|a| a == "--files");

    let manifest_path = dir.join(MANIFEST_FILE);
    let manifest = match std::fs::read_to_string(&manifest_path) {
        Ok(text) => match ServiceManifest::parse(&text) {
            Ok(m) => m,
            Err(e) => {
                eprintln!("error: {}: {e}", manifest_path.display());
                return ExitCode::FAILURE;
            }
        },
        Err(e) => {
            eprintln!("error: cannot read {}: {e}", manifest_path.display());
            return ExitCode::FAILURE;
        }
    };

    let started = Instant::now();
    let scanned = match scan_dir(&dir) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let elapsed = started.elapsed();
    let tree = &scanned.tree;

    println!("service   {}", manifest.name());
    match manifest.kind() {
        ServiceKind::Process { command } => println!("kind      process: {command}"),
        ServiceKind::Plugin { library } => println!("kind      plugin: {library}"),
    }
    if let Some(build) = manifest.build() {
        println!("build     {} (timeout {:?})", build.command, build.timeout);
    }
    for port in manifest.ports() {
        println!(
            "port      {} {} ({:?})",
            port.name, port.port, port.protocol
        );
    }
    println!("health    {:?}", manifest.health().probe);
    println!("tree      {}", tree.id());
    println!(
        "files     {} ({} bytes, {} distinct blobs), scanned in {:.1} ms",
        tree.len(),
        tree.total_size(),
        scanned.sources.len(),
        elapsed.as_secs_f64() * 1e3
    );
    if list_files {
        for e in tree.entries() {
            let mode = match e.mode() {
                Mode::Regular => "file",
                Mode::Executable => "exec",
                Mode::Symlink => "link",
            };
            let extra = e
                .link_target()
                .map(|t| format!(" -> {t}"))
                .unwrap_or_default();
            println!(
                "  {mode} {:>10} {} {}{extra}",
                e.size(),
                e.blob().short(12),
                e.path()
            );
        }
    }
    ExitCode::SUCCESS
}
