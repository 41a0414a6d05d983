//! Who may do what: users, their API tokens, and the principal a request acts as.
//!
//! A person is one [`User`] whatever credential they present: a certificate
//! `user/ada/…`, one of ada's bearer tokens, later her browser session — each
//! resolves to a [`Principal`] acting as `ada`. Grants are the cluster's
//! ([`Grant`]): developers read and deploy to development and quality targets,
//! deployers deploy anywhere, admins also manage targets, users and tokens.
//!
//! Tokens are random secrets shown once; the store keeps only their blake3 hash
//! ([`hash_secret`]), so a copy of the database reveals no usable token.

use image_spec::{TargetName, UserName};
use serde::{Deserialize, Serialize};
use wire::Grant;
use wire::shell::Stage;

use crate::deployment::Millis;

/// A person known to the portal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    /// Their name.
    pub name: UserName,
    /// What they may do.
    pub grant: Grant,
    /// When they were added.
    pub created: Millis,
}

/// The prefix of every token's secret, so a leaked one is recognisable.
pub const TOKEN_PREFIX: &str = "molt_";

/// An API token's record (its secret is not kept).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Token {
    /// Its public id (the first characters of its hash), for listing and revoking.
    pub id: String,
    /// What it is for.
    pub name: String,
    /// Whose it is: it acts as this user.
    pub user: UserName,
    /// What it may do: at most its user's grant.
    pub grant: Grant,
    /// The targets it may act on; `None`: every target.
    pub targets: Option<Vec<TargetName>>,
    /// When it was made.
    pub created: Millis,
    /// When it stops working.
    pub expires: Millis,
    /// When it was revoked, if it was.
    pub revoked: Option<Millis>,
    /// The blake3 hash of its secret.
    pub hash: [u8; 32],
}

/// The hash a token's secret is kept and looked up by.
pub fn hash_secret(secret: &str) -> [u8; 32] {
    *blake3::hash(secret.as_bytes()).as_bytes()
}

/// A new random token secret (`molt_` and 43 characters of base64url).
pub fn new_secret() -> Result<String, getrandom::Error> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)?;
    Ok(format!("{TOKEN_PREFIX}{}", base64url(&bytes)))
}

fn base64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(bytes.len() * 4 / 3 + 2);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        let chars = chunk.len() + 1;
        for i in 0..chars {
            out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

/// Who a request acts as, once its credential is verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The user.
    pub user: UserName,
    /// What this credential may do (a token's grant may be below its user's).
    pub grant: Grant,
    /// The targets this credential may act on; `None`: every target.
    pub targets: Option<Vec<TargetName>>,
}

/// Why a principal may not do something.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    /// Their grant is too low.
    #[error("`{user}` ({grant}) may not {what}")]
    Grant {
        /// Who.
        user: UserName,
        /// Their grant.
        grant: Grant,
        /// What they tried.
        what: String,
    },
    /// The credential is scoped to other targets.
    #[error("this credential of `{user}` is not allowed to act on target `{target}`")]
    Scope {
        /// Who.
        user: UserName,
        /// The target.
        target: TargetName,
    },
}

impl Principal {
    /// May they manage targets, users and tokens?
    pub fn require_admin(&self, what: &str) -> Result<(), Denied> {
        if self.grant == Grant::Admin {
            Ok(())
        } else {
            Err(self.denied(what))
        }
    }

    /// May they deploy to `target` of `stage`? Developers only to development
    /// and quality targets; every credential only within its scope.
    pub fn require_deploy(&self, target: &TargetName, stage: Stage) -> Result<(), Denied> {
        self.require_scope(target)?;
        match (self.grant, stage) {
            (Grant::Deployer | Grant::Admin, _) => Ok(()),
            (Grant::Developer, Stage::Development | Stage::Quality) => Ok(()),
            (Grant::Developer, _) => {
                Err(self.denied(&format!("deploy to {stage} target `{target}`")))
            }
        }
    }

    /// Is `target` within this credential's scope?
    pub fn require_scope(&self, target: &TargetName) -> Result<(), Denied> {
        match &self.targets {
            Some(scope) if !scope.contains(target) => Err(Denied::Scope {
                user: self.user.clone(),
                target: target.clone(),
            }),
            _ => Ok(()),
        }
    }

    fn denied(&self, what: &str) -> Denied {
        Denied::Grant {
            user: self.user.clone(),
            grant: self.grant,
            what: what.to_owned(),
        }
    }
}

/// One state-changing call, as the audit log keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Its number, from 1.
    pub seq: u64,
    /// When.
    pub at: Millis,
    /// Who (a user's name, or `portal` for what the portal does on its own).
    pub who: String,
    /// What (`deployment.create`, `target.edit`, `token.revoke`, …).
    pub action: String,
    /// On what (`target shop`, `deployment 12`).
    pub subject: String,
    /// The details that matter (the image, the options).
    pub detail: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn who(grant: Grant, targets: Option<&[&str]>) -> Principal {
        Principal {
            user: UserName::new("ada").unwrap(),
            grant,
            targets: targets.map(|t| t.iter().map(|s| TargetName::new(s).unwrap()).collect()),
        }
    }

    #[test]
    fn grants_and_scopes_decide_deploys() {
        let prod = TargetName::new("prod").unwrap();
        let dev = TargetName::new("dev").unwrap();
        assert!(
            who(Grant::Developer, None)
                .require_deploy(&dev, Stage::Development)
                .is_ok()
        );
        assert!(
            who(Grant::Developer, None)
                .require_deploy(&dev, Stage::Quality)
                .is_ok()
        );
        assert!(matches!(
            who(Grant::Developer, None).require_deploy(&prod, Stage::Production),
            Err(Denied::Grant { .. })
        ));
        assert!(
            who(Grant::Deployer, None)
                .require_deploy(&prod, Stage::Production)
                .is_ok()
        );
        assert!(matches!(
            who(Grant::Admin, Some(&["staging"])).require_deploy(&prod, Stage::Production),
            Err(Denied::Scope { .. })
        ));
        assert!(who(Grant::Admin, None).require_admin("add users").is_ok());
        assert!(
            who(Grant::Deployer, None)
                .require_admin("add users")
                .is_err()
        );
    }

    #[test]
    fn secrets_are_random_prefixed_and_hashed() {
        let a = new_secret().unwrap();
        let b = new_secret().unwrap();
        assert_ne!(a, b);
        assert!(a.starts_with(TOKEN_PREFIX));
        assert_eq!(a.len(), TOKEN_PREFIX.len() + 43);
        assert!(
            a[TOKEN_PREFIX.len()..]
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
        );
        assert_eq!(hash_secret(&a), hash_secret(&a.clone()));
        assert_ne!(hash_secret(&a), hash_secret(&b));
        assert_eq!(base64url(b"\xfb\xff"), "-_8");
        assert_eq!(base64url(b"Man"), "TWFu");
    }
}
