//! Content ids: the blake3 names of blobs, trees, commits and images.
//!
//! Every object molt stores is named by the blake3 hash of its bytes (a blob) or of
//! its canonical encoding (a tree, commit or image; see [`crate::encoding`]). The four
//! kinds are distinct newtypes so a tree id can never be passed where a commit id is
//! expected, even though both are 32 bytes.
//!
//! Text form: `Display` and `FromStr` use the full 64-character lowercase hex;
//! `Debug` prints a short 12-character prefix so logs stay readable. With serde,
//! human-readable formats (JSON, TOML) carry the hex string and binary formats
//! carry the 32 raw bytes.
//!
//! [`IdPrefix`] is an abbreviated id (at least [`IdPrefix::MIN_LEN`] hex characters)
//! as a user types it; [`IdPrefix::resolve`] finds the one id it names among
//! candidates, or says why it cannot.

use std::fmt;
use std::str::FromStr;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

/// Length of an id in bytes.
pub const ID_LEN: usize = 32;
/// Length of an id in hex characters.
pub const ID_HEX_LEN: usize = ID_LEN * 2;

/// Why a string is not an id or an id prefix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdParseError {
    /// The string has the wrong number of characters.
    #[error("`{input}` is {len} characters long; an id is {expected} hex characters")]
    Length {
        /// The offending input (truncated to 80 characters).
        input: String,
        /// Its length in characters.
        len: usize,
        /// What was expected, e.g. `64` or `8 to 64`.
        expected: &'static str,
    },
    /// The string holds something other than lowercase or uppercase hex digits.
    #[error("`{input}` is not hexadecimal (character {position} is `{found}`)")]
    NotHex {
        /// The offending input (truncated to 80 characters).
        input: String,
        /// Zero-based position of the first bad character.
        position: usize,
        /// The bad character.
        found: char,
    },
}

/// Why an abbreviated id does not name exactly one object.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PrefixResolveError {
    /// Nothing starts with the prefix.
    #[error("no object id starts with `{prefix}`")]
    NotFound {
        /// The prefix, as hex.
        prefix: String,
    },
    /// More than one candidate starts with the prefix.
    #[error("`{prefix}` is ambiguous: it matches {count} ids; type more characters")]
    Ambiguous {
        /// The prefix, as hex.
        prefix: String,
        /// How many distinct candidates matched.
        count: usize,
    },
}

fn truncate_for_error(s: &str) -> String {
    s.chars().take(80).collect()
}

fn hex_value(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// Checks that `s` is only hex digits; returns the first offender otherwise.
fn check_hex(s: &str) -> Result<(), IdParseError> {
    match s.char_indices().find(|(_, c)| !c.is_ascii_hexdigit()) {
        None => Ok(()),
        Some((position, found)) => Err(IdParseError::NotHex {
            input: truncate_for_error(s),
            position: s[..position].chars().count(),
            found,
        }),
    }
}

fn parse_full(s: &str) -> Result<[u8; ID_LEN], IdParseError> {
    check_hex(s)?;
    if s.len() != ID_HEX_LEN {
        return Err(IdParseError::Length {
            input: truncate_for_error(s),
            len: s.chars().count(),
            expected: "64",
        });
    }
    let mut out = [0u8; ID_LEN];
    for (i, pair) in s.as_bytes().chunks_exact(2).enumerate() {
        // check_hex above makes both lookups infallible.
        let hi = hex_value(pair[0]).expect("checked hex digit");
        let lo = hex_value(pair[1]).expect("checked hex digit");
        out[i] = (hi << 4) | lo;
    }
    Ok(out)
}

fn write_hex(f: &mut fmt::Formatter<'_>, bytes: &[u8]) -> fmt::Result {
    for b in bytes {
        write!(f, "{b:02x}")?;
    }
    Ok(())
}

macro_rules! content_id {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name([u8; ID_LEN]);

        impl $name {
            /// Wraps 32 raw bytes. The caller vouches that they are the right hash.
            pub const fn from_bytes(bytes: [u8; ID_LEN]) -> Self {
                Self(bytes)
            }

            /// The 32 raw bytes.
            pub const fn as_bytes(&self) -> &[u8; ID_LEN] {
                &self.0
            }

            /// The full 64-character lowercase hex form (same as `Display`).
            pub fn to_hex(&self) -> String {
                self.to_string()
            }

            /// The first `n` hex characters (at most 64), e.g. for short displays.
            pub fn short(&self, n: usize) -> String {
                let mut s = self.to_hex();
                s.truncate(n.min(ID_HEX_LEN));
                s
            }

            /// The kind of object this id names, for messages.
            pub const KIND: &'static str = $kind;
        }

        impl From<blake3::Hash> for $name {
            fn from(h: blake3::Hash) -> Self {
                Self(*h.as_bytes())
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write_hex(f, &self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}(", stringify!($name))?;
                write_hex(f, &self.0[..6])?;
                write!(f, ")")
            }
        }

        impl FromStr for $name {
            type Err = IdParseError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                parse_full(s).map(Self)
            }
        }

        impl AsRef<[u8]> for $name {
            fn as_ref(&self) -> &[u8] {
                &self.0
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                if s.is_human_readable() {
                    s.collect_str(self)
                } else {
                    s.serialize_bytes(&self.0)
                }
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                if d.is_human_readable() {
                    d.deserialize_str(IdVisitor($kind)).map(Self)
                } else {
                    d.deserialize_bytes(IdVisitor($kind)).map(Self)
                }
            }
        }
    };
}

