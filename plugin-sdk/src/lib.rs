//! molt's plugin ABI: how a service compiled to a cdylib is served inside the
//! shell, and swapped there with its state.
//!
//! **The boundary.** A plugin library exports one symbol, [`ENTRY_SYMBOL`], a
//! function returning a pointer to a static [`PluginTable`]: the ABI version it
//! was built for and five `extern "C"` functions over raw byte buffers — create
//! an instance (from exported state, or empty), handle a request, export the
//! state, destroy the instance, free a buffer the plugin allocated. Nothing but
//! integers, pointers and bytes crosses: the plugin has its own copy of std and
//! its own allocator view, so every buffer goes back to the side that made it
//! ([`PluginTable::free_buffer`]). Requests and responses are bytes in the
//! layout of [`Request::encode`] and [`Response::encode`].
//!
//! **The safe side.** A plugin author implements [`Plugin`] and names the type in
//! [`export_plugin!`]. Every call is wrapped in `catch_unwind`: a panic becomes a
//! [`PANICKED`] status with its message (the shell answers that request with
//! 500), never an unwind across the boundary.
//!
//! **State.** A plugin's statics start empty on every load and are never
//! dropped, so state that must survive a swap goes through
//! [`Plugin::export_state`] and the `state` argument of [`Plugin::create`].
//!
//! This crate has no dependencies: the shell gives its source to each plugin
//! build at `.molt/plugin-sdk` in the release, so a plugin's `Cargo.toml` says
//! `molt-plugin-sdk = { path = ".molt/plugin-sdk" }`.

// The crate is an FFI boundary: every unsafe block says why it holds.
#![allow(unsafe_code)]

use std::ffi::c_void;
use std::panic::{AssertUnwindSafe, catch_unwind};

/// The ABI version this crate implements; the shell refuses any other.
pub const ABI_VERSION: u32 = 1;

/// The name of the entry function every plugin library exports.
pub const ENTRY_SYMBOL: &str = "molt_plugin_entry";

/// The call succeeded; the out buffer (if any) holds the result.
pub const OK: i32 = 0;
/// The call failed; the out buffer holds a UTF-8 message.
pub const FAILED: i32 = 1;
/// The plugin panicked; the out buffer holds the panic message.
pub const PANICKED: i32 = 2;

/// Bytes allocated by the plugin and lent to the host, which gives them back
/// through [`PluginTable::free_buffer`].
#[repr(C)]
#[derive(Debug)]
pub struct RawBuffer {
    /// The first byte (dangling when empty).
    pub ptr: *mut u8,
    /// How many bytes.
    pub len: usize,
    /// The allocation's capacity.
    pub cap: usize,
}

impl RawBuffer {
    /// No bytes.
    pub fn empty() -> Self {
        Self::from_vec(Vec::new())
    }

    /// Lends `v`'s allocation out.
    pub fn from_vec(v: Vec<u8>) -> Self {
        let mut v = std::mem::ManuallyDrop::new(v);
        Self {
            ptr: v.as_mut_ptr(),
            len: v.len(),
            cap: v.capacity(),
        }
    }

    /// The bytes, borrowed.
    ///
    /// # Safety
    /// The buffer must come from [`RawBuffer::from_vec`] and not be freed yet.
    pub unsafe fn as_slice(&self) -> &[u8] {
        // SAFETY: per the contract, ptr/len describe a live Vec's initialised bytes.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    /// Takes the allocation back.
    ///
    /// # Safety
    /// The buffer must come from [`RawBuffer::from_vec`] in this same library
    /// (the same allocator) and not be freed yet.
    pub unsafe fn into_vec(self) -> Vec<u8> {
        // SAFETY: per the contract, these are the parts of a Vec this library made.
        unsafe { Vec::from_raw_parts(self.ptr, self.len, self.cap) }
    }
}

/// Creates an instance from exported state (`state` null: none) into `*out`;
/// on failure writes a message into `*err`.
pub type CreateFn = unsafe extern "C" fn(
    state: *const u8,
    state_len: usize,
    out: *mut *mut c_void,
    err: *mut RawBuffer,
) -> i32;
/// Handles one encoded [`Request`]; writes the encoded [`Response`] (or a
/// message) into `*out`.
pub type HandleFn = unsafe extern "C" fn(
    instance: *const c_void,
    request: *const u8,
    request_len: usize,
    out: *mut RawBuffer,
) -> i32;
/// Writes the instance's state into `*out`.
pub type ExportFn = unsafe extern "C" fn(instance: *const c_void, out: *mut RawBuffer) -> i32;
/// Destroys an instance.
pub type DestroyFn = unsafe extern "C" fn(instance: *mut c_void);
/// Frees a buffer the plugin lent out.
pub type FreeFn = unsafe extern "C" fn(buffer: RawBuffer);
/// The entry symbol's type.
pub type EntryFn = unsafe extern "C" fn() -> *const PluginTable;

/// What a plugin library offers (see the crate docs).
#[repr(C)]
#[derive(Debug)]
pub struct PluginTable {
    /// The ABI version the library was built for.
    pub abi_version: u32,
    /// Creates an instance.
    pub create: CreateFn,
    /// Handles a request.
    pub handle: HandleFn,
    /// Exports an instance's state.
    pub export_state: ExportFn,
    /// Destroys an instance.
    pub destroy: DestroyFn,
    /// Frees a buffer.
    pub free_buffer: FreeFn,
}

/// What a plugin author implements. Calls may come from several threads at
/// once, so the state lives behind the plugin's own locks.
pub trait Plugin: Send + Sync + Sized + 'static {
    /// A new instance: from the previous version's exported state during a swap,
    /// or empty (`None`) on a first start. An error refuses the swap; the old
    /// version keeps serving.
    fn create(state: Option<&[u8]>) -> Result<Self, String>;
    /// Answers one request.
    fn handle(&self, request: Request) -> Response;
    /// The state to hand to the next version.
    fn export_state(&self) -> Vec<u8>;
}

