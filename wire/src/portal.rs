//! The portal protocol: how a shell attaches to the portal.
//!
//! A shell dials the portal (role `portal`) with its own `shell/<instance>`
//! certificate, so nothing needs to dial into an instance. Over that connection:
//!
//! - the shell opens one stream and sends [`Register`]: who it is, its stage and
//!   labels, its version, and what it runs; the portal answers [`RegisterReply`];
//! - the portal opens a stream per command and sends the shell protocol's
//!   [`ShellRequest`](crate::shell::ShellRequest)s on it, exactly as a deployer
//!   would on a connection of its own; the shell answers them as it answers those.
//!
//! Each upgrade or rollback the portal sends carries its [`DeploymentId`]. The
//! shell keeps the outcome of each deployment's operation durably and answers a
//! repeated request with the same id with that outcome instead of doing it again
//! (or waits for it, when it still runs), so a portal that lost the answer — its
//! connection cut, or the portal restarted — asks again and learns what happened.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use image_spec::InstanceName;
use serde::{Deserialize, Serialize};

use crate::repo::RemoteError;
use crate::shell::{ImageRef, Stage};

/// A deployment's number, handed out by the portal in increasing order.
///
/// Written as the bare number (`42`); `d42` is accepted when parsing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct DeploymentId(pub u64);

impl fmt::Display for DeploymentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl FromStr for DeploymentId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let digits = s.strip_prefix('d').unwrap_or(s);
        digits
            .parse()
            .map(DeploymentId)
            .map_err(|_| format!("`{s}` is not a deployment id (a number, e.g. `42`)"))
    }
}

/// The first message of an attached shell.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Register {
    /// The instance (it must match the certificate).
    pub instance: InstanceName,
    /// Its stage.
    pub stage: Stage,
    /// Free-form labels (`region=eu`), for people and for choosing instances.
    pub labels: BTreeMap<String, String>,
    /// The shell's software (`molt 0.1.0`).
    pub shell_version: String,
    /// The image it runs, if any.
    pub image: Option<ImageRef>,
    /// Its recorded generation.
    pub generation: u64,
}

/// The portal's answer to [`Register`]: accepted, or why not (e.g. a certificate
/// naming another instance).
pub type RegisterReply = Result<(), RemoteError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deployment_ids_read_and_print_as_numbers() {
        assert_eq!("42".parse::<DeploymentId>().unwrap(), DeploymentId(42));
        assert_eq!("d42".parse::<DeploymentId>().unwrap(), DeploymentId(42));
        assert!("x".parse::<DeploymentId>().is_err());
        assert!("-1".parse::<DeploymentId>().is_err());
        assert_eq!(DeploymentId(7).to_string(), "7");
        assert_eq!(serde_json::to_string(&DeploymentId(7)).unwrap(), "7");
    }
}
