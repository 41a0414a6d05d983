//! Who a peer is: the identity a cluster certificate names, and what it may do.
//!
//! Every certificate the cluster CA issues names exactly one [`Identity`] in a URI
//! subject alternative name:
//!
//! | identity | URI SAN | DNS SAN (servers only) |
//! |---|---|---|
//! | the repository server | `molt://repo-server` | `repo-server.molt` |
//! | the portal | `molt://portal` | `portal.molt` |
//! | the shell of instance `dev-1` | `molt://shell/dev-1` | `dev-1.shell.molt` |
//! | user `ada` with grant `admin` | `molt://user/ada/admin` | — |
//!
//! A client dials a server under the server identity's DNS name, whatever address
//! it connects to, so standard certificate verification against the cluster CA also
//! checks that the server has the expected role. A server reads the client's
//! identity from its verified certificate; handlers only ever see that.

use std::fmt;
use std::str::FromStr;

use image_spec::{InstanceName, NameError, UserName};
use serde::{Deserialize, Serialize};

/// What a user's certificate allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Grant {
    /// Push services and create images; pull onto dev/QA instances.
    Developer,
    /// Create images and deploy them.
    Deployer,
    /// Everything.
    Admin,
}

impl Grant {
    /// The grant's name as written in certificates and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Grant::Developer => "developer",
            Grant::Deployer => "deployer",
            Grant::Admin => "admin",
        }
    }
}

impl fmt::Display for Grant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Grant {
    type Err = IdentityError;
    fn from_str(s: &str) -> Result<Self, IdentityError> {
        match s {
            "developer" => Ok(Grant::Developer),
            "deployer" => Ok(Grant::Deployer),
            "admin" => Ok(Grant::Admin),
            other => Err(IdentityError::UnknownGrant(other.to_owned())),
        }
    }
}

/// Why a string or certificate does not name an identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// The role is not one of repo-server, portal, shell, user.
    #[error("unknown role `{0}` (expected repo-server, portal, shell or user)")]
    UnknownRole(String),
    /// The grant is not one of developer, deployer, admin.
    #[error("unknown grant `{0}` (expected developer, deployer or admin)")]
    UnknownGrant(String),
    /// A name inside the identity is invalid.
    #[error(transparent)]
    Name(#[from] NameError),
    /// The identity has the wrong shape (missing or extra parts).
    #[error("`{0}` is not a molt identity (e.g. `molt://shell/dev-1`, `molt://user/ada/admin`)")]
    Malformed(String),
    /// The certificate carries no molt identity, or more than one.
    #[error("the certificate names {0} molt identities; it must name exactly one")]
    Count(usize),
    /// The certificate cannot be parsed.
    #[error("cannot read the peer certificate: {0}")]
    BadCertificate(String),
}

/// A party of the cluster, as named by its certificate (see the module docs).
///
/// With serde it travels as its `Display` form (`user/ada/admin`), parsed on receipt.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Identity {
    /// The repository server.
    RepoServer,
    /// The portal.
    Portal,
    /// The shell of one instance.
    Shell {
        /// The instance.
        instance: InstanceName,
    },
    /// A person.
    User {
        /// Their name.
        name: UserName,
        /// What they may do.
        grant: Grant,
    },
}

/// The URI scheme of identities in certificates.
const SCHEME: &str = "molt://";
/// The DNS suffix of server names.
const DNS_SUFFIX: &str = "molt";

impl Identity {
    /// The identity as the URI written into its certificate.
    pub fn to_uri(&self) -> String {
        format!("{SCHEME}{self}")
    }

    /// Parses a certificate's URI SAN.
    pub fn from_uri(uri: &str) -> Result<Self, IdentityError> {
        let rest = uri
            .strip_prefix(SCHEME)
            .ok_or_else(|| IdentityError::Malformed(uri.to_owned()))?;
        rest.parse()
    }

    /// The DNS name a client dials this identity under, for the parties that serve:
    /// `repo-server.molt`, `portal.molt`, `dev-1.shell.molt`. Users do not serve.
    pub fn server_name(&self) -> Option<String> {
        match self {
            Identity::RepoServer => Some(format!("repo-server.{DNS_SUFFIX}")),
            Identity::Portal => Some(format!("portal.{DNS_SUFFIX}")),
            Identity::Shell { instance } => Some(format!("{instance}.shell.{DNS_SUFFIX}")),
            Identity::User { .. } => None,
        }
    }

