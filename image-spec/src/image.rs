//! Images: an immutable, named pin of one commit per service.
//!
//! An [`Image`] is what a staging or production instance runs: its name, a
//! description, and `service → commit`. It is named by its [`ImageId`], the blake3
//! of its canonical encoding, and never changes once created.
//!
//! Images are authored as TOML; commits are full 64-hex ids (resolving branch names
//! or abbreviations to ids needs the repository and is done before this point):
//!
//! ```toml
//! name = "shop-2026.11.23"
//! description = "November release" # optional, default ""
//!
//! [services]
//! orders = "3f2a…"   # 64 hex characters
//! payments = "9b01…"
//! ```
//!
//! # Canonical encoding (version 1)
//!
//! ```text
//! "molt-image" 0x01
//! str  name
//! str  description
//! u32  service count
//! per service, in name order: str service, id commit
//! ```
//!
//! Primitives are described in [`crate::encoding`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::encoding::{DecodeError, Reader, Writer, ensure_canonical};
use crate::id::{CommitId, ImageId};
use crate::name::{ImageName, ServiceName};
use crate::toml_input::{self, TomlError};

const MAGIC: &[u8] = b"molt-image";
const KIND: &str = "image";

/// Why an image cannot be built or read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImageError {
    /// An image pins at least one service.
    #[error("image `{0}` has no services")]
    NoServices(ImageName),
    /// More services than [`Image::MAX_SERVICES`].
    #[error("image has {count} services; the limit is {max}")]
    TooManyServices {
        /// How many were given.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// The description is too long.
    #[error("image description is {len} bytes; the limit is {max}")]
    DescriptionTooLong {
        /// Its length in bytes.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The TOML document is larger than [`Image::MAX_TOML_LEN`].
    #[error("image file is {len} bytes; the limit is {max}")]
    TooLarge {
        /// Its size in bytes.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The TOML document is malformed or breaks a rule; names the key.
    #[error("image file: {0}")]
    Toml(#[from] TomlError),
}

/// An immutable, named pin of one commit per service (see the module docs).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "ImageFields", into = "ImageFields")]
pub struct Image(ImageFields);

/// The fields of an image; also its serde and TOML shape, checked on the way in.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ImageFields {
    name: ImageName,
    #[serde(default)]
    description: String,
    services: BTreeMap<ServiceName, CommitId>,
}

impl TryFrom<ImageFields> for Image {
    type Error = ImageError;
    fn try_from(f: ImageFields) -> Result<Self, ImageError> {
        Image::new(f.name, f.description, f.services)
    }
}

impl From<Image> for ImageFields {
    fn from(i: Image) -> Self {
        i.0
    }
}

impl Image {
    /// Most services one image may pin.
    pub const MAX_SERVICES: usize = 4096;
    /// Longest description, in bytes.
    pub const MAX_DESCRIPTION_LEN: usize = 4096;
    /// Largest image file accepted by [`Image::from_toml`], in bytes.
    pub const MAX_TOML_LEN: usize = 1 << 20;

    /// Checks and assembles an image.
    pub fn new(
        name: ImageName,
        description: String,
        services: BTreeMap<ServiceName, CommitId>,
    ) -> Result<Self, ImageError> {
        if services.is_empty() {
            return Err(ImageError::NoServices(name));
        }
        if services.len() > Self::MAX_SERVICES {
            return Err(ImageError::TooManyServices {
                count: services.len(),
                max: Self::MAX_SERVICES,
            });
        }
        if description.len() > Self::MAX_DESCRIPTION_LEN {
            return Err(ImageError::DescriptionTooLong {
                len: description.len(),
                max: Self::MAX_DESCRIPTION_LEN,
            });
        }
        Ok(Self(ImageFields {
            name,
            description,
            services,
        }))
    }

    /// Parses an image file (see the module docs for the format).
    pub fn from_toml(text: &str) -> Result<Self, ImageError> {
        if text.len() > Self::MAX_TOML_LEN {
            return Err(ImageError::TooLarge {
                len: text.len(),
                max: Self::MAX_TOML_LEN,
            });
        }
        let raw: ImageFields = toml_input::parse(text)?;
        Self::try_from(raw).map_err(|e| match e {
            ImageError::NoServices(_) | ImageError::TooManyServices { .. } => {
                TomlError::at("services", e.to_string()).into()
            }
            ImageError::DescriptionTooLong { .. } => {
                TomlError::at("description", e.to_string()).into()
            }
            other => other,
        })
    }

    /// The image as a TOML document that [`Image::from_toml`] reads back.
    pub fn to_toml(&self) -> String {
        toml::to_string(&self.0)
            .expect("an image is a table of strings, which TOML can always hold")
    }

    /// The image's name.
    pub fn name(&self) -> &ImageName {
        &self.0.name
    }

    /// What the image is for.
    pub fn description(&self) -> &str {
        &self.0.description
    }

    /// The commit pinned for each service.
    pub fn services(&self) -> &BTreeMap<ServiceName, CommitId> {
        &self.0.services
    }

    /// The commit pinned for `service`, if the image has it.
    pub fn commit_of(&self, service: &ServiceName) -> Option<CommitId> {
        self.0.services.get(service).copied()
    }

    /// The canonical encoding (see the module docs).
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new(MAGIC);
        w.str(self.0.name.as_str());
        w.str(&self.0.description);
        w.len(self.0.services.len());
        for (service, commit) in &self.0.services {
            w.str(service.as_str());
            w.id(commit.as_bytes());
        }
        w.finish()
    }

    /// Parses a canonical encoding, checking everything [`Image::new`] checks.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(KIND, MAGIC, bytes)?;
        let name = r.str("name length", ImageName::MAX_LEN)?;
        let name = ImageName::new(name).map_err(|e| r.invalid(e))?;
        let description = r
            .str("description length", Self::MAX_DESCRIPTION_LEN)?
            .to_owned();
        let count = r.len("service count", Self::MAX_SERVICES)?;
        let mut services = BTreeMap::new();
        for _ in 0..count {
            let service = r.str("service length", ServiceName::MAX_LEN)?;
            let service = ServiceName::new(service).map_err(|e| r.invalid(e))?;
            let commit = CommitId::from_bytes(r.id()?);
            if services.insert(service.clone(), commit).is_some() {
                return Err(r.invalid(format!("service `{service}` is listed twice")));
            }
        }
        r.finish()?;
        let image = Self::new(name, description, services).map_err(|e| DecodeError::Invalid {
            kind: KIND,
            reason: e.to_string(),
        })?;
        ensure_canonical(KIND, bytes, &image.encode())?;
        Ok(image)
    }

    /// blake3 of the canonical encoding.
    pub fn id(&self) -> ImageId {
        blake3::hash(&self.encode()).into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const C1: &str = "1111111111111111111111111111111111111111111111111111111111111111";

    #[test]
    fn toml_round_trip() {
        let text = format!(
            "name = \"shop-1\"\ndescription = \"first\"\n\n[services]\norders = \"{C1}\"\npayments = \"{}\"\n",
            "2".repeat(64)
        );
        let image = Image::from_toml(&text).unwrap();
        assert_eq!(image.name().as_str(), "shop-1");
        assert_eq!(
            image.commit_of(&ServiceName::new("orders").unwrap()),
            Some(C1.parse().unwrap())
        );
        assert_eq!(Image::from_toml(&image.to_toml()).unwrap(), image);
        assert_eq!(Image::decode(&image.encode()).unwrap(), image);
    }

    #[test]
    fn toml_errors_name_the_key() {
        let e = Image::from_toml("name = \"shop\"\n[services]\norders = \"main\"\n").unwrap_err();
        let ImageError::Toml(t) = &e else {
            panic!("{e:?}")
        };
        assert_eq!(t.key, "services.orders");
        assert_eq!(t.line, Some(3));
        assert!(t.message.contains("not hexadecimal"), "{e}");
        let e =
            Image::from_toml("name = \"shop\"\n[services]\norders = \"abcdef12\"\n").unwrap_err();
        assert!(e.to_string().contains("64 hex characters"), "{e}");

        let e = Image::from_toml("name = \"Shop\"\n[services]\n").unwrap_err();
        assert!(e.to_string().contains("key `name`"), "{e}");

        let e = Image::from_toml("name = \"shop\"\n[services]\n").unwrap_err();
        assert!(e.to_string().contains("key `services`"), "{e}");
        assert!(e.to_string().contains("no services"), "{e}");

        let e = Image::from_toml(&format!(
            "name = \"shop\"\ncolor = 1\n[services]\na = \"{C1}\"\n"
        ))
        .unwrap_err();
        assert!(e.to_string().contains("unknown field `color`"), "{e}");

        let e =
            Image::from_toml(&format!("name = \"shop\"\n[services]\nA = \"{C1}\"\n")).unwrap_err();
        assert!(e.to_string().contains("`A`"), "{e}");

        let huge = format!("# {}\n", "x".repeat(Image::MAX_TOML_LEN));
        assert!(matches!(
            Image::from_toml(&huge),
            Err(ImageError::TooLarge { .. })
        ));
    }

    #[test]
    fn decode_refuses_duplicate_and_unsorted_services() {
        let c = [1u8; 32];
        let encode = |names: &[&str]| {
            let mut w = Writer::new(MAGIC);
            w.str("img");
            w.str("");
            w.len(names.len());
            for n in names {
                w.str(n);
                w.id(&c);
            }
            w.finish()
        };
        assert!(Image::decode(&encode(&["a", "b"])).is_ok());
        assert!(matches!(
            Image::decode(&encode(&["a", "a"])),
            Err(DecodeError::Invalid { .. })
        ));
        assert_eq!(
            Image::decode(&encode(&["b", "a"])).unwrap_err(),
            DecodeError::NonCanonical { kind: "image" }
        );
        assert!(matches!(
            Image::decode(&encode(&[])),
            Err(DecodeError::Invalid { .. })
        ));
    }
}
