//! Untrusted bytes from an HTTP client or a service, as the HTTP front reads
//! them (`front::http1`). Parsing must return a typed error, never panic; a
//! head it accepts must be forwarded as a head that frames the body the same
//! way (or the front and the backend would disagree on where the next request
//! starts); and a chunked body must end at the same byte however the bytes are
//! split.
#![no_main]

use libfuzzer_sys::fuzz_target;
use front::http1::{Added, Chunked, parse_request, parse_response};

fuzz_target!(|data: &[u8]| {
    // With the front's own line, replacing the client's: whatever it accepts
    // must not panic.
    let own = Added {
        lines: b"X-Forwarded-For: 127.0.0.1\r\n",
        replacing: &["x-forwarded-for"],
    };
    let _ = parse_request(data, &own, &mut Vec::new());
    // Without it, the forwarded head must re-parse to the same framing (with
    // it, a head at the client limit of fields is over it when re-parsed as
    // a client's, which says nothing about framing).
    let mut out = Vec::new();
    if let Ok(Some(req)) = parse_request(data, &Added::NONE, &mut out) {
        let again = parse_request(&out, &Added::NONE, &mut Vec::new())
            .expect("a forwarded head parses")
            .expect("a forwarded head is complete");
        assert_eq!(again.consumed, out.len());
        assert_eq!((again.body, again.http10, again.upgrade), (req.body, req.http10, req.upgrade));

        let rest = &data[req.consumed..];
        let whole = Chunked::new().scan(rest);
        let split = rest.len() / 2;
        let mut parts = Chunked::new();
        let halves = parts.scan(&rest[..split]).and_then(|a| {
            if a < split { Ok(a) } else { parts.scan(&rest[split..]).map(|b| a + b) }
        });
        if let (Ok(w), Ok(h)) = (&whole, &halves) {
            assert_eq!(w, h, "the body's end depends on how it was split");
        }

        let mut forwarded = Vec::new();
        if let Ok(Some(resp)) = parse_response(rest, &req, &mut forwarded) {
            assert!(resp.consumed <= rest.len());
            assert!(forwarded.ends_with(b"\r\n\r\n"));
        }
    }
});
