//! `orders`: a sample molt service with no dependencies.
//!
//! Answers `GET /healthz` with `ok` and every other request with a JSON line naming
//! the service, its version and the commit it runs. HTTP/1.1 with keep-alive, one
//! thread per connection. Listens on 127.0.0.1:$PORT (default 8081); stops on
//! SIGTERM (the default disposition ends the process).

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};

/// Change this and push to see a new version served.
const VERSION: &str = "1";

fn main() -> std::io::Result<()> {
    let port = std::env::var("PORT").unwrap_or_else(|_| "8081".into());
    let listener = TcpListener::bind(format!("127.0.0.1:{port}"))?;
    println!("orders v{VERSION}: listening on 127.0.0.1:{port}");
    for stream in listener.incoming() {
        match stream {
            Ok(s) => {
                std::thread::spawn(move || {
                    let _ = serve(s);
                });
            }
            Err(e) => eprintln!("orders: accept failed: {e}"),
        }
    }
    Ok(())
}

/// Serves requests on one connection until the client closes it.
fn serve(stream: TcpStream) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    stream.set_nodelay(true)?;
    let mut out = stream;
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line)? == 0 {
            return Ok(());
        }
        let path = request_line.split_whitespace().nth(1).unwrap_or("/").to_owned();
        let mut close = request_line.ends_with("HTTP/1.0\r\n");
        let mut content_length = 0usize;
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header)? == 0 {
                return Ok(());
            }
            let header = header.trim_end();
            if header.is_empty() {
                break;
            }
            let lower = header.to_ascii_lowercase();
            if lower == "connection: close" {
                close = true;
            }
            if let Some(v) = lower.strip_prefix("content-length:") {
                content_length = v.trim().parse().unwrap_or(0);
            }
        }
        let mut body_in = vec![0u8; content_length];
        std::io::Read::read_exact(&mut reader, &mut body_in)?;
        let body = if path == "/healthz" {
            "ok\n".to_owned()
        } else {
            format!(
                "{{\"service\":\"orders\",\"version\":\"{VERSION}\",\"commit\":\"{}\",\"instance\":\"{}\",\"path\":\"{}\"}}\n",
                std::env::var("MOLT_COMMIT").unwrap_or_default(),
                std::env::var("MOLT_INSTANCE").unwrap_or_default(),
                path.replace('"', "")
            )
        };
        // One write per response: several small writes would wait on Nagle's
        // algorithm and delayed ACKs (tens of milliseconds per request).
        let response = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{}\r\n{}",
            body.len(),
            if close { "connection: close\r\n" } else { "" },
            body
        );
        out.write_all(response.as_bytes())?;
        out.flush()?;
        if close {
            return Ok(());
        }
    }
}
