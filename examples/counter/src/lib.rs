//! The `counter` sample plugin: served inside the shell, swapped with its state.
//!
//! - `GET /` counts the hit and answers `{"service":"counter","version":…,"hits":N}`;
//! - `PUT /kv/KEY` stores the body under KEY, `GET /kv/KEY` answers it;
//! - `GET /healthz` answers `ok`; `GET /panic` panics (the shell answers 500 and
//!   keeps serving).
//!
//! The hits and the map survive a swap to a new version: `export_state` writes
//! them out and the next version's `create` reads them back.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use molt_plugin_sdk::{Plugin, Request, Response, export_plugin};

/// Shown in every answer; change it to see a swap.
const VERSION: &str = "1";

struct Counter {
    hits: AtomicU64,
    kv: Mutex<BTreeMap<String, Vec<u8>>>,
}

// State layout: u64 hits, u32 n, n × (u32 len, key, u32 len, value), little-endian.

fn take<'a>(bytes: &mut &'a [u8], n: usize) -> Result<&'a [u8], String> {
    if bytes.len() < n {
        return Err("state is truncated".into());
    }
    let (head, rest) = bytes.split_at(n);
    *bytes = rest;
    Ok(head)
}

fn take_u32(bytes: &mut &[u8]) -> Result<usize, String> {
    let b = take(bytes, 4)?;
    Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
}

impl Plugin for Counter {
    fn create(state: Option<&[u8]>) -> Result<Self, String> {
        let mut hits = 0;
        let mut kv = BTreeMap::new();
        if let Some(mut bytes) = state {
            let h = take(&mut bytes, 8)?;
            hits = u64::from_le_bytes(h.try_into().map_err(|_| "bad hits")?);
            for _ in 0..take_u32(&mut bytes)? {
                let klen = take_u32(&mut bytes)?;
                let key = String::from_utf8(take(&mut bytes, klen)?.to_vec())
                    .map_err(|_| "a key is not UTF-8")?;
                let vlen = take_u32(&mut bytes)?;
                kv.insert(key, take(&mut bytes, vlen)?.to_vec());
            }
        }
        Ok(Self {
            hits: AtomicU64::new(hits),
            kv: Mutex::new(kv),
        })
    }

    fn handle(&self, request: Request) -> Response {
        let path = request.path.split('?').next().unwrap_or("/");
        match (request.method.as_str(), path) {
            ("GET", "/healthz") => Response::text(200, "ok\n"),
            ("GET", "/panic") => panic!("counter was asked to panic"),
            ("GET", "/") => {
                let hits = self.hits.fetch_add(1, Ordering::SeqCst) + 1;
                Response::json(format!(
                    "{{\"service\":\"counter\",\"version\":\"{VERSION}\",\"hits\":{hits}}}\n"
                ))
            }
            (method, p) if p.starts_with("/kv/") => {
                let key = p["/kv/".len()..].to_owned();
                let Ok(mut kv) = self.kv.lock() else {
                    return Response::text(500, "state lock poisoned\n");
                };
                match method {
                    "PUT" | "POST" => {
                        kv.insert(key, request.body);
                        Response::text(204, "")
                    }
                    "GET" => match kv.get(&key) {
                        Some(v) => Response {
                            status: 200,
                            headers: vec![],
                            body: v.clone(),
                        },
                        None => Response::text(404, "no such key\n"),
                    },
                    _ => Response::text(405, "GET or PUT\n"),
                }
            }
            _ => Response::text(404, "not found\n"),
        }
    }

    fn export_state(&self) -> Vec<u8> {
        let mut out = self.hits.load(Ordering::SeqCst).to_le_bytes().to_vec();
        let kv = self.kv.lock().map(|kv| kv.clone()).unwrap_or_default();
        out.extend_from_slice(&(kv.len() as u32).to_le_bytes());
        for (k, v) in &kv {
            out.extend_from_slice(&(k.len() as u32).to_le_bytes());
            out.extend_from_slice(k.as_bytes());
            out.extend_from_slice(&(v.len() as u32).to_le_bytes());
            out.extend_from_slice(v);
        }
        out
    }
}

export_plugin!(Counter);
