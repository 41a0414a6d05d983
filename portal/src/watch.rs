//! Watch runs: a developer's `molt watch --target T`, as the target's history
//! keeps it.
//!
//! A watch run is opened when the watch starts, takes one cycle for each save
//! it brings onto the target's instances (a pull through the portal naming
//! the run), and is ended when the watch stops. It is one compact record per
//! run, not one deployment per save: how many cycles, how many failed, the
//! latest [`KEEP_CYCLES`] of them in full. Watch runs are not deployments: they
//! take no turn in the queue, never become the target's current image, and
//! cannot be rolled back to. A watch stopped without a word (`kill -9`) stays
//! open; its last cycle's time says when it was last heard from.

use image_spec::{BranchName, CommitId, InstanceName, ServiceName, TargetName, UserName};
use serde::{Deserialize, Serialize};

use crate::deployment::Millis;

/// How many cycles a run keeps in full (the counts cover all of them).
pub const KEEP_CYCLES: usize = 100;

/// What a new watch run is opened with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewWatch {
    /// The target whose instances it pulls onto.
    pub target: TargetName,
    /// The microservice watched.
    pub service: ServiceName,
    /// The branch each save is pushed to.
    pub branch: BranchName,
    /// Who watches.
    pub by: UserName,
}

/// One watch run (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatchRun {
    /// Its number, from 1 (its own sequence, not a deployment id).
    pub id: u64,
    /// The target.
    pub target: TargetName,
    /// The microservice watched.
    pub service: ServiceName,
    /// The branch each save is pushed to.
    pub branch: BranchName,
    /// Who watches.
    pub by: UserName,
    /// When it was opened.
    pub started: Millis,
    /// When it was last heard from: its last cycle, or its start.
    pub last: Millis,
    /// When it was ended (`None`: open, or stopped without a word).
    pub ended: Option<Millis>,
    /// Cycles so far.
    pub cycles: u64,
    /// How many of them failed.
    pub failed: u64,
    /// The latest cycles, oldest first (at most [`KEEP_CYCLES`]).
    pub recent: Vec<WatchCycle>,
}

/// One cycle of a watch run: a save brought onto the target's instances.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatchCycle {
    /// Its number in the run, from 1.
    pub number: u64,
    /// When it ended.
    pub at: Millis,
    /// The commit it pulled (`None`: the revision did not resolve).
    pub commit: Option<CommitId>,
    /// The instances it pulled onto.
    pub instances: Vec<InstanceName>,
    /// How long the pull took, in milliseconds.
    pub millis: u64,
    /// Why it failed (`None`: every instance serves the commit).
    pub error: Option<String>,
}

/// Why a cycle or an end was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WatchError {
    /// The run was ended; a watch that goes on opens a new one.
    #[error("watch run {0} has ended")]
    Ended(u64),
    /// No run has that number.
    #[error("no watch run {0}")]
    NotFound(u64),
}

impl WatchRun {
    /// A new, open run.
    pub fn new(id: u64, new: NewWatch, at: Millis) -> Self {
        Self {
            id,
            target: new.target,
            service: new.service,
            branch: new.branch,
            by: new.by,
            started: at,
            last: at,
            ended: None,
            cycles: 0,
            failed: 0,
            recent: Vec::new(),
        }
    }

    /// Adds a cycle (numbered here), keeping the latest [`KEEP_CYCLES`].
    pub fn add(&mut self, mut cycle: WatchCycle) -> Result<&WatchCycle, WatchError> {
        if self.ended.is_some() {
            return Err(WatchError::Ended(self.id));
        }
        self.cycles += 1;
        if cycle.error.is_some() {
            self.failed += 1;
        }
        cycle.number = self.cycles;
        self.last = self.last.max(cycle.at);
        self.recent.push(cycle);
        if self.recent.len() > KEEP_CYCLES {
            let excess = self.recent.len() - KEEP_CYCLES;
            self.recent.drain(..excess);
        }
        Ok(self.recent.last().expect("a cycle was just pushed"))
    }

    /// Ends the run (ending an ended run changes nothing).
    pub fn end(&mut self, at: Millis) {
        if self.ended.is_none() {
            self.ended = Some(at.max(self.last));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run() -> WatchRun {
        WatchRun::new(
            7,
            NewWatch {
                target: TargetName::new("dev").unwrap(),
                service: ServiceName::new("hello").unwrap(),
                branch: BranchName::new("dev/ada").unwrap(),
                by: UserName::new("ada").unwrap(),
            },
            1_000,
        )
    }

    fn cycle(at: Millis, error: Option<&str>) -> WatchCycle {
        WatchCycle {
            number: 0,
            at,
            commit: Some(CommitId::from_bytes([1; 32])),
            instances: vec![InstanceName::new("dev-1").unwrap()],
            millis: 250,
            error: error.map(str::to_owned),
        }
    }

    #[test]
    fn cycles_are_numbered_counted_and_the_latest_kept() {
        let mut r = run();
        for i in 0..(KEEP_CYCLES as i64 + 5) {
            let error = (i % 10 == 3).then_some("SyntaxError");
            r.add(cycle(2_000 + i, error)).unwrap();
        }
        assert_eq!(r.cycles, KEEP_CYCLES as u64 + 5);
        assert_eq!(r.failed, 11);
        assert_eq!(r.recent.len(), KEEP_CYCLES);
        assert_eq!(r.recent[0].number, 6);
        assert_eq!(r.recent.last().unwrap().number, KEEP_CYCLES as u64 + 5);
        assert_eq!(r.last, 2_000 + KEEP_CYCLES as i64 + 4);
    }

    #[test]
    fn an_ended_run_takes_no_cycle_and_ends_once() {
        let mut r = run();
        r.add(cycle(5_000, None)).unwrap();
        r.end(4_000);
        assert_eq!(
            r.ended,
            Some(5_000),
            "an end is never before the last cycle"
        );
        r.end(9_000);
        assert_eq!(r.ended, Some(5_000));
        assert_eq!(r.add(cycle(6_000, None)), Err(WatchError::Ended(7)));
        assert_eq!(r.cycles, 1);
    }
}
