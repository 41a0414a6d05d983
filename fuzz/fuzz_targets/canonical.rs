//! Untrusted canonical encodings (trees, commits, images): decoding never panics,
//! and whatever decodes re-encodes to exactly the input.
#![no_main]

use image_spec::{Commit, Image, Tree};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(t) = Tree::decode(data) {
        assert_eq!(t.encode(), data);
    }
    if let Ok(c) = Commit::decode(data) {
        assert_eq!(c.encode(), data);
    }
    if let Ok(i) = Image::decode(data) {
        assert_eq!(i.encode(), data);
    }
});
