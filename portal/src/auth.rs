//! Who may do what: users, their API tokens, and the principal a request acts as.
//!
//! A person is one [`User`] whatever credential they present: a certificate
//! `user/ada/…` (over HTTPS), one of ada's bearer tokens, or her browser
//! session — each resolves to a [`Principal`] acting as `ada`, with at most
//! her grant. Grants are the cluster's
//! ([`Grant`]): developers read and deploy to development and quality targets,
//! deployers deploy anywhere, admins also manage targets, users and tokens.
//!
//! Tokens are random secrets shown once; the store keeps only their blake3 hash
//! ([`hash_secret`]), so a copy of the database reveals no usable token.
//!
//! Passwords (for browser logins) are kept as argon2id hashes in PHC form
//! ([`hash_password`], the crate's default parameters: 19 MiB, 2 passes),
//! checked by [`verify_password`], which costs the same for a user without a
//! password or without an account. A login opens a [`Session`]: a random id in
//! a cookie, kept by the store as the blake3 hash of the id (like tokens), with
//! a CSRF token, an idle expiry ([`SESSION_IDLE_MS`]) and an absolute one
//! ([`SESSION_MAX_MS`]). Failed logins are slowed per user name
//! ([`login_delay`]).

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
    /// Their password's argon2id hash (PHC string), for browser logins;
    /// `None`: they cannot log in with a password.
    pub password: Option<String>,
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
    /// The credential that proved it.
    pub via: Via,
}

/// The credential a request was authenticated by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Via {
    /// A bearer token (its id).
    Token(String),
    /// A client certificate of the cluster CA (its serial, hex).
    Certificate(String),
    /// A browser session: the hash its record is kept under, and its CSRF token.
    Session {
        /// The hash of the session id.
        hash: [u8; 32],
        /// The CSRF token every state-changing request must carry.
        csrf: String,
    },
}

impl Via {
    /// `token`, `certificate` or `session`.
    pub fn kind(&self) -> &'static str {
        match self {
            Via::Token(_) => "token",
            Via::Certificate(_) => "certificate",
            Via::Session { .. } => "session",
        }
    }
}

/// A session lives at most this long after its last request (30 minutes).
pub const SESSION_IDLE_MS: Millis = 30 * 60 * 1000;

/// A session lives at most this long after its login (12 hours).
pub const SESSION_MAX_MS: Millis = 12 * 60 * 60 * 1000;

/// The cookie that carries a session id.
pub const SESSION_COOKIE: &str = "molt_session";

/// A browser session's record (its id is not kept, only its hash).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    /// The blake3 hash of the session id (the cookie's value).
    pub hash: [u8; 32],
    /// Whose it is.
    pub user: UserName,
    /// The user's grant when they logged in: a session ends when it changes.
    pub grant: Grant,
    /// The CSRF token its state-changing requests carry.
    pub csrf: String,
    /// When it was opened.
    pub created: Millis,
    /// When it was last used.
    pub last_used: Millis,
}

impl Session {
    /// Has it ended by `now` (idle or absolute expiry)?
    pub fn expired(&self, now: Millis) -> bool {
        now >= self.created + SESSION_MAX_MS || now >= self.last_used + SESSION_IDLE_MS
    }
}

/// A new random session id or CSRF token: 43 characters of base64url.
pub fn new_random() -> Result<String, getrandom::Error> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)?;
    Ok(base64url(&bytes))
}

/// Compares two secrets in time independent of where they differ.
pub fn same_secret(a: &str, b: &str) -> bool {
    hash_secret(a) == hash_secret(b)
}

/// Why a password cannot be set.
#[derive(Debug, thiserror::Error)]
pub enum PasswordError {
    /// Too short or too long.
    #[error("a password is {MIN_PASSWORD} to {MAX_PASSWORD} characters, not {0}")]
    Length(usize),
    /// No randomness for the salt.
    #[error("no randomness for the salt: {0}")]
    Random(getrandom::Error),
    /// The hash failed.
    #[error("cannot hash the password: {0}")]
    Hash(String),
}

/// The shortest password accepted.
pub const MIN_PASSWORD: usize = 8;
/// The longest password accepted (hashing cost does not depend on it, but a
/// bound keeps requests small).
pub const MAX_PASSWORD: usize = 1024;