/// Exports a [`Plugin`] type as this library's plugin:
/// `molt_plugin_sdk::export_plugin!(MyPlugin);`
#[macro_export]
macro_rules! export_plugin {
    ($plugin:ty) => {
        /// The plugin's entry point (see `molt_plugin_sdk`).
        #[unsafe(no_mangle)]
        pub extern "C" fn molt_plugin_entry() -> *const $crate::PluginTable {
            static TABLE: $crate::PluginTable = $crate::table::<$plugin>($crate::ABI_VERSION);
            &TABLE
        }
    };
}

/// The table for `P`, claiming ABI `version` (always [`ABI_VERSION`] but in
/// tests of the shell's refusal).
pub const fn table<P: Plugin>(version: u32) -> PluginTable {
    PluginTable {
        abi_version: version,
        create: create::<P>,
        handle: handle::<P>,
        export_state: export_state::<P>,
        destroy: destroy::<P>,
        free_buffer,
    }
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".to_owned()
    }
}

/// Silences this library's own panic hook (its copy of std has one): a panic's
/// message goes back to the shell, which logs it once, with the service's name.
/// The hook is a zero-sized closure, so loading the library again leaks nothing.
fn quiet_panics() {
    // Not in this crate's own tests, where the "plugin" shares the test
    // harness's std and its failures must still print.
    #[cfg(not(test))]
    {
        static QUIET: std::sync::Once = std::sync::Once::new();
        QUIET.call_once(|| std::panic::set_hook(Box::new(|_| {})));
    }
}

/// Runs `f`, turning a panic into [`PANICKED`] with its message in `out`.
///
/// # Safety
/// `out` must be valid for a write.
unsafe fn guarded(out: *mut RawBuffer, f: impl FnOnce() -> (i32, Vec<u8>)) -> i32 {
    quiet_panics();
    let (code, bytes) = match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(payload) => (PANICKED, panic_message(&*payload).into_bytes()),
    };
    // SAFETY: the caller gives a valid out pointer.
    unsafe { out.write(RawBuffer::from_vec(bytes)) };
    code
}

unsafe extern "C" fn create<P: Plugin>(
    state: *const u8,
    state_len: usize,
    out: *mut *mut c_void,
    err: *mut RawBuffer,
) -> i32 {
    // SAFETY: the host passes valid pointers; `state` (when not null) points to
    // `state_len` bytes it owns for the duration of the call.
    unsafe {
        guarded(err, || {
            let state = (!state.is_null()).then(|| std::slice::from_raw_parts(state, state_len));
            match P::create(state) {
                Ok(p) => {
                    out.write(Box::into_raw(Box::new(p)).cast());
                    (OK, Vec::new())
                }
                Err(e) => (FAILED, e.into_bytes()),
            }
        })
    }
}

unsafe extern "C" fn handle<P: Plugin>(
    instance: *const c_void,
    request: *const u8,
    request_len: usize,
    out: *mut RawBuffer,
) -> i32 {
    // SAFETY: `instance` came from `create::<P>` and is not destroyed while calls
    // are in flight; `request` points to `request_len` bytes the host owns.
    unsafe {
        guarded(out, || {
            let plugin = &*instance.cast::<P>();
            let bytes = std::slice::from_raw_parts(request, request_len);
            match Request::decode(bytes) {
                Ok(req) => (OK, plugin.handle(req).encode()),
                Err(e) => (FAILED, e.into_bytes()),
            }
        })
    }
}