struct IdVisitor(&'static str);

impl<'de> Visitor<'de> for IdVisitor {
    type Value = [u8; ID_LEN];

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a {} id (64 hex characters or 32 bytes)", self.0)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        parse_full(v).map_err(E::custom)
    }

    fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Self::Value, E> {
        v.try_into()
            .map_err(|_| E::invalid_length(v.len(), &"32 bytes"))
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut out = [0u8; ID_LEN];
        for (i, slot) in out.iter_mut().enumerate() {
            *slot = seq
                .next_element()?
                .ok_or_else(|| de::Error::invalid_length(i, &"32 bytes"))?;
        }
        if seq.next_element::<u8>()?.is_some() {
            return Err(de::Error::invalid_length(ID_LEN + 1, &"32 bytes"));
        }
        Ok(out)
    }
}

content_id!(
    /// The id of a blob: blake3 of the file's bytes (or of a symlink's target).
    BlobId,
    "blob"
);
content_id!(
    /// The id of a [`Tree`](crate::Tree): blake3 of its canonical encoding.
    TreeId,
    "tree"
);
content_id!(
    /// The id of a [`Commit`](crate::Commit): blake3 of its canonical encoding.
    CommitId,
    "commit"
);
content_id!(
    /// The id of an [`Image`](crate::Image): blake3 of its canonical encoding.
    ImageId,
    "image"
);

impl BlobId {
    /// The id of these bytes.
    pub fn of(bytes: &[u8]) -> Self {
        blake3::hash(bytes).into()
    }
}

/// An abbreviated id as a user types it: [`MIN_LEN`](Self::MIN_LEN) to 64 hex characters.
///
/// Case is ignored. An odd number of characters is allowed (`deadbeef1`).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct IdPrefix {
    /// Lowercase hex, validated.
    hex: String,
}

impl IdPrefix {
    /// The fewest hex characters accepted: short enough to type, long enough that a
    /// collision among a repository's commits is unlikely.
    pub const MIN_LEN: usize = 8;

    /// The prefix in lowercase hex.
    pub fn as_str(&self) -> &str {
        &self.hex
    }

    /// Does `id` start with this prefix?
    pub fn matches(&self, id: &[u8; ID_LEN]) -> bool {
        self.hex.as_bytes().iter().enumerate().all(|(i, c)| {
            let byte = id[i / 2];
            let nibble = if i % 2 == 0 { byte >> 4 } else { byte & 0x0f };
            hex_value(*c) == Some(nibble)
        })
    }

    /// The single candidate this prefix names. Duplicates among `candidates` count once.
    pub fn resolve<T, I>(&self, candidates: I) -> Result<T, PrefixResolveError>
    where
        T: AsRef<[u8]> + PartialEq + Copy,
        I: IntoIterator<Item = T>,
    {
        let mut matched: Vec<T> = Vec::new();
        for c in candidates {
            let Ok(bytes) = <&[u8; ID_LEN]>::try_from(c.as_ref()) else {
                continue;
            };
            if self.matches(bytes) && !matched.contains(&c) {
                matched.push(c);
            }
        }
        match matched.as_slice() {
            [one] => Ok(*one),
            [] => Err(PrefixResolveError::NotFound {
                prefix: self.hex.clone(),
            }),
            many => Err(PrefixResolveError::Ambiguous {
                prefix: self.hex.clone(),
                count: many.len(),
            }),
        }
    }
}

