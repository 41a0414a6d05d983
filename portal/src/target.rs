//! Targets (the portal's "Services") and the instances that belong to them.
//!
//! A target is a name, a stage and its instances, with the settings its
//! deployments use unless a deployment says otherwise. An instance belongs to at
//! most one target; the store refuses a target that would share one
//! ([`crate::store::StoreError::InstanceTaken`]).

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use image_spec::{InstanceName, TargetName};
use serde::{Deserialize, Serialize};
use wire::shell::{ImageRef, Stage, Strategy};

use crate::deployment::Millis;

/// How a deployment goes across a target's instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Rollout {
    /// Every instance at once.
    All,
    /// One instance after the other.
    OneByOne,
    /// The first instance; the rest together once it has stayed healthy for the
    /// target's canary time.
    Canary,
}

impl fmt::Display for Rollout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Rollout::All => "all",
            Rollout::OneByOne => "one-by-one",
            Rollout::Canary => "canary",
        })
    }
}

impl FromStr for Rollout {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "all" => Ok(Rollout::All),
            "one-by-one" => Ok(Rollout::OneByOne),
            "canary" => Ok(Rollout::Canary),
            other => Err(format!(
                "unknown rollout `{other}` (all, one-by-one or canary)"
            )),
        }
    }
}

impl Rollout {
    /// The waves of a rollout over `instances` (in order): each wave runs at
    /// once, and the next starts only when it succeeded.
    pub fn waves<T: Clone>(self, instances: &[T]) -> Vec<Vec<T>> {
        match (self, instances) {
            (_, []) => Vec::new(),
            (Rollout::All, all) => vec![all.to_vec()],
            (Rollout::OneByOne, all) => all.iter().map(|i| vec![i.clone()]).collect(),
            (Rollout::Canary, [first]) => vec![vec![first.clone()]],
            (Rollout::Canary, [first, rest @ ..]) => vec![vec![first.clone()], rest.to_vec()],
        }
    }
}

/// What a target's deployments do unless told otherwise.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settings {
    /// The strategy on each instance; `None`: each instance's own default.
    pub strategy: Option<Strategy>,
    /// The rollout across instances.
    pub rollout: Rollout,
    /// How long the canary must stay healthy before the rest follow, in seconds.
    pub canary_secs: u64,
    /// At most this many instances of a wave upgrade at once (each fetches
    /// from the repository: a bound keeps a large `all` rollout from
    /// overwhelming it).
    pub parallel: u32,
    /// How many finished deployments the history keeps.
    pub keep_history: u32,
    /// How many succeeded deployments can be rolled back to.
    pub keep_rollback: u32,
}

impl fmt::Display for Settings {
    /// In plain words, for the audit log and messages:
    /// `rollout one-by-one, strategy shadow, parallel 25, canary 30 s, history 200, rollback 5`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "rollout {}, strategy ", self.rollout)?;
        match self.strategy {
            Some(s) => write!(f, "{s}")?,
            None => f.write_str("each instance's default")?,
        }
        write!(
            f,
            ", parallel {}, canary {} s, history {}, rollback {}",
            self.parallel, self.canary_secs, self.keep_history, self.keep_rollback
        )
    }
}

/// A list of names in plain words: `a, b` or `none`.
pub fn names<T: fmt::Display>(list: &[T]) -> String {
    if list.is_empty() {
        return "none".to_owned();
    }
    list.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            strategy: None,
            rollout: Rollout::OneByOne,
            canary_secs: 30,
            parallel: 25,
            keep_history: 200,
            keep_rollback: 5,
        }
    }
}

/// A deployment target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    /// Its name.
    pub name: TargetName,
    /// The stage of its instances.
    pub stage: Stage,
    /// Its instances, in rollout order.
    pub instances: Vec<InstanceName>,
    /// Its settings.
    pub settings: Settings,
    /// When it was made.
    pub created: Millis,
}

/// What the portal knows of an instance: what its shell said when it registered,
/// and whether it is attached now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceRecord {
    /// The instance.
    pub name: InstanceName,
    /// Its stage, as its shell says.
    pub stage: Stage,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// Its shell's software.
    pub shell_version: String,
    /// The image it ran when last heard of.
    pub image: Option<ImageRef>,
    /// Its generation when last heard of.
    pub generation: u64,
    /// Is its shell attached now?
    pub online: bool,
    /// When it was last attached (now, while online).
    pub last_seen: Millis,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_and_lists_read_as_words() {
        assert_eq!(
            Settings::default().to_string(),
            "rollout one-by-one, strategy each instance's default, parallel 25, \
             canary 30 s, history 200, rollback 5"
        );
        assert_eq!(names::<String>(&[]), "none");
        assert_eq!(names(&["a-1", "b-2"]), "a-1, b-2");
    }

    #[test]
    fn rollouts_make_waves() {
        let i = [1, 2, 3];
        assert_eq!(Rollout::All.waves(&i), vec![vec![1, 2, 3]]);
        assert_eq!(Rollout::OneByOne.waves(&i), vec![vec![1], vec![2], vec![3]]);
        assert_eq!(Rollout::Canary.waves(&i), vec![vec![1], vec![2, 3]]);
        assert_eq!(Rollout::Canary.waves(&[1]), vec![vec![1]]);
        assert!(Rollout::All.waves::<u8>(&[]).is_empty());
        for r in [Rollout::All, Rollout::OneByOne, Rollout::Canary] {
            assert_eq!(r.to_string().parse::<Rollout>(), Ok(r));
            assert_eq!(serde_json::to_value(r).unwrap(), r.to_string());
        }
        assert!("blue-green".parse::<Rollout>().is_err());
    }
}