/// The argon2id hash of `password` with a fresh random salt, as a PHC string.
/// Slow on purpose (tens of milliseconds): call it off the async threads.
pub fn hash_password(password: &str) -> Result<String, PasswordError> {
    use argon2::PasswordHasher;
    let n = password.chars().count();
    if !(MIN_PASSWORD..=MAX_PASSWORD).contains(&n) {
        return Err(PasswordError::Length(n));
    }
    let mut salt = [0u8; 16];
    getrandom::fill(&mut salt).map_err(PasswordError::Random)?;
    let salt = argon2::password_hash::SaltString::encode_b64(&salt)
        .map_err(|e| PasswordError::Hash(e.to_string()))?;
    argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| PasswordError::Hash(e.to_string()))
}

/// A hash no password matches, verified when there is no real one so that a
/// login for an unknown user costs the same as one for a known user.
const NO_PASSWORD: &str = "$argon2id$v=19$m=19456,t=2,p=1$bm8tcGFzc3dvcmQtc2FsdA$3kqzlb3oYWVRZxJqa4HSDE9jBVUwgDF0O2uy3sVC2lI";

/// Does `password` match `hash` (a PHC string)? Constant-time in the
/// comparison; a missing or unreadable hash costs a verification all the same
/// and matches nothing.
pub fn verify_password(password: &str, hash: Option<&str>) -> bool {
    use argon2::PasswordVerifier;
    let real = hash.and_then(|h| argon2::PasswordHash::new(h).ok());
    let ok = match &real {
        Some(parsed) => argon2::Argon2::default()
            .verify_password(password.as_bytes(), parsed)
            .is_ok(),
        None => {
            if let Ok(dummy) = argon2::PasswordHash::new(NO_PASSWORD) {
                let _ = argon2::Argon2::default().verify_password(password.as_bytes(), &dummy);
            }
            false
        }
    };
    ok && real.is_some()
}

/// Failed logins for one user name before they are slowed.
pub const FREE_LOGIN_FAILURES: u32 = 3;

/// The first delay once a name has failed [`FREE_LOGIN_FAILURES`] times.
pub const FIRST_LOGIN_DELAY_MS: u64 = 500;

/// The longest delay.
pub const MAX_LOGIN_DELAY_MS: u64 = 30_000;

/// How long a login attempt for a name that has failed `failures` times in a
/// row waits before it is answered: nothing for the first
/// [`FREE_LOGIN_FAILURES`], then 0.5 s, 1 s, 2 s, … doubling up to 30 s.
pub fn login_delay(failures: u32) -> std::time::Duration {
    let ms = match failures.checked_sub(FREE_LOGIN_FAILURES) {
        None => 0,
        Some(extra) => FIRST_LOGIN_DELAY_MS
            .saturating_mul(1u64 << extra.min(20))
            .min(MAX_LOGIN_DELAY_MS),
    };
    std::time::Duration::from_millis(ms)
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
            via: Via::Token("test".into()),
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

    #[test]
    fn passwords_are_argon2id_and_verified() {
        let hash = hash_password("correct horse").unwrap();
        assert!(hash.starts_with("$argon2id$"), "{hash}");
        assert_ne!(hash, hash_password("correct horse").unwrap(), "salted");
        assert!(verify_password("correct horse", Some(&hash)));
        assert!(!verify_password("wrong horse", Some(&hash)));
        assert!(!verify_password("correct horse", None));
        assert!(!verify_password("correct horse", Some("not a hash")));
        assert!(argon2::PasswordHash::new(NO_PASSWORD).is_ok());
        assert!(matches!(
            hash_password("short"),
            Err(PasswordError::Length(5))
        ));
    }

    #[test]
    fn failed_logins_are_slowed_exponentially_up_to_a_cap() {
        let ms = |n| login_delay(n).as_millis();
        assert_eq!((ms(0), ms(1), ms(2), ms(3)), (0, 0, 0, 500));
        assert_eq!((ms(4), ms(5), ms(6)), (1000, 2000, 4000));
        assert_eq!(ms(9), 30_000);
        assert_eq!(ms(u32::MAX), 30_000);
    }

    #[test]
    fn sessions_end_idle_or_at_their_age() {
        let s = Session {
            hash: [0; 32],
            user: UserName::new("ada").unwrap(),
            grant: Grant::Admin,
            csrf: "x".into(),
            created: 0,
            last_used: 0,
        };
        assert!(!s.expired(SESSION_IDLE_MS - 1));
        assert!(s.expired(SESSION_IDLE_MS));
        let busy = Session {
            last_used: SESSION_MAX_MS - 1,
            ..s
        };
        assert!(!busy.expired(SESSION_MAX_MS - 1));
        assert!(busy.expired(SESSION_MAX_MS));
    }
}