impl FromStr for IdPrefix {
    type Err = IdParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        check_hex(s)?;
        if !(Self::MIN_LEN..=ID_HEX_LEN).contains(&s.len()) {
            return Err(IdParseError::Length {
                input: truncate_for_error(s),
                len: s.chars().count(),
                expected: "8 to 64",
            });
        }
        Ok(Self {
            hex: s.to_ascii_lowercase(),
        })
    }
}

impl fmt::Display for IdPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.hex)
    }
}

impl fmt::Debug for IdPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "IdPrefix({})", self.hex)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HELLO: &str = "ea8f163db38682925e4491c5e58d4bb3506ef8c14eb78a86e908c5624a67200f";

    #[test]
    fn display_is_full_hex_and_debug_is_short() {
        let id = BlobId::of(b"hello");
        assert_eq!(id.to_string(), HELLO);
        assert_eq!(format!("{id:?}"), "BlobId(ea8f163db386)");
        assert_eq!(id.short(8), "ea8f163d");
    }

    #[test]
    fn from_str_round_trips_and_accepts_uppercase() {
        let id: BlobId = HELLO.parse().unwrap();
        assert_eq!(id, BlobId::of(b"hello"));
        let upper: BlobId = HELLO.to_uppercase().parse().unwrap();
        assert_eq!(upper, id);
    }

    #[test]
    fn from_str_errors_are_typed() {
        let e = "abc".parse::<TreeId>().unwrap_err();
        assert!(matches!(e, IdParseError::Length { len: 3, .. }), "{e}");
        let bad = format!("{}g", &HELLO[..63]);
        let e = bad.parse::<CommitId>().unwrap_err();
        assert!(
            matches!(
                e,
                IdParseError::NotHex {
                    position: 63,
                    found: 'g',
                    ..
                }
            ),
            "{e}"
        );
        // A multibyte character must not panic on slicing.
        let e = "é".repeat(32).parse::<ImageId>().unwrap_err();
        assert!(matches!(e, IdParseError::NotHex { position: 0, .. }), "{e}");
    }

    #[test]
    fn prefix_bounds() {
        assert!("ea8f163".parse::<IdPrefix>().is_err());
        assert!("ea8f163d".parse::<IdPrefix>().is_ok());
        assert!(HELLO.parse::<IdPrefix>().is_ok());
        assert!(format!("{HELLO}0").parse::<IdPrefix>().is_err());
        assert!("ea8f163z".parse::<IdPrefix>().is_err());
    }

    #[test]
    fn prefix_matches_odd_lengths_and_case() {
        let id = BlobId::of(b"hello");
        let p: IdPrefix = "EA8F163DB".parse().unwrap();
        assert!(p.matches(id.as_bytes()));
        let q: IdPrefix = "ea8f163db4".parse().unwrap();
        assert!(!q.matches(id.as_bytes()));
    }

    #[test]
    fn prefix_resolves_unique_not_found_and_ambiguous() {
        let mut a = [0u8; 32];
        a[0] = 0xab;
        a[1] = 0xcd;
        a[2] = 0xef;
        a[3] = 0x01;
        let mut b = a;
        b[4] = 0xff;
        let (a, b) = (CommitId::from_bytes(a), CommitId::from_bytes(b));
        let p: IdPrefix = "abcdef01".parse().unwrap();
        assert_eq!(
            p.resolve([a, b, b, a]).unwrap_err(),
            PrefixResolveError::Ambiguous {
                prefix: "abcdef01".into(),
                count: 2
            }
        );
        let p: IdPrefix = "abcdef01ff".parse().unwrap();
        assert_eq!(p.resolve([a, b, b]).unwrap(), b);
        let p: IdPrefix = "abcdef02".parse().unwrap();
        assert!(matches!(
            p.resolve([a, b]),
            Err(PrefixResolveError::NotFound { .. })
        ));
    }
}