    /// The role's word: `repo-server`, `portal`, `shell` or `user`.
    pub fn role(&self) -> &'static str {
        match self {
            Identity::RepoServer => "repo-server",
            Identity::Portal => "portal",
            Identity::Shell { .. } => "shell",
            Identity::User { .. } => "user",
        }
    }

    /// The grant, for a user.
    pub fn grant(&self) -> Option<Grant> {
        match self {
            Identity::User { grant, .. } => Some(*grant),
            _ => None,
        }
    }

    /// Reads the identity from a DER certificate (which must already be verified
    /// against the cluster CA: this only parses).
    pub fn from_certificate(der: &[u8]) -> Result<Self, IdentityError> {
        use x509_parser::extensions::GeneralName;
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| IdentityError::BadCertificate(e.to_string()))?;
        let san = cert
            .subject_alternative_name()
            .map_err(|e| IdentityError::BadCertificate(e.to_string()))?;
        let uris: Vec<&str> = san
            .map(|ext| {
                ext.value
                    .general_names
                    .iter()
                    .filter_map(|n| match n {
                        GeneralName::URI(u) if u.starts_with(SCHEME) => Some(*u),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default();
        match uris.as_slice() {
            [one] => Self::from_uri(one),
            other => Err(IdentityError::Count(other.len())),
        }
    }
}

impl TryFrom<String> for Identity {
    type Error = IdentityError;
    fn try_from(s: String) -> Result<Self, IdentityError> {
        s.parse()
    }
}

impl From<Identity> for String {
    fn from(id: Identity) -> String {
        id.to_string()
    }
}

impl fmt::Display for Identity {
    /// `repo-server`, `portal`, `shell/dev-1`, `user/ada/admin`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Identity::RepoServer | Identity::Portal => f.write_str(self.role()),
            Identity::Shell { instance } => write!(f, "shell/{instance}"),
            Identity::User { name, grant } => write!(f, "user/{name}/{grant}"),
        }
    }
}

impl FromStr for Identity {
    type Err = IdentityError;
    /// Parses the `Display` form: `repo-server`, `portal`, `shell/NAME`, `user/NAME/GRANT`.
    fn from_str(s: &str) -> Result<Self, IdentityError> {
        let parts: Vec<&str> = s.split('/').collect();
        match parts.as_slice() {
            ["repo-server"] => Ok(Identity::RepoServer),
            ["portal"] => Ok(Identity::Portal),
            ["shell", instance] => Ok(Identity::Shell {
                instance: InstanceName::new(instance)?,
            }),
            ["user", name, grant] => Ok(Identity::User {
                name: UserName::new(name)?,
                grant: grant.parse()?,
            }),
            [role, ..] if !["repo-server", "portal", "shell", "user"].contains(role) => {
                Err(IdentityError::UnknownRole((*role).to_owned()))
            }
            _ => Err(IdentityError::Malformed(s.to_owned())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_and_parse_round_trip() {
        for s in ["repo-server", "portal", "shell/dev-1", "user/ada/admin"] {
            let id: Identity = s.parse().unwrap();
            assert_eq!(id.to_string(), s);
            assert_eq!(Identity::from_uri(&id.to_uri()).unwrap(), id);
        }
    }

    #[test]
    fn parse_errors_are_typed() {
        assert!(matches!(
            "admin/x".parse::<Identity>(),
            Err(IdentityError::UnknownRole(r)) if r == "admin"
        ));
        assert!(matches!(
            "user/ada/root".parse::<Identity>(),
            Err(IdentityError::UnknownGrant(_))
        ));
        assert!(matches!(
            "user/ada".parse::<Identity>(),
            Err(IdentityError::Malformed(_))
        ));
        assert!(matches!(
            "shell/Dev".parse::<Identity>(),
            Err(IdentityError::Name(_))
        ));
        assert!(matches!(
            "shell/a/b".parse::<Identity>(),
            Err(IdentityError::Malformed(_))
        ));
        assert!(Identity::from_uri("https://repo-server").is_err());
    }

    #[test]
    fn server_names() {
        let shell: Identity = "shell/dev-1".parse().unwrap();
        assert_eq!(shell.server_name().unwrap(), "dev-1.shell.molt");
        assert_eq!(
            Identity::RepoServer.server_name().unwrap(),
            "repo-server.molt"
        );
        assert!(
            "user/ada/admin"
                .parse::<Identity>()
                .unwrap()
                .server_name()
                .is_none()
        );
    }
}
