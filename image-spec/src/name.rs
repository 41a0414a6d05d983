//! Names people type: services, branches, images, instances and users.
//!
//! A name is 1 to its kind's maximum length of lowercase ASCII letters, digits,
//! `-`, `_` and `.`, and starts with a letter or digit. That makes every name safe
//! as a directory name, a URL segment and a sled key prefix, and keeps `orders`
//! and `Orders` from being two services. A branch name may also be several such
//! parts joined by `/` (`dev/ada`, a developer's own branch): never a directory
//! name or a path segment, and no part of it can be `.` or `..`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Why a string is not a valid name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// The name is empty.
    #[error("{kind} name is empty")]
    Empty {
        /// `service`, `branch`, `image`, `instance` or `user`.
        kind: &'static str,
    },
    /// The name is too long.
    #[error("{kind} name `{name}` is {len} characters long; the limit is {max}")]
    TooLong {
        /// `service`, `branch`, `image`, `instance` or `user`.
        kind: &'static str,
        /// The first 80 characters of the name.
        name: String,
        /// Its length in characters.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The name holds a character outside `a-z 0-9 - _ .`.
    #[error(
        "{kind} name `{name}` contains `{found}`; use lowercase letters, digits, `-`, `_` and `.`"
    )]
    BadChar {
        /// `service`, `branch`, `image`, `instance` or `user`.
        kind: &'static str,
        /// The name.
        name: String,
        /// The first bad character.
        found: char,
    },
    /// The name starts with `-`, `_` or `.`.
    #[error("{kind} name `{name}` must start with a letter or digit")]
    BadStart {
        /// `service`, `branch`, `image`, `instance` or `user`.
        kind: &'static str,
        /// The name.
        name: String,
    },
    /// A branch name has an empty part (`/dev`, `dev/`, `dev//ada`).
    #[error("{kind} name `{name}` has an empty part between `/`")]
    EmptyPart {
        /// `branch`.
        kind: &'static str,
        /// The name.
        name: String,
    },
}

/// A branch name: one or more names joined by `/`, within `max` characters
/// in all.
fn check_branch(kind: &'static str, max: usize, s: &str) -> Result<(), NameError> {
    if !s.contains('/') {
        return check_name(kind, max, s);
    }
    check_len(kind, max, s)?;
    for part in s.split('/') {
        if part.is_empty() {
            return Err(NameError::EmptyPart {
                kind,
                name: s.to_owned(),
            });
        }
        // A part's own error names the whole branch.
        check_name(kind, max, part).map_err(|e| match e {
            NameError::BadChar { kind, found, .. } => NameError::BadChar {
                kind,
                name: s.to_owned(),
                found,
            },
            NameError::BadStart { kind, .. } => NameError::BadStart {
                kind,
                name: s.to_owned(),
            },
            other => other,
        })?;
    }
    Ok(())
}

/// `s` is at most `max` characters long.
fn check_len(kind: &'static str, max: usize, s: &str) -> Result<(), NameError> {
    let len = s.chars().count();
    if len > max {
        return Err(NameError::TooLong {
            kind,
            name: s.chars().take(80).collect(),
            len,
            max,
        });
    }
    Ok(())
}

fn check_name(kind: &'static str, max: usize, s: &str) -> Result<(), NameError> {
    let Some(first) = s.chars().next() else {
        return Err(NameError::Empty { kind });
    };
    check_len(kind, max, s)?;
    let allowed = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || "-_.".contains(c);
    if let Some(found) = s.chars().find(|c| !allowed(*c)) {
        return Err(NameError::BadChar {
            kind,
            name: s.to_owned(),
            found,
        });
    }
    if !first.is_ascii_alphanumeric() {
        return Err(NameError::BadStart {
            kind,
            name: s.to_owned(),
        });
    }
    Ok(())
}

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident, $kind:literal, $max:expr) => {
        name_type!($(#[$doc])* $name, $kind, $max, check_name);
    };
    ($(#[$doc:meta])* $name:ident, $kind:literal, $max:expr, $check:ident) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// Longest accepted name, in characters.
            pub const MAX_LEN: usize = $max;

            /// Parses `s`.
            pub fn new(s: &str) -> Result<Self, NameError> {
                $check($kind, Self::MAX_LEN, s)?;
                Ok(Self(s.to_owned()))
            }

            /// The name.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl FromStr for $name {
            type Err = NameError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::new(s)
            }
        }

        impl TryFrom<String> for $name {
            type Error = NameError;
            fn try_from(s: String) -> Result<Self, Self::Error> {
                $check($kind, Self::MAX_LEN, &s)?;
                Ok(Self(s))
            }
        }

        impl From<$name> for String {
            fn from(n: $name) -> String {
                n.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.0)
            }
        }
    };
}

