//! The canonical byte encodings that ids are computed from.
//!
//! An id must not depend on a serde library's version or settings, so trees, commits
//! and images are hashed over a small hand-written format that is fixed here and
//! pinned by golden tests (`tests/golden.rs`). Any change to these bytes changes every
//! id in every repository: it needs a new version byte, never an edit in place.
//!
//! Primitives (all little-endian):
//!
//! | item     | bytes |
//! |----------|-------|
//! | header   | ASCII magic (`molt-tree`, `molt-commit`, `molt-image`), then one version byte (`1`) |
//! | `u8`     | 1 byte |
//! | `u32`    | 4 bytes |
//! | `u64`    | 8 bytes |
//! | `i64`    | 8 bytes, two's complement |
//! | `id`     | the 32 raw bytes of a blake3 hash |
//! | `str`    | `u32` byte length, then that many UTF-8 bytes |
//!
//! The layouts of each object are documented next to their type:
//! [`Tree`](crate::Tree), [`Commit`](crate::Commit), [`Image`](crate::Image).
//!
//! Decoding is strict: the input must be exactly one encoding (no trailing bytes),
//! every length is bounded before anything is allocated, and the decoded value must
//! re-encode to the same bytes (so one value has one encoding and one id). Every
//! failure is a [`DecodeError`]; no input panics.

/// Why bytes are not a canonical encoding.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The bytes do not start with the expected magic.
    #[error("not a molt {kind} encoding (bad magic)")]
    BadMagic {
        /// `tree`, `commit` or `image`.
        kind: &'static str,
    },
    /// The version byte is one this build does not know.
    #[error("molt {kind} encoding version {version} is not supported (this build reads 1)")]
    UnsupportedVersion {
        /// `tree`, `commit` or `image`.
        kind: &'static str,
        /// The version found.
        version: u8,
    },
    /// The input ended in the middle of a field.
    #[error("{kind} encoding is truncated at byte {offset}")]
    Truncated {
        /// `tree`, `commit` or `image`.
        kind: &'static str,
        /// Where the missing field starts.
        offset: usize,
    },
    /// A length or count is larger than its limit.
    #[error("{kind} encoding: {what} is {len}, over the limit of {max}")]
    TooLarge {
        /// `tree`, `commit` or `image`.
        kind: &'static str,
        /// Which field.
        what: &'static str,
        /// The value found.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// A string field is not UTF-8.
    #[error("{kind} encoding: {what} is not valid UTF-8")]
    NotUtf8 {
        /// `tree`, `commit` or `image`.
        kind: &'static str,
        /// Which field.
        what: &'static str,
    },
    /// Bytes follow the end of the encoding.
    #[error("{kind} encoding has {extra} trailing bytes")]
    TrailingBytes {
        /// `tree`, `commit` or `image`.
        kind: &'static str,
        /// How many.
        extra: usize,
    },
    /// The fields decode but do not form a valid value (bad path, unsorted entries…).
    #[error("{kind} encoding is invalid: {reason}")]
    Invalid {
        /// `tree`, `commit` or `image`.
        kind: &'static str,
        /// What is wrong, from the value's own constructor.
        reason: String,
    },
    /// The value is valid but its encoding is not the canonical one.
    #[error("{kind} encoding is not canonical")]
    NonCanonical {
        /// `tree`, `commit` or `image`.
        kind: &'static str,
    },
}

/// The one format version every encoding in this module writes.
pub(crate) const VERSION: u8 = 1;

/// Appends primitives to a buffer.
pub(crate) struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    pub(crate) fn new(magic: &[u8]) -> Self {
        let mut buf = Vec::with_capacity(256);
        buf.extend_from_slice(magic);
        buf.push(VERSION);
        Self { buf }
    }

    pub(crate) fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }

    pub(crate) fn u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }

    pub(crate) fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }

    pub(crate) fn i64(&mut self, v: i64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }

    pub(crate) fn id(&mut self, v: &[u8; 32]) {
        self.buf.extend_from_slice(v);
    }

    /// Writes a length as `u32`. Every caller bounds its collections and strings far
    /// below 4 GiB at construction, so the conversion cannot fail.
    pub(crate) fn len(&mut self, n: usize) {
        self.u32(u32::try_from(n).expect("lengths are bounded at construction"));
    }

    pub(crate) fn str(&mut self, s: &str) {
        self.len(s.len());
        self.buf.extend_from_slice(s.as_bytes());
    }

    pub(crate) fn finish(self) -> Vec<u8> {
        self.buf
    }
}

