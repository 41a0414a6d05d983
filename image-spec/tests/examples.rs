//! Every sample service under `examples/` is a valid service: its `service.toml`
//! parses, names the directory it lives in, and the directory scans into a tree
//! that holds the manifest.

// Test helpers outside #[test] functions unwrap too: a panic is a failed test.
#![allow(clippy::unwrap_used)]

use std::path::Path;

use image_spec::{MANIFEST_FILE, RelPath, ServiceManifest, ServiceName, scan_dir};

#[test]
fn every_example_service_is_valid() {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut seen = 0;
    for entry in std::fs::read_dir(&examples).unwrap() {
        let dir = entry.unwrap().path();
        let manifest_path = dir.join(MANIFEST_FILE);
        if !manifest_path.is_file() {
            continue;
        }
        let text = std::fs::read_to_string(&manifest_path).unwrap();
        let manifest = ServiceManifest::parse(&text)
            .unwrap_or_else(|e| panic!("{}: {e}", manifest_path.display()));
        let dir_name = dir.file_name().unwrap().to_str().unwrap();
        manifest
            .check_service(&ServiceName::new(dir_name).unwrap())
            .unwrap();
        let scanned = scan_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        assert!(
            scanned
                .tree
                .get(&RelPath::new(MANIFEST_FILE).unwrap())
                .is_some()
        );
        seen += 1;
    }
    assert!(
        seen >= 1,
        "no example services found in {}",
        examples.display()
    );
}