unsafe extern "C" fn export_state<P: Plugin>(instance: *const c_void, out: *mut RawBuffer) -> i32 {
    // SAFETY: as for `handle`.
    unsafe {
        guarded(out, || {
            let plugin = &*instance.cast::<P>();
            (OK, plugin.export_state())
        })
    }
}

unsafe extern "C" fn destroy<P: Plugin>(instance: *mut c_void) {
    // SAFETY: `instance` came from `create::<P>` and nothing uses it any more. A
    // panic in a Drop is caught and dropped: there is no one to tell.
    let _ = catch_unwind(AssertUnwindSafe(|| unsafe {
        drop(Box::from_raw(instance.cast::<P>()));
    }));
}

unsafe extern "C" fn free_buffer(buffer: RawBuffer) {
    // SAFETY: the host returns a buffer this library lent it, once.
    drop(unsafe { buffer.into_vec() });
}

/// An HTTP-like request, as a plugin sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Request {
    /// `GET`, `POST`, …
    pub method: String,
    /// The path and query, e.g. `/items?x=1`.
    pub path: String,
    /// The headers, in order.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
}

/// An HTTP-like response.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// The headers, in order.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
}

impl Response {
    /// A response with a status and a text body.
    pub fn text(status: u16, body: impl Into<String>) -> Self {
        Self {
            status,
            headers: vec![("content-type".into(), "text/plain; charset=utf-8".into())],
            body: body.into().into_bytes(),
        }
    }

    /// A `200` with a JSON body (already encoded).
    pub fn json(body: impl Into<String>) -> Self {
        Self {
            status: 200,
            headers: vec![("content-type".into(), "application/json".into())],
            body: body.into().into_bytes(),
        }
    }
}

// The byte layout: every length is a u32, little-endian.
//   Request  = str method, str path, u32 n, n × (str name, str value), bytes body
//   Response = u16 status, u32 n, n × (str name, str value), bytes body
//   str = bytes holding UTF-8; bytes = u32 len, len bytes

fn put(out: &mut Vec<u8>, bytes: &[u8]) {
    let len = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&bytes[..len as usize]);
}

fn put_headers(out: &mut Vec<u8>, headers: &[(String, String)]) {
    let n = u32::try_from(headers.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&n.to_le_bytes());
    for (k, v) in headers.iter().take(n as usize) {
        put(out, k.as_bytes());
        put(out, v.as_bytes());
    }
}

/// Reads the layout above, refusing anything truncated or trailing.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err(format!(
                "truncated: {n} bytes wanted, {} left",
                self.0.len()
            ));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u32(&mut self) -> Result<u32, String> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn bytes(&mut self) -> Result<&'a [u8], String> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    fn string(&mut self) -> Result<String, String> {
        String::from_utf8(self.bytes()?.to_vec()).map_err(|_| "a string is not UTF-8".to_owned())
    }
    fn headers(&mut self) -> Result<Vec<(String, String)>, String> {
        let n = self.u32()? as usize;
        // Each header takes at least 8 bytes: bound the allocation by what is left.
        if n > self.0.len() / 8 {
            return Err(format!("{n} headers cannot fit in {} bytes", self.0.len()));
        }
        (0..n)
            .map(|_| Ok((self.string()?, self.string()?)))
            .collect()
    }
    fn end(self) -> Result<(), String> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(format!("{} trailing bytes", self.0.len()))
        }
    }
}

impl Request {
    /// The request's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + self.body.len());
        put(&mut out, self.method.as_bytes());
        put(&mut out, self.path.as_bytes());
        put_headers(&mut out, &self.headers);
        put(&mut out, &self.body);
        out
    }

    /// A request from its bytes.
    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        let mut r = Reader(bytes);
        let req = Self {
            method: r.string()?,
            path: r.string()?,
            headers: r.headers()?,
            body: r.bytes()?.to_vec(),
        };
        r.end()?;
        Ok(req)
    }
}