name_type!(
    /// A microservice's name, e.g. `orders`.
    ServiceName,
    "service",
    64
);
name_type!(
    /// A branch of one service's history, e.g. `main` (the ref is
    /// `orders/main`) or a developer's `dev/ada`.
    BranchName,
    "branch",
    64,
    check_branch
);
name_type!(
    /// An image's name, e.g. `shop-2026.11.23`.
    ImageName,
    "image",
    128
);

name_type!(
    /// An instance's name, e.g. `dev-1` or `prod-eu-3`.
    InstanceName,
    "instance",
    64
);
name_type!(
    /// A deployment target's name (the portal's "Service"), e.g. `shop-production`.
    TargetName,
    "target",
    64
);
name_type!(
    /// A person's name as it appears in their certificate, e.g. `ada`.
    UserName,
    "user",
    64
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn branches_may_have_parts_joined_by_slashes_and_nothing_else_may() {
        for ok in ["main", "dev/ada", "qa/ada/fix-1.2"] {
            assert_eq!(BranchName::new(ok).unwrap().as_str(), ok);
            let json = serde_json::to_string(&BranchName::new(ok).unwrap()).unwrap();
            assert_eq!(
                serde_json::from_str::<BranchName>(&json).unwrap().as_str(),
                ok
            );
        }
        for bad in ["/dev", "dev/", "dev//ada"] {
            assert!(
                matches!(BranchName::new(bad), Err(NameError::EmptyPart { .. })),
                "{bad}"
            );
        }
        assert!(matches!(
            BranchName::new("dev/../main"),
            Err(NameError::BadStart { name, .. }) if name == "dev/../main"
        ));
        assert!(matches!(
            BranchName::new("dev/Ada"),
            Err(NameError::BadChar { found: 'A', name, .. }) if name == "dev/Ada"
        ));
        let long = format!("dev/{}", "a".repeat(61));
        assert!(matches!(
            BranchName::new(&long),
            Err(NameError::TooLong { len: 65, .. })
        ));
        // Other names keep `/` out: they are directory names and path segments.
        assert!(ServiceName::new("dev/ada").is_err());
        assert!(ImageName::new("a/b").is_err());
        assert!(UserName::new("a/b").is_err());
    }

    #[test]
    fn accepts_and_rejects() {
        for ok in ["orders", "a", "v1.2_rc-3", "0day"] {
            assert_eq!(ServiceName::new(ok).unwrap().as_str(), ok);
        }
        assert!(matches!(
            ServiceName::new(""),
            Err(NameError::Empty { kind: "service" })
        ));
        assert!(matches!(
            ServiceName::new("Orders"),
            Err(NameError::BadChar { found: 'O', .. })
        ));
        assert!(matches!(
            BranchName::new("feature x"),
            Err(NameError::BadChar { found: ' ', .. })
        ));
        assert!(matches!(
            ImageName::new(".."),
            Err(NameError::BadStart { .. })
        ));
        assert!(matches!(
            ServiceName::new("-x"),
            Err(NameError::BadStart { .. })
        ));
        assert!(ServiceName::new(&"a".repeat(64)).is_ok());
        assert!(matches!(
            ServiceName::new(&"a".repeat(65)),
            Err(NameError::TooLong {
                len: 65,
                max: 64,
                ..
            })
        ));
        assert!(ImageName::new(&"a".repeat(128)).is_ok());
        let e = ServiceName::new("ordérs").unwrap_err();
        assert!(e.to_string().contains("`é`"), "{e}");
    }
}
