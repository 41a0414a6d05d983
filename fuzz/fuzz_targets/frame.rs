//! Untrusted bytes from a peer, as the servers read them: a frame holding a
//! repository request or a hello. Decoding must return a typed error, never panic,
//! and whatever decodes must encode again.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wire::codec::{DEFAULT_FRAME_LIMIT, decode_frame, encode_frame};
use wire::hello::Hello;
use wire::repo::{RepoReply, RepoRequest};

fuzz_target!(|data: &[u8]| {
    if let Ok((req, _)) = decode_frame::<RepoRequest>(data, DEFAULT_FRAME_LIMIT) {
        encode_frame(&req, usize::MAX).expect("a decoded request encodes");
    }
    let _ = decode_frame::<RepoReply>(data, DEFAULT_FRAME_LIMIT);
    let _ = decode_frame::<Hello>(data, 4096);
});