impl Response {
    /// The response's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + self.body.len());
        out.extend_from_slice(&self.status.to_le_bytes());
        put_headers(&mut out, &self.headers);
        put(&mut out, &self.body);
        out
    }

    /// A response from its bytes.
    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        let mut r = Reader(bytes);
        let status = r.take(2)?;
        let resp = Self {
            status: u16::from_le_bytes([status[0], status[1]]),
            headers: r.headers()?,
            body: r.bytes()?.to_vec(),
        };
        r.end()?;
        Ok(resp)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_responses_round_trip_and_bad_bytes_are_refused() {
        let req = Request {
            method: "POST".into(),
            path: "/kv/a?x=1".into(),
            headers: vec![("content-type".into(), "text/plain".into())],
            body: b"hello".to_vec(),
        };
        assert_eq!(Request::decode(&req.encode()), Ok(req.clone()));
        let resp = Response::text(201, "made");
        assert_eq!(Response::decode(&resp.encode()), Ok(resp.clone()));
        let bytes = req.encode();
        for cut in 0..bytes.len() {
            assert!(Request::decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut long = bytes.clone();
        long.push(0);
        assert!(Request::decode(&long).is_err());
        // A header count that cannot fit is refused before allocating.
        let mut huge = Vec::new();
        put(&mut huge, b"GET");
        put(&mut huge, b"/");
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(Request::decode(&huge).unwrap_err().contains("cannot fit"));
    }

    struct Counter(std::sync::atomic::AtomicU64);

    impl Plugin for Counter {
        fn create(state: Option<&[u8]>) -> Result<Self, String> {
            let n = match state {
                None => 0,
                Some(b) => u64::from_le_bytes(b.try_into().map_err(|_| "bad state")?),
            };
            Ok(Self(n.into()))
        }
        fn handle(&self, request: Request) -> Response {
            if request.path == "/panic" {
                panic!("asked to panic");
            }
            let n = self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
            Response::text(200, n.to_string())
        }
        fn export_state(&self) -> Vec<u8> {
            self.0
                .load(std::sync::atomic::Ordering::SeqCst)
                .to_le_bytes()
                .to_vec()
        }
    }

    /// Calls through the table as the shell does, within this process.
    fn call(t: &PluginTable, instance: *const c_void, path: &str) -> (i32, Vec<u8>) {
        let req = Request {
            method: "GET".into(),
            path: path.into(),
            ..Request::default()
        }
        .encode();
        let mut out = RawBuffer::empty();
        // SAFETY: a live instance of this table's type, a valid request and out.
        let code = unsafe { (t.handle)(instance, req.as_ptr(), req.len(), &mut out) };
        // SAFETY: `out` was written by the call; it is read, then given back once.
        let bytes = unsafe { out.as_slice().to_vec() };
        // SAFETY: the buffer came from this table's library (this crate).
        unsafe { (t.free_buffer)(out) };
        (code, bytes)
    }

    #[test]
    fn the_table_creates_handles_exports_and_catches_panics() {
        let t = table::<Counter>(ABI_VERSION);
        assert_eq!(t.abi_version, ABI_VERSION);
        let mut instance: *mut c_void = std::ptr::null_mut();
        let mut err = RawBuffer::empty();
        // SAFETY: valid out pointers; no state.
        let code = unsafe { (t.create)(std::ptr::null(), 0, &mut instance, &mut err) };
        // SAFETY: given back once.
        unsafe { (t.free_buffer)(err) };
        assert_eq!(code, OK);
        for want in ["1", "2"] {
            let (code, bytes) = call(&t, instance, "/");
            assert_eq!(code, OK);
            assert_eq!(Response::decode(&bytes).unwrap().body, want.as_bytes());
        }
        let (code, bytes) = call(&t, instance, "/panic");
        assert_eq!(code, PANICKED);
        assert_eq!(String::from_utf8(bytes).unwrap(), "asked to panic");
        // Still serving after the panic.
        assert_eq!(call(&t, instance, "/").0, OK);

        // Export, and a new instance from the state carries on counting.
        let mut out = RawBuffer::empty();
        // SAFETY: a live instance and a valid out pointer.
        assert_eq!(unsafe { (t.export_state)(instance, &mut out) }, OK);
        // SAFETY: read, then given back once.
        let state = unsafe { out.as_slice().to_vec() };
        unsafe { (t.free_buffer)(out) };
        // SAFETY: created by this table, used no more.
        unsafe { (t.destroy)(instance) };
        let mut next: *mut c_void = std::ptr::null_mut();
        let mut err = RawBuffer::empty();
        // SAFETY: `state` outlives the call; valid out pointers.
        let code = unsafe { (t.create)(state.as_ptr(), state.len(), &mut next, &mut err) };
        unsafe { (t.free_buffer)(err) };
        assert_eq!(code, OK);
        let (_, bytes) = call(&t, next, "/");
        assert_eq!(Response::decode(&bytes).unwrap().body, b"4");
        // Bad state: a clear failure.
        let mut bad: *mut c_void = std::ptr::null_mut();
        let mut err = RawBuffer::empty();
        // SAFETY: valid pointers.
        let code = unsafe { (t.create)(b"x".as_ptr(), 1, &mut bad, &mut err) };
        let msg = unsafe { err.as_slice().to_vec() };
        unsafe { (t.free_buffer)(err) };
        assert_eq!((code, msg.as_slice()), (FAILED, &b"bad state"[..]));
        unsafe { (t.destroy)(next) };
    }
}
