//! The pages' static files, built into the binary: htmx 2 and its SSE
//! extension (vendored from npm, minified, with their licence headers),
//! molt's stylesheet and script.
//!
//! Each is served at `/assets/<first 12 hex of its blake3>/<file>` with
//! `Cache-Control: public, max-age=31536000, immutable`: a changed file gets
//! a new URL, so a browser never keeps a stale one and never asks twice. A
//! URL with another hash (a page rendered by an older portal) is a 404.

use std::sync::LazyLock;

use axum::extract::Path;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

/// One built-in file.
struct Asset {
    file: &'static str,
    mime: &'static str,
    bytes: &'static [u8],
}

const ASSETS: [Asset; 4] = [
    Asset {
        file: "htmx-2.0.11.min.js",
        mime: "text/javascript; charset=utf-8",
        bytes: include_bytes!("../../assets/htmx-2.0.11.min.js"),
    },
    Asset {
        file: "htmx-ext-sse-2.2.4.min.js",
        mime: "text/javascript; charset=utf-8",
        bytes: include_bytes!("../../assets/htmx-ext-sse-2.2.4.min.js"),
    },
    Asset {
        file: "molt.js",
        mime: "text/javascript; charset=utf-8",
        bytes: include_bytes!("../../assets/molt.js"),
    },
    Asset {
        file: "molt.css",
        mime: "text/css; charset=utf-8",
        bytes: include_bytes!("../../assets/molt.css"),
    },
];

fn hash_of(bytes: &[u8]) -> String {
    blake3::hash(bytes).to_hex()[..12].to_owned()
}

/// The URL of each asset, as pages link them.
#[derive(Debug)]
pub struct Urls {
    /// htmx.
    pub htmx: String,
    /// htmx's SSE extension.
    pub sse: String,
    /// molt's script.
    pub js: String,
    /// molt's stylesheet.
    pub css: String,
    hashes: Vec<String>,
}

static URLS: LazyLock<Urls> = LazyLock::new(|| {
    let hashes: Vec<String> = ASSETS.iter().map(|a| hash_of(a.bytes)).collect();
    let url = |i: usize| format!("/assets/{}/{}", hashes[i], ASSETS[i].file);
    Urls {
        htmx: url(0),
        sse: url(1),
        js: url(2),
        css: url(3),
        hashes,
    }
});

/// The assets' URLs.
pub fn urls() -> &'static Urls {
    &URLS
}

/// `GET /assets/{hash}/{file}`.
pub(crate) async fn serve(Path((hash, file)): Path<(String, String)>) -> Response {
    let urls = urls();
    let found = ASSETS
        .iter()
        .zip(&urls.hashes)
        .find(|(a, h)| a.file == file && **h == hash);
    match found {
        Some((asset, _)) => (
            [
                (header::CONTENT_TYPE, HeaderValue::from_static(asset.mime)),
                (
                    header::CACHE_CONTROL,
                    HeaderValue::from_static("public, max-age=31536000, immutable"),
                ),
            ],
            asset.bytes,
        )
            .into_response(),
        None => (StatusCode::NOT_FOUND, "no such asset").into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_carry_the_content_hash_and_the_vendored_files_their_licence() {
        let u = urls();
        assert!(u.htmx.ends_with("/htmx-2.0.11.min.js"), "{}", u.htmx);
        assert_eq!(u.htmx.split('/').nth(2).map(str::len), Some(12));
        for a in &ASSETS[..2] {
            let head = std::str::from_utf8(&a.bytes[..200]).unwrap();
            assert!(head.starts_with("/*!") && head.contains("BSD"), "{head}");
        }
    }
}