/// Reads primitives from a slice, with bounds and typed errors.
pub(crate) struct Reader<'a> {
    kind: &'static str,
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    /// Checks the magic and version and positions after them.
    pub(crate) fn new(
        kind: &'static str,
        magic: &[u8],
        buf: &'a [u8],
    ) -> Result<Self, DecodeError> {
        let mut r = Self { kind, buf, pos: 0 };
        if r.take(magic.len()).ok() != Some(magic) {
            return Err(DecodeError::BadMagic { kind });
        }
        let version = r.u8()?;
        if version != VERSION {
            return Err(DecodeError::UnsupportedVersion { kind, version });
        }
        Ok(r)
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|end| *end <= self.buf.len())
            .ok_or(DecodeError::Truncated {
                kind: self.kind,
                offset: self.pos,
            })?;
        let out = &self.buf[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let bytes = self.take(N)?;
        Ok(bytes.try_into().expect("take returned exactly N bytes"))
    }

    pub(crate) fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.array::<1>()?[0])
    }

    pub(crate) fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    pub(crate) fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    pub(crate) fn i64(&mut self) -> Result<i64, DecodeError> {
        Ok(i64::from_le_bytes(self.array()?))
    }

    pub(crate) fn id(&mut self) -> Result<[u8; 32], DecodeError> {
        self.array()
    }

    /// Reads a count or length and checks it against `max` before anyone allocates.
    pub(crate) fn len(&mut self, what: &'static str, max: usize) -> Result<usize, DecodeError> {
        let n = self.u32()?;
        let n = usize::try_from(n).unwrap_or(usize::MAX);
        if n > max {
            return Err(DecodeError::TooLarge {
                kind: self.kind,
                what,
                len: n as u64,
                max: max as u64,
            });
        }
        Ok(n)
    }

    pub(crate) fn str(&mut self, what: &'static str, max: usize) -> Result<&'a str, DecodeError> {
        let n = self.len(what, max)?;
        let bytes = self.take(n)?;
        std::str::from_utf8(bytes).map_err(|_| DecodeError::NotUtf8 {
            kind: self.kind,
            what,
        })
    }

    /// A constructor's error, as a decode error of this kind.
    pub(crate) fn invalid(&self, reason: impl std::fmt::Display) -> DecodeError {
        DecodeError::Invalid {
            kind: self.kind,
            reason: reason.to_string(),
        }
    }

    /// Ends decoding: the input must be used up.
    pub(crate) fn finish(self) -> Result<(), DecodeError> {
        let extra = self.buf.len() - self.pos;
        if extra == 0 {
            Ok(())
        } else {
            Err(DecodeError::TrailingBytes {
                kind: self.kind,
                extra,
            })
        }
    }
}

/// Fails unless `value` re-encodes to exactly `input`.
pub(crate) fn ensure_canonical(
    kind: &'static str,
    input: &[u8],
    reencoded: &[u8],
) -> Result<(), DecodeError> {
    if input == reencoded {
        Ok(())
    } else {
        Err(DecodeError::NonCanonical { kind })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reader_bounds_and_errors() {
        let mut w = Writer::new(b"molt-test");
        w.str("héllo");
        w.u64(7);
        let bytes = w.finish();

        let mut r = Reader::new("test", b"molt-test", &bytes).unwrap();
        assert_eq!(r.str("s", 16).unwrap(), "héllo");
        assert_eq!(r.u64().unwrap(), 7);
        r.finish().unwrap();

        let mut r = Reader::new("test", b"molt-test", &bytes).unwrap();
        assert!(matches!(
            r.str("s", 3),
            Err(DecodeError::TooLarge { len: 6, max: 3, .. })
        ));

        let mut r = Reader::new("test", b"molt-test", &bytes[..14]).unwrap();
        assert!(matches!(
            r.str("s", 16),
            Err(DecodeError::Truncated { offset: 14, .. })
        ));

        assert!(matches!(
            Reader::new("test", b"molt-tree", &bytes),
            Err(DecodeError::BadMagic { .. })
        ));
        let mut v2 = bytes.clone();
        v2[9] = 2;
        assert!(matches!(
            Reader::new("test", b"molt-test", &v2),
            Err(DecodeError::UnsupportedVersion { version: 2, .. })
        ));
        let r = Reader::new("test", b"molt-test", &bytes).unwrap();
        assert!(matches!(
            r.finish(),
            Err(DecodeError::TrailingBytes { extra: 18, .. })
        ));
    }
}
